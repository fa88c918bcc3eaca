//! `supervise` command line. Thin: parsing, logging set-up, exit codes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use clap::{CommandFactory, Parser, Subcommand};
use supervise::config::JobConfig;
use supervise::control::Request;
use supervise::daemon::RunOptions;
use supervise::store::{ImageStore, StoreError};

#[path = "cli/progress.rs"]
mod progress;
#[path = "cli/service.rs"]
mod service;

/// `images`/`verify`/`gc` take a job file, or the name of a job of the
/// running supervise (no such file, and no `/`-free `.toml` ending): the
/// name, then.
fn remote_name(arg: &Path) -> Option<String> {
    if arg.exists() || arg.extension().is_some_and(|e| e == "toml") {
        return None;
    }
    Some(arg.to_string_lossy().into_owned())
}

#[derive(Parser)]
#[command(
    name = "supervise",
    version,
    about = "Keep long-running jobs alive across crashes with CRIU checkpoints"
)]
struct Cli {
    /// Control socket of the running supervise [default: $SUPERVISE_SOCKET,
    /// else /run/supervise/supervise.sock for root,
    /// $XDG_RUNTIME_DIR/supervise/supervise.sock or
    /// /tmp/supervise-<uid>/supervise.sock for others]. Clients refuse a
    /// socket whose directory another user controls or that another
    /// user's process answers.
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Launch (or attach to) the jobs, checkpoint them on schedule, restore them when they die.
    /// With --service (or no job files), also the node service: local
    /// users submit jobs that run as themselves.
    Run {
        /// Job files (TOML), or directories of them.
        jobs: Vec<PathBuf>,
        /// Be the node service (implied without job files): every local
        /// user may submit jobs (`supervise submit`), which run as that user.
        #[arg(long)]
        service: bool,
        /// The daemon's configuration (limits, who may submit).
        #[arg(long, value_name = "PATH", default_value = supervise::service::DEFAULT_CONFIG)]
        config: PathBuf,
        /// Serve Prometheus metrics on this loopback address (e.g. 127.0.0.1:9464),
        /// or on a Unix socket (unix:/PATH; gets its directory's group, mode 0660).
        #[arg(long, value_name = "ADDR")]
        metrics: Option<supervise::metrics::MetricsAddr>,
        /// At most this many checkpoints (dump, commit, retention) at once
        /// across all jobs; the others wait their turn, first due first.
        /// 0: no limit. [default: the number of CPUs]
        #[arg(long, value_name = "N")]
        max_concurrent_dumps: Option<usize>,
    },
    /// Preflight: can checkpointing work on this machine? With job files,
    /// also where each job's store key is (without it its images cannot
    /// be read).
    Check {
        /// Job files (or directories of them).
        jobs: Vec<PathBuf>,
    },
    /// List a job's images, newest first, with their logical size, the
    /// bytes each newly stored, CRIU's frozen time and whether it verifies.
    Images {
        /// Job file, or the name of a job of the running supervise (a
        /// submitted job's images are read by the service for its owner).
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
        /// Job file, or the name of a job of the running supervise.
        job: PathBuf,
        /// Rewrite what can be repaired (from parity or the second copy)
        /// and drop objects that cannot, so the next checkpoint stores
        /// them afresh.
        #[arg(long)]
        repair: bool,
    },
    /// Reclaim stored data no image references (also run after retention).
    Gc {
        /// Job file, or the name of a job of the running supervise.
        job: PathBuf,
    },
    /// Hand a job to the node service: it runs as you (your uid, groups),
    /// its images are kept by the service. With --wait, wait for its end
    /// (a Slurm batch step: final checkpoint and requeue at the job's
    /// pre-termination signal).
    Submit {
        /// Job file.
        job: PathBuf,
        /// Wait until the job ends; exit with its exit status.
        #[arg(long)]
        wait: bool,
    },
    /// Stop a submitted job and forget it.
    Cancel {
        /// Job name.
        name: String,
        /// Delete its images and state too.
        #[arg(long)]
        purge: bool,
    },
    /// Show the jobs of the running supervise.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Checkpoint a job now; waits and prints the result.
    Checkpoint {
        /// Job name.
        name: String,
    },
    /// Replace a job's running process by an image (default: the newest).
    Restore {
        /// Job name.
        name: String,
        /// Checkpoint id (see `supervise images`).
        #[arg(long)]
        image: Option<String>,
    },
    /// Stop a job; it stays stopped until `supervise start`.
    Stop {
        /// Job name.
        name: String,
        /// Take a checkpoint first (the job is not stopped if it fails).
        #[arg(long)]
        checkpoint: bool,
    },
    /// Start a stopped job: resume from its newest image, or launch it.
    Start {
        /// Job name.
        name: String,
    },
    /// Leave every job running as it is (no checkpoint) and make supervise
    /// exit 0; a later `supervise run` re-adopts the jobs.
    DetachAll,
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// Shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff).
    #[command(hide = true)]
    Man,
    /// Internal: the systemd unit's ExecStop=. On `systemctl restart` of
    /// UNIT, detach-all; otherwise nothing (systemd's SIGTERM then takes
    /// the final checkpoints).
    #[command(name = "__systemd-stop", hide = true)]
    SystemdStop {
        /// The unit's name (`%n`).
        unit: String,
    },
    /// Internal: PID 1 of a job's namespace.
    #[command(name = "__init", hide = true)]
    Init,
    /// Internal: runs CRIU in a job's namespaces as the job's owner.
    #[command(name = "__nsexec", hide = true)]
    Nsexec,
}

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("__init") {
        supervise::init::main();
    }
    if std::env::args().nth(1).as_deref() == Some("__nsexec") {
        let args: Vec<String> = std::env::args().skip(2).collect();
        std::process::exit(supervise::userns::nsexec(&args));
    }
    let cli = Cli::parse();
    if !matches!(cli.cmd, Cmd::Run { .. }) {
        // A client whose reader went away (`supervise images | head`) ends
        // quietly, as other command-line tools do. `run` keeps SIGPIPE
        // ignored: a client hanging up must never kill the supervisor.
        // SAFETY: setting a signal disposition before any thread exists.
        unsafe {
            let _ = nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGPIPE,
                nix::sys::signal::SigHandler::SigDfl,
            );
        }
    }
    init_logging();
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("supervise: {}", render_error(&e));
            ExitCode::from(2)
        }
    }
}

/// The error and its causes, each said once: a cause whose text an outer
/// message already contains (typically the OS error) is not repeated.
fn render_error(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
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
    let socket = cli
        .socket
        .clone()
        .unwrap_or_else(supervise::control::default_socket);
    match cli.cmd {
        Cmd::Check { jobs } => {
            let mut report = supervise::check::preflight();
            if !jobs.is_empty() {
                report.store_keys(&JobConfig::load_all(&jobs)?);
            }
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
        } => match remote_name(&job) {
            Some(name) => control(
                &socket,
                Request::Images {
                    job: name,
                    verify: !no_verify,
                },
                json,
            ),
            None => images(&job, json, !no_verify),
        },
        Cmd::Verify { job, repair } => match remote_name(&job) {
            Some(name) => control(&socket, Request::Verify { job: name, repair }, false),
            None => verify(&job, repair),
        },
        Cmd::Gc { job } => match remote_name(&job) {
            Some(name) => control(&socket, Request::Gc { job: name }, false),
            None => gc(&job),
        },
        Cmd::Submit { job, wait } => service::submit(&socket, &job, wait),
        Cmd::Cancel { name, purge } => {
            control(&socket, Request::Cancel { job: name, purge }, false)
        }
        Cmd::Run {
            jobs,
            service,
            config,
            metrics,
            max_concurrent_dumps,
        } => {
            let service = (service || jobs.is_empty()).then_some(config);
            run(&jobs, socket, metrics, max_concurrent_dumps, service)
        }
        Cmd::Status { json } => control(&socket, Request::Status, json),
        Cmd::Checkpoint { name } => control(&socket, Request::Checkpoint { job: name }, false),
        Cmd::Restore { name, image } => {
            control(&socket, Request::Restore { job: name, image }, false)
        }
        Cmd::Stop { name, checkpoint } => control(
            &socket,
            Request::Stop {
                job: name,
                checkpoint,
            },
            false,
        ),
        Cmd::Start { name } => control(&socket, Request::Start { job: name }, false),
        Cmd::DetachAll => control(&socket, Request::DetachAll, false),
        Cmd::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "supervise",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Man => {
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::SystemdStop { unit } => match supervise::systemd::restarting(&unit) {
            Ok(true) => {
                eprintln!("supervise: {unit} is restarting: the jobs are left running");
                control(&socket, Request::DetachAll, false)
            }
            Ok(false) => {
                eprintln!("supervise: {unit} is stopping: SIGTERM takes the final checkpoints");
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!(
                    "supervise: cannot tell a restart from a stop ({e}); SIGTERM takes the \
                     final checkpoints"
                );
                Ok(ExitCode::SUCCESS)
            }
        },
        Cmd::Init | Cmd::Nsexec => unreachable!("handled before parsing"),
    }
}

/// glibc gives every thread that allocates under contention an arena of
/// its own (up to 8 per CPU), each keeping its freed memory: with many
/// jobs checkpointing at once that is most of supervise's RSS. Two arenas
/// are plenty for supervise's work; `MALLOC_ARENA_MAX` in the environment,
/// if set, wins. Called before the runtime starts any thread.
fn limit_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; no other thread
        // exists yet.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

/// Exit 0: done; 1: refused or failed (permission denied included); 2: no
/// supervise to talk to, or none that can be trusted (the socket's
/// directory fails the trust rule, or the process answering runs as
/// neither root nor the caller). Everything the server sent is printed
/// with its control characters escaped.
fn control(socket: &std::path::Path, req: Request, json: bool) -> Result<ExitCode> {
    use supervise::control::client::{self, ClientError, Printed};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // The supervisor answers only when done: show that we wait.
    let waiting = match &req {
        Request::Status | Request::DetachAll | Request::Submit { .. } => None,
        Request::Cancel { job, .. } => Some(format!("cancelling {job}")),
        Request::Images { job, .. } => Some(format!("reading the images of {job}")),
        Request::Verify { job, .. } => Some(format!("verifying {job}")),
        Request::Gc { job } => Some(format!("collecting garbage of {job}")),
        Request::Wait { job } => Some(format!("waiting for {job}")),
        Request::Checkpoint { job } => Some(format!("checkpointing {job}")),
        Request::Restore { job, .. } => Some(format!("restoring {job}")),
        Request::Stop { job, .. } => Some(format!("stopping {job}")),
        Request::Start { job } => Some(format!("starting {job}")),
    };
    let spinner = waiting.and_then(progress::Spinner::start);
    let resp = rt.block_on(client::call(socket, &req));
    drop(spinner);
    let resp = match resp {
        Ok(r) => r,
        Err(e @ ClientError::PermissionDenied { .. }) => {
            eprintln!("supervise: {e}");
            return Ok(ExitCode::FAILURE);
        }
        Err(e) => {
            eprintln!("supervise: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    match client::render_response(&resp, json, chrono::Utc::now()) {
        Printed::Out(text) => print!("{text}"),
        Printed::Refused(text) => {
            eprint!("{text}");
            return Ok(ExitCode::FAILURE);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The job's store for `images`/`verify`/`gc`, `None` if it does not
/// exist. A store the caller may not read is an error
/// ([`StoreError::PermissionDenied`]), never "no store". On a terminal
/// (and not `--json`) it draws progress on stderr.
fn open_store(cfg: &JobConfig, json: bool) -> Result<Option<ImageStore>, StoreError> {
    let dir = &cfg.checkpoint.dir;
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if supervise::fsutil::is_permission_denied(&e) => {
            return Err(StoreError::PermissionDenied { path: dir.clone() })
        }
        _ => {}
    }
    let store = ImageStore::open_read_only_with(dir, &cfg.store)?;
    Ok(Some(match progress::Bar::for_terminal(json) {
        Some(bar) => store.with_progress(bar),
        None => store,
    }))
}

/// A store error of `images`/`verify`/`gc`: "permission denied" exits 1
/// (the store is there, the caller may not read it); anything else is an
/// error (exit 2).
fn store_failed(cfg: &JobConfig, e: StoreError) -> Result<ExitCode> {
    if let StoreError::PermissionDenied { .. } = e {
        eprintln!("supervise: job {}: {e}", cfg.name);
        return Ok(ExitCode::FAILURE);
    }
    Err(anyhow::Error::new(e).context(format!("job {}", cfg.name)))
}

/// `r`'s value, or return from the calling command through [`store_failed`].
macro_rules! store_try {
    ($cfg:expr, $r:expr) => {
        match $r {
            Ok(v) => v,
            Err(e) => return store_failed($cfg, e),
        }
    };
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
    let store = store_try!(&cfg, open_store(&cfg, json));
    let list = match &store {
        Some(s) => store_try!(&cfg, s.list()),
        None => Vec::new(),
    };
    let mut verdicts: HashMap<String, Result<(), String>> = HashMap::new();
    if let (true, Some(s)) = (check && !list.is_empty(), &store) {
        let report = store_try!(&cfg, s.verify_all());
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
                    "created_precise": i.created.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
                    "sealed": i.sealed,
                    "pack": i.manifest.stored.as_ref().and_then(|s| s.pack.clone()),
                    "size_bytes": i.size_bytes,
                    "logical_bytes": i.size_bytes,
                    "new_bytes": i.new_bytes,
                    "duration_ms": i.manifest.meta.duration_ms,
                    "frozen_us": i.manifest.meta.frozen_us,
                    "job_files": i.manifest.meta.extra.files,
                    "job_files_copied_bytes": i.manifest.meta.extra.files_copied_bytes,
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

fn verify(job: &Path, repair: bool) -> Result<ExitCode> {
    let cfg = JobConfig::load(job)?;
    let Some(store) = store_try!(&cfg, open_store(&cfg, false)) else {
        return Ok(no_store(&cfg));
    };
    let r = if repair {
        let s = store_try!(&cfg, store.repair());
        for f in &s.rebuilt {
            println!("repaired {f} (from parity)");
        }
        for f in &s.copied {
            println!("repaired {f} (from the second copy)");
        }
        for f in &s.sidecars {
            println!("rewrote  {f}");
        }
        for (f, why) in &s.unrepaired {
            println!("CANNOT   repair {f}: {why}");
        }
        if s.dropped_objects > 0 {
            println!(
                "dropped  {} damaged object(s) from the indexes: the next checkpoint of the \
                 running job stores them afresh",
                s.dropped_objects
            );
        }
        s.verify
    } else {
        store_try!(&cfg, store.verify_all())
    };
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
    let Some(store) = store_try!(&cfg, open_store(&cfg, false)) else {
        return Ok(no_store(&cfg));
    };
    let r = store_try!(&cfg, store.gc());
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

fn run(
    jobs: &[PathBuf],
    socket: PathBuf,
    metrics: Option<supervise::metrics::MetricsAddr>,
    max_concurrent_dumps: Option<usize>,
    service: Option<PathBuf>,
) -> Result<ExitCode> {
    limit_malloc_arenas();
    // Parse everything first: bad input starts nothing.
    let cfgs = JobConfig::load_all(jobs)?;
    let service = match service {
        Some(path) => {
            if !nix::unistd::geteuid().is_root() {
                anyhow::bail!(
                    "the node service (supervise run --service, or no job files) runs as root:                      it runs each user's jobs as that user"
                );
            }
            Some(supervise::service::ServiceConfig::load(&path)?)
        }
        None => None,
    };
    let report = supervise::check::preflight();
    if report.fatal() {
        eprint!("{}", report.render());
        anyhow::bail!("refusing to run: checkpointing cannot work on this machine (see above)");
    }
    let slots = max_concurrent_dumps.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get)
    });
    // Blocking work (dumps, commits, restores, directory scans) is bounded
    // by the dump slots; a small pool keeps threads (and their stacks and
    // allocator state) flat in the number of jobs.
    let blocking = if slots == 0 { 512 } else { (4 * slots).max(16) };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(blocking)
        .build()?;
    let opts = RunOptions {
        socket,
        metrics,
        max_concurrent_dumps: slots,
        criu_version: report.criu_version.map(|(a, b, c)| format!("{a}.{b}.{c}")),
        service,
    };
    let summary = rt.block_on(supervise::daemon::run(cfgs, opts))?;
    Ok(if summary.all_failed() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
