//! The supervisor's narrow window on processes and CRIU: launch a job,
//! dump it, restore it, ask CRIU what the kernel supports. [`Criu`] is the
//! real thing; the supervisor's own tests drive the loop through a test
//! double, so that the state machine and the restart policy run without
//! root or CRIU.

use std::path::Path;
use std::time::Duration;

use crate::config::{CriuOptions, LaunchSpec};
use crate::criu::{CriuError, DumpMode, DumpOutcome};
use crate::job::{InitFiles, JobError, Restored, Running};
use crate::reaper::Reaper;

/// What the supervisor asks of the outside world. Every call blocks; the
/// supervisor makes them from `spawn_blocking`.
pub trait Engine: Send + Sync {
    /// Starts the job's command (under a fresh namespace init).
    fn launch(&self, spec: &LaunchSpec, files: &InitFiles) -> Result<Running, JobError>;

    /// Dumps the tree rooted at `host_pid` into `dir`, leaving it running.
    /// `on_notify` receives CRIU's notifications (`post-dump` comes while the
    /// tree is still frozen); returning false fails the dump.
    fn dump(
        &self,
        host_pid: i32,
        dir: &Path,
        opts: &CriuOptions,
        timeout: Option<Duration>,
        mode: DumpMode,
        on_notify: &mut dyn FnMut(&str) -> bool,
    ) -> Result<DumpOutcome, CriuError>;

    /// Restores the image in `images` (under a fresh namespace init).
    /// `on_notify` receives CRIU's notifications and the init's PID
    /// (`post-restore` comes before the restored tree runs); returning
    /// false aborts the restore.
    fn restore(
        &self,
        images: &Path,
        opts: &CriuOptions,
        files: &InitFiles,
        on_notify: &mut dyn FnMut(&str, i32) -> bool,
    ) -> Result<Restored, JobError>;

    /// Whether CRIU can track dirty memory here (pre-dump + dump) or must
    /// take full dumps.
    fn feature_check(&self) -> Result<DumpMode, CriuError>;
}

/// The real engine: CRIU over RPC, processes through supervise's reaper.
#[derive(Clone)]
pub struct Criu {
    reaper: Reaper,
}

impl Criu {
    /// An engine whose children are collected by `reaper`.
    pub fn new(reaper: Reaper) -> Criu {
        Criu { reaper }
    }
}

impl Engine for Criu {
    fn launch(&self, spec: &LaunchSpec, files: &InitFiles) -> Result<Running, JobError> {
        crate::job::launch(&self.reaper, spec, files)
    }

    fn dump(
        &self,
        host_pid: i32,
        dir: &Path,
        opts: &CriuOptions,
        timeout: Option<Duration>,
        mode: DumpMode,
        on_notify: &mut dyn FnMut(&str) -> bool,
    ) -> Result<DumpOutcome, CriuError> {
        crate::criu::dump_with(&self.reaper, host_pid, dir, opts, timeout, mode, on_notify)
    }

    fn restore(
        &self,
        images: &Path,
        opts: &CriuOptions,
        files: &InitFiles,
        on_notify: &mut dyn FnMut(&str, i32) -> bool,
    ) -> Result<Restored, JobError> {
        crate::job::restore(&self.reaper, images, opts, files, on_notify)
    }

    fn feature_check(&self) -> Result<DumpMode, CriuError> {
        crate::criu::feature_check(&self.reaper)
    }
}
