//! Encrypted stores: sealed checkpoints, keys, planted and damaged data.

use super::*;

/// Options with encryption on and the key in `keydir`.
fn sealed_opts(keydir: &Path) -> StoreOptions {
    let mut o = StoreOptions::new(keydir.join("store.key"));
    o.parity = false;
    o
}

fn private_dir() -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    fs::set_permissions(t.path(), fs::Permissions::from_mode(0o700)).unwrap();
    t
}

/// Every byte of every file under `dir`.
fn all_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                todo.push(p);
            } else if e.file_type().unwrap().is_file() {
                out.push((p.display().to_string(), fs::read(&p).unwrap()));
            }
        }
    }
    out
}

#[test]
fn sealed_roundtrip_hides_content_and_dedups() {
    let tmp = private_dir();
    let keys = private_dir();
    let dir = tmp.path().join("images");
    let opts = sealed_opts(keys.path());
    let store = ImageStore::open_with(&dir, &opts).unwrap();
    assert!(store.seals());
    let marker = b"SECRET-MARKER-0123456789".repeat(200);
    let mut pages = job_pages(1, 64);
    pages.extend_from_slice(&marker);
    let img = publish_files(&store, &[("pages-1.img", &pages), ("core-1.img", b"core")]);
    assert!(img.sealed);
    assert!(dir.join(&img.id).join(MANIFEST_SEALED_NAME).exists());
    assert!(!dir.join(&img.id).join(MANIFEST_NAME).exists());
    for (path, bytes) in all_bytes(&dir) {
        assert!(
            !bytes.windows(13).any(|w| w == b"SECRET-MARKER"),
            "{path} holds the marker"
        );
        assert!(
            !bytes.windows(9).any(|w| w == b"pages-1.i"),
            "{path} names a file"
        );
    }
    // A second checkpoint of the same data stores (almost) nothing new.
    let img2 = publish_files(&store, &[("pages-1.img", &pages), ("core-1.img", b"core")]);
    assert_eq!(img2.manifest.stored.as_ref().unwrap().new_objects, 0);
    let work = tmp.path().join("w");
    let got = contents(&store, &img2, &work);
    assert_eq!(got[1], ("pages-1.img".to_string(), pages.clone()));
    store.verify(&img).unwrap();

    // Read-only with the same key: fine; images lists both.
    let ro = ImageStore::open_read_only_with(&dir, &opts).unwrap();
    assert_eq!(ro.list().unwrap().len(), 2);
}

#[test]
fn wrong_or_missing_key_is_one_clear_error() {
    let tmp = private_dir();
    let keys = private_dir();
    let other = private_dir();
    let dir = tmp.path().join("images");
    let opts = sealed_opts(keys.path());
    let store = ImageStore::open_with(&dir, &opts).unwrap();
    publish(&store, "a");
    drop(store);
    // Another key file: refused naming it, nothing changed.
    let wrong = sealed_opts(other.path());
    crypto::StoreKey::generate(&wrong.key_file).unwrap();
    let before = fs::read(dir.join(MARKER_NAME)).unwrap();
    let e = ImageStore::open_with(&dir, &wrong).unwrap_err().to_string();
    assert!(
        e.contains(&wrong.key_file.display().to_string()) && e.contains("is not the key"),
        "{e}"
    );
    let e = ImageStore::open_read_only_with(&dir, &wrong)
        .unwrap_err()
        .to_string();
    assert!(e.contains("is not the key"), "{e}");
    assert_eq!(fs::read(dir.join(MARKER_NAME)).unwrap(), before);
    // No key file: refused, and no new key generated in its place.
    let missing = sealed_opts(&other.path().join("sub"));
    let e = ImageStore::open_with(&dir, &missing)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("does not exist") && e.contains("cannot be read without that key"),
        "{e}"
    );
    assert!(!missing.key_file.exists());
}

#[test]
fn planted_checkpoint_from_another_store_is_refused() {
    let tmp = private_dir();
    let keys = private_dir();
    let keys2 = private_dir();
    let dir = tmp.path().join("images");
    let dir2 = tmp.path().join("other");
    let store = ImageStore::open_with(&dir, &sealed_opts(keys.path())).unwrap();
    let good = publish(&store, "good");
    let other = ImageStore::open_with(&dir2, &sealed_opts(keys2.path())).unwrap();
    // Give the other store a higher sequence number, then plant its
    // checkpoint and pack into ours.
    publish(&other, "x");
    let planted = publish(&other, "planted");
    let dest = dir.join(&planted.id);
    fs::rename(&planted.path, &dest).unwrap();
    for p in packs(&dir2) {
        fs::rename(dir2.join(PACKS_DIR).join(&p), dir.join(PACKS_DIR).join(&p)).unwrap();
    }
    let (list, logs) = capture_logs(|| store.list().unwrap());
    assert_eq!(
        list.iter().map(|i| &i.id).collect::<Vec<_>>(),
        vec![&good.id]
    );
    assert!(
        logs.contains(&planted.id) && logs.contains("does not authenticate"),
        "{logs}"
    );
    // A plaintext checkpoint planted in a sealed store is refused too.
    let plain_dir = tmp.path().join("plain");
    let plain = ImageStore::open(&plain_dir).unwrap();
    for _ in 0..3 {
        publish(&plain, "p");
    }
    let p = publish(&plain, "plain");
    fs::rename(&p.path, dir.join(&p.id)).unwrap();
    for f in packs(&plain_dir) {
        fs::rename(
            plain_dir.join(PACKS_DIR).join(&f),
            dir.join(PACKS_DIR).join(&f),
        )
        .unwrap();
    }
    let (list, logs) = capture_logs(|| store.list().unwrap());
    assert_eq!(
        list.iter().map(|i| &i.id).collect::<Vec<_>>(),
        vec![&good.id]
    );
    assert!(logs.contains("not sealed"), "{logs}");
    let work = tmp.path().join("w");
    contents(&store, &good, &work);
}

#[test]
fn old_plain_store_stays_readable_and_new_checkpoints_are_sealed() {
    let tmp = private_dir();
    let keys = private_dir();
    let dir = tmp.path().join("images");
    let plain = ImageStore::open(&dir).unwrap();
    let old = publish(&plain, "old");
    assert!(!old.sealed);
    drop(plain);
    let store = ImageStore::open_with(&dir, &sealed_opts(keys.path())).unwrap();
    let new = publish(&store, "new");
    assert!(new.sealed);
    let list = store.list().unwrap();
    assert_eq!(list.len(), 2);
    let work = tmp.path().join("w1");
    assert_eq!(contents(&store, &list[1], &work)[0].1, b"pages old");
    let work = tmp.path().join("w2");
    assert_eq!(contents(&store, &list[0], &work)[0].1, b"pages new");
    let report = store.verify_all().unwrap();
    assert!(!report.damaged(), "{report:?}");
    // gc keeps both.
    store.gc().unwrap();
    assert_eq!(store.list().unwrap().len(), 2);
    store.verify(&list[0]).unwrap();
    store.verify(&list[1]).unwrap();
}

#[test]
fn damaged_sealed_object_fails_verification() {
    let tmp = private_dir();
    let keys = private_dir();
    let dir = tmp.path().join("images");
    let store = ImageStore::open_with(&dir, &sealed_opts(keys.path())).unwrap();
    let img = publish_files(&store, &[("pages-1.img", &job_pages(3, 8))]);
    let pack = packs(&dir)
        .into_iter()
        .find(|p| p.ends_with(".pack"))
        .unwrap();
    let pp = dir.join(PACKS_DIR).join(pack);
    let mut b = fs::read(&pp).unwrap();
    let n = b.len();
    b[n - 100] ^= 1;
    fs::write(&pp, &b).unwrap();
    let e = store.verify(&img).unwrap_err().to_string();
    assert!(e.contains("does not authenticate"), "{e}");
}
