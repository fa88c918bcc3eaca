//! The control socket seen from the client's side. Another user (uid
//! 65534, the attacker) plants the directory of a non-root user's default
//! socket, `/tmp/supervise-<uid>/`, with a fake supervise in it, or gets a
//! socket of theirs into a directory that looks fine; the victim (uid
//! 65533, a non-root supervise user: root's default socket lives in
//! root-only `/run/supervise`) must neither talk to it nor print its
//! answer raw. A server running as the victim itself is believed, but its
//! answers reach the terminal with their control characters escaped.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::common::{kill, wait_until, Env, BIN, T};
use crate::{attacker_dir, chown, nobody, open_up, NOBODY};

/// The victim: a non-root user of supervise, other than the attacker.
pub const VICTIM: u32 = 65533;

/// How long any client command may take before the test fails.
pub const BOUND: Duration = Duration::from_secs(20);

/// `supervise ARGS` as `uid`, with no socket given by the environment (so
/// the default applies) and no Slurm context.
pub fn supervise_as(uid: u32, args: &[&str]) -> Command {
    let mut c = Command::new("setpriv");
    c.args([
        format!("--reuid={uid}"),
        format!("--regid={uid}"),
        "--clear-groups".into(),
        "--".into(),
        BIN.into(),
    ])
    .args(args)
    .env_remove("XDG_RUNTIME_DIR")
    .env_remove("SUPERVISE_SOCKET")
    .env_remove("SLURM_JOB_ID")
    .current_dir("/");
    c
}

/// Runs `cmd` to its end, failing the test if it takes longer than
/// `limit` (the process is then killed).
pub fn bounded(mut cmd: Command, limit: Duration) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().expect("spawn");
    let pid = child.id() as i32;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.expect("wait"),
        Err(_) => {
            kill(pid, libc::SIGKILL);
            let _ = rx.recv_timeout(Duration::from_secs(5));
            panic!("{cmd:?} did not finish within {limit:?}");
        }
    }
}

/// Its stderr, which must be exactly one line.
pub fn one_line(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err:?}");
    err
}

/// A fake supervise: a Unix socket server run as `uid` (Python), that
/// answers every request with `reply` and logs each connection
/// ("connection: N bytes") to `<dir>/fake.log`. Killed when dropped.
struct Fake {
    child: Child,
    log: PathBuf,
}

const FAKE: &str = r#"
import os, socket, sys
path, ready, log, reply = sys.argv[1:5]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(path)
os.chmod(path, 0o777)  # anyone may connect: the attacker wants victims
s.listen(16)
open(ready, "w").close()
while True:
    c, _ = s.accept()
    c.settimeout(5)
    data = b""
    try:
        while not data.endswith(b"\n"):
            chunk = c.recv(4096)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    with open(log, "a") as f:
        f.write("connection: %d bytes\n" % len(data))
    if data:
        try:
            c.sendall(reply.encode() + b"\n")
        except OSError:
            pass
    c.close()
"#;

impl Fake {
    /// Starts the server on `sock`; `dir` (writable by `uid`) holds its
    /// ready marker and log.
    fn start(uid: u32, sock: &Path, dir: &Path, reply: &str) -> Fake {
        let name = sock.file_name().unwrap().to_string_lossy().into_owned();
        let ready = dir.join(format!("{name}.ready"));
        let log = dir.join(format!("{name}.log"));
        let child = Command::new("setpriv")
            .args([
                format!("--reuid={uid}"),
                format!("--regid={uid}"),
                "--clear-groups".into(),
                "--".into(),
                "/usr/bin/python3".into(),
                "-c".into(),
                FAKE.into(),
            ])
            .arg(sock)
            .arg(&ready)
            .arg(&log)
            .arg(reply)
            .stdin(Stdio::null())
            .spawn()
            .expect("python3");
        let fake = Fake { child, log };
        wait_until("the fake server", T, || ready.exists());
        fake
    }

    /// What the server logged (one line per connection).
    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Removes a directory (and what is in it) when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A directory owned by the victim, mode 0700, in the test's temp dir.
fn victim_dir(env: &Env, name: &str) -> PathBuf {
    open_up(env);
    let d = env.path().join(name);
    fs::create_dir(&d).unwrap();
    fs::set_permissions(&d, fs::Permissions::from_mode(0o700)).unwrap();
    chown(&d, VICTIM);
    d
}

const EVIL_DONE: &str = r#"{"result":"done","message":"\u001b[2J\u001b]0;owned\u0007stopped"}"#;

/// The attack as found: the attacker creates the victim's default socket
/// directory `/tmp/supervise-<victim>/` first and serves a fake
/// supervise there. Every client command of the victim refuses it before
/// connecting, in one line naming the path, its owner and mode (exit 2),
/// and the fake server never hears from it.
#[test]
#[cfg_attr(not(root), ignore = "needs root")]
fn planted_default_socket_directory_is_refused() {
    let dir = PathBuf::from(format!("/tmp/supervise-{VICTIM}"));
    // uid 65533 is this test's: a directory left by an earlier, killed run
    // of it goes first.
    let _ = fs::remove_dir_all(&dir);
    let _cleanup = RemoveOnDrop(dir.clone());
    nobody(&format!("mkdir -m 0755 {}", dir.display()));
    let sock = dir.join("supervise.sock");
    let fake = Fake::start(NOBODY, &sock, &dir, EVIL_DONE);
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["stop", "job"],
        &["checkpoint", "job"],
        &["detach-all"],
    ] {
        let out = bounded(supervise_as(VICTIM, args), BOUND);
        let err = one_line(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.starts_with(&format!(
                "supervise: refusing to use control socket {}: ",
                sock.display()
            )) && err.contains(&format!(
                "{} is a directory owned by uid 65534 (nobody) with mode 0755",
                dir.display()
            )),
            "{args:?}: {err}"
        );
        assert!(out.stdout.is_empty(), "{args:?}");
        assert!(!out.stderr.contains(&0x1b), "{args:?}: {err}");
    }
    assert_eq!(fake.log(), "", "the client connected to the fake server");
}

/// The same planted directory given with `--socket`, in a temp dir of
/// the attacker's.
#[test]
#[cfg_attr(not(root), ignore = "needs root")]
fn socket_in_a_directory_of_another_user_is_refused() {
    let env = Env::new();
    let scratch = attacker_dir(&env, "scratch");
    let sock = scratch.join("s.sock");
    let fake = Fake::start(NOBODY, &sock, &scratch, EVIL_DONE);
    let out = bounded(
        supervise_as(
            VICTIM,
            &["--socket", &sock.display().to_string(), "stop", "j"],
        ),
        BOUND,
    );
    let err = one_line(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!(
            "{} is a directory owned by uid 65534 (nobody) with mode 0755",
            scratch.display()
        )),
        "{err}"
    );
    assert_eq!(fake.log(), "");
}

/// A socket in a directory that passes the check (the victim's own, 0700)
/// but answered by the attacker's process: the server's uid
/// (`SO_PEERCRED`) is neither root nor the victim, so nothing is sent.
/// (Only root could have put it there; the check does not rely on that.)
#[test]
#[cfg_attr(not(root), ignore = "needs root")]
fn server_of_another_user_is_refused_by_its_credentials() {
    let env = Env::new();
    let attacker = attacker_dir(&env, "attacker");
    let mine = victim_dir(&env, "victim");
    let fake = Fake::start(NOBODY, &attacker.join("fake.sock"), &attacker, EVIL_DONE);
    let sock = mine.join("supervise.sock");
    fs::rename(attacker.join("fake.sock"), &sock).unwrap();
    for args in [&["status"][..], &["stop", "job"]] {
        let mut all = vec!["--socket", sock.to_str().unwrap()];
        all.extend_from_slice(args);
        let out = bounded(supervise_as(VICTIM, &all), BOUND);
        let err = one_line(&out);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert_eq!(
            err.trim_end(),
            format!(
                "supervise: refusing to use control socket {}: it is served by uid 65534 \
                 (nobody), which is neither root nor you (uid {VICTIM}); nothing was sent",
                sock.display()
            )
        );
        assert!(out.stdout.is_empty());
    }
    // The server saw the two connections, and not one byte of a request.
    wait_until("the fake server's log", T, || {
        fake.log().lines().count() == 2
    });
    assert_eq!(fake.log(), "connection: 0 bytes\nconnection: 0 bytes\n");
}

/// A server the victim may believe (running as the victim) still cannot
/// drive the victim's terminal: its answers are printed with every control
/// character escaped: messages, errors, the status table and the JSON.
#[test]
#[cfg_attr(not(root), ignore = "needs root")]
fn answers_are_printed_with_control_characters_escaped() {
    let env = Env::new();
    let mine = victim_dir(&env, "victim");
    let ask = |sock: &Path, args: &[&str]| {
        let mut all = vec!["--socket", sock.to_str().unwrap()];
        all.extend_from_slice(args);
        let out = bounded(supervise_as(VICTIM, &all), BOUND);
        assert!(!out.stdout.contains(&0x1b) && !out.stderr.contains(&0x1b));
        out
    };
    // Done: exit 0, the message on stdout, escaped.
    let done = Fake::start(VICTIM, &mine.join("done.sock"), &mine, EVIL_DONE);
    let out = ask(&mine.join("done.sock"), &["stop", "job"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "\\x1b[2J\\x1b]0;owned\\x07stopped\n"
    );
    drop(done);
    // Error: exit 1, one line on stderr (a newline cannot fake a second
    // message), 8-bit CSI escaped.
    let _err = Fake::start(
        VICTIM,
        &mine.join("err.sock"),
        &mine,
        r#"{"result":"error","message":"no\nsupervise: checkpoint published\u009b2J"}"#,
    );
    let out = ask(&mine.join("err.sock"), &["checkpoint", "job"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        one_line(&out),
        "supervise: no\\x0asupervise: checkpoint published\\u{9b}2J\n"
    );
    // Status: the table and the JSON.
    let _status = Fake::start(
        VICTIM,
        &mine.join("status.sock"),
        &mine,
        r#"{"result":"status","jobs":[{"name":"\u001b[31mevil","state":"running","restores":0,"checkpoints":0,"images":"/x","last_error":"a\u001b[2Jb\u009b"}]}"#,
    );
    let out = ask(&mine.join("status.sock"), &["status"]);
    assert_eq!(out.status.code(), Some(0));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("\\x1b[31mevil"), "{table}");
    assert!(
        table.contains("  last error: a\\x1b[2Jb\\u{9b}\n"),
        "{table}"
    );
    let out = ask(&mine.join("status.sock"), &["status", "--json"]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(!text.contains('\u{9b}'), "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v[0]["name"], "\u{1b}[31mevil");
    assert_eq!(v[0]["last_error"], "a\u{1b}[2Jb\u{9b}");
}
