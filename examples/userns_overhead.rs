//! What running a job as its owner (in a user namespace of its own, CRIU
//! as the owner) costs against running it as root: the same job
//! (`tests/progs/bigmem.c`, N MiB of memory) in one supervise, once as
//! root and once with `user = "sv-bench"`, checkpointed and SIGKILLed
//! (restored) in turn; min / median / max of the dump's frozen time and
//! wall time and of the restore's time to running, and the ratios.
//!
//! Root and CRIU needed; creates the user `sv-bench` if missing.
//!
//! ```sh
//! cargo build --release && cargo run --release --example userns_overhead -- [MB] [ROUNDS]
//! ```

#[allow(dead_code)]
#[path = "common/mod.rs"]
mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn status(bin: &std::path::Path, sock: &std::path::Path) -> serde_json::Value {
    let o = Command::new(bin)
        .arg("--socket")
        .arg(sock)
        .args(["status", "--json"])
        .output()
        .unwrap();
    serde_json::from_slice(&o.stdout).unwrap_or(serde_json::Value::Null)
}

fn job<'a>(s: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    s.as_array()?.iter().find(|j| j["name"] == name)
}

fn wait(
    bin: &std::path::Path,
    sock: &std::path::Path,
    name: &str,
    f: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let t0 = Instant::now();
    loop {
        let s = status(bin, sock);
        if let Some(j) = job(&s, name) {
            if f(j) {
                return j.clone();
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "timed out: {name}: {s}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stats(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.0.wait();
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mb: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(64);
    let rounds: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(5);
    let bin = common::supervise_bin();
    if !Command::new("id")
        .arg("sv-bench")
        .stdout(Stdio::null())
        .status()
        .unwrap()
        .success()
    {
        assert!(Command::new("useradd")
            .args(["-M", "-U", "-s", "/usr/sbin/nologin", "sv-bench"])
            .status()
            .unwrap()
            .success());
    }
    let tmp = tempfile::Builder::new()
        .prefix("userns-bench-")
        .tempdir()
        .unwrap();
    let d = tmp.path();
    fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
    assert!(Command::new("cc")
        .args(["-O2", "-o"])
        .arg(d.join("bigmem"))
        .arg(common::root().join("tests/progs/bigmem.c"))
        .status()
        .unwrap()
        .success());
    let work = d.join("work");
    fs::create_dir(&work).unwrap();
    fs::set_permissions(&work, fs::Permissions::from_mode(0o777)).unwrap();
    for (name, user) in [("asroot", ""), ("asuser", "user = \"sv-bench\"\n")] {
        fs::write(
            d.join(format!("{name}.toml")),
            format!(
                "command = [\"{}\", \"{mb}\"]\n{user}cwd = \"work\"\nstdout = \"work/{name}.out\"\nstate_dir = \"{}\"\n[checkpoint]\nevery = \"1h\"\nkeep = 2\n[restore]\nbackoff = \"0s\"\nlazy = false\n",
                d.join("bigmem").display(),
                d.join(format!("state-{name}")).display(),
            ),
        )
        .unwrap();
    }
    let sock = d.join("s.sock");
    let log = fs::File::create(d.join("supervise.log")).unwrap();
    let _sup = Kill(
        Command::new(&bin)
            .args(["run", "--socket"])
            .arg(&sock)
            .arg(d.join("asroot.toml"))
            .arg(d.join("asuser.toml"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let mut res: Vec<(Vec<f64>, Vec<f64>, Vec<f64>)> = vec![Default::default(), Default::default()];
    for name in ["asroot", "asuser"] {
        wait(&bin, &sock, name, |j| j["state"] == "running");
    }
    // Give the jobs time to touch their memory.
    std::thread::sleep(Duration::from_secs(2));
    for round in 0..rounds {
        for (i, name) in ["asroot", "asuser"].iter().enumerate() {
            let o = Command::new(&bin)
                .arg("--socket")
                .arg(&sock)
                .args(["checkpoint", name])
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let j = wait(&bin, &sock, name, |j| j["state"] == "running");
            res[i].0.push(
                j["last_checkpoint"]["frozen_ms"]
                    .as_f64()
                    .unwrap_or(f64::NAN),
            );
            res[i].1.push(
                j["last_checkpoint"]["duration_ms"]
                    .as_f64()
                    .unwrap_or(f64::NAN),
            );
            let pid = j["pid"].as_i64().unwrap() as i32;
            let restores = j["restores"].as_u64().unwrap();
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            )
            .unwrap();
            let j = wait(&bin, &sock, name, |j| {
                j["restores"].as_u64().unwrap_or(0) > restores && j["state"] == "running"
            });
            res[i]
                .2
                .push(j["last_restore"]["running_ms"].as_f64().unwrap_or(f64::NAN));
        }
        eprintln!("round {} done", round + 1);
    }
    println!("job: bigmem {mb} MiB, {rounds} rounds each (checkpoint, then SIGKILL and restore)");
    println!(
        "{:<28} {:>26} {:>26} {:>8}",
        "", "as root min/median/max", "as owner min/median/max", "ratio"
    );
    let labels = [
        "checkpoint frozen, ms",
        "checkpoint wall, ms",
        "restore to running, ms",
    ];
    for (k, label) in labels.iter().enumerate() {
        let pick = |i: usize| match k {
            0 => res[i].0.clone(),
            1 => res[i].1.clone(),
            _ => res[i].2.clone(),
        };
        let (a, b) = (stats(&mut pick(0)), stats(&mut pick(1)));
        println!(
            "{:<28} {:>26} {:>26} {:>8.2}",
            label,
            format!("{:.1} / {:.1} / {:.1}", a.0, a.1, a.2),
            format!("{:.1} / {:.1} / {:.1}", b.0, b.1, b.2),
            b.1 / a.1
        );
    }
}
