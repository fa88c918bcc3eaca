//! The control socket's client side (`supervise status` and friends).

use std::io;
use std::path::{Path, PathBuf};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::{Request, Response};

/// Errors talking to a running supervise.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nobody listens on the socket.
    #[error("no supervise is running with control socket {path} ({source}); start one with `supervise run JOB.toml`, or pass --socket / set SUPERVISE_SOCKET")]
    NotRunning {
        /// The socket path.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// The socket (or its directory) is not ours to use.
    #[error("permission denied: {path}: only root and the user supervise runs as may use its control socket")]
    PermissionDenied {
        /// The socket path.
        path: PathBuf,
    },
    /// The connection failed midway.
    #[error("control socket {path}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// The answer was not understood.
    #[error("control socket {path}: malformed answer {answer:?}: {reason}")]
    Malformed {
        /// The socket path.
        path: PathBuf,
        /// What came back.
        answer: String,
        /// Why it was not understood.
        reason: String,
    },
}

/// Sends one request and reads the answer.
pub async fn call(path: &Path, req: &Request) -> Result<Response, ClientError> {
    let stream = UnixStream::connect(path).await.map_err(|source| {
        if source.kind() == io::ErrorKind::PermissionDenied {
            ClientError::PermissionDenied {
                path: path.to_path_buf(),
            }
        } else {
            ClientError::NotRunning {
                path: path.to_path_buf(),
                source,
            }
        }
    })?;
    let ioe = |source| ClientError::Io {
        path: path.to_path_buf(),
        source,
    };
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_string(req).expect("requests serialise");
    line.push('\n');
    w.write_all(line.as_bytes()).await.map_err(ioe)?;
    let mut answer = String::new();
    BufReader::new(r)
        .read_line(&mut answer)
        .await
        .map_err(ioe)?;
    serde_json::from_str(&answer).map_err(|e| ClientError::Malformed {
        path: path.to_path_buf(),
        answer: answer.trim().to_string(),
        reason: e.to_string(),
    })
}

/// `supervise status` as a table, one job per line (plus its failure
/// reason or last error on the next line).
pub fn render_status(jobs: &[super::JobStatus], now: chrono::DateTime<chrono::Utc>) -> String {
    let ago = |t: chrono::DateTime<chrono::Utc>| {
        let s = (now - t).num_seconds();
        if s >= 0 {
            format!("{} ago", short(s))
        } else {
            format!("in {}", short(-s))
        }
    };
    let mut out = format!(
        "{:<16} {:<14} {:>8} {:>8} {:>8}  {:<24} {:>8} {:>9}  {:<8} {:>8}  {}\n",
        "JOB",
        "STATE",
        "PID",
        "UPTIME",
        "RESTORES",
        "LAST CHECKPOINT",
        "FROZEN",
        "AGE",
        "NEXT",
        "INTERVAL",
        "SKIPPED"
    );
    for j in jobs {
        let state = match &j.state {
            crate::control::JobState::Failed(_) => "failed".to_string(),
            s => s.describe(),
        };
        let (last, frozen, age) = match &j.last_checkpoint {
            Some(c) => (
                c.id.clone(),
                c.frozen_ms
                    .map(|f| format!("{f:.1}ms"))
                    .unwrap_or_else(|| "-".into()),
                ago(c.time),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        out.push_str(&format!(
            "{:<16} {:<14} {:>8} {:>8} {:>8}  {:<24} {:>8} {:>9}  {:<8} {:>8}  {}\n",
            j.name,
            state,
            j.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            j.uptime_s
                .map(|u| short(u as i64))
                .unwrap_or_else(|| "-".into()),
            j.restores,
            last,
            frozen,
            age,
            j.next_checkpoint
                .filter(|_| j.pid.is_some())
                .map(ago)
                .unwrap_or_else(|| "-".into()),
            j.interval_s
                .map(|i| format!(
                    "{}{}",
                    short(i.round() as i64),
                    if j.auto.is_some() { " auto" } else { "" }
                ))
                .unwrap_or_else(|| "-".into()),
            j.skipped_ticks,
        ));
        if let Some(r) = &j.last_restore {
            out.push_str(&format!(
                "  last restore: {} from {}, running after {:.0} ms, all memory resident {}\n",
                r.mode,
                r.checkpoint,
                r.running_ms,
                r.resident_ms
                    .map(|m| format!("after {m:.0} ms"))
                    .unwrap_or_else(|| "(pending)".into())
            ));
        }
        if let Some(a) = &j.auto {
            out.push_str(&format!(
                "  auto: C {} (median frozen time of the last checkpoints), M {} ({} failure{} seen)\n",
                a.cost_s
                    .map(|c| format!("{:.1}ms", c * 1000.0))
                    .unwrap_or_else(|| "not measured yet".into()),
                short(a.mtbf_s.round() as i64),
                a.failures,
                if a.failures == 1 { "" } else { "s" }
            ));
        }
        if let crate::control::JobState::Failed(r) = &j.state {
            out.push_str(&format!("  failed: {r}\n"));
        } else if let Some(e) = &j.last_error {
            out.push_str(&format!("  last error: {e}\n"));
        }
        for (k, v) in &j.extra {
            out.push_str(&format!("  {k}: {v}\n"));
        }
    }
    out
}

/// 75 -> "1m15s", 4000 -> "1h06m".
fn short(s: i64) -> String {
    match s {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::JobState;
    use crate::control::{CheckpointSummary, JobStatus};

    #[test]
    fn status_table() {
        let now = chrono::Utc::now();
        let mut a = JobStatus::new("counter", "/img".into());
        a.state = JobState::Running;
        a.pid = Some(4242);
        a.uptime_s = Some(3725.0);
        a.restores = 2;
        a.last_checkpoint = Some(CheckpointSummary {
            id: "000007-20261128T140000Z".into(),
            time: now - chrono::Duration::seconds(75),
            duration_ms: 80,
            frozen_ms: Some(17.04),
            bytes: 1000,
        });
        a.next_checkpoint = Some(now + chrono::Duration::seconds(45));
        a.interval_s = Some(117.0 * 60.0);
        a.skipped_ticks = 3;
        a.auto = Some(crate::control::AutoStatus {
            cost_s: Some(0.0171),
            mtbf_s: 86400.0 + 3600.0,
            failures: 1,
        });
        let mut b = JobStatus::new("loop", "/img2".into());
        b.state = JobState::Failed("job died 3 times within 1h; giving up".into());
        let t = render_status(&[a, b], now);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("JOB"), "{t}");
        assert!(
            lines[1].contains("counter")
                && lines[1].contains("running")
                && lines[1].contains("4242")
                && lines[1].contains("1h02m")
                && lines[1].contains("000007-20261128T140000Z")
                && lines[1].contains("17.0ms")
                && lines[1].contains("1m15s ago")
                && lines[1].contains("in 45s")
                && lines[1].contains("1h57m auto")
                && lines[1].ends_with(" 3"),
            "{t}"
        );
        assert_eq!(
            lines[2],
            "  auto: C 17.1ms (median frozen time of the last checkpoints), M 1d01h (1 failure seen)"
        );
        assert!(
            lines[3].contains("loop") && lines[3].contains("failed"),
            "{t}"
        );
        assert_eq!(lines[4], "  failed: job died 3 times within 1h; giving up");
    }
}
