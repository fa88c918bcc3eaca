//! Installing and operating supervise as a service:
//!
//! * `systemd_stop_*`: the unit's `ExecStop=supervise __systemd-stop %n`
//!   against a real supervise and job, with a stand-in `systemctl` that
//!   reports the unit's pending job (`restart` or `stop`) the way
//!   `systemctl list-jobs --no-legend --plain` does. On a restart the job
//!   is left running without a checkpoint and the next supervise re-adopts
//!   it; on a stop the SIGTERM that systemd sends next takes the final
//!   checkpoint and stops the job.
//! * `debian_package_*`: the .deb of `scripts/build-deb.sh` installs with
//!   `dpkg -i`, works (`supervise check`, `man supervise`), puts the
//!   completions, the unit and the docs in place, and `dpkg -r` removes
//!   it. It uses `$SUPERVISE_DEB` when set (scripts/test.sh builds the
//!   package once before the tests), else runs scripts/build-deb.sh (a
//!   release build: minutes).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(30);
const UNIT: &str = "supervise.service";

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `supervise __systemd-stop supervise.service` with a `systemctl` on PATH
/// that lists `job_type` as the unit's pending job.
fn systemd_stop(env: &Env, job_type: &str) -> Output {
    let bin = env.path().join("fake-bin");
    fs::create_dir_all(&bin).unwrap();
    let script = bin.join("systemctl");
    fs::write(
        &script,
        format!(
            "#!/bin/sh\n[ \"$1\" = list-jobs ] || exit 1\necho \"4242 {UNIT} {job_type} running\"\necho \"4243 other.service stop waiting\"\n"
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    Command::new(BIN)
        .args(["__systemd-stop", UNIT])
        .env("PATH", path)
        .env("SUPERVISE_SOCKET", env.socket())
        .output()
        .unwrap()
}

fn init_pid(env: &Env, job: &str) -> i32 {
    let v: serde_json::Value = serde_json::from_slice(
        &fs::read(env.path().join(".supervise").join(job).join("job.json")).unwrap(),
    )
    .unwrap();
    v["init_pid"].as_i64().unwrap() as i32
}

/// `systemctl restart`: ExecStop= detaches every job, systemd's SIGTERM
/// that follows changes nothing, the job runs on and the next supervise
/// re-adopts it. `systemctl stop`: ExecStop= does nothing, SIGTERM takes
/// the final checkpoint and stops the job.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn systemd_stop_detaches_on_restart_and_checkpoints_on_stop() {
    subreaper();
    let env = Env::new();
    let job = JobFile::counter("svc")
        .every("1h")
        .dir("images-svc")
        .write(&env);
    let out = env.path().join("svc.out");

    // systemctl restart supervise
    let mut sup = env.start(&job);
    sup.wait_state("svc", "running", T);
    let (pid, _) = sup.job_pid("svc");
    let o = systemd_stop(&env, "restart");
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("restarting"),
        "{}",
        text(&o)
    );
    sup.signal(libc::SIGTERM); // what systemd sends after ExecStop=
    assert_eq!(sup.wait_exit(T), 0, "{}", sup.log());
    let log = sup.log();
    assert!(log.contains("detach-all"), "{log}");
    assert!(
        !log.contains("checkpoint published"),
        "no checkpoint: {log}"
    );
    assert!(supervise::proc::alive(pid), "the job runs on: {log}");
    let n = env.numbers("svc.out").len();
    wait_numbers(&out, n + 3, T);

    // The restarted supervise re-adopts it.
    let mut sup2 = env.start(&job);
    sup2.wait_for("re-adopted", 1, T);
    assert_eq!(sup2.job_pid("svc").0, pid, "same process");
    let old_init = init_pid(&env, "svc");

    // systemctl stop supervise
    let o = systemd_stop(&env, "stop");
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("stopping"),
        "{}",
        text(&o)
    );
    sup2.wait_state("svc", "running", T);
    sup2.signal(libc::SIGTERM);
    assert_eq!(sup2.wait_exit(T), 0, "{}", sup2.log());
    let log = sup2.log();
    assert!(
        log.contains("checkpoint published"),
        "final checkpoint: {log}"
    );
    assert!(log.contains("job stopped"), "{log}");
    reap_pids(&[old_init]);
    assert!(!supervise::proc::alive(pid), "the job is stopped: {log}");
    assert_exactly_once(&env.numbers("svc.out"));
}

/// Without systemd (or when systemctl fails), `__systemd-stop` does
/// nothing: the SIGTERM that follows stops the jobs as configured.
#[test]
fn systemd_stop_without_systemctl_does_nothing() {
    let env = Env::new();
    let o = Command::new(BIN)
        .args(["__systemd-stop", UNIT])
        .env("PATH", env.path())
        .env("SUPERVISE_SOCKET", env.socket())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("cannot tell a restart from a stop"),
        "{}",
        text(&o)
    );
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The package to test: `$SUPERVISE_DEB`, else a fresh build.
fn deb() -> PathBuf {
    if let Some(p) = std::env::var_os("SUPERVISE_DEB").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "SUPERVISE_DEB={} does not exist", p.display());
        return p;
    }
    let out = Command::new("bash")
        .arg(root().join("scripts/build-deb.sh"))
        .current_dir(root())
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "scripts/build-deb.sh: {}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    PathBuf::from(stdout.lines().last().expect("the .deb's path").trim())
}

fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd).args(args).output().unwrap()
}

/// Removes (purges) the package however the test ends.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = run("dpkg", &["--purge", "supervise"]);
    }
}

#[test]
#[cfg_attr(not(root), ignore = "needs root (dpkg -i)")]
fn debian_package_installs_works_and_removes() {
    let deb = deb();
    let info = run("dpkg-deb", &["--field", deb.to_str().unwrap(), "Depends"]);
    let depends = String::from_utf8_lossy(&info.stdout);
    assert!(depends.contains("criu (>= 4.2)"), "Depends: {depends}");

    let _guard = Installed;
    let o = run("dpkg", &["-i", deb.to_str().unwrap()]);
    assert!(
        o.status.success(),
        "dpkg -i {}: {}",
        deb.display(),
        text(&o)
    );

    let bin = Path::new("/usr/bin/supervise");
    let o = run("/usr/bin/supervise", &["check"]);
    assert!(o.status.success(), "supervise check: {}", text(&o));
    let help = run("/usr/bin/supervise", &["--help"]);
    assert!(
        String::from_utf8_lossy(&help.stdout).contains("detach-all"),
        "the packaged binary is this one: {}",
        text(&help)
    );
    let o = run("man", &["-P", "cat", "supervise"]);
    assert!(o.status.success(), "man -P cat supervise: {}", text(&o));
    let page = String::from_utf8_lossy(&o.stdout);
    assert!(
        page.contains("SYNOPSIS") && page.contains("detach-all"),
        "{page}"
    );

    let files = [
        "/usr/share/man/man1/supervise.1.gz",
        "/usr/share/bash-completion/completions/supervise",
        "/usr/share/zsh/vendor-completions/_supervise",
        "/usr/share/fish/vendor_completions.d/supervise.fish",
        "/lib/systemd/system/supervise.service",
        "/usr/share/doc/supervise/reference.toml",
        "/usr/share/doc/supervise/README.md",
        "/etc/supervise/jobs/README",
        "/etc/supervise/supervise.toml",
    ];
    for f in files {
        assert!(Path::new(f).is_file(), "{f} is installed");
    }
    let bash = fs::read_to_string(files[1]).unwrap();
    assert!(bash.contains("complete -F _supervise"), "{bash}");
    let unit = fs::read_to_string(files[4]).unwrap();
    for line in [
        "ExecStart=/usr/bin/supervise run --service /etc/supervise/jobs",
        "ExecStop=/usr/bin/supervise __systemd-stop %n",
        "KillMode=process",
        "Restart=on-failure",
    ] {
        assert!(unit.lines().any(|l| l == line), "unit has {line}");
    }
    let conf = run(
        "dpkg-query",
        &["--showformat=${Conffiles}", "--show", "supervise"],
    );
    for f in [
        "/etc/supervise/jobs/README",
        "/etc/supervise/supervise.toml",
    ] {
        assert!(
            String::from_utf8_lossy(&conf.stdout).contains(f),
            "{f} is a conffile: {}",
            text(&conf)
        );
    }

    let o = run("dpkg", &["-r", "supervise"]);
    assert!(o.status.success(), "dpkg -r supervise: {}", text(&o));
    assert!(!bin.exists(), "removed");
    for f in &files[..7] {
        assert!(!Path::new(f).exists(), "{f} removed");
    }
}

/// After scripts/setup.sh (CRIU from forky, with a newer libnl-3-200),
/// Debian's MPI stack still installs: the libnl family follows libnl-3
/// (simulated: `apt-get install -s`, nothing is installed).
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn debian_openmpi_installs_after_setup() {
    let out = run("apt-get", &["install", "-s", "libopenmpi3"]);
    assert!(
        out.status.success(),
        "apt-get install -s libopenmpi3 does not resolve after scripts/setup.sh:\n{}",
        text(&out)
    );
}
