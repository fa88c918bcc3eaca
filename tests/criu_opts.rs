//! CRIU options from the job file reach CRIU (real CRIU): `ghost_limit`.

mod common;

use std::fs;

use common::*;

/// 2 MiB: over CRIU's default ghost limit (1 MiB).
const GHOST_SIZE: &str = "2097152";

fn ghost_job(name: &str) -> JobFile {
    JobFile::program(name, &[&prog("ghost"), "scratch.bin", GHOST_SIZE, "100"])
        .top(&format!("stderr = \"{name}.err\""))
}

/// An unlinked-but-open file of 2 MiB cannot be checkpointed with CRIU's
/// default ghost limit (the failure names it), and can with
/// `ghost_limit = "8MiB"`: checkpointed, SIGKILLed, restored, and the
/// program's check of the file's content passes after the restore.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn ghost_limit_lets_a_large_unlinked_file_be_checkpointed() {
    let env = Env::new();

    // Default limit: every checkpoint fails, naming the ghost limit.
    let job = ghost_job("small").write(&env);
    let sup = env.start(&job);
    let st = sup.wait_status("small", "a failed checkpoint", T, |j| {
        j["last_error"].as_str().is_some_and(|e| !e.is_empty())
    });
    let err = st["last_error"].as_str().unwrap();
    assert!(
        err.contains("Can't dump ghost file") && err.contains("increase limit"),
        "{err}"
    );
    assert_eq!(st["checkpoints"].as_u64(), Some(0), "{st}");
    drop(sup);

    // 8 MiB: checkpoints, and restores after SIGKILL.
    let job = ghost_job("large")
        .checkpoint("ghost_limit = \"8MiB\"")
        .write(&env);
    let sup = env.start(&job);
    sup.wait_checkpoints("large", 1, T);
    let out = env.path().join("large.out");
    let before = numbers(&out).len();
    sup.kill_job("large");
    sup.wait_restores("large", 1, T);
    // The restored program runs on and keeps checking its ghost file.
    wait_numbers(&out, before + 10, T);
    sup.wait_checkpoints("large", 2, T);
    // stdout is rolled back with each restore: 0, 1, 2, ... without a gap.
    assert_exactly_once(&numbers(&out));
    let err = fs::read_to_string(env.path().join("large.err")).unwrap_or_default();
    assert!(!err.contains("MISMATCH"), "{err}");
    let st = sup.job_status("large");
    assert_eq!(st["state"], "running", "{st}");
}
