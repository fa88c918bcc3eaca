//! Benchmark: supervise's image store against plain CRIU, and the store's
//! modes against each other, on one job.
//!
//! ```sh
//! cargo run --release --example bench_store -- [--mb 1024] [--pages 1] \
//!     [--interval-ms 100] [--checkpoints 3] [--gap-s 5] [--dir /var/tmp] [--warm-gib 2]
//! ```
//!
//! Starts `tests/progs/dirty.c` (compiled with `cc`) holding `--mb` MiB of
//! incompressible memory and rewriting `--pages` random pages every
//! `--interval-ms`, under a namespace init as `supervise run` would. Then,
//! for `--checkpoints` rounds, `--gap-s` seconds per round, it takes one
//! checkpoint of the same job into each of three stores, one per store
//! mode, plus one with plain `criu dump --leave-running` (run inside the
//! job's namespaces with `nsenter`, as any CRIU user must for a job in its
//! own PID namespace):
//!
//! * `plain`: encryption off, parity off ([`ImageStore::open`], what the
//!   store did before sealing); this is the store called "supervise" in the
//!   comparison with raw CRIU below;
//! * `sealed`: encryption on, parity off;
//! * `sealed+parity`: encryption on, parity on (the default of a job's
//!   `[store]` table).
//!
//! A store checkpoint is supervise's engine: CRIU RPC dump into the store's
//! staging directory, then commit (ingest) into the deduplicating store,
//! timed separately. The four dumps of a round are spaced evenly over the
//! round, in an order that changes every round (the store modes rotate and
//! the raw dump moves one place further each round), so no mode always
//! comes first or always follows the raw dump (which frees the previous raw
//! dump right after it). Before every dump the page cache is synced and
//! `--warm-gib` GiB of memory is touched (see [`warm_memory`]).
//!
//! Then it kills the job and restores it both ways, timing kill-to-running
//! (the page cache is synced before every restore):
//!
//! * supervise: materialise the newest `plain` checkpoint (verifying every
//!   piece) into its scratch directory, then restore through the engine;
//! * raw: `criu restore` from the newest raw dump directory (CLI, in a fresh
//!   PID + mount namespace via `unshare`, done when its `--pidfile` appears);
//!   the engine's restore from the same raw directory is shown as well.
//!
//! "Pages that actually changed" between two consecutive `plain`
//! checkpoints is counted from the images themselves: both are
//! materialised, and every page present in the later one (by process and
//! virtual address, from `pagemap-*.img`) whose contents differ from, or are
//! absent in, the earlier one counts.
//!
//! Per store mode, with the median over rounds (first checkpoint and later
//! ones apart where it matters), it reports:
//!
//! * frozen time: CRIU's `frozen_time` from `stats-dump`;
//! * ingest throughput: logical image bytes / commit time;
//! * bytes written per later checkpoint: growth of the store directory
//!   (apparent file sizes, [`supervise::store::dir_size`], measured before
//!   `begin` and after `commit`): new pack, index, manifest and, with
//!   parity, their `.par` files. Because the order rotates, one store's
//!   consecutive checkpoints are not equally far apart and different
//!   amounts of the job changed in between, so the overhead over `plain`
//!   is judged on bytes written per raw (uncompressed) byte of the new
//!   objects the store recorded (`stored.new_raw_bytes`, summed over the
//!   later checkpoints); the plain median per checkpoint is shown too;
//! * materialise throughput: bytes / time to materialise the newest
//!   checkpoint into a fresh [`scratch_dir`], after the job is gone, once
//!   per mode per round (`--checkpoints` rounds, order rotating; sync and
//!   warm memory before each).
//!
//! Not a test: it prints tables and ratios with their targets.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use prost::Message;
use supervise::config::{CriuOptions, LaunchSpec};
use supervise::criu;
use supervise::job::{self, InitFiles};
use supervise::reaper::Reaper;
use supervise::store::{scratch_dir, CheckpointMeta, ImageStore, StoreOptions};

struct Args {
    mb: u64,
    pages: u64,
    interval_ms: u64,
    checkpoints: usize,
    gap: Duration,
    dir: PathBuf,
    warm_gib: u64,
    /// `criu --version`, asked before the reaper is installed (its
    /// `waitpid(-1)` would race `Command::output` for the exit).
    criu_version: String,
}

fn parse_args() -> Args {
    let mut a = Args {
        mb: 1024,
        pages: 1,
        interval_ms: 100,
        checkpoints: 3,
        gap: Duration::from_secs(5),
        dir: PathBuf::from("/var/tmp"),
        warm_gib: 2,
        criu_version: String::new(),
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let v = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--mb" => a.mb = v.parse().expect("--mb N"),
            "--pages" => a.pages = v.parse().expect("--pages N"),
            "--interval-ms" => a.interval_ms = v.parse().expect("--interval-ms N"),
            "--checkpoints" => a.checkpoints = v.parse().expect("--checkpoints N"),
            "--gap-s" => a.gap = Duration::from_secs_f64(v.parse().expect("--gap-s S")),
            "--dir" => a.dir = PathBuf::from(v),
            "--warm-gib" => a.warm_gib = v.parse().expect("--warm-gib N"),
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    assert!(a.checkpoints >= 2, "--checkpoints must be >= 2");
    a
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("__init") {
        supervise::init::main();
    }
    let mut args = parse_args();
    args.criu_version = criu_version();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let reaper = Reaper::install().expect("subreaper");
        tokio::task::spawn_blocking(move || bench(&reaper, &args))
            .await
            .unwrap();
    });
}

struct Cp {
    frozen_ms: f64,
    dump_ms: f64,
    ingest_ms: f64,
    bytes: u64,
    new_bytes: u64,
    node_bytes: u64,
    /// Growth of the store directory from before `begin` to after `commit`.
    grown: u64,
    /// Raw (uncompressed) bytes of the objects this checkpoint added.
    new_raw: u64,
}

/// A store mode compared by the benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Plain,
    Sealed,
    SealedParity,
}

const MODES: [Mode; 3] = [Mode::Plain, Mode::Sealed, Mode::SealedParity];

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Plain => "plain",
            Mode::Sealed => "sealed",
            Mode::SealedParity => "sealed+parity",
        }
    }

    /// Opens this mode's store below `work`. `plain` is the store the
    /// benchmark always had (`<work>/store`, [`ImageStore::open`]: no
    /// encryption, no parity); the sealed ones get their own key file in
    /// `<work>/keys` (a trusted directory, mode 0700).
    fn open(self, work: &Path) -> (PathBuf, ImageStore) {
        let (dir, parity) = match self {
            Mode::Plain => {
                let dir = work.join("store");
                return (dir.clone(), ImageStore::open(&dir).unwrap());
            }
            Mode::Sealed => (work.join("store-sealed"), false),
            Mode::SealedParity => (work.join("store-sealed-parity"), true),
        };
        let keys = work.join("keys");
        {
            use std::os::unix::fs::DirBuilderExt;
            fs::DirBuilder::new()
                .mode(0o700)
                .recursive(true)
                .create(&keys)
                .unwrap();
        }
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let mut o = StoreOptions::new(keys.join(format!("{name}.key")));
        o.encryption = true;
        o.parity = parity;
        let store = ImageStore::open_with(&dir, &o).unwrap();
        (dir, store)
    }
}

/// One store mode's store and checkpoints.
struct ModeRun {
    mode: Mode,
    dir: PathBuf,
    store: ImageStore,
    cps: Vec<Cp>,
    ids: Vec<String>,
}

/// One dump of a round.
#[derive(Clone, Copy)]
enum Step {
    Store(usize),
    Raw,
}

/// The order of round `i`: the store modes rotated by `i`, the raw dump
/// inserted at position `i % 4`, so the mode that follows the raw dump
/// (and its free of the previous raw dump) changes every round.
fn round_order(i: usize, modes: usize) -> Vec<Step> {
    let mut v: Vec<Step> = (0..modes).map(|k| Step::Store((k + i) % modes)).collect();
    v.insert(i % (modes + 1), Step::Raw);
    v
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn pass(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "MISS"
    }
}

/// Touches `gib` GiB of memory (a tmpfs file, then deleted) right before a
/// dump, on both sides of the comparison. On a VM whose host backs guest
/// memory lazily and takes freed memory back (free page reporting, as on
/// this machine), a dump written into memory freed seconds earlier is
/// several times slower than one written into memory just touched; which
/// side happens to follow a big free would otherwise decide the ratio.
fn warm_memory(gib: u64) {
    if gib == 0 {
        return;
    }
    let p = Path::new("/dev/shm").join(format!("supervise-bench-warm-{}", std::process::id()));
    {
        use std::io::Write;
        let mut f = fs::File::create(&p).unwrap();
        let buf = vec![0x5au8; 1 << 20];
        for _ in 0..gib * 1024 {
            f.write_all(&buf).unwrap();
        }
    }
    fs::remove_file(&p).unwrap();
}

fn bench(reaper: &Reaper, a: &Args) {
    let work = a
        .dir
        .join(format!("supervise-bench-{}", std::process::id()));
    fs::create_dir_all(&work).unwrap();
    let prog = work.join("dirty");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/progs/dirty.c");
    let st = Command::new("cc")
        .args(["-O2", "-o"])
        .arg(&prog)
        .arg(&src)
        .status()
        .unwrap();
    assert!(st.success(), "cc {}", src.display());
    let out = work.join("job.out");
    let spec = LaunchSpec {
        command: vec![
            prog.to_string_lossy().into(),
            a.mb.to_string(),
            a.pages.to_string(),
            a.interval_ms.to_string(),
        ],
        cwd: work.clone(),
        env: Default::default(),
        stdout: out.clone(),
        stderr: work.join("job.err"),
    };
    let files = InitFiles {
        status_file: work.join("exit-status"),
    };
    let job = job::launch(reaper, &spec, &files).expect("launch");
    // Whatever happens below, the job does not outlive the benchmark.
    let job = KillOnDrop(Some(job));
    let job_pid = (
        job.0.as_ref().unwrap().host_pid,
        job.0.as_ref().unwrap().ns_pid,
    );
    // Wait until the memory is filled (first counter line).
    let deadline = Instant::now() + Duration::from_secs(300);
    while fs::read_to_string(&out).unwrap_or_default().is_empty() {
        assert!(Instant::now() < deadline, "job never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    let opts = CriuOptions::default();
    let mut runs: Vec<ModeRun> = MODES
        .iter()
        .map(|&mode| {
            let (dir, store) = mode.open(&work);
            ModeRun {
                mode,
                dir,
                store,
                cps: Vec::new(),
                ids: Vec::new(),
            }
        })
        .collect();
    let mut raws = Vec::new();
    let raw_dir = |i: usize| work.join(format!("raw-{i}"));
    eprintln!(
        "job: {} MiB, {} page(s) rewritten every {} ms; {} rounds of checkpoints ({}, raw criu), {:?} per round",
        a.mb,
        a.pages,
        a.interval_ms,
        a.checkpoints,
        MODES.map(Mode::name).join(", "),
        a.gap
    );
    let engine_cp = |run: &mut ModeRun, i: usize| {
        // supervise's engine. Each dump starts with no dirty page cache
        // (sync first): CRIU writes the image while the job is frozen, and
        // writeback of earlier gigabytes would otherwise throttle whichever
        // dump comes next and decide the comparison.
        nix::unistd::sync();
        warm_memory(a.warm_gib);
        let before = supervise::store::dir_size(&run.dir);
        let staging = run.store.begin().unwrap();
        let o = criu::dump(reaper, job_pid.0, staging.path(), &opts, None, &mut |_| {
            true
        })
        .expect("engine dump");
        if std::env::var_os("BENCH_VERBOSE").is_some() {
            eprintln!("engine stats: {:?}", o.stats);
        }
        let t = Instant::now();
        let info = staging
            .commit(CheckpointMeta {
                job: "bench".into(),
                criu_version: String::new(),
                duration_ms: o.duration.as_millis() as u64,
                frozen_us: o.stats.as_ref().and_then(|s| s.frozen_time).map(u64::from),
                pages_written: o.stats.as_ref().and_then(|s| s.pages_written),
                root_pid: job_pid.1,
                extra: Default::default(),
            })
            .unwrap();
        let ingest_ms = t.elapsed().as_secs_f64() * 1e3;
        let grown = supervise::store::dir_size(&run.dir).saturating_sub(before);
        let stored = info.manifest.stored.clone().unwrap_or_default();
        run.cps.push(Cp {
            frozen_ms: o.stats.as_ref().and_then(|s| s.frozen_time).unwrap_or(0) as f64 / 1e3,
            dump_ms: o.duration.as_secs_f64() * 1e3,
            ingest_ms,
            bytes: info.size_bytes,
            new_bytes: info.new_bytes,
            node_bytes: stored.node_bytes,
            grown,
            new_raw: stored.new_raw_bytes,
        });
        run.ids.push(info.id.clone());
        eprintln!("{} checkpoint {} done", run.mode.name(), i + 1);
    };
    let mut raw_cp = |i: usize| {
        // Plain CRIU.
        let dir = raw_dir(i);
        fs::create_dir_all(&dir).unwrap();
        nix::unistd::sync();
        warm_memory(a.warm_gib);
        let t = Instant::now();
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--target={}", job_pid.0))
            .args(["--pid", "--mount", "--"])
            .arg(criu::criu_bin())
            .args(["dump", "--leave-running", "-v2", "-t"])
            .arg(job_pid.1.to_string())
            .arg("-D")
            .arg(&dir)
            .arg("-o")
            .arg(work.join(format!("raw-dump-{i}.log")))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let st = reaper
            .spawn(&mut cmd)
            .unwrap()
            .exit
            .blocking_recv()
            .unwrap();
        assert!(st.success(), "criu dump: {st}; see raw-dump-{i}.log");
        let stats = criu::read_dump_stats(&dir);
        if std::env::var_os("BENCH_VERBOSE").is_some() {
            eprintln!("raw stats: {stats:?}");
        }
        let bytes = supervise::store::dir_size(&dir);
        // Only the newest raw dump is restored, so the previous one goes now,
        // right after this dump, as supervise drops its raw dump right after
        // ingesting it. (When matters on VMs with free page reporting, like
        // this one: memory freed seconds before a dump is handed back to the
        // host, and writing the next dump into it is several times slower
        // than into memory freed a moment ago.)
        if i > 0 {
            let _ = fs::remove_dir_all(raw_dir(i - 1));
        }
        raws.push(Cp {
            frozen_ms: stats.and_then(|s| s.frozen_time).unwrap_or(0) as f64 / 1e3,
            dump_ms: t.elapsed().as_secs_f64() * 1e3,
            ingest_ms: 0.0,
            bytes,
            new_bytes: bytes,
            node_bytes: 0,
            grown: bytes,
            new_raw: bytes,
        });
        eprintln!("raw criu checkpoint {} done", i + 1);
    };
    // Change the order every round, so no side always follows another's
    // I/O (or the raw dump's free of the previous one); the dumps of a
    // round are spread evenly over `gap`.
    let per_round = MODES.len() as u32 + 1;
    for i in 0..a.checkpoints {
        for (k, step) in round_order(i, runs.len()).into_iter().enumerate() {
            if k > 0 {
                std::thread::sleep(a.gap / per_round);
            }
            match step {
                Step::Store(m) => engine_cp(&mut runs[m], i),
                Step::Raw => raw_cp(i),
            }
        }
        if i + 1 < a.checkpoints {
            std::thread::sleep(a.gap / per_round);
        }
    }
    let (store, ours, ids) = (&runs[0].store, &runs[0].cps, &runs[0].ids);

    // Pages that changed between consecutive supervise checkpoints.
    let imgs = store.list().unwrap();
    let by_id: HashMap<_, _> = imgs.iter().map(|i| (i.id.clone(), i.clone())).collect();
    let mut changed = vec![0u64; ids.len()];
    let mut prev_pages: Option<HashMap<(String, u64), [u8; 32]>> = None;
    for (k, id) in ids.iter().enumerate() {
        let d = scratch_dir(&work.join("m"), by_id[id].size_bytes).expect("scratch dir");
        let m = store.materialise(&by_id[id], &d).unwrap();
        let pages = page_map(&m.path);
        fs::remove_dir_all(&m.path).unwrap();
        if let Some(prev) = &prev_pages {
            changed[k] = pages
                .iter()
                .filter(|(key, h)| prev.get(*key) != Some(*h))
                .count() as u64;
        }
        prev_pages = Some(pages);
    }

    // Kill and restore, both ways.
    let newest = &by_id[ids.last().unwrap()];
    drop(job);
    nix::unistd::sync();
    let t0 = Instant::now();
    let d = scratch_dir(&work.join("restore"), newest.size_bytes).expect("scratch dir");
    let m = store.materialise(newest, &d).expect("materialise");
    let r = job::restore(reaper, &m.path, &opts, &files, &mut |_, _| true, None).expect("restore");
    let ours_restore = t0.elapsed();
    let mat = m.duration;
    let on_tmpfs = m.path.starts_with("/dev/shm");
    fs::remove_dir_all(&m.path).unwrap();
    drop(KillOnDrop(Some(r.running)));

    let raw_newest = raw_dir(a.checkpoints - 1);
    let _ = fs::remove_file(raw_newest.join("stats-restore"));
    nix::unistd::sync();
    let t0 = Instant::now();
    let r = job::restore(reaper, &raw_newest, &opts, &files, &mut |_, _| true, None)
        .expect("restore raw");
    let engine_raw = t0.elapsed();
    drop(KillOnDrop(Some(r.running)));

    nix::unistd::sync();
    let cli_raw = raw_cli_restore(reaper, &raw_newest, &work);

    // Materialise throughput per store mode: the newest checkpoint of each
    // store, once per mode per round, the order rotating every round.
    let mut mats: Vec<Vec<(u64, f64)>> = vec![Vec::new(); runs.len()];
    for rep in 0..a.checkpoints {
        for k in 0..runs.len() {
            let m = (k + rep) % runs.len();
            let run = &runs[m];
            let newest = run
                .store
                .list()
                .unwrap()
                .into_iter()
                .find(|i| Some(&i.id) == run.ids.last())
                .expect("newest checkpoint listed");
            nix::unistd::sync();
            warm_memory(a.warm_gib);
            let d = scratch_dir(&work.join("m"), newest.size_bytes).expect("scratch dir");
            let mt = run.store.materialise(&newest, &d).expect("materialise");
            mats[m].push((mt.bytes, mt.duration.as_secs_f64()));
            fs::remove_dir_all(&mt.path).unwrap();
        }
    }

    // Report.
    println!();
    println!(
        "machine: {} cores, kernel {}, {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
        a.criu_version
    );
    println!(
        "job: {} MiB resident, {} page(s) rewritten every {} ms, checkpoints {:?} apart",
        a.mb, a.pages, a.interval_ms, a.gap
    );
    println!();
    println!(
        "{:<4} {:>10} {:>10} {:>10} {:>12} {:>12} {:>10} {:>12} | {:>10} {:>10} {:>12}",
        "#",
        "frozen ms",
        "dump ms",
        "ingest ms",
        "logical MiB",
        "stored MiB",
        "meta KiB",
        "changed MiB",
        "raw froz",
        "raw ms",
        "raw MiB"
    );
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    for i in 0..ids.len() {
        let (o, r) = (&ours[i], &raws[i]);
        println!(
            "{:<4} {:>10.1} {:>10.0} {:>10.0} {:>12.1} {:>12.3} {:>10.1} {:>12.3} | {:>10.1} {:>10.0} {:>12.1}",
            i + 1,
            o.frozen_ms,
            o.dump_ms,
            o.ingest_ms,
            mib(o.bytes),
            mib(o.new_bytes),
            o.node_bytes as f64 / 1024.0,
            if i == 0 { f64::NAN } else { mib(changed[i] * 4096) },
            r.frozen_ms,
            r.dump_ms,
            mib(r.bytes)
        );
    }
    let frozen_ours: f64 = ours.iter().map(|c| c.frozen_ms).sum::<f64>() / ours.len() as f64;
    let frozen_raw: f64 = raws.iter().map(|c| c.frozen_ms).sum::<f64>() / raws.len() as f64;
    let later_stored: u64 = ours[1..].iter().map(|c| c.new_bytes).sum();
    let later_changed: u64 = changed[1..].iter().sum::<u64>() * 4096;
    let later_meta: u64 = ours[1..].iter().map(|c| c.node_bytes).sum();
    println!();
    println!(
        "restore, kill to running: supervise {:.0} ms (materialise {:.0} ms{}, engine restore {:.0} ms); raw `criu restore` {}; engine from the raw dump {:.0} ms",
        ours_restore.as_secs_f64() * 1e3,
        mat.as_secs_f64() * 1e3,
        if on_tmpfs { " to tmpfs" } else { " to disk" },
        (ours_restore - mat).as_secs_f64() * 1e3,
        cli_raw
            .map(|d| format!("{:.0} ms", d.as_secs_f64() * 1e3))
            .unwrap_or_else(|| "failed".into()),
        engine_raw.as_secs_f64() * 1e3
    );
    println!();
    println!(
        "freeze time per checkpoint, supervise / raw criu:        {:.3}  (target <= 1.05; {:.1} ms / {:.1} ms)",
        frozen_ours / frozen_raw,
        frozen_ours,
        frozen_raw
    );
    println!(
        "bytes stored per later checkpoint / bytes that changed:  {:.3}  (target <= 1.5 + 1 MiB metadata; {:.3} MiB stored / {:.3} MiB changed, of which tree nodes {:.1} KiB per checkpoint)",
        later_stored as f64 / later_changed.max(1) as f64,
        mib(later_stored) / (ours.len() - 1) as f64,
        mib(later_changed) / (ours.len() - 1) as f64,
        later_meta as f64 / 1024.0 / (ours.len() - 1) as f64
    );
    let within = later_stored as f64
        <= 1.5 * later_changed as f64 + (ours.len() as f64 - 1.0) * (1 << 20) as f64;
    println!(
        "   stored <= 1.5 x changed + 1 MiB per checkpoint: {}",
        if within { "yes" } else { "NO" }
    );
    let base = cli_raw.unwrap_or(engine_raw);
    println!(
        "kill-to-running restore, supervise / raw criu restore:   {:.3}  (target <= 1.3; vs engine on the raw dump: {:.3})",
        ours_restore.as_secs_f64() / base.as_secs_f64(),
        ours_restore.as_secs_f64() / engine_raw.as_secs_f64()
    );
    println!(
        "disk: store {:.1} MiB for {} checkpoints; {} raw dumps would take {:.1} MiB",
        mib(supervise::store::dir_size(&work.join("store"))),
        ids.len(),
        ids.len(),
        mib(raws.iter().map(|r| r.bytes).sum())
    );
    report_modes(&runs, &mats, &raws);
    let _ = fs::remove_dir_all(&work);
}

/// The store modes' table and their ratios to `plain`, with targets.
fn report_modes(runs: &[ModeRun], mats: &[Vec<(u64, f64)>], raws: &[Cp]) {
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

/// Kills and reaps the job when dropped (also when the benchmark panics).
struct KillOnDrop(Option<job::Running>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut j) = self.0.take() {
            j.kill();
            let _ = job_wait(&mut j);
        }
    }
}

fn job_wait(job: &mut job::Running) -> Option<supervise::reaper::ExitStatus> {
    if !job.is_waitable() {
        return None;
    }
    let rt = tokio::runtime::Handle::current();
    Some(rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(30), job.wait())
            .await
            .expect("job did not die")
    }))
}

fn criu_version() -> String {
    Command::new(criu::criu_bin())
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| criu::parse_version(&String::from_utf8_lossy(&o.stdout)))
        .map(|(a, b, c)| format!("CRIU {a}.{b}.{c}"))
        .unwrap_or_else(|| "CRIU ?".into())
}

/// Plain `criu restore` in a fresh PID + mount namespace; done when its
/// pidfile appears. The restored job is then killed with the namespace.
fn raw_cli_restore(reaper: &Reaper, dir: &Path, work: &Path) -> Option<Duration> {
    let pidfile = work.join("raw-restore.pid");
    let _ = fs::remove_file(&pidfile);
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--pid",
        "--mount",
        "--fork",
        "--mount-proc",
        "--propagation",
        "slave",
        "--",
    ])
    .arg(criu::criu_bin())
    .args(["restore", "-v2", "-D"])
    .arg(dir)
    .arg("--pidfile")
    .arg(&pidfile)
    .arg("-o")
    .arg(work.join("raw-restore.log"))
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let t0 = Instant::now();
    let mut sp = reaper.spawn(&mut cmd).ok()?;
    let deadline = t0 + Duration::from_secs(120);
    let mut done = None;
    while Instant::now() < deadline {
        if fs::metadata(&pidfile).map(|m| m.len() > 0).unwrap_or(false) {
            done = Some(t0.elapsed());
            break;
        }
        if let Ok(st) = sp.exit.try_recv() {
            eprintln!("raw criu restore ended early ({st}); see raw-restore.log");
            return None;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    // unshare's child (criu, PID 1 of the namespace) dies, and the namespace with it.
    for p in supervise::proc::tree(sp.pid).iter().rev() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*p),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let _ = sp.exit.blocking_recv();
    done
}

/// `pagemap_head` / `pagemap_entry` from CRIU's pagemap.proto.
#[derive(Clone, PartialEq, prost::Message)]
struct PagemapHead {
    #[prost(uint32, required, tag = "1")]
    pages_id: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PagemapEntry {
    #[prost(uint64, required, tag = "1")]
    vaddr: u64,
    #[prost(uint32, required, tag = "2")]
    compat_nr_pages: u32,
    #[prost(bool, optional, tag = "3")]
    in_parent: Option<bool>,
    #[prost(uint32, optional, tag = "4")]
    flags: Option<u32>,
    #[prost(uint64, optional, tag = "5")]
    nr_pages: Option<u64>,
}

const PE_PRESENT: u32 = 1 << 2;

/// (pagemap file, virtual address) -> BLAKE3 of the page, for every page
/// stored in the image directory.
fn page_map(dir: &Path) -> HashMap<(String, u64), [u8; 32]> {
    let mut out = HashMap::new();
    for e in fs::read_dir(dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if !(name.starts_with("pagemap-") && name.ends_with(".img")) {
            continue;
        }
        let bytes = fs::read(e.path()).unwrap();
        // Two magic words, then length-prefixed entries.
        let mut off = 8;
        let mut next = || -> Option<&[u8]> {
            let len = u32::from_le_bytes(bytes.get(off..off + 4)?.try_into().ok()?) as usize;
            let m = bytes.get(off + 4..off + 4 + len)?;
            off += 4 + len;
            Some(m)
        };
        let head = PagemapHead::decode(next().unwrap()).unwrap();
        let pages = fs::read(dir.join(format!("pages-{}.img", head.pages_id))).unwrap();
        let mut at = 0usize;
        while let Some(m) = next() {
            let pe = PagemapEntry::decode(m).unwrap();
            let present = match pe.flags {
                Some(f) => f & PE_PRESENT != 0,
                None => !pe.in_parent.unwrap_or(false),
            };
            if !present {
                continue;
            }
            for k in 0..pe.nr_pages.unwrap_or(pe.compat_nr_pages as u64) {
                let page = &pages[at..at + 4096];
                out.insert(
                    (name.clone(), pe.vaddr + k * 4096),
                    *blake3::hash(page).as_bytes(),
                );
                at += 4096;
            }
        }
    }
    out
}
