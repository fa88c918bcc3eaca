use super::*;
use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::{Child, Command, Stdio};

/// A shell that opens files as `script` says, then becomes `sleep`, holding
/// them. Returns once the files are open.
struct Holder {
    child: Child,
}

impl Holder {
    fn new(dir: &Path, script: &str) -> Holder {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(format!(
            "cd '{}' && {script} && echo ready && exec sleep 60",
            dir.display()
        ));
        let h = Holder::spawn(cmd);
        // `exec sleep` keeps the pid; wait until the exec happened so the
        // shell's own state is gone.
        let pid = h.pid();
        for _ in 0..500 {
            if fs::read_to_string(format!("/proc/{pid}/comm"))
                .unwrap_or_default()
                .trim()
                == "sleep"
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        h
    }

    /// Starts `cmd` and returns once it printed "ready".
    fn spawn(mut cmd: Command) -> Holder {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            // Not the test's own stderr: it may be a file (CI logs), which
            // the capture would then rightly record.
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready");
        Holder { child }
    }
    fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn cfg() -> FilesConfig {
    FilesConfig::default()
}

fn record<'a>(s: &'a FileState, dir: &Path, name: &str) -> &'a FileRecord {
    s.files
        .iter()
        .find(|r| r.path == dir.join(name))
        .unwrap_or_else(|| panic!("{name} not recorded: {s:?}"))
}

#[test]
fn fdinfo_is_parsed() {
    let t = "pos:\t12\nflags:\t0102001\nmnt_id:\t30\nino:\t5\n";
    assert_eq!(parse_fdinfo(t), Some((0o102001, 12)));
    assert_eq!(parse_fdinfo("pos: 1\n"), None);
}

#[test]
fn modes_follow_flags_and_offsets() {
    let o = |flags: Option<i32>, pos, size| Opened {
        path: "/f".into(),
        handle: "/f".into(),
        flags,
        pos,
        dev: 1,
        ino: 1,
        size,
    };
    let w = libc::O_WRONLY;
    assert_eq!(
        classify(&o(Some(w | libc::O_APPEND), 0, 10)).0,
        Mode::Extend
    );
    assert_eq!(
        classify(&o(Some(libc::O_RDWR | libc::O_APPEND), 0, 10)).0,
        Mode::Extend
    );
    assert_eq!(classify(&o(Some(w), 10, 10)).0, Mode::Extend);
    assert_eq!(classify(&o(Some(w | libc::O_TRUNC), 0, 0)).0, Mode::Extend);
    assert_eq!(classify(&o(Some(w), 3, 10)).0, Mode::Snapshot);
    assert_eq!(classify(&o(Some(libc::O_RDWR), 10, 10)).0, Mode::Snapshot);
    assert_eq!(classify(&o(None, 0, 10)).0, Mode::Snapshot);
}

#[test]
#[cfg_attr(not(root), ignore = "needs root")]
fn shared_writable_mappings_are_found() {
    let t = tempfile::tempdir().unwrap();
    let path = t.path().join("mapped");
    fs::write(&path, vec![0u8; 8192]).unwrap();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    // SAFETY: maps a file we own for the duration of the test, then unmaps.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            8192,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
        )
    };
    assert_ne!(addr, libc::MAP_FAILED);
    drop(f); // the mapping alone keeps the file in use
    let found = opened_for_writing(std::process::id() as i32).unwrap();
    // SAFETY: the mapping made above.
    unsafe { libc::munmap(addr, 8192) };
    let m = found
        .iter()
        .find(|o| o.path == path)
        .unwrap_or_else(|| panic!("mapping not found: {found:?}"));
    assert_eq!(m.flags, None);
    assert_eq!(m.size, 8192);
    assert_eq!(classify(m).0, Mode::Snapshot);
}

#[test]
fn exclusions() {
    let mut c = cfg();
    c.exclude = vec!["/data/scratch".into()];
    let ign = vec![PathBuf::from("/img")];
    assert!(excluded(Path::new("/proc/1/status"), &c, &ign));
    assert!(excluded(Path::new("/dev/null"), &c, &ign));
    assert!(excluded(Path::new("/data/scratch/x"), &c, &ign));
    assert!(excluded(Path::new("/img/000001/x"), &c, &ign));
    assert!(!excluded(Path::new("/data/scratchpad"), &c, &ign));
    assert!(!excluded(Path::new("/data/out"), &c, &ign));
}

/// Sets up: a.log (O_APPEND, 3 bytes), b.out (write-only, "hello"),
/// c.state (read-write, "0123456789"), d.ro (read-only), e.skip (excluded),
/// and a listed, absent f.listed. Captures into `img`.
fn captured(dir: &Path) -> (Holder, FileState, FilesConfig, CaptureSummary) {
    fs::write(dir.join("c.state"), "0123456789").unwrap();
    fs::write(dir.join("d.ro"), "ro").unwrap();
    let h = Holder::new(
        dir,
        "exec 3>>a.log 4>b.out 5<>c.state 6<d.ro 7>e.skip && printf abc >&3 && printf hello >&4 && printf x >&7",
    );
    let mut c = cfg();
    c.exclude = vec![dir.join("e.skip")];
    c.snapshot = vec![dir.join("f.listed")];
    let img = dir.join("img");
    fs::create_dir(&img).unwrap();
    let s = capture(&[h.pid()], &c, std::slice::from_ref(&img), &img).unwrap();
    let state = load(&img).unwrap().unwrap();
    (h, state, c, s)
}

#[test]
fn capture_records_what_the_job_writes() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let (_h, state, _c, sum) = captured(dir);
    assert_eq!(state.files.len(), 4, "{state:?}");
    let a = record(&state, dir, "a.log");
    assert_eq!((a.mode, a.size), (Mode::Extend, 3));
    assert_eq!(a.head, a.tail);
    assert!(a.head.is_some());
    let b = record(&state, dir, "b.out");
    assert_eq!((b.mode, b.size), (Mode::Extend, 5));
    let c = record(&state, dir, "c.state");
    assert_eq!((c.mode, c.size), (Mode::Snapshot, 10));
    let blob = dir.join("img").join(c.blob.as_ref().unwrap());
    assert_eq!(fs::read(blob).unwrap(), b"0123456789");
    let f = record(&state, dir, "f.listed");
    assert_eq!(f.mode, Mode::Absent);
    assert!(!state
        .files
        .iter()
        .any(|r| r.path.ends_with("d.ro") || r.path.ends_with("e.skip")));
    assert_eq!(sum.files, 4);
    assert_eq!(sum.snapshots, 1);
    assert_eq!(sum.bytes_copied, 10);
}

#[test]
fn rollback_restores_the_checkpoint_state() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let (h, _state, c, _) = captured(dir);
    drop(h);
    let img = dir.join("img");
    // After the checkpoint the job wrote on, rewrote its state, and created
    // the listed file.
    fs::OpenOptions::new()
        .append(true)
        .open(dir.join("a.log"))
        .unwrap()
        .write_all(b"def")
        .unwrap();
    fs::OpenOptions::new()
        .append(true)
        .open(dir.join("b.out"))
        .unwrap()
        .write_all(b" world")
        .unwrap();
    fs::write(dir.join("c.state"), "99").unwrap();
    fs::write(dir.join("f.listed"), "new").unwrap();
    let acts = rollback(&img, &c).unwrap();
    assert!(
        acts.contains(&Action::Truncate(dir.join("a.log"), 3)),
        "{acts:?}"
    );
    assert_eq!(fs::read_to_string(dir.join("a.log")).unwrap(), "abc");
    assert_eq!(fs::read_to_string(dir.join("b.out")).unwrap(), "hello");
    assert_eq!(
        fs::read_to_string(dir.join("c.state")).unwrap(),
        "0123456789"
    );
    assert!(!dir.join("f.listed").exists());
    assert_eq!(fs::read_to_string(dir.join("e.skip")).unwrap(), "x");
    // Idempotent.
    let again = rollback(&img, &c).unwrap();
    assert!(
        again
            .iter()
            .all(|a| matches!(a, Action::Keep(_) | Action::Rewrite(..))),
        "{again:?}"
    );
    // Off means off.
    fs::write(dir.join("c.state"), "77").unwrap();
    let off = FilesConfig {
        rollback: false,
        ..c
    };
    assert!(rollback(&img, &off).unwrap().is_empty());
    assert_eq!(fs::read_to_string(dir.join("c.state")).unwrap(), "77");
}

#[test]
fn deleted_snapshot_file_is_recreated() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let (h, _state, c, _) = captured(dir);
    drop(h);
    fs::remove_file(dir.join("c.state")).unwrap();
    rollback(&dir.join("img"), &c).unwrap();
    assert_eq!(
        fs::read_to_string(dir.join("c.state")).unwrap(),
        "0123456789"
    );
}

/// Every refusal leaves every file as it was: the plan is checked whole
/// before anything is changed.
#[test]
fn refusals_name_the_file_and_change_nothing() {
    type Damage = fn(&Path);
    let cases: [(&str, Damage, &str); 5] = [
        (
            "b.out",
            |d| fs::remove_file(d.join("b.out")).unwrap(),
            "deleted",
        ),
        (
            "b.out",
            |d| {
                fs::write(d.join("new"), "hello world").unwrap();
                fs::rename(d.join("new"), d.join("b.out")).unwrap();
            },
            "replaced",
        ),
        (
            "b.out",
            |d| fs::write(d.join("b.out"), "hi").unwrap(),
            "shorter",
        ),
        (
            "b.out",
            |d| {
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .open(d.join("b.out"))
                    .unwrap();
                f.write_all(b"J").unwrap();
                f.seek(SeekFrom::End(0)).unwrap();
                f.write_all(b" more").unwrap();
            },
            "changed",
        ),
        (
            "c.state",
            |d| {
                fs::write(d.join("new"), "x").unwrap();
                fs::rename(d.join("new"), d.join("c.state")).unwrap();
            },
            "replaced",
        ),
    ];
    for (name, damage, word) in cases {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path();
        let (h, _state, c, _) = captured(dir);
        drop(h);
        fs::OpenOptions::new()
            .append(true)
            .open(dir.join("a.log"))
            .unwrap()
            .write_all(b"def")
            .unwrap();
        damage(dir);
        let err = rollback(&dir.join("img"), &c).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, FilesError::Conflict { .. }), "{msg}");
        assert!(
            msg.contains(name) && msg.contains(word),
            "{name}/{word}: {msg}"
        );
        // a.log sorts first but was not truncated.
        assert_eq!(
            fs::read_to_string(dir.join("a.log")).unwrap(),
            "abcdef",
            "{msg}"
        );
    }
}

#[test]
fn malformed_state_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let write = |s: &str| fs::write(t.path().join(STATE_FILE), s).unwrap();
    write("{");
    assert!(matches!(load(t.path()), Err(FilesError::Malformed { .. })));
    write(r#"{"version": 9, "files": []}"#);
    assert!(load(t.path())
        .unwrap_err()
        .to_string()
        .contains("version 9"));
    let rec = |path: &str, blob: &str| {
        format!(
            r#"{{"version":1,"files":[{{"path":"{path}","mode":"snapshot","why":"","size":1,"dev":1,"ino":1,"perm":420,"blob":"{blob}"}}]}}"#
        )
    };
    write(&rec("/x", "../../etc/passwd"));
    assert!(load(t.path()).is_err());
    write(&rec("rel", "supervise-file-0001"));
    assert!(load(t.path()).is_err());
    write(&rec("/x", "supervise-file-0001"));
    assert_eq!(load(t.path()).unwrap().unwrap().files.len(), 1);
    fs::remove_file(t.path().join(STATE_FILE)).unwrap();
    assert_eq!(load(t.path()).unwrap(), None);
}

// --- Paths are never followed; actions happen on checked descriptors. ---

/// A snapshot of every entry of `dir`: name -> (kind, content, mode).
fn listing(dir: &Path) -> BTreeMap<String, (String, Vec<u8>, u32)> {
    let mut out = BTreeMap::new();
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let md = fs::symlink_metadata(e.path()).unwrap();
        let (kind, content) = if md.file_type().is_symlink() {
            (
                "link",
                fs::read_link(e.path())
                    .unwrap()
                    .into_os_string()
                    .into_encoded_bytes(),
            )
        } else if md.is_dir() {
            ("dir", Vec::new())
        } else {
            ("file", fs::read(e.path()).unwrap())
        };
        out.insert(
            e.file_name().to_string_lossy().into_owned(),
            (kind.to_string(), content, md.mode() & 0o7777),
        );
    }
    out
}

/// The job's files in `<t>/job` (see [`captured`]: a.log, b.out, c.state,
/// listed absent f.listed), plus a listed existing g.listed; the image in
/// `<t>/img`, outside the job's directory. After the capture the job wrote
/// on and created the listed absent file, so that every kind of action is
/// due.
fn captured_outside(t: &Path) -> (PathBuf, PathBuf, FilesConfig) {
    captured_outside_with(t, true)
}

/// Like [`captured_outside`]; without `extend`, the job has no a.log and
/// b.out (so that even a rollback by path, which refuses a deleted
/// *extend* file, would get to act on the other files).
fn captured_outside_with(t: &Path, extend: bool) -> (PathBuf, PathBuf, FilesConfig) {
    let dir = t.join("job");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("c.state"), "0123456789").unwrap();
    fs::write(dir.join("g.listed"), "listed at checkpoint").unwrap();
    let script = if extend {
        "exec 3>>a.log 4>b.out 5<>c.state && printf abc >&3 && printf hello >&4"
    } else {
        "exec 5<>c.state"
    };
    let h = Holder::new(&dir, script);
    let mut c = cfg();
    c.snapshot = vec![dir.join("f.listed"), dir.join("g.listed")];
    let img = t.join("img");
    fs::create_dir(&img).unwrap();
    capture(&[h.pid()], &c, std::slice::from_ref(&img), &img).unwrap();
    drop(h);
    let state = load(&img).unwrap().unwrap();
    assert_eq!(state.files.len(), if extend { 5 } else { 3 }, "{state:?}");
    for r in &state.files {
        // `/`, then every directory down to `<t>/job`.
        assert_eq!(
            r.dirs.len(),
            r.path.ancestors().count() - 1,
            "{}: {:?}",
            r.path.display(),
            r.dirs
        );
    }
    if extend {
        append(&dir.join("a.log"), b"def");
        append(&dir.join("b.out"), b" world");
    }
    fs::write(dir.join("c.state"), "99").unwrap();
    fs::write(dir.join("f.listed"), "new").unwrap();
    fs::write(dir.join("g.listed"), "changed").unwrap();
    (dir, img, c)
}

fn append(p: &Path, b: &[u8]) {
    OpenOptions::new()
        .append(true)
        .open(p)
        .unwrap()
        .write_all(b)
        .unwrap();
}

/// A directory standing in for somebody else's: files named like the job's
/// listed files (the one absent at the checkpoint too), none named like
/// the files it held open (`c.state` would be created there).
fn decoy(p: &Path) -> BTreeMap<String, (String, Vec<u8>, u32)> {
    fs::create_dir(p).unwrap();
    for n in ["f.listed", "g.listed"] {
        fs::write(p.join(n), format!("precious {n} {}", "x".repeat(100))).unwrap();
        fs::set_permissions(p.join(n), fs::Permissions::from_mode(0o600)).unwrap();
    }
    listing(p)
}

fn assert_refused(err: FilesError, needle: &str) {
    let msg = err.to_string();
    assert!(matches!(err, FilesError::Conflict { .. }), "{msg}");
    assert!(msg.contains(needle), "expected {needle:?} in: {msg}");
}

#[test]
fn parent_dir_swapped_for_a_symlink_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let (dir, img, c) = captured_outside_with(t.path(), false);
    let other = t.path().join("root-only");
    let before = decoy(&other);
    fs::rename(&dir, t.path().join("job.moved")).unwrap();
    std::os::unix::fs::symlink(&other, &dir).unwrap();
    let err = rollback(&img, &c).unwrap_err();
    assert_refused(
        err,
        &format!(
            "{} is a symlink now; supervise does not follow it",
            dir.display()
        ),
    );
    assert_eq!(listing(&other), before);
    // Nothing was done to the moved directory either (the plan is whole
    // before anything changes).
    assert_eq!(
        fs::read_to_string(t.path().join("job.moved/c.state")).unwrap(),
        "99"
    );
}

#[test]
fn parent_dir_swapped_for_another_dir_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let (dir, img, c) = captured_outside_with(t.path(), false);
    fs::rename(&dir, t.path().join("job.moved")).unwrap();
    let before = decoy(&dir);
    let err = rollback(&img, &c).unwrap_err();
    assert_refused(
        err,
        &format!(
            "directory {} is not the one recorded at the checkpoint (replaced or moved since)",
            dir.display()
        ),
    );
    assert_eq!(listing(&dir), before);
}

#[test]
fn a_directory_higher_up_swapped_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let top = t.path().join("top");
    fs::create_dir(&top).unwrap();
    let (dir, _, c) = captured_outside_with(&top, false);
    let moved = t.path().join("top.moved");
    fs::rename(&top, &moved).unwrap();
    fs::create_dir(&top).unwrap();
    let before = decoy(&dir);
    let err = rollback(&moved.join("img"), &c).unwrap_err();
    assert_refused(
        err,
        &format!("directory {} is not the one recorded", top.display()),
    );
    assert_eq!(listing(&dir), before);
}

#[test]
fn symlink_in_place_of_a_file_is_refused() {
    for name in ["a.log", "c.state", "g.listed"] {
        let t = tempfile::tempdir().unwrap();
        let (dir, img, c) = captured_outside(t.path());
        let other = t.path().join("root-only");
        let before = decoy(&other);
        fs::remove_file(dir.join(name)).unwrap();
        std::os::unix::fs::symlink(other.join("g.listed"), dir.join(name)).unwrap();
        let err = rollback(&img, &c).unwrap_err();
        assert_refused(
            err,
            &format!("{} is a symlink now", dir.join(name).display()),
        );
        assert_eq!(listing(&other), before, "{name}");
        assert_eq!(
            fs::read_to_string(dir.join("b.out")).unwrap(),
            "hello world"
        );
    }
}

/// `renameat2(RENAME_EXCHANGE)` between `plan` and `apply` (the race an
/// attacker runs in a loop): the truncation and the rewrite hit the inodes
/// that were checked, now under the other name; the files swapped in under
/// the job's names are untouched.
#[test]
fn exchange_between_plan_and_apply_hits_the_checked_inodes() {
    use nix::fcntl::{renameat2, RenameFlags};
    let t = tempfile::tempdir().unwrap();
    let (dir, img, c) = captured_outside(t.path());
    let state = load(&img).unwrap().unwrap();
    let steps = plan(&state, &img, &c).unwrap();
    let actions: Vec<_> = steps.iter().map(|s| s.action().clone()).collect();
    assert!(
        actions.contains(&Action::Truncate(dir.join("a.log"), 3))
            && actions
                .iter()
                .any(|a| matches!(a, Action::Rewrite(p, _) if p == &dir.join("c.state"))),
        "{actions:?}"
    );
    let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    for (job, victim) in [("a.log", "victim1"), ("c.state", "victim2")] {
        fs::write(dir.join(victim), &big).unwrap();
        renameat2(
            None,
            &dir.join(job),
            None,
            &dir.join(victim),
            RenameFlags::RENAME_EXCHANGE,
        )
        .unwrap();
    }
    let done = apply(steps).unwrap();
    assert_eq!(done, actions);
    // The swapped-in files (now under the job's names) are untouched...
    assert_eq!(fs::read(dir.join("a.log")).unwrap(), big);
    assert_eq!(fs::read(dir.join("c.state")).unwrap(), big);
    // ...and the job's own inodes were rolled back under their new names.
    assert_eq!(fs::read_to_string(dir.join("victim1")).unwrap(), "abc");
    assert_eq!(
        fs::read_to_string(dir.join("victim2")).unwrap(),
        "0123456789"
    );
}

/// Records written before directory identities were recorded (no `dirs`,
/// `uid`, `gid`) still roll back, on checked descriptors; a symlink on
/// their path is still refused.
#[test]
fn legacy_records_without_directories_roll_back() {
    let t = tempfile::tempdir().unwrap();
    let (dir, img, c) = captured_outside(t.path());
    let mut v: serde_json::Value =
        serde_json::from_slice(&fs::read(img.join(STATE_FILE)).unwrap()).unwrap();
    for r in v["files"].as_array_mut().unwrap() {
        let r = r.as_object_mut().unwrap();
        r.remove("dirs");
        r.remove("uid");
        r.remove("gid");
    }
    fs::write(img.join(STATE_FILE), serde_json::to_vec(&v).unwrap()).unwrap();
    let legacy = load(&img).unwrap().unwrap();
    assert!(legacy
        .files
        .iter()
        .all(|r| r.dirs.is_empty() && r.uid.is_none()));
    let acts = rollback(&img, &c).unwrap();
    assert!(
        acts.contains(&Action::Truncate(dir.join("a.log"), 3)),
        "{acts:?}"
    );
    assert_eq!(fs::read_to_string(dir.join("a.log")).unwrap(), "abc");
    assert_eq!(fs::read_to_string(dir.join("b.out")).unwrap(), "hello");
    assert_eq!(
        fs::read_to_string(dir.join("c.state")).unwrap(),
        "0123456789"
    );
    assert_eq!(
        fs::read_to_string(dir.join("g.listed")).unwrap(),
        "listed at checkpoint"
    );
    assert!(!dir.join("f.listed").exists());
    // Without identities a directory swapped for another passes the walk
    // (nothing to compare), but a symlink on the way does not.
    fs::rename(&dir, t.path().join("job.moved")).unwrap();
    let other = t.path().join("root-only");
    let before = decoy(&other);
    std::os::unix::fs::symlink(&other, &dir).unwrap();
    assert_refused(rollback(&img, &c).unwrap_err(), "is a symlink now");
    assert_eq!(listing(&other), before);
}

/// A `[files] snapshot` path through a symlink is not read at capture
/// (root would copy whatever it points to into the image, then write it
/// back at a restore); the reason is recorded.
#[test]
fn listed_paths_through_symlinks_are_skipped_at_capture() {
    let t = tempfile::tempdir().unwrap();
    let secret = t.path().join("secret");
    fs::create_dir(&secret).unwrap();
    fs::write(secret.join("shadow"), "root:hash").unwrap();
    let job = t.path().join("job");
    fs::create_dir(&job).unwrap();
    std::os::unix::fs::symlink(&secret, job.join("dirlink")).unwrap();
    std::os::unix::fs::symlink(secret.join("shadow"), job.join("state")).unwrap();
    let mut c = cfg();
    c.snapshot = vec![
        job.join("dirlink/shadow"),
        job.join("state"),
        job.join("../x"),
    ];
    let img = t.path().join("img");
    fs::create_dir(&img).unwrap();
    let sum = capture(&[], &c, std::slice::from_ref(&img), &img).unwrap();
    assert_eq!((sum.files, sum.bytes_copied), (0, 0));
    let state = load(&img).unwrap().unwrap();
    assert!(state.files.is_empty(), "{state:?}");
    let why = |p: PathBuf| {
        state
            .skipped
            .iter()
            .find(|(s, _)| s == &p)
            .map(|(_, w)| w.clone())
            .unwrap_or_else(|| panic!("{} not skipped: {state:?}", p.display()))
    };
    assert!(
        why(job.join("dirlink/shadow")).contains(&format!(
            "{} is a symlink; supervise does not follow symlinks",
            job.join("dirlink").display()
        )),
        "{state:?}"
    );
    assert!(why(job.join("state")).contains("is a symlink"), "{state:?}");
    assert!(why(job.join("../x")).contains("'..'"), "{state:?}");
    let blobs = fs::read_dir(&img)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(BLOB_PREFIX)
        })
        .count();
    assert_eq!(blobs, 0);
}

/// A recreated or replaced file gets the recorded mode and owner back.
#[test]
#[cfg_attr(not(root), ignore = "needs root")]
fn recreated_and_replaced_files_get_their_owner_and_mode() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("job");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("c.state"), "0123456789").unwrap();
    fs::write(dir.join("g.listed"), "listed").unwrap();
    for (n, mode) in [("c.state", 0o640), ("g.listed", 0o604)] {
        fs::set_permissions(dir.join(n), fs::Permissions::from_mode(mode)).unwrap();
        std::os::unix::fs::lchown(dir.join(n), Some(65534), Some(65534)).unwrap();
    }
    let h = Holder::new(&dir, "exec 5<>c.state");
    let mut c = cfg();
    c.snapshot = vec![dir.join("g.listed")];
    let img = t.path().join("img");
    fs::create_dir(&img).unwrap();
    capture(&[h.pid()], &c, std::slice::from_ref(&img), &img).unwrap();
    drop(h);
    fs::remove_file(dir.join("c.state")).unwrap();
    fs::remove_file(dir.join("g.listed")).unwrap();
    let acts = rollback(&img, &c).unwrap();
    assert!(
        acts.iter().any(|a| matches!(a, Action::Recreate(..)))
            && acts.iter().any(|a| matches!(a, Action::Replace(..))),
        "{acts:?}"
    );
    for (n, mode, content) in [
        ("c.state", 0o640, "0123456789"),
        ("g.listed", 0o604, "listed"),
    ] {
        let md = fs::symlink_metadata(dir.join(n)).unwrap();
        assert_eq!(
            (md.uid(), md.gid(), md.mode() & 0o7777),
            (65534, 65534, mode),
            "{n}"
        );
        assert_eq!(fs::read_to_string(dir.join(n)).unwrap(), content);
    }
    // No temporary file is left behind.
    assert_eq!(fs::read_dir(&dir).unwrap().count(), 2);
}

#[test]
fn directory_identities_must_fit_the_path() {
    let t = tempfile::tempdir().unwrap();
    let write = |mode: &str, dirs: &str| {
        let blob = if mode == "snapshot" {
            r#","blob":"supervise-file-0001""#
        } else {
            ""
        };
        fs::write(
            t.path().join(STATE_FILE),
            format!(
                r#"{{"version":1,"files":[{{"path":"/a/b","mode":"{mode}","why":"","size":1,"dev":1,"ino":1,"perm":420{blob},"dirs":{dirs}}}]}}"#
            ),
        )
        .unwrap()
    };
    write("extend", "[[1,2],[3,4]]");
    assert_eq!(load(t.path()).unwrap().unwrap().files[0].dirs.len(), 2);
    write("extend", "[[1,2]]");
    assert!(load(t.path()).is_err());
    write("snapshot", "[[1,2],[3,4],[5,6]]");
    assert!(load(t.path()).is_err());
    write("absent", "[[1,2]]");
    assert!(load(t.path()).is_ok());
}

#[test]
fn restored_descriptors_must_hold_the_checked_files() {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    let t = tempfile::tempdir().unwrap();
    let good = t.path().join("out.txt");
    let other = t.path().join("other");
    fs::write(&good, b"x").unwrap();
    fs::write(&other, b"y").unwrap();
    // "The restored job" is this process, holding `other` where `good` was
    // expected: as if CRIU had reopened a swapped path.
    let held = fs::File::open(&other).unwrap();
    let me = std::process::id() as i32;
    let md = fs::metadata(&good).unwrap();
    let expect = vec![crate::files::Expected {
        path: good.clone(),
        dev: md.dev(),
        ino: md.ino(),
        holders: vec![(1000, format!("fd/{}", held.as_raw_fd()))],
    }];
    let map = |ns: i32| (ns == 1000).then_some(me);
    let e = crate::files::verify_restored(&expect, &map).unwrap_err();
    let s = e.to_string();
    assert!(
        s.contains("CRIU reopened it by path as") && s.contains("other"),
        "{s}"
    );
    // Holding the right file passes; a missing process is refused.
    let right = fs::File::open(&good).unwrap();
    let mut ok = expect.clone();
    ok[0].holders = vec![(1000, format!("fd/{}", right.as_raw_fd()))];
    crate::files::verify_restored(&ok, &map).unwrap();
    assert!(crate::files::verify_restored(&ok, &|_| None).is_err());
}

/// (atime, mtime, ctime) of `p`, to the nanosecond.
fn times_of(p: &Path) -> ((i64, i64), (i64, i64), (i64, i64)) {
    let m = fs::metadata(p).unwrap();
    (
        (m.atime(), m.atime_nsec()),
        (m.mtime(), m.mtime_nsec()),
        (m.ctime(), m.ctime_nsec()),
    )
}

/// Sets `p`'s access and modification times to a fixed moment in the past.
fn set_old_times(p: &Path, secs: i64) {
    let f = OpenOptions::new().write(true).open(p).unwrap();
    let t = nix::sys::time::TimeSpec::new(secs, 123_456_789);
    nix::sys::stat::futimens(std::os::fd::AsRawFd::as_raw_fd(&f), &t, &t).unwrap();
}

/// A *snapshot* file the job did not change since the checkpoint is left
/// alone (Keep: not rewritten; its times, ctime included, are untouched to
/// the nanosecond); a changed one is rewritten and gets the checkpoint's
/// modification and access times back; one rewritten with the same bytes
/// only gets its times back; a truncated *extend* file gets its times back.
#[test]
fn rollback_keeps_unchanged_files_and_puts_times_back() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    for (n, content) in [
        ("same.dat", "unchanged"),
        ("c.state", "0123456789"),
        ("touched.dat", "same bytes"),
        ("a.log", "abc"),
    ] {
        fs::write(dir.join(n), content).unwrap();
        set_old_times(&dir.join(n), 1_000_000_000);
    }
    let h = Holder::new(dir, "exec 3>>a.log 5<>c.state 6<>same.dat 7<>touched.dat");
    let img = dir.join("img");
    fs::create_dir(&img).unwrap();
    let c = cfg();
    capture(&[h.pid()], &c, std::slice::from_ref(&img), &img).unwrap();
    drop(h);
    let state = load(&img).unwrap().unwrap();
    let old = (1_000_000_000, 123_456_789);
    for n in ["same.dat", "c.state", "touched.dat", "a.log"] {
        let r = record(&state, dir, n);
        assert_eq!((r.mtime, r.atime), (Some(old), Some(old)), "{n}: {r:?}");
    }
    // After the checkpoint: c.state rewritten, touched.dat rewritten with
    // the same bytes, a.log appended to; same.dat left alone.
    fs::write(dir.join("c.state"), "99").unwrap();
    fs::write(dir.join("touched.dat"), "same bytes").unwrap();
    append(&dir.join("a.log"), b"def");
    let before = times_of(&dir.join("same.dat"));
    std::thread::sleep(Duration::from_millis(20));
    let acts = rollback(&img, &c).unwrap();
    assert!(
        acts.contains(&Action::Keep(dir.join("same.dat"))),
        "{acts:?}"
    );
    assert!(
        acts.contains(&Action::Retime(dir.join("touched.dat"))),
        "{acts:?}"
    );
    assert!(
        acts.iter()
            .any(|a| matches!(a, Action::Rewrite(p, _) if p == &dir.join("c.state"))),
        "{acts:?}"
    );
    assert!(
        acts.contains(&Action::Truncate(dir.join("a.log"), 3)),
        "{acts:?}"
    );
    // (Times first: reading the content below moves access times.)
    assert_eq!(times_of(&dir.join("same.dat")), before);
    for n in ["c.state", "touched.dat", "a.log"] {
        let (a, m, _) = times_of(&dir.join(n));
        assert_eq!((a, m), (old, old), "{n}");
    }
    assert_eq!(
        fs::read_to_string(dir.join("same.dat")).unwrap(),
        "unchanged"
    );
    assert_eq!(
        fs::read_to_string(dir.join("c.state")).unwrap(),
        "0123456789"
    );
    assert_eq!(fs::read_to_string(dir.join("a.log")).unwrap(), "abc");
    // Now everything is as at the checkpoint: a second rollback keeps all,
    // touching nothing.
    let all: Vec<_> = ["same.dat", "c.state", "touched.dat", "a.log"]
        .iter()
        .map(|n| times_of(&dir.join(n)))
        .collect();
    std::thread::sleep(Duration::from_millis(20));
    let again = rollback(&img, &c).unwrap();
    assert!(
        again.iter().all(|a| matches!(a, Action::Keep(_))),
        "{again:?}"
    );
    let now: Vec<_> = ["same.dat", "c.state", "touched.dat", "a.log"]
        .iter()
        .map(|n| times_of(&dir.join(n)))
        .collect();
    assert_eq!(all, now);
}

/// Records without times (written by earlier releases) still roll back;
/// an unchanged file is kept, a changed one rewritten.
#[test]
fn records_without_times_roll_back() {
    let t = tempfile::tempdir().unwrap();
    let (dir, img, c) = captured_outside_with(t.path(), false);
    let mut v: serde_json::Value =
        serde_json::from_slice(&fs::read(img.join(STATE_FILE)).unwrap()).unwrap();
    for f in v["files"].as_array_mut().unwrap() {
        let f = f.as_object_mut().unwrap();
        assert!(
            f.remove("mtime").is_some() || f["mode"] == "absent",
            "{f:?}"
        );
        f.remove("atime");
    }
    fs::write(img.join(STATE_FILE), serde_json::to_vec(&v).unwrap()).unwrap();
    let acts = rollback(&img, &c).unwrap();
    assert!(
        acts.iter()
            .any(|a| matches!(a, Action::Rewrite(p, _) if p == &dir.join("c.state"))),
        "{acts:?}"
    );
    assert_eq!(
        fs::read_to_string(dir.join("c.state")).unwrap(),
        "0123456789"
    );
    let again = rollback(&img, &c).unwrap();
    assert!(
        again.contains(&Action::Keep(dir.join("c.state"))),
        "{again:?}"
    );
}

/// A job holding write leases (`F_SETLEASE`, `F_WRLCK`) on a file open
/// read-write and on one open write-only (append): recording its files
/// opens neither (an open would start a lease break: the job, here not
/// frozen, would get SIGIO and die of it). The read-write one is copied
/// through a duplicate of the job's own descriptor, whose offset does not
/// move; the write-only one is recorded by size, unfingerprinted.
#[test]
fn capture_does_not_break_the_jobs_leases() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let script = r#"import fcntl, os, sys, time
a = os.open("l.rw", os.O_RDWR | os.O_CREAT, 0o644)
os.write(a, b"rw-content")
fcntl.fcntl(a, fcntl.F_SETLEASE, fcntl.F_WRLCK)
b = os.open("l.wo", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
os.write(b, b"appended")
fcntl.fcntl(b, fcntl.F_SETLEASE, fcntl.F_WRLCK)
print("ready", flush=True)
time.sleep(60)
"#;
    let mut cmd = Command::new("python3");
    cmd.arg("-c").arg(script).current_dir(dir);
    let mut h = Holder::spawn(cmd);
    let pid = h.pid();
    let leases = || {
        fs::read_to_string("/proc/locks")
            .unwrap()
            .lines()
            .filter(|l| {
                let w: Vec<_> = l.split_whitespace().collect();
                w.get(1) == Some(&"LEASE")
                    && w.get(2) == Some(&"ACTIVE")
                    && w.get(3) == Some(&"WRITE")
                    && w.get(4) == Some(&pid.to_string().as_str())
            })
            .count()
    };
    assert_eq!(leases(), 2);
    let img = dir.join("img");
    fs::create_dir(&img).unwrap();
    let res = capture(&[pid], &cfg(), std::slice::from_ref(&img), &img);
    std::thread::sleep(Duration::from_millis(50));
    let alive = h.child.try_wait().unwrap().is_none();
    let held = leases();
    let fdinfo = |name: &str| {
        let fd = fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
            .find(|e| fs::read_link(e.path()).is_ok_and(|l| l == dir.join(name)))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .unwrap_or_default();
        fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap_or_default()
    };
    let (pos_rw, pos_wo) = (fdinfo("l.rw"), fdinfo("l.wo"));
    drop(h);
    res.unwrap();
    assert!(alive, "the job died (SIGIO: its lease was broken)");
    assert_eq!(held, 2, "the job lost a lease");
    assert!(pos_rw.starts_with("pos:\t10\n"), "{pos_rw}");
    assert!(pos_wo.starts_with("pos:\t8\n"), "{pos_wo}");
    let state = load(&img).unwrap().unwrap();
    let rw = record(&state, dir, "l.rw");
    assert_eq!((rw.mode, rw.size), (Mode::Snapshot, 10));
    assert_eq!(
        fs::read(img.join(rw.blob.as_ref().unwrap())).unwrap(),
        b"rw-content"
    );
    let wo = record(&state, dir, "l.wo");
    assert_eq!((wo.mode, wo.size, &wo.head), (Mode::Extend, 8, &None));
    assert!(wo.why.contains("lease"), "{}", wo.why);
    // Rolled back (the job gone): truncated to its size, unfingerprinted.
    append(&dir.join("l.wo"), b" more");
    let acts = rollback(&img, &cfg()).unwrap();
    assert!(
        acts.contains(&Action::Truncate(dir.join("l.wo"), 8)),
        "{acts:?}"
    );
    assert_eq!(fs::read_to_string(dir.join("l.wo")).unwrap(), "appended");
}
