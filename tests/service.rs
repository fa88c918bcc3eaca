//! The node service: one root `supervise run --service` that runs every
//! local user's jobs as that user (real binary, real CRIU, users created
//! with useradd). alice submits; bob may not touch her job; root may;
//! submissions are checked with alice's rights; limits per user; a
//! restarted service re-adopts the users' jobs.

mod common;

use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::process::Command;

use common::service::{as_user, home, job_file, kill_job, node, start, text, uid_of};
use common::{user, Env, BIN, T};

#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn a_submitted_job_runs_as_its_owner_and_only_she_and_root_control_it() {
    let (alice, bob) = (user("sv-alice"), user("sv-bob"));
    let env = Env::new();
    let n = node(&env, "");
    let sup = start(&env, &n);
    let ha = home(&env, &alice);
    let hb = home(&env, &bob);
    job_file(&alice, &ha, "sim", "");
    let o = as_user(&alice, &n, &ha, &["submit", "sim.toml"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("sv-alice/sim"), "{}", text(&o));
    let s = sup.wait_state("sv-alice/sim", "running", T);
    assert_eq!(s["owner"], "sv-alice");
    assert_eq!(uid_of(s["pid"].as_i64().unwrap()), alice.uid);
    let out = ha.join("sim.out");
    common::wait_numbers(&out, 3, T);
    assert_eq!(fs::metadata(&out).unwrap().uid(), alice.uid);
    // alice, by the short name.
    let o = as_user(&alice, &n, &ha, &["checkpoint", "sim"]);
    assert!(o.status.success(), "{}", text(&o));
    // bob sees nothing and may do nothing to it.
    let o = as_user(&bob, &n, &hb, &["status", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!text(&o).contains("sv-alice"), "{}", text(&o));
    for args in [
        vec!["checkpoint", "sv-alice/sim"],
        vec!["restore", "sv-alice/sim"],
        vec!["stop", "sv-alice/sim"],
        vec!["start", "sv-alice/sim"],
        vec!["cancel", "sv-alice/sim"],
        vec!["images", "sv-alice/sim"],
        vec!["verify", "sv-alice/sim"],
        vec!["gc", "sv-alice/sim"],
        vec!["detach-all"],
    ] {
        let o = as_user(&bob, &n, &hb, &args);
        assert_eq!(o.status.code(), Some(1), "bob {args:?}: {}", text(&o));
        assert!(
            text(&o).contains("permission denied"),
            "bob {args:?}: {}",
            text(&o)
        );
    }
    // Nor can he read her images on disk.
    assert!(!as_user(
        &bob,
        &n,
        &hb,
        &[
            "images",
            n.users
                .join(alice.uid.to_string())
                .join("sim")
                .to_str()
                .unwrap()
        ]
    )
    .status
    .success());
    // root can.
    let o = Command::new(BIN)
        .args([
            "--socket",
            n.socket.to_str().unwrap(),
            "checkpoint",
            "sv-alice/sim",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    // Killed: restored, still as alice, counting on exactly once.
    kill_job(&sup, "sv-alice/sim");
    let s = sup.wait_restores("sv-alice/sim", 1, T);
    assert_eq!(uid_of(s["pid"].as_i64().unwrap()), alice.uid);
    let before = common::numbers(&out).len();
    common::wait_numbers(&out, before + 3, T);
    common::assert_exactly_once(&common::numbers(&out));
    // Her images, through the service.
    let o = as_user(&alice, &n, &ha, &["images", "sim", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2, "{v}");
    assert!(
        v.as_array().unwrap().iter().all(|i| i["verified"] == true),
        "{v}"
    );
    // Cancelled with its images.
    let state = n.users.join(alice.uid.to_string()).join("sim");
    assert!(state.join("images").exists());
    let o = as_user(&alice, &n, &ha, &["cancel", "sim", "--purge"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!state.exists(), "purged");
    let s = sup.try_status().unwrap();
    assert!(s.as_array().unwrap().is_empty(), "{s}");
}

/// What alice's job file names is checked with her rights before anything
/// starts: root's files, root's directory, a symlink of hers into root's
/// files; and keys only the service sets. One line each, naming the path
/// (or the file, line and key).
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn submissions_are_checked_with_the_owners_rights() {
    let alice = user("sv-alice");
    let env = Env::new();
    let n = node(&env, "");
    let sup = start(&env, &n);
    let ha = home(&env, &alice);
    let secret = env.path().join("root-secret");
    fs::write(&secret, "root's\n").unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
    symlink(&secret, ha.join("link.out")).unwrap();
    let cases = [
        ("shadow", "stdout = \"/etc/shadow\"", "/etc/shadow"),
        ("rootdir", "cwd = \"/root\"", "/root"),
        ("link", "stderr = \"link.out\"", "link.out"),
        ("state", "state_dir = \"/tmp/elsewhere\"", "state_dir"),
    ];
    for (name, line, named) in cases {
        let p = job_file(&alice, &ha, name, line);
        let o = as_user(&alice, &n, &ha, &["submit", p.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(1), "{name}: {}", text(&o));
        let t = text(&o);
        assert!(t.contains(named) && t.lines().count() == 1, "{name}: {t}");
        if name == "state" {
            assert!(t.contains(&format!("{}:3:", p.display())), "{t}");
        } else {
            assert!(t.contains("ermission denied"), "{name}: {t}");
        }
    }
    assert_eq!(fs::read_to_string(&secret).unwrap(), "root's\n");
    let s = sup.try_status().unwrap();
    assert!(s.as_array().unwrap().is_empty(), "nothing started: {s}");
}

/// At most one job and one byte of images per user: a second job is
/// refused, the checkpoint over the limit fails (counted in status, the
/// job running on), and nothing is lost.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn limits_per_user_refuse_clearly() {
    let alice = user("sv-alice");
    let env = Env::new();
    let n = node(
        &env,
        "max_jobs_per_user = 1\nmax_image_bytes_per_user = \"1\"",
    );
    let sup = start(&env, &n);
    let ha = home(&env, &alice);
    job_file(&alice, &ha, "one", "");
    job_file(&alice, &ha, "two", "");
    let o = as_user(&alice, &n, &ha, &["submit", "one.toml"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = as_user(&alice, &n, &ha, &["submit", "two.toml"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("max_jobs_per_user"), "{}", text(&o));
    sup.wait_state("sv-alice/one", "running", T);
    let o = as_user(&alice, &n, &ha, &["checkpoint", "one"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let s = sup.wait_failed_checkpoints("sv-alice/one", 1, T);
    assert_eq!(s["last_failure"]["step"], "stage", "{s}");
    assert!(
        s["last_failure"]["error"]
            .as_str()
            .unwrap()
            .contains("max_image_bytes_per_user"),
        "{s}"
    );
    assert_eq!(s["state"], "running");
}

/// The service is restarted (detach-all, as systemctl restart does): the
/// new one supervises the users' jobs again, re-adopting the one still
/// running (same pid, same owner), and restores it as its owner later.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn a_restarted_service_re_adopts_the_users_jobs() {
    let alice = user("sv-alice");
    let env = Env::new();
    let n = node(&env, "");
    let mut sup = start(&env, &n);
    let ha = home(&env, &alice);
    job_file(&alice, &ha, "keep", "");
    let o = as_user(&alice, &n, &ha, &["submit", "keep.toml"]);
    assert!(o.status.success(), "{}", text(&o));
    let pid = sup.wait_state("sv-alice/keep", "running", T)["pid"].clone();
    common::checkpoint_on(&n.socket, "sv-alice/keep");
    let o = Command::new(BIN)
        .args(["--socket", n.socket.to_str().unwrap(), "detach-all"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(sup.wait_exit(T), 0);
    let sup = start(&env, &n);
    let s = sup.wait_state("sv-alice/keep", "running", T);
    assert_eq!(s["pid"], pid, "re-adopted, not restarted");
    assert_eq!(s["owner"], "sv-alice");
    kill_job(&sup, "sv-alice/keep");
    let s = sup.wait_restores("sv-alice/keep", 1, T);
    assert_eq!(uid_of(s["pid"].as_i64().unwrap()), alice.uid);
    let out = ha.join("keep.out");
    let before = common::numbers(&out).len();
    common::wait_numbers(&out, before + 3, T);
    common::assert_exactly_once(&common::numbers(&out));
}

/// A stopped job submitted again (as a requeued Slurm batch step does,
/// after the final checkpoint at the pre-termination signal) resumes from
/// its newest image; one still running is refused.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn submitting_a_stopped_job_again_resumes_it() {
    let alice = user("sv-alice");
    let env = Env::new();
    let n = node(&env, "");
    let sup = start(&env, &n);
    let ha = home(&env, &alice);
    job_file(&alice, &ha, "again", "");
    let o = as_user(&alice, &n, &ha, &["submit", "again.toml"]);
    assert!(o.status.success(), "{}", text(&o));
    sup.wait_state("sv-alice/again", "running", T);
    let o = as_user(&alice, &n, &ha, &["submit", "again.toml"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("it runs"), "{}", text(&o));
    let out = ha.join("again.out");
    common::wait_numbers(&out, 3, T);
    let o = as_user(&alice, &n, &ha, &["stop", "again", "--checkpoint"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = as_user(&alice, &n, &ha, &["submit", "again.toml"]);
    assert!(o.status.success(), "{}", text(&o));
    let s = sup.wait_restores("sv-alice/again", 1, T);
    assert_eq!(uid_of(s["pid"].as_i64().unwrap()), alice.uid);
    let before = common::numbers(&out).len();
    common::wait_numbers(&out, before + 3, T);
    common::assert_exactly_once(&common::numbers(&out));
}
