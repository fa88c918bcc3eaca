//! Helpers for tests of the node service (`supervise run --service`):
//! its configuration and socket in the test's dir, users' homes, commands
//! as a user.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use super::{prog, Env, Sup, TestUser, BIN, T};

/// The service's files in the test's dir: its configuration, users' area
/// and socket.
pub struct Node {
    pub config: PathBuf,
    pub socket: PathBuf,
    pub users: PathBuf,
}

pub fn node(env: &Env, limits: &str) -> Node {
    fs::set_permissions(env.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let users = env.path().join("users");
    let config = env.path().join("supervise.toml");
    fs::write(
        &config,
        format!(
            "[service]\nusers_dir = \"{}\"\n[limits]\n{limits}\n",
            users.display()
        ),
    )
    .unwrap();
    Node {
        config,
        socket: env.path().join("run").join("supervise.sock"),
        users,
    }
}

/// The service of cluster node `name` (`[service] node`), its users'
/// area `users` shared with the other nodes' services, its socket
/// `<env>/run-<name>/supervise.sock`.
pub fn node_named(env: &Env, name: &str, users: &Path) -> Node {
    fs::set_permissions(env.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let config = env.path().join(format!("{name}.toml"));
    fs::write(
        &config,
        format!(
            "[service]\nusers_dir = \"{}\"\nnode = \"{name}\"\n",
            users.display()
        ),
    )
    .unwrap();
    Node {
        config,
        socket: env
            .path()
            .join(format!("run-{name}"))
            .join("supervise.sock"),
        users: users.to_path_buf(),
    }
}

pub fn start(env: &Env, n: &Node) -> Sup {
    // The log is named after the last argument: the configuration's name.
    let sup = env.start_with(&[
        OsStr::new("--service"),
        OsStr::new("--socket"),
        n.socket.as_os_str(),
        OsStr::new("--config"),
        n.config.as_os_str(),
    ]);
    sup.wait_for("control socket ready", 1, T);
    sup
}

/// A directory of `u`'s in the test's dir.
pub fn home(env: &Env, u: &TestUser) -> PathBuf {
    let d = env.path().join(&u.name);
    fs::create_dir_all(&d).unwrap();
    nix::unistd::chown(
        &d,
        Some(nix::unistd::Uid::from_raw(u.uid)),
        Some(nix::unistd::Gid::from_raw(u.gid)),
    )
    .unwrap();
    d
}

/// `supervise ARGS` as user `u`, in directory `cwd`.
pub fn as_user(u: &TestUser, n: &Node, cwd: &Path, args: &[&str]) -> Output {
    Command::new("setpriv")
        .args([
            &format!("--reuid={}", u.uid),
            &format!("--regid={}", u.gid),
            "--init-groups",
            "--",
            BIN,
        ])
        .arg("--socket")
        .arg(&n.socket)
        .args(args)
        .current_dir(cwd)
        .env_remove("SUPERVISE_SOCKET")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A counter job file of `u`'s in `dir`.
pub fn job_file(u: &TestUser, dir: &Path, name: &str, extra: &str) -> PathBuf {
    let p = dir.join(format!("{name}.toml"));
    let stdout = if extra.contains("stdout") {
        String::new()
    } else {
        format!("stdout = \"{name}.out\"\n")
    };
    fs::write(
        &p,
        format!(
            "command = [\"{}\", \"100\"]\n{stdout}{extra}\n[checkpoint]\nevery = \"1h\"\n[restore]\nbackoff = \"0s\"\n",
            prog("counter")
        ),
    )
    .unwrap();
    nix::unistd::chown(&p, Some(nix::unistd::Uid::from_raw(u.uid)), None).unwrap();
    p
}

/// SIGKILLs the job's root (its pid from status).
pub fn kill_job(sup: &Sup, job: &str) {
    let pid = sup.job_status(job)["pid"].as_i64().unwrap() as i32;
    super::kill(pid, libc::SIGKILL);
}

pub fn uid_of(pid: i64) -> u32 {
    fs::metadata(format!("/proc/{pid}")).unwrap().uid()
}
