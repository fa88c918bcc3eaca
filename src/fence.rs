//! Fencing between copies of one job (Slurm): a lease with an epoch,
//! recorded in the image store directory, so that when Slurm starts a job
//! again elsewhere while an old copy still runs (its node lost only its
//! slurmd), the two never interleave checkpoints nor fight over the store.
//!
//! * `<dir>/.lease.json` — `{epoch, owner}`; the current holder.
//! * `<dir>/.lease.lock` — `flock`ed while the lease is read or changed, and
//!   while a holder publishes a checkpoint, so "check my epoch, then
//!   publish" is atomic with respect to a new copy taking over.
//! * `<dir>/.released-<epoch>` — written by a holder once its job is
//!   stopped (superseded, requeued, or ended), so the next holder knows the
//!   old copy no longer writes the job's files.
//!
//! The newest copy always wins: Slurm only starts a copy once it considers
//! the previous one gone, so [`Fence::acquire`] takes the lease
//! unconditionally (epoch + 1) and then waits (bounded) for the previous
//! holder's release marker. An old holder checks its epoch before each
//! checkpoint publish and on a timer; once superseded it publishes nothing
//! more, stops its job, writes its release marker, and ends.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Who holds (or held) a lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// Slurm job id.
    pub slurm_job_id: String,
    /// Slurm node.
    pub node: String,
    /// `SLURM_RESTART_COUNT`.
    pub restart_count: u32,
    /// Host name.
    pub host: String,
    /// supervise's pid.
    pub pid: u32,
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "slurm job {} run {} on node {} (host {}, supervise pid {})",
            self.slurm_job_id, self.restart_count, self.node, self.host, self.pid
        )
    }
}

/// Contents of `.lease.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Increases with every new holder.
    pub epoch: u64,
    /// The holder.
    pub owner: Owner,
}

/// Errors of the fence.
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    /// Another copy took the lease.
    #[error("superseded: the image store now belongs to {by} (epoch {epoch})")]
    Superseded {
        /// The new holder.
        by: Owner,
        /// Its epoch.
        epoch: u64,
    },
    /// The lease files could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// `.lease.json` is unreadable.
    #[error("{path}: malformed lease: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> FenceError {
    let path = path.to_path_buf();
    move |source| FenceError::Io { path, source }
}

/// An exclusive `flock` held until dropped.
pub struct Locked {
    _file: File,
}

fn lock(path: &Path) -> Result<Locked, FenceError> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path))?;
    // SAFETY: flock on an fd we own; released when the File is dropped.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(io_err(path)(io::Error::last_os_error()));
    }
    Ok(Locked { _file: f })
}

/// This copy's hold on a store directory.
#[derive(Debug, Clone)]
pub struct Fence {
    dir: PathBuf,
    /// Our epoch.
    pub epoch: u64,
    /// Ourselves.
    pub owner: Owner,
    /// The holder we took over from, if any.
    pub previous: Option<Lease>,
}

/// How taking the lease went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handover {
    /// Nobody held it before.
    Fresh,
    /// The previous holder had released it (or released it while we waited).
    Released,
    /// The previous holder did not confirm within the wait; it may be dead.
    TimedOut,
}

impl Fence {
    fn lease_path(dir: &Path) -> PathBuf {
        dir.join(".lease.json")
    }

    fn released_path(dir: &Path, epoch: u64) -> PathBuf {
        dir.join(format!(".released-{epoch}"))
    }

    /// Reads the current lease, if any.
    pub fn current(dir: &Path) -> Result<Option<Lease>, FenceError> {
        let p = Self::lease_path(dir);
        match fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| FenceError::Malformed {
                    path: p,
                    reason: e.to_string(),
                }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&p)(e)),
        }
    }

    /// Takes the lease of `dir` (which must exist): epoch + 1, written
    /// atomically under the lock. Does not wait for the previous holder;
    /// see [`Fence::await_release`].
    pub fn acquire(dir: &Path, owner: Owner) -> Result<Fence, FenceError> {
        let _l = lock(&dir.join(".lease.lock"))?;
        let previous = Self::current(dir)?;
        let epoch = previous.as_ref().map_or(1, |l| l.epoch + 1);
        let lease = Lease {
            epoch,
            owner: owner.clone(),
        };
        let p = Self::lease_path(dir);
        let tmp = dir.join(".lease.json.tmp");
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        f.write_all(&serde_json::to_vec(&lease).expect("lease serialises"))
            .and_then(|_| f.sync_all())
            .map_err(io_err(&tmp))?;
        fs::rename(&tmp, &p).map_err(io_err(&p))?;
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        // Markers older than the previous epoch are of no use any more.
        if let Ok(rd) = fs::read_dir(dir) {
            for e in rd.flatten() {
                let name = e.file_name();
                let Some(n) = name.to_str().and_then(|n| n.strip_prefix(".released-")) else {
                    continue;
                };
                if n.parse::<u64>().is_ok_and(|k| k + 1 < epoch) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        Ok(Fence {
            dir: dir.to_path_buf(),
            epoch,
            owner,
            previous,
        })
    }

    /// Waits until the previous holder has released the lease, at most
    /// `wait`.
    pub fn await_release(&self, wait: Duration) -> Handover {
        let Some(prev) = &self.previous else {
            return Handover::Fresh;
        };
        let marker = Self::released_path(&self.dir, prev.epoch);
        let deadline = Instant::now() + wait;
        loop {
            if marker.exists() {
                return Handover::Released;
            }
            if Instant::now() >= deadline {
                return Handover::TimedOut;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Fails with [`FenceError::Superseded`] once another copy holds the
    /// lease.
    pub fn check(&self) -> Result<(), FenceError> {
        let _l = lock(&self.dir.join(".lease.lock"))?;
        self.check_unlocked()
    }

    fn check_unlocked(&self) -> Result<(), FenceError> {
        match Self::current(&self.dir)? {
            Some(l) if l.epoch == self.epoch => Ok(()),
            Some(l) => Err(FenceError::Superseded {
                by: l.owner,
                epoch: l.epoch,
            }),
            None => Err(FenceError::Malformed {
                path: Self::lease_path(&self.dir),
                reason: "the lease file disappeared".into(),
            }),
        }
    }

    /// Holds the lease lock and checks our epoch: publish while holding the
    /// returned guard, so no new copy can take over in between.
    pub fn guard(&self) -> Result<Locked, FenceError> {
        let l = lock(&self.dir.join(".lease.lock"))?;
        self.check_unlocked()?;
        Ok(l)
    }

    /// Records that this copy's job is stopped and it will not write again.
    pub fn release(&self) -> Result<(), FenceError> {
        let p = Self::released_path(&self.dir, self.epoch);
        OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&p)
            .map(|_| ())
            .map_err(io_err(&p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(run: u32) -> Owner {
        Owner {
            slurm_job_id: "7".into(),
            node: format!("n{}", run + 1),
            restart_count: run,
            host: "h".into(),
            pid: 100 + run,
        }
    }

    #[test]
    fn newest_copy_wins_and_old_one_sees_it() {
        let t = tempfile::tempdir().unwrap();
        let a = Fence::acquire(t.path(), owner(0)).unwrap();
        assert_eq!(a.epoch, 1);
        assert_eq!(a.await_release(Duration::ZERO), Handover::Fresh);
        a.check().unwrap();
        drop(a.guard().unwrap());

        let b = Fence::acquire(t.path(), owner(1)).unwrap();
        assert_eq!(b.epoch, 2);
        assert_eq!(b.previous.as_ref().unwrap().owner, owner(0));
        let e = a.check().unwrap_err();
        assert!(
            matches!(&e, FenceError::Superseded { by, epoch: 2 } if by == &owner(1)),
            "{e}"
        );
        assert!(e.to_string().contains("node n2"), "{e}");
        assert!(a.guard().is_err(), "an old holder cannot publish");
        b.check().unwrap();

        // The handover waits for the old holder's release marker.
        let t0 = Instant::now();
        assert_eq!(
            b.await_release(Duration::from_millis(200)),
            Handover::TimedOut
        );
        assert!(t0.elapsed() >= Duration::from_millis(200));
        a.release().unwrap();
        assert_eq!(b.await_release(Duration::from_secs(5)), Handover::Released);

        // A third run cleans markers it no longer needs.
        b.release().unwrap();
        let c = Fence::acquire(t.path(), owner(2)).unwrap();
        assert_eq!(c.epoch, 3);
        assert!(!t.path().join(".released-1").exists());
        assert!(
            t.path().join(".released-2").exists(),
            "the previous one is kept"
        );
        assert_eq!(c.await_release(Duration::ZERO), Handover::Released);
    }

    #[test]
    fn guard_excludes_a_takeover() {
        let t = tempfile::tempdir().unwrap();
        let a = Fence::acquire(t.path(), owner(0)).unwrap();
        let g = a.guard().unwrap();
        let dir = t.path().to_path_buf();
        let taker = std::thread::spawn(move || Fence::acquire(&dir, owner(1)).unwrap().epoch);
        std::thread::sleep(Duration::from_millis(100));
        assert!(!taker.is_finished(), "takeover waits for the publish");
        a.check_unlocked().unwrap();
        drop(g);
        assert_eq!(taker.join().unwrap(), 2);
        assert!(a.check().is_err());
        std::fs::write(t.path().join(".lease.json"), "{").unwrap();
        assert!(matches!(
            Fence::current(t.path()),
            Err(FenceError::Malformed { .. })
        ));
    }
}
