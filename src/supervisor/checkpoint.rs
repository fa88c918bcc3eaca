//! Taking a checkpoint: CRIU dumps the running job (which keeps running)
//! into a staging directory (with encryption on, a private one in memory)
//! or streams its pages straight into the store; at CRIU's `post-dump`
//! notification, with the tree still frozen, the engine records the job's
//! files (and an attached job's process list); the checkpoint is then
//! published atomically, and retention and gc follow.
//!
//! [`take`] is the orchestration: a dump slot, then [`stage`], [`dump`],
//! [`publish`] and retention, each a step with a typed error
//! ([`CheckpointError`]) that says which step failed.

use std::path::PathBuf;
use std::time::Duration;

use tracing::{debug, error, info, warn};

use super::cadence::{Cadence, Slot};
use super::engine::{blocking, DumpRequest, Dumped, Engine};
use super::errors::{CheckpointError, CheckpointStep};
use super::report::Report;
use super::Ctx;
use crate::control::JobState;
use crate::criu::{DumpMode, DumpOutcome};
use crate::files::CaptureSummary;
use crate::job::Running;
use crate::pages::StreamSink;
use crate::proc::ProcId;
use crate::store::{CheckpointExtra, CheckpointMeta, DumpPlan, ImageInfo, Staging};

/// Takes one checkpoint of `job` and publishes it atomically; returns it
/// and (for an attached job) the processes of its tree at the dump. The
/// job keeps running whatever happens.
pub(super) async fn take<E: Engine>(
    ctx: &Ctx<E>,
    job: &Running,
    cadence: &mut Cadence,
    report: &mut Report,
) -> Result<(ImageInfo, Vec<ProcId>), CheckpointError> {
    if job.host_pid <= 0 {
        return Err(CheckpointError::Ended);
    }
    // Bounded across jobs; held for the dump, the commit and retention.
    let slot = cadence.slot().await;
    report.set_state(JobState::Checkpointing);
    let r = take_in_slot(ctx, job, &slot).await;
    drop(slot);
    match &r {
        Ok((info, _)) => {
            let m = &info.manifest.meta;
            // C: what the checkpoint cost the job (CRIU's frozen time,
            // else the dump's wall time).
            let cost = m
                .frozen_us
                .map(Duration::from_micros)
                .unwrap_or(Duration::from_millis(m.duration_ms));
            cadence.checkpoint_cost(cost);
            report.checkpoint_ok(info);
        }
        Err((id, e)) => report.checkpoint_failed(id.as_deref(), e),
    }
    report.set_state(JobState::Running);
    r.map_err(|(_, e)| e)
}

/// A staged checkpoint and how CRIU is to dump into it.
struct Staged {
    staging: Staging,
    mode: DumpMode,
    stream: bool,
}

/// The steps, holding the dump slot. `Err` carries the checkpoint's id
/// once it has one.
async fn take_in_slot<E: Engine>(
    ctx: &Ctx<E>,
    job: &Running,
    slot: &Slot,
) -> Result<(ImageInfo, Vec<ProcId>), (Option<String>, CheckpointError)> {
    let staged = stage(ctx, job).await.map_err(|e| (None, e))?;
    let id = staged.staging.id().to_string();
    let fail = |e: CheckpointError| {
        error!(checkpoint = %id, error = %e, "checkpoint failed; the job keeps running, older images are intact");
        (Some(id.clone()), e)
    };
    let (staging, dumped) = dump(ctx, job, staged).await;
    let outcome = match dumped.result {
        Ok(o) => o,
        Err(e) => {
            staging.abort();
            return Err(fail(e));
        }
    };
    let streamed = dumped.pages.is_some();
    let meta = meta(ctx, job, &outcome, dumped.files.as_ref(), &dumped.tree);
    let info = ctx
        .engine
        .publish(staging, meta, dumped.pages, ctx.fence.clone())
        .await
        .map_err(fail)?;
    log_published(&info, &outcome, dumped.files.as_ref(), slot, streamed);
    ctx.engine
        .retain(
            ctx.store.clone(),
            ctx.cfg.checkpoint.keep,
            ctx.fence.clone(),
        )
        .await;
    Ok((info, dumped.tree))
}

/// Prepares the staging directory. Streamed (the pages go straight from
/// CRIU into the store) when asked and possible, but not for the store's
/// first checkpoint: every page of it is new, and storing 1 GiB of new
/// pages while CRIU sends them froze the job 4-6x longer than CRIU writing
/// them out (README, Performance). With encryption on, CRIU's images never
/// touch the disk in clear: the dump goes into memory, and the pages are
/// streamed when memory is short.
async fn stage<E: Engine>(ctx: &Ctx<E>, job: &Running) -> Result<Staged, CheckpointError> {
    if let Some(q) = ctx.quota.clone() {
        let used = blocking(move || crate::store::dir_size(&q.root))
            .await
            .unwrap_or(0);
        let max = ctx.quota.as_ref().map_or(0, |q| q.max_bytes);
        if used >= max {
            return Err(CheckpointError::failed(
                CheckpointStep::Stage,
                format!(
                    "the owner's images take {used} bytes, the most this node allows \
                     (limits.max_image_bytes_per_user = {max}); older images are kept"
                ),
            ));
        }
    }
    let mode = ctx.engine.dump_mode().await;
    let want_stream = ctx.cfg.checkpoint.stream && mode == DumpMode::Full;
    let store = ctx.store.clone();
    let root = ctx.run_dir.clone();
    let job_bytes = ctx.engine.job_memory(job.host_pid);
    let begun = blocking(move || {
        let newest = store
            .list()
            .ok()
            .and_then(|l| l.first().map(|i| i.size_bytes));
        let stream = want_stream && newest.is_some();
        if !store.seals() {
            return store.begin().map(|s| (s, stream, None));
        }
        store
            .begin_private(&root, job_bytes.max(newest.unwrap_or(0)), stream)
            .map(|(s, plan)| (s, plan.stream, Some(plan)))
    })
    .await
    .map_err(|e| CheckpointError::failed(CheckpointStep::Stage, e))?;
    let (staging, stream, plan) = begun.map_err(|e| {
        error!(error = %e, "cannot stage a checkpoint; the job keeps running");
        CheckpointError::Failed {
            step: CheckpointStep::Stage,
            resource: e.is_resource(),
            message: e.to_string(),
        }
    })?;
    if let Some(p) = &plan {
        log_plan(staging.id(), p);
    }
    Ok(Staged {
        staging,
        // Pages can be streamed only from a full dump.
        mode: if stream { DumpMode::Full } else { mode },
        stream,
    })
}

fn log_plan(id: &str, p: &DumpPlan) {
    if p.forced {
        info!(checkpoint = %id, dump_dir = p.place.name(), reason = %p.reason, "streaming this checkpoint's pages into the store");
    } else {
        debug!(checkpoint = %id, dump_dir = p.place.name(), streamed = p.stream, reason = %p.reason, "checkpoint dump in memory");
    }
}

/// CRIU's dump through the engine (which records the job's files at
/// `post-dump`). Hands the staging back with what the dump did.
async fn dump<E: Engine>(ctx: &Ctx<E>, job: &Running, staged: Staged) -> (Staging, Dumped) {
    let Staged {
        staging,
        mode,
        stream,
    } = staged;
    let dir = staging.path().to_path_buf();
    let pages = match stream.then(|| staging.stream()) {
        Some(Ok(s)) => Some(StreamSink::new(&dir, s)),
        Some(Err(e)) => {
            warn!(error = %e, "cannot stream this checkpoint into the store; CRIU writes it out first");
            None
        }
        None => None,
    };
    let ignore: Vec<PathBuf> = vec![ctx.cfg.checkpoint.dir.clone(), ctx.run_dir.join("restore")];
    let req = DumpRequest {
        host_pid: job.host_pid,
        dir,
        opts: ctx.cfg.checkpoint.criu.clone(),
        timeout: ctx.cfg.checkpoint.timeout,
        mode,
        files: ctx.files_config(),
        ignore,
        attached: job.init_pid.is_none(),
        pages,
        owner: ctx.cfg.owner.clone(),
        tracker: ctx.tracker.clone(),
    };
    let dumped = ctx.engine.dump(req).await;
    (staging, dumped)
}

/// The manifest's description of the checkpoint.
fn meta<E>(
    ctx: &Ctx<E>,
    job: &Running,
    outcome: &DumpOutcome,
    files: Option<&CaptureSummary>,
    tree: &[ProcId],
) -> CheckpointMeta {
    let mut extra = CheckpointExtra::default();
    if let Some(f) = files {
        extra.files = Some(f.files as u64);
        extra.files_copied = Some(f.snapshots as u64);
        extra.files_copied_bytes = Some(f.bytes_copied);
        extra.files_us = Some(f.elapsed.as_micros() as u64);
    }
    extra.tree = tree.to_vec();
    CheckpointMeta {
        job: ctx.cfg.name.clone(),
        criu_version: ctx.criu_version.clone(),
        duration_ms: outcome.duration.as_millis() as u64,
        frozen_us: outcome
            .stats
            .as_ref()
            .and_then(|s| s.frozen_time)
            .map(u64::from),
        pages_written: outcome.stats.as_ref().and_then(|s| s.pages_written),
        root_pid: job.ns_pid,
        extra,
    }
}

fn log_published(
    info: &ImageInfo,
    outcome: &DumpOutcome,
    files: Option<&CaptureSummary>,
    slot: &Slot,
    streamed: bool,
) {
    info!(
        checkpoint = %info.id,
        duration_ms = outcome.duration.as_millis() as u64,
        frozen_ms = outcome.stats.as_ref().and_then(|s| s.frozen_time).map(|t| t as f64 / 1000.0).unwrap_or(f64::NAN),
        bytes = info.size_bytes,
        new_bytes = info.new_bytes,
        pages = outcome.stats.as_ref().and_then(|s| s.pages_written).unwrap_or(0),
        files = files.map_or(0, |f| f.files),
        files_copied_bytes = files.map_or(0, |f| f.bytes_copied),
        files_ms = files.map_or(0.0, |f| f.elapsed.as_micros() as f64 / 1000.0),
        slot_wait_ms = slot.waited.as_millis() as u64,
        late_ms = slot.late_ms,
        streamed,
        "checkpoint published"
    );
}
