//! The store modes' comparison table (issue 12's targets).

use crate::{median, pass, Cp, Mode, ModeRun};

/// The store modes' table and their ratios to `plain`, with targets.
pub fn report_modes(runs: &[ModeRun], mats: &[Vec<(u64, f64)>], raws: &[Cp]) {
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let n = runs[0].cps.len();
    println!();
    println!(
        "store modes, per checkpoint (same job, same rounds, order rotating; written = growth of the store directory; new raw = uncompressed bytes of the objects it added):"
    );
    println!(
        "{:<4} {:<14} {:>10} {:>10} {:>10} {:>12} {:>12} {:>12} {:>12} {:>9}",
        "#",
        "mode",
        "frozen ms",
        "dump ms",
        "ingest ms",
        "ingest MiB/s",
        "logical MiB",
        "written KiB",
        "new raw KiB",
        "wr/new"
    );
    for i in 0..n {
        for run in runs {
            let c = &run.cps[i];
            println!(
                "{:<4} {:<14} {:>10.1} {:>10.0} {:>10.0} {:>12.0} {:>12.1} {:>12.1} {:>12.1} {:>9.3}",
                i + 1,
                run.mode.name(),
                c.frozen_ms,
                c.dump_ms,
                c.ingest_ms,
                mib(c.bytes) / (c.ingest_ms / 1e3),
                mib(c.bytes),
                c.grown as f64 / 1024.0,
                c.new_raw as f64 / 1024.0,
                c.grown as f64 / c.new_raw.max(1) as f64
            );
        }
    }

    // Medians per mode.
    struct Med {
        frozen: f64,
        ingest_first: f64,
        ingest_later: f64,
        written_later: f64,
        /// Later checkpoints: bytes written / raw bytes of new objects (sums).
        written_per_new: f64,
        mat: f64,
        store: u64,
    }
    let meds: Vec<Med> = runs
        .iter()
        .zip(mats)
        .map(|(run, mat)| {
            let tput = |c: &Cp| mib(c.bytes) / (c.ingest_ms / 1e3);
            Med {
                frozen: median(run.cps.iter().map(|c| c.frozen_ms).collect()),
                ingest_first: tput(&run.cps[0]),
                ingest_later: median(run.cps[1..].iter().map(tput).collect()),
                written_later: median(run.cps[1..].iter().map(|c| c.grown as f64).collect()),
                written_per_new: run.cps[1..].iter().map(|c| c.grown).sum::<u64>() as f64
                    / run.cps[1..].iter().map(|c| c.new_raw).sum::<u64>().max(1) as f64,
                mat: median(mat.iter().map(|&(b, s)| mib(b) / s).collect()),
                store: supervise::store::dir_size(&run.dir),
            }
        })
        .collect();
    let p = &meds[0];
    println!();
    println!(
        "store modes, medians over {n} rounds (ingest = logical bytes / commit time; later = checkpoints 2..{n}; materialise = newest checkpoint, {} runs each):",
        mats[0].len()
    );
    println!(
        "{:<14} {:>9} {:>7} | {:>10} {:>7} {:>11} {:>7} | {:>11} {:>8} {:>7} {:>8} | {:>10} {:>7} | {:>9}",
        "mode",
        "frozen ms",
        "x plain",
        "ingest 1st",
        "x plain",
        "later MiB/s",
        "x plain",
        "written KiB",
        "vs plain",
        "wr/new",
        "vs plain",
        "mat MiB/s",
        "x plain",
        "store MiB"
    );
    for (run, m) in runs.iter().zip(&meds) {
        println!(
            "{:<14} {:>9.1} {:>7.3} | {:>10.0} {:>7.3} {:>11.0} {:>7.3} | {:>11.1} {:>+7.1}% {:>7.3} {:>+7.1}% | {:>10.0} {:>7.3} | {:>9.1}",
            run.mode.name(),
            m.frozen,
            m.frozen / p.frozen,
            m.ingest_first,
            m.ingest_first / p.ingest_first,
            m.ingest_later,
            m.ingest_later / p.ingest_later,
            m.written_later / 1024.0,
            (m.written_later / p.written_later - 1.0) * 100.0,
            m.written_per_new,
            (m.written_per_new / p.written_per_new - 1.0) * 100.0,
            m.mat,
            m.mat / p.mat,
            mib(m.store)
        );
    }
    println!(
        "{:<14} {:>9.1}  (raw criu dump, for reference)",
        "raw criu",
        median(raws.iter().map(|c| c.frozen_ms).collect())
    );
    let Some(sp) = runs.iter().position(|r| r.mode == Mode::SealedParity) else {
        return;
    };
    let sealed = runs.iter().position(|r| r.mode == Mode::Sealed);
    let (q, s) = (&meds[sp], sealed.map(|k| &meds[k]));
    let also = |f: &dyn Fn(&Med) -> f64| {
        s.map(|s| format!("; sealed: {:.3}", f(s)))
            .unwrap_or_default()
    };
    println!();
    let r = q.frozen / p.frozen;
    println!(
        "freeze time, sealed+parity / plain:                      {r:.3}  (target <= 1.02: {}; {:.1} ms / {:.1} ms{})",
        pass(r <= 1.02),
        q.frozen,
        p.frozen,
        also(&|s| s.frozen / p.frozen)
    );
    let r = q.ingest_first / p.ingest_first;
    println!(
        "ingest throughput, 1st checkpoint, sealed+parity / plain: {r:.3}  (target >= 0.80: {}; {:.0} / {:.0} MiB/s{})",
        pass(r >= 0.80),
        q.ingest_first,
        p.ingest_first,
        also(&|s| s.ingest_first / p.ingest_first)
    );
    let r = q.ingest_later / p.ingest_later;
    println!(
        "ingest throughput, later ones, sealed+parity / plain:     {r:.3}  (target >= 0.80: {}; {:.0} / {:.0} MiB/s{})",
        pass(r >= 0.80),
        q.ingest_later,
        p.ingest_later,
        also(&|s| s.ingest_later / p.ingest_later)
    );
    // Consecutive checkpoints of one store are not equally far apart (the
    // order rotates), so how much changed differs between the stores; the
    // target is judged on bytes written per raw byte of new objects.
    let r = (q.written_per_new / p.written_per_new - 1.0) * 100.0;
    println!(
        "bytes written per later checkpoint, sealed+parity vs plain: {r:+.1} %  (target <= +15 %: {}; per raw byte of new objects {:.3} / {:.3}; median per checkpoint {:.1} / {:.1} KiB, {:+.1} %{})",
        pass(r <= 15.0),
        q.written_per_new,
        p.written_per_new,
        q.written_later / 1024.0,
        p.written_later / 1024.0,
        (q.written_later / p.written_later - 1.0) * 100.0,
        s.map(|s| format!(
            "; sealed: {:+.1} %, {:.3} per new byte, {:.1} KiB",
            (s.written_per_new / p.written_per_new - 1.0) * 100.0,
            s.written_per_new,
            s.written_later / 1024.0
        ))
        .unwrap_or_default()
    );
    let r = q.mat / p.mat;
    println!(
        "materialise throughput, sealed+parity / plain:           {r:.3}  (target >= 0.80: {}; {:.0} / {:.0} MiB/s{})",
        pass(r >= 0.80),
        q.mat,
        p.mat,
        also(&|s| s.mat / p.mat)
    );
}
