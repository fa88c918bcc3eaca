//! Small `/proc` helpers: PID namespaces, process trees, start times.

use std::fs;
use std::io;
use std::os::fd::OwnedFd;

use crate::reaper::ExitStatus;

/// The PID of `pid` inside its own (innermost) PID namespace, from the
/// `NSpid:` line of `/proc/PID/status`.
pub fn ns_pid(pid: i32) -> io::Result<i32> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .and_then(|rest| rest.split_whitespace().last())
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other(format!("no NSpid in /proc/{pid}/status")))
}

/// Direct children of `pid` (all threads), as PIDs in our namespace.
pub fn children(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let p = t.path().join("children");
        if let Ok(s) = fs::read_to_string(p) {
            out.extend(s.split_whitespace().filter_map(|x| x.parse::<i32>().ok()));
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// `pid` and all its descendants, parents before children.
pub fn tree(pid: i32) -> Vec<i32> {
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let kids = children(out[i]);
        out.extend(kids);
        i += 1;
    }
    out
}

/// Memory of `root`'s process tree: each process's resident and
/// swapped-out memory (`VmRSS` + `VmSwap` of `/proc/PID/status`), summed.
/// Memory shared between processes counts once per process, so this errs
/// high, which is the safe side for sizing a dump.
pub fn tree_memory(root: i32) -> u64 {
    tree(root).into_iter().map(memory).sum()
}

/// `VmRSS` + `VmSwap` of `pid` in bytes (0 if it is gone or a kernel thread).
pub fn memory(pid: i32) -> u64 {
    let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else {
        return 0;
    };
    status
        .lines()
        .filter_map(|l| {
            l.strip_prefix("VmRSS:")
                .or_else(|| l.strip_prefix("VmSwap:"))
        })
        .filter_map(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .sum()
}

/// Fields of `/proc/PID/stat` after the command name.
fn stat_fields(pid: i32) -> io::Result<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat
        .rfind(')')
        .map(|i| &stat[i + 2..])
        .ok_or_else(|| io::Error::other("malformed stat"))?;
    Ok(after.split_whitespace().map(str::to_string).collect())
}

/// Process start time in clock ticks since boot (field 22 of stat). With the
/// PID it identifies a process even when PIDs are reused.
pub fn start_time(pid: i32) -> io::Result<u64> {
    let f = stat_fields(pid)?;
    // f[0] is field 3 (state); start time is field 22.
    f.get(19)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other("malformed stat"))
}

/// For a zombie not yet reaped by its parent: how it ended (field 52 of stat).
pub fn zombie_exit_status(pid: i32) -> Option<ExitStatus> {
    let f = stat_fields(pid).ok()?;
    if f.first().map(String::as_str) != Some("Z") {
        return None;
    }
    let raw: i32 = f.get(49)?.parse().ok()?;
    Some(ExitStatus::from_raw(raw))
}

/// The state letter of `pid` (`R`, `S`, `T` stopped, `t` traced, `Z`...).
pub fn state(pid: i32) -> Option<char> {
    stat_fields(pid).ok()?.first()?.chars().next()
}

/// True if `pid` exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    match stat_fields(pid) {
        Ok(f) => f.first().map(String::as_str) != Some("Z"),
        Err(_) => false,
    }
}

/// A process named by its PID *and* start time, which together stay unique
/// across PID reuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcId {
    /// PID in supervise's namespace.
    pub pid: i32,
    /// Start time (clock ticks since boot).
    pub start_time: u64,
}

impl ProcId {
    /// The process now at `pid`, if any.
    pub fn of(pid: i32) -> Option<ProcId> {
        Some(ProcId {
            pid,
            start_time: start_time(pid).ok()?,
        })
    }

    /// True while this very process lives (not a zombie, same start time).
    pub fn alive(&self) -> bool {
        alive(self.pid) && start_time(self.pid).ok() == Some(self.start_time)
    }
}

/// `root` and its descendants with their start times, parents first.
pub fn tree_ids(root: i32) -> Vec<ProcId> {
    tree(root).into_iter().filter_map(ProcId::of).collect()
}

/// SIGKILLs `id` if it is still that very process: a pidfd is opened first
/// and the start time checked after, so a PID reused in between is never
/// signalled. Waits up to `wait` for it to die. Returns true if it was
/// killed.
pub fn kill_exact(id: ProcId, wait: std::time::Duration) -> bool {
    let Ok(fd) = crate::pidfd::open(id.pid) else {
        return false;
    };
    if !id.alive() {
        return false;
    }
    if crate::pidfd::send_signal(&fd, libc::SIGKILL).is_err() {
        return false;
    }
    // A pidfd polls readable once the process has exited.
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    let ms = wait.as_millis().min(i32::MAX as u128) as i32;
    let _ = poll(
        &mut fds,
        PollTimeout::try_from(ms).unwrap_or(PollTimeout::NONE),
    );
    true
}

/// PIDs in their own namespace -> PIDs in ours, for `root` and its
/// descendants (e.g. a job's namespace init and the restored tree).
pub fn ns_pid_map(root: i32) -> std::collections::HashMap<i32, i32> {
    tree(root)
        .into_iter()
        .filter_map(|p| Some((ns_pid(p).ok()?, p)))
        .collect()
}

/// `pidfd_open(2)` (see [`crate::pidfd`]).
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    crate::pidfd::open(pid)
}

/// The inode of `/proc/PID/ns/NAME`, to compare namespaces.
pub fn ns_inode(pid: i32, name: &str) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(fs::metadata(format!("/proc/{pid}/ns/{name}"))?.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_is_alive_with_ns_pid_and_start_time() {
        let me = std::process::id() as i32;
        assert!(alive(me));
        assert!(start_time(me).unwrap() > 0);
        assert!(ns_pid(me).unwrap() > 0);
        assert!(tree(me).contains(&me));
        assert!(zombie_exit_status(me).is_none());
        assert!(matches!(state(me), Some('R' | 'S')));
        assert!(!alive(i32::MAX));
        let id = ProcId::of(me).unwrap();
        assert!(id.alive());
        assert!(!ProcId {
            pid: me,
            start_time: id.start_time + 1
        }
        .alive());
        assert_eq!(tree_ids(me)[0], id);
    }

    #[test]
    fn kill_exact_spares_a_reused_pid() {
        let mut c = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = c.id() as i32;
        let id = ProcId::of(pid).unwrap();
        let other = ProcId {
            pid,
            start_time: id.start_time + 1,
        };
        assert!(!kill_exact(other, std::time::Duration::from_millis(10)));
        assert!(alive(pid), "a different start time is another process");
        assert!(kill_exact(id, std::time::Duration::from_secs(5)));
        let st = c.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(st.signal(), Some(libc::SIGKILL));
    }
}
