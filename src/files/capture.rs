//! Recording the job's files at a checkpoint (see the module docs of
//! [`crate::files`]).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use nix::errno::Errno;
use nix::sys::stat::{FileStat, SFlag};

use super::resolve::{self, Walk, WalkError};
use super::{
    classify, excluded, fingerprints, io_err, opened_for_writing, CaptureSummary, DirId,
    FileRecord, FileState, FilesConfig, FilesError, Mode, Opened, BLOB_PREFIX, STATE_FILE,
    STATE_VERSION,
};

/// Why a path cannot be recorded, for `skipped`.
fn walk_reason(e: &WalkError) -> String {
    match e {
        WalkError::BadPath(why) => format!("not resolvable without guessing: {why}"),
        WalkError::Symlink(at) => format!(
            "{} is a symlink; supervise does not follow symlinks (list the real path)",
            at.display()
        ),
        WalkError::NotADirectory(at) => format!("{} is not a directory", at.display()),
        WalkError::Replaced(at) => format!("{} changed while being recorded", at.display()),
        WalkError::Io(at, e) => format!("{}: {e}", at.display()),
    }
}

/// The file at `path`, reached without following any symlink: the (dev,
/// ino) of every directory from `/` to its parent, the parent directory
/// (`O_PATH`) and the file's name in it, and the file's stat (`fstatat`
/// without following: nothing is opened, so no lease the job holds on it
/// is broken). `Ok(Err(..))` says why it cannot be recorded; a `None` stat
/// that it does not exist (with the identities of the directories that do).
type Found = Result<(Vec<DirId>, Option<(OwnedFd, FileStat)>), String>;

fn find(path: &Path) -> Result<Found, FilesError> {
    let (fd, dirs) = match resolve::open_parent(path, &[]) {
        Ok(Walk::Parent(fd, dirs)) => (fd, dirs),
        Ok(Walk::Missing(_, dirs)) => return Ok(Ok((dirs, None))),
        Err(WalkError::Io(at, e)) => return Err(io_err(&at, "open directory")(e)),
        Err(e) => return Ok(Err(walk_reason(&e))),
    };
    let name = file_name(path)?;
    // Look, never open: a FIFO, device or symlink is never opened, and a
    // regular file is opened later only if the job holds no lease on it.
    match resolve::lstat_at(&fd, name) {
        Ok(None) => Ok(Ok((dirs, None))),
        Ok(Some(st)) if resolve::kind(&st) == SFlag::S_IFLNK => Ok(Err(format!(
            "{} is a symlink; supervise does not follow symlinks (list the real path)",
            path.display()
        ))),
        Ok(Some(st)) if resolve::kind(&st) != SFlag::S_IFREG => {
            Ok(Err("not a regular file".into()))
        }
        Ok(Some(st)) => Ok(Ok((dirs, Some((fd, st))))),
        Err(e) => Err(io_err(path, "stat")(e.into())),
    }
}

fn file_name(path: &Path) -> Result<&std::ffi::OsStr, FilesError> {
    resolve::split(path)
        .map(|(_, name)| name)
        .map_err(|_| FilesError::Malformed {
            path: path.into(),
            reason: "unsplittable path".into(),
        })
}

/// One of the job's descriptors of a regular file.
#[derive(Debug, Clone, Copy)]
struct JobFd {
    /// Host PID of the process holding it.
    pid: i32,
    /// Descriptor number in that process.
    fd: i32,
    /// Open for reading (a duplicate can be read).
    readable: bool,
    /// The job holds a lease on the file through it (fdinfo `lock:` lines).
    leased: bool,
}

/// Every regular file the processes `pids` hold open, by (dev, ino). Only
/// `stat` of `/proc/PID/fd/N` and its fdinfo: nothing is opened.
fn job_fds(pids: &[i32]) -> BTreeMap<(u64, u64), Vec<JobFd>> {
    let mut out: BTreeMap<(u64, u64), Vec<JobFd>> = BTreeMap::new();
    for &pid in pids {
        let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for entry in dir.flatten() {
            let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            let Ok(md) = std::fs::metadata(entry.path()) else {
                continue;
            };
            if !md.is_file() {
                continue;
            }
            let Ok(info) = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")) else {
                continue;
            };
            let Some((flags, _)) = super::parse_fdinfo(&info) else {
                continue;
            };
            let leased = info
                .lines()
                .any(|l| l.starts_with("lock:") && l.contains("LEASE"));
            out.entry((md.dev(), md.ino())).or_default().push(JobFd {
                pid,
                fd,
                readable: flags & libc::O_ACCMODE != libc::O_WRONLY,
                leased,
            });
        }
    }
    out
}

/// A duplicate of descriptor `fd` of process `pid` (`pidfd_getfd(2)`: the
/// same open file, offset included, so it is only ever read with
/// positional reads). Unlike an open of `/proc/PID/fd/N`, it does not break
/// a lease on the file.
fn dup_from(pid: i32, fd: i32) -> io::Result<File> {
    crate::pidfd::getfd(pid, fd)
}

/// How the content of a file to be recorded is read.
enum Reader {
    /// This descriptor (a duplicate of the job's, or opened here), and its
    /// stat.
    Fd(File, FileStat),
    /// It cannot be read without breaking the job's lease on it (the job
    /// holds it only through write-only descriptors).
    Leased,
}

/// A readable descriptor of the file `st` (found at `name` in `dir`): one
/// of the job's own, duplicated, if it has a readable one; else, unless the
/// job holds a lease on it, the file opened for reading through the checked
/// directory (and checked to be the same inode). `Ok(None)`: it changed.
fn reader(
    path: &Path,
    dir: &OwnedFd,
    st: &FileStat,
    held: Option<&Vec<JobFd>>,
) -> Result<Option<Reader>, FilesError> {
    let same = |f: &File| -> Result<Option<FileStat>, FilesError> {
        let now =
            nix::sys::stat::fstat(f.as_raw_fd()).map_err(|e| io_err(path, "stat")(e.into()))?;
        Ok((now.st_dev == st.st_dev && now.st_ino == st.st_ino).then_some(now))
    };
    let held = held.map(Vec::as_slice).unwrap_or_default();
    let leased = held.iter().any(|j| j.leased);
    for j in held.iter().filter(|j| j.readable) {
        match dup_from(j.pid, j.fd) {
            Ok(f) => match same(&f)? {
                Some(now) => return Ok(Some(Reader::Fd(f, now))),
                None => continue, // closed and reused meanwhile
            },
            // The descriptor was closed meanwhile: try another.
            Err(e) if e.raw_os_error() == Some(libc::EBADF) => continue,
            Err(e) if leased => return Err(io_err(path, "duplicate the job's descriptor of")(e)),
            Err(_) => break, // open it below instead
        }
    }
    if leased {
        return Ok(Some(Reader::Leased));
    }
    let name = file_name(path)?;
    match resolve::open_file(dir, name, false) {
        Ok((f, now))
            if resolve::kind(&now) == SFlag::S_IFREG
                && now.st_dev == st.st_dev
                && now.st_ino == st.st_ino =>
        {
            Ok(Some(Reader::Fd(f, now)))
        }
        Ok(_) | Err(Errno::ELOOP | Errno::ENOENT) => Ok(None),
        Err(e) => Err(io_err(path, "open")(e.into())),
    }
}

/// Copies all of `src` into `dst` with positional reads of `src` (its
/// offset, which a duplicate shares with the job, is not moved):
/// `copy_file_range` with an explicit input offset (reflinks where the file
/// system can), else `pread` and `write`.
fn copy_positional(src: &File, dst: &mut File) -> io::Result<u64> {
    let mut off: i64 = 0;
    loop {
        // SAFETY: both descriptors are open for the duration of the call;
        // `off` is a valid i64 the kernel updates.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off,
                dst.as_raw_fd(),
                std::ptr::null_mut(),
                1 << 30,
                0,
            )
        };
        match Errno::result(n) {
            Ok(0) => return Ok(off as u64),
            Ok(_) | Err(Errno::EINTR) => {}
            Err(Errno::EXDEV | Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP) => break,
            Err(e) => return Err(e.into()),
        }
    }
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = match src.read_at(&mut buf, off as u64) {
            Ok(0) => return Ok(off as u64),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        dst.write_all(&buf[..n])?;
        off += n as i64;
    }
}

/// Makes `shadow` hold what `src` holds (read with positional reads only),
/// rewriting only the 256 KiB pieces that differ, and cuts it to `src`'s
/// size (which does not change: the job is frozen). The pieces are
/// compared on up to 4 threads. Returns (bytes of `src`, bytes rewritten).
fn update_shadow(src: &File, shadow: &mut File) -> io::Result<(u64, u64)> {
    const PIECE: u64 = 256 << 10;
    let size = src.metadata()?.len();
    let pieces = size.div_ceil(PIECE);
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4) as u64;
    let threads = threads.min(pieces.max(1));
    let shadow_len = shadow.metadata()?.len();
    let read_full = |f: &File, buf: &mut [u8], at: u64| -> io::Result<usize> {
        let mut got = 0;
        while got < buf.len() {
            match f.read_at(&mut buf[got..], at + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(got)
    };
    let shadow_ref: &File = shadow;
    // Thread k takes pieces k, k + threads, ...
    let work = |k: u64| -> io::Result<u64> {
        let (mut a, mut b) = (vec![0u8; PIECE as usize], vec![0u8; PIECE as usize]);
        let mut changed = 0;
        let mut i = k;
        while i < pieces {
            let off = i * PIECE;
            let len = PIECE.min(size - off) as usize;
            let n = read_full(src, &mut a[..len], off)?;
            if n != len {
                return Err(io::Error::other("the file shrank while being recorded"));
            }
            let m = if off < shadow_len {
                read_full(shadow_ref, &mut b[..len], off)?
            } else {
                0
            };
            if m != len || a[..len] != b[..len] {
                shadow_ref.write_all_at(&a[..len], off)?;
                changed += len as u64;
            }
            i += threads;
        }
        Ok(changed)
    };
    let changed = std::thread::scope(|s| {
        let handles: Vec<_> = (1..threads).map(|k| s.spawn(move || work(k))).collect();
        let mut total = work(0)?;
        for h in handles {
            total += h
                .join()
                .map_err(|_| io::Error::other("a comparing thread panicked"))??;
        }
        Ok::<u64, io::Error>(total)
    })?;
    shadow.set_len(size)?;
    Ok((size, changed))
}

/// A new blob file at `path` (created 0600, never through a symlink).
fn create_blob(path: &Path) -> Result<File, FilesError> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(io_err(path, "create"))
}

/// After the dump, the job running again: makes the copies that
/// [`capture`] deferred (each shadow copy into its blob in `out_dir`,
/// created 0600, never through a symlink), and removes the shadow copies
/// in `shadow_dir` no checkpoint needs any more (files no longer copied).
pub fn finish_copies(
    summary: &CaptureSummary,
    out_dir: &Path,
    shadow_dir: Option<&Path>,
) -> Result<(), FilesError> {
    for (shadow, name) in &summary.deferred {
        let src = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(shadow)
            .map_err(io_err(shadow, "open the shadow copy"))?;
        let mut dst = create_blob(&out_dir.join(name))?;
        copy_positional(&src, &mut dst).map_err(io_err(shadow, "copy"))?;
    }
    if let Some(dir) = shadow_dir {
        let used: std::collections::BTreeSet<&Path> =
            summary.deferred.iter().map(|(p, _)| p.as_path()).collect();
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                if !used.contains(e.path().as_path()) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
    Ok(())
}

/// `fd/N` or `map_files/RANGE` of a `/proc/PID/...` handle of `pid`.
fn holder_entry(handle: &Path, pid: i32) -> Option<String> {
    let rel = handle.strip_prefix(format!("/proc/{pid}")).ok()?;
    Some(rel.to_str()?.to_string())
}

/// Why a path is recorded by name: listed in the job file.
const LISTED: &str = "listed in files.snapshot";
/// Why a path is recorded by name: the job changed it (the prefix of the
/// reason in the record; see [`super::TOUCHED_WHY`]).
const TOUCHED: &str = super::TOUCHED_WHY;

/// Why a leased file is not read.
const LEASED: &str = "the job holds a lease on it and no descriptor it can be read through \
     (opening it would break the lease)";

/// Records the files of the process tree `pids` into `out_dir` (the
/// checkpoint's staging directory). Call while the tree is frozen.
/// `ignore` lists supervise's own directories (image store, state dir).
///
/// The steps: list the job's descriptors of regular files
/// ([`job_fds`]); find the files it holds open for writing and how each
/// is to be recorded ([`candidates`]); record each of them
/// ([`Recorder::open_file`]), then the paths listed in `files.snapshot`
/// that it does not hold open ([`Recorder::listed_file`]); write the
/// state file ([`Recorder::finish`]).
pub fn capture(
    pids: &[i32],
    cfg: &FilesConfig,
    ignore: &[PathBuf],
    out_dir: &Path,
) -> Result<CaptureSummary, FilesError> {
    capture_with(pids, cfg, ignore, out_dir, &[])
}

/// [`capture`], also recording by name every path in `touched` (the names
/// the job created, wrote, renamed or deleted since it started, from
/// [`super::Tracker`]): its content, or that it is absent. A restore puts
/// each back by name.
pub fn capture_with(
    pids: &[i32],
    cfg: &FilesConfig,
    ignore: &[PathBuf],
    out_dir: &Path,
    touched: &[PathBuf],
) -> Result<CaptureSummary, FilesError> {
    let start = Instant::now();
    // Read through the job's own descriptors where possible: opening a
    // file the job holds a write lease on would start a lease break that
    // the frozen job cannot answer (the dump would hang for the kernel's
    // lease-break-time, then the job would get SIGIO and lose its lease).
    let held = job_fds(pids);
    let Candidates {
        found,
        mut holders,
        skipped,
    } = candidates(pids, cfg, ignore)?;
    let mut rec = Recorder {
        cfg,
        out_dir,
        held,
        records: Vec::new(),
        skipped,
        summary: CaptureSummary::default(),
        blobs: 0,
    };
    for (key, (o, mode, why)) in found {
        let holders = holders.remove(&key).unwrap_or_default();
        rec.open_file(&o, mode, why, holders)?;
    }
    for p in &cfg.snapshot {
        if !excluded(p, cfg, ignore) {
            rec.listed_file(&super::outside_path(p, &cfg.views), LISTED)?;
        }
    }
    for p in touched {
        if !excluded(p, cfg, ignore) {
            rec.listed_file(p, TOUCHED)?;
        }
    }
    rec.finish(start)
}

/// The files the job holds open for writing, from [`candidates`].
struct Candidates {
    /// One per inode, (dev, ino) -> (how the job holds it, the mode it is
    /// recorded in, why).
    found: BTreeMap<(u64, u64), (Opened, Mode, String)>,
    /// (dev, ino) -> every (pid in the job's namespace, `/proc` entry)
    /// holding it.
    holders: BTreeMap<(u64, u64), Vec<(i32, String)>>,
    /// Paths that cannot be recorded, and why.
    skipped: Vec<(PathBuf, String)>,
}

/// Capture step: every file the processes `pids` hold open for writing or
/// map shared and writable, except `excluded` ones, once per inode, with
/// the mode it is recorded in (from how it is opened, or `files.append` /
/// `files.snapshot`; an inode held both ways is copied) and who holds it.
/// A file that supervise cannot reach by the same path without following a
/// symlink is skipped, with the reason. Nothing is opened.
fn candidates(
    pids: &[i32],
    cfg: &FilesConfig,
    ignore: &[PathBuf],
) -> Result<Candidates, FilesError> {
    let mut out = Candidates {
        found: BTreeMap::new(),
        holders: BTreeMap::new(),
        skipped: Vec::new(),
    };
    for &pid in pids {
        let ns_pid = crate::proc::ns_pid(pid).unwrap_or(pid);
        let opened = match opened_for_writing(pid) {
            Ok(v) => v,
            // The process vanished (it cannot while frozen; attached trees
            // may have short-lived members): nothing of it to record.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(Path::new(&format!("/proc/{pid}/fd")), "list")(e)),
        };
        for o in opened {
            if excluded(&o.path, cfg, ignore) {
                continue;
            }
            let (mode, why) = mode_of(&o, cfg);
            let mut o = o;
            o.path = super::outside_path(&o.path, &cfg.views);
            let key = (o.dev, o.ino);
            if let Some(rel) = holder_entry(&o.handle, pid) {
                out.holders.entry(key).or_default().push((ns_pid, rel));
            }
            if let Some(prev) = out.found.get_mut(&key) {
                if prev.1 == Mode::Extend && mode == Mode::Snapshot {
                    prev.1 = mode;
                    prev.2 = why.to_string();
                }
                continue;
            }
            // The job sees its mount namespace; supervise must reach the
            // same inode by the same path, without following a symlink, or
            // a rollback could hit another. (Checked again when opened
            // later; this keeps a second path to the same inode usable.)
            match find(&o.path)? {
                Ok((_, Some((_, st)))) if st.st_dev == o.dev && st.st_ino == o.ino => {}
                Ok(_) => {
                    out.skipped.push((
                        o.path.clone(),
                        "not the same file at this path outside the job's namespace".into(),
                    ));
                    continue;
                }
                Err(why) => {
                    out.skipped.push((o.path.clone(), why));
                    continue;
                }
            }
            out.found.insert(key, (o, mode, why.to_string()));
        }
    }
    Ok(out)
}

/// How an opened file is recorded, and why: as [`classify`] says, unless
/// it is listed in `files.append` or `files.snapshot`.
fn mode_of(o: &Opened, cfg: &FilesConfig) -> (Mode, &'static str) {
    if cfg.append.iter().any(|p| p == &o.path) {
        (Mode::Extend, "listed in files.append")
    } else if cfg.snapshot.iter().any(|p| p == &o.path) {
        (Mode::Snapshot, "listed in files.snapshot")
    } else {
        classify(o)
    }
}

/// A capture in progress: owns what becomes the state file (the records
/// and the skipped paths) and the summary, and writes the content copies
/// (blobs) into the staging directory.
struct Recorder<'a> {
    cfg: &'a FilesConfig,
    /// The checkpoint's staging directory.
    out_dir: &'a Path,
    /// The job's descriptors of regular files, by (dev, ino) ([`job_fds`]).
    held: BTreeMap<(u64, u64), Vec<JobFd>>,
    records: Vec<FileRecord>,
    skipped: Vec<(PathBuf, String)>,
    summary: CaptureSummary,
    /// Blobs written so far (they are numbered).
    blobs: usize,
}

impl Recorder<'_> {
    /// A record of the file at `path` with stat `st` (`None`: absent),
    /// reached through the directories `dirs`, without content or
    /// fingerprints yet.
    fn record(
        &self,
        path: &Path,
        mode: Mode,
        why: String,
        dirs: Vec<DirId>,
        st: Option<&FileStat>,
    ) -> FileRecord {
        FileRecord {
            path: path.to_path_buf(),
            mode,
            why,
            size: st.map_or(0, |s| s.st_size as u64),
            dev: st.map_or(0, |s| s.st_dev),
            ino: st.map_or(0, |s| s.st_ino),
            perm: st.map_or(0, |s| s.st_mode & 0o7777),
            listed: self.cfg.snapshot.iter().any(|p| p == path),
            head: None,
            tail: None,
            blob: None,
            dirs,
            uid: st.map(|s| s.st_uid),
            gid: st.map(|s| s.st_gid),
            holders: Vec::new(),
            mtime: st.map(|s| (s.st_mtime, s.st_mtime_nsec)),
            atime: st.map(|s| (s.st_atime, s.st_atime_nsec)),
        }
    }

    /// Copies all of `src` (the file at `src_path`) into the next blob of
    /// the staging directory (created 0600, never through a symlink) and
    /// counts it in the summary. Returns the blob's name and the bytes
    /// copied.
    fn copy_blob(&mut self, src: &File, src_path: &Path) -> Result<(String, u64), FilesError> {
        self.blobs += 1;
        let name = format!("{BLOB_PREFIX}{:04}", self.blobs);
        if let Some(shadow_dir) = &self.cfg.shadow_dir {
            let md = src.metadata().map_err(io_err(src_path, "examine"))?;
            let shadow = shadow_dir.join(format!(
                "{}-{}",
                std::os::unix::fs::MetadataExt::dev(&md),
                std::os::unix::fs::MetadataExt::ino(&md)
            ));
            let mut dst = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&shadow)
                .map_err(io_err(&shadow, "open the shadow copy"))?;
            let (n, changed) = update_shadow(src, &mut dst).map_err(io_err(src_path, "compare"))?;
            self.summary.snapshots += 1;
            self.summary.bytes_copied += n;
            self.summary.bytes_changed += changed;
            self.summary.deferred.push((shadow, name.clone()));
            return Ok((name, n));
        }
        let mut dst = create_blob(&self.out_dir.join(&name))?;
        let n = copy_positional(src, &mut dst).map_err(io_err(src_path, "copy"))?;
        self.summary.snapshots += 1;
        self.summary.bytes_copied += n;
        Ok((name, n))
    }

    /// Capture step: records one file the job holds open (`o`, to be
    /// recorded in `mode` because of `why`; `holders` as in
    /// [`Candidates`]). It is found anew through checked directories, so
    /// the identities recorded are those a rollback will insist on, and is
    /// read from that very inode: a size-only file gets fingerprints of its
    /// head and tail (only its size when the job's lease forbids reading
    /// it), any other a copy. A file that changed meanwhile, or that must
    /// be copied but cannot be read without breaking a lease, is skipped.
    fn open_file(
        &mut self,
        o: &Opened,
        mode: Mode,
        why: String,
        holders: Vec<(i32, String)>,
    ) -> Result<(), FilesError> {
        let changed = || (o.path.clone(), "changed while being recorded".to_string());
        let (dirs, dir, st) = match find(&o.path)? {
            Ok((dirs, Some((dir, st)))) if st.st_dev == o.dev && st.st_ino == o.ino => {
                (dirs, dir, st)
            }
            Ok(_) => {
                self.skipped.push(changed());
                return Ok(());
            }
            Err(why) => {
                self.skipped.push((o.path.clone(), why));
                return Ok(());
            }
        };
        let (f, st) = match reader(&o.path, &dir, &st, self.held.get(&(o.dev, o.ino)))? {
            Some(Reader::Fd(f, st)) => (Some(f), st),
            Some(Reader::Leased) => (None, st),
            None => {
                self.skipped.push(changed());
                return Ok(());
            }
        };
        let mut rec = self.record(&o.path, mode, why, dirs, Some(&st));
        rec.holders = holders;
        match (mode, f) {
            (Mode::Extend, Some(f)) => {
                let (h, t) = fingerprints(&f, rec.size, &o.path)?;
                rec.head = Some(h);
                rec.tail = Some(t);
            }
            // Only the size: a rollback truncates back to it without
            // comparing the bytes before it.
            (Mode::Extend, None) => {
                rec.why
                    .push_str(&format!("; {LEASED}, so not fingerprinted"));
            }
            (_, None) => {
                self.skipped
                    .push((o.path.clone(), format!("{LEASED}, so it cannot be copied")));
                return Ok(());
            }
            (_, Some(f)) => {
                let (name, n) = self.copy_blob(&f, &o.path)?;
                rec.size = n;
                rec.blob = Some(name);
            }
        }
        self.records.push(rec);
        Ok(())
    }

    /// Capture step: records the path `p`, listed in `files.snapshot`,
    /// unless it is already recorded or skipped (the job holds it open):
    /// a copy of it, or that it is absent (a rollback then removes it).
    /// One that cannot be reached without following a symlink, that
    /// changed meanwhile or that the job holds a lease on is skipped.
    fn listed_file(&mut self, p: &Path, label: &str) -> Result<(), FilesError> {
        if self.records.iter().any(|r| r.path == p) || self.skipped.iter().any(|(s, _)| s == p) {
            return Ok(());
        }
        let (dirs, dir, st) = match find(p)? {
            Ok((dirs, Some((dir, st)))) => (dirs, dir, st),
            Ok((dirs, None)) => {
                let mut rec = self.record(
                    p,
                    Mode::Absent,
                    format!("{label}; absent at the checkpoint"),
                    dirs,
                    None,
                );
                rec.listed = true;
                self.records.push(rec);
                return Ok(());
            }
            Err(why) => {
                self.skipped.push((p.into(), format!("{label} but {why}")));
                return Ok(());
            }
        };
        let (f, st) = match reader(p, &dir, &st, self.held.get(&(st.st_dev, st.st_ino)))? {
            Some(Reader::Fd(f, st)) => (f, st),
            Some(Reader::Leased) => {
                self.skipped
                    .push((p.into(), format!("{label} but {LEASED}")));
                return Ok(());
            }
            None => {
                self.skipped.push((
                    p.into(),
                    format!("{label} but changed while being recorded"),
                ));
                return Ok(());
            }
        };
        let (name, n) = self.copy_blob(&f, p)?;
        let mut rec = self.record(p, Mode::Snapshot, label.to_string(), dirs, Some(&st));
        rec.listed = true;
        rec.size = n;
        rec.blob = Some(name);
        self.records.push(rec);
        Ok(())
    }

    /// Capture step: writes the state file (the records in path order and
    /// the skipped paths) into the staging directory (created 0600, never
    /// through a symlink) and returns the summary, timed from `start`.
    fn finish(mut self, start: Instant) -> Result<CaptureSummary, FilesError> {
        self.records.sort_by(|a, b| a.path.cmp(&b.path));
        self.summary.files = self.records.len();
        let mut dirs: Vec<PathBuf> = self
            .records
            .iter()
            .filter(|r| r.mode != Mode::Absent)
            .filter_map(|r| r.path.parent().map(Path::to_path_buf))
            .collect();
        dirs.sort();
        dirs.dedup();
        self.summary.dirs = dirs;
        let state = FileState {
            version: STATE_VERSION,
            files: self.records,
            skipped: self.skipped,
        };
        let path = self.out_dir.join(STATE_FILE);
        let json = serde_json::to_vec_pretty(&state).map_err(|e| FilesError::Malformed {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(io_err(&path, "create"))?;
        f.write_all(&json).map_err(io_err(&path, "write"))?;
        self.summary.elapsed = start.elapsed();
        Ok(self.summary)
    }
}
