//! `supervise` command line. Thin: parsing, logging set-up, exit codes.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use supervise::config::JobConfig;
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
    /// List a job's images, newest first.
    Images {
        /// Job file.
        job: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
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
        Cmd::Images { job, json } => images(&job, json),
        Cmd::Run { jobs } => run(&jobs),
        Cmd::Init => unreachable!("handled before parsing"),
    }
}

fn images(job: &std::path::Path, json: bool) -> Result<ExitCode> {
    let cfg = JobConfig::load(job)?;
    let list = if cfg.checkpoint.dir.exists() {
        supervise::store::ImageStore::open_read_only(&cfg.checkpoint.dir)
            .and_then(|s| s.list())
            .with_context(|| format!("job {}", cfg.name))?
    } else {
        Vec::new()
    };
    if json {
        let v: Vec<_> = list
            .iter()
            .map(|i| {
                serde_json::json!({
                    "id": i.id,
                    "created": i.created.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    "size_bytes": i.size_bytes,
                    "duration_ms": i.manifest.meta.duration_ms,
                    "frozen_us": i.manifest.meta.frozen_us,
                    "job_files": i.manifest.meta.extra.get("files"),
                    "job_files_copied_bytes": i.manifest.meta.extra.get("files_copied_bytes"),
                    "path": i.path,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{:<24} {:<21} {:>12} {:>10}",
            "ID", "CREATED", "SIZE", "FROZEN"
        );
        for i in &list {
            println!(
                "{:<24} {:<21} {:>12} {:>10}",
                i.id,
                i.created.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                i.size_bytes,
                i.manifest
                    .meta
                    .frozen_us
                    .map(|u| format!("{:.1}ms", u as f64 / 1000.0))
                    .unwrap_or_else(|| "-".into())
            );
        }
    }
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
