//! Restoring: the images are tried newest first; each is materialised
//! (every piece verified), and the engine rolls the job's files back and
//! lets CRIU restore the tree into a fresh namespace; an image that fails
//! for a reason of its own falls back to the next older one. Also the
//! death handling that leads there (the restart policy's decision,
//! carried out) and `supervise restore`.
//!
//! [`Restorer`] holds exactly the parts a restore touches: the context,
//! the report, the tree (a lazy restore's serving goes there) and the
//! images that failed a lazy restore.

use std::path::Path;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{info, warn};

use super::engine::{blocking, Engine, RestoreRequest};
use super::errors::{Cause, RestoreError, RestoreStep};
use super::report::Report;
use super::tree::Tree;
use super::{record, Ctx, Decision, Outcome, Shutdown, Supervisor};
use crate::config::{RestoreOn, Target};
use crate::control::{JobState, Response, RestoreSummary};
use crate::criu::page_server::PageSource;
use crate::files::Action;
use crate::job::Running;
use crate::pages::LazyFailures;
use crate::reaper::ExitStatus;
use crate::store::{ImageInfo, Materialised};

/// First pause after a resource shortage.
pub(super) const RESOURCE_PAUSE_MIN: Duration = Duration::from_secs(1);
/// Longest pause between tries after resource shortages.
const RESOURCE_PAUSE_MAX: Duration = Duration::from_secs(60);

/// The parts a restore touches.
pub(super) struct Restorer<'a, E> {
    pub(super) ctx: &'a Ctx<E>,
    pub(super) report: &'a mut Report,
    pub(super) tree: &'a mut Tree,
    pub(super) lazy_failures: &'a LazyFailures,
}

impl<E: Engine> Restorer<'_, E> {
    /// Tries images newest first: verify, then CRIU restore. An image that
    /// fails for a reason of its own (damage, CRIU refusing it) is skipped
    /// for the next older one; when a resource of supervise's ran short
    /// (descriptors, memory, space) nothing is concluded about any image
    /// and a [`Cause::Resource`] error says to try again later (never an
    /// older image, never a fresh start: they would cost the job its
    /// work). [`Cause::Image`]: there is no image, or none could be
    /// restored.
    pub(super) async fn newest(&mut self) -> Result<Running, RestoreError> {
        self.report.set_state(JobState::Restoring);
        let store = self.ctx.store.clone();
        let images = match blocking(move || store.list()).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) if e.is_resource() => {
                let e = RestoreError::resource(
                    RestoreStep::List,
                    format!("cannot list the images: {e}"),
                );
                self.report.restore_failed(None, &e);
                return Err(e);
            }
            Ok(Err(e)) => {
                warn!(error = %e, "cannot list images");
                Vec::new()
            }
            Err(e) => {
                warn!(error = %e, "cannot list images");
                Vec::new()
            }
        };
        self.kill_survivors(images.first()).await;
        if images.is_empty() {
            info!("no images to restore from");
        }
        for img in images {
            match self.image(&img).await {
                Ok(r) => return Ok(r),
                // Older images need as much memory.
                Err(e) if e.is_resource() => {
                    return Err(RestoreError::resource(
                        e.step,
                        format!("cannot restore {}: {}", img.id, e.message),
                    ))
                }
                Err(e) => {
                    warn!(checkpoint = %img.id, step = e.step.name(), error = %e.message, "cannot restore this image; trying the next older one")
                }
            }
        }
        Err(RestoreError::image(
            RestoreStep::List,
            "no image could be restored",
        ))
    }

    /// Before an attached job is restored: every process of its tree at the
    /// last checkpoint (known from this run, or recorded in the newest
    /// image) that still lives, by PID *and* start time, is killed, so that
    /// exactly one copy of the job runs. A launched or once-restored job
    /// needs none of this: killing its namespace init kills everything.
    async fn kill_survivors(&mut self, newest: Option<&ImageInfo>) {
        if !matches!(self.ctx.cfg.target, Target::Attach { .. }) {
            return;
        }
        let mut ids = self.tree.take_tree();
        if ids.is_empty() {
            if let Some(i) = newest {
                ids = i.manifest.meta.extra.tree.clone();
            }
        }
        if ids.is_empty() {
            return;
        }
        let killed = self.ctx.engine.kill_survivors(ids).await;
        if !killed.is_empty() {
            warn!(
                pids = ?killed,
                "processes of the attached job outlived its root; killed them so that only the restored copy runs"
            );
        }
    }

    /// Restores one image: materialise it, then roll files back and let
    /// CRIU restore it. Lazily where that works (only the non-page files
    /// and the pages CRIU restores eagerly are written out; the rest is
    /// served from the store while the job runs); if the lazy part of a
    /// lazy restore fails before the job runs, the same image is restored
    /// eagerly.
    ///
    /// When the store seals and there is not enough memory to write the
    /// whole image out (it may not go to disk), a lazy restore is tried
    /// even if not wanted, where it works; else the restore fails with
    /// [`Cause::NoRoom`] (tried again later, like any resource shortage).
    pub(super) async fn image(&mut self, img: &ImageInfo) -> Result<Running, RestoreError> {
        let lazy = self.ctx.cfg.restore.lazy && self.lazy_works(img).await;
        if lazy {
            match self.lazily(img).await {
                Err(e) if e.is_lazy() => warn!(
                    checkpoint = %img.id,
                    error = %e.message,
                    "lazy restore failed before the job ran; restoring this image eagerly"
                ),
                r => return r,
            }
        }
        let m = match self.materialise_eager(img).await {
            Ok(m) => m,
            Err(e) if e.cause == Cause::NoRoom && !lazy && self.lazy_works(img).await => {
                info!(
                    checkpoint = %img.id,
                    reason = %e.message,
                    "not enough memory to write the whole image out; restoring it lazily (its pages are served from the store)"
                );
                return self.lazily(img).await.map_err(|why| match why.is_lazy() {
                    // (Eagerly: no memory for it.)
                    true => RestoreError {
                        cause: Cause::NoRoom,
                        ..RestoreError::image(
                            RestoreStep::Lazy,
                            format!("{}; a lazy restore failed too: {}", e.message, why.message),
                        )
                    },
                    false => why,
                });
            }
            Err(e) => {
                self.report.restore_failed(Some(&img.id), &e);
                return Err(e);
            }
        };
        self.restore_materialised(img, m, None).await
    }

    /// A lazy restore of `img`.
    async fn lazily(&mut self, img: &ImageInfo) -> Result<Running, RestoreError> {
        match self.materialise_lazy(img).await {
            Ok((m, src)) => self.restore_materialised(img, m, Some(src)).await,
            Err(e) => {
                self.report.restore_failed(Some(&img.id), &e);
                Err(e)
            }
        }
    }

    /// Whether `img` can be restored lazily: CRIU can here (asked once)
    /// and the image has not failed a lazy restore before.
    async fn lazy_works(&mut self, img: &ImageInfo) -> bool {
        if self.ctx.cfg.owner.is_some() {
            // The lazy-pages daemon runs as root outside the job's user
            // namespace; not (yet) for owned jobs.
            return false;
        }
        if self
            .lazy_failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&img.id)
        {
            info!(checkpoint = %img.id, "this image failed a lazy restore before; restoring it eagerly (every piece verified first)");
            return false;
        }
        self.ctx.engine.lazy_pages().await
    }

    /// Writes out what a lazy restore needs (every file but the lazy
    /// pages) and opens the store for serving the rest.
    async fn materialise_lazy(
        &self,
        img: &ImageInfo,
    ) -> Result<(Materialised, Box<dyn PageSource + Send>), RestoreError> {
        let store = self.ctx.store.clone();
        let fallback = self.ctx.run_dir.join("restore");
        let need = crate::pages::lazy_bytes(img);
        let sealed = self.ctx.store.seals();
        let img2 = img.clone();
        let failures = self.lazy_failures.clone();
        blocking(move || {
            let work = crate::store::restore_scratch(&fallback, need, sealed).map_err(no_dir)?;
            let m = store
                .materialise_select(&img2, work.path(), &mut crate::pages::lazy_select())
                .map_err(|e| materialise_failed(work.path(), e))?
                .in_scratch(work);
            match crate::pages::StoreSource::open(&store, &img2, &m.path, failures) {
                Ok(src) => Ok((m, Box::new(src) as Box<dyn PageSource + Send>)),
                Err(e) => {
                    let f = materialise_failed(&m.path, e);
                    m.remove();
                    Err(f)
                }
            }
        })
        .await
        .unwrap_or_else(|e| Err(RestoreError::image(RestoreStep::Materialise, e)))
    }

    /// Writes the image out for CRIU, every piece verified as it is read.
    /// Touches neither the job nor its files. When the store seals, the
    /// image is written only into memory (`/dev/shm` or a private tmpfs);
    /// without the memory for it, this fails with [`Cause::NoRoom`].
    pub(super) async fn materialise_eager(
        &self,
        img: &ImageInfo,
    ) -> Result<Materialised, RestoreError> {
        let store = self.ctx.store.clone();
        let fallback = self.ctx.run_dir.join("restore");
        let need = img.size_bytes;
        let sealed = self.ctx.store.seals();
        let img2 = img.clone();
        blocking(move || {
            let work = crate::store::restore_scratch(&fallback, need, sealed).map_err(no_dir)?;
            match store.materialise(&img2, work.path()) {
                Ok(m) => Ok(m.in_scratch(work)),
                Err(e) => Err(materialise_failed(work.path(), e)),
            }
        })
        .await
        .unwrap_or_else(|e| Err(RestoreError::image(RestoreStep::Materialise, e)))
    }

    /// The engine rolls the job's files back to the materialised image,
    /// then CRIU restores it; the materialised copy is removed either way.
    pub(super) async fn restore_materialised(
        &mut self,
        img: &ImageInfo,
        m: Materialised,
        lazy: Option<Box<dyn PageSource + Send>>,
    ) -> Result<Running, RestoreError> {
        let mode = if lazy.is_some() { "lazy" } else { "eager" };
        let materialise = m.duration;
        let req = RestoreRequest {
            images: m.path.clone(),
            opts: self.ctx.cfg.checkpoint.criu.clone(),
            init: self.ctx.init_files(),
            files: self.ctx.files_config(),
            lazy,
            tracker: self.ctx.tracker.clone(),
        };
        let res = self.ctx.engine.restore(req).await;
        // The restored job does not use the image files: free the (tmpfs)
        // space.
        let _ = blocking(move || m.remove()).await;
        let mut r = match res {
            Ok(r) => r,
            Err(e) => {
                self.report.restore_failed(Some(&img.id), &e);
                return Err(e);
            }
        };
        log_rollback(&img.id, &r.actions);
        // job.json first: whoever reads the log line finds the new pid.
        record::remember(&self.ctx.run_dir, &r.restored.running).await;
        self.report.running(&r.restored.running);
        let running_after = r.restored.duration + materialise;
        info!(
            checkpoint = %img.id,
            mode,
            duration_ms = running_after.as_millis() as u64,
            materialise_ms = materialise.as_millis() as u64,
            criu_restore_ms = r.restored.criu_restore_us.map(|u| u as f64 / 1000.0).unwrap_or(f64::NAN),
            pid = r.restored.running.host_pid,
            ns_pid = r.restored.running.ns_pid,
            "restored"
        );
        let resident = match r.restored.lazy.take() {
            Some(session) => {
                self.tree.serve_lazily(&img.id, running_after, session);
                None
            }
            None => Some(running_after.as_secs_f64() * 1e3),
        };
        self.report.restore_ok(
            RestoreSummary {
                checkpoint: img.id.clone(),
                mode: mode.to_string(),
                running_ms: running_after.as_secs_f64() * 1e3,
                resident_ms: resident,
            },
            running_after,
        );
        Ok(r.restored.running)
    }
}

fn log_rollback(id: &str, actions: &[Action]) {
    if actions.is_empty() {
        return;
    }
    let changed = actions
        .iter()
        .filter(|a| !matches!(a, Action::Keep(_)))
        .count();
    info!(checkpoint = %id, files = actions.len(), changed, "job files rolled back to the checkpoint");
    let removed: Vec<String> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Remove(p) => Some(p.display().to_string()),
            _ => None,
        })
        .collect();
    if !removed.is_empty() {
        let shown = removed.len().min(20);
        info!(checkpoint = %id, count = removed.len(), files = ?&removed[..shown], "removed files absent at the checkpoint");
    }
}

impl<E: Engine> Supervisor<E> {
    /// The parts a restore touches.
    pub(super) fn restorer(&mut self) -> Restorer<'_, E> {
        Restorer {
            ctx: &self.ctx,
            report: &mut self.report,
            tree: &mut self.tree,
            lazy_failures: &self.recovery.lazy_failures,
        }
    }

    /// After a resource shortage: logs it and waits `pause` (doubled for
    /// the next time, up to a minute) before the step is tried again.
    /// False when there is no waiting (no shutdown receiver: a control
    /// command answers at once) or supervise is asked to shut down
    /// meanwhile.
    pub(super) async fn resource_wait(
        &mut self,
        what: &str,
        error: &str,
        pause: &mut Duration,
        shutdown: Option<&mut watch::Receiver<Shutdown>>,
    ) -> bool {
        let Some(shutdown) = shutdown else {
            return false;
        };
        warn!(
            error = %error,
            retry_ms = pause.as_millis() as u64,
            "cannot {what} now: a resource of supervise's ran short (not the job's or the image's fault); trying again"
        );
        self.report.error(format!("{what}: {error} (retrying)"));
        let slept = tokio::select! {
            _ = tokio::time::sleep(*pause) => true,
            _ = shutdown.changed() => false,
        };
        *pause = (*pause * 2).min(RESOURCE_PAUSE_MAX);
        slept
    }

    /// `supervise restore`: the chosen image is materialised (and so
    /// verified) first, and only then is the running job replaced by it.
    /// If CRIU then fails, the job is recovered as after a death (newest
    /// image, or afresh).
    pub(super) async fn manual_restore(&mut self, image: Option<String>) -> Response {
        let err = |m: String| Response::Error { message: m };
        let img = match &image {
            Some(id) => match self.ctx.store.get(id) {
                Ok(i) => i,
                Err(e) => return err(format!("{e}; the job was left as it is")),
            },
            None => match self.list_images().await.into_iter().next() {
                Some(i) => i,
                None => return err("there are no images to restore from".into()),
            },
        };
        // Written out and verified before the running job is touched: a
        // damaged image is refused with the job left as it is.
        let m = match self.restorer().materialise_eager(&img).await {
            Ok(m) => m,
            Err(e) => return err(format!("{}; the job was left as it is", e.message)),
        };
        if self.tree.runs() {
            info!(checkpoint = %img.id, "replacing the running job by an image on request");
            self.stop_job().await;
        }
        self.report.set_state(JobState::Restoring);
        match self.restorer().restore_materialised(&img, m, None).await {
            Ok(r) => {
                let m = format!(
                    "job {} restored from {} as pid {}",
                    self.name(),
                    img.id,
                    r.host_pid
                );
                self.tree.job = Some(r);
                Response::Done { message: m }
            }
            Err(e) => {
                warn!(checkpoint = %img.id, error = %e, "requested restore failed; recovering the job");
                let recovered = match self.restorer().newest().await {
                    Ok(r) => Some(r),
                    // Nothing is wrong with the images: do not start
                    // afresh; the job is down, and `start` tries again.
                    Err(why) if why.is_resource() => {
                        warn!(error = %why, "cannot recover the job now; `supervise start` tries again");
                        None
                    }
                    Err(_) => match self.ctx.cfg.target {
                        Target::Launch(_) => self.launch().await.ok(),
                        Target::Attach { .. } => None,
                    },
                };
                let what = match &recovered {
                    Some(r) => format!("the job runs again as pid {}", r.host_pid),
                    None => "the job could not be recovered and is stopped".into(),
                };
                self.tree.job = recovered;
                err(format!("restore of {} failed: {e}; {what}", img.id))
            }
        }
    }

    /// The job died: decide, back off, restore (or relaunch), or give up.
    pub(super) async fn on_death(
        &mut self,
        status: ExitStatus,
        since: Instant,
        shutdown: &mut watch::Receiver<Shutdown>,
    ) -> Result<Running, Outcome> {
        self.report.set_state(JobState::Dead);
        let ran = since.elapsed();
        let decision =
            self.recovery
                .history
                .on_death(&self.ctx.cfg.restore, status, ran, Instant::now());
        if !matches!(decision, Decision::Complete)
            && !matches!(self.ctx.cfg.restore.on, RestoreOn::Never)
        {
            warn!(%status, ran_s = ran.as_secs_f64(), "job died");
        }
        let delay = match decision {
            Decision::Complete => {
                info!(%status, "job exited; supervision ends");
                let code = match status {
                    ExitStatus::Code(c) => c,
                    ExitStatus::Signal(s) => 128 + s,
                    ExitStatus::Unknown => 255,
                };
                self.report.publish(|s| s.exit_code = Some(code));
                self.report.set_state(JobState::Completed);
                return Err(Outcome::Completed(status));
            }
            Decision::GiveUp(reason) => return Err(self.fail(reason)),
            Decision::Restore { delay } => delay,
        };
        self.cadence.job_failed();
        if !delay.is_zero() {
            info!(
                delay_ms = delay.as_millis() as u64,
                "backing off before restoring"
            );
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.changed() => {
                    self.report.set_state(JobState::Stopped);
                    return Err(Outcome::Stopped);
                }
            }
        }
        match self.restore_newest_retrying(Some(shutdown)).await {
            Ok(r) => return Ok(r),
            Err(e) if e.is_resource() => {
                self.report.set_state(JobState::Stopped);
                return Err(Outcome::Stopped);
            }
            Err(_) => {}
        }
        match self.ctx.cfg.target {
            Target::Launch(_) => {
                warn!("no image could be restored; starting the command afresh");
                match self.launch_retrying(Some(shutdown)).await {
                    Ok(r) => Ok(r),
                    Err(e) => Err(self.fail(e)),
                }
            }
            Target::Attach { .. } => Err(self.fail("no image could be restored".into())),
        }
    }
}

/// A failed materialise of an image into `work`: damage is the image's,
/// a resource shortage nobody's, anything else the destination's.
fn materialise_failed(work: &Path, e: crate::store::StoreError) -> RestoreError {
    let step = RestoreStep::Materialise;
    match e {
        crate::store::StoreError::Corrupt { .. } => {
            RestoreError::image(step, format!("image failed verification: {e}"))
        }
        e if e.is_resource() => RestoreError::resource(
            step,
            format!("cannot prepare {} for CRIU: {e}", work.display()),
        ),
        e => RestoreError::image(
            step,
            format!("cannot prepare {} for CRIU: {e}", work.display()),
        ),
    }
}

/// No scratch directory for a restore: too little memory (the store
/// seals), a resource shortage, or the destination's fault.
fn no_dir(e: crate::store::ScratchError) -> RestoreError {
    let step = RestoreStep::Materialise;
    if e.is_no_room() {
        return RestoreError {
            cause: Cause::NoRoom,
            ..RestoreError::image(step, e.to_string())
        };
    }
    let msg = format!("cannot create a directory to restore into: {e}");
    match &e {
        crate::store::ScratchError::Io { source, .. } => RestoreError::io(step, msg, source),
        _ => RestoreError::image(step, msg),
    }
}
