//! The fault suite: what supervise does when CRIU fails, jobs crash-loop,
//! stores are damaged or full, and input is hostile. Real CRIU, real
//! processes.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// No process of the tree is stopped or traced.
fn assert_not_stopped(root: i32) {
    for p in supervise::proc::tree(root) {
        let st = supervise::proc::state(p);
        assert!(
            !matches!(st, Some('T') | Some('t')),
            "pid {p} is left in state {st:?}"
        );
    }
}

/// CRIU is SIGKILLed in the middle of a dump: the job is not left frozen
/// or stopped, CRIU's last words reach the user, and the next checkpoint
/// works.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn criu_killed_mid_dump_leaves_the_job_running() {
    let env = Env::new();
    let job = JobFile::program("big", &[&prog("bigmem"), "768"])
        .every("1h")
        .write(&env);
    let sup = env.start(&job);
    sup.wait_state("big", "running", T);
    let out = env.path().join("big.out");
    wait_numbers(&out, 2, T);
    let (pid, _) = sup.job_pid("big");
    let ckpt = env.ctl_spawn(&["checkpoint", "big"]);
    // Find supervise's dumping criu: the one run through nsenter in the
    // job's namespaces (not the one-off feature check).
    let comm = |p: i32| fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
    let parent = |p: i32| {
        fs::read_to_string(format!("/proc/{p}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit(") ")
                    .next()?
                    .split_whitespace()
                    .nth(1)?
                    .parse::<i32>()
                    .ok()
            })
            .unwrap_or(0)
    };
    let mut criu = None;
    wait_until("criu dump to start", T, || {
        criu = supervise::proc::tree(sup.pid())
            .into_iter()
            .find(|p| comm(*p).trim() == "criu" && comm(parent(*p)).trim() == "nsenter");
        criu.is_some()
    });
    std::thread::sleep(Duration::from_millis(150));
    kill(criu.unwrap(), libc::SIGKILL);
    let res = ckpt.wait_with_output().unwrap();
    assert_eq!(res.status.code(), Some(1), "{res:?}");
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        err.contains("checkpoint failed") && err.contains("criu dump"),
        "{err}"
    );
    assert!(supervise::proc::alive(pid));
    assert_not_stopped(pid);
    let n = env.numbers("big.out").len();
    wait_numbers(&out, n + 3, T);
    let st = env.status();
    assert!(
        st[0]["last_error"].as_str().unwrap().contains("criu dump"),
        "{st}"
    );
    assert_eq!(st[0]["state"], "running");
    // Nothing half-written was published, and the next attempt works.
    assert!(images(&job).is_empty());
    let again = env.ctl(&["checkpoint", "big"]);
    assert!(again.status.success(), "{again:?}");
    assert_eq!(images(&job).len(), 1);
}

/// A resource CRIU cannot dump (an established TCP connection without
/// `tcp_established`): every scheduled checkpoint fails with CRIU's own
/// words, once per tick (no hammering), and the job runs on unfrozen.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn undumpable_job_fails_each_tick_with_criu_text() {
    let env = Env::new();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || listener.accept().map(|(s, _)| s));
    let script = format!(
        "exec 3<>/dev/tcp/127.0.0.1/{port}; exec {} 100",
        prog("counter")
    );
    let job = JobFile::counter("tcp")
        .command(&["/bin/bash", "-c", &script])
        .write(&env);
    let sup = env.start(&job);
    sup.wait_state("tcp", "running", T);
    let _conn = server.join().unwrap().unwrap();
    sup.wait_failed_checkpoints("tcp", 1, T);
    let t0 = Instant::now();
    let s = sup.wait_failed_checkpoints("tcp", 4, T);
    let span = t0.elapsed();
    assert_eq!(s["last_failure"]["step"], "dump", "{s}");
    assert_eq!(s["checkpoints"], 0, "{s}");
    assert!(
        span >= Duration::from_millis(2500),
        "3 more failures took only {span:?}: retries must follow the 1 s schedule"
    );
    let log = sup.log();
    assert!(
        log.contains("tcp-established") || log.contains("TCP"),
        "CRIU's words: {log}"
    );
    let (pid, _) = sup.job_pid("tcp");
    assert_not_stopped(pid);
    let out = env.path().join("tcp.out");
    let n = env.numbers("tcp.out").len();
    wait_numbers(&out, n + 3, T);
    assert!(images(&job).is_empty());
    assert!(!log.contains("checkpoint published"));
}

/// A job that dies right after every restore: growing backoff, then a
/// final failure that says why, and `supervise run` exits 1 as every job
/// it supervises failed.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn crash_loop_backs_off_then_fails_with_a_reason() {
    let env = Env::new();
    let job = env.job(
        "crashy",
        r#"command = ["/bin/sh", "-c", "i=0; while [ $i -lt 14 ]; do echo $i; i=$((i+1)); sleep 0.1; done; exit 1"]
stdout = "crashy.out"
[checkpoint]
every = "1s"
[restore]
max_restores = 3
window = "10m"
backoff = "200ms"
backoff_max = "5s"
"#,
    );
    let mut sup = env.start(&job);
    let code = sup.wait_exit(Duration::from_secs(60));
    let log = sup.log();
    assert_eq!(code, 1, "{log}");
    let delays: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("backing off before restoring"))
        .filter_map(|l| l.split("delay_ms=").nth(1))
        .filter_map(|v| v.split_whitespace().next()?.parse().ok())
        .collect();
    // The first death restores at once; each death soon after a restore
    // backs off, doubling.
    assert_eq!(delays, [200, 400], "{log}");
    assert!(
        log.contains("restored"),
        "it was restored before giving up: {log}"
    );
    assert!(
        log.contains("job died 4 times within 10m; giving up (restore.max_restores)"),
        "{log}"
    );
}

/// Images hold the job's whole memory: the store is private (dirs 0700,
/// files 0600), and an image dir others can write to is refused before
/// anything starts.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn image_store_is_private_and_an_open_one_is_refused() {
    let env = Env::new();
    let job = JobFile::counter("priv").dir("images").write(&env);
    let mut sup = env.start(&job);
    sup.wait_checkpoints("priv", 1, T);
    sup.signal(libc::SIGTERM);
    assert_eq!(sup.wait_exit(T), 0);
    drop(sup);
    let mut checked = 0;
    let mut stack = vec![env.path().join("images")];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            let md = fs::symlink_metadata(e.path()).unwrap();
            let mode = md.permissions().mode() & 0o777;
            if md.is_dir() {
                assert_eq!(mode, 0o700, "{}", e.path().display());
                stack.push(e.path());
            } else if md.is_file() {
                assert_eq!(mode & 0o077, 0, "{} is {mode:o}", e.path().display());
            }
            checked += 1;
        }
    }
    assert!(checked > 3);
    fs::set_permissions(env.path().join("images"), fs::Permissions::from_mode(0o777)).unwrap();
    let out = Command::new(BIN)
        .arg("run")
        .arg(&job)
        .env("SUPERVISE_SOCKET", env.socket())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("images") && err.contains("writable"), "{err}");
}

/// A small tmpfs mounted for the test; unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, size: &str) -> Tmpfs {
        fs::create_dir_all(dir).unwrap();
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs");
        Tmpfs(dir.to_path_buf())
    }

    fn free(&self) -> u64 {
        let s = nix::sys::statvfs::statvfs(&self.0).unwrap();
        s.blocks_available() as u64 * s.fragment_size() as u64
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// The image dir fills up: the checkpoint fails (ENOSPC, logged and in
/// status), the job runs on unfrozen, the older image stays intact and
/// restorable, the next scheduled checkpoint is tried again and succeeds
/// once there is room.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn disk_full_during_a_checkpoint() {
    let env = Env::new();
    let disk = Tmpfs::mount(&env.path().join("images"), "24m");
    let job = JobFile::program("full", &[&prog("dirty"), "8", "64", "100"])
        .dir("images")
        .keep(2)
        .write(&env);
    let sup = env.start(&job);
    sup.wait_checkpoints("full", 1, T);
    // Leave ~256 KiB free: far less than the ~2.5 MiB of pages the job
    // (incompressible memory, 640 pages rewritten a second) changes
    // between checkpoints.
    let filler = disk.0.join(".filler");
    let room = disk.free().saturating_sub(256 << 10);
    let f = fs::File::create(&filler).unwrap();
    f.set_len(room).unwrap();
    nix::fcntl::fallocate(
        std::os::fd::AsRawFd::as_raw_fd(&f),
        nix::fcntl::FallocateFlags::empty(),
        0,
        room as i64,
    )
    .unwrap();
    drop(f);
    let before = images(&job);
    let failed = sup.job_status("full")["failed_checkpoints"]
        .as_u64()
        .unwrap();
    let s = sup.wait_failed_checkpoints("full", failed + 2, T);
    assert!(
        s["last_failure"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("No space")),
        "{s}"
    );
    let log = sup.log();
    assert!(
        log.contains("No space left on device") || log.contains("ENOSPC"),
        "{log}"
    );
    let st = env.status();
    assert!(
        st[0]["last_error"].as_str().unwrap().contains("No space"),
        "{st}"
    );
    let (pid, _) = sup.job_pid("full");
    assert_not_stopped(pid);
    let n = env.numbers("full.out").len();
    wait_numbers(&env.path().join("full.out"), n + 3, T);
    // The older images are intact, and the newest still restores.
    let after = images(&job);
    let ids = |v: &[serde_json::Value]| v.iter().map(|i| i["id"].clone()).collect::<Vec<_>>();
    assert_eq!(
        ids(&after)[..],
        ids(&before)[..],
        "images changed while the disk was full"
    );
    let verify = Command::new(BIN).arg("images").arg(&job).output().unwrap();
    assert!(verify.status.success());
    sup.kill_job("full");
    sup.wait_restores("full", 1, T);
    assert!(sup.log().contains(&format!(
        "restored checkpoint={}",
        before[0]["id"].as_str().unwrap()
    )));
    // Room again: the schedule's next checkpoint succeeds.
    fs::remove_file(&filler).unwrap();
    let published = sup.checkpoints("full");
    sup.wait_checkpoints("full", published + 1, T);
    let k = env.numbers("full.out").len();
    wait_numbers(&env.path().join("full.out"), k + 3, T);
    assert_exactly_once(&env.numbers("full.out"));
    drop(sup);
    drop(disk);
}
