//! Streamed files: committed with the staged ones, read back byte-exact,
//! whether batches waited in memory or went through the spill file.

use super::*;

fn streamed(store: &ImageStore, cap: usize, files: &[(&str, Vec<u8>)]) -> (ImageInfo, u64) {
    let st = store.begin().unwrap();
    write(&st.path().join("core-1.img"), b"core");
    let mut s = st.stream().unwrap().with_max_in_flight(cap);
    for (name, data) in files {
        s.begin_file(name).unwrap();
        // In uneven pieces, as a socket delivers them.
        for piece in data.chunks(1_000_003) {
            s.write(piece).unwrap();
        }
    }
    s.end_file().unwrap();
    let spilled = s.spilled;
    (st.commit_with(meta(), Some(s)).unwrap(), spilled)
}

#[test]
fn streamed_files_round_trip_in_memory_and_through_the_spill_file() {
    for cap in [usize::MAX, 0] {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(&dir.path().join("images")).unwrap();
        let a = noise(1, 9 << 20);
        let b = noise(2, 4096 * 3);
        let (img, spilled) = streamed(
            &store,
            cap,
            &[("pages-1.img", a.clone()), ("pages-2.img", b.clone())],
        );
        if cap == 0 {
            assert_eq!(spilled, (a.len() + b.len()) as u64, "everything spilled");
        } else {
            assert_eq!(spilled, 0);
        }
        let names: Vec<&str> = img.manifest.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["core-1.img", "pages-1.img", "pages-2.img"]);
        let out = dir.path().join("out");
        store.materialise(&img, &out).unwrap();
        assert_eq!(fs::read(out.join("pages-1.img")).unwrap(), a);
        assert_eq!(fs::read(out.join("pages-2.img")).unwrap(), b);
        // No spill file is left behind.
        let left: Vec<_> = fs::read_dir(dir.path().join("images/packs"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains("spill"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        // A second checkpoint of the same pages stores next to nothing.
        let (again, _) = streamed(
            &store,
            cap,
            &[("pages-1.img", a.clone()), ("pages-2.img", b)],
        );
        assert!(again.new_bytes < 64 << 10, "{}", again.new_bytes);
        // Random access reads of a streamed file.
        let r = store.file_reader(&again, "pages-1.img").unwrap();
        let mut got = Vec::new();
        r.read_at(4096 * 700, 4096 * 300, &mut got).unwrap();
        assert_eq!(got, a[4096 * 700..4096 * 1000]);
    }
}

#[test]
fn a_file_streamed_twice_or_also_staged_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(&dir.path().join("images")).unwrap();
    let st = store.begin().unwrap();
    let mut s = st.stream().unwrap();
    s.begin_file("pages-1.img").unwrap();
    assert!(s.begin_file("pages-1.img").is_err());
    write(&st.path().join("pages-1.img"), b"staged");
    assert!(st.commit_with(meta(), Some(s)).is_err());
}

/// A sealing store (parity off), in a private temp dir.
fn sealed_store() -> (tempfile::TempDir, ImageStore) {
    let tmp = tempfile::tempdir().unwrap();
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o700)).unwrap();
    let keys = tmp.path().join("keys");
    fs::create_dir(&keys).unwrap();
    fs::set_permissions(&keys, fs::Permissions::from_mode(0o700)).unwrap();
    let mut o = StoreOptions::new(keys.join("store.key"));
    o.parity = false;
    let store = ImageStore::open_with(&tmp.path().join("images"), &o).unwrap();
    assert!(store.seals());
    (tmp, store)
}

/// Our open descriptors on deleted files in `dir` (the unnamed spill
/// file): their `/proc/self/fd` paths.
fn unnamed_files_in(dir: &Path) -> Vec<std::path::PathBuf> {
    let dir = fs::canonicalize(dir).unwrap();
    fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter(|e| {
            fs::read_link(e.path()).is_ok_and(|t| {
                let t = t.to_string_lossy().into_owned();
                t.starts_with(&*dir.to_string_lossy()) && t.ends_with(" (deleted)")
            })
        })
        .map(|e| e.path())
        .collect()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn sealed_spill_round_trips_has_no_name_and_holds_no_plaintext() {
    let (tmp, store) = sealed_store();
    let packs = tmp.path().join("images/packs");
    let a = noise(3, 9 << 20);
    let st = store.begin().unwrap();
    // Hold the worker (it takes the object index for every batch) so the
    // spilled batches are all in the file when it is looked at.
    let db = store.db.lock().unwrap();
    let mut s = st.stream().unwrap().with_max_in_flight(0);
    s.begin_file("pages-1.img").unwrap();
    s.write(&a).unwrap();
    s.end_file().unwrap();
    // (Checked with the index released: a panic while it is held would
    // wait for the worker forever.)
    let names: Vec<String> = fs::read_dir(&packs)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let open = unnamed_files_in(&packs);
    let contents: Vec<io::Result<Vec<u8>>> = open.iter().map(fs::read).collect();
    drop(db);
    assert_eq!(s.spilled, a.len() as u64);
    // Nothing named: no new entry in packs/ but the pack being written.
    assert!(
        names
            .iter()
            .all(|n| n.starts_with(".tmp-") && !n.contains("spill")),
        "{names:?}"
    );
    // The unnamed file holds the batches sealed: no page of them in clear.
    assert!(!open.is_empty(), "no unnamed spill file open");
    for bytes in contents {
        let bytes = bytes.unwrap();
        assert!(bytes.len() >= a.len(), "{} bytes", bytes.len());
        for page in [0, 700, 2303] {
            assert!(!contains(&bytes, &a[page * 4096..page * 4096 + 64]));
        }
    }
    let img = st.commit_with(meta(), Some(s)).unwrap();
    let out = tmp.path().join("out");
    store.materialise(&img, &out).unwrap();
    assert_eq!(fs::read(out.join("pages-1.img")).unwrap(), a);
    // Gone with its last descriptor.
    assert!(unnamed_files_in(&packs).is_empty());
}

#[test]
fn a_tampered_spilled_batch_fails_the_checkpoint() {
    let (tmp, store) = sealed_store();
    let packs = tmp.path().join("images/packs");
    let st = store.begin().unwrap();
    let db = store.db.lock().unwrap();
    let mut s = st.stream().unwrap().with_max_in_flight(0);
    s.begin_file("pages-1.img").unwrap();
    s.write(&noise(4, 12 << 20)).unwrap();
    s.end_file().unwrap();
    // The worker has read at most the first batch (it waits for the
    // index): flip a byte of the third. (No assertion while the index is
    // held: a panic would wait for the worker forever.)
    let open = unnamed_files_in(&packs);
    let tampered = (|| -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new().read(true).write(true).open(
            open.first()
                .ok_or_else(|| io::Error::other("no spill file"))?,
        )?;
        let at = 2 * ((4 << 20) + 16) + 1000;
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at)?;
        f.write_all_at(&[b[0] ^ 0x40], at)
    })();
    drop(db);
    // (Two descriptors: the writer's and the worker's duplicate.)
    assert!(!open.is_empty());
    tampered.unwrap();
    let e = st.commit_with(meta(), Some(s)).unwrap_err().to_string();
    assert!(
        e.contains("spilled batch 2") && e.contains("does not authenticate"),
        "{e}"
    );
    assert!(store.list().unwrap().is_empty());
}

#[test]
fn spill_file_unit_round_trip_tamper_and_fallback_name() {
    use crate::store::spill;
    for (seal, named_first) in [(true, false), (true, true), (false, false)] {
        let tmp = tempfile::tempdir().unwrap();
        let (mut w, r) = spill::create_with(tmp.path(), seal, named_first).unwrap();
        // Nothing named, even on the create-and-unlink path.
        assert!(fs::read_dir(tmp.path()).unwrap().next().is_none());
        let batches: Vec<Vec<u8>> = (0..3).map(|i| noise(10 + i, 4096 * 5)).collect();
        let mut at = Vec::new();
        for b in &batches {
            let mut v = b.clone();
            at.push(w.append(&mut v).unwrap());
            assert_eq!(v.len() > b.len(), seal, "sealed batches carry a tag");
            assert_eq!(v != *b, seal, "sealed batches are not in clear");
        }
        let mut out = Vec::new();
        for (b, x) in batches.iter().zip(&at).rev() {
            r.read(*x, &mut out).unwrap();
            assert_eq!(&out, b);
        }
        if seal {
            use std::os::unix::fs::FileExt;
            w.file()
                .write_all_at(&[0xff, 0xee], at[1].off + 10)
                .unwrap();
            let e = r.read(at[1], &mut out).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData);
            assert!(e.to_string().contains("spilled batch 1"), "{e}");
            // A batch read at another's place does not open either.
            let swapped = spill::SpilledBatch { n: 2, ..at[0] };
            assert!(r.read(swapped, &mut out).is_err());
            r.read(at[0], &mut out).unwrap();
        }
    }
}
