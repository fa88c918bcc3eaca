//! What recording the job's own files costs in freeze time.
//!
//! Starts a job (a small C program, compiled here with `cc`) that keeps
//! `--files` output files open write-only and appends to them, and rewrites
//! random 64-byte records of a `--state-bytes` state file (random bytes,
//! incompressible) opened read-write,
//! every 10 ms. Then takes `--rounds` pairs of checkpoints through
//! supervise's CRIU engine on the same job, one with the job's files
//! recorded at CRIU's post-dump notification (as `supervise run` does) and
//! one without, alternating the order, and prints CRIU's frozen time for
//! both, their ratio, and the frozen time recording adds per GiB of
//! read-write job files (target <= 0.25 s/GiB, issue 25). Then takes
//! `--stored` checkpoints one second apart into a deduplicating store
//! (plain: no encryption, no parity) and prints, for each after the first,
//! the bytes of the job's files that changed (the state file's blob
//! compared with the previous one, byte by byte) and the new bytes the
//! store kept (target <= 1.5 x changed + 1 MiB; the job's own memory
//! changes are in it too).
//!
//! ```text
//! cargo run --release --example files_bench -- [--files 8] [--state-bytes 1048576] [--rounds 10] [--stored 4]
//! ```
//! Needs root and CRIU (scripts/setup.sh). Not a test: it prints figures.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use supervise::config::{CriuOptions, FilesConfig, LaunchSpec};
use supervise::files::{self, CaptureSummary};
use supervise::job::{self, InitFiles};
use supervise::reaper::Reaper;

const JOB_C: &str = r#"
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
int main(int argc, char **argv) {
	int n = atoi(argv[1]);
	long bytes = atol(argv[2]);
	FILE *out[256];
	char name[64];
	for (int i = 0; i < n && i < 256; i++) {
		snprintf(name, sizeof name, "out-%d.txt", i);
		out[i] = fopen(name, "w");
	}
	int st = open("state.bin", O_RDWR | O_CREAT | O_TRUNC, 0644);
	char rec[64] = {0};
	/* Incompressible, like real state: random bytes. */
	for (long off = 0; off < bytes; off += sizeof rec) {
		for (int k = 0; k < (int)sizeof rec; k++)
			rec[k] = (char)random();
		pwrite(st, rec, sizeof rec, off);
	}
	for (long step = 0;; step++) {
		for (int i = 0; i < n && i < 256; i++) {
			fprintf(out[i], "step %ld\n", step);
			fflush(out[i]);
		}
		snprintf(rec, sizeof rec, "record of step %ld", step);
		if (bytes >= (long)sizeof rec)
			pwrite(st, rec, sizeof rec, (random() % (bytes / sizeof rec)) * sizeof rec);
		usleep(10000);
	}
}
"#;

struct Args {
    files: u32,
    state_bytes: u64,
    rounds: u32,
    stored: u32,
}

fn args() -> Args {
    let mut a = Args {
        files: 8,
        state_bytes: 1 << 20,
        rounds: 10,
        stored: 4,
    };
    let v: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < v.len() {
        let val = v.get(i + 1).cloned().unwrap_or_default();
        match v[i].as_str() {
            "--files" => a.files = val.parse().expect("--files N"),
            "--state-bytes" => a.state_bytes = val.parse().expect("--state-bytes N"),
            "--rounds" => a.rounds = val.parse().expect("--rounds N"),
            "--stored" => a.stored = val.parse().expect("--stored N"),
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    a
}

fn stats(v: &mut [f64]) -> (f64, f64, f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    (v[v.len() / 2], mean, v[0], v[v.len() - 1])
}

fn dump_once(
    reaper: &Reaper,
    host_pid: i32,
    dir: &Path,
    record: bool,
    cfg: &FilesConfig,
) -> (f64, Option<CaptureSummary>) {
    std::fs::create_dir(dir).unwrap();
    let mut captured = None;
    let ignore = [dir.to_path_buf()];
    let mut cb = |script: &str| {
        if record && script == "post-dump" {
            let pids = supervise::proc::tree(host_pid);
            let r = files::capture(&pids, cfg, &ignore, dir).expect("capture");
            captured = Some(r);
        }
        true
    };
    let out = supervise::criu::dump(
        reaper,
        host_pid,
        dir,
        &CriuOptions::default(),
        None,
        &mut cb,
    )
    .expect("dump");
    let frozen = out
        .stats
        .and_then(|s| s.frozen_time)
        .expect("stats-dump frozen_time") as f64
        / 1000.0;
    // As supervise does once the job runs again: the deferred copies.
    if let Some(c) = &captured {
        files::finish_copies(c, dir, cfg.shadow_dir.as_deref()).expect("deferred copies");
    }
    std::fs::remove_dir_all(dir).unwrap();
    (frozen, captured)
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("__init") {
        supervise::init::main();
    }
    let a = args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(a));
}

async fn run(a: Args) {
    let reaper = Reaper::install().expect("subreaper");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    std::fs::write(dir.join("job.c"), JOB_C).unwrap();
    let st = Command::new("cc")
        .args(["-O2", "-o"])
        .arg(dir.join("job"))
        .arg(dir.join("job.c"))
        .status()
        .unwrap();
    assert!(st.success(), "cc failed");
    let spec = LaunchSpec {
        command: vec![
            dir.join("job").to_string_lossy().into_owned(),
            a.files.to_string(),
            a.state_bytes.to_string(),
        ],
        cwd: dir.clone(),
        env: Default::default(),
        stdout: dir.join("stdout.log"),
        stderr: dir.join("stderr.log"),
        private_tmp: false,
    };
    let init_files = InitFiles {
        status_file: dir.join("exit-status"),
        owner: None,
        private_tmp: None,
        watch: None,
    };
    let r2 = reaper.clone();
    let mut running = tokio::task::spawn_blocking(move || job::launch(&r2, &spec, &init_files))
        .await
        .unwrap()
        .expect("launch");
    // Let it open and fill its files.
    let state = dir.join("state.bin");
    let t0 = Instant::now();
    while std::fs::metadata(&state).map(|m| m.len()).unwrap_or(0) < a.state_bytes
        && t0.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // As `supervise run` does: shadow copies in a directory of root's, so
    // that a checkpoint rewrites only what changed while the job is frozen.
    let shadow = dir.join("shadow");
    std::fs::create_dir(&shadow).unwrap();
    let cfg = FilesConfig {
        shadow_dir: Some(shadow),
        ..FilesConfig::default()
    };
    let mut off = Vec::new();
    let mut on = Vec::new();
    let mut capture_ms = Vec::new();
    let mut summary = None;
    let host_pid = running.host_pid;
    for round in 0..a.rounds {
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for record in order {
            let d: PathBuf = dir.join(format!("img-{round}-{record}"));
            let (r, c) = (reaper.clone(), cfg.clone());
            let (frozen, cap) =
                tokio::task::spawn_blocking(move || dump_once(&r, host_pid, &d, record, &c))
                    .await
                    .unwrap();
            if record {
                on.push(frozen);
                let cap = cap.expect("post-dump notification");
                capture_ms.push(cap.elapsed.as_secs_f64() * 1000.0);
                summary = Some(cap);
            } else {
                off.push(frozen);
            }
        }
    }
    let stored = {
        let (r, c, d, n) = (reaper.clone(), cfg.clone(), dir.clone(), a.stored);
        tokio::task::spawn_blocking(move || stored_rounds(&r, host_pid, &d, &c, n))
            .await
            .unwrap()
    };
    running.kill();
    running.wait().await;

    let s = summary.unwrap();
    println!(
        "job: {} output files (size only) + one {} byte state file rewritten in place (copied); {} rounds",
        a.files, a.state_bytes, a.rounds
    );
    println!(
        "recorded per checkpoint: {} files, {} copied, {} bytes copied ({} rewritten in the shadow copy while frozen)",
        s.files, s.snapshots, s.bytes_copied, s.bytes_changed
    );
    println!(
        "{:<28} {:>9} {:>9} {:>9} {:>9}",
        "CRIU frozen time (ms)", "median", "mean", "min", "max"
    );
    let (m_off, mean_off, min_off, max_off) = stats(&mut off);
    let (m_on, mean_on, min_on, max_on) = stats(&mut on);
    let (m_cap, mean_cap, min_cap, max_cap) = stats(&mut capture_ms);
    println!(
        "{:<28} {m_off:>9.2} {mean_off:>9.2} {min_off:>9.2} {max_off:>9.2}",
        "files not recorded"
    );
    println!(
        "{:<28} {m_on:>9.2} {mean_on:>9.2} {min_on:>9.2} {max_on:>9.2}",
        "files recorded"
    );
    println!(
        "{:<28} {m_cap:>9.2} {mean_cap:>9.2} {min_cap:>9.2} {max_cap:>9.2}",
        "  of which recording"
    );
    println!(
        "ratio frozen time recorded / not recorded (median): {:.3}",
        m_on / m_off
    );
    let gib = s.bytes_copied as f64 / (1u64 << 30) as f64;
    if gib > 0.0 {
        println!(
            "frozen time added per GiB of read-write job files (median): {:.3} s/GiB (target <= 0.25)",
            (m_on - m_off) / 1000.0 / gib
        );
    }
    println!(
        "{:<12} {:>14} {:>14} {:>14}",
        "checkpoint", "changed KiB", "stored KiB", "target KiB"
    );
    for (i, (changed, new)) in stored.iter().enumerate() {
        let target = 1.5 * *changed as f64 + (1 << 20) as f64;
        println!(
            "{:<12} {:>14.1} {:>14.1} {:>14.1} {}",
            i + 2,
            *changed as f64 / 1024.0,
            *new as f64 / 1024.0,
            target / 1024.0,
            if (*new as f64) <= target {
                "met"
            } else {
                "MISSED"
            }
        );
    }
}

/// `n` checkpoints one second apart into a plain store in `dir/store`:
/// for each after the first, (bytes of the state file that changed since
/// the one before, new bytes the store kept).
fn stored_rounds(
    reaper: &Reaper,
    host_pid: i32,
    dir: &Path,
    cfg: &FilesConfig,
    n: u32,
) -> Vec<(u64, u64)> {
    let store = supervise::store::ImageStore::open(&dir.join("store")).unwrap();
    let mut prev: Option<Vec<u8>> = None;
    let mut out = Vec::new();
    for i in 0..n {
        std::thread::sleep(Duration::from_secs(1));
        let staging = store.begin().unwrap();
        let sdir = staging.path().to_path_buf();
        let mut cap = None;
        let ignore = [sdir.clone()];
        let mut cb = |script: &str| {
            if script == "post-dump" {
                let pids = supervise::proc::tree(host_pid);
                cap = Some(files::capture(&pids, cfg, &ignore, &sdir).expect("capture"));
            }
            true
        };
        let o = supervise::criu::dump(
            reaper,
            host_pid,
            &sdir,
            &CriuOptions::default(),
            None,
            &mut cb,
        )
        .expect("dump");
        files::finish_copies(
            cap.as_ref().expect("post-dump"),
            &sdir,
            cfg.shadow_dir.as_deref(),
        )
        .expect("deferred copies");
        let state: files::FileState =
            serde_json::from_slice(&std::fs::read(sdir.join(files::STATE_FILE)).unwrap()).unwrap();
        let blob = state
            .files
            .iter()
            .find(|r| r.path.ends_with("state.bin"))
            .and_then(|r| r.blob.clone())
            .expect("the state file is copied");
        let now = std::fs::read(sdir.join(blob)).unwrap();
        let changed = prev.as_ref().map(|p| {
            let common = p.len().min(now.len());
            let differ = (0..common).filter(|&k| p[k] != now[k]).count();
            (differ + now.len().abs_diff(p.len())) as u64
        });
        let info = staging
            .commit(supervise::store::CheckpointMeta {
                job: "files_bench".into(),
                criu_version: String::new(),
                duration_ms: o.duration.as_millis() as u64,
                frozen_us: None,
                pages_written: None,
                root_pid: 0,
                extra: Default::default(),
            })
            .unwrap();
        if let Some(c) = changed {
            out.push((c, info.new_bytes));
        }
        eprintln!("stored checkpoint {} done", i + 1);
        prev = Some(now);
    }
    out
}
