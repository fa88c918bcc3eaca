//! Lazy restore: CRIU's `lazy-pages` daemon fills the restored job's
//! private anonymous memory through userfaultfd, asking supervise's page
//! server ([`super::page_server::serve_lazy`]) for the pages — first the
//! ones the job faults on, then, in the background, all the rest, after
//! which the daemon exits and the job no longer depends on supervise.
//!
//! **The job must never run on with missing memory.** Once the daemon's
//! userfaultfd closes, the kernel fills every page not transferred yet
//! with zeros. So, while pages are missing:
//!
//! * if a page cannot be served (missing or damaged in the store), the
//!   server kills the job (its namespace init, so the whole tree) and
//!   waits for it to be gone *before* it closes the socket;
//! * if supervise itself dies, a guard process ([`Guard`]), forked before
//!   the restore and holding its own copy of the page-server socket, sees
//!   supervise's end of a pipe close, kills the job the same way, waits,
//!   and only then exits (which closes the last copy of the socket). The
//!   daemon, blocked on the socket meanwhile, keeps the faulting threads
//!   waiting, so they never see a zero page;
//! * if the daemon dies (it is the one holding the userfaultfd), the
//!   server sees the socket close without the daemon's goodbye and kills
//!   the job at once; this is the one window in which a thread of the job
//!   could touch a zero-filled page before it dies (documented).
//!
//! When the daemon says goodbye, every page is resident; the guard is told
//! so and exits without touching the job.

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

use super::page_server::{serve_lazy, LazyEnd, PageServerError, PageSource, ServeStats};
use super::{collect, criu_bin, error_lines, CriuError};
use crate::reaper::{Reaper, Spawned};

/// How long the daemon may take to be ready.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a kill of the job may take to be seen.
const KILL_WAIT: Duration = Duration::from_secs(30);

/// A `criu lazy-pages` daemon, listening for the restore in the image
/// directory, connected to supervise's page server.
pub struct LazyDaemon {
    spawned: Spawned,
    log: Option<JoinHandle<String>>,
    sock: OwnedFd,
    ready: Option<OwnedFd>,
    /// Kills the daemon if it is dropped before a session takes it over
    /// (it would wait for a restore that never connects).
    killer: Killer,
}

struct Killer {
    pid: i32,
    armed: bool,
}

impl Drop for Killer {
    fn drop(&mut self) {
        if self.armed {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

impl LazyDaemon {
    /// Starts the daemon for the image in `dir` (also its work directory,
    /// where it listens on `lazy-pages.socket`); see [`wait_ready`].
    ///
    /// [`wait_ready`]: LazyDaemon::wait_ready
    pub fn start(reaper: &Reaper, dir: &Path, log_level: u32) -> Result<LazyDaemon, CriuError> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(std::io::Error::from)?;
        // Answers of up to 4 MiB go out in one piece rather than in
        // socket-buffer-sized slices, each a wakeup of the daemon.
        set_sndbuf(&ours, 8 << 20);
        let (ready_r, ready_w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from)?;
        let mut cmd = Command::new(criu_bin());
        cmd.arg("lazy-pages")
            .args(["--page-server", "--ps-socket", "3", "--status-fd", "4"])
            .arg("-D")
            .arg(dir)
            .arg("-W")
            .arg(dir)
            .args(["-o", "-", &format!("-v{log_level}")])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let fds = [(theirs.as_raw_fd(), 3), (ready_w.as_raw_fd(), 4)];
        // SAFETY: only fcntl/dup2 between fork and exec.
        unsafe {
            cmd.pre_exec(move || inherit_all(&fds));
        }
        let mut spawned = reaper.spawn(&mut cmd).map_err(|e| CriuError::Spawn {
            what: "criu lazy-pages".into(),
            source: e,
        })?;
        drop(theirs);
        drop(ready_w);
        let log = spawned
            .child
            .as_mut()
            .and_then(|c| c.stdout.take())
            .map(collect);
        let pid = spawned.pid;
        Ok(LazyDaemon {
            spawned,
            log,
            sock: ours,
            ready: Some(ready_r),
            killer: Killer { pid, armed: true },
        })
    }

    /// Waits until the daemon listens (it says so on its status pipe); a
    /// daemon that does not is killed.
    pub fn wait_ready(&mut self) -> Result<(), CriuError> {
        let Some(ready_r) = self.ready.take() else {
            return Ok(());
        };
        match wait_readable(&ready_r, READY_TIMEOUT) {
            Ok(true) => {
                let mut b = [1u8; 1];
                if matches!(std::fs::File::from(ready_r).read(&mut b), Ok(1)) {
                    return Ok(());
                }
            }
            Ok(false) => {}
            Err(e) => {
                self.kill();
                return Err(e.into());
            }
        }
        self.kill();
        let log = self.take_log();
        Err(CriuError::Failed {
            op: "lazy-pages",
            message: format!(
                "the lazy-pages daemon did not get ready: {}",
                error_lines(&log)
            ),
            errno: None,
        })
    }

    fn kill(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.spawned.pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }

    fn take_log(&mut self) -> String {
        self.log
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }

    /// Our end of the page-server socket.
    pub fn socket(&self) -> &OwnedFd {
        &self.sock
    }

    /// The daemon's PID.
    pub fn pid(&self) -> i32 {
        self.spawned.pid
    }
}

/// How a lazy restore ended.
#[derive(Debug, Clone)]
pub struct LazyOutcome {
    /// `Ok`: every page is resident and the job depends on nobody; `Err`:
    /// why not (the job has been killed).
    pub result: Result<(), LazyFailure>,
    /// Page bytes served.
    pub bytes: u64,
    /// Requests, and the time spent reading pages and sending them.
    pub stats: ServeStats,
    /// From the start of serving to the end.
    pub elapsed: Duration,
    /// When it ended.
    pub ended: Instant,
}

/// Why a lazy restore's serving ended before every page was resident.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LazyFailure {
    /// Why, in words.
    pub message: String,
    /// The pages asked for could not be read from the image (missing or
    /// damaged): the image's fault, not the lazy machinery's.
    pub unservable: bool,
}

impl LazyFailure {
    fn other(message: impl Into<String>) -> LazyFailure {
        LazyFailure {
            message: message.into(),
            unservable: false,
        }
    }
}

impl std::fmt::Display for LazyFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// A lazy restore being served; see [`LazySession::wait`].
pub struct LazySession {
    handle: Option<JoinHandle<LazyOutcome>>,
    started: Instant,
    daemon: i32,
}

impl LazySession {
    /// Serves `source` to `daemon` (ready: [`LazyDaemon::wait_ready`]) on a
    /// thread until every page is resident or serving fails. `job` is a pidfd of the restored tree's
    /// namespace init (killing it kills the tree); `guard` the guard of
    /// the socket (see the module documentation).
    pub fn serve(
        mut daemon: LazyDaemon,
        job: OwnedFd,
        guard: Guard,
        mut source: Box<dyn PageSource + Send>,
    ) -> LazySession {
        let started = Instant::now();
        let pid = daemon.pid();
        // From now on the serving thread ends the daemon's life.
        daemon.killer.armed = false;
        let handle = std::thread::Builder::new()
            .name("lazy-pages".into())
            .spawn(move || {
                let sock = daemon.sock.try_clone();
                let mut stats = ServeStats::default();
                let r = match sock {
                    Ok(s) => {
                        let mut stream = UnixStream::from(s);
                        let r = serve_lazy(&mut stream, &mut *source, &mut stats);
                        (r, Some(stream))
                    }
                    Err(e) => (Err(PageServerError::Io(e)), None),
                };
                let result = match r {
                    (Ok(LazyEnd::Done), _) => {
                        let log = daemon.take_log();
                        let status = daemon.spawned.exit.blocking_recv().ok();
                        match status {
                            Some(s) if s.success() => Ok(()),
                            s => {
                                // Everything was sent; the daemon failing
                                // after its goodbye leaves nothing missing.
                                tracing::debug!(status = ?s, log = %error_lines(&log), "lazy-pages daemon ended after its goodbye");
                                Ok(())
                            }
                        }
                    }
                    (Ok(LazyEnd::HungUp), stream) => {
                        kill_and_wait(&job);
                        drop(stream);
                        let log = daemon.take_log();
                        let status = daemon.spawned.exit.blocking_recv().ok();
                        Err(LazyFailure::other(format!(
                            "the lazy-pages daemon ended ({}) before every page was transferred: {}",
                            status.map(|s| s.to_string()).unwrap_or_else(|| "unknown".into()),
                            error_lines(&log)
                        )))
                    }
                    (Err(e), stream) => {
                        // The job first, then the socket (see above).
                        kill_and_wait(&job);
                        drop(stream);
                        daemon.kill();
                        let _ = daemon.take_log();
                        let _ = daemon.spawned.exit.blocking_recv();
                        Err(LazyFailure {
                            unservable: matches!(e, PageServerError::Source(_)),
                            message: e.to_string(),
                        })
                    }
                };
                drop(daemon.sock);
                guard.release();
                LazyOutcome {
                    result,
                    bytes: stats.bytes,
                    stats,
                    elapsed: started.elapsed(),
                    ended: Instant::now(),
                }
            })
            .expect("spawning the lazy-pages thread");
        LazySession {
            handle: Some(handle),
            started,
            daemon: pid,
        }
    }

    /// Ends a session whose restore failed (no job runs from it): the
    /// daemon is killed and the server waited for.
    pub fn abort(mut self) -> LazyOutcome {
        if !self.is_finished() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.daemon),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        self.join()
    }

    /// Waits for the end (blocking).
    pub fn wait(mut self) -> LazyOutcome {
        self.join()
    }

    fn join(&mut self) -> LazyOutcome {
        match self.handle.take().map(|h| h.join()) {
            Some(Ok(o)) => o,
            _ => LazyOutcome {
                result: Err(LazyFailure::other("the lazy-pages thread panicked")),
                bytes: 0,
                stats: ServeStats::default(),
                elapsed: self.started.elapsed(),
                ended: Instant::now(),
            },
        }
    }

    /// True once serving has ended.
    pub fn is_finished(&self) -> bool {
        self.handle.as_ref().map_or(true, |h| h.is_finished())
    }
}

/// Kills the process behind `pidfd` and waits (bounded) until it is gone.
pub fn kill_and_wait(pidfd: &OwnedFd) {
    let _ = crate::pidfd::send_signal(pidfd, libc::SIGKILL);
    let _ = wait_readable(pidfd, KILL_WAIT);
}

/// Best effort: a larger send buffer (as root: past `wmem_max`).
fn set_sndbuf(fd: &OwnedFd, bytes: i32) {
    for opt in [libc::SO_SNDBUFFORCE, libc::SO_SNDBUF] {
        // SAFETY: setsockopt with an int option on a valid socket.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&bytes as *const i32).cast(),
                std::mem::size_of::<i32>() as libc::socklen_t,
            )
        };
        if r == 0 {
            return;
        }
    }
}

fn wait_readable(fd: &OwnedFd, timeout: Duration) -> std::io::Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut p, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return Ok(n > 0);
    }
}

/// In a forked child: makes each `(fd, target)` available as `target`
/// (without close-on-exec), even when numbers overlap.
fn inherit_all(fds: &[(RawFd, RawFd)]) -> std::io::Result<()> {
    let mut high = [0 as RawFd; 8];
    for (i, (fd, _)) in fds.iter().enumerate() {
        // SAFETY: fcntl on a valid descriptor; async-signal-safe.
        let h = unsafe { libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 1000) };
        if h < 0 {
            return Err(std::io::Error::last_os_error());
        }
        high[i] = h;
    }
    for (i, (_, target)) in fds.iter().enumerate() {
        // SAFETY: dup2 of valid descriptors; async-signal-safe.
        if unsafe { libc::dup2(high[i], *target) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The guard of a lazy restore: a forked copy of supervise that does
/// nothing but wait; see the module documentation.
pub struct Guard {
    w: Option<OwnedFd>,
}

impl Guard {
    /// Forks the guard, giving it the job's pidfd and a copy of the page
    /// server socket.
    pub fn spawn(reaper: &Reaper, job: &OwnedFd, sock: &OwnedFd) -> std::io::Result<Guard> {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let fds = [r.as_raw_fd(), job.as_raw_fd(), sock.as_raw_fd()];
        let spawned = reaper.spawn_with(|| {
            // SAFETY: the child only makes raw system calls (no allocation,
            // no locks) until it exits: see `guard_child`.
            let pid = unsafe { libc::fork() };
            match pid {
                -1 => Err(std::io::Error::last_os_error()),
                0 => guard_child(fds),
                pid => Ok(pid),
            }
        })?;
        drop(r);
        drop(spawned);
        Ok(Guard { w: Some(w) })
    }

    /// Every page is resident (or the job is dead): the guard exits
    /// without touching the job.
    pub fn release(mut self) {
        self.tell();
    }

    fn tell(&mut self) {
        if let Some(w) = self.w.take() {
            // SAFETY: write of one byte to our pipe.
            unsafe { libc::write(w.as_raw_fd(), b"d".as_ptr().cast(), 1) };
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        // Only supervise's death (the kernel closing the pipe without a
        // word) makes the guard kill the job.
        self.tell();
    }
}

/// The guard's whole life (in the forked child: raw system calls only).
fn guard_child(fds: [RawFd; 3]) -> ! {
    // SAFETY: async-signal-safe system calls on descriptors inherited from
    // the parent; the process ends with _exit.
    unsafe {
        let mut high = [0; 3];
        for (i, fd) in fds.iter().enumerate() {
            high[i] = libc::fcntl(*fd, libc::F_DUPFD, 1000);
            if high[i] < 0 {
                libc::_exit(1);
            }
        }
        for (i, h) in high.iter().enumerate() {
            if libc::dup2(*h, 3 + i as i32) < 0 {
                libc::_exit(1);
            }
        }
        // Nothing else of supervise's stays open here (store locks above
        // all).
        libc::syscall(libc::SYS_close_range, 6u32, u32::MAX, 0u32);
        libc::prctl(
            libc::PR_SET_NAME,
            c"supervise-guard".as_ptr() as libc::c_ulong,
            0,
            0,
            0,
        );
        let mut b = [0u8; 1];
        loop {
            let n = libc::read(3, b.as_mut_ptr().cast(), 1);
            if n > 0 {
                libc::_exit(0);
            }
            if n < 0 && *libc::__errno_location() == libc::EINTR {
                continue;
            }
            break;
        }
        // supervise is gone while pages are missing: the job first.
        crate::pidfd::send_signal_raw(4, libc::SIGKILL);
        let mut p = libc::pollfd {
            fd: 4,
            events: libc::POLLIN,
            revents: 0,
        };
        libc::poll(&mut p, 1, KILL_WAIT.as_millis() as i32);
        libc::_exit(0)
    }
}
