//! The tables: every default, every key set explicitly, the equivalent
//! table forms, and the `[files]`, `[store]` and `[slurm]` tables.

use super::*;

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
            private_tmp: true,
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
            healthy_after: Duration::from_secs(10),
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
healthy_after = "30s"

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
            healthy_after: Duration::from_secs(30),
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
            watch: true,
            snapshot: vec!["/x/state.db".into(), "/abs/s".into()],
            append: vec!["/x/out/results.csv".into()],
            exclude: vec!["/x/scratch".into()],
            views: Vec::new(),
            shadow_dir: None,
        }
    );
    let off = parse("command = [\"a\"]\n[files]\nrollback = false\n").unwrap();
    assert!(!off.files.rollback);
    let unwatched = parse("command = [\"a\"]\n[files]\nwatch = false\n").unwrap();
    assert!(!unwatched.files.watch && unwatched.files.rollback);
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
