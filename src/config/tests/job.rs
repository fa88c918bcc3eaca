//! The job itself: `command` or `attach`, its name, environment and paths,
//! and job files loaded from disk (one file, or every `*.toml` of a
//! directory).

use super::*;

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
