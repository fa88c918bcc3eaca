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
