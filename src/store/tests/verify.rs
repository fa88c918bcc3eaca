//! Damage found by verification and materialising.

use std::fs::OpenOptions;

use super::*;

#[test]
fn flipped_byte_is_detected_and_older_checkpoint_still_restores() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");
    let store = ImageStore::open(&dir).unwrap();
    let mut pages = job_pages(3, 200);
    let old = publish_files(&store, &[("pages-1.img", &pages)]);
    pages[4096 * 17 + 5] ^= 1;
    let new = publish_files(&store, &[("pages-1.img", &pages)]);
    let pack = new.manifest.stored.as_ref().unwrap().pack.clone().unwrap();
    let pp = dir.join(PACKS_DIR).join(format!("{pack}.pack"));
    let mut bytes = fs::read(&pp).unwrap();
    // The first object after the magic is the changed page.
    bytes[8 + 100] ^= 0x01;
    fs::write(&pp, &bytes).unwrap();
    let w = tmp.path().join("w");
    let err = store.materialise(&new, &w).unwrap_err();
    let s = err.to_string();
    assert!(
        matches!(&err, StoreError::Corrupt { id, .. } if *id == new.id),
        "{s}"
    );
    assert!(
        s.contains("pages-1.img") && s.contains("chunk 17") && s.contains(&pack),
        "{s}"
    );
    assert!(
        !w.exists(),
        "a failed materialisation leaves nothing behind"
    );
    assert!(store.verify(&new).is_err());
    store.verify(&old).unwrap();
    let got = contents(&store, &old, &w);
    pages[4096 * 17 + 5] ^= 1;
    assert_eq!(got[0].1, pages);
    let report = store.verify_all().unwrap();
    assert!(report.damaged());
    let bad: Vec<_> = report.checkpoints.iter().filter(|c| c.1.is_err()).collect();
    assert_eq!(bad.len(), 1);
    assert_eq!(bad[0].0, new.id);
}

#[test]
fn damaged_pack_truncated_or_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");
    let store = ImageStore::open(&dir).unwrap();
    let img = publish_files(&store, &[("pages-1.img", &job_pages(4, 50))]);
    let pack = img.manifest.stored.as_ref().unwrap().pack.clone().unwrap();
    let pp = dir.join(PACKS_DIR).join(format!("{pack}.pack"));
    let f = OpenOptions::new().write(true).open(&pp).unwrap();
    f.set_len(1000).unwrap();
    let err = store.verify(&img).unwrap_err().to_string();
    assert!(err.contains("missing") || err.contains("pack"), "{err}");
    let report = store.verify_all().unwrap();
    assert!(
        report.bad_indexes.iter().any(|(n, _)| *n == pack),
        "{report:?}"
    );
    fs::remove_file(&pp).unwrap();
    assert!(store.materialise(&img, &tmp.path().join("w")).is_err());
}
