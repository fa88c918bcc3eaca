//! Issue 13's part of the benchmark: streamed checkpoints (frozen time and
//! bytes written to disk against raw CRIU and against what changed) and a
//! lazy restore (kill-to-running and time until all memory is resident,
//! against raw `criu restore`).

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use supervise::config::CriuOptions;
use supervise::job::{self, InitFiles};
use supervise::pages::{lazy_select, StoreSource};
use supervise::reaper::Reaper;
use supervise::store::scratch_dir;

use crate::{median, page_map, pass, Cp, KillOnDrop, ModeRun};

/// A lazy restore, timed.
pub struct LazyRun {
    /// Restore start (materialising included) to the job running.
    pub running: Duration,
    /// Of which writing out the non-lazy files.
    pub materialise: Duration,
    /// Restore start to every page resident (the daemon's goodbye).
    pub resident: Duration,
    /// Page bytes served.
    pub bytes: u64,
}

/// Restores the newest checkpoint of `run` lazily, as `supervise run` does.
pub fn restore(
    reaper: &Reaper,
    run: &ModeRun,
    opts: &CriuOptions,
    files: &InitFiles,
    work: &Path,
) -> Option<LazyRun> {
    let newest = run
        .store
        .list()
        .unwrap()
        .into_iter()
        .find(|i| Some(&i.id) == run.ids.last())?;
    let t0 = Instant::now();
    let d = scratch_dir(&work.join("restore"), newest.size_bytes).expect("scratch dir");
    let m = run
        .store
        .materialise_select(&newest, &d, &mut lazy_select())
        .expect("materialise");
    let src = StoreSource::open(&run.store, &newest, &m.path, Default::default()).expect("source");
    let r = job::restore(
        reaper,
        &m.path,
        opts,
        files,
        &mut |_, _| true,
        Some(Box::new(src)),
    );
    let mut r = match r {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lazy restore failed: {e}");
            return None;
        }
    };
    let running = t0.elapsed();
    let outcome = r.lazy.take().expect("a lazy session").wait();
    let resident = outcome.ended.saturating_duration_since(t0);
    eprintln!("lazy serving: {:?}", outcome.stats);
    let _ = fs::remove_dir_all(&m.path);
    drop(KillOnDrop(Some(r.running)));
    if let Err(e) = outcome.result {
        eprintln!("lazy restore's serving failed: {e}");
        return None;
    }
    Some(LazyRun {
        running,
        materialise: m.duration,
        resident,
        bytes: outcome.bytes,
    })
}

/// Pages that changed between consecutive checkpoints of `run`.
pub fn changed_pages(run: &ModeRun, work: &Path) -> Vec<u64> {
    let imgs = run.store.list().unwrap();
    let mut out = vec![0u64; run.ids.len()];
    let mut prev: Option<std::collections::HashMap<(String, u64), [u8; 32]>> = None;
    for (k, id) in run.ids.iter().enumerate() {
        let img = imgs.iter().find(|i| &i.id == id).expect("listed");
        let d = scratch_dir(&work.join("m"), img.size_bytes).expect("scratch dir");
        let m = run.store.materialise(img, &d).unwrap();
        let pages = page_map(&m.path);
        fs::remove_dir_all(&m.path).unwrap();
        if let Some(p) = &prev {
            out[k] = pages
                .iter()
                .filter(|(key, h)| p.get(*key) != Some(*h))
                .count() as u64;
        }
        prev = Some(pages);
    }
    out
}

/// Prints issue 13's ratios and their targets.
pub fn report(
    run: &ModeRun,
    changed: &[u64],
    raws: &[Cp],
    lazy: &Option<LazyRun>,
    cli_raw: Option<Duration>,
) {
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!();
    println!("streamed checkpoints (pages sent by CRIU to supervise's page server, only new chunks written):");
    println!(
        "{:<4} {:>10} {:>10} {:>10} {:>12} {:>12} {:>12} | {:>10}",
        "#",
        "frozen ms",
        "dump ms",
        "commit ms",
        "staged KiB",
        "store KiB",
        "changed KiB",
        "raw froz"
    );
    for (i, c) in run.cps.iter().enumerate() {
        println!(
            "{:<4} {:>10.1} {:>10.0} {:>10.0} {:>12.1} {:>12.1} {:>12} | {:>10.1}",
            i + 1,
            c.frozen_ms,
            c.dump_ms,
            c.ingest_ms,
            c.staged as f64 / 1024.0,
            c.grown as f64 / 1024.0,
            if i == 0 {
                "-".to_string()
            } else {
                format!("{:.1}", changed[i] as f64 * 4.0)
            },
            raws.get(i).map(|r| r.frozen_ms).unwrap_or(f64::NAN)
        );
    }
    let later = &run.cps[1..];
    let frozen = median(later.iter().map(|c| c.frozen_ms).collect());
    let raw_frozen = median(raws[1..].iter().map(|c| c.frozen_ms).collect());
    let r = frozen / raw_frozen;
    println!();
    println!(
        "frozen time per later checkpoint, streamed / raw criu dump: {r:.3}  (target <= 1.0: {}; medians {frozen:.1} / {raw_frozen:.1} ms; first checkpoint {:.1} / {:.1} ms)",
        pass(r <= 1.0),
        run.cps[0].frozen_ms,
        raws[0].frozen_ms
    );
    let written: u64 = later.iter().map(|c| c.staged + c.grown).sum();
    let changed_b: u64 = changed[1..].iter().sum::<u64>() * 4096;
    let n = later.len() as f64;
    let limit = 1.5 * changed_b as f64 + n * (1 << 20) as f64;
    println!(
        "bytes written to disk per later checkpoint (staged files + store growth): {:.3} MiB vs {:.3} MiB changed  (target <= 1.5 x changed + 1 MiB = {:.3} MiB: {}; raw criu writes {:.1} MiB)",
        mib(written) / n,
        mib(changed_b) / n,
        limit / n / (1 << 20) as f64,
        pass(written as f64 <= limit),
        mib(raws[1..].iter().map(|c| c.bytes).sum::<u64>()) / n
    );
    let Some(l) = lazy else {
        println!("lazy restore: FAILED (see above)");
        return;
    };
    let Some(base) = cli_raw else {
        println!("raw criu restore failed: no baseline");
        return;
    };
    let r = ms(l.running) / ms(base);
    println!(
        "lazy restore, kill-to-running / raw criu restore:         {r:.3}  (target <= 0.2: {}; {:.0} ms (materialise {:.0} ms) / {:.0} ms)",
        pass(r <= 0.2),
        ms(l.running),
        ms(l.materialise),
        ms(base)
    );
    let r = ms(l.resident) / ms(base);
    println!(
        "lazy restore, all memory resident / raw criu restore:    {r:.3}  (target <= 1.0: {}; {:.0} ms / {:.0} ms; {:.1} MiB served)",
        pass(r <= 1.0),
        ms(l.resident),
        ms(base),
        mib(l.bytes)
    );
}
