//! When things happen: the checkpoint schedule (`every`, `auto`, `cron`,
//! `timezone`), durations and their minimums, and the restore back-off.

use super::*;

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
