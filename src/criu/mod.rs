//! The CRIU engine adapter.
//!
//! supervise speaks CRIU's RPC protocol to a `criu swrk` child over a
//! `SOCK_SEQPACKET` socketpair (messages in [`rpc`], generated with prost
//! from CRIU's `rpc.proto`). CRIU logs to its stderr (`log_to_stderr`), which
//! supervise captures, so the *text* of CRIU's errors reaches the user rather
//! than just an errno.
//!
//! Jobs live in their own PID and mount namespaces (see [`crate::init`]), so
//! a dump runs CRIU *inside* the job's namespaces (`nsenter --pid --mount`,
//! as CRIU's own `criu-ns` does), and a restore runs CRIU as a child of a
//! fresh namespace's init. That is what makes a restore independent of which
//! PIDs are taken on the host.

pub mod faults;
pub mod lazy;
mod options;
pub mod page_server;
pub mod pagemap;
pub mod rpc;

pub use options::{
    parse_size, pass_through_field, CriuOptions, NetworkLock, OptKind, OptValue, PassField,
    CRIU_DEFAULT_GHOST_LIMIT, DEFAULT_CRIU_LOG_LEVEL, MAX_CRIU_LOG_LEVEL, PASS_THROUGH, REFUSED,
    UNSUPPORTED,
};

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::socket::{recv, send, socketpair, AddressFamily, MsgFlags, SockFlag, SockType};
use prost::Message;

use crate::reaper::{ExitStatus, Reaper, Spawned};
use rpc::{CriuOpts, CriuReq, CriuReqType, CriuResp, DumpStatsEntry, StatsEntry};

/// Oldest CRIU that works on the kernels supervise targets: 3.17 fails on
/// 6.x kernels (vDSO), 4.1.1 cannot dump inet sockets on kernels >= 6.16.
pub const MIN_VERSION: (u32, u32, u32) = (4, 2, 0);

/// The fd number `criu swrk` is told to use for its RPC socket.
pub const SWRK_FD: RawFd = 3;
/// The fd number of the page-server socket in a streamed dump.
pub const PS_FD: RawFd = 4;
/// The fd number of the images directory in a dump (CRIU is told
/// `/proc/self/fd/5`, see [`dump_with`]).
pub const IMG_FD: RawFd = 5;

/// Errors of the CRIU adapter.
#[derive(Debug, thiserror::Error)]
pub enum CriuError {
    /// `criu` (or `nsenter`) could not be started.
    #[error("cannot start {what}: {source}")]
    Spawn {
        /// What was started.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The RPC socket failed.
    #[error("CRIU RPC socket error: {0}")]
    Io(#[from] std::io::Error),
    /// CRIU answered with something that is not a `criu_resp`.
    #[error("malformed CRIU response: {0}")]
    Decode(#[from] prost::DecodeError),
    /// CRIU reported a failure.
    #[error("criu {op} failed: {message}")]
    Failed {
        /// dump, restore, ...
        op: &'static str,
        /// CRIU's own error text (errmsg and the error lines of its log).
        message: String,
        /// CRIU's errno, if it gave one.
        errno: Option<i32>,
    },
    /// CRIU went away without answering.
    #[error("criu {op} ended without an answer ({status}): {message}")]
    Died {
        /// dump, restore, ...
        op: &'static str,
        /// How the criu process ended, if known.
        status: String,
        /// The error lines of its log.
        message: String,
    },
}

/// Lines of a CRIU log that explain a failure: `Error` lines, minus the ones
/// known to be harmless here.
pub fn error_lines(log: &str) -> String {
    let useful: Vec<&str> = log
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.contains("Can't setup RLIMIT_NOFILE for self"))
        .collect();
    let mut lines: Vec<&str> = useful
        .iter()
        .copied()
        .filter(|l| l.contains("Error") || l.starts_with("nsenter:") || l.contains("criu:"))
        .collect();
    if lines.is_empty() {
        // Fall back to the log's tail.
        lines = useful.iter().rev().take(5).copied().collect();
        lines.reverse();
    }
    lines.join("; ")
}

/// Parses `Version: 4.2.1` from `criu --version`.
pub fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    let v = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Version:"))?
        .trim();
    let mut it = v
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty());
    let a = it.next()?.parse().ok()?;
    let b = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let c = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    Some((a, b, c))
}

/// The `criu` binary: `$SUPERVISE_CRIU` or `criu` from `PATH`.
pub fn criu_bin() -> PathBuf {
    std::env::var_os("SUPERVISE_CRIU")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("criu"))
}

/// The options of every request: the job's `[checkpoint]` options that
/// apply to dump and restore alike, and the `[checkpoint.criu_opts]`
/// pass-through.
fn common_opts(images_dir: &Path, o: &CriuOptions) -> CriuOpts {
    let mut opts = CriuOpts {
        images_dir_fd: -1,
        images_dir: Some(images_dir.to_string_lossy().into_owned()),
        shell_job: Some(o.shell_job),
        tcp_established: Some(o.tcp_established),
        file_locks: Some(o.file_locks),
        ext_unix_sk: Some(o.ext_unix_sk),
        log_level: Some(o.log_level as i32),
        log_to_stderr: Some(true),
        // Only TCP connections need the network locked (a job in supervise's
        // namespaces shares the host's network namespace). Setting up the
        // nftables lock costs CRIU ~20 ms of the job's frozen time, so it is
        // requested only for jobs that checkpoint established connections;
        // CRIU refuses to dump those without `tcp_established` anyway.
        network_lock: o.tcp_established.then_some(match o.network_lock {
            NetworkLock::Iptables => rpc::CriuNetworkLockMethod::Iptables,
            NetworkLock::Nftables => rpc::CriuNetworkLockMethod::Nftables,
            NetworkLock::Skip => rpc::CriuNetworkLockMethod::Skip,
        } as i32),
        ..Default::default()
    };
    options::apply_pass_through(&mut opts, o);
    opts
}

/// The DUMP request for `ns_pid` (the root's PID as CRIU sees it), leaving
/// the job running. Carries the dump-only options (`ghost_limit`,
/// `skip_in_flight`, `link_remap`).
pub fn dump_request(
    ns_pid: i32,
    images_dir: &Path,
    o: &CriuOptions,
    timeout: Option<Duration>,
    notify: bool,
) -> CriuReq {
    let mut opts = common_opts(images_dir, o);
    opts.pid = Some(ns_pid);
    opts.leave_running = Some(true);
    opts.notify_scripts = Some(notify);
    opts.timeout = timeout.map(|t| t.as_secs().clamp(1, u32::MAX as u64) as u32);
    opts.ghost_limit = o.ghost_limit;
    opts.tcp_skip_in_flight = Some(o.skip_in_flight);
    opts.link_remap = Some(o.link_remap);
    CriuReq {
        r#type: CriuReqType::Dump as i32,
        opts: Some(opts),
        ..Default::default()
    }
}

/// The PRE_DUMP request (memory only, job keeps running), for kernels with
/// soft-dirty tracking; `parent` is relative to `images_dir`.
pub fn pre_dump_request(
    ns_pid: i32,
    images_dir: &Path,
    parent: Option<&str>,
    o: &CriuOptions,
) -> CriuReq {
    let mut opts = common_opts(images_dir, o);
    opts.pid = Some(ns_pid);
    opts.track_mem = Some(true);
    opts.parent_img = parent.map(str::to_string);
    CriuReq {
        r#type: CriuReqType::PreDump as i32,
        opts: Some(opts),
        ..Default::default()
    }
}

/// The RESTORE request: the restored root becomes a sibling of `criu swrk`,
/// i.e. a child of the namespace init that started CRIU. Carries the
/// restore-only option `tcp_close`.
pub fn restore_request(images_dir: &Path, o: &CriuOptions, notify: bool) -> CriuReq {
    let mut opts = common_opts(images_dir, o);
    opts.rst_sibling = Some(true);
    opts.tcp_close = Some(o.tcp_close);
    opts.notify_scripts = Some(notify);
    CriuReq {
        r#type: CriuReqType::Restore as i32,
        opts: Some(opts),
        ..Default::default()
    }
}

/// How one checkpoint is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DumpMode {
    /// One DUMP request: the job is frozen while all its memory is written.
    Full,
    /// Where the kernel tracks dirty memory: a PRE_DUMP (memory copied while
    /// the job runs on, with tracking switched on) into [`PRE_DUMP_DIR`],
    /// then a DUMP with `track_mem` and that pre-dump as parent, which
    /// writes only the pages dirtied since, so the job is frozen for less.
    /// Both live in the same staging directory, so the stored checkpoint
    /// still restores on its own.
    PreDump,
}

/// Subdirectory of the images directory that holds the pre-dump; the dump
/// names it as its parent (CRIU links `parent` -> `pre`).
pub const PRE_DUMP_DIR: &str = "pre";

impl DumpMode {
    /// The mode to use given the answer to a FEATURE_CHECK request (`None`:
    /// no answer): pre-dumps only when CRIU confirms `mem_track`.
    pub fn from_feature_check(resp: Option<&CriuResp>) -> DumpMode {
        match resp {
            Some(r) if r.success && r.features.as_ref().and_then(|f| f.mem_track) == Some(true) => {
                DumpMode::PreDump
            }
            _ => DumpMode::Full,
        }
    }
}

/// The requests of one checkpoint conversation with `criu swrk`, in order
/// (CRIU's service accepts PRE_DUMP requests followed by the final DUMP on
/// one connection).
pub fn dump_requests(
    ns_pid: i32,
    images_dir: &Path,
    o: &CriuOptions,
    timeout: Option<Duration>,
    notify: bool,
    mode: DumpMode,
) -> Vec<CriuReq> {
    match mode {
        DumpMode::Full => vec![dump_request(ns_pid, images_dir, o, timeout, notify)],
        DumpMode::PreDump => {
            let pre = pre_dump_request(ns_pid, &images_dir.join(PRE_DUMP_DIR), None, o);
            let mut dump = dump_request(ns_pid, images_dir, o, timeout, notify);
            if let Some(opts) = dump.opts.as_mut() {
                opts.track_mem = Some(true);
                opts.parent_img = Some(PRE_DUMP_DIR.to_string());
            }
            vec![pre, dump]
        }
    }
}

/// Asks CRIU (over RPC, FEATURE_CHECK) whether it can track dirty memory
/// on this kernel. Blocking; spawns `criu swrk` through the reaper.
pub fn feature_check(reaper: &Reaper) -> Result<DumpMode, CriuError> {
    let resp = one_request(reaper, &feature_check_request())?;
    Ok(DumpMode::from_feature_check(resp.as_ref()))
}

/// Asks CRIU (over RPC, FEATURE_CHECK `lazy_pages`) whether lazy restores
/// work here (userfaultfd with the non-cooperative events CRIU needs).
pub fn lazy_pages_check(reaper: &Reaper) -> Result<bool, CriuError> {
    let req = CriuReq {
        r#type: CriuReqType::FeatureCheck as i32,
        features: Some(rpc::CriuFeatures {
            lazy_pages: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    };
    Ok(matches!(one_request(reaper, &req)?, Some(r) if r.success
        && r.features.as_ref().and_then(|f| f.lazy_pages) == Some(true)))
}

/// Sends one request to a fresh `criu swrk` and returns its answer.
fn one_request(reaper: &Reaper, req: &CriuReq) -> Result<Option<CriuResp>, CriuError> {
    let (ours, theirs) = rpc_socketpair()?;
    let mut cmd = Command::new(criu_bin());
    cmd.args(["swrk", &SWRK_FD.to_string()]);
    let (spawned, stderr) = spawn_swrk(reaper, &mut cmd, theirs, "criu swrk")?;
    let conv = Conversation::new(ours);
    let resp = conv.call(req, &mut |_| true);
    drop(conv);
    let _ = spawned.exit.blocking_recv();
    let _ = stderr.and_then(|h| h.join().ok());
    resp
}

/// A FEATURE_CHECK request for dirty-memory tracking.
pub fn feature_check_request() -> CriuReq {
    CriuReq {
        r#type: CriuReqType::FeatureCheck as i32,
        features: Some(rpc::CriuFeatures {
            mem_track: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Reads CRIU's `stats-dump` file: two magic words, then one length-prefixed
/// `stats_entry`.
pub fn read_dump_stats(images_dir: &Path) -> Option<DumpStatsEntry> {
    let bytes = std::fs::read(images_dir.join("stats-dump")).ok()?;
    decode_stats(&bytes)?.dump
}

/// Reads CRIU's `stats-restore` file.
pub fn read_restore_stats(images_dir: &Path) -> Option<rpc::RestoreStatsEntry> {
    let bytes = std::fs::read(images_dir.join("stats-restore")).ok()?;
    decode_stats(&bytes)?.restore
}

fn decode_stats(bytes: &[u8]) -> Option<StatsEntry> {
    let len = u32::from_le_bytes(bytes.get(8..12)?.try_into().ok()?) as usize;
    StatsEntry::decode(bytes.get(12..12 + len)?).ok()
}

/// Creates the RPC socketpair (both ends close-on-exec).
pub fn rpc_socketpair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    Ok(socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?)
}

/// One conversation with a `criu swrk` process over a seqpacket socket.
pub struct Conversation {
    sock: OwnedFd,
}

impl Conversation {
    /// Wraps our end of the socketpair.
    pub fn new(sock: OwnedFd) -> Self {
        Conversation { sock }
    }

    /// Sends `req` and reads answers until the final one, answering CRIU's
    /// notifications (`post-dump`, `pre-restore`, ...) with `on_notify`'s
    /// verdict. Returns `None` if CRIU closed the socket without answering.
    pub fn call(
        &self,
        req: &CriuReq,
        on_notify: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Option<CriuResp>, CriuError> {
        self.send(req)?;
        loop {
            let Some(resp) = self.recv()? else {
                return Ok(None);
            };
            if resp.r#type == CriuReqType::Notify as i32 {
                let script = resp
                    .notify
                    .as_ref()
                    .and_then(|n| n.script.clone())
                    .unwrap_or_default();
                let ok = on_notify(&script);
                self.send(&CriuReq {
                    r#type: CriuReqType::Notify as i32,
                    notify_success: Some(ok),
                    ..Default::default()
                })?;
                continue;
            }
            return Ok(Some(resp));
        }
    }

    fn send(&self, req: &CriuReq) -> Result<(), CriuError> {
        let buf = req.encode_to_vec();
        send(self.sock.as_raw_fd(), &buf, MsgFlags::MSG_NOSIGNAL).map_err(std::io::Error::from)?;
        Ok(())
    }

    fn recv(&self) -> Result<Option<CriuResp>, CriuError> {
        let mut buf = vec![0u8; 1 << 16];
        let n = loop {
            match recv(self.sock.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                Ok(n) => break n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(nix::errno::Errno::ECONNRESET) => return Ok(None),
                Err(e) => return Err(std::io::Error::from(e).into()),
            }
        };
        if n == 0 {
            return Ok(None);
        }
        Ok(Some(CriuResp::decode(&buf[..n])?))
    }
}

/// Turns a final response into a result.
pub fn check_response(
    op: &'static str,
    resp: Option<CriuResp>,
    log: &str,
    status: Option<ExitStatus>,
) -> Result<CriuResp, CriuError> {
    match resp {
        Some(r) if r.success => Ok(r),
        Some(r) => {
            let mut message = error_lines(log);
            let errmsg = r.cr_errmsg.as_deref().map(error_lines).unwrap_or_default();
            if let Some(m) =
                Some(errmsg.as_str()).filter(|m| !m.is_empty() && !message.contains(*m))
            {
                message = if message.is_empty() {
                    m.to_string()
                } else {
                    format!("{m}; {message}")
                };
            }
            if message.is_empty() {
                message = "no error text from CRIU".into();
            }
            Err(CriuError::Failed {
                op,
                message,
                errno: r.cr_errno,
            })
        }
        None => Err(CriuError::Died {
            op,
            status: status
                .map(|s| s.to_string())
                .unwrap_or_else(|| "still running".into()),
            message: error_lines(log),
        }),
    }
}

/// Reads a pipe to the end on a thread (CRIU's stderr log).
pub fn collect(mut r: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v);
        String::from_utf8_lossy(&v).into_owned()
    })
}

/// Options for a dump that CRIU's RPC cannot carry, given on the `criu
/// swrk` command line. With `file_locks` (the job may hold file leases),
/// CRIU must not open the job's files to read their ELF build-id (its
/// default `--file-validation buildid`): that open breaks a lease the
/// frozen job can never answer, stalls the dump for the kernel's
/// lease-break-time (45 s) and the job gets SIGIO. Size-only validation
/// opens nothing.
pub fn dump_cli_options(o: &CriuOptions) -> Vec<&'static str> {
    if o.file_locks {
        vec!["--file-validation", "filesize"]
    } else {
        Vec::new()
    }
}

/// Result of a dump.
#[derive(Debug, Clone)]
pub struct DumpOutcome {
    /// Wall time from request to answer.
    pub duration: Duration,
    /// CRIU's own statistics (frozen time etc.), if it wrote them.
    pub stats: Option<DumpStatsEntry>,
    /// CRIU's log.
    pub log: String,
}

/// Dumps the process tree rooted at `host_pid` into `images_dir`, leaving it
/// running. CRIU runs inside the tree's PID and mount namespaces.
pub fn dump(
    reaper: &Reaper,
    host_pid: i32,
    images_dir: &Path,
    o: &CriuOptions,
    timeout: Option<Duration>,
    on_notify: &mut dyn FnMut(&str) -> bool,
) -> Result<DumpOutcome, CriuError> {
    dump_with(
        reaper,
        host_pid,
        images_dir,
        o,
        timeout,
        DumpMode::Full,
        on_notify,
        None,
        None,
    )
}

/// [`dump`] in the given [`DumpMode`]. With [`DumpMode::PreDump`] the
/// reported frozen time is the sum of both freezes. With `pages` (full
/// dumps only), CRIU sends the page maps and pages to supervise's page
/// server, which hands them to `pages`, instead of writing them into
/// `images_dir`.
#[allow(clippy::too_many_arguments)]
pub fn dump_with(
    reaper: &Reaper,
    host_pid: i32,
    images_dir: &Path,
    o: &CriuOptions,
    timeout: Option<Duration>,
    mode: DumpMode,
    on_notify: &mut dyn FnMut(&str) -> bool,
    pages: Option<&mut (dyn page_server::DumpSink + Send)>,
    owner: Option<&crate::userns::Owner>,
) -> Result<DumpOutcome, CriuError> {
    let pages = pages.filter(|_| mode == DumpMode::Full);
    if mode == DumpMode::PreDump {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(images_dir.join(PRE_DUMP_DIR))?;
    }
    let ns_pid = crate::proc::ns_pid(host_pid)?;
    // CRIU runs in the job's mount namespace, which need not see a mount
    // made after the job started (a private tmpfs holding the dump, on a
    // host whose mounts do not propagate): it gets the directory as a
    // descriptor and opens it as /proc/self/fd/N, which reaches the very
    // directory we opened whatever that namespace holds.
    let dir_fd: OwnedFd = nix::fcntl::open(
        images_dir,
        nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    // SAFETY: a fresh descriptor we own.
    .map(|fd| unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
    .map_err(|e| {
        std::io::Error::new(
            std::io::Error::from(e).kind(),
            format!("{}: {e}", images_dir.display()),
        )
    })?;
    let criu_dir = PathBuf::from(format!("/proc/self/fd/{IMG_FD}"));
    let (ours, theirs) = rpc_socketpair()?;
    let mut cmd = match owner {
        // An owned job: CRIU runs in its user, PID and mount namespaces as
        // its owner (crate::userns), and writes into a directory the owner
        // may write (it reaches it only through the descriptor).
        Some(ow) => {
            nix::unistd::fchown(
                dir_fd.as_raw_fd(),
                Some(nix::unistd::Uid::from_raw(ow.uid)),
                Some(nix::unistd::Gid::from_raw(ow.gid)),
            )
            .map_err(std::io::Error::from)?;
            let groups = if ow.groups.is_empty() {
                "-".to_string()
            } else {
                ow.groups
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            };
            let mut c = Command::new(std::env::current_exe()?);
            c.arg("__nsexec")
                .arg(host_pid.to_string())
                .arg(ow.uid.to_string())
                .arg(ow.gid.to_string())
                .arg(groups);
            c
        }
        None => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--target={host_pid}"))
                .args(["--pid", "--mount", "--"]);
            c
        }
    };
    cmd.arg(criu_bin())
        .args(dump_cli_options(o))
        .args(["swrk", &SWRK_FD.to_string()]);
    let start = Instant::now();
    let ps = match pages {
        Some(_) => Some(
            socketpair(
                AddressFamily::Unix,
                SockType::Stream,
                None,
                SockFlag::SOCK_CLOEXEC,
            )
            .map_err(std::io::Error::from)?,
        ),
        None => None,
    };
    let mut extra = vec![(dir_fd, IMG_FD)];
    let mut ps_ours = None;
    if let Some((ours, theirs)) = ps {
        extra.push((theirs, PS_FD));
        ps_ours = Some(ours);
    }
    let (spawned, stderr) = spawn_swrk_with(reaper, &mut cmd, theirs, extra, "nsenter/criu swrk")?;
    let conv = Conversation::new(ours);
    let mut reqs = dump_requests(ns_pid, &criu_dir, o, timeout, true, mode);
    if owner.is_some() {
        for r in reqs.iter_mut() {
            if let Some(opts) = r.opts.as_mut() {
                opts.unprivileged = Some(true);
            }
        }
    }
    if ps_ours.is_some() {
        for r in reqs.iter_mut() {
            if let Some(opts) = r.opts.as_mut() {
                opts.ps = Some(rpc::CriuPageServerInfo {
                    fd: Some(PS_FD),
                    ..Default::default()
                });
            }
        }
    }
    let mut resps = Vec::new();
    let served = std::thread::scope(|s| {
        let server = match (ps_ours, pages) {
            (Some(sock), Some(sink)) => Some(s.spawn(move || {
                let mut stream = std::os::unix::net::UnixStream::from(sock);
                page_server::serve_dump(&mut stream, sink)
            })),
            _ => None,
        };
        for req in &reqs {
            let op = if req.r#type == CriuReqType::PreDump as i32 {
                "pre-dump"
            } else {
                "dump"
            };
            let resp = conv.call(req, on_notify);
            let failed = !matches!(&resp, Ok(Some(r)) if r.success);
            resps.push((op, resp));
            if failed {
                break;
            }
        }
        drop(conv);
        // CRIU is done with the socket (it has answered, or it is gone):
        // the server sees the end of the conversation or of the socket.
        server.map(|h| h.join())
    });
    let status = spawned.exit.blocking_recv().ok();
    let log = stderr.and_then(|h| h.join().ok()).unwrap_or_default();
    // Storing the pages failing (e.g. a full disk) is the cause when CRIU
    // then fails to send them: said first.
    if let Some(Ok(Err(e @ page_server::PageServerError::Sink(_)))) = &served {
        let criu = resps
            .iter()
            .find_map(|(_, r)| match r {
                Ok(Some(r)) if !r.success => Some(error_lines(&log)),
                _ => None,
            })
            .unwrap_or_default();
        return Err(CriuError::Failed {
            op: "dump",
            message: if criu.is_empty() {
                e.to_string()
            } else {
                format!("{e}; so CRIU failed: {criu}")
            },
            errno: None,
        });
    }
    for (op, resp) in resps {
        check_response(op, resp?, &log, status)?;
    }
    match served {
        None | Some(Ok(Ok(_))) => {}
        Some(Ok(Err(e))) => {
            return Err(CriuError::Failed {
                op: "dump",
                message: e.to_string(),
                errno: None,
            })
        }
        Some(Err(_)) => {
            return Err(CriuError::Failed {
                op: "dump",
                message: "the page server thread panicked".into(),
                errno: None,
            })
        }
    }
    let mut stats = read_dump_stats(images_dir);
    if mode == DumpMode::PreDump {
        let pre = read_dump_stats(&images_dir.join(PRE_DUMP_DIR)).and_then(|s| s.frozen_time);
        if let (Some(s), Some(p)) = (stats.as_mut(), pre) {
            s.frozen_time = Some(s.frozen_time.unwrap_or(0).saturating_add(p));
        }
    }
    Ok(DumpOutcome {
        duration: start.elapsed(),
        stats,
        log,
    })
}

/// Spawns `cmd` (a `criu swrk` command line) through the reaper with
/// `theirs` as its RPC socket on [`SWRK_FD`] and its stderr captured;
/// returns the child and the thread collecting its log.
fn spawn_swrk(
    reaper: &Reaper,
    cmd: &mut Command,
    theirs: OwnedFd,
    what: &str,
) -> Result<(Spawned, Option<JoinHandle<String>>), CriuError> {
    spawn_swrk_with(reaper, cmd, theirs, Vec::new(), what)
}

/// [`spawn_swrk`], also giving CRIU each `(fd, number)` of `extra`.
fn spawn_swrk_with(
    reaper: &Reaper,
    cmd: &mut Command,
    theirs: OwnedFd,
    extra: Vec<(OwnedFd, RawFd)>,
    what: &str,
) -> Result<(Spawned, Option<JoinHandle<String>>), CriuError> {
    // Moved above any target number first, so that no dup2 clobbers a
    // descriptor still to be placed.
    let mut high = Vec::new();
    for (fd, target) in std::iter::once((theirs, SWRK_FD)).chain(extra) {
        let h = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(100))
            .map_err(std::io::Error::from)?;
        // SAFETY: a fresh descriptor we own.
        high.push((
            unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(h) },
            target,
        ));
    }
    let raw: Vec<(RawFd, RawFd)> = high.iter().map(|(f, t)| (f.as_raw_fd(), *t)).collect();
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: only async-signal-safe calls (dup2/fcntl) between fork and exec.
    unsafe {
        cmd.pre_exec(move || raw.iter().try_for_each(|(fd, t)| inherit_as(*fd, *t)));
    }
    let mut spawned = reaper.spawn(cmd).map_err(|e| CriuError::Spawn {
        what: what.into(),
        source: e,
    })?;
    drop(high);
    let stderr = spawned
        .child
        .as_mut()
        .and_then(|c| c.stderr.take())
        .map(collect);
    Ok((spawned, stderr))
}

/// In a freshly forked child: make `fd` available as `target`, without
/// close-on-exec.
pub fn inherit_as(fd: RawFd, target: RawFd) -> std::io::Result<()> {
    // SAFETY: dup2/fcntl on valid descriptors; async-signal-safe.
    unsafe {
        if fd == target {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                return Err(std::io::Error::last_os_error());
            }
        } else if libc::dup2(fd, target) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> CriuOptions {
        CriuOptions {
            shell_job: true,
            tcp_established: false,
            file_locks: true,
            ext_unix_sk: false,
            log_level: 2,
            network_lock: NetworkLock::Nftables,
            ..Default::default()
        }
    }

    /// The dump-only options go to the DUMP request (not the pre-dump), the
    /// restore-only one to the RESTORE request, the pass-through to all.
    #[test]
    fn options_go_to_their_requests() {
        let mut o = CriuOptions {
            ghost_limit: Some(8 << 20),
            skip_in_flight: true,
            link_remap: true,
            tcp_close: true,
            ..opts()
        };
        o.pass_through
            .insert("manage_cgroups".into(), OptValue::Bool(true));
        o.pass_through
            .insert("enable_fs".into(), OptValue::List(vec!["fuse".into()]));
        let dir = Path::new("/i");
        let decode = |r: CriuReq| {
            CriuReq::decode(&r.encode_to_vec()[..])
                .unwrap()
                .opts
                .unwrap()
        };
        let reqs = dump_requests(1, dir, &o, None, true, DumpMode::PreDump);
        let pre = decode(reqs[0].clone());
        let dump = decode(reqs[1].clone());
        let restore = decode(restore_request(dir, &o, true));
        assert_eq!(dump.ghost_limit, Some(8 << 20));
        assert_eq!(dump.tcp_skip_in_flight, Some(true));
        assert_eq!(dump.link_remap, Some(true));
        assert_eq!(dump.tcp_close, None);
        for other in [&pre, &restore] {
            assert_eq!(other.ghost_limit, None);
            assert_eq!(other.tcp_skip_in_flight, None);
            assert_eq!(other.link_remap, None);
        }
        assert_eq!(pre.tcp_close, None);
        assert_eq!(restore.tcp_close, Some(true));
        for r in [&pre, &dump, &restore] {
            assert_eq!(r.manage_cgroups, Some(true));
            assert_eq!(r.enable_fs, ["fuse"]);
        }
        // Unset, ghost_limit is left to CRIU (its default, 1 MiB).
        let d = decode(dump_request(1, dir, &opts(), None, true));
        assert_eq!(d.ghost_limit, None);
        assert_eq!(d.manage_cgroups, None);
        assert!(d.enable_fs.is_empty());
    }

    #[test]
    fn dump_request_fields_round_trip() {
        let req = dump_request(
            1000,
            Path::new("/img/x"),
            &opts(),
            Some(Duration::from_secs(90)),
            true,
        );
        let bytes = req.encode_to_vec();
        let back = CriuReq::decode(&bytes[..]).unwrap();
        assert_eq!(back.r#type, CriuReqType::Dump as i32);
        let o = back.opts.unwrap();
        assert_eq!(o.images_dir_fd, -1);
        assert_eq!(o.images_dir.as_deref(), Some("/img/x"));
        assert_eq!(o.pid, Some(1000));
        assert_eq!(o.leave_running, Some(true));
        assert_eq!(o.shell_job, Some(true));
        assert_eq!(o.file_locks, Some(true));
        assert_eq!(o.log_to_stderr, Some(true));
        assert_eq!(o.timeout, Some(90));
        assert_eq!(o.notify_scripts, Some(true));
        // No TCP connections to keep: no network lock (it costs frozen time).
        assert_eq!(o.network_lock, None);
        let tcp = CriuOptions {
            tcp_established: true,
            ..opts()
        };
        let o = dump_request(1000, Path::new("/i"), &tcp, None, true)
            .opts
            .unwrap();
        assert_eq!(o.tcp_established, Some(true));
        assert_eq!(
            o.network_lock,
            Some(rpc::CriuNetworkLockMethod::Nftables as i32)
        );
    }

    #[test]
    fn images_dir_fd_is_always_encoded() {
        // images_dir_fd is `required` in rpc.proto: CRIU rejects a request without it.
        let bytes = restore_request(Path::new("/i"), &opts(), false).encode_to_vec();
        // field 2 (opts) ... contains tag 1 varint -1 => 0x08 0xff..0x01
        let o = CriuReq::decode(&bytes[..]).unwrap().opts.unwrap();
        assert_eq!(o.images_dir_fd, -1);
        assert_eq!(o.rst_sibling, Some(true));
        assert!(bytes.windows(2).any(|w| w == [0x08, 0xff]));
    }

    #[test]
    fn pre_dump_request_tracks_memory_with_parent() {
        let req = pre_dump_request(7, Path::new("/i/2"), Some("../1"), &opts());
        assert_eq!(req.r#type, CriuReqType::PreDump as i32);
        let o = req.opts.unwrap();
        assert_eq!(o.track_mem, Some(true));
        assert_eq!(o.parent_img.as_deref(), Some("../1"));
        assert_eq!(o.leave_running, None);
        let f = feature_check_request();
        assert_eq!(f.features.unwrap().mem_track, Some(true));
    }

    #[test]
    fn pre_dump_is_used_only_when_criu_confirms_mem_track() {
        let resp = |success, mem_track| CriuResp {
            r#type: CriuReqType::FeatureCheck as i32,
            success,
            features: Some(rpc::CriuFeatures {
                mem_track,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            DumpMode::from_feature_check(Some(&resp(true, Some(true)))),
            DumpMode::PreDump
        );
        assert_eq!(
            DumpMode::from_feature_check(Some(&resp(true, Some(false)))),
            DumpMode::Full
        );
        assert_eq!(
            DumpMode::from_feature_check(Some(&resp(true, None))),
            DumpMode::Full
        );
        assert_eq!(
            DumpMode::from_feature_check(Some(&resp(false, Some(true)))),
            DumpMode::Full
        );
        let mut no_features = resp(true, None);
        no_features.features = None;
        assert_eq!(
            DumpMode::from_feature_check(Some(&no_features)),
            DumpMode::Full
        );
        assert_eq!(DumpMode::from_feature_check(None), DumpMode::Full);
        // Round trip through the wire format, as CRIU would send it.
        let bytes = resp(true, Some(true)).encode_to_vec();
        let back = CriuResp::decode(&bytes[..]).unwrap();
        assert_eq!(DumpMode::from_feature_check(Some(&back)), DumpMode::PreDump);
    }

    #[test]
    fn dump_requests_per_mode() {
        let dir = Path::new("/s/.staging-000003");
        let full = dump_requests(1000, dir, &opts(), None, true, DumpMode::Full);
        assert_eq!(full.len(), 1);
        assert_eq!(full[0], dump_request(1000, dir, &opts(), None, true));
        assert_eq!(full[0].opts.as_ref().unwrap().track_mem, None);

        let reqs = dump_requests(
            1000,
            dir,
            &opts(),
            Some(Duration::from_secs(5)),
            true,
            DumpMode::PreDump,
        );
        assert_eq!(reqs.len(), 2);
        let bytes: Vec<Vec<u8>> = reqs.iter().map(|r| r.encode_to_vec()).collect();
        let pre = CriuReq::decode(&bytes[0][..]).unwrap();
        let dump = CriuReq::decode(&bytes[1][..]).unwrap();
        assert_eq!(pre.r#type, CriuReqType::PreDump as i32);
        let po = pre.opts.unwrap();
        assert_eq!(po.images_dir.as_deref(), Some("/s/.staging-000003/pre"));
        assert_eq!(po.pid, Some(1000));
        assert_eq!(po.track_mem, Some(true));
        assert_eq!(po.parent_img, None);
        assert_eq!(dump.r#type, CriuReqType::Dump as i32);
        let d = dump.opts.unwrap();
        assert_eq!(d.images_dir.as_deref(), Some("/s/.staging-000003"));
        assert_eq!(d.track_mem, Some(true));
        assert_eq!(d.parent_img.as_deref(), Some(PRE_DUMP_DIR));
        assert_eq!(d.leave_running, Some(true));
        assert_eq!(d.timeout, Some(5));
        assert_eq!(d.pid, Some(1000));
    }

    #[test]
    fn stats_dump_is_decoded() {
        // Bytes of a real stats-dump written by CRIU 4.2.1 on this machine.
        let bytes: [u8; 45] = [
            0x40, 0x59, 0x10, 0x55, 0x06, 0x33, 0x09, 0x57, 0x21, 0x00, 0x00, 0x00, 0x0a, 0x1f,
            0x08, 0x88, 0x01, 0x10, 0xb7, 0x3c, 0x18, 0xeb, 0x03, 0x20, 0x6d, 0x28, 0x2a, 0x30,
            0x00, 0x38, 0x1c, 0x40, 0x00, 0x48, 0x00, 0x50, 0x06, 0x58, 0x06, 0x60, 0x00, 0x68,
            0x00, 0x70, 0x00,
        ];
        let d = decode_stats(&bytes).unwrap().dump.unwrap();
        assert_eq!(d.freezing_time, Some(136));
        assert_eq!(d.frozen_time, Some(7735));
        assert_eq!(d.pages_scanned, Some(42));
        assert_eq!(d.pages_written, Some(28));
        assert!(decode_stats(&bytes[..10]).is_none());
    }

    #[test]
    fn version_and_error_text() {
        assert_eq!(parse_version("Version: 4.2.1\n"), Some((4, 2, 1)));
        assert_eq!(parse_version("Version: 3.17\nGitID: x"), Some((3, 17, 0)));
        assert_eq!(parse_version("nothing"), None);
        let log = "Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted\n\
                   Warn (x): y\n  1000: Error (criu/files-reg.c:2175): File tmp/out has bad size 89 (expect 12)\n";
        let e = error_lines(log);
        assert!(e.contains("bad size 89"), "{e}");
        assert!(!e.contains("RLIMIT_NOFILE"), "{e}");
    }

    #[test]
    fn failed_response_carries_criu_text() {
        let resp = CriuResp {
            r#type: CriuReqType::Dump as i32,
            success: false,
            cr_errno: Some(3),
            cr_errmsg: Some("No process with such pid".into()),
            ..Default::default()
        };
        let err = check_response("dump", Some(resp), "Error (x): boom\n", None).unwrap_err();
        let s = err.to_string();
        assert!(
            s.contains("No process with such pid") && s.contains("boom"),
            "{s}"
        );
        let died = check_response("restore", None, "", Some(ExitStatus::Signal(9))).unwrap_err();
        assert!(died.to_string().contains("killed by SIGKILL"));
    }

    #[test]
    fn leases_get_size_only_file_validation() {
        let mut o = CriuOptions::default();
        assert!(dump_cli_options(&o).is_empty());
        o.file_locks = true;
        assert_eq!(dump_cli_options(&o), ["--file-validation", "filesize"]);
    }
}
