//! The control socket's server side.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tracing::{info, warn};

use tokio::sync::watch;

use super::{request_shutdown, Caller, Handler, Request, Response, Shutdown};
use crate::admission::{Admission, Limits, Ticket};
use std::os::fd::OwnedFd;

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

    /// Opens the socket to every local user (the node service: each
    /// request is authorized per job, [`Caller`]), or to the members of
    /// `group`: the directory becomes 0755, the socket 0666 (0660 with
    /// the group's ownership).
    pub fn open_to_users(&self, group: Option<u32>) -> Result<(), ServerError> {
        let ioe = |source| ServerError::Io {
            path: self.path.clone(),
            source,
        };
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).map_err(ioe)?;
        }
        let mode = match group {
            Some(gid) => {
                nix::unistd::chown(&self.path, None, Some(nix::unistd::Gid::from_raw(gid)))
                    .map_err(|e| ioe(e.into()))?;
                0o660
            }
            None => 0o666,
        };
        std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(mode)).map_err(ioe)?;
        Ok(())
    }

    /// Serves requests until the task is dropped, each answered by
    /// `handler` for the caller `SO_PEERCRED` names (but `detach-all`,
    /// which this server answers: root's and supervise's user's only).
    /// Connections are admitted through [`Admission`]: caps per listener
    /// and per peer uid, slow clients dropped first, one deadline for a
    /// whole request and one for the whole answer.
    pub async fn serve(self, handler: Arc<dyn Handler>, shutdown: Arc<watch::Sender<Shutdown>>) {
        let daemon = nix::unistd::geteuid().as_raw();
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
            let handler = handler.clone();
            let shutdown = shutdown.clone();
            let limits = adm.limits();
            let caller = Caller { uid, daemon };
            adm.spawn(stream, uid, move |stream, ticket| async move {
                if let Err(e) = handle(stream, caller, &*handler, &shutdown, limits, ticket).await {
                    warn!(error = %e, "control connection failed");
                }
            });
        }
    }
}

/// Largest request (a submitted job file is at most 1 MiB).
const MAX_REQUEST: usize = 2 << 20;
/// Descriptors a request may carry.
const MAX_FDS: usize = 4;

/// Reads one request line with the descriptors sent along with it.
async fn read_request(stream: &UnixStream) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let mut line = Vec::new();
    let mut fds = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        stream.readable().await?;
        let r = stream.try_io(tokio::io::Interest::READABLE, || {
            let mut iov = [std::io::IoSliceMut::new(&mut buf)];
            let mut space = nix::cmsg_space!([std::os::fd::RawFd; MAX_FDS]);
            let msg = nix::sys::socket::recvmsg::<()>(
                stream.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                nix::sys::socket::MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(io::Error::from)?;
            let mut got = Vec::new();
            for c in msg.cmsgs().map_err(io::Error::from)? {
                if let nix::sys::socket::ControlMessageOwned::ScmRights(r) = c {
                    got.extend(r);
                }
            }
            Ok((msg.bytes, got))
        });
        let (n, got) = match r {
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        for fd in got {
            // SAFETY: descriptors the kernel just installed for us.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            if fds.len() < MAX_FDS {
                fds.push(fd);
            }
        }
        line.extend_from_slice(&buf[..n]);
        if n == 0 || line.contains(&b'\n') {
            break;
        }
        if line.len() > MAX_REQUEST {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request larger than 2 MiB",
            ));
        }
    }
    if let Some(i) = line.iter().position(|&b| b == b'\n') {
        line.truncate(i);
    }
    Ok((line, fds))
}

async fn handle(
    mut stream: UnixStream,
    caller: Caller,
    handler: &dyn Handler,
    shutdown: &watch::Sender<Shutdown>,
    limits: Limits,
    ticket: Ticket,
) -> io::Result<()> {
    let reply = |resp: &Response| {
        let mut s = serde_json::to_string(resp).expect("responses serialise");
        s.push('\n');
        s
    };
    // Read the request first even from a refused peer, so it gets the
    // answer rather than a broken pipe; it is never acted upon. One
    // deadline for the whole request, however slowly it trickles in.
    let (line, fds) = match tokio::time::timeout(limits.request, read_request(&stream)).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no whole request within {} s", limits.request.as_secs()),
            ))
        }
    };
    ticket.request_read();
    if !handler.admits(caller) {
        warn!(
            uid = caller.uid,
            "control request from another user refused"
        );
        let resp = Response::Error {
            message: format!(
                "permission denied: uid {} may not use this supervise (uid {})",
                caller.uid, caller.daemon
            ),
        };
        return send(&mut stream, reply(&resp), limits.reply).await;
    }
    let resp = match serde_json::from_slice::<Request>(&line) {
        Ok(Request::DetachAll) if !caller.is_admin() => Response::Error {
            message: "permission denied: only root may detach every job".into(),
        },
        Ok(Request::DetachAll) => {
            info!("control request: detach-all");
            match request_shutdown(shutdown, Shutdown::DetachAll) {
                Shutdown::DetachAll => Response::Done {
                    message: format!(
                        "detaching {} job(s): each is left running, without a checkpoint, once \
                         its current step ends; supervise then exits",
                        handler.jobs()
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
            match &req {
                Request::Submit { path, .. } => {
                    info!(uid = caller.uid, path = %path.display(), "control request: submit")
                }
                r => info!(uid = caller.uid, req = ?r, "control request"),
            }
            handler.handle(caller, req, fds).await
        }
        Err(e) => Response::Error {
            message: format!("malformed request: {e}"),
        },
    };
    send(&mut stream, reply(&resp), limits.reply).await
}

/// Writes the whole answer within `deadline`.
async fn send(w: &mut UnixStream, text: String, deadline: std::time::Duration) -> io::Result<()> {
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
        let jobs = Arc::new(super::super::FixedJobs(Vec::new()));
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
