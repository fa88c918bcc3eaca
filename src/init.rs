//! The namespace init: `supervise __init`.
//!
//! Every job launched or restored by supervise runs in a fresh PID and mount
//! namespace whose PID 1 is this small program (the same binary, a hidden
//! subcommand). That is what lets a restore succeed whatever PIDs are taken
//! on the host: the restored tree gets back its old PIDs *inside* a new
//! namespace, as CRIU's `criu-ns` wrapper does. The init
//!
//! 1. makes `/` a recursive slave mount (host mounts still propagate in) and
//!    mounts a fresh `/proc` for the namespace;
//! 2. either starts the job's command (setsid, stdio appended to the job's
//!    files, opened *inside* the namespace so CRIU can resolve them), or runs
//!    `criu swrk` for the supervisor, which drives the restore over RPC with
//!    `rst_sibling`, so the restored root becomes the init's child;
//! 3. reaps everything in the namespace and, when the job's root exits,
//!    reports how (report pipe, status file, and its own exit code) and exits,
//!    which makes the kernel kill whatever is left in the namespace.
//!
//! If supervise itself dies, the init and the job keep running.
//!
//! File descriptors at exec: 3 = report pipe (write), 4 = control pipe
//! (read), and for restores 5 = CRIU RPC socket, 6 = CRIU's stderr.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::FromRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use crate::reaper::ExitStatus;

/// Environment variable carrying the [`InitSpec`] as JSON.
pub const SPEC_ENV: &str = "SUPERVISE_INIT_SPEC";
/// Report pipe fd in the init.
pub const REPORT_FD: i32 = 3;
/// Control pipe fd in the init.
pub const CONTROL_FD: i32 = 4;
/// CRIU RPC socket fd in the init (restores).
pub const CRIU_SOCK_FD: i32 = 5;
/// CRIU stderr fd in the init (restores).
pub const CRIU_ERR_FD: i32 = 6;
/// The images directory in the init (restores of owned jobs: CRIU, as the
/// owner, reaches it as `/proc/self/fd/7`, not through root's directories).
pub const IMAGES_FD: i32 = 7;
/// The job's root gets PID `FIRST_PID` in its namespace, leaving the low PIDs
/// free for the init and CRIU at restore time.
pub const FIRST_PID: i32 = 1000;

/// What the init is asked to do.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InitSpec {
    /// Launch or restore.
    pub mode: InitMode,
    /// Where to record the job's end (`exited N` / `signaled N`).
    pub status_file: Option<PathBuf>,
    /// The soft `RLIMIT_NOFILE` a launched job gets (supervise's own was
    /// raised to the hard limit: [`crate::fdlimit`]).
    #[serde(default)]
    pub nofile_soft: Option<u64>,
    /// The job's owner: the init is the unmapped root of a user namespace
    /// of the job's own ([`crate::userns`]); the job runs as the owner,
    /// CRIU (restores) as the owner with the namespace's capabilities.
    #[serde(default)]
    pub owner: Option<crate::userns::Owner>,
    /// A directory to bind over /tmp in the job's mount namespace (its
    /// private /tmp), for a launch and for every restore alike.
    #[serde(default)]
    pub private_tmp: Option<PathBuf>,
    /// The fanotify group watching the job's directories and the pipe to
    /// supervise, as (fd, fd): the init forwards the group's events, read
    /// in the job's PID namespace ([`crate::files::Tracker`]).
    #[serde(default)]
    pub watch: Option<(i32, i32)>,
}

/// See [`InitSpec`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InitMode {
    /// Start a command.
    Launch {
        /// argv.
        argv: Vec<String>,
        /// Working directory.
        cwd: PathBuf,
        /// Extra environment.
        env: Vec<(String, String)>,
        /// stdout file (appended).
        stdout: PathBuf,
        /// stderr file (appended).
        stderr: PathBuf,
    },
    /// Run `criu swrk` and adopt the tree it restores.
    Restore {
        /// The criu binary.
        criu: PathBuf,
    },
}

/// A line the init writes on its report pipe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// The job's root runs, with this PID in the namespace.
    Started(i32),
    /// The job's root ended.
    Ended(ExitStatus),
    /// The init could not do what it was asked.
    Error(String),
}

impl Report {
    /// Parses one report line.
    pub fn parse(line: &str) -> Option<Report> {
        let (word, rest) = line.trim_end().split_once(' ')?;
        match word {
            "started" => rest.parse().ok().map(Report::Started),
            "exited" => rest
                .parse()
                .ok()
                .map(|c| Report::Ended(ExitStatus::Code(c))),
            "signaled" => rest
                .parse()
                .ok()
                .map(|s| Report::Ended(ExitStatus::Signal(s))),
            "unknown" => Some(Report::Ended(ExitStatus::Unknown)),
            "error" => Some(Report::Error(rest.to_string())),
            _ => None,
        }
    }

    /// The line for this report.
    pub fn line(&self) -> String {
        match self {
            Report::Started(p) => format!("started {p}\n"),
            Report::Ended(ExitStatus::Code(c)) => format!("exited {c}\n"),
            Report::Ended(ExitStatus::Signal(s)) => format!("signaled {s}\n"),
            Report::Ended(ExitStatus::Unknown) => "unknown 0\n".to_string(),
            Report::Error(m) => format!("error {}\n", m.replace('\n', " ")),
        }
    }
}

const ABANDONED: &str = "restore abandoned by the supervisor";

/// Exit code of the init when it could not start the job.
pub const EXIT_START_FAILED: i32 = 125;

/// Entry point of `supervise __init`. Never returns.
pub fn main() -> ! {
    // SAFETY: setting a signal disposition at start-up, single-threaded.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    // SAFETY: the fd numbers are handed to us by the supervisor (see module docs).
    let mut report = unsafe { File::from_raw_fd(REPORT_FD) };
    let code = match run(&mut report) {
        Ok(status) => {
            let _ = report.write_all(Report::Ended(status).line().as_bytes());
            match status {
                ExitStatus::Code(c) => c,
                ExitStatus::Signal(s) => 128 + s,
                ExitStatus::Unknown => 255,
            }
        }
        Err(msg) => {
            let _ = report.write_all(Report::Error(msg.clone()).line().as_bytes());
            if msg != ABANDONED {
                eprintln!("supervise init: {msg}");
            }
            EXIT_START_FAILED
        }
    };
    std::process::exit(code)
}

fn run(report: &mut File) -> Result<ExitStatus, String> {
    let spec: InitSpec = serde_json::from_str(
        &std::env::var(SPEC_ENV).map_err(|_| format!("{SPEC_ENV} is not set"))?,
    )
    .map_err(|e| format!("bad {SPEC_ENV}: {e}"))?;
    if spec.owner.is_some() {
        crate::userns::await_maps()?;
    }
    setup_namespace(spec.private_tmp.as_deref())?;
    close_on_exec_from(3);
    let owner = spec.owner.as_ref();
    let root = match &spec.mode {
        InitMode::Launch {
            argv,
            cwd,
            env,
            stdout,
            stderr,
        } => {
            if let Some(soft) = spec.nofile_soft {
                crate::fdlimit::set_soft(soft)
                    .map_err(|e| format!("cannot set the job's RLIMIT_NOFILE to {soft}: {e}"))?;
            }
            // The default output files live in supervise's own (trusted)
            // state directory, which the owner cannot reach: opened by
            // the init; any other path with the owner's rights.
            let private = spec.status_file.as_ref().and_then(|f| f.parent());
            launch(argv, cwd, env, stdout, stderr, owner, private)?
        }
        InitMode::Restore { criu } => restore(criu, owner)?,
    };
    report
        .write_all(Report::Started(root.0).line().as_bytes())
        .ok();
    let forwarder = spec.watch.map(|(fan, pipe)| Forwarder::start(fan, pipe));
    let status = match root.1 {
        Some(s) => s,
        None => wait_for(root.0, &mut HashMap::new())?,
    };
    if let Some(f) = forwarder {
        // Everything the job did reaches supervise before the init exits:
        // what is left of the job is killed and reaped first.
        kill_and_reap_all();
        f.finish();
    }
    if let Some(path) = &spec.status_file {
        let _ = crate::fsutil::write_atomic(path, Report::Ended(status).line().as_bytes(), 0o600);
    }
    Ok(status)
}

fn setup_namespace(private_tmp: Option<&Path>) -> Result<(), String> {
    use nix::mount::{mount, MsFlags};
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_SLAVE | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| format!("cannot make / a slave mount: {e}"))?;
    mount(
        Some("proc"),
        "/proc",
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| format!("cannot mount /proc in the job's namespace: {e}"))?;
    if let Some(dir) = private_tmp {
        mount(
            Some(dir),
            "/tmp",
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| {
            format!(
                "cannot bind the job's private /tmp ({}) over /tmp: {e}",
                dir.display()
            )
        })?;
    }
    Ok(())
}

/// Marks every fd >= `from` close-on-exec, so the job inherits only stdio.
fn close_on_exec_from(from: i32) {
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        let fds: Vec<i32> = dir
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
            .filter(|&fd| fd >= from)
            .collect();
        for fd in fds {
            // SAFETY: fcntl on an fd number; harmless if it is already closed.
            unsafe {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags >= 0 {
                    libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
                }
            }
        }
    }
}

/// Opens the job's stdout/stderr file for appending, as root, in a place
/// that may belong to another user: no symlink anywhere on the path is
/// followed (`openat2` with `RESOLVE_NO_SYMLINKS`), nothing blocks on a
/// FIFO, and only a regular file or a character device (`/dev/null`) is
/// accepted. A user who controls the directory cannot make supervise append
/// to a file elsewhere.
fn open_append(path: &Path) -> Result<File, String> {
    use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
    use std::os::fd::FromRawFd;
    let how = OpenHow::new()
        .flags(
            OFlag::O_WRONLY
                | OFlag::O_APPEND
                | OFlag::O_CREAT
                | OFlag::O_CLOEXEC
                | OFlag::O_NOCTTY
                | OFlag::O_NONBLOCK,
        )
        .mode(nix::sys::stat::Mode::from_bits_truncate(0o640))
        .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let fd = match openat2(libc::AT_FDCWD, path, how) {
        Ok(fd) => fd,
        Err(nix::errno::Errno::ELOOP) => {
            return Err(format!(
                "cannot open {}: the path goes through a symlink, which supervise does not \
                 follow for the job's output; give the real path",
                path.display()
            ))
        }
        Err(e) => return Err(format!("cannot open {}: {e}", path.display())),
    };
    // SAFETY: a fresh descriptor we own.
    let f = unsafe { File::from_raw_fd(fd) };
    let md = f
        .metadata()
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    use std::os::unix::fs::FileTypeExt;
    if !md.is_file() && !md.file_type().is_char_device() {
        return Err(format!(
            "cannot open {}: not a regular file (or character device)",
            path.display()
        ));
    }
    let fl = nix::fcntl::fcntl(
        std::os::fd::AsRawFd::as_raw_fd(&f),
        nix::fcntl::FcntlArg::F_GETFL,
    )
    .map_err(|e| e.to_string())?;
    nix::fcntl::fcntl(
        std::os::fd::AsRawFd::as_raw_fd(&f),
        nix::fcntl::FcntlArg::F_SETFL(OFlag::from_bits_truncate(fl) & !OFlag::O_NONBLOCK),
    )
    .map_err(|e| e.to_string())?;
    Ok(f)
}

fn launch(
    argv: &[String],
    cwd: &PathBuf,
    env: &[(String, String)],
    stdout: &PathBuf,
    stderr: &PathBuf,
    owner: Option<&crate::userns::Owner>,
    private: Option<&Path>,
) -> Result<(i32, Option<ExitStatus>), String> {
    // The job's root gets a PID well above those the init and CRIU use.
    let _ = std::fs::write("/proc/sys/kernel/ns_last_pid", format!("{}", FIRST_PID - 1));
    // An owned job's files are opened with its owner's rights (but those
    // in supervise's own directory).
    let open = |p: &Path| match owner.filter(|_| !private.is_some_and(|d| p.starts_with(d))) {
        Some(o) => crate::userns::as_owner(o, || open_append(p))
            .map_err(|e| e.to_string())
            .and_then(|r| r),
        None => open_append(p),
    };
    if let Some(o) = owner {
        // The working directory, entered with the owner's rights (the
        // chdir itself happens in the child, as the owner).
        crate::userns::as_owner(o, || std::fs::metadata(cwd.join(".")))
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot enter the working directory {}: {e}", cwd.display()))?;
    }
    let out = open(stdout)?;
    let err = if stderr == stdout {
        out.try_clone().map_err(|e| e.to_string())?
    } else {
        open(stderr)?
    };
    let (prog, args) = argv.split_first().ok_or("empty command")?;
    let mut cmd = Command::new(prog);
    if owner.is_none() {
        cmd.current_dir(cwd);
    }
    let ids = owner.map(|o| (o.uid, o.gid, o.groups.clone()));
    let cwd_c =
        std::ffi::CString::new(cwd.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: raw credential syscalls and chdir only (async-signal-safe).
    unsafe {
        cmd.pre_exec(move || {
            if let Some((uid, gid, groups)) = &ids {
                // The owner, without capabilities; then its working
                // directory, reached with its rights.
                crate::userns::become_owner(*uid, *gid, groups, false)?;
                if libc::chdir(cwd_c.as_ptr()) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd.args(args)
        .env_remove(SPEC_ENV)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    // SAFETY: setsid and sigprocmask are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            // Own session: CRIU can then dump the tree without --shell-job.
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {prog:?} in {}: {e}", cwd.display()))?;
    Ok((child.id() as i32, None))
}

fn restore(
    criu: &PathBuf,
    owner: Option<&crate::userns::Owner>,
) -> Result<(i32, Option<ExitStatus>), String> {
    // SAFETY: fd numbers handed to us by the supervisor.
    let control = unsafe { File::from_raw_fd(CONTROL_FD) };
    let criu_err = unsafe { File::from_raw_fd(CRIU_ERR_FD) };
    let mut cmd = Command::new(criu);
    cmd.args(["swrk", &crate::criu::SWRK_FD.to_string()])
        .env_remove(SPEC_ENV)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(criu_err));
    let ids = owner.map(|o| (o.uid, o.gid, o.groups.clone()));
    // SAFETY: dup2/fcntl and raw credential syscalls only.
    unsafe {
        cmd.pre_exec(move || {
            crate::criu::inherit_as(CRIU_SOCK_FD, crate::criu::SWRK_FD)?;
            if let Some((uid, gid, groups)) = &ids {
                // CRIU as the owner, with the namespace's capabilities
                // but CAP_SETUID (crate::userns); the images directory
                // stays open for it (IMAGES_FD).
                let fl = libc::fcntl(IMAGES_FD, libc::F_GETFD);
                if fl >= 0 {
                    libc::fcntl(IMAGES_FD, libc::F_SETFD, fl & !libc::FD_CLOEXEC);
                }
                crate::userns::become_owner(*uid, *gid, groups, true)?;
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", criu.display()))?;
    let criu_pid = child.id() as i32;
    // Our copies of CRIU's stderr and socket must go, or the supervisor
    // never sees EOF on CRIU's log.
    drop(cmd);
    // SAFETY: closing our copy; criu has its own.
    unsafe {
        libc::close(CRIU_SOCK_FD);
    }
    let mut seen = HashMap::new();
    wait_for(criu_pid, &mut seen)?;
    let mut line = String::new();
    BufReader::new(&control)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let root: i32 = match line.trim().strip_prefix("go ") {
        Some(p) => p
            .parse()
            .map_err(|_| format!("bad control line {line:?}"))?,
        None => return Err(ABANDONED.into()),
    };
    let early = seen.remove(&root);
    Ok((root, early))
}

/// Kills every other process of the namespace and reaps them all.
fn kill_and_reap_all() {
    // SAFETY: plain syscalls; kill(-1) from a namespace's init reaches
    // every process of the namespace but itself.
    unsafe {
        libc::kill(-1, libc::SIGKILL);
        loop {
            let mut status = 0;
            let got = libc::waitpid(-1, &mut status, 0);
            if got < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                break;
            }
        }
    }
}

/// Forwards the fanotify group's events, read here in the job's PID
/// namespace (so their PIDs are the job's or 0), unchanged to supervise.
struct Forwarder {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Held while forwarding; true once the descriptors are closed.
    lock: std::sync::Arc<std::sync::Mutex<bool>>,
    thread: Option<std::thread::JoinHandle<()>>,
    fan: i32,
    pipe: i32,
}

impl Forwarder {
    fn start(fan: i32, pipe: i32) -> Forwarder {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let lock = std::sync::Arc::new(std::sync::Mutex::new(false));
        let (s, l) = (stop.clone(), lock.clone());
        let thread = std::thread::Builder::new()
            .name("forward".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    let mut p = libc::pollfd {
                        fd: fan,
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd.
                    unsafe { libc::poll(&mut p, 1, 200) };
                    let mut closed = l.lock().unwrap_or_else(|p| p.into_inner());
                    if *closed {
                        break;
                    }
                    if !forward_available(fan, pipe) {
                        // supervise went away (the job runs on detached):
                        // stop watching, or the kernel queues its events
                        // for nobody.
                        close_pair(fan, pipe);
                        *closed = true;
                        break;
                    }
                }
            })
            .ok();
        Forwarder {
            stop,
            lock,
            thread,
            fan,
            pipe,
        }
    }

    /// Stops the thread and forwards what is still queued.
    fn finish(mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let mut closed = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        if !*closed {
            forward_available(self.fan, self.pipe);
            close_pair(self.fan, self.pipe);
            *closed = true;
        }
    }
}

/// Closes the group and the pipe (supervise then sees EOF).
fn close_pair(fan: i32, pipe: i32) {
    // SAFETY: our descriptors, closed once (under the forwarder's lock).
    unsafe {
        libc::close(pipe);
        libc::close(fan);
    }
}

/// Reads the group (non-blocking) until it is empty, writing every read
/// to the pipe. False when the pipe is gone (supervise went away).
fn forward_available(fan: i32, pipe: i32) -> bool {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        // SAFETY: reading into our buffer.
        let n = unsafe { libc::read(fan, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error().raw_os_error();
            if e == Some(libc::EINTR) {
                continue;
            }
            return true; // EAGAIN: empty
        }
        if n == 0 {
            return true;
        }
        let mut off = 0usize;
        while off < n as usize {
            // SAFETY: writing from our buffer.
            let w = unsafe { libc::write(pipe, buf[off..].as_ptr().cast(), n as usize - off) };
            if w < 0 {
                if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return false;
            }
            off += w as usize;
        }
    }
}

/// Reaps children until `pid` exits; remembers the others' statuses.
fn wait_for(pid: i32, seen: &mut HashMap<i32, ExitStatus>) -> Result<ExitStatus, String> {
    if let Some(s) = seen.remove(&pid) {
        return Ok(s);
    }
    loop {
        let mut status = 0;
        // SAFETY: plain wait.
        let got = unsafe { libc::waitpid(-1, &mut status, 0) };
        if got < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(format!("waiting for pid {pid}: {e}"));
        }
        let s = ExitStatus::from_raw(status);
        if got == pid {
            return Ok(s);
        }
        seen.insert(got, s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_lines_round_trip() {
        for r in [
            Report::Started(1000),
            Report::Ended(ExitStatus::Code(3)),
            Report::Ended(ExitStatus::Signal(9)),
            Report::Ended(ExitStatus::Unknown),
            Report::Error("cannot start \"x\": No such file".into()),
        ] {
            assert_eq!(Report::parse(&r.line()), Some(r.clone()));
        }
        assert_eq!(Report::parse("garbage"), None);
    }
}
