//! The supervisor's narrow window on processes and CRIU: launch a job,
//! dump it, restore it, ask CRIU what the kernel supports. [`Criu`] is the
//! real thing; the supervisor's own tests drive the loop through a test
//! double, so that the state machine and the restart policy run without
//! root or CRIU.

use std::path::Path;
use std::time::Duration;

use crate::config::{CriuOptions, LaunchSpec};
use crate::criu::page_server::{DumpSink, PageSource};
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
    /// tree is still frozen); returning false fails the dump. With `pages`
    /// (full dumps), page maps and pages go to `pages` instead of `dir`.
    #[allow(clippy::too_many_arguments)]
    fn dump(
        &self,
        host_pid: i32,
        dir: &Path,
        opts: &CriuOptions,
        timeout: Option<Duration>,
        mode: DumpMode,
        on_notify: &mut dyn FnMut(&str) -> bool,
        pages: Option<&mut (dyn DumpSink + Send)>,
    ) -> Result<DumpOutcome, CriuError>;

    /// Restores the image in `images` (under a fresh namespace init).
    /// `on_notify` receives CRIU's notifications and the init's PID
    /// (`post-restore` comes before the restored tree runs); returning
    /// false aborts the restore. With `lazy`, the restore is lazy: the
    /// pages marked lazy are missing from `images` and served from
    /// `lazy` while the job runs (see [`crate::criu::lazy`]).
    fn restore(
        &self,
        images: &Path,
        opts: &CriuOptions,
        files: &InitFiles,
        on_notify: &mut dyn FnMut(&str, i32) -> bool,
        lazy: Option<Box<dyn PageSource + Send>>,
    ) -> Result<Restored, JobError>;

    /// Whether CRIU can track dirty memory here (pre-dump + dump) or must
    /// take full dumps.
    fn feature_check(&self) -> Result<DumpMode, CriuError>;

    /// Whether lazy restores work here (engines without them: no).
    fn lazy_pages(&self) -> Result<bool, CriuError> {
        Ok(false)
    }
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
        pages: Option<&mut (dyn DumpSink + Send)>,
    ) -> Result<DumpOutcome, CriuError> {
        crate::criu::dump_with(
            &self.reaper,
            host_pid,
            dir,
            opts,
            timeout,
            mode,
            on_notify,
            pages,
        )
    }

    fn restore(
        &self,
        images: &Path,
        opts: &CriuOptions,
        files: &InitFiles,
        on_notify: &mut dyn FnMut(&str, i32) -> bool,
        lazy: Option<Box<dyn PageSource + Send>>,
    ) -> Result<Restored, JobError> {
        crate::job::restore(&self.reaper, images, opts, files, on_notify, lazy)
    }

    fn feature_check(&self) -> Result<DumpMode, CriuError> {
        crate::criu::feature_check(&self.reaper)
    }

    fn lazy_pages(&self) -> Result<bool, CriuError> {
        crate::criu::lazy_pages_check(&self.reaper)
    }
}
