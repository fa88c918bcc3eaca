//! Attacks on supervise's resources: connection floods on its listeners,
//! a squatted metrics port, and running out of file descriptors. None of
//! them may cost a job its restore, its checkpoint schedule or its images.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::{self, run_cli, Env, JobFile, T};
use crate::{attacker_dir, NOBODY};

/// Opens many connections and keeps each alive with one byte a second.
const FLOOD_PY: &str = r#"
import os, resource, socket, sys, time
kind, target, n, ready = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
socks = []
for i in range(n):
    try:
        if kind == "tcp":
            host, port = target.rsplit(":", 1)
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            s.connect_ex((host, int(port)))
        else:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(target)
            except BlockingIOError:
                pass
    except OSError:
        continue
    socks.append(s)
with open(ready + ".tmp", "w") as f:
    f.write(str(len(socks)))
os.rename(ready + ".tmp", ready)
while True:
    for s in socks:
        try:
            s.send(b"G")
        except OSError:
            pass
    time.sleep(1)
"#;

/// Binds a loopback port, writes it to a file, and holds it (accepting
/// nothing).
const SQUAT_PY: &str = r#"
import os, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.bind(("127.0.0.1", 0))
s.listen(16)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(str(s.getsockname()[1]))
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
while True:
    time.sleep(60)
"#;

/// A helper process of the test, killed and reaped when dropped.
struct Helper(Child);

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the Python `script` with `args`, as `uid` (root or the attacker),
/// with room for `nofile` descriptors.
fn python(dir: &Path, name: &str, script: &str, args: &[&str], uid: u32, nofile: u64) -> Helper {
    let path = dir.join(name);
    fs::write(&path, script).unwrap();
    let mut cmd = if uid == 0 {
        Command::new("/usr/bin/python3")
    } else {
        let mut c = Command::new("setpriv");
        c.args([
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
            "--",
            "/usr/bin/python3",
        ]);
        c
    };
    cmd.arg(&path)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: setrlimit only, in the child before exec.
    unsafe {
        cmd.pre_exec(move || {
            let l = libc::rlimit {
                rlim_cur: nofile,
                rlim_max: nofile,
            };
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
            Ok(())
        });
    }
    Helper(cmd.spawn().unwrap())
}

/// A port nobody listens on (bound and released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// File descriptors `pid` holds.
fn open_fds(pid: i32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

fn wait_file(p: &Path) -> String {
    common::wait_until(&format!("{} to appear", p.display()), T, || p.exists());
    fs::read_to_string(p).unwrap()
}

/// `prlimit --pid PID --nofile=N:` (the soft limit only: without
/// CAP_SYS_RESOURCE a lowered hard limit could not be raised again).
fn limit_fds(pid: i32, n: usize) {
    let st = Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--nofile={n}:")])
        .status()
        .unwrap();
    assert!(st.success());
}

/// With 1024 descriptors in all (a service's usual limit), 3000 slow
/// connections to `/metrics` from another user and 2000 to the control
/// socket from root cannot starve supervise: the listeners hold at most
/// their caps, root's own scrape and `status` are answered, a SIGKILLed job
/// is restored from its newest image, the schedule goes on, and nothing is
/// taken for damage.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn connection_floods_do_not_cost_the_job() {
    let env = Env::new();
    let attacker = attacker_dir(&env, "attacker");
    let job = JobFile::counter("c").every("1s").write(&env);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let sup = env.start_with_nofile(
        &[OsStr::new("--metrics"), OsStr::new(&addr), job.as_os_str()],
        1024,
    );
    sup.wait_checkpoints("c", 2, T);
    let metrics_ready = attacker.join("metrics-flood.ready");
    let _metrics_flood = python(
        &attacker,
        "flood.py",
        FLOOD_PY,
        &["tcp", &addr, "3000", metrics_ready.to_str().unwrap()],
        NOBODY,
        8192,
    );
    let control_ready = env.path().join("control-flood.ready");
    let socket = env.socket();
    let _control_flood = python(
        env.path(),
        "flood.py",
        FLOOD_PY,
        &[
            "unix",
            socket.to_str().unwrap(),
            "2000",
            control_ready.to_str().unwrap(),
        ],
        0,
        8192,
    );
    let opened: usize = wait_file(&metrics_ready).trim().parse().unwrap();
    assert!(
        opened >= 2000,
        "the attacker opened only {opened} connections"
    );
    wait_file(&control_ready);
    // The listeners keep at most twice their caps (2 x (32 + 64) at this
    // budget, counting connections being closed).
    let fds = open_fds(sup.pid());
    assert!(
        fds < 300,
        "supervise holds {fds} descriptors during the flood"
    );
    // Root's own scrape gets through the other user's flood.
    let body = common::scrape(port);
    assert!(body.contains("supervise_job_up"), "{body}");
    // The job dies during the flood: restored from its newest image.
    let before = sup.checkpoints("c");
    let newest = sup.job_status("c")["last_checkpoint"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    sup.kill_job("c");
    let s = sup.wait_restores("c", 1, T);
    // Ids start with their sequence number: the image restored is the
    // newest at the kill (or one published just before it).
    let restored = s["last_restore"]["checkpoint"].as_str().unwrap();
    assert!(
        restored >= newest.as_str(),
        "{restored} older than {newest}"
    );
    // The schedule goes on after the restore.
    sup.wait_checkpoints("c", before + 2, T);
    let fds = open_fds(sup.pid());
    assert!(
        fds < 300,
        "supervise holds {fds} descriptors during the flood"
    );
    let log = sup.log();
    for bad in [
        "Too many open files",
        "not repairable",
        "trying the next older one",
        "failed verification",
    ] {
        assert!(!log.contains(bad), "{bad:?} in the log:\n{log}");
    }
    common::assert_exactly_once(&env.numbers("c.out"));
    drop(_metrics_flood);
    drop(_control_flood);
    let (code, out) = run_cli(&["verify"], &job);
    assert_eq!(code, 0, "{out}");
}

/// supervise runs out of descriptors (its limit lowered to what it holds)
/// while the job dies: the restore fails for want of a descriptor, which
/// says nothing about the images. It is tried again (the log says why),
/// and once descriptors are back the newest image is restored, not an
/// older one and not a fresh start; nothing is marked damaged.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn running_out_of_descriptors_delays_the_restore_but_loses_nothing() {
    let env = Env::new();
    let job = JobFile::counter("c").every("1h").write(&env);
    let sup = env.start(&job);
    sup.wait_state("c", "running", T);
    common::checkpoint(&env, "c");
    common::checkpoint(&env, "c");
    let s = sup.job_status("c");
    let newest = s["last_checkpoint"]["id"].as_str().unwrap().to_string();
    let (pid, _) = sup.job_pid("c");
    let sup_pid = sup.pid();
    limit_fds(sup_pid, open_fds(sup_pid));
    common::kill(pid, libc::SIGKILL);
    sup.wait_for("a resource of supervise's ran short", 1, T);
    limit_fds(sup_pid, 16384);
    let s = sup.wait_restores("c", 1, Duration::from_secs(120));
    assert_eq!(
        s["last_restore"]["checkpoint"].as_str(),
        Some(newest.as_str())
    );
    let log = sup.log();
    for bad in [
        "not repairable",
        "trying the next older one",
        "starting the command afresh",
        "failed verification",
    ] {
        assert!(!log.contains(bad), "{bad:?} in the log:\n{log}");
    }
    common::wait_numbers(&env.path().join("c.out"), 3, T);
    common::assert_exactly_once(&env.numbers("c.out"));
    let (code, out) = run_cli(&["verify"], &job);
    assert_eq!(code, 0, "{out}");
}

/// Another user binds the metrics address first: supervise warns and
/// supervises its job regardless, and serves metrics once the address is
/// free.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn a_squatted_metrics_port_delays_metrics_not_the_job() {
    let env = Env::new();
    let attacker = attacker_dir(&env, "attacker");
    let port_file: PathBuf = attacker.join("squat.port");
    let squatter = python(
        &attacker,
        "squat.py",
        SQUAT_PY,
        &[port_file.to_str().unwrap()],
        NOBODY,
        1024,
    );
    let port: u16 = wait_file(&port_file).trim().parse().unwrap();
    let addr = format!("127.0.0.1:{port}");
    let job = JobFile::counter("c").every("1s").write(&env);
    let sup = env.start_with(&[OsStr::new("--metrics"), OsStr::new(&addr), job.as_os_str()]);
    sup.wait_for("cannot serve metrics", 1, T);
    sup.wait_checkpoints("c", 1, T);
    drop(squatter);
    sup.wait_for("metrics address is free again", 1, T);
    assert!(common::scrape(port).contains("supervise_checkpoints_total"));
    let s = sup.job_status("c");
    assert!(s["pid"].as_i64().is_some(), "the job runs: {s}");
}
