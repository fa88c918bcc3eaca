//! Open, lock, marker, trusted directory and hostile store files.

use std::fs::File;
use std::time::Duration;

use super::*;
use crate::fsutil;

#[test]
fn permissions() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let store = ImageStore::open(&dir).unwrap();
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join(PACKS_DIR)), 0o700);
    let st = store.begin().unwrap();
    assert_eq!(mode(st.path()), 0o700);
    write(&st.path().join("core-1.img"), b"core");
    let info = st.commit(meta()).unwrap();
    assert_eq!(mode(&info.path), 0o700);
    assert_eq!(mode(&info.path.join(MANIFEST_NAME)), 0o600);
    assert_eq!(mode(&dir.join(LOCK_NAME)), 0o600);
    for p in packs(&dir) {
        assert_eq!(mode(&dir.join(PACKS_DIR).join(&p)), 0o600, "{p}");
    }
}

#[test]
fn insecure_dir_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    fs::create_dir(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
    let err = ImageStore::open(&dir).unwrap_err();
    assert!(matches!(err, StoreError::Untrusted(_)), "{err}");
    let s = err.to_string();
    assert!(s.contains(&dir.display().to_string()), "{s}");
    assert!(s.contains("mode 0777") && !s.contains('\n'), "{s}");
    assert!(ImageStore::open_read_only(&dir).is_err());
    assert!(
        fs::read_dir(&dir).unwrap().next().is_none(),
        "nothing created"
    );
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    ImageStore::open(&dir).unwrap();
}

#[test]
fn writers_exclude_each_other_across_handles() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");
    let a = ImageStore::open(&dir).unwrap();
    let b = ImageStore::open_read_only(&dir).unwrap();
    let held = a.lock(true).unwrap();
    let f = File::open(dir.join(LOCK_NAME)).unwrap();
    // A shared, non-blocking flock fails while the writer holds the lock.
    assert!(
        fsutil::flock(&f, false, true).is_err(),
        "a reader must wait for a writer"
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        let r = b.gc().unwrap();
        tx.send(()).unwrap();
        r
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(200)).is_err(),
        "gc ran under a held lock"
    );
    drop(held);
    rx.recv_timeout(Duration::from_secs(10)).unwrap();
    t.join().unwrap();
}

#[test]
fn marker_written_and_foreign_directories_refused() {
    let tmp = tempfile::tempdir().unwrap();
    // New and empty directories become stores.
    let new = tmp.path().join("new");
    ImageStore::open(&new).unwrap();
    assert_eq!(fs::read(new.join(MARKER_NAME)).unwrap(), MARKER_CONTENT);
    assert_eq!(mode(&new.join(MARKER_NAME)), 0o600);
    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).unwrap();
    ImageStore::open_read_only(&empty).unwrap();
    assert!(
        !empty.join(MARKER_NAME).exists(),
        "read-only writes nothing"
    );
    ImageStore::open(&empty).unwrap();
    assert!(empty.join(MARKER_NAME).exists());
    // A directory with foreign files is refused, and nothing is created.
    let etc = tmp.path().join("etc");
    fs::create_dir(&etc).unwrap();
    fs::write(etc.join("passwd"), b"root:x:0:0").unwrap();
    fs::create_dir(etc.join("000001-20260101T000000Z")).unwrap();
    let before = {
        let mut v: Vec<_> = fs::read_dir(&etc)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        v.sort();
        v
    };
    for r in [ImageStore::open(&etc), ImageStore::open_read_only(&etc)] {
        let e = r.unwrap_err();
        assert!(matches!(e, StoreError::NotAStore { .. }), "{e}");
        let s = e.to_string();
        assert!(
            s.contains(&etc.display().to_string()) && s.contains("`passwd`"),
            "{s}"
        );
    }
    let after = {
        let mut v: Vec<_> = fs::read_dir(&etc)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        v.sort();
        v
    };
    assert_eq!(before, after);
    // A store of an earlier release (no marker) is adopted.
    let old = tmp.path().join("old");
    let store = ImageStore::open(&old).unwrap();
    let img = publish(&store, "a");
    let st = store.begin().unwrap();
    std::mem::forget(st);
    fs::remove_file(old.join(MARKER_NAME)).unwrap();
    for n in [
        ".lease.json",
        ".lease.lock",
        ".lease.json.tmp",
        ".released-3",
    ] {
        fs::write(old.join(n), b"").unwrap();
    }
    fs::create_dir(old.join(".deleting-000001-20260101T000000Z")).unwrap();
    ImageStore::open_read_only(&old).unwrap();
    let store = ImageStore::open(&old).unwrap();
    assert!(old.join(MARKER_NAME).exists());
    assert_eq!(store.list().unwrap()[0].id, img.id);
    // A marker that is not a regular file is refused, naming it.
    let bad = tmp.path().join("bad");
    fs::create_dir(&bad).unwrap();
    nix::unistd::mkfifo(&bad.join(MARKER_NAME), nix::sys::stat::Mode::S_IRWXU).unwrap();
    let e = ImageStore::open(&bad).unwrap_err().to_string();
    assert!(e.contains(MARKER_NAME) && e.contains("FIFO"), "{e}");
}

#[test]
fn non_regular_and_oversized_store_files_are_damage() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");
    let store = ImageStore::open(&dir).unwrap();
    let old = publish(&store, "a");
    let new = publish(&store, "b");
    let manifest = new.path.join(MANIFEST_NAME);
    // FIFO, /dev/zero, a sparse file over the limit: skipped, named.
    for kind in 0..3 {
        fs::remove_file(&manifest).unwrap();
        match kind {
            0 => nix::unistd::mkfifo(&manifest, nix::sys::stat::Mode::S_IRWXU).unwrap(),
            1 => std::os::unix::fs::symlink("/dev/zero", &manifest).unwrap(),
            _ => File::create(&manifest)
                .unwrap()
                .set_len(MAX_MANIFEST_BYTES + 1)
                .unwrap(),
        }
        let list = store.list().unwrap();
        assert_eq!(list.len(), 1, "kind {kind}");
        assert_eq!(list[0].id, old.id);
        let r = store.verify_all().unwrap();
        assert!(
            r.unreadable[0].1.contains(&manifest.display().to_string()),
            "{r:?}"
        );
        let e = store.get(&new.id).unwrap_err().to_string();
        assert!(e.contains(MANIFEST_NAME), "{e}");
    }
    fs::remove_file(&manifest).unwrap();
    // An index that is a symlink to /dev/zero is a bad index.
    let pack = new.manifest.stored.as_ref().unwrap().pack.clone().unwrap();
    let idx = dir.join(PACKS_DIR).join(format!("{pack}.idx"));
    fs::remove_file(&idx).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &idx).unwrap();
    // (A fresh handle: a loaded index is never re-read, packs are immutable.)
    let r = ImageStore::open_read_only(&dir)
        .unwrap()
        .verify_all()
        .unwrap();
    assert!(
        r.bad_indexes
            .iter()
            .any(|(n, why)| *n == pack && why.contains("symlink")),
        "{r:?}"
    );
    // A sparse index far larger than its pack could need.
    fs::remove_file(&idx).unwrap();
    File::create(&idx).unwrap().set_len(1 << 40).unwrap();
    let r = ImageStore::open_read_only(&dir)
        .unwrap()
        .verify_all()
        .unwrap();
    assert!(
        r.bad_indexes
            .iter()
            .any(|(n, why)| *n == pack && why.contains("larger than")),
        "{r:?}"
    );
    // packs/ as a symlink: refused, never followed.
    let packs = dir.join(PACKS_DIR);
    fs::rename(&packs, tmp.path().join("real-packs")).unwrap();
    std::os::unix::fs::symlink(tmp.path().join("real-packs"), &packs).unwrap();
    let e = ImageStore::open(&dir).unwrap_err().to_string();
    assert!(e.contains("packs is a symlink"), "{e}");
    let e = store.verify_all().unwrap_err().to_string();
    assert!(e.contains("packs is a symlink"), "{e}");
    assert!(store.gc().is_err());
    // .lock as a FIFO: refused, not opened.
    fs::remove_file(&packs).unwrap();
    fs::rename(tmp.path().join("real-packs"), &packs).unwrap();
    fs::remove_file(dir.join(LOCK_NAME)).unwrap();
    nix::unistd::mkfifo(&dir.join(LOCK_NAME), nix::sys::stat::Mode::S_IRWXU).unwrap();
    let e = store.verify(&old).unwrap_err().to_string();
    assert!(e.contains(".lock is a FIFO"), "{e}");
}
