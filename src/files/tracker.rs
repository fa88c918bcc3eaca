//! Knowing which files the job created, wrote, renamed or deleted since a
//! checkpoint, so that a restore puts back every one of them, not only the
//! files the job held open at the checkpoint.
//!
//! # Mechanism (fanotify, read inside the job's PID namespace)
//! For each run of the job (a launch, or a restore) supervise creates a
//! fanotify group ([`super::watch`]) and marks the job's working
//! directory and the directories below it (at most [`MAX_DIRS`]), the
//! directories of the files listed in `[files] snapshot`, and, from each
//! checkpoint on, those of the files the job has open for writing; a
//! directory the job creates in a watched one is watched from then on.
//! The group's descriptor goes to the job's namespace init (PID 1 of the
//! job's PID namespace, not part of the dumped tree), which reads the
//! events and forwards them, unchanged, on a pipe to supervise. Read
//! there, each event names its process as seen from the job's namespace:
//! a job process has its number (even one that has exited since), any
//! other process (supervise itself, the user's shell, another job) has 0.
//! When the job's root ends, the init kills what is left of the job, reaps
//! it, forwards the last events and only then exits, so nothing the job
//! did before it died is missed.
//!
//! # What is kept
//! The names the job touched ([`Journal`]) are recorded with every
//! checkpoint, with their content (compared with a shadow copy while the
//! job is frozen, copied into the store after, as for open files) or as
//! absent; a restore puts each back by name. A name the job touched only
//! after the image was taken is removed if the job created it, and left
//! (with a warning) otherwise ([`Journal::rollback_plan`]).
//!
//! # Ordering
//! supervise creates a marker file in its own directory (`<run
//! dir>/watch`, also watched): its event comes through the pipe after every
//! event queued before it. A checkpoint waits for its marker while the job
//! is frozen, so it records every change made before the freeze; a run
//! ignores every event before its start marker (the rollback supervise
//! itself did, CRIU's own work during a restore).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use super::journal::{Journal, Plan};
use super::resolve;
use super::watch::{self, Event, Handle, Role};

/// The most directories watched for one job.
pub const MAX_DIRS: usize = 1024;

/// See the module docs.
pub struct Tracker {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    cv: Condvar,
    /// supervise's own directory for the markers.
    sync_dir: PathBuf,
    /// Watched with everything below it.
    cwd: Option<PathBuf>,
    /// Never watched, nor recorded.
    exclude: Vec<PathBuf>,
}

#[derive(Default)]
struct State {
    journal: Journal,
    /// Watched directories, by handle.
    dirs: HashMap<Handle, PathBuf>,
    /// Watched besides the working directory.
    extra: BTreeSet<PathBuf>,
    /// The current run's group.
    group: Option<Arc<OwnedFd>>,
    sync_handle: Option<Handle>,
    run: u64,
    start_name: Option<String>,
    started: bool,
    ended: bool,
    /// Markers asked and seen.
    asked: u64,
    seen: u64,
    /// Warned that the directory limit was reached.
    warned_limit: bool,
    warned_off: bool,
}

/// What the init gets to forward one run's events: the group and the
/// pipe's write end.
pub struct WatchFds {
    /// The fanotify group.
    pub fan: OwnedFd,
    /// The pipe to supervise.
    pub pipe: OwnedFd,
    shared: Arc<Shared>,
    run: u64,
}

impl std::fmt::Debug for WatchFds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WatchFds(run {})", self.run)
    }
}

impl WatchFds {
    /// The run starts now: events queued before are not the job's doing
    /// (supervise's rollback, CRIU's restore). With `reset`, the journal
    /// becomes what the image recorded (a restore) or empty (a launch).
    pub fn start(&self, reset: Option<Vec<PathBuf>>) {
        let name = format!("start-{}", self.run);
        {
            let mut st = lock(&self.shared);
            if st.run != self.run {
                return;
            }
            if let Some(names) = reset {
                st.journal.reset(names);
            }
            st.start_name = Some(name.clone());
        }
        if let Err(e) = touch_marker(&self.shared.sync_dir, &name) {
            warn!(error = %e, "cannot mark the start of watching the job's files; files it changes are not rolled back");
        }
    }
}

fn lock(s: &Shared) -> MutexGuard<'_, State> {
    s.state.lock().unwrap_or_else(|p| p.into_inner())
}

/// Creates and removes `name` in `dir`: a CREATE event in the group.
fn touch_marker(dir: &Path, name: &str) -> io::Result<()> {
    let p = dir.join(name);
    let _ = std::fs::remove_file(&p);
    crate::fsutil::open_rw_nofollow(&p, 0o600)?;
    std::fs::remove_file(&p)
}

impl Tracker {
    /// A tracker for a job whose working directory is `cwd`, also
    /// watching `extra` directories; nothing under `exclude` is watched.
    /// `sync_dir` is supervise's own (trusted) directory for markers.
    pub fn new(
        sync_dir: PathBuf,
        cwd: Option<PathBuf>,
        extra: Vec<PathBuf>,
        exclude: Vec<PathBuf>,
    ) -> Tracker {
        let state = State {
            extra: extra.into_iter().collect(),
            ..State::default()
        };
        Tracker {
            shared: Arc::new(Shared {
                state: Mutex::new(state),
                cv: Condvar::new(),
                sync_dir,
                cwd,
                exclude,
            }),
        }
    }

    /// A new run: a new group with every directory marked, and the reader
    /// of the pipe the init will forward on. `None` (logged once) when
    /// fanotify cannot be used here.
    pub fn begin_run(&self) -> Option<Arc<WatchFds>> {
        match self.try_begin() {
            Ok(w) => Some(Arc::new(w)),
            Err(e) => {
                let mut st = lock(&self.shared);
                if !st.warned_off {
                    st.warned_off = true;
                    warn!(error = %e, "cannot watch the job's directories (fanotify); only the files it has open at a checkpoint are rolled back");
                }
                None
            }
        }
    }

    fn try_begin(&self) -> io::Result<WatchFds> {
        let group = Arc::new(watch::group()?);
        let sync_fd = resolve::open_dir(&self.shared.sync_dir).map_err(walk_io)?;
        watch::mark_dir(&group, &sync_fd)?;
        let sync_handle = watch::handle_of(&sync_fd)?;
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let fan = group.as_fd().try_clone_to_owned()?;
        let mut st = lock(&self.shared);
        st.run += 1;
        st.dirs.clear();
        st.dirs
            .insert(sync_handle.clone(), self.shared.sync_dir.clone());
        st.sync_handle = Some(sync_handle);
        st.group = Some(group);
        st.started = false;
        st.ended = false;
        st.start_name = None;
        st.journal.new_run();
        let roots: Vec<(PathBuf, bool)> = self
            .shared
            .cwd
            .iter()
            .map(|c| (c.clone(), true))
            .chain(st.extra.iter().map(|d| (d.clone(), false)))
            .collect();
        for (root, below) in roots {
            watch_tree(&self.shared, &mut st, &root, below);
        }
        let run = st.run;
        drop(st);
        let shared = self.shared.clone();
        std::thread::Builder::new()
            .name("files-watch".into())
            .spawn(move || read_events(File::from(r), shared, run))?;
        Ok(WatchFds {
            fan,
            pipe: w,
            shared: self.shared.clone(),
            run,
        })
    }

    /// Waits (up to `timeout`) until every change the job made before now
    /// has been read. Call with the job frozen.
    pub fn sync(&self, timeout: Duration) -> Result<(), String> {
        let (run, n) = {
            let mut st = lock(&self.shared);
            if st.group.is_none() {
                // Not watching this run (an adopted job): nothing to wait for.
                return Ok(());
            }
            if st.ended {
                return Err("the job's init stopped forwarding its file events".into());
            }
            st.asked += 1;
            (st.run, st.asked)
        };
        touch_marker(&self.shared.sync_dir, &format!("sync-{run}-{n}"))
            .map_err(|e| format!("cannot write a marker: {e}"))?;
        let (st, timed_out) =
            self.wait_while(timeout, |st| st.seen < n && !st.ended && st.run == run);
        if timed_out {
            return Err(format!(
                "the job's file events did not come through within {timeout:?}"
            ));
        }
        if st.seen < n {
            return Err("the job's init stopped forwarding its file events".into());
        }
        Ok(())
    }

    /// Every name the job touched, for the checkpoint.
    pub fn names(&self) -> Vec<PathBuf> {
        lock(&self.shared).journal.names()
    }

    /// Why the journal may miss changes, if it may.
    pub fn incomplete(&self) -> Option<String> {
        lock(&self.shared).journal.incomplete.clone()
    }

    /// A checkpoint recorded the job's files (the job still frozen): the
    /// directories of the files it recorded are watched from now on, and
    /// what exists now is what existed at the checkpoint.
    pub fn checkpointed(&self, dirs: &[PathBuf]) {
        let mut st = lock(&self.shared);
        for d in dirs {
            if st.group.is_some() && !st.extra.contains(d) && !st.dirs.values().any(|v| v == d) {
                st.extra.insert(d.clone());
                watch_tree(&self.shared, &mut st, d, false);
            }
        }
        st.journal.checkpoint(&exists_now);
    }

    /// The job has ended: waits (up to `timeout`) for the last of its
    /// events (the init forwards them before it exits).
    pub fn end_run(&self, timeout: Duration) {
        let (mut st, timed_out) = self.wait_while(timeout, |st| st.group.is_some() && !st.ended);
        if timed_out {
            st.journal
                .incomplete
                .get_or_insert_with(|| "the job's last file events did not come".into());
        }
        st.group = None;
    }

    /// Waits on the reader's notifications while `cond` holds, up to
    /// `timeout`; true in the second place when the time ran out.
    fn wait_while(
        &self,
        timeout: Duration,
        cond: impl Fn(&State) -> bool,
    ) -> (MutexGuard<'_, State>, bool) {
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.shared);
        while cond(&st) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return (st, true);
            }
            st = self
                .shared
                .cv
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        (st, false)
    }

    /// What a restore of an image recording `recorded` does with the other
    /// names the job touched.
    pub fn plan(&self, recorded: &BTreeSet<PathBuf>) -> Plan {
        lock(&self.shared).journal.rollback_plan(recorded)
    }
}

/// Whether `p` exists, looked at without following any symlink.
fn exists_now(p: &Path) -> bool {
    let Ok((_, name)) = resolve::split(p) else {
        return false;
    };
    match resolve::open_parent(p, &[]) {
        Ok(resolve::Walk::Parent(fd, _)) => matches!(resolve::lstat_at(&fd, name), Ok(Some(_))),
        _ => false,
    }
}

fn walk_io(e: resolve::WalkError) -> io::Error {
    match e {
        resolve::WalkError::Io(_, e) => e,
        other => io::Error::other(format!("{other:?}")),
    }
}

fn excluded(shared: &Shared, p: &Path) -> bool {
    ["/proc", "/sys", "/dev"].iter().any(|x| p.starts_with(x))
        || shared.exclude.iter().any(|x| p.starts_with(x))
}

/// Marks `root` (and, with `below`, the directories under it, breadth
/// first, never through a symlink) up to [`MAX_DIRS`] in all.
fn watch_tree(shared: &Shared, st: &mut State, root: &Path, below: bool) {
    let Some(group) = st.group.clone() else {
        return;
    };
    let mut queue = VecDeque::from([root.to_path_buf()]);
    while let Some(dir) = queue.pop_front() {
        if excluded(shared, &dir) {
            continue;
        }
        if st.dirs.len() > MAX_DIRS {
            if !st.warned_limit {
                st.warned_limit = true;
                warn!(limit = MAX_DIRS, dir = %dir.display(), "watching at most this many of the job's directories; files it changes in the others are not rolled back unless open at a checkpoint");
            }
            return;
        }
        let Ok(fd) = resolve::open_dir(&dir) else {
            continue;
        };
        let marked = watch::mark_dir(&group, &fd).and_then(|()| watch::handle_of(&fd));
        match marked {
            Ok(h) => {
                st.dirs.insert(h, dir.clone());
            }
            Err(e) => {
                debug!(dir = %dir.display(), error = %e, "cannot watch directory");
                continue;
            }
        }
        // What it holds now: names no event will have concerned existed
        // at the checkpoints to come as they do now.
        let Ok(mut d) = nix::dir::Dir::from_fd(fd.as_raw_fd()) else {
            continue;
        };
        std::mem::forget(fd);
        let mut names = Vec::new();
        for e in d.iter().flatten() {
            let n = e.file_name().to_bytes();
            if n == b"." || n == b".." {
                continue;
            }
            let p = dir.join(std::ffi::OsStr::from_bytes(n));
            if below && e.file_type() == Some(nix::dir::Type::Directory) {
                queue.push_back(p.clone());
            }
            names.push(p);
        }
        st.journal.add_listing(names);
    }
}

/// The reader of one run's pipe: applies the events until the init closes
/// it.
fn read_events(mut pipe: File, shared: Arc<Shared>, run: u64) {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        let n = match pipe.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        buf.extend_from_slice(&chunk[..n]);
        match watch::parse(&buf) {
            Ok((events, used)) => {
                let mut st = lock(&shared);
                if st.run == run {
                    for e in &events {
                        apply(&shared, &mut st, e);
                    }
                }
                drop(st);
                shared.cv.notify_all();
                buf.drain(..used);
            }
            Err(e) => {
                let mut st = lock(&shared);
                if st.run == run {
                    st.journal.incomplete = Some(format!("unreadable file events: {e}"));
                }
                break;
            }
        }
    }
    let mut st = lock(&shared);
    if st.run == run {
        st.ended = true;
    }
    drop(st);
    shared.cv.notify_all();
}

/// One event's effect.
fn apply(shared: &Shared, st: &mut State, e: &Event) {
    if e.overflow() {
        st.journal.incomplete = Some("the kernel dropped file events".into());
        return;
    }
    let paths: Vec<(Role, PathBuf, bool)> = e
        .names
        .iter()
        .filter_map(|(role, h, name)| {
            let dir = st.dirs.get(h)?;
            let sync = Some(h) == st.sync_handle.as_ref();
            Some((*role, dir.join(name), sync))
        })
        .collect();
    for (_, p, sync) in &paths {
        if !sync || e.mask & libc::FAN_CREATE == 0 {
            continue;
        }
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if Some(name) == st.start_name.as_deref() {
            st.started = true;
        } else if let Some(n) = name
            .strip_prefix(&format!("sync-{}-", st.run))
            .and_then(|n| n.parse::<u64>().ok())
        {
            st.seen = st.seen.max(n);
        }
    }
    if !st.started || paths.iter().any(|(_, _, s)| *s) {
        return;
    }
    // PID 1 is the init; 0 is any process outside the job's namespace.
    let job = e.pid > 1;
    if e.on_dir() {
        if !job {
            return;
        }
        if e.mask & libc::FAN_CREATE != 0 {
            for (_, p, _) in &paths {
                watch_tree(shared, st, p, true);
            }
        } else if e.mask & libc::FAN_RENAME != 0 {
            let old = paths.iter().find(|(r, ..)| *r == Role::Old);
            let new = paths.iter().find(|(r, ..)| *r == Role::New);
            if let (Some((_, from, _)), Some((_, to, _))) = (old, new) {
                for v in st.dirs.values_mut() {
                    if let Ok(rest) = v.strip_prefix(from) {
                        *v = to.join(rest);
                    }
                }
                st.journal.dir_renamed(from, to);
            }
        }
        return;
    }
    for (role, p, _) in paths {
        if excluded(shared, &p) {
            continue;
        }
        // Whether the name exists after the event.
        let now = match role {
            Role::Old => false,
            Role::New => true,
            Role::Name => e.mask & libc::FAN_DELETE == 0,
        };
        if job {
            st.journal.job_touch(&p, now);
        } else {
            st.journal.outsider_touch(&p, now);
        }
    }
}
