//! What supervise remembers on disk about the live job (`job.json`) and
//! about the process an `attach = PID` job was attached to
//! (`attached.json`), both in the (trusted) state directory.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::job::Running;

/// What supervise remembers about the live job, in `<state_dir>/job.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRecord {
    /// Root PID in supervise's namespace.
    pub host_pid: i32,
    /// Root PID in its own namespace.
    pub ns_pid: i32,
    /// The namespace init, if any.
    pub init_pid: Option<i32>,
    /// Root start time (clock ticks since boot).
    pub start_time: u64,
}

/// The process an `attach = PID` job was first attached to, in
/// `<state_dir>/attached.json`: a later supervise attaches to `pid` again
/// only if it is still that process (same start time).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(super) struct AttachRecord {
    pub(super) pid: i32,
    pub(super) start_time: u64,
}

/// Largest `job.json` read back (it holds four numbers).
pub(super) const RECORD_MAX: u64 = 64 << 10;

pub(super) fn read_record(state_dir: &Path) -> Option<JobRecord> {
    let bytes = crate::fsutil::read_limited(&state_dir.join("job.json"), RECORD_MAX).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Records the running job in `<run_dir>/job.json` (so that a later
/// supervise re-adopts it rather than start a second copy).
pub(super) async fn remember(run_dir: &Path, r: &Running) {
    let rec = JobRecord {
        host_pid: r.host_pid,
        ns_pid: r.ns_pid,
        init_pid: r.init_pid,
        start_time: r.start_time,
    };
    let path = run_dir.join("job.json");
    let written = tokio::task::spawn_blocking(move || {
        let s = serde_json::to_vec(&rec).map_err(std::io::Error::other)?;
        crate::fsutil::write_atomic(&path, &s, 0o600)
    })
    .await;
    if let Ok(Err(e)) = written {
        warn!(error = %e, "cannot record the job's pid");
    }
}

/// The job no longer runs: nothing to re-adopt.
pub(super) fn forget(run_dir: &Path) {
    let _ = std::fs::remove_file(run_dir.join("job.json"));
}

/// The process an attached job was attached to, if recorded for `pid`.
pub(super) fn read_attached(run_dir: &Path, pid: i32) -> Option<AttachRecord> {
    crate::fsutil::read_limited(&run_dir.join("attached.json"), RECORD_MAX)
        .ok()
        .and_then(|b| serde_json::from_slice::<AttachRecord>(&b).ok())
        .filter(|r| r.pid == pid)
}

/// Records the process an attached job is attached to.
pub(super) fn write_attached(run_dir: &Path, rec: AttachRecord) {
    if let Err(e) = serde_json::to_vec(&rec)
        .map_err(std::io::Error::other)
        .and_then(|b| crate::fsutil::write_atomic(&run_dir.join("attached.json"), &b, 0o600))
    {
        warn!(error = %e, "cannot record the attached process");
    }
}
