//! Restoring: the images are tried newest first; each is materialised
//! (every piece verified), the job's files are rolled back, and CRIU
//! restores the tree into a fresh namespace; a bad image falls back to the
//! next older one. Also the death handling that leads there (the restart
//! policy's decision, carried out) and `supervise restore`.

use super::*;
use crate::control::RestoreSummary;
use crate::criu::page_server::PageSource;
use crate::job::JobError;

impl Supervisor {
    /// `supervise restore`: the chosen image is materialised (and so
    /// verified) first, and only then is the running job replaced by it. If CRIU then fails,
    /// the job is recovered as after a death (newest image, or afresh).
    pub(super) async fn manual_restore(
        &mut self,
        image: Option<String>,
        job: &mut Option<Running>,
        ticker: &mut Ticker,
    ) -> Response {
        let err = |m: String| Response::Error { message: m };
        let img = match &image {
            Some(id) => match self.store.get(id) {
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
        let m = match self.materialise_image(&img).await {
            Ok(m) => m,
            Err(e) => return err(format!("{}; the job was left as it is", e.message())),
        };
        if let Some(j) = job.take() {
            info!(checkpoint = %img.id, "replacing the running job by an image on request");
            self.stop_job(j).await;
        }
        self.set_state(JobState::Restoring);
        let resp = match self
            .restore_materialised(&img, m, None)
            .await
            .map_err(Failed::into_message)
        {
            Ok(r) => {
                let m = format!(
                    "job {} restored from {} as pid {}",
                    self.cfg.name, img.id, r.host_pid
                );
                *job = Some(r);
                Response::Done { message: m }
            }
            Err(e) => {
                warn!(checkpoint = %img.id, error = %e, "requested restore failed; recovering the job");
                let recovered = match self.restore_newest().await {
                    Ok(r) => Some(r),
                    // Nothing is wrong with the images: do not start
                    // afresh; the job is down, and `start` tries again.
                    Err(Failed::Resource(why)) => {
                        warn!(error = %why, "cannot recover the job now; `supervise start` tries again");
                        None
                    }
                    Err(_) => match self.cfg.target {
                        Target::Launch(_) => self.launch().await.ok(),
                        Target::Attach { .. } => None,
                    },
                };
                let what = match &recovered {
                    Some(r) => format!("the job runs again as pid {}", r.host_pid),
                    None => "the job could not be recovered and is stopped".into(),
                };
                *job = recovered;
                err(format!("restore of {} failed: {e}; {what}", img.id))
            }
        };
        ticker.reset(Utc::now());
        resp
    }

    /// Tries images newest first: verify, then CRIU restore. An image that
    /// fails for a reason of its own (damage, CRIU refusing it) is skipped
    /// for the next older one; when a resource of supervise's ran short
    /// (descriptors, memory, space) nothing is concluded about any image
    /// and [`Failed::Resource`] says to try again later (never an older
    /// image, never a fresh start: they would cost the job its work).
    /// [`Failed::Other`]: there is no image, or none could be restored.
    pub(super) async fn restore_newest(&mut self) -> Result<Running, Failed> {
        self.set_state(JobState::Restoring);
        let images = match self.try_list_images().await {
            Ok(v) => v,
            Err(e) if e.is_resource() => {
                return Err(Failed::Resource(format!("cannot list the images: {e}")))
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
            match self.restore_image(&img).await {
                Ok(r) => return Ok(r),
                Err(Failed::Resource(e)) => return Err(Failed::Resource(e)),
                // Older images need as much memory.
                Err(Failed::NoRoom(e)) => {
                    return Err(Failed::Resource(format!("cannot restore {}: {e}", img.id)))
                }
                Err(e) => {
                    warn!(checkpoint = %img.id, error = %e.message(), "cannot restore this image; trying the next older one")
                }
            }
        }
        Err(Failed::Other("no image could be restored".into()))
    }

    /// After a resource shortage ([`Failed::Resource`]): logs it and waits
    /// `pause` (doubled for the next time, up to a minute) before the step
    /// is tried again. False when there is no waiting (no shutdown
    /// receiver: a control command answers at once) or supervise is asked
    /// to shut down meanwhile.
    pub(super) async fn resource_wait(
        &mut self,
        what: &str,
        error: &str,
        pause: &mut Duration,
        shutdown: Option<&mut watch::Receiver<super::Shutdown>>,
    ) -> bool {
        let Some(shutdown) = shutdown else {
            return false;
        };
        warn!(
            error = %error,
            retry_ms = pause.as_millis() as u64,
            "cannot {what} now: a resource of supervise's ran short (not the job's or the image's fault); trying again"
        );
        self.publish(|s| s.last_error = Some(format!("{what}: {error} (retrying)")));
        let slept = tokio::select! {
            _ = tokio::time::sleep(*pause) => true,
            _ = shutdown.changed() => false,
        };
        *pause = (*pause * 2).min(RESOURCE_PAUSE_MAX);
        slept
    }

    /// Before an attached job is restored: every process of its tree at the
    /// last checkpoint (known from this run, or recorded in the newest
    /// image) that still lives, by PID *and* start time, is killed, so that
    /// exactly one copy of the job runs. A launched or once-restored job
    /// needs none of this: killing its namespace init kills everything.
    pub(super) async fn kill_survivors(&mut self, newest: Option<&ImageInfo>) {
        if !matches!(self.cfg.target, Target::Attach { .. }) {
            return;
        }
        let mut ids = std::mem::take(&mut self.last_tree);
        if ids.is_empty() {
            if let Some(i) = newest {
                ids = i.manifest.meta.extra.tree.clone();
            }
        }
        if ids.is_empty() {
            return;
        }
        let killed = tokio::task::spawn_blocking(move || {
            ids.into_iter()
                .filter(|id| crate::proc::kill_exact(*id, Duration::from_secs(5)))
                .map(|id| id.pid)
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
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
    /// served from the store while the job runs); if a lazy restore fails
    /// before the job runs, the same image is restored eagerly.
    ///
    /// When the store seals and there is not enough memory to write the
    /// whole image out (it may not go to disk), a lazy restore is tried
    /// even if not wanted, where it works; else the restore fails with
    /// [`Failed::NoRoom`] (tried again later, like any resource shortage).
    pub(super) async fn restore_image(&mut self, img: &ImageInfo) -> Result<Running, Failed> {
        let lazy = self.lazy_wanted(img).await;
        if lazy {
            match self.materialise_lazy(img).await {
                Ok((m, src)) => match self.restore_materialised(img, m, Some(src)).await {
                    Ok(r) => return Ok(r),
                    Err(Failed::Lazy(e)) => warn!(
                        checkpoint = %img.id,
                        error = %e,
                        "lazy restore failed before the job ran; restoring this image eagerly"
                    ),
                    Err(e) => return Err(e),
                },
                Err(e) => {
                    self.restore_failed(img, e.message());
                    return Err(e);
                }
            }
        }
        match self.materialise_image(img).await {
            Ok(m) => self
                .restore_materialised(img, m, None)
                .await
                .map_err(Failed::not_lazy),
            Err(Failed::NoRoom(e)) if !lazy && self.lazy_works(img).await => {
                info!(
                    checkpoint = %img.id,
                    reason = %e,
                    "not enough memory to write the whole image out; restoring it lazily (its pages are served from the store)"
                );
                match self.materialise_lazy(img).await {
                    Ok((m, src)) => match self.restore_materialised(img, m, Some(src)).await {
                        // (Eagerly: no memory for it.)
                        Err(Failed::Lazy(why)) => {
                            let msg = format!("{e}; a lazy restore failed too: {why}");
                            self.restore_failed(img, &msg);
                            Err(Failed::NoRoom(msg))
                        }
                        r => r,
                    },
                    Err(e2) => {
                        self.restore_failed(img, e2.message());
                        Err(e2)
                    }
                }
            }
            Err(e) => {
                self.restore_failed(img, e.message());
                Err(e)
            }
        }
    }

    /// Whether to restore `img` lazily: wanted (`[restore] lazy`), working
    /// here (asked of CRIU once; the answer logged once), and the image
    /// has not failed a lazy restore before.
    async fn lazy_wanted(&mut self, img: &ImageInfo) -> bool {
        if !self.cfg.restore.lazy {
            return false;
        }
        self.lazy_works(img).await
    }

    /// Whether `img` can be restored lazily: CRIU can here (asked once;
    /// the answer logged once) and the image has not failed a lazy
    /// restore before.
    async fn lazy_works(&mut self, img: &ImageInfo) -> bool {
        if self
            .lazy_failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&img.id)
        {
            info!(checkpoint = %img.id, "this image failed a lazy restore before; restoring it eagerly (every piece verified first)");
            return false;
        }
        if self.lazy_ok.is_none() {
            let engine = self.engine.clone();
            let ok = match tokio::task::spawn_blocking(move || engine.lazy_pages()).await {
                Ok(Ok(ok)) => ok,
                Ok(Err(e)) => {
                    warn!(error = %e, "cannot ask CRIU whether lazy restores work; restoring eagerly");
                    false
                }
                Err(_) => false,
            };
            if !ok {
                warn!("CRIU cannot restore lazily here (no userfaultfd with non-cooperative events); restores write the whole image out first");
            }
            self.lazy_ok = Some(ok);
        }
        self.lazy_ok == Some(true)
    }

    /// Writes out what a lazy restore needs (every file but the lazy
    /// pages) and opens the store for serving the rest.
    async fn materialise_lazy(
        &self,
        img: &ImageInfo,
    ) -> Result<(Materialised, Box<dyn PageSource + Send>), Failed> {
        let store = self.store.clone();
        let fallback = self.run_dir.join("restore");
        let need = crate::pages::lazy_bytes(img);
        let sealed = self.store.seals();
        let img2 = img.clone();
        let failures = self.lazy_failures.clone();
        tokio::task::spawn_blocking(move || {
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
        .map_err(|e| Failed::Other(format!("restore task failed: {e}")))
        .and_then(|r| r)
    }

    /// The lazy restore's serving ended: every page resident, or the job
    /// was killed because one could not be served (its death follows).
    pub(super) fn lazy_done(&mut self, (p, o): (PendingLazy, crate::criu::lazy::LazyOutcome)) {
        match &o.result {
            Ok(()) => {
                let resident = o.ended.saturating_duration_since(p.began);
                info!(
                    checkpoint = %p.image,
                    resident_ms = resident.as_millis() as u64,
                    served_bytes = o.bytes,
                    requests = o.stats.requests,
                    store_read_ms = o.stats.source.as_millis() as u64,
                    send_ms = o.stats.send.as_millis() as u64,
                    "all of the job's memory is resident; it no longer depends on supervise"
                );
                self.metrics
                    .restore_resident(&self.cfg.name, "lazy", resident);
                self.publish(|s| {
                    if let Some(r) = s.last_restore.as_mut() {
                        r.resident_ms = Some(resident.as_secs_f64() * 1e3);
                    }
                });
            }
            Err(e) => {
                error!(
                    checkpoint = %p.image,
                    error = %e,
                    "lazy restore could not give the job all its memory; the job was killed before it could run on with missing memory"
                );
                self.publish(|s| {
                    s.last_error = Some(format!("lazy restore from {}: {e}", p.image))
                });
            }
        }
    }

    /// Waits until a lazy restore's serving has ended (before a checkpoint
    /// or before supervise leaves the job).
    pub(super) async fn settle_lazy(&mut self) {
        if self.lazy.is_some() {
            let o = wait_lazy(&mut self.lazy).await;
            self.lazy_done(o);
        }
    }

    /// Writes the image out for CRIU, every piece verified as it is read.
    /// Touches neither the job nor its files. When the store seals, the
    /// image is written only into memory (`/dev/shm` or a private tmpfs);
    /// without the memory for it, this fails with [`Failed::NoRoom`].
    pub(super) async fn materialise_image(&self, img: &ImageInfo) -> Result<Materialised, Failed> {
        let store = self.store.clone();
        let fallback = self.run_dir.join("restore");
        let need = img.size_bytes;
        let sealed = self.store.seals();
        let img2 = img.clone();
        tokio::task::spawn_blocking(move || {
            let work = crate::store::restore_scratch(&fallback, need, sealed).map_err(no_dir)?;
            match store.materialise(&img2, work.path()) {
                Ok(m) => Ok(m.in_scratch(work)),
                Err(e) => Err(materialise_failed(work.path(), e)),
            }
        })
        .await
        .map_err(|e| Failed::Other(format!("restore task failed: {e}")))
        .and_then(|r| r)
    }

    pub(super) fn restore_failed(&self, img: &ImageInfo, e: &str) {
        self.metrics.restore(&self.cfg.name, false, None);
        self.publish(|s| s.last_error = Some(format!("restore from {}: {e}", img.id)));
    }

    /// Rolls the job's files back to the materialised image, then CRIU
    /// restores it; the materialised copy is removed either way.
    pub(super) async fn restore_materialised(
        &mut self,
        img: &ImageInfo,
        m: Materialised,
        lazy: Option<Box<dyn PageSource + Send>>,
    ) -> Result<Running, Failed> {
        let mode = if lazy.is_some() { "lazy" } else { "eager" };
        let engine = self.engine.clone();
        let opts = self.cfg.checkpoint.criu.clone();
        let files = self.files();
        let files_cfg = self.cfg.files.clone();
        let materialise = m.duration;
        let res =
            tokio::task::spawn_blocking(move || -> Result<(job::Restored, Vec<Action>), Failed> {
                // The job's files go back to the checkpoint's instant
                // before CRIU reopens them.
                let r = crate::files::rollback_checked(&m.path, &files_cfg)
                    .map_err(|e| {
                        if e.is_resource() {
                            Failed::Resource(e.to_string())
                        } else {
                            Failed::Other(e.to_string())
                        }
                    })
                    .and_then(|(actions, expect)| {
                        crate::failpoint::point("after-rollback");
                        // CRIU reopens the job's files by path: before the
                        // restored tree runs, each descriptor that held a
                        // rolled-back file must hold that very file.
                        let mut refusal = None;
                        let mut on_notify = |script: &str, init: i32| {
                            if script != "post-restore" || expect.is_empty() {
                                return true;
                            }
                            let map = crate::proc::ns_pid_map(init);
                            match crate::files::verify_restored(&expect, &|p| map.get(&p).copied())
                            {
                                Ok(()) => true,
                                Err(e) => {
                                    refusal = Some(e.to_string());
                                    false
                                }
                            }
                        };
                        let res = engine.restore(&m.path, &opts, &files, &mut on_notify, lazy);
                        match (res, refusal) {
                            (Ok(r), _) => Ok((r, actions)),
                            (Err(_), Some(why)) => Err(Failed::Other(why)),
                            (Err(JobError::Lazy(e)), None) => Err(Failed::Lazy(e)),
                            (Err(e), None) if e.is_resource() => {
                                Err(Failed::Resource(e.to_string()))
                            }
                            (Err(e), None) => Err(Failed::Other(e.to_string())),
                        }
                    });
                // The restored job does not use the image files: free the
                // (tmpfs) space.
                m.remove();
                r
            })
            .await
            .map_err(|e| Failed::Other(format!("restore task failed: {e}")))
            .and_then(|r| r);
        let (mut r, actions) = match res {
            Ok(x) => x,
            Err(Failed::Lazy(e)) => return Err(Failed::Lazy(e)),
            Err(e) => {
                self.restore_failed(img, e.message());
                return Err(e);
            }
        };
        if !actions.is_empty() {
            let changed = actions
                .iter()
                .filter(|a| !matches!(a, Action::Keep(_)))
                .count();
            info!(checkpoint = %img.id, files = actions.len(), changed, "job files rolled back to the checkpoint");
        }
        // job.json first: whoever reads the log line finds the new pid.
        self.remember(&r.running).await;
        let running_after = r.duration + materialise;
        info!(
            checkpoint = %img.id,
            mode,
            duration_ms = running_after.as_millis() as u64,
            materialise_ms = materialise.as_millis() as u64,
            criu_restore_ms = r.criu_restore_us.map(|u| u as f64 / 1000.0).unwrap_or(f64::NAN),
            pid = r.running.host_pid,
            ns_pid = r.running.ns_pid,
            "restored"
        );
        self.metrics
            .restore(&self.cfg.name, true, Some(running_after));
        self.metrics.restore_mode(&self.cfg.name, mode);
        let resident = match r.lazy.take() {
            Some(session) => {
                self.lazy = Some(PendingLazy {
                    image: img.id.clone(),
                    began: Instant::now() - running_after,
                    end: tokio::task::spawn_blocking(move || session.wait()),
                });
                None
            }
            None => {
                self.metrics
                    .restore_resident(&self.cfg.name, mode, running_after);
                Some(running_after.as_secs_f64() * 1e3)
            }
        };
        let summary = RestoreSummary {
            checkpoint: img.id.clone(),
            mode: mode.to_string(),
            running_ms: running_after.as_secs_f64() * 1e3,
            resident_ms: resident,
        };
        self.publish(|s| {
            s.restores += 1;
            s.last_restore = Some(summary);
        });
        Ok(r.running)
    }

    /// The job died: decide, back off, restore (or relaunch), or give up.
    pub(super) async fn on_death(
        &mut self,
        status: ExitStatus,
        since: Instant,
        shutdown: &mut watch::Receiver<super::Shutdown>,
    ) -> Result<Running, Outcome> {
        self.set_state(JobState::Dead);
        let ran = since.elapsed();
        let decision = self
            .history
            .on_death(&self.cfg.restore, status, ran, Instant::now());
        if !matches!(decision, Decision::Complete)
            && !matches!(self.cfg.restore.on, RestoreOn::Never)
        {
            warn!(%status, ran_s = ran.as_secs_f64(), "job died");
        }
        let delay = match decision {
            Decision::Complete => {
                info!(%status, "job exited; supervision ends");
                self.set_state(JobState::Completed);
                return Err(Outcome::Completed(status));
            }
            Decision::GiveUp(reason) => return Err(self.fail(reason)),
            Decision::Restore { delay } => delay,
        };
        self.job_failed();
        if !delay.is_zero() {
            info!(
                delay_ms = delay.as_millis() as u64,
                "backing off before restoring"
            );
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.changed() => {
                    self.set_state(JobState::Stopped);
                    return Err(Outcome::Stopped);
                }
            }
        }
        let mut pause = RESOURCE_PAUSE_MIN;
        loop {
            match self.restore_newest().await {
                Ok(r) => return Ok(r),
                Err(Failed::Resource(e)) => {
                    if !self
                        .resource_wait("restore the job", &e, &mut pause, Some(shutdown))
                        .await
                    {
                        self.set_state(JobState::Stopped);
                        return Err(Outcome::Stopped);
                    }
                }
                Err(_) => break,
            }
        }
        match self.cfg.target {
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

/// First pause after a resource shortage.
pub(super) const RESOURCE_PAUSE_MIN: Duration = Duration::from_secs(1);
/// Longest pause between tries after resource shortages.
const RESOURCE_PAUSE_MAX: Duration = Duration::from_secs(60);

/// A failed materialise of an image into `work`: damage is the image's,
/// a resource shortage nobody's, anything else the destination's.
fn materialise_failed(work: &Path, e: crate::store::StoreError) -> Failed {
    match e {
        crate::store::StoreError::Corrupt { .. } => {
            Failed::Other(format!("image failed verification: {e}"))
        }
        e if e.is_resource() => {
            Failed::Resource(format!("cannot prepare {} for CRIU: {e}", work.display()))
        }
        e => Failed::Other(format!("cannot prepare {} for CRIU: {e}", work.display())),
    }
}

/// How a restore (or a launch) failed.
#[derive(Debug)]
pub(super) enum Failed {
    /// The lazy restore failed before the job ran (an eager one may work).
    Lazy(String),
    /// A resource of supervise's ran short (descriptors, memory, space):
    /// nothing is known to be wrong with the image; try it again later.
    Resource(String),
    /// Not enough memory to write the image out without it touching the
    /// disk (the store seals): a lazy restore may fit; else a resource
    /// shortage.
    NoRoom(String),
    /// Anything else.
    Other(String),
}

impl Failed {
    /// The message.
    pub(super) fn message(&self) -> &str {
        match self {
            Failed::Lazy(e) | Failed::Resource(e) | Failed::NoRoom(e) | Failed::Other(e) => e,
        }
    }

    pub(super) fn into_message(self) -> String {
        match self {
            Failed::Lazy(e) | Failed::Resource(e) | Failed::NoRoom(e) | Failed::Other(e) => e,
        }
    }

    /// An eager restore's failure (a lazy one is just another failure).
    fn not_lazy(self) -> Failed {
        match self {
            Failed::Lazy(e) => Failed::Other(e),
            e => e,
        }
    }

    /// `msg`, from the OS error `e`.
    fn io(msg: String, e: &std::io::Error) -> Failed {
        if crate::fdlimit::is_resource_error(e) {
            Failed::Resource(msg)
        } else {
            Failed::Other(msg)
        }
    }
}

/// No scratch directory for a restore: too little memory (the store
/// seals), a resource shortage, or the destination's fault.
fn no_dir(e: crate::store::ScratchError) -> Failed {
    if e.is_no_room() {
        return Failed::NoRoom(e.to_string());
    }
    let msg = format!("cannot create a directory to restore into: {e}");
    match &e {
        crate::store::ScratchError::Io { source, .. } => Failed::io(msg, source),
        _ => Failed::Other(msg),
    }
}
