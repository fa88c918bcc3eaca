//! Resolving the job's file paths without following anything: directory by
//! directory from `/`, each opened `O_PATH|O_DIRECTORY|O_NOFOLLOW` relative
//! to the one before, each identified by the (device, inode) of the open
//! descriptor. What supervise then does to a file it does through these
//! descriptors, never by path again.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::{fstat, fstatat, FileStat, Mode, SFlag};

use super::DirId;

/// Why a path cannot be walked safely.
#[derive(Debug)]
pub(crate) enum WalkError {
    /// The path is not absolute, or has an empty, `.` or `..` component.
    BadPath(&'static str),
    /// This prefix of the path is a symlink.
    Symlink(PathBuf),
    /// This prefix of the path exists but is not a directory.
    NotADirectory(PathBuf),
    /// This directory is not the one recorded at the checkpoint.
    Replaced(PathBuf),
    /// An OS call failed on this prefix.
    Io(PathBuf, io::Error),
}

/// The outcome of walking to a file's parent directory.
#[derive(Debug)]
pub(crate) enum Walk {
    /// The parent directory, opened `O_PATH`, and the identities of every
    /// directory from `/` to it (first `/`, last the parent).
    Parent(OwnedFd, Vec<DirId>),
    /// This directory on the way does not exist; the identities of those
    /// before it.
    Missing(PathBuf, Vec<DirId>),
}

/// Splits an absolute path into its directory names and its final name.
/// Refuses relative paths and empty, `.` and `..` components: every name
/// is taken literally, relative to the directory before it.
pub(crate) fn split(path: &Path) -> Result<(Vec<&OsStr>, &OsStr), WalkError> {
    let bytes = path.as_os_str().as_bytes();
    let Some(rest) = bytes.strip_prefix(b"/") else {
        return Err(WalkError::BadPath("it is not an absolute path"));
    };
    let mut parts: Vec<&OsStr> = Vec::new();
    for c in rest.split(|&b| b == b'/') {
        match c {
            b"" => return Err(WalkError::BadPath("it has an empty path component")),
            b"." | b".." => {
                return Err(WalkError::BadPath(
                    "it has a '.' or '..' component (supervise takes every name literally)",
                ))
            }
            _ => parts.push(OsStr::from_bytes(c)),
        }
    }
    let name = parts.pop().ok_or(WalkError::BadPath("it names no file"))?;
    Ok((parts, name))
}

/// The (device, inode) of an open descriptor.
pub(crate) fn identity(fd: &impl AsFd) -> io::Result<(DirId, FileStat)> {
    let st = fstat(fd.as_fd().as_raw_fd())?;
    Ok((
        DirId {
            dev: st.st_dev,
            ino: st.st_ino,
        },
        st,
    ))
}

fn own(fd: std::os::fd::RawFd) -> OwnedFd {
    // SAFETY: `fd` was just returned by a successful open and is owned by
    // nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// `openat(dir, name, flags | O_NOFOLLOW | O_CLOEXEC, mode)`.
pub(crate) fn open_at(
    dir: &OwnedFd,
    name: &OsStr,
    flags: OFlag,
    mode: u32,
) -> Result<OwnedFd, Errno> {
    openat(
        Some(dir.as_raw_fd()),
        name,
        flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(mode),
    )
    .map(own)
}

/// Opens the regular file `name` in `dir` (never through a symlink, never
/// blocking on a FIFO, never becoming a controlling terminal) for reading,
/// or reading and writing, and stats it. The caller checks the type and
/// identity on the returned stat.
pub(crate) fn open_file(
    dir: &OwnedFd,
    name: &OsStr,
    write: bool,
) -> Result<(File, FileStat), Errno> {
    open_file_with(dir, name, write, OFlag::empty())
}

/// [`open_file`] with further open flags (e.g. `O_NOATIME`).
pub(crate) fn open_file_with(
    dir: &OwnedFd,
    name: &OsStr,
    write: bool,
    extra: OFlag,
) -> Result<(File, FileStat), Errno> {
    let acc = if write {
        OFlag::O_RDWR
    } else {
        OFlag::O_RDONLY
    };
    let fd = open_at(
        dir,
        name,
        acc | OFlag::O_NONBLOCK | OFlag::O_NOCTTY | extra,
        0,
    )?;
    let st = fstat(fd.as_raw_fd())?;
    Ok((File::from(fd), st))
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`; `None` if there is no such
/// entry.
pub(crate) fn lstat_at(dir: &OwnedFd, name: &OsStr) -> Result<Option<FileStat>, Errno> {
    match fstatat(
        Some(dir.as_raw_fd()),
        name,
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    ) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The file type bits of a stat.
pub(crate) fn kind(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits())
}

/// Walks from `/` to the parent directory of `path`, one
/// `openat(O_PATH|O_DIRECTORY|O_NOFOLLOW)` per component, and checks the
/// (device, inode) of each directory against `expect` (first `/`, then each
/// directory below it; a shorter `expect` checks only that many, an empty one
/// none). A symlink anywhere on the way, a component that is not a
/// directory, or a directory other than the one expected, is an error naming
/// that prefix of the path.
pub(crate) fn open_parent(path: &Path, expect: &[DirId]) -> Result<Walk, WalkError> {
    let (dirs, _) = split(path)?;
    let flags = OFlag::O_PATH | OFlag::O_DIRECTORY;
    let root = Path::new("/");
    let mut fd = openat(
        None,
        root,
        flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map(own)
    .map_err(|e| WalkError::Io(root.into(), e.into()))?;
    let mut ids = Vec::with_capacity(dirs.len() + 1);
    let mut at = PathBuf::from("/");
    let check = |fd: &OwnedFd, at: &Path, ids: &mut Vec<DirId>| -> Result<(), WalkError> {
        let (id, _) = identity(fd).map_err(|e| WalkError::Io(at.into(), e))?;
        if let Some(want) = expect.get(ids.len()) {
            if *want != id {
                return Err(WalkError::Replaced(at.into()));
            }
        }
        ids.push(id);
        Ok(())
    };
    check(&fd, &at, &mut ids)?;
    for name in dirs {
        at.push(name);
        fd = match open_at(&fd, name, flags, 0) {
            Ok(next) => next,
            Err(Errno::ENOENT) => return Ok(Walk::Missing(at, ids)),
            Err(e @ (Errno::ENOTDIR | Errno::ELOOP)) => {
                return Err(match lstat_at(&fd, name) {
                    Ok(Some(st)) if kind(&st) == SFlag::S_IFLNK => WalkError::Symlink(at),
                    Ok(Some(_)) => WalkError::NotADirectory(at),
                    Ok(None) => return Ok(Walk::Missing(at, ids)),
                    Err(_) => WalkError::Io(at, e.into()),
                })
            }
            Err(e) => return Err(WalkError::Io(at, e.into())),
        };
        check(&fd, &at, &mut ids)?;
    }
    Ok(Walk::Parent(fd, ids))
}

/// Opens the directory at `path` for reading (listing, marking), walking
/// from `/` without following any symlink (the last component included).
pub(crate) fn open_dir(path: &Path) -> Result<OwnedFd, WalkError> {
    let (_, name) = split(path)?;
    let parent = match open_parent(path, &[])? {
        Walk::Parent(fd, _) => fd,
        Walk::Missing(at, _) => {
            return Err(WalkError::Io(at, io::ErrorKind::NotFound.into()));
        }
    };
    open_at(&parent, name, OFlag::O_RDONLY | OFlag::O_DIRECTORY, 0).map_err(|e| match e {
        Errno::ELOOP | Errno::ENOTDIR => WalkError::NotADirectory(path.into()),
        e => WalkError::Io(path.into(), e.into()),
    })
}
