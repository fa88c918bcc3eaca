//! Errors name file, line, column and key: unknown keys, wrong types,
//! invalid choices, numeric ranges, syntax errors, unreadable files, and
//! positions that count characters (and survive CRLF).

use super::*;

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
