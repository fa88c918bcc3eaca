//! Unit tests of the job's files (capture and rollback), by topic (one
//! module each); the fixtures here are shared by all of them.

use super::*;
use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::{Child, Command, Stdio};

mod checked_paths;
mod record_and_rollback;
mod times_and_leases;
mod tracker;

/// A shell that opens files as `script` says, then becomes `sleep`, holding
/// them. Returns once the files are open.
struct Holder {
    child: Child,
}

impl Holder {
    fn new(dir: &Path, script: &str) -> Holder {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(format!(
            "cd '{}' && {script} && echo ready && exec sleep 60",
            dir.display()
        ));
        let h = Holder::spawn(cmd);
        // `exec sleep` keeps the pid; wait until the exec happened so the
        // shell's own state is gone.
        let pid = h.pid();
        for _ in 0..500 {
            if fs::read_to_string(format!("/proc/{pid}/comm"))
                .unwrap_or_default()
                .trim()
                == "sleep"
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        h
    }

    /// Starts `cmd` and returns once it printed "ready".
    fn spawn(mut cmd: Command) -> Holder {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            // Not the test's own stderr: it may be a file (CI logs), which
            // the capture would then rightly record.
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready");
        Holder { child }
    }
    fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn cfg() -> FilesConfig {
    FilesConfig::default()
}

fn record<'a>(s: &'a FileState, dir: &Path, name: &str) -> &'a FileRecord {
    s.files
        .iter()
        .find(|r| r.path == dir.join(name))
        .unwrap_or_else(|| panic!("{name} not recorded: {s:?}"))
}

/// Sets up: a.log (O_APPEND, 3 bytes), b.out (write-only, "hello"),
/// c.state (read-write, "0123456789"), d.ro (read-only), e.skip (excluded),
/// and a listed, absent f.listed. Captures into `img`.
fn captured(dir: &Path) -> (Holder, FileState, FilesConfig, CaptureSummary) {
    fs::write(dir.join("c.state"), "0123456789").unwrap();
    fs::write(dir.join("d.ro"), "ro").unwrap();
    let h = Holder::new(
        dir,
        "exec 3>>a.log 4>b.out 5<>c.state 6<d.ro 7>e.skip && printf abc >&3 && printf hello >&4 && printf x >&7",
    );
    let mut c = cfg();
    c.exclude = vec![dir.join("e.skip")];
    c.snapshot = vec![dir.join("f.listed")];
    let img = dir.join("img");
    fs::create_dir(&img).unwrap();
    let s = capture(&[h.pid()], &c, std::slice::from_ref(&img), &img).unwrap();
    let state = load(&img).unwrap().unwrap();
    (h, state, c, s)
}

/// The job's files in `<t>/job` (see [`captured`]: a.log, b.out, c.state,
/// listed absent f.listed), plus a listed existing g.listed; the image in
/// `<t>/img`, outside the job's directory. After the capture the job wrote
/// on and created the listed absent file, so that every kind of action is
/// due.
fn captured_outside(t: &Path) -> (PathBuf, PathBuf, FilesConfig) {
    captured_outside_with(t, true)
}

/// Like [`captured_outside`]; without `extend`, the job has no a.log and
/// b.out (so that even a rollback by path, which refuses a deleted
/// *extend* file, would get to act on the other files).
fn captured_outside_with(t: &Path, extend: bool) -> (PathBuf, PathBuf, FilesConfig) {
    let dir = t.join("job");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("c.state"), "0123456789").unwrap();
    fs::write(dir.join("g.listed"), "listed at checkpoint").unwrap();
    let script = if extend {
        "exec 3>>a.log 4>b.out 5<>c.state && printf abc >&3 && printf hello >&4"
    } else {
        "exec 5<>c.state"
    };
    let h = Holder::new(&dir, script);
    let mut c = cfg();
    c.snapshot = vec![dir.join("f.listed"), dir.join("g.listed")];
    let img = t.join("img");
    fs::create_dir(&img).unwrap();
    capture(&[h.pid()], &c, std::slice::from_ref(&img), &img).unwrap();
    drop(h);
    let state = load(&img).unwrap().unwrap();
    assert_eq!(state.files.len(), if extend { 5 } else { 3 }, "{state:?}");
    for r in &state.files {
        // `/`, then every directory down to `<t>/job`.
        assert_eq!(
            r.dirs.len(),
            r.path.ancestors().count() - 1,
            "{}: {:?}",
            r.path.display(),
            r.dirs
        );
    }
    if extend {
        append(&dir.join("a.log"), b"def");
        append(&dir.join("b.out"), b" world");
    }
    fs::write(dir.join("c.state"), "99").unwrap();
    fs::write(dir.join("f.listed"), "new").unwrap();
    fs::write(dir.join("g.listed"), "changed").unwrap();
    (dir, img, c)
}

fn append(p: &Path, b: &[u8]) {
    OpenOptions::new()
        .append(true)
        .open(p)
        .unwrap()
        .write_all(b)
        .unwrap();
}
