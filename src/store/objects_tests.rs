//! Unit tests of `objects.rs`.
use super::*;
use crate::store::pack::{PackWriter, TreeBuilder};
use crate::store::reader::Reader;

#[test]
fn pack_roundtrip_dedup_and_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let mut db = ObjectDb::new(tmp.path());
    db.refresh().unwrap();
    let mut w = PackWriter::new(tmp.path(), None).unwrap();
    let mut t = TreeBuilder::new();
    let mut data = Vec::new();
    for i in 0..300u32 {
        // Compressible and incompressible pages, with repeats.
        let page: Vec<u8> = if i % 3 == 0 {
            vec![(i % 7) as u8; 4096]
        } else {
            (0..4096u32)
                .map(|k| (k.wrapping_mul(2654435761).wrapping_add(i * 97) >> 13) as u8)
                .collect()
        };
        t.push(&db, &mut w, &page).unwrap();
        data.extend_from_slice(&page);
    }
    let (root, depth) = t.finish(&db, &mut w).unwrap();
    assert_eq!(depth, 2); // 300 leaves -> 5 nodes -> 1 root
    let p = w.finish().unwrap().unwrap();
    db.refresh().unwrap();
    assert_eq!(db.packs.len(), 1);
    assert_eq!(db.packs[0].objects, p.objects);
    let mut r = Reader::new(&db).unwrap();
    let leaves = r.leaves(&root, depth).unwrap();
    assert_eq!(leaves.len(), 300);
    let mut back = Vec::new();
    let items: Vec<(usize, Hash)> = leaves.into_iter().enumerate().collect();
    r.read_chunks(&items, &mut |_, c| {
        back.extend_from_slice(c);
        Ok(())
    })
    .unwrap();
    assert_eq!(back, data);

    // A second pack with the same data adds nothing.
    let mut w = PackWriter::new(tmp.path(), None).unwrap();
    let mut t = TreeBuilder::new();
    for c in data.chunks(4096) {
        t.push(&db, &mut w, c).unwrap();
    }
    assert_eq!(t.finish(&db, &mut w).unwrap(), (root, depth));
    assert!(w.finish().unwrap().is_none());
    let leftovers: Vec<_> = fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with(TMP_PREFIX))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn damaged_index_and_object_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let mut db = ObjectDb::new(tmp.path());
    let mut w = PackWriter::new(tmp.path(), None).unwrap();
    let a = vec![1u8; 5000];
    let ha = hash(&a);
    w.add(ha, &a).unwrap();
    let name = w.finish().unwrap().unwrap().name;
    db.refresh().unwrap();
    // Flip a byte of the stored object.
    let pp = tmp.path().join(format!("{name}.pack"));
    let mut bytes = fs::read(&pp).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    fs::write(&pp, &bytes).unwrap();
    let mut r = Reader::new(&db).unwrap();
    let mut out = Vec::new();
    let e = r.read(&ha, &mut out).unwrap_err();
    assert!(e.message().contains(&name), "{e}");
    // Damage the index: its objects disappear and it is reported.
    let ip = tmp.path().join(format!("{name}.idx"));
    let mut bytes = fs::read(&ip).unwrap();
    bytes[20] ^= 1;
    fs::write(&ip, &bytes).unwrap();
    let mut db = ObjectDb::new(tmp.path());
    db.refresh().unwrap();
    assert!(!db.contains(&ha));
    assert_eq!(db.bad_indexes.len(), 1);
    assert!(db.bad_indexes[0].1.contains("checksum"));
}
