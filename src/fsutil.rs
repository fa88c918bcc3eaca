//! File-system helpers for a root process living next to hostile users.
//!
//! supervise runs as root. Every uid other than root and supervise's own is
//! untrusted, and so is anything such a uid can change: a directory it owns
//! or can write, a symlink it planted, a file it swapped in. The helpers here
//! are the only way supervise touches its *own* data (image store, state
//! directory, scratch space):
//!
//! * [`check_trusted`] / [`ensure_trusted_dir`]: a directory is trusted when
//!   it and every directory above it are owned by root or by supervise's own
//!   uid and are not writable by group or others; a root-owned *sticky*
//!   directory (such as `/tmp`) is accepted as an ancestor, since nobody else
//!   can rename or remove the entry below it, which must itself be ours. The
//!   rule is OpenSSH's `StrictModes` and sudo's, applied to every symlink on
//!   the way too: a symlink is followed only if it is ours and sits in a
//!   directory that passes the same test.
//! * [`write_atomic`]: the one way small files are written: a temporary file
//!   with an unpredictable name created `O_EXCL|O_NOFOLLOW` in the same
//!   directory, written, fsynced, renamed over the target, directory fsynced.
//! * [`open_regular`] / [`read_limited`]: the one way supervise's own files
//!   are read: `O_NOFOLLOW|O_NONBLOCK`, must be a regular file (so a FIFO or
//!   a device in its place can neither block nor feed endless bytes), with a
//!   size limit for metadata.
//! * [`private_temp_dir`]: scratch directories with unpredictable names
//!   (mkdtemp), mode 0700, never reused.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

/// Longest symlink chain followed while checking a path (as the kernel's
/// own limit).
const MAX_LINKS: usize = 40;

/// A path that fails the trust rule, and why (see [`TrustError`]).
#[derive(Debug)]
pub struct Untrusted {
    /// What the path is for ("image directory", "state directory").
    pub what: String,
    /// The path as configured.
    pub path: PathBuf,
    /// The component that fails the rule.
    pub culprit: PathBuf,
    /// "a directory", "a symlink".
    pub kind: &'static str,
    /// Its owner.
    pub uid: u32,
    /// Its permission bits.
    pub mode: u32,
}

impl std::fmt::Display for Untrusted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {} is {} owned by uid {}{} with mode {:04o}; {}",
            self.what,
            self.path.display(),
            self.culprit.display(),
            self.kind,
            self.uid,
            user_name(self.uid),
            self.mode,
            rule_text()
        )
    }
}

/// Why a path is not a trusted location for supervise's own data.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// A directory on the path (or a symlink on it) is controlled by
    /// someone other than root or supervise's own user.
    #[error("{0}")]
    Untrusted(Box<Untrusted>),
    /// The path exists but is not a directory.
    #[error("{what} {path}: not a directory")]
    NotADirectory {
        /// What the path is for.
        what: String,
        /// The path.
        path: PathBuf,
    },
    /// The path could not be examined or created.
    #[error("{what} {path}: {source}")]
    Io {
        /// What the path is for.
        what: String,
        /// The path (or the component that failed).
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

/// The uid whose files supervise trusts besides root's: its own.
pub fn own_uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

fn trusted_owner(uid: u32) -> bool {
    uid == 0 || uid == own_uid()
}

fn user_name(uid: u32) -> String {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(u)) => format!(" ({})", u.name),
        _ => String::new(),
    }
}

fn rule_text() -> String {
    let me = own_uid();
    let owners = if me == 0 {
        "root".to_string()
    } else {
        format!("root or uid {me}")
    };
    format!(
        "it and every directory above it must be owned by {owners} and not writable by \
         group or others (a root-owned sticky directory such as /tmp is accepted above \
         a directory of ours)"
    )
}

fn untrusted(what: &str, path: &Path, culprit: &Path, md: &fs::Metadata) -> TrustError {
    TrustError::Untrusted(Box::new(Untrusted {
        what: what.to_string(),
        path: path.to_path_buf(),
        culprit: culprit.to_path_buf(),
        kind: if md.file_type().is_symlink() {
            "a symlink"
        } else if md.is_dir() {
            "a directory"
        } else {
            "a file"
        },
        uid: md.uid(),
        mode: md.mode() & 0o7777,
    }))
}

fn io_at(what: &str, path: &Path) -> impl FnOnce(io::Error) -> TrustError {
    let what = what.to_string();
    let path = path.to_path_buf();
    move |source| TrustError::Io { what, path, source }
}

/// Checks that the existing directory `path` is a trusted location for
/// supervise's own data (see the module docs). `what` names it in errors.
// A rare error that carries everything its one-line message needs.
pub fn check_trusted(what: &str, path: &Path) -> Result<(), TrustError> {
    let abs = absolute(path).map_err(io_at(what, path))?;
    let mut budget = MAX_LINKS;
    let real = walk(what, path, &abs, &mut budget)?;
    let md = fs::metadata(&real).map_err(io_at(what, path))?;
    if !md.is_dir() {
        return Err(TrustError::NotADirectory {
            what: what.to_string(),
            path: path.to_path_buf(),
        });
    }
    if !trusted_owner(md.uid()) || md.mode() & 0o022 != 0 {
        return Err(untrusted(what, path, &real, &md));
    }
    Ok(())
}

/// Walks `abs` from `/`, component by component, without following a
/// symlink that is not ours or that sits in a directory others control.
/// Every directory passed through must be owned by root or us, and either
/// not group/other-writable, or root-owned and sticky (then the entry below
/// it must be ours, which the next step checks). Returns the resolved path.
// A rare error that carries everything its one-line message needs.
fn walk(what: &str, orig: &Path, abs: &Path, budget: &mut usize) -> Result<PathBuf, TrustError> {
    let mut cur = PathBuf::from("/");
    let root_md = fs::metadata("/").map_err(io_at(what, Path::new("/")))?;
    if !trusted_owner(root_md.uid()) || root_md.mode() & 0o022 != 0 {
        return Err(untrusted(what, orig, Path::new("/"), &root_md));
    }
    let mut parent_md = root_md;
    for comp in abs.components() {
        match comp {
            Component::RootDir | Component::CurDir => continue,
            Component::Prefix(_) => continue,
            Component::ParentDir => {
                cur.pop();
                parent_md = fs::metadata(&cur).map_err(io_at(what, &cur))?;
                continue;
            }
            Component::Normal(name) => {
                let next = cur.join(name);
                let md = match fs::symlink_metadata(&next) {
                    Ok(md) => md,
                    Err(e) => return Err(io_at(what, &next)(e)),
                };
                // The entry `name` inside `cur`: others may replace it when
                // `cur` is writable by them, unless `cur` is sticky (then
                // only the entry's owner, the directory's owner or root can).
                let shared_parent = parent_md.mode() & 0o022 != 0;
                if shared_parent {
                    if parent_md.mode() & 0o1000 == 0 || parent_md.uid() != 0 {
                        return Err(untrusted(what, orig, &cur, &parent_md));
                    }
                    // In a root-owned sticky directory (/tmp): the entry
                    // itself is the culprit when it is someone else's.
                    if !trusted_owner(md.uid()) {
                        return Err(untrusted(what, orig, &next, &md));
                    }
                }
                if md.file_type().is_symlink() {
                    if !trusted_owner(md.uid()) {
                        return Err(untrusted(what, orig, &next, &md));
                    }
                    if *budget == 0 {
                        return Err(io_at(what, &next)(io::Error::from_raw_os_error(
                            libc::ELOOP,
                        )));
                    }
                    *budget -= 1;
                    let target = fs::read_link(&next).map_err(io_at(what, &next))?;
                    let target = if target.is_absolute() {
                        target
                    } else {
                        cur.join(target)
                    };
                    cur = walk(what, orig, &target, budget)?;
                    parent_md = fs::metadata(&cur).map_err(io_at(what, &cur))?;
                } else {
                    if md.is_dir() && !trusted_owner(md.uid()) {
                        return Err(untrusted(what, orig, &next, &md));
                    }
                    cur = next;
                    parent_md = md;
                }
                if parent_md.is_dir()
                    && parent_md.mode() & 0o022 != 0
                    && (parent_md.mode() & 0o1000 == 0 || parent_md.uid() != 0)
                {
                    return Err(untrusted(what, orig, &cur, &parent_md));
                }
            }
        }
    }
    Ok(cur)
}

fn absolute(p: &Path) -> io::Result<PathBuf> {
    if p.is_absolute() {
        Ok(p.to_path_buf())
    } else {
        Ok(std::env::current_dir()?.join(p))
    }
}

/// Makes sure `path` is a trusted directory, creating it (and missing
/// parents) with mode 0700 first if needed. The nearest existing ancestor
/// is checked before anything is created in it, and the whole path after.
// A rare error that carries everything its one-line message needs.
pub fn ensure_trusted_dir(what: &str, path: &Path) -> Result<(), TrustError> {
    let abs = absolute(path).map_err(io_at(what, path))?;
    match fs::symlink_metadata(&abs) {
        Ok(_) => return check_trusted(what, path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_at(what, path)(e)),
    }
    // Missing: check the nearest existing ancestor, then create downwards.
    let mut missing = Vec::new();
    let mut anc = abs.clone();
    loop {
        match fs::symlink_metadata(&anc) {
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                missing.push(anc.clone());
                if !anc.pop() {
                    break;
                }
            }
            Err(e) => return Err(io_at(what, &anc)(e)),
        }
    }
    check_trusted(what, &anc).map_err(|e| match e {
        TrustError::Untrusted(mut u) => {
            u.path = path.to_path_buf();
            TrustError::Untrusted(u)
        }
        other => other,
    })?;
    for dir in missing.iter().rev() {
        match nix::unistd::mkdir(dir, nix::sys::stat::Mode::from_bits_truncate(0o700)) {
            Ok(()) => {}
            Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => {
                let e = io::Error::from(e);
                let msg = format!("cannot create {}: {e}", dir.display());
                return Err(io_at(what, path)(io::Error::new(e.kind(), msg)));
            }
        }
    }
    check_trusted(what, path)
}

/// Fills `buf` from the kernel's random pool.
pub fn random_bytes(buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: getrandom writes at most len bytes into the valid buffer.
        let n = unsafe {
            libc::getrandom(
                buf[done..].as_mut_ptr().cast(),
                buf.len() - done,
                libc::GRND_NONBLOCK,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

/// A random suffix for temporary names: 16 lowercase hex digits.
pub fn random_suffix() -> io::Result<String> {
    let mut b = [0u8; 8];
    random_bytes(&mut b)?;
    Ok(hex::encode(b))
}

/// Creates a fresh directory `<parent>/<prefix><random>` with mode 0700 and
/// returns its path. Never reuses an existing name (mkdir fails on any
/// existing entry, symlinks included), so nobody can pre-create or redirect
/// it.
pub fn private_temp_dir(parent: &Path, prefix: &str) -> io::Result<PathBuf> {
    for _ in 0..16 {
        let p = parent.join(format!("{prefix}{}", random_suffix()?));
        match nix::unistd::mkdir(&p, nix::sys::stat::Mode::from_bits_truncate(0o700)) {
            Ok(()) => return Ok(p),
            Err(nix::errno::Errno::EEXIST) => continue,
            Err(e) => return Err(io::Error::from(e).with_path(&p)),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!("{}: no free temporary name", parent.display()),
    ))
}

/// Adds the path to an OS error's text (`ENOENT` alone names nothing).
pub trait WithPath {
    /// The error with `path: ` in front of its message.
    fn with_path(self, path: &Path) -> io::Error;
}

impl WithPath for io::Error {
    fn with_path(self, path: &Path) -> io::Error {
        io::Error::new(self.kind(), format!("{}: {self}", path.display()))
    }
}

/// Creates a new file `<dir>/.<name>.tmp-<random>` (`O_CREAT|O_EXCL|
/// O_NOFOLLOW`, `mode`), for writing.
pub fn create_temp_file(dir: &Path, name: &str, mode: u32) -> io::Result<(File, PathBuf)> {
    for _ in 0..16 {
        let p = dir.join(format!(".{name}.tmp-{}", random_suffix()?));
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&p)
        {
            Ok(f) => return Ok((f, p)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!("{}: no free temporary name", dir.display()),
    ))
}

/// Creates a new file `<dir>/.<prefix>-<random>` relative to the open
/// directory `dir` (`O_CREAT|O_EXCL|O_NOFOLLOW|O_CLOEXEC`, `mode`), for
/// writing; returns it and its name. Nothing is resolved by path above
/// `dir`, so the file lands in that very directory whatever was renamed
/// meanwhile.
pub fn create_temp_file_at(
    dir: std::os::fd::BorrowedFd<'_>,
    prefix: &str,
    mode: u32,
) -> io::Result<(File, String)> {
    use nix::fcntl::OFlag;
    for _ in 0..16 {
        let name = format!(".{prefix}-{}", random_suffix()?);
        match nix::fcntl::openat(
            Some(dir.as_raw_fd()),
            name.as_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::from_bits_truncate(mode),
        ) {
            // SAFETY: a fresh descriptor we own.
            Ok(fd) => return Ok((unsafe { File::from_raw_fd(fd) }, name)),
            Err(nix::errno::Errno::EEXIST) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        "no free temporary name",
    ))
}

/// Writes `data` to `path` atomically: a new temporary file in the same
/// directory (unpredictable name, `O_EXCL|O_NOFOLLOW`, `mode`), fsync,
/// rename over `path` (which replaces a symlink there, never follows it),
/// fsync the directory. Errors name the path.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let (mut f, tmp) = create_temp_file(dir, &name, mode).map_err(|e| e.with_path(path))?;
    let res = (|| {
        f.write_all(data)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res.map_err(|e| e.with_path(path))
}

/// Opens `path` for reading without following a symlink in its last
/// component and without blocking on a FIFO or device, and checks that it
/// is a regular file (on the descriptor). The returned file is in blocking
/// mode. Not-a-regular-file is `InvalidData` naming the path; a symlink is
/// `ELOOP` (`FilesystemLoop`).
pub fn open_regular(path: &Path) -> io::Result<File> {
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)?;
    let md = f.metadata()?;
    if !md.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is not a regular file", path.display()),
        ));
    }
    clear_nonblock(&f)?;
    Ok(f)
}

fn clear_nonblock(f: &File) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let fl = fcntl(f.as_raw_fd(), FcntlArg::F_GETFL)?;
    let fl = OFlag::from_bits_truncate(fl) & !OFlag::O_NONBLOCK;
    fcntl(f.as_raw_fd(), FcntlArg::F_SETFL(fl))?;
    Ok(())
}

/// Reads a small regular file (see [`open_regular`]) of at most `max`
/// bytes. A larger file is `InvalidData` ("larger than N bytes"), read no
/// further than `max + 1` bytes.
pub fn read_limited(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let f = open_regular(path)?;
    let len = f.metadata()?.len();
    if len > max {
        return Err(too_large(path, max));
    }
    let mut buf = Vec::with_capacity(len as usize);
    f.take(max + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > max {
        return Err(too_large(path, max));
    }
    Ok(buf)
}

fn too_large(path: &Path, max: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{} is larger than {max} bytes", path.display()),
    )
}

/// Opens (creating with `mode` if missing) a lock or record file in a
/// trusted directory for reading and writing, never through a symlink.
pub fn open_rw_nofollow(path: &Path, mode: u32) -> io::Result<File> {
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| e.with_path(path))?;
    if !f.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is not a regular file", path.display()),
        ));
    }
    clear_nonblock(&f)?;
    Ok(f)
}

/// `flock(2)` on `f`, retried on EINTR. `exclusive` or shared; with
/// `nonblock`, fails with `WouldBlock` instead of waiting.
pub fn flock(f: &File, exclusive: bool, nonblock: bool) -> io::Result<()> {
    use nix::fcntl::FlockArg;
    let arg = match (exclusive, nonblock) {
        (true, false) => FlockArg::LockExclusive,
        (true, true) => FlockArg::LockExclusiveNonblock,
        (false, false) => FlockArg::LockShared,
        (false, true) => FlockArg::LockSharedNonblock,
    };
    loop {
        #[allow(deprecated)]
        match nix::fcntl::flock(f.as_raw_fd(), arg) {
            Ok(()) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// "a FIFO", "a character device", ... for anything but a regular file
/// (and a symlink, which the caller sees only with `symlink_metadata`);
/// `None` for a regular file.
pub fn non_regular_kind(ft: &fs::FileType) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_file() {
        None
    } else if ft.is_fifo() {
        Some("a FIFO")
    } else if ft.is_char_device() {
        Some("a character device")
    } else if ft.is_block_device() {
        Some("a block device")
    } else if ft.is_socket() {
        Some("a socket")
    } else if ft.is_dir() {
        Some("a directory")
    } else if ft.is_symlink() {
        Some("a symlink")
    } else {
        Some("an unknown kind of file")
    }
}

/// Why [`read_regular_following`] refused a file.
#[derive(Debug, thiserror::Error)]
pub enum RegularReadError {
    /// Not a regular file: "a FIFO", "a character device", ...
    #[error("{0}, not a regular file")]
    NotRegular(&'static str),
    /// Larger than the limit (bytes).
    #[error("larger than {0} bytes")]
    TooLarge(u64),
    /// The OS said no (missing, permission denied, ...).
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Reads a regular file of at most `max` bytes named by a path that may
/// go through symlinks (job files are often symlinked): the target is
/// examined first and anything but a regular file is refused without being
/// opened (a FIFO would block the reader, a device could feed endless
/// bytes or act on being opened); then it is opened
/// `O_NONBLOCK|O_CLOEXEC|O_NOCTTY`, checked again on the descriptor (in
/// case it was swapped meanwhile) and read from that very descriptor, no
/// further than `max + 1` bytes. Errors carry no path (the caller names
/// it).
pub fn read_regular_following(path: &Path, max: u64) -> Result<Vec<u8>, RegularReadError> {
    if let Some(kind) = non_regular_kind(&fs::metadata(path)?.file_type()) {
        return Err(RegularReadError::NotRegular(kind));
    }
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)?;
    let md = f.metadata()?;
    if let Some(kind) = non_regular_kind(&md.file_type()) {
        return Err(RegularReadError::NotRegular(kind));
    }
    if md.len() > max {
        return Err(RegularReadError::TooLarge(max));
    }
    clear_nonblock(&f)?;
    let mut buf = Vec::with_capacity(md.len() as usize);
    f.take(max + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > max {
        return Err(RegularReadError::TooLarge(max));
    }
    Ok(buf)
}

/// Says, naming `path` once, why `path` could not be used as one of
/// supervise's own files after `e` from [`open_regular`], [`read_limited`]
/// or [`open_rw_nofollow`]: "PATH is a symlink (not followed)", "PATH is a
/// FIFO, not a regular file", "PATH is larger than N bytes", "PATH: (the
/// OS error)".
pub fn describe_error(path: &Path, e: &io::Error) -> String {
    if e.kind() != io::ErrorKind::NotFound && e.kind() != io::ErrorKind::PermissionDenied {
        if let Ok(md) = fs::symlink_metadata(path) {
            let ft = md.file_type();
            if ft.is_symlink() {
                return format!("{} is a symlink (not followed)", path.display());
            }
            if let Some(kind) = non_regular_kind(&ft) {
                return format!("{} is {kind}, not a regular file", path.display());
            }
        }
    }
    let msg = e.to_string();
    if msg.starts_with(&path.display().to_string()) {
        msg
    } else {
        format!("{}: {msg}", path.display())
    }
}

/// The nearest directory on `path` (from `/` down) that the caller may not
/// search, so that a "permission denied" can say where: for
/// `/var/lib/supervise/alice/sim/store.key` below a root-only
/// `/var/lib/supervise/alice`, that directory. `None` if every directory
/// above `path` can be searched.
pub fn unsearchable_dir(path: &Path) -> Option<PathBuf> {
    let abs = absolute(path).ok()?;
    let mut cur = PathBuf::new();
    for comp in abs.components() {
        let next = cur.join(comp);
        if !cur.as_os_str().is_empty() {
            if let Err(e) = fs::symlink_metadata(&next) {
                return is_permission_denied(&e).then_some(cur);
            }
        }
        cur = next;
    }
    None
}

/// fsyncs the directory `path` (opened `O_DIRECTORY|O_NOFOLLOW`, so
/// neither a symlink nor anything but a directory is opened).
pub fn fsync_dir(path: &Path) -> io::Result<()> {
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?
        .sync_all()
}

/// True for "permission denied" (EACCES/EPERM), so that callers can say
/// so instead of "not found" or "damaged".
pub fn is_permission_denied(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::PermissionDenied
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn chown(p: &Path, uid: u32) {
        nix::unistd::chown(p, Some(nix::unistd::Uid::from_raw(uid)), None).unwrap();
    }

    #[test]
    fn private_dirs_under_tmp_are_trusted() {
        let t = tempfile::tempdir().unwrap();
        check_trusted("test dir", t.path()).unwrap();
        let deep = t.path().join("a/b/c");
        ensure_trusted_dir("test dir", &deep).unwrap();
        let md = fs::metadata(&deep).unwrap();
        assert_eq!(md.permissions().mode() & 0o777, 0o700);
        // /tmp itself (sticky, world-writable) is not a place for our data.
        let e = check_trusted("test dir", Path::new("/tmp")).unwrap_err();
        assert!(e.to_string().contains("mode 1777"), "{e}");
    }

    #[test]
    fn group_writable_dir_or_ancestor_refused() {
        let t = tempfile::tempdir().unwrap();
        let a = t.path().join("a");
        fs::create_dir(&a).unwrap();
        fs::create_dir(a.join("b")).unwrap();
        fs::set_permissions(&a, fs::Permissions::from_mode(0o775)).unwrap();
        let e = check_trusted("image directory", &a.join("b")).unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains(&format!("{} is a directory", a.display())),
            "{s}"
        );
        assert!(s.contains("mode 0775"), "{s}");
        let e = ensure_trusted_dir("image directory", &a.join("b/new")).unwrap_err();
        assert!(!a.join("b/new").exists(), "{e}");
    }

    #[test]
    #[cfg_attr(not(root), ignore = "needs root")]
    fn foreign_owner_and_foreign_symlink_refused() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("d");
        fs::create_dir(&d).unwrap();
        chown(&d, 65534);
        let e = check_trusted("state directory", &d)
            .unwrap_err()
            .to_string();
        assert!(e.contains("uid 65534"), "{e}");
        assert!(e.contains("mode 0755"), "{e}");
        // A missing directory below a foreign one is not created.
        assert!(ensure_trusted_dir("state directory", &d.join("x")).is_err());
        assert!(!d.join("x").exists());
        // Our symlink to a trusted directory is fine; a foreign one is not.
        let ok = t.path().join("ok");
        fs::create_dir(&ok).unwrap();
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&ok, &link).unwrap();
        check_trusted("state directory", &link).unwrap();
        nix::unistd::fchownat(
            None,
            &link,
            Some(nix::unistd::Uid::from_raw(65534)),
            None,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .unwrap();
        let e = check_trusted("state directory", &link)
            .unwrap_err()
            .to_string();
        assert!(e.contains("a symlink owned by uid 65534"), "{e}");
        // A symlink to a foreign directory is refused at the target.
        let link2 = t.path().join("link2");
        std::os::unix::fs::symlink(&d, &link2).unwrap();
        assert!(check_trusted("state directory", &link2).is_err());
    }

    #[test]
    #[cfg_attr(not(root), ignore = "needs root")]
    fn sticky_root_dir_accepts_only_our_entries() {
        // /tmp: root-owned, sticky, world-writable. Our 0700 dir inside is
        // fine (the tempdir above); a foreign dir inside is refused.
        let t = tempfile::tempdir().unwrap();
        let sticky = t.path().join("sticky");
        fs::create_dir(&sticky).unwrap();
        fs::set_permissions(&sticky, fs::Permissions::from_mode(0o1777)).unwrap();
        let mine = sticky.join("mine");
        fs::create_dir(&mine).unwrap();
        check_trusted("x", &mine).unwrap();
        let theirs = sticky.join("theirs");
        fs::create_dir(&theirs).unwrap();
        fs::set_permissions(&theirs, fs::Permissions::from_mode(0o700)).unwrap();
        chown(&theirs, 65534);
        assert!(check_trusted("x", &theirs).is_err());
        // A non-root-owned sticky dir is not accepted as an ancestor.
        chown(&sticky, 65534);
        assert!(check_trusted("x", &mine).is_err());
    }

    #[test]
    fn atomic_write_replaces_a_symlink_instead_of_following_it() {
        let t = tempfile::tempdir().unwrap();
        let victim = t.path().join("victim");
        fs::write(&victim, b"root data").unwrap();
        let target = t.path().join("job.json");
        std::os::unix::fs::symlink(&victim, &target).unwrap();
        write_atomic(&target, b"{}", 0o600).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"root data");
        assert_eq!(fs::read(&target).unwrap(), b"{}");
        assert!(!fs::symlink_metadata(&target)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(
            fs::metadata(&target).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // No temporary file is left behind.
        let names: Vec<_> = fs::read_dir(t.path()).unwrap().flatten().collect();
        assert_eq!(names.len(), 2);
    }

    #[test]
    fn reads_refuse_fifos_symlinks_and_oversized_files() {
        let t = tempfile::tempdir().unwrap();
        let fifo = t.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let e = read_limited(&fifo, 100).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        let link = t.path().join("zero");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        assert!(read_limited(&link, 100).is_err());
        let big = t.path().join("big");
        fs::write(&big, vec![0u8; 101]).unwrap();
        let e = read_limited(&big, 100).unwrap_err().to_string();
        assert!(e.contains("larger than 100 bytes"), "{e}");
        fs::write(&big, vec![7u8; 100]).unwrap();
        assert_eq!(read_limited(&big, 100).unwrap().len(), 100);
        assert!(open_regular(Path::new("/dev/null")).is_err());
    }

    #[test]
    fn job_style_reads_follow_symlinks_to_regular_files_only() {
        let t = tempfile::tempdir().unwrap();
        let real = t.path().join("real.toml");
        fs::write(&real, b"x = 1\n").unwrap();
        let link = t.path().join("link.toml");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert_eq!(read_regular_following(&link, 100).unwrap(), b"x = 1\n");
        // A FIFO: refused at once, never opened (no writer would ever come).
        let fifo = t.path().join("fifo.toml");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let started = std::time::Instant::now();
        let e = read_regular_following(&fifo, 100).unwrap_err();
        assert_eq!(e.to_string(), "a FIFO, not a regular file");
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        // A symlink to /dev/zero: the target is what counts.
        let zero = t.path().join("zero.toml");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        let e = read_regular_following(&zero, 100).unwrap_err();
        assert_eq!(e.to_string(), "a character device, not a regular file");
        let e = read_regular_following(t.path(), 100).unwrap_err();
        assert_eq!(e.to_string(), "a directory, not a regular file");
        // Size cap, on the descriptor's size.
        fs::write(&real, vec![b'#'; 101]).unwrap();
        let e = read_regular_following(&link, 100).unwrap_err();
        assert_eq!(e.to_string(), "larger than 100 bytes");
        assert_eq!(read_regular_following(&link, 101).unwrap().len(), 101);
        let dangling = t.path().join("dangling.toml");
        std::os::unix::fs::symlink(t.path().join("nowhere"), &dangling).unwrap();
        assert!(matches!(
            read_regular_following(&dangling, 100),
            Err(RegularReadError::Io(e)) if e.kind() == io::ErrorKind::NotFound
        ));
    }

    #[test]
    fn unsearchable_dir_is_none_when_everything_can_be_searched() {
        let t = tempfile::tempdir().unwrap();
        assert_eq!(unsearchable_dir(&t.path().join("a/b/c")), None);
    }

    #[test]
    fn temp_dirs_are_fresh_and_private() {
        let t = tempfile::tempdir().unwrap();
        let a = private_temp_dir(t.path(), "supervise-restore-").unwrap();
        let b = private_temp_dir(t.path(), "supervise-restore-").unwrap();
        assert_ne!(a, b);
        assert_eq!(
            fs::metadata(&a).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let f = open_rw_nofollow(&a.join("lock"), 0o600).unwrap();
        flock(&f, true, false).unwrap();
        let g = open_rw_nofollow(&a.join("lock"), 0o600).unwrap();
        assert_eq!(
            flock(&g, true, true).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
    }
}
