//! What is recorded and how it is put back: descriptors' flags and offsets
//! decide the mode, shared writable mappings are found, exclusions hold;
//! a rollback restores the checkpoint state, recreates a deleted copied
//! file, and refuses (naming the file, changing nothing) what it cannot
//! put back, or a malformed state file.

use super::*;

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

/// With a shadow directory, a copied file is compared with its shadow
/// copy while the job is frozen and only the pieces that differ are
/// rewritten; the checkpoint's copy is made from the shadow afterwards,
/// and holds exactly what the file held at the capture, whatever the job
/// writes after it. Shadows of files no longer copied are removed.
#[test]
fn shadow_copies_rewrite_only_what_changed() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("job");
    fs::create_dir(&dir).unwrap();
    let shadow = t.path().join("shadow");
    fs::create_dir(&shadow).unwrap();
    // 3 MiB + a bit of state, rewritten in place.
    let mut content: Vec<u8> = (0..(3 << 20) + 100).map(|i| (i * 7 % 251) as u8).collect();
    fs::write(dir.join("s.bin"), &content).unwrap();
    let h = Holder::new(&dir, "exec 5<>s.bin");
    let mut c = cfg();
    c.shadow_dir = Some(shadow.clone());
    let take = |n: usize, c: &FilesConfig| {
        let img = t.path().join(format!("img{n}"));
        fs::create_dir(&img).unwrap();
        let s = capture(&[h.pid()], c, std::slice::from_ref(&img), &img).unwrap();
        (img, s)
    };
    let (img1, s1) = take(1, &c);
    assert_eq!(s1.bytes_copied, content.len() as u64);
    assert_eq!(s1.bytes_changed, content.len() as u64, "first: all new");
    assert_eq!(s1.deferred.len(), 1);
    // Not copied yet: the blob is made after the freeze.
    let blob1 = img1.join(&s1.deferred[0].1);
    assert!(!blob1.exists());
    finish_copies(&s1, &img1, Some(&shadow)).unwrap();
    assert_eq!(fs::read(&blob1).unwrap(), content);
    // The job rewrites 10 bytes in the fifth 256 KiB piece and grows the
    // file.
    content[(1 << 20) + 5..(1 << 20) + 15].copy_from_slice(b"0123456789");
    content.extend_from_slice(b"tail");
    fs::write(dir.join("s.bin"), &content).unwrap();
    let (img2, s2) = take(2, &c);
    assert_eq!(s2.bytes_copied, content.len() as u64);
    assert_eq!(
        s2.bytes_changed,
        (256 << 10) + 104,
        "the changed 256 KiB piece and the last piece"
    );
    // The job writes on before the deferred copy: the copy still holds
    // what the file held at the capture.
    let at_capture = content.clone();
    content[0] = content[0].wrapping_add(1);
    fs::write(dir.join("s.bin"), &content).unwrap();
    finish_copies(&s2, &img2, Some(&shadow)).unwrap();
    assert_eq!(fs::read(img2.join(&s2.deferred[0].1)).unwrap(), at_capture);
    // The rollback of that image brings back the capture's content.
    rollback(&img2, &c).unwrap();
    assert_eq!(fs::read(dir.join("s.bin")).unwrap(), at_capture);
    // A file no longer held: its shadow goes at the next checkpoint.
    drop(h);
    let empty = FilesConfig {
        shadow_dir: Some(shadow.clone()),
        ..cfg()
    };
    let img3 = t.path().join("img3");
    fs::create_dir(&img3).unwrap();
    let s3 = capture(&[], &empty, std::slice::from_ref(&img3), &img3).unwrap();
    finish_copies(&s3, &img3, Some(&shadow)).unwrap();
    assert_eq!(fs::read_dir(&shadow).unwrap().count(), 0);
}
