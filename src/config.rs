//! Job files: schema, loading and validation.
//!
//! A job file is a TOML document describing one job to supervise; see
//! `config/reference.toml` for every key with its type, default and meaning.
//! [`JobConfig::load`] reads and validates one. Any problem is reported as a
//! [`ConfigError`] whose message starts with `file:line:column` (when a
//! position is known) followed by the dotted key, e.g.
//!
//! ```text
//! /x/job.toml:3:9: checkpoint.every: invalid duration "30 parsecs": unknown time unit "parsecs", ...
//! ```
//!
//! Relative paths in a job file are resolved against the directory that
//! contains the job file (except `argv[0]` of `command`, which is resolved
//! against `cwd`). Paths are made absolute lexically: they need not exist and
//! are not canonicalized.

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use toml::Spanned;

use crate::schedule::ScheduleSpec;

/// Checkpoint interval used when neither `checkpoint.every` nor
/// `checkpoint.cron` is given.
pub const DEFAULT_EVERY: Duration = Duration::from_secs(5 * 60);
/// Smallest allowed `checkpoint.every` (and `checkpoint.timeout`,
/// `restore.window`).
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// Default `checkpoint.keep`.
pub const DEFAULT_KEEP: usize = 3;
/// Default `checkpoint.log_level`.
pub const DEFAULT_CRIU_LOG_LEVEL: u32 = 2;
/// Largest allowed `checkpoint.log_level`.
pub const MAX_CRIU_LOG_LEVEL: u32 = 4;
/// Default `restore.max_restores`.
pub const DEFAULT_MAX_RESTORES: u32 = 10;
/// Default `restore.window`.
pub const DEFAULT_RESTORE_WINDOW: Duration = Duration::from_secs(60 * 60);
/// Default `restore.backoff`.
pub const DEFAULT_BACKOFF: Duration = Duration::from_secs(1);
/// Default `restore.backoff_max`.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(5 * 60);
/// Directory (relative to the job file's directory) under which the default
/// per-job state directory `<STATE_PARENT>/<name>` lives.
pub const STATE_PARENT: &str = ".supervise";

/// A fully validated job description with all paths absolute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobConfig {
    /// Job name (`name`, default: the job file's stem). Only `[A-Za-z0-9._-]`.
    pub name: String,
    /// Absolute path of the job file.
    pub source: PathBuf,
    /// Absolute directory of the job file; relative paths resolve against it.
    pub base_dir: PathBuf,
    /// What to supervise: a command to launch or a running process.
    pub target: Target,
    /// supervise's own per-job files (`state_dir`, default
    /// `<base_dir>/.supervise/<name>`).
    pub state_dir: PathBuf,
    /// The `[checkpoint]` table.
    pub checkpoint: CheckpointConfig,
    /// The `[restore]` table.
    pub restore: RestoreConfig,
    /// The `[shutdown]` table.
    pub shutdown: ShutdownConfig,
    /// The `[files]` table.
    pub files: FilesConfig,
    /// The `[slurm]` table (used only inside a Slurm job).
    pub slurm: SlurmConfig,
}

/// The `[slurm]` table: what supervise does inside a Slurm batch job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlurmConfig {
    /// The pre-termination signal to act on.
    pub signal: SlurmSignal,
    /// After the final checkpoint, `scontrol requeue` the Slurm job.
    pub requeue: bool,
    /// How long a new copy waits for an old one to confirm it stopped.
    pub fence_wait: Duration,
}

impl Default for SlurmConfig {
    fn default() -> Self {
        SlurmConfig {
            signal: SlurmSignal::Usr1,
            requeue: true,
            fence_wait: Duration::from_secs(15),
        }
    }
}

/// The `[files]` table: rolling the job's own files back with a restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilesConfig {
    /// Record the files the job has open for writing at each checkpoint and
    /// put them back to that state before a restore.
    pub rollback: bool,
    /// Absolute paths whose full content is kept with every checkpoint
    /// (whether or not the job has them open at that moment).
    pub snapshot: Vec<PathBuf>,
    /// Absolute paths the job only ever extends: their size is enough, even
    /// when they are open read-write.
    pub append: Vec<PathBuf>,
    /// Absolute paths (files, or directories with everything under them)
    /// never recorded nor touched.
    pub exclude: Vec<PathBuf>,
}

impl Default for FilesConfig {
    fn default() -> Self {
        FilesConfig {
            rollback: true,
            snapshot: Vec::new(),
            append: Vec::new(),
            exclude: Vec::new(),
        }
    }
}

/// What a job supervises.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Launch `command` and supervise it.
    Launch(LaunchSpec),
    /// Supervise an already-running process (`attach = <pid>`).
    Attach {
        /// Process id of the root of the process tree (> 0).
        pid: i32,
    },
}

/// How to launch a job's command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchSpec {
    /// argv. An `argv[0]` that contains a `/` and is relative has been
    /// resolved against `cwd` to an absolute path; a bare name is left as is
    /// (looked up in `PATH`).
    pub command: Vec<String>,
    /// Absolute working directory.
    pub cwd: PathBuf,
    /// Extra environment, merged over supervise's own environment.
    pub env: BTreeMap<String, String>,
    /// Absolute path of the file stdout is appended to.
    pub stdout: PathBuf,
    /// Absolute path of the file stderr is appended to.
    pub stderr: PathBuf,
}

/// The `[checkpoint]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointConfig {
    /// When checkpoints are due (`every` or `cron` + `timezone`).
    pub schedule: ScheduleSpec,
    /// Absolute directory where checkpoint images live.
    pub dir: PathBuf,
    /// Number of images retained after each successful checkpoint (>= 1).
    pub keep: usize,
    /// Options passed through to CRIU.
    pub criu: CriuOptions,
    /// Maximum time one checkpoint may take; `None` means no limit.
    pub timeout: Option<Duration>,
}

/// CRIU options passed through from the `[checkpoint]` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
        }
    }
}

/// The `[restore]` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestoreConfig {
    /// When a dead job is restored.
    pub on: RestoreOn,
    /// Restores allowed within `window` before the job is marked failed (>= 1).
    pub max_restores: u32,
    /// The sliding window `max_restores` is counted in.
    pub window: Duration,
    /// Delay before the first restore after a death; doubles per consecutive
    /// failure up to `backoff_max`.
    pub backoff: Duration,
    /// Cap of the restore delay (>= `backoff`).
    pub backoff_max: Duration,
}

impl Default for RestoreConfig {
    fn default() -> Self {
        RestoreConfig {
            on: RestoreOn::default(),
            max_restores: DEFAULT_MAX_RESTORES,
            window: DEFAULT_RESTORE_WINDOW,
            backoff: DEFAULT_BACKOFF,
            backoff_max: DEFAULT_BACKOFF_MAX,
        }
    }
}

/// The `[shutdown]` table: what SIGTERM/SIGINT to supervise does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownConfig {
    /// Stop the job or leave it running.
    pub action: ShutdownAction,
    /// Take a final checkpoint first.
    pub checkpoint: bool,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            action: ShutdownAction::default(),
            checkpoint: true,
        }
    }
}

/// Declares a public enum spelled as one of a fixed set of strings in the
/// job file, with `as_str`, `Display`, `Default` and `Deserialize`.
macro_rules! choice_enum {
    (
        $(#[$meta:meta])*
        $name:ident, default $default:ident {
            $($(#[$vmeta:meta])* $variant:ident => $text:literal,)+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// All values with their job-file spelling.
            pub const ALL: &'static [($name, &'static str)] = &[$(($name::$variant, $text),)+];

            /// The job-file spelling of this value.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl Default for $name {
            fn default() -> Self {
                $name::$default
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                de_str(d, "a string", |s| {
                    $name::ALL
                        .iter()
                        .find(|(_, text)| *text == s)
                        .map(|(v, _)| *v)
                        .ok_or_else(|| {
                            let names: Vec<String> =
                                $name::ALL.iter().map(|(_, t)| format!("\"{t}\"")).collect();
                            format!("invalid value {s:?} (expected one of: {})", names.join(", "))
                        })
                })
            }
        }
    };
}

choice_enum! {
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

choice_enum! {
    /// The signal Slurm sends ahead of a time limit or preemption
    /// (`slurm.signal`; `sbatch --signal=B:<SIG>@<seconds>`).
    SlurmSignal, default Usr1 {
        /// SIGUSR1 (default).
        Usr1 => "USR1",
        /// SIGUSR2.
        Usr2 => "USR2",
        /// SIGHUP.
        Hup => "HUP",
        /// SIGURG.
        Urg => "URG",
        /// SIGALRM.
        Alrm => "ALRM",
    }
}

impl SlurmSignal {
    /// The signal number.
    pub fn number(self) -> i32 {
        match self {
            SlurmSignal::Usr1 => libc::SIGUSR1,
            SlurmSignal::Usr2 => libc::SIGUSR2,
            SlurmSignal::Hup => libc::SIGHUP,
            SlurmSignal::Urg => libc::SIGURG,
            SlurmSignal::Alrm => libc::SIGALRM,
        }
    }
}

choice_enum! {
    /// When a dead job is restored (`restore.on`).
    RestoreOn, default Failure {
        /// Killed by a signal or exited non-zero (default).
        Failure => "failure",
        /// Whenever the job ends, even with exit status 0.
        Always => "always",
        /// Never restore; a dead job ends supervision.
        Never => "never",
    }
}

choice_enum! {
    /// What SIGTERM/SIGINT to supervise does with the job (`shutdown.action`).
    ShutdownAction, default Stop {
        /// Stop the job (after the final checkpoint, if enabled), exit 0.
        Stop => "stop",
        /// Leave the job running (after the final checkpoint, if enabled).
        Detach => "detach",
    }
}

/// A 1-based line and column (in characters) in a job file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    /// 1-based line number.
    pub line: usize,
    /// 1-based column, counted in characters.
    pub column: usize,
}

impl Position {
    /// The position of byte offset `offset` in `text`.
    pub fn of_offset(text: &str, offset: usize) -> Position {
        let mut offset = offset.min(text.len());
        while !text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &text[..offset];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        Position {
            line: before.matches('\n').count() + 1,
            column: before[line_start..].chars().count() + 1,
        }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// Why a job file could not be loaded.
///
/// Display formats:
/// * `FILE: cannot read: REASON`
/// * `FILE:LINE:COL: invalid TOML: MESSAGE`
/// * `FILE:LINE:COL: KEY: MESSAGE` (or `FILE: KEY: MESSAGE` / `FILE: MESSAGE`
///   when no position or no single key applies)
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The job file could not be read.
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        /// The job file.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The job file is not valid TOML.
    #[error("{}invalid TOML: {message}", location(path, position))]
    Syntax {
        /// The job file.
        path: PathBuf,
        /// Where the parser stopped.
        position: Option<Position>,
        /// The parser's message.
        message: String,
    },
    /// The job file is valid TOML but not a valid job description.
    #[error("{}{}{message}", location(path, position), key_prefix(key))]
    Invalid {
        /// The job file.
        path: PathBuf,
        /// The offending key or value, if a position applies.
        position: Option<Position>,
        /// Dotted key path, e.g. `checkpoint.every`, if a single key applies.
        key: Option<String>,
        /// What is wrong.
        message: String,
    },
}

impl ConfigError {
    /// The job file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            ConfigError::Read { path, .. }
            | ConfigError::Syntax { path, .. }
            | ConfigError::Invalid { path, .. } => path,
        }
    }

    /// Line and column of the offending key or value, if known.
    pub fn position(&self) -> Option<Position> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Syntax { position, .. } | ConfigError::Invalid { position, .. } => {
                *position
            }
        }
    }

    /// Dotted path of the offending key, if a single key applies.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => key.as_deref(),
            _ => None,
        }
    }
}

fn location(path: &Path, position: &Option<Position>) -> String {
    match position {
        Some(p) => format!("{}:{p}: ", path.display()),
        None => format!("{}: ", path.display()),
    }
}

fn key_prefix(key: &Option<String>) -> String {
    key.as_ref().map(|k| format!("{k}: ")).unwrap_or_default()
}

impl JobConfig {
    /// Reads and validates a job file. Relative paths resolve against the
    /// job file's directory (see the module docs).
    pub fn load(path: &Path) -> Result<JobConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: absolute(path),
            source,
        })?;
        JobConfig::from_str_at(&text, path)
    }

    /// Reads several job files; a directory stands for the `*.toml` files
    /// in it (sorted by name). Two jobs may not share a name, a state
    /// directory or an image directory.
    pub fn load_all(paths: &[PathBuf]) -> Result<Vec<JobConfig>, ConfigError> {
        let mut files = Vec::new();
        for p in paths {
            if p.is_dir() {
                let rd = std::fs::read_dir(p).map_err(|source| ConfigError::Read {
                    path: absolute(p),
                    source,
                })?;
                let mut found: Vec<PathBuf> = rd
                    .flatten()
                    .map(|e| e.path())
                    .filter(|f| f.extension().is_some_and(|x| x == "toml") && f.is_file())
                    .collect();
                if found.is_empty() {
                    return Err(ConfigError::Invalid {
                        path: absolute(p),
                        position: None,
                        key: None,
                        message: "no job files (*.toml) in this directory".into(),
                    });
                }
                found.sort();
                files.extend(found);
            } else {
                files.push(p.clone());
            }
        }
        let mut cfgs: Vec<JobConfig> = Vec::new();
        for f in &files {
            let c = JobConfig::load(f)?;
            for other in &cfgs {
                let clash = if other.name == c.name {
                    Some(("name", format!("job name {:?}", c.name)))
                } else if other.state_dir == c.state_dir {
                    Some((
                        "state_dir",
                        format!("state directory {}", c.state_dir.display()),
                    ))
                } else if other.checkpoint.dir == c.checkpoint.dir {
                    Some((
                        "checkpoint.dir",
                        format!("image directory {}", c.checkpoint.dir.display()),
                    ))
                } else {
                    None
                };
                if let Some((key, what)) = clash {
                    return Err(ConfigError::Invalid {
                        path: c.source.clone(),
                        position: None,
                        key: Some(key.into()),
                        message: format!(
                            "{what} is also used by {}; each job needs its own",
                            other.source.display()
                        ),
                    });
                }
            }
            cfgs.push(c);
        }
        Ok(cfgs)
    }

    /// Like [`JobConfig::load`], from text. `path` is used for messages and
    /// relative-path resolution; it need not exist.
    pub fn from_str_at(text: &str, path: &Path) -> Result<JobConfig, ConfigError> {
        let source = absolute(path);
        let ctx = Ctx {
            text,
            path: &source,
        };

        // Syntax first, so that TOML errors are reported as such.
        if let Err(e) = text.parse::<toml::Table>() {
            return Err(ConfigError::Syntax {
                path: source.clone(),
                position: e.span().map(|s| Position::of_offset(text, s.start)),
                message: one_line(e.message()),
            });
        }
        let raw: RawJob = serde_path_to_error::deserialize(toml::Deserializer::new(text))
            .map_err(|e| ctx.de_error(e))?;
        build(raw, &ctx)
    }
}

// ---------------------------------------------------------------------------
// Error construction

struct Ctx<'a> {
    text: &'a str,
    path: &'a Path,
}

impl Ctx<'_> {
    fn pos(&self, span: std::ops::Range<usize>) -> Option<Position> {
        Some(Position::of_offset(self.text, span.start))
    }

    fn err<T>(
        &self,
        span: Option<std::ops::Range<usize>>,
        key: &str,
        message: String,
    ) -> Result<T, ConfigError> {
        Err(ConfigError::Invalid {
            path: self.path.to_path_buf(),
            position: span.and_then(|s| self.pos(s)),
            key: (!key.is_empty()).then(|| key.to_string()),
            message,
        })
    }

    fn de_error(&self, e: serde_path_to_error::Error<toml::de::Error>) -> ConfigError {
        let key = render_path(e.path());
        let inner = e.into_inner();
        let raw = one_line(inner.message());
        let message = match unknown_field(&raw) {
            Some((field, expected)) => unknown_key_message(&field, &expected),
            None => humanize(&raw),
        };
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            position: inner.span().and_then(|s| self.pos(s)),
            key: (!key.is_empty()).then_some(key),
            message,
        }
    }
}

fn one_line(msg: &str) -> String {
    msg.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Renders a serde path as a dotted TOML key, e.g. `checkpoint.every` or
/// `command[1]`, leaving out the internals of `toml::Spanned`.
fn render_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for seg in path.iter() {
        match seg {
            Segment::Map { key } if key.starts_with("$__serde_spanned_private") => {}
            Segment::Map { key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(&toml_key(key));
            }
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Enum { variant } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(variant);
            }
            Segment::Unknown => {}
        }
    }
    out
}

/// A key as written in TOML: bare if possible, quoted otherwise.
fn toml_key(key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        key.to_string()
    } else {
        format!("{key:?}")
    }
}

/// Parses serde's "unknown field `x`, expected one of `a`, `b`" message into
/// the field and the expected names.
fn unknown_field(msg: &str) -> Option<(String, Vec<String>)> {
    if !msg.starts_with("unknown field `") {
        return None;
    }
    let mut quoted = msg.split('`').skip(1).step_by(2).map(str::to_string);
    let field = quoted.next()?;
    Some((field, quoted.collect()))
}

fn unknown_key_message(field: &str, expected: &[String]) -> String {
    let mut msg = format!("unknown key (expected one of: {})", expected.join(", "));
    let best = expected
        .iter()
        .map(|e| (edit_distance(field, e), e))
        .filter(|(d, e)| *d <= 2.max(e.len() / 3))
        .min_by_key(|(d, _)| *d);
    if let Some((_, e)) = best {
        msg.push_str(&format!("; did you mean `{e}`?"));
    }
    msg
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Rewrites serde's generic "invalid type: X, expected Y" into TOML terms:
/// "expected Y, found X".
fn humanize(msg: &str) -> String {
    let Some(rest) = msg.strip_prefix("invalid type: ") else {
        return msg.to_string();
    };
    let Some(split) = rest.rfind(", expected ") else {
        return msg.to_string();
    };
    let (unexpected, expected) = (&rest[..split], &rest[split + ", expected ".len()..]);
    format!(
        "expected {}, found {}",
        toml_expected(expected),
        toml_unexpected(unexpected)
    )
}

fn toml_unexpected(u: &str) -> &str {
    if u.starts_with("string ") {
        "a string"
    } else if u.starts_with("integer ") {
        "an integer"
    } else if u.starts_with("floating point ") {
        "a float"
    } else if u.starts_with("boolean ") {
        "a boolean"
    } else if u == "sequence" {
        "an array"
    } else if u == "map" {
        "a table"
    } else {
        u
    }
}

fn toml_expected(e: &str) -> &str {
    match e {
        "a sequence" => "an array",
        "a map" => "a table",
        "a string" | "a boolean" => e,
        "i8" | "i16" | "i32" | "i64" => "an integer",
        "u8" | "u16" | "u32" | "u64" | "usize" => "a non-negative integer",
        _ if e.starts_with("struct ") => "a table",
        _ => e,
    }
}

// ---------------------------------------------------------------------------
// Raw (as written) schema. Leaf values are validated while deserializing, so
// that errors carry the value's span and key path.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJob {
    name: Option<JobName>,
    command: Option<Spanned<Argv>>,
    attach: Option<Spanned<Pid>>,
    cwd: Option<Spanned<PathValue>>,
    env: Option<EnvMap>,
    stdout: Option<Spanned<PathValue>>,
    stderr: Option<Spanned<PathValue>>,
    state_dir: Option<PathValue>,
    checkpoint: Option<Table<RawCheckpoint>>,
    restore: Option<Table<RawRestore>>,
    shutdown: Option<Table<RawShutdown>>,
    files: Option<Table<RawFiles>>,
    slurm: Option<Table<RawSlurm>>,
}

/// A sub-table. Unlike a plain derived struct it refuses arrays (serde would
/// otherwise accept `[[checkpoint]]` as a struct written as a sequence).
struct Table<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Table<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Table<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a table")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Table<T>, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map)).map(Table)
            }
        }
        d.deserialize_map(V(PhantomData))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheckpoint {
    every: Option<Spanned<Dur<1>>>,
    cron: Option<Spanned<CronExpr>>,
    timezone: Option<Spanned<TzName>>,
    dir: Option<PathValue>,
    keep: Option<Count<1, { u32::MAX as u64 }>>,
    shell_job: Option<bool>,
    tcp_established: Option<bool>,
    file_locks: Option<bool>,
    ext_unix_sk: Option<bool>,
    log_level: Option<Count<0, { MAX_CRIU_LOG_LEVEL as u64 }>>,
    network_lock: Option<NetworkLock>,
    timeout: Option<Dur<1>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRestore {
    on: Option<RestoreOn>,
    max_restores: Option<Count<1, { u32::MAX as u64 }>>,
    window: Option<Dur<1>>,
    backoff: Option<Spanned<Dur<0>>>,
    backoff_max: Option<Spanned<Dur<0>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShutdown {
    action: Option<ShutdownAction>,
    checkpoint: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSlurm {
    signal: Option<SlurmSignal>,
    requeue: Option<bool>,
    fence_wait: Option<Dur<0>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFiles {
    rollback: Option<bool>,
    snapshot: Option<Vec<Spanned<PathValue>>>,
    append: Option<Vec<Spanned<PathValue>>>,
    exclude: Option<Vec<Spanned<PathValue>>>,
}

/// Deserializes a string through `f`; `f`'s error becomes the message.
fn de_str<'de, D, T, F>(d: D, expecting: &'static str, f: F) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    F: FnOnce(&str) -> Result<T, String>,
{
    struct V<T, F>(&'static str, F, PhantomData<T>);
    impl<T, F: FnOnce(&str) -> Result<T, String>> Visitor<'_> for V<T, F> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<T, E> {
            (self.1)(s).map_err(E::custom)
        }
    }
    d.deserialize_str(V(expecting, f, PhantomData))
}

/// Deserializes an integer through `f`; `f`'s error becomes the message.
fn de_int<'de, D, T, F>(d: D, expecting: &'static str, f: F) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    F: FnOnce(i128) -> Result<T, String>,
{
    struct V<T, F>(&'static str, F, PhantomData<T>);
    impl<T, F: FnOnce(i128) -> Result<T, String>> Visitor<'_> for V<T, F> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
            (self.1)(i128::from(v)).map_err(E::custom)
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
            (self.1)(i128::from(v)).map_err(E::custom)
        }
    }
    d.deserialize_i64(V(expecting, f, PhantomData))
}

/// Longest job name: it becomes a directory name (the default state
/// directory `.supervise/<name>`), so it must leave room in a file name
/// (255 bytes) and in the paths built from it.
pub const MAX_NAME_LEN: usize = 128;

fn is_valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME_LEN
        && s != "."
        && s != ".."
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

const NAME_RULE: &str = "only letters A-Z a-z, digits 0-9 and `.`, `_`, `-` are allowed, \
                         at most 128 of them, and it must not be empty, `.` or `..`";

struct JobName(String);

impl<'de> Deserialize<'de> for JobName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de_str(d, "a job name string", |s| {
            if is_valid_name(s) {
                Ok(JobName(s.to_string()))
            } else if s.is_empty() {
                Err("must not be empty".to_string())
            } else if s.len() > MAX_NAME_LEN {
                Err(format!(
                    "job name is {} bytes long; the limit is {MAX_NAME_LEN} (it becomes a \
                     directory name)",
                    s.len()
                ))
            } else {
                Err(format!("invalid job name {s:?}: {NAME_RULE}"))
            }
        })
    }
}

struct Argv(Vec<String>);

impl<'de> Deserialize<'de> for Argv {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Argv;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an array of strings")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Argv, A::Error> {
                let mut argv = Vec::new();
                while let Some(ArgString(arg)) = seq.next_element()? {
                    argv.push(arg);
                }
                match argv.first() {
                    None => Err(de::Error::custom(
                        "must not be empty (give at least the program to run)",
                    )),
                    Some(p) if p.is_empty() => Err(de::Error::custom(
                        "the program (first element) must not be an empty string",
                    )),
                    Some(_) => Ok(Argv(argv)),
                }
            }
        }
        d.deserialize_seq(V)
    }
}

struct ArgString(String);

impl<'de> Deserialize<'de> for ArgString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de_str(d, "a string", |s| {
            if s.contains('\0') {
                Err("must not contain a NUL character".to_string())
            } else {
                Ok(ArgString(s.to_string()))
            }
        })
    }
}

struct Pid(i32);

impl<'de> Deserialize<'de> for Pid {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de_int(
            d,
            "a process id (a positive integer)",
            |v| match i32::try_from(v) {
                Ok(pid) if pid > 0 => Ok(Pid(pid)),
                _ => Err(format!(
                    "invalid process id {v}: must be between 1 and {}",
                    i32::MAX
                )),
            },
        )
    }
}

struct PathValue(PathBuf);

impl<'de> Deserialize<'de> for PathValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de_str(d, "a path string", |s| {
            if s.is_empty() {
                Err("must not be empty (use \".\" for the job file's directory)".to_string())
            } else if s.contains('\0') {
                Err("must not contain a NUL character".to_string())
            } else {
                Ok(PathValue(PathBuf::from(s)))
            }
        })
    }
}

/// `env`: string keys and values; remembers the span of the first value so
/// that "env with attach" can point somewhere even for `[env]` tables.
struct EnvMap {
    vars: BTreeMap<String, String>,
    first_span: Option<std::ops::Range<usize>>,
}

impl<'de> Deserialize<'de> for EnvMap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = EnvMap;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a table of environment variables")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<EnvMap, A::Error> {
                let mut env = EnvMap {
                    vars: BTreeMap::new(),
                    first_span: None,
                };
                while let Some(EnvName(k)) = map.next_key()? {
                    let v: Spanned<EnvValue> = map.next_value()?;
                    if env.first_span.is_none() {
                        env.first_span = Some(v.span());
                    }
                    env.vars.insert(k, v.into_inner().0);
                }
                Ok(env)
            }
        }
        d.deserialize_map(V)
    }
}

struct EnvName(String);

impl<'de> Deserialize<'de> for EnvName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de_str(d, "an environment variable name", |s| {
            if s.is_empty() || s.contains(['=', '\0']) {
                Err(format!(
                    "invalid environment variable name {s:?}: must be non-empty without `=` or NUL"
                ))
            } else {
                Ok(EnvName(s.to_string()))
            }
        })
    }
}

struct EnvValue(String);

impl<'de> Deserialize<'de> for EnvValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de_str(d, "a string (quote numbers, e.g. \"8080\")", |s| {
            if s.contains('\0') {
                Err("must not contain a NUL character".to_string())
            } else {
                Ok(EnvValue(s.to_string()))
            }
        })
    }
}

/// A humantime duration of at least `MIN_SECS` seconds.
struct Dur<const MIN_SECS: u64>(Duration);

impl<'de, const MIN_SECS: u64> Deserialize<'de> for Dur<MIN_SECS> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de_str(
            d,
            "a duration string such as \"30s\", \"5m\" or \"1h 30m\"",
            |s| {
                let v = humantime::parse_duration(s)
                    .map_err(|e| format!("invalid duration {s:?}: {e}"))?;
                if v < Duration::from_secs(MIN_SECS) {
                    return Err(format!("must be at least {MIN_SECS}s (found {s:?})"));
                }
                Ok(Dur(v))
            },
        )
    }
}

/// An integer in `MIN..=MAX`.
struct Count<const MIN: u64, const MAX: u64>(u64);

impl<'de, const MIN: u64, const MAX: u64> Deserialize<'de> for Count<MIN, MAX> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de_int(d, "an integer", |v| match u64::try_from(v) {
            Ok(n) if (MIN..=MAX).contains(&n) => Ok(Count(n)),
            _ if MAX >= u64::from(u32::MAX) && v < i128::from(MIN) => {
                Err(format!("must be at least {MIN} (found {v})"))
            }
            _ if MAX >= u64::from(u32::MAX) => Err(format!("must be at most {MAX} (found {v})")),
            _ => Err(format!("must be between {MIN} and {MAX} (found {v})")),
        })
    }
}

struct CronExpr {
    expr: String,
    schedule: cron::Schedule,
}

const CRON_FIELDS: &str = "sec min hour day-of-month month day-of-week [year]";

impl<'de> Deserialize<'de> for CronExpr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de_str(d, "a cron expression string", |s| {
            let fields = s.split_whitespace().count();
            let shorthand = s.trim_start().starts_with('@');
            match s.parse::<cron::Schedule>() {
                Ok(schedule) => Ok(CronExpr {
                    expr: s.to_string(),
                    schedule,
                }),
                Err(_) if !shorthand && !(6..=7).contains(&fields) => Err(format!(
                    "invalid cron expression {s:?}: expected 6 or 7 fields ({CRON_FIELDS}), \
                     found {fields}"
                )),
                Err(e) => Err(format!(
                    "invalid cron expression {s:?}: {}",
                    cron_error_text(s, &e.to_string())
                )),
            }
        })
    }
}

/// The cron crate renders errors as "EXPR\n   ^\nreason"; keep the reason.
fn cron_error_text(expr: &str, msg: &str) -> String {
    let reason: Vec<&str> = msg
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && *l != expr.trim() && !l.chars().all(|c| c == '^'))
        .collect();
    if reason.is_empty() {
        format!("not a valid expression (expected 6 or 7 fields: {CRON_FIELDS}, or @yearly, @monthly, @weekly, @daily, @hourly)")
    } else {
        reason.join("; ")
    }
}

struct TzName(chrono_tz::Tz);

impl<'de> Deserialize<'de> for TzName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de_str(d, "an IANA time zone name string", |s| {
            if let Ok(tz) = s.parse::<chrono_tz::Tz>() {
                return Ok(TzName(tz));
            }
            let mut msg =
                format!("unknown time zone {s:?} (expected an IANA name such as \"Europe/Berlin\" or \"UTC\")");
            if let Some(tz) = chrono_tz::TZ_VARIANTS
                .iter()
                .find(|tz| tz.name().eq_ignore_ascii_case(s))
            {
                msg.push_str(&format!("; did you mean \"{}\"?", tz.name()));
            }
            Err(msg)
        })
    }
}

// ---------------------------------------------------------------------------
// Semantic checks and path resolution

fn build(raw: RawJob, ctx: &Ctx<'_>) -> Result<JobConfig, ConfigError> {
    let base_dir = ctx
        .path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/"));

    let name = match raw.name {
        Some(JobName(n)) => n,
        None => {
            let stem = ctx
                .path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            if !is_valid_name(&stem) {
                return ctx.err(
                    None,
                    "name",
                    format!(
                        "no `name` given and the file name stem {stem:?} is not a valid job name \
                         ({NAME_RULE}); set `name` explicitly"
                    ),
                );
            }
            stem
        }
    };

    let state_dir = match raw.state_dir {
        Some(PathValue(p)) => resolve(&base_dir, &p),
        None => base_dir.join(STATE_PARENT).join(&name),
    };

    let target = match (raw.command, raw.attach) {
        (Some(cmd), Some(pid)) => {
            let (span, key) = if cmd.span().start > pid.span().start {
                (cmd.span(), "command")
            } else {
                (pid.span(), "attach")
            };
            return ctx.err(
                Some(span),
                key,
                "`command` and `attach` are mutually exclusive".to_string(),
            );
        }
        (None, None) => {
            return ctx.err(
                None,
                "",
                "one of `command` or `attach` is required".to_string(),
            )
        }
        (None, Some(pid)) => {
            let launch_only = [
                ("cwd", raw.cwd.as_ref().map(|v| Some(v.span()))),
                ("env", raw.env.as_ref().map(|e| e.first_span.clone())),
                ("stdout", raw.stdout.as_ref().map(|v| Some(v.span()))),
                ("stderr", raw.stderr.as_ref().map(|v| Some(v.span()))),
            ];
            for (key, present) in launch_only {
                if let Some(span) = present {
                    return ctx.err(
                        span,
                        key,
                        format!("`{key}` can only be used with `command`, not with `attach`"),
                    );
                }
            }
            Target::Attach {
                pid: pid.into_inner().0,
            }
        }
        (Some(cmd), None) => {
            let cwd = match raw.cwd {
                Some(c) => resolve(&base_dir, &c.into_inner().0),
                None => base_dir.clone(),
            };
            let mut command = cmd.into_inner().0;
            if command[0].contains('/') && Path::new(&command[0]).is_relative() {
                command[0] = resolve(&cwd, Path::new(&command[0]))
                    .to_string_lossy()
                    .into_owned();
            }
            let out = |p: Option<Spanned<PathValue>>, default: &str| match p {
                Some(p) => resolve(&base_dir, &p.into_inner().0),
                None => state_dir.join(default),
            };
            Target::Launch(LaunchSpec {
                command,
                cwd,
                env: raw.env.map(|e| e.vars).unwrap_or_default(),
                stdout: out(raw.stdout, "stdout.log"),
                stderr: out(raw.stderr, "stderr.log"),
            })
        }
    };

    let checkpoint = build_checkpoint(raw.checkpoint, &base_dir, &state_dir, ctx)?;
    let restore = build_restore(raw.restore, ctx)?;
    let shutdown = match raw.shutdown {
        None => ShutdownConfig::default(),
        Some(Table(s)) => ShutdownConfig {
            action: s.action.unwrap_or_default(),
            checkpoint: s.checkpoint.unwrap_or(true),
        },
    };

    let files = build_files(raw.files, &base_dir, ctx)?;
    let slurm = match raw.slurm {
        None => SlurmConfig::default(),
        Some(Table(r)) => SlurmConfig {
            signal: r.signal.unwrap_or_default(),
            requeue: r.requeue.unwrap_or(true),
            fence_wait: r
                .fence_wait
                .map_or(SlurmConfig::default().fence_wait, |d| d.0),
        },
    };

    Ok(JobConfig {
        name,
        source: ctx.path.to_path_buf(),
        base_dir,
        target,
        state_dir,
        checkpoint,
        restore,
        shutdown,
        files,
        slurm,
    })
}

fn build_files(
    raw: Option<Table<RawFiles>>,
    base_dir: &Path,
    ctx: &Ctx<'_>,
) -> Result<FilesConfig, ConfigError> {
    let Some(Table(raw)) = raw else {
        return Ok(FilesConfig::default());
    };
    type Spans = Vec<(PathBuf, std::ops::Range<usize>)>;
    let list = |v: Option<Vec<Spanned<PathValue>>>| -> Spans {
        v.unwrap_or_default()
            .into_iter()
            .map(|p| {
                let span = p.span();
                (resolve(base_dir, &p.into_inner().0), span)
            })
            .collect()
    };
    let snapshot = list(raw.snapshot);
    let append = list(raw.append);
    let exclude = list(raw.exclude);
    // One path, one treatment: a later list naming a path an earlier one
    // already names is an error at the later mention.
    let named: [(&str, &Spans); 3] = [
        ("files.snapshot", &snapshot),
        ("files.append", &append),
        ("files.exclude", &exclude),
    ];
    for (i, (key, paths)) in named.iter().enumerate() {
        for (j, (other, others)) in named.iter().enumerate().skip(i) {
            for (n, (p, span)) in others.iter().enumerate() {
                let dup = if i == j {
                    paths[..n].iter().any(|(q, _)| q == p)
                } else {
                    paths.iter().any(|(q, _)| q == p)
                };
                if dup {
                    let msg = if i == j {
                        format!("{} is listed twice", p.display())
                    } else {
                        format!("{} is already listed in `{key}`", p.display())
                    };
                    return ctx.err(Some(span.clone()), other, msg);
                }
            }
        }
    }
    let strip = |v: Spans| v.into_iter().map(|(p, _)| p).collect();
    Ok(FilesConfig {
        rollback: raw.rollback.unwrap_or(true),
        snapshot: strip(snapshot),
        append: strip(append),
        exclude: strip(exclude),
    })
}

fn build_checkpoint(
    raw: Option<Table<RawCheckpoint>>,
    base_dir: &Path,
    state_dir: &Path,
    ctx: &Ctx<'_>,
) -> Result<CheckpointConfig, ConfigError> {
    let default_dir = state_dir.join("images");
    let Some(Table(raw)) = raw else {
        return Ok(CheckpointConfig {
            schedule: ScheduleSpec::Every(DEFAULT_EVERY),
            dir: default_dir,
            keep: DEFAULT_KEEP,
            criu: CriuOptions::default(),
            timeout: None,
        });
    };

    let schedule = match (raw.every, raw.cron) {
        (Some(every), Some(cron)) => {
            let (span, key) = if cron.span().start > every.span().start {
                (cron.span(), "checkpoint.cron")
            } else {
                (every.span(), "checkpoint.every")
            };
            return ctx.err(
                Some(span),
                key,
                "`every` and `cron` are mutually exclusive (use one of them)".to_string(),
            );
        }
        (every, None) => {
            if let Some(tz) = &raw.timezone {
                return ctx.err(
                    Some(tz.span()),
                    "checkpoint.timezone",
                    "`timezone` is only valid together with `cron`".to_string(),
                );
            }
            ScheduleSpec::Every(every.map_or(DEFAULT_EVERY, |e| e.into_inner().0))
        }
        (None, Some(cron)) => {
            let tz = raw
                .timezone
                .map_or(chrono_tz::Tz::UTC, |t| t.into_inner().0);
            let span = cron.span();
            let CronExpr { expr, schedule } = cron.into_inner();
            let spec = ScheduleSpec::Cron { expr, schedule, tz };
            if spec.next_after(chrono::Utc::now()).is_none() {
                return ctx.err(
                    Some(span),
                    "checkpoint.cron",
                    "this cron expression never fires again (all its times are in the past)"
                        .to_string(),
                );
            }
            spec
        }
    };

    let criu = CriuOptions {
        shell_job: raw.shell_job.unwrap_or(false),
        tcp_established: raw.tcp_established.unwrap_or(false),
        file_locks: raw.file_locks.unwrap_or(false),
        ext_unix_sk: raw.ext_unix_sk.unwrap_or(false),
        log_level: raw.log_level.map_or(DEFAULT_CRIU_LOG_LEVEL, |l| l.0 as u32),
        network_lock: raw.network_lock.unwrap_or_default(),
    };

    Ok(CheckpointConfig {
        schedule,
        dir: raw
            .dir
            .map_or(default_dir, |PathValue(p)| resolve(base_dir, &p)),
        keep: raw.keep.map_or(DEFAULT_KEEP, |k| k.0 as usize),
        criu,
        timeout: raw.timeout.map(|t| t.0),
    })
}

fn build_restore(
    raw: Option<Table<RawRestore>>,
    ctx: &Ctx<'_>,
) -> Result<RestoreConfig, ConfigError> {
    let Some(Table(raw)) = raw else {
        return Ok(RestoreConfig::default());
    };
    let backoff = raw
        .backoff
        .as_ref()
        .map_or(DEFAULT_BACKOFF, |b| b.get_ref().0);
    let backoff_max = raw
        .backoff_max
        .as_ref()
        .map_or(DEFAULT_BACKOFF_MAX, |b| b.get_ref().0);
    if backoff_max < backoff {
        let fmt = |d| humantime::format_duration(d).to_string();
        return match (&raw.backoff_max, &raw.backoff) {
            (Some(m), _) => ctx.err(
                Some(m.span()),
                "restore.backoff_max",
                format!(
                    "must be at least `backoff` ({}), found {}",
                    fmt(backoff),
                    fmt(backoff_max)
                ),
            ),
            (None, b) => ctx.err(
                b.as_ref().map(Spanned::span),
                "restore.backoff",
                format!(
                    "{} exceeds `backoff_max` ({}, the default); raise `backoff_max` too",
                    fmt(backoff),
                    fmt(backoff_max)
                ),
            ),
        };
    }
    Ok(RestoreConfig {
        on: raw.on.unwrap_or_default(),
        max_restores: raw
            .max_restores
            .map_or(DEFAULT_MAX_RESTORES, |m| m.0 as u32),
        window: raw.window.map_or(DEFAULT_RESTORE_WINDOW, |w| w.0),
        backoff,
        backoff_max,
    })
}

/// Makes `path` absolute (against the current directory) without touching
/// the file system beyond `current_dir`; falls back to `path` itself.
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path)
        .map(|p| p.components().collect())
        .unwrap_or_else(|_| path.to_path_buf())
}

/// `p` if absolute, else `base/p`; `.` components and doubled separators are
/// dropped (lexically; `..` is kept since symlinks may be involved).
fn resolve(base: &Path, p: &Path) -> PathBuf {
    base.join(p).components().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "/x/job.toml";

    fn parse(text: &str) -> Result<JobConfig, ConfigError> {
        JobConfig::from_str_at(text, Path::new(FILE))
    }

    fn ok(text: &str) -> JobConfig {
        parse(text).unwrap_or_else(|e| panic!("unexpected error: {e}"))
    }

    /// Asserts an `Invalid` error at `line:col` for `key`, whose message
    /// contains `needle`; returns the full display string.
    #[track_caller]
    fn invalid(text: &str, line: usize, column: usize, key: &str, needle: &str) -> String {
        let e = parse(text).expect_err("expected an error");
        let shown = e.to_string();
        assert!(
            matches!(e, ConfigError::Invalid { .. }),
            "not Invalid: {shown}"
        );
        assert_eq!(e.position(), Some(Position { line, column }), "{shown}");
        assert_eq!(e.key(), Some(key), "{shown}");
        let prefix = format!("{FILE}:{line}:{column}: {key}: ");
        assert!(
            shown.starts_with(&prefix),
            "{shown:?} lacks prefix {prefix:?}"
        );
        assert!(shown.contains(needle), "{shown:?} lacks {needle:?}");
        shown
    }

    /// The byte offset of the first occurrence of `needle` in `text`,
    /// as a position — used to check that positions point at the right spot.
    fn pos_of(text: &str, needle: &str) -> (usize, usize) {
        let p = Position::of_offset(text, text.find(needle).expect("needle"));
        (p.line, p.column)
    }

    #[test]
    fn load_all_expands_dirs_and_refuses_clashes() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("jobs");
        std::fs::create_dir(&d).unwrap();
        assert!(JobConfig::load_all(std::slice::from_ref(&d))
            .unwrap_err()
            .to_string()
            .contains("no job files"));
        std::fs::write(d.join("b.toml"), "command = [\"b\"]\n").unwrap();
        std::fs::write(d.join("a.toml"), "command = [\"a\"]\n").unwrap();
        std::fs::write(d.join("notes.txt"), "x").unwrap();
        let c = JobConfig::load_all(std::slice::from_ref(&d)).unwrap();
        let names: Vec<&str> = c.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        std::fs::write(
            t.path().join("a2.toml"),
            "name = \"a\"\ncommand = [\"a\"]\n",
        )
        .unwrap();
        let e = JobConfig::load_all(&[d.clone(), t.path().join("a2.toml")]).unwrap_err();
        assert_eq!(e.key(), Some("name"));
        assert!(
            e.to_string().contains("a2.toml") && e.to_string().contains("also used by"),
            "{e}"
        );
        std::fs::write(
            t.path().join("c.toml"),
            "command = [\"c\"]\n[checkpoint]\ndir = \"jobs/.supervise/a/images\"\n",
        )
        .unwrap();
        let e = JobConfig::load_all(&[d, t.path().join("c.toml")]).unwrap_err();
        assert_eq!(e.key(), Some("checkpoint.dir"), "{e}");
    }

    #[test]
    fn slurm_table() {
        let j = parse(
            "command = [\"a\"]\n[slurm]\nsignal = \"USR2\"\nrequeue = false\nfence_wait = \"3s\"\n",
        )
        .unwrap();
        assert_eq!(
            j.slurm,
            SlurmConfig {
                signal: SlurmSignal::Usr2,
                requeue: false,
                fence_wait: Duration::from_secs(3)
            }
        );
        assert_eq!(j.slurm.signal.number(), libc::SIGUSR2);
        assert_eq!(
            parse("command = [\"a\"]\n").unwrap().slurm,
            SlurmConfig::default()
        );
        invalid(
            "command = [\"a\"]\n[slurm]\nsignal = \"TERM\"\n",
            3,
            10,
            "slurm.signal",
            "expected one of: \"USR1\"",
        );
    }

    // ---- errors ---------------------------------------------------------

    #[test]
    fn files_table() {
        let j = parse(
            "command = [\"a\"]\n[files]\nsnapshot = [\"state.db\", \"/abs/s\"]\n\
             append = [\"out/results.csv\"]\nexclude = [\"scratch\"]\n",
        )
        .unwrap();
        assert_eq!(
            j.files,
            FilesConfig {
                rollback: true,
                snapshot: vec!["/x/state.db".into(), "/abs/s".into()],
                append: vec!["/x/out/results.csv".into()],
                exclude: vec!["/x/scratch".into()],
            }
        );
        let off = parse("command = [\"a\"]\n[files]\nrollback = false\n").unwrap();
        assert!(!off.files.rollback);
        assert_eq!(
            parse("command = [\"a\"]\n").unwrap().files,
            FilesConfig::default()
        );
    }

    #[test]
    fn files_errors_point_at_the_entry() {
        invalid(
            "command = [\"a\"]\n[files]\nsnapshot = [\"s\"]\nappend = [\"o\", \"./s\"]\n",
            4,
            16,
            "files.append",
            "/x/s is already listed in `files.snapshot`",
        );
        invalid(
            "command = [\"a\"]\n[files]\nexclude = [\"a\", \"a\"]\n",
            3,
            17,
            "files.exclude",
            "listed twice",
        );
        invalid(
            "command = [\"a\"]\n[files]\nsnapshot = \"s\"\n",
            3,
            12,
            "files.snapshot",
            "an array",
        );
        invalid(
            "command = [\"a\"]\n[files]\nsnapshot = [\"\"]\n",
            3,
            13,
            "files.snapshot[0]",
            "must not be empty",
        );
        invalid(
            "command = [\"a\"]\n[files]\nrolback = true\n",
            3,
            1,
            "files.rolback",
            "did you mean `rollback`",
        );
    }

    #[test]
    fn unknown_key_in_checkpoint() {
        let text = "name = \"j\"\ncommand = [\"a\"]\n\n[checkpoint]\nkeep = 2\n\nevry = \"30s\"\n";
        let shown = invalid(text, 7, 1, "checkpoint.evry", "unknown key");
        assert_eq!(
            shown,
            "/x/job.toml:7:1: checkpoint.evry: unknown key (expected one of: every, cron, \
             timezone, dir, keep, shell_job, tcp_established, file_locks, ext_unix_sk, \
             log_level, network_lock, timeout); did you mean `every`?"
        );
    }

    #[test]
    fn unknown_keys_in_every_table() {
        invalid(
            "command = [\"a\"]\nbogus = 1\n",
            2,
            1,
            "bogus",
            "unknown key",
        );
        invalid(
            "command = [\"a\"]\ncomand = [\"b\"]\n",
            2,
            1,
            "comand",
            "did you mean `command`?",
        );
        invalid(
            "command = [\"a\"]\n[restore]\n  windw = \"1h\"\n",
            3,
            3,
            "restore.windw",
            "expected one of: on, max_restores, window, backoff, backoff_max",
        );
        invalid(
            "command = [\"a\"]\n[shutdown]\nchekpoint = true\n",
            3,
            1,
            "shutdown.chekpoint",
            "(expected one of: action, checkpoint); did you mean `checkpoint`?",
        );
        // Inline tables and dotted keys, too.
        invalid(
            "command = [\"a\"]\ncheckpoint = { every = \"1s\", kep = 1 }\n",
            2,
            30,
            "checkpoint.kep",
            "did you mean `keep`?",
        );
        invalid(
            "command = [\"a\"]\nshutdown.acton = \"stop\"\n",
            2,
            10,
            "shutdown.acton",
            "unknown key",
        );
        // A sub-table nobody asked for.
        invalid(
            "command = [\"a\"]\n[checkpoint.criu]\nshell_job = true\n",
            2,
            13,
            "checkpoint.criu",
            "unknown key",
        );
        // No suggestion when nothing is close.
        let shown = invalid("command = [\"a\"]\nzzzzzz = 1\n", 2, 1, "zzzzzz", "unknown");
        assert!(!shown.contains("did you mean"), "{shown}");
    }

    #[test]
    fn invalid_duration() {
        let text = "command = [\"a\"]\n[checkpoint]\nevery = \"30 parsecs\"\n";
        let shown = invalid(
            text,
            3,
            9,
            "checkpoint.every",
            "invalid duration \"30 parsecs\": unknown time unit \"parsecs\"",
        );
        assert_eq!((3, 9), pos_of(text, "\"30 parsecs"), "{shown}");
        invalid(
            "command = [\"a\"]\n[checkpoint]\nevery = \"30\"\n",
            3,
            9,
            "checkpoint.every",
            "time unit needed",
        );
        invalid(
            "command = [\"a\"]\n[restore]\nwindow = \"\"\n",
            3,
            10,
            "restore.window",
            "invalid duration \"\"",
        );
        invalid(
            "command = [\"a\"]\n[checkpoint]\ntimeout = \"soon\"\n",
            3,
            11,
            "checkpoint.timeout",
            "invalid duration \"soon\"",
        );
        invalid(
            "command = [\"a\"]\n[restore]\nbackoff = \"1 fortnight\"\n",
            3,
            11,
            "restore.backoff",
            "unknown time unit \"fortnight\"",
        );
    }

    #[test]
    fn duration_minimums() {
        invalid(
            "command = [\"a\"]\n[checkpoint]\nevery = \"0s\"\n",
            3,
            9,
            "checkpoint.every",
            "must be at least 1s",
        );
        invalid(
            "command = [\"a\"]\n[checkpoint]\nevery = \"500ms\"\n",
            3,
            9,
            "checkpoint.every",
            "must be at least 1s (found \"500ms\")",
        );
        invalid(
            "command = [\"a\"]\n[restore]\nwindow = \"0s\"\n",
            3,
            10,
            "restore.window",
            "must be at least 1s",
        );
        invalid(
            "command = [\"a\"]\n[checkpoint]\ntimeout = \"100ms\"\n",
            3,
            11,
            "checkpoint.timeout",
            "must be at least 1s",
        );
        // backoff may be zero (restore at once).
        let j = ok("command = [\"a\"]\n[restore]\nbackoff = \"0s\"\n");
        assert_eq!(j.restore.backoff, Duration::ZERO);
    }

    #[test]
    fn invalid_cron() {
        let text = "command = [\"a\"]\n[checkpoint]\n\ncron = \"*/5 * *\"\n";
        invalid(
            text,
            4,
            8,
            "checkpoint.cron",
            "invalid cron expression \"*/5 * *\": expected 6 or 7 fields",
        );
        // Classic 5-field crontab.
        invalid(
            "command = [\"a\"]\n[checkpoint]\ncron = \"*/5 * * * *\"\n",
            3,
            8,
            "checkpoint.cron",
            "found 5",
        );
        let shown = invalid(
            "command = [\"a\"]\n[checkpoint]\ncron = \"0 */61 * * * *\"\n",
            3,
            8,
            "checkpoint.cron",
            "invalid cron expression \"0 */61 * * * *\": Minutes must be between",
        );
        assert!(!shown.contains('^'), "{shown}");
        invalid(
            "command = [\"a\"]\n[checkpoint]\ncron = \"@dayly\"\n",
            3,
            8,
            "checkpoint.cron",
            "not a valid expression",
        );
        invalid(
            "command = [\"a\"]\n[checkpoint]\ncron = \"0 0 0 1 1 * 2020\"\n",
            3,
            8,
            "checkpoint.cron",
            "never fires again",
        );
    }

    #[test]
    fn wrong_types() {
        let shown = invalid(
            "name = \"j\"\ncommand = \"./counter --x\"\n",
            2,
            11,
            "command",
            "expected an array of strings, found a string",
        );
        assert_eq!(
            shown,
            "/x/job.toml:2:11: command: expected an array of strings, found a string"
        );
        invalid(
            "command = [\"a\", 1]\n",
            1,
            17,
            "command[1]",
            "expected a string, found an integer",
        );
        invalid(
            "command = [\"a\"]\n[checkpoint]\nevery = 30\n",
            3,
            9,
            "checkpoint.every",
            "expected a duration string such as \"30s\", \"5m\" or \"1h 30m\", found an integer",
        );
        invalid(
            "command = [\"a\"]\n[checkpoint]\nshell_job = \"yes\"\n",
            3,
            13,
            "checkpoint.shell_job",
            "expected a boolean, found a string",
        );
        invalid(
            "command = [\"a\"]\n[checkpoint]\nkeep = 1.5\n",
            3,
            8,
            "checkpoint.keep",
            "expected an integer, found a float",
        );
        invalid(
            "command = [\"a\"]\n[checkpoint]\nkeep = \"3\"\n",
            3,
            8,
            "checkpoint.keep",
            "expected an integer, found a string",
        );
        invalid(
            "command = [\"a\"]\ncheckpoint = 5\n",
            2,
            14,
            "checkpoint",
            "expected a table, found an integer",
        );
        invalid(
            "command = [\"a\"]\n[[restore]]\non = \"never\"\n",
            2,
            1,
            "restore",
            "expected a table, found an array",
        );
        invalid(
            "command = [\"a\"]\n[restore]\non = 3\n",
            3,
            6,
            "restore.on",
            "expected a string, found an integer",
        );
        invalid(
            "attach = \"123\"\n",
            1,
            10,
            "attach",
            "expected a process id (a positive integer), found a string",
        );
        invalid(
            "name = 7\ncommand = [\"a\"]\n",
            1,
            8,
            "name",
            "expected a job name string, found an integer",
        );
        invalid(
            "command = [\"a\"]\nenv = [\"A=1\"]\n",
            2,
            7,
            "env",
            "expected a table of environment variables, found an array",
        );
        invalid(
            "command = [\"a\"]\n[env]\nPORT = 8080\n",
            3,
            8,
            "env.PORT",
            "expected a string (quote numbers, e.g. \"8080\"), found an integer",
        );
        invalid(
            "command = [\"a\"]\ncwd = false\n",
            2,
            7,
            "cwd",
            "expected a path string, found a boolean",
        );
        invalid(
            "command = [\"a\"]\n[shutdown]\ncheckpoint = \"no\"\n",
            3,
            14,
            "shutdown.checkpoint",
            "expected a boolean, found a string",
        );
    }

    #[test]
    fn invalid_choices() {
        invalid(
            "command = [\"a\"]\n[restore]\non = \"sometimes\"\n",
            3,
            6,
            "restore.on",
            "invalid value \"sometimes\" (expected one of: \"failure\", \"always\", \"never\")",
        );
        invalid(
            "command = [\"a\"]\n[shutdown]\naction = \"Stop\"\n",
            3,
            10,
            "shutdown.action",
            "expected one of: \"stop\", \"detach\"",
        );
        invalid(
            "command = [\"a\"]\n[checkpoint]\nnetwork_lock = \"ipfw\"\n",
            3,
            16,
            "checkpoint.network_lock",
            "expected one of: \"iptables\", \"nftables\", \"skip\"",
        );
        invalid(
            "command = [\"a\"]\n[checkpoint]\ncron = \"0 * * * * *\"\ntimezone = \"europe/berlin\"\n",
            4,
            12,
            "checkpoint.timezone",
            "unknown time zone \"europe/berlin\"",
        );
        let shown = invalid(
            "command = [\"a\"]\n[checkpoint]\ncron = \"0 * * * * *\"\ntimezone = \"europe/berlin\"\n",
            4,
            12,
            "checkpoint.timezone",
            "did you mean \"Europe/Berlin\"?",
        );
        assert!(shown.contains("IANA"), "{shown}");
    }

    #[test]
    fn numeric_ranges() {
        invalid(
            "command = [\"a\"]\n[checkpoint]\nkeep = 0\n",
            3,
            8,
            "checkpoint.keep",
            "must be at least 1 (found 0)",
        );
        invalid(
            "command = [\"a\"]\n[checkpoint]\nkeep = -1\n",
            3,
            8,
            "checkpoint.keep",
            "must be at least 1 (found -1)",
        );
        invalid(
            "command = [\"a\"]\n[checkpoint]\nlog_level = 5\n",
            3,
            13,
            "checkpoint.log_level",
            "must be between 0 and 4 (found 5)",
        );
        invalid(
            "command = [\"a\"]\n[restore]\nmax_restores = 0\n",
            3,
            16,
            "restore.max_restores",
            "must be at least 1 (found 0)",
        );
        invalid(
            "command = [\"a\"]\n[restore]\nmax_restores = 5000000000\n",
            3,
            16,
            "restore.max_restores",
            "must be at most 4294967295",
        );
        invalid("attach = 0\n", 1, 10, "attach", "invalid process id 0");
        invalid("attach = -5\n", 1, 10, "attach", "invalid process id -5");
        invalid(
            "attach = 99999999999\n",
            1,
            10,
            "attach",
            "must be between 1 and 2147483647",
        );
    }

    #[test]
    fn every_and_cron_are_mutually_exclusive() {
        let text = "command = [\"a\"]\n\n[checkpoint]\nevery = \"1m\"\ncron = \"0 * * * * *\"\n";
        let shown = invalid(
            text,
            5,
            8,
            "checkpoint.cron",
            "`every` and `cron` are mutually exclusive",
        );
        assert_eq!(
            shown,
            "/x/job.toml:5:8: checkpoint.cron: `every` and `cron` are mutually exclusive \
             (use one of them)"
        );
        // Points at whichever comes second.
        invalid(
            "command = [\"a\"]\n[checkpoint]\ncron = \"0 * * * * *\"\nevery = \"1m\"\n",
            4,
            9,
            "checkpoint.every",
            "mutually exclusive",
        );
    }

    #[test]
    fn timezone_requires_cron() {
        invalid(
            "command = [\"a\"]\n[checkpoint]\ntimezone = \"UTC\"\n",
            3,
            12,
            "checkpoint.timezone",
            "`timezone` is only valid together with `cron`",
        );
        invalid(
            "command = [\"a\"]\n[checkpoint]\nevery = \"1s\"\ntimezone = \"Europe/Berlin\"\n",
            4,
            12,
            "checkpoint.timezone",
            "only valid together with `cron`",
        );
    }

    #[test]
    fn backoff_max_must_not_be_below_backoff() {
        invalid(
            "command = [\"a\"]\n[restore]\nbackoff = \"10s\"\nbackoff_max = \"5s\"\n",
            4,
            15,
            "restore.backoff_max",
            "must be at least `backoff` (10s), found 5s",
        );
        // Only backoff given, above the default backoff_max.
        invalid(
            "command = [\"a\"]\n[restore]\nbackoff = \"10m\"\n",
            3,
            11,
            "restore.backoff",
            "10m exceeds `backoff_max` (5m, the default)",
        );
        // Only backoff_max given, below the default backoff.
        invalid(
            "command = [\"a\"]\n[restore]\nbackoff_max = \"500ms\"\n",
            3,
            15,
            "restore.backoff_max",
            "must be at least `backoff` (1s)",
        );
        let j = ok("command = [\"a\"]\n[restore]\nbackoff = \"2s\"\nbackoff_max = \"2s\"\n");
        assert_eq!(j.restore.backoff_max, Duration::from_secs(2));
    }

    #[test]
    fn command_and_attach() {
        let e = parse("name = \"j\"\n[checkpoint]\nevery = \"1m\"\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "/x/job.toml: one of `command` or `attach` is required"
        );
        assert_eq!(e.position(), None);
        assert_eq!(e.key(), None);
        assert_eq!(
            parse("").unwrap_err().to_string(),
            "/x/job.toml: one of `command` or `attach` is required"
        );

        invalid(
            "command = [\"a\"]\nattach = 5\n",
            2,
            10,
            "attach",
            "`command` and `attach` are mutually exclusive",
        );
        invalid(
            "attach = 5\ncommand = [\"a\"]\n",
            2,
            11,
            "command",
            "`command` and `attach` are mutually exclusive",
        );
        invalid("command = []\n", 1, 11, "command", "must not be empty");
        invalid(
            "command = [\"\", \"x\"]\n",
            1,
            11,
            "command",
            "the program (first element) must not be an empty string",
        );
        invalid(
            "command = [\"a\", \"b\\u0000\"]\n",
            1,
            17,
            "command[1]",
            "NUL",
        );
    }

    #[test]
    fn launch_only_keys_with_attach() {
        for (text, line, col, key) in [
            ("attach = 5\ncwd = \"x\"\n", 2, 7, "cwd"),
            ("attach = 5\nenv = { A = \"1\" }\n", 2, 13, "env"),
            ("attach = 5\n[env]\nA = \"1\"\n", 3, 5, "env"),
            ("attach = 5\nstdout = \"o\"\n", 2, 10, "stdout"),
            ("attach = 5\nstderr = \"e\"\n", 2, 10, "stderr"),
        ] {
            let msg = format!("`{key}` can only be used with `command`, not with `attach`");
            invalid(text, line, col, key, &msg);
        }
        // An empty env table has no value to point at; still an error.
        let e = parse("attach = 5\nenv = {}\n").unwrap_err();
        assert_eq!(e.key(), Some("env"));
        assert_eq!(
            e.to_string(),
            "/x/job.toml: env: `env` can only be used with `command`, not with `attach`"
        );
    }

    #[test]
    fn names() {
        invalid(
            "name = \"\"\ncommand = [\"a\"]\n",
            1,
            8,
            "name",
            "must not be empty",
        );
        invalid(
            "name = \"my job\"\ncommand = [\"a\"]\n",
            1,
            8,
            "name",
            "invalid job name \"my job\"",
        );
        invalid(
            "name = \"a/b\"\ncommand = [\"a\"]\n",
            1,
            8,
            "name",
            "invalid job name",
        );
        invalid(
            "name = \"..\"\ncommand = [\"a\"]\n",
            1,
            8,
            "name",
            "invalid job name",
        );
        let long = format!("name = \"{}\"\ncommand = [\"a\"]\n", "a".repeat(300));
        invalid(&long, 1, 8, "name", "300 bytes long; the limit is 128");
        let max = format!("name = \"{}\"\ncommand = [\"a\"]\n", "a".repeat(128));
        assert_eq!(ok(&max).name.len(), 128);
        assert_eq!(
            ok("name = \"web-1.prod_x\"\ncommand = [\"a\"]\n").name,
            "web-1.prod_x"
        );

        // Default from the file stem, which must be valid too.
        let e =
            JobConfig::from_str_at("command = [\"a\"]", Path::new("/x/my job.toml")).unwrap_err();
        assert_eq!(e.key(), Some("name"));
        assert_eq!(e.position(), None);
        assert!(
            e.to_string()
                .starts_with("/x/my job.toml: name: no `name` given"),
            "{e}"
        );
        let j = JobConfig::from_str_at(
            "name = \"ok\"\ncommand = [\"a\"]",
            Path::new("/x/my job.toml"),
        )
        .unwrap();
        assert_eq!(j.name, "ok");
    }

    #[test]
    fn env_keys_and_values() {
        invalid(
            "command = [\"a\"]\nenv = { \"A=B\" = \"x\" }\n",
            2,
            9,
            "env.\"A=B\"",
            "invalid environment variable name \"A=B\"",
        );
        invalid(
            "command = [\"a\"]\nenv = { \"\" = \"x\" }\n",
            2,
            9,
            "env.\"\"",
            "invalid environment variable name",
        );
    }

    #[test]
    fn empty_paths() {
        invalid(
            "command = [\"a\"]\nstate_dir = \"\"\n",
            2,
            13,
            "state_dir",
            "must not be empty",
        );
        invalid(
            "command = [\"a\"]\n[checkpoint]\ndir = \"\"\n",
            3,
            7,
            "checkpoint.dir",
            "must not be empty",
        );
    }

    #[test]
    fn syntax_errors() {
        let e = parse("command = [\"a\"\nname = \"x\"\n").unwrap_err();
        assert!(matches!(e, ConfigError::Syntax { .. }), "{e}");
        assert_eq!(e.position(), Some(Position { line: 2, column: 1 }));
        assert!(
            e.to_string().starts_with("/x/job.toml:2:1: invalid TOML: "),
            "{e}"
        );
        assert!(!e.to_string().contains('\n'), "{e}");

        let e = parse("command = [\"a\"]\ncommand = [\"b\"]\n").unwrap_err();
        assert_eq!(e.position(), Some(Position { line: 2, column: 1 }));
        assert!(e.to_string().contains("duplicate key `command`"), "{e}");

        let e = parse("command = [\"a\"]\n[checkpoint]\nevery = 30s\n").unwrap_err();
        assert!(matches!(e, ConfigError::Syntax { .. }), "{e}");
        assert_eq!(e.position().map(|p| p.line), Some(3));
    }

    #[test]
    fn cannot_read() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.toml");
        let e = JobConfig::load(&missing).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }));
        let shown = e.to_string();
        assert!(
            shown.starts_with(&format!(
                "{}: cannot read: No such file or directory",
                missing.display()
            )),
            "{shown}"
        );
        assert_eq!(e.path(), missing);
        assert_eq!(e.position(), None);
    }

    #[test]
    fn columns_count_characters_not_bytes() {
        // "ä" is two bytes; the column of the bad value is in characters.
        let text = "command = [\"a\"]\nenv = { \"ä\" = \"x\", B = 1 }\n";
        invalid(text, 2, 24, "env.B", "found an integer");
        assert_eq!(
            Position::of_offset("ab\ncä", 6),
            Position { line: 2, column: 3 }
        );
        assert_eq!(Position::of_offset("", 0), Position { line: 1, column: 1 });
        assert_eq!(
            Position::of_offset("a\r\nb", 3),
            Position { line: 2, column: 1 }
        );
        // Offsets inside a multi-byte char or past the end are clamped.
        assert_eq!(Position::of_offset("ä", 1), Position { line: 1, column: 1 });
        assert_eq!(
            Position::of_offset("ab", 99),
            Position { line: 1, column: 3 }
        );
    }

    #[test]
    fn crlf_files_report_positions() {
        let text = "command = [\"a\"]\r\n[checkpoint]\r\nevery = \"1 parsec\"\r\n";
        invalid(text, 3, 9, "checkpoint.every", "invalid duration");
    }

    // ---- defaults and resolution ----------------------------------------

    #[test]
    fn defaults() {
        let j = JobConfig::from_str_at(
            "command = [\"sleep\", \"100\"]\n",
            Path::new("/x/jobs/counter.toml"),
        )
        .unwrap();
        assert_eq!(j.name, "counter");
        assert_eq!(j.source, PathBuf::from("/x/jobs/counter.toml"));
        assert_eq!(j.base_dir, PathBuf::from("/x/jobs"));
        assert_eq!(j.state_dir, PathBuf::from("/x/jobs/.supervise/counter"));
        assert_eq!(
            j.target,
            Target::Launch(LaunchSpec {
                command: vec!["sleep".into(), "100".into()],
                cwd: "/x/jobs".into(),
                env: BTreeMap::new(),
                stdout: "/x/jobs/.supervise/counter/stdout.log".into(),
                stderr: "/x/jobs/.supervise/counter/stderr.log".into(),
            })
        );
        assert_eq!(
            j.checkpoint,
            CheckpointConfig {
                schedule: ScheduleSpec::Every(Duration::from_secs(300)),
                dir: "/x/jobs/.supervise/counter/images".into(),
                keep: 3,
                criu: CriuOptions {
                    shell_job: false,
                    tcp_established: false,
                    file_locks: false,
                    ext_unix_sk: false,
                    log_level: 2,
                    network_lock: NetworkLock::Nftables,
                },
                timeout: None,
            }
        );
        assert_eq!(
            j.restore,
            RestoreConfig {
                on: RestoreOn::Failure,
                max_restores: 10,
                window: Duration::from_secs(3600),
                backoff: Duration::from_secs(1),
                backoff_max: Duration::from_secs(300),
            }
        );
        assert_eq!(
            j.shutdown,
            ShutdownConfig {
                action: ShutdownAction::Stop,
                checkpoint: true
            }
        );

        // Empty tables give the same defaults.
        let k = JobConfig::from_str_at(
            "command = [\"sleep\", \"100\"]\n[checkpoint]\n[restore]\n[shutdown]\n",
            Path::new("/x/jobs/counter.toml"),
        )
        .unwrap();
        assert_eq!(j, k);
    }

    #[test]
    fn all_keys_explicit() {
        let text = r#"
name = "web"
command = ["bin/server", "--port", "80"]
cwd = "app"
env = { A = "1", "B.C" = "two" }
stdout = "/var/log/web.out"
stderr = "logs/web.err"
state_dir = "../state/web"

[checkpoint]
cron = "0 */15 * * * *"
timezone = "Europe/Berlin"
dir = "/srv/images"
keep = 7
shell_job = true
tcp_established = true
file_locks = true
ext_unix_sk = true
log_level = 4
network_lock = "iptables"
timeout = "10m"

[restore]
on = "always"
max_restores = 3
window = "30m"
backoff = "2s"
backoff_max = "1m"

[shutdown]
action = "detach"
checkpoint = false
"#;
        let j = JobConfig::from_str_at(text, Path::new("/x/jobs/web.toml")).unwrap();
        assert_eq!(j.name, "web");
        assert_eq!(j.state_dir, PathBuf::from("/x/jobs/../state/web"));
        let Target::Launch(l) = &j.target else {
            panic!("not launch")
        };
        assert_eq!(l.cwd, PathBuf::from("/x/jobs/app"));
        assert_eq!(l.command, ["/x/jobs/app/bin/server", "--port", "80"]);
        assert_eq!(l.env.get("A").map(String::as_str), Some("1"));
        assert_eq!(l.env.get("B.C").map(String::as_str), Some("two"));
        assert_eq!(l.stdout, PathBuf::from("/var/log/web.out"));
        assert_eq!(l.stderr, PathBuf::from("/x/jobs/logs/web.err"));
        assert_eq!(
            j.checkpoint.schedule,
            ScheduleSpec::cron("0 */15 * * * *", chrono_tz::Europe::Berlin).unwrap()
        );
        assert_eq!(j.checkpoint.dir, PathBuf::from("/srv/images"));
        assert_eq!(j.checkpoint.keep, 7);
        assert_eq!(
            j.checkpoint.criu,
            CriuOptions {
                shell_job: true,
                tcp_established: true,
                file_locks: true,
                ext_unix_sk: true,
                log_level: 4,
                network_lock: NetworkLock::Iptables,
            }
        );
        assert_eq!(j.checkpoint.timeout, Some(Duration::from_secs(600)));
        assert_eq!(
            j.restore,
            RestoreConfig {
                on: RestoreOn::Always,
                max_restores: 3,
                window: Duration::from_secs(1800),
                backoff: Duration::from_secs(2),
                backoff_max: Duration::from_secs(60),
            }
        );
        assert_eq!(
            j.shutdown,
            ShutdownConfig {
                action: ShutdownAction::Detach,
                checkpoint: false
            }
        );
    }

    #[test]
    fn cron_defaults_to_utc() {
        let j = ok("command = [\"a\"]\n[checkpoint]\ncron = \"*/10 * * * * *\"\n");
        match &j.checkpoint.schedule {
            ScheduleSpec::Cron { expr, tz, .. } => {
                assert_eq!(expr, "*/10 * * * * *");
                assert_eq!(*tz, chrono_tz::Tz::UTC);
            }
            other => panic!("{other:?}"),
        }
        let j = ok("command = [\"a\"]\n[checkpoint]\ncron = \"@hourly\"\n");
        assert_eq!(j.checkpoint.schedule.describe(), "cron '@hourly' (UTC)");
    }

    #[test]
    fn every_parses_humantime() {
        let j = ok("command = [\"a\"]\n[checkpoint]\nevery = \"1h 30m\"\n");
        assert_eq!(
            j.checkpoint.schedule,
            ScheduleSpec::Every(Duration::from_secs(5400))
        );
    }

    #[test]
    fn argv0_resolution() {
        let at = |text: &str| match JobConfig::from_str_at(text, Path::new("/x/jobs/j.toml"))
            .unwrap()
            .target
        {
            Target::Launch(l) => l.command[0].clone(),
            t => panic!("{t:?}"),
        };
        assert_eq!(at("command = [\"./counter\"]"), "/x/jobs/counter");
        assert_eq!(
            at("command = [\"./counter\"]\ncwd = \"w\""),
            "/x/jobs/w/counter"
        );
        assert_eq!(at("command = [\"bin/x\"]\ncwd = \"/opt\""), "/opt/bin/x");
        assert_eq!(at("command = [\"../up/x\"]"), "/x/jobs/../up/x");
        assert_eq!(at("command = [\"/usr/bin/env\"]"), "/usr/bin/env");
        assert_eq!(at("command = [\"python3\"]\ncwd = \"w\""), "python3");
    }

    #[test]
    fn relative_job_path_is_made_absolute() {
        let cwd = std::env::current_dir().unwrap();
        let j = JobConfig::from_str_at("command = [\"a\"]\ncwd = \".\"", Path::new("sub/./j.toml"))
            .unwrap();
        assert_eq!(j.source, cwd.join("sub/j.toml"));
        assert_eq!(j.base_dir, cwd.join("sub"));
        assert_eq!(j.state_dir, cwd.join("sub/.supervise/j"));
        let Target::Launch(l) = j.target else {
            panic!()
        };
        assert_eq!(l.cwd, cwd.join("sub"));
        assert!(l.stdout.is_absolute());
    }

    #[test]
    fn attach_target() {
        let j = JobConfig::from_str_at(
            "attach = 4242\nstate_dir = \"st\"\n[checkpoint]\nevery = \"10s\"\n",
            Path::new("/x/a.toml"),
        )
        .unwrap();
        assert_eq!(j.target, Target::Attach { pid: 4242 });
        assert_eq!(j.name, "a");
        assert_eq!(j.state_dir, PathBuf::from("/x/st"));
        assert_eq!(j.checkpoint.dir, PathBuf::from("/x/st/images"));
    }

    #[test]
    fn table_forms_are_equivalent() {
        let standard =
            ok("command = [\"a\"]\n[checkpoint]\nevery = \"1m\"\nkeep = 2\n[env]\nA = \"1\"\n");
        let inline = ok(
            "command = [\"a\"]\ncheckpoint = { every = \"1m\", keep = 2 }\nenv = { A = \"1\" }\n",
        );
        let dotted = ok(
            "command = [\"a\"]\ncheckpoint.every = \"1m\"\ncheckpoint.keep = 2\nenv.A = \"1\"\n",
        );
        assert_eq!(standard, inline);
        assert_eq!(standard, dotted);
    }

    #[test]
    fn load_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("counter.toml");
        std::fs::write(&path, "command = [\"./counter\"]\nstdout = \"out.log\"\n").unwrap();
        let j = JobConfig::load(&path).unwrap();
        assert_eq!(j.name, "counter");
        assert_eq!(j.source, path);
        assert_eq!(j.base_dir, dir.path());
        let Target::Launch(l) = j.target else {
            panic!()
        };
        assert_eq!(l.command[0], dir.path().join("counter").to_str().unwrap());
        assert_eq!(l.stdout, dir.path().join("out.log"));

        std::fs::write(&path, "command = [\"a\"]\n[checkpoint]\nevery = \"x\"\n").unwrap();
        let e = JobConfig::load(&path).unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("{}:3:9: checkpoint.every: ", path.display())),
            "{e}"
        );
    }

    #[test]
    fn choice_values_round_trip() {
        for (v, s) in NetworkLock::ALL {
            assert_eq!(v.as_str(), *s);
            assert_eq!(v.to_string(), *s);
        }
        assert_eq!(NetworkLock::default(), NetworkLock::Nftables);
        assert_eq!(RestoreOn::default(), RestoreOn::Failure);
        assert_eq!(ShutdownAction::default(), ShutdownAction::Stop);
        assert_eq!(RestoreOn::Never.as_str(), "never");
        assert_eq!(ShutdownAction::Detach.to_string(), "detach");
    }

    // ---- the reference file ---------------------------------------------

    const REFERENCE: &str = include_str!("../config/reference.toml");

    #[test]
    fn reference_file_parses() {
        let j = JobConfig::from_str_at(REFERENCE, Path::new("/x/reference.toml")).unwrap();
        assert_eq!(j.name, "reference");
        assert_eq!(j.checkpoint.schedule, ScheduleSpec::Every(DEFAULT_EVERY));
        assert_eq!(j.checkpoint.keep, DEFAULT_KEEP);
        assert_eq!(j.checkpoint.criu, CriuOptions::default());
        assert_eq!(j.restore, RestoreConfig::default());
        assert_eq!(j.shutdown, ShutdownConfig::default());
        // The active values equal the documented defaults where they are
        // defaults.
        assert_eq!(j.state_dir, PathBuf::from("/x/.supervise/reference"));
        assert_eq!(j.checkpoint.dir, j.state_dir.join("images"));
    }

    /// Uncomments `# key = ...` lines for `keys` and comments out active
    /// lines for `drop`.
    fn edit_reference(uncomment: &[&str], drop: &[&str]) -> String {
        REFERENCE
            .lines()
            .map(|l| {
                let is = |k: &&str| {
                    l.starts_with(&format!("{k} =")) || l.starts_with(&format!("# {k} ="))
                };
                if uncomment.iter().any(is) {
                    l.trim_start_matches("# ").to_string()
                } else if drop.iter().any(|k| l.starts_with(&format!("{k} ="))) {
                    format!("# {l}")
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn reference_commented_examples_are_valid() {
        // cron + timezone instead of every, plus timeout.
        let text = edit_reference(
            &[
                "cron", "timezone", "timeout", "snapshot", "append", "exclude",
            ],
            &["every"],
        );
        let j = JobConfig::from_str_at(&text, Path::new("/x/reference.toml")).unwrap();
        assert_eq!(
            j.checkpoint.schedule,
            ScheduleSpec::cron("0 */15 * * * *", chrono_tz::Europe::Berlin).unwrap()
        );
        assert_eq!(j.checkpoint.timeout, Some(Duration::from_secs(600)));

        // attach instead of command (launch-only keys removed).
        let text = edit_reference(&["attach"], &["command", "cwd", "env", "stdout", "stderr"]);
        let j = JobConfig::from_str_at(&text, Path::new("/x/reference.toml")).unwrap();
        assert_eq!(j.target, Target::Attach { pid: 12345 });
    }

    #[test]
    fn reference_documents_every_key() {
        let keys = [
            "name",
            "command",
            "attach",
            "cwd",
            "env",
            "stdout",
            "stderr",
            "state_dir",
            "[checkpoint]",
            "every",
            "cron",
            "timezone",
            "dir",
            "keep",
            "shell_job",
            "tcp_established",
            "file_locks",
            "ext_unix_sk",
            "log_level",
            "network_lock",
            "timeout",
            "[restore]",
            "on",
            "max_restores",
            "window",
            "backoff",
            "backoff_max",
            "[shutdown]",
            "action",
            "checkpoint",
            "[files]",
            "rollback",
            "snapshot",
            "append",
            "exclude",
            "[slurm]",
            "signal",
            "requeue",
            "fence_wait",
        ];
        for k in keys {
            let documented = REFERENCE.lines().any(|l| {
                l.starts_with(&format!("{k} =")) || l.starts_with(&format!("# {k} =")) || l == k
            });
            assert!(documented, "reference.toml does not show `{k}`");
        }
    }
}
