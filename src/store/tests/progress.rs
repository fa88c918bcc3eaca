//! The progress hook: every phase is started and finished, and its
//! advances add up to its total.

use super::*;

#[derive(Debug, Default)]
struct Recorder {
    events: Mutex<Vec<Event>>,
}

#[derive(Debug, Clone, PartialEq)]
enum Event {
    Start(String, u64),
    Advance(u64),
    Finish,
}

impl Progress for Recorder {
    fn start(&self, what: &str, total_bytes: u64) {
        self.events
            .lock()
            .unwrap()
            .push(Event::Start(what.into(), total_bytes));
    }
    fn advance(&self, bytes: u64) {
        self.events.lock().unwrap().push(Event::Advance(bytes));
    }
    fn finish(&self) {
        self.events.lock().unwrap().push(Event::Finish);
    }
}

impl Recorder {
    /// (phase, total, sum of advances, number of advances), checking that
    /// every phase is finished and nothing advances outside one; clears.
    fn phases(&self) -> Vec<(String, u64, u64, usize)> {
        let events = std::mem::take(&mut *self.events.lock().unwrap());
        let mut out: Vec<(String, u64, u64, usize)> = Vec::new();
        let mut open = false;
        for e in events {
            match e {
                Event::Start(what, total) => {
                    assert!(!open, "phase started inside a phase");
                    open = true;
                    out.push((what, total, 0, 0));
                }
                Event::Advance(n) => {
                    assert!(open, "advance outside a phase");
                    let p = out.last_mut().unwrap();
                    p.2 += n;
                    p.3 += 1;
                }
                Event::Finish => {
                    assert!(open, "finish without start");
                    open = false;
                }
            }
        }
        assert!(!open, "phase not finished");
        out
    }
}

/// A store with three checkpoints sharing pages, one large file (written
/// by several threads) and a symbolic link.
fn store_with_images(dir: &Path) -> (ImageStore, Arc<Recorder>, Vec<ImageInfo>) {
    let rec = Arc::new(Recorder::default());
    let store = ImageStore::open(dir).unwrap().with_progress(rec.clone());
    let mut pages = job_pages(7, 2500);
    let a = publish_files(&store, &[("pages-1.img", &pages), ("core-1.img", b"core")]);
    pages[4096 * 3] ^= 1;
    let b = publish_files(
        &store,
        &[("pages-1.img", &pages), ("inv", &noise(1, 70_001))],
    );
    let st = store.begin().unwrap();
    write(&st.path().join("pages-1.img"), &pages[..4096 * 10 + 17]);
    std::os::unix::fs::symlink("pages-1.img", st.path().join("link")).unwrap();
    let c = st.commit(meta()).unwrap();
    assert!(rec.phases().is_empty(), "commit reports nothing");
    (store, rec, vec![a, b, c])
}

fn logical(imgs: &[ImageInfo]) -> u64 {
    imgs.iter()
        .flat_map(|i| &i.manifest.files)
        .filter(|f| f.link.is_none())
        .map(|f| f.size)
        .sum()
}

#[test]
fn verify_all_advances_add_up_to_the_logical_size() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, rec, imgs) = store_with_images(&tmp.path().join("s"));
    let r = store.verify_all().unwrap();
    assert!(!r.damaged());
    let phases = rec.phases();
    assert_eq!(phases.len(), 1, "{phases:?}");
    let (what, total, sum, n) = &phases[0];
    assert_eq!(what, "verifying");
    assert_eq!(*total, logical(&imgs));
    assert_eq!(sum, total);
    // Batched: far fewer calls than chunks.
    assert!(
        *n <= (*total / crate::store::progress::BATCH_BYTES) as usize + 3,
        "{n} calls"
    );
}

#[test]
fn verify_all_of_a_damaged_store_still_adds_up() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");
    let (_, rec, imgs) = store_with_images(&dir);
    let pack = imgs[2]
        .manifest
        .stored
        .as_ref()
        .unwrap()
        .pack
        .clone()
        .unwrap();
    let pp = dir.join(PACKS_DIR).join(format!("{pack}.pack"));
    let mut bytes = fs::read(&pp).unwrap();
    bytes[8 + 100] ^= 0x01;
    fs::write(&pp, &bytes).unwrap();
    let store = ImageStore::open(&dir).unwrap().with_progress(rec.clone());
    assert!(store.verify_all().unwrap().damaged());
    let phases = rec.phases();
    assert_eq!(phases.len(), 1);
    assert_eq!((phases[0].1, phases[0].2), (logical(&imgs), logical(&imgs)));
}

#[test]
fn materialise_advances_add_up_to_the_image_size() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, rec, imgs) = store_with_images(&tmp.path().join("s"));
    for (k, img) in imgs.iter().enumerate() {
        let m = store
            .materialise(img, &tmp.path().join(format!("w{k}")))
            .unwrap();
        let phases = rec.phases();
        assert_eq!(phases.len(), 1, "{phases:?}");
        let (what, total, sum, _) = &phases[0];
        assert_eq!(what, "restoring");
        assert_eq!(*total, logical(std::slice::from_ref(img)));
        assert_eq!(sum, total);
        assert_eq!(m.bytes, *total);
    }
}

#[test]
fn gc_and_repair_phases_add_up() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, rec, imgs) = store_with_images(&tmp.path().join("s"));
    store.retain(2).unwrap();
    store.gc().unwrap();
    let phases = rec.phases();
    assert!(!phases.is_empty());
    assert_eq!(phases[0].0, "marking");
    assert_eq!(phases[0].1, logical(&imgs[1..]));
    for (what, total, sum, _) in &phases {
        assert_eq!(sum, total, "{what}");
    }
    let s = store.repair().unwrap();
    assert!(!s.verify.damaged());
    let phases = rec.phases();
    assert_eq!(
        phases.iter().map(|p| p.0.as_str()).collect::<Vec<_>>(),
        ["checking store files", "verifying"]
    );
    assert!(phases[0].1 > 0);
    for (what, total, sum, _) in &phases {
        assert_eq!(sum, total, "{what}");
    }
}

#[test]
fn gc_repacking_advances_add_up_to_the_copied_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let rec = Arc::new(Recorder::default());
    let store = ImageStore::open(&tmp.path().join("s"))
        .unwrap()
        .with_progress(rec.clone());
    let pages = job_pages(9, 100);
    publish_files(
        &store,
        &[("pages-1.img", &pages), ("junk", &noise(2, 2 << 20))],
    );
    let b = publish_files(&store, &[("pages-1.img", &pages)]);
    store.retain(1).unwrap();
    let r = store.gc().unwrap();
    assert_eq!(r.rewritten_packs, 1, "{r:?}");
    let phases = rec.phases();
    assert_eq!(
        phases.iter().map(|p| p.0.as_str()).collect::<Vec<_>>(),
        ["marking", "repacking"]
    );
    assert_eq!(phases[0].1, logical(std::slice::from_ref(&b)));
    assert!(phases[1].1 > 0 && phases[1].1 < 1 << 20, "{phases:?}");
    for (what, total, sum, _) in &phases {
        assert_eq!(sum, total, "{what}");
    }
}
