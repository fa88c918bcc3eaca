//! The job's own files are rolled back with each restore (real CRIU).

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;

/// 0..200 ms, different each run; printed so a failure can be replayed.
fn random_pause() -> Duration {
    let n = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    Duration::from_millis(u64::from(n % 1000))
}

fn filejob(env: &Env, name: &str, steps: u32, every: &str, extra: &str) -> std::path::PathBuf {
    let argv = ["out.txt", "state.txt", &steps.to_string(), "100"];
    c_job(env, name, "filejob", &argv, every, "", extra)
}

/// Job `name` running test program `prog` with `argv`, its stdout and
/// stderr in stdout.txt and stderr.txt, checkpointed `every`; `checkpoint`
/// adds keys to `[checkpoint]`, `extra` tables at the end.
fn c_job(
    env: &Env,
    name: &str,
    prog_name: &str,
    argv: &[&str],
    every: &str,
    checkpoint: &str,
    extra: &str,
) -> std::path::PathBuf {
    let mut command = vec![format!("{:?}", prog(prog_name))];
    command.extend(argv.iter().map(|a| format!("{a:?}")));
    env.job(
        name,
        &format!(
            r#"command = [{}]
stdout = "stdout.txt"
stderr = "stderr.txt"
[checkpoint]
every = "{every}"
dir = "images"
{checkpoint}
[restore]
backoff = "0s"
{extra}
"#,
            command.join(", ")
        ),
    )
}

fn lines(steps: u32) -> String {
    (0..steps).map(|i| format!("{i}\n")).collect()
}

/// The issue's example: a job writing "0\n", "1\n", ... to a file opened
/// "w" (and rewriting a state file in place), SIGKILLed twice at random
/// moments and restored each time, leaves files identical to an
/// uninterrupted run: no gap, no repeat; stdout too.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn output_is_exactly_once_across_kills() {
    let env = Env::new();
    let steps = 100;
    let job = filejob(&env, "once", steps, "1s", "");
    let mut sup = env.start(&job);
    for round in 1..=2 {
        sup.wait_checkpoints("once", 2 * round, T);
        let pause = random_pause();
        eprintln!("kill {round} after {pause:?}");
        std::thread::sleep(pause);
        sup.kill_job("once");
        sup.wait_restores("once", round, T);
    }
    sup.wait_for("job exited; supervision ends", 1, Duration::from_secs(60));
    assert_eq!(sup.wait_exit(T), 0);
    let log = sup.log();
    assert!(log.contains("job files rolled back"), "{log}");
    let stderr = fs::read_to_string(env.path().join("stderr.txt")).unwrap_or_default();
    assert!(!stderr.contains("MISMATCH"), "{stderr}");
    assert_eq!(
        fs::read_to_string(env.path().join("out.txt")).unwrap(),
        lines(steps)
    );
    assert_eq!(
        fs::read_to_string(env.path().join("stdout.txt")).unwrap(),
        lines(steps)
    );
    assert_eq!(
        fs::read_to_string(env.path().join("state.txt")).unwrap(),
        format!("{:08}\n", steps - 1)
    );
    // stdout, stderr, out.txt and state.txt were recorded; only the 9 bytes
    // of the state file were copied.
    let img = &images(&job)[0];
    assert_eq!(img["job_files"], 4, "{img}");
    assert_eq!(img["job_files_copied_bytes"], 9, "{img}");
}

/// Restoring puts an in-place-rewritten state file back to the content it
/// had at the checkpoint: the job compares it with its memory on every step
/// and exits 3 on a mismatch. Killed only after it moved on from the image.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn state_file_is_put_back_to_the_checkpoint() {
    let env = Env::new();
    let job = filejob(&env, "state", 1000, "5s", "");
    let sup = env.start(&job);
    sup.wait_checkpoints("state", 1, T);
    let state = || {
        fs::read_to_string(env.path().join("state.txt"))
            .unwrap()
            .trim()
            .parse::<i64>()
            .unwrap_or(-1)
    };
    // Two steps after the checkpoint was published: the state file holds a
    // later value than the image's copy.
    let seen = state();
    let deadline = std::time::Instant::now() + T;
    while state() < seen + 2 {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
    sup.kill_job("state");
    sup.wait_restores("state", 1, T);
    assert_eq!(ids(&sup.log(), "checkpoint published").len(), 1);
    let n = env.numbers("out.txt").len();
    wait_numbers(&env.path().join("out.txt"), n + 3, T);
    let stderr = fs::read_to_string(env.path().join("stderr.txt")).unwrap_or_default();
    assert!(!stderr.contains("MISMATCH"), "{stderr}");
    assert_exactly_once(&env.numbers("out.txt"));
    let log = sup.log();
    assert!(
        log.contains("job files rolled back") && log.contains("changed=3"),
        "{log}"
    );
}

/// A file the job writes is deleted behind its back, then the job dies: the
/// rollback refuses with a message naming the file (nothing is guessed), no
/// image is used, and the job starts afresh, which rewrites the file whole.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn deleted_output_file_is_reported_and_job_starts_afresh() {
    let env = Env::new();
    let steps = 30;
    let job = filejob(&env, "deleted", steps, "1s", "");
    let mut sup = env.start(&job);
    sup.wait_checkpoints("deleted", 1, T);
    fs::remove_file(env.path().join("out.txt")).unwrap();
    sup.kill_job("deleted");
    sup.wait_for("starting the command afresh", 1, T);
    let log = sup.log();
    assert!(
        log.contains("cannot roll back") && log.contains("out.txt") && log.contains("deleted"),
        "{log}"
    );
    sup.wait_for("job exited; supervision ends", 1, Duration::from_secs(60));
    assert_eq!(sup.wait_exit(T), 0);
    assert_eq!(
        fs::read_to_string(env.path().join("out.txt")).unwrap(),
        lines(steps)
    );
}

/// A state file the job replaces atomically (write a temp file, rename),
/// so it is never open at a checkpoint, is kept whole when listed in
/// `[files] snapshot`; a shell job checks its own state after each restore.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn listed_snapshot_file_follows_the_job() {
    let env = Env::new();
    let script = r#"i=0; echo -1 > state
while [ $i -lt 40 ]; do
  [ "$(cat state)" = "$((i-1))" ] || { echo "MISMATCH $i $(cat state)" >&2; exit 3; }
  echo $i > state.tmp && mv state.tmp state
  echo $i
  i=$((i+1)); sleep 0.1
done"#;
    let job = env.job(
        "listed",
        &format!(
            r#"command = ["/bin/sh", "-c", {script:?}]
stdout = "stdout.txt"
stderr = "stderr.txt"
[checkpoint]
every = "1s"
[restore]
backoff = "0s"
[files]
snapshot = ["state"]
exclude = ["state.tmp"]
"#
        ),
    );
    let mut sup = env.start(&job);
    sup.wait_checkpoints("listed", 2, T);
    std::thread::sleep(random_pause());
    sup.kill_job("listed");
    sup.wait_restores("listed", 1, T);
    sup.wait_for("job exited; supervision ends", 1, Duration::from_secs(60));
    assert_eq!(sup.wait_exit(T), 0, "{}", sup.log());
    let stderr = fs::read_to_string(env.path().join("stderr.txt")).unwrap_or_default();
    assert!(!stderr.contains("MISMATCH"), "{stderr}");
    assert_exactly_once(&env.numbers("stdout.txt"));
    assert_eq!(env.numbers("stdout.txt").len(), 40);
    assert_eq!(
        fs::read_to_string(env.path().join("state")).unwrap(),
        "39\n"
    );
}

/// A job holding a write lease (`F_SETLEASE`, `F_WRLCK`) on a file it
/// rewrites in place, checkpointed with `file_locks = true`. Recording the
/// job's files must not open the leased file (an open starts a lease break
/// the frozen job cannot answer: the dump then hangs for the kernel's
/// `lease-break-time`, 45 s, and the job gets SIGIO). So the checkpoint
/// freezes the job well under a second and the job keeps its lease; after
/// a SIGKILL, CRIU restores the lease with the job and the job goes on.
///
/// CRIU itself would break the lease too (by default it opens every file
/// the job holds to read its ELF build-id): with `file_locks = true`
/// supervise asks it for size-only validation (`--file-validation
/// filesize`), which this test pins together with supervise's own part.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn leased_file_does_not_stall_the_checkpoint() {
    let env = Env::new();
    let argv = ["leased.dat", "100000", "100"];
    let job = c_job(&env, "lease", "lease", &argv, "1h", "file_locks = true", "");
    let mut sup = env.start(&job);
    let stdout = env.path().join("stdout.txt");
    wait_numbers(&stdout, 3, T);
    let (pid, _) = sup.job_pid("lease");
    let t0 = std::time::Instant::now();
    let out = env.ctl(&["checkpoint", "lease"]);
    let took = t0.elapsed();
    let stderr = || fs::read_to_string(env.path().join("stderr.txt")).unwrap_or_default();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        sup.log()
    );
    let j = sup.job_status("lease");
    let frozen = j["last_checkpoint"]["frozen_ms"].as_f64().unwrap();
    eprintln!("checkpoint took {took:?}, job frozen {frozen} ms");
    assert!(frozen < 1000.0, "frozen {frozen} ms: {j}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    // The job lives on, with its lease (it checks F_GETLEASE every step
    // and exits on SIGIO).
    let n = env.numbers("stdout.txt").len();
    wait_numbers(&stdout, n + 5, T);
    assert_eq!(sup.job_pid("lease").0, pid, "{}", sup.log());
    assert_eq!(sup.job_status("lease")["restores"], 0);
    assert!(stderr().is_empty(), "{}", stderr());
    // SIGKILL, restore: the job continues from the checkpoint, lease and all.
    sup.kill_job("lease");
    sup.wait_restores("lease", 1, T);
    let n = env.numbers("stdout.txt").len();
    wait_numbers(&stdout, n + 10, T);
    let j = sup.job_status("lease");
    assert_eq!(
        (j["restores"].as_u64(), j["state"].as_str()),
        (Some(1), Some("running")),
        "{j}\n{}",
        sup.log()
    );
    assert!(stderr().is_empty(), "{}", stderr());
    assert_exactly_once(&env.numbers("stdout.txt"));
    let (pid, _) = sup.job_pid("lease");
    let locks = fs::read_to_string("/proc/locks").unwrap();
    assert!(
        locks.lines().any(|l| l.contains("LEASE")
            && l.contains("WRITE")
            && l.split_whitespace().nth(4) == Some(&pid.to_string())),
        "restored job {pid} holds no write lease:\n{locks}"
    );
    sup.kill_all();
}

/// A job maps a file shared and writable but never writes it, and checks
/// after every step that the file's modification time has not moved (as
/// programs comparing mtimes after a restart do). Checkpointed, SIGKILLed
/// and restored: the rollback finds the file unchanged and leaves it alone
/// (before, it was rewritten at every restore and its mtime moved), so the
/// restored job runs to its end.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn mapped_unchanged_file_keeps_its_mtime_across_a_restore() {
    let env = Env::new();
    let steps = 60;
    let argv = ["table.dat", &steps.to_string(), "100"];
    let job = c_job(&env, "mtime", "mtime", &argv, "1s", "", "");
    let mut sup = env.start(&job);
    sup.wait_checkpoints("mtime", 2, T);
    let table = env.path().join("table.dat");
    let mtime = || {
        let m = fs::metadata(&table).unwrap();
        (m.mtime(), m.mtime_nsec())
    };
    let before = mtime();
    sup.kill_job("mtime");
    sup.wait_restores("mtime", 1, T);
    sup.wait_for("job exited; supervision ends", 1, Duration::from_secs(60));
    let log = sup.log();
    assert_eq!(sup.wait_exit(T), 0, "{log}");
    let stderr = fs::read_to_string(env.path().join("stderr.txt")).unwrap_or_default();
    assert!(!stderr.contains("MTIME"), "{stderr}");
    assert_eq!(mtime(), before);
    assert!(log.contains("job files rolled back"), "{log}");
    assert_eq!(log.matches("job files rolled back").count(), 1, "{log}");
    assert_exactly_once(&env.numbers("stdout.txt"));
    assert_eq!(env.numbers("stdout.txt").len(), steps as usize);
}
