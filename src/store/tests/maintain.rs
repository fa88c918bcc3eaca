//! Retention, gc and crash leftovers.

use super::*;
use crate::store::objects::ObjectDb;
use crate::store::pack::{PackWriter, TreeBuilder};

#[test]
fn staging_leftovers_removed_at_open_and_never_listed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let store = ImageStore::open(&dir).unwrap();
    publish(&store, "a");
    let st = store.begin().unwrap();
    write(&st.path().join("pages-1.img"), b"half");
    let staging_path = st.path().to_path_buf();
    std::mem::forget(st); // simulated crash: no Drop
    assert!(staging_path.exists());
    assert_eq!(store.list().unwrap().len(), 1);
    // gc never touches a staging directory (it may be a dump in progress).
    store.gc().unwrap();
    assert!(staging_path.exists());

    let (store, logs) = capture_logs(|| ImageStore::open(&dir).unwrap());
    assert!(!staging_path.exists());
    assert!(logs.contains(".staging-000002"), "{logs}");
    assert_eq!(store.list().unwrap().len(), 1);
    // Its sequence number is reused after the crash cleanup; that is fine
    // since it was never published.
    assert_eq!(publish(&store, "b").seq, 2);
}

#[test]
fn retention_then_gc_keeps_newest_restorable_and_frees_space() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");
    let store = ImageStore::open(&dir).unwrap();
    let n = 1000;
    let mut pages = job_pages(2, n);
    let mut imgs = Vec::new();
    for round in 0..5u64 {
        // Each round rewrites 300 pages: old packs become mostly dead.
        for i in 0..300 {
            let p = ((round as usize * 300 + i) % n) * 4096;
            pages[p..p + 4096].copy_from_slice(&noise(round * 7777 + i as u64, 4096));
        }
        imgs.push(publish_files(
            &store,
            &[("pages-7.img", &pages), ("mm-7.img", b"mm")],
        ));
    }
    let before = store.pack_usage().unwrap().0;
    let removed = store.retain(1).unwrap();
    assert_eq!(removed.len(), 4);
    let r = store.gc().unwrap();
    assert!(r.refused.is_none(), "{r:?}");
    assert!(r.removed_packs + r.rewritten_packs > 0, "{r:?}");
    let after = store.pack_usage().unwrap().0;
    assert!(after < before, "gc freed nothing: {before} -> {after}");
    // Close to the live data: the newest checkpoint's ~4 MiB (noise pages).
    assert!(after < (n as u64 * 4096) * 13 / 10, "{after}");
    let newest = store.list().unwrap().remove(0);
    assert_eq!(newest.id, imgs[4].id);
    let got = contents(&store, &newest, &tmp.path().join("w"));
    assert_eq!(got[1].1, pages);
    // A second gc finds nothing to do.
    let r2 = store.gc().unwrap();
    assert_eq!((r2.removed_packs, r2.rewritten_packs), (0, 0), "{r2:?}");
    assert!(!store.verify_all().unwrap().damaged());
}

#[test]
fn gc_removes_crash_leftovers_and_orphan_packs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");
    let store = ImageStore::open(&dir).unwrap();
    let img = publish_files(&store, &[("pages-1.img", &job_pages(5, 20))]);
    // A pack published by a commit that crashed before its manifest.
    {
        let db = ObjectDb::new(&dir.join(PACKS_DIR));
        let mut w = PackWriter::new(&dir.join(PACKS_DIR), None).unwrap();
        let mut t = TreeBuilder::new();
        t.push(&db, &mut w, &noise(77, 4096)).unwrap();
        w.finish().unwrap().unwrap();
    }
    write(&dir.join(PACKS_DIR).join(".tmp-1-0.pack"), b"partial");
    write(
        &dir.join(PACKS_DIR).join("0123.pack"),
        b"pack without index",
    );
    fs::create_dir(dir.join(".deleting-000000-20260101T000000Z")).unwrap();
    assert_eq!(packs(&dir).len(), 2 + 2 + 2);
    let r = store.gc().unwrap();
    assert_eq!(r.leftovers, 3, "{r:?}");
    assert_eq!(r.removed_packs, 1, "{r:?}");
    assert_eq!(packs(&dir).len(), 2, "{:?}", packs(&dir));
    assert_eq!(names(&dir), vec![img.id.clone()]);
    store.verify(&img).unwrap();
}

#[test]
fn retain_keeps_newest_and_ids_increase() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let store = ImageStore::open(&dir).unwrap();
    let all: Vec<_> = (0..5).map(|i| publish(&store, &i.to_string())).collect();
    assert!(matches!(
        store.retain(0),
        Err(StoreError::InvalidKeep { .. })
    ));
    let removed = store.retain(2).unwrap();
    assert_eq!(
        removed,
        vec![all[2].id.clone(), all[1].id.clone(), all[0].id.clone()]
    );
    let ids: Vec<_> = store.list().unwrap().into_iter().map(|i| i.id).collect();
    assert_eq!(ids, vec![all[4].id.clone(), all[3].id.clone()]);
    assert!(store.retain(2).unwrap().is_empty());
    assert_eq!(names(&dir), vec![all[3].id.clone(), all[4].id.clone()]);

    // Ids keep increasing after retention.
    assert_eq!(publish(&store, "x").seq, 6);
    store.retain(1).unwrap();
    assert_eq!(publish(&store, "y").seq, 7);

    // A `.deleting-*` leftover also counts for the next sequence number...
    let leftover = dir.join(".deleting-000042-20260101T000000Z");
    fs::create_dir(&leftover).unwrap();
    write(&leftover.join("pages-1.img"), b"x");
    let st = store.begin().unwrap();
    assert!(st.id().starts_with("000043-"));
    st.abort();
    assert_eq!(store.list().unwrap().len(), 2);

    // ...and is removed at the next open (simulated crash during retain).
    let (store, logs) = capture_logs(|| ImageStore::open(&dir).unwrap());
    assert!(!leftover.exists());
    assert!(logs.contains(".deleting-000042"), "{logs}");
    assert_eq!(store.list().unwrap().len(), 2);
}
