//! Damaged store files: reads repair them from parity or the second copy.

use super::*;
use proptest::prelude::*;

fn private_dir() -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    fs::set_permissions(t.path(), fs::Permissions::from_mode(0o700)).unwrap();
    t
}

/// A sealed store with parity, optionally a second copy.
fn store(tmp: &Path, copy: bool) -> (ImageStore, StoreOptions) {
    let mut o = StoreOptions::new(tmp.join("keys").join("store.key"));
    if copy {
        o.copy_dir = Some(tmp.join("copy"));
    }
    (ImageStore::open_with(&tmp.join("images"), &o).unwrap(), o)
}

/// Two checkpoints of a job-like image; returns the newest and its data.
fn two_images(s: &ImageStore) -> (ImageInfo, Vec<u8>) {
    let mut pages = job_pages(5, 300);
    publish_files(
        s,
        &[("pages-1.img", &pages), ("core-1.img", &noise(9, 9000))],
    );
    pages[4096 * 17..4096 * 18].copy_from_slice(&noise(77, 4096));
    let img = publish_files(
        s,
        &[("pages-1.img", &pages), ("core-1.img", &noise(9, 9000))],
    );
    (img, pages)
}

#[derive(Debug, Clone, Copy)]
enum Damage {
    Flip(u64),
    Zero(u64),
    Truncate(u64),
}

fn damage(path: &Path, d: Damage) {
    let mut b = fs::read(path).unwrap();
    let n = b.len() as u64;
    match d {
        Damage::Flip(o) => b[(o % n) as usize] ^= 0x20,
        Damage::Zero(o) => {
            let at = (o % n) as usize;
            let end = (at + 4096).min(b.len());
            b[at..end].fill(0);
        }
        Damage::Truncate(t) => b.truncate((n - 1 - t % (n / 20).max(1)) as usize),
    }
    fs::write(path, &b).unwrap();
}

/// The newest image's pack, index and manifest.
fn files_of(s: &ImageStore, img: &ImageInfo) -> [PathBuf; 3] {
    let pack = img.manifest.stored.as_ref().unwrap().pack.clone().unwrap();
    let p = s.dir().join(PACKS_DIR);
    [
        p.join(format!("{pack}.pack")),
        p.join(format!("{pack}.idx")),
        img.path.join(MANIFEST_SEALED_NAME),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn one_damaged_region_in_any_file_is_repaired(
        which in 0usize..3,
        kind in 0u8..3,
        at in any::<u64>(),
    ) {
        let tmp = private_dir();
        let (s, _) = store(tmp.path(), false);
        let (img, pages) = two_images(&s);
        let first_pack = {
            let list = s.list().unwrap();
            list[1].manifest.stored.as_ref().unwrap().pack.clone().unwrap()
        };
        // The older image's (big) pack holds most of the newest image too.
        let mut targets = files_of(&s, &img).to_vec();
        targets.push(s.dir().join(PACKS_DIR).join(format!("{first_pack}.pack")));
        let d = match kind { 0 => Damage::Flip(at), 1 => Damage::Zero(at), _ => Damage::Truncate(at) };
        let target = &targets[if which == 0 && at % 2 == 0 { 3 } else { which }];
        damage(target, d);
        // A fresh reader (nothing cached) sees the damage.
        let ro = ImageStore::open_read_only_with(s.dir(), &StoreOptions::new(tmp.path().join("keys/store.key"))).unwrap();
        let list = ro.list().unwrap();
        prop_assert_eq!(&list[0].id, &img.id);
        let work = tmp.path().join("w");
        let got = contents(&ro, &list[0], &work);
        prop_assert_eq!(&got[1].1, &pages);
        ro.verify(&list[0]).unwrap();
    }
}

#[test]
fn lost_pack_is_read_from_the_second_copy() {
    let tmp = private_dir();
    let (s, o) = store(tmp.path(), true);
    let (img, pages) = two_images(&s);
    for p in files_of(&s, &img) {
        assert!(tmp
            .path()
            .join("copy")
            .join(p.strip_prefix(s.dir()).unwrap())
            .exists());
    }
    // Lose the big first pack, sidecar included.
    let first = s.list().unwrap()[1]
        .manifest
        .stored
        .clone()
        .unwrap()
        .pack
        .unwrap();
    let pp = s.dir().join(PACKS_DIR).join(format!("{first}.pack"));
    fs::remove_file(&pp).unwrap();
    fs::remove_file(parity::par_path(&pp)).unwrap();
    let ro = ImageStore::open_read_only_with(s.dir(), &o).unwrap();
    // (verify reads on this thread: the log capture sees it; materialise
    // reads on worker threads.)
    let (r, logs) = capture_logs(|| ro.verify(&ro.list().unwrap()[0]));
    r.unwrap();
    assert!(
        logs.contains("second copy") && logs.contains(&first),
        "{logs}"
    );
    let got = contents(&ro, &ro.list().unwrap()[0], &tmp.path().join("w"));
    assert_eq!(got[1].1, pages);
    // Lose the newest image's index and manifest too: still there.
    let [_, idx, man] = files_of(&s, &img);
    fs::remove_file(&idx).unwrap();
    fs::remove_file(&man).unwrap();
    let ro = ImageStore::open_read_only_with(s.dir(), &o).unwrap();
    let list = ro.list().unwrap();
    assert_eq!(list[0].id, img.id);
    assert_eq!(contents(&ro, &list[0], &tmp.path().join("w2"))[1].1, pages);
    // Retention and gc keep the copy in step.
    let third = publish(&s, "c");
    s.retain(1).unwrap();
    s.gc().unwrap();
    let copy = tmp.path().join("copy");
    assert!(copy.join(&third.id).exists());
    assert!(!copy.join(&img.id).exists());
}

#[test]
fn without_parity_or_copy_damage_is_refused_and_marked_for_restoring() {
    let tmp = private_dir();
    let mut o = StoreOptions::new(tmp.path().join("keys").join("store.key"));
    o.parity = false;
    let s = ImageStore::open_with(&tmp.path().join("images"), &o).unwrap();
    let data = job_pages(8, 40);
    let img = publish_files(&s, &[("pages-1.img", &data)]);
    let [pack, _, _] = files_of(&s, &img);
    damage(&pack, Damage::Flip(5000));
    let e = s
        .materialise(&img, &tmp.path().join("w"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not repairable"), "{e}");
    // The next checkpoint of the same data stores the damaged object
    // afresh, and the new image reads back whole.
    let img2 = publish_files(&s, &[("pages-1.img", &data)]);
    assert!(img2.manifest.stored.as_ref().unwrap().new_objects >= 1);
    assert_eq!(contents(&s, &img2, &tmp.path().join("w2"))[0].1, data);
}

#[test]
fn running_out_of_descriptors_is_not_damage() {
    use std::sync::atomic::Ordering;
    let tmp = private_dir();
    let mut o = StoreOptions::new(tmp.path().join("keys").join("store.key"));
    o.parity = false;
    let s = ImageStore::open_with(&tmp.path().join("images"), &o).unwrap();
    let data = job_pages(8, 40);
    let img = publish_files(&s, &[("pages-1.img", &data)]);
    // Every pack open fails with EMFILE, as when a flood holds every
    // descriptor of the process.
    s.db().unwrap().fail_opens.store(1000, Ordering::SeqCst);
    let e = s.materialise(&img, &tmp.path().join("w")).unwrap_err();
    assert!(e.is_resource(), "{e}");
    assert!(!matches!(e, StoreError::Corrupt { .. }), "{e}");
    let e = s.verify(&img).unwrap_err();
    assert!(e.is_resource(), "{e}");
    assert!(s.verify_all().unwrap_err().is_resource());
    let db = s.db().unwrap();
    assert!(db.bad_objects().is_empty(), "nothing is marked bad");
    db.fail_opens.store(0, Ordering::SeqCst);
    drop(db);
    // Descriptors back: the same image reads back whole, and the next
    // checkpoint of the same data stores nothing again.
    assert_eq!(contents(&s, &img, &tmp.path().join("w2"))[0].1, data);
    let img2 = publish_files(&s, &[("pages-1.img", &data)]);
    assert_eq!(img2.manifest.stored.as_ref().unwrap().new_objects, 0);
}

#[test]
fn parity_overhead_per_later_checkpoint() {
    let tmp = private_dir();
    let (s, _) = store(tmp.path(), false);
    let (img, _) = two_images(&s);
    let st = img.manifest.stored.as_ref().unwrap();
    // new_bytes counts pack, index, manifest and their sidecars.
    assert!(img.new_bytes > st.pack_bytes, "{img:?}");
}

#[test]
fn repair_rewrites_damaged_files_and_drops_what_it_cannot_repair() {
    let tmp = private_dir();
    let (s, o) = store(tmp.path(), true);
    let (img, pages) = two_images(&s);
    let [pack, idx, man] = files_of(&s, &img);
    let pristine: Vec<Vec<u8>> = [&pack, &idx, &man]
        .iter()
        .map(|p| fs::read(p).unwrap())
        .collect();
    damage(&pack, Damage::Zero(100));
    damage(&idx, Damage::Flip(7));
    fs::remove_file(&man).unwrap();
    // The second copy of the index is lost too: rewritten from the good one.
    let alt_idx = tmp
        .path()
        .join("copy")
        .join(idx.strip_prefix(s.dir()).unwrap());
    fs::remove_file(&alt_idx).unwrap();
    let sum = s.repair().unwrap();
    assert!(!sum.verify.damaged(), "{sum:?}");
    assert!(sum.unrepaired.is_empty(), "{sum:?}");
    for (p, want) in [&pack, &idx, &man].iter().zip(&pristine) {
        assert_eq!(&fs::read(p).unwrap(), want, "{}", p.display());
    }
    assert_eq!(fs::read(&alt_idx).unwrap(), pristine[1]);
    let again = s.repair().unwrap();
    assert!(!again.changed(), "{again:?}");
    let ro = ImageStore::open_read_only_with(s.dir(), &o).unwrap();
    assert_eq!(contents(&ro, &img, &tmp.path().join("w"))[1].1, pages);

    // No parity, no copy: the damaged object is dropped from its index and
    // the next checkpoint stores it again.
    let tmp = private_dir();
    let mut o = StoreOptions::new(tmp.path().join("keys").join("store.key"));
    o.parity = false;
    let s = ImageStore::open_with(&tmp.path().join("images"), &o).unwrap();
    let data = job_pages(8, 40);
    let img = publish_files(&s, &[("pages-1.img", &data)]);
    let [pack, _, _] = files_of(&s, &img);
    damage(&pack, Damage::Flip(9000));
    let s2 = ImageStore::open_with(s.dir(), &o).unwrap();
    let sum = s2.repair().unwrap();
    assert!(sum.dropped_objects >= 1, "{sum:?}");
    assert!(sum.verify.damaged());
    // The first handle (a running supervise) notices the rewritten index.
    let img2 = publish_files(&s, &[("pages-1.img", &data)]);
    assert!(img2.manifest.stored.as_ref().unwrap().new_objects >= 1);
    assert_eq!(contents(&s, &img2, &tmp.path().join("w"))[0].1, data);
}
