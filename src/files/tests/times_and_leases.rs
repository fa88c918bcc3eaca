//! File times and leases: an unchanged file is kept and a rewritten one
//! gets its recorded times back (records without times still roll back),
//! and recording never breaks a lease the job holds.

use super::*;

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
