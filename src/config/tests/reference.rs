//! `config/reference.toml`: it parses, its commented-out examples are
//! valid, and it documents every key.

use super::*;

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
