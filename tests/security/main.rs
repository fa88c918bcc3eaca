//! Security suite: supervise runs as root next to hostile local users.
//!
//! Each test reproduces an attack by an unprivileged user: the attacker's
//! steps run as uid 65534 (`nobody`, through `setpriv`), against the real
//! binary and real CRIU, and the test checks that supervise neither acted
//! outside its job nor lost the job's progress beyond what the attack
//! could legitimately cost (a refused image, a named error).
//!
//! Modules: `locations` (image/state dirs, scratch, job.json), `store`
//! (non-regular and oversized store files), `files` (file rollback through
//! swapped directories, symlinks and races), `attach` (PID reuse, survivors),
//! `clients` (a planted control socket directory, a fake server, escape
//! sequences in answers), `inputs` (FIFO, `/dev/zero` and oversized job
//! files, unbounded durations, `check` as a user who cannot see the key),
//! `messages` (what a refusal says), `exhaustion` (connection floods, no
//! descriptors left, a squatted metrics port).

#[path = "../common/mod.rs"]
mod common;

mod attach;
mod clients;
mod exhaustion;
mod files;
mod inputs;
mod locations;
mod messages;
mod store;
mod users;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The attacker's uid.
pub const NOBODY: u32 = 65534;

/// `sh -c script` as uid/gid 65534 with no supplementary groups.
pub fn as_nobody(script: &str) -> Command {
    let mut c = Command::new("setpriv");
    c.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--",
        "sh",
        "-c",
        script,
    ]);
    c.stdin(Stdio::null());
    c
}

/// Runs `script` as the attacker and insists that it succeeded.
pub fn nobody(script: &str) -> Output {
    let out = as_nobody(script).output().expect("setpriv");
    assert!(
        out.status.success(),
        "attacker step failed: {script}\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Makes the test's temp dir reachable by the attacker (0755, still
/// root-owned and so still a trusted place for supervise's data).
pub fn open_up(env: &common::Env) {
    fs::set_permissions(env.path(), fs::Permissions::from_mode(0o755)).unwrap();
}

/// A directory owned by the attacker (mode 0755) inside the test's temp dir,
/// as a user's scratch directory on an HPC node.
pub fn attacker_dir(env: &common::Env, name: &str) -> PathBuf {
    open_up(env);
    let d = env.path().join(name);
    fs::create_dir(&d).unwrap();
    chown(&d, NOBODY);
    d
}

/// chown without following a symlink.
pub fn chown(p: &Path, uid: u32) {
    nix::unistd::fchownat(
        None,
        p,
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(uid)),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .unwrap();
}

/// A root-owned file the attacker must not be able to change through
/// supervise: its content, size and mode are checked at the end.
pub struct Canary {
    pub path: PathBuf,
    content: Vec<u8>,
    mode: u32,
}

impl Canary {
    /// Creates `<dir>/<name>` with `size` bytes of a pattern and mode 0600.
    pub fn new(dir: &Path, name: &str, size: usize) -> Canary {
        let path = dir.join(name);
        let content: Vec<u8> = (0..size).map(|i| b"ROOT-ONLY\n"[i % 10]).collect();
        fs::write(&path, &content).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        Canary {
            path,
            content,
            mode: 0o600,
        }
    }

    /// Like [`new`](Self::new), with permission bits `mode`.
    pub fn with_mode(dir: &Path, name: &str, size: usize, mode: u32) -> Canary {
        let mut c = Canary::new(dir, name, size);
        fs::set_permissions(&c.path, fs::Permissions::from_mode(mode)).unwrap();
        c.mode = mode;
        c
    }

    /// Panics unless the file is exactly as created.
    pub fn check(&self) {
        let md = fs::symlink_metadata(&self.path).expect("canary still exists");
        assert!(md.is_file(), "canary {} replaced", self.path.display());
        assert_eq!(
            md.permissions().mode() & 0o7777,
            self.mode,
            "canary {} mode changed",
            self.path.display()
        );
        assert_eq!(md.uid(), 0, "canary owner changed");
        let now = fs::read(&self.path).unwrap();
        assert_eq!(
            now.len(),
            self.content.len(),
            "canary {} size changed",
            self.path.display()
        );
        assert!(
            now == self.content,
            "canary {} content changed",
            self.path.display()
        );
    }
}
