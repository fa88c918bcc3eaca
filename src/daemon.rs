//! The `supervise run` process: one supervisor task per job, the control
//! socket, the optional metrics listener, and SIGTERM/SIGINT handling.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tracing::Instrument;

use crate::config::JobConfig;
use crate::control::server::{Server, ServerError};
use crate::control::{job_channel, JobHandle};
use crate::metrics::{Metrics, MetricsError};
use crate::reaper::Reaper;
use crate::supervisor::{Supervisor, SupervisorError};

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
    /// Loopback address for Prometheus metrics, if wanted.
    pub metrics: Option<SocketAddr>,
    /// CRIU's version, recorded in each manifest.
    pub criu_version: Option<String>,
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

/// Runs the jobs until each completes, fails, or SIGTERM/SIGINT stops them.
/// Must be called inside a tokio runtime.
pub async fn run(cfgs: Vec<JobConfig>, opts: RunOptions) -> Result<Summary, DaemonError> {
    let reaper = Reaper::install().map_err(|source| DaemonError::Os {
        what: "cannot become a child subreaper",
        source,
    })?;
    let metrics = Metrics::new();
    // Everything that can fail is set up before any job starts.
    let server = Server::bind(&opts.socket).await?;
    let metrics_listener = match opts.metrics {
        Some(addr) => Some(crate::metrics::bind(addr).await?),
        None => None,
    };
    let mut sups = Vec::new();
    let mut handles: Vec<JobHandle> = Vec::new();
    for cfg in cfgs {
        let (handle, port) = job_channel(&cfg.name, cfg.checkpoint.dir.clone());
        let mut s = Supervisor::new(cfg, reaper.clone())?;
        if let Some(v) = &opts.criu_version {
            s.set_criu_version(v.clone());
        }
        s.connect(port, metrics.clone());
        handles.push(handle);
        sups.push(s);
    }
    let (tx, rx) = tokio::sync::watch::channel(false);
    {
        use tokio::signal::unix::{signal, SignalKind};
        let os = |source| DaemonError::Os {
            what: "cannot install signal handlers",
            source,
        };
        let mut term = signal(SignalKind::terminate()).map_err(os)?;
        let mut int = signal(SignalKind::interrupt()).map_err(os)?;
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
            }
            let _ = tx.send(true);
        });
    }
    let control = tokio::spawn(server.serve(Arc::new(handles)));
    let metrics_task = metrics_listener.map(|l| tokio::spawn(crate::metrics::serve(l, metrics)));
    let mut set = tokio::task::JoinSet::new();
    for s in sups {
        let span = tracing::info_span!("job", job = %s.name());
        set.spawn(s.run(rx.clone()).instrument(span));
    }
    let mut summary = Summary { jobs: 0, failed: 0 };
    while let Some(res) = set.join_next().await {
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
