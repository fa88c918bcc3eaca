//! Attacks on where supervise keeps its own data: the state directory
//! (job.json, its temporary file, the lock) and the control socket's
//! directory. supervise must refuse, at start and before it starts the
//! job, any such location another user controls, naming path, owner, mode.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::Duration;

use crate::common::{self, Env, JobFile};
use crate::{attacker_dir, nobody, Canary};

const QUICK: Duration = Duration::from_secs(20);

/// A counter job with no checkpoint during a test and `top` (e.g. a
/// `state_dir`) at the top level.
fn counter_job(env: &Env, name: &str, top: &str) -> std::path::PathBuf {
    JobFile::counter(name).every("1h").top(top).write(env)
}

/// Everything under `dir`, for before/after comparisons.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = walk(dir)
        .into_iter()
        .map(|p| p.strip_prefix(dir).unwrap().display().to_string())
        .collect();
    v.sort();
    v
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            out.push(p.clone());
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                out.extend(walk(&p));
            }
        }
    }
    out
}

/// Attack 5: the state directory lies in the attacker's scratch space,
/// with `job.json.tmp` a symlink to a root-owned file. supervise used to
/// write job.json through it. Now the state directory is refused at start
/// (exit 2, one line naming it, its owner and mode); the job never starts
/// and the root file is untouched.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn state_dir_in_attacker_space_is_refused() {
    let env = Env::new();
    let scratch = attacker_dir(&env, "scratch");
    let secret = env.path().join("secret");
    fs::create_dir(&secret).unwrap();
    let canary = Canary::new(&secret, "root-file", 4096);
    nobody(&format!(
        "mkdir -m 0700 {s}/state && ln -s {c} {s}/state/job.json.tmp && ln -s {c} {s}/state/lock",
        s = scratch.display(),
        c = canary.path.display()
    ));
    let job = counter_job(
        &env,
        "planted",
        &format!("state_dir = \"{}\"", scratch.join("state").display()),
    );
    let mut sup = env.start(&job);
    let code = sup.wait_exit(QUICK);
    let log = sup.log();
    assert_eq!(code, 2, "{log}");
    assert!(
        log.contains(&format!(
            "state directory {}",
            scratch.join("state").display()
        )) && log.contains(&format!(
            "{} is a directory owned by uid 65534",
            scratch.display()
        )) && log.contains("mode 0755"),
        "the refusal names the path, its owner and mode: {log}"
    );
    assert!(
        !log.contains("started pid="),
        "the job never started: {log}"
    );
    assert!(
        !log.contains("control socket ready"),
        "nothing is ready before the checks passed: {log}"
    );
    assert_eq!(
        log.matches("uid 65534").count(),
        1,
        "the cause is said once: {log}"
    );
    canary.check();
    assert!(!env.path().join("planted.out").exists());
}

/// The same refusal when only an ancestor of the state directory is the
/// attacker's (they could rename it away and put their own in its place),
/// and nothing is created below it.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn state_dir_below_attacker_dir_is_refused_and_not_created() {
    let env = Env::new();
    let scratch = attacker_dir(&env, "scratch");
    let state = scratch.join("a/b/state");
    let job = counter_job(
        &env,
        "below",
        &format!("state_dir = \"{}\"", state.display()),
    );
    let mut sup = env.start(&job);
    assert_eq!(sup.wait_exit(QUICK), 2, "{}", sup.log());
    let log = sup.log();
    assert!(
        log.contains(&format!(
            "{} is a directory owned by uid 65534",
            scratch.display()
        )),
        "{log}"
    );
    assert!(!scratch.join("a").exists(), "nothing created below it");
    // And the default location next to a job file in the attacker's
    // directory is refused the same way.
    let job2 = scratch.join("job.toml");
    fs::copy(&job, &job2).unwrap();
    let text = fs::read_to_string(&job2)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("state_dir"))
        .collect::<Vec<_>>()
        .join("\n");
    fs::write(&job2, text).unwrap();
    let mut sup = env.start(&job2);
    assert_eq!(sup.wait_exit(QUICK), 2, "{}", sup.log());
    assert!(sup.log().contains("uid 65534"), "{}", sup.log());
    assert!(!scratch.join(".supervise").exists());
}

/// supervise's own files are written through no symlink even in a trusted
/// state dir (defence in depth): job.json replaced atomically, the
/// temporary name unpredictable. A symlink planted (here by root, as the
/// attacker cannot write there) at the old fixed temporary name is left
/// alone and its target untouched.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn job_record_never_written_through_a_symlink() {
    let env = Env::new();
    let canary = Canary::new(env.path(), "root-file", 100);
    let state = env.path().join("st");
    fs::create_dir(&state).unwrap();
    symlink(&canary.path, state.join("job.json.tmp")).unwrap();
    symlink(&canary.path, state.join("job.json")).unwrap();
    let job = counter_job(&env, "rec", &format!("state_dir = \"{}\"", state.display()));
    let sup = env.start(&job);
    sup.wait_state("rec", "running", common::T);
    common::wait_until("job.json", QUICK, || {
        fs::symlink_metadata(state.join("job.json"))
            .map(|m| m.is_file())
            .unwrap_or(false)
    });
    canary.check();
    drop(sup);
    canary.check();
}

/// A control socket in a directory the attacker controls is refused
/// before any job starts.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn control_socket_in_attacker_dir_is_refused() {
    let env = Env::new();
    let scratch = attacker_dir(&env, "scratch");
    let job = counter_job(&env, "sock", "");
    let before = listing(env.path());
    let mut sup = env.start_with(&[
        std::ffi::OsStr::new("--socket"),
        scratch.join("s.sock").as_os_str(),
        job.as_os_str(),
    ]);
    assert_eq!(sup.wait_exit(QUICK), 2, "{}", sup.log());
    let log = sup.log();
    assert!(
        log.contains("control socket directory") && log.contains("uid 65534"),
        "{log}"
    );
    assert!(!scratch.join("s.sock").exists());
    let after: Vec<String> = listing(env.path())
        .into_iter()
        .filter(|p| !p.starts_with("supervise-") && !p.starts_with(".supervise"))
        .collect();
    let before: Vec<String> = before
        .into_iter()
        .filter(|p| !p.starts_with("supervise-"))
        .collect();
    assert_eq!(before, after);
}

/// The job's stdout in the attacker's directory, planted as a symlink to a
/// root-only file before the job starts: supervise (as root) must not
/// append the job's output to that file. The job does not start, with a
/// message naming the path.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn job_output_is_never_opened_through_a_symlink() {
    let env = Env::new();
    let scratch = attacker_dir(&env, "scratch");
    let secret = env.path().join("secret");
    fs::create_dir(&secret).unwrap();
    let canary = Canary::new(&secret, "shadow", 512);
    nobody(&format!(
        "ln -s {} {}/out.txt",
        canary.path.display(),
        scratch.display()
    ));
    let job = JobFile::counter("outlink")
        .every("1h")
        .stdout(&format!("{}/out.txt", scratch.display()))
        .write(&env);
    let mut sup = env.start(&job);
    let code = sup.wait_exit(QUICK);
    let log = sup.log();
    assert_eq!(code, 1, "the job failed to start: {log}");
    assert!(
        log.contains(&format!("{}/out.txt", scratch.display())) && log.contains("symlink"),
        "{log}"
    );
    canary.check();
}
