//! Running under systemd: telling `systemctl restart` from `systemctl stop`.
//!
//! SIGTERM means "final checkpoint, then stop (or detach) each job as its
//! `[shutdown]` says". On `systemctl restart` the jobs should rather keep
//! running and be re-adopted by the next supervise. systemd gives the stop
//! commands no hint of why it stops the unit, but while they run the
//! unit's pending job is listed by `systemctl list-jobs`: its type is
//! `restart` for `systemctl restart`/`try-restart`/`reload-or-restart`,
//! `stop` for `systemctl stop` and at system shutdown. The unit's
//! `ExecStop=supervise __systemd-stop %n` reads it and, for a restart only,
//! sends `detach-all` over the control socket; otherwise it does nothing
//! and systemd's SIGTERM takes the final checkpoints.

use std::process::Command;

/// The type of `unit`'s pending job in `systemctl list-jobs --no-legend
/// --plain` output (`<id> <unit> <type> <state>` per line), if any.
pub fn pending_job<'a>(list_jobs: &'a str, unit: &str) -> Option<&'a str> {
    list_jobs.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_id, u, ty) = (f.next()?, f.next()?, f.next()?);
        (u == unit).then_some(ty)
    })
}

/// Whether systemd is restarting `unit` right now (asked from its
/// `ExecStop=`). `Err` when `systemctl` cannot say.
pub fn restarting(unit: &str) -> Result<bool, String> {
    let out = Command::new("systemctl")
        .args([
            "list-jobs",
            "--no-legend",
            "--plain",
            "--no-pager",
            "--",
            unit,
        ])
        .output()
        .map_err(|e| format!("cannot run systemctl: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "systemctl list-jobs failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(pending_job(&text, unit) == Some("restart"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_units_pending_job_type() {
        let out = "1234 supervise.service restart running\n77 other.service stop waiting\n";
        assert_eq!(pending_job(out, "supervise.service"), Some("restart"));
        assert_eq!(pending_job(out, "other.service"), Some("stop"));
        assert_eq!(pending_job(out, "nope.service"), None);
        assert_eq!(pending_job("", "supervise.service"), None);
        assert_eq!(
            pending_job("9 supervise.service stop running", "supervise.service"),
            Some("stop")
        );
    }
}
