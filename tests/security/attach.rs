//! Attack 7: `attach = PID`. A PID names a process only together with its
//! start time: supervise must never adopt (and later kill) a process that
//! merely reuses the PID it was told about, and when an attached job's
//! root dies, the rest of the checkpointed tree must not live on next to
//! the restored copy.

use std::fs;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

use supervise::proc::ProcId;

use crate::common::{self, kill, progs, Env, T};

/// Starts `argv` in its own session with stdout/stderr appended to
/// `<env>/<out>`.
fn spawn_detached(env: &Env, argv: &[&str], out: &str) -> Child {
    let f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(env.path().join(out))
        .unwrap();
    let mut cmd = Command::new(argv[0]);
    cmd.args(&argv[1..])
        .current_dir(env.path())
        .stdin(Stdio::null())
        .stdout(f.try_clone().unwrap())
        .stderr(f);
    // SAFETY: setsid in the child before exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    cmd.spawn().unwrap()
}

/// Puts a `sleep` on `pid` (just freed) by moving the kernel's last PID
/// below it; None if other processes kept taking it.
fn occupy_pid(pid: i32) -> Option<Child> {
    for _ in 0..200 {
        if supervise::proc::alive(pid) {
            return None;
        }
        let _ = fs::write("/proc/sys/kernel/ns_last_pid", format!("{}", pid - 1));
        let mut c = Command::new("sleep").arg("300").spawn().unwrap();
        if c.id() as i32 == pid {
            return Some(c);
        }
        let _ = c.kill();
        let _ = c.wait();
    }
    None
}

/// supervise attached to a process and checkpointed it; the process ended
/// with supervise's stop, and an unrelated process now has its PID. A new
/// `supervise run` of the same job file must not attach to (nor, at its
/// shutdown, kill) the unrelated process: it restores the job from its
/// image instead.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn reused_pid_is_not_adopted_nor_killed() {
    let env = Env::new();
    let prog = progs().join("counter");
    let mut a = spawn_detached(&env, &[prog.to_str().unwrap(), "100"], "a.out");
    let pid = a.id() as i32;
    let job = env.job(
        "att",
        &format!("attach = {pid}\n[checkpoint]\nevery = \"1h\"\n[restore]\nbackoff = \"0s\"\n"),
    );
    let mut sup = env.start(&job);
    sup.wait_state("att", "running", T);
    let out = env.ctl(&["checkpoint", "att"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // SIGTERM: final checkpoint, then the attached process is stopped.
    sup.signal(libc::SIGTERM);
    assert_eq!(sup.wait_exit(T), 0, "{}", sup.log());
    let _ = a.wait();
    drop(sup);
    let Some(mut stranger) = occupy_pid(pid) else {
        eprintln!("note: could not place a process on PID {pid}; nothing to test");
        return;
    };
    let stranger_id = ProcId::of(pid).unwrap();
    let sup = env.start(&job);
    sup.wait_restores("att", 1, T);
    let log = sup.log();
    assert!(
        log.contains("not attaching") && log.contains("the PID was reused"),
        "{log}"
    );
    assert!(stranger_id.alive(), "the stranger was left alone: {log}");
    let (host, _) = sup.job_pid("att");
    assert_ne!(host, pid);
    drop(sup); // SIGTERM: stops the restored job
    assert!(
        stranger_id.alive(),
        "supervise's shutdown must not kill the process that reused the PID"
    );
    let _ = stranger.kill();
    let _ = stranger.wait();
    let nums = env.numbers("a.out");
    assert!(!nums.is_empty());
}

/// An attached root with a child: only the root is killed. Before the
/// tree is restored, the surviving child (same PID and start time as at
/// the checkpoint) is killed, so exactly one copy of the job runs and its
/// output is written once.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn survivors_of_an_attached_tree_are_killed_before_restore() {
    common::subreaper();
    let env = Env::new();
    let script = format!(
        "{} 100 > tree.out & echo $! > child.pid; wait",
        progs().join("counter").display()
    );
    let mut root = spawn_detached(&env, &["/bin/sh", "-c", &script], "root.log");
    let pid = root.id() as i32;
    let child_pid_file = env.path().join("child.pid");
    common::wait_until("child.pid", T, || {
        fs::read_to_string(&child_pid_file)
            .map(|s| s.trim().parse::<i32>().is_ok())
            .unwrap_or(false)
    });
    let child: i32 = fs::read_to_string(&child_pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let child_id = ProcId::of(child).unwrap();
    common::wait_numbers(&env.path().join("tree.out"), 3, T);
    let job = env.job(
        "tree",
        &format!("attach = {pid}\n[checkpoint]\nevery = \"1h\"\n[restore]\nbackoff = \"0s\"\n"),
    );
    let sup = env.start(&job);
    sup.wait_state("tree", "running", T);
    let out = env.ctl(&["checkpoint", "tree"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    kill(pid, libc::SIGKILL);
    let _ = root.wait();
    sup.wait_restores("tree", 1, T);
    assert!(
        !child_id.alive(),
        "the old child must be gone once the tree is restored: {}",
        sup.log()
    );
    let n = env.numbers("tree.out").len();
    common::wait_numbers(&env.path().join("tree.out"), n + 5, T);
    common::assert_exactly_once(&env.numbers("tree.out"));
    drop(sup);
    common::reap_pids(&[child]);
}
