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

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::fsutil;

/// The lease file in the store directory.
pub const LEASE_NAME: &str = ".lease.json";
/// The lock file guarding the lease.
pub const LEASE_LOCK_NAME: &str = ".lease.lock";
/// Prefix of the release markers (`.released-<epoch>`).
pub const RELEASED_PREFIX: &str = ".released-";
/// Largest `.lease.json` read: it holds an epoch and an [`Owner`] (a few
/// hundred bytes); anything bigger is not a lease.
pub const MAX_LEASE_BYTES: u64 = 64 << 10;

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
    /// A later run of the same Slurm job holds the lease: this copy is
    /// stale (e.g. a service restarted on a node Slurm has moved the job
    /// away from) and must not take the store back.
    #[error(
        "a later run holds the image store: {by} (epoch {epoch}); this copy (run {run}) is stale"
    )]
    Stale {
        /// The holder.
        by: Owner,
        /// Its epoch.
        epoch: u64,
        /// Our run (`SLURM_RESTART_COUNT`).
        run: u32,
    },
    /// The lease files could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// A lease file is not a regular file (a symlink, a FIFO, a device)
    /// or is too large; `reason` names it.
    #[error("{reason}")]
    Unusable {
        /// The file.
        path: PathBuf,
        /// What is wrong with it (names the path).
        reason: String,
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
    move |source| {
        // fsutil's errors may name the path already.
        let msg = source.to_string();
        let source = match msg.strip_prefix(&format!("{}: ", path.display())) {
            Some(rest) => io::Error::new(source.kind(), rest.to_string()),
            None => source,
        };
        FenceError::Io { path, source }
    }
}

/// An error of an fsutil open/read of a lease file: I/O (not found,
/// permission denied) or [`FenceError::Unusable`] saying what it is.
fn file_err(path: &Path) -> impl FnOnce(io::Error) -> FenceError + '_ {
    move |e| {
        if e.kind() == io::ErrorKind::NotFound || fsutil::is_permission_denied(&e) {
            io_err(path)(e)
        } else {
            FenceError::Unusable {
                path: path.to_path_buf(),
                reason: fsutil::describe_error(path, &e),
            }
        }
    }
}

/// An exclusive `flock` held until dropped.
pub struct Locked {
    _file: File,
}

fn lock(path: &Path) -> Result<Locked, FenceError> {
    let f = fsutil::open_rw_nofollow(path, 0o600).map_err(file_err(path))?;
    fsutil::flock(&f, true, false).map_err(io_err(path))?;
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
        dir.join(LEASE_NAME)
    }

    fn released_path(dir: &Path, epoch: u64) -> PathBuf {
        dir.join(format!("{RELEASED_PREFIX}{epoch}"))
    }

    /// Reads the current lease, if any: a regular file (not followed
    /// through a symlink) of at most [`MAX_LEASE_BYTES`].
    pub fn current(dir: &Path) -> Result<Option<Lease>, FenceError> {
        let p = Self::lease_path(dir);
        match fsutil::read_limited(&p, MAX_LEASE_BYTES) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| FenceError::Malformed {
                    path: p,
                    reason: e.to_string(),
                }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(file_err(&p)(e)),
        }
    }

    /// Takes the lease of `dir` (which must exist): epoch + 1, written
    /// atomically under the lock. Does not wait for the previous holder;
    /// see [`Fence::await_release`]. Refused ([`FenceError::Stale`]) when
    /// a later run of the same Slurm job holds it.
    pub fn acquire(dir: &Path, owner: Owner) -> Result<Fence, FenceError> {
        let _l = lock(&dir.join(LEASE_LOCK_NAME))?;
        let previous = Self::current(dir)?;
        if let Some(p) = previous.as_ref().filter(|p| {
            p.owner.slurm_job_id == owner.slurm_job_id
                && p.owner.restart_count > owner.restart_count
        }) {
            return Err(FenceError::Stale {
                by: p.owner.clone(),
                epoch: p.epoch,
                run: owner.restart_count,
            });
        }
        let epoch = previous.as_ref().map_or(1, |l| l.epoch + 1);
        let lease = Lease {
            epoch,
            owner: owner.clone(),
        };
        let p = Self::lease_path(dir);
        fsutil::write_atomic(
            &p,
            &serde_json::to_vec(&lease).expect("lease serialises"),
            0o600,
        )
        .map_err(io_err(&p))?;
        // Markers older than the previous epoch are of no use any more.
        if let Ok(rd) = fs::read_dir(dir) {
            for e in rd.flatten() {
                let name = e.file_name();
                let Some(n) = name.to_str().and_then(|n| n.strip_prefix(RELEASED_PREFIX)) else {
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
            if fs::symlink_metadata(&marker).is_ok_and(|m| m.is_file()) {
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
        let _l = lock(&self.dir.join(LEASE_LOCK_NAME))?;
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
        let l = lock(&self.dir.join(LEASE_LOCK_NAME))?;
        self.check_unlocked()?;
        Ok(l)
    }

    /// Records that this copy's job is stopped and it will not write again.
    pub fn release(&self) -> Result<(), FenceError> {
        let p = Self::released_path(&self.dir, self.epoch);
        fsutil::write_atomic(&p, b"", 0o600).map_err(io_err(&p))
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
    fn an_earlier_run_never_takes_the_store_back() {
        let t = tempfile::tempdir().unwrap();
        let b = Fence::acquire(t.path(), owner(1)).unwrap();
        let e = Fence::acquire(t.path(), owner(0)).unwrap_err();
        assert!(
            matches!(&e, FenceError::Stale { by, epoch: 1, run: 0 } if by == &owner(1)),
            "{e}"
        );
        assert!(e.to_string().contains("is stale"), "{e}");
        b.check().unwrap();
        // The same run again (its supervise restarted) takes it over.
        let again = Fence::acquire(t.path(), owner(1)).unwrap();
        assert_eq!(again.epoch, 2);
        // Another Slurm job's lease is no reason to refuse.
        let other = Owner {
            slurm_job_id: "8".into(),
            ..owner(0)
        };
        assert_eq!(Fence::acquire(t.path(), other).unwrap().epoch, 3);
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

    #[test]
    fn hostile_lease_files_neither_block_nor_allocate() {
        let t = tempfile::tempdir().unwrap();
        let lease = t.path().join(LEASE_NAME);
        nix::unistd::mkfifo(&lease, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let e = Fence::current(t.path()).unwrap_err().to_string();
        assert!(e.contains(".lease.json is a FIFO"), "{e}");
        fs::remove_file(&lease).unwrap();
        std::os::unix::fs::symlink("/dev/zero", &lease).unwrap();
        let e = Fence::current(t.path()).unwrap_err().to_string();
        assert!(e.contains(".lease.json is a symlink"), "{e}");
        fs::remove_file(&lease).unwrap();
        File::create(&lease)
            .unwrap()
            .set_len(MAX_LEASE_BYTES + 1)
            .unwrap();
        let e = Fence::current(t.path()).unwrap_err().to_string();
        assert!(e.contains("larger than"), "{e}");
        fs::remove_file(&lease).unwrap();
        // The lock file: never opened through a FIFO or symlink.
        let lock = t.path().join(LEASE_LOCK_NAME);
        nix::unistd::mkfifo(&lock, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let e = Fence::acquire(t.path(), owner(0)).unwrap_err().to_string();
        assert!(e.contains(".lease.lock is a FIFO"), "{e}");
        fs::remove_file(&lock).unwrap();
        // A symlink in place of the lease is replaced, never written through.
        let victim = t.path().join("victim");
        fs::write(&victim, b"keep").unwrap();
        std::os::unix::fs::symlink(&victim, &lease).unwrap();
        assert!(Fence::current(t.path()).is_err());
        fs::remove_file(&lease).unwrap();
        let a = Fence::acquire(t.path(), owner(0)).unwrap();
        a.release().unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"keep");
        let names: Vec<String> = fs::read_dir(t.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().into_string().unwrap())
            .filter(|n| n.contains(".tmp"))
            .collect();
        assert!(names.is_empty(), "{names:?}");
    }
}
