use std::path::Path;

use super::*;

const FILE: &str = "/x/job.toml";

fn parse(text: &str) -> Result<JobConfig, ConfigError> {
    JobConfig::from_str_at(text, Path::new(FILE))
}

fn ok(text: &str) -> JobConfig {
    parse(text).unwrap_or_else(|e| panic!("unexpected error: {e}"))
}

/// Asserts an `Invalid` error at `line:col` for `key`, whose message
/// contains `needle`; returns the full display string.
#[track_caller]
fn invalid(text: &str, line: usize, column: usize, key: &str, needle: &str) -> String {
    let e = parse(text).expect_err("expected an error");
    let shown = e.to_string();
    assert!(
        matches!(e, ConfigError::Invalid { .. }),
        "not Invalid: {shown}"
    );
    assert_eq!(e.position(), Some(Position { line, column }), "{shown}");
    assert_eq!(e.key(), Some(key), "{shown}");
    let prefix = format!("{FILE}:{line}:{column}: {key}: ");
    assert!(
        shown.starts_with(&prefix),
        "{shown:?} lacks prefix {prefix:?}"
    );
    assert!(shown.contains(needle), "{shown:?} lacks {needle:?}");
    shown
}

/// The byte offset of the first occurrence of `needle` in `text`,
/// as a position — used to check that positions point at the right spot.
fn pos_of(text: &str, needle: &str) -> (usize, usize) {
    let p = Position::of_offset(text, text.find(needle).expect("needle"));
    (p.line, p.column)
}

#[test]
fn load_all_expands_dirs_and_refuses_clashes() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("jobs");
    std::fs::create_dir(&d).unwrap();
    assert!(JobConfig::load_all(std::slice::from_ref(&d))
        .unwrap_err()
        .to_string()
        .contains("no job files"));
    std::fs::write(d.join("b.toml"), "command = [\"b\"]\n").unwrap();
    std::fs::write(d.join("a.toml"), "command = [\"a\"]\n").unwrap();
    std::fs::write(d.join("notes.txt"), "x").unwrap();
    let c = JobConfig::load_all(std::slice::from_ref(&d)).unwrap();
    let names: Vec<&str> = c.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    std::fs::write(
        t.path().join("a2.toml"),
        "name = \"a\"\ncommand = [\"a\"]\n",
    )
    .unwrap();
    let e = JobConfig::load_all(&[d.clone(), t.path().join("a2.toml")]).unwrap_err();
    assert_eq!(e.key(), Some("name"));
    assert!(
        e.to_string().contains("a2.toml") && e.to_string().contains("also used by"),
        "{e}"
    );
    std::fs::write(
        t.path().join("c.toml"),
        "command = [\"c\"]\n[checkpoint]\ndir = \"jobs/.supervise/a/images\"\n",
    )
    .unwrap();
    let e = JobConfig::load_all(&[d, t.path().join("c.toml")]).unwrap_err();
    assert_eq!(e.key(), Some("checkpoint.dir"), "{e}");
}

#[test]
fn slurm_table() {
    let j = parse(
        "command = [\"a\"]\n[slurm]\nsignal = \"USR2\"\nrequeue = false\nfence_wait = \"3s\"\n",
    )
    .unwrap();
    assert_eq!(
        j.slurm,
        SlurmConfig {
            signal: SlurmSignal::Usr2,
            requeue: false,
            fence_wait: Duration::from_secs(3)
        }
    );
    assert_eq!(j.slurm.signal.number(), libc::SIGUSR2);
    assert_eq!(
        parse("command = [\"a\"]\n").unwrap().slurm,
        SlurmConfig::default()
    );
    invalid(
        "command = [\"a\"]\n[slurm]\nsignal = \"TERM\"\n",
        3,
        10,
        "slurm.signal",
        "expected one of: \"USR1\"",
    );
}

// ---- errors ---------------------------------------------------------

#[test]
fn files_table() {
    let j = parse(
        "command = [\"a\"]\n[files]\nsnapshot = [\"state.db\", \"/abs/s\"]\n\
         append = [\"out/results.csv\"]\nexclude = [\"scratch\"]\n",
    )
    .unwrap();
    assert_eq!(
        j.files,
        FilesConfig {
            rollback: true,
            snapshot: vec!["/x/state.db".into(), "/abs/s".into()],
            append: vec!["/x/out/results.csv".into()],
            exclude: vec!["/x/scratch".into()],
        }
    );
    let off = parse("command = [\"a\"]\n[files]\nrollback = false\n").unwrap();
    assert!(!off.files.rollback);
    assert_eq!(
        parse("command = [\"a\"]\n").unwrap().files,
        FilesConfig::default()
    );
}

#[test]
fn files_errors_point_at_the_entry() {
    invalid(
        "command = [\"a\"]\n[files]\nsnapshot = [\"s\"]\nappend = [\"o\", \"./s\"]\n",
        4,
        16,
        "files.append",
        "/x/s is already listed in `files.snapshot`",
    );
    invalid(
        "command = [\"a\"]\n[files]\nexclude = [\"a\", \"a\"]\n",
        3,
        17,
        "files.exclude",
        "listed twice",
    );
    invalid(
        "command = [\"a\"]\n[files]\nsnapshot = \"s\"\n",
        3,
        12,
        "files.snapshot",
        "an array",
    );
    invalid(
        "command = [\"a\"]\n[files]\nsnapshot = [\"\"]\n",
        3,
        13,
        "files.snapshot[0]",
        "must not be empty",
    );
    invalid(
        "command = [\"a\"]\n[files]\nrolback = true\n",
        3,
        1,
        "files.rolback",
        "did you mean `rollback`",
    );
}

#[test]
fn unknown_key_in_checkpoint() {
    let text = "name = \"j\"\ncommand = [\"a\"]\n\n[checkpoint]\nkeep = 2\n\nevry = \"30s\"\n";
    let shown = invalid(text, 7, 1, "checkpoint.evry", "unknown key");
    assert_eq!(
        shown,
        "/x/job.toml:7:1: checkpoint.evry: unknown key (expected one of: every, mtbf, max_overhead, min, max, cron, \
         timezone, dir, keep, shell_job, tcp_established, file_locks, ext_unix_sk, \
         log_level, network_lock, timeout, ghost_limit, skip_in_flight, link_remap, \
         tcp_close, criu_opts, stream); did you mean `every`?"
    );
}

#[test]
fn unknown_keys_in_every_table() {
    invalid(
        "command = [\"a\"]\nbogus = 1\n",
        2,
        1,
        "bogus",
        "unknown key",
    );
    invalid(
        "command = [\"a\"]\ncomand = [\"b\"]\n",
        2,
        1,
        "comand",
        "did you mean `command`?",
    );
    invalid(
        "command = [\"a\"]\n[restore]\n  windw = \"1h\"\n",
        3,
        3,
        "restore.windw",
        "expected one of: on, max_restores, window, backoff, backoff_max",
    );
    invalid(
        "command = [\"a\"]\n[shutdown]\nchekpoint = true\n",
        3,
        1,
        "shutdown.chekpoint",
        "(expected one of: action, checkpoint); did you mean `checkpoint`?",
    );
    // Inline tables and dotted keys, too.
    invalid(
        "command = [\"a\"]\ncheckpoint = { every = \"1s\", kep = 1 }\n",
        2,
        30,
        "checkpoint.kep",
        "did you mean `keep`?",
    );
    invalid(
        "command = [\"a\"]\nshutdown.acton = \"stop\"\n",
        2,
        10,
        "shutdown.acton",
        "unknown key",
    );
    // A sub-table nobody asked for.
    invalid(
        "command = [\"a\"]\n[checkpoint.criu]\nshell_job = true\n",
        2,
        13,
        "checkpoint.criu",
        "unknown key",
    );
    // No suggestion when nothing is close.
    let shown = invalid("command = [\"a\"]\nzzzzzz = 1\n", 2, 1, "zzzzzz", "unknown");
    assert!(!shown.contains("did you mean"), "{shown}");
}

#[test]
fn invalid_duration() {
    let text = "command = [\"a\"]\n[checkpoint]\nevery = \"30 parsecs\"\n";
    let shown = invalid(
        text,
        3,
        9,
        "checkpoint.every",
        "invalid duration \"30 parsecs\": unknown time unit \"parsecs\"",
    );
    assert_eq!((3, 9), pos_of(text, "\"30 parsecs"), "{shown}");
    invalid(
        "command = [\"a\"]\n[checkpoint]\nevery = \"30\"\n",
        3,
        9,
        "checkpoint.every",
        "time unit needed",
    );
    invalid(
        "command = [\"a\"]\n[restore]\nwindow = \"\"\n",
        3,
        10,
        "restore.window",
        "invalid duration \"\"",
    );
    invalid(
        "command = [\"a\"]\n[checkpoint]\ntimeout = \"soon\"\n",
        3,
        11,
        "checkpoint.timeout",
        "invalid duration \"soon\"",
    );
    invalid(
        "command = [\"a\"]\n[restore]\nbackoff = \"1 fortnight\"\n",
        3,
        11,
        "restore.backoff",
        "unknown time unit \"fortnight\"",
    );
}

#[test]
fn duration_minimums() {
    invalid(
        "command = [\"a\"]\n[checkpoint]\nevery = \"0s\"\n",
        3,
        9,
        "checkpoint.every",
        "must be at least 1s",
    );
    invalid(
        "command = [\"a\"]\n[checkpoint]\nevery = \"500ms\"\n",
        3,
        9,
        "checkpoint.every",
        "must be at least 1s (found \"500ms\")",
    );
    invalid(
        "command = [\"a\"]\n[restore]\nwindow = \"0s\"\n",
        3,
        10,
        "restore.window",
        "must be at least 1s",
    );
    invalid(
        "command = [\"a\"]\n[checkpoint]\ntimeout = \"100ms\"\n",
        3,
        11,
        "checkpoint.timeout",
        "must be at least 1s",
    );
    // backoff may be zero (restore at once).
    let j = ok("command = [\"a\"]\n[restore]\nbackoff = \"0s\"\n");
    assert_eq!(j.restore.backoff, Duration::ZERO);
}

#[test]
fn invalid_cron() {
    let text = "command = [\"a\"]\n[checkpoint]\n\ncron = \"*/5 * *\"\n";
    invalid(
        text,
        4,
        8,
        "checkpoint.cron",
        "invalid cron expression \"*/5 * *\": expected 6 or 7 fields",
    );
    // Classic 5-field crontab.
    invalid(
        "command = [\"a\"]\n[checkpoint]\ncron = \"*/5 * * * *\"\n",
        3,
        8,
        "checkpoint.cron",
        "found 5",
    );
    let shown = invalid(
        "command = [\"a\"]\n[checkpoint]\ncron = \"0 */61 * * * *\"\n",
        3,
        8,
        "checkpoint.cron",
        "invalid cron expression \"0 */61 * * * *\": Minutes must be between",
    );
    assert!(!shown.contains('^'), "{shown}");
    invalid(
        "command = [\"a\"]\n[checkpoint]\ncron = \"@dayly\"\n",
        3,
        8,
        "checkpoint.cron",
        "not a valid expression",
    );
    invalid(
        "command = [\"a\"]\n[checkpoint]\ncron = \"0 0 0 1 1 * 2020\"\n",
        3,
        8,
        "checkpoint.cron",
        "never fires again",
    );
}

#[test]
fn wrong_types() {
    let shown = invalid(
        "name = \"j\"\ncommand = \"./counter --x\"\n",
        2,
        11,
        "command",
        "expected an array of strings, found a string",
    );
    assert_eq!(
        shown,
        "/x/job.toml:2:11: command: expected an array of strings, found a string"
    );
    invalid(
        "command = [\"a\", 1]\n",
        1,
        17,
        "command[1]",
        "expected a string, found an integer",
    );
    invalid(
        "command = [\"a\"]\n[checkpoint]\nevery = 30\n",
        3,
        9,
        "checkpoint.every",
        "expected a duration string such as \"30s\", \"5m\" or \"1h 30m\", or \"auto\", found an integer",
    );
    invalid(
        "command = [\"a\"]\n[checkpoint]\nshell_job = \"yes\"\n",
        3,
        13,
        "checkpoint.shell_job",
        "expected a boolean, found a string",
    );
    invalid(
        "command = [\"a\"]\n[checkpoint]\nkeep = 1.5\n",
        3,
        8,
        "checkpoint.keep",
        "expected an integer, found a float",
    );
    invalid(
        "command = [\"a\"]\n[checkpoint]\nkeep = \"3\"\n",
        3,
        8,
        "checkpoint.keep",
        "expected an integer, found a string",
    );
    invalid(
        "command = [\"a\"]\ncheckpoint = 5\n",
        2,
        14,
        "checkpoint",
        "expected a table, found an integer",
    );
    invalid(
        "command = [\"a\"]\n[[restore]]\non = \"never\"\n",
        2,
        1,
        "restore",
        "expected a table, found an array",
    );
    invalid(
        "command = [\"a\"]\n[restore]\non = 3\n",
        3,
        6,
        "restore.on",
        "expected a string, found an integer",
    );
    invalid(
        "attach = \"123\"\n",
        1,
        10,
        "attach",
        "expected a process id (a positive integer), found a string",
    );
    invalid(
        "name = 7\ncommand = [\"a\"]\n",
        1,
        8,
        "name",
        "expected a job name string, found an integer",
    );
    invalid(
        "command = [\"a\"]\nenv = [\"A=1\"]\n",
        2,
        7,
        "env",
        "expected a table of environment variables, found an array",
    );
    invalid(
        "command = [\"a\"]\n[env]\nPORT = 8080\n",
        3,
        8,
        "env.PORT",
        "expected a string (quote numbers, e.g. \"8080\"), found an integer",
    );
    invalid(
        "command = [\"a\"]\ncwd = false\n",
        2,
        7,
        "cwd",
        "expected a path string, found a boolean",
    );
    invalid(
        "command = [\"a\"]\n[shutdown]\ncheckpoint = \"no\"\n",
        3,
        14,
        "shutdown.checkpoint",
        "expected a boolean, found a string",
    );
}

#[test]
fn invalid_choices() {
    invalid(
        "command = [\"a\"]\n[restore]\non = \"sometimes\"\n",
        3,
        6,
        "restore.on",
        "invalid value \"sometimes\" (expected one of: \"failure\", \"always\", \"never\")",
    );
    invalid(
        "command = [\"a\"]\n[shutdown]\naction = \"Stop\"\n",
        3,
        10,
        "shutdown.action",
        "expected one of: \"stop\", \"detach\"",
    );
    invalid(
        "command = [\"a\"]\n[checkpoint]\nnetwork_lock = \"ipfw\"\n",
        3,
        16,
        "checkpoint.network_lock",
        "expected one of: \"iptables\", \"nftables\", \"skip\"",
    );
    invalid(
        "command = [\"a\"]\n[checkpoint]\ncron = \"0 * * * * *\"\ntimezone = \"europe/berlin\"\n",
        4,
        12,
        "checkpoint.timezone",
        "unknown time zone \"europe/berlin\"",
    );
    let shown = invalid(
        "command = [\"a\"]\n[checkpoint]\ncron = \"0 * * * * *\"\ntimezone = \"europe/berlin\"\n",
        4,
        12,
        "checkpoint.timezone",
        "did you mean \"Europe/Berlin\"?",
    );
    assert!(shown.contains("IANA"), "{shown}");
}

#[test]
fn numeric_ranges() {
    invalid(
        "command = [\"a\"]\n[checkpoint]\nkeep = 0\n",
        3,
        8,
        "checkpoint.keep",
        "must be between 1 and 10000 (found 0)",
    );
    invalid(
        "command = [\"a\"]\n[checkpoint]\nkeep = -1\n",
        3,
        8,
        "checkpoint.keep",
        "must be between 1 and 10000 (found -1)",
    );
    invalid(
        "command = [\"a\"]\n[checkpoint]\nlog_level = 5\n",
        3,
        13,
        "checkpoint.log_level",
        "must be between 0 and 4 (found 5)",
    );
    invalid(
        "command = [\"a\"]\n[restore]\nmax_restores = 0\n",
        3,
        16,
        "restore.max_restores",
        "must be between 1 and 10000 (found 0)",
    );
    invalid(
        "command = [\"a\"]\n[restore]\nmax_restores = 5000000000\n",
        3,
        16,
        "restore.max_restores",
        "must be between 1 and 10000 (found 5000000000)",
    );
    invalid("attach = 0\n", 1, 10, "attach", "invalid process id 0");
    invalid("attach = -5\n", 1, 10, "attach", "invalid process id -5");
    invalid(
        "attach = 99999999999\n",
        1,
        10,
        "attach",
        "must be between 1 and 2147483647",
    );
}

#[test]
fn every_auto() {
    let c = ok("command = [\"a\"]\n[checkpoint]\nevery = \"auto\"\nmtbf = \"24h\"\n");
    assert_eq!(
        c.checkpoint.schedule,
        ScheduleSpec::Auto(crate::interval::AutoParams {
            mtbf: Duration::from_secs(86400),
            max_overhead_ppm: None,
            min: DEFAULT_AUTO_MIN,
            max: DEFAULT_AUTO_MAX,
        })
    );
    let c = ok(
        "command = [\"a\"]\n[checkpoint]\nevery = \"auto\"\nmtbf = \"6h\"\n\
                max_overhead = \"0.5%\"\nmin = \"2s\"\nmax = \"1h\"\n",
    );
    let ScheduleSpec::Auto(p) = c.checkpoint.schedule else {
        panic!("not auto")
    };
    assert_eq!(p.max_overhead_ppm, Some(5_000));
    assert_eq!(
        (p.min, p.max),
        (Duration::from_secs(2), Duration::from_secs(3600))
    );
    invalid(
        "command = [\"a\"]\n[checkpoint]\nevery = \"auto\"\n",
        3,
        9,
        "checkpoint.every",
        "needs `mtbf`",
    );
    invalid(
        "command = [\"a\"]\n[checkpoint]\nevery = \"5m\"\nmtbf = \"1h\"\n",
        4,
        8,
        "checkpoint.mtbf",
        "only valid together with `every = \"auto\"`",
    );
    invalid(
        "command = [\"a\"]\n[checkpoint]\nevery = \"auto\"\nmtbf = \"1h\"\nmax_overhead = \"5\"\n",
        5,
        16,
        "checkpoint.max_overhead",
        "invalid percentage",
    );
    invalid(
        "command = [\"a\"]\n[checkpoint]\nevery = \"auto\"\nmtbf = \"1h\"\nmax_overhead = \"0%\"\n",
        5,
        16,
        "checkpoint.max_overhead",
        "more than 0%",
    );
    invalid(
        "command = [\"a\"]\n[checkpoint]\nevery = \"auto\"\nmtbf = \"1h\"\nmin = \"1h\"\nmax = \"1m\"\n",
        6,
        7,
        "checkpoint.max",
        "must be at least `min` (1h)",
    );
    invalid(
        "command = [\"a\"]\n[checkpoint]\nevery = \"often\"\n",
        3,
        9,
        "checkpoint.every",
        "or \"auto\" to let supervise choose",
    );
}

#[test]
fn every_and_cron_are_mutually_exclusive() {
    let text = "command = [\"a\"]\n\n[checkpoint]\nevery = \"1m\"\ncron = \"0 * * * * *\"\n";
    let shown = invalid(
        text,
        5,
        8,
        "checkpoint.cron",
        "`every` and `cron` are mutually exclusive",
    );
    assert_eq!(
        shown,
        "/x/job.toml:5:8: checkpoint.cron: `every` and `cron` are mutually exclusive \
         (use one of them)"
    );
    // Points at whichever comes second.
    invalid(
        "command = [\"a\"]\n[checkpoint]\ncron = \"0 * * * * *\"\nevery = \"1m\"\n",
        4,
        9,
        "checkpoint.every",
        "mutually exclusive",
    );
}

#[test]
fn timezone_requires_cron() {
    invalid(
        "command = [\"a\"]\n[checkpoint]\ntimezone = \"UTC\"\n",
        3,
        12,
        "checkpoint.timezone",
        "`timezone` is only valid together with `cron`",
    );
    invalid(
        "command = [\"a\"]\n[checkpoint]\nevery = \"1s\"\ntimezone = \"Europe/Berlin\"\n",
        4,
        12,
        "checkpoint.timezone",
        "only valid together with `cron`",
    );
}

#[test]
fn backoff_max_must_not_be_below_backoff() {
    invalid(
        "command = [\"a\"]\n[restore]\nbackoff = \"10s\"\nbackoff_max = \"5s\"\n",
        4,
        15,
        "restore.backoff_max",
        "must be at least `backoff` (10s), found 5s",
    );
    // Only backoff given, above the default backoff_max.
    invalid(
        "command = [\"a\"]\n[restore]\nbackoff = \"10m\"\n",
        3,
        11,
        "restore.backoff",
        "10m exceeds `backoff_max` (5m, the default)",
    );
    // Only backoff_max given, below the default backoff.
    invalid(
        "command = [\"a\"]\n[restore]\nbackoff_max = \"500ms\"\n",
        3,
        15,
        "restore.backoff_max",
        "must be at least `backoff` (1s)",
    );
    let j = ok("command = [\"a\"]\n[restore]\nbackoff = \"2s\"\nbackoff_max = \"2s\"\n");
    assert_eq!(j.restore.backoff_max, Duration::from_secs(2));
}

#[test]
fn command_and_attach() {
    let e = parse("name = \"j\"\n[checkpoint]\nevery = \"1m\"\n").unwrap_err();
    assert_eq!(
        e.to_string(),
        "/x/job.toml: one of `command` or `attach` is required"
    );
    assert_eq!(e.position(), None);
    assert_eq!(e.key(), None);
    assert_eq!(
        parse("").unwrap_err().to_string(),
        "/x/job.toml: one of `command` or `attach` is required"
    );

    invalid(
        "command = [\"a\"]\nattach = 5\n",
        2,
        10,
        "attach",
        "`command` and `attach` are mutually exclusive",
    );
    invalid(
        "attach = 5\ncommand = [\"a\"]\n",
        2,
        11,
        "command",
        "`command` and `attach` are mutually exclusive",
    );
    invalid("command = []\n", 1, 11, "command", "must not be empty");
    invalid(
        "command = [\"\", \"x\"]\n",
        1,
        11,
        "command",
        "the program (first element) must not be an empty string",
    );
    invalid(
        "command = [\"a\", \"b\\u0000\"]\n",
        1,
        17,
        "command[1]",
        "NUL",
    );
}

#[test]
fn launch_only_keys_with_attach() {
    for (text, line, col, key) in [
        ("attach = 5\ncwd = \"x\"\n", 2, 7, "cwd"),
        ("attach = 5\nenv = { A = \"1\" }\n", 2, 13, "env"),
        ("attach = 5\n[env]\nA = \"1\"\n", 3, 5, "env"),
        ("attach = 5\nstdout = \"o\"\n", 2, 10, "stdout"),
        ("attach = 5\nstderr = \"e\"\n", 2, 10, "stderr"),
    ] {
        let msg = format!("`{key}` can only be used with `command`, not with `attach`");
        invalid(text, line, col, key, &msg);
    }
    // An empty env table has no value to point at; still an error.
    let e = parse("attach = 5\nenv = {}\n").unwrap_err();
    assert_eq!(e.key(), Some("env"));
    assert_eq!(
        e.to_string(),
        "/x/job.toml: env: `env` can only be used with `command`, not with `attach`"
    );
}

#[test]
fn names() {
    invalid(
        "name = \"\"\ncommand = [\"a\"]\n",
        1,
        8,
        "name",
        "must not be empty",
    );
    invalid(
        "name = \"my job\"\ncommand = [\"a\"]\n",
        1,
        8,
        "name",
        "invalid job name \"my job\"",
    );
    invalid(
        "name = \"a/b\"\ncommand = [\"a\"]\n",
        1,
        8,
        "name",
        "invalid job name",
    );
    invalid(
        "name = \"..\"\ncommand = [\"a\"]\n",
        1,
        8,
        "name",
        "invalid job name",
    );
    let long = format!("name = \"{}\"\ncommand = [\"a\"]\n", "a".repeat(300));
    invalid(&long, 1, 8, "name", "300 bytes long; the limit is 128");
    let max = format!("name = \"{}\"\ncommand = [\"a\"]\n", "a".repeat(128));
    assert_eq!(ok(&max).name.len(), 128);
    assert_eq!(
        ok("name = \"web-1.prod_x\"\ncommand = [\"a\"]\n").name,
        "web-1.prod_x"
    );

    // Default from the file stem, which must be valid too.
    let e = JobConfig::from_str_at("command = [\"a\"]", Path::new("/x/my job.toml")).unwrap_err();
    assert_eq!(e.key(), Some("name"));
    assert_eq!(e.position(), None);
    assert!(
        e.to_string()
            .starts_with("/x/my job.toml: name: no `name` given"),
        "{e}"
    );
    let j = JobConfig::from_str_at(
        "name = \"ok\"\ncommand = [\"a\"]",
        Path::new("/x/my job.toml"),
    )
    .unwrap();
    assert_eq!(j.name, "ok");
}

#[test]
fn env_keys_and_values() {
    invalid(
        "command = [\"a\"]\nenv = { \"A=B\" = \"x\" }\n",
        2,
        9,
        "env.\"A=B\"",
        "invalid environment variable name \"A=B\"",
    );
    invalid(
        "command = [\"a\"]\nenv = { \"\" = \"x\" }\n",
        2,
        9,
        "env.\"\"",
        "invalid environment variable name",
    );
}

#[test]
fn empty_paths() {
    invalid(
        "command = [\"a\"]\nstate_dir = \"\"\n",
        2,
        13,
        "state_dir",
        "must not be empty",
    );
    invalid(
        "command = [\"a\"]\n[checkpoint]\ndir = \"\"\n",
        3,
        7,
        "checkpoint.dir",
        "must not be empty",
    );
}

#[test]
fn syntax_errors() {
    let e = parse("command = [\"a\"\nname = \"x\"\n").unwrap_err();
    assert!(matches!(e, ConfigError::Syntax { .. }), "{e}");
    assert_eq!(e.position(), Some(Position { line: 2, column: 1 }));
    assert!(
        e.to_string().starts_with("/x/job.toml:2:1: invalid TOML: "),
        "{e}"
    );
    assert!(!e.to_string().contains('\n'), "{e}");

    let e = parse("command = [\"a\"]\ncommand = [\"b\"]\n").unwrap_err();
    assert_eq!(e.position(), Some(Position { line: 2, column: 1 }));
    assert!(e.to_string().contains("duplicate key `command`"), "{e}");

    let e = parse("command = [\"a\"]\n[checkpoint]\nevery = 30s\n").unwrap_err();
    assert!(matches!(e, ConfigError::Syntax { .. }), "{e}");
    assert_eq!(e.position().map(|p| p.line), Some(3));
}

#[test]
fn cannot_read() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.toml");
    let e = JobConfig::load(&missing).unwrap_err();
    assert!(matches!(e, ConfigError::Read { .. }));
    let shown = e.to_string();
    assert!(
        shown.starts_with(&format!(
            "{}: cannot read: No such file or directory",
            missing.display()
        )),
        "{shown}"
    );
    assert_eq!(e.path(), missing);
    assert_eq!(e.position(), None);
}

#[test]
fn columns_count_characters_not_bytes() {
    // "ä" is two bytes; the column of the bad value is in characters.
    let text = "command = [\"a\"]\nenv = { \"ä\" = \"x\", B = 1 }\n";
    invalid(text, 2, 24, "env.B", "found an integer");
    assert_eq!(
        Position::of_offset("ab\ncä", 6),
        Position { line: 2, column: 3 }
    );
    assert_eq!(Position::of_offset("", 0), Position { line: 1, column: 1 });
    assert_eq!(
        Position::of_offset("a\r\nb", 3),
        Position { line: 2, column: 1 }
    );
    // Offsets inside a multi-byte char or past the end are clamped.
    assert_eq!(Position::of_offset("ä", 1), Position { line: 1, column: 1 });
    assert_eq!(
        Position::of_offset("ab", 99),
        Position { line: 1, column: 3 }
    );
}

#[test]
fn crlf_files_report_positions() {
    let text = "command = [\"a\"]\r\n[checkpoint]\r\nevery = \"1 parsec\"\r\n";
    invalid(text, 3, 9, "checkpoint.every", "invalid duration");
}

// ---- defaults and resolution ----------------------------------------

#[test]
fn defaults() {
    let j = JobConfig::from_str_at(
        "command = [\"sleep\", \"100\"]\n",
        Path::new("/x/jobs/counter.toml"),
    )
    .unwrap();
    assert_eq!(j.name, "counter");
    assert_eq!(j.source, PathBuf::from("/x/jobs/counter.toml"));
    assert_eq!(j.base_dir, PathBuf::from("/x/jobs"));
    assert_eq!(j.state_dir, PathBuf::from("/x/jobs/.supervise/counter"));
    assert_eq!(
        j.target,
        Target::Launch(LaunchSpec {
            command: vec!["sleep".into(), "100".into()],
            cwd: "/x/jobs".into(),
            env: BTreeMap::new(),
            stdout: "/x/jobs/.supervise/counter/stdout.log".into(),
            stderr: "/x/jobs/.supervise/counter/stderr.log".into(),
        })
    );
    assert_eq!(
        j.checkpoint,
        CheckpointConfig {
            schedule: ScheduleSpec::Every(Duration::from_secs(300)),
            dir: "/x/jobs/.supervise/counter/images".into(),
            keep: 3,
            criu: CriuOptions {
                shell_job: false,
                tcp_established: false,
                file_locks: false,
                ext_unix_sk: false,
                log_level: 2,
                network_lock: NetworkLock::Nftables,
                ghost_limit: None,
                skip_in_flight: false,
                link_remap: false,
                tcp_close: false,
                pass_through: BTreeMap::new(),
            },
            timeout: None,
            stream: true,
        }
    );
    assert_eq!(
        j.restore,
        RestoreConfig {
            on: RestoreOn::Failure,
            max_restores: 10,
            window: Duration::from_secs(3600),
            backoff: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            lazy: true,
        }
    );
    assert_eq!(
        j.shutdown,
        ShutdownConfig {
            action: ShutdownAction::Stop,
            checkpoint: true
        }
    );

    // Empty tables give the same defaults.
    let k = JobConfig::from_str_at(
        "command = [\"sleep\", \"100\"]\n[checkpoint]\n[restore]\n[shutdown]\n",
        Path::new("/x/jobs/counter.toml"),
    )
    .unwrap();
    assert_eq!(j, k);
}

#[test]
fn all_keys_explicit() {
    let text = r#"
name = "web"
command = ["bin/server", "--port", "80"]
cwd = "app"
env = { A = "1", "B.C" = "two" }
stdout = "/var/log/web.out"
stderr = "logs/web.err"
state_dir = "../state/web"

[checkpoint]
cron = "0 */15 * * * *"
timezone = "Europe/Berlin"
dir = "/srv/images"
keep = 7
shell_job = true
tcp_established = true
file_locks = true
ext_unix_sk = true
log_level = 4
network_lock = "iptables"
timeout = "10m"
ghost_limit = "8MiB"
skip_in_flight = true
link_remap = true
tcp_close = true
criu_opts = { manage_cgroups = true, external = ["mnt[/a]:a"] }

[restore]
on = "always"
max_restores = 3
window = "30m"
backoff = "2s"
backoff_max = "1m"

[shutdown]
action = "detach"
checkpoint = false
"#;
    let j = JobConfig::from_str_at(text, Path::new("/x/jobs/web.toml")).unwrap();
    assert_eq!(j.name, "web");
    assert_eq!(j.state_dir, PathBuf::from("/x/jobs/../state/web"));
    let Target::Launch(l) = &j.target else {
        panic!("not launch")
    };
    assert_eq!(l.cwd, PathBuf::from("/x/jobs/app"));
    assert_eq!(l.command, ["/x/jobs/app/bin/server", "--port", "80"]);
    assert_eq!(l.env.get("A").map(String::as_str), Some("1"));
    assert_eq!(l.env.get("B.C").map(String::as_str), Some("two"));
    assert_eq!(l.stdout, PathBuf::from("/var/log/web.out"));
    assert_eq!(l.stderr, PathBuf::from("/x/jobs/logs/web.err"));
    assert_eq!(
        j.checkpoint.schedule,
        ScheduleSpec::cron("0 */15 * * * *", chrono_tz::Europe::Berlin).unwrap()
    );
    assert_eq!(j.checkpoint.dir, PathBuf::from("/srv/images"));
    assert_eq!(j.checkpoint.keep, 7);
    assert_eq!(
        j.checkpoint.criu,
        CriuOptions {
            shell_job: true,
            tcp_established: true,
            file_locks: true,
            ext_unix_sk: true,
            log_level: 4,
            network_lock: NetworkLock::Iptables,
            ghost_limit: Some(8 << 20),
            skip_in_flight: true,
            link_remap: true,
            tcp_close: true,
            pass_through: BTreeMap::from([
                (
                    "external".to_string(),
                    OptValue::List(vec!["mnt[/a]:a".into()])
                ),
                ("manage_cgroups".to_string(), OptValue::Bool(true)),
            ]),
        }
    );
    assert_eq!(j.checkpoint.timeout, Some(Duration::from_secs(600)));
    assert_eq!(
        j.restore,
        RestoreConfig {
            on: RestoreOn::Always,
            max_restores: 3,
            window: Duration::from_secs(1800),
            backoff: Duration::from_secs(2),
            backoff_max: Duration::from_secs(60),
            lazy: true,
        }
    );
    assert_eq!(
        j.shutdown,
        ShutdownConfig {
            action: ShutdownAction::Detach,
            checkpoint: false
        }
    );
}

#[test]
fn cron_defaults_to_utc() {
    let j = ok("command = [\"a\"]\n[checkpoint]\ncron = \"*/10 * * * * *\"\n");
    match &j.checkpoint.schedule {
        ScheduleSpec::Cron { expr, tz, .. } => {
            assert_eq!(expr, "*/10 * * * * *");
            assert_eq!(*tz, chrono_tz::Tz::UTC);
        }
        other => panic!("{other:?}"),
    }
    let j = ok("command = [\"a\"]\n[checkpoint]\ncron = \"@hourly\"\n");
    assert_eq!(j.checkpoint.schedule.describe(), "cron '@hourly' (UTC)");
}

#[test]
fn every_parses_humantime() {
    let j = ok("command = [\"a\"]\n[checkpoint]\nevery = \"1h 30m\"\n");
    assert_eq!(
        j.checkpoint.schedule,
        ScheduleSpec::Every(Duration::from_secs(5400))
    );
}

#[test]
fn argv0_resolution() {
    let at = |text: &str| match JobConfig::from_str_at(text, Path::new("/x/jobs/j.toml"))
        .unwrap()
        .target
    {
        Target::Launch(l) => l.command[0].clone(),
        t => panic!("{t:?}"),
    };
    assert_eq!(at("command = [\"./counter\"]"), "/x/jobs/counter");
    assert_eq!(
        at("command = [\"./counter\"]\ncwd = \"w\""),
        "/x/jobs/w/counter"
    );
    assert_eq!(at("command = [\"bin/x\"]\ncwd = \"/opt\""), "/opt/bin/x");
    assert_eq!(at("command = [\"../up/x\"]"), "/x/jobs/../up/x");
    assert_eq!(at("command = [\"/usr/bin/env\"]"), "/usr/bin/env");
    assert_eq!(at("command = [\"python3\"]\ncwd = \"w\""), "python3");
}

#[test]
fn relative_job_path_is_made_absolute() {
    let cwd = std::env::current_dir().unwrap();
    let j = JobConfig::from_str_at("command = [\"a\"]\ncwd = \".\"", Path::new("sub/./j.toml"))
        .unwrap();
    assert_eq!(j.source, cwd.join("sub/j.toml"));
    assert_eq!(j.base_dir, cwd.join("sub"));
    assert_eq!(j.state_dir, cwd.join("sub/.supervise/j"));
    let Target::Launch(l) = j.target else {
        panic!()
    };
    assert_eq!(l.cwd, cwd.join("sub"));
    assert!(l.stdout.is_absolute());
}

#[test]
fn attach_target() {
    let j = JobConfig::from_str_at(
        "attach = 4242\nstate_dir = \"st\"\n[checkpoint]\nevery = \"10s\"\n",
        Path::new("/x/a.toml"),
    )
    .unwrap();
    assert_eq!(j.target, Target::Attach { pid: 4242 });
    assert_eq!(j.name, "a");
    assert_eq!(j.state_dir, PathBuf::from("/x/st"));
    assert_eq!(j.checkpoint.dir, PathBuf::from("/x/st/images"));
}

#[test]
fn table_forms_are_equivalent() {
    let standard =
        ok("command = [\"a\"]\n[checkpoint]\nevery = \"1m\"\nkeep = 2\n[env]\nA = \"1\"\n");
    let inline =
        ok("command = [\"a\"]\ncheckpoint = { every = \"1m\", keep = 2 }\nenv = { A = \"1\" }\n");
    let dotted =
        ok("command = [\"a\"]\ncheckpoint.every = \"1m\"\ncheckpoint.keep = 2\nenv.A = \"1\"\n");
    assert_eq!(standard, inline);
    assert_eq!(standard, dotted);
}

#[test]
fn load_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("counter.toml");
    std::fs::write(&path, "command = [\"./counter\"]\nstdout = \"out.log\"\n").unwrap();
    let j = JobConfig::load(&path).unwrap();
    assert_eq!(j.name, "counter");
    assert_eq!(j.source, path);
    assert_eq!(j.base_dir, dir.path());
    let Target::Launch(l) = j.target else {
        panic!()
    };
    assert_eq!(l.command[0], dir.path().join("counter").to_str().unwrap());
    assert_eq!(l.stdout, dir.path().join("out.log"));

    std::fs::write(&path, "command = [\"a\"]\n[checkpoint]\nevery = \"x\"\n").unwrap();
    let e = JobConfig::load(&path).unwrap_err();
    assert!(
        e.to_string()
            .starts_with(&format!("{}:3:9: checkpoint.every: ", path.display())),
        "{e}"
    );
}

#[test]
fn choice_values_round_trip() {
    for (v, s) in NetworkLock::ALL {
        assert_eq!(v.as_str(), *s);
        assert_eq!(v.to_string(), *s);
    }
    assert_eq!(NetworkLock::default(), NetworkLock::Nftables);
    assert_eq!(RestoreOn::default(), RestoreOn::Failure);
    assert_eq!(ShutdownAction::default(), ShutdownAction::Stop);
    assert_eq!(RestoreOn::Never.as_str(), "never");
    assert_eq!(ShutdownAction::Detach.to_string(), "detach");
}

// ---- the reference file ---------------------------------------------

const REFERENCE: &str = include_str!("../../config/reference.toml");

#[test]
fn reference_file_parses() {
    let j = JobConfig::from_str_at(REFERENCE, Path::new("/x/reference.toml")).unwrap();
    assert_eq!(j.name, "reference");
    assert_eq!(j.checkpoint.schedule, ScheduleSpec::Every(DEFAULT_EVERY));
    assert_eq!(j.checkpoint.keep, DEFAULT_KEEP);
    assert_eq!(j.checkpoint.criu, CriuOptions::default());
    assert_eq!(j.restore, RestoreConfig::default());
    assert_eq!(j.shutdown, ShutdownConfig::default());
    // The active values equal the documented defaults where they are
    // defaults.
    assert_eq!(j.state_dir, PathBuf::from("/x/.supervise/reference"));
    assert_eq!(j.checkpoint.dir, j.state_dir.join("images"));
}

/// Uncomments `# key = ...` lines for `keys` and comments out active
/// lines for `drop`.
fn edit_reference(uncomment: &[&str], drop: &[&str]) -> String {
    REFERENCE
        .lines()
        .map(|l| {
            let is =
                |k: &&str| l.starts_with(&format!("{k} =")) || l.starts_with(&format!("# {k} ="));
            if uncomment.iter().any(is) {
                l.trim_start_matches("# ").to_string()
            } else if drop.iter().any(|k| l.starts_with(&format!("{k} ="))) {
                format!("# {l}")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn reference_commented_examples_are_valid() {
    // cron + timezone instead of every, plus timeout.
    let text = edit_reference(
        &[
            "cron", "timezone", "timeout", "snapshot", "append", "exclude",
        ],
        &["every"],
    );
    let j = JobConfig::from_str_at(&text, Path::new("/x/reference.toml")).unwrap();
    assert_eq!(
        j.checkpoint.schedule,
        ScheduleSpec::cron("0 */15 * * * *", chrono_tz::Europe::Berlin).unwrap()
    );
    assert_eq!(j.checkpoint.timeout, Some(Duration::from_secs(600)));

    // attach instead of command (launch-only keys removed).
    // The CRIU options' examples.
    let text = edit_reference(
        &[
            "ghost_limit",
            "manage_cgroups",
            "irmap_scan_paths",
            "external",
        ],
        &[],
    );
    let c = JobConfig::from_str_at(&text, Path::new("/x/reference.toml"))
        .unwrap()
        .checkpoint
        .criu;
    assert_eq!(c.ghost_limit, Some(8 << 20));
    assert_eq!(
        c.pass_through.keys().collect::<Vec<_>>(),
        ["external", "irmap_scan_paths", "manage_cgroups"]
    );

    // every = "auto" with its keys.
    let text = edit_reference(&["mtbf", "max_overhead", "min", "max"], &[])
        .replace("\nevery = \"5m\"\n", "\nevery = \"auto\"\n");
    let j = JobConfig::from_str_at(&text, Path::new("/x/reference.toml")).unwrap();
    assert_eq!(
        j.checkpoint.schedule,
        ScheduleSpec::Auto(crate::interval::AutoParams {
            mtbf: Duration::from_secs(86400),
            max_overhead_ppm: Some(10_000),
            min: DEFAULT_AUTO_MIN,
            max: DEFAULT_AUTO_MAX,
        })
    );

    let text = edit_reference(&["attach"], &["command", "cwd", "env", "stdout", "stderr"]);
    let j = JobConfig::from_str_at(&text, Path::new("/x/reference.toml")).unwrap();
    assert_eq!(j.target, Target::Attach { pid: 12345 });
}

#[test]
fn store_table_defaults_and_errors() {
    let base = "command = [\"x\"]\n";
    let j = JobConfig::from_str_at(base, Path::new("/j/a.toml")).unwrap();
    assert_eq!(
        j.store,
        StoreOptions::new(PathBuf::from("/j/.supervise/a/store.key"))
    );
    assert!(j.store.encryption && j.store.parity);
    let j = JobConfig::from_str_at(
        &format!(
            "{base}[store]\nencryption = false\nkey_file = \"k/key\"\ncopies = 2\n\
             copy_dir = \"/disk2/a\"\nscrub = \"1d\"\nparity = false\n"
        ),
        Path::new("/j/a.toml"),
    )
    .unwrap();
    assert!(!j.store.encryption && !j.store.parity);
    assert_eq!(j.store.key_file, PathBuf::from("/j/k/key"));
    assert_eq!(j.store.copy_dir, Some(PathBuf::from("/disk2/a")));
    assert_eq!(j.store.scrub, Some(Duration::from_secs(86400)));
    let err = |t: &str| {
        JobConfig::from_str_at(&format!("{base}[store]\n{t}"), Path::new("/j/a.toml"))
            .unwrap_err()
            .to_string()
    };
    let e = err("copies = 2\n");
    assert!(
        e.contains("a.toml:3") && e.contains("store.copies") && e.contains("copy_dir"),
        "{e}"
    );
    let e = err("copies = 1\ncopy_dir = \"/x\"\n");
    assert!(
        e.contains("store.copy_dir") && e.contains("only used with"),
        "{e}"
    );
    let e = err("copies = 3\n");
    assert!(e.contains("store.copies"), "{e}");
    let e = err("copies = 2\ncopy_dir = \".supervise/a/images/c\"\n");
    assert!(e.contains("overlaps the image directory"), "{e}");
    let e = err("scrub = \"soon\"\n");
    assert!(e.contains("store.scrub"), "{e}");
    let e = err("encrypt = true\n");
    assert!(e.contains("encrypt"), "{e}");
}

#[test]
fn reference_documents_every_key() {
    let keys = [
        "name",
        "command",
        "attach",
        "cwd",
        "env",
        "stdout",
        "stderr",
        "state_dir",
        "[checkpoint]",
        "every",
        "mtbf",
        "max_overhead",
        "min",
        "max",
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
        "[checkpoint.criu_opts]",
        "[restore]",
        "on",
        "max_restores",
        "window",
        "backoff",
        "backoff_max",
        "[shutdown]",
        "action",
        "checkpoint",
        "[files]",
        "rollback",
        "snapshot",
        "append",
        "exclude",
        "[slurm]",
        "signal",
        "requeue",
        "fence_wait",
        "[store]",
        "encryption",
        "key_file",
        "parity",
        "copies",
        "copy_dir",
        "scrub",
    ];
    for k in keys {
        let documented = REFERENCE.lines().any(|l| {
            l.starts_with(&format!("{k} =")) || l.starts_with(&format!("# {k} =")) || l == k
        });
        assert!(documented, "reference.toml does not show `{k}`");
    }
    // Every pass-through name, refused name and unsupported name is named.
    let names = crate::criu::PASS_THROUGH
        .iter()
        .map(|f| f.name)
        .chain(crate::criu::REFUSED.iter().map(|(n, _)| *n))
        .chain(crate::criu::UNSUPPORTED.iter().map(|(n, _)| *n));
    for n in names {
        let named = REFERENCE.lines().any(|l| {
            l.starts_with('#')
                && l.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .any(|w| w == n || (n.starts_with("tls") && w == "tls"))
        });
        assert!(named, "reference.toml does not name criu_opts field `{n}`");
    }
}

#[test]
fn ghost_limit_sizes() {
    let g = |v: &str| {
        ok(&format!(
            "command = [\"a\"]\n[checkpoint]\nghost_limit = {v}\n"
        ))
        .checkpoint
        .criu
        .ghost_limit
    };
    assert_eq!(g("\"8MiB\""), Some(8 << 20));
    assert_eq!(g("\"8M\""), Some(8 << 20));
    assert_eq!(g("\"64 KiB\""), Some(64 << 10));
    assert_eq!(g("\"3GiB\""), Some(3 << 30));
    assert_eq!(g("4096"), Some(4096));
    assert_eq!(g("0"), Some(0));
    assert_eq!(
        ok("command = [\"a\"]\n[checkpoint]\n")
            .checkpoint
            .criu
            .ghost_limit,
        None
    );

    let text = "command = [\"a\"]\n[checkpoint]\nghost_limit = \"8MB\"\n";
    let shown = invalid(text, 3, 15, "checkpoint.ghost_limit", "unknown unit \"MB\"");
    assert!(shown.contains("KiB"), "{shown}");
    invalid(
        "command = [\"a\"]\n[checkpoint]\nghost_limit = \"4GiB\"\n",
        3,
        15,
        "checkpoint.ghost_limit",
        "too large: at most 4294967295 bytes",
    );
    invalid(
        "command = [\"a\"]\n[checkpoint]\nghost_limit = -1\n",
        3,
        15,
        "checkpoint.ghost_limit",
        "must not be negative",
    );
    invalid(
        "command = [\"a\"]\n[checkpoint]\nghost_limit = \"lots\"\n",
        3,
        15,
        "checkpoint.ghost_limit",
        "invalid size \"lots\"",
    );
    invalid(
        "command = [\"a\"]\n[checkpoint]\nghost_limit = true\n",
        3,
        15,
        "checkpoint.ghost_limit",
        "a size such as \"8MiB\"",
    );
}

#[test]
fn criu_booleans() {
    let c = ok("command = [\"a\"]\n[checkpoint]\nskip_in_flight = true\nlink_remap = true\ntcp_close = true\n")
        .checkpoint
        .criu;
    assert!(c.skip_in_flight && c.link_remap && c.tcp_close);
    invalid(
        "command = [\"a\"]\n[checkpoint]\ntcp_close = \"yes\"\n",
        3,
        13,
        "checkpoint.tcp_close",
        "expected a boolean, found a string",
    );
}

#[test]
fn criu_opts_pass_through() {
    let text = r#"command = ["a"]
[checkpoint]
every = "1m"
[checkpoint.criu_opts]
manage_cgroups = true
cpu_cap = 3
empty_ns = 1073741824
freeze_cgroup = "/sys/fs/cgroup/job"
irmap_scan_paths = ["/data", "/srv"]
enable_fs = []
"#;
    let p = ok(text).checkpoint.criu.pass_through;
    assert_eq!(
        p,
        BTreeMap::from([
            ("cpu_cap".to_string(), OptValue::Int(3)),
            ("empty_ns".to_string(), OptValue::Int(1 << 30)),
            ("enable_fs".to_string(), OptValue::List(vec![])),
            (
                "freeze_cgroup".to_string(),
                OptValue::Str("/sys/fs/cgroup/job".into())
            ),
            (
                "irmap_scan_paths".to_string(),
                OptValue::List(vec!["/data".into(), "/srv".into()])
            ),
            ("manage_cgroups".to_string(), OptValue::Bool(true)),
        ])
    );
}

#[test]
fn criu_opts_unknown_names_are_listed() {
    let text = "command = [\"a\"]\n[checkpoint.criu_opts]\nmanage_cgroup = true\n";
    let shown = invalid(
        text,
        3,
        1,
        "checkpoint.criu_opts.manage_cgroup",
        "unknown key (expected one of: evasive_devices, auto_dedup, ",
    );
    assert!(shown.contains(", irmap_scan_paths, external, "), "{shown}");
    assert!(shown.ends_with("did you mean `manage_cgroups`?"), "{shown}");
    for f in crate::criu::PASS_THROUGH {
        assert!(shown.contains(f.name), "{} missing from {shown}", f.name);
    }
    // Inline tables too, at the key.
    invalid(
        "command = [\"a\"]\n[checkpoint]\ncriu_opts = { bogus = 1 }\n",
        3,
        15,
        "checkpoint.criu_opts.bogus",
        "unknown key",
    );
}

#[test]
fn criu_opts_refuses_what_supervise_sets() {
    for (name, why) in [
        ("pid", "supervise sets the process to dump itself"),
        ("images_dir", "checkpoint.dir"),
        ("leave_running", "leaves the job running"),
        ("notify_scripts", "notifications"),
        ("rst_sibling", "sibling"),
        ("log_file", "stderr"),
        ("ps", "page-server"),
        ("ghost_limit", "use `checkpoint.ghost_limit`"),
        ("tcp_close", "use `checkpoint.tcp_close`"),
        ("shell_job", "use `checkpoint.shell_job`"),
    ] {
        let text = format!("command = [\"a\"]\n[checkpoint.criu_opts]\n{name} = 1\n");
        invalid(
            &text,
            3,
            1,
            &format!("checkpoint.criu_opts.{name}"),
            &format!("`{name}` cannot be set here: "),
        );
        let shown = parse(&text).unwrap_err().to_string();
        assert!(shown.contains(why), "{shown}");
    }
    invalid(
        "command = [\"a\"]\n[checkpoint.criu_opts]\nveths = []\n",
        3,
        1,
        "checkpoint.criu_opts.veths",
        "`veths` is not supported: ",
    );
}

#[test]
fn criu_opts_value_types() {
    let at = |line: &str, needle: &str| {
        let text = format!("command = [\"a\"]\n[checkpoint.criu_opts]\n{line}\n");
        let col = line.find('=').unwrap() + 3;
        let key = line.split_whitespace().next().unwrap();
        invalid(
            &text,
            3,
            col,
            &format!("checkpoint.criu_opts.{key}"),
            needle,
        )
    };
    at(
        "manage_cgroups = \"yes\"",
        "expected a boolean, found a string",
    );
    at(
        "cpu_cap = -1",
        "must be between 0 and 4294967295 (found -1)",
    );
    at("cpu_cap = 4294967296", "must be between 0 and 4294967295");
    at("cpu_cap = \"3\"", "expected");
    at("freeze_cgroup = 3", "expected a string, found an integer");
    at("external = \"mnt[]\"", "expected an array, found a string");
    at("freeze_cgroup = \"a\\u0000b\"", "NUL");
    // An element error points at the element.
    let text = "command = [\"a\"]\n[checkpoint.criu_opts]\nskip_mnt = [\"/a\", 7]\n";
    invalid(
        text,
        3,
        19,
        "checkpoint.criu_opts.skip_mnt[1]",
        "expected a string, found an integer",
    );
}
