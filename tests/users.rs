//! Jobs that run as their owner (`user = ...`), not as root: in a user
//! namespace of their own that maps only the owner's ids, checkpointed and
//! restored by CRIU running as the owner (real CRIU, real processes,
//! users created by the test with useradd).

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{prog, user, Env, TestUser, T};

/// A directory owned by `u` (mode 0755) in the test's (opened-up) dir.
fn users_dir(env: &Env, u: &TestUser) -> PathBuf {
    fs::set_permissions(
        env.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    common::service::home(env, u)
}

/// `Uid:`/`Gid:`/`Groups:` of `pid` as the host sees them.
fn ids(pid: i32) -> (String, String, String) {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |k: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap_or_default()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    (field("Uid:"), field("Gid:"), field("Groups:"))
}

fn team_gid() -> u32 {
    let o = Command::new("getent")
        .args(["group", "sv-team"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout)
        .split(':')
        .nth(2)
        .unwrap()
        .parse()
        .unwrap()
}

fn numbers(p: &Path) -> Vec<i64> {
    common::numbers(p)
}

/// alice's job runs as alice (uid, gid, supplementary groups), writes
/// its files as alice, survives checkpoint → SIGKILL → automatic restore
/// still as alice, and counts on exactly once.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn a_job_runs_checkpoints_and_restores_as_its_owner() {
    let alice = user("sv-alice");
    let env = Env::new();
    let home = users_dir(&env, &alice);
    let job = env.job(
        "own",
        &format!(
            "command = [\"{}\", \"100\"]\nuser = \"{}\"\ncwd = \"{}\"\nstdout = \"{}\"\n\
             [checkpoint]\nevery = \"1h\"\n[restore]\nbackoff = \"0s\"\n",
            prog("counter"),
            alice.name,
            home.display(),
            home.join("own.out").display(),
        ),
    );
    let sup = env.start(&job);
    let s = sup.wait_state("own", "running", T);
    let pid = s["pid"].as_i64().unwrap() as i32;
    let (uid, gid, groups) = ids(pid);
    assert_eq!(uid, format!("{0} {0} {0} {0}", alice.uid));
    assert_eq!(gid, format!("{0} {0} {0} {0}", alice.gid));
    assert!(
        groups.split(' ').any(|g| g == team_gid().to_string()),
        "supplementary groups {groups}"
    );
    let out = home.join("own.out");
    common::wait_numbers(&out, 3, T);
    assert_eq!(fs::metadata(&out).unwrap().uid(), alice.uid, "alice's file");
    common::checkpoint(&env, "own");
    sup.kill_job("own");
    let s = sup.wait_restores("own", 1, T);
    let pid = s["pid"].as_i64().unwrap() as i32;
    let (uid, gid, _) = ids(pid);
    assert_eq!(
        uid,
        format!("{0} {0} {0} {0}", alice.uid),
        "restored as alice"
    );
    assert_eq!(gid, format!("{0} {0} {0} {0}", alice.gid));
    let before = numbers(&out).len();
    common::wait_numbers(&out, before + 3, T);
    common::assert_exactly_once(&numbers(&out));
    // Checkpoints keep working on the restored job.
    common::checkpoint(&env, "own");
    assert!(!sup.log().contains(" ERROR "), "{}", sup.log());
}

/// A job file that names, for alice's job, an output she may not write or
/// a working directory she may not enter fails as it would for alice:
/// the job does not start, and the message names the path.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn an_owned_job_gets_its_owners_rights_not_roots() {
    let alice = user("sv-alice");
    let env = Env::new();
    let home = users_dir(&env, &alice);
    for (key, value, path) in [
        ("stdout", "/etc/shadow", "/etc/shadow"),
        ("cwd", "/root", "/root"),
    ] {
        let stdout = if key == "stdout" {
            String::new()
        } else {
            format!("stdout = \"{}\"\n", home.join("x.out").display())
        };
        let job = env.job(
            "deny",
            &format!(
                "command = [\"{}\", \"100\"]\nuser = \"{}\"\n{key} = \"{value}\"\n{stdout}\
                 [checkpoint]\nevery = \"1h\"\n",
                prog("counter"),
                alice.name,
            ),
        );
        let mut sup = env.start(&job);
        let code = sup.wait_exit(T);
        assert_eq!(code, 1, "{}", sup.log());
        let log = sup.log();
        assert!(
            log.contains(path) && log.contains("ermission denied"),
            "{key}: {log}"
        );
        // Nothing was written as root.
        assert_ne!(
            fs::metadata("/etc/shadow").unwrap().len(),
            0,
            "shadow untouched"
        );
    }
}
