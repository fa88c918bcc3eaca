//! Hostile or careless input never panics: the job-file parser, the
//! recorded file state and the store lease are fed a small corpus
//! (tests/corpus/) plus proptest-generated and mutated inputs. Errors must
//! name the file.

mod common;

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
    "ghost_limit",
    "skip_in_flight",
    "link_remap",
    "tcp_close",
    "criu_opts",
    "manage_cgroups",
    "external",
    "pid",
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
    "checkpoint.criu_opts",
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

/// What is put in place of a store file.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Hostile {
    Fifo,
    DevZero,
    LinkToDir,
    Dangling,
    /// A sparse regular file (a directory's place: a file) far beyond any
    /// limit.
    Huge,
}

const HOSTILE: [Hostile; 5] = [
    Hostile::Fifo,
    Hostile::DevZero,
    Hostile::LinkToDir,
    Hostile::Dangling,
    Hostile::Huge,
];

/// Upper bound for any operation on a hostile store.
const BOUND: std::time::Duration = std::time::Duration::from_secs(20);

/// A version 1 checkpoint (whole files + SHA-256), as earlier releases
/// wrote them.
fn add_v1_image(dir: &Path, id: &str) {
    use sha2::Digest;
    let d = dir.join(id);
    std::fs::create_dir(&d).unwrap();
    let data = b"a version 1 core image";
    std::fs::write(d.join("core-1.img"), data).unwrap();
    let m = serde_json::json!({
        "version": 1,
        "id": id,
        "created": "2030-01-01T00:00:00Z",
        "meta": {"job": "fuzz", "criu_version": "3.17", "duration_ms": 1,
                 "frozen_us": null, "pages_written": null, "root_pid": 1000},
        "files": [{"name": "core-1.img", "size": data.len(),
                   "sha256": hex::encode(sha2::Sha256::digest(data))}],
    });
    std::fs::write(d.join("MANIFEST.json"), serde_json::to_vec(&m).unwrap()).unwrap();
}

/// Replaces `victim` (file or directory) by `how`.
fn plant(victim: &Path, how: Hostile, some_dir: &Path) {
    match std::fs::symlink_metadata(victim) {
        Ok(md) if md.is_dir() => std::fs::remove_dir_all(victim).unwrap(),
        Ok(_) => std::fs::remove_file(victim).unwrap(),
        Err(_) => {}
    }
    match how {
        Hostile::Fifo => {
            nix::unistd::mkfifo(victim, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap()
        }
        Hostile::DevZero => std::os::unix::fs::symlink("/dev/zero", victim).unwrap(),
        Hostile::LinkToDir => std::os::unix::fs::symlink(some_dir, victim).unwrap(),
        Hostile::Dangling => std::os::unix::fs::symlink("/nonexistent/x", victim).unwrap(),
        Hostile::Huge => std::fs::File::create(victim)
            .unwrap()
            .set_len(1 << 40)
            .unwrap(),
    }
}

/// Runs `f` on a thread; panics if it takes longer than [`BOUND`] (the
/// thread is left behind then) or panics.
fn bounded<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
    });
    match rx.recv_timeout(BOUND) {
        Ok(Ok(v)) => v,
        Ok(Err(_)) => panic!("{what} panicked"),
        Err(_) => panic!("{what} did not return within {BOUND:?}"),
    }
}

/// Every library operation on the store; returns everything they said
/// (errors, damage reports).
fn library_ops(dir: PathBuf, work: PathBuf) -> String {
    use supervise::store::ImageStore;
    let mut said = Vec::new();
    match ImageStore::open_read_only(&dir) {
        Err(e) => said.push(e.to_string()),
        Ok(ro) => {
            match ro.list() {
                Err(e) => said.push(e.to_string()),
                Ok(list) => {
                    for (k, img) in list.iter().enumerate() {
                        if let Err(e) = ro.materialise(img, &work.join(format!("m{k}"))) {
                            said.push(e.to_string());
                        }
                    }
                }
            }
            match ro.verify_all() {
                Err(e) => said.push(e.to_string()),
                Ok(r) => {
                    for (id, why) in r.unreadable {
                        said.push(format!("{id}: {why}"));
                    }
                    for (p, why) in r.bad_indexes {
                        said.push(format!("{p}: {why}"));
                    }
                    for (id, res) in r.checkpoints {
                        if let Err(why) = res {
                            said.push(format!("{id}: {why}"));
                        }
                    }
                }
            }
            if let Err(e) = ro.gc() {
                said.push(e.to_string());
            }
        }
    }
    match ImageStore::open(&dir) {
        Err(e) => said.push(e.to_string()),
        Ok(rw) => {
            if let Err(e) = rw.gc() {
                said.push(e.to_string());
            }
        }
    }
    if let Err(e) = supervise::fence::Fence::current(&dir) {
        said.push(e.to_string());
    }
    said.join("\n")
}

/// `supervise ARGS job` with at most 2 GiB of address space, killed after
/// [`BOUND`]: (exit code, output); panics if it hung or died by a signal.
fn cli(args: &[&str], job: &Path) -> (i32, String) {
    use std::os::unix::process::ExitStatusExt;
    let out = tempfile::NamedTempFile::new().unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_supervise"));
    cmd.args(args)
        .arg(job)
        .stdin(std::process::Stdio::null())
        .stdout(out.reopen().unwrap())
        .stderr(out.reopen().unwrap());
    common::cap_memory(&mut cmd);
    let t0 = std::time::Instant::now();
    let mut child = cmd.spawn().unwrap();
    let st = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t0.elapsed() > BOUND {
            let _ = child.kill();
            let _ = child.wait();
            panic!("supervise {args:?} did not return within {BOUND:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    let text = std::fs::read_to_string(out.path()).unwrap_or_default();
    assert!(
        st.signal().is_none(),
        "supervise {args:?} died by signal {:?}:\n{text}",
        st.signal()
    );
    (st.code().unwrap(), text)
}

/// FIFOs, symlinks (to /dev/zero, to a directory, dangling) and huge
/// sparse files in place of every kind of store file and directory:
/// every library operation and the real `images`, `verify` and `gc`
/// return within a bound, nothing panics, and what fails names the file.
#[test]
fn hostile_store_files_never_hang_allocate_or_panic() {
    let t = tempfile::tempdir().unwrap();
    let pristine = t.path().join("pristine");
    make_store(&pristine);
    add_v1_image(&pristine, "000003-20300101T000000Z");
    std::fs::write(
        pristine.join(".lease.json"),
        br#"{"epoch":1,"owner":{"slurm_job_id":"1","node":"n1","restart_count":0,"host":"h","pid":1}}"#,
    )
    .unwrap();
    std::fs::write(pristine.join(".lease.lock"), b"").unwrap();
    let ro = supervise::store::ImageStore::open_read_only(&pristine).unwrap();
    let list = ro.list().unwrap();
    assert_eq!(list.len(), 3);
    let v2 = list.iter().find(|i| i.manifest.version == 2).unwrap();
    let pack = v2.manifest.stored.as_ref().unwrap().pack.clone().unwrap();
    let rel_victims: Vec<String> = vec![
        format!("{}/MANIFEST.json", v2.id),
        "000003-20300101T000000Z/MANIFEST.json".into(),
        "000003-20300101T000000Z/core-1.img".into(),
        format!("packs/{pack}.idx"),
        format!("packs/{pack}.pack"),
        ".lock".into(),
        ".supervise-store".into(),
        ".lease.json".into(),
        ".lease.lock".into(),
        "packs".into(),
        v2.id.clone(),
    ];
    let elsewhere = t.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::fs::write(elsewhere.join("secret"), b"not a store file").unwrap();
    let mut case = 0;
    for rel in &rel_victims {
        for how in HOSTILE {
            case += 1;
            let dir = t.path().join(format!("s{case}"));
            let status = std::process::Command::new("cp")
                .arg("-a")
                .arg(&pristine)
                .arg(&dir)
                .status()
                .unwrap();
            assert!(status.success());
            let victim = dir.join(rel);
            plant(&victim, how, &elsewhere);
            let name = victim.file_name().unwrap().to_string_lossy().into_owned();
            // A pack's objects are reported as "object ... in pack <name>".
            let name = name.strip_suffix(".pack").unwrap_or(&name).to_string();
            let what = format!("{rel} as {how:?}");
            let work = t.path().join(format!("w{case}"));
            std::fs::create_dir(&work).unwrap();
            let said = bounded(&what, {
                let dir = dir.clone();
                move || library_ops(dir, work)
            });
            // A lease and its lock are only read by the fence: anything
            // that complained must name the file.
            if !said.is_empty() {
                assert!(
                    said.contains(&name),
                    "{what}: does not name {name}:\n{said}"
                );
            }
            // The real binary, on a fresh copy (library gc may have fixed it).
            let dir2 = t.path().join(format!("c{case}"));
            std::process::Command::new("cp")
                .arg("-a")
                .arg(&pristine)
                .arg(&dir2)
                .status()
                .unwrap();
            plant(&dir2.join(rel), how, &elsewhere);
            let job = t.path().join(format!("j{case}.toml"));
            std::fs::write(
                &job,
                format!(
                    "command = [\"/bin/true\"]\n[checkpoint]\ndir = \"{}\"\n",
                    dir2.display()
                ),
            )
            .unwrap();
            for args in [&["images"][..], &["verify"][..], &["gc"][..]] {
                let (code, out) = cli(args, &job);
                assert!(
                    code <= 2,
                    "{what}: supervise {args:?} exited {code}:\n{out}"
                );
                if code != 0 {
                    assert!(
                        out.contains(&name),
                        "{what}: supervise {args:?} exit {code} does not name {name}:\n{out}"
                    );
                }
            }
            // The file elsewhere was never touched through a symlink.
            assert_eq!(
                std::fs::read(elsewhere.join("secret")).unwrap(),
                b"not a store file"
            );
            let _ = std::fs::remove_dir_all(&dir);
            let _ = std::fs::remove_dir_all(&dir2);
        }
    }
}
