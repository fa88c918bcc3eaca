//! Prometheus metrics, served on an optional loopback HTTP listener
//! (`supervise run --metrics 127.0.0.1:9464`), encoded by the
//! `prometheus-client` crate (OpenMetrics text, which Prometheus scrapes).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tracing::{info, warn};

use crate::admission::{Admission, Limits, Ticket};

/// Label set `{job}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabel {
    /// Job name.
    pub job: String,
}

/// Label set `{job, outcome}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// Job name.
    pub job: String,
    /// "ok" or "failed".
    pub outcome: String,
}

/// Label set `{job, mode}` (restore mode: "lazy" or "eager").
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModeLabel {
    /// Job name.
    pub job: String,
    /// "lazy" or "eager".
    pub mode: String,
}

fn seconds_histogram() -> Histogram {
    // 1 ms .. ~33 min.
    Histogram::new(exponential_buckets(0.001, 2.0, 22))
}

/// Registers each `"name", "help" => metric;` (a clone of it) in a registry.
macro_rules! register {
    ($r:expr, $($name:literal, $help:literal => $metric:expr;)+) => {
        $($r.register($name, $help, $metric.clone());)+
    };
}

/// All of supervise's metrics. Cheap to clone (shared).
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Mutex<Registry>>,
    checkpoints: Family<OutcomeLabel, Counter>,
    checkpoint_seconds: Family<JobLabel, Histogram, fn() -> Histogram>,
    frozen_seconds: Family<JobLabel, Histogram, fn() -> Histogram>,
    bytes_written: Family<JobLabel, Counter>,
    bytes_stored: Family<JobLabel, Counter>,
    restores: Family<OutcomeLabel, Counter>,
    restore_seconds: Family<JobLabel, Histogram, fn() -> Histogram>,
    restore_modes: Family<ModeLabel, Counter>,
    resident_seconds: Family<ModeLabel, Histogram, fn() -> Histogram>,
    up: Family<JobLabel, Gauge>,
    interval: Family<JobLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    skipped: Family<JobLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Outcome label value.
fn outcome(ok: bool) -> String {
    if ok { "ok" } else { "failed" }.to_string()
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Metrics {
        let mut r = Registry::with_prefix("supervise");
        let m = Metrics {
            registry: Arc::new(Mutex::new(Registry::default())),
            checkpoints: Family::default(),
            checkpoint_seconds: Family::new_with_constructor(seconds_histogram),
            frozen_seconds: Family::new_with_constructor(seconds_histogram),
            bytes_written: Family::default(),
            bytes_stored: Family::default(),
            restores: Family::default(),
            restore_seconds: Family::new_with_constructor(seconds_histogram),
            restore_modes: Family::default(),
            resident_seconds: Family::new_with_constructor(seconds_histogram),
            up: Family::default(),
            interval: Family::default(),
            skipped: Family::default(),
        };
        register!(r,
            "checkpoints", "Checkpoints attempted, by outcome" => m.checkpoints;
            "checkpoint_duration_seconds", "Wall time of the CRIU dump of successful checkpoints" => m.checkpoint_seconds;
            "checkpoint_frozen_seconds", "Time CRIU kept the job frozen per checkpoint" => m.frozen_seconds;
            "checkpoint_written_bytes", "Bytes of checkpoint images written (logical size)" => m.bytes_written;
            "checkpoint_stored_bytes", "Bytes newly stored by checkpoints" => m.bytes_stored;
            "restores", "Restores attempted, by outcome" => m.restores;
            "restore_duration_seconds", "Wall time of successful restores" => m.restore_seconds;
            "job_up", "1 while the job runs, else 0" => m.up;
            "checkpoint_interval_seconds", "The current checkpoint interval (fixed, or chosen by every = \"auto\")" => m.interval;
            "skipped_ticks", "Checkpoint schedule ticks skipped" => m.skipped;
            "restores_by_mode", "Successful restores, by mode (lazy: memory served while the job runs; eager)" => m.restore_modes;
            "restore_resident_seconds", "From the start of a restore until all of the job's memory was resident, by mode" => m.resident_seconds;
        );
        *m.registry.lock().unwrap_or_else(|e| e.into_inner()) = r;
        m
    }

    fn job(job: &str) -> JobLabel {
        JobLabel {
            job: job.to_string(),
        }
    }

    /// Creates every labelled series of job `job` at zero (both outcomes,
    /// both restore modes), so a fresh supervise exports every series the
    /// dashboard queries before anything has happened (Prometheus'
    /// guidance: export 0 for series known in advance).
    pub fn declare_job(&self, job: &str) {
        let l = Self::job(job);
        for ok in [true, false] {
            let o = OutcomeLabel {
                job: job.to_string(),
                outcome: outcome(ok),
            };
            let _ = self.checkpoints.get_or_create(&o);
            let _ = self.restores.get_or_create(&o);
        }
        for mode in ["lazy", "eager"] {
            let m = ModeLabel {
                job: job.to_string(),
                mode: mode.to_string(),
            };
            let _ = self.restore_modes.get_or_create(&m);
            let _ = self.resident_seconds.get_or_create(&m);
        }
        let _ = self.checkpoint_seconds.get_or_create(&l);
        let _ = self.frozen_seconds.get_or_create(&l);
        let _ = self.bytes_written.get_or_create(&l);
        let _ = self.bytes_stored.get_or_create(&l);
        let _ = self.restore_seconds.get_or_create(&l);
        let _ = self.up.get_or_create(&l);
        let _ = self.interval.get_or_create(&l);
        let _ = self.skipped.get_or_create(&l);
    }

    /// A checkpoint succeeded.
    pub fn checkpoint_ok(
        &self,
        job: &str,
        duration: Duration,
        frozen: Option<Duration>,
        written: u64,
        stored: u64,
    ) {
        self.checkpoints
            .get_or_create(&OutcomeLabel {
                job: job.to_string(),
                outcome: outcome(true),
            })
            .inc();
        self.checkpoint_seconds
            .get_or_create(&Self::job(job))
            .observe(duration.as_secs_f64());
        if let Some(f) = frozen {
            self.frozen_seconds
                .get_or_create(&Self::job(job))
                .observe(f.as_secs_f64());
        }
        self.bytes_written
            .get_or_create(&Self::job(job))
            .inc_by(written);
        self.bytes_stored
            .get_or_create(&Self::job(job))
            .inc_by(stored);
    }

    /// A checkpoint failed.
    pub fn checkpoint_failed(&self, job: &str) {
        self.checkpoints
            .get_or_create(&OutcomeLabel {
                job: job.to_string(),
                outcome: outcome(false),
            })
            .inc();
    }

    /// A restore attempt ended.
    pub fn restore(&self, job: &str, ok: bool, duration: Option<Duration>) {
        self.restores
            .get_or_create(&OutcomeLabel {
                job: job.to_string(),
                outcome: outcome(ok),
            })
            .inc();
        if let Some(d) = duration {
            self.restore_seconds
                .get_or_create(&Self::job(job))
                .observe(d.as_secs_f64());
        }
    }

    /// A restore succeeded in `mode` ("lazy"/"eager").
    pub fn restore_mode(&self, job: &str, mode: &str) {
        self.restore_modes
            .get_or_create(&ModeLabel {
                job: job.to_string(),
                mode: mode.to_string(),
            })
            .inc();
    }

    /// All of the job's memory is resident, `d` after the restore began.
    pub fn restore_resident(&self, job: &str, mode: &str, d: Duration) {
        self.resident_seconds
            .get_or_create(&ModeLabel {
                job: job.to_string(),
                mode: mode.to_string(),
            })
            .observe(d.as_secs_f64());
    }

    /// The job is up (1) or down (0).
    pub fn up(&self, job: &str, up: bool) {
        self.up.get_or_create(&Self::job(job)).set(i64::from(up));
    }

    /// The job's checkpoint interval is now `d`.
    pub fn interval(&self, job: &str, d: Duration) {
        self.interval
            .get_or_create(&Self::job(job))
            .set(d.as_secs_f64());
        // The skipped-ticks series exists (at 0) from the start.
        let _ = self.skipped.get_or_create(&Self::job(job));
    }

    /// `n` more schedule ticks were skipped.
    pub fn skipped(&self, job: &str, n: u64) {
        self.skipped.get_or_create(&Self::job(job)).inc_by(n);
    }

    /// The metrics in OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut s = String::new();
        let r = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        prometheus_client::encoding::text::encode(&mut s, &r).expect("writing to a String");
        s
    }
}

/// Where the metrics are served: a loopback TCP address, or a Unix
/// socket (`unix:PATH`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsAddr {
    /// A loopback address and port.
    Tcp(SocketAddr),
    /// A Unix socket; its directory must be a trusted location, and the
    /// socket gets the directory's group and mode 0660 (so the directory
    /// decides who may scrape).
    Unix(PathBuf),
}

impl std::fmt::Display for MetricsAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MetricsAddr::Tcp(a) => write!(f, "{a}"),
            MetricsAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl std::str::FromStr for MetricsAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            let p = PathBuf::from(p);
            if !p.is_absolute() {
                return Err(format!(
                    "unix:{}: the socket path must be absolute",
                    p.display()
                ));
            }
            return Ok(MetricsAddr::Unix(p));
        }
        s.parse::<SocketAddr>().map(MetricsAddr::Tcp).map_err(|e| {
            format!(
                "{s}: {e} (expected a loopback ADDRESS:PORT such as 127.0.0.1:9464, or unix:/PATH)"
            )
        })
    }
}

/// Errors starting the metrics listener.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// Only loopback addresses are allowed.
    #[error("--metrics {0}: only a loopback address (127.0.0.1, ::1) is allowed; metrics are not for the network")]
    NotLoopback(SocketAddr),
    /// The Unix socket's directory is not a trusted location.
    #[error(transparent)]
    Untrusted(#[from] crate::fsutil::TrustError),
    /// Binding failed.
    #[error("--metrics {addr}: {source}")]
    Bind {
        /// The address.
        addr: MetricsAddr,
        /// Cause.
        source: std::io::Error,
    },
}

/// Checks what can be checked before binding: a TCP address must be
/// loopback; a Unix socket's directory must be trusted.
pub fn check_addr(addr: &MetricsAddr) -> Result<(), MetricsError> {
    match addr {
        MetricsAddr::Tcp(a) if !a.ip().is_loopback() => Err(MetricsError::NotLoopback(*a)),
        MetricsAddr::Tcp(_) => Ok(()),
        MetricsAddr::Unix(p) => {
            if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                crate::fsutil::check_trusted("metrics socket directory", dir)?;
            }
            Ok(())
        }
    }
}

/// A bound metrics listener.
pub enum Listener {
    /// Loopback TCP.
    Tcp(TcpListener),
    /// A Unix socket (removed when dropped).
    Unix(UnixListener, PathBuf),
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Listener {
    /// The TCP address bound (tests use port 0).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok(),
            Listener::Unix(..) => None,
        }
    }
}

/// Binds the metrics listener (loopback only, or a Unix socket).
pub async fn bind(addr: &MetricsAddr) -> Result<Listener, MetricsError> {
    check_addr(addr)?;
    let bind_err = |source| MetricsError::Bind {
        addr: addr.clone(),
        source,
    };
    let l = match addr {
        MetricsAddr::Tcp(a) => Listener::Tcp(TcpListener::bind(a).await.map_err(bind_err)?),
        MetricsAddr::Unix(p) => {
            use std::os::unix::fs::{MetadataExt, PermissionsExt};
            // A stale socket of ours is replaced; a live one is somebody's.
            if let Ok(md) = std::fs::symlink_metadata(p) {
                use std::os::unix::fs::FileTypeExt;
                if !md.file_type().is_socket() || tokio::net::UnixStream::connect(p).await.is_ok() {
                    return Err(bind_err(std::io::Error::from_raw_os_error(
                        libc::EADDRINUSE,
                    )));
                }
                std::fs::remove_file(p).map_err(bind_err)?;
            }
            let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
            let l = UnixListener::bind(p);
            nix::sys::stat::umask(old);
            let l = l.map_err(bind_err)?;
            let gid = p
                .parent()
                .and_then(|d| std::fs::metadata(d).ok())
                .map(|m| m.gid());
            if let Some(gid) = gid {
                nix::unistd::fchownat(
                    None,
                    p,
                    None,
                    Some(nix::unistd::Gid::from_raw(gid)),
                    nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                )
                .map_err(|e| bind_err(e.into()))?;
            }
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o660))
                .map_err(bind_err)?;
            Listener::Unix(l, p.clone())
        }
    };
    info!(address = %addr, "metrics listener ready (GET /metrics)");
    Ok(l)
}

/// Binds `addr` and serves it, forever. A failed bind (another process
/// holds the port) is a warning, not the end: supervise goes on with its
/// jobs and retries every `retry`, warning again every tenth failure,
/// until the address is free.
pub async fn serve_retrying(addr: MetricsAddr, metrics: Metrics, retry: Duration) {
    let mut failures = 0u64;
    let listener = loop {
        match bind(&addr).await {
            Ok(l) => {
                if failures > 0 {
                    info!(address = %addr, failures, "metrics address is free again; serving");
                }
                break l;
            }
            Err(e) => {
                if failures % 10 == 0 {
                    warn!(error = %e, retry_s = retry.as_secs_f64(), "cannot serve metrics; the jobs are supervised regardless; retrying");
                }
                failures += 1;
                tokio::time::sleep(retry).await;
            }
        }
    };
    serve(listener, metrics).await
}

/// Answers `GET /metrics` (and 404 for anything else) until dropped.
/// Connections are admitted through [`Admission`] (caps per listener and
/// per peer uid, slow clients dropped first, one deadline per request).
pub async fn serve(listener: Listener, metrics: Metrics) {
    let adm = Admission::new("metrics", Limits::metrics(crate::fdlimit::budget()));
    let mut errors = crate::admission::AcceptErrors::default();
    loop {
        adm.room().await;
        match &listener {
            Listener::Tcp(l) => match l.accept().await {
                Ok((conn, peer)) => {
                    let uid = conn
                        .local_addr()
                        .ok()
                        .and_then(|local| crate::admission::tcp_peer_uid(local, peer))
                        .unwrap_or(crate::admission::UNKNOWN_UID);
                    let (m, lim) = (metrics.clone(), adm.limits());
                    adm.spawn(conn, uid, move |c, t| answer(c, m, lim, t));
                }
                Err(e) => errors.note("metrics", &e).await,
            },
            Listener::Unix(l, _) => match l.accept().await {
                Ok((conn, _)) => {
                    let uid = conn
                        .peer_cred()
                        .map(|c| c.uid())
                        .unwrap_or(crate::admission::UNKNOWN_UID);
                    let (m, lim) = (metrics.clone(), adm.limits());
                    adm.spawn(conn, uid, move |c, t| answer(c, m, lim, t));
                }
                Err(e) => errors.note("metrics", &e).await,
            },
        }
    }
}

/// Reads one request head (bounded size, one deadline for all of it) and
/// answers it.
async fn answer<C>(mut conn: C, metrics: Metrics, limits: Limits, ticket: Ticket)
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let read = async {
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16 * 1024 {
            match conn.read(&mut chunk).await {
                Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                _ => break,
            }
        }
    };
    if tokio::time::timeout(limits.request, read).await.is_err() {
        return;
    }
    ticket.request_read();
    let head = String::from_utf8_lossy(&buf);
    let first = head.lines().next().unwrap_or("");
    let mut parts = first.split_whitespace();
    let (method, target) = (parts.next(), parts.next());
    let (status, ctype, body) = match (method, target) {
        (Some("GET"), Some("/metrics")) => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        ),
        _ => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "only GET /metrics is served here\n".to_string(),
        ),
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let write = async {
        let _ = conn.write_all(resp.as_bytes()).await;
        let _ = conn.shutdown().await;
    };
    let _ = tokio::time::timeout(limits.reply, write).await;
    drop(ticket);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_histograms_are_encoded() {
        let m = Metrics::new();
        m.checkpoint_ok(
            "a",
            Duration::from_millis(80),
            Some(Duration::from_millis(20)),
            1000,
            200,
        );
        m.checkpoint_failed("a");
        m.restore("a", true, Some(Duration::from_millis(50)));
        m.up("a", true);
        let t = m.encode();
        assert!(
            t.contains(r#"supervise_checkpoints_total{job="a",outcome="ok"} 1"#),
            "{t}"
        );
        assert!(
            t.contains(r#"supervise_checkpoints_total{job="a",outcome="failed"} 1"#),
            "{t}"
        );
        assert!(
            t.contains(r#"supervise_checkpoint_written_bytes_total{job="a"} 1000"#),
            "{t}"
        );
        assert!(
            t.contains(r#"supervise_checkpoint_stored_bytes_total{job="a"} 200"#),
            "{t}"
        );
        assert!(
            t.contains(r#"supervise_checkpoint_frozen_seconds_count{job="a"} 1"#),
            "{t}"
        );
        assert!(
            t.contains(r#"supervise_restore_duration_seconds_count{job="a"} 1"#),
            "{t}"
        );
        assert!(
            t.contains(r#"supervise_restores_total{job="a",outcome="ok"} 1"#),
            "{t}"
        );
        assert!(t.contains(r#"supervise_job_up{job="a"} 1"#), "{t}");
        assert!(t.ends_with("# EOF\n"));
    }

    #[test]
    fn a_declared_job_has_every_series_at_zero() {
        let m = Metrics::new();
        m.declare_job("j");
        let t = m.encode();
        for series in [
            r#"supervise_checkpoints_total{job="j",outcome="ok"} 0"#,
            r#"supervise_checkpoints_total{job="j",outcome="failed"} 0"#,
            r#"supervise_restores_total{job="j",outcome="ok"} 0"#,
            r#"supervise_restores_total{job="j",outcome="failed"} 0"#,
            r#"supervise_restores_by_mode_total{job="j",mode="lazy"} 0"#,
            r#"supervise_restores_by_mode_total{job="j",mode="eager"} 0"#,
            r#"supervise_restore_duration_seconds_count{job="j"} 0"#,
            r#"supervise_restore_resident_seconds_count{job="j",mode="lazy"} 0"#,
            r#"supervise_checkpoint_frozen_seconds_count{job="j"} 0"#,
            r#"supervise_checkpoint_duration_seconds_count{job="j"} 0"#,
            r#"supervise_checkpoint_written_bytes_total{job="j"} 0"#,
            r#"supervise_checkpoint_stored_bytes_total{job="j"} 0"#,
            r#"supervise_skipped_ticks_total{job="j"} 0"#,
            r#"supervise_job_up{job="j"} 0"#,
        ] {
            assert!(t.contains(series), "{series} missing:\n{t}");
        }
    }

    #[tokio::test]
    async fn listener_is_loopback_only_and_serves_metrics() {
        let bad: MetricsAddr = "0.0.0.0:0".parse().unwrap();
        assert!(matches!(
            bind(&bad).await,
            Err(MetricsError::NotLoopback(_))
        ));
        let l = bind(&"127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = l.local_addr().unwrap();
        let m = Metrics::new();
        m.up("j", true);
        let task = tokio::spawn(serve(l, m));
        let get = |path: &'static str| async move {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            c.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut s = String::new();
            c.read_to_string(&mut s).await.unwrap();
            s
        };
        let ok = get("/metrics").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK"), "{ok}");
        assert!(ok.contains(r#"supervise_job_up{job="j"} 1"#), "{ok}");
        assert!(get("/").await.starts_with("HTTP/1.1 404"));
        task.abort();
    }
}
