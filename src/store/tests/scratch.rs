//! Scratch and tmpfs staging directories.

use super::*;
use crate::store::scratch::{scratch_prefix, tmpfs_dir, tmpfs_staging_prefix};

#[test]
fn scratch_dir_prefers_tmpfs_with_room_and_is_fresh_each_time() {
    let tmp = tempfile::tempdir().unwrap();
    let fb = tmp.path().join("restore");
    let prefix = scratch_prefix(&fb);
    let d = scratch_dir(&fb, 1 << 20).unwrap();
    let d2 = scratch_dir(&fb, 1 << 20).unwrap();
    assert_ne!(d, d2, "a fresh name every time");
    for p in [&d, &d2] {
        assert_eq!(mode(p), 0o700);
        assert!(fs::read_dir(p).unwrap().next().is_none());
        let name = p.file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with(&prefix), "{name}");
        assert!(name.len() >= prefix.len() + 16, "{name}");
    }
    if tmpfs_dir(1 << 20).is_some() {
        assert!(d.starts_with("/dev/shm"), "{}", d.display());
    }
    // No room on tmpfs: next to the fallback, in the state directory.
    let disk = scratch_dir(&fb, u64::MAX / 4).unwrap();
    assert_eq!(disk.parent(), Some(tmp.path()));
    // Leftovers of ours are removed; look-alikes that are not real
    // directories of ours are left alone.
    let link = tmp.path().join(format!("{prefix}link"));
    std::os::unix::fs::symlink(tmp.path(), &link).unwrap();
    fs::write(d.join("pages-1.img"), b"x").unwrap();
    remove_scratch(&fb);
    assert!(!d.exists() && !d2.exists() && !disk.exists());
    assert!(fs::symlink_metadata(&link).is_ok(), "symlink left alone");
    assert!(tmp.path().exists());
}

#[test]
#[cfg_attr(not(root), ignore = "needs root")]
fn foreign_scratch_and_staging_names_are_left_alone() {
    // /dev/shm is a tmpfs on every Linux this runs on; without it the
    // scratch falls back to disk and there is nothing foreign to leave.
    assert!(
        tmpfs_dir(1 << 20).is_some(),
        "no tmpfs with room at /dev/shm"
    );
    let tmp = tempfile::tempdir().unwrap();
    let fb = tmp.path().join("restore");
    let theirs = Path::new("/dev/shm").join(format!("{}attacker", scratch_prefix(&fb)));
    fs::create_dir(&theirs).unwrap();
    nix::unistd::chown(&theirs, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
    remove_scratch(&fb);
    assert!(theirs.exists(), "someone else's directory is not removed");
    let d = scratch_dir(&fb, 1 << 20).unwrap();
    assert_ne!(d, theirs);
    fs::remove_dir(&d).unwrap();
    fs::remove_dir(&theirs).unwrap();
    // The same for tmpfs staging directories.
    let dir = tmp.path().join("s");
    let store = ImageStore::open(&dir).unwrap().with_tmpfs_staging(true);
    publish(&store, "a");
    let theirs = Path::new("/dev/shm").join(format!("{}000002-x", tmpfs_staging_prefix(&dir)));
    fs::create_dir(&theirs).unwrap();
    nix::unistd::chown(&theirs, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
    let st = store.begin().unwrap();
    assert!(st.path().starts_with("/dev/shm"));
    assert_ne!(st.path(), theirs);
    drop(st);
    ImageStore::open(&dir).unwrap();
    assert!(theirs.exists());
    fs::remove_dir(&theirs).unwrap();
}

#[test]
#[cfg_attr(not(root), ignore = "needs root")]
fn private_tmpfs_is_private_unmounted_on_drop_and_leftovers_are_removed() {
    use crate::store::scratch::{dump_dir, dump_prefix, tmpfs_mounted_at};
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    // A dump directory: a private tmpfs mounted in the state directory.
    let d = dump_dir(root, 0, 8 << 20).unwrap();
    assert_eq!(d.kind(), ScratchKind::Tmpfs);
    let p = d.path().to_path_buf();
    assert_eq!(p.parent(), Some(root));
    assert!(tmpfs_mounted_at(&p));
    assert_eq!(mode(&p), 0o700);
    let st = nix::sys::statfs::statfs(&p).unwrap();
    assert_eq!(st.filesystem_type(), nix::sys::statfs::TMPFS_MAGIC);
    // The cap holds: 8 MiB, not more.
    assert!(fs::write(p.join("big"), vec![1u8; 9 << 20]).is_err());
    fs::remove_file(p.join("big")).unwrap();
    fs::write(p.join("pages-1.img"), b"secret").unwrap();
    drop(d);
    assert!(!tmpfs_mounted_at(&p) && !p.exists());

    // A crash leaves one mounted: the next start unmounts and removes it,
    // and leaves a look-alike of someone else alone.
    let left = dump_dir(root, 0, 8 << 20).unwrap().into_path();
    fs::write(left.join("pages-1.img"), b"secret").unwrap();
    let theirs = root.join(format!("{}attacker", dump_prefix(root)));
    fs::create_dir(&theirs).unwrap();
    nix::unistd::chown(&theirs, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
    remove_scratch(&root.join("restore"));
    assert!(!tmpfs_mounted_at(&left) && !left.exists());
    assert!(theirs.exists());
}

#[test]
fn memory_only_scratch_never_falls_back_to_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let fb = tmp.path().join("restore");
    // More than any machine has: one clear error naming need and memory.
    let e = restore_scratch(&fb, 1 << 60, true).unwrap_err();
    assert!(e.is_no_room(), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("1073741824.0 GiB") && msg.contains("available") && msg.contains("/dev/shm"),
        "{msg}"
    );
    assert!(
        fs::read_dir(tmp.path()).unwrap().next().is_none(),
        "nothing on disk"
    );
    // Without encryption the same need goes to the state directory.
    let d = restore_scratch(&fb, 1 << 60, false).unwrap();
    assert_eq!(d.kind(), ScratchKind::Disk);
    assert_eq!(d.path().parent(), Some(tmp.path()));
    let p = d.path().to_path_buf();
    drop(d);
    assert!(!p.exists());
}
