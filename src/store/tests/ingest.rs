//! Staging, commit and what a commit stores.

use super::*;
use crate::store::scratch::tmpfs_dir;

#[test]
fn publish_and_list_newest_first() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ImageStore::open(&tmp.path().join("a/b/store")).unwrap();
    let a = publish(&store, "a");
    let b = publish(&store, "b");
    let c = publish(&store, "c");
    assert_eq!((a.seq, b.seq, c.seq), (1, 2, 3));
    assert!(a.id.starts_with("000001-") && a.id.ends_with('Z') && a.id.len() == 23);
    let list = store.list().unwrap();
    let ids: Vec<_> = list.iter().map(|i| i.id.clone()).collect();
    assert_eq!(ids, vec![c.id.clone(), b.id.clone(), a.id.clone()]);
    // Lexicographic order of ids is age order.
    let mut sorted = ids.clone();
    sorted.sort_by(|x, y| y.cmp(x));
    assert_eq!(sorted, ids);

    let got = store.get(&b.id).unwrap();
    assert_eq!(got.manifest.meta, meta());
    assert_eq!(got.manifest.version, MANIFEST_VERSION);
    assert_eq!(got.manifest.files.len(), 2);
    assert_eq!(got.manifest.files[0].name, "pages-1.img");
    assert_eq!(got.manifest.files[0].chunk, Some(PAGE_CHUNK));
    assert_eq!(got.manifest.files[1].chunk, Some(FILE_CHUNK));
    assert_eq!(got.created, b.created);
    assert_eq!(got.size_bytes, b.size_bytes);
    assert_eq!(got.size_bytes, 7 + 3000);
    assert_eq!(got.new_bytes, b.new_bytes);
    // Only the manifest is left in the checkpoint directory.
    assert_eq!(names(&got.path), vec![MANIFEST_NAME.to_string()]);
    store.verify(&got).unwrap();
    assert!(matches!(
        store.get("000009-20260101T000000Z"),
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        store.get("../etc"),
        Err(StoreError::InvalidId { .. })
    ));
}

#[test]
fn later_dumps_are_staged_on_tmpfs_and_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = ImageStore::open(&tmp.path().join("d")).unwrap();
    publish(&disk, "a");
    assert!(
        disk.begin().unwrap().path().starts_with(tmp.path()),
        "disk by default"
    );
    let store = ImageStore::open(&tmp.path().join("s"))
        .unwrap()
        .with_tmpfs_staging(true);
    let first = store.begin().unwrap();
    assert!(first.path().starts_with(tmp.path()), "first dump on disk");
    first.abort();
    publish(&store, "a");
    let st = store.begin().unwrap();
    let dump = st.path().to_path_buf();
    if tmpfs_dir(1 << 20).is_none() {
        return;
    }
    assert!(dump.starts_with("/dev/shm"), "{}", dump.display());
    assert_eq!(mode(&dump), 0o700);
    write(&dump.join("pages-1.img"), &job_pages(1, 3));
    let img = st.commit(meta()).unwrap();
    assert!(!dump.exists());
    assert_eq!(names(&img.path), vec![MANIFEST_NAME.to_string()]);
    assert_eq!(
        contents(&store, &img, &tmp.path().join("w"))[0].1,
        job_pages(1, 3)
    );
    // A crash leaves it behind; the next open removes it.
    let st = store.begin().unwrap();
    let dump = st.path().to_path_buf();
    std::mem::forget(st);
    assert!(dump.exists());
    ImageStore::open(&tmp.path().join("s")).unwrap();
    assert!(!dump.exists());
    // Dropping a staging removes both directories.
    let st = store.begin().unwrap();
    let dump = st.path().to_path_buf();
    drop(st);
    assert!(!dump.exists());
    assert_eq!(names(&tmp.path().join("s")).len(), 2);
}

#[test]
fn abort_and_drop_remove_staging() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ImageStore::open(tmp.path()).unwrap();
    let st = store.begin().unwrap();
    let p = st.path().to_path_buf();
    write(&p.join("x.img"), b"x");
    st.abort();
    assert!(!p.exists());
    let st = store.begin().unwrap();
    let p = st.path().to_path_buf();
    drop(st);
    assert!(!p.exists());
    assert!(store.list().unwrap().is_empty());
}

#[test]
fn concurrent_stagings_get_distinct_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ImageStore::open(tmp.path()).unwrap();
    let s1 = store.begin().unwrap();
    let s2 = store.begin().unwrap();
    assert_ne!(s1.id(), s2.id());
    assert_eq!(s2.id()[..6], *"000002");
}

#[test]
fn commit_rejects_deep_subdirectory_and_absolute_link_and_cleans_up() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ImageStore::open(tmp.path()).unwrap();
    let st = store.begin().unwrap();
    let p = st.path().to_path_buf();
    fs::create_dir_all(p.join("sub/deeper")).unwrap();
    let err = st.commit(meta()).unwrap_err();
    assert!(matches!(err, StoreError::UnexpectedEntry { .. }), "{err}");
    assert!(!p.exists());
    let st = store.begin().unwrap();
    std::os::unix::fs::symlink("/etc", st.path().join("parent")).unwrap();
    let err = st.commit(meta()).unwrap_err();
    assert!(matches!(err, StoreError::UnexpectedEntry { .. }), "{err}");
    assert!(store.list().unwrap().is_empty());
}

#[test]
fn later_checkpoints_store_only_what_changed() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ImageStore::open(&tmp.path().join("s")).unwrap();
    let n = 3000; // ~12 MiB, depth-2 trees
    let mut pages = job_pages(1, n);
    let core = noise(9, 10_000);
    let first = publish_files(
        &store,
        &[
            ("pages-1.img", &pages),
            ("core-1.img", &core),
            ("supervise-files.json", b"{}"),
        ],
    );
    // Change 10 scattered pages and the core file.
    for k in 0..10 {
        let at = (k * 293 + 7) * 4096 + 100;
        pages[at] ^= 0x5a;
    }
    let core2 = noise(10, 10_000);
    let second = publish_files(
        &store,
        &[
            ("pages-1.img", &pages),
            ("core-1.img", &core2),
            ("supervise-files.json", b"{}"),
        ],
    );
    let s1 = first.manifest.stored.clone().unwrap();
    let s2 = second.manifest.stored.clone().unwrap();
    assert!(s1.new_raw_bytes >= (n as u64 * 4 / 5) * 4096, "{s1:?}");
    // 10 pages + 1 core chunk + the changed tree nodes (10 leaves' parents + root).
    assert!(s2.new_objects <= 10 + 1 + 10 + 1 + 1, "{s2:?}");
    assert!(
        second.new_bytes * 50 < first.new_bytes,
        "second {} vs first {}",
        second.new_bytes,
        first.new_bytes
    );
    let w = tmp.path().join("w");
    let got = contents(&store, &second, &w);
    assert_eq!(got[0].0, "core-1.img");
    assert_eq!(got[0].1, core2);
    assert_eq!(got[1].0, "pages-1.img");
    assert_eq!(got[1].1, pages);
    assert_eq!(got[2].1, b"{}");
    // Nothing of the raw dump is left outside the packs.
    assert_eq!(names(&second.path), vec![MANIFEST_NAME.to_string()]);
    store.verify(&first).unwrap();
    let report = store.verify_all().unwrap();
    assert!(!report.damaged(), "{report:?}");
    assert_eq!(report.checkpoints.len(), 2);
}

#[test]
fn predump_layout_and_other_files_roundtrip() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ImageStore::open(&tmp.path().join("s")).unwrap();
    let st = store.begin().unwrap();
    let p = st.path().to_path_buf();
    fs::create_dir(p.join("pre")).unwrap();
    write(&p.join("pre/pages-1.img"), &job_pages(6, 30));
    write(&p.join("pre/pagemap-1.img"), b"pm");
    write(&p.join("pages-1.img"), &job_pages(7, 3));
    write(&p.join("supervise-files.json"), b"{\"a\":1}");
    write(&p.join("supervise-blob-0"), &noise(8, 200_000));
    write(&p.join("empty"), b"");
    std::os::unix::fs::symlink("pre", p.join("parent")).unwrap();
    let img = st.commit(meta()).unwrap();
    assert!(!p.exists());
    let w = tmp.path().join("w");
    let got = contents(&store, &img, &w);
    let names: Vec<_> = got.iter().map(|g| g.0.as_str()).collect();
    assert_eq!(
        names,
        [
            "empty",
            "pages-1.img",
            "parent",
            "pre/pagemap-1.img",
            "pre/pages-1.img",
            "supervise-blob-0",
            "supervise-files.json"
        ]
    );
    assert_eq!(got[0].1, b"");
    assert_eq!(got[2].1, b"pre");
    assert_eq!(got[4].1, job_pages(6, 30));
    assert_eq!(got[5].1, noise(8, 200_000));
    assert_eq!(
        fs::read(w.join("parent/pages-1.img")).unwrap(),
        job_pages(6, 30)
    );
    assert_eq!(mode(&w), 0o700);
    // A non-empty directory is refused and left alone.
    let e = store.materialise(&img, &w).unwrap_err().to_string();
    assert!(e.contains("not empty"), "{e}");
    assert!(w.join("parent/pages-1.img").exists());
    // An empty one (as scratch_dir makes) is written into.
    fs::remove_dir_all(&w).unwrap();
    fs::create_dir(&w).unwrap();
    store.materialise(&img, &w).unwrap();
    assert!(w.join("supervise-blob-0").exists());
}
