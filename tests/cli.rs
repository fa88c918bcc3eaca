//! Command-line behaviour: preflight, bad job files, image listing, and the
//! schedule against a checkpoint slower than its interval.

mod common;

use std::process::Command;

use common::*;

#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn check_reports_criu_and_exits_zero_here() {
    let out = Command::new(BIN).arg("check").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("[ok  ] criu: version 4."), "{text}");
    assert!(text.contains("dirty-memory tracking"), "{text}");
    assert!(text.contains("checkpointing can work"), "{text}");
}

#[test]
fn check_fails_with_a_fix_when_criu_is_missing() {
    let out = Command::new(BIN)
        .arg("check")
        .env("SUPERVISE_CRIU", "/nonexistent/criu")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        text.contains("[FAIL] criu: /nonexistent/criu not found"),
        "{text}"
    );
    assert!(text.contains("fix: run scripts/setup.sh"), "{text}");
    // `run` refuses with the same report, starting nothing.
    let env = Env::new();
    let job = env.job("x", "command = [\"/bin/true\"]\n");
    let out = Command::new(BIN)
        .arg("run")
        .arg(&job)
        .env("SUPERVISE_CRIU", "/nonexistent/criu")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("refusing to run") && err.contains("not found"),
        "{err}"
    );
    assert!(!env.path().join(".supervise").exists(), "nothing started");
}

#[test]
fn bad_job_files_name_file_line_column_and_key() {
    let env = Env::new();
    let cases = [
        (
            "unknown",
            "command = [\"/bin/true\"]\n[checkpoint]\nevry = \"30s\"\n",
            ":3:1: checkpoint.evry: unknown key",
        ),
        (
            "duration",
            "command = [\"/bin/true\"]\n[checkpoint]\nevery = \"30 parsecs\"\n",
            ":3:9: checkpoint.every: invalid duration",
        ),
        (
            "cron",
            "command = [\"/bin/true\"]\n[checkpoint]\ncron = \"*/5 * *\"\n",
            ":3:8: checkpoint.cron: invalid cron expression",
        ),
        (
            "type",
            "command = \"/bin/true\"\n",
            ":1:11: command: expected an array of strings",
        ),
        (
            "restore",
            "command = [\"/bin/true\"]\n\n[restore]\non = \"sometimes\"\n",
            ":4:6: restore.on:",
        ),
        ("syntax", "command = [\"/bin/true\"\n", ":"),
    ];
    for (name, text, want) in cases {
        let job = env.job(name, text);
        let out = Command::new(BIN).arg("run").arg(&job).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {err}");
        let expect = format!("{}{want}", job.display());
        assert!(
            err.contains(&expect),
            "{name}: expected {expect:?} in {err:?}"
        );
    }
    let out = Command::new(BIN)
        .args(["run", "/nonexistent/job.toml"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/job.toml: cannot read"), "{err}");
    assert!(!env.path().join(".supervise").exists(), "nothing started");
}

/// `supervise images --json`: newest first, RFC 3339 times, sizes on disk.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn images_lists_newest_first_with_sizes() {
    let env = Env::new();
    let job = JobFile::counter("img").keep(2).write(&env);
    let sup = env.start(&job);
    sup.wait_checkpoints("img", 3, T);
    drop(sup);
    let imgs = images(&job);
    assert_eq!(imgs.len(), 2, "keep = 2: {imgs:?}");
    assert!(imgs[0]["id"].as_str() > imgs[1]["id"].as_str());
    for i in &imgs {
        let created = i["created"].as_str().unwrap();
        assert!(
            chrono::DateTime::parse_from_rfc3339(created).is_ok(),
            "{created}"
        );
        let logical = i["logical_bytes"].as_u64().unwrap();
        assert_eq!(i["size_bytes"].as_u64().unwrap(), logical);
        assert!(logical > 0 && i["new_bytes"].as_u64().unwrap() > 0, "{i}");
        assert_eq!(i["verified"], serde_json::Value::Bool(true), "{i}");
        assert!(i["frozen_us"].as_u64().is_some(), "{i}");
    }
    // Later images store much less than their logical size.
    assert!(imgs[0]["new_bytes"].as_u64() < imgs[0]["logical_bytes"].as_u64());
    let text = Command::new(BIN).arg("images").arg(&job).output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.starts_with("ID"), "{text}");
    assert!(
        text.contains("LOGICAL") && text.contains("NEW") && text.contains("VERIFIED"),
        "{text}"
    );
    assert_eq!(text.matches(" yes").count(), 2, "{text}");
    assert_eq!(text.lines().count(), 3, "{text}");
}

/// A checkpoint slower than the interval: no overlap, ticks that came due
/// before the checkpoint for an earlier one started are skipped and logged
/// (the newest missed tick is served at once, older ones are never queued),
/// and the schedule keeps firing.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn schedule_never_overlaps_a_slow_checkpoint() {
    let env = Env::new();
    // 256 MiB of dirty memory: dump + hash + fsync take about a second here.
    let job = JobFile::program("slow", &[&prog("bigmem"), "256"])
        .keep(10)
        .write(&env);
    let sup = env.start(&job);
    sup.wait_checkpoints("slow", 4, std::time::Duration::from_secs(120));
    let log = sup.log();
    drop(sup);
    let mut imgs = images(&job);
    imgs.reverse();
    assert!(imgs.len() >= 4);
    let mut prev: Option<(chrono::DateTime<chrono::FixedOffset>, i64)> = None;
    let mut late = 0;
    for i in &imgs {
        let start =
            chrono::DateTime::parse_from_rfc3339(i["created_precise"].as_str().unwrap()).unwrap();
        let dur = i["duration_ms"].as_i64().unwrap();
        if let Some((p, pdur)) = prev {
            let gap = (start - p).num_milliseconds();
            assert!(
                gap >= pdur,
                "checkpoint began {gap} ms after the previous one, which took {pdur} ms"
            );
            // More than two intervals between starts: at least one tick
            // came and went while the next checkpoint waited.
            if gap > 2200 {
                late += 1;
            }
        }
        prev = Some((start, dur));
    }
    if late > 0 {
        assert!(
            log.contains("were skipped"),
            "a late tick must be logged as skipped: {log}"
        );
    }
    let skipped_lines = log.matches("were skipped").count();
    assert!(
        skipped_lines <= late + 1,
        "skips are logged once per step: {log}"
    );
}
