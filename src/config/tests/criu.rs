//! CRIU's options: `ghost_limit` sizes, the boolean options, and
//! `[checkpoint.criu_opts]` (passed through, unknown names listed, options
//! supervise sets refused, value types checked).

use super::*;

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
