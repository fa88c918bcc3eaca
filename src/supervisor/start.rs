//! Starting the job: re-adopt the job an earlier supervise left running,
//! attach to the process named in the job file, resume from the newest
//! image, or launch the command afresh. Steps that fail only because a
//! resource of supervise's ran short are tried again while supervise
//! runs (never an older image, never a fresh start instead).

use tokio::sync::watch;
use tracing::{info, warn};

use super::engine::{blocking, Engine};
use super::errors::{RestoreError, RestoreStep};
use super::record::{self, AttachRecord};
use super::restore::RESOURCE_PAUSE_MIN;
use super::{Shutdown, Supervisor};
use crate::config::Target;
use crate::control::JobState;
use crate::job::Running;
use crate::store::ImageInfo;

impl<E: Engine> Supervisor<E> {
    /// First start: re-adopt, attach, resume from the newest image if
    /// there is one, else launch. With `shutdown`, a step that fails for
    /// want of a resource of supervise's is tried again until it works or
    /// supervise shuts down; without (a control command), that failure is
    /// the answer.
    pub(super) async fn start(
        &mut self,
        mut shutdown: Option<&mut watch::Receiver<Shutdown>>,
    ) -> Result<Running, String> {
        self.report.set_state(JobState::Starting);
        if let Some(rec) = self.adopt.take() {
            let (pid, ns_pid) = (rec.host_pid, rec.ns_pid);
            let r = self
                .ctx
                .engine
                .adopt(rec, self.ctx.init_files())
                .await
                .map_err(|e| e.to_string())?;
            info!(
                pid,
                ns_pid,
                "re-adopted the job an earlier supervise left running (same pid and start time)"
            );
            self.started(&r).await;
            return Ok(r);
        }
        match self.ctx.cfg.target.clone() {
            Target::Attach { pid } => {
                let recorded = record::read_attached(&self.ctx.run_dir, pid);
                match self
                    .ctx
                    .engine
                    .attach(pid, recorded.map(|r| r.start_time))
                    .await
                {
                    Ok(r) => {
                        info!(pid, start_time = r.start_time, "attached");
                        record::write_attached(
                            &self.ctx.run_dir,
                            AttachRecord {
                                pid,
                                start_time: r.start_time,
                            },
                        );
                        self.started(&r).await;
                        return Ok(r);
                    }
                    Err(e) => warn!(
                        pid,
                        error = %e,
                        "not attaching; resuming from the newest image"
                    ),
                }
                self.restore_newest_retrying(shutdown)
                    .await
                    .map_err(|e| format!("process {pid} does not exist and {}", e.message))
            }
            Target::Launch(_) => {
                if self.any_images(shutdown.as_deref_mut()).await? {
                    info!("images found; resuming from the newest instead of starting afresh");
                    match self.restore_newest_retrying(shutdown.as_deref_mut()).await {
                        Ok(r) => return Ok(r),
                        Err(e) if e.is_resource() => return Err(e.message),
                        Err(_) => warn!("no image could be restored; starting the command afresh"),
                    }
                }
                self.launch_retrying(shutdown).await
            }
        }
    }

    /// The job runs as `r`: recorded in `job.json` and reported.
    async fn started(&mut self, r: &Running) {
        record::remember(&self.ctx.run_dir, r).await;
        self.report.running(r);
    }

    /// Whether the store holds any image, listing again after each
    /// resource shortage while `shutdown` allows.
    async fn any_images(
        &mut self,
        mut shutdown: Option<&mut watch::Receiver<Shutdown>>,
    ) -> Result<bool, String> {
        let mut pause = RESOURCE_PAUSE_MIN;
        loop {
            let store = self.ctx.store.clone();
            match blocking(move || store.list()).await {
                Ok(Ok(v)) => return Ok(!v.is_empty()),
                Ok(Err(e)) if e.is_resource() => {
                    let e = format!("cannot list the images: {e}");
                    if !self
                        .resource_wait("start the job", &e, &mut pause, shutdown.as_deref_mut())
                        .await
                    {
                        return Err(e);
                    }
                }
                Ok(Err(e)) => {
                    warn!(error = %e, "cannot list images");
                    return Ok(false);
                }
                Err(e) => {
                    warn!(error = %e, "cannot list images");
                    return Ok(false);
                }
            }
        }
    }

    /// [`Restorer::newest`](super::restore::Restorer::newest), tried
    /// again after each resource shortage while `shutdown` allows.
    pub(super) async fn restore_newest_retrying(
        &mut self,
        mut shutdown: Option<&mut watch::Receiver<Shutdown>>,
    ) -> Result<Running, RestoreError> {
        let mut pause = RESOURCE_PAUSE_MIN;
        loop {
            match self.restorer().newest().await {
                Ok(r) => return Ok(r),
                Err(e) if e.is_resource() => {
                    if !self
                        .resource_wait(
                            "restore the job",
                            &e.to_string(),
                            &mut pause,
                            shutdown.as_deref_mut(),
                        )
                        .await
                    {
                        return Err(RestoreError {
                            message: format!("a resource of supervise's ran short: {}", e.message),
                            ..e
                        });
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Launches the job's command, tried again after each resource
    /// shortage while `shutdown` allows.
    pub(super) async fn launch_retrying(
        &mut self,
        mut shutdown: Option<&mut watch::Receiver<Shutdown>>,
    ) -> Result<Running, String> {
        let mut pause = RESOURCE_PAUSE_MIN;
        loop {
            match self.launch_once().await {
                Ok(r) => return Ok(r),
                Err(e) if e.is_resource() => {
                    if !self
                        .resource_wait(
                            "start the command",
                            &e.message,
                            &mut pause,
                            shutdown.as_deref_mut(),
                        )
                        .await
                    {
                        return Err(e.message);
                    }
                }
                Err(e) => return Err(e.message),
            }
        }
    }

    /// Launches the job's command once.
    pub(super) async fn launch(&mut self) -> Result<Running, String> {
        self.launch_once().await.map_err(|e| e.message)
    }

    async fn launch_once(&mut self) -> Result<Running, RestoreError> {
        let Target::Launch(spec) = self.ctx.cfg.target.clone() else {
            return Err(RestoreError::image(
                RestoreStep::Launch,
                "attached jobs cannot be launched",
            ));
        };
        let mut init = self.ctx.init_files();
        if let Some(t) = &self.ctx.tracker {
            // A previous run's last events (a fresh start after a death).
            let t = t.clone();
            init.watch = blocking(move || {
                t.end_run(std::time::Duration::from_secs(5));
                t.begin_run()
            })
            .await
            .ok()
            .flatten();
        }
        let r = self.ctx.engine.launch(spec, init).await.map_err(|e| {
            let msg = format!("cannot start the command: {e}");
            if e.is_resource() {
                RestoreError::resource(RestoreStep::Launch, msg)
            } else {
                RestoreError::image(RestoreStep::Launch, msg)
            }
        })?;
        self.started(&r).await;
        info!(pid = r.host_pid, ns_pid = r.ns_pid, "started");
        Ok(r)
    }

    /// The published images, newest first; empty when they cannot be
    /// listed (logged).
    pub(super) async fn list_images(&self) -> Vec<ImageInfo> {
        let store = self.ctx.store.clone();
        match blocking(move || store.list()).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                warn!(error = %e, "cannot list images");
                Vec::new()
            }
            Err(e) => {
                warn!(error = %e, "cannot list images");
                Vec::new()
            }
        }
    }
}
