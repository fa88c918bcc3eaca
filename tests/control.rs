//! The control plane against a real daemon: status, checkpoint-now, manual
//! restore, stop/start, several jobs, re-adoption after SIGKILL, socket
//! permissions, metrics.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::process::CommandExt;

use common::*;

/// The counter job of these tests, with its own image dir.
fn counter(env: &Env, name: &str, every: &str) -> std::path::PathBuf {
    JobFile::counter(name)
        .every(every)
        .dir(&format!("images-{name}"))
        .write(env)
}

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Status has the documented fields; checkpoint-now adds an image and
/// status then shows it.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn status_and_checkpoint_now() {
    let env = Env::new();
    let job = counter(&env, "c", "1h");
    let sup = env.start(&job);
    sup.wait_state("c", "running", T);
    let s = env.status();
    let j = &s[0];
    assert_eq!(j["name"], "c");
    assert_eq!(j["state"], "running");
    assert!(j["pid"].as_i64().unwrap() > 0, "{j}");
    assert_eq!(j["ns_pid"], 1000);
    assert!(j["uptime_s"].as_f64().unwrap() >= 0.0, "{j}");
    assert_eq!(j["restores"], 0);
    assert!(j["last_checkpoint"].is_null());
    assert!(j["next_checkpoint"].is_string(), "{j}");
    assert!(images(&job).is_empty());

    let out = ok(&env.ctl(&["checkpoint", "c"]));
    assert!(out.contains("published"), "{out}");
    let imgs = images(&job);
    assert_eq!(imgs.len(), 1);
    let j = env.status()[0].clone();
    assert_eq!(j["last_checkpoint"]["id"], imgs[0]["id"], "{j}");
    assert!(j["last_checkpoint"]["frozen_ms"].as_f64().unwrap() > 0.0);
    assert!(j["last_checkpoint"]["bytes"].as_u64().unwrap() > 0);
    assert_eq!(j["checkpoints"], 1);

    let text = ok(&env.ctl(&["status"]));
    assert!(
        text.contains("running") && text.contains(imgs[0]["id"].as_str().unwrap()),
        "{text}"
    );
    let bad = env.ctl(&["checkpoint", "nosuch"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no job named \"nosuch\""));
}

/// A second checkpoint request while one is running is refused cleanly.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn checkpoint_now_refused_while_one_runs() {
    let env = Env::new();
    let job = JobFile::program("big", &[&prog("bigmem"), "384"])
        .every("1h")
        .write(&env);
    let sup = env.start(&job);
    sup.wait_state("big", "running", T);
    wait_numbers(&env.path().join("big.out"), 2, T);
    let first = env.ctl_spawn(&["checkpoint", "big"]);
    wait_until("state checkpointing", T, || {
        env.status()[0]["state"] == "checkpointing"
    });
    let second = env.ctl(&["checkpoint", "big"]);
    assert_eq!(second.status.code(), Some(1));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("already in progress"), "{err}");
    let out = first.wait_with_output().unwrap();
    ok(&out);
    assert_eq!(images(&job).len(), 1);
}

/// Manual restore to an older image continues from that image's state;
/// a bad id leaves the job alone.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn manual_restore_to_an_older_image() {
    let env = Env::new();
    let job = counter(&env, "m", "1h");
    let sup = env.start(&job);
    sup.wait_state("m", "running", T);
    let out = env.path().join("m.out");
    wait_numbers(&out, 3, T);
    ok(&env.ctl(&["checkpoint", "m"]));
    let at_first = env.numbers("m.out").len();
    wait_numbers(&out, at_first + 10, T);
    ok(&env.ctl(&["checkpoint", "m"]));
    let imgs = images(&job);
    assert_eq!(imgs.len(), 2);
    let older = imgs[1]["id"].as_str().unwrap().to_string();
    let n = env.numbers("m.out").len();
    wait_numbers(&out, n + 5, T);
    let before = env.numbers("m.out").len();

    let pid = env.status()[0]["pid"].as_i64().unwrap();
    let bad = env.ctl(&["restore", "m", "--image", "000099-20261128T000000Z"]);
    assert_eq!(bad.status.code(), Some(1));
    assert_eq!(
        env.status()[0]["pid"].as_i64().unwrap(),
        pid,
        "job untouched"
    );

    ok(&env.ctl(&["restore", "m", "--image", &older]));
    let after = env.numbers("m.out").len();
    assert!(
        after <= at_first + 2 && after < before,
        "rolled back to the older image: {after} lines now, {at_first} at it, {before} before"
    );
    assert_exactly_once(&env.numbers("m.out"));
    let j = env.status()[0].clone();
    assert_eq!(j["restores"], 1);
    assert_ne!(j["pid"].as_i64().unwrap(), pid);
    wait_numbers(&out, after + 3, T);
    assert_exactly_once(&env.numbers("m.out"));
    assert!(sup.log().contains(&format!("restored checkpoint={older}")));

    // A damaged image is refused before the running job is touched: flip a
    // byte in the older image's pack (the first, largest one).
    let pack = fs::read_dir(env.path().join("images-m/packs"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "pack"))
        .max_by_key(|p| fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = fs::read(&pack).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(&pack, bytes).unwrap();
    // Beyond repair: without its parity sidecar (the default store would
    // rebuild one flipped byte from it).
    fs::remove_file(pack.with_extension("pack.par")).unwrap();
    let pid = env.status()[0]["pid"].as_i64().unwrap();
    let out = env.ctl(&["restore", "m", "--image", &older]);
    assert_eq!(out.status.code(), Some(1));
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(
        msg.contains("failed verification") && msg.contains("left as it is"),
        "{msg}"
    );
    assert_eq!(
        env.status()[0]["pid"].as_i64().unwrap(),
        pid,
        "job untouched"
    );
    assert!(supervise::proc::alive(pid as i32));
}

/// stop --checkpoint, then start: resumes from that checkpoint.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn stop_and_start() {
    let env = Env::new();
    let job = counter(&env, "s", "1h");
    let sup = env.start(&job);
    sup.wait_state("s", "running", T);
    wait_numbers(&env.path().join("s.out"), 3, T);
    let (pid, _) = sup.job_pid("s");
    let out = ok(&env.ctl(&["stop", "s", "--checkpoint"]));
    assert!(out.contains("stopped after checkpoint"), "{out}");
    let j = env.status()[0].clone();
    assert_eq!(j["state"], "stopped");
    assert!(j["pid"].is_null());
    assert!(!supervise::proc::alive(pid));
    let stopped_at = env.numbers("s.out").len();
    assert_eq!(env.ctl(&["stop", "s"]).status.code(), Some(1));
    assert_eq!(env.ctl(&["checkpoint", "s"]).status.code(), Some(1));

    let out = ok(&env.ctl(&["start", "s"]));
    assert!(out.contains("running as pid"), "{out}");
    assert_eq!(env.status()[0]["state"], "running");
    sup.wait_restores("s", 1, T);
    wait_numbers(&env.path().join("s.out"), stopped_at + 3, T);
    assert_exactly_once(&env.numbers("s.out"));
    assert_eq!(env.ctl(&["start", "s"]).status.code(), Some(1));
}

/// `supervise run jobs/`: two jobs; one crash-loops and fails, the other
/// keeps being checkpointed; supervise keeps running.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn one_crash_looping_job_does_not_disturb_another() {
    let env = Env::new();
    let dir = env.path().join("jobs");
    fs::create_dir(&dir).unwrap();
    JobFile::counter("good").write_in(&dir);
    fs::write(
        dir.join("loop.toml"),
        "command = [\"/bin/sh\", \"-c\", \"sleep 0.2; exit 3\"]\n[restore]\nbackoff = \"0s\"\nmax_restores = 2\n",
    )
    .unwrap();
    let mut sup = env.start_with(&[dir.as_os_str()]);
    sup.wait_state("loop", "failed", T);
    let s = env.status();
    let by = |n: &str| {
        s.as_array()
            .unwrap()
            .iter()
            .find(|j| j["name"] == n)
            .unwrap()
            .clone()
    };
    let lp = by("loop");
    assert_eq!(lp["state"], "failed");
    assert!(lp["reason"].as_str().unwrap().contains("giving up"), "{lp}");
    assert_eq!(by("good")["state"], "running");
    let published = sup.checkpoints("good");
    sup.wait_checkpoints("good", published + 2, T);
    assert_eq!(
        env.status()
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["name"] == "good")
            .unwrap()["state"],
        "running"
    );
    assert_eq!(
        env.ctl(&["start", "loop"]).status.code(),
        Some(1),
        "a failed job is no longer supervised"
    );
    assert!(
        sup.wait_exit_nonblocking().is_none(),
        "supervise still runs"
    );
    assert_exactly_once(&numbers(&dir.join("good.out")));
}

/// SIGKILL supervise: the job keeps running; a new supervise re-adopts it
/// (same process, no second copy) and still restores it after a kill.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn readopts_job_after_supervise_is_killed() {
    subreaper();
    let env = Env::new();
    let job = counter(&env, "r", "1s");
    let mut sup = env.start(&job);
    sup.wait_checkpoints("r", 1, T);
    let (pid, _) = sup.job_pid("r");
    kill(sup.pid(), libc::SIGKILL);
    assert_eq!(sup.wait_exit(T), 128 + libc::SIGKILL);
    assert!(
        supervise::proc::alive(pid),
        "the job survives its supervisor"
    );
    let out = env.path().join("r.out");
    let n = env.numbers("r.out").len();
    wait_numbers(&out, n + 3, T);

    let sup2 = env.start(&job);
    sup2.wait_for("re-adopted", 1, T);
    assert_eq!(sup2.job_pid("r").0, pid, "same process");
    assert!(supervise::proc::alive(pid));
    let log = sup2.log();
    assert!(
        !log.contains("started pid") && !log.contains("restored"),
        "{log}"
    );
    assert_eq!(env.status()[0]["pid"].as_i64().unwrap(), pid as i64);
    sup2.wait_checkpoints("r", 1, T);

    let v: serde_json::Value =
        serde_json::from_slice(&fs::read(env.path().join(".supervise/r/job.json")).unwrap())
            .unwrap();
    let old_init = v["init_pid"].as_i64().unwrap() as i32;
    sup2.kill_job("r");
    sup2.wait_restores("r", 1, T);
    // The old init was orphaned to this test (a subreaper): reap it.
    reap_pids(&[old_init]);
    let n = env.numbers("r.out").len();
    wait_numbers(&out, n + 3, T);
    assert_exactly_once(&env.numbers("r.out"));
    assert!(sup2.log().contains("job died status=killed by SIGKILL"));
}

/// The socket is 0600 in a private directory, and the server checks the
/// peer's uid even when the file permissions are opened up.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn socket_refuses_other_users() {
    let env = Env::new();
    let job = counter(&env, "p", "1h");
    let sup = env.start(&job);
    sup.wait_state("p", "running", T);
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(env.socket()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let as_nobody = || {
        std::process::Command::new(BIN)
            .arg("status")
            .env("SUPERVISE_SOCKET", env.socket())
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap()
    };
    // The test binary's directories must be reachable for nobody to run it.
    let denied = as_nobody();
    if denied.status.code() == Some(126) || denied.status.code() == Some(127) {
        eprintln!("note: nobody cannot execute {BIN}; skipping the uid part");
        return;
    }
    assert_eq!(denied.status.code(), Some(1), "{denied:?}");
    assert!(String::from_utf8_lossy(&denied.stderr).contains("ermission denied"));
    // Open the file permissions: the peer-credential check still refuses.
    fs::set_permissions(env.path(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(env.socket(), fs::Permissions::from_mode(0o666)).unwrap();
    let refused = as_nobody();
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("uid 65534 may not use this supervise"),
        "{err}"
    );
    ok(&env.ctl(&["status"]));
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// The metrics endpoint scrapes, and its counters move with checkpoints
/// and restores.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn metrics_endpoint_counts() {
    let env = Env::new();
    let job = counter(&env, "x", "1h");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let sup = env.start_with(&[OsStr::new("--metrics"), OsStr::new(&addr), job.as_os_str()]);
    sup.wait_state("x", "running", T);
    let t = scrape(port);
    assert_eq!(metric(&t, r#"supervise_job_up{job="x"}"#), 1.0, "{t}");
    let ok_ckpt = r#"supervise_checkpoints_total{job="x",outcome="ok"}"#;
    assert_eq!(metric(&t, ok_ckpt), 0.0);
    ok(&env.ctl(&["checkpoint", "x"]));
    ok(&env.ctl(&["checkpoint", "x"]));
    let t = scrape(port);
    assert_eq!(metric(&t, ok_ckpt), 2.0, "{t}");
    assert_eq!(
        metric(
            &t,
            r#"supervise_checkpoint_duration_seconds_count{job="x"}"#
        ),
        2.0
    );
    assert!(metric(&t, r#"supervise_checkpoint_written_bytes_total{job="x"}"#) > 0.0);
    // The schedule: the interval (fixed here) and skipped ticks.
    assert_eq!(
        metric(&t, r#"supervise_checkpoint_interval_seconds{job="x"}"#),
        3600.0,
        "{t}"
    );
    assert_eq!(
        metric(&t, r#"supervise_skipped_ticks_total{job="x"}"#),
        0.0,
        "{t}"
    );
    let st = sup.job_status("x");
    assert_eq!(st["interval_s"].as_f64(), Some(3600.0), "{st}");
    assert_eq!(st["skipped_ticks"].as_u64(), Some(0), "{st}");
    assert!(st["auto"].is_null(), "{st}");
    sup.kill_job("x");
    sup.wait_restores("x", 1, T);
    let t = scrape(port);
    assert_eq!(
        metric(&t, r#"supervise_restores_total{job="x",outcome="ok"}"#),
        1.0,
        "{t}"
    );
    assert_eq!(metric(&t, r#"supervise_job_up{job="x"}"#), 1.0);
}

/// Without a running supervise the client says so and exits 2.
#[test]
fn client_without_supervise() {
    let env = Env::new();
    let out = env.ctl(&["status"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no supervise is running"), "{err}");
}

/// An attached job gets the same verbs: checkpoint, stop, start, restore.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn attached_job_gets_the_same_verbs() {
    let env = Env::new();
    let out = fs::File::create(env.path().join("a.out")).unwrap();
    let mut cmd = std::process::Command::new(progs().join("counter"));
    cmd.arg("100")
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    // SAFETY: setsid in the child before exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let job = env.job(
        "a",
        &format!("attach = {}\n[checkpoint]\nevery = \"1h\"\n", child.id()),
    );
    let sup = env.start(&job);
    sup.wait_state("a", "running", T);
    wait_numbers(&env.path().join("a.out"), 3, T);
    ok(&env.ctl(&["checkpoint", "a"]));
    ok(&env.ctl(&["stop", "a", "--checkpoint"]));
    let _ = child.wait(); // the attached process was ours: reap it
    assert_eq!(env.status()[0]["state"], "stopped");
    let n = env.numbers("a.out").len();
    ok(&env.ctl(&["start", "a"]));
    sup.wait_restores("a", 1, T);
    wait_numbers(&env.path().join("a.out"), n + 3, T);
    ok(&env.ctl(&["restore", "a"]));
    sup.wait_restores("a", 2, T);
    assert_eq!(env.status()[0]["restores"], 2);
    let m = env.numbers("a.out").len();
    wait_numbers(&env.path().join("a.out"), m + 3, T);
    assert_exactly_once(&env.numbers("a.out"));
}
