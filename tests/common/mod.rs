//! Harness for the integration suite: real `supervise`, real CRIU, real
//! processes. Everything synchronises on events, with generous upper bounds
//! only as failure timeouts: on the job's state as `supervise status`
//! reports it (checkpoints and restores counted, state, pid) where it does,
//! else on lines in supervise's log or files appearing.
//!
//! Tests that need root and CRIU >= 4.2 carry
//! `#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]`:
//! `build.rs` sets `cfg(criu)` when CRIU is usable, and fails the build
//! when `CI` is set and it is not.
#![allow(dead_code)]

pub mod service;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_supervise");

/// Test programs, compiled once for all test processes (each test may be
/// a process of its own, as under cargo-nextest): a program is rebuilt
/// only when its source is newer than the binary, under a lock, into a
/// temporary name renamed into place.
pub fn progs() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("progs");
        fs::create_dir_all(&dir).unwrap();
        let lock = fs::File::create(dir.join(".lock")).unwrap();
        // SAFETY: flock on a descriptor we own; released when it closes.
        assert_eq!(
            unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) },
            0
        );
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        for (name, src, extra) in [
            ("counter", "examples/counter.c", ""),
            ("threads", "tests/progs/threads.c", "-pthread"),
            ("bigmem", "tests/progs/bigmem.c", ""),
            ("grow", "tests/progs/grow.c", ""),
            ("filejob", "tests/progs/filejob.c", ""),
            ("dirty", "tests/progs/dirty.c", ""),
            ("exchange", "tests/progs/exchange.c", ""),
            ("appender", "tests/progs/appender.c", ""),
            ("restartapp", "tests/progs/restartapp.c", ""),
            // The kernel-object matrix of tests/coverage.rs.
            ("locks", "tests/progs/locks.c", ""),
            ("unlinked", "tests/progs/unlinked.c", ""),
            ("shmap", "tests/progs/shmap.c", ""),
            ("sysvshm", "tests/progs/sysvshm.c", ""),
            ("posixshm", "tests/progs/posixshm.c", "-lrt"),
            ("pipes", "tests/progs/pipes.c", ""),
            ("unixsk", "tests/progs/unixsk.c", ""),
            ("anonfds", "tests/progs/anonfds.c", ""),
            ("timerfd", "tests/progs/timerfd.c", ""),
            ("timers", "tests/progs/timers.c", "-lrt"),
            ("signals", "tests/progs/signals.c", ""),
            ("mthread", "tests/progs/mthread.c", "-pthread"),
            ("ptree", "tests/progs/ptree.c", ""),
            ("tcpclient", "tests/progs/tcpclient.c", ""),
            ("tcppair", "tests/progs/tcppair.c", ""),
            ("ghost", "tests/progs/ghost.c", ""),
            ("lease", "tests/progs/lease.c", ""),
            ("mtime", "tests/progs/mtime.c", ""),
            ("secret", "tests/progs/secret.c", ""),
            ("lazymem", "tests/progs/lazymem.c", "-pthread"),
        ] {
            let out = dir.join(name);
            let mtime = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
            let header = root.join("tests/progs/matrix.h");
            let fresh = match mtime(&out) {
                Some(built) => [root.join(src), header]
                    .iter()
                    .all(|s| mtime(s).is_some_and(|t| t <= built)),
                None => false,
            };
            if fresh {
                continue;
            }
            let tmp = dir.join(format!(".{name}.{}", std::process::id()));
            let mut cmd = Command::new("cc");
            cmd.args(["-O2", "-o"]).arg(&tmp).arg(root.join(src));
            if !extra.is_empty() {
                cmd.arg(extra);
            }
            let st = cmd.status().expect("cc");
            assert!(st.success(), "compiling {src}");
            fs::rename(&tmp, &out).unwrap();
        }
        drop(lock);
        dir
    })
}

/// The path of test program `name` (see [`progs`]), as a string.
pub fn prog(name: &str) -> String {
    progs().join(name).display().to_string()
}

/// A job file. [`JobFile::counter`] is the usual job: `counter 100` (a
/// number every 100 ms) with its stdout in `<name>.out`, a checkpoint every
/// second and restores without backoff; the setters change one thing each.
///
/// ```ignore
/// let job = JobFile::counter("c").every("1h").keep(3).write(&env);
/// ```
#[derive(Clone, Debug)]
pub struct JobFile {
    name: String,
    command: Vec<String>,
    top: Vec<String>,
    stdout: Option<String>,
    every: String,
    dir: Option<String>,
    keep: Option<u32>,
    checkpoint: Vec<String>,
    backoff: String,
    restore: Vec<String>,
    extra: String,
}

impl JobFile {
    /// `counter 100`, see the type's documentation.
    pub fn counter(name: &str) -> JobFile {
        JobFile::program(name, &[&prog("counter"), "100"])
    }

    /// Another command with the same defaults as [`counter`](Self::counter).
    pub fn program(name: &str, argv: &[&str]) -> JobFile {
        JobFile {
            name: name.to_string(),
            command: argv.iter().map(|a| a.to_string()).collect(),
            top: Vec::new(),
            stdout: Some(format!("{name}.out")),
            every: "1s".into(),
            dir: None,
            keep: None,
            checkpoint: Vec::new(),
            backoff: "0s".into(),
            restore: Vec::new(),
            extra: String::new(),
        }
    }

    /// Replaces the command.
    pub fn command(mut self, argv: &[&str]) -> JobFile {
        self.command = argv.iter().map(|a| a.to_string()).collect();
        self
    }

    /// A top-level key, e.g. `state_dir = "/x"` (before any table).
    pub fn top(mut self, line: &str) -> JobFile {
        self.top.push(line.to_string());
        self
    }

    /// `stdout = PATH` instead of `<name>.out`.
    pub fn stdout(mut self, path: &str) -> JobFile {
        self.stdout = Some(path.to_string());
        self
    }

    /// No `stdout` key.
    pub fn no_stdout(mut self) -> JobFile {
        self.stdout = None;
        self
    }

    /// `[checkpoint] every`.
    pub fn every(mut self, every: &str) -> JobFile {
        self.every = every.to_string();
        self
    }

    /// `[checkpoint] dir` (default: supervise's own default).
    pub fn dir(mut self, dir: &str) -> JobFile {
        self.dir = Some(dir.to_string());
        self
    }

    /// `[checkpoint] keep` (default: supervise's own default).
    pub fn keep(mut self, keep: u32) -> JobFile {
        self.keep = Some(keep);
        self
    }

    /// A further `[checkpoint]` key, e.g. `ghost_limit = "8MiB"`.
    pub fn checkpoint(mut self, line: &str) -> JobFile {
        self.checkpoint.push(line.to_string());
        self
    }

    /// `[restore] backoff`.
    pub fn backoff(mut self, backoff: &str) -> JobFile {
        self.backoff = backoff.to_string();
        self
    }

    /// A further `[restore]` key, e.g. `lazy = false`.
    pub fn restore(mut self, line: &str) -> JobFile {
        self.restore.push(line.to_string());
        self
    }

    /// TOML appended at the end: further tables (`[files]`, `[shutdown]`,
    /// `[slurm]`).
    pub fn extra(mut self, toml: &str) -> JobFile {
        self.extra.push_str(toml);
        if !self.extra.ends_with('\n') {
            self.extra.push('\n');
        }
        self
    }

    /// The file's text.
    pub fn text(&self) -> String {
        let q = |s: &str| format!("{s:?}");
        let argv: Vec<String> = self.command.iter().map(|a| q(a)).collect();
        let mut t = format!("command = [{}]\n", argv.join(", "));
        for l in &self.top {
            t.push_str(l);
            t.push('\n');
        }
        if let Some(o) = &self.stdout {
            t.push_str(&format!("stdout = {}\n", q(o)));
        }
        t.push_str(&format!("[checkpoint]\nevery = {}\n", q(&self.every)));
        if let Some(d) = &self.dir {
            t.push_str(&format!("dir = {}\n", q(d)));
        }
        if let Some(k) = self.keep {
            t.push_str(&format!("keep = {k}\n"));
        }
        for l in &self.checkpoint {
            t.push_str(l);
            t.push('\n');
        }
        t.push_str(&format!("[restore]\nbackoff = {}\n", q(&self.backoff)));
        for l in &self.restore {
            t.push_str(l);
            t.push('\n');
        }
        t.push_str(&self.extra);
        t
    }

    /// Writes `<name>.toml` into the test's temp dir.
    pub fn write(&self, env: &Env) -> PathBuf {
        self.write_in(env.path())
    }

    /// Writes `<name>.toml` into `dir`.
    pub fn write_in(&self, dir: &Path) -> PathBuf {
        let p = dir.join(format!("{}.toml", self.name));
        fs::write(&p, self.text()).unwrap();
        p
    }
}

/// A temp dir holding job files, images and outputs.
pub struct Env {
    pub dir: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Env {
        Env {
            dir: tempfile::Builder::new()
                .prefix("supervise-test-")
                .tempdir()
                .unwrap(),
        }
    }

    /// An env outside /tmp (in /var/tmp): for jobs whose own /tmp must
    /// not hide their files.
    pub fn outside_tmp() -> Env {
        Env {
            dir: tempfile::Builder::new()
                .prefix("supervise-test-")
                .tempdir_in("/var/tmp")
                .unwrap(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `<name>.toml`.
    pub fn job(&self, name: &str, toml: &str) -> PathBuf {
        let p = self.path().join(format!("{name}.toml"));
        fs::write(&p, toml).unwrap();
        p
    }

    pub fn start(&self, job: &Path) -> Sup {
        self.start_full(&[job.as_os_str()], &[])
    }

    /// Like [`start`](Self::start), with extra environment variables.
    pub fn start_with_env(&self, job: &Path, env: &[(&str, &str)]) -> Sup {
        self.start_full(&[job.as_os_str()], env)
    }

    /// `supervise run ARGS...` (job files, directories, options).
    pub fn start_with(&self, args: &[&std::ffi::OsStr]) -> Sup {
        self.start_full(args, &[])
    }

    /// Like [`start_with`](Self::start_with), with supervise's
    /// RLIMIT_NOFILE (soft and hard) set to `nofile`, as a service whose
    /// unit allows only that many descriptors.
    pub fn start_with_nofile(&self, args: &[&std::ffi::OsStr], nofile: u64) -> Sup {
        self.start_inner(args, &[], Some(nofile))
    }

    fn start_full(&self, args: &[&std::ffi::OsStr], env: &[(&str, &str)]) -> Sup {
        self.start_inner(args, env, None)
    }

    fn start_inner(
        &self,
        args: &[&std::ffi::OsStr],
        env: &[(&str, &str)],
        nofile: Option<u64>,
    ) -> Sup {
        // Job files come last; the log is named after the last one.
        let job = Path::new(args.last().expect("a job file"));
        let log = self.path().join(format!(
            "supervise-{}.log",
            job.file_stem().unwrap().to_string_lossy()
        ));
        let f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let start_len = fs::metadata(&log).map(|m| m.len()).unwrap_or(0) as usize;
        // The socket this run listens on: `--socket`, else SUPERVISE_SOCKET.
        let socket = args
            .iter()
            .position(|a| *a == "--socket")
            .and_then(|i| args.get(i + 1))
            .map(PathBuf::from)
            .or_else(|| {
                env.iter()
                    .find(|(k, _)| *k == "SUPERVISE_SOCKET")
                    .map(|(_, v)| PathBuf::from(v))
            })
            .unwrap_or_else(|| self.socket());
        let mut cmd = Command::new(BIN);
        cmd.arg("run")
            .args(args)
            .env("SUPERVISE_LOG", "info")
            .env("SUPERVISE_SOCKET", self.socket())
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f);
        if let Some(n) = nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit only, in the child before exec.
            unsafe {
                cmd.pre_exec(move || {
                    let l = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().unwrap();
        Sup {
            child: Some(child),
            log,
            start_len,
            state: self.path().join(".supervise"),
            socket,
        }
    }

    /// This test's control socket (each test its own, so tests can run in
    /// parallel).
    pub fn socket(&self) -> PathBuf {
        self.path().join("supervise.sock")
    }

    /// Runs a `supervise` client command against this test's socket.
    pub fn ctl(&self, args: &[&str]) -> std::process::Output {
        Command::new(BIN)
            .args(args)
            .env("SUPERVISE_SOCKET", self.socket())
            .output()
            .unwrap()
    }

    /// Starts a `supervise` client command in the background (its output
    /// piped), against this test's socket.
    pub fn ctl_spawn(&self, args: &[&str]) -> Child {
        Command::new(BIN)
            .args(args)
            .env("SUPERVISE_SOCKET", self.socket())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// `supervise status --json`, as JSON.
    pub fn status(&self) -> serde_json::Value {
        let out = self.ctl(&["status", "--json"]);
        assert!(
            out.status.success(),
            "status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Numbers printed by a counter into `file`.
    pub fn numbers(&self, file: &str) -> Vec<i64> {
        numbers(&self.path().join(file))
    }
}

pub fn numbers(p: &Path) -> Vec<i64> {
    fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// A running `supervise run`.
pub struct Sup {
    child: Option<Child>,
    pub log: PathBuf,
    start_len: usize,
    state: PathBuf,
    socket: PathBuf,
}

impl Sup {
    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// This run's log so far.
    pub fn log(&self) -> String {
        let s = fs::read_to_string(&self.log).unwrap_or_default();
        s.get(self.start_len..).unwrap_or("").to_string()
    }

    /// Waits until `needle` occurs `count` times in this run's log.
    pub fn wait_for(&self, needle: &str, count: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if log.matches(needle).count() >= count {
                return;
            }
            if Instant::now() > deadline {
                panic!("timed out waiting for {count}x {needle:?}; log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `supervise status --json` through this run's control socket; `None`
    /// while it does not answer (not listening yet, or gone).
    pub fn try_status(&self) -> Option<serde_json::Value> {
        let out = Command::new(BIN)
            .args(["status", "--json"])
            .env("SUPERVISE_SOCKET", &self.socket)
            .stderr(Stdio::null())
            .output()
            .unwrap();
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Job `job`'s entry of `supervise status --json`; panics if supervise
    /// does not answer or has no such job.
    pub fn job_status(&self, job: &str) -> serde_json::Value {
        let s = self
            .try_status()
            .unwrap_or_else(|| panic!("supervise status failed; log:\n{}", self.log()));
        find_job(&s, job)
            .unwrap_or_else(|| panic!("no job {job:?} in status {s}"))
            .clone()
    }

    /// Waits until job `job`'s status satisfies `f` (polling `supervise
    /// status --json`); returns that status. Fails at once if supervise has
    /// exited.
    pub fn wait_status(
        &self,
        job: &str,
        what: &str,
        timeout: Duration,
        f: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        let mut last = serde_json::Value::Null;
        loop {
            if let Some(j) = self.try_status().as_ref().and_then(|s| find_job(s, job)) {
                if f(j) {
                    return j.clone();
                }
                last = j.clone();
            }
            let gone = match &self.child {
                Some(c) => supervise::proc::state(c.id() as i32) == Some('Z'),
                None => true,
            };
            if gone || Instant::now() > deadline {
                panic!(
                    "{} waiting for job {job:?}: {what}; last status: {last}; log:\n{}",
                    if gone {
                        "supervise exited"
                    } else {
                        "timed out"
                    },
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until this supervise has published `n` checkpoints of `job`
    /// (status `checkpoints`); returns the job's status.
    pub fn wait_checkpoints(&self, job: &str, n: u64, timeout: Duration) -> serde_json::Value {
        self.wait_status(job, &format!("{n} checkpoints"), timeout, |j| {
            j["checkpoints"].as_u64().unwrap_or(0) >= n
        })
    }

    /// Waits until this supervise has restored `job` `n` times (status
    /// `restores`, automatic and manual); returns the job's status.
    pub fn wait_restores(&self, job: &str, n: u64, timeout: Duration) -> serde_json::Value {
        self.wait_status(job, &format!("{n} restores"), timeout, |j| {
            j["restores"].as_u64().unwrap_or(0) >= n
        })
    }

    /// Waits until `n` checkpoints of `job` have failed (status
    /// `failed_checkpoints`); returns the job's status (its `last_failure`
    /// says which step failed and why).
    pub fn wait_failed_checkpoints(
        &self,
        job: &str,
        n: u64,
        timeout: Duration,
    ) -> serde_json::Value {
        self.wait_status(job, &format!("{n} failed checkpoints"), timeout, |j| {
            j["failed_checkpoints"].as_u64().unwrap_or(0) >= n
        })
    }

    /// Waits until `n` restore attempts of `job` have failed (status
    /// `failed_restores`); returns the job's status.
    pub fn wait_failed_restores(&self, job: &str, n: u64, timeout: Duration) -> serde_json::Value {
        self.wait_status(job, &format!("{n} failed restores"), timeout, |j| {
            j["failed_restores"].as_u64().unwrap_or(0) >= n
        })
    }

    /// Waits until `job`'s status `state` is `state` ("running", "stopped",
    /// "failed", ...); returns the job's status.
    pub fn wait_state(&self, job: &str, state: &str, timeout: Duration) -> serde_json::Value {
        self.wait_status(job, &format!("state {state}"), timeout, |j| {
            j["state"] == state
        })
    }

    /// Checkpoints of `job` this supervise has published so far.
    pub fn checkpoints(&self, job: &str) -> u64 {
        self.job_status(job)["checkpoints"].as_u64().unwrap()
    }

    /// `.supervise/<job>/job.json`: (host_pid, ns_pid).
    pub fn job_pid(&self, job: &str) -> (i32, i32) {
        let v: serde_json::Value = serde_json::from_slice(
            &fs::read(self.state.join(job).join("job.json")).expect("job.json"),
        )
        .unwrap();
        (
            v["host_pid"].as_i64().unwrap() as i32,
            v["ns_pid"].as_i64().unwrap() as i32,
        )
    }

    /// SIGKILLs the job's root process.
    pub fn kill_job(&self, job: &str) -> i32 {
        let (pid, _) = self.job_pid(job);
        kill(pid, libc::SIGKILL);
        pid
    }

    pub fn signal(&self, sig: i32) {
        kill(self.pid(), sig);
    }

    /// Waits for supervise to exit; returns its exit code (or 128+signal).
    pub fn wait_exit(&mut self, timeout: Duration) -> i32 {
        let child = self.child.as_mut().unwrap();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                self.child = None;
                use std::os::unix::process::ExitStatusExt;
                return st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0));
            }
            if Instant::now() > deadline {
                panic!("supervise did not exit in time; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The exit code if supervise has exited, without waiting.
    pub fn wait_exit_nonblocking(&mut self) -> Option<i32> {
        let st = self.child.as_mut()?.try_wait().unwrap()?;
        self.child = None;
        use std::os::unix::process::ExitStatusExt;
        Some(st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0)))
    }

    /// SIGKILLs supervise and everything it started (used when a test wants
    /// the jobs left running to be cleaned up by hand).
    pub fn kill_all(&mut self) {
        if let Some(mut child) = self.child.take() {
            let tree = process_tree(child.id() as i32);
            for p in tree.iter().rev() {
                kill(*p, libc::SIGKILL);
            }
            let _ = child.wait();
            reap_pids(&tree);
        }
    }
}

impl Drop for Sup {
    fn drop(&mut self) {
        if self.child.is_none() {
            return;
        }
        // Graceful first: supervise stops its jobs and reaps them itself.
        self.signal(libc::SIGTERM);
        let child = self.child.as_mut().unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                self.child = None;
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill_all();
    }
}

pub fn kill(pid: i32, sig: i32) {
    // SAFETY: kill(2) on a PID this test started.
    unsafe {
        libc::kill(pid, sig);
    }
}

pub fn process_tree(pid: i32) -> Vec<i32> {
    supervise::proc::tree(pid)
}

/// Makes this test process a subreaper so that anything orphaned by a test
/// comes back to it, and reaps the given pids if they are our children.
pub fn reap_pids(pids: &[i32]) {
    for _ in 0..50 {
        let mut left = 0;
        for &p in pids {
            let mut st = 0;
            // SAFETY: waitpid on specific pids.
            let r = unsafe { libc::waitpid(p, &mut st, libc::WNOHANG) };
            if r == 0 {
                left += 1;
            }
        }
        if left == 0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn subreaper() {
    // SAFETY: prctl with integer args.
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    }
}

/// Checks a counter's output: strictly contiguous runs; every restart
/// continues from a checkpointed value (never from 0, never beyond the
/// last value printed before the kill + 1). Returns the restart points as
/// (last value before, first value after).
pub fn restarts(nums: &[i64]) -> Vec<(i64, i64)> {
    assert!(!nums.is_empty(), "no output");
    assert_eq!(nums[0], 0, "counter must start at 0: {nums:?}");
    let mut out = Vec::new();
    for w in nums.windows(2) {
        if w[1] == w[0] + 1 {
            continue;
        }
        assert!(
            w[1] <= w[0],
            "counter skipped ahead from {} to {}: {nums:?}",
            w[0],
            w[1]
        );
        out.push((w[0], w[1]));
    }
    out
}

/// The output of a counter whose files supervise rolls back: exactly
/// 0, 1, 2, ... whatever kills and restores happened (no gap, no repeat).
pub fn assert_exactly_once(nums: &[i64]) {
    assert!(!nums.is_empty(), "no output");
    for (i, n) in nums.iter().enumerate() {
        assert_eq!(*n, i as i64, "line {i} should be {i}: {nums:?}");
    }
}

/// Ids named by `event` lines ("checkpoint published", "restored") of a
/// supervise log, in order.
pub fn ids(log: &str, event: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains(event))
        .filter_map(|l| l.split("checkpoint=").nth(1))
        .filter_map(|r| r.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// The entry named `job` of a `supervise status --json` answer.
pub fn find_job<'a>(status: &'a serde_json::Value, job: &str) -> Option<&'a serde_json::Value> {
    status.as_array()?.iter().find(|j| j["name"] == job)
}

/// Polls `f` until it holds (every 10 ms at first, backing off to every
/// 200 ms); panics after `timeout`. Returns how long it took.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    let mut pause = Duration::from_millis(10);
    while !f() {
        assert!(
            t0.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(200));
    }
    t0.elapsed()
}

/// Waits until `path` holds at least `n` numbers.
pub fn wait_numbers(path: &Path, n: usize, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while numbers(path).len() < n {
        assert!(
            Instant::now() < deadline,
            "{} never reached {n} numbers",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// GET /metrics from a supervise's `--metrics` listener on `port`: the
/// body (the response must be 200).
pub fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut s = String::new();
    c.read_to_string(&mut s).unwrap();
    assert!(s.starts_with("HTTP/1.1 200"), "{s}");
    s.split_once("\r\n\r\n").unwrap().1.to_string()
}

/// `supervise ARGS JOB`: its exit code and stdout + stderr.
pub fn run_cli(args: &[&str], job: &Path) -> (i32, String) {
    let out = Command::new(BIN).args(args).arg(job).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `supervise images --json`.
pub fn images(job: &Path) -> Vec<serde_json::Value> {
    let out = Command::new(BIN)
        .args(["images", "--json"])
        .arg(job)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

pub const T: Duration = Duration::from_secs(30);

/// The pack file holding the objects an image (an entry of `images --json`)
/// stored anew.
pub fn newest_pack(img: &serde_json::Value) -> PathBuf {
    let dir = PathBuf::from(img["path"].as_str().unwrap());
    let name = img["pack"].as_str().expect("the image stored new data");
    dir.parent()
        .unwrap()
        .join("packs")
        .join(format!("{name}.pack"))
}

/// Caps the address space of `cmd`'s process at 2 GiB: a runaway
/// allocation fails there instead of exhausting the machine.
pub fn cap_memory(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: setrlimit only, between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 2 << 30,
                rlim_max: 2 << 30,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// `supervise checkpoint NAME` against `env`'s supervise, which must succeed.
pub fn checkpoint(env: &Env, name: &str) {
    let out = env.ctl(&["checkpoint", name]);
    assert!(
        out.status.success(),
        "checkpoint: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `supervise checkpoint NAME` on the control socket `socket`; must work.
pub fn checkpoint_on(socket: &Path, name: &str) {
    let out = Command::new(BIN)
        .arg("--socket")
        .arg(socket)
        .args(["checkpoint", name])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "checkpoint: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A local user for the tests (created once, kept: `useradd` is
/// idempotent here), with a group of its own and one more group.
pub struct TestUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// The test user `name` (`sv-alice`, `sv-bob`), created if missing, in
/// the extra group `sv-team`.
pub fn user(name: &str) -> TestUser {
    let _ = Command::new("groupadd").args(["-f", "sv-team"]).status();
    let exists = Command::new("id")
        .arg(name)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !exists {
        let st = Command::new("useradd")
            .args(["-M", "-U", "-G", "sv-team", "-s", "/usr/sbin/nologin", name])
            .status()
            .unwrap();
        // Another test process may have created it meanwhile.
        assert!(
            st.success() || Command::new("id").arg(name).status().unwrap().success(),
            "useradd {name}"
        );
    }
    let id = |flag: &str| -> u32 {
        let o = Command::new("id").args([flag, name]).output().unwrap();
        String::from_utf8_lossy(&o.stdout).trim().parse().unwrap()
    };
    TestUser {
        name: name.to_string(),
        uid: id("-u"),
        gid: id("-g"),
    }
}
