//! The control socket's wire types: what clients send, what supervise
//! answers, and the job state they describe. The daemon (supervisor,
//! server) depends on these; they depend on nothing of the daemon.

use std::collections::BTreeMap;
use std::path::PathBuf;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// A run of a Slurm batch job, as the client's environment names it
/// (`SLURM_JOB_ID`, `SLURMD_NODENAME`, `SLURM_RESTART_COUNT`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlurmRun {
    /// `SLURM_JOB_ID`.
    pub job_id: String,
    /// `SLURMD_NODENAME`.
    pub node: String,
    /// `SLURM_RESTART_COUNT` (0 on the first run).
    pub restart_count: u32,
}

/// A request to the running supervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Every job's status.
    Status,
    /// Checkpoint a job now and wait for the result.
    Checkpoint {
        /// Job name.
        job: String,
    },
    /// Replace the running job by an image (default: the newest).
    Restore {
        /// Job name.
        job: String,
        /// Checkpoint id.
        #[serde(default)]
        image: Option<String>,
    },
    /// Stop a job (optionally after a checkpoint); it stays stopped until
    /// `start`.
    Stop {
        /// Job name.
        job: String,
        /// Take a checkpoint first (and do not stop if it fails).
        #[serde(default)]
        checkpoint: bool,
    },
    /// Start a stopped job: resume from its newest image, or launch it.
    Start {
        /// Job name.
        job: String,
    },
    /// Leave every job running as it is (no checkpoint) and exit 0; a
    /// later `supervise run` re-adopts the jobs. What `systemctl restart`
    /// uses (`ExecStop=`).
    DetachAll,
    /// A user hands a job to the node service (the job runs as that
    /// user). The client sends the job file's text and, as `SCM_RIGHTS`
    /// with this request, descriptors of its working directory and of the
    /// job file's directory.
    Submit {
        /// The job file's text.
        text: String,
        /// The job file's absolute path (its directory is the base of its
        /// relative paths; named in messages).
        path: PathBuf,
        /// The client's working directory.
        cwd: PathBuf,
        /// The Slurm batch job the client runs in (`submit --wait` as the
        /// batch step), if any: the job's run of that Slurm job.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        slurm: Option<SlurmRun>,
    },
    /// Stop a submitted job and forget it (with `purge`, delete its
    /// images too).
    Cancel {
        /// Job name.
        job: String,
        /// Delete the job's images and state.
        #[serde(default)]
        purge: bool,
    },
    /// A job's images (newest first), optionally each verified.
    Images {
        /// Job name.
        job: String,
        /// Read and check every piece of every image.
        #[serde(default)]
        verify: bool,
    },
    /// Check (and with `repair`, repair) every stored piece of a job's
    /// images.
    Verify {
        /// Job name.
        job: String,
        /// Rewrite what can be repaired.
        #[serde(default)]
        repair: bool,
    },
    /// Reclaim stored data of a job's store that no image references.
    Gc {
        /// Job name.
        job: String,
    },
    /// Wait until the job's supervision ends or it is stopped, then
    /// answer its status (`supervise submit --wait`).
    Wait {
        /// Job name.
        job: String,
    },
}

impl Request {
    /// The job the request names, if any.
    pub fn job(&self) -> Option<&str> {
        match self {
            Request::Checkpoint { job }
            | Request::Restore { job, .. }
            | Request::Stop { job, .. }
            | Request::Start { job }
            | Request::Cancel { job, .. }
            | Request::Images { job, .. }
            | Request::Verify { job, .. }
            | Request::Gc { job }
            | Request::Wait { job } => Some(job),
            Request::Status | Request::DetachAll | Request::Submit { .. } => None,
        }
    }
}

/// One image, as `supervise images` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageRow {
    /// Checkpoint id.
    pub id: String,
    /// When it was taken.
    pub created: DateTime<Utc>,
    /// Sealed with the store key.
    pub sealed: bool,
    /// Its pack.
    pub pack: Option<String>,
    /// Logical size.
    pub size_bytes: u64,
    /// Bytes it newly stored.
    pub new_bytes: u64,
    /// Wall time of the dump, ms.
    pub duration_ms: u64,
    /// CRIU's frozen time, µs.
    pub frozen_us: Option<u64>,
    /// Job files recorded.
    pub job_files: Option<u64>,
    /// Bytes of job files copied.
    pub job_files_copied_bytes: Option<u64>,
    /// Verified (if asked).
    pub verified: Option<bool>,
    /// Why it failed verification.
    pub damage: Option<String>,
    /// Where it is.
    pub path: PathBuf,
}

/// The supervisor's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// Answer to [`Request::Status`].
    Status {
        /// One entry per job, in the order they were given.
        jobs: Vec<JobStatus>,
    },
    /// A checkpoint was published.
    Checkpoint {
        /// It.
        checkpoint: CheckpointSummary,
    },
    /// The command was carried out.
    Done {
        /// What happened.
        message: String,
    },
    /// The command was refused or failed.
    Error {
        /// Why.
        message: String,
    },
    /// Answer to [`Request::Images`].
    Images {
        /// Newest first.
        images: Vec<ImageRow>,
    },
}

/// One published checkpoint, as status shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointSummary {
    /// Checkpoint id.
    pub id: String,
    /// When it was taken.
    pub time: DateTime<Utc>,
    /// Wall time of the dump, ms.
    pub duration_ms: u64,
    /// CRIU's frozen time, ms.
    pub frozen_ms: Option<f64>,
    /// Bytes of the checkpoint.
    pub bytes: u64,
}

/// The newest restore, as status shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RestoreSummary {
    /// The image restored.
    pub checkpoint: String,
    /// `lazy` (memory served while the job runs) or `eager`.
    pub mode: String,
    /// From the start of the restore to the job running, ms.
    pub running_ms: f64,
    /// From the start of the restore until all of the job's memory was
    /// resident, ms (a lazy restore: when the background push ended;
    /// `None` while it is still going on, or if it failed).
    pub resident_ms: Option<f64>,
}

/// Where one job stands, as `supervise status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobStatus {
    /// Job name.
    pub name: String,
    /// running, checkpointing, restoring, stopped, failed (+ reason), ...
    #[serde(flatten)]
    pub state: JobState,
    /// Root PID on the host, while the job runs.
    pub pid: Option<i32>,
    /// Root PID in its own namespace.
    pub ns_pid: Option<i32>,
    /// When the current process started or was restored.
    pub since: Option<DateTime<Utc>>,
    /// Seconds since then (filled in when status is asked).
    pub uptime_s: Option<f64>,
    /// Restores so far (automatic and manual).
    pub restores: u32,
    /// Checkpoints published by this supervise.
    pub checkpoints: u32,
    /// The newest checkpoint published by this supervise.
    pub last_checkpoint: Option<CheckpointSummary>,
    /// When the next scheduled checkpoint is due.
    pub next_checkpoint: Option<DateTime<Utc>>,
    /// The newest restore by this supervise.
    #[serde(default)]
    pub last_restore: Option<RestoreSummary>,
    /// The current checkpoint interval in seconds (fixed or chosen by
    /// `every = "auto"`); `None` for cron schedules.
    #[serde(default)]
    pub interval_s: Option<f64>,
    /// For `every = "auto"`: what the interval was computed from.
    #[serde(default)]
    pub auto: Option<AutoStatus>,
    /// Schedule ticks skipped so far (a newer tick came due before the
    /// checkpoint for an older one started, or ticks fell during a restore).
    #[serde(default)]
    pub skipped_ticks: u64,
    /// The last failure (checkpoint or restore), if any.
    pub last_error: Option<String>,
    /// Checkpoints that failed (the job kept running).
    #[serde(default)]
    pub failed_checkpoints: u64,
    /// Restore attempts that failed (each image tried counts once).
    #[serde(default)]
    pub failed_restores: u64,
    /// The newest failed checkpoint or restore: which step failed, and why.
    #[serde(default)]
    pub last_failure: Option<FailureSummary>,
    /// The image directory.
    pub images: PathBuf,
    /// The user the job runs as (a submitted job, or `user =`); `None`:
    /// supervise's own user.
    #[serde(default)]
    pub owner: Option<String>,
    /// How the job ended, once `completed`: its exit code (128 + N for
    /// a signal N).
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// Extra facts (e.g. the Slurm job id), by name.
    #[serde(default)]
    pub extra: BTreeMap<String, String>,
}

/// A failed checkpoint or restore, as status shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailureSummary {
    /// "checkpoint" or "restore".
    pub operation: String,
    /// The step that failed (checkpoint: stage, dump, capture, ingest,
    /// publish, fence; restore: list, materialise, rollback,
    /// criu-restore, verify, lazy, launch).
    pub step: String,
    /// The checkpoint concerned, if any.
    pub checkpoint: Option<String>,
    /// Why.
    pub error: String,
    /// Whether only a resource of supervise's ran short (retried).
    pub resource: bool,
    /// When.
    pub time: DateTime<Utc>,
}

impl JobStatus {
    /// The status of a job that has not started yet.
    pub fn new(name: &str, images: PathBuf) -> JobStatus {
        JobStatus {
            name: name.to_string(),
            state: JobState::Starting,
            pid: None,
            ns_pid: None,
            since: None,
            uptime_s: None,
            restores: 0,
            checkpoints: 0,
            last_checkpoint: None,
            next_checkpoint: None,
            last_restore: None,
            interval_s: None,
            failed_checkpoints: 0,
            failed_restores: 0,
            last_failure: None,
            owner: None,
            exit_code: None,
            auto: None,
            skipped_ticks: 0,
            last_error: None,
            images,
            extra: BTreeMap::new(),
        }
    }
}

/// The inputs of an `every = "auto"` interval ([`crate::interval`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutoStatus {
    /// C: the median frozen time of the recent checkpoints, seconds
    /// (`None` before the first checkpoint).
    pub cost_s: Option<f64>,
    /// M: the estimated mean time between failures, seconds.
    pub mtbf_s: f64,
    /// Failures observed (deaths that led to a restore).
    pub failures: u64,
}

/// Where a job stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "state", content = "reason")]
pub enum JobState {
    /// Starting or resuming.
    Starting,
    /// Running, between checkpoints.
    Running,
    /// A checkpoint is being taken.
    Checkpointing,
    /// The job died; a restore is pending.
    Dead,
    /// A restore is running.
    Restoring,
    /// Stopped by supervise's shutdown.
    Stopped,
    /// Supervision ended because the job exited cleanly.
    Completed,
    /// Given up.
    Failed(String),
    /// Another copy of this job (Slurm) took over the image store.
    Superseded(String),
}

impl JobState {
    /// True once the job's supervision has ended or the job is stopped.
    pub fn is_at_rest(&self) -> bool {
        matches!(
            self,
            JobState::Stopped | JobState::Completed | JobState::Failed(_) | JobState::Superseded(_)
        )
    }

    /// One line for humans: "running", "failed: <reason>".
    pub fn describe(&self) -> String {
        match self {
            JobState::Starting => "starting".into(),
            JobState::Running => "running".into(),
            JobState::Checkpointing => "checkpointing".into(),
            JobState::Dead => "dead".into(),
            JobState::Restoring => "restoring".into(),
            JobState::Stopped => "stopped".into(),
            JobState::Completed => "completed".into(),
            JobState::Failed(r) => format!("failed: {r}"),
            JobState::Superseded(r) => format!("superseded: {r}"),
        }
    }
}
