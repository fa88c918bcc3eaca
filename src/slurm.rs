//! Running inside a Slurm batch job: who we are (job id, node, restart
//! count), asking Slurm to requeue us, and where the control socket goes.
//!
//! The flow supervise implements (see the README's Slurm section):
//! the batch script `exec`s `supervise run job.toml`, so supervise is the
//! batch shell and receives the pre-termination signal of
//! `sbatch --signal=B:USR1@120`. On that signal it takes a final
//! checkpoint of each job, and only once it is published runs
//! `scontrol requeue $SLURM_JOB_ID` (which itself sends SIGTERM, then
//! SIGKILL after KillWait, so the order matters); then it waits for that
//! SIGTERM rather than exiting 0 (a batch script that exits 0 first is not
//! requeued). On the rerun (`SLURM_RESTART_COUNT` >= 1, any node) the jobs
//! resume from their newest images in fresh PID namespaces.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::reaper::Reaper;

/// What Slurm tells a batch job about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlurmContext {
    /// `SLURM_JOB_ID`.
    pub job_id: String,
    /// `SLURMD_NODENAME` (else the host name).
    pub node: String,
    /// `SLURM_RESTART_COUNT`; unset on the first run, which counts as 0.
    pub restart_count: u32,
}

impl SlurmContext {
    /// From this process's environment; `None` outside Slurm.
    pub fn from_env() -> Option<SlurmContext> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// From any variable lookup (for tests).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Option<SlurmContext> {
        let job_id = get("SLURM_JOB_ID").filter(|s| !s.trim().is_empty())?;
        // (Checked by [`SlurmContext::validate`] where it names files.)
        let node = get("SLURMD_NODENAME")
            .filter(|s| !s.is_empty())
            .or_else(|| nix::unistd::gethostname().ok()?.into_string().ok())
            .unwrap_or_else(|| "unknown".into());
        let restart_count = get("SLURM_RESTART_COUNT")
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        Some(SlurmContext {
            job_id: job_id.trim().to_string(),
            node,
            restart_count,
        })
    }

    /// Checks what names files and directories: the job id (in the per-run
    /// directory `slurm-<id>.<run>` and the default socket) is Slurm's
    /// (digits, an array job's `_`, a het job's `+`, letters at most), the
    /// node a host name. The node service gets these from its clients, who
    /// could say anything.
    pub fn validate(&self) -> Result<(), String> {
        let ok = |s: &str, extra: &str, max: usize| {
            !s.is_empty()
                && s.len() <= max
                && !s.starts_with('.')
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || extra.contains(c))
        };
        if !ok(&self.job_id, "_+", 64) {
            return Err(format!(
                "Slurm job id {:?} is not one (letters, digits, '_' and '+', at most 64)",
                self.job_id
            ));
        }
        if !ok(&self.node, "-_.", 255) {
            return Err(format!(
                "Slurm node name {:?} is not one (letters, digits, '-', '_' and '.', at most 255)",
                self.node
            ));
        }
        Ok(())
    }

    /// Facts for `supervise status`.
    pub fn facts(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("slurm_job_id".to_string(), self.job_id.clone()),
            ("slurm_node".to_string(), self.node.clone()),
            (
                "slurm_restart_count".to_string(),
                self.restart_count.to_string(),
            ),
        ])
    }

    /// The default control socket inside a Slurm job: one per job and run,
    /// so that several Slurm jobs, or an old and a new copy of one job, on
    /// the same node never collide.
    pub fn default_socket(&self) -> PathBuf {
        PathBuf::from(format!(
            "/run/supervise/slurm-{}.{}.sock",
            self.job_id, self.restart_count
        ))
    }
}

/// Errors asking Slurm to requeue the job.
#[derive(Debug, thiserror::Error)]
pub enum RequeueError {
    /// `scontrol` could not be run.
    #[error("cannot run scontrol: {0}")]
    Spawn(std::io::Error),
    /// `scontrol requeue` failed.
    #[error("scontrol requeue {job} failed ({status}): {stderr}")]
    Failed {
        /// Slurm job id.
        job: String,
        /// How scontrol ended.
        status: String,
        /// What it said.
        stderr: String,
    },
}

/// The `scontrol` binary: `$SUPERVISE_SCONTROL` or `scontrol` from PATH.
pub fn scontrol_bin() -> PathBuf {
    std::env::var_os("SUPERVISE_SCONTROL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("scontrol"))
}

/// The argv of the requeue request.
pub fn requeue_args(job_id: &str) -> Vec<String> {
    vec!["requeue".into(), job_id.into()]
}

/// Runs `scontrol requeue JOB` (through the reaper) and waits for it.
pub async fn requeue(reaper: &Reaper, job_id: &str) -> Result<(), RequeueError> {
    let mut cmd = Command::new(scontrol_bin());
    cmd.args(requeue_args(job_id))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut spawned = reaper.spawn(&mut cmd).map_err(RequeueError::Spawn)?;
    let stderr = spawned
        .child
        .as_mut()
        .and_then(|c| c.stderr.take())
        .map(crate::criu::collect);
    let status = tokio::time::timeout(Duration::from_secs(60), &mut spawned.exit).await;
    let text = match stderr {
        Some(h) => tokio::task::spawn_blocking(move || h.join().unwrap_or_default())
            .await
            .unwrap_or_default(),
        None => String::new(),
    };
    match status {
        Ok(Ok(s)) if s.success() => Ok(()),
        Ok(Ok(s)) => Err(RequeueError::Failed {
            job: job_id.into(),
            status: s.to_string(),
            stderr: text.trim().to_string(),
        }),
        Ok(Err(_)) => Err(RequeueError::Failed {
            job: job_id.into(),
            status: "lost".into(),
            stderr: text.trim().to_string(),
        }),
        Err(_) => Err(RequeueError::Failed {
            job: job_id.into(),
            status: "timed out after 60 s".into(),
            stderr: text.trim().to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars<'a>(v: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| v.iter().find(|(n, _)| *n == k).map(|(_, x)| x.to_string())
    }

    #[test]
    fn what_names_files_is_checked() {
        let c = |id: &str, node: &str| SlurmContext {
            job_id: id.into(),
            node: node.into(),
            restart_count: 0,
        };
        assert!(c("42", "n1").validate().is_ok());
        assert!(c("42_7", "node-01.cluster").validate().is_ok());
        assert!(c("42+1", "n1").validate().is_ok());
        for bad in ["../../tmp/x", "4/2", "", ".", "..", "42 ", "a\nb"] {
            assert!(c(bad, "n1").validate().is_err(), "{bad:?}");
        }
        let e = c("x/../y", "n1").validate().unwrap_err();
        assert!(e.contains("\"x/../y\" is not one"), "{e}");
        assert!(c("42", "n1/../x").validate().is_err());
        assert!(c("42", &"n".repeat(256)).validate().is_err());
    }

    #[test]
    fn context_from_environment() {
        assert_eq!(SlurmContext::from_vars(vars(&[])), None);
        assert_eq!(
            SlurmContext::from_vars(vars(&[("SLURM_JOB_ID", " ")])),
            None
        );
        let first =
            SlurmContext::from_vars(vars(&[("SLURM_JOB_ID", "42"), ("SLURMD_NODENAME", "n1")]))
                .unwrap();
        assert_eq!(first.restart_count, 0, "unset on the first run");
        assert_eq!(first.node, "n1");
        let again = SlurmContext::from_vars(vars(&[
            ("SLURM_JOB_ID", "42"),
            ("SLURMD_NODENAME", "n2"),
            ("SLURM_RESTART_COUNT", "2"),
        ]))
        .unwrap();
        assert_eq!(again.restart_count, 2);
        assert_eq!(
            again.default_socket(),
            PathBuf::from("/run/supervise/slurm-42.2.sock")
        );
        assert_ne!(first.default_socket(), again.default_socket());
        assert_eq!(again.facts()["slurm_node"], "n2");
        assert_eq!(requeue_args("42"), ["requeue", "42"]);
    }
}
