//! supervise's file descriptor budget.
//!
//! `supervise run` raises its soft `RLIMIT_NOFILE` to the hard limit at
//! start ([`raise`]), so the limit is what the administrator allowed
//! (systemd's `LimitNOFILE=`, see `packaging/supervise.service`), not the
//! historical 1024. The jobs do not inherit the raised limit: a launched
//! job gets the soft limit supervise was started with back
//! ([`job_soft_limit`]; programs that use `select(2)` break above 1024),
//! and a restored one the limits CRIU recorded.
//!
//! The listeners size their connection caps from the budget
//! ([`crate::admission::Limits`]): together at most about a fifth of it
//! (twice their caps, counting connections being closed),
//! so the rest stays in reserve for checkpoints and restores.

use std::sync::atomic::{AtomicU64, Ordering};

/// The soft limit supervise was started with (0: not raised).
static ORIGINAL_SOFT: AtomicU64 = AtomicU64::new(0);

/// What [`raise`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Raised {
    /// The soft limit before.
    pub before: u64,
    /// The soft limit now (the hard limit, unless that could not be set).
    pub now: u64,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; remembers the old
/// soft limit for the jobs ([`job_soft_limit`]).
pub fn raise() -> std::io::Result<Raised> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let _ = ORIGINAL_SOFT.compare_exchange(0, soft, Ordering::SeqCst, Ordering::SeqCst);
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    let (now, _) = getrlimit(Resource::RLIMIT_NOFILE)?;
    Ok(Raised { before: soft, now })
}

/// The soft limit a launched job should get: the one supervise was
/// started with, if [`raise`] changed it.
pub fn job_soft_limit() -> Option<u64> {
    match ORIGINAL_SOFT.load(Ordering::SeqCst) {
        0 => None,
        v => Some(v),
    }
}

/// The current soft limit (the budget the caps are sized from).
pub fn budget() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(s, _)| s)
        .unwrap_or(1024)
}

/// Sets the soft limit of the calling process to `soft` (at most the hard
/// limit); used by the namespace init before it starts the job.
pub fn set_soft(soft: u64) -> std::io::Result<()> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, soft.min(hard), hard)?;
    Ok(())
}

/// True for an OS error that says a resource ran short (descriptors,
/// memory, disk space, a signal, a busy retry), not that anything is
/// wrong with what was read: such an error is never taken for damage.
pub fn is_resource_error(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::EMFILE
                | libc::ENFILE
                | libc::ENOMEM
                | libc::ENOSPC
                | libc::EINTR
                | libc::EAGAIN
                | libc::ENOBUFS
                | libc::EDQUOT
        )
    ) || e.kind() == std::io::ErrorKind::OutOfMemory
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_errors_are_told_from_others() {
        for errno in [
            libc::EMFILE,
            libc::ENFILE,
            libc::ENOMEM,
            libc::ENOSPC,
            libc::EAGAIN,
        ] {
            assert!(is_resource_error(&std::io::Error::from_raw_os_error(errno)));
        }
        for errno in [libc::EIO, libc::ENOENT, libc::EACCES, libc::EINVAL] {
            assert!(!is_resource_error(&std::io::Error::from_raw_os_error(
                errno
            )));
        }
        assert!(!is_resource_error(&std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "bad"
        )));
    }

    #[test]
    fn raise_reaches_the_hard_limit_and_remembers_the_soft_one() {
        use nix::sys::resource::{getrlimit, Resource};
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        let r = raise().unwrap();
        assert_eq!(r.before, soft);
        assert_eq!(r.now, hard);
        assert_eq!(budget(), hard);
        assert!(job_soft_limit().is_some());
    }
}
