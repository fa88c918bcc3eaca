//! The options supervise passes to CRIU for a job (built from the job file's
//! `[checkpoint]` table and its `[checkpoint.criu_opts]` pass-through table
//! by `crate::config`).

use std::collections::BTreeMap;

use super::rpc::CriuOpts;

/// Default CRIU log level (`checkpoint.log_level`).
pub const DEFAULT_CRIU_LOG_LEVEL: u32 = 2;
/// Largest CRIU log level (`checkpoint.log_level`).
pub const MAX_CRIU_LOG_LEVEL: u32 = 4;
/// CRIU's own default `ghost_limit` (rpc.proto: `[default = 0x100000]`).
pub const CRIU_DEFAULT_GHOST_LIMIT: u32 = 0x10_0000;

/// CRIU options passed through from the `[checkpoint]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CriuOptions {
    /// `--shell-job`: the job is attached to a terminal / session.
    pub shell_job: bool,
    /// `--tcp-established`: checkpoint established TCP connections.
    pub tcp_established: bool,
    /// `--file-locks`: checkpoint file locks.
    pub file_locks: bool,
    /// `--ext-unix-sk`: allow external unix sockets.
    pub ext_unix_sk: bool,
    /// CRIU `-v` log level, `0..=4`.
    pub log_level: u32,
    /// CRIU `--network-lock` method.
    pub network_lock: NetworkLock,
    /// Dump: `--ghost-limit`, the largest unlinked-but-open file CRIU copies
    /// into the image, in bytes. `None`: CRIU's default (1 MiB).
    pub ghost_limit: Option<u32>,
    /// Dump: `--skip-in-flight` (`tcp_skip_in_flight`): ignore half-open
    /// (not yet accepted) TCP connections instead of failing.
    pub skip_in_flight: bool,
    /// Dump: `--link-remap`: link unlinked files back into the file system
    /// (instead of copying them as ghost files) where possible.
    pub link_remap: bool,
    /// Restore: `--tcp-close`: restore connected TCP sockets closed.
    pub tcp_close: bool,
    /// Further `criu_opts` fields from `[checkpoint.criu_opts]`, by name
    /// (each one of [`PASS_THROUGH`]), set on every request.
    pub pass_through: BTreeMap<String, OptValue>,
}

impl Default for CriuOptions {
    fn default() -> Self {
        CriuOptions {
            shell_job: false,
            tcp_established: false,
            file_locks: false,
            ext_unix_sk: false,
            log_level: DEFAULT_CRIU_LOG_LEVEL,
            network_lock: NetworkLock::default(),
            ghost_limit: None,
            skip_in_flight: false,
            link_remap: false,
            tcp_close: false,
            pass_through: BTreeMap::new(),
        }
    }
}

crate::choice::choice_enum! {
    /// CRIU's network lock method (`checkpoint.network_lock`), used with
    /// `tcp_established`.
    NetworkLock, default Nftables {
        /// `iptables`
        Iptables => "iptables",
        /// `nftables` (default)
        Nftables => "nftables",
        /// `skip`: do not lock the network.
        Skip => "skip",
    }
}

// ---------------------------------------------------------------------------
// The pass-through table

/// A validated value of a pass-through option (its type matches the
/// field's [`OptKind`]; integers are in the field's range).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptValue {
    /// `bool` fields.
    Bool(bool),
    /// `int32` / `uint32` fields.
    Int(i64),
    /// `string` fields.
    Str(String),
    /// `repeated string` fields.
    List(Vec<String>),
}

/// The protobuf type of a pass-through field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptKind {
    /// `bool`
    Bool,
    /// `int32`
    Int32,
    /// `uint32`
    Uint32,
    /// `string`
    Str,
    /// `repeated string`
    StrList,
}

impl OptKind {
    /// What a job file must give, for messages.
    pub fn expecting(self) -> &'static str {
        match self {
            OptKind::Bool => "a boolean",
            OptKind::Int32 => "an integer (32-bit signed)",
            OptKind::Uint32 => "a non-negative integer (32-bit)",
            OptKind::Str => "a string",
            OptKind::StrList => "an array of strings",
        }
    }

    /// The range of an integer kind.
    pub fn range(self) -> Option<(i64, i64)> {
        match self {
            OptKind::Int32 => Some((i64::from(i32::MIN), i64::from(i32::MAX))),
            OptKind::Uint32 => Some((0, i64::from(u32::MAX))),
            _ => None,
        }
    }
}

/// One `criu_opts` field a job file may set in `[checkpoint.criu_opts]`.
pub struct PassField {
    /// The field's name in rpc.proto (and in the job file).
    pub name: &'static str,
    /// Its protobuf type.
    pub kind: OptKind,
    set: fn(&mut CriuOpts, &OptValue),
}

impl std::fmt::Debug for PassField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PassField")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl PassField {
    /// Sets the field on `opts` (a value of another kind is ignored; the
    /// job-file parser only produces matching ones).
    pub fn set(&self, opts: &mut CriuOpts, v: &OptValue) {
        (self.set)(opts, v)
    }
}

/// Builds [`PASS_THROUGH`]: the setters are checked by the compiler against
/// the generated prost type, the names and kinds against rpc.proto by a
/// unit test.
macro_rules! pass_through {
    ($($name:ident : $kind:ident),+ $(,)?) => {
        /// The `criu_opts` fields `[checkpoint.criu_opts]` accepts, in
        /// rpc.proto order.
        pub static PASS_THROUGH: &[PassField] = &[$(
            PassField {
                name: stringify!($name),
                kind: OptKind::$kind,
                set: |o, v| pass_through!(@set o.$name, $kind, v),
            },
        )+];
    };
    (@set $f:expr, Bool, $v:expr) => { if let OptValue::Bool(b) = $v { $f = Some(*b) } };
    (@set $f:expr, Int32, $v:expr) => {
        if let OptValue::Int(i) = $v { $f = i32::try_from(*i).ok() }
    };
    (@set $f:expr, Uint32, $v:expr) => {
        if let OptValue::Int(i) = $v { $f = u32::try_from(*i).ok() }
    };
    (@set $f:expr, Str, $v:expr) => { if let OptValue::Str(s) = $v { $f = Some(s.clone()) } };
    (@set $f:expr, StrList, $v:expr) => { if let OptValue::List(l) = $v { $f = l.clone() } };
}

pass_through! {
    evasive_devices: Bool,
    auto_dedup: Bool,
    cpu_cap: Uint32,
    force_irmap: Bool,
    manage_cgroups: Bool,
    auto_ext_mnt: Bool,
    ext_sharing: Bool,
    ext_masters: Bool,
    skip_mnt: StrList,
    enable_fs: StrList,
    irmap_scan_paths: StrList,
    external: StrList,
    empty_ns: Uint32,
    cgroup_props: Str,
    cgroup_props_file: Str,
    cgroup_dump_controller: StrList,
    freeze_cgroup: Str,
    weak_sysctls: Bool,
    lsm_profile: Str,
    cgroup_yard: Str,
    lsm_mount_context: Str,
    mntns_compat_mode: Bool,
    skip_file_rwx_check: Bool,
    display_stats: Bool,
}

/// `criu_opts` fields `[checkpoint.criu_opts]` refuses, with the reason.
pub static REFUSED: &[(&str, &str)] = &[
    ("images_dir_fd", "supervise sets the image directory itself (`checkpoint.dir`)"),
    ("images_dir", "supervise sets the image directory itself (`checkpoint.dir`)"),
    ("pid", "supervise sets the process to dump itself"),
    ("leave_running", "supervise leaves the job running after each checkpoint itself"),
    ("ext_unix_sk", "use `checkpoint.ext_unix_sk`"),
    ("tcp_established", "use `checkpoint.tcp_established`"),
    ("shell_job", "use `checkpoint.shell_job`"),
    ("file_locks", "use `checkpoint.file_locks`"),
    ("log_level", "use `checkpoint.log_level`"),
    ("log_file", "supervise reads CRIU's log from its stderr (`log_to_stderr`)"),
    ("ps", "page-server dumps are not supported: supervise stores images itself"),
    ("notify_scripts", "supervise handles CRIU's notifications itself"),
    ("root", "supervise restores the job into its own namespaces"),
    ("parent_img", "supervise chooses pre-dump parents itself"),
    ("track_mem", "supervise enables memory tracking itself where the kernel supports it"),
    ("work_dir_fd", "supervise passes no descriptors to CRIU besides its RPC socket"),
    ("link_remap", "use `checkpoint.link_remap`"),
    ("exec_cmd", "a restored job is supervise's child; CRIU must not run a command after restoring"),
    ("rst_sibling", "supervise restores the job as a sibling of CRIU itself"),
    ("inherit_fd", "supervise passes no descriptors to CRIU besides its RPC socket"),
    ("ghost_limit", "use `checkpoint.ghost_limit` (a size with units)"),
    ("timeout", "use `checkpoint.timeout`"),
    ("tcp_skip_in_flight", "use `checkpoint.skip_in_flight`"),
    ("lazy_pages", "supervise runs lazy restores itself: set `[restore] lazy` instead"),
    ("status_fd", "supervise passes no descriptors to CRIU besides its RPC socket"),
    ("orphan_pts_master", "supervise passes no descriptors to CRIU besides its RPC socket"),
    ("config_file", "a CRIU configuration file could override the options supervise sets; use `[checkpoint.criu_opts]`"),
    ("tcp_close", "use `checkpoint.tcp_close`"),
    ("tls_cacert", "TLS only applies to page-server dumps, which supervise does not use"),
    ("tls_cacrl", "TLS only applies to page-server dumps, which supervise does not use"),
    ("tls_cert", "TLS only applies to page-server dumps, which supervise does not use"),
    ("tls_key", "TLS only applies to page-server dumps, which supervise does not use"),
    ("tls", "TLS only applies to page-server dumps, which supervise does not use"),
    ("tls_no_cn_verify", "TLS only applies to page-server dumps, which supervise does not use"),
    ("pidfd_store_sk", "supervise passes no descriptors to CRIU besides its RPC socket"),
    ("network_lock", "use `checkpoint.network_lock`"),
    ("unprivileged", "supervise runs CRIU as root"),
    ("leave_stopped", "supervise leaves the job running after each checkpoint itself"),
    ("log_to_stderr", "supervise reads CRIU's log from its stderr itself"),
];

/// `criu_opts` fields of a type the pass-through cannot express (messages
/// and enums), with what to use instead.
pub static UNSUPPORTED: &[(&str, &str)] = &[
    (
        "veths",
        "a list of messages (deprecated in CRIU); use `external`",
    ),
    (
        "ext_mnt",
        "a list of messages (deprecated in CRIU); use `external`",
    ),
    ("cg_root", "a list of messages is not supported"),
    (
        "unix_sk_ino",
        "a list of messages (deprecated in CRIU); use `external`",
    ),
    (
        "manage_cgroups_mode",
        "an enum is not supported; use `manage_cgroups`",
    ),
    ("join_ns", "a list of messages is not supported"),
    ("pre_dump_mode", "an enum is not supported"),
];

/// The pass-through field called `name`, or why there is none: the error
/// is serde's "unknown field" wording (the job-file diagnostics turn it
/// into the list of known names and a suggestion) or the refusal's reason.
pub fn pass_through_field(name: &str) -> Result<&'static PassField, String> {
    if let Some(f) = PASS_THROUGH.iter().find(|f| f.name == name) {
        return Ok(f);
    }
    if let Some((_, why)) = REFUSED.iter().find(|(n, _)| *n == name) {
        return Err(format!("`{name}` cannot be set here: {why}"));
    }
    if let Some((_, why)) = UNSUPPORTED.iter().find(|(n, _)| *n == name) {
        return Err(format!("`{name}` is not supported: {why}"));
    }
    let known: Vec<String> = PASS_THROUGH
        .iter()
        .map(|f| format!("`{}`", f.name))
        .collect();
    Err(format!(
        "unknown field `{name}`, expected one of {}",
        known.join(", ")
    ))
}

/// Sets the pass-through options on `opts`.
pub fn apply_pass_through(opts: &mut CriuOpts, o: &CriuOptions) {
    for (name, v) in &o.pass_through {
        if let Ok(f) = pass_through_field(name) {
            f.set(opts, v);
        }
    }
}

/// Parses a size: a number with an optional unit, `B`, `K`/`KiB`,
/// `M`/`MiB` or `G`/`GiB` (powers of 1024, as CRIU's own option parser),
/// e.g. `"8MiB"`, `"512K"`, `"1048576"`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = (&t[..split], t[split..].trim());
    if num.is_empty() {
        return Err(format!(
            "invalid size {s:?}: expected a whole number with an optional unit \
             (B, K, KiB, M, MiB, G, GiB), e.g. \"8MiB\""
        ));
    }
    let mult: u64 = match unit {
        "" | "B" => 1,
        "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        _ => {
            return Err(format!(
                "invalid size {s:?}: unknown unit {unit:?} (expected B, K, KiB, M, MiB, G or \
                 GiB; sizes are powers of 1024)"
            ))
        }
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("invalid size {s:?}: too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every field of rpc.proto's `criu_opts` is either passed through with
    /// its protobuf type, refused, or unsupported; and nothing else is
    /// listed. A newer vendored rpc.proto fails here until it is sorted in.
    #[test]
    fn pass_through_tables_match_rpc_proto() {
        let proto = include_str!("rpc.proto");
        let start = proto.find("message criu_opts {").unwrap();
        let body = &proto[start..];
        let body = &body[..body.find("\n}").unwrap()];
        let mut fields: Vec<(String, String, bool)> = Vec::new();
        for line in body.lines().skip(1) {
            let line = line.trim();
            if line.is_empty() || line.starts_with("/*") || line.starts_with("//") {
                continue;
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            assert!(
                matches!(words[0], "optional" | "required" | "repeated"),
                "unexpected line in criu_opts: {line}"
            );
            fields.push((
                words[2].to_string(),
                words[1].to_string(),
                words[0] == "repeated",
            ));
        }
        assert!(fields.len() > 60, "{}", fields.len());
        let mut listed: Vec<&str> = PASS_THROUGH.iter().map(|f| f.name).collect();
        listed.extend(REFUSED.iter().map(|(n, _)| *n));
        listed.extend(UNSUPPORTED.iter().map(|(n, _)| *n));
        let mut sorted = listed.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), listed.len(), "a name is listed twice");
        for n in &listed {
            assert!(
                fields.iter().any(|(f, _, _)| f == n),
                "{n} is not a criu_opts field"
            );
        }
        for (name, ty, repeated) in &fields {
            let pass = PASS_THROUGH.iter().find(|f| f.name == name);
            let other = REFUSED.iter().chain(UNSUPPORTED).any(|(n, _)| n == name);
            match pass {
                Some(f) => {
                    let want = match (ty.as_str(), repeated) {
                        ("bool", false) => OptKind::Bool,
                        ("int32", false) => OptKind::Int32,
                        ("uint32", false) => OptKind::Uint32,
                        ("string", false) => OptKind::Str,
                        ("string", true) => OptKind::StrList,
                        _ => panic!("{name}: {ty} cannot be passed through"),
                    };
                    assert_eq!(f.kind, want, "{name}");
                }
                None => assert!(other, "criu_opts field {name} is not sorted in"),
            }
        }
    }

    #[test]
    fn pass_through_sets_fields() {
        let mut o = CriuOptions::default();
        o.pass_through
            .insert("manage_cgroups".into(), OptValue::Bool(true));
        o.pass_through.insert("cpu_cap".into(), OptValue::Int(7));
        o.pass_through
            .insert("freeze_cgroup".into(), OptValue::Str("/sys/x".into()));
        o.pass_through.insert(
            "external".into(),
            OptValue::List(vec!["mnt[/a]:a".into(), "dev[1/2]:d".into()]),
        );
        let mut opts = CriuOpts::default();
        apply_pass_through(&mut opts, &o);
        assert_eq!(opts.manage_cgroups, Some(true));
        assert_eq!(opts.cpu_cap, Some(7));
        assert_eq!(opts.freeze_cgroup.as_deref(), Some("/sys/x"));
        assert_eq!(opts.external, ["mnt[/a]:a", "dev[1/2]:d"]);
    }

    #[test]
    fn pass_through_names() {
        assert!(pass_through_field("enable_fs").is_ok());
        let e = pass_through_field("pid").unwrap_err();
        assert!(e.contains("supervise sets the process"), "{e}");
        let e = pass_through_field("ghost_limit").unwrap_err();
        assert!(e.contains("checkpoint.ghost_limit"), "{e}");
        let e = pass_through_field("veths").unwrap_err();
        assert!(e.contains("not supported"), "{e}");
        let e = pass_through_field("manage_cgroup").unwrap_err();
        assert!(
            e.starts_with("unknown field `manage_cgroup`, expected one of `"),
            "{e}"
        );
        assert!(e.contains("`manage_cgroups`"), "{e}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("8MiB"), Ok(8 << 20));
        assert_eq!(parse_size("8M"), Ok(8 << 20));
        assert_eq!(parse_size("512 K"), Ok(512 << 10));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("100"), Ok(100));
        assert_eq!(parse_size("100B"), Ok(100));
        assert!(parse_size("8MB")
            .unwrap_err()
            .contains("unknown unit \"MB\""));
        assert!(parse_size("1.5MiB").is_err());
        assert!(parse_size("MiB").unwrap_err().contains("whole number"));
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999999999999G")
            .unwrap_err()
            .contains("too large"));
    }
}
