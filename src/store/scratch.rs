//! Private directories outside the store: the scratch directory a restore
//! materialises into ([`restore_scratch`], [`scratch_dir`]), the directory
//! CRIU dumps into when the store seals ([`dump_dir`]), and the tmpfs
//! directory a dump may be staged in (see
//! [`ImageStore::with_tmpfs_staging`](super::ImageStore::with_tmpfs_staging)).
//! Only directories that are ours are ever removed.
//!
//! # In memory only
//!
//! When the store seals (`[store] encryption`, the default), the job's
//! memory must never reach a disk in clear, so these directories are in
//! memory, never in the state directory:
//!
//! * a fresh private directory (`mkdir`, 0700) on `/dev/shm` when it has
//!   room for twice what is needed (at least half of it stays free);
//! * else (and first, for dumps: nobody else can fill it) a **private
//!   tmpfs** mounted on a fresh 0700 directory in the job's (trusted) state
//!   directory: `tmpfs` with `size=<cap>,mode=0700` and `nosuid,nodev,noexec`,
//!   when the system has at least twice what is needed available
//!   (`MemAvailable` of `/proc/meminfo`); the size is only a cap, memory is
//!   used as files are written;
//! * else [`ScratchError::NoRoom`], naming what was needed and what there
//!   was.
//!
//! A [`Scratch`] removes its directory when dropped: a tmpfs of ours is
//! emptied (which frees its memory in every mount namespace that holds a
//! copy of the mount, e.g. a job restored while it existed), unmounted
//! (`MNT_DETACH`) and its mount point removed (which detaches any copy
//! left in another namespace). Leftovers of a crash are found by name in
//! the state directory and on `/dev/shm`, and removed only if they are real
//! directories owned by us; a leftover mount point is unmounted first only
//! if `/proc/self/mountinfo` shows a tmpfs mounted exactly there
//! ([`remove_scratch`]).
//!
//! CRIU dumps from inside the job's mount namespace, which may not see a
//! mount made after the job started (on a host whose mounts are private,
//! as on this project's machines); it is handed the dump directory as a
//! descriptor (`/proc/self/fd/N`, see `criu::dump_with`), which reaches the
//! mount whatever that namespace holds. A restore's namespace is created
//! after the scratch directory is mounted, so it holds the mount.
//!
//! Test knobs (integration tests only): `SUPERVISE_TEST_SHM_FULL=1` makes
//! `/dev/shm` count as full, `SUPERVISE_TEST_MEM_AVAILABLE=<bytes>`
//! replaces `MemAvailable` in these decisions (the real tmpfs size caps
//! are not affected).

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use tracing::{debug, warn};

use super::objects;
use crate::fsutil;

/// Where a [`Scratch`] lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScratchKind {
    /// A private directory on `/dev/shm`.
    Shm,
    /// A tmpfs mounted for us.
    Tmpfs,
    /// A private directory on disk (store without encryption only).
    Disk,
}

impl ScratchKind {
    /// For logs: `shm`, `tmpfs`, `disk`.
    pub fn name(self) -> &'static str {
        match self {
            ScratchKind::Shm => "shm",
            ScratchKind::Tmpfs => "tmpfs",
            ScratchKind::Disk => "disk",
        }
    }
}

/// A fresh private directory; removed (a tmpfs of ours unmounted) when
/// dropped.
#[derive(Debug)]
pub struct Scratch {
    path: PathBuf,
    kind: ScratchKind,
    kept: bool,
}

impl Scratch {
    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where it lives.
    pub fn kind(&self) -> ScratchKind {
        self.kind
    }

    /// Gives up the removal on drop (the caller removes a directory that is
    /// not a mount).
    pub fn into_path(mut self) -> PathBuf {
        self.kept = true;
        std::mem::take(&mut self.path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        match self.kind {
            ScratchKind::Tmpfs => remove_mount(&self.path),
            _ => match fs::remove_dir_all(&self.path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    warn!(path = %self.path.display(), error = %e, "cannot remove a scratch directory; the next start removes it")
                }
            },
        }
    }
}

/// No private directory in memory could be had.
#[derive(Debug, thiserror::Error)]
pub enum ScratchError {
    /// Neither `/dev/shm` nor the system's available memory has room.
    #[error(
        "not enough memory for {what}: it needs {} in memory, and {} is available (MemAvailable; \
         at least twice the need is required) and /dev/shm has {} free; with encryption on, \
         supervise never writes the job's memory to disk in clear",
        human(*need), human(*available), human(*shm)
    )]
    NoRoom {
        /// What it was for.
        what: String,
        /// Bytes needed.
        need: u64,
        /// `MemAvailable`.
        available: u64,
        /// Free bytes on `/dev/shm`.
        shm: u64,
    },
    /// Making the directory or mounting the tmpfs failed.
    #[error("cannot make a private directory in memory for {what} in {}: {source}", parent.display())]
    Io {
        /// What it was for.
        what: String,
        /// Where.
        parent: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

impl ScratchError {
    /// True for [`ScratchError::NoRoom`].
    pub fn is_no_room(&self) -> bool {
        matches!(self, ScratchError::NoRoom { .. })
    }
}

/// `1.5 GiB`, `300.0 MiB`, `12 KiB`.
pub fn human(b: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    const MIB: f64 = (1u64 << 20) as f64;
    let f = b as f64;
    if f >= GIB {
        format!("{:.1} GiB", f / GIB)
    } else if f >= MIB {
        format!("{:.1} MiB", f / MIB)
    } else {
        format!("{} KiB", b.div_ceil(1024))
    }
}

/// Creates a fresh, empty, private (0700) directory to materialise an
/// image into for a restore, and returns it: on tmpfs (`/dev/shm`) when
/// that has room for `need` bytes with a margin, else next to `fallback`
/// (in its parent, the job's state directory). Its name is
/// `supervise-restore-<tag>-<random>` (`<tag>` derived from `fallback`),
/// created with `mkdir`, so nobody can pre-create or redirect it; a
/// leftover of a crash is removed by [`remove_scratch`]. For a store
/// without encryption; see [`restore_scratch`].
pub fn scratch_dir(fallback: &Path, need: u64) -> io::Result<PathBuf> {
    match restore_scratch(fallback, need, false) {
        Ok(s) => Ok(s.into_path()),
        Err(ScratchError::Io { source, .. }) => Err(source),
        Err(e) => Err(io::Error::other(e.to_string())),
    }
}

/// The scratch directory of a restore needing `need` bytes: as
/// [`scratch_dir`], and with `memory_only` (the store seals) never on
/// disk: `/dev/shm` when it has room, else a private tmpfs mounted in the
/// state directory (the parent of `fallback`) when the system has the
/// memory, else [`ScratchError::NoRoom`].
pub fn restore_scratch(
    fallback: &Path,
    need: u64,
    memory_only: bool,
) -> Result<Scratch, ScratchError> {
    let prefix = scratch_prefix(fallback);
    let parent = match fallback.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let what = || "the image to restore".to_string();
    if memory_only {
        // Files are whole pages on tmpfs: a margin over the logical size.
        let cap = need + need / 16 + (16 << 20);
        return memory_dir(parent, &prefix, need, cap, false, &what());
    }
    if let Some(shm) = tmpfs_dir(need) {
        match fsutil::private_temp_dir(shm, &prefix) {
            Ok(d) => return Ok(scratch(d, ScratchKind::Shm)),
            Err(e) => {
                debug!(dir = %shm.display(), error = %e, "cannot use tmpfs for the restore; using the state directory")
            }
        }
    }
    fsutil::private_temp_dir(parent, &prefix)
        .map(|d| scratch(d, ScratchKind::Disk))
        .map_err(|source| ScratchError::Io {
            what: what(),
            parent: parent.to_path_buf(),
            source,
        })
}

/// The directory CRIU dumps into when the store seals: a private tmpfs
/// mounted in `root` (the job's state directory) capped at `cap` bytes,
/// else a private directory on `/dev/shm`; `need` bytes must fit (see the
/// module documentation).
pub fn dump_dir(root: &Path, need: u64, cap: u64) -> Result<Scratch, ScratchError> {
    memory_dir(
        root,
        &dump_prefix(root),
        need,
        cap.max(need),
        true,
        "the checkpoint's dump",
    )
}

fn scratch(path: PathBuf, kind: ScratchKind) -> Scratch {
    Scratch {
        path,
        kind,
        kept: false,
    }
}

/// A private directory in memory for `need` bytes (see the module
/// documentation); `prefer_mount` tries the tmpfs mount before `/dev/shm`.
fn memory_dir(
    parent: &Path,
    prefix: &str,
    need: u64,
    cap: u64,
    prefer_mount: bool,
    what: &str,
) -> Result<Scratch, ScratchError> {
    let available = mem_available().unwrap_or(0);
    let mount_fits = need.saturating_mul(2) <= available;
    let io_err = |source| ScratchError::Io {
        what: what.to_string(),
        parent: parent.to_path_buf(),
        source,
    };
    let shm = || -> Option<Result<Scratch, ScratchError>> {
        let shm = tmpfs_dir(need)?;
        Some(
            fsutil::private_temp_dir(shm, prefix)
                .map(|d| scratch(d, ScratchKind::Shm))
                .map_err(|source| ScratchError::Io {
                    what: what.to_string(),
                    parent: shm.to_path_buf(),
                    source,
                }),
        )
    };
    if !prefer_mount {
        if let Some(Ok(s)) = shm() {
            return Ok(s);
        }
    }
    if mount_fits {
        match mount_tmpfs(parent, prefix, cap) {
            Ok(s) => return Ok(s),
            Err(e) if prefer_mount => {
                debug!(dir = %parent.display(), error = %e, "cannot mount a private tmpfs; trying /dev/shm");
                if let Some(r) = shm() {
                    return r;
                }
                return Err(io_err(e));
            }
            Err(e) => return Err(io_err(e)),
        }
    }
    if prefer_mount {
        if let Some(r) = shm() {
            return r;
        }
    }
    Err(ScratchError::NoRoom {
        what: what.to_string(),
        need,
        available,
        shm: shm_free(),
    })
}

/// Mounts a private tmpfs (at most `cap` bytes) on a fresh 0700 directory
/// `<parent>/<prefix><random>`.
fn mount_tmpfs(parent: &Path, prefix: &str, cap: u64) -> io::Result<Scratch> {
    use nix::mount::{mount, MsFlags};
    let dir = fsutil::private_temp_dir(parent, prefix)?;
    // tmpfs takes size=0 as "no limit": at least 1 MiB.
    let size = cap.max(1 << 20).div_ceil(4096) * 4096;
    let data = format!("size={size},mode=0700");
    let r = mount(
        Some("tmpfs"),
        &dir,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some(data.as_str()),
    );
    if let Err(e) = r {
        let _ = fs::remove_dir(&dir);
        return Err(io::Error::from(e));
    }
    let s = scratch(dir, ScratchKind::Tmpfs);
    // What was mounted there is what we asked for.
    let st = nix::sys::statfs::statfs(s.path()).map_err(io::Error::from)?;
    let md = fs::symlink_metadata(s.path())?;
    if st.filesystem_type() != nix::sys::statfs::TMPFS_MAGIC
        || md.mode() & 0o7777 != 0o700
        || md.uid() != fsutil::own_uid()
    {
        return Err(io::Error::other(format!(
            "{}: the tmpfs mounted there is not private",
            s.path().display()
        )));
    }
    debug!(path = %s.path().display(), size, "mounted a private tmpfs");
    Ok(s)
}

/// Empties, unmounts (lazily) and removes a tmpfs mount point of ours.
fn remove_mount(path: &Path) {
    // Emptying it first frees its memory in every namespace holding a copy
    // of the mount.
    if let Ok(rd) = fs::read_dir(path) {
        for e in rd.flatten() {
            let p = e.path();
            let r = match e.file_type() {
                Ok(t) if t.is_dir() => fs::remove_dir_all(&p),
                _ => fs::remove_file(&p),
            };
            if let Err(e) = r {
                warn!(path = %p.display(), error = %e, "cannot remove a file from a private tmpfs");
            }
        }
    }
    for _ in 0..8 {
        if !tmpfs_mounted_at(path) {
            break;
        }
        if let Err(e) = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH) {
            warn!(path = %path.display(), error = %e, "cannot unmount a private tmpfs");
            break;
        }
    }
    match fs::remove_dir(path) {
        Ok(()) => debug!(path = %path.display(), "removed a private tmpfs"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot remove a private tmpfs's mount point; the next start removes it")
        }
    }
}

/// True if `/proc/self/mountinfo` shows a tmpfs mounted exactly at `path`
/// (compared after resolving `path`'s parent).
pub(super) fn tmpfs_mounted_at(path: &Path) -> bool {
    let want = match (path.parent(), path.file_name()) {
        (Some(p), Some(n)) => match fs::canonicalize(p) {
            Ok(p) => p.join(n),
            Err(_) => return false,
        },
        _ => return false,
    };
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    info.lines().any(|l| {
        let Some((left, right)) = l.split_once(" - ") else {
            return false;
        };
        let point = left.split(' ').nth(4).map(unescape_mountinfo);
        let fstype = right.split(' ').next();
        fstype == Some("tmpfs") && point.as_deref() == Some(want.as_os_str().as_encoded_bytes())
    })
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape_mountinfo(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// Prefix of the scratch directories of the job whose fallback is `fallback`.
pub(super) fn scratch_prefix(fallback: &Path) -> String {
    format!("supervise-restore-{}-", path_tag(fallback))
}

/// Prefix of the dump directories of the job whose state directory is `root`.
pub(super) fn dump_prefix(root: &Path) -> String {
    format!("supervise-dump-{}-", path_tag(root))
}

/// Removes what [`restore_scratch`] and [`dump_dir`] may have left for the
/// job whose restore fallback is `fallback` (an interrupted restore or
/// checkpoint), on tmpfs and on disk: entries named
/// `supervise-restore-<tag>-*` and `supervise-dump-<tag>-*` in `/dev/shm`
/// and in the state directory that are real directories (not symlinks)
/// owned by our effective uid (a private tmpfs mounted there is unmounted
/// first), plus the fixed names of earlier releases
/// (`/dev/shm/supervise-restore-<tag>`, `fallback` itself) under the same
/// rule. Anything else (someone else's directory, a symlink) is left alone:
/// it cannot be in the way, since every restore makes a fresh name.
pub fn remove_scratch(fallback: &Path) {
    let prefix = scratch_prefix(fallback);
    let shm = Path::new("/dev/shm");
    let legacy_shm = shm.join(&prefix[..prefix.len() - 1]);
    for p in [legacy_shm.as_path(), fallback] {
        remove_if_ours(p, "leftover restore directory");
    }
    let parent = fallback.parent().filter(|p| !p.as_os_str().is_empty());
    for dir in [Some(shm), parent].into_iter().flatten() {
        remove_ours_with_prefix(dir, &prefix, "leftover restore directory");
    }
    if let Some(root) = parent {
        let dumps = dump_prefix(root);
        for dir in [shm, root] {
            remove_ours_with_prefix(dir, &dumps, "leftover of an interrupted checkpoint's dump");
        }
    }
}

/// Removes every entry of `dir` named `<prefix>*` that is ours (see
/// [`remove_if_ours`]); returns how many were removed.
pub(super) fn remove_ours_with_prefix(dir: &Path, prefix: &str, what: &str) -> usize {
    let Ok(rd) = fs::read_dir(dir) else { return 0 };
    let mut n = 0;
    for entry in rd.flatten() {
        if entry
            .file_name()
            .as_encoded_bytes()
            .starts_with(prefix.as_bytes())
            && remove_if_ours(&entry.path(), what)
        {
            n += 1;
        }
    }
    n
}

/// Removes `path` (recursively) if it is a real directory (lstat: not a
/// symlink) owned by our effective uid, unmounting a tmpfs mounted there
/// first; anything else is left alone and logged. Returns true if it was
/// removed.
fn remove_if_ours(path: &Path, what: &str) -> bool {
    let Ok(md) = fs::symlink_metadata(path) else {
        return false;
    };
    if !md.is_dir() || md.uid() != fsutil::own_uid() {
        debug!(path = %path.display(), uid = md.uid(), "not ours; leaving it alone");
        return false;
    }
    if tmpfs_mounted_at(path) {
        warn!(path = %path.display(), "unmounting {what} (a private tmpfs)");
        remove_mount(path);
        return !path.exists();
    }
    match fs::remove_dir_all(path) {
        Ok(()) => {
            warn!(path = %path.display(), "removed {what}");
            true
        }
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot remove {what}");
            false
        }
    }
}

/// `/dev/shm` if it is a tmpfs with room for twice `need` (at least half
/// of it, i.e. of RAM, stays free for everything else).
pub(super) fn tmpfs_dir(need: u64) -> Option<&'static Path> {
    let shm = Path::new("/dev/shm");
    let st = nix::sys::statfs::statfs(shm).ok()?;
    (st.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC && need.saturating_mul(2) < shm_free())
        .then_some(shm)
}

/// Free bytes on `/dev/shm` (0 with the test knob `SUPERVISE_TEST_SHM_FULL`).
fn shm_free() -> u64 {
    if std::env::var_os("SUPERVISE_TEST_SHM_FULL").is_some_and(|v| v == "1") {
        return 0;
    }
    nix::sys::statfs::statfs("/dev/shm")
        .map(|st| st.blocks_available() * st.block_size() as u64)
        .unwrap_or(0)
}

/// `MemAvailable` of `/proc/meminfo`, in bytes (the test knob
/// `SUPERVISE_TEST_MEM_AVAILABLE` replaces it).
pub fn mem_available() -> Option<u64> {
    if let Some(v) = std::env::var("SUPERVISE_TEST_MEM_AVAILABLE")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return Some(v);
    }
    let info = fs::read_to_string("/proc/meminfo").ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|r| r.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kib| kib * 1024)
}

/// A short stable tag naming `p` in shared directories.
fn path_tag(p: &Path) -> String {
    objects::hex(&objects::hash(p.as_os_str().as_encoded_bytes()))[..16].to_string()
}

/// Prefix of this store's dump directories on tmpfs.
pub(super) fn tmpfs_staging_prefix(store_dir: &Path) -> String {
    format!("supervise-staging-{}-", path_tag(store_dir))
}
