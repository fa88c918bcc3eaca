//! Ids, manifests, manifest versions and unreadable checkpoints.

use chrono::Utc;
use sha2::{Digest, Sha256};

use super::*;
use crate::store::format::{leading_seq, parse_id, valid_file_name};
use crate::store::ingest::chunk_size_for;

#[test]
fn id_parsing() {
    assert_eq!(parse_id("000001-20261128T132955Z"), Some(1));
    assert_eq!(parse_id("1234567-20261128T132955Z"), Some(1234567));
    assert_eq!(parse_id("00001-20261128T132955Z"), None);
    assert_eq!(parse_id("000001-20261328T132955Z"), None);
    assert_eq!(parse_id("000001-20261128T132955"), None);
    assert_eq!(parse_id("000001"), None);
    assert_eq!(leading_seq("000007"), Some(7));
    assert_eq!(leading_seq("000007-x"), Some(7));
    assert_eq!(leading_seq("0007x"), None);
    assert_eq!(leading_seq("lost+found"), None);
    assert!(valid_file_name("pre/pages-1.img"));
    assert!(!valid_file_name("a/b/c"));
    assert!(!valid_file_name("../x"));
    assert!(!valid_file_name(MANIFEST_NAME));
    assert_eq!(chunk_size_for("pre/pages-12.img"), PAGE_CHUNK);
    assert_eq!(chunk_size_for("pagemap-12.img"), FILE_CHUNK);
    assert_eq!(chunk_size_for("supervise-pages-1.img.json"), FILE_CHUNK);
    assert_eq!(chunk_size_for("supervise-file-0003"), PAGE_CHUNK);
    assert_eq!(chunk_size_for("supervise-files.json"), FILE_CHUNK);
}

#[test]
fn manifest_roundtrip() {
    let m = Manifest {
        version: 2,
        id: "000001-20261128T132955Z".into(),
        created: Utc::now(),
        meta: meta(),
        files: vec![FileEntry {
            name: "a".into(),
            size: 1,
            chunk: Some(4096),
            depth: Some(0),
            root: Some("00".repeat(32)),
            ..Default::default()
        }],
        stored: Some(StoredInfo::default()),
    };
    let s = serde_json::to_string(&m).unwrap();
    assert!(!s.contains("sha256") && !s.contains("link"), "{s}");
    let back: Manifest = serde_json::from_str(&s).unwrap();
    assert_eq!(back.created, m.created);
    assert_eq!(back.meta, m.meta);
    assert_eq!(back.files, m.files);
    // `extra` may be absent.
    let mut v: serde_json::Value = serde_json::from_str(&s).unwrap();
    v["meta"].as_object_mut().unwrap().remove("extra");
    let back: Manifest = serde_json::from_value(v).unwrap();
    assert_eq!(back.meta.extra, CheckpointExtra::default());
    // Keys written before `extra` was typed read back as such; unknown ones
    // are kept.
    let mut v: serde_json::Value = serde_json::from_str(&s).unwrap();
    v["meta"]["extra"] = serde_json::json!({
        "files": 3, "files_copied_bytes": 10,
        "tree": [{"pid": 7, "start_time": 9}], "later": true
    });
    let back: Manifest = serde_json::from_value(v).unwrap();
    assert_eq!(back.meta.extra.files, Some(3));
    assert_eq!(back.meta.extra.files_copied_bytes, Some(10));
    assert_eq!(back.meta.extra.tree[0].pid, 7);
    assert_eq!(back.meta.extra.other["later"], serde_json::json!(true));
    let again = serde_json::to_value(&back.meta.extra).unwrap();
    assert_eq!(again["later"], serde_json::json!(true));
    assert!(again.get("files_us").is_none());
}

#[test]
fn version1_checkpoints_still_work() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");
    let store = ImageStore::open(&dir).unwrap();
    let id = "000001-20260101T000000Z";
    let cp = dir.join(id);
    fs::create_dir(&cp).unwrap();
    write(&cp.join("pages-1.img"), b"v1 pages");
    let m = serde_json::json!({
        "version": 1, "id": id, "created": "2026-01-01T00:00:00Z",
        "meta": meta(),
        "files": [{"name": "pages-1.img", "size": 8,
            "sha256": hex::encode(Sha256::digest(b"v1 pages"))}]
    });
    write(&cp.join(MANIFEST_NAME), m.to_string().as_bytes());
    let v1 = store.get(id).unwrap();
    store.verify(&v1).unwrap();
    assert_eq!(
        contents(&store, &v1, &tmp.path().join("w"))[0].1,
        b"v1 pages"
    );
    let v2 = publish(&store, "x");
    assert_eq!(v2.seq, 2);
    assert!(store.gc().unwrap().refused.is_none());
    assert!(!store.verify_all().unwrap().damaged());
    write(&cp.join("pages-1.img"), b"v1 pagez");
    assert!(store.verify(&v1).is_err());
    assert_eq!(store.retain(1).unwrap(), vec![id.to_string()]);
}

#[test]
fn unknown_manifest_version_skipped_and_not_retained_away() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let store = ImageStore::open(&dir).unwrap();
    let old = publish(&store, "old");
    // Rewrite the oldest checkpoint's manifest as a future version.
    let mpath = old.path.join(MANIFEST_NAME);
    let mut v: serde_json::Value = serde_json::from_slice(&fs::read(&mpath).unwrap()).unwrap();
    v["version"] = 99.into();
    fs::write(&mpath, serde_json::to_vec(&v).unwrap()).unwrap();
    let a = publish(&store, "a");
    let b = publish(&store, "b");

    let (list, logs) = capture_logs(|| store.list().unwrap());
    let ids: Vec<_> = list.iter().map(|i| i.id.clone()).collect();
    assert_eq!(ids, vec![b.id.clone(), a.id.clone()]);
    assert!(
        logs.contains("WARN") && logs.contains("unknown version 99"),
        "{logs}"
    );
    assert!(logs.contains(&old.id), "{logs}");

    let removed = store.retain(1).unwrap();
    assert_eq!(removed, vec![a.id.clone()]);
    assert!(old.path.join(MANIFEST_NAME).exists());
    assert_eq!(names(&dir), vec![old.id.clone(), b.id.clone()]);
    // Its objects may still be needed by a newer supervise: gc keeps everything.
    let n = packs(&dir).len();
    assert!(store.gc().unwrap().refused.is_some());
    assert_eq!(packs(&dir).len(), n);
}

#[test]
fn missing_manifest_not_listed() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ImageStore::open(tmp.path()).unwrap();
    let a = publish(&store, "a");
    let fake = tmp.path().join("000009-20260101T000000Z");
    fs::create_dir(&fake).unwrap();
    write(&fake.join("pages-1.img"), b"x");
    let (list, logs) = capture_logs(|| store.list().unwrap());
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].id, a.id);
    assert!(logs.contains("000009-20260101T000000Z"), "{logs}");
    assert!(matches!(
        store.get("000009-20260101T000000Z"),
        Err(StoreError::Corrupt { .. })
    ));
    // gc deletes nothing while a checkpoint cannot be read.
    let r = store.gc().unwrap();
    assert!(r.refused.is_some(), "{r:?}");
    assert!(store.verify_all().unwrap().damaged());
    // It still counts for sequence numbers.
    assert_eq!(publish(&store, "b").seq, 10);
}
