//! Private directories outside the store, on tmpfs when it has room: the
//! scratch directory a restore materialises into ([`scratch_dir`],
//! [`remove_scratch`]) and the tmpfs directory a dump may be staged in
//! (see [`ImageStore::with_tmpfs_staging`](super::ImageStore::with_tmpfs_staging)).
//! Only directories that are ours are ever removed.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use tracing::{debug, warn};

use super::objects;
use crate::fsutil;

/// Creates a fresh, empty, private (0700) directory to materialise an
/// image into for a restore, and returns it: on tmpfs (`/dev/shm`) when
/// that has room for `need` bytes with a margin, else next to `fallback`
/// (in its parent, the job's state directory). Its name is
/// `supervise-restore-<tag>-<random>` (`<tag>` derived from `fallback`),
/// created with `mkdir`, so nobody can pre-create or redirect it; a
/// leftover of a crash is removed by [`remove_scratch`].
pub fn scratch_dir(fallback: &Path, need: u64) -> io::Result<PathBuf> {
    let prefix = scratch_prefix(fallback);
    if let Some(shm) = tmpfs_dir(need) {
        match fsutil::private_temp_dir(shm, &prefix) {
            Ok(d) => return Ok(d),
            Err(e) => {
                debug!(dir = %shm.display(), error = %e, "cannot use tmpfs for the restore; using the state directory")
            }
        }
    }
    let parent = match fallback.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    fsutil::private_temp_dir(parent, &prefix)
}

/// Prefix of the scratch directories of the job whose fallback is `fallback`.
pub(super) fn scratch_prefix(fallback: &Path) -> String {
    format!("supervise-restore-{}-", path_tag(fallback))
}

/// Removes what [`scratch_dir`] may have left for `fallback` (a restore
/// interrupted by a crash), on tmpfs and on disk: entries named
/// `supervise-restore-<tag>-*` that are real directories (not symlinks)
/// owned by our effective uid, plus the fixed names of earlier releases
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
/// symlink) owned by our effective uid; anything else is left alone and
/// logged. Returns true if it was removed.
fn remove_if_ours(path: &Path, what: &str) -> bool {
    let Ok(md) = fs::symlink_metadata(path) else {
        return false;
    };
    if !md.is_dir() || md.uid() != fsutil::own_uid() {
        debug!(path = %path.display(), uid = md.uid(), "not ours; leaving it alone");
        return false;
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
    let avail = st.blocks_available() * st.block_size() as u64;
    (st.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC && need.saturating_mul(2) < avail)
        .then_some(shm)
}

/// A short stable tag naming `p` in shared directories.
fn path_tag(p: &Path) -> String {
    objects::hex(&objects::hash(p.as_os_str().as_encoded_bytes()))[..16].to_string()
}

/// Prefix of this store's dump directories on tmpfs.
pub(super) fn tmpfs_staging_prefix(store_dir: &Path) -> String {
    format!("supervise-staging-{}-", path_tag(store_dir))
}
