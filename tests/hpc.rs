//! What real HPC applications need from a plain job file (issue 25): each
//! job gets its own /tmp (tools name files there by PID, and every job's
//! PID namespace hands out the same PIDs). TCP inside the job: see
//! tests/coverage.rs (`tcppair`).

mod common;

use std::fs;
use std::path::Path;

use common::*;

/// A shell job that writes its name to /tmp/pid.$$, prints its PID once,
/// then prints that file's content every 100 ms until `go` exists.
/// It also counts 0, 1, 2, ... into /tmp/held.log, held open (appending)
/// throughout: a file of its private /tmp that a restore rolls back.
fn pid_file_job(env: &Env, name: &str, extra_top: &str) -> std::path::PathBuf {
    let script = format!(
        "echo {name} > /tmp/pid.$$; echo pid=$$; exec 3>>/tmp/held.log; i=0; \
         while [ ! -e go ]; do echo $i >&3; i=$((i+1)); cat /tmp/pid.$$; sleep 0.1; done"
    );
    let mut jf = JobFile::program(name, &["/bin/sh", "-c", &script]).every("1h");
    if !extra_top.is_empty() {
        jf = jf.top(extra_top);
    }
    jf.write(env)
}

fn lines(p: &Path) -> Vec<String> {
    fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Two jobs under one supervise, both writing /tmp/pid.$$ with the same
/// PID (each in its own PID namespace): each reads back only its own
/// name. A job's /tmp survives checkpoint -> SIGKILL -> restore, and is
/// removed when the job ends.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn each_job_has_its_own_tmp() {
    progs();
    subreaper();
    let env = Env::outside_tmp();
    let a = pid_file_job(&env, "a", "");
    let b = pid_file_job(&env, "b", "");
    let mut sup = env.start_with(&[a.as_os_str(), b.as_os_str()]);
    let (out_a, out_b) = (env.path().join("a.out"), env.path().join("b.out"));
    for o in [&out_a, &out_b] {
        wait_until("lines from both jobs", T, || lines(o).len() >= 6);
    }
    let pid = |o: &Path| lines(o)[0].clone();
    assert_eq!(
        pid(&out_a),
        pid(&out_b),
        "both shells have the same PID in their namespaces"
    );
    let own = |o: &Path, name: &str| {
        let l = lines(o);
        assert!(
            l[1..].iter().all(|x| x == name),
            "{} read another job's file: {l:?}",
            o.display()
        );
    };
    own(&out_a, "a");
    own(&out_b, "b");
    let tmp_a = env.path().join(".supervise/a/tmp");
    assert!(tmp_a.is_dir(), "a's private /tmp is in its state directory");
    // Across a crash restore, a's /tmp is the same.
    checkpoint(&env, "a");
    // Lines written after the checkpoint, which the restore must undo.
    let held = tmp_a.join("held.log");
    let at = numbers(&held).len();
    wait_until("lines after the checkpoint", T, || {
        numbers(&held).len() >= at + 3
    });
    sup.kill_job("a");
    sup.wait_restores("a", 1, T);
    let n = lines(&out_a).len();
    wait_until("a goes on after the restore", T, || {
        lines(&out_a).len() >= n + 5
    });
    own(&out_a, "a");
    own(&out_b, "b");
    // held.log (at <state_dir>/tmp outside the job) was rolled back to the
    // checkpoint: the count goes on exactly once.
    // (Lines were written after the checkpoint: without the rollback the
    // restored count would repeat them.)
    assert_exactly_once(&numbers(&held));
    // Both end: their private /tmp go with them.
    fs::write(env.path().join("go"), "").unwrap();
    sup.wait_for("job exited; supervision ends", 2, T);
    // (Removed once the job's supervision has ended, which logs it.)
    sup.wait_for("removed the job's private /tmp", 2, T);
    assert!(!tmp_a.exists(), "a's private /tmp is removed when it ends");
    assert!(!env.path().join(".supervise/b/tmp").exists());
    assert_eq!(sup.wait_exit(T), 0);
}

/// `private_tmp = false`: the job sees the host's /tmp. (So does a job
/// whose own paths are under /tmp: a private /tmp would hide them.)
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn private_tmp_false_shares_the_hosts_tmp() {
    progs();
    subreaper();
    let env = Env::outside_tmp();
    let marker = format!("supervise-test-{}", std::process::id());
    let host = Path::new("/tmp").join(&marker);
    fs::write(&host, "host").unwrap();
    let script = format!("cat /tmp/{marker}; while [ ! -e go ]; do sleep 0.1; done");
    let job = JobFile::program("shared", &["/bin/sh", "-c", &script])
        .every("1h")
        .top("private_tmp = false")
        .write(&env);
    let mut sup = env.start(&job);
    let out = env.path().join("shared.out");
    wait_until("the job read the host's file", T, || {
        lines(&out).first().is_some_and(|l| l == "host")
    });
    assert!(!env.path().join(".supervise/shared/tmp").exists());
    fs::write(env.path().join("go"), "").unwrap();
    sup.wait_for("job exited; supervision ends", 1, T);
    assert_eq!(sup.wait_exit(T), 0);
    fs::remove_file(host).unwrap();
}

/// For a job of `sv-alice`'s: the user, a test directory others can
/// reach, and her home in it.
fn owned_setup() -> (TestUser, Env, std::path::PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    progs();
    subreaper();
    let alice = user("sv-alice");
    let env = Env::outside_tmp();
    fs::set_permissions(env.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let home = service::home(&env, &alice);
    (alice, env, home)
}

/// A job that runs as its owner gets its own /tmp too (the owner's, mode
/// 0700), through checkpoint -> SIGKILL -> restore by the owner's CRIU.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn an_owned_job_has_its_own_tmp() {
    use std::os::unix::fs::MetadataExt;
    let (alice, env, home) = owned_setup();
    let script = "echo mine > /tmp/pid.$$; while [ ! -e go ]; do cat /tmp/pid.$$; sleep 0.1; done";
    let job = JobFile::program("own", &["/bin/sh", "-c", script])
        .every("1h")
        .top(&format!("user = \"{}\"", alice.name))
        .top(&format!("cwd = \"{}\"", home.display()))
        .stdout(&format!("{}/own.out", home.display()))
        .write(&env);
    let mut sup = env.start(&job);
    let out = home.join("own.out");
    wait_until("the job's lines", T, || lines(&out).len() >= 3);
    let tmp = env.path().join(".supervise/own/tmp");
    let md = fs::metadata(&tmp).unwrap();
    assert_eq!((md.uid(), md.mode() & 0o7777), (alice.uid, 0o700));
    checkpoint(&env, "own");
    sup.kill_job("own");
    sup.wait_restores("own", 1, T);
    let n = lines(&out).len();
    wait_until("the job goes on after the restore", T, || {
        lines(&out).len() >= n + 5
    });
    assert!(lines(&out).iter().all(|l| l == "mine"), "{:?}", lines(&out));
    fs::write(home.join("go"), "").unwrap();
    sup.wait_for("job exited; supervision ends", 1, T);
    sup.wait_for("removed the job's private /tmp", 1, T);
    assert!(!tmp.exists());
    assert_eq!(sup.wait_exit(T), 0);
}

/// An image comes back with the /tmp it was taken with: one taken while
/// the job shared the host's /tmp (`private_tmp = false`, or an older
/// supervise) is restored without a private /tmp even once the job file
/// asks for one, so the files it held in /tmp are there.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn an_image_comes_back_with_the_tmp_it_was_taken_with() {
    progs();
    subreaper();
    let env = Env::outside_tmp();
    let held = Path::new("/tmp").join(format!("supervise-test-held-{}", std::process::id()));
    let _ = fs::remove_file(&held);
    let script = format!(
        "exec 3>>{}; i=0; while [ ! -e go ]; do echo $i >&3; i=$((i+1)); sleep 0.1; done",
        held.display()
    );
    let job = |top: &str| {
        let mut jf = JobFile::program("j", &["/bin/sh", "-c", &script]).every("1h");
        if !top.is_empty() {
            jf = jf.top(top);
        }
        jf.write(&env)
    };
    let path = job("private_tmp = false");
    let mut sup = env.start(&path);
    wait_until("lines", T, || numbers(&held).len() >= 3);
    checkpoint(&env, "j");
    // supervise and the job die (a crash, or an upgrade); the job file now
    // asks for a private /tmp (the default).
    sup.kill_all();
    job("");
    let mut sup = env.start(&path);
    sup.wait_restores("j", 1, T);
    let n = numbers(&held).len();
    wait_until("the job goes on", T, || numbers(&held).len() >= n + 3);
    assert_exactly_once(&numbers(&held));
    fs::write(env.path().join("go"), "").unwrap();
    sup.wait_for("job exited; supervision ends", 1, T);
    assert_eq!(sup.wait_exit(T), 0);
    fs::remove_file(held).unwrap();
}

/// FNV-1a, as tests/progs/restartapp.c computes it.
fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(1469598103934665603u64, |h, &c| {
        (h ^ c as u64).wrapping_mul(1099511628211)
    })
}

/// restart.dat ("step=K size=S sum=H") describes out.dat: its body up to
/// S has checksum H; and out.dat's header counts its body lines.
fn assert_restart_matches_output(dir: &Path) {
    let r = fs::read_to_string(dir.join("restart.dat")).unwrap();
    let field = |k: &str| -> u64 {
        r.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .unwrap_or_else(|| panic!("no {k} in {r:?}"))
            .parse()
            .unwrap()
    };
    let (size, sum) = (field("size=") as usize, field("sum="));
    let out = fs::read(dir.join("out.dat")).unwrap();
    assert!(
        out.len() >= size,
        "restart.dat ({r:?}) describes {size} bytes of out.dat, which has {}",
        out.len()
    );
    assert_eq!(
        fnv(&out[15..size]),
        sum,
        "restart.dat ({r:?}) does not match out.dat"
    );
    let text = String::from_utf8_lossy(&out);
    let steps: usize = text[6..14].parse().unwrap();
    assert_eq!(
        steps,
        text[15..].lines().count(),
        "header of out.dat: {text:?}"
    );
}

/// The application's own restart file (written to restart.tmp, renamed
/// over restart.dat) and the files it creates and deletes after a
/// checkpoint come back as they were, with a default job file: killed
/// right after a rename, restored, restart.dat matches the restored
/// out.dat (opened O_RDWR, header rewritten at 0, appended to); late.txt,
/// created after the checkpoint, is gone; scratch.txt, deleted after it,
/// is back; the count goes on exactly once.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn the_applications_own_restart_files_are_rolled_back() {
    progs();
    subreaper();
    let env = Env::new();
    let job = JobFile::program("app", &[&prog("restartapp")])
        .every("1h")
        .write(&env);
    restart_files_scenario(&env, env.path(), &job);
}

/// The same for a job that runs as its owner (its own user namespace; the
/// rollback runs with the owner's rights).
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn an_owned_jobs_restart_files_are_rolled_back() {
    use std::os::unix::fs::MetadataExt;
    let (alice, env, home) = owned_setup();
    let job = JobFile::program("app", &[&prog("restartapp")])
        .every("1h")
        .top(&format!("user = \"{}\"", alice.name))
        .top(&format!("cwd = \"{}\"", home.display()))
        .stdout(&format!("{}/app.out", home.display()))
        .write(&env);
    restart_files_scenario(&env, &home, &job);
    let md = fs::metadata(home.join("scratch.txt")).unwrap();
    assert_eq!(md.uid(), alice.uid, "brought back with its owner");
}

/// Runs restartapp (`job`, working in `dir`, printing to `dir`/app.out):
/// checkpoint, `go`, SIGKILL right after the next rename, restore; checks
/// the files.
fn restart_files_scenario(env: &Env, dir: &Path, job: &Path) {
    let mut sup = env.start(job);
    let log = dir.join("app.out");
    let has = |needle: &str| {
        fs::read_to_string(&log)
            .unwrap_or_default()
            .contains(needle)
    };
    wait_until("the first restart file", T, || has("renamed 2\n"));
    checkpoint(env, "app");
    let at_checkpoint = fs::read(dir.join("restart.dat")).unwrap();
    // After the checkpoint: the job deletes scratch.txt, creates late.txt,
    // and writes a new restart file; it is killed right after the rename.
    fs::write(dir.join("go"), "").unwrap();
    wait_until("the job acted", T, || has("acted"));
    let acted: i64 = lines(&log)
        .iter()
        .find_map(|l| l.strip_prefix("acted ").map(|n| n.parse().unwrap()))
        .unwrap();
    let next = acted + 3 - (acted + 1) % 3; // the next k with k % 3 == 2
    wait_until("a rename after acting", T, || {
        has(&format!("renamed {next}\n"))
    });
    sup.kill_job("app");
    assert!(dir.join("late.txt").exists() && !dir.join("scratch.txt").exists());
    sup.wait_restores("app", 1, T);
    // (Checked before the restored job's next step could change them:
    // restart.dat only every 3 steps, the rest only after `go`.)
    assert_eq!(
        fs::read_to_string(dir.join("scratch.txt")).unwrap(),
        "scratch v1\n",
        "deleted after the checkpoint: back"
    );
    assert!(
        !dir.join("late.txt").exists(),
        "created after the checkpoint: gone"
    );
    assert!(!dir.join("go").exists());
    let now = fs::read(dir.join("restart.dat")).unwrap();
    assert!(
        now == at_checkpoint || now.starts_with(b"step="),
        "restart.dat: {:?}",
        String::from_utf8_lossy(&now)
    );
    assert_restart_matches_output(dir);
    // The job goes on; every step once in out.dat.
    let n = lines(&log).len();
    wait_until("steps after the restore", T, || lines(&log).len() >= n + 8);
    sup.kill_all();
    let body: Vec<i64> = fs::read_to_string(dir.join("out.dat"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.strip_prefix("step ").unwrap().parse().unwrap())
        .collect();
    assert_exactly_once(&body);
    assert_restart_matches_output(dir);
    let log = sup.log();
    let removed = log
        .lines()
        .find(|l| l.contains("removed files absent at the checkpoint"))
        .unwrap_or_else(|| panic!("no removal logged: {log}"));
    assert!(removed.contains("late.txt"), "{removed}");
}
