//! Unit tests of the image store, one file per part of it; the helpers
//! they share are here.

mod format;
mod heal;
mod ingest;
mod maintain;
mod open;
mod progress;
mod scratch;
mod sealed;
mod stream;
mod verify;

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::*;

fn meta() -> CheckpointMeta {
    CheckpointMeta {
        job: "job".into(),
        criu_version: "4.0".into(),
        duration_ms: 12,
        frozen_us: Some(345),
        pages_written: None,
        root_pid: 1,
        extra: Default::default(),
    }
}

fn write(path: &Path, data: &[u8]) {
    fs::write(path, data).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o644)).unwrap();
}

/// Deterministic incompressible bytes.
fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Creates and commits a checkpoint with two files.
fn publish(store: &ImageStore, tag: &str) -> ImageInfo {
    let st = store.begin().unwrap();
    write(
        &st.path().join("pages-1.img"),
        format!("pages {tag}").as_bytes(),
    );
    write(&st.path().join("stats-dump"), &vec![7u8; 3000]);
    st.commit(meta()).unwrap()
}

/// Commits the given files.
fn publish_files(store: &ImageStore, files: &[(&str, &[u8])]) -> ImageInfo {
    let st = store.begin().unwrap();
    for (n, d) in files {
        if let Some((sub, _)) = n.split_once('/') {
            let _ = fs::create_dir(st.path().join(sub));
        }
        write(&st.path().join(n), d);
    }
    st.commit(meta()).unwrap()
}

/// Materialises `img` and returns name -> contents.
fn contents(store: &ImageStore, img: &ImageInfo, work: &Path) -> Vec<(String, Vec<u8>)> {
    let m = store.materialise(img, work).unwrap();
    let mut out = Vec::new();
    for f in &img.manifest.files {
        let p = m.path.join(&f.name);
        if f.link.is_some() {
            out.push((
                f.name.clone(),
                fs::read_link(&p)
                    .unwrap()
                    .into_os_string()
                    .into_encoded_bytes(),
            ));
        } else {
            assert_eq!(mode(&p), 0o600, "{}", f.name);
            out.push((f.name.clone(), fs::read(&p).unwrap()));
        }
    }
    out
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().mode() & 0o7777
}

/// Checkpoint ids and other non-hidden entries of the store, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n != PACKS_DIR && n != LOCK_NAME && n != MARKER_NAME)
        .collect();
    v.sort();
    v
}

fn packs(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir.join(PACKS_DIR))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

/// Runs `f` with a tracing subscriber, returning its result and the log output.
fn capture_logs<T>(f: impl FnOnce() -> T) -> (T, String) {
    #[derive(Clone)]
    struct W(Arc<Mutex<Vec<u8>>>);
    impl Write for W {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let buf = Arc::new(Mutex::new(Vec::new()));
    let w = W(buf.clone());
    let sub = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .with_writer(move || w.clone())
        .finish();
    let r = tracing::subscriber::with_default(sub, f);
    let out = String::from_utf8(buf.lock().unwrap().clone()).unwrap();
    (r, out)
}

/// Pages of a job: `n` pages, some zero, the rest noise.
fn job_pages(seed: u64, n: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(n * 4096);
    for i in 0..n {
        if i % 5 == 0 {
            v.extend_from_slice(&[0u8; 4096]);
        } else {
            v.extend_from_slice(&noise(seed * 100_000 + i as u64, 4096));
        }
    }
    v
}
