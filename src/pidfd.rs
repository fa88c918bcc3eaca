//! Process file descriptors (`pidfd_open(2)`, `pidfd_send_signal(2)`,
//! `pidfd_getfd(2)`): the one place supervise names a process by a handle
//! that cannot come to mean another process when its PID is reused.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// `pidfd_open(2)`.
pub fn open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: raw syscall with integer arguments; the fd is owned on success.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `pidfd_send_signal(2)` on `pidfd`, no siginfo. Async-signal-safe (one
/// raw syscall, no allocation): usable in a forked child, as the lazy
/// restore's guard does. Returns the syscall's result (0 on success).
pub fn send_signal_raw(pidfd: RawFd, sig: i32) -> libc::c_long {
    // SAFETY: a raw syscall on integers; no memory is passed.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd,
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    }
}

/// `pidfd_send_signal(2)` on `pidfd`.
pub fn send_signal(pidfd: &OwnedFd, sig: i32) -> io::Result<()> {
    if send_signal_raw(pidfd.as_raw_fd(), sig) != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A duplicate of descriptor `fd` of process `pid` (`pidfd_getfd(2)`).
pub fn getfd(pid: i32, fd: i32) -> io::Result<File> {
    let pidfd = open(pid)?;
    // SAFETY: a raw syscall on integers; the returned descriptor is new.
    let n = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `n` is a fresh descriptor owned here alone.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(n as i32) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_through_a_pidfd() {
        let mut c = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let fd = open(c.id() as i32).unwrap();
        send_signal(&fd, libc::SIGKILL).unwrap();
        let st = c.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(st.signal(), Some(libc::SIGKILL));
        // The process is gone: the pidfd still names it, not a reuse.
        assert!(send_signal(&fd, libc::SIGKILL).is_err());
    }

    #[test]
    fn getfd_duplicates_a_descriptor_of_a_process() {
        let me = std::process::id() as i32;
        let f = tempfile::tempfile().unwrap();
        let dup = getfd(me, f.as_raw_fd()).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(dup.metadata().unwrap().ino(), f.metadata().unwrap().ino());
    }
}
