//! Hostile or careless input never panics: the job-file parser, the
//! recorded file state and the store lease are fed a small corpus
//! (tests/corpus/) plus proptest-generated and mutated inputs. Errors must
//! name the file.

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use supervise::config::JobConfig;

const FILE: &str = "/fuzz/job.toml";

fn corpus(dir: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let d = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(dir);
    let mut v: Vec<_> = std::fs::read_dir(&d)
        .unwrap()
        .flatten()
        .map(|e| (e.path(), std::fs::read(e.path()).unwrap()))
        .collect();
    v.sort();
    assert!(!v.is_empty());
    v
}

/// Parses and checks the contract: Ok, or an error naming the file.
fn parse(text: &str) {
    if let Err(e) = JobConfig::from_str_at(text, Path::new(FILE)) {
        let s = e.to_string();
        assert!(s.starts_with(FILE), "error does not name the file: {s}");
    }
}

#[test]
fn corpus_files_load_without_panic() {
    for (path, _) in corpus("config") {
        match JobConfig::load(&path) {
            Ok(c) => assert!(!c.name.is_empty()),
            Err(e) => {
                let s = e.to_string();
                assert!(
                    s.contains(path.file_name().unwrap().to_str().unwrap()),
                    "{s}"
                );
            }
        }
    }
    // The valid ones are valid.
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/config");
    JobConfig::load(&d.join("valid.toml")).unwrap();
    JobConfig::load(&d.join("cron.toml")).unwrap();
}

const KEYS: &[&str] = &[
    "name",
    "command",
    "attach",
    "cwd",
    "env",
    "stdout",
    "stderr",
    "state_dir",
    "every",
    "cron",
    "timezone",
    "dir",
    "keep",
    "shell_job",
    "tcp_established",
    "file_locks",
    "ext_unix_sk",
    "log_level",
    "network_lock",
    "timeout",
    "on",
    "max_restores",
    "window",
    "backoff",
    "backoff_max",
    "action",
    "checkpoint",
    "rollback",
    "snapshot",
    "append",
    "exclude",
    "signal",
    "requeue",
    "fence_wait",
    "evry",
    "",
];
const TABLES: &[&str] = &[
    "",
    "checkpoint",
    "restore",
    "shutdown",
    "files",
    "slurm",
    "env",
    "x",
];

fn value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        any::<i64>().prop_map(|i| i.to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        "[ -~]{0,20}".prop_map(|s| format!("{s:?}")),
        "[0-9]{1,25}(ns|ms|s|m|h|d| years)?".prop_map(|s| format!("{s:?}")),
        Just("\"USR1\"".to_string()),
        Just("\"1s\"".to_string()),
        Just("\"0 */15 * * * *\"".to_string()),
        Just("1e400".to_string()),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
            prop::collection::vec(("[a-z]{1,5}", inner), 0..3).prop_map(|v| {
                let body: Vec<String> = v.into_iter().map(|(k, x)| format!("{k} = {x}")).collect();
                format!("{{ {} }}", body.join(", "))
            }),
        ]
    })
}

fn document() -> impl Strategy<Value = String> {
    prop::collection::vec(
        (
            prop::sample::select(TABLES),
            prop::collection::vec((prop::sample::select(KEYS), value()), 0..5),
        ),
        0..5,
    )
    .prop_map(|tables| {
        let mut s = String::new();
        for (t, kvs) in tables {
            if !t.is_empty() {
                s.push_str(&format!("[{t}]\n"));
            }
            for (k, v) in kvs {
                s.push_str(&format!("{k} = {v}\n"));
            }
        }
        s
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_never_panics(s in "\\PC{0,200}") {
        parse(&s);
    }

    #[test]
    fn generated_job_files_never_panic(doc in document()) {
        parse(&doc);
    }

    #[test]
    fn mutated_corpus_never_panics(
        idx in 0usize..7,
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..8),
    ) {
        let files = corpus("config");
        let mut bytes = files[idx % files.len()].1.clone();
        for (at, b, op) in edits {
            let i = if bytes.is_empty() { 0 } else { at.index(bytes.len()) };
            match op {
                0 if !bytes.is_empty() => { bytes.remove(i); }
                1 => bytes.insert(i, b),
                _ if !bytes.is_empty() => bytes[i] = b,
                _ => bytes.push(b),
            }
        }
        parse(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn file_state_and_lease_readers_never_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..300),
        json in "\\{\"(version|epoch|files|owner)\": ?[-0-9a-z\\[\\]{}\",:]{0,60}\\}",
    ) {
        let t = tempfile::tempdir().unwrap();
        for b in [bytes.as_slice(), json.as_bytes()] {
            std::fs::write(t.path().join(supervise::files::STATE_FILE), b).unwrap();
            let _ = supervise::files::load(t.path());
            std::fs::write(t.path().join(".lease.json"), b).unwrap();
            let _ = supervise::fence::Fence::current(t.path());
        }
    }
}

/// A real two-checkpoint store in `dir`: page images, a small file, the
/// file-state record.
fn make_store(dir: &Path) {
    use supervise::store::{CheckpointMeta, ImageStore};
    let store = ImageStore::open(dir).unwrap();
    for round in 0u8..2 {
        let s = store.begin().unwrap();
        let mut pages = vec![0u8; 4096 * 4];
        for (i, b) in pages.iter_mut().enumerate() {
            *b = (i as u8)
                .wrapping_mul(31)
                .wrapping_add(round * (i % 4096 == 7) as u8);
        }
        std::fs::write(s.path().join("pages-1.img"), &pages).unwrap();
        std::fs::write(s.path().join("core-1.img"), b"core image bytes").unwrap();
        std::fs::write(
            s.path().join(supervise::files::STATE_FILE),
            b"{\"version\":1,\"files\":[]}",
        )
        .unwrap();
        s.commit(CheckpointMeta {
            job: "fuzz".into(),
            criu_version: "4.2.1".into(),
            duration_ms: 1,
            frozen_us: Some(1),
            pages_written: Some(4),
            root_pid: 1000,
            extra: Default::default(),
        })
        .unwrap();
    }
}

/// Every regular file under `dir` (manifests, pack indexes, packs).
fn store_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if !p
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(".lock")
            {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Damaged stores: manifests, pack indexes and packs with flipped,
    /// truncated, appended or replaced bytes. Listing, verifying,
    /// materialising and gc report errors; nothing panics.
    #[test]
    fn damaged_store_never_panics(
        which in any::<prop::sample::Index>(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 1..6),
    ) {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("images");
        make_store(&dir);
        let files = store_files(&dir);
        let victim = &files[which.index(files.len())];
        let mut bytes = std::fs::read(victim).unwrap();
        for (at, b, op) in edits {
            let i = if bytes.is_empty() { 0 } else { at.index(bytes.len()) };
            match op {
                0 if !bytes.is_empty() => bytes[i] ^= b | 1,
                1 => bytes.truncate(i),
                2 => bytes.insert(i, b),
                _ => bytes = b"{\"version\": 99}".to_vec(),
            }
        }
        std::fs::write(victim, &bytes).unwrap();
        let ro = supervise::store::ImageStore::open_read_only(&dir).unwrap();
        let _ = ro.verify_all();
        if let Ok(list) = ro.list() {
            for (k, img) in list.iter().enumerate() {
                let _ = ro.verify(img);
                let _ = ro.materialise(img, &t.path().join(format!("work-{k}")));
            }
        }
        if let Ok(rw) = supervise::store::ImageStore::open(&dir) {
            let _ = rw.gc();
            let _ = rw.retain(1);
        }
    }
}
