//! Small filesystem helpers shared by the parts of the store.

use std::fs;
use std::io;
use std::path::Path;

use super::{io_err, StoreError};
use crate::fsutil;

pub(super) fn remove_any(path: &Path) -> Result<(), StoreError> {
    let md = fs::symlink_metadata(path).map_err(io_err(path))?;
    if md.is_dir() {
        fs::remove_dir_all(path).map_err(io_err(path))
    } else {
        fs::remove_file(path).map_err(io_err(path))
    }
}

/// fsyncs a directory.
pub(super) fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    fsutil::fsync_dir(dir).map_err(io_err(dir))
}

/// Renames `from` to `to`, failing if `to` exists.
pub(super) fn rename_noreplace(from: &Path, to: &Path) -> Result<(), StoreError> {
    use nix::errno::Errno;
    use nix::fcntl::{renameat2, RenameFlags};
    match renameat2(None, from, None, to, RenameFlags::RENAME_NOREPLACE) {
        Ok(()) => Ok(()),
        // Filesystem without RENAME_NOREPLACE support: check, then plain rename.
        Err(Errno::EINVAL) | Err(Errno::ENOSYS) => {
            if fs::symlink_metadata(to).is_ok() {
                return Err(io_err(to)(io::Error::from_raw_os_error(libc::EEXIST)));
            }
            fs::rename(from, to).map_err(io_err(to))
        }
        Err(e) => Err(io_err(to)(io::Error::from(e))),
    }
}

/// Total size in bytes of all regular files below `path` (recursively, not
/// following symlinks). Unreadable entries are ignored; a regular file yields
/// its own size.
pub fn dir_size(path: &Path) -> u64 {
    let Ok(md) = fs::symlink_metadata(path) else {
        return 0;
    };
    if md.is_file() {
        return md.len();
    }
    if !md.is_dir() {
        return 0;
    }
    let Ok(rd) = fs::read_dir(path) else { return 0 };
    rd.filter_map(Result::ok).map(|e| dir_size(&e.path())).sum()
}

/// Prefix of pack and index files (and copies) being written.
pub const TMP_PREFIX: &str = ".tmp-";

/// Copies the store file `from` to `to` (a fresh temporary name in its
/// directory, fsync, rename).
pub fn copy_file(from: &Path, to: &Path) -> io::Result<()> {
    let dir = to.parent().unwrap_or(Path::new("."));
    let mut src = fsutil::open_regular(from)?;
    let (mut f, tmp) = fsutil::create_temp_file(dir, TMP_PREFIX.trim_start_matches('.'), 0o600)?;
    let r = io::copy(&mut src, &mut f)
        .and_then(|_| f.sync_all())
        .and_then(|()| fs::rename(&tmp, to));
    if r.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    r
}
