//! File rollback next to a hostile user: the job's files live in a
//! directory uid 65534 owns. The attacker swaps that directory for a
//! symlink to a root-only one, or races the rollback with
//! `renameat2(RENAME_EXCHANGE)`; supervise must never write, create or
//! remove anything outside the job's own files.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::*;
use crate::{as_nobody, attacker_dir, nobody, Canary, NOBODY};

/// A root-owned 0700 directory: names, sizes, modes, owners and contents of
/// everything in it.
fn root_only_dir(env: &Env, name: &str) -> PathBuf {
    let d = env.path().join(name);
    fs::create_dir(&d).unwrap();
    fs::set_permissions(&d, fs::Permissions::from_mode(0o700)).unwrap();
    d
}

type Listing = BTreeMap<String, (u64, u32, u32, Vec<u8>)>;

fn listing(dir: &Path) -> Listing {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let md = fs::symlink_metadata(e.path()).unwrap();
            let content = if md.is_file() {
                fs::read(e.path()).unwrap()
            } else {
                Vec::new()
            };
            (
                e.file_name().to_string_lossy().into_owned(),
                (md.len(), md.mode(), md.uid(), content),
            )
        })
        .collect()
}

fn count(log: &str, needle: &str) -> usize {
    log.matches(needle).count()
}

/// Attack 2: the job's directory is swapped, after a checkpoint, for a
/// symlink to a root-only directory holding files named like the job's.
/// The old code (checks on the last component only, actions by path)
/// replaced the root-only copy of the listed snapshot file with the job's
/// bytes (mode 0644), recreated the job's `w+` file there and removed the
/// file named like the listed-but-absent path.
///
/// The root-only directory holds canaries named like the snapshot file and
/// the absent path, and no file named like the `w+` file: a canary there
/// would make even the old code refuse (another inode) before changing
/// anything; instead the test checks that no such file appears.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn swapped_job_directory_is_refused_and_nothing_outside_is_touched() {
    let env = Env::new();
    let home = attacker_dir(&env, "home");
    nobody(&format!("mkdir -m 755 {}/scratch", home.display()));
    let scratch = home.join("scratch");
    let vault = root_only_dir(&env, "vault");
    let canaries = [
        Canary::new(&vault, "state", 4096),
        Canary::new(&vault, "absent.flag", 100),
    ];
    let before = listing(&vault);
    // The job refuses to run anywhere but in its scratch directory, so
    // that a fresh start (which chdirs through the attacker's symlink like
    // any path lookup) cannot be what touches the vault.
    let script = r#"[ "$(stat -c %u .)" = 65534 ] || { echo "not in the scratch dir; exiting" >&2; exit 0; }
exec 3<>work.dat
i=0
while [ $i -lt 100000 ]; do echo "state $i" > state; echo "work $i" >&3; echo $i; i=$((i+1)); sleep 0.05; done"#;
    let job = env.job(
        "swap",
        &format!(
            r#"command = ["/bin/sh", "-c", {script:?}]
cwd = "{scratch}"
stdout = "stdout.txt"
stderr = "stderr.txt"
[checkpoint]
every = "1s"
dir = "images"
[restore]
backoff = "0s"
[files]
snapshot = ["{scratch}/state", "{scratch}/absent.flag"]
"#,
            scratch = scratch.display()
        ),
    );
    let mut sup = env.start(&job);
    sup.wait_checkpoints("swap", 2, T);
    let img = &images(&job)[0];
    assert_eq!(img["job_files"], 5, "{img}"); // stdout, stderr, state, absent.flag, work.dat
                                              // The attacker moves the job's directory away and points its name at
                                              // the vault.
    nobody(&format!(
        "cd {} && mv scratch scratch.old && ln -s {} scratch",
        home.display(),
        vault.display()
    ));
    sup.kill_job("swap");
    wait_until("a restore or a fresh start", T, || {
        let log = sup.log();
        log.contains(": restored checkpoint=") || log.contains("starting the command afresh")
    });
    // Whatever happened, first: the vault.
    for c in &canaries {
        c.check();
    }
    assert_eq!(listing(&vault), before, "the vault changed");
    sup.wait_for("job exited; supervision ends", 1, T);
    assert_eq!(sup.wait_exit(T), 0);
    let log = sup.log();
    let refusal = format!(
        "cannot roll back {}/absent.flag: {} is a symlink now; supervise does not follow it",
        scratch.display(),
        scratch.display()
    );
    assert!(log.contains(&refusal), "expected {refusal:?} in:\n{log}");
    assert!(!log.contains(": restored checkpoint="), "{log}");
    assert!(!vault.join("work.dat").exists());
    // The job's own files were left where the attacker moved them.
    assert!(home.join("scratch.old/work.dat").exists());
}

/// Attack 3: the job appends to `out.txt` in the attacker's directory; the
/// attacker swaps `out.txt` and a symlink to a root-owned 1 MB canary with
/// `renameat2(RENAME_EXCHANGE)` in a tight loop while the job is killed and
/// restored ~30 times. The old code checked the path, then opened it again
/// to truncate it, and so at some point truncated the canary. Restores may
/// be refused while the attacker swaps; the canary must stay whole.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn rename_exchange_race_never_reaches_the_canary() {
    const CYCLES: usize = 30;
    let env = Env::new();
    let dir = attacker_dir(&env, "scratch");
    let vault = root_only_dir(&env, "vault");
    let canary = Canary::new(&vault, "precious", 1 << 20);
    let out = dir.join("out.txt");
    let link = dir.join("link");
    nobody(&format!(
        "ln -s {} {}",
        canary.path.display(),
        link.display()
    ));
    // The attacker's program, where the attacker can run it.
    let exchange = env.path().join("exchange");
    fs::copy(progs().join("exchange"), &exchange).unwrap();
    fs::set_permissions(&exchange, fs::Permissions::from_mode(0o755)).unwrap();
    let job = env.job(
        "race",
        &format!(
            r#"command = ["{}", "{}", "10"]
stdout = "stdout.txt"
stderr = "stderr.txt"
[checkpoint]
every = "1s"
dir = "images"
keep = 2
[restore]
backoff = "0s"
max_restores = 1000
window = "1h"
"#,
            progs().join("appender").display(),
            out.display()
        ),
    );
    let mut sup = env.start(&job);
    sup.wait_checkpoints("race", 1, T);
    let attacker = as_nobody(&format!(
        "exec {} {} {} 110 1000000000",
        exchange.display(),
        out.display(),
        link.display()
    ))
    .stdout(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let t0 = Instant::now();
    let (mut restored, mut afresh) = (0, 0);
    for cycle in 0..CYCLES {
        // A checkpoint of the job as it runs now, then kill it.
        let published = sup.checkpoints("race");
        sup.wait_checkpoints("race", published + 1, Duration::from_secs(60));
        let log = sup.log();
        let before =
            count(&log, ": restored checkpoint=") + count(&log, "starting the command afresh");
        sup.kill_job("race");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let log = sup.log();
            let r = count(&log, ": restored checkpoint=");
            let a = count(&log, "starting the command afresh");
            if r + a > before {
                (restored, afresh) = (r, a);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "cycle {cycle}: no restore nor fresh start; log:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // Fail fast, and say after how many cycles.
        let md = fs::symlink_metadata(&canary.path).unwrap();
        assert_eq!(
            md.len(),
            1 << 20,
            "canary size changed after cycle {cycle} ({restored} restored, {afresh} fresh starts)"
        );
    }
    kill(attacker.id() as i32, libc::SIGTERM);
    let swaps = String::from_utf8_lossy(&attacker.wait_with_output().unwrap().stdout).into_owned();
    let log = sup.log();
    let refusals = count(&log, "cannot restore this image");
    let rollback_refusals = count(&log, "cannot roll back");
    eprintln!(
        "{CYCLES} kills in {:?}: {restored} restored, {afresh} fresh starts; \
         {refusals} images refused ({rollback_refusals} by the file rollback, the rest by CRIU); \
         attacker: {}",
        t0.elapsed(),
        swaps.trim()
    );
    sup.signal(libc::SIGTERM);
    sup.wait_exit(T);
    canary.check();
    assert_eq!(restored + afresh, CYCLES, "{log}");
    // The attacker's directory holds only the job's file and the symlink
    // (possibly under each other's names), nothing supervise left behind.
    let mut names: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["link", "out.txt"], "{log}");
}

/// CRIU reopens the job's files by path, as root, after supervise's
/// rollback, and checks only size and mode (no size for append-only
/// files). The attacker swaps the job's output for a symlink to a
/// root-owned file of the same mode in exactly that window (a pause point
/// holds supervise there). supervise checks every restored descriptor
/// against the file the rollback verified before the restored job runs:
/// the restore is aborted and not one byte reaches the root file.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn swap_between_rollback_and_criu_reopen_is_caught_before_the_job_runs() {
    let env = Env::new();
    let scratch = attacker_dir(&env, "scratch");
    let vault = root_only_dir(&env, "vault");
    // Same type and mode as the job's output file (created 0640 by root).
    let canary = Canary::with_mode(&vault, "passwd", 2048, 0o640);
    fs::set_permissions(&vault, fs::Permissions::from_mode(0o755)).unwrap();
    let job = JobFile::counter("reopen")
        .command(&[&prog("counter"), "50"])
        .stdout(&format!("{}/out.txt", scratch.display()))
        .write(&env);
    let pause = env.path().join("pause");
    let reached = env.path().join("pause.reached");
    let sup = env.start_with_env(
        &job,
        &[
            ("SUPERVISE_PAUSE", "after-rollback"),
            ("SUPERVISE_PAUSE_FILE", pause.to_str().unwrap()),
        ],
    );
    sup.wait_checkpoints("reopen", 1, T);
    fs::write(&pause, "").unwrap();
    sup.kill_job("reopen");
    wait_until("the pause after the rollback", T, || reached.exists());
    // The window: the rollback has checked and truncated out.txt; CRIU has
    // not opened it yet.
    nobody(&format!(
        "mv {s}/out.txt {s}/out.old && ln -s {c} {s}/out.txt",
        s = scratch.display(),
        c = canary.path.display()
    ));
    fs::remove_file(&pause).unwrap();
    sup.wait_for("CRIU reopened it by path", 1, T);
    canary.check();
    // Whatever comes next (older images refused: out.txt is a symlink now;
    // the fresh start refuses to open it), the canary stays intact.
    sup.wait_for("no image could be restored", 1, T);
    canary.check();
}

/// The job's directory is the attacker's: what the attacker does there
/// after a checkpoint is not the job's doing, and a restore leaves it. The
/// attacker adds a file of its own, and replaces a file the job created
/// after the checkpoint; the restore removes neither (and says why it
/// left the second), while it still removes what the job alone created
/// and brings back what the job deleted.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn what_another_user_does_in_the_jobs_directory_is_left_alone() {
    progs();
    let env = Env::new();
    let home = attacker_dir(&env, "home");
    nobody(&format!("mkdir -m 777 {}/work", home.display()));
    let work = home.join("work");
    let job = env.job(
        "app",
        &format!(
            r#"command = ["{prog}"]
cwd = "{work}"
stdout = "{out}"
[checkpoint]
every = "1h"
dir = "images"
"#,
            prog = prog("restartapp"),
            work = work.display(),
            out = env.path().join("app.out").display(),
        ),
    );
    let mut sup = env.start(&job);
    let log = env.path().join("app.out");
    let has = |n: &str| fs::read_to_string(&log).unwrap_or_default().contains(n);
    wait_until("the first restart file", T, || has("renamed 2\n"));
    checkpoint(&env, "app");
    // The attacker's own file, and `go` (the job removes it, then deletes
    // scratch.txt and creates late.txt).
    nobody(&format!(
        "cd {} && echo theirs > theirs.txt && touch go",
        work.display()
    ));
    wait_until("the job acted", T, || has("acted"));
    // The attacker replaces the job's new late.txt with its own.
    nobody(&format!(
        "cd {} && rm -f late.txt && echo attacker > late.txt",
        work.display()
    ));
    sup.kill_job("app");
    sup.wait_restores("app", 1, T);
    assert_eq!(
        fs::read_to_string(work.join("theirs.txt")).unwrap(),
        "theirs\n"
    );
    assert_eq!(
        fs::read_to_string(work.join("late.txt")).unwrap(),
        "attacker\n"
    );
    assert_eq!(fs::metadata(work.join("late.txt")).unwrap().uid(), NOBODY);
    assert_eq!(
        fs::read_to_string(work.join("scratch.txt")).unwrap(),
        "scratch v1\n"
    );
    let text = sup.log();
    assert!(
        text.contains("not rolled back: another process changed it after the job did"),
        "{text}"
    );
    sup.kill_all();
}
