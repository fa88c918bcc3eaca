//! Item 9 of the shared-node review: what supervise says when something is
//! refused or denied. Each cause once; "permission denied" said as such;
//! a closed pipe ends a client quietly; names too long for the paths they
//! become are refused by validation.

use std::fs;
use std::process::{Command, Stdio};

use crate::as_nobody;
use crate::common::{Env, JobFile, BIN, T};

/// A non-root user asking root's live supervise is told "permission
/// denied" (exit 1), not that no supervise runs.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn non_root_status_on_roots_socket_is_permission_denied() {
    let env = Env::new();
    crate::open_up(&env);
    let sock_dir = env.path().join("run");
    let job = JobFile::counter("p").every("1h").write(&env);
    let sock = sock_dir.join("s.sock");
    let sup = env.start_with(&[
        std::ffi::OsStr::new("--socket"),
        sock.as_os_str(),
        job.as_os_str(),
    ]);
    // Through its own socket (`--socket`).
    sup.wait_state("p", "running", T);
    let out = as_nobody(&format!("{BIN} --socket {} status", sock.display()))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("permission denied"), "{err}");
    assert!(!err.contains("no supervise is running"), "{err}");
}

/// `supervise check` as a non-root user blames the missing privileges,
/// not the kernel.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn non_root_check_blames_privileges_not_the_kernel() {
    let out = as_nobody(&format!("{BIN} check")).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("[FAIL] privileges"), "{text}");
    assert!(!text.contains("kernel lacks"), "{text}");
    assert!(text.contains("not run"), "{text}");
}

/// `supervise images --json | head`: the reader goes away; the client
/// ends without a panic or a backtrace.
#[test]
fn closed_stdout_ends_a_client_quietly() {
    let env = Env::new();
    let job = env.job("q", "command = [\"/bin/true\"]\n");
    let mut child = Command::new(BIN)
        .args(["images", "--json"])
        .arg(&job)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader is gone before anything is written
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(!err.contains("Broken pipe"), "{err}");
}

/// A failing OS call is reported once: its text is not repeated by every
/// layer of the error chain.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn each_cause_is_said_once() {
    let env = Env::new();
    let job = env.job(
        "once",
        "command = [\"/bin/true\"]\nstate_dir = \"/proc/self/nonexistent/state\"\n",
    );
    let err = run_refused(&env, &job);
    assert_eq!(err.matches("(os error").count(), 1, "{err}");
    assert!(!err.contains("control socket ready"), "{err}");
}

/// A 300-character name is refused by validation, naming the limit, and
/// nothing is created.
#[test]
fn overlong_name_is_refused_with_the_limit() {
    let env = Env::new();
    let name = "n".repeat(300);
    let job = env.job(
        "long",
        &format!("name = \"{name}\"\ncommand = [\"/bin/true\"]\n"),
    );
    let err = run_refused(&env, &job);
    assert!(err.contains("the limit is 128"), "{err}");
    assert!(err.contains("long.toml:1"), "file and line named: {err}");
    assert!(!env.path().join(".supervise").exists());
    let _ = fs::remove_file(job);
}

/// `supervise run JOB`, which must refuse (exit 2); its stderr.
fn run_refused(env: &Env, job: &std::path::Path) -> String {
    let out = Command::new(BIN)
        .arg("run")
        .arg(job)
        .env("SUPERVISE_SOCKET", env.socket())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{err}");
    err
}
