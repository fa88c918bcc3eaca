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
//!
//! Layout, by stage: this module holds the validated types; `raw` the serde
//! types that mirror the file as written, `validate` the step from those to a
//! [`JobConfig`] (cross-field rules, defaults, paths, `load`/`load_all`), and
//! `diagnostics` the [`ConfigError`] rendering. The option types of the CRIU
//! adapter ([`CriuOptions`]) and of the files module ([`FilesConfig`]) belong
//! to those modules and are re-exported here.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::choice::choice_enum;
use crate::schedule::ScheduleSpec;

mod diagnostics;
mod raw;
#[cfg(test)]
mod tests;
mod validate;

pub use crate::criu::{
    CriuOptions, NetworkLock, OptValue, DEFAULT_CRIU_LOG_LEVEL, MAX_CRIU_LOG_LEVEL,
};
pub use crate::files::FilesConfig;
pub use crate::store::{StoreOptions, DEFAULT_KEY_FILE};
pub use diagnostics::{ConfigError, Position};

/// Checkpoint interval used when neither `checkpoint.every` nor
/// `checkpoint.cron` is given.
pub const DEFAULT_EVERY: Duration = Duration::from_secs(5 * 60);
/// Smallest allowed `checkpoint.every` (and `checkpoint.timeout`,
/// `restore.window`).
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// Default `checkpoint.min` (with `every = "auto"`).
pub const DEFAULT_AUTO_MIN: Duration = Duration::from_secs(10);
/// Default `checkpoint.max` (with `every = "auto"`).
pub const DEFAULT_AUTO_MAX: Duration = Duration::from_secs(86400);
/// Default `checkpoint.keep`.
pub const DEFAULT_KEEP: usize = 3;
/// Default `restore.max_restores`.
pub const DEFAULT_MAX_RESTORES: u32 = 10;
/// Default `restore.window`.
pub const DEFAULT_RESTORE_WINDOW: Duration = Duration::from_secs(60 * 60);
/// Default `restore.healthy_after`.
pub const DEFAULT_HEALTHY_AFTER: Duration = Duration::from_secs(10);
/// Default `restore.backoff`.
pub const DEFAULT_BACKOFF: Duration = Duration::from_secs(1);
/// Default `restore.backoff_max`.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(5 * 60);
/// Largest job file read: anything longer is refused (a job file is a few
/// hundred bytes; this bounds the memory and time spent on a bad one).
pub const MAX_JOB_FILE_SIZE: u64 = 1 << 20;

/// One year as humantime counts it (`"1y"` = 365.25 days): the upper bound
/// of most durations in a job file.
pub const YEAR: Duration = Duration::from_secs(31_557_600);
/// One day.
pub const DAY: Duration = Duration::from_secs(86_400);
/// One hour.
pub const HOUR: Duration = Duration::from_secs(3_600);

/// Upper bounds of the job file's durations, by key (larger values are
/// refused naming the key and the bound; `config/reference.toml` shows
/// each next to its key). They keep every deadline and sleep computed from
/// them far from overflowing, and a typo such as `backoff = "500000000y"`
/// from leaving a job (and `supervise stop`) waiting for ever.
pub mod bounds {
    use super::{DAY, HOUR, YEAR};
    use std::time::Duration;

    /// `checkpoint.every`, `mtbf`, `min`, `max`.
    pub const INTERVAL: Duration = YEAR;
    /// `checkpoint.timeout`: one checkpoint of even a huge job.
    pub const CHECKPOINT_TIMEOUT: Duration = DAY;
    /// `restore.window`.
    pub const RESTORE_WINDOW: Duration = YEAR;
    /// `restore.backoff` and `restore.backoff_max`.
    pub const BACKOFF: Duration = DAY;
    /// `slurm.fence_wait`: a new copy waits this long at most before it
    /// restores.
    pub const FENCE_WAIT: Duration = HOUR;
    /// `store.scrub`.
    pub const SCRUB: Duration = YEAR;
    /// `checkpoint.keep`: images retained.
    pub const KEEP: u64 = 10_000;
    /// `restore.max_restores`: restores counted within the window.
    pub const MAX_RESTORES: u64 = 10_000;
}

/// Directory (relative to the job file's directory) under which the default
/// per-job state directory `<STATE_PARENT>/<name>` lives.
pub const STATE_PARENT: &str = ".supervise";

/// Longest job name: it becomes a directory name (the default state
/// directory `.supervise/<name>`), so it must leave room in a file name
/// (255 bytes) and in the paths built from it.
pub const MAX_NAME_LEN: usize = 128;

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
    /// The `[store]` table.
    pub store: StoreOptions,
    /// Whose the job is (`user`, `group`): it then runs as that user in a
    /// user namespace of its own ([`crate::userns`]); `None`: as root (or
    /// as the user supervise runs as).
    pub owner: Option<crate::userns::Owner>,
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
    /// The job gets a /tmp of its own (`private_tmp`, default true): a
    /// directory `<state_dir>/tmp` bound over /tmp in its mount namespace,
    /// kept across restores, removed when the job ends.
    pub private_tmp: bool,
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
    /// CRIU sends the job's pages to supervise's page server, which stores
    /// only new chunks, instead of writing the whole memory to disk first.
    pub stream: bool,
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
    /// Delay before restoring a job that died again soon after a restore
    /// (a crash loop); doubles with each further such death, up to
    /// `backoff_max`. A death after a healthy run is restored at once.
    pub backoff: Duration,
    /// Cap of the restore delay (>= `backoff`).
    pub backoff_max: Duration,
    /// A run at least this long is healthy: the next death is restored at
    /// once, and the backoff starts over.
    pub healthy_after: Duration,
    /// Restore lazily (memory served from the store on demand, then in the
    /// background) where userfaultfd works.
    pub lazy: bool,
}

impl Default for RestoreConfig {
    fn default() -> Self {
        RestoreConfig {
            on: RestoreOn::default(),
            max_restores: DEFAULT_MAX_RESTORES,
            window: DEFAULT_RESTORE_WINDOW,
            backoff: DEFAULT_BACKOFF,
            backoff_max: DEFAULT_BACKOFF_MAX,
            healthy_after: DEFAULT_HEALTHY_AFTER,
            lazy: true,
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
