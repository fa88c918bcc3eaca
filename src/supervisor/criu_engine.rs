//! The real [`Engine`]: processes through supervise's reaper, CRIU over
//! RPC, the job's files through `crate::files`. Every method does its
//! blocking on tokio's blocking pool.

use std::time::Duration;

use tokio::sync::OnceCell;
use tracing::{info, warn};

use super::engine::{blocking, DumpRequest, Dumped, Engine, RestoreRequest, RestoredJob};
use super::errors::{CheckpointError, CheckpointStep, RestoreError, RestoreStep};
use super::record::JobRecord;
use crate::config::LaunchSpec;
use crate::criu::page_server::DumpSink;
use crate::criu::{CriuError, DumpMode};
use crate::files::CaptureSummary;
use crate::job::{InitFiles, JobError, Running};
use crate::proc::ProcId;
use crate::reaper::Reaper;

/// The real engine: CRIU over RPC, processes through supervise's reaper.
pub struct Criu {
    reaper: Reaper,
    dump_mode: OnceCell<DumpMode>,
    lazy_ok: OnceCell<bool>,
}

impl Criu {
    /// An engine whose children are collected by `reaper`.
    pub fn new(reaper: Reaper) -> Criu {
        Criu {
            reaper,
            dump_mode: OnceCell::new(),
            lazy_ok: OnceCell::new(),
        }
    }
}

/// A failed dump's error, typed: a resource shortage where the OS said
/// so (CRIU could not be started, a socket could not be made).
fn dump_failed(e: CriuError) -> CheckpointError {
    let resource = match &e {
        CriuError::Spawn { source, .. } | CriuError::Io(source) => {
            crate::fdlimit::is_resource_error(source)
        }
        _ => false,
    };
    let mut message = e.to_string();
    // CRIU names its command-line flag; say the job file's key.
    if message.contains("consider using --tcp-established") {
        message.push_str(
            " (a TCP connection to a peer outside the job: set `[checkpoint] tcp_established = \
             true` in the job file)",
        );
    }
    CheckpointError::Failed {
        step: CheckpointStep::Dump,
        message,
        resource,
    }
}

impl Engine for Criu {
    async fn launch(&self, spec: LaunchSpec, init: InitFiles) -> Result<Running, JobError> {
        let reaper = self.reaper.clone();
        blocking(move || crate::job::launch(&reaper, &spec, &init))
            .await
            .unwrap_or_else(|e| Err(JobError::Start(e)))
    }

    async fn attach(&self, pid: i32, start_time: Option<u64>) -> Result<Running, JobError> {
        if !crate::proc::alive(pid) {
            return Err(JobError::Start(format!("process {pid} does not exist")));
        }
        blocking(move || crate::job::attach(pid, start_time))
            .await
            .unwrap_or_else(|e| Err(JobError::Start(e)))
    }

    fn still_running(&self, rec: &JobRecord) -> bool {
        crate::proc::alive(rec.host_pid)
            && crate::proc::start_time(rec.host_pid).ok() == Some(rec.start_time)
    }

    async fn adopt(&self, rec: JobRecord, init: InitFiles) -> Result<Running, JobError> {
        blocking(move || {
            crate::job::adopt(
                rec.host_pid,
                rec.ns_pid,
                rec.init_pid,
                rec.start_time,
                init.status_file,
            )
        })
        .await
        .unwrap_or_else(|e| Err(JobError::Start(e)))
    }

    fn job_memory(&self, pid: i32) -> u64 {
        crate::proc::tree_memory(pid)
    }

    async fn dump(&self, req: DumpRequest) -> Dumped {
        let reaper = self.reaper.clone();
        let pid = req.host_pid;
        let r = blocking(move || dump_blocking(&reaper, req)).await;
        match r {
            Ok(d) => d,
            Err(e) => {
                let _ = blocking(move || resume_stopped(pid)).await;
                Dumped {
                    result: Err(CheckpointError::failed(CheckpointStep::Dump, e)),
                    files: None,
                    tree: Vec::new(),
                    pages: None,
                }
            }
        }
    }

    async fn restore(&self, req: RestoreRequest) -> Result<RestoredJob, RestoreError> {
        let reaper = self.reaper.clone();
        blocking(move || restore_blocking(&reaper, req))
            .await
            .unwrap_or_else(|e| Err(RestoreError::image(RestoreStep::CriuRestore, e)))
    }

    async fn kill_survivors(&self, ids: Vec<ProcId>) -> Vec<i32> {
        blocking(move || {
            ids.into_iter()
                .filter(|id| crate::proc::kill_exact(*id, Duration::from_secs(5)))
                .map(|id| id.pid)
                .collect()
        })
        .await
        .unwrap_or_default()
    }

    async fn dump_mode(&self) -> DumpMode {
        *self
            .dump_mode
            .get_or_init(|| async {
                let reaper = self.reaper.clone();
                let mode = match blocking(move || crate::criu::feature_check(&reaper)).await {
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
                mode
            })
            .await
    }

    async fn lazy_pages(&self) -> bool {
        *self
            .lazy_ok
            .get_or_init(|| async {
                let reaper = self.reaper.clone();
                let ok = match blocking(move || crate::criu::lazy_pages_check(&reaper)).await {
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
                ok
            })
            .await
    }
}

/// The dump, on a blocking thread. CRIU's `post-dump` notification comes
/// while the tree is still frozen: the job's files (and an attached job's
/// processes) are recorded at the instant of the dump.
fn dump_blocking(reaper: &Reaper, mut req: DumpRequest) -> Dumped {
    let host_pid = req.host_pid;
    // TCP connections whose both ends are in the job's tree are taken as
    // established without the key; one to an outside peer needs it. Looked
    // at before the dump, and again once the job is frozen (post-dump).
    let auto_tcp = !req.opts.tcp_established;
    if auto_tcp {
        match crate::tcp::inspect(&crate::proc::tree(host_pid)) {
            Ok(crate::tcp::Verdict::Inside(c)) => {
                info!(
                    connections = c.len(),
                    "the job's TCP connections all run inside its process tree: checkpointing \
                     them as established"
                );
                req.opts.tcp_established = true;
            }
            Ok(crate::tcp::Verdict::Outside(o)) => {
                return Dumped {
                    result: Err(CheckpointError::Failed {
                        step: CheckpointStep::Dump,
                        message: outside_peers(&o),
                        resource: false,
                    }),
                    files: None,
                    tree: Vec::new(),
                    pages: req.pages,
                };
            }
            Ok(crate::tcp::Verdict::None) => {}
            Err(e) => warn!(error = %e, "cannot list the job's TCP connections"),
        }
    }
    let mut files: Option<Result<CaptureSummary, crate::files::FilesError>> = None;
    let mut tcp_refused: Option<String> = None;
    let mut tree: Vec<ProcId> = Vec::new();
    let (attached, files_cfg, ignore, dir) = (req.attached, &req.files, &req.ignore, &req.dir);
    let tracker = req.tracker.as_deref();
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
        // The image says whether the job had a private /tmp: a restore
        // binds one only for an image that had it.
        if !files_cfg.views.is_empty() {
            if let Err(e) =
                crate::fsutil::write_atomic(&dir.join(PRIVATE_TMP_MARK), b"/tmp\n", 0o600)
            {
                warn!(error = %e, "cannot record the job's private /tmp in the image");
                return false;
            }
        }
        // The connections at the instant of the dump: recorded in the
        // image (a restore clears their leftovers), and none may lead
        // outside unless the job file says so.
        if let Ok(v) = crate::tcp::inspect(&pids) {
            match v {
                crate::tcp::Verdict::Outside(o) if auto_tcp => {
                    tcp_refused = Some(outside_peers(&o));
                    return false;
                }
                crate::tcp::Verdict::Inside(c) => {
                    if let Err(e) = crate::tcp::record(dir, &c) {
                        warn!(error = %e, "cannot record the job's TCP connections in the image");
                    }
                }
                _ => {}
            }
        }
        if !files_cfg.rollback {
            return true;
        }
        // Every change the job made before the freeze, then its names.
        let touched = match tracker {
            Some(t) => {
                if let Err(e) = t.sync(std::time::Duration::from_secs(5)) {
                    warn!(error = %e, "the files the job changed may not all be recorded with this checkpoint");
                }
                t.names()
            }
            None => Vec::new(),
        };
        let r = crate::files::capture_with(&pids, files_cfg, ignore, dir, &touched);
        if let (Ok(s), Some(t)) = (&r, tracker) {
            t.checkpointed(&s.dirs);
        }
        let ok = r.is_ok();
        files = Some(r);
        ok
    };
    let r = crate::criu::dump_with(
        reaper,
        host_pid,
        &req.dir,
        &req.opts,
        req.timeout,
        req.mode,
        &mut on_notify,
        req.pages.as_mut().map(|s| s as &mut (dyn DumpSink + Send)),
        req.owner.as_ref(),
    );
    // Tests: look at (or crash) a finished dump before the commit.
    crate::failpoint::point("after-dump");
    let capture = |m: String, resource: bool| CheckpointError::Failed {
        step: CheckpointStep::Capture,
        message: m,
        resource,
    };
    let result = match (r, files.take()) {
        (Err(_), _) if tcp_refused.is_some() => Err(CheckpointError::Failed {
            step: CheckpointStep::Dump,
            message: tcp_refused.take().unwrap_or_default(),
            resource: false,
        }),
        (_, Some(Err(e))) => Err(capture(
            format!("cannot record the job's files: {e}"),
            e.is_resource(),
        )),
        (Ok(_), None) if req.files.rollback => Err(capture(
            "CRIU sent no post-dump notification, so the job's files could not be recorded \
             at the instant of the dump"
                .into(),
            false,
        )),
        (Ok(o), Some(Ok(f))) => {
            // The copies deferred past the freeze, from the shadow copies.
            match crate::files::finish_copies(&f, dir, files_cfg.shadow_dir.as_deref()) {
                Ok(()) => {
                    files = Some(Ok(f));
                    Ok(o)
                }
                Err(e) => Err(capture(
                    format!("cannot copy the job's files into the checkpoint: {e}"),
                    e.is_resource(),
                )),
            }
        }
        (Ok(o), None) => Ok(o),
        (Err(e), _) => Err(dump_failed(e)),
    };
    if result.is_err() {
        // A dump that died half-way (CRIU killed, timeout) must not leave
        // the job stopped.
        resume_stopped(host_pid);
    }
    Dumped {
        result,
        files: files.and_then(Result::ok),
        tree,
        pages: req.pages,
    }
}

/// The checkpoint error for connections to peers outside the job's tree,
/// in supervise's words.
fn outside_peers(o: &[crate::tcp::Outside]) -> String {
    let list: Vec<String> = o.iter().take(4).map(|c| c.to_string()).collect();
    let more = o.len().saturating_sub(4);
    format!(
        "the job has {} TCP connection{} to a peer outside its process tree: {}{}; such a \
         connection is checkpointed only with `[checkpoint] tcp_established = true` in the \
         job file (after a crash the peer has reset it: add `[checkpoint] tcp_close = true` \
         so that the restored job sees it closed and can reconnect)",
        o.len(),
        if o.len() == 1 { "" } else { "s" },
        list.join(", "),
        if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        }
    )
}

/// The job's files go back to the checkpoint's instant, then CRIU
/// restores the image; before the restored tree runs, each descriptor
/// that held a rolled-back file must hold that very file (CRIU reopens
/// them by path).
fn restore_blocking(reaper: &Reaper, req: RestoreRequest) -> Result<RestoredJob, RestoreError> {
    // An owned job's files are rolled back with its owner's rights, and
    // its CRIU (running as the owner) reads and writes the images.
    // The dead job's last file events first (its init forwards them before
    // it exits).
    if let Some(t) = &req.tracker {
        t.end_run(std::time::Duration::from_secs(5));
    }
    let tracker = req.tracker.as_deref();
    let rollback = || crate::files::rollback_checked(&req.images, &req.files, tracker);
    let rolled = match &req.init.owner {
        Some(o) => {
            hand_over(&req.images, o).map_err(|e| {
                RestoreError::io(
                    RestoreStep::Materialise,
                    format!("cannot hand the image to {}: {e}", o.name),
                    &e,
                )
            })?;
            crate::userns::as_owner(o, rollback).map_err(|e| {
                RestoreError::io(
                    RestoreStep::Rollback,
                    format!("cannot take {}'s file credentials: {e}", o.name),
                    &e,
                )
            })?
        }
        None => rollback(),
    };
    let rolled = rolled.map_err(|e| {
        let step = RestoreStep::Rollback;
        if e.is_resource() {
            RestoreError::resource(step, e.to_string())
        } else {
            RestoreError::image(step, e.to_string())
        }
    })?;
    for (p, why) in &rolled.left {
        warn!(path = %p.display(), "not rolled back: {why}");
    }
    if let Some(why) = req.tracker.as_ref().and_then(|t| t.incomplete()) {
        warn!("the files the job changed since the checkpoint may not all be rolled back: {why}");
    }
    let (actions, expect) = (rolled.actions, rolled.expected);
    let restored_names = rolled.restored_names;
    // The restored job's own watch (after the rollback: supervise's own
    // changes are not the job's).
    let watch = req.tracker.as_ref().and_then(|t| t.begin_run());
    crate::failpoint::point("after-rollback");
    let mut refusal = None;
    let mut on_notify = |script: &str, init: i32| {
        if script != "post-restore" {
            return true;
        }
        // The restored tasks have not run yet: the job's watch starts here,
        // with the names the image recorded as the job's.
        if let Some(w) = &watch {
            w.start(Some(restored_names.clone()));
        }
        if expect.is_empty() {
            return true;
        }
        let map = crate::proc::ns_pid_map(init);
        match crate::files::verify_restored(&expect, &|p| map.get(&p).copied()) {
            Ok(()) => true,
            Err(e) => {
                refusal = Some(e.to_string());
                false
            }
        }
    };
    // An image with connected TCP sockets (tcp-stream-*.img, e.g. taken as
    // established because both ends were in the job) is restored with
    // tcp_established too.
    let mut opts = req.opts.clone();
    if !opts.tcp_established && has_tcp_streams(&req.images) {
        opts.tcp_established = true;
    }
    // What the dead job's connections left in the kernel (TIME_WAIT on its
    // own ports) would keep its listeners from binding again.
    if crate::tcp::clear_leftovers(&req.images) > 0 {
        warn!("cannot clear what the job's dead TCP connections left in the kernel (ss -K)");
    }
    // The job comes back with the /tmp it had: its private one only if the
    // image was taken with it (an image from before, or with
    // `private_tmp = false`, saw the host's).
    let mut init = req.init.clone();
    if !req.images.join(PRIVATE_TMP_MARK).exists() {
        init.private_tmp = None;
    }
    init.watch = watch.clone();
    let res = crate::job::restore(reaper, &req.images, &opts, &init, &mut on_notify, req.lazy);
    match (res, refusal) {
        (Ok(restored), _) => Ok(RestoredJob { restored, actions }),
        (Err(_), Some(why)) => Err(RestoreError::image(RestoreStep::Verify, why)),
        (Err(JobError::Lazy(e)), None) => Err(RestoreError::image(RestoreStep::Lazy, e)),
        (Err(e), None) if e.is_resource() => Err(RestoreError::resource(
            RestoreStep::CriuRestore,
            e.to_string(),
        )),
        (Err(e), None) => Err(RestoreError::image(RestoreStep::CriuRestore, e.to_string())),
    }
}

/// In an image taken with the job's private /tmp bound over /tmp.
pub const PRIVATE_TMP_MARK: &str = "supervise-private-tmp";

/// True if the image in `dir` holds connected TCP sockets (CRIU writes a
/// `tcp-stream-<inode>.img` for each).
fn has_tcp_streams(dir: &std::path::Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|d| {
        d.flatten().any(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with("tcp-stream-") && n.ends_with(".img"))
        })
    })
}

/// Gives the materialised image directory `dir` (fresh, private, in a
/// directory of root's) and its files to `owner`, whose CRIU restores it.
fn hand_over(dir: &std::path::Path, owner: &crate::userns::Owner) -> std::io::Result<()> {
    use nix::fcntl::AtFlags;
    use nix::unistd::{fchownat, Gid, Uid};
    let (u, g) = (
        Some(Uid::from_raw(owner.uid)),
        Some(Gid::from_raw(owner.gid)),
    );
    let chown = |p: &std::path::Path| {
        fchownat(None, p, u, g, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(std::io::Error::from)
    };
    chown(dir)?;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            hand_over(&e.path(), owner)?;
        } else {
            chown(&e.path())?;
        }
    }
    Ok(())
}

/// After a failed dump: any process of the job left stopped is resumed.
/// CRIU seizes the tree with ptrace; if CRIU dies, the kernel detaches it
/// and the tasks run on, which is waited for briefly; a task in a job-control
/// stop gets SIGCONT. Returns how many tasks were resumed.
pub fn resume_stopped(root: i32) -> usize {
    let mut resumed = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    for pid in crate::proc::tree(root) {
        loop {
            match crate::proc::state(pid) {
                Some('t') if std::time::Instant::now() < deadline => {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

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
