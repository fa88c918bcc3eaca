//! The child reaper.
//!
//! supervise makes itself a *child subreaper* (`PR_SET_CHILD_SUBREAPER`), so
//! that any process it started and that loses its parent is re-parented to
//! supervise and reaped here rather than lingering as a zombie (PID 1 on the
//! target machines does not reap promptly). Every child supervise starts is
//! spawned through [`Reaper::spawn`] / [`Reaper::spawn_with`], which register
//! the PID under the same lock the reaper holds while it calls
//! `waitpid(-1, WNOHANG)`: an exit can never be reaped before its waiter is
//! registered, and nothing else in the process calls `wait`.
//!
//! Never use `std::process::Child::wait`, `Command::output` or tokio's
//! process module while a reaper is running: they would race with it.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::sync::oneshot;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExitStatus {
    /// Exited with this code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
    /// Ended, but how is not known: a process supervise attached to (not
    /// its child) that its own parent reaped first.
    Unknown,
}

impl ExitStatus {
    /// True for `exit(0)`.
    pub fn success(&self) -> bool {
        matches!(self, ExitStatus::Code(0))
    }

    /// Converts a raw `wait` status word.
    pub fn from_raw(status: i32) -> ExitStatus {
        if libc::WIFSIGNALED(status) {
            ExitStatus::Signal(libc::WTERMSIG(status))
        } else if libc::WIFEXITED(status) {
            ExitStatus::Code(libc::WEXITSTATUS(status))
        } else {
            ExitStatus::Unknown
        }
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exit code {c}"),
            ExitStatus::Unknown => {
                write!(f, "ended (exit status unknown: not supervise's child)")
            }
            ExitStatus::Signal(s) => {
                let name = nix::sys::signal::Signal::try_from(*s)
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_else(|_| format!("signal {s}"));
                write!(f, "killed by {name}")
            }
        }
    }
}

/// A child registered with the reaper.
pub struct Spawned {
    /// Its PID (in supervise's PID namespace).
    pub pid: i32,
    /// Resolves when the child has exited and been reaped.
    pub exit: oneshot::Receiver<ExitStatus>,
    /// The std handle, for its pipes; never `wait` on it.
    pub child: Option<Child>,
}

type Waiters = HashMap<i32, oneshot::Sender<ExitStatus>>;

/// See the module documentation.
#[derive(Clone, Default)]
pub struct Reaper {
    waiters: Arc<Mutex<Waiters>>,
}

impl Reaper {
    /// Makes this process a child subreaper and starts reaping on SIGCHLD.
    /// Must be called inside a tokio runtime.
    pub fn install() -> io::Result<Reaper> {
        nix::sys::prctl::set_child_subreaper(true)?;
        let reaper = Reaper::default();
        let mut sigchld = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())?;
        let r = reaper.clone();
        tokio::spawn(async move {
            loop {
                r.reap_all();
                if sigchld.recv().await.is_none() {
                    break;
                }
            }
        });
        Ok(reaper)
    }

    /// Reaps every exited child now; wakes their waiters.
    pub fn reap_all(&self) {
        let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => {
                    deliver(&mut waiters, pid.as_raw(), ExitStatus::Code(code))
                }
                Ok(WaitStatus::Signaled(pid, sig, _)) => {
                    deliver(&mut waiters, pid.as_raw(), ExitStatus::Signal(sig as i32))
                }
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    }

    /// Spawns `cmd` and registers it.
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<Spawned> {
        let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        let child = cmd.spawn()?;
        let pid = child.id() as i32;
        let (tx, rx) = oneshot::channel();
        waiters.insert(pid, tx);
        Ok(Spawned {
            pid,
            exit: rx,
            child: Some(child),
        })
    }

    /// Runs `start` (which creates one child process and returns its PID)
    /// under the reaper's lock and registers the child.
    pub fn spawn_with(&self, start: impl FnOnce() -> io::Result<i32>) -> io::Result<Spawned> {
        let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        let pid = start()?;
        let (tx, rx) = oneshot::channel();
        waiters.insert(pid, tx);
        Ok(Spawned {
            pid,
            exit: rx,
            child: None,
        })
    }
}

fn deliver(waiters: &mut Waiters, pid: i32, status: ExitStatus) {
    match waiters.remove(&pid) {
        Some(tx) => {
            let _ = tx.send(status);
        }
        None => tracing::debug!(pid, %status, "reaped an orphaned descendant"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_status_display_and_raw() {
        assert_eq!(ExitStatus::Code(3).to_string(), "exit code 3");
        assert_eq!(ExitStatus::Signal(9).to_string(), "killed by SIGKILL");
        assert_eq!(ExitStatus::from_raw(0x0100), ExitStatus::Code(1));
        assert_eq!(ExitStatus::from_raw(9), ExitStatus::Signal(9));
        assert!(ExitStatus::Code(0).success());
        assert!(!ExitStatus::Signal(15).success());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reaps_registered_children_with_status() {
        let reaper = Reaper::install().unwrap();
        let a = reaper
            .spawn(Command::new("/bin/sh").args(["-c", "exit 7"]))
            .unwrap();
        let b = reaper
            .spawn(Command::new("/bin/sh").args(["-c", "kill -TERM $$"]))
            .unwrap();
        assert_eq!(a.exit.await.unwrap(), ExitStatus::Code(7));
        assert_eq!(b.exit.await.unwrap(), ExitStatus::Signal(15));
    }
}
