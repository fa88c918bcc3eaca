//! Jobs that run as their owner, not as root.
//!
//! A job owned by a user (an [`Owner`]: uid, gid, supplementary groups)
//! runs in a user namespace of its own, created by supervise (root) with
//! the job's PID and mount namespaces, that maps only the owner's uid and
//! gids to themselves. Inside it the job's processes run as the owner with
//! no capabilities; supervise's namespace init stays the unmapped root of
//! the namespace, holding every capability *in it* and none outside.
//!
//! CRIU needs capabilities the owner does not have. It is run inside the
//! job's namespaces **as the owner**, with every capability of the job's
//! user namespace but `CAP_SETUID` (ambient capabilities, so they survive
//! `execve`), in CRIU's `--unprivileged` mode: without `CAP_SETUID` CRIU
//! does not try to become uid 0 (which is not mapped), and as the owner it
//! restores the owner's processes without changing uids. Whatever CRIU
//! opens by path it opens with the owner's rights; the capabilities hold
//! only over the job's own namespaces. This was tried by hand on this
//! machine before it was built (the C programs are in the CHANGELOG's
//! issue 24 entry): a dump and a restore of a counter, its count going on.
//!
//! Supervise's own work on the job's files (rollback) runs with the
//! owner's filesystem credentials on a thread of its own ([`as_owner`]:
//! `setfsuid`/`setfsgid`/`setgroups` are per thread as raw syscalls).

use std::ffi::CString;
use std::io;

use serde::{Deserialize, Serialize};

/// Whose a job is: the credentials its processes run with.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Owner {
    /// User name (for messages).
    pub name: String,
    /// uid.
    pub uid: u32,
    /// Primary gid.
    pub gid: u32,
    /// Supplementary groups (the primary gid not repeated).
    pub groups: Vec<u32>,
}

/// Why an owner could not be found.
#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    /// No such user.
    #[error("no user {0:?} on this machine")]
    NoUser(String),
    /// No such group.
    #[error("no group {0:?} on this machine")]
    NoGroup(String),
    /// root cannot be a job's owner in this sense (root's jobs run as root).
    #[error("user {0:?} is root: root's jobs run without a user namespace; leave `user` out")]
    Root(String),
    /// The user database could not be read.
    #[error("cannot look up {what}: {source}")]
    Lookup {
        /// What was looked up.
        what: String,
        /// Cause.
        source: nix::Error,
    },
}

impl Owner {
    /// The user `user` (a name or a numeric uid), with its primary group
    /// unless `group` names another, and its supplementary groups.
    pub fn lookup(user: &str, group: Option<&str>) -> Result<Owner, OwnerError> {
        use nix::unistd::{Group, Uid, User};
        let lookup = |e| OwnerError::Lookup {
            what: format!("user {user:?}"),
            source: e,
        };
        let u = match user.parse::<u32>() {
            Ok(n) => User::from_uid(Uid::from_raw(n)).map_err(lookup)?,
            Err(_) => User::from_name(user).map_err(lookup)?,
        }
        .ok_or_else(|| OwnerError::NoUser(user.to_string()))?;
        if u.uid.is_root() {
            return Err(OwnerError::Root(user.to_string()));
        }
        let gid = match group {
            None => u.gid.as_raw(),
            Some(g) => {
                let lookup = |e| OwnerError::Lookup {
                    what: format!("group {g:?}"),
                    source: e,
                };
                match g.parse::<u32>() {
                    Ok(n) => n,
                    Err(_) => Group::from_name(g)
                        .map_err(lookup)?
                        .ok_or_else(|| OwnerError::NoGroup(g.to_string()))?
                        .gid
                        .as_raw(),
                }
            }
        };
        let name = CString::new(u.name.clone()).map_err(|_| OwnerError::NoUser(user.into()))?;
        let mut groups: Vec<u32> = nix::unistd::getgrouplist(&name, u.gid)
            .map(|g| g.into_iter().map(|g| g.as_raw()).collect())
            .unwrap_or_default();
        groups.retain(|g| *g != gid);
        groups.sort_unstable();
        groups.dedup();
        Ok(Owner {
            name: u.name,
            uid: u.uid.as_raw(),
            gid,
            groups,
        })
    }

    /// The owner of uid `uid` (its primary group and groups).
    pub fn of_uid(uid: u32) -> Result<Owner, OwnerError> {
        Owner::lookup(&uid.to_string(), None)
    }

    /// `uid_map`: the owner's uid, to itself.
    pub fn uid_map(&self) -> String {
        format!("{0} {0} 1\n", self.uid)
    }

    /// `gid_map`: the owner's gids, each to itself.
    pub fn gid_map(&self) -> String {
        self.all_gids()
            .iter()
            .map(|g| format!("{g} {g} 1\n"))
            .collect()
    }

    /// The primary gid and the supplementary groups, sorted, once each.
    fn all_gids(&self) -> Vec<u32> {
        let mut v = self.groups.clone();
        v.push(self.gid);
        v.sort_unstable();
        v.dedup();
        v
    }
}

/// Writes the user namespace maps of process `pid` (a child just cloned
/// into a new user namespace) for `owner`.
pub fn write_maps(pid: i32, owner: &Owner) -> io::Result<()> {
    let w = |what: &str, text: &str| {
        std::fs::write(format!("/proc/{pid}/{what}"), text)
            .map_err(|e| io::Error::new(e.kind(), format!("writing {what} of {pid}: {e}")))
    };
    w("uid_map", &owner.uid_map())?;
    w("gid_map", &owner.gid_map())
}

/// Waits (bounded) until this process's user namespace has its maps (the
/// parent writes them just after the clone).
pub fn await_maps() -> Result<(), String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let mapped = std::fs::read_to_string("/proc/self/uid_map")
            .map(|m| !m.trim().is_empty())
            .unwrap_or(false);
        if mapped {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err("the user namespace was never given its id maps".into());
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// The capability sets of the calling thread, raw (`capget`/`capset`
/// with the two 32-bit words of version 3).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

const CAP_V3: u32 = 0x2008_0522;
/// Highest capability number this code knows of (CAP_CHECKPOINT_RESTORE).
const CAP_LAST: u32 = 40;
/// `CAP_SETUID` (linux/capability.h).
const CAP_SETUID: u32 = 7;

/// In a forked child before `execve` (async-signal-safe: raw syscalls
/// only): become `uid`/`gid` with supplementary `groups`.
/// With `keep_caps`, every capability the process holds (in its user
/// namespace) but `CAP_SETUID` is kept across the `execve` as an ambient
/// capability (CRIU's); without, every capability is dropped (the job's).
///
/// # Safety
/// Only raw syscalls on plain data: callable between `fork` and `execve`.
pub unsafe fn become_owner(uid: u32, gid: u32, groups: &[u32], keep_caps: bool) -> io::Result<()> {
    let err = || Err(io::Error::last_os_error());
    if libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) != 0 {
        return err();
    }
    if libc::syscall(libc::SYS_setresgid, gid, gid, gid) != 0 {
        return err();
    }
    if keep_caps && libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0 {
        return err();
    }
    if libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0 {
        return err();
    }
    let mut hdr = CapHeader {
        version: CAP_V3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    if libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) != 0 {
        return err();
    }
    if keep_caps {
        // Effective and inheritable: everything permitted but CAP_SETUID.
        let setuid_bit = 1u32 << CAP_SETUID;
        data[0].effective = data[0].permitted;
        data[1].effective = data[1].permitted;
        data[0].inheritable = data[0].permitted & !setuid_bit;
        data[1].inheritable = data[1].permitted;
    } else {
        data = [CapData::default(); 2];
    }
    if libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) != 0 {
        return err();
    }
    if libc::prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL,
        0,
        0,
        0,
    ) != 0
    {
        return err();
    }
    if keep_caps {
        for cap in 0..=CAP_LAST {
            if cap == CAP_SETUID {
                continue;
            }
            let word = (cap / 32) as usize;
            if data[word].inheritable & (1 << (cap % 32)) != 0 {
                // Unknown capabilities of an older kernel just fail.
                libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_RAISE, cap, 0, 0);
            }
        }
    }
    Ok(())
}

/// In a child just cloned into a new user namespace, before `execve`:
/// keeps every capability it holds (all, in that namespace) across the
/// `execve` as ambient capabilities, which an unmapped uid would
/// otherwise lose there (supervise's namespace init).
///
/// # Safety
/// Only raw syscalls on plain data: callable between `clone` and `execve`.
pub unsafe fn keep_caps_across_exec() -> io::Result<()> {
    let mut hdr = CapHeader {
        version: CAP_V3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    if libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) != 0 {
        return Err(io::Error::last_os_error());
    }
    data[0].inheritable = data[0].permitted;
    data[1].inheritable = data[1].permitted;
    if libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) != 0 {
        return Err(io::Error::last_os_error());
    }
    for cap in 0..=CAP_LAST {
        libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_RAISE, cap, 0, 0);
    }
    Ok(())
}

/// Runs `f` on a thread of its own with the filesystem rights of
/// `owner` (`setfsuid`, `setfsgid` and the supplementary groups, which
/// are per thread as raw syscalls; the kernel drops the filesystem
/// capabilities of a thread whose fsuid is not 0), and returns its result.
/// The calling thread's credentials are untouched.
pub fn as_owner<T: Send>(owner: &Owner, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    let (uid, gid, groups) = (owner.uid, owner.gid, owner.groups.clone());
    std::thread::scope(|s| {
        s.spawn(move || {
            // SAFETY: raw per-thread credential syscalls on plain data.
            unsafe {
                if libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) != 0 {
                    return Err(io::Error::last_os_error());
                }
                libc::syscall(libc::SYS_setfsgid, gid);
                libc::syscall(libc::SYS_setfsuid, uid);
                // setfsuid reports the old value, not errors: check.
                if libc::syscall(libc::SYS_setfsuid, -1i32) as u32 != uid
                    || libc::syscall(libc::SYS_setfsgid, -1i32) as u32 != gid
                {
                    return Err(io::Error::other("cannot take the owner's file credentials"));
                }
            }
            Ok(f())
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("owner thread panicked")))
    })
}

/// `supervise __nsexec PID UID GID GROUPS PROG ARGS...`: joins the user,
/// PID and mount namespaces of `PID`, becomes the owner keeping the
/// namespace's capabilities but `CAP_SETUID` (see [`become_owner`]), and
/// runs `PROG` there (forked, since a new PID namespace applies to
/// children), exiting with its status. Inherited descriptors stay open.
/// Called in a fresh single-threaded process.
pub fn nsexec(args: &[String]) -> i32 {
    match nsexec_inner(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("supervise __nsexec: {e}");
            126
        }
    }
}

fn nsexec_inner(args: &[String]) -> Result<i32, String> {
    let [pid, uid, gid, groups, prog, rest @ ..] = args else {
        return Err("usage: __nsexec PID UID GID GROUPS PROG ARGS...".into());
    };
    let num = |s: &str| s.parse::<u32>().map_err(|_| format!("bad number {s:?}"));
    let (uid, gid) = (num(uid)?, num(gid)?);
    let groups: Vec<u32> = if groups == "-" {
        Vec::new()
    } else {
        groups.split(',').map(num).collect::<Result<_, _>>()?
    };
    let pid: i32 = pid.parse().map_err(|_| format!("bad pid {pid:?}"))?;
    let mut fds = Vec::new();
    for ns in ["user", "pid", "mnt"] {
        let p = format!("/proc/{pid}/ns/{ns}");
        let f = std::fs::File::open(&p).map_err(|e| format!("{p}: {e}"))?;
        fds.push((ns, f));
    }
    for (ns, f) in &fds {
        use std::os::fd::AsFd;
        nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::empty())
            .map_err(|e| format!("cannot join the job's {ns} namespace: {e}"))?;
    }
    drop(fds);
    std::env::set_current_dir("/").map_err(|e| e.to_string())?;
    let prog_c = CString::new(prog.as_str()).map_err(|e| e.to_string())?;
    let mut argv: Vec<CString> = vec![prog_c.clone()];
    for a in rest {
        argv.push(CString::new(a.as_str()).map_err(|e| e.to_string())?);
    }
    // SAFETY: single-threaded process; the child only makes raw syscalls
    // and execs.
    match unsafe { nix::unistd::fork() }.map_err(|e| e.to_string())? {
        nix::unistd::ForkResult::Child => {
            // SAFETY: between fork and exec.
            if unsafe { become_owner(uid, gid, &groups, true) }.is_err() {
                // SAFETY: exit without running destructors.
                unsafe { libc::_exit(125) };
            }
            let _ = nix::unistd::execvp(&prog_c, &argv);
            // SAFETY: as above.
            unsafe { libc::_exit(127) }
        }
        nix::unistd::ForkResult::Parent { child } => loop {
            match nix::sys::wait::waitpid(child, None) {
                Ok(nix::sys::wait::WaitStatus::Exited(_, c)) => return Ok(c),
                Ok(nix::sys::wait::WaitStatus::Signaled(_, s, _)) => return Ok(128 + s as i32),
                Ok(_) => continue,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.to_string()),
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_name_each_id_once() {
        let o = Owner {
            name: "alice".into(),
            uid: 1500,
            gid: 1500,
            groups: vec![27, 1500, 100],
        };
        assert_eq!(o.uid_map(), "1500 1500 1\n");
        assert_eq!(o.gid_map(), "27 27 1\n100 100 1\n1500 1500 1\n");
    }

    #[test]
    fn root_is_not_an_owner_and_unknown_users_are_named() {
        assert!(matches!(
            Owner::lookup("root", None),
            Err(OwnerError::Root(_))
        ));
        assert!(matches!(
            Owner::lookup("no-such-user-xyz", None),
            Err(OwnerError::NoUser(_))
        ));
        let nobody = Owner::lookup("nobody", None).unwrap();
        assert_eq!(nobody.uid, 65534);
    }

    #[cfg_attr(not(root), ignore = "needs root")]
    #[test]
    fn a_thread_with_the_owners_file_rights_cannot_read_roots_files() {
        let t = tempfile::tempdir().unwrap();
        let secret = t.path().join("secret");
        std::fs::write(&secret, "x").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let nobody = Owner::lookup("nobody", None).unwrap();
        let r = as_owner(&nobody, || std::fs::read(&secret)).unwrap();
        assert_eq!(
            r.unwrap_err().kind(),
            io::ErrorKind::PermissionDenied,
            "as nobody"
        );
        // This thread is still root.
        assert!(std::fs::read(&secret).is_ok());
    }
}
