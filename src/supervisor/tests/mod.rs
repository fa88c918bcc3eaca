//! The supervisor loop and its restart policy, driven through the
//! engine's test double (`fake.rs`): no root, no CRIU, no real process.
//! The image store and the Slurm fence are real (a temp dir); "dumps" are
//! small files, "processes" are channels the test ends at will.
//!
//! Modules: `lifecycle` (crash loops, manual restores, shutdown, detach),
//! `starts` (attach, adopt), `steps` (checkpoint and restore steps that
//! fail, with rollback on, lazy restores), `fence` (two Slurm copies).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{oneshot, watch};

use super::*;
use crate::control::{job_channel, JobHandle, JobStatus, Response};
use crate::reaper::ExitStatus;

mod fake;
mod fence;
mod lifecycle;
mod starts;
mod steps;

use fake::{Call, Fake};

struct Harness {
    dir: tempfile::TempDir,
    fake: Arc<Fake>,
    handle: JobHandle,
    shutdown: watch::Sender<Shutdown>,
    task: tokio::task::JoinHandle<Outcome>,
}

/// A job file for `/bin/true` checkpointed hourly (so only the tests'
/// requests checkpoint), with `restore` in its `[restore]` table and
/// `extra` appended (whole tables), rollback off unless `extra` says.
fn job_text(restore: &str, extra: &str) -> String {
    let files = if extra.contains("[files]") {
        ""
    } else {
        "[files]\nrollback = false\n"
    };
    format!(
        "command = [\"/bin/true\"]\n[checkpoint]\nevery = \"1h\"\n{files}[restore]\n{restore}\n{extra}"
    )
}

async fn start(restore: &str) -> Harness {
    start_with(restore, Fake::default()).await
}

async fn start_with(restore: &str, fake: Fake) -> Harness {
    start_full(&job_text(restore, ""), fake, None, None).await
}

/// Starts a supervisor for `text` in `dir` (a fresh temp dir if none),
/// inside Slurm as `slurm` if given.
async fn start_full(
    text: &str,
    fake: Fake,
    dir: Option<tempfile::TempDir>,
    slurm: Option<crate::slurm::SlurmContext>,
) -> Harness {
    let dir = dir.unwrap_or_else(|| tempfile::tempdir().unwrap());
    let h = spawn(text, Arc::new(fake), dir, slurm);
    h.wait(|s| s.state == JobState::Running).await;
    h
}

/// Creates and runs the supervisor without waiting for it.
fn spawn(
    text: &str,
    fake: Arc<Fake>,
    dir: tempfile::TempDir,
    slurm: Option<crate::slurm::SlurmContext>,
) -> Harness {
    let cfg = JobConfig::from_str_at(text, &dir.path().join("job.toml")).unwrap();
    let (handle, port) = job_channel(&cfg.name, cfg.checkpoint.dir.clone());
    let mut sup = Supervisor::new(cfg, slurm, fake.clone()).unwrap();
    sup.connect(port, Metrics::new());
    let (shutdown, rx) = watch::channel(Shutdown::No);
    let task = tokio::spawn(sup.run(rx));
    Harness {
        dir,
        fake,
        handle,
        shutdown,
        task,
    }
}

impl Harness {
    async fn wait(&self, f: impl Fn(&JobStatus) -> bool) -> JobStatus {
        let mut rx = self.handle.status.clone();
        let r = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|s| f(s)))
            .await
            .map(|s| s.map(|s| s.clone()));
        match r {
            Ok(s) => s.expect("supervisor alive"),
            Err(_) => panic!("status not reached in time: {:?}", self.status()),
        }
    }

    fn status(&self) -> JobStatus {
        self.handle.status.borrow().clone()
    }

    async fn ask(&self, make: impl FnOnce(oneshot::Sender<Response>) -> Command) -> Response {
        let (tx, rx) = oneshot::channel();
        self.handle.commands.send(make(tx)).await.unwrap();
        rx.await.unwrap()
    }

    async fn checkpoint(&self) {
        let r = self.ask(Command::Checkpoint).await;
        assert!(matches!(r, Response::Checkpoint { .. }), "{r:?}");
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Stops supervise (final checkpoint as configured) and its job.
    async fn stop(self) -> Outcome {
        self.shutdown.send(Shutdown::Configured).unwrap();
        self.task.await.unwrap()
    }
}
