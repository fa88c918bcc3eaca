//! The running supervisor's local API: a Unix socket that answers
//! `supervise status`, `checkpoint`, `restore`, `stop` and `start`.
//!
//! Protocol: one request per connection, one line of JSON each way
//! ([`Request`] in, [`Response`] out). The socket file is mode 0600 inside a
//! 0700 directory, and the server also checks the peer's credentials
//! (`SO_PEERCRED`): only supervise's own user (and root) are served. The
//! client checks the other way round ([`client`]): the socket's directory
//! must be a trusted location for the caller and the server must run as
//! root or the caller, and answers are printed escaped.
//!
//! Each job's supervisor publishes its [`JobStatus`] on a watch channel (so
//! status never waits for a checkpoint in progress) and takes [`Command`]s
//! on a queue that its task handles between steps (so a command never
//! overlaps a checkpoint or a restore).

pub mod client;
pub mod protocol;
pub mod server;

pub use protocol::{
    AutoStatus, CheckpointSummary, FailureSummary, ImageRow, JobState, JobStatus, Request,
    Response, RestoreSummary, SlurmRun,
};

use std::path::PathBuf;

use chrono::Utc;

use tokio::sync::{mpsc, oneshot, watch};

/// Environment variable overriding the default socket path.
pub const SOCKET_ENV: &str = "SUPERVISE_SOCKET";

/// The node service's socket (root's supervise).
pub const NODE_SOCKET: &str = "/run/supervise/supervise.sock";

/// The default control socket: `$SUPERVISE_SOCKET`, else for root inside
/// a Slurm job `/run/supervise/slurm-<job id>.<restart count>.sock`, else
/// `/run/supervise/supervise.sock` for root and, when it exists (the node
/// service), for every user, else
/// `$XDG_RUNTIME_DIR/supervise/supervise.sock`, else
/// `/tmp/supervise-<uid>/supervise.sock`. Another user can create that
/// last directory first: the server then refuses to bind there and the
/// client to connect (both check it, [`crate::fsutil::check_trusted`]).
pub fn default_socket() -> PathBuf {
    if let Some(p) = std::env::var_os(SOCKET_ENV).filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let uid = nix::unistd::geteuid();
    if uid.is_root() {
        if let Some(ctx) = crate::slurm::SlurmContext::from_env() {
            return ctx.default_socket();
        }
    }
    let node = PathBuf::from(NODE_SOCKET);
    // A user talks to the node service when there is one.
    if uid.is_root() || node.exists() {
        return node;
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").filter(|p| !p.is_empty()) {
        return PathBuf::from(d).join("supervise").join("supervise.sock");
    }
    PathBuf::from(format!("/tmp/supervise-{uid}/supervise.sock"))
}

/// What supervise's own shutdown asks of every job, on a watch channel
/// shared by the job tasks. It is latched ([`request_shutdown`]): the first
/// request wins, so the SIGTERM that systemd sends after an `ExecStop=`
/// that ran `supervise detach-all` does not turn the detach into a stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Shutdown {
    /// Keep supervising.
    #[default]
    No,
    /// SIGTERM/SIGINT: final checkpoint, then stop or detach, as each job's
    /// `[shutdown]` says.
    Configured,
    /// `supervise detach-all`: leave every job running as it is, without a
    /// checkpoint (its `job.json` stays, so a later `supervise run`
    /// re-adopts it), and exit 0.
    DetachAll,
}

/// Latches `how` unless a shutdown is already under way; returns the
/// shutdown in effect.
pub fn request_shutdown(tx: &watch::Sender<Shutdown>, how: Shutdown) -> Shutdown {
    tx.send_if_modified(|cur| {
        if *cur == Shutdown::No {
            *cur = how;
            true
        } else {
            false
        }
    });
    *tx.borrow()
}

/// A command for one job's supervisor task; the answer comes back on the
/// oneshot.
#[derive(Debug)]
pub enum Command {
    /// See [`Request::Checkpoint`].
    Checkpoint(oneshot::Sender<Response>),
    /// See [`Request::Restore`].
    Restore(Option<String>, oneshot::Sender<Response>),
    /// See [`Request::Stop`].
    Stop(bool, oneshot::Sender<Response>),
    /// See [`Request::Start`].
    Start(oneshot::Sender<Response>),
    /// See [`Request::Cancel`]: stop the job (no checkpoint) and end its
    /// supervision.
    Cancel(oneshot::Sender<Response>),
}

/// The control side of one job: its status and its command queue.
#[derive(Debug, Clone)]
pub struct JobHandle {
    /// Job name, unique in this supervise (a submitted job's is
    /// `<user>/<name>`).
    pub name: String,
    /// The name its owner may also use (`<name>` of `<user>/<name>`).
    pub short: String,
    /// The uid of the user the job belongs to: `None` for supervise's
    /// own jobs (its job files), which only root and supervise's user
    /// may control.
    pub owner: Option<u32>,
    /// Latest status.
    pub status: watch::Receiver<JobStatus>,
    /// Commands to its task.
    pub commands: mpsc::Sender<Command>,
}

impl JobHandle {
    /// Marks the job as belonging to user `uid`, named `user`.
    pub fn owned_by(mut self, uid: u32, user: &str, short: &str) -> JobHandle {
        self.owner = Some(uid);
        self.short = short.to_string();
        self.name = format!("{user}/{short}");
        self
    }
}

/// Who is asking, from `SO_PEERCRED`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    /// The peer's uid.
    pub uid: u32,
    /// The uid supervise runs as.
    pub daemon: u32,
}

impl Caller {
    /// root, or the user supervise runs as: every job.
    pub fn is_admin(&self) -> bool {
        self.uid == 0 || self.uid == self.daemon
    }

    /// Whether the caller may see and control `job`.
    pub fn may(&self, job: &JobHandle) -> bool {
        self.is_admin() || job.owner == Some(self.uid)
    }

    /// Whether `name` names `job` for this caller: its full name, or its
    /// short name for its owner.
    pub fn names(&self, job: &JobHandle, name: &str) -> bool {
        job.name == name || (job.owner == Some(self.uid) && job.short == name)
    }
}

/// The supervisor's end of a [`JobHandle`].
#[derive(Debug)]
pub struct JobPort {
    /// Publishes status.
    pub status: watch::Sender<JobStatus>,
    /// Receives commands.
    pub commands: mpsc::Receiver<Command>,
}

/// Creates a connected handle/port pair for a job.
pub fn job_channel(name: &str, images: PathBuf) -> (JobHandle, JobPort) {
    let (stx, srx) = watch::channel(JobStatus::new(name, images));
    let (ctx, crx) = mpsc::channel(8);
    (
        JobHandle {
            name: name.to_string(),
            short: name.to_string(),
            owner: None,
            status: srx,
            commands: ctx,
        },
        JobPort {
            status: stx,
            commands: crx,
        },
    )
}

/// Answers requests; the daemon's implementation knows the jobs and the
/// node service.
pub trait Handler: Send + Sync {
    /// Answers `req` from `caller`; `fds` came with it (`SCM_RIGHTS`).
    fn handle<'a>(
        &'a self,
        caller: Caller,
        req: Request,
        fds: Vec<std::os::fd::OwnedFd>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Response> + Send + 'a>>;

    /// Whether `caller` may use this socket at all (the node service:
    /// every local user, or a group's members).
    fn admits(&self, caller: Caller) -> bool;

    /// How many jobs there are (for `detach-all`'s answer).
    fn jobs(&self) -> usize;
}

/// The jobs of a supervise that is not the node service: a fixed set,
/// controlled by root and supervise's own user only.
pub struct FixedJobs(pub Vec<JobHandle>);

impl Handler for FixedJobs {
    fn handle<'a>(
        &'a self,
        caller: Caller,
        req: Request,
        _fds: Vec<std::os::fd::OwnedFd>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Response> + Send + 'a>> {
        Box::pin(dispatch(&self.0, caller, req))
    }

    fn admits(&self, caller: Caller) -> bool {
        caller.is_admin()
    }

    fn jobs(&self) -> usize {
        self.0.len()
    }
}

/// Builds a job's [`Command`] around the reply channel.
type MakeCommand = Box<dyn FnOnce(oneshot::Sender<Response>) -> Command + Send>;

/// The job `name` for `caller`: `Err` says there is none, or that it is
/// someone else's.
pub fn find<'a>(
    jobs: &'a [JobHandle],
    caller: Caller,
    name: &str,
) -> Result<&'a JobHandle, String> {
    if let Some(h) = jobs.iter().find(|j| caller.names(j, name)) {
        return if caller.may(h) {
            Ok(h)
        } else {
            Err(format!(
                "permission denied: job {name} belongs to another user"
            ))
        };
    }
    let mine: Vec<&str> = jobs
        .iter()
        .filter(|j| caller.may(j))
        .map(|j| {
            if j.owner == Some(caller.uid) {
                j.short.as_str()
            } else {
                j.name.as_str()
            }
        })
        .collect();
    Err(format!(
        "no job named {name:?} ({})",
        if mine.is_empty() {
            "you have no jobs here".to_string()
        } else {
            format!("yours: {}", mine.join(", "))
        }
    ))
}

/// Answers one request against the jobs' handles, for `caller` (who sees
/// and controls only their own jobs, unless root).
pub async fn dispatch(jobs: &[JobHandle], caller: Caller, req: Request) -> Response {
    let err = |m: String| Response::Error { message: m };
    let (name, make): (&str, MakeCommand) = match &req {
        Request::Status => {
            let now = Utc::now();
            return Response::Status {
                jobs: jobs
                    .iter()
                    .filter(|j| caller.may(j))
                    .map(|j| {
                        let mut s = j.status.borrow().clone();
                        s.uptime_s = s
                            .since
                            .filter(|_| s.pid.is_some())
                            .map(|t| (now - t).num_milliseconds() as f64 / 1000.0);
                        s
                    })
                    .collect(),
            };
        }
        Request::Checkpoint { job } => (job, Box::new(Command::Checkpoint)),
        Request::Restore { job, image } => {
            let image = image.clone();
            (job, Box::new(move |tx| Command::Restore(image, tx)))
        }
        Request::Stop { job, checkpoint } => {
            let c = *checkpoint;
            (job, Box::new(move |tx| Command::Stop(c, tx)))
        }
        Request::Start { job } => (job, Box::new(Command::Start)),
        Request::Wait { job } => {
            let h = match find(jobs, caller, job) {
                Ok(h) => h,
                Err(e) => return err(e),
            };
            let mut rx = h.status.clone();
            return match rx.wait_for(|s| s.state.is_at_rest()).await {
                Ok(s) => Response::Status {
                    jobs: vec![s.clone()],
                },
                Err(_) => err(format!("job {job} is no longer supervised (cancelled)")),
            };
        }
        Request::DetachAll
        | Request::Submit { .. }
        | Request::Cancel { .. }
        | Request::Images { .. }
        | Request::Verify { .. }
        | Request::Gc { .. } => {
            return err("this request is answered by the control socket's server".into())
        }
    };
    let h = match find(jobs, caller, name) {
        Ok(h) => h,
        Err(e) => return err(e),
    };
    let state = h.status.borrow().state.clone();
    match (&req, &state) {
        (Request::Checkpoint { .. }, JobState::Checkpointing) => {
            return err(format!(
                "job {name}: a checkpoint is already in progress; try again when it is done"
            ))
        }
        (_, JobState::Completed | JobState::Failed(_)) => {
            return err(format!(
                "job {name} is no longer supervised ({})",
                state.describe()
            ))
        }
        _ => {}
    }
    let (tx, rx) = oneshot::channel();
    if h.commands.send(make(tx)).await.is_err() {
        return err(format!("job {name} is no longer supervised"));
    }
    rx.await
        .unwrap_or_else(|_| err(format!("job {name}: its supervisor ended before answering")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT: Caller = Caller { uid: 0, daemon: 0 };

    #[test]
    fn requests_round_trip_as_json_lines() {
        let reqs = [
            (Request::Status, r#"{"op":"status"}"#),
            (
                Request::Checkpoint { job: "a".into() },
                r#"{"op":"checkpoint","job":"a"}"#,
            ),
            (
                Request::Restore {
                    job: "a".into(),
                    image: Some("000001-x".into()),
                },
                r#"{"op":"restore","job":"a","image":"000001-x"}"#,
            ),
            (
                Request::Stop {
                    job: "a".into(),
                    checkpoint: true,
                },
                r#"{"op":"stop","job":"a","checkpoint":true}"#,
            ),
            (
                Request::Start { job: "a".into() },
                r#"{"op":"start","job":"a"}"#,
            ),
        ];
        for (r, text) in reqs {
            assert_eq!(serde_json::to_string(&r).unwrap(), text);
            assert_eq!(serde_json::from_str::<Request>(text).unwrap(), r);
        }
        let r: Request = serde_json::from_str(r#"{"op":"restore","job":"a"}"#).unwrap();
        assert_eq!(
            r,
            Request::Restore {
                job: "a".into(),
                image: None
            }
        );
    }

    #[test]
    fn status_json_shows_state_and_reason() {
        let mut s = JobStatus::new("a", "/img".into());
        s.state = JobState::Failed("gave up".into());
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["state"], "failed");
        assert_eq!(v["reason"], "gave up");
        let back: JobStatus = serde_json::from_value(v).unwrap();
        assert_eq!(back, s);
    }

    #[tokio::test]
    async fn dispatch_routes_refuses_and_reports() {
        let (h, mut port) = job_channel("a", "/img".into());
        let jobs = vec![h];
        // Unknown job.
        let r = dispatch(&jobs, ROOT, Request::Start { job: "b".into() }).await;
        assert!(
            matches!(r, Response::Error { ref message } if message.contains("no job named \"b\"")),
            "{r:?}"
        );
        // Busy checkpointing: refused without queueing.
        port.status
            .send_modify(|s| s.state = JobState::Checkpointing);
        let r = dispatch(&jobs, ROOT, Request::Checkpoint { job: "a".into() }).await;
        assert!(
            matches!(r, Response::Error { ref message } if message.contains("already in progress")),
            "{r:?}"
        );
        assert!(port.commands.try_recv().is_err());
        // Routed to the job's task, which answers.
        port.status.send_modify(|s| s.state = JobState::Running);
        let task = tokio::spawn(async move {
            match port.commands.recv().await {
                Some(Command::Stop(true, tx)) => {
                    let _ = tx.send(Response::Done {
                        message: "stopped".into(),
                    });
                }
                other => panic!("unexpected {other:?}"),
            }
            port
        });
        let r = dispatch(
            &jobs,
            ROOT,
            Request::Stop {
                job: "a".into(),
                checkpoint: true,
            },
        )
        .await;
        assert_eq!(
            r,
            Response::Done {
                message: "stopped".into()
            }
        );
        let port = task.await.unwrap();
        // Ended jobs refuse.
        port.status
            .send_modify(|s| s.state = JobState::Failed("x".into()));
        let r = dispatch(&jobs, ROOT, Request::Start { job: "a".into() }).await;
        assert!(
            matches!(r, Response::Error { ref message } if message.contains("no longer supervised")),
            "{r:?}"
        );
        // Status fills in uptime only for a running job.
        let r = dispatch(&jobs, ROOT, Request::Status).await;
        let Response::Status { jobs: s } = r else {
            panic!()
        };
        assert_eq!(s[0].uptime_s, None);
    }

    #[tokio::test]
    async fn users_see_and_control_only_their_own_jobs() {
        let (a, _pa) = job_channel("alice/sim", "/img".into());
        let a = a.owned_by(1000, "alice", "sim");
        let (b, _pb) = job_channel("bob/sim", "/img".into());
        let b = b.owned_by(1001, "bob", "sim");
        let (r, _pr) = job_channel("rootjob", "/img".into());
        let jobs = vec![a, b, r];
        let alice = Caller {
            uid: 1000,
            daemon: 0,
        };
        let Response::Status { jobs: seen } = dispatch(&jobs, alice, Request::Status).await else {
            panic!()
        };
        assert_eq!(
            seen.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
            ["alice/sim"]
        );
        // Her short name is hers; bob's job and root's are refused.
        assert_eq!(find(&jobs, alice, "sim").unwrap().name, "alice/sim");
        for other in ["bob/sim", "rootjob"] {
            let e = find(&jobs, alice, other).unwrap_err();
            assert!(e.starts_with("permission denied"), "{e}");
            let r = dispatch(&jobs, alice, Request::Start { job: other.into() }).await;
            assert!(
                matches!(&r, Response::Error { message } if message.starts_with("permission denied")),
                "{r:?}"
            );
        }
        assert!(find(&jobs, alice, "nope")
            .unwrap_err()
            .contains("yours: sim"));
        // root sees every job.
        let Response::Status { jobs: seen } = dispatch(&jobs, ROOT, Request::Status).await else {
            panic!()
        };
        assert_eq!(seen.len(), 3);
        assert!(find(&jobs, ROOT, "bob/sim").is_ok());
    }

    #[test]
    fn the_first_shutdown_request_wins() {
        let (tx, rx) = watch::channel(Shutdown::No);
        assert_eq!(
            request_shutdown(&tx, Shutdown::DetachAll),
            Shutdown::DetachAll
        );
        assert_eq!(
            request_shutdown(&tx, Shutdown::Configured),
            Shutdown::DetachAll
        );
        assert_eq!(*rx.borrow(), Shutdown::DetachAll);
        let (tx, _rx) = watch::channel(Shutdown::No);
        assert_eq!(
            request_shutdown(&tx, Shutdown::Configured),
            Shutdown::Configured
        );
        assert_eq!(
            request_shutdown(&tx, Shutdown::DetachAll),
            Shutdown::Configured
        );
    }
}
