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

mod lazy;
mod report;

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use supervise::config::{CriuOptions, LaunchSpec};
use supervise::criu;
use supervise::criu::pagemap::Pagemap;
use supervise::job::{self, InitFiles};
use supervise::pages::StreamSink;
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

pub(crate) struct Cp {
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
    /// Bytes CRIU wrote into the staging directory (the whole dump, or
    /// everything but the pages when streamed).
    staged: u64,
}

/// A store mode compared by the benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    Plain,
    Sealed,
    SealedParity,
    /// sealed+parity, the pages streamed from CRIU into the store (what
    /// `supervise run` does by default once the store has a checkpoint);
    /// CRIU's other images in a private tmpfs.
    Streamed,
    /// sealed+parity, CRIU's whole dump into a private tmpfs
    /// ([`ImageStore::begin_private`]: what `supervise run` does with
    /// encryption on for a checkpoint that is not streamed, e.g. the
    /// first), where `sealed+parity` dumps into the store's directory on
    /// disk as before.
    InMemory,
}

const MODES: [Mode; 5] = [
    Mode::Plain,
    Mode::Sealed,
    Mode::SealedParity,
    Mode::Streamed,
    Mode::InMemory,
];

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Plain => "plain",
            Mode::Sealed => "sealed",
            Mode::SealedParity => "sealed+parity",
            Mode::Streamed => "streamed",
            Mode::InMemory => "in-memory",
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
            Mode::Streamed => (work.join("store-streamed"), true),
            Mode::InMemory => (work.join("store-in-memory"), true),
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
pub(crate) struct ModeRun {
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

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
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

pub(crate) fn pass(ok: bool) -> &'static str {
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
        private_tmp: false,
    };
    let files = InitFiles {
        status_file: work.join("exit-status"),
        owner: None,
        private_tmp: None,
        watch: None,
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
        let staging = match run.mode {
            // As `supervise run` does with encryption on: the dump into a
            // private tmpfs in the job's state directory.
            Mode::Streamed | Mode::InMemory => {
                let root = work.join("state");
                fs::create_dir_all(&root).unwrap();
                let job_bytes = supervise::proc::tree_memory(job_pid.0);
                let (s, plan) = run
                    .store
                    .begin_private(&root, job_bytes, run.mode == Mode::Streamed)
                    .unwrap();
                assert_eq!(plan.stream, run.mode == Mode::Streamed, "{plan:?}");
                s
            }
            _ => run.store.begin().unwrap(),
        };
        let mut sink = (run.mode == Mode::Streamed)
            .then(|| StreamSink::new(staging.path(), staging.stream().unwrap()));
        let o = criu::dump_with(
            reaper,
            job_pid.0,
            staging.path(),
            &opts,
            None,
            criu::DumpMode::Full,
            &mut |_| true,
            sink.as_mut()
                .map(|s| s as &mut (dyn criu::page_server::DumpSink + Send)),
            None,
        )
        .expect("engine dump");
        let staged = supervise::store::dir_size(staging.path());
        if std::env::var_os("BENCH_VERBOSE").is_some() {
            eprintln!("engine stats: {:?}", o.stats);
        }
        let t = Instant::now();
        let info = staging
            .commit_with(
                CheckpointMeta {
                    job: "bench".into(),
                    criu_version: String::new(),
                    duration_ms: o.duration.as_millis() as u64,
                    frozen_us: o.stats.as_ref().and_then(|s| s.frozen_time).map(u64::from),
                    pages_written: o.stats.as_ref().and_then(|s| s.pages_written),
                    root_pid: job_pid.1,
                    extra: Default::default(),
                },
                sink.map(StreamSink::into_stream),
            )
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
            staged,
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
            staged: bytes,
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
    let changed = lazy::changed_pages(&runs[0], &work);

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

    // Lazy restore from the streamed store (what `supervise run` does).
    let streamed = runs
        .iter()
        .find(|r| r.mode == Mode::Streamed)
        .expect("streamed mode");
    nix::unistd::sync();
    let lazy = lazy::restore(reaper, streamed, &opts, &files, &work);
    let streamed_changed = lazy::changed_pages(streamed, &work);

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
    report::report_modes(&runs, &mats, &raws);
    lazy::report(streamed, &streamed_changed, &raws, &lazy, cli_raw);
    let _ = fs::remove_dir_all(&work);
}

/// Kills and reaps the job when dropped (also when the benchmark panics).
pub(crate) struct KillOnDrop(Option<job::Running>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut j) = self.0.take() {
            j.kill();
            let _ = job_wait(&mut j);
        }
    }
}

pub(crate) fn job_wait(job: &mut job::Running) -> Option<supervise::reaper::ExitStatus> {
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

/// (pagemap file, virtual address) -> BLAKE3 of the page, for every page
/// stored in the image directory.
pub(crate) fn page_map(dir: &Path) -> HashMap<(String, u64), [u8; 32]> {
    let mut out = HashMap::new();
    for e in fs::read_dir(dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if !(name.starts_with("pagemap-") && name.ends_with(".img")) {
            continue;
        }
        let map = Pagemap::parse(&fs::read(e.path()).unwrap()).unwrap();
        let pages = fs::read(dir.join(format!("pages-{}.img", map.pages_id))).unwrap();
        let mut at = 0usize;
        for pe in map.entries.iter().filter(|e| e.in_pages_file()) {
            for k in 0..pe.pages() {
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
