//! A job's process tree as the supervisor sees it: launching it under a
//! namespace init, restoring it from an image, attaching to a running one,
//! waiting for its end and killing it.

use std::ffi::CString;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sched::CloneFlags;
use tokio::io::unix::AsyncFd;
use tokio::sync::oneshot;

use crate::config::LaunchSpec;
use crate::criu::lazy::{Guard, LazyDaemon, LazySession};
use crate::criu::page_server::PageSource;
use crate::criu::{self, CriuError, CriuOptions};
use crate::init::{self, InitMode, InitSpec, Report};
use crate::reaper::{ExitStatus, Reaper};

/// Errors starting or restoring a job.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The namespace init could not be created.
    #[error("cannot create the job's namespace init: {0}")]
    Init(std::io::Error),
    /// The init reported a failure (e.g. the command does not exist).
    #[error("{0}")]
    Start(String),
    /// CRIU failed.
    #[error(transparent)]
    Criu(#[from] CriuError),
    /// A lazy restore could not be set up or CRIU failed it; the job does
    /// not run (an eager restore may be tried).
    #[error("lazy restore failed: {0}")]
    Lazy(String),
    /// Anything else from the OS.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
}

impl JobError {
    /// True when the job could not be started or restored because a
    /// resource of supervise's ran short (descriptors, memory, processes):
    /// nothing is wrong with the job or its image, and the same step may
    /// work later.
    pub fn is_resource(&self) -> bool {
        use crate::fdlimit::is_resource_error;
        match self {
            JobError::Init(e) | JobError::Io { source: e, .. } => is_resource_error(e),
            JobError::Criu(CriuError::Spawn { source, .. })
            | JobError::Criu(CriuError::Io(source)) => is_resource_error(source),
            _ => false,
        }
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> JobError {
    let what = what.into();
    move |source| JobError::Io { what, source }
}

/// How supervise learns that the job's root ended.
pub enum Waiter {
    /// Our child init mirrors the root's end (report pipe + exit status).
    Init {
        /// The init's exit, from the reaper.
        exit: oneshot::Receiver<ExitStatus>,
        /// The rest of the report pipe.
        report: File,
    },
    /// An attached process: its pidfd becomes readable when it exits.
    Pidfd(AsyncFd<OwnedFd>),
    /// Not a process: an engine's stand-in (the supervisor's test double)
    /// reports the end on a channel and is killed through a callback.
    Channel {
        /// The end.
        exit: oneshot::Receiver<ExitStatus>,
        /// What [`Running::kill`] does.
        kill: Box<dyn Fn() + Send + Sync>,
    },
    /// A job re-adopted from an earlier supervise: a pidfd on its init (or
    /// on its root, if it has none); the init records how the root ended in
    /// the status file.
    Adopted {
        /// Readable when the watched process exits.
        pidfd: AsyncFd<OwnedFd>,
        /// The watched process.
        pid: i32,
        /// `<state_dir>/exit-status`.
        status_file: PathBuf,
    },
}

fn register_pidfd(pid: i32) -> Result<AsyncFd<OwnedFd>, JobError> {
    let fd = crate::proc::pidfd_open(pid).map_err(io(format!("pidfd_open({pid})")))?;
    // SAFETY: `fd` is an owned pidfd that lives inside the AsyncFd for as
    // long as the registration does.
    unsafe { AsyncFd::register(fd) }
        .map_err(|e| std::io::Error::other(e.to_string()))
        .map_err(io("registering the pidfd"))
}

/// A running job.
pub struct Running {
    /// PID of the root process in supervise's namespace (0 if it ended
    /// before supervise could see it).
    pub host_pid: i32,
    /// PID of the root inside its own namespace.
    pub ns_pid: i32,
    /// The namespace init (None for an attached job that was never restored).
    pub init_pid: Option<i32>,
    /// Start time of the root (clock ticks since boot), to tell it from a
    /// reused PID.
    pub start_time: u64,
    /// When supervise started or restored it.
    pub since: Instant,
    waiter: Option<Waiter>,
}

impl Running {
    /// Waits for the job's root to end. Cancel-safe: can be polled again.
    pub async fn wait(&mut self) -> ExitStatus {
        let status = match self.waiter.as_mut() {
            None => std::future::pending().await,
            Some(Waiter::Init { exit, report }) => {
                let init_status = exit.await.unwrap_or(ExitStatus::Signal(libc::SIGKILL));
                let mut rest = String::new();
                let _ = report.read_to_string(&mut rest);
                rest.lines()
                    .filter_map(Report::parse)
                    .find_map(|r| match r {
                        Report::Ended(s) => Some(s),
                        _ => None,
                    })
                    .unwrap_or(match init_status {
                        // The init itself died (e.g. SIGKILLed): so did the job.
                        ExitStatus::Signal(s) => ExitStatus::Signal(s),
                        ExitStatus::Code(c) if c > 128 => ExitStatus::Signal(c - 128),
                        other => other,
                    })
            }
            Some(Waiter::Adopted {
                pidfd,
                pid,
                status_file,
            }) => {
                if let Ok(mut g) = pidfd.readable().await {
                    g.retain_ready();
                }
                let recorded = std::fs::read_to_string(&*status_file)
                    .ok()
                    .and_then(|t| t.lines().find_map(Report::parse));
                match recorded {
                    Some(Report::Ended(s)) => s,
                    // No record: the init itself was killed (taking the job
                    // with it), or the root had no init; read the zombie if
                    // its parent has not reaped it, else call it a SIGKILL.
                    _ => match crate::proc::zombie_exit_status(*pid) {
                        Some(ExitStatus::Code(c)) if c > 128 => ExitStatus::Signal(c - 128),
                        Some(s) => s,
                        None => ExitStatus::Signal(libc::SIGKILL),
                    },
                }
            }
            Some(Waiter::Channel { exit, .. }) => {
                exit.await.unwrap_or(ExitStatus::Signal(libc::SIGKILL))
            }
            Some(Waiter::Pidfd(fd)) => {
                if let Ok(mut g) = fd.readable().await {
                    g.retain_ready();
                }
                // Not our child: read the zombie's status if its parent has
                // not reaped it yet; otherwise we cannot know (a failure,
                // documented), and say so rather than invent a signal.
                crate::proc::zombie_exit_status(self.host_pid).unwrap_or(ExitStatus::Unknown)
            }
        };
        self.waiter = None;
        status
    }

    /// True while the job has not been seen to end.
    pub fn is_waitable(&self) -> bool {
        self.waiter.is_some()
    }

    /// Kills the whole job: the namespace init (the kernel then kills every
    /// process in the namespace), or for an attached job its process tree.
    pub fn kill(&self) {
        if let Some(Waiter::Channel { kill, .. }) = &self.waiter {
            kill();
            return;
        }
        if let Some(init) = self.init_pid {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(init),
                nix::sys::signal::Signal::SIGKILL,
            );
        } else {
            let root = crate::proc::ProcId {
                pid: self.host_pid,
                start_time: self.start_time,
            };
            if root.alive() {
                // Each process by PID and start time: none reused in
                // between is hit.
                for id in crate::proc::tree_ids(self.host_pid) {
                    crate::proc::kill_exact(id, Duration::ZERO);
                }
            }
        }
    }
}

impl Running {
    /// A job that is not a process of this machine: `exit` reports its
    /// end, `kill` ends it. For engines other than CRIU (the supervisor's
    /// test double); `host_pid` and `ns_pid` are only reported.
    pub fn from_channel(
        host_pid: i32,
        ns_pid: i32,
        exit: oneshot::Receiver<ExitStatus>,
        kill: Box<dyn Fn() + Send + Sync>,
    ) -> Running {
        Running {
            host_pid,
            ns_pid,
            init_pid: None,
            start_time: 0,
            since: Instant::now(),
            waiter: Some(Waiter::Channel { exit, kill }),
        }
    }

    /// The same job, with the start time `t` (an engine's stand-in for a
    /// process it attached to).
    pub fn with_start_time(mut self, t: u64) -> Running {
        self.start_time = t;
        self
    }
}

/// Where the init records the job's end, and whose the job is.
#[derive(Debug, Clone)]
pub struct InitFiles {
    /// `<state_dir>/exit-status`.
    pub status_file: PathBuf,
    /// The job's owner (`None`: root's job, no user namespace).
    pub owner: Option<crate::userns::Owner>,
    /// The directory bound over /tmp in the job's mount namespace (its
    /// private /tmp), if it has one.
    pub private_tmp: Option<PathBuf>,
    /// The watch of the job's directories for this run, handed to the init
    /// ([`crate::files::Tracker`]).
    pub watch: Option<std::sync::Arc<crate::files::WatchFds>>,
}

struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

fn pipe() -> std::io::Result<Pipe> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    Ok(Pipe { r, w })
}

/// Duplicates `fd` to a number >= 100, close-on-exec, so that the child can
/// dup2 it onto a low number without clobbering another source fd.
fn high(fd: &OwnedFd) -> std::io::Result<OwnedFd> {
    let n = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(100))?;
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

/// Clones `supervise __init` as PID 1 of new PID and mount namespaces, with
/// `fds[i]` at fd `3 + i`. Returns the init's PID and its exit receiver.
fn clone_init(
    reaper: &Reaper,
    spec: &InitSpec,
    fds: &[&OwnedFd],
) -> Result<(i32, oneshot::Receiver<ExitStatus>), JobError> {
    let exe = std::env::current_exe().map_err(JobError::Init)?;
    let exe_c = CString::new(exe.as_os_str().as_encoded_bytes())
        .map_err(|e| JobError::Init(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
    let argv = [exe_c.clone(), CString::new("__init").expect("static")];
    let spec_json = serde_json::to_string(spec).expect("spec serialises");
    let mut envp: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| k != init::SPEC_ENV)
        .filter_map(|(k, v)| {
            let mut b = k.into_encoded_bytes();
            b.push(b'=');
            b.extend(v.into_encoded_bytes());
            CString::new(b).ok()
        })
        .collect();
    envp.push(
        CString::new(format!("{}={}", init::SPEC_ENV, spec_json)).map_err(|e| {
            JobError::Init(std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
        })?,
    );
    let highs: Vec<OwnedFd> = fds
        .iter()
        .map(|fd| high(fd))
        .collect::<Result<_, _>>()
        .map_err(JobError::Init)?;
    let high_raw: Vec<RawFd> = highs.iter().map(|f| f.as_raw_fd()).collect();
    let argv_p: Vec<*const libc::c_char> = argv
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp_p: Vec<*const libc::c_char> = envp
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let exe_p = exe_c.as_ptr();
    let owned = spec.owner.is_some();
    let mut flags = CloneFlags::CLONE_NEWPID | CloneFlags::CLONE_NEWNS;
    if owned {
        // A user namespace of the job's own, mapping only its owner's ids
        // (written below); the init is its unmapped root.
        flags |= CloneFlags::CLONE_NEWUSER;
    }
    let mut stack = vec![0u8; 256 * 1024];
    let spawned = reaper
        .spawn_with(|| {
            let child = Box::new(|| {
                // In the child (a copy of our memory, one thread): only
                // async-signal-safe calls until execve.
                for (i, fd) in high_raw.iter().enumerate() {
                    // SAFETY: dup2 of valid fds.
                    if unsafe { libc::dup2(*fd, 3 + i as i32) } < 0 {
                        return 126;
                    }
                }
                // SAFETY: raw capability syscalls only.
                if owned && unsafe { crate::userns::keep_caps_across_exec() }.is_err() {
                    return 126;
                }
                // SAFETY: pointers to NUL-terminated arrays prepared above.
                unsafe {
                    libc::execve(exe_p, argv_p.as_ptr(), envp_p.as_ptr());
                    libc::_exit(127)
                }
            });
            // SAFETY: the callback only calls dup2/execve/_exit (see above).
            let pid = unsafe { nix::sched::clone(child, &mut stack, flags, Some(libc::SIGCHLD)) }
                .map_err(std::io::Error::from)?;
            Ok(pid.as_raw())
        })
        .map_err(JobError::Init)?;
    drop(highs);
    if let Some(owner) = &spec.owner {
        if let Err(e) = crate::userns::write_maps(spawned.pid, owner) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(spawned.pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            return Err(JobError::Init(e));
        }
    }
    Ok((spawned.pid, spawned.exit))
}

fn read_started(report: &mut BufReader<File>) -> Result<i32, JobError> {
    let mut line = String::new();
    report
        .read_line(&mut line)
        .map_err(io("reading the init's report"))?;
    match Report::parse(&line) {
        Some(Report::Started(p)) => Ok(p),
        Some(Report::Error(m)) => Err(JobError::Start(m)),
        _ => Err(JobError::Start(format!(
            "the job's init ended without starting it ({:?})",
            line.trim()
        ))),
    }
}

/// The root's PID on the host: the init's child whose innermost PID is
/// `ns_pid`. `None` if the root already ended (a job that exits at once):
/// the init then reaps it and exits, and the report pipe says how it ended.
fn find_host_pid(init_pid: i32, ns_pid: i32) -> Result<Option<i32>, JobError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        for c in crate::proc::children(init_pid) {
            if crate::proc::ns_pid(c).ok() == Some(ns_pid) {
                return Ok(Some(c));
            }
        }
        if !crate::proc::alive(init_pid) {
            return Ok(None);
        }
        if Instant::now() > deadline {
            return Err(JobError::Start(format!(
                "cannot find the job's root (pid {ns_pid} in its namespace) under init {init_pid}"
            )));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn running(
    init_pid: i32,
    ns_pid: i32,
    exit: oneshot::Receiver<ExitStatus>,
    report: BufReader<File>,
) -> Result<Running, JobError> {
    // 0 when the root already ended; `wait` then reports how.
    let host_pid = find_host_pid(init_pid, ns_pid)?.unwrap_or(0);
    let start_time = crate::proc::start_time(host_pid).unwrap_or(0);
    Ok(Running {
        host_pid,
        ns_pid,
        init_pid: Some(init_pid),
        start_time,
        since: Instant::now(),
        waiter: Some(Waiter::Init {
            exit,
            report: report.into_inner(),
        }),
    })
}

/// The init's spec with the watch's descriptors, appended to `fds` (the
/// init finds them at `3 + index`).
fn with_watch<'a>(
    mut spec: InitSpec,
    files: &'a InitFiles,
    fds: &mut Vec<&'a OwnedFd>,
) -> InitSpec {
    if let Some(w) = &files.watch {
        let at = 3 + fds.len() as i32;
        fds.push(&w.fan);
        fds.push(&w.pipe);
        spec.watch = Some((at, at + 1));
    }
    spec
}

/// Launches the job's command under a fresh namespace init. Blocking.
pub fn launch(reaper: &Reaper, spec: &LaunchSpec, files: &InitFiles) -> Result<Running, JobError> {
    let report = pipe().map_err(JobError::Init)?;
    let control = pipe().map_err(JobError::Init)?;
    let _ = std::fs::remove_file(&files.status_file);
    let ispec = InitSpec {
        mode: InitMode::Launch {
            argv: spec.command.clone(),
            cwd: spec.cwd.clone(),
            env: spec
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            stdout: spec.stdout.clone(),
            stderr: spec.stderr.clone(),
        },
        status_file: Some(files.status_file.clone()),
        nofile_soft: crate::fdlimit::job_soft_limit(),
        owner: files.owner.clone(),
        private_tmp: files.private_tmp.clone(),
        watch: None,
    };
    let mut fds = vec![&report.w, &control.r];
    let ispec = with_watch(ispec, files, &mut fds);
    if let Some(w) = &files.watch {
        // Nothing before the job starts is its doing.
        w.start(Some(Vec::new()));
    }
    let (init_pid, exit) = clone_init(reaper, &ispec, &fds)?;
    drop(report.w);
    drop(control.r);
    let mut rd = BufReader::new(File::from(report.r));
    let ns_pid = read_started(&mut rd)?;
    drop(control.w);
    running(init_pid, ns_pid, exit, rd)
}

/// Result of a successful restore.
pub struct Restored {
    /// The job, running again.
    pub running: Running,
    /// Wall time from starting the init to the job running.
    pub duration: Duration,
    /// CRIU's restore time in microseconds, if it reported it.
    pub criu_restore_us: Option<u32>,
    /// A lazy restore's page serving, still going on while the job runs.
    pub lazy: Option<LazySession>,
}

/// Restores the job from `images_dir` (a directory CRIU may write its
/// `stats-restore` into) in a fresh namespace. Blocking.
pub fn restore(
    reaper: &Reaper,
    images_dir: &Path,
    opts: &CriuOptions,
    files: &InitFiles,
    on_notify: &mut dyn FnMut(&str, i32) -> bool,
    lazy: Option<Box<dyn PageSource + Send>>,
) -> Result<Restored, JobError> {
    let start = Instant::now();
    // The daemon listens in the image directory before CRIU restores.
    let daemon = match lazy {
        Some(src) => Some((
            LazyDaemon::start(reaper, images_dir, opts.log_level)
                .map_err(|e| JobError::Lazy(e.to_string()))?,
            src,
        )),
        None => None,
    };
    let daemon_ready = start.elapsed();
    let report = pipe().map_err(JobError::Init)?;
    let control = pipe().map_err(JobError::Init)?;
    let errp = pipe().map_err(JobError::Init)?;
    let (ours, theirs) = criu::rpc_socketpair().map_err(JobError::Init)?;
    let _ = std::fs::remove_file(&files.status_file);
    let ispec = InitSpec {
        mode: InitMode::Restore {
            criu: criu::criu_bin(),
        },
        status_file: Some(files.status_file.clone()),
        nofile_soft: None,
        owner: files.owner.clone(),
        private_tmp: files.private_tmp.clone(),
        watch: None,
    };
    // An owned job's CRIU reaches the images through a descriptor
    // (init::IMAGES_FD), not through root's directories.
    let images_fd: Option<OwnedFd> = match &files.owner {
        Some(_) => Some(
            nix::fcntl::open(
                images_dir,
                nix::fcntl::OFlag::O_DIRECTORY
                    | nix::fcntl::OFlag::O_RDONLY
                    | nix::fcntl::OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            )
            // SAFETY: a fresh descriptor we own.
            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
            .map_err(|e| JobError::Init(e.into()))?,
        ),
        None => None,
    };
    let mut init_fds = vec![&report.w, &control.r, &theirs, &errp.w];
    if let Some(fd) = &images_fd {
        init_fds.push(fd);
    }
    let ispec = with_watch(ispec, files, &mut init_fds);
    let (init_pid, exit) = clone_init(reaper, &ispec, &init_fds)?;
    drop(report.w);
    drop(control.r);
    drop(theirs);
    drop(errp.w);
    drop(images_fd);
    let log = criu::collect(File::from(errp.r));
    let lazy_failed = |e: String, control: &OwnedFd| {
        let _ = nix::unistd::write(control, b"fail\n");
        JobError::Lazy(e)
    };
    let session = match daemon {
        Some((mut daemon, src)) => {
            // The daemon started up while the namespace did.
            if let Err(e) = daemon.wait_ready() {
                return Err(lazy_failed(e.to_string(), &control.w));
            }
            let started = crate::proc::pidfd_open(init_pid).and_then(|job| {
                let guard = Guard::spawn(reaper, &job, daemon.socket())?;
                Ok(LazySession::serve(daemon, job, guard, src))
            });
            match started {
                Ok(s) => Some(s),
                Err(e) => {
                    return Err(lazy_failed(
                        format!("cannot guard the lazy restore: {e}"),
                        &control.w,
                    ))
                }
            }
        }
        None => None,
    };
    let serving = start.elapsed();
    let conv = criu::Conversation::new(ours);
    let criu_dir = match &files.owner {
        Some(_) => PathBuf::from(format!("/proc/self/fd/{}", init::IMAGES_FD)),
        None => images_dir.to_path_buf(),
    };
    let mut req = criu::restore_request(&criu_dir, opts, true);
    if files.owner.is_some() {
        if let Some(o) = req.opts.as_mut() {
            o.unprivileged = Some(true);
        }
    }
    if session.is_some() {
        if let Some(o) = req.opts.as_mut() {
            o.lazy_pages = Some(true);
        }
    }
    // The callback also learns the init's PID, under which the restored
    // tree lives (to inspect it before it resumes).
    let resp = conv.call(&req, &mut |script: &str| on_notify(script, init_pid));
    drop(conv);
    let mut control_w = File::from(control.w);
    let resp = match resp {
        Ok(r) => r,
        Err(e) => {
            let _ = control_w.write_all(b"fail\n");
            return Err(failed(e.into(), session));
        }
    };
    // criu exits after answering: its log is complete once the pipe closes.
    let log = log.join().unwrap_or_default();
    let resp = match criu::check_response("restore", resp, &log, None) {
        Ok(r) => r,
        Err(e) => {
            let _ = control_w.write_all(b"fail\n");
            return Err(failed(e.into(), session));
        }
    };
    let ns_pid = resp.restore.map(|r| r.pid).unwrap_or(0);
    // From here on too, a lazy restore can still fail (a page the
    // restored tree needs cannot be served, and the tree is killed).
    let mut session = session;
    let go = control_w
        .write_all(format!("go {ns_pid}\n").as_bytes())
        .map_err(io("telling the init the restored pid"));
    if let Err(e) = go {
        return Err(failed(e, session.take()));
    }
    let answered = start.elapsed();
    let mut rd = BufReader::new(File::from(report.r));
    let running = match read_started(&mut rd).and_then(|got| running(init_pid, got, exit, rd)) {
        Ok(r) => r,
        Err(e) => return Err(failed(e, session.take())),
    };
    tracing::debug!(
        daemon_ready_ms = daemon_ready.as_secs_f64() * 1e3,
        serving_ms = serving.as_secs_f64() * 1e3,
        criu_answered_ms = answered.as_secs_f64() * 1e3,
        running_ms = start.elapsed().as_secs_f64() * 1e3,
        "restore steps"
    );
    Ok(Restored {
        running,
        duration: start.elapsed(),
        criu_restore_us: criu::read_restore_stats(images_dir).and_then(|s| s.restore_time),
        lazy: session,
    })
}

/// A restore failed: a lazy session is torn down (its daemon killed).
/// The failure is a lazy one (so that the caller may restore the image
/// eagerly instead) only where the lazy part failed: a page the server
/// could not read, or CRIU failing over its lazy pages (userfaultfd).
/// When CRIU refused the image for a reason of its own, that reason is the
/// error, said once (the daemon we killed is not news).
fn failed(e: JobError, session: Option<LazySession>) -> JobError {
    let Some(s) = session else {
        return e;
    };
    match s.abort().result {
        // The page server's reason (a damaged page) is the real one.
        Err(why) if why.unservable => JobError::Lazy(format!("{e}; serving its pages: {why}")),
        _ if lazy_part_failed(&e) => JobError::Lazy(e.to_string()),
        _ => e,
    }
}

/// True if CRIU's error is about its lazy restore itself.
fn lazy_part_failed(e: &JobError) -> bool {
    match e {
        JobError::Criu(CriuError::Failed { message, .. }) => {
            let m = message.to_ascii_lowercase();
            m.contains("uffd") || m.contains("lazy") || m.contains("userfault")
        }
        // CRIU died or the namespace failed around a lazy restore: try
        // the same image eagerly rather than give it up.
        JobError::Criu(_) | JobError::Start(_) | JobError::Io { .. } => true,
        JobError::Lazy(_) => true,
        JobError::Init(_) => false,
    }
}

/// Attaches to a process supervise did not start.
pub fn attach(pid: i32, expected_start: Option<u64>) -> Result<Running, JobError> {
    // The pidfd pins the process: the start time read after it is that of
    // the process the pidfd watches, even if the PID is reused meanwhile.
    let fd = register_pidfd(pid)?;
    let start_time = match crate::proc::start_time(pid) {
        Ok(t) if crate::proc::alive(pid) => t,
        _ => return Err(JobError::Start(format!("process {pid} does not exist"))),
    };
    if let Some(want) = expected_start.filter(|w| *w != start_time) {
        return Err(JobError::Start(format!(
            "process {pid} is not the process attached to before (start time {start_time}, \
             recorded {want}: the PID was reused)"
        )));
    }
    Ok(Running {
        host_pid: pid,
        ns_pid: crate::proc::ns_pid(pid).unwrap_or(pid),
        init_pid: None,
        start_time,
        since: Instant::now(),
        waiter: Some(Waiter::Pidfd(fd)),
    })
}

/// Takes over a job started by an earlier supervise that has since died:
/// `host_pid` must still be the job's root (the caller checked its start
/// time). Its end is seen through a pidfd on its namespace init (which
/// records the root's exit status in `status_file`), or on the root itself
/// if it has no init.
pub fn adopt(
    host_pid: i32,
    ns_pid: i32,
    init_pid: Option<i32>,
    start_time: u64,
    status_file: PathBuf,
) -> Result<Running, JobError> {
    let init_pid = init_pid.filter(|p| crate::proc::alive(*p));
    let watched = init_pid.unwrap_or(host_pid);
    let pidfd = register_pidfd(watched)?;
    Ok(Running {
        host_pid,
        ns_pid,
        init_pid,
        start_time,
        since: Instant::now(),
        waiter: Some(Waiter::Adopted {
            pidfd,
            pid: watched,
            status_file,
        }),
    })
}

#[cfg(test)]
mod failed_tests {
    use super::*;

    #[test]
    fn only_lazy_trouble_makes_a_restore_failure_lazy() {
        let criu = |m: &str| {
            JobError::Criu(CriuError::Failed {
                op: "restore",
                message: m.into(),
                errno: None,
            })
        };
        // CRIU refusing the image for a reason of its own: not lazy.
        assert!(!lazy_part_failed(&criu("Can't fork for 1000: File exists")));
        // CRIU failing over its lazy pages: lazy (try the image eagerly).
        assert!(lazy_part_failed(&criu("uffd: Can't register memory")));
        assert!(lazy_part_failed(&criu(
            "Error (criu/uffd.c:300): lazy-pages"
        )));
        assert!(!lazy_part_failed(&JobError::Init(
            std::io::Error::from_raw_os_error(libc::EMFILE)
        )));
    }
}
