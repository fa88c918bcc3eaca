//! Upper bounds of durations and counts, and what a job file may be on
//! disk (regular, at most `MAX_JOB_FILE_SIZE`).

use std::time::{Duration, Instant};

use super::*;

/// Every bounded duration: (table, key, extra lines the key needs, the
/// bound as `config/reference.toml` writes it, the bound).
const DURATIONS: &[(&str, &str, &str, &str, Duration)] = &[
    ("checkpoint", "every", "", "1y", bounds::INTERVAL),
    (
        "checkpoint",
        "mtbf",
        "every = \"auto\"\n",
        "1y",
        bounds::INTERVAL,
    ),
    (
        "checkpoint",
        "min",
        "every = \"auto\"\nmtbf = \"1d\"\nmax = \"1y\"\n",
        "1y",
        bounds::INTERVAL,
    ),
    (
        "checkpoint",
        "max",
        "every = \"auto\"\nmtbf = \"1d\"\n",
        "1y",
        bounds::INTERVAL,
    ),
    (
        "checkpoint",
        "timeout",
        "",
        "1d",
        bounds::CHECKPOINT_TIMEOUT,
    ),
    ("restore", "window", "", "1y", bounds::RESTORE_WINDOW),
    (
        "restore",
        "backoff",
        "backoff_max = \"1d\"\n",
        "1d",
        bounds::BACKOFF,
    ),
    ("restore", "backoff_max", "", "1d", bounds::BACKOFF),
    ("slurm", "fence_wait", "", "1h", bounds::FENCE_WAIT),
    ("store", "scrub", "", "1y", bounds::SCRUB),
];

/// Every bounded count: (table, key, the bound).
const COUNTS: &[(&str, &str, u64)] = &[
    ("checkpoint", "keep", bounds::KEEP),
    ("restore", "max_restores", bounds::MAX_RESTORES),
];

fn job(table: &str, extra: &str, line: &str) -> String {
    format!("command = [\"a\"]\n[{table}]\n{extra}{line}\n")
}

#[test]
fn every_duration_is_bounded_and_the_bound_is_accepted() {
    for (table, key, extra, shown, max) in DURATIONS {
        assert_eq!(humantime::parse_duration(shown).unwrap(), *max, "{key}");
        // The bound itself is fine.
        let text = job(table, extra, &format!("{key} = \"{shown}\""));
        parse(&text).unwrap_or_else(|e| panic!("{key} = {shown:?}: {e}"));
        // A second more, and an absurd value, are refused at the value,
        // naming file, line, key and the bound.
        for bad in [format!("{}s", max.as_secs() + 1), "500000000y".to_string()] {
            let text = job(table, extra, &format!("{key} = \"{bad}\""));
            let e = parse(&text).expect_err(&text);
            let line = text.lines().count();
            let want = format!(
                "{FILE}:{line}:{}: {table}.{key}: must be at most {} (found \"{bad}\")",
                key.len() + 4,
                humantime::format_duration(*max)
            );
            assert_eq!(e.to_string(), want);
            assert_eq!(e.key(), Some(format!("{table}.{key}").as_str()));
        }
    }
}

#[test]
fn every_count_is_bounded() {
    for (table, key, max) in COUNTS {
        parse(&job(table, "", &format!("{key} = {max}"))).unwrap();
        let e = parse(&job(table, "", &format!("{key} = {}", max + 1))).unwrap_err();
        let shown = e.to_string();
        assert!(
            shown.starts_with(&format!("{FILE}:3:"))
                && shown.contains(&format!("{table}.{key}: must be between 1 and {max}")),
            "{shown}"
        );
    }
}

/// Each bound is written next to its key in `config/reference.toml`: the
/// comment block that documents the key says `at most "<bound>"` (or `at
/// most N` for counts).
#[test]
fn reference_documents_every_bound() {
    let block = |key: &str| -> String {
        let lines: Vec<&str> = REFERENCE.lines().collect();
        let start = lines
            .iter()
            .position(|l| {
                l.starts_with(&format!("# {key}:"))
                    || l.starts_with(&format!("# {key} /"))
                    || l.starts_with(&format!("# min / {key}:"))
            })
            .unwrap_or_else(|| panic!("reference.toml does not document `{key}`"));
        lines[start..]
            .iter()
            .take_while(|l| !l.is_empty())
            .copied()
            .collect::<Vec<_>>()
            .join(" ")
            .to_lowercase()
    };
    for (_, key, _, shown, _) in DURATIONS {
        let b = block(key);
        assert!(b.contains(&format!("at most \"{shown}\"")), "{key}: {b}");
    }
    for (_, key, max) in COUNTS {
        let b = block(key);
        assert!(b.contains(&format!("at most {max}")), "{key}: {b}");
    }
}

/// With every bound at its maximum, nothing computed from the job file
/// overflows: deadlines, the schedule, the restore policy, `auto`.
#[test]
fn maximum_values_do_not_overflow() {
    let text = "command = [\"a\"]\n\
        [checkpoint]\nevery = \"1y\"\ntimeout = \"1d\"\nkeep = 10000\n\
        [restore]\nmax_restores = 10000\nwindow = \"1y\"\nbackoff = \"1d\"\nbackoff_max = \"1d\"\n\
        [slurm]\nfence_wait = \"1h\"\n\
        [store]\nscrub = \"1y\"\n";
    let j = parse(text).unwrap();
    let now = Instant::now();
    for d in [
        j.restore.backoff,
        j.restore.backoff_max,
        j.restore.window,
        j.slurm.fence_wait,
        j.store.scrub.unwrap(),
        j.checkpoint.timeout.unwrap(),
    ] {
        assert!(now.checked_add(d).is_some(), "{d:?}");
        assert!(tokio::time::Instant::now().checked_add(d).is_some());
    }
    // The schedule: a tick (at least one interval away, on the job's grid,
    // so within two), whatever the phase.
    let utc = chrono::Utc::now();
    for phase in [0.0, 0.5, 0.999_999] {
        let t = crate::schedule::Ticker::with_phase(j.checkpoint.schedule.clone(), utc, phase);
        let due = t.due().expect("a due tick");
        assert!(
            due > utc && due <= utc + chrono::Duration::days(2 * 366),
            "{due}"
        );
    }
    // The restore policy: delays stay at backoff_max after many deaths.
    let mut h = crate::supervisor::policy::History::default();
    for i in 0..100u64 {
        let at = now + Duration::from_secs(i);
        match h.on_death(
            &j.restore,
            crate::reaper::ExitStatus::Signal(9),
            Duration::ZERO,
            at,
        ) {
            crate::supervisor::policy::Decision::Restore { delay } => {
                assert!(delay <= bounds::BACKOFF)
            }
            other => panic!("{other:?}"),
        }
    }
    // `auto` at its bounds.
    let a = parse(
        "command = [\"a\"]\n[checkpoint]\nevery = \"auto\"\nmtbf = \"1y\"\nmin = \"1y\"\nmax = \"1y\"\n",
    )
    .unwrap();
    let crate::schedule::ScheduleSpec::Auto(p) = &a.checkpoint.schedule else {
        panic!()
    };
    assert_eq!(crate::interval::choose(1e9, 1e12, p), bounds::INTERVAL);
    let t = crate::schedule::Ticker::with_phase(a.checkpoint.schedule.clone(), utc, 0.5);
    assert!(t.due().is_some());
}

// ---- the job file on disk ---------------------------------------------

#[test]
fn job_files_must_be_regular_and_small() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    // A FIFO: refused at once (opening it would wait for a writer).
    let fifo = d.join("fifo.toml");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    let started = Instant::now();
    let e = JobConfig::load(&fifo).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(
        e.to_string(),
        format!(
            "{}: cannot read: a FIFO, not a regular file (a job file must be a regular file or a \
             symlink to one)",
            fifo.display()
        )
    );
    // A symlink to /dev/zero: the target counts, and is never read.
    let zero = d.join("zero.toml");
    std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
    let e = JobConfig::load(&zero).unwrap_err().to_string();
    assert!(
        e.starts_with(&format!(
            "{}: cannot read: a character device",
            zero.display()
        )),
        "{e}"
    );
    // Larger than the cap.
    let big = d.join("big.toml");
    let mut text = String::from("command = [\"a\"]\n");
    text.push_str(&"#".repeat(MAX_JOB_FILE_SIZE as usize));
    std::fs::write(&big, &text).unwrap();
    let e = JobConfig::load(&big).unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "{}: cannot read: larger than 1024 KiB (1048576 bytes), the limit for a job file",
            big.display()
        )
    );
    // A symlink to a regular job file is followed; the job's paths resolve
    // against the symlink's directory (as before).
    let real_dir = d.join("real");
    std::fs::create_dir(&real_dir).unwrap();
    std::fs::write(real_dir.join("j.toml"), "command = [\"a\"]\n").unwrap();
    let link = d.join("link.toml");
    std::os::unix::fs::symlink(real_dir.join("j.toml"), &link).unwrap();
    let j = JobConfig::load(&link).unwrap();
    assert_eq!(j.name, "link");
    // Not UTF-8.
    let bin = d.join("bin.toml");
    std::fs::write(&bin, b"command = [\"\xff\"]\n").unwrap();
    let e = JobConfig::load(&bin).unwrap_err().to_string();
    assert!(e.ends_with("cannot read: not valid UTF-8"), "{e}");
}

#[test]
fn jobs_directories_refuse_non_regular_job_files() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("jobs");
    std::fs::create_dir(&d).unwrap();
    std::fs::write(d.join("a.toml"), "command = [\"a\"]\n").unwrap();
    // Not job files: a directory and a dangling symlink (an editor's lock
    // file) named *.toml.
    std::fs::create_dir(d.join("old.toml")).unwrap();
    std::os::unix::fs::symlink("user@host.1234", d.join(".#a.toml")).unwrap();
    let c = JobConfig::load_all(std::slice::from_ref(&d)).unwrap();
    assert_eq!(c.len(), 1);
    // A FIFO and a symlink to /dev/zero are job files that cannot be read.
    let fifo = d.join("b.toml");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    let e = JobConfig::load_all(std::slice::from_ref(&d)).unwrap_err();
    assert_eq!(e.path(), fifo);
    assert!(e.to_string().contains("a FIFO, not a regular file"), "{e}");
    std::fs::remove_file(&fifo).unwrap();
    std::os::unix::fs::symlink("/dev/zero", d.join("c.toml")).unwrap();
    let e = JobConfig::load_all(std::slice::from_ref(&d)).unwrap_err();
    assert!(e.to_string().contains("a character device"), "{e}");
}
