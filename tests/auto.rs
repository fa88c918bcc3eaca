//! `every = "auto"` against real CRIU: the interval follows the measured
//! checkpoint cost C (the job grows its memory, its dumps freeze it longer,
//! the interval grows), and a failure lowers the learned MTBF M.

mod common;

use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(120);

fn auto_of(st: &serde_json::Value) -> (f64, f64, f64, u64) {
    let a = &st["auto"];
    (
        st["interval_s"].as_f64().expect("interval_s"),
        a["cost_s"].as_f64().expect("auto.cost_s"),
        a["mtbf_s"].as_f64().expect("auto.mtbf_s"),
        a["failures"].as_u64().expect("auto.failures"),
    )
}

#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn auto_interval_follows_the_checkpoint_cost() {
    let env = Env::new();
    let trigger = env.path().join("grow.trigger");
    // 1 MiB at first; 192 MiB of dirty memory once `trigger` exists.
    // With M = 1 min, C of ~10-30 ms gives ~1-2 s, C of ~0.3 s and more ~6 s.
    let job = JobFile::program("g", &[&prog("grow"), "192", trigger.to_str().unwrap()])
        .every("auto")
        .keep(2)
        .checkpoint("mtbf = \"1m\"")
        .checkpoint("min = \"1s\"")
        .checkpoint("max = \"1m\"")
        .write(&env);
    let sup = env.start(&job);
    // Five small checkpoints fill C's window.
    let st = sup.wait_checkpoints("g", 5, T);
    let (i1, c1, m1, f1) = auto_of(&st);
    assert_eq!(f1, 0);
    assert!(m1 >= 60.0, "M starts at mtbf and grows with run time: {st}");
    assert!(i1 < 5.0, "a small job checkpoints often: {st}");
    assert_eq!(st["skipped_ticks"].as_u64(), Some(0), "{st}");
    let out = env.ctl(&["status"]);
    let human = String::from_utf8_lossy(&out.stdout);
    assert!(
        human.contains(" auto") && human.contains("  auto: C "),
        "{human}"
    );

    // The job grows: three larger dumps move C's median.
    std::fs::write(&trigger, b"").unwrap();
    wait_until("the job grew", T, || {
        env.path().join("grow.trigger.done").exists()
    });
    let n = st["checkpoints"].as_u64().unwrap();
    let st = sup.wait_status("g", "C follows the larger dumps", T, |j| {
        j["checkpoints"].as_u64().unwrap_or(0) >= n + 3
            && j["auto"]["cost_s"].as_f64().unwrap_or(0.0) > 4.0 * c1
    });
    let (i2, c2, m2, _) = auto_of(&st);
    assert!(
        i2 > 2.0 * i1,
        "C grew {c1} -> {c2} s, so the interval must follow: {i1} -> {i2} s; {st}"
    );
    assert!(
        sup.log().contains("checkpoint interval set"),
        "{}",
        sup.log()
    );

    // A failure: M drops (here to about half), the interval with it.
    sup.kill_job("g");
    let st = sup.wait_status("g", "one failure counted", T, |j| {
        j["auto"]["failures"].as_u64() == Some(1) && j["state"] == "running"
    });
    let (i3, _, m3, _) = auto_of(&st);
    eprintln!(
        "small: C {c1:.4} s, interval {i1:.2} s; grown: C {c2:.4} s, interval {i2:.2} s, \
         M {m2:.0} s; after a failure: M {m3:.0} s, interval {i3:.2} s"
    );
    assert!(
        m3 < 0.75 * m2,
        "M must drop at a failure: {m2} -> {m3}; {st}"
    );
}
