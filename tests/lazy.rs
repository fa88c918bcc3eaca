//! Lazy restores and streamed checkpoints with real CRIU (issue 13): the
//! job's memory is served from the store by supervise's own page server
//! while the job runs.
//!
//! The job (`tests/progs/lazymem.c`) checks all of its memory every 100 ms
//! against the pattern it wrote (so a restored copy touches every page)
//! and prints "BAD ..." and exits if anything differs.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

const LONG: Duration = Duration::from_secs(90);

fn lazymem(name: &str, args: &[&str]) -> JobFile {
    let mut argv = vec![prog("lazymem")];
    argv.extend(args.iter().map(|s| s.to_string()));
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    JobFile::program(name, &argv).every("1h").backoff("0s")
}

/// Waits for `n` more numbers in `out`, then takes a checkpoint.
fn checkpoint_after(env: &Env, name: &str, out: &Path, n: usize) {
    wait_numbers(out, numbers(out).len() + n, LONG);
    checkpoint(env, name);
}

/// The job's output never reported a memory mismatch.
fn no_bad(out: &Path) {
    let text = fs::read_to_string(out).unwrap_or_default();
    assert!(!text.contains("BAD"), "the job saw wrong memory:\n{text}");
}

/// After a restore: all memory resident, the job prints on, its output is
/// 0, 1, 2, ... exactly once and never reported wrong memory.
fn continues(sup: &Sup, out: &Path, resident: usize) {
    sup.wait_for("all of the job's memory is resident", resident, LONG);
    wait_numbers(out, numbers(out).len() + 3, LONG);
    no_bad(out);
    assert_exactly_once(&numbers(out));
}

fn status_restore(sup: &Sup, name: &str) -> serde_json::Value {
    sup.job_status(name)["last_restore"].clone()
}

#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn lazily_restored_memory_checks_out() {
    let env = Env::new();
    let job = lazymem("lz", &["64"]).write(&env);
    let out = env.path().join("lz.out");
    let sup = env.start(&job);
    sup.wait_state("lz", "running", LONG);
    // The store's first checkpoint is written out by CRIU, the second
    // streamed into the store (and restored from).
    checkpoint_after(&env, "lz", &out, 3);
    checkpoint_after(&env, "lz", &out, 3);
    let log = sup.log();
    assert!(log.contains("streamed=false"), "{log}");
    assert!(log.contains("streamed=true"), "{log}");
    sup.kill_job("lz");
    sup.wait_restores("lz", 1, LONG);
    continues(&sup, &out, 1);
    let log = sup.log();
    assert!(log.contains("mode=\"lazy\""), "{log}");
    let r = status_restore(&sup, "lz");
    assert_eq!(r["mode"], "lazy", "{r}");
    let running = r["running_ms"].as_f64().unwrap();
    let resident = r["resident_ms"].as_f64().expect("resident time shown");
    assert!(resident >= running, "{r}");
    // The metrics say how it went.
    let text = String::from_utf8(env.ctl(&["status"]).stdout).unwrap();
    assert!(text.contains("last restore: lazy from"), "{text}");
}

#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn lazy_restore_of_threads_a_shared_file_mapping_and_a_child() {
    let env = Env::new();
    // 2 threads, a forked child, a MAP_SHARED mapping of ./lazymem.map.
    let job = lazymem("mix", &["32", "2", "1", "1"])
        .top(&format!("cwd = {:?}", env.path().display().to_string()))
        .write(&env);
    let out = env.path().join("mix.out");
    let sup = env.start(&job);
    sup.wait_state("mix", "running", LONG);
    checkpoint_after(&env, "mix", &out, 3);
    sup.kill_job("mix");
    sup.wait_restores("mix", 1, LONG);
    continues(&sup, &out, 1);
    assert_eq!(status_restore(&sup, "mix")["mode"], "lazy");
    // Parent and child both run again (the child checks its copy too).
    let (pid, _) = sup.job_pid("mix");
    let tree = process_tree(pid);
    assert_eq!(tree.len(), 2, "job tree {tree:?}");
    wait_numbers(&out, numbers(&out).len() + 5, LONG);
    no_bad(&out);
}

#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn supervise_killed_during_the_push_takes_the_job_down_and_the_next_restores_it() {
    subreaper();
    let env = Env::new();
    let job = lazymem("push", &["64"]).write(&env);
    let out = env.path().join("push.out");
    let pause = env.path().join("pause");
    fs::write(&pause, "").unwrap();
    let mut sup = env.start_with_env(
        &job,
        &[
            ("SUPERVISE_PAUSE", "lazy-push"),
            ("SUPERVISE_PAUSE_FILE", pause.to_str().unwrap()),
        ],
    );
    sup.wait_state("push", "running", LONG);
    checkpoint_after(&env, "push", &out, 3);
    sup.kill_job("push");
    // Serving stops in the middle of the background push.
    let reached = env.path().join("pause.reached");
    wait_until("the push to pause", LONG, || reached.exists());
    let (pid, _) = sup.job_pid("push");
    let printed = numbers(&out).len();
    // supervise dies (SIGKILL: no cleanup of its own).
    let tree = process_tree(sup.pid());
    kill(sup.pid(), libc::SIGKILL);
    sup.wait_exit(LONG);
    // The guard kills the job, which never ran on with missing memory.
    wait_until(
        "the job to be killed",
        LONG,
        || !matches!(supervise::proc::state(pid), Some(s) if s != 'Z'),
    );
    reap_pids(&tree);
    no_bad(&out);
    let after_kill = numbers(&out).len();
    assert!(
        after_kill <= printed + 1,
        "the job ran on: {printed} -> {after_kill}"
    );
    fs::remove_file(&pause).unwrap();
    // The next supervise restores it from the intact image.
    let sup = env.start(&job);
    sup.wait_restores("push", 1, LONG);
    continues(&sup, &out, 1);
    assert_eq!(status_restore(&sup, "push")["mode"], "lazy");
}

/// The first 4 KiB the job writes into its dirty page 0 in iteration `i`
/// (lazymem.c's `fill(mem, i * 64)`).
fn dirty_page(i: u64) -> Vec<u8> {
    let seed = i * 64;
    (0..512u64)
        .flat_map(|j| {
            let mut x = seed
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .wrapping_add(j.wrapping_mul(0xBF58_476D_1CE4_E5B9))
                .wrapping_add(1);
            x ^= x >> 31;
            x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
            x ^= x >> 29;
            x.to_le_bytes()
        })
        .collect()
}

/// Where in `pack` the job's dirty page of one of iterations `around`
/// lies (a plaintext store keeps incompressible pages as they are).
fn find_page(pack: &Path, around: std::ops::RangeInclusive<u64>) -> Option<usize> {
    let bytes = fs::read(pack).unwrap();
    around.into_iter().find_map(|i| {
        let page = dirty_page(i);
        bytes.windows(page.len()).position(|w| w == &page[..])
    })
}

#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn a_damaged_page_kills_the_lazily_restored_job_and_the_previous_image_is_used() {
    let env = Env::new();
    // Plaintext, no parity: nothing can repair the page.
    let job = lazymem("dmg", &["16"])
        .extra("[store]\nencryption = false\nparity = false\n")
        .write(&env);
    let out = env.path().join("dmg.out");
    let sup = env.start(&job);
    sup.wait_state("dmg", "running", LONG);
    checkpoint_after(&env, "dmg", &out, 3);
    checkpoint_after(&env, "dmg", &out, 5);
    let imgs = images(&job);
    assert_eq!(imgs.len(), 2);
    let (older, newest) = (imgs[1]["id"].as_str().unwrap(), &imgs[0]);
    // The newest image's dirty page, stored only in its own pack.
    let pack: PathBuf = newest_pack(newest);
    let last = *numbers(&out).last().unwrap() as u64;
    let at = find_page(&pack, last.saturating_sub(8)..=last + 2)
        .unwrap_or_else(|| panic!("dirty page not found in {}", pack.display()));
    let mut bytes = fs::read(&pack).unwrap();
    bytes[at + 100] ^= 0xff;
    fs::write(&pack, &bytes).unwrap();
    sup.kill_job("dmg");
    // The lazily restored job faults on the damaged page (during CRIU's
    // restore or after it): it is killed before it runs on, the image is
    // then tried eagerly (which verifies it first and finds the damage),
    // and the older image is restored.
    sup.wait_for(&format!("restored checkpoint={older}"), 1, LONG);
    continues(&sup, &out, 1);
    let log = sup.log();
    // The eager retry found the damage (or the page already marked bad).
    let newest_id = newest["id"].as_str().unwrap();
    assert!(
        log.lines().any(|l| l.contains("cannot restore this image")
            && l.contains(newest_id)
            && l.contains("image failed verification")),
        "damage not reported: {log}"
    );
    // Killed at the damaged page: during CRIU's restore (the restore
    // fails) or once the tree runs (the serving fails and kills it).
    assert!(
        log.contains("serving its pages: cannot serve pages")
            || log.contains("lazy restore could not give the job all its memory"),
        "the lazy restore did not stop at the damaged page: {log}"
    );
}
