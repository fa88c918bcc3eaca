//! The tracker applying forwarded events (as the job's init forwards them:
//! PIDs as the job's namespace sees them), against a real fanotify group
//! and real directory handles; the events are written into the pipe here.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use crate::files::resolve::open_dir;
use crate::files::watch::{handle_of, record, INFO};
use crate::files::Tracker;

#[test]
#[cfg_attr(not(criu), ignore = "needs root (fanotify with PIDs)")]
fn forwarded_events_decide_what_a_restore_removes() {
    let d = tempfile::tempdir().unwrap();
    let (work, sync) = (d.path().join("work"), d.path().join("sync"));
    fs::create_dir(&work).unwrap();
    fs::create_dir(&sync).unwrap();
    fs::write(work.join("input"), "in").unwrap();
    let t = Tracker::new(sync.clone(), Some(work.clone()), Vec::new(), Vec::new());
    let w = t.begin_run().expect("a fanotify group (root)");
    let wh = handle_of(&open_dir(&work).unwrap()).unwrap();
    let sh = handle_of(&open_dir(&sync).unwrap()).unwrap();
    let mut pipe = File::from(w.pipe.try_clone().unwrap());
    let (name, old, new) = INFO;
    let send = |p: &mut File, b: Vec<u8>| p.write_all(&b).unwrap();
    // Before the run's start marker: not the job's doing.
    send(
        &mut pipe,
        record(libc::FAN_CREATE, 1000, &[(name, &wh, "early")]),
    );
    w.start(Some(Vec::new()));
    send(
        &mut pipe,
        record(libc::FAN_CREATE, 0, &[(name, &sh, "start-1")]),
    );
    // The job: creates `new` and `tmp`, renames `tmp` over `input` (which
    // existed), creates `shared`; another process (PID 0) then touches
    // `shared` and makes `theirs`.
    for n in ["new", "tmp", "shared"] {
        send(&mut pipe, record(libc::FAN_CREATE, 1001, &[(name, &wh, n)]));
    }
    send(
        &mut pipe,
        record(
            libc::FAN_RENAME,
            1002,
            &[(old, &wh, "tmp"), (new, &wh, "input")],
        ),
    );
    send(
        &mut pipe,
        record(libc::FAN_CLOSE_WRITE, 0, &[(name, &wh, "shared")]),
    );
    send(
        &mut pipe,
        record(libc::FAN_CREATE, 0, &[(name, &wh, "theirs")]),
    );
    // A checkpoint waits for its marker.
    let writer = {
        let mut p = pipe.try_clone().unwrap();
        let sh = sh.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            p.write_all(&record(libc::FAN_CREATE, 0, &[(name, &sh, "sync-1-1")]))
                .unwrap();
        })
    };
    t.sync(Duration::from_secs(5)).unwrap();
    writer.join().unwrap();
    let p = |n: &str| work.join(n);
    assert_eq!(t.names(), vec![p("input"), p("new"), p("shared"), p("tmp")]);
    let plan = t.plan(&BTreeSet::new());
    assert_eq!(plan.remove, vec![p("new"), p("tmp")]);
    let left: Vec<&PathBuf> = plan.leave.iter().map(|(p, _)| p).collect();
    assert_eq!(left, vec![&p("input"), &p("shared")]);
    // The run ends when the init closes its end (here: every copy).
    drop(pipe);
    drop(w);
    let started = std::time::Instant::now();
    t.end_run(Duration::from_secs(5));
    assert!(started.elapsed() < Duration::from_secs(4));
    assert_eq!(t.incomplete(), None);
}
