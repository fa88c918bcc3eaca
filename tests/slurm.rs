//! supervise under a real Slurm 22.05 cluster (two slurmd nodes on this
//! host, scripts/slurm/): time-limit signal -> checkpoint -> requeue ->
//! resume on the other node; node failure; preemption; two live copies;
//! then the same with the job submitted by an unprivileged user to the
//! node services (`supervise submit --wait` as the batch step).
//! One test runs the scenarios in turn (they share the cluster), then
//! stops the cluster.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/slurm")
}

fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Stops the cluster (and with it any job left) when the test ends, and
/// removes the control sockets its batch jobs left in /run/supervise (a
/// supervise killed with its node cannot remove its own).
struct Cluster {
    sockets_before: Vec<std::path::PathBuf>,
}

fn slurm_sockets() -> Vec<std::path::PathBuf> {
    std::fs::read_dir("/run/supervise")
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    let n = p.file_name().unwrap_or_default().to_string_lossy();
                    n.starts_with("slurm-") && n.ends_with(".sock")
                })
                .collect()
        })
        .unwrap_or_default()
}

impl Cluster {
    fn start() -> Cluster {
        let sockets_before = slurm_sockets();
        sh(
            "bash",
            &[scripts().join("start.sh").to_str().unwrap(), "--clean"],
        );
        Cluster { sockets_before }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("bash").arg(scripts().join("stop.sh")).status();
        for s in slurm_sockets() {
            if !self.sockets_before.contains(&s) {
                let _ = std::fs::remove_file(s);
            }
        }
    }
}

/// Fields of `scontrol show job`.
fn job_field(id: &str, field: &str) -> String {
    let out = Command::new("scontrol")
        .args(["show", "job", id])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{field}=")))
        .unwrap_or("")
        .to_string()
}

/// A shared job directory with a counter job and its batch script.
struct Job {
    dir: tempfile::TempDir,
    id: String,
}

impl Job {
    fn submit(sbatch_args: &[&str]) -> Job {
        let dir = tempfile::Builder::new()
            .prefix("supervise-slurm-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let d = dir.path();
        let job_file = JobFile::counter("job")
            .stdout("counter.out")
            .every("2s")
            .dir("images")
            .extra("[slurm]\nfence_wait = \"10s\"")
            .write_in(d);
        let batch = d.join("batch.sh");
        fs::write(
            &batch,
            format!(
                "#!/bin/bash\nexport SUPERVISE_LOG=info\nexec {BIN} run {}\n",
                job_file.display()
            ),
        )
        .unwrap();
        let out = d.join("slurm.out");
        let mut args = vec![
            "--parsable".to_string(),
            "--requeue".into(),
            "-o".into(),
            out.to_string_lossy().into_owned(),
            "--open-mode=append".into(),
        ];
        args.extend(sbatch_args.iter().map(|s| s.to_string()));
        args.push(batch.to_string_lossy().into_owned());
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let id = sh("sbatch", &a).trim().to_string();
        Job { dir, id }
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("slurm.out")).unwrap_or_default()
    }

    fn count(&self, needle: &str) -> usize {
        self.log().matches(needle).count()
    }

    fn wait_log(&self, needle: &str, n: usize, timeout: Duration) -> Duration {
        let what = format!("{n}x {needle:?} in job {}", self.id);
        let t0 = Instant::now();
        while self.count(needle) < n {
            assert!(
                t0.elapsed() < timeout,
                "timed out after {timeout:?} waiting for {what}; log:\n{}\n{}",
                self.log(),
                sh("scontrol", &["show", "job", &self.id])
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        t0.elapsed()
    }

    /// The node it runs on, once RUNNING.
    fn running_node(&self, timeout: Duration) -> String {
        wait_until("job running", timeout, || {
            job_field(&self.id, "JobState") == "RUNNING"
        });
        job_field(&self.id, "NodeList")
    }

    /// The counter prints 5 more lines, and its output reads 0, 1, 2, ...
    /// exactly once: it resumed from an image, with its file rolled back.
    fn assert_counter_goes_on(&self) {
        let out = self.dir.path().join("counter.out");
        let n = numbers(&out).len();
        wait_numbers(&out, n + 5, T);
        assert_exactly_once(&numbers(&out));
    }

    fn cancel(&self) {
        scancel(&self.id);
    }
}

fn other(node: &str) -> &'static str {
    if node == "n1" {
        "n2"
    } else {
        "n1"
    }
}

/// Time limit: Slurm's USR1 ahead of it makes supervise publish a final
/// checkpoint, then requeue; the rerun (on the other node, the first one is
/// drained) resumes the counter from that checkpoint.
fn time_limit_requeue() {
    let job = Job::submit(&["--time=1", "--signal=B:USR1@50"]);
    let n1 = job.running_node(Duration::from_secs(30));
    sh(
        "scontrol",
        &[
            "update",
            &format!("nodename={n1}"),
            "state=drain",
            "reason=supervise-test",
        ],
    );
    job.wait_log("checkpoint published", 1, Duration::from_secs(30));
    let signal_after = job.wait_log("Slurm pre-termination signal", 1, Duration::from_secs(90));
    job.wait_log("asked Slurm to requeue the job", 1, Duration::from_secs(30));
    let t = Instant::now();
    job.wait_log("restart=1}: restored", 1, Duration::from_secs(90));
    let resumed = t.elapsed();
    let log = job.log();
    assert!(
        log.contains(&format!("node={} restart=1", other(&n1))),
        "{log}"
    );
    // The rerun resumed from the final checkpoint taken on the signal.
    let final_ckpt = log
        .lines()
        .find(|l| l.contains("stopped after checkpoint"))
        .and_then(|l| l.split("checkpoint ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no final checkpoint: {log}"))
        .to_string();
    assert!(
        log.contains(&format!("restored checkpoint={final_ckpt}")),
        "{log}"
    );
    job.assert_counter_goes_on();
    assert_eq!(job_field(&job.id, "Restarts"), "1");
    job.cancel();
    sh(
        "scontrol",
        &["update", &format!("nodename={n1}"), "state=resume"],
    );
    eprintln!(
        "time limit: USR1 {signal_after:?} after the start, requeue -> restored in {resumed:?}"
    );
}

/// Node failure: the rerun on the other node resumes from the last
/// scheduled checkpoint.
fn node_failure() {
    let job = Job::submit(&[]);
    let n1 = job.running_node(Duration::from_secs(30));
    job.wait_log("checkpoint published", 2, Duration::from_secs(30));
    let t = Instant::now();
    node_fail(&n1, "kill");
    let last = ids(&job.log(), "checkpoint published").pop().unwrap();
    job.wait_log("restart=1}: restored", 1, Duration::from_secs(150));
    let resumed = t.elapsed();
    let log = job.log();
    assert!(
        log.contains(&format!("node={} restart=1", other(&n1))),
        "{log}"
    );
    assert!(
        log.contains(&format!("restored checkpoint={last}")),
        "{log}"
    );
    job.assert_counter_goes_on();
    node_fail(&n1, "revive");
    job.cancel();
    eprintln!("node failure: kill -> restored on the other node in {resumed:?}");
}

/// Preemption by the high-priority partition: the victim gets USR1 at once,
/// checkpoints, requeues and resumes.
fn preemption() {
    let job = Job::submit(&["--exclusive", "--signal=B:USR1@10"]);
    let n = job.running_node(Duration::from_secs(30));
    job.wait_log("checkpoint published", 1, Duration::from_secs(30));
    let t = Instant::now();
    let high = preempt(&n);
    job.wait_log("Slurm pre-termination signal", 1, Duration::from_secs(60));
    job.wait_log("restart=1}: restored", 1, Duration::from_secs(90));
    let resumed = t.elapsed();
    job.assert_counter_goes_on();
    job.cancel();
    let _ = Command::new("scancel").arg(&high).status();
    eprintln!("preemption: high job submitted -> victim restored in {resumed:?}");
}

/// Only slurmd dies: Slurm reruns the job elsewhere while the old copy
/// still runs. The new copy takes the store's lease; the old one sees it,
/// stops its job and publishes nothing more; the store stays intact.
fn two_live_copies() {
    let job = Job::submit(&[]);
    let n1 = job.running_node(Duration::from_secs(30));
    job.wait_log("checkpoint published", 2, Duration::from_secs(30));
    let t = Instant::now();
    node_fail(&n1, "slurmd");
    job.wait_log("restart=1}: restored", 1, Duration::from_secs(150));
    let resumed = t.elapsed();
    job.wait_log("another copy of this job took over", 1, T);
    let log = job.log();
    assert!(
        log.contains("took over the image store; the previous copy had stopped"),
        "{log}"
    );
    // After the takeover the old copy published nothing.
    let takeover = log.find("another copy of this job took over").unwrap();
    assert!(
        !log[takeover..].contains("restart=0}: checkpoint published"),
        "{log}"
    );
    // Every retained image verifies (the new copy keeps checkpointing).
    job.wait_log("restart=1}: checkpoint published", 2, T);
    let out = Command::new(BIN)
        .arg("verify")
        .arg(job.dir.path().join("job.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "store damaged after two live copies: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    job.assert_counter_goes_on();
    node_fail(&n1, "revive");
    job.cancel();
    eprintln!("two copies: slurmd killed -> new copy restored in {resumed:?}");
}

/// Slurm as a user: alice's batch script hands her job to the node
/// service (`supervise submit --wait`), which runs it as her. At the
/// pre-termination signal her client has the service take a final
/// checkpoint and stop the job, requeues the batch job as her, and the
/// rerun's `submit --wait` resumes the job from that checkpoint.
fn user_requeue() {
    let alice = user("sv-alice");
    let env = Env::new();
    let n = service::node(&env, "");
    let sup = service::start(&env, &n);
    let (dir, id) = user_batch(&alice, &n.socket.display().to_string(), "", &[]);
    let d = dir.path();
    let out = d.join("slurm.out");
    let job = "sv-alice/job";
    let s = sup.wait_state(job, "running", Duration::from_secs(60));
    assert_eq!(s["owner"], "sv-alice");
    sup.wait_checkpoints(job, 1, T);
    let t = Instant::now();
    // The pre-termination signal, now (as at a time limit or preemption).
    sh("scancel", &["--signal=USR1", "--batch", &id]);
    let s = sup.wait_restores(job, 1, Duration::from_secs(120));
    let resumed = t.elapsed();
    assert_eq!(s["owner"], "sv-alice");
    assert_eq!(
        fs::metadata(format!("/proc/{}", s["pid"]))
            .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
            .unwrap(),
        alice.uid
    );
    let counter = d.join("counter.out");
    let before = numbers(&counter).len();
    wait_numbers(&counter, before + 5, T);
    assert_exactly_once(&numbers(&counter));
    assert_eq!(job_field(&id, "Restarts"), "1");
    let log = fs::read_to_string(&out).unwrap_or_default();
    assert!(log.contains("asked Slurm to requeue job"), "{log}");
    // scancel ends the batch step, and with it the job.
    let _ = Command::new("scancel").arg(&id).status();
    sup.wait_state(job, "stopped", Duration::from_secs(60));
    eprintln!("user requeue: USR1 -> resumed as alice in {resumed:?}");
}

/// Cancels Slurm job `id` and waits until Slurm has let it go.
fn scancel(id: &str) {
    let _ = Command::new("scancel").arg(id).status();
    wait_until("job gone", Duration::from_secs(60), || {
        let s = job_field(id, "JobState");
        s.is_empty() || s == "CANCELLED" || s == "COMPLETED" || s == "FAILED"
    });
}

/// sv-alice's batch job, submitted as her (`sbatch` with `sbatch_args`):
/// in a directory of hers under /var/tmp (shared by the nodes), a
/// counter job file (checkpoint every 2 s, `extra` TOML appended) and a
/// batch script that runs `supervise --socket SOCKET submit --wait`
/// (`socket` may name `$SLURMD_NODENAME`). Returns the directory and the
/// Slurm job id.
fn user_batch(
    alice: &TestUser,
    socket: &str,
    extra: &str,
    sbatch_args: &[&str],
) -> (tempfile::TempDir, String) {
    let dir = tempfile::Builder::new()
        .prefix("supervise-slurm-user-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let d = dir.path();
    fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let files = [
        (
            "job.toml",
            format!(
                "command = [\"{}\", \"100\"]\nstdout = \"counter.out\"\n[checkpoint]\nevery = \"2s\"\n[restore]\nbackoff = \"0s\"\n{extra}",
                prog("counter")
            ),
        ),
        (
            "batch.sh",
            format!("#!/bin/bash\nexec {BIN} --socket {socket} submit --wait job.toml\n"),
        ),
    ];
    for (f, text) in &files {
        fs::write(d.join(f), text).unwrap();
    }
    for p in [d.to_path_buf(), d.join("job.toml"), d.join("batch.sh")] {
        nix::unistd::chown(&p, Some(nix::unistd::Uid::from_raw(alice.uid)), None).unwrap();
    }
    let out = d.join("slurm.out");
    let mut args = vec![
        format!("--reuid={}", alice.uid),
        format!("--regid={}", alice.gid),
        "--init-groups".into(),
        "--".into(),
        "sbatch".into(),
        "--parsable".into(),
        "--requeue".into(),
        "--open-mode=append".into(),
        "-D".into(),
        d.to_string_lossy().into_owned(),
        "-o".into(),
        out.to_string_lossy().into_owned(),
    ];
    args.extend(sbatch_args.iter().map(|s| s.to_string()));
    args.push(d.join("batch.sh").to_string_lossy().into_owned());
    let sbatch = Command::new("setpriv").args(&args).output().unwrap();
    assert!(
        sbatch.status.success(),
        "{}",
        String::from_utf8_lossy(&sbatch.stderr)
    );
    let id = String::from_utf8_lossy(&sbatch.stdout).trim().to_string();
    (dir, id)
}

/// A job of the high-priority partition on node `n`, exclusive: it
/// preempts what runs there. Returns its id.
fn preempt(n: &str) -> String {
    sh(
        "sbatch",
        &[
            "--parsable",
            "-p",
            "high",
            "-w",
            n,
            "--exclusive",
            "-o",
            "/dev/null",
            "--wrap",
            "sleep 5",
        ],
    )
    .trim()
    .to_string()
}

/// The job of sv-alice's that the user scenarios run.
const USER_JOB: &str = "sv-alice/job";

/// sv-alice's Slurm job on the two-node cluster, each node running its
/// node service ("n1", "n2") over one shared users' area (as a cluster
/// file system would share it): her batch script hands the job to the
/// service of the node it runs on (`supervise submit --wait`).
struct UserCluster {
    /// The services, by node (dropped first: they stop their jobs).
    sups: Vec<(String, service::Node, Sup)>,
    alice: TestUser,
    dir: tempfile::TempDir,
    id: String,
    _env: Env,
}

impl UserCluster {
    fn submit(sbatch_args: &[&str]) -> UserCluster {
        subreaper();
        let alice = user("sv-alice");
        let env = Env::new();
        let users = env.path().join("users");
        let sups = ["n1", "n2"]
            .into_iter()
            .map(|name| {
                let n = service::node_named(&env, name, &users);
                let sup = service::start(&env, &n);
                (name.to_string(), n, sup)
            })
            .collect();
        let (dir, id) = user_batch(
            &alice,
            &format!(
                "{}/run-$SLURMD_NODENAME/supervise.sock",
                env.path().display()
            ),
            "[slurm]\nfence_wait = \"10s\"\n",
            sbatch_args,
        );
        UserCluster {
            sups,
            alice,
            dir,
            id,
            _env: env,
        }
    }

    fn at(&self, node: &str) -> &(String, service::Node, Sup) {
        self.sups.iter().find(|(n, _, _)| n == node).unwrap()
    }

    fn sup(&self, node: &str) -> &Sup {
        &self.at(node).2
    }

    /// The node whose service runs the job, once one does.
    fn running(&self, timeout: Duration) -> String {
        let mut on = String::new();
        wait_until("alice's job running on a node", timeout, || {
            for (n, _, sup) in &self.sups {
                let s = sup.try_status();
                if s.as_ref()
                    .and_then(|s| find_job(s, USER_JOB))
                    .is_some_and(|j| j["state"] == "running")
                {
                    on = n.clone();
                    return true;
                }
            }
            false
        });
        on
    }

    /// The job runs as alice and its counter goes on exactly once.
    fn assert_resumed_as_alice(&self, status: &serde_json::Value) {
        assert_eq!(status["owner"], "sv-alice", "{status}");
        assert_eq!(
            service::uid_of(status["pid"].as_i64().unwrap()),
            self.alice.uid
        );
        let counter = self.dir.path().join("counter.out");
        let before = numbers(&counter).len();
        wait_numbers(&counter, before + 5, T);
        assert_exactly_once(&numbers(&counter));
    }

    fn slurm_log(&self) -> String {
        fs::read_to_string(self.dir.path().join("slurm.out")).unwrap_or_default()
    }
}

fn node_fail(node: &str, mode: &str) {
    sh(
        "bash",
        &[scripts().join("node-fail.sh").to_str().unwrap(), node, mode],
    );
}

/// Node failure, the job submitted by alice: the node dies with its
/// service and her job; Slurm reruns the batch job on the other node,
/// whose service takes the job over (a later run of its Slurm job) and
/// resumes it, as alice, from the last checkpoint the dead node published.
fn user_node_failure() {
    let mut c = UserCluster::submit(&[]);
    let n = c.running(Duration::from_secs(60));
    c.sup(&n).wait_checkpoints(USER_JOB, 2, T);
    let t = Instant::now();
    node_fail(&n, "kill");
    // The node's service and the job die with it.
    let i = c.sups.iter().position(|(x, _, _)| *x == n).unwrap();
    c.sups[i].2.kill_all();
    let last = ids(&c.sup(&n).log(), "checkpoint published").pop().unwrap();
    let o = other(&n);
    let s = c
        .sup(o)
        .wait_restores(USER_JOB, 1, Duration::from_secs(150));
    let resumed = t.elapsed();
    let log = c.sup(o).log();
    assert!(log.contains("taking over a job from another node"), "{log}");
    assert!(
        log.contains(&format!("restored checkpoint={last}")),
        "{log}"
    );
    assert_eq!(s["extra"]["slurm_restart_count"], "1", "{s}");
    c.assert_resumed_as_alice(&s);
    node_fail(&n, "revive");
    scancel(&c.id);
    c.sup(o)
        .wait_state(USER_JOB, "stopped", Duration::from_secs(60));
    eprintln!("user node failure: kill -> resumed as alice on the other node in {resumed:?}");
}

/// Only slurmd dies, the job submitted by alice: the old copy (its node's
/// service) still runs when the other node's service takes the job over;
/// the image store's lease makes the old copy stop its job and publish
/// nothing more; the store stays intact.
fn user_two_copies() {
    let c = UserCluster::submit(&[]);
    let n = c.running(Duration::from_secs(60));
    c.sup(&n).wait_checkpoints(USER_JOB, 2, T);
    let t = Instant::now();
    node_fail(&n, "slurmd");
    let o = other(&n);
    let s = c
        .sup(o)
        .wait_restores(USER_JOB, 1, Duration::from_secs(150));
    let resumed = t.elapsed();
    let old = c.sup(&n).wait_state(USER_JOB, "superseded", T);
    let published = old["checkpoints"].as_u64().unwrap();
    let log = c.sup(o).log();
    assert!(
        log.contains("took over the image store; the previous copy had stopped"),
        "{log}"
    );
    c.sup(o).wait_checkpoints(USER_JOB, 2, T);
    assert_eq!(
        c.sup(&n).checkpoints(USER_JOB),
        published,
        "the old copy published after the takeover"
    );
    // alice's client on the old node ended with her job there.
    wait_until("the old client's message", T, || {
        c.slurm_log().contains("is superseded")
    });
    let v = service::as_user(&c.alice, &c.at(o).1, c.dir.path(), &["verify", "job"]);
    assert!(v.status.success(), "store damaged: {}", service::text(&v));
    c.assert_resumed_as_alice(&s);
    node_fail(&n, "revive");
    scancel(&c.id);
    c.sup(o)
        .wait_state(USER_JOB, "stopped", Duration::from_secs(60));
    eprintln!("user two copies: slurmd killed -> new copy resumed as alice in {resumed:?}");
}

/// Preemption, the job submitted by alice: her client gets USR1 at once,
/// the job's final checkpoint is taken and the batch job requeued (as
/// her); the rerun, on whichever node, resumes it.
fn user_preemption() {
    let c = UserCluster::submit(&["--exclusive", "--signal=B:USR1@10"]);
    let n = c.running(Duration::from_secs(60));
    c.sup(&n).wait_checkpoints(USER_JOB, 1, T);
    let t = Instant::now();
    let high = preempt(&n);
    let mut on = String::new();
    wait_until(
        "alice's job resumed after preemption",
        Duration::from_secs(120),
        || {
            for (x, _, sup) in &c.sups {
                if sup
                    .try_status()
                    .as_ref()
                    .and_then(|s| find_job(s, USER_JOB))
                    .is_some_and(|j| {
                        j["restores"].as_u64().unwrap_or(0) >= 1 && j["state"] == "running"
                    })
                {
                    on = x.clone();
                    return true;
                }
            }
            false
        },
    );
    let resumed = t.elapsed();
    let s = c.sup(&on).job_status(USER_JOB);
    assert!(
        c.slurm_log().contains("asked Slurm to requeue job"),
        "{}",
        c.slurm_log()
    );
    c.assert_resumed_as_alice(&s);
    scancel(&c.id);
    let _ = Command::new("scancel").arg(&high).status();
    c.sup(&on)
        .wait_state(USER_JOB, "stopped", Duration::from_secs(60));
    eprintln!("user preemption: high job submitted -> resumed as alice on {on} in {resumed:?}");
}

#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn slurm_scenarios() {
    progs();
    let _cluster = Cluster::start();
    // SUPERVISE_SLURM_ONLY=a,b runs only those scenarios (when working on one).
    let only = std::env::var("SUPERVISE_SLURM_ONLY").ok();
    let scenarios: [(&str, fn()); 8] = [
        ("time_limit_requeue", time_limit_requeue),
        ("node_failure", node_failure),
        ("preemption", preemption),
        ("two_live_copies", two_live_copies),
        ("user_requeue", user_requeue),
        ("user_node_failure", user_node_failure),
        ("user_two_copies", user_two_copies),
        ("user_preemption", user_preemption),
    ];
    for (name, f) in scenarios {
        if only
            .as_deref()
            .is_none_or(|o| o.split(',').any(|x| x == name))
        {
            let t = Instant::now();
            f();
            eprintln!("{name}: {:?}", t.elapsed());
        }
    }
}
