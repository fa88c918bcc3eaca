//! Load: many small jobs under one supervise, all checkpointed at the same
//! interval. Not part of the test suite; prints skipped ticks, how late
//! checkpoints started against their tick (p50/p99), and supervise's RSS and
//! thread count.
//!
//! ```text
//! cargo build --release && cargo run --release --example load -- \
//!     [--jobs 100] [--every 5] [--minutes 10] [--max-concurrent-dumps N]
//! ```
//! Needs root and CRIU. It runs `target/release/supervise` (or
//! `$SUPERVISE_BIN`) on N copies of the demo counter (`examples/counter.c`,
//! one line a second), each its own job file with `every = "<every>s"`,
//! `keep = 2`. `--max-concurrent-dumps` is passed to `supervise run` (0: no
//! limit; default: supervise's own, the number of CPUs). supervise's
//! environment is passed on, so `MALLOC_ARENA_MAX=16` reproduces glibc's
//! default arena count on 2 CPUs.

mod common;
use std::fs;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Args {
    jobs: usize,
    every: u64,
    minutes: f64,
    slots: Option<usize>,
}

fn args() -> Args {
    let mut a = Args {
        jobs: 100,
        every: 5,
        minutes: 10.0,
        slots: None,
    };
    let v: Vec<String> = std::env::args().skip(1).collect();
    for w in v.chunks(2) {
        let x = w.get(1).map(String::as_str).unwrap_or("");
        match w[0].as_str() {
            "--jobs" => a.jobs = num(&w[0], x),
            "--every" => a.every = num(&w[0], x),
            "--minutes" => a.minutes = num(&w[0], x),
            "--max-concurrent-dumps" => a.slots = Some(num(&w[0], x)),
            o => panic!("unknown argument {o}"),
        }
    }
    a
}

fn num<T: std::str::FromStr>(flag: &str, x: &str) -> T {
    x.parse()
        .unwrap_or_else(|_| panic!("{flag} needs a number, found {x:?}"))
}

/// The number after `key=` on a log line.
fn field(line: &str, key: &str) -> Option<f64> {
    line.split(&format!(" {key}="))
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn main() {
    let a = args();
    let bin = common::supervise_bin();
    let tmp = common::workdir_with_counter("supervise-load-");
    let dir = tmp.path();
    let jobs = dir.join("jobs");
    fs::create_dir(&jobs).unwrap();
    for i in 0..a.jobs {
        fs::write(
            jobs.join(format!("job-{i:03}.toml")),
            format!(
                "command = [\"{}\", \"1000\"]\nstdout = \"job-{i:03}.out\"\n\
                 [checkpoint]\nevery = \"{}s\"\nkeep = 2\n[restore]\nbackoff = \"0s\"\n",
                dir.join("counter").display(),
                a.every
            ),
        )
        .unwrap();
    }
    let log_path = dir.join("supervise.log");
    let mut cmd = Command::new(&bin);
    cmd.arg("run");
    if let Some(n) = a.slots {
        cmd.arg("--max-concurrent-dumps").arg(n.to_string());
    }
    let mut sup = cmd
        .arg(&jobs)
        .env("SUPERVISE_SOCKET", dir.join("s.sock"))
        .env("SUPERVISE_LOG", "info")
        .stdin(Stdio::null())
        .stdout(fs::File::create(dir.join("supervise.out")).unwrap())
        .stderr(fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let pid = sup.id() as i32;
    println!(
        "load: {} jobs every {} s for {} min, max concurrent dumps {}, dir {}",
        a.jobs,
        a.every,
        a.minutes,
        a.slots
            .map_or("(supervise's default)".to_string(), |n| n.to_string()),
        dir.display()
    );
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(a.minutes * 60.0);
    // (seconds, RSS kB, threads), every 5 s.
    let mut samples: Vec<(f64, u64, u64)> = Vec::new();
    while Instant::now() < end {
        std::thread::sleep(Duration::from_secs(5).min(end - Instant::now()));
        samples.push((
            t0.elapsed().as_secs_f64(),
            common::proc_status(pid, "VmRSS:"),
            common::proc_status(pid, "Threads:"),
        ));
    }
    let secs = t0.elapsed().as_secs_f64();
    // SIGTERM: every job takes its final checkpoint and is stopped.
    // SAFETY: kill(2) on the supervise this example started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let code = sup.wait().unwrap();
    let text = fs::read_to_string(&log_path).unwrap_or_default();
    let published: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("checkpoint published"))
        .collect();
    let mut late: Vec<f64> = published
        .iter()
        .filter_map(|l| field(l, "late_ms"))
        .collect();
    late.sort_by(f64::total_cmp);
    // Scheduled ones only (the final checkpoints at SIGTERM all queue).
    let mut wait: Vec<f64> = published
        .iter()
        .filter(|l| field(l, "late_ms").is_some())
        .filter_map(|l| field(l, "slot_wait_ms"))
        .collect();
    wait.sort_by(f64::total_cmp);
    let mut frozen: Vec<f64> = published
        .iter()
        .filter_map(|l| field(l, "frozen_ms"))
        .collect();
    frozen.sort_by(f64::total_cmp);
    let failed = text.matches("checkpoint failed").count();
    let skipped: u64 = text
        .lines()
        .filter(|l| l.contains("were skipped"))
        .filter_map(|l| field(l, "skipped"))
        .map(|n| n as u64)
        .sum();
    let ticks = a.jobs as f64 * secs / a.every as f64;
    // After the first minute (all jobs started, first dumps done).
    let steady: Vec<&(f64, u64, u64)> = samples.iter().filter(|s| s.0 >= 60.0).collect();
    let steady = if steady.is_empty() {
        samples.iter().collect()
    } else {
        steady
    };
    let rss_max = steady.iter().map(|s| s.1).max().unwrap_or(0);
    let rss_last = samples.last().map_or(0, |s| s.1);
    let thr_max = samples.iter().map(|s| s.2).max().unwrap_or(0);
    let thr_last = samples.last().map_or(0, |s| s.2);
    println!("ran {secs:.0} s; supervise exit {code}");
    println!(
        "checkpoints published {} ({} of them the final ones at SIGTERM), failed {failed}; \
         ~{ticks:.0} ticks in the run",
        published.len(),
        a.jobs
    );
    println!("skipped ticks: {skipped}");
    println!(
        "lateness of scheduled checkpoints (start - tick), ms: p50 {:.0}, p99 {:.0}, max {:.0}",
        percentile(&late, 0.5),
        percentile(&late, 0.99),
        late.last().copied().unwrap_or(f64::NAN)
    );
    println!(
        "waiting for a dump slot, ms: p50 {:.0}, p99 {:.0}; frozen ms: p50 {:.1}, p99 {:.1}",
        percentile(&wait, 0.5),
        percentile(&wait, 0.99),
        percentile(&frozen, 0.5),
        percentile(&frozen, 0.99)
    );
    println!(
        "supervise RSS: max {:.1} MiB after the first minute, last {:.1} MiB; threads: max {thr_max}, last {thr_last}",
        rss_max as f64 / 1024.0,
        rss_last as f64 / 1024.0
    );
    let budget = 64.0 + 0.5 * a.jobs as f64;
    println!(
        "RSS budget 64 MiB + 0.5 MiB/job = {budget:.0} MiB: {}",
        if (rss_max as f64 / 1024.0) <= budget {
            "met"
        } else {
            "NOT met"
        }
    );
}
