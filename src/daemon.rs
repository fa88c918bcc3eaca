//! The `supervise run` process: one supervisor task per job, the control
//! socket, the optional metrics listener, and SIGTERM/SIGINT handling.

use std::path::PathBuf;
use std::sync::Arc;

use tracing::Instrument;

mod node;

use crate::config::JobConfig;
use crate::control::server::{Server, ServerError};
use crate::control::{dispatch, request_shutdown, Caller, Request, Response, Shutdown};
use crate::service::{Registry, ServiceConfig};
use node::{Factory, Node};

use crate::metrics::{Metrics, MetricsAddr, MetricsError};
use crate::reaper::Reaper;
use crate::slurm::SlurmContext;
use crate::supervisor::{Criu, Supervisor, SupervisorError};
pub use node::image_row;

/// Errors that keep `supervise run` from starting (nothing is started then).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A job could not be prepared.
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
    /// The control socket could not be set up.
    #[error(transparent)]
    Control(#[from] ServerError),
    /// The metrics listener could not be set up.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// The node service cannot start.
    #[error("{0}")]
    Service(String),
    /// Becoming a child subreaper or installing signal handlers failed.
    #[error("{what}: {source}")]
    Os {
        /// What was being done.
        what: &'static str,
        /// Cause.
        source: std::io::Error,
    },
}

/// Options of `supervise run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Control socket path.
    pub socket: PathBuf,
    /// Loopback address (or Unix socket) for Prometheus metrics, if wanted.
    pub metrics: Option<MetricsAddr>,
    /// CRIU's version, recorded in each manifest.
    pub criu_version: Option<String>,
    /// At most this many checkpoints at once across the jobs (0: no
    /// limit); the others wait in the order their ticks came due.
    pub max_concurrent_dumps: usize,
    /// The node service: local users submit jobs that run as themselves
    /// (`supervise run --service`, or no job files).
    pub service: Option<ServiceConfig>,
}

/// How the jobs ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Jobs supervised.
    pub jobs: usize,
    /// Of which failed (gave up, or their task panicked).
    pub failed: usize,
}

impl Summary {
    /// `supervise run` exits non-zero when every job failed.
    pub fn all_failed(&self) -> bool {
        self.jobs > 0 && self.failed == self.jobs
    }
}

/// Runs the jobs until each completes, fails, SIGTERM/SIGINT stops them, or
/// `supervise detach-all` leaves them running.
/// Must be called inside a tokio runtime.
pub async fn run(cfgs: Vec<JobConfig>, opts: RunOptions) -> Result<Summary, DaemonError> {
    let reaper = Reaper::install().map_err(|source| DaemonError::Os {
        what: "cannot become a child subreaper",
        source,
    })?;
    // The descriptor budget: the hard limit, not the historical 1024
    // (the listeners' caps and the reserve for checkpoints come from it).
    match crate::fdlimit::raise() {
        Ok(r) if r.now < 4096 => tracing::warn!(
            nofile = r.now,
            "few file descriptors allowed (RLIMIT_NOFILE hard limit); raise it (LimitNOFILE= in the unit) for many jobs"
        ),
        Ok(r) => tracing::debug!(before = r.before, nofile = r.now, "raised RLIMIT_NOFILE"),
        Err(e) => tracing::warn!(error = %e, "cannot raise RLIMIT_NOFILE"),
    }
    let metrics = Metrics::new();
    // Everything that can fail is set up before any job starts. The
    // metrics address is checked now (loopback, trusted directory), but
    // bound later and retried: a port someone else holds must not keep
    // the jobs from being supervised.
    let server = Server::bind(&opts.socket).await?;
    if let Some(addr) = &opts.metrics {
        crate::metrics::check_addr(addr)?;
    }
    let slurm = SlurmContext::from_env();
    if let Some(ctx) = &slurm {
        tracing::info!(
            slurm_job = %ctx.job_id,
            node = %ctx.node,
            restart = ctx.restart_count,
            "running inside a Slurm job"
        );
    }
    // tokio's semaphore is fair: jobs get slots in the order they asked,
    // which is the order their ticks came due.
    let slots = Arc::new(tokio::sync::Semaphore::new(
        match opts.max_concurrent_dumps {
            0 => tokio::sync::Semaphore::MAX_PERMITS,
            n => n,
        },
    ));
    tracing::info!(
        jobs = cfgs.len(),
        max_concurrent_dumps = opts.max_concurrent_dumps,
        "starting"
    );
    // One engine for every job: what CRIU supports is asked once.
    let engine = Arc::new(Criu::new(reaper.clone()));
    let factory = Factory {
        engine,
        metrics: metrics.clone(),
        slots,
        slurm: slurm.clone(),
        criu_version: opts.criu_version.clone(),
    };
    let registry = Arc::new(Registry::default());
    let mut sups = Vec::new();
    let mut pre_term: Vec<(i32, String, bool)> = Vec::new();
    for cfg in cfgs {
        pre_term.push((
            cfg.slurm.signal.number(),
            cfg.name.clone(),
            cfg.slurm.requeue,
        ));
        let (s, entry) = factory.make(cfg, None, None, None)?;
        registry.add(entry);
        sups.push(s);
    }
    let (tx, rx) = tokio::sync::watch::channel(Shutdown::No);
    let tx = Arc::new(tx);
    let (spawn_tx, mut spawn_rx) = tokio::sync::mpsc::unbounded_channel();
    let node = Arc::new(Node {
        registry: registry.clone(),
        service: opts.service.clone(),
        factory,
        spawn: spawn_tx,
        shutdown: rx.clone(),
    });
    if let Some(svc) = &opts.service {
        start_service(&node, svc, &server)?;
    }
    {
        use tokio::signal::unix::{signal, SignalKind};
        let os = |source| DaemonError::Os {
            what: "cannot install signal handlers",
            source,
        };
        let mut term = signal(SignalKind::terminate()).map_err(os)?;
        let mut int = signal(SignalKind::interrupt()).map_err(os)?;
        let tx = tx.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received"),
                    _ = int.recv() => tracing::info!("SIGINT received"),
                }
                // After `detach-all` (systemd's ExecStop= on a restart),
                // systemd's SIGTERM changes nothing: the jobs stay running.
                if request_shutdown(&tx, Shutdown::Configured) == Shutdown::DetachAll {
                    tracing::info!("detach-all is under way; the jobs are left running");
                }
            }
        });
    }
    if let Some(ctx) = slurm.clone() {
        slurm_signals(ctx, pre_term, registry.clone(), reaper.clone())?;
    }
    // Only now, with every job prepared, is supervise ready for clients.
    tracing::info!(socket = %server.path().display(), "control socket ready");
    let control = tokio::spawn(server.serve(node.clone(), tx));
    let metrics_task = opts.metrics.clone().map(|addr| {
        tokio::spawn(crate::metrics::serve_retrying(
            addr,
            metrics.clone(),
            std::time::Duration::from_secs(5),
        ))
    });
    let mut set = tokio::task::JoinSet::new();
    let run_job = |set: &mut tokio::task::JoinSet<_>, s: Supervisor<Criu>| {
        let span = match &slurm {
            Some(ctx) => tracing::info_span!(
                "job",
                job = %s.name(),
                slurm_job = %ctx.job_id,
                node = %ctx.node,
                restart = ctx.restart_count
            ),
            None => tracing::info_span!("job", job = %s.name()),
        };
        set.spawn(s.run(rx.clone()).instrument(span));
    };
    for s in sups {
        run_job(&mut set, s);
    }
    let mut shutdown = rx.clone();
    let mut summary = Summary { jobs: 0, failed: 0 };
    loop {
        // The node service runs until supervise is asked to stop, even
        // without jobs; otherwise supervise ends with its last job.
        let stopping = *shutdown.borrow() != Shutdown::No;
        if set.is_empty() && (opts.service.is_none() || stopping) {
            break;
        }
        let res = tokio::select! {
            Some(res) = set.join_next() => res,
            Some(s) = spawn_rx.recv() => {
                run_job(&mut set, s);
                continue;
            }
            _ = shutdown.changed(), if !stopping => continue,
        };
        summary.jobs += 1;
        match res {
            Ok(o) if o.is_failure() => summary.failed += 1,
            Ok(_) => {}
            Err(e) => {
                tracing::error!(error = %e, "job task panicked");
                summary.failed += 1
            }
        }
    }
    // Dropping the server task's future removes the socket file.
    control.abort();
    let _ = control.await;
    if let Some(t) = metrics_task {
        t.abort();
    }
    Ok(summary)
}

/// The node service: its users' directory checked, its socket opened to
/// the local users (or a group), and the jobs users submitted before this
/// supervise started supervised again (re-adopted where they still run).
fn start_service(node: &Node, svc: &ServiceConfig, server: &Server) -> Result<(), DaemonError> {
    crate::fsutil::ensure_trusted_dir("service users directory", &svc.users_dir)
        .map_err(|e| DaemonError::Control(ServerError::Untrusted(e)))?;
    let gid = match &svc.allow_group {
        Some(g) => Some(
            nix::unistd::Group::from_name(g)
                .ok()
                .flatten()
                .ok_or_else(|| {
                    DaemonError::Service(format!("service.allow_group: no group {g:?}"))
                })?
                .gid
                .as_raw(),
        ),
        None => None,
    };
    server.open_to_users(gid)?;
    let mut kept = 0;
    for job in crate::service::load_user_jobs(svc) {
        match job.and_then(|j| node.start(j, svc).map_err(|(e, _)| e)) {
            Ok(name) => {
                kept += 1;
                tracing::debug!(job = %name, "a submitted job is supervised again");
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot supervise a submitted job again; it is left as it is")
            }
        }
    }
    tracing::info!(
        users_dir = %svc.users_dir.display(),
        allow_group = svc.allow_group.as_deref().unwrap_or("(every local user)"),
        max_jobs_per_user = svc.max_jobs_per_user,
        max_image_bytes_per_user = svc.max_image_bytes_per_user,
        submitted_jobs = kept,
        "node service: local users may submit jobs, which run as themselves"
    );
    Ok(())
}

/// Inside Slurm: on a job's pre-termination signal (time limit or
/// preemption, `sbatch --signal=B:USR1@N`), take a final checkpoint of
/// each job that listens to it and stop it; once those checkpoints are
/// published, ask Slurm to requeue the batch job. Slurm then sends SIGTERM,
/// which ends supervise (the jobs are already stopped, so no second
/// checkpoint is taken). Only the first such signal is acted upon.
fn slurm_signals(
    ctx: SlurmContext,
    jobs_by_signal: Vec<(i32, String, bool)>,
    registry: Arc<Registry>,
    reaper: Reaper,
) -> Result<(), DaemonError> {
    let root = Caller {
        uid: 0,
        daemon: nix::unistd::geteuid().as_raw(),
    };
    use tokio::signal::unix::{signal, SignalKind};
    let mut numbers: Vec<i32> = jobs_by_signal.iter().map(|(n, _, _)| *n).collect();
    numbers.sort_unstable();
    numbers.dedup();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<i32>(4);
    for n in numbers {
        let mut stream = signal(SignalKind::from_raw(n)).map_err(|source| DaemonError::Os {
            what: "cannot install the Slurm signal handler",
            source,
        })?;
        let tx = tx.clone();
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                if tx.send(n).await.is_err() {
                    break;
                }
            }
        });
    }
    tokio::spawn(async move {
        let Some(n) = rx.recv().await else { return };
        let name = nix::sys::signal::Signal::try_from(n)
            .map(|s| s.as_str())
            .unwrap_or("?");
        tracing::warn!(
            signal = name,
            slurm_job = %ctx.job_id,
            "Slurm pre-termination signal: final checkpoint, then requeue"
        );
        let mut requeue = false;
        for (_, job, rq) in jobs_by_signal.iter().filter(|(s, _, _)| *s == n) {
            requeue |= *rq;
            let r = dispatch(
                &registry.handles(),
                root,
                Request::Stop {
                    job: job.clone(),
                    checkpoint: true,
                },
            )
            .await;
            match r {
                Response::Done { message } => tracing::info!(job = %job, "{message}"),
                Response::Error { message } => {
                    tracing::error!(job = %job, error = %message, "final checkpoint failed; the newest earlier image will be used");
                    let _ = dispatch(
                        &registry.handles(),
                        root,
                        Request::Stop {
                            job: job.clone(),
                            checkpoint: false,
                        },
                    )
                    .await;
                }
                _ => {}
            }
        }
        if !requeue {
            tracing::info!(
                "slurm.requeue = false: not requeueing; waiting for Slurm to end the job"
            );
            return;
        }
        match crate::slurm::requeue(&reaper, &ctx.job_id).await {
            Ok(()) => tracing::info!(
                slurm_job = %ctx.job_id,
                "asked Slurm to requeue the job; waiting for its SIGTERM"
            ),
            Err(e) => tracing::error!(error = %e, "requeue failed"),
        }
        // Further signals are ignored (drained) until Slurm ends us.
        while rx.recv().await.is_some() {}
    });
    Ok(())
}
