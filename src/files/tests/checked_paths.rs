//! Paths are never followed; actions happen on checked descriptors: a
//! directory or file swapped for a symlink or another one is refused, a
//! `RENAME_EXCHANGE` between plan and apply hits only the checked inodes,
//! listed paths through symlinks are not read, owners and modes come back,
//! and the restored descriptors must hold the checked files.

use super::*;

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
