//! The control socket's server side.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{info, warn};

use tokio::sync::watch;

use super::{dispatch, request_shutdown, JobHandle, Request, Response, Shutdown};
use crate::admission::{Admission, Limits, Ticket};

/// Errors setting up the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Another supervise already answers on this socket.
    #[error(
        "another supervise is already running with control socket {0} (stop it, or use --socket)"
    )]
    InUse(PathBuf),
    /// The socket's directory is not a trusted location.
    #[error(transparent)]
    Untrusted(#[from] crate::fsutil::TrustError),
    /// The socket could not be created.
    #[error("control socket {path}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
}

/// A bound control socket; removes its file when dropped.
pub struct Server {
    listener: UnixListener,
    path: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// True if `uid` may use a socket owned by `owner`: the same user, or root.
pub fn peer_allowed(uid: u32, owner: u32) -> bool {
    uid == owner || uid == 0
}

impl Server {
    /// Binds `path` (creating its directory 0700), mode 0600. A stale socket
    /// file (nobody answers) is replaced; a live one is an error.
    pub async fn bind(path: &Path) -> Result<Server, ServerError> {
        let ioe = |source| ServerError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            crate::fsutil::ensure_trusted_dir("control socket directory", dir)?;
        }
        if path.exists() {
            if UnixStream::connect(path).await.is_ok() {
                return Err(ServerError::InUse(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(ioe)?;
        }
        // Bind with a restrictive umask so the socket is never reachable by
        // others, not even for an instant.
        // (umask is process-wide: set and restored around bind only.)
        use nix::sys::stat::{umask, Mode};
        let old = umask(Mode::from_bits_truncate(0o177));
        let listener = UnixListener::bind(path);
        umask(old);
        let listener = listener.map_err(ioe)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(ioe)?;
        Ok(Server {
            listener,
            path: path.to_path_buf(),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves requests until the task is dropped. Connections are
    /// admitted through [`Admission`]: caps per listener and per peer uid,
    /// slow clients dropped first, one deadline for a whole request and
    /// one for the whole answer.
    pub async fn serve(self, jobs: Arc<Vec<JobHandle>>, shutdown: Arc<watch::Sender<Shutdown>>) {
        let owner = nix::unistd::geteuid().as_raw();
        let adm = Admission::new("control socket", Limits::control(crate::fdlimit::budget()));
        let mut errors = crate::admission::AcceptErrors::default();
        loop {
            adm.room().await;
            let (stream, _) = match self.listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    errors.note("control socket", &e).await;
                    continue;
                }
            };
            let uid = match stream.peer_cred() {
                Ok(c) => c.uid(),
                Err(_) => continue,
            };
            let jobs = jobs.clone();
            let shutdown = shutdown.clone();
            let limits = adm.limits();
            adm.spawn(stream, uid, move |stream, ticket| async move {
                if let Err(e) = handle(stream, uid, &jobs, &shutdown, owner, limits, ticket).await {
                    warn!(error = %e, "control connection failed");
                }
            });
        }
    }
}

async fn handle(
    stream: UnixStream,
    uid: u32,
    jobs: &[JobHandle],
    shutdown: &watch::Sender<Shutdown>,
    owner: u32,
    limits: Limits,
    ticket: Ticket,
) -> io::Result<()> {
    let (r, mut w) = stream.into_split();
    let reply = |resp: &Response| {
        let mut s = serde_json::to_string(resp).expect("responses serialise");
        s.push('\n');
        s
    };
    // Read the request first even from a refused peer, so it gets the
    // answer rather than a broken pipe; it is never acted upon. One
    // deadline for the whole request, however slowly it trickles in.
    let mut line = String::new();
    let mut reader = BufReader::new(r.take(1 << 16));
    let read = reader.read_line(&mut line);
    match tokio::time::timeout(limits.request, read).await {
        Ok(r) => {
            r?;
        }
        Err(_) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no whole request within {} s", limits.request.as_secs()),
            ))
        }
    }
    ticket.request_read();
    if !peer_allowed(uid, owner) {
        warn!(uid, "control request from another user refused");
        let resp = Response::Error {
            message: format!(
                "permission denied: uid {uid} is not the owner of this supervise (uid {owner})"
            ),
        };
        return send(&mut w, reply(&resp), limits.reply).await;
    }
    let resp = match serde_json::from_str::<Request>(&line) {
        Ok(Request::DetachAll) => {
            info!("control request: detach-all");
            match request_shutdown(shutdown, Shutdown::DetachAll) {
                Shutdown::DetachAll => Response::Done {
                    message: format!(
                        "detaching {} job(s): each is left running, without a checkpoint, once \
                         its current step ends; supervise then exits",
                        jobs.len()
                    ),
                },
                _ => Response::Error {
                    message: "supervise is already shutting down (SIGTERM): final \
                              checkpoints as configured"
                        .into(),
                },
            }
        }
        Ok(req) => {
            info!(?req, "control request");
            dispatch(jobs, req).await
        }
        Err(e) => Response::Error {
            message: format!("malformed request: {e}"),
        },
    };
    send(&mut w, reply(&resp), limits.reply).await
}

/// Writes the whole answer within `deadline`.
async fn send(
    w: &mut tokio::net::unix::OwnedWriteHalf,
    text: String,
    deadline: std::time::Duration,
) -> io::Result<()> {
    let write = async {
        w.write_all(text.as_bytes()).await?;
        w.shutdown().await
    };
    match tokio::time::timeout(deadline, write).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client did not take the answer in time",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_owner_and_root_are_served() {
        assert!(peer_allowed(1000, 1000));
        assert!(peer_allowed(0, 1000));
        assert!(!peer_allowed(1001, 1000));
        assert!(peer_allowed(0, 0));
        assert!(!peer_allowed(65534, 0));
    }

    #[tokio::test]
    async fn bind_is_private_and_refuses_a_live_socket() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("sub/ctl.sock");
        let s = Server::bind(&path).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dmode = std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dmode, 0o700);
        assert!(matches!(
            Server::bind(&path).await,
            Err(ServerError::InUse(_))
        ));
        drop(s);
        assert!(!path.exists(), "socket removed on drop");
        // A stale file is replaced.
        std::fs::write(&path, "").unwrap();
        let s = Server::bind(&path).await.unwrap();
        let jobs = Arc::new(Vec::new());
        let (tx, rx) = tokio::sync::watch::channel(Shutdown::No);
        let task = tokio::spawn(s.serve(jobs, Arc::new(tx)));
        let resp = super::super::client::call(&path, &Request::Status)
            .await
            .unwrap();
        assert_eq!(resp, Response::Status { jobs: vec![] });
        // detach-all latches the shutdown for every job task.
        let resp = super::super::client::call(&path, &Request::DetachAll)
            .await
            .unwrap();
        assert!(matches!(resp, Response::Done { .. }), "{resp:?}");
        assert_eq!(*rx.borrow(), Shutdown::DetachAll);
        task.abort();
    }
}
