//! The deduplicating image store against real CRIU and real processes:
//! incremental cost, retention, damage detection, and crashes of supervise
//! in the middle of a checkpoint, retention or gc.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

const LONG: Duration = Duration::from_secs(90);

/// A job holding `mb` MiB of incompressible memory that rewrites `pages`
/// random pages every 100 ms and prints a counter.
fn dirty_job(env: &Env, name: &str, mb: u32, pages: u32, keep: u32) -> PathBuf {
    let (mb, pages) = (mb.to_string(), pages.to_string());
    JobFile::program(name, &[&prog("dirty"), &mb, &pages, "100"])
        .dir(&format!("images-{name}"))
        .keep(keep)
        .write(env)
}

/// `new_bytes=` of every "checkpoint published" line, in order.
fn new_bytes(log: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains("checkpoint published"))
        .map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("new_bytes="))
                .expect("new_bytes in the publish line")
                .parse()
                .unwrap()
        })
        .collect()
}

/// A 24 MiB job checkpointed several times: later checkpoints store a small
/// fraction of the first; once retention removed the older ones (and gc
/// their data), the newest still restores and the job continues.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn later_checkpoints_are_small_and_newest_restores_after_retention() {
    let env = Env::new();
    let job = dirty_job(&env, "dedup", 24, 4, 2);
    let sup = env.start(&job);
    sup.wait_checkpoints("dedup", 5, LONG);
    let log = sup.log();
    // The dump mode agrees with CRIU's own feature check.
    let tracked = Command::new("criu")
        .args(["check", "--feature", "mem_dirty_track"])
        .output()
        .unwrap()
        .status
        .success();
    let want = if tracked {
        "dump_mode=\"pre-dump\""
    } else {
        "dump_mode=\"full\""
    };
    assert!(log.contains(want), "{log}");
    let sizes = new_bytes(&log);
    let first = sizes[0];
    assert!(
        first > 24 << 20,
        "the first checkpoint stores the job: {sizes:?}"
    );
    for later in &sizes[1..] {
        assert!(
            later * 20 < first,
            "a later checkpoint stored {later} bytes, the first {first}: {sizes:?}"
        );
    }
    assert!(log.contains("retention removed old images"), "{log}");
    let imgs = images(&job);
    assert_eq!(imgs.len(), 2, "{imgs:?}");
    for i in &imgs {
        assert_eq!(i["verified"], serde_json::Value::Bool(true), "{i}");
        assert!(i["logical_bytes"].as_u64().unwrap() > 24 << 20, "{i}");
    }
    let (code, out) = run_cli(&["verify"], &job);
    assert_eq!(code, 0, "{out}");
    // Only packs some retained image needs are left: about one job's worth.
    let packs = dir_bytes(&env.path().join("images-dedup/packs"));
    assert!(packs < 40 << 20, "packs hold {packs} bytes");

    let newest = imgs[0]["id"].as_str().unwrap().to_string();
    sup.kill_job("dedup");
    sup.wait_restores("dedup", 1, T);
    let log = sup.log();
    let restored = restored_id(&log);
    // The newest at the time of `images`, or one taken since.
    assert!(
        restored >= newest,
        "restored {restored}, newest was {newest}: {log}"
    );
    assert!(log.contains("materialise_ms="), "{log}");
    let out = env.path().join("dedup.out");
    let n = env.numbers("dedup.out").len();
    wait_numbers(&out, n + 5, T);
    // Restored, not restarted: with the output file rolled back to the
    // image, it reads 0, 1, 2, ... exactly once.
    assert_exactly_once(&env.numbers("dedup.out"));
}

/// The id in the first "restored checkpoint=..." line.
fn restored_id(log: &str) -> String {
    log.lines()
        .find(|l| l.contains("restored checkpoint="))
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("checkpoint="))
        })
        .expect("a restore line")
        .to_string()
}

fn dir_bytes(p: &Path) -> u64 {
    fs::read_dir(p)
        .unwrap()
        .flatten()
        .map(|e| e.metadata().unwrap().len())
        .sum()
}

/// A flipped byte in stored data: `supervise verify` exits non-zero naming
/// the image and the piece, `images` marks it, and a restore uses the
/// previous image.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn flipped_byte_is_reported_by_verify_and_previous_image_is_used() {
    let env = Env::new();
    let job = dirty_job(&env, "flip", 8, 2, 3);
    let mut sup = env.start(&job);
    sup.wait_checkpoints("flip", 2, LONG);
    sup.signal(libc::SIGTERM);
    assert_eq!(sup.wait_exit(T), 0, "{}", sup.log());
    drop(sup);
    let imgs = images(&job);
    let newest = imgs[0]["id"].as_str().unwrap().to_string();
    let previous = imgs[1]["id"].as_str().unwrap().to_string();
    let pack = newest_pack(&imgs[0]);
    let mut bytes = fs::read(&pack).unwrap();
    let at = bytes.len() - 10;
    bytes[at] ^= 0x20;
    fs::write(&pack, bytes).unwrap();
    // Beyond repair: without its parity sidecar (with it, the byte is
    // rebuilt on read: tests/protect.rs).
    fs::remove_file(pack.with_extension("pack.par")).unwrap();

    let (code, out) = run_cli(&["verify"], &job);
    assert_eq!(code, 1, "{out}");
    let pack_name = pack.file_stem().unwrap().to_string_lossy().to_string();
    assert!(
        out.lines()
            .any(|l| l.starts_with("DAMAGED") && l.contains(&newest) && l.contains(&pack_name)),
        "{out}"
    );
    assert!(out.contains(&format!("ok       {previous}")), "{out}");
    let imgs = images(&job);
    assert_eq!(imgs[0]["verified"], serde_json::Value::Bool(false));
    assert!(imgs[0]["damage"].as_str().unwrap().contains("file "));
    assert_eq!(imgs[1]["verified"], serde_json::Value::Bool(true));

    let sup = env.start(&job);
    sup.wait_restores("flip", 1, T);
    let log = sup.log();
    assert!(
        log.contains(&format!("checkpoint={newest}")) && log.contains("failed verification"),
        "{log}"
    );
    assert!(
        log.contains(&format!("restored checkpoint={previous}")),
        "{log}"
    );
}

/// Kills whatever a dead supervise left running (its namespace inits, a
/// CRIU still finishing) and reaps it; we are their subreaper.
fn kill_leftovers(tree: &[i32]) {
    for p in tree.iter().rev() {
        kill(*p, libc::SIGKILL);
    }
    reap_pids(tree);
}

/// SIGKILL of supervise in the middle of a checkpoint (during CRIU's dump,
/// and after the new pack is written but before the manifest), of retention
/// and of gc (after a rewritten pack is published, and between removing a
/// pack's index and its data): every retained image still verifies, and the
/// next supervise cleans up and restores the newest.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn sigkill_mid_checkpoint_and_mid_gc_leaves_retained_images_restorable() {
    subreaper();
    let env = Env::new();
    // 400 of 6144 pages rewritten every 100 ms: old packs die fast, so gc
    // removes and rewrites packs within a few checkpoints.
    let job = dirty_job(&env, "crash", 24, 400, 2);
    let store = env.path().join("images-crash");
    let mut last_restored: Option<String> = None;
    let points = [
        "external-during-dump",
        "commit-after-pack",
        "retain-after-rename",
        "gc-between-index-and-pack",
        "gc-after-repack",
    ];
    for (round, point) in points.iter().enumerate() {
        let mut sup = if *point == "external-during-dump" {
            env.start(&job)
        } else {
            env.start_with_env(&job, &[("SUPERVISE_FAILPOINT", point)])
        };
        if round > 0 {
            // On the log, not on status: the failpoint may kill supervise
            // at its first checkpoint, before status was asked.
            sup.wait_for("restored", 1, LONG);
            let log = sup.log();
            // The previous crash left nothing behind once the store is open.
            let left: Vec<_> = fs::read_dir(&store)
                .unwrap()
                .chain(fs::read_dir(store.join("packs")).unwrap())
                .flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| n.starts_with(".deleting-") || n.starts_with(".tmp-"))
                .collect();
            assert!(left.is_empty(), "{point}: leftovers {left:?}");
            last_restored = Some(restored_id(&log));
        }
        let tree_of = |sup: &Sup| process_tree(sup.pid());
        let mut tree = tree_of(&sup);
        if *point == "external-during-dump" {
            sup.wait_checkpoints("crash", 1, LONG);
            // Kill as soon as the next dump has begun.
            let deadline = std::time::Instant::now() + LONG;
            loop {
                let staging = fs::read_dir(&store)
                    .unwrap()
                    .flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with(".staging-"));
                if staging {
                    break;
                }
                assert!(std::time::Instant::now() < deadline, "no dump began");
                std::thread::sleep(Duration::from_millis(2));
            }
            tree = tree_of(&sup);
            kill(sup.pid(), libc::SIGKILL);
        } else {
            // The failpoint kills supervise itself when reached.
            let deadline = std::time::Instant::now() + LONG;
            while !sup.log().contains("SUPERVISE_FAILPOINT reached") {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{point} never reached: {}",
                    sup.log()
                );
                let t = tree_of(&sup);
                if !t.is_empty() {
                    tree = t;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let code = sup.wait_exit(T);
        assert_eq!(code, 128 + 9, "{point}: {}", sup.log());
        drop(sup);
        kill_leftovers(&tree);
        // Every retained image is intact.
        let (code, out) = run_cli(&["verify"], &job);
        assert_eq!(code, 0, "after {point}: {out}");
        assert!(!images(&job).is_empty());
    }
    assert!(last_restored.is_some());
    // A final run restores the newest image and the job goes on.
    let newest = images(&job)[0]["id"].as_str().unwrap().to_string();
    let sup = env.start(&job);
    sup.wait_restores("crash", 1, LONG);
    assert!(
        sup.log().contains(&format!("restored checkpoint={newest}")),
        "{}",
        sup.log()
    );
    let out = env.path().join("crash.out");
    let n = env.numbers("crash.out").len();
    wait_numbers(&out, n + 3, T);
    let (code, out) = run_cli(&["gc"], &job);
    assert_eq!(code, 0, "{out}");
}
