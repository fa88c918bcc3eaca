//! `supervise check`: the preflight. It tells whether checkpointing can work
//! on this machine and, when it cannot, how to fix it. `supervise run`
//! refuses to start with the same report when anything fatal is found.

use std::process::Command;

use crate::criu::{criu_bin, parse_version, MIN_VERSION};

/// How serious a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Fine.
    Ok,
    /// Works, with a limitation.
    Warn,
    /// Checkpointing cannot work.
    Fail,
}

/// One finding.
#[derive(Debug, Clone)]
pub struct Finding {
    /// What was checked.
    pub what: &'static str,
    /// The verdict.
    pub level: Level,
    /// What was found.
    pub detail: String,
    /// How to fix it, for Warn/Fail.
    pub fix: Option<String>,
}

/// The preflight's findings.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// In check order.
    pub findings: Vec<Finding>,
    /// Whether CRIU can track dirty memory (pre-dump / --track-mem).
    pub dirty_tracking: bool,
    /// CRIU's version, if found.
    pub criu_version: Option<(u32, u32, u32)>,
}

impl Report {
    /// True if checkpointing cannot work.
    pub fn fatal(&self) -> bool {
        self.findings.iter().any(|f| f.level == Level::Fail)
    }

    /// Human-readable report.
    pub fn render(&self) -> String {
        let mut s = String::new();
        for f in &self.findings {
            let tag = match f.level {
                Level::Ok => "ok  ",
                Level::Warn => "warn",
                Level::Fail => "FAIL",
            };
            s.push_str(&format!("[{tag}] {}: {}\n", f.what, f.detail));
            if let Some(fix) = &f.fix {
                for line in fix.lines() {
                    s.push_str(&format!("       fix: {line}\n"));
                }
            }
        }
        if self.fatal() {
            s.push_str(
                "checkpointing cannot work on this machine until the FAIL items are fixed\n",
            );
        } else {
            s.push_str("checkpointing can work on this machine\n");
        }
        s
    }

    /// Adds each job's store key: where it is and that without it the
    /// job's images cannot be read; a missing or wrong key fails.
    pub fn store_keys(&mut self, jobs: &[crate::config::JobConfig]) {
        use crate::store::{ImageStore, StoreError};
        const BACKUP: &str = "keep a copy of the key file somewhere safe (not in the image \
            directory): losing it means losing the images";
        for cfg in jobs {
            let o = &cfg.store;
            // A user who cannot see into the state directory (root's, 0700)
            // is told so, never that the store or its key is missing.
            let store = match cfg
                .checkpoint
                .dir
                .join(crate::store::MARKER_NAME)
                .try_exists()
            {
                Ok(true) => Some(ImageStore::open_read_only_with(&cfg.checkpoint.dir, o)),
                Err(e) if crate::fsutil::is_permission_denied(&e) => {
                    self.cannot_see(cfg, "image store", &cfg.checkpoint.dir);
                    None
                }
                _ => None,
            };
            match store {
                Some(Err(e @ StoreError::Key(_))) if denied(&e) => {
                    self.cannot_see(cfg, "store key", &o.key_file);
                }
                Some(Err(e @ StoreError::Key(_))) => self.push(
                    "store key",
                    Level::Fail,
                    format!("job {}: {e}", cfg.name),
                    None,
                ),
                Some(Err(e)) => self.push(
                    "image store",
                    Level::Warn,
                    format!("job {}: {e}", cfg.name),
                    None,
                ),
                Some(Ok(s)) if s.key_info().is_some() => {
                    let (path, id) = s.key_info().unwrap();
                    self.push(
                        "store key",
                        Level::Ok,
                        format!(
                            "job {}: {} (key id {id}) opens its images; without it they \
                             cannot be read",
                            cfg.name,
                            path.display()
                        ),
                        Some(BACKUP),
                    )
                }
                _ if !o.encryption => self.push(
                    "store key",
                    Level::Warn,
                    format!(
                        "job {}: encryption is off: the images hold the job's memory in plaintext",
                        cfg.name
                    ),
                    Some("remove `encryption = false` from the job's [store] table"),
                ),
                _ => match o.key_file.try_exists() {
                    Err(e) if crate::fsutil::is_permission_denied(&e) => {
                        self.cannot_see(cfg, "store key", &o.key_file)
                    }
                    Ok(true) => self.push(
                        "store key",
                        Level::Ok,
                        format!(
                            "job {}: {} will seal its images from the first checkpoint; \
                             without it they cannot be read",
                            cfg.name,
                            o.key_file.display()
                        ),
                        Some(BACKUP),
                    ),
                    _ => self.push(
                        "store key",
                        Level::Ok,
                        format!(
                            "job {}: {} will be generated at the first checkpoint; without it \
                             the images cannot be read",
                            cfg.name,
                            o.key_file.display()
                        ),
                        Some(BACKUP),
                    ),
                },
            }
        }
    }

    /// "job NAME: cannot see its store key PATH: permission denied on DIR"
    /// (a warning: the key or store may well be there, for root). `what`
    /// is "store key" or "image store".
    fn cannot_see(
        &mut self,
        cfg: &crate::config::JobConfig,
        what: &'static str,
        path: &std::path::Path,
    ) {
        let on = crate::fsutil::unsearchable_dir(path).unwrap_or_else(|| path.to_path_buf());
        self.push(
            what,
            Level::Warn,
            format!(
                "job {}: cannot see its {what} {}: permission denied on {} (uid {} may not \
                 look there; whether it exists is unknown)",
                cfg.name,
                path.display(),
                on.display(),
                crate::fsutil::own_uid()
            ),
            Some("run `supervise check` as root (or as the user supervise runs as)"),
        );
    }

    fn push(&mut self, what: &'static str, level: Level, detail: String, fix: Option<&str>) {
        self.findings.push(Finding {
            what,
            level,
            detail,
            fix: fix.map(str::to_string),
        });
    }
}

/// True if `e` comes down to a "permission denied" from the OS.
fn denied(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if crate::fsutil::is_permission_denied(io) {
                return true;
            }
        }
        cur = e.source();
    }
    false
}

const SETUP_FIX: &str = "run scripts/setup.sh (installs CRIU >= 4.2 from Debian testing \"forky\" at low pin priority)\n\
or: apt-get install -t forky criu   (Debian 12's 3.17 fails on 6.x kernels with a vDSO error;\n\
4.1.1 cannot dump processes holding inet sockets on kernels >= 6.16)";

fn run(cmd: &mut Command) -> Option<(bool, String)> {
    let out = cmd.output().ok()?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Some((out.status.success(), text))
}

/// Effective capability bits from `/proc/self/status`.
fn cap_eff() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// Runs every check. Must not run while a [`crate::reaper::Reaper`] is
/// installed (it waits for its own children).
pub fn preflight() -> Report {
    let mut r = Report::default();
    let criu = criu_bin();
    // 1. CRIU present and new enough.
    match run(Command::new(&criu).arg("--version")) {
        None => r.push(
            "criu",
            Level::Fail,
            format!("{} not found", criu.display()),
            Some(SETUP_FIX),
        ),
        Some((_, text)) => match parse_version(&text) {
            Some(v) if v >= MIN_VERSION => {
                r.criu_version = Some(v);
                r.push(
                    "criu",
                    Level::Ok,
                    format!("version {}.{}.{}", v.0, v.1, v.2),
                    None,
                )
            }
            Some(v) => {
                r.criu_version = Some(v);
                r.push(
                    "criu",
                    Level::Fail,
                    format!(
                        "version {}.{}.{} is older than {}.{} (required on this kernel)",
                        v.0, v.1, v.2, MIN_VERSION.0, MIN_VERSION.1
                    ),
                    Some(SETUP_FIX),
                )
            }
            None => r.push(
                "criu",
                Level::Fail,
                format!("cannot read the version from: {}", text.trim()),
                Some(SETUP_FIX),
            ),
        },
    }
    // 2. Privileges.
    let caps = cap_eff();
    let has = |bit: u32| caps & (1u64 << bit) != 0;
    let euid = nix::unistd::geteuid();
    let mut privileged = true;
    if euid.is_root() && has(21) {
        r.push(
            "privileges",
            Level::Ok,
            "root with CAP_SYS_ADMIN".into(),
            None,
        );
    } else if has(21) && has(19) && (has(40) || has(21)) {
        r.push(
            "privileges",
            Level::Warn,
            format!("uid {euid} with CAP_SYS_ADMIN/CAP_SYS_PTRACE"),
            None,
        );
    } else {
        privileged = false;
        r.push(
            "privileges",
            Level::Fail,
            format!("uid {euid} without CAP_SYS_ADMIN"),
            Some("run supervise as root (CRIU needs CAP_SYS_ADMIN, CAP_SYS_PTRACE and CAP_CHECKPOINT_RESTORE; creating the jobs' PID namespaces needs CAP_SYS_ADMIN)"),
        );
    }
    if !has(24) {
        r.push(
            "resource limits",
            Level::Warn,
            "no CAP_SYS_RESOURCE: CRIU logs \"Can't setup RLIMIT_NOFILE for self\" (harmless) and cannot dump processes of other users"
                .into(),
            Some("run jobs as the same user as supervise"),
        );
    }
    // 3. nsenter (util-linux) for dumps inside the job's namespaces.
    match run(Command::new("nsenter").arg("--version")) {
        Some((true, _)) => r.push("nsenter", Level::Ok, "present".into(), None),
        _ => r.push(
            "nsenter",
            Level::Fail,
            "not found".into(),
            Some("apt-get install util-linux"),
        ),
    }
    if r.criu_version.is_some() && !privileged {
        // Without the privileges CRIU's own checks fail for that reason
        // alone; blaming the kernel would send the reader the wrong way.
        r.push(
            "criu check",
            Level::Warn,
            "not run: CRIU cannot examine the kernel without CAP_SYS_ADMIN (see privileges)".into(),
            Some("run `supervise check` as root"),
        );
    } else if r.criu_version.is_some() {
        // 4. criu check.
        match run(Command::new(&criu).arg("check")) {
            Some((true, text)) => r.push(
                "criu check",
                Level::Ok,
                text.lines()
                    .rfind(|l| !l.contains("kdat cache"))
                    .unwrap_or("ok")
                    .trim()
                    .to_string(),
                None,
            ),
            Some((false, text)) => r.push(
                "criu check",
                Level::Fail,
                crate::criu::error_lines(&text),
                Some("see `criu check --all -v4`; the kernel lacks something CRIU needs"),
            ),
            None => r.push("criu check", Level::Fail, "cannot run".into(), None),
        }
        // 5. Dirty-memory tracking (incremental pre-dumps).
        match run(Command::new(&criu).args(["check", "--feature", "mem_dirty_track"])) {
            Some((true, _)) => {
                r.dirty_tracking = true;
                r.push(
                    "dirty-memory tracking",
                    Level::Ok,
                    "available (pre-dump / --track-mem usable)".into(),
                    None,
                )
            }
            _ => r.push(
                "dirty-memory tracking",
                Level::Warn,
                "not available on this kernel (no soft-dirty): every checkpoint is a full dump".into(),
                Some("a kernel built with CONFIG_MEM_SOFT_DIRTY would shorten the job's freeze; checkpoints still work"),
            ),
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fatal_only_with_fail() {
        let mut r = Report::default();
        r.push("a", Level::Ok, "x".into(), None);
        r.push("b", Level::Warn, "y".into(), Some("do z"));
        assert!(!r.fatal());
        assert!(r.render().contains("fix: do z"));
        r.push("c", Level::Fail, "w".into(), Some("fix it"));
        assert!(r.fatal());
        assert!(r.render().contains("[FAIL] c: w"));
        assert!(r.render().contains("cannot work"));
    }

    #[test]
    fn denied_looks_through_the_error_chain() {
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("outer")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let no = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        assert!(denied(&Outer(no)));
        let gone = std::io::Error::from(std::io::ErrorKind::NotFound);
        assert!(!denied(&Outer(gone)));
    }

    #[test]
    fn an_existing_key_is_not_said_to_be_generated() {
        let t = tempfile::tempdir().unwrap();
        let job = t.path().join("j.toml");
        let text = format!(
            "command = [\"a\"]\nstate_dir = \"{}\"\n",
            t.path().join("state").display()
        );
        let cfg = crate::config::JobConfig::from_str_at(&text, &job).unwrap();
        let mut r = Report::default();
        r.store_keys(std::slice::from_ref(&cfg));
        assert!(r.findings[0].detail.contains("will be generated"), "{r:?}");
        std::fs::create_dir(t.path().join("state")).unwrap();
        std::fs::write(&cfg.store.key_file, "key").unwrap();
        let mut r = Report::default();
        r.store_keys(std::slice::from_ref(&cfg));
        assert!(
            r.findings[0].detail.contains("will seal its images"),
            "{r:?}"
        );
    }
}
