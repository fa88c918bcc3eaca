//! Soak: a job checkpointed every second for a long time while it is
//! SIGKILLed at random intervals. Not part of the test suite; prints a
//! report (and fails with exit 1 if an invariant broke).
//!
//! ```text
//! cargo build --release && cargo run --release --example soak -- [--minutes 10] [--kill-min 2] [--kill-max 8]
//! ```
//! Needs root and CRIU. It runs `target/release/supervise` (or
//! `$SUPERVISE_BIN`) on the demo counter (compiled with `cc`) and checks:
//! * every kill is followed by a restore, and the counter's output file
//!   reads 0, 1, 2, ... exactly once at the end (state continued, files
//!   rolled back);
//! * checkpoints never overlap (each publish starts after the previous one
//!   ended) and none is missed: every schedule tick is published, failed,
//!   or logged as skipped (during a restore);
//! * supervise's RSS and open fd count stay flat (sampled every 5 s).

mod common;
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

struct Args {
    minutes: f64,
    kill_min: f64,
    kill_max: f64,
}

fn args() -> Args {
    let mut a = Args {
        minutes: 10.0,
        kill_min: 2.0,
        kill_max: 8.0,
    };
    let v: Vec<String> = std::env::args().skip(1).collect();
    for w in v.chunks(2) {
        let x: f64 = w.get(1).and_then(|s| s.parse().ok()).expect("a number");
        match w[0].as_str() {
            "--minutes" => a.minutes = x,
            "--kill-min" => a.kill_min = x,
            "--kill-max" => a.kill_max = x,
            o => panic!("unknown argument {o}"),
        }
    }
    a
}

/// xorshift, seeded from the clock (printed, so a run can be replayed).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn fd_count(pid: i32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn job_pid(state: &Path) -> Option<i32> {
    let v: serde_json::Value =
        serde_json::from_slice(&fs::read(state.join("job.json")).ok()?).ok()?;
    v["host_pid"].as_i64().map(|p| p as i32)
}

fn count(log: &str, needle: &str) -> usize {
    log.matches(needle).count()
}

/// (start, end) of each published checkpoint, from the log's timestamp and
/// duration_ms.
fn checkpoint_spans(log: &str) -> Vec<(f64, f64)> {
    log.lines()
        .filter(|l| l.contains("checkpoint published"))
        .filter_map(|l| {
            let ts = chrono::DateTime::parse_from_rfc3339(l.split_whitespace().next()?).ok()?;
            let end = ts.timestamp_micros() as f64 / 1e6;
            let ms: f64 = l
                .split("duration_ms=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            Some((end - ms / 1000.0, end))
        })
        .collect()
}

fn main() {
    let a = args();
    let bin = common::supervise_bin();
    let tmp = common::workdir_with_counter("supervise-soak-");
    let dir = tmp.path();
    fs::write(
        dir.join("soak.toml"),
        format!(
            "command = [\"{}\", \"50\"]\nstdout = \"counter.out\"\n[checkpoint]\nevery = \"1s\"\nkeep = 3\n[restore]\nbackoff = \"0s\"\nmax_restores = 10000\n",
            dir.join("counter").display()
        ),
    )
    .unwrap();
    let log_path = dir.join("supervise.log");
    let mut sup = Command::new(&bin)
        .arg("run")
        .arg(dir.join("soak.toml"))
        .env("SUPERVISE_SOCKET", dir.join("s.sock"))
        .env("SUPERVISE_LOG", "info")
        .stdin(Stdio::null())
        .stdout(fs::File::create(&log_path).unwrap())
        .stderr(fs::File::create(dir.join("supervise.err")).unwrap())
        .spawn()
        .unwrap();
    let sup_pid = sup.id() as i32;
    let state = dir.join(".supervise/soak");
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    let mut rng = Rng(seed);
    println!(
        "soak: {} min, kills every {}..{} s, seed {seed}, dir {}",
        a.minutes,
        a.kill_min,
        a.kill_max,
        dir.display()
    );
    let log = || {
        fs::read_to_string(&log_path).unwrap_or_default()
            + &fs::read_to_string(dir.join("supervise.err")).unwrap_or_default()
    };
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(a.minutes * 60.0);
    let mut samples: Vec<(f64, u64, usize)> = Vec::new();
    let mut next_sample = t0 + Duration::from_secs(5);
    let mut next_kill =
        t0 + Duration::from_secs_f64(a.kill_min + rng.next() * (a.kill_max - a.kill_min));
    let mut kills = 0usize;
    while Instant::now() < end {
        let now = Instant::now();
        if now >= next_sample {
            samples.push((
                t0.elapsed().as_secs_f64(),
                common::proc_status(sup_pid, "VmRSS:"),
                fd_count(sup_pid),
            ));
            next_sample += Duration::from_secs(5);
        }
        if now >= next_kill {
            // Only when the previous kill was restored.
            if count(&log(), "restored") >= kills {
                if let Some(p) = job_pid(&state) {
                    // SAFETY: kill(2) on the job's root, which this soak started through supervise.
                    unsafe { libc::kill(p, libc::SIGKILL) };
                    kills += 1;
                }
            }
            next_kill =
                now + Duration::from_secs_f64(a.kill_min + rng.next() * (a.kill_max - a.kill_min));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Let the last restore finish, then stop supervise (final checkpoint).
    let settle = Instant::now();
    while count(&log(), "restored") < kills && settle.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: SIGTERM to the supervise this soak started.
    unsafe { libc::kill(sup_pid, libc::SIGTERM) };
    let code = sup.wait().unwrap();
    let text = log();
    let nums: Vec<i64> = fs::read_to_string(dir.join("counter.out"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect();
    let exactly_once = nums.iter().enumerate().all(|(i, n)| *n == i as i64);
    let restored = count(&text, "restored");
    let published = count(&text, "checkpoint published");
    let failed = count(&text, "checkpoint failed");
    let skipped: usize = text
        .lines()
        .filter(|l| l.contains("were skipped"))
        .filter_map(|l| {
            l.split("skipped=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<usize>()
                .ok()
        })
        .sum();
    let spans = checkpoint_spans(&text);
    let overlaps = spans.windows(2).filter(|w| w[1].0 < w[0].1 - 0.002).count();
    // A tick is missed if two publishes are further apart than three ticks
    // plus a restore: one tick may legitimately fail (the job was killed
    // during that dump), and after a restore the first tick is the job's
    // next grid point at least one interval away (1-2 ticks).
    let gaps: Vec<f64> = spans.windows(2).map(|w| w[1].1 - w[0].1).collect();
    let max_gap = gaps.iter().cloned().fold(0.0, f64::max);
    let missed = gaps.iter().filter(|g| **g > 3.5).count();
    let reasons: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("checkpoint failed"))
        .filter_map(|l| l.split("error=").nth(1))
        .collect();
    let secs = t0.elapsed().as_secs_f64();
    let (rss0, fd0) = samples.first().map(|s| (s.1, s.2)).unwrap_or((0, 0));
    let (rss1, fd1) = samples.last().map(|s| (s.1, s.2)).unwrap_or((0, 0));
    let rss_max = samples.iter().map(|s| s.1).max().unwrap_or(0);
    let fd_max = samples.iter().map(|s| s.2).max().unwrap_or(0);
    println!("ran {secs:.0} s; supervise exit {code}");
    println!("kills {kills}, restores {restored}");
    println!("checkpoints published {published}, failed {failed}, ticks skipped (during restores) {skipped}; ticks accounted {} of ~{:.0}", published + failed + skipped, secs);
    println!("overlapping checkpoints: {overlaps}; max gap between publishes {max_gap:.2} s; gaps > 3.5 s (missed ticks): {missed}");
    for r in reasons.iter().take(5) {
        println!(
            "  failed checkpoint: {}",
            r.chars().take(160).collect::<String>()
        );
    }
    println!("counter lines {}, exactly once: {exactly_once}", nums.len());
    println!("supervise RSS kB: first {rss0}, last {rss1}, max {rss_max}; open fds: first {fd0}, last {fd1}, max {fd_max}");
    let ok = exactly_once
        && restored >= kills
        && overlaps == 0
        && missed == 0
        && fd1 <= fd0 + 2
        && rss1 <= rss0 + rss0 / 2 + 2048;
    println!("{}", if ok { "SOAK PASSED" } else { "SOAK FAILED" });
    if !ok {
        println!("log kept in {}", dir.display());
        std::mem::forget(tmp);
        std::process::exit(1);
    }
}
