//! Restoring: the images are tried newest first; each is materialised
//! (every piece verified), the job's files are rolled back, and CRIU
//! restores the tree into a fresh namespace; a bad image falls back to the
//! next older one. Also the death handling that leads there (the restart
//! policy's decision, carried out) and `supervise restore`.

use super::*;

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
            Err(e) => return err(format!("{e}; the job was left as it is")),
        };
        if let Some(j) = job.take() {
            info!(checkpoint = %img.id, "replacing the running job by an image on request");
            self.stop_job(j).await;
        }
        self.set_state(JobState::Restoring);
        let resp = match self.restore_materialised(&img, m).await {
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
                    Some(r) => Some(r),
                    None => match self.cfg.target {
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

    /// Tries images newest first: verify, then CRIU restore.
    pub(super) async fn restore_newest(&mut self) -> Option<Running> {
        self.set_state(JobState::Restoring);
        let images = self.list_images().await;
        self.kill_survivors(images.first()).await;
        if images.is_empty() {
            info!("no images to restore from");
        }
        for img in images {
            match self.restore_image(&img).await {
                Ok(r) => return Some(r),
                Err(e) => {
                    warn!(checkpoint = %img.id, error = %e, "cannot restore this image; trying the next older one")
                }
            }
        }
        None
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
    /// CRIU restore it.
    pub(super) async fn restore_image(&mut self, img: &ImageInfo) -> Result<Running, String> {
        match self.materialise_image(img).await {
            Ok(m) => self.restore_materialised(img, m).await,
            Err(e) => {
                self.restore_failed(img, &e);
                Err(e)
            }
        }
    }

    /// Writes the image out for CRIU, every piece verified as it is read.
    /// Touches neither the job nor its files.
    pub(super) async fn materialise_image(&self, img: &ImageInfo) -> Result<Materialised, String> {
        let store = self.store.clone();
        let fallback = self.run_dir.join("restore");
        let need = img.size_bytes;
        let img2 = img.clone();
        tokio::task::spawn_blocking(move || {
            let work = crate::store::scratch_dir(&fallback, need)
                .map_err(|e| format!("cannot create a directory to restore into: {e}"))?;
            store.materialise(&img2, &work).map_err(|e| match e {
                crate::store::StoreError::Corrupt { .. } => {
                    format!("image failed verification: {e}")
                }
                e => format!("cannot prepare {} for CRIU: {e}", work.display()),
            })
        })
        .await
        .map_err(|e| format!("restore task failed: {e}"))
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
    ) -> Result<Running, String> {
        let engine = self.engine.clone();
        let opts = self.cfg.checkpoint.criu.clone();
        let files = self.files();
        let files_cfg = self.cfg.files.clone();
        let materialise = m.duration;
        let res =
            tokio::task::spawn_blocking(move || -> Result<(job::Restored, Vec<Action>), String> {
                // The job's files go back to the checkpoint's instant
                // before CRIU reopens them.
                let r = crate::files::rollback_checked(&m.path, &files_cfg)
                    .map_err(|e| e.to_string())
                    .and_then(|(actions, expect)| {
                        pause_point("after-rollback");
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
                        let res = engine.restore(&m.path, &opts, &files, &mut on_notify);
                        match (res, refusal) {
                            (Ok(r), _) => Ok((r, actions)),
                            (Err(_), Some(why)) => Err(why),
                            (Err(e), None) => Err(e.to_string()),
                        }
                    });
                // The restored job does not use the image files: free the
                // (tmpfs) space.
                let _ = std::fs::remove_dir_all(&m.path);
                r
            })
            .await
            .map_err(|e| format!("restore task failed: {e}"))
            .and_then(|r| r);
        let (r, actions) = match res {
            Ok(x) => x,
            Err(e) => {
                self.restore_failed(img, &e);
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
        info!(
            checkpoint = %img.id,
            duration_ms = (r.duration + materialise).as_millis() as u64,
            materialise_ms = materialise.as_millis() as u64,
            criu_restore_ms = r.criu_restore_us.map(|u| u as f64 / 1000.0).unwrap_or(f64::NAN),
            pid = r.running.host_pid,
            ns_pid = r.running.ns_pid,
            "restored"
        );
        self.metrics
            .restore(&self.cfg.name, true, Some(r.duration + materialise));
        self.publish(|s| s.restores += 1);
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
        if let Some(r) = self.restore_newest().await {
            return Ok(r);
        }
        match self.cfg.target {
            Target::Launch(_) => {
                warn!("no image could be restored; starting the command afresh");
                self.launch().await.map_err(|e| self.fail(e))
            }
            Target::Attach { .. } => Err(self.fail("no image could be restored".into())),
        }
    }
}

/// Testing aid: with `SUPERVISE_PAUSE=<name>` and `SUPERVISE_PAUSE_FILE=F`
/// set, the step named `name` creates `F.reached` and waits (at most 60 s)
/// while `F` exists, so that a test can act in a precise window (e.g. an
/// attacker swapping a file between the rollback and CRIU's reopen).
fn pause_point(name: &str) {
    if !matches!(std::env::var("SUPERVISE_PAUSE").as_deref(), Ok(n) if n == name) {
        return;
    }
    let Some(file) = std::env::var_os("SUPERVISE_PAUSE_FILE").map(PathBuf::from) else {
        return;
    };
    if !file.exists() {
        return;
    }
    let mut reached = file.clone().into_os_string();
    reached.push(".reached");
    let _ = std::fs::write(&reached, name);
    warn!(
        pause = name,
        "SUPERVISE_PAUSE reached: waiting for the test"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while file.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}
