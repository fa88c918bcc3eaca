//! Attacks between the users of the node service (`supervise run
//! --service`): bob against alice's files and job, and alice's own job
//! against root (the namespace init, the service's area). The attackers'
//! steps run as those users (setpriv), against the real binary and CRIU.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::common::service::{as_user, home, node, start, text};
use crate::common::{prog, user, Env, T};

/// bob's job file names alice's private file as its output, and her
/// private directory as its working directory: refused with bob's
/// rights, her file untouched; he cannot name himself into her jobs.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn bob_cannot_reach_alices_files_through_the_service() {
    let (alice, bob) = (user("sv-alice"), user("sv-bob"));
    let env = Env::new();
    let n = node(&env, "");
    let sup = start(&env, &n);
    let ha = home(&env, &alice);
    fs::set_permissions(&ha, fs::Permissions::from_mode(0o700)).unwrap();
    let diary = ha.join("diary");
    fs::write(&diary, "alice's\n").unwrap();
    nix::unistd::chown(&diary, Some(nix::unistd::Uid::from_raw(alice.uid)), None).unwrap();
    fs::set_permissions(&diary, fs::Permissions::from_mode(0o600)).unwrap();
    let hb = home(&env, &bob);
    for (name, line, named) in [
        (
            "steal",
            format!("stdout = \"{}\"", diary.display()),
            diary.display().to_string(),
        ),
        (
            "enter",
            format!("cwd = \"{}\"", ha.display()),
            ha.display().to_string(),
        ),
    ] {
        let p = hb.join(format!("{name}.toml"));
        let stdout = if line.starts_with("stdout") {
            String::new()
        } else {
            format!("stdout = \"{}\"\n", hb.join("x.out").display())
        };
        fs::write(
            &p,
            format!(
                "command = [\"{}\", \"100\"]\n{stdout}{line}\n[checkpoint]\nevery = \"1h\"\n",
                prog("counter")
            ),
        )
        .unwrap();
        let o = as_user(&bob, &n, &hb, &["submit", p.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(1), "{name}: {}", text(&o));
        let t = text(&o);
        assert!(
            t.contains(&named) && t.contains("ermission denied"),
            "{name}: {t}"
        );
    }
    assert_eq!(fs::read_to_string(&diary).unwrap(), "alice's\n");
    let s = sup.try_status().unwrap();
    assert!(s.as_array().unwrap().is_empty(), "{s}");
}

/// alice's job (running as alice in its user namespace) tries to read
/// what root's side holds: the namespace init's environment and memory
/// (the init is the namespace's root, holding every capability in it),
/// and the service's area with her images and key. All refused.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn alices_job_cannot_reach_roots_side() {
    let alice = user("sv-alice");
    let env = Env::new();
    let n = node(&env, "");
    let sup = start(&env, &n);
    let ha = home(&env, &alice);
    let area = n.users.join(alice.uid.to_string());
    let script = format!(
        "for p in /proc/1/environ /proc/1/mem /proc/1/root/etc/shadow {area} {area}/probe/store.key; do \
           if [ \"$p\" = /proc/1/mem ]; then (exec 3<\"$p\") 2>/dev/null; \
           elif [ -d \"$p\" ]; then ls \"$p\" >/dev/null 2>&1; else head -c 1 \"$p\" >/dev/null 2>&1; fi \
             && echo \"READ $p\" || echo \"DENIED $p\"; \
         done; echo done; exec {} 1000",
        prog("counter"),
        area = area.display()
    );
    let p = ha.join("probe.toml");
    fs::write(
        &p,
        format!(
            "command = [\"/bin/sh\", \"-c\", {}]\nstdout = \"probe.out\"\n[checkpoint]\nevery = \"1h\"\n",
            toml_str(&script)
        ),
    )
    .unwrap();
    let o = as_user(&alice, &n, &ha, &["submit", p.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    sup.wait_state("sv-alice/probe", "running", T);
    let out = ha.join("probe.out");
    crate::common::wait_until("the probe's report", T, || {
        fs::read_to_string(&out).is_ok_and(|t| t.contains("done"))
    });
    let report = fs::read_to_string(&out).unwrap();
    assert!(!report.contains("READ"), "{report}");
    assert_eq!(report.matches("DENIED").count(), 5, "{report}");
    assert!(Path::new(&area).exists());
}

/// alice's client says it runs in a Slurm job whose id climbs out of her
/// job's state directory (`slurm-<id>.<run>` is made as root): refused
/// before anything is made.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn a_crafted_slurm_job_id_names_no_directory() {
    let alice = user("sv-alice");
    let env = Env::new();
    let n = node(&env, "");
    let sup = start(&env, &n);
    let ha = home(&env, &alice);
    let p = ha.join("j.toml");
    fs::write(
        &p,
        format!(
            "command = [\"{}\", \"100\"]\nstdout = \"j.out\"\n[checkpoint]\nevery = \"1h\"\n",
            prog("counter")
        ),
    )
    .unwrap();
    let escape = env.path().join("escaped");
    let id = format!("1/../../../../../../..{}", escape.display());
    let o = std::process::Command::new("setpriv")
        .args([
            &format!("--reuid={}", alice.uid),
            &format!("--regid={}", alice.gid),
            "--init-groups",
            "--",
            crate::common::BIN,
        ])
        .arg("--socket")
        .arg(&n.socket)
        .args(["submit", p.to_str().unwrap()])
        .current_dir(&ha)
        .env("SLURM_JOB_ID", &id)
        .env("SLURMD_NODENAME", "n1")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("is not one"), "{}", text(&o));
    assert!(!escape.exists() && !Path::new(&format!("{}.0", escape.display())).exists());
    let s = sup.try_status().unwrap();
    assert!(s.as_array().unwrap().is_empty(), "{s}");
}

fn toml_str(s: &str) -> String {
    format!("{:?}", s)
}
