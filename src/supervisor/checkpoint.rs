//! Taking a checkpoint: CRIU dumps the running job (which keeps running)
//! into the store's staging directory; at CRIU's `post-dump` notification,
//! with the tree still frozen, the job's files (and an attached job's
//! process list) are recorded; the staging directory is then published
//! atomically, and retention and gc follow.

use super::*;
use crate::criu::page_server::DumpSink;

impl Supervisor {
    /// Takes one checkpoint of the running job and publishes it atomically.
    pub async fn checkpoint(&mut self, job: &Running) -> Result<ImageInfo, CheckpointError> {
        if job.host_pid <= 0 {
            return Err(CheckpointError::Ended);
        }
        // A lazily restored job is dumped only once it holds all its
        // memory (waited for before taking a dump slot).
        self.settle_lazy().await;
        // Bounded across jobs; held for the dump, the commit and retention.
        let (slot, waited, late_ms) = self.dump_slot().await;
        self.set_state(JobState::Checkpointing);
        let r = self.checkpoint_inner(job, waited, late_ms).await;
        drop(slot);
        match &r {
            Ok(info) => {
                let m = &info.manifest.meta;
                // C: what the checkpoint cost the job (CRIU's frozen time,
                // else the dump's wall time).
                let cost = m
                    .frozen_us
                    .map(Duration::from_micros)
                    .unwrap_or(Duration::from_millis(m.duration_ms));
                self.checkpoint_cost(cost);
                self.metrics.checkpoint_ok(
                    &self.cfg.name,
                    Duration::from_millis(m.duration_ms),
                    m.frozen_us.map(Duration::from_micros),
                    info.size_bytes,
                    info.new_bytes,
                );
                let sum = summary(info);
                self.publish(|s| {
                    s.checkpoints += 1;
                    s.last_checkpoint = Some(sum);
                });
            }
            Err(e) => {
                self.metrics.checkpoint_failed(&self.cfg.name);
                self.publish(|s| s.last_error = Some(format!("checkpoint: {e}")));
            }
        }
        self.set_state(JobState::Running);
        r
    }

    pub(super) async fn checkpoint_inner(
        &mut self,
        job: &Running,
        waited: Duration,
        late_ms: Option<i64>,
    ) -> Result<ImageInfo, CheckpointError> {
        let mode = self.dump_mode().await;
        let want_stream = self.cfg.checkpoint.stream && mode == DumpMode::Full;
        // Directory scans and creation: off the async threads.
        let store = self.store.clone();
        let root = self.run_dir.clone();
        let pid = job.host_pid;
        let begun = tokio::task::spawn_blocking(move || {
            let newest = store
                .list()
                .ok()
                .and_then(|l| l.first().map(|i| i.size_bytes));
            // Streamed: the pages go straight from CRIU into the store.
            // Not the store's first checkpoint: every page of it is new,
            // and storing 1 GiB of new pages while CRIU sends them froze
            // the job 4-6x longer than CRIU writing them out (Performance).
            let stream = want_stream && newest.is_some();
            if !store.seals() {
                return store.begin().map(|s| (s, stream, None));
            }
            // Sealed: CRIU's images never touch the disk in clear (the
            // dump goes into memory; the pages are streamed when memory
            // is short).
            let job_bytes = crate::proc::tree_memory(pid).max(newest.unwrap_or(0));
            store
                .begin_private(&root, job_bytes, stream)
                .map(|(s, plan)| (s, plan.stream, Some(plan)))
        })
        .await
        .map_err(|e| CheckpointError::Failed(format!("checkpoint task failed: {e}")))?;
        let (staging, stream, plan) = match begun {
            Ok(s) => s,
            Err(e) => {
                error!(error = %e, "cannot stage a checkpoint; the job keeps running");
                return Err(CheckpointError::Failed(e.to_string()));
            }
        };
        let id = staging.id().to_string();
        if let Some(p) = &plan {
            if p.forced {
                info!(checkpoint = %id, dump_dir = p.place.name(), reason = %p.reason, "streaming this checkpoint's pages into the store");
            } else {
                tracing::debug!(checkpoint = %id, dump_dir = p.place.name(), streamed = p.stream, reason = %p.reason, "checkpoint dump in memory");
            }
        }
        // Pages can be streamed only from a full dump.
        let mode = if stream { DumpMode::Full } else { mode };
        let engine = self.engine.clone();
        let host_pid = job.host_pid;
        let opts = self.cfg.checkpoint.criu.clone();
        let timeout = self.cfg.checkpoint.timeout;
        let files_cfg = self.cfg.files.clone();
        let attached = job.init_pid.is_none();
        let ignore = vec![
            self.cfg.checkpoint.dir.clone(),
            self.run_dir.join("restore"),
        ];
        let res = tokio::task::spawn_blocking(move || {
            let dir = staging.path().to_path_buf();
            let mut files: Option<Result<CaptureSummary, FilesError>> = None;
            let mut tree: Vec<ProcId> = Vec::new();
            // CRIU's post-dump notification comes while the tree is still
            // frozen: the job's files (and an attached job's processes) are
            // recorded at the instant of the dump.
            let mut on_notify = |script: &str| {
                if script != "post-dump" {
                    return true;
                }
                // Tests: crash supervise while CRIU dumps (job frozen).
                crate::failpoint::point("post-dump");
                let pids = crate::proc::tree(host_pid);
                if attached {
                    tree = pids.iter().filter_map(|p| ProcId::of(*p)).collect();
                }
                if !files_cfg.rollback {
                    return true;
                }
                let r = crate::files::capture(&pids, &files_cfg, &ignore, &dir);
                let ok = r.is_ok();
                files = Some(r);
                ok
            };
            let mut sink = match stream.then(|| staging.stream()) {
                Some(Ok(s)) => Some(crate::pages::StreamSink::new(&dir, s)),
                Some(Err(e)) => {
                    warn!(error = %e, "cannot stream this checkpoint into the store; CRIU writes it out first");
                    None
                }
                None => None,
            };
            let r = engine.dump(
                host_pid,
                &dir,
                &opts,
                timeout,
                mode,
                &mut on_notify,
                sink.as_mut().map(|s| s as &mut (dyn DumpSink + Send)),
            );
            // Tests: look at (or crash) a finished dump before the commit.
            crate::failpoint::point("after-dump");
            (staging, r, files, tree, sink)
        })
        .await;
        let (staging, outcome, files, tree, sink) = match res {
            Ok(x) => x,
            Err(e) => {
                return Err(CheckpointError::Failed(format!(
                    "checkpoint task failed: {e}"
                )))
            }
        };
        let streamed = sink.is_some();
        let files = match (outcome.is_ok(), files, self.cfg.files.rollback) {
            (_, Some(Err(e)), _) => Err(format!("cannot record the job's files: {e}")),
            (true, None, true) => Err("CRIU sent no post-dump notification, so the job's files \
                 could not be recorded at the instant of the dump"
                .to_string()),
            (_, f, _) => Ok(f.and_then(Result::ok)),
        };
        let (outcome, files) = match (outcome, files) {
            (Ok(o), Ok(f)) => (o, f),
            (o, f) => {
                let e = match (o, f) {
                    (_, Err(e)) => e,
                    (Err(e), _) => e.to_string(),
                    _ => unreachable!(),
                };
                staging.abort();
                error!(checkpoint = %id, error = %e, "checkpoint failed; the job keeps running, older images are intact");
                // A dump that died half-way (CRIU killed, timeout) must not
                // leave the job stopped.
                let _ = tokio::task::spawn_blocking(move || resume_stopped(host_pid)).await;
                return Err(CheckpointError::Failed(e));
            }
        };
        let mut extra = CheckpointExtra::default();
        if let Some(f) = &files {
            extra.files = Some(f.files as u64);
            extra.files_copied = Some(f.snapshots as u64);
            extra.files_copied_bytes = Some(f.bytes_copied);
            extra.files_us = Some(f.elapsed.as_micros() as u64);
        }
        extra.tree = tree.clone();
        let meta = CheckpointMeta {
            job: self.cfg.name.clone(),
            criu_version: self.criu_version.clone(),
            duration_ms: outcome.duration.as_millis() as u64,
            frozen_us: outcome
                .stats
                .as_ref()
                .and_then(|s| s.frozen_time)
                .map(u64::from),
            pages_written: outcome.stats.as_ref().and_then(|s| s.pages_written),
            root_pid: job.ns_pid,
            extra,
        };
        // Inside Slurm, publish only while holding our lease on the store
        // (a flock: taken on the blocking thread, with the commit).
        let fence = self.fence.clone();
        let store = self.store.clone();
        let published = tokio::task::spawn_blocking(move || {
            let guard = match &fence {
                Some(f) => match f.guard() {
                    Ok(g) => Some(g),
                    Err(e) => {
                        staging.abort();
                        return Err(CheckpointError::Superseded(e.to_string()));
                    }
                },
                None => None,
            };
            let r = staging.commit_with(meta, sink.map(crate::pages::StreamSink::into_stream));
            drop(guard);
            Ok(r)
        })
        .await;
        let info = match published {
            Ok(Err(superseded)) => return Err(superseded),
            Ok(Ok(Ok(info))) => info,
            Ok(Ok(Err(e))) => {
                error!(checkpoint = %id, error = %e, "cannot publish the checkpoint; older images are intact");
                return Err(CheckpointError::Failed(e.to_string()));
            }
            Err(e) => return Err(CheckpointError::Failed(e.to_string())),
        };
        info!(
            checkpoint = %id,
            duration_ms = outcome.duration.as_millis() as u64,
            frozen_ms = outcome.stats.as_ref().and_then(|s| s.frozen_time).map(|t| t as f64 / 1000.0).unwrap_or(f64::NAN),
            bytes = info.size_bytes,
            new_bytes = info.new_bytes,
            pages = outcome.stats.as_ref().and_then(|s| s.pages_written).unwrap_or(0),
            files = files.as_ref().map_or(0, |f| f.files),
            files_copied_bytes = files.as_ref().map_or(0, |f| f.bytes_copied),
            files_ms = files.as_ref().map_or(0.0, |f| f.elapsed.as_micros() as f64 / 1000.0),
            slot_wait_ms = waited.as_millis() as u64,
            late_ms,
            streamed,
            "checkpoint published"
        );
        if attached && !tree.is_empty() {
            self.last_tree = tree;
        }
        let keep = self.cfg.checkpoint.keep;
        let fence = self.fence.clone();
        let span = tracing::Span::current();
        let _ = tokio::task::spawn_blocking(move || {
            let _g = span.enter();
            // A copy that lost the store must not delete anything in it.
            let _guard = match &fence {
                Some(f) => match f.guard() {
                    Ok(g) => Some(g),
                    Err(e) => {
                        warn!(error = %e, "retention and gc skipped");
                        return;
                    }
                },
                None => None,
            };
            retain_and_gc(&store, keep);
            // What the ingest freed goes back to the system now, not when
            // the arena happens to shrink: RSS stays flat across jobs.
            super::tuning::release_free_memory();
        })
        .await;
        Ok(info)
    }

    /// The dump mode, asked of CRIU once (FEATURE_CHECK `mem_track`).
    pub(super) async fn dump_mode(&mut self) -> DumpMode {
        if let Some(m) = self.dump_mode {
            return m;
        }
        let engine = self.engine.clone();
        let mode = match tokio::task::spawn_blocking(move || engine.feature_check()).await {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => {
                warn!(error = %e, "CRIU feature check failed; taking full dumps");
                DumpMode::Full
            }
            Err(_) => DumpMode::Full,
        };
        match mode {
            DumpMode::PreDump => info!(
                dump_mode = "pre-dump",
                "CRIU tracks dirty memory here: each checkpoint pre-dumps, then dumps only what changed"
            ),
            DumpMode::Full => info!(
                dump_mode = "full",
                "no dirty-memory tracking on this kernel: the job stays frozen for a full dump; the store still keeps only changed pages"
            ),
        }
        self.dump_mode = Some(mode);
        mode
    }
}

/// After a failed dump: any process of the job left stopped is resumed.
/// CRIU seizes the tree with ptrace; if CRIU dies, the kernel detaches it
/// and the tasks run on, which is waited for briefly; a task in a job-control
/// stop gets SIGCONT. Returns how many tasks were resumed.
pub fn resume_stopped(root: i32) -> usize {
    let mut resumed = 0;
    let deadline = Instant::now() + Duration::from_secs(2);
    for pid in crate::proc::tree(root) {
        loop {
            match crate::proc::state(pid) {
                Some('t') if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Some('T') => {
                    warn!(pid, "a failed dump left this process stopped; resuming it");
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGCONT,
                    );
                    resumed += 1;
                    break;
                }
                Some('t') => {
                    warn!(
                        pid,
                        "a process of the job is still held in a trace stop after a failed dump"
                    );
                    break;
                }
                _ => break,
            }
        }
    }
    resumed
}

/// Retention, then garbage collection of what it freed (blocking).
fn retain_and_gc(store: &ImageStore, keep: usize) {
    match store.retain(keep) {
        Ok(removed) if !removed.is_empty() => {
            info!(?removed, keep, "retention removed old images")
        }
        Ok(_) => {}
        Err(e) => warn!(error = %e, "retention failed"),
    }
    match store.gc() {
        Ok(r) if r.removed_packs + r.rewritten_packs > 0 => info!(
            removed_packs = r.removed_packs,
            rewritten_packs = r.rewritten_packs,
            freed_bytes = r.freed_bytes,
            pack_bytes = r.pack_bytes,
            "gc reclaimed unreferenced data"
        ),
        Ok(_) => {}
        Err(e) => warn!(error = %e, "gc failed; unreferenced data stays until the next one"),
    }
}

/// What status shows of a published checkpoint.
pub fn summary(info: &ImageInfo) -> CheckpointSummary {
    CheckpointSummary {
        id: info.id.clone(),
        time: info.created,
        duration_ms: info.manifest.meta.duration_ms,
        frozen_ms: info.manifest.meta.frozen_us.map(|u| u as f64 / 1000.0),
        bytes: info.size_bytes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stopped_job_is_resumed() {
        let mut c = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = c.id() as i32;
        let p = nix::unistd::Pid::from_raw(pid);
        nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGSTOP).unwrap();
        let t0 = Instant::now();
        while crate::proc::state(pid) != Some('T') {
            assert!(t0.elapsed() < Duration::from_secs(5));
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(resume_stopped(pid), 1);
        let t0 = Instant::now();
        while crate::proc::state(pid) == Some('T') {
            assert!(t0.elapsed() < Duration::from_secs(5), "still stopped");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(resume_stopped(pid), 0);
        let _ = c.kill();
        let _ = c.wait();
    }
}
