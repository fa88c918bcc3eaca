//! Job files root reads from a user's directory: a FIFO or a symlink to
//! `/dev/zero` planted as a job file used to hang `supervise run` and make
//! `supervise images` grow to gigabytes; absurd durations were accepted
//! and left `supervise stop` waiting. And `supervise check` as a user who
//! cannot see root's state directory.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use crate::clients::{bounded, one_line, BOUND};
use crate::common::{cap_memory, Env, BIN};
use crate::{as_nobody, attacker_dir, nobody, open_up};

/// `supervise CMD PATH` as root (memory capped at 2 GiB so that a
/// regression fails here instead of exhausting the machine): within
/// [`BOUND`], exit 2 and one line naming `path` and `why`.
fn refused_quickly(env: &Env, cmd: &str, path: &std::path::Path, why: &str) {
    let mut c = Command::new(BIN);
    c.arg(cmd).arg(path).env("SUPERVISE_SOCKET", env.socket());
    cap_memory(&mut c);
    let out = bounded(c, BOUND);
    let err = one_line(&out);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{cmd} {}: {err}",
        path.display()
    );
    assert!(
        err.contains(&path.display().to_string()) && err.contains(why),
        "{cmd} {}: {err}",
        path.display()
    );
}

/// The attacker plants a FIFO and a symlink to /dev/zero as job files
/// (and a FIFO among the job files of a directory): `run`, `check`,
/// `images`, `verify` and `gc` each refuse in one line, at once.
#[test]
#[cfg_attr(not(root), ignore = "needs root")]
fn fifo_and_dev_zero_job_files_are_refused_at_once() {
    let env = Env::new();
    let s = attacker_dir(&env, "scratch");
    nobody(&format!(
        "mkfifo {s}/fifo.toml && ln -s /dev/zero {s}/zero.toml && mkdir {s}/jobs && \
         printf 'command = [\"/bin/true\"]\\n' > {s}/jobs/a.toml && mkfifo {s}/jobs/b.toml",
        s = s.display()
    ));
    let fifo = s.join("fifo.toml");
    let zero = s.join("zero.toml");
    for cmd in ["run", "check", "images", "verify", "gc"] {
        refused_quickly(&env, cmd, &fifo, "a FIFO, not a regular file");
        refused_quickly(&env, cmd, &zero, "a character device, not a regular file");
    }
    for cmd in ["run", "check"] {
        refused_quickly(&env, cmd, &s.join("jobs"), "b.toml: cannot read: a FIFO");
    }
    // Nothing was started or created for the good job next to the FIFO.
    assert!(!s.join("jobs/.supervise").exists());
}

/// A job file larger than 1 MiB is refused naming the file and the limit.
#[test]
fn oversized_job_file_is_refused() {
    let env = Env::new();
    let big = env.job(
        "big",
        &format!("command = [\"/bin/true\"]\n{}\n", "#".repeat(2 << 20)),
    );
    refused_quickly(&env, "run", &big, "larger than 1024 KiB");
}

/// `backoff = "500000000y"` with as large a `backoff_max` (accepted
/// before, after which `supervise stop` waited for ever) is refused naming
/// file, line, column, key and the bound; so is an interval of u64::MAX
/// seconds.
#[test]
fn huge_durations_are_refused_naming_file_line_and_key() {
    let env = Env::new();
    let job = env.job(
        "huge",
        "command = [\"/bin/true\"]\n[restore]\nbackoff = \"500000000y\"\nbackoff_max = \"500000000y\"\n",
    );
    for cmd in ["run", "check"] {
        let mut c = Command::new(BIN);
        c.arg(cmd).arg(&job).env("SUPERVISE_SOCKET", env.socket());
        let out = bounded(c, BOUND);
        let err = one_line(&out);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert_eq!(
            err.trim_end(),
            format!(
                "supervise: {}:3:11: restore.backoff: must be at most 1day (found \"500000000y\")",
                job.display()
            )
        );
    }
    let job = env.job(
        "every",
        "command = [\"/bin/true\"]\n[checkpoint]\nevery = \"18446744073709551615s\"\n",
    );
    let mut c = Command::new(BIN);
    c.arg("run").arg(&job).env("SUPERVISE_SOCKET", env.socket());
    let out = bounded(c, BOUND);
    let err = one_line(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!(
            "{}:3:9: checkpoint.every: must be at most 1year",
            job.display()
        )),
        "{err}"
    );
}

/// A user who cannot see into root's state directory (0700) is told that
/// (permission denied on that directory), not that a key "will be
/// generated" when one exists.
#[test]
#[cfg_attr(not(root), ignore = "needs root")]
fn non_root_check_says_it_cannot_see_the_key() {
    let env = Env::new();
    open_up(&env);
    let state = env.path().join("state");
    fs::create_dir(&state).unwrap();
    fs::set_permissions(&state, fs::Permissions::from_mode(0o700)).unwrap();
    let key = state.join("store.key");
    fs::write(&key, "not read\n").unwrap();
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
    let job = env.job(
        "hidden",
        &format!(
            "command = [\"/bin/true\"]\nstate_dir = \"{}\"\n",
            state.display()
        ),
    );
    let mut c = as_nobody(&format!("exec {BIN} check {}", job.display()));
    c.env_remove("SUPERVISE_SOCKET");
    let out = bounded(c, BOUND);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "job hidden: cannot see its store key {}: permission denied on {}",
            key.display(),
            state.display()
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "job hidden: cannot see its image store {}: permission denied on {}",
            state.join("images").display(),
            state.display()
        )),
        "{text}"
    );
    assert!(!text.contains("will be generated"), "{text}");
    // As root, the same key is seen.
    let out = Command::new(BIN).arg("check").arg(&job).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("will seal its images"), "{text}");
}
