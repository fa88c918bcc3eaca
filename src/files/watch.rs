//! fanotify, as the files tracker uses it ([`super::tracker`]): a
//! notification group reporting directory entry events by directory file
//! handle and name (`FAN_REPORT_DFID_NAME`), inode marks on directories
//! (events on their direct children), and the parser of the event records.
//!
//! Why fanotify with inode marks: it reports creations, deletions, renames
//! (both names in one `FAN_RENAME` event) and closes after writing, with
//! the name, and it reports *who* did it: the PID of the process as seen
//! from the PID namespace of the process reading the events (0 when that
//! process is not in it), and that number survives the process (the event
//! holds the kernel's `struct pid`). Reading in the job's own PID
//! namespace therefore tells the job's changes from everybody else's
//! exactly, even for a short-lived `mv` that exited before the event was
//! read. Mount marks cannot report directory entry events (EINVAL on this
//! kernel); a filesystem mark would queue every process's events on the
//! whole file system. inotify reports no PID at all.

use std::ffi::{CStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;

/// The events asked for on each watched directory.
pub const MASK: u64 = libc::FAN_CREATE
    | libc::FAN_DELETE
    | libc::FAN_RENAME
    | libc::FAN_CLOSE_WRITE
    | libc::FAN_ONDIR
    | libc::FAN_EVENT_ON_CHILD;

/// A file system object as fanotify names it: the file system's id, the
/// handle type and the handle's bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Handle {
    /// `f_fsid` of the file system.
    pub fsid: [i32; 2],
    /// `handle_type` of the file handle.
    pub kind: i32,
    /// The handle's bytes.
    pub bytes: Vec<u8>,
}

/// Which name of an event an info record carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The only name (create, delete, close).
    Name,
    /// A rename's old name.
    Old,
    /// A rename's new name.
    New,
}

/// One event record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// `FAN_*` bits.
    pub mask: u64,
    /// Who, as seen by the reader (0: a process outside its PID namespace).
    pub pid: i32,
    /// (role, directory, name in it).
    pub names: Vec<(Role, Handle, OsString)>,
}

impl Event {
    /// The event is about a directory (`FAN_ONDIR`).
    pub fn on_dir(&self) -> bool {
        self.mask & libc::FAN_ONDIR != 0
    }

    /// The kernel dropped events (queue overflow).
    pub fn overflow(&self) -> bool {
        self.mask & libc::FAN_Q_OVERFLOW != 0
    }
}

const META_LEN: usize = 24;
const INFO_DFID_NAME: u8 = 2;
const INFO_OLD_DFID_NAME: u8 = 10;
const INFO_NEW_DFID_NAME: u8 = 12;

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn i32_at(b: &[u8], at: usize) -> Option<i32> {
    Some(i32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Splits `buf` into whole event records: returns the events and how many
/// bytes they took (a record cut at the end is left for the next read).
/// A malformed record is an error (the stream cannot be resynchronised).
pub fn parse(buf: &[u8]) -> Result<(Vec<Event>, usize), String> {
    let mut out = Vec::new();
    let mut at = 0;
    while buf.len() - at >= META_LEN {
        let len = u32_at(buf, at).unwrap_or(0) as usize;
        if len < META_LEN {
            return Err(format!("event record of {len} bytes"));
        }
        if buf.len() - at < len {
            break;
        }
        let rec = &buf[at..at + len];
        let meta_len = u16_at(rec, 6).unwrap_or(0) as usize;
        if meta_len < META_LEN || meta_len > len {
            return Err(format!("event metadata of {meta_len} bytes"));
        }
        let mask = u64_at(rec, 8).unwrap_or(0);
        let pid = i32_at(rec, 20).unwrap_or(0);
        let mut names = Vec::new();
        let mut i = meta_len;
        while len - i >= 4 {
            let kind = rec[i];
            let ilen = u16_at(rec, i + 2).unwrap_or(0) as usize;
            if ilen < 4 || i + ilen > len {
                return Err(format!("event info record of {ilen} bytes"));
            }
            let info = &rec[i..i + ilen];
            let role = match kind {
                INFO_DFID_NAME => Some(Role::Name),
                INFO_OLD_DFID_NAME => Some(Role::Old),
                INFO_NEW_DFID_NAME => Some(Role::New),
                _ => None,
            };
            if let Some(role) = role {
                names.push(parse_dfid_name(info, role)?);
            }
            i += ilen;
        }
        out.push(Event { mask, pid, names });
        at += len;
    }
    Ok((out, at))
}

/// header(4) fsid(8) handle_bytes(4) handle_type(4) handle name\0 [pad].
fn parse_dfid_name(info: &[u8], role: Role) -> Result<(Role, Handle, OsString), String> {
    let bad = || "malformed directory file handle record".to_string();
    let fsid = [
        i32_at(info, 4).ok_or_else(bad)?,
        i32_at(info, 8).ok_or_else(bad)?,
    ];
    let hlen = u32_at(info, 12).ok_or_else(bad)? as usize;
    let kind = i32_at(info, 16).ok_or_else(bad)?;
    let bytes = info.get(20..20 + hlen).ok_or_else(bad)?.to_vec();
    let rest = info.get(20 + hlen..).ok_or_else(bad)?;
    let name = CStr::from_bytes_until_nul(rest).map_err(|_| bad())?;
    Ok((
        role,
        Handle { fsid, kind, bytes },
        OsString::from_vec(name.to_bytes().to_vec()),
    ))
}

/// A new notification group (needs CAP_SYS_ADMIN: events then carry
/// PIDs). Non-blocking, close-on-exec, with an unbounded queue (a job's
/// burst of events is never dropped; the reader keeps up).
pub fn group() -> io::Result<OwnedFd> {
    let flags = libc::FAN_CLASS_NOTIF
        | libc::FAN_CLOEXEC
        | libc::FAN_NONBLOCK
        | libc::FAN_UNLIMITED_QUEUE
        | libc::FAN_REPORT_DFID_NAME;
    // SAFETY: plain syscall.
    let fd = unsafe { libc::fanotify_init(flags, (libc::O_RDONLY | libc::O_LARGEFILE) as u32) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Marks the directory open at `dir` (any descriptor, `O_PATH` too):
/// events on its direct children (and on itself) are reported to `group`.
pub fn mark_dir(group: &OwnedFd, dir: &OwnedFd) -> io::Result<()> {
    // SAFETY: valid descriptors; a NULL path marks `dir` itself.
    let r = unsafe {
        libc::fanotify_mark(
            group.as_raw_fd(),
            libc::FAN_MARK_ADD | libc::FAN_MARK_ONLYDIR,
            MASK,
            dir.as_raw_fd(),
            std::ptr::null(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The handle fanotify reports for the directory open at `dir`.
pub fn handle_of(dir: &OwnedFd) -> io::Result<Handle> {
    // struct file_handle { u32 handle_bytes; i32 handle_type; u8 f_handle[128] }
    let mut buf = [0u8; 8 + 128];
    buf[..4].copy_from_slice(&128u32.to_ne_bytes());
    let mut mount_id: libc::c_int = 0;
    // SAFETY: buf is a valid file_handle with room for MAX_HANDLE_SZ.
    let r = unsafe {
        libc::syscall(
            libc::SYS_name_to_handle_at,
            dir.as_raw_fd(),
            c"".as_ptr(),
            buf.as_mut_ptr(),
            &mut mount_id,
            libc::AT_EMPTY_PATH,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let hlen = (u32_at(&buf, 0).unwrap_or(0) as usize).min(128);
    let kind = i32_at(&buf, 4).unwrap_or(0);
    // SAFETY: fstatfs into a zeroed struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatfs(dir.as_raw_fd(), &mut st) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fsid_t is two ints (its fields are private in libc).
    let fsid: [i32; 2] = unsafe { std::mem::transmute(st.f_fsid) };
    Ok(Handle {
        fsid,
        kind,
        bytes: buf[8..8 + hlen].to_vec(),
    })
}

/// Info record types, for [`record`].
#[cfg(test)]
pub(crate) const INFO: (u8, u8, u8) = (INFO_DFID_NAME, INFO_OLD_DFID_NAME, INFO_NEW_DFID_NAME);

/// An event record as the kernel lays it out.
#[cfg(test)]
pub(crate) fn record(mask: u64, pid: i32, names: &[(u8, &Handle, &str)]) -> Vec<u8> {
    let mut infos = Vec::new();
    for (kind, h, name) in names {
        let mut i = vec![*kind, 0, 0, 0];
        i.extend(h.fsid[0].to_ne_bytes());
        i.extend(h.fsid[1].to_ne_bytes());
        i.extend((h.bytes.len() as u32).to_ne_bytes());
        i.extend(h.kind.to_ne_bytes());
        i.extend(&h.bytes);
        i.extend(name.as_bytes());
        i.push(0);
        while i.len() % 4 != 0 {
            i.push(0);
        }
        let l = i.len() as u16;
        i[2..4].copy_from_slice(&l.to_ne_bytes());
        infos.extend(i);
    }
    let len = (META_LEN + infos.len()) as u32;
    let mut r = Vec::new();
    r.extend(len.to_ne_bytes());
    r.extend([3u8, 0]);
    r.extend((META_LEN as u16).to_ne_bytes());
    r.extend(mask.to_ne_bytes());
    r.extend((-1i32).to_ne_bytes());
    r.extend(pid.to_ne_bytes());
    r.extend(infos);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_renames_and_cut_records() {
        let d = Handle {
            fsid: [7, 8],
            kind: 1,
            bytes: vec![1, 2, 3, 4, 5, 6, 7, 8],
        };
        let e = Handle {
            fsid: [7, 8],
            kind: 1,
            bytes: vec![9; 12],
        };
        let mut buf = record(
            libc::FAN_CREATE,
            1003,
            &[(INFO_DFID_NAME, &d, "restart.tmp")],
        );
        buf.extend(record(
            libc::FAN_RENAME,
            1003,
            &[
                (INFO_OLD_DFID_NAME, &d, "restart.tmp"),
                (INFO_NEW_DFID_NAME, &e, "restart.dat"),
            ],
        ));
        let third = record(libc::FAN_CLOSE_WRITE, 0, &[(INFO_DFID_NAME, &e, "x")]);
        buf.extend(&third[..10]);
        let (ev, used) = parse(&buf).unwrap();
        assert_eq!(used, buf.len() - 10);
        assert_eq!(ev.len(), 2);
        assert_eq!(ev[0].pid, 1003);
        assert_eq!(
            ev[0].names,
            vec![(Role::Name, d.clone(), "restart.tmp".into())]
        );
        assert_eq!(ev[1].mask, libc::FAN_RENAME);
        assert_eq!(ev[1].names[0], (Role::Old, d, "restart.tmp".into()));
        assert_eq!(ev[1].names[1], (Role::New, e, "restart.dat".into()));
        let mut bad = third.clone();
        bad[0..4].copy_from_slice(&3u32.to_ne_bytes());
        assert!(parse(&bad).is_err());
    }
}
