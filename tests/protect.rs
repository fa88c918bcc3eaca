//! What the `[store]` table promises, against real CRIU and real processes:
//! no job memory in clear in an encrypted store, damage anywhere in the
//! newest image's files repaired on read (parity, second copy), planted
//! images from another store refused, and a wrong key refused at once
//! without touching a running job.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

const LONG: Duration = Duration::from_secs(90);

/// The job's state dir (the default one, `<env>/.supervise/<name>`).
fn state(env: &Env, name: &str) -> PathBuf {
    env.path().join(".supervise").join(name)
}

/// The job's image store (the default `<state_dir>/images`).
fn store(env: &Env, name: &str) -> PathBuf {
    state(env, name).join("images")
}

/// SIGTERM: supervise takes a final checkpoint, stops the job and exits 0.
fn stop(mut sup: Sup) {
    sup.signal(libc::SIGTERM);
    assert_eq!(sup.wait_exit(LONG), 0, "{}", sup.log());
}

/// A counter job checkpointed only on demand, with `n` checkpoints taken.
fn counter_with_checkpoints(env: &Env, name: &str, store_toml: &str, n: u64) -> (PathBuf, Sup) {
    let job = JobFile::counter(name).every("1h").extra(store_toml);
    with_checkpoints(env, name, job, n, 3)
}

/// Starts `job` (named `name`, checkpointed on demand) and takes `n`
/// checkpoints, each once the job printed `gap` more numbers.
fn with_checkpoints(env: &Env, name: &str, job: JobFile, n: u64, gap: usize) -> (PathBuf, Sup) {
    let job = job.every("1h").write(env);
    let sup = env.start(&job);
    sup.wait_state(name, "running", LONG);
    let out = env.path().join(format!("{name}.out"));
    for _ in 0..n {
        wait_numbers(&out, numbers(&out).len() + gap, LONG);
        checkpoint(env, name);
    }
    (job, sup)
}

/// The id in the first "restored checkpoint=..." line.
fn restored_id(log: &str) -> String {
    log.lines()
        .find(|l| l.contains("restored checkpoint="))
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("checkpoint="))
        })
        .unwrap_or_else(|| panic!("no restore line: {log}"))
        .to_string()
}

/// After a restore: the job prints on (3 more numbers) and its output is
/// 0, 1, 2, ... exactly once, i.e. it continued from the image (not from 0,
/// which would repeat numbers, and not skipping any).
fn continues(env: &Env, name: &str) {
    let out = env.path().join(format!("{name}.out"));
    let n = numbers(&out).len();
    wait_numbers(&out, n + 3, T);
    let nums = numbers(&out);
    assert!(nums.len() > 3, "{nums:?}");
    assert_exactly_once(&nums);
}

/// Every regular file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            let t = e.file_type().unwrap();
            if t.is_dir() {
                todo.push(e.path());
            } else if t.is_file() {
                out.push(e.path());
            }
        }
    }
    out
}

/// Files under `dir` whose bytes contain `needle`.
fn holding(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    files_under(dir)
        .into_iter()
        .filter(|p| {
            fs::read(p)
                .map(|b| b.windows(needle.len()).any(|w| w == needle))
                .unwrap_or(false)
        })
        .collect()
}

fn cp_a(from: &Path, to: &Path) {
    let _ = fs::remove_dir_all(to);
    let st = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
}

/// A job holding a runtime-built marker in 4 MiB of its memory, with two
/// checkpoints: the encrypted store (and its second copy), indeed anything
/// under the test's dir, never holds the marker; a plaintext store does
/// (the control, which shows the scan can fail).
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn no_secret_in_an_encrypted_store() {
    let seed = 4242u64;
    let marker = format!("SUPERVISE-SECRET-{}", seed * seed * 7919 + 104729);
    let run = |store_toml: &str| -> Env {
        let env = Env::new();
        let job = JobFile::program("sec", &[&prog("secret"), &seed.to_string(), "4", "200"])
            .extra(store_toml)
            .write(&env);
        let sup = env.start(&job);
        sup.wait_checkpoints("sec", 2, LONG);
        stop(sup);
        env
    };
    let sealed = run("[store]\ncopies = 2\ncopy_dir = \"copy\"\n");
    let copy = sealed.path().join("copy");
    assert!(files_under(&copy).len() > 3, "no second copy written");
    // The whole test dir: job file, logs, output, state dir, store, copy.
    let found = holding(sealed.path(), marker.as_bytes());
    assert!(found.is_empty(), "marker in clear in {found:?}");

    let plain = run("[store]\nencryption = false\n");
    let found = holding(&store(&plain, "sec"), marker.as_bytes());
    assert!(
        found
            .iter()
            .any(|p| p.extension().is_some_and(|e| e == "pack")),
        "the plaintext control holds no marker: {found:?}"
    );
}

/// One damage to one file of the newest image.
#[derive(Debug, Clone)]
enum Damage {
    Flip(f64),
    Zero4k(f64),
    Truncate(f64),
}

/// Applies `d` to `path`; returns what it did.
fn damage(path: &Path, d: &Damage) -> String {
    let mut b = fs::read(path).unwrap();
    let len = b.len();
    assert!(len > 0);
    let at = |f: f64| ((f * len as f64) as usize).min(len - 1);
    let what = match *d {
        Damage::Flip(f) => {
            let o = at(f);
            b[o] ^= 0x5a;
            format!("flip byte {o} of {len}")
        }
        Damage::Zero4k(f) => {
            let o = at(f);
            let end = (o + 4096).min(len);
            // Zeroing bytes that are zero already would damage nothing.
            b[o] = if b[o] == 0 { 1 } else { 0 };
            b[o + 1..end].iter_mut().for_each(|x| *x = 0);
            format!("zero [{o}, {end}) of {len}")
        }
        Damage::Truncate(f) => {
            let max = (len / 20).max(1);
            let t = 1 + ((f * max as f64) as usize).min(max - 1);
            b.truncate(len - t);
            format!("truncate last {t} of {len}")
        }
    };
    fs::write(path, b).unwrap();
    what
}

/// A counter job with the default store (encrypted, parity), three
/// checkpoints, supervise stopped. Each case restores the pristine store,
/// damages one file of the newest image once (anywhere), and then:
/// `verify` exits 0, `images` marks the newest verified, and a new
/// supervise restores the newest image (not an older one), logs a WARN
/// repair naming the damaged file, and the job continues from the image.
/// Case i damages file kind i % 3 (pack, index, manifest) with damage
/// (i / 3) % 3 (flip, zero 4 KiB, truncate), so the 9 cases cover every
/// pair once; the position (and the truncated length) come from proptest
/// with a fixed seed. PROPTEST_CASES overrides 9.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn damage_anywhere_in_the_newest_image_is_repaired() {
    let env = Env::new();
    // 8 MiB of random memory, 50 pages rewritten every 100 ms: with 15
    // numbers between the checkpoints the newest pack holds ~3 MiB (32
    // parity data shards) and its index tens of KiB (several shards), so
    // the damage hits real Reed-Solomon rows, not a one-shard copy.
    let dirty = JobFile::program("dmg", &[&prog("dirty"), "8", "50", "100"]);
    let (job, mut sup) = with_checkpoints(&env, "dmg", dirty, 2, 15);
    // SIGKILL (supervise and the job), not SIGTERM: its final checkpoint
    // would be the newest, with a tiny pack.
    sup.kill_all();
    drop(sup);
    let imgs = images(&job);
    let newest = imgs[0]["id"].as_str().unwrap().to_string();
    let dir = store(&env, "dmg");
    let pack = newest_pack(&imgs[0]);
    let targets = [
        pack.clone(),
        pack.with_extension("idx"),
        dir.join(&newest).join("MANIFEST.sealed"),
    ];
    for t in &targets {
        assert!(t.exists() && parity_of(t).exists(), "{}", t.display());
    }
    let pristine = env.path().join("pristine");
    cp_a(&dir, &pristine);

    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(9);
    let config = Config {
        cases,
        max_shrink_iters: 0,
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::ChaCha));
    let case = AtomicUsize::new(0);
    let result = runner.run(&(0.0f64..1.0), |f| {
        let i = case.fetch_add(1, Ordering::SeqCst);
        let target = &targets[i % 3];
        let d = match (i / 3) % 3 {
            0 => Damage::Flip(f),
            1 => Damage::Zero4k(f),
            _ => Damage::Truncate(f),
        };
        // Named as the repair line names it: "<dir>/<file>".
        let short = format!(
            "{}/{}",
            target
                .parent()
                .unwrap()
                .file_name()
                .unwrap()
                .to_string_lossy(),
            target.file_name().unwrap().to_string_lossy()
        );
        let reset_and_damage = || {
            cp_a(&pristine, &dir);
            damage(target, &d)
        };
        let what = reset_and_damage();
        eprintln!("case: {short}: {what}");
        let t0 = std::time::Instant::now();
        let (code, out) = run_cli(&["verify"], &job);
        prop_assert_eq!(code, 0, "{}: {}: verify: {}", short, what, out);
        let imgs = images(&job);
        prop_assert_eq!(&imgs[0]["id"], &serde_json::json!(newest));
        prop_assert_eq!(&imgs[0]["verified"], &serde_json::json!(true));

        // verify/images may have repaired in place: damage afresh.
        reset_and_damage();
        let sup = env.start(&job);
        sup.wait_restores("dmg", 1, LONG);
        let log = sup.log();
        prop_assert_eq!(restored_id(&log), newest.clone(), "{}: {}", what, log);
        // A damaged page may be read only once the job runs (a lazy
        // restore serves pages from the store then).
        let repaired = |log: &str| {
            log.lines().any(|l| {
                l.contains("WARN") && l.contains("read a damaged store file") && l.contains(&short)
            })
        };
        let deadline = std::time::Instant::now() + LONG;
        while !repaired(&sup.log()) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let log = sup.log();
        prop_assert!(
            repaired(&log),
            "{}: {}: no repair logged: {}",
            short,
            what,
            log
        );
        continues(&env, "dmg");
        stop(sup);
        eprintln!("case took {:?}", t0.elapsed());
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

fn parity_of(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_os_string();
    s.push(".par");
    PathBuf::from(s)
}

/// The newest image's pack (and its parity) deleted from the primary
/// store, then the job killed. With `copies = 2` the newest image is read
/// from the second copy (logged, naming the pack) and the job continues
/// from it. With one copy the design promises no more than detection: the
/// newest image is refused and the next older one restored (its data is in
/// older packs), so the job continues from the older image.
///
/// As of bf8be07 the `copies = 2` half fails: the chunk reads fall back to
/// the copy (three WARN lines), but a single-object read (`Reader::read`,
/// tree nodes) fails at `self.file(pack)?` ("cannot open ... No such file")
/// before its repair path, so the newest image is refused.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn deleted_pack_is_read_from_the_second_copy() {
    for copies in [1, 2] {
        let env = Env::new();
        let toml = if copies == 2 {
            "[store]\ncopies = 2\ncopy_dir = \"copy\"\n"
        } else {
            "[store]\ncopies = 1\n"
        };
        let (job, sup) = counter_with_checkpoints(&env, "del", toml, 2);
        let imgs = images(&job);
        let (newest, older) = (
            imgs[0]["id"].as_str().unwrap(),
            imgs[1]["id"].as_str().unwrap(),
        );
        let pack = newest_pack(&imgs[0]);
        fs::remove_file(&pack).unwrap();
        fs::remove_file(parity_of(&pack)).unwrap();
        sup.kill_job("del");
        sup.wait_restores("del", 1, LONG);
        let log = sup.log();
        let name = pack.file_name().unwrap().to_string_lossy().to_string();
        if copies == 2 {
            assert_eq!(restored_id(&log), newest, "{log}");
            assert!(
                log.lines().any(|l| l.contains("WARN")
                    && l.contains("from the second copy")
                    && l.contains(&name)),
                "{log}"
            );
        } else {
            assert_eq!(restored_id(&log), older, "{log}");
            assert!(log.contains(newest), "refusal not logged: {log}");
        }
        continues(&env, "del");
    }
}

/// The newest checkpoint of another job's store (another key), with a
/// higher sequence number than ours, and its packs moved into our store:
/// supervise refuses it, naming it, and restores our own newest image.
/// (Can fail: the planted id is checked to be the newest in the directory,
/// so taking it would restore it instead of ours.)
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn planted_image_from_another_store_is_refused() {
    let env = Env::new();
    let other = Env::new();
    let (job, sup) = counter_with_checkpoints(&env, "own", "", 2);
    let (ojob, osup) = counter_with_checkpoints(&other, "own", "", 4);
    stop(osup);
    let ours = images(&job)[0]["id"].as_str().unwrap().to_string();
    let theirs = images(&ojob)[0]["id"].as_str().unwrap().to_string();
    assert!(theirs > ours, "{theirs} vs {ours}");
    let (src, dst) = (store(&other, "own"), store(&env, "own"));
    fs::rename(src.join(&theirs), dst.join(&theirs)).unwrap();
    for e in fs::read_dir(src.join("packs")).unwrap().flatten() {
        fs::rename(e.path(), dst.join("packs").join(e.file_name())).unwrap();
    }
    sup.kill_job("own");
    sup.wait_restores("own", 1, LONG);
    let log = sup.log();
    assert_eq!(restored_id(&log), ours, "{log}");
    assert!(
        log.lines()
            .any(|l| l.contains(&theirs) && l.contains("does not authenticate")),
        "{log}"
    );
    continues(&env, "own");
}

/// Another valid key in place of ours: `supervise run` exits 2 with one
/// error line naming the key file, and leaves the job it would re-adopt
/// (left running by a SIGKILLed supervise) alone; `images` fails naming the
/// key file too. With the right key back, supervise re-adopts the job.
/// (Can fail: a supervise that opened the store anyway would run on, or
/// stop the job.)
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn wrong_key_is_one_clear_error_and_leaves_the_job_alone() {
    let env = Env::new();
    let other = Env::new();
    let (job, mut sup) = counter_with_checkpoints(&env, "key", "", 1);
    let (_, osup) = counter_with_checkpoints(&other, "key", "", 1);
    stop(osup);
    let key = state(&env, "key").join("store.key");
    let good = fs::read(&key).unwrap();
    let wrong = fs::read(state(&other, "key").join("store.key")).unwrap();
    assert_ne!(good, wrong);

    let (pid, _) = sup.job_pid("key");
    sup.signal(libc::SIGKILL);
    assert_eq!(sup.wait_exit(T), 128 + 9);
    drop(sup);
    fs::write(&key, &wrong).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();

    let out = env.path().join("key.out");
    let printed = numbers(&out).len();
    let mut bad = env.start(&job);
    let code = bad.wait_exit(LONG);
    let log = bad.log();
    assert_eq!(code, 2, "{log}");
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("is not the key of image store"))
        .collect();
    assert_eq!(errors.len(), 1, "{log}");
    assert!(errors[0].contains(&key.display().to_string()), "{log}");
    // The job is untouched: same pid, alive, still printing.
    assert!(
        supervise::proc::state(pid).is_some_and(|s| s != 'Z'),
        "job {pid} gone"
    );
    wait_numbers(&out, printed + 3, T);
    let v: serde_json::Value =
        serde_json::from_slice(&fs::read(state(&env, "key").join("job.json")).unwrap()).unwrap();
    assert_eq!(v["host_pid"].as_i64(), Some(pid as i64));

    let (code, msg) = run_cli(&["images"], &job);
    assert_ne!(code, 0, "{msg}");
    assert!(msg.contains(&key.display().to_string()), "{msg}");

    // Cleanup through the normal path: the right key, re-adoption, stop.
    fs::write(&key, &good).unwrap();
    let sup = env.start(&job);
    sup.wait_state("key", "running", LONG);
    assert_eq!(sup.job_pid("key").0, pid, "{}", sup.log());
    stop(sup);
}

/// `[store] scrub`: damage the newest pack of a running job; the scrub
/// finds and rewrites it (byte for byte) without anyone restoring.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn scrub_repairs_damage_in_the_background() {
    let env = Env::new();
    let (job, sup) = counter_with_checkpoints(&env, "scrub", "[store]\nscrub = \"1s\"\n", 2);
    let pack = newest_pack(&images(&job)[0]);
    let pristine = fs::read(&pack).unwrap();
    let mut b = pristine.clone();
    let at = b.len() / 2;
    b[at] ^= 0x55;
    fs::write(&pack, &b).unwrap();
    sup.wait_for("store scrub repaired damage", 1, LONG);
    assert_eq!(fs::read(&pack).unwrap(), pristine);
    let log = sup.log();
    assert!(
        log.lines()
            .any(|l| l.contains("repaired a damaged store file")
                && l.contains(&pack.file_name().unwrap().to_string_lossy().to_string())),
        "{log}"
    );
    let (code, out) = run_cli(&["verify"], &job);
    assert_eq!(code, 0, "{out}");
    stop(sup);
}

// ---- With encryption on, the job's memory is never on disk in clear ----
//
// The marker of `secret.c` (in every 512 bytes of its memory) is looked
// for in every file under the test's directory (job file, logs, state
// dir, image store) that is on the disk, i.e. not inside a tmpfs mounted
// there, in every file on /dev/shm, and in the unnamed spill file through
// supervise's own descriptors; while a dump is in memory, its private
// tmpfs is looked into too (it must hold the marker when CRIU wrote the
// pages there: the scan can find it). Each test uses its own seed, so a
// test running beside it cannot plant its marker.

/// `secret.c`'s marker for `seed`.
fn marker(seed: u64) -> Vec<u8> {
    format!("SUPERVISE-SECRET-{}", seed * seed * 7919 + 104729).into_bytes()
}

/// A `secret` job (`mb` MiB) checkpointed on demand.
fn secret_job(name: &str, seed: u64, mb: u64) -> JobFile {
    JobFile::program(
        name,
        &[&prog("secret"), &seed.to_string(), &mb.to_string(), "100"],
    )
    .every("1h")
}

/// tmpfs mounts under `dir` (from /proc/self/mountinfo).
fn tmpfs_mounts_under(dir: &Path) -> Vec<PathBuf> {
    let dir = fs::canonicalize(dir).unwrap();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let point = PathBuf::from(left.split(' ').nth(4)?);
            (right.starts_with("tmpfs ") && point.starts_with(&dir)).then_some(point)
        })
        .collect()
}

/// Files under `dir` holding `needle`, not looking into other file
/// systems mounted below it.
fn holding_on_disk(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let dev = fs::metadata(dir).unwrap().dev();
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(md) = fs::symlink_metadata(e.path()) else {
                continue;
            };
            if md.dev() != dev {
                continue;
            }
            if md.is_dir() {
                todo.push(e.path());
            } else if md.is_file()
                && fs::read(e.path()).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle))
            {
                out.push(e.path());
            }
        }
    }
    out
}

/// Files on /dev/shm holding `needle` (files over 256 MiB, e.g. another
/// benchmark's, are skipped).
fn holding_in_shm(needle: &[u8]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![PathBuf::from("/dev/shm")];
    while let Some(d) = todo.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(md) = fs::symlink_metadata(e.path()) else {
                continue;
            };
            if md.is_dir() {
                todo.push(e.path());
            } else if md.is_file()
                && md.len() <= 256 << 20
                && fs::read(e.path()).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle))
            {
                out.push(e.path());
            }
        }
    }
    out
}

/// The contents of the unnamed files process `pid` holds open in `dir`
/// (the spill file).
fn unnamed_files(pid: i32, dir: &Path) -> Vec<Vec<u8>> {
    let dir = fs::canonicalize(dir).unwrap();
    let Ok(rd) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    rd.flatten()
        .filter(|e| {
            fs::read_link(e.path())
                .is_ok_and(|t| t.starts_with(&dir) && t.to_string_lossy().ends_with(" (deleted)"))
        })
        .filter_map(|e| fs::read(e.path()).ok())
        .collect()
}

/// Nothing holds `m` on the disk under `dir` or on /dev/shm.
fn nothing_in_clear(dir: &Path, m: &[u8], when: &str) {
    let found = holding_on_disk(dir, m);
    assert!(found.is_empty(), "{when}: marker on disk in {found:?}");
    let found = holding_in_shm(m);
    assert!(found.is_empty(), "{when}: marker on /dev/shm in {found:?}");
}

/// Environment for a pause at `point` (armed while the returned file
/// exists).
fn pause_at(env: &Env, point: &str) -> (PathBuf, Vec<(String, String)>) {
    let f = env.path().join("pause");
    let vars = vec![
        ("SUPERVISE_PAUSE".to_string(), point.to_string()),
        ("SUPERVISE_PAUSE_FILE".to_string(), f.display().to_string()),
    ];
    (f, vars)
}

fn reached(pause: &Path) -> PathBuf {
    let mut r = pause.as_os_str().to_os_string();
    r.push(".reached");
    PathBuf::from(r)
}

fn arm(pause: &Path) {
    let _ = fs::remove_file(reached(pause));
    fs::write(pause, b"").unwrap();
}

fn wait_reached(pause: &Path) {
    wait_until("the pause point", LONG, || reached(pause).exists());
}

fn start_env(env: &Env, job: &Path, vars: &[(String, String)]) -> Sup {
    let v: Vec<(&str, &str)> = vars.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    env.start_with_env(job, &v)
}

/// The first checkpoint (CRIU writes the pages: into a private tmpfs) and
/// a streamed one whose every batch goes through the spill file
/// (`SUPERVISE_TEST_MAX_IN_FLIGHT=0`), each looked at right after CRIU's
/// dump: the dump is in a tmpfs mounted in the state directory (holding
/// the marker the first time: the pages are there), the spill file's bytes
/// (read through supervise's descriptors) hold no marker, and nothing on
/// disk or on /dev/shm does, then or after.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn dumps_are_in_memory_and_the_spill_file_is_sealed() {
    let env = Env::new();
    let m = marker(1111);
    let job = secret_job("mem", 1111, 8).write(&env);
    let (pause, mut vars) = pause_at(&env, "after-dump");
    vars.push(("SUPERVISE_TEST_MAX_IN_FLIGHT".into(), "0".into()));
    let sup = start_env(&env, &job, &vars);
    sup.wait_state("mem", "running", LONG);
    wait_numbers(&env.path().join("mem.out"), 2, LONG);
    let st = state(&env, "mem");
    for (n, streamed) in [(1u64, false), (2, true)] {
        arm(&pause);
        let mut cp = env.ctl_spawn(&["checkpoint", "mem"]);
        wait_reached(&pause);
        let mounts = tmpfs_mounts_under(env.path());
        assert_eq!(mounts.len(), 1, "checkpoint {n}: {mounts:?}");
        assert!(mounts[0].starts_with(fs::canonicalize(&st).unwrap()));
        let in_dump = holding(&mounts[0], &m);
        assert_eq!(
            in_dump.is_empty(),
            streamed,
            "checkpoint {n}: pages in the dump: {in_dump:?}"
        );
        if streamed {
            let spills = unnamed_files(sup.pid(), &store(&env, "mem").join("packs"));
            assert!(!spills.is_empty(), "no spill file open");
            for b in &spills {
                assert!(b.len() > 8 << 20, "spill file of {} bytes", b.len());
                assert!(
                    !b.windows(m.len()).any(|w| w == m),
                    "marker in the spill file"
                );
            }
        }
        nothing_in_clear(env.path(), &m, &format!("during checkpoint {n}"));
        fs::remove_file(&pause).unwrap();
        assert!(cp.wait().unwrap().success(), "{}", sup.log());
        sup.wait_checkpoints("mem", n, LONG);
        assert!(tmpfs_mounts_under(env.path()).is_empty(), "mount left");
        nothing_in_clear(env.path(), &m, &format!("after checkpoint {n}"));
    }
    let log = sup.log();
    let published: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("checkpoint published"))
        .collect();
    assert!(published[0].contains("streamed=false"), "{log}");
    assert!(published[1].contains("streamed=true"), "{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("went through the spill file") && l.contains("sealed=true")),
        "{log}"
    );
    // No stale dump directory either.
    let left: Vec<_> = fs::read_dir(&st)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("supervise-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    stop(sup);
    nothing_in_clear(env.path(), &m, "at the end");
}

/// supervise SIGKILLed while CRIU dumps (at `post-dump`, the job frozen;
/// a streamed checkpoint whose pages all went through the spill file):
/// nothing of the job's memory is on disk or on /dev/shm, the dump's
/// private tmpfs is still mounted (memory only) until the next supervise
/// starts, which unmounts and removes it, re-adopts the job and restores
/// it after a kill from the checkpoint before.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn a_crash_mid_dump_leaves_nothing_in_clear() {
    let env = Env::new();
    let m = marker(2222);
    let job = secret_job("crash", 2222, 8).write(&env);
    let (pause, mut vars) = pause_at(&env, "post-dump");
    vars.push(("SUPERVISE_TEST_MAX_IN_FLIGHT".into(), "0".into()));
    let mut sup = start_env(&env, &job, &vars);
    sup.wait_state("crash", "running", LONG);
    let out = env.path().join("crash.out");
    wait_numbers(&out, 2, LONG);
    checkpoint(&env, "crash");
    arm(&pause);
    let mut cp = env.ctl_spawn(&["checkpoint", "crash"]);
    wait_reached(&pause);
    assert_eq!(tmpfs_mounts_under(env.path()).len(), 1);
    for b in unnamed_files(sup.pid(), &store(&env, "crash").join("packs")) {
        assert!(
            !b.windows(m.len()).any(|w| w == m),
            "marker in the spill file"
        );
    }
    sup.signal(libc::SIGKILL);
    assert_eq!(sup.wait_exit(T), 128 + 9);
    drop(sup);
    let _ = cp.wait();
    fs::remove_file(&pause).unwrap();
    // The job runs on (CRIU gave up the dump and let it go).
    let printed = numbers(&out).len();
    wait_numbers(&out, printed + 2, LONG);
    nothing_in_clear(env.path(), &m, "after the crash");
    let left = tmpfs_mounts_under(env.path());
    assert_eq!(
        left.len(),
        1,
        "the dump's tmpfs is left until the next start"
    );

    let sup = env.start(&job);
    sup.wait_state("crash", "running", LONG);
    assert!(
        tmpfs_mounts_under(env.path()).is_empty(),
        "leftover mount not removed: {}",
        sup.log()
    );
    assert!(!left[0].exists(), "{}", left[0].display());
    assert!(sup
        .log()
        .contains("leftover of an interrupted checkpoint's dump"));
    nothing_in_clear(env.path(), &m, "after the restart");
    sup.kill_job("crash");
    sup.wait_restores("crash", 1, LONG);
    continues(&env, "crash");
    stop(sup);
    nothing_in_clear(env.path(), &m, "at the end");
}

/// A restore with no room on /dev/shm (`SUPERVISE_TEST_SHM_FULL=1`), eager
/// (`lazy = false`, so the whole image is written out), looked at after
/// the rollback: with encryption the image is in a private tmpfs mounted
/// in the state directory (holding the marker) and nothing on disk holds
/// it; after the restore the mount is gone, from the restored job's mount
/// namespace too. The control, with encryption off, finds the marker in
/// the scratch directory on disk (so the scan can fail).
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn a_restore_without_room_on_dev_shm_stays_in_memory() {
    for encrypted in [true, false] {
        let env = Env::new();
        let m = marker(3333);
        let mut jf = secret_job("rst", 3333, 8).restore("lazy = false");
        if !encrypted {
            jf = jf.extra("[store]\nencryption = false\n");
        }
        let job = jf.write(&env);
        let (pause, mut vars) = pause_at(&env, "after-rollback");
        vars.push(("SUPERVISE_TEST_SHM_FULL".into(), "1".into()));
        let sup = start_env(&env, &job, &vars);
        sup.wait_state("rst", "running", LONG);
        wait_numbers(&env.path().join("rst.out"), 2, LONG);
        checkpoint(&env, "rst");
        arm(&pause);
        sup.kill_job("rst");
        wait_reached(&pause);
        let st = state(&env, "rst");
        let mounts = tmpfs_mounts_under(env.path());
        if encrypted {
            assert_eq!(mounts.len(), 1, "{mounts:?}");
            assert!(mounts[0].starts_with(fs::canonicalize(&st).unwrap()));
            assert!(
                !holding(&mounts[0], &m).is_empty(),
                "the image is not there"
            );
            nothing_in_clear(env.path(), &m, "during the restore");
        } else {
            assert!(mounts.is_empty(), "{mounts:?}");
            let found = holding_on_disk(&st, &m);
            assert!(
                found
                    .iter()
                    .any(|p| p.to_string_lossy().contains("/supervise-restore-")),
                "the plaintext control's scratch holds no marker: {found:?}"
            );
        }
        fs::remove_file(&pause).unwrap();
        sup.wait_restores("rst", 1, LONG);
        continues(&env, "rst");
        assert!(tmpfs_mounts_under(env.path()).is_empty());
        let (pid, _) = sup.job_pid("rst");
        let theirs = fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
        assert!(
            !theirs.contains("supervise-restore-"),
            "the restored job's namespace kept the mount: {theirs}"
        );
        stop(sup);
        if encrypted {
            nothing_in_clear(env.path(), &m, "at the end");
        }
    }
}

/// Short of memory (`SUPERVISE_TEST_MEM_AVAILABLE` = 8 MiB, /dev/shm
/// full): the first checkpoint streams its pages instead of dumping them
/// into memory (and says why); an eager restore (`lazy = false`) has no
/// room, so the image is restored lazily, and the job continues. With
/// hardly any memory (1 byte) not even that fits: the restore fails with
/// an error naming what it needed and had, and is tried again later like
/// any shortage of supervise's resources; the job is not started afresh
/// (its images are kept).
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn short_of_memory_streams_restores_lazily_or_refuses_clearly() {
    let env = Env::new();
    let m = marker(4444);
    let job = secret_job("low", 4444, 4)
        .restore("lazy = false")
        .write(&env);
    let mut vars = vec![
        ("SUPERVISE_TEST_SHM_FULL".to_string(), "1".to_string()),
        (
            "SUPERVISE_TEST_MEM_AVAILABLE".to_string(),
            (8u64 << 20).to_string(),
        ),
    ];
    let sup = start_env(&env, &job, &vars);
    sup.wait_state("low", "running", LONG);
    let out = env.path().join("low.out");
    wait_numbers(&out, 2, LONG);
    checkpoint(&env, "low");
    let log = sup.log();
    assert!(
        log.lines()
            .any(|l| l.contains("streaming this checkpoint's pages")
                && l.contains("not enough memory")),
        "{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("checkpoint published") && l.contains("streamed=true")),
        "{log}"
    );
    sup.kill_job("low");
    let s = sup.wait_restores("low", 1, LONG);
    assert_eq!(s["last_restore"]["mode"], "lazy", "{s}");
    assert!(sup.log().contains("restoring it lazily"), "{}", sup.log());
    continues(&env, "low");
    stop(sup);
    nothing_in_clear(env.path(), &m, "after the lazy restore");

    vars[1].1 = "1".into();
    let printed = numbers(&out).len();
    let mut sup = start_env(&env, &job, &vars);
    let s = sup.wait_failed_restores("low", 2, LONG);
    let f = &s["last_failure"];
    assert_eq!(f["resource"], true, "retried, not given up: {s}");
    let e = f["error"].as_str().unwrap_or_default();
    assert!(
        e.contains("it needs") && e.contains("1 KiB is available"),
        "{s}"
    );
    let log = sup.log();
    assert!(
        log.lines()
            .any(|l| l.contains("trying again") && l.contains("not enough memory")),
        "{log}"
    );
    assert!(
        !log.contains("starting the command afresh") && !log.contains(" started pid="),
        "{log}"
    );
    assert_eq!(numbers(&out).len(), printed, "the job was started again");
    sup.signal(libc::SIGTERM);
    sup.wait_exit(LONG);
    assert!(!images(&job).is_empty());
    nothing_in_clear(env.path(), &m, "at the end");
}
