//! `supervise` command line. Thin: parsing, logging set-up, exit codes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use supervise::config::JobConfig;
use supervise::store::ImageStore;
use supervise::supervisor::Supervisor;

#[derive(Parser)]
#[command(
    name = "supervise",
    version,
    about = "Keep long-running jobs alive across crashes with CRIU checkpoints"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Launch (or attach to) the jobs, checkpoint them on schedule, restore them when they die.
    Run {
        /// Job files (TOML).
        #[arg(required = true)]
        jobs: Vec<PathBuf>,
    },
    /// Preflight: can checkpointing work on this machine?
    Check,
    /// List a job's images, newest first, with their logical size, the
    /// bytes each newly stored, CRIU's frozen time and whether it verifies.
    Images {
        /// Job file.
        job: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Skip reading every stored piece (the VERIFIED column shows "-").
        #[arg(long)]
        no_verify: bool,
    },
    /// Check every stored piece of every image against its hash; exits 1
    /// on damage, naming the image and the piece.
    Verify {
        /// Job file.
        job: PathBuf,
    },
    /// Reclaim stored data no image references (also run after retention).
    Gc {
        /// Job file.
        job: PathBuf,
    },
    /// Internal: PID 1 of a job's namespace.
    #[command(name = "__init", hide = true)]
    Init,
}

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("__init") {
        supervise::init::main();
    }
    let cli = Cli::parse();
    init_logging();
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("supervise: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SUPERVISE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn real_main(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Check => {
            let report = supervise::check::preflight();
            print!("{}", report.render());
            Ok(if report.fatal() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Cmd::Images {
            job,
            json,
            no_verify,
        } => images(&job, json, !no_verify),
        Cmd::Verify { job } => verify(&job),
        Cmd::Gc { job } => gc(&job),
        Cmd::Run { jobs } => run(&jobs),
        Cmd::Init => unreachable!("handled before parsing"),
    }
}

fn open_store(cfg: &JobConfig) -> Result<Option<ImageStore>> {
    if !cfg.checkpoint.dir.exists() {
        return Ok(None);
    }
    Ok(Some(
        ImageStore::open_read_only(&cfg.checkpoint.dir)
            .with_context(|| format!("job {}", cfg.name))?,
    ))
}

fn no_store(cfg: &JobConfig) -> ExitCode {
    println!(
        "job {}: no image store at {}",
        cfg.name,
        cfg.checkpoint.dir.display()
    );
    ExitCode::SUCCESS
}

fn images(job: &Path, json: bool, check: bool) -> Result<ExitCode> {
    let cfg = JobConfig::load(job)?;
    let store = open_store(&cfg)?;
    let list = match &store {
        Some(s) => s.list().with_context(|| format!("job {}", cfg.name))?,
        None => Vec::new(),
    };
    let mut verdicts: HashMap<String, Result<(), String>> = HashMap::new();
    if let (true, Some(s)) = (check && !list.is_empty(), &store) {
        let report = s
            .verify_all()
            .with_context(|| format!("job {}", cfg.name))?;
        verdicts.extend(report.checkpoints);
    }
    let mb = |b: u64| format!("{:.1} MiB", b as f64 / (1 << 20) as f64);
    if json {
        let v: Vec<_> = list
            .iter()
            .map(|i| {
                let verdict = verdicts.get(&i.id);
                serde_json::json!({
                    "id": i.id,
                    "created": i.created.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    "size_bytes": i.size_bytes,
                    "logical_bytes": i.size_bytes,
                    "new_bytes": i.new_bytes,
                    "duration_ms": i.manifest.meta.duration_ms,
                    "frozen_us": i.manifest.meta.frozen_us,
                    "verified": verdict.map(|r| r.is_ok()),
                    "damage": verdict.and_then(|r| r.as_ref().err()),
                    "path": i.path,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{:<24} {:<21} {:>12} {:>12} {:>10} {:>8}",
            "ID", "CREATED", "LOGICAL", "NEW", "FROZEN", "VERIFIED"
        );
        for i in &list {
            println!(
                "{:<24} {:<21} {:>12} {:>12} {:>10} {:>8}",
                i.id,
                i.created.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                mb(i.size_bytes),
                mb(i.new_bytes),
                i.manifest
                    .meta
                    .frozen_us
                    .map(|u| format!("{:.1}ms", u as f64 / 1000.0))
                    .unwrap_or_else(|| "-".into()),
                match verdicts.get(&i.id) {
                    Some(Ok(())) => "yes",
                    Some(Err(_)) => "NO",
                    None => "-",
                }
            );
        }
        for (id, why) in verdicts
            .iter()
            .filter_map(|(id, r)| Some((id, r.as_ref().err()?)))
        {
            eprintln!("supervise: image {id} is damaged: {why}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn verify(job: &Path) -> Result<ExitCode> {
    let cfg = JobConfig::load(job)?;
    let Some(store) = open_store(&cfg)? else {
        return Ok(no_store(&cfg));
    };
    let r = store
        .verify_all()
        .with_context(|| format!("job {}", cfg.name))?;
    for (id, res) in &r.checkpoints {
        match res {
            Ok(()) => println!("ok       {id}"),
            Err(why) => println!("DAMAGED  {id}: {why}"),
        }
    }
    for (id, why) in &r.unreadable {
        println!("DAMAGED  {id}: {why}");
    }
    for (pack, why) in &r.bad_indexes {
        println!("DAMAGED  pack {pack}: {why}");
    }
    let bad = r.checkpoints.iter().filter(|c| c.1.is_err()).count() + r.unreadable.len();
    println!(
        "job {}: {} image(s), {} damaged; {} stored object(s) checked",
        cfg.name,
        r.checkpoints.len() + r.unreadable.len(),
        bad,
        r.objects_checked
    );
    Ok(if r.damaged() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn gc(job: &Path) -> Result<ExitCode> {
    let cfg = JobConfig::load(job)?;
    let Some(store) = open_store(&cfg)? else {
        return Ok(no_store(&cfg));
    };
    let r = store.gc().with_context(|| format!("job {}", cfg.name))?;
    if let Some(why) = &r.refused {
        println!("job {}: gc deleted nothing: {why}", cfg.name);
        return Ok(ExitCode::FAILURE);
    }
    println!(
        "job {}: removed {} pack(s), rewrote {}, freed {} bytes, {} leftover(s); {} live object(s) in {} bytes of packs",
        cfg.name, r.removed_packs, r.rewritten_packs, r.freed_bytes, r.leftovers, r.live_objects, r.pack_bytes
    );
    Ok(ExitCode::SUCCESS)
}

fn run(jobs: &[PathBuf]) -> Result<ExitCode> {
    // Parse everything first: bad input starts nothing.
    let cfgs = jobs
        .iter()
        .map(|p| JobConfig::load(p))
        .collect::<Result<Vec<_>, _>>()?;
    let report = supervise::check::preflight();
    if report.fatal() {
        eprint!("{}", report.render());
        anyhow::bail!("refusing to run: checkpointing cannot work on this machine (see above)");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let reaper =
            supervise::reaper::Reaper::install().context("cannot become a child subreaper")?;
        let (tx, rx) = tokio::sync::watch::channel(false);
        let mut sups = Vec::new();
        for cfg in cfgs {
            let mut s = Supervisor::new(cfg, reaper.clone())?;
            if let Some((a, b, c)) = report.criu_version {
                s.set_criu_version(format!("{a}.{b}.{c}"));
            }
            sups.push(s);
        }
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
            let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
            }
            let _ = tx.send(true);
        });
        let mut set = tokio::task::JoinSet::new();
        for s in sups {
            let span = tracing::info_span!("job", job = %s.name());
            set.spawn(tracing::Instrument::instrument(s.run(rx.clone()), span));
        }
        let mut failed = 0;
        let mut total = 0;
        while let Some(res) = set.join_next().await {
            total += 1;
            match res {
                Ok(o) if o.is_failure() => failed += 1,
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(error = %e, "job task panicked");
                    failed += 1
                }
            }
        }
        Ok(if failed > 0 && failed == total {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        })
    })
}
