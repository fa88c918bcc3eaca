//! The control socket's client side (`supervise status` and friends).
//!
//! The client trusts the socket no more than the server trusts its caller:
//! before connecting it checks that the socket's directory is a trusted
//! location for the caller (owned by root or the caller, not writable by
//! group or others, all the way up: [`crate::fsutil::check_trusted`]), so
//! that a directory another user planted at the default path
//! (`/tmp/supervise-<uid>/`) is refused; after connecting it checks the
//! server's uid (`SO_PEERCRED`): only root and the caller's own user are
//! believed. Nothing is sent before both checks pass. Whatever the server
//! answers is printed with its control characters escaped
//! ([`escape_controls`]), so an answer cannot drive the terminal.

use std::borrow::Cow;
use std::io;
use std::path::{Path, PathBuf};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::{Request, Response};
use crate::fsutil::{self, TrustError};

/// Longest answer read from the server (a status of thousands of jobs fits
/// many times over); a longer one is refused as malformed.
pub const MAX_ANSWER: u64 = 64 << 20;

/// Errors talking to a running supervise.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nobody listens on the socket.
    #[error("no supervise is running with control socket {path} ({source}); start one with `supervise run JOB.toml`, or pass --socket / set SUPERVISE_SOCKET")]
    NotRunning {
        /// The socket path.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// The socket (or its directory) is not ours to use.
    #[error("permission denied: {path}: only root and the user supervise runs as may use its control socket")]
    PermissionDenied {
        /// The socket path.
        path: PathBuf,
    },
    /// The socket's directory is not a trusted location for the caller:
    /// someone else could have put a socket (and a fake supervise) there.
    #[error("refusing to use control socket {path}: {source}; another user may have created it to impersonate supervise: have it removed, or use --socket or SUPERVISE_SOCKET")]
    Untrusted {
        /// The socket path.
        path: PathBuf,
        /// Which directory fails the rule, its owner and mode.
        source: TrustError,
    },
    /// The process answering on the socket runs as neither root nor the
    /// caller's own user.
    #[error("refusing to use control socket {path}: it is served by uid {uid}{name}, which is neither root nor you (uid {me}); nothing was sent")]
    ForeignServer {
        /// The socket path.
        path: PathBuf,
        /// The server's uid (`SO_PEERCRED`).
        uid: u32,
        /// " (name)" of that uid, or nothing.
        name: String,
        /// The caller's uid.
        me: u32,
    },
    /// The connection failed midway.
    #[error("control socket {path}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// The answer was not understood.
    #[error("control socket {path}: malformed answer \"{answer}\": {reason}")]
    Malformed {
        /// The socket path.
        path: PathBuf,
        /// What came back (its start, control characters escaped).
        answer: String,
        /// Why it was not understood.
        reason: String,
    },
}

/// True if a server running as `server_uid` may be believed by a client
/// running as `me`: the same user, or root.
pub fn server_allowed(server_uid: u32, me: u32) -> bool {
    server_uid == 0 || server_uid == me
}

/// Checks the socket's directory (see the module docs). A missing
/// directory means no supervise runs; one the caller cannot examine is
/// "permission denied".
pub fn check_socket_dir(path: &Path) -> Result<(), ClientError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    match fsutil::check_trusted("control socket directory", dir) {
        Ok(()) => Ok(()),
        Err(TrustError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            Err(ClientError::NotRunning {
                path: path.to_path_buf(),
                source,
            })
        }
        Err(TrustError::Io { source, .. }) if fsutil::is_permission_denied(&source) => {
            Err(ClientError::PermissionDenied {
                path: path.to_path_buf(),
            })
        }
        Err(source) => Err(ClientError::Untrusted {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Sends one request and reads the answer, after checking the socket's
/// directory and the server's uid (see the module docs).
pub async fn call(path: &Path, req: &Request) -> Result<Response, ClientError> {
    call_with_fds(path, req, &[]).await
}

/// [`call`], with descriptors sent along with the request (`SCM_RIGHTS`).
pub async fn call_with_fds(
    path: &Path,
    req: &Request,
    fds: &[std::os::fd::RawFd],
) -> Result<Response, ClientError> {
    check_socket_dir(path)?;
    let stream = UnixStream::connect(path).await.map_err(|source| {
        if source.kind() == io::ErrorKind::PermissionDenied {
            ClientError::PermissionDenied {
                path: path.to_path_buf(),
            }
        } else {
            ClientError::NotRunning {
                path: path.to_path_buf(),
                source,
            }
        }
    })?;
    let ioe = |source| ClientError::Io {
        path: path.to_path_buf(),
        source,
    };
    let server = stream.peer_cred().map_err(ioe)?.uid();
    let me = fsutil::own_uid();
    if !server_allowed(server, me) {
        return Err(ClientError::ForeignServer {
            path: path.to_path_buf(),
            uid: server,
            name: user_name(server),
            me,
        });
    }
    let mut line = serde_json::to_string(req).expect("requests serialise");
    line.push('\n');
    if !fds.is_empty() {
        // The descriptors ride on the request's first bytes.
        use std::os::fd::AsRawFd;
        stream.writable().await.map_err(ioe)?;
        let first = line.len().min(1);
        let cmsg = [nix::sys::socket::ControlMessage::ScmRights(fds)];
        let iov = [std::io::IoSlice::new(&line.as_bytes()[..first])];
        loop {
            match stream.try_io(tokio::io::Interest::WRITABLE, || {
                nix::sys::socket::sendmsg::<()>(
                    stream.as_raw_fd(),
                    &iov,
                    &cmsg,
                    nix::sys::socket::MsgFlags::empty(),
                    None,
                )
                .map_err(io::Error::from)
            }) {
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    stream.writable().await.map_err(ioe)?
                }
                Err(e) => return Err(ioe(e)),
            }
        }
        line.drain(..first);
    }
    let (r, mut w) = stream.into_split();
    w.write_all(line.as_bytes()).await.map_err(ioe)?;
    let mut answer = Vec::new();
    BufReader::new(r.take(MAX_ANSWER + 1))
        .read_until(b'\n', &mut answer)
        .await
        .map_err(ioe)?;
    let malformed = |reason: String| ClientError::Malformed {
        path: path.to_path_buf(),
        answer: shorten(&String::from_utf8_lossy(&answer)),
        reason,
    };
    if answer.len() as u64 > MAX_ANSWER {
        return Err(malformed(format!("longer than {MAX_ANSWER} bytes")));
    }
    serde_json::from_slice(&answer).map_err(|e| malformed(e.to_string()))
}

fn user_name(uid: u32) -> String {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(u)) => format!(" ({})", escape_controls(&u.name)),
        _ => String::new(),
    }
}

/// The start of a bad answer, for an error message: at most 200
/// characters, control characters escaped.
fn shorten(answer: &str) -> String {
    let t = answer.trim();
    let mut s: String = t.chars().take(200).collect();
    if s.len() < t.len() {
        s.push_str("...");
    }
    escape_controls(&s).into_owned()
}

/// True for the characters [`escape_controls`] escapes: C0 and C1 control
/// characters and DEL (terminal escape sequences start with ESC, or with
/// the 8-bit CSI U+009B), and the Unicode formatting characters that
/// reorder or break the displayed text (bidirectional overrides and
/// isolates, line and paragraph separators).
pub fn is_unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

/// `s` fit for a terminal: every character of [`is_unsafe_char`] written
/// as an escape, `\x1b` for C0 controls and DEL, `\u{9b}` for the others;
/// everything else (non-ASCII text included) unchanged. Used for all the
/// client prints of what the server sent.
pub fn escape_controls(s: &str) -> Cow<'_, str> {
    if !s.chars().any(is_unsafe_char) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c if is_unsafe_char(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// JSON text (as serde_json writes it) fit for a terminal, still the same
/// JSON: serde_json escapes C0 controls in strings itself (the only C0
/// characters left are its own line breaks), but writes DEL, C1 controls
/// and the formatting characters of [`is_unsafe_char`] as they are; these
/// (which can only occur inside strings) become `\uXXXX`.
pub fn escape_json_controls(json: &str) -> Cow<'_, str> {
    let unsafe_in_json = |c: char| c >= '\u{7f}' && is_unsafe_char(c);
    if !json.chars().any(unsafe_in_json) {
        return Cow::Borrowed(json);
    }
    let mut out = String::with_capacity(json.len() + 8);
    for c in json.chars() {
        if unsafe_in_json(c) {
            // All of them are in the Basic Multilingual Plane.
            out.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// What a client command prints for the server's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Printed {
    /// Success: this goes to stdout (exit 0).
    Out(String),
    /// supervise refused or the command failed: this goes to stderr
    /// (exit 1).
    Refused(String),
}

/// Renders `resp` for the terminal (`json`: status as JSON), every piece
/// the server sent escaped ([`escape_controls`], [`escape_json_controls`]).
pub fn render_response(resp: &Response, json: bool, now: chrono::DateTime<chrono::Utc>) -> Printed {
    match resp {
        Response::Status { jobs } if json => {
            let text = serde_json::to_string_pretty(jobs).expect("status serialises");
            Printed::Out(format!("{}\n", escape_json_controls(&text)))
        }
        Response::Status { jobs } => Printed::Out(render_status(jobs, now)),
        Response::Checkpoint { checkpoint: c } => Printed::Out(format!(
            "checkpoint {} published: {} bytes, {} ms, frozen {}\n",
            escape_controls(&c.id),
            c.bytes,
            c.duration_ms,
            c.frozen_ms
                .map(|f| format!("{f:.1} ms"))
                .unwrap_or_else(|| "unknown".into())
        )),
        Response::Done { message } => Printed::Out(format!("{}\n", escape_controls(message))),
        Response::Error { message } => {
            Printed::Refused(format!("supervise: {}\n", escape_controls(message)))
        }
        Response::Images { images } => Printed::Out(render_images(images, json)),
    }
}

/// `supervise images` (a job file's store, or a job of the running
/// supervise): a table, or JSON.
pub fn render_images(rows: &[super::ImageRow], json: bool) -> String {
    let mb = |b: u64| format!("{:.1} MiB", b as f64 / (1 << 20) as f64);
    if json {
        let v: Vec<_> = rows
            .iter()
            .map(|i| {
                serde_json::json!({
                    "id": i.id,
                    "created": i.created.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    "created_precise": i.created.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
                    "sealed": i.sealed,
                    "pack": i.pack,
                    "size_bytes": i.size_bytes,
                    "logical_bytes": i.size_bytes,
                    "new_bytes": i.new_bytes,
                    "duration_ms": i.duration_ms,
                    "frozen_us": i.frozen_us,
                    "job_files": i.job_files,
                    "job_files_copied_bytes": i.job_files_copied_bytes,
                    "verified": i.verified,
                    "damage": i.damage,
                    "path": i.path,
                })
            })
            .collect();
        let text = serde_json::to_string_pretty(&v).expect("rows serialise");
        return format!("{}\n", escape_json_controls(&text));
    }
    let mut out = format!(
        "{:<24} {:<21} {:>12} {:>12} {:>10} {:>8}\n",
        "ID", "CREATED", "LOGICAL", "NEW", "FROZEN", "VERIFIED"
    );
    for i in rows {
        out.push_str(&format!(
            "{:<24} {:<21} {:>12} {:>12} {:>10} {:>8}\n",
            escape_controls(&i.id),
            i.created.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            mb(i.size_bytes),
            mb(i.new_bytes),
            i.frozen_us
                .map(|u| format!("{:.1}ms", u as f64 / 1000.0))
                .unwrap_or_else(|| "-".into()),
            match i.verified {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "-",
            }
        ));
    }
    out
}

/// `supervise status` as a table, one job per line (plus its failure
/// reason or last error on the next line). Every text the server sent is
/// escaped ([`escape_controls`]).
pub fn render_status(jobs: &[super::JobStatus], now: chrono::DateTime<chrono::Utc>) -> String {
    let ago = |t: chrono::DateTime<chrono::Utc>| {
        let s = (now - t).num_seconds();
        if s >= 0 {
            format!("{} ago", short(s))
        } else {
            format!("in {}", short(-s))
        }
    };
    let mut out = format!(
        "{:<16} {:<14} {:>8} {:>8} {:>8}  {:<24} {:>8} {:>9}  {:<8} {:>8}  {}\n",
        "JOB",
        "STATE",
        "PID",
        "UPTIME",
        "RESTORES",
        "LAST CHECKPOINT",
        "FROZEN",
        "AGE",
        "NEXT",
        "INTERVAL",
        "SKIPPED"
    );
    for j in jobs {
        let state = match &j.state {
            crate::control::JobState::Failed(_) => "failed".to_string(),
            s => escape_controls(&s.describe()).into_owned(),
        };
        let (last, frozen, age) = match &j.last_checkpoint {
            Some(c) => (
                escape_controls(&c.id).into_owned(),
                c.frozen_ms
                    .map(|f| format!("{f:.1}ms"))
                    .unwrap_or_else(|| "-".into()),
                ago(c.time),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        out.push_str(&format!(
            "{:<16} {:<14} {:>8} {:>8} {:>8}  {:<24} {:>8} {:>9}  {:<8} {:>8}  {}\n",
            escape_controls(&j.name),
            state,
            j.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            j.uptime_s
                .map(|u| short(u as i64))
                .unwrap_or_else(|| "-".into()),
            j.restores,
            last,
            frozen,
            age,
            j.next_checkpoint
                .filter(|_| j.pid.is_some())
                .map(ago)
                .unwrap_or_else(|| "-".into()),
            j.interval_s
                .map(|i| format!(
                    "{}{}",
                    short(i.round() as i64),
                    if j.auto.is_some() { " auto" } else { "" }
                ))
                .unwrap_or_else(|| "-".into()),
            j.skipped_ticks,
        ));
        if let Some(r) = &j.last_restore {
            out.push_str(&format!(
                "  last restore: {} from {}, running after {:.0} ms, all memory resident {}\n",
                escape_controls(&r.mode),
                escape_controls(&r.checkpoint),
                r.running_ms,
                r.resident_ms
                    .map(|m| format!("after {m:.0} ms"))
                    .unwrap_or_else(|| "(pending)".into())
            ));
        }
        if let Some(a) = &j.auto {
            out.push_str(&format!(
                "  auto: C {} (median frozen time of the last checkpoints), M {} ({} failure{} seen)\n",
                a.cost_s
                    .map(|c| format!("{:.1}ms", c * 1000.0))
                    .unwrap_or_else(|| "not measured yet".into()),
                short(a.mtbf_s.round() as i64),
                a.failures,
                if a.failures == 1 { "" } else { "s" }
            ));
        }
        if let crate::control::JobState::Failed(r) = &j.state {
            out.push_str(&format!("  failed: {}\n", escape_controls(r)));
        } else if let Some(e) = &j.last_error {
            out.push_str(&format!("  last error: {}\n", escape_controls(e)));
        }
        for (k, v) in &j.extra {
            out.push_str(&format!(
                "  {}: {}\n",
                escape_controls(k),
                escape_controls(v)
            ));
        }
    }
    out
}

/// 75 -> "1m15s", 4000 -> "1h06m".
fn short(s: i64) -> String {
    match s {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

/// The run of the Slurm batch job this client runs in (from its
/// environment), to send with a submission; `None` outside Slurm.
pub fn slurm_run() -> Option<super::SlurmRun> {
    crate::slurm::SlurmContext::from_env().map(|c| super::SlurmRun {
        job_id: c.job_id,
        node: c.node,
        restart_count: c.restart_count,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::JobState;
    use crate::control::{CheckpointSummary, JobStatus};
    use std::borrow::Cow;

    #[test]
    fn controls_are_escaped_and_text_is_kept() {
        assert!(matches!(
            escape_controls("plain ü 日本 \\x"),
            Cow::Borrowed(_)
        ));
        assert_eq!(escape_controls("\x1b[2Jgone"), "\\x1b[2Jgone");
        assert_eq!(escape_controls("a\nb\rc\td\0"), "a\\x0ab\\x0dc\\x09d\\x00");
        assert_eq!(escape_controls("\u{7f}"), "\\x7f");
        // 8-bit CSI, bidi override, line separator.
        assert_eq!(escape_controls("\u{9b}31m"), "\\u{9b}31m");
        assert_eq!(escape_controls("x\u{202e}gnp.exe"), "x\\u{202e}gnp.exe");
        assert_eq!(escape_controls("\u{2028}"), "\\u{2028}");
        assert_eq!(escape_controls("\u{2066}\u{2069}"), "\\u{2066}\\u{2069}");
        // Nothing unsafe is left, whatever came in.
        let all: String = (0u32..0x3000).filter_map(char::from_u32).collect();
        assert!(!escape_controls(&all).chars().any(is_unsafe_char));
    }

    #[test]
    fn json_stays_the_same_json_without_raw_controls() {
        let mut j = JobStatus::new("a\u{1b}[2J\u{9b}1m\u{7f}\u{202e}", "/img".into());
        j.last_error = Some("line\nbreak \u{85}".into());
        let text = serde_json::to_string_pretty(&vec![j.clone()]).unwrap();
        let safe = escape_json_controls(&text);
        assert!(
            !safe.chars().any(|c| c != '\n' && is_unsafe_char(c)),
            "{safe}"
        );
        let back: Vec<JobStatus> = serde_json::from_str(&safe).unwrap();
        assert_eq!(back, vec![j]);
        assert!(matches!(
            escape_json_controls("{\"a\": \"ü\"}"),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn answers_are_printed_escaped() {
        let now = chrono::Utc::now();
        let done = Response::Done {
            message: "\x1b]0;owned\x07\x1b[2Jok".into(),
        };
        assert_eq!(
            render_response(&done, false, now),
            Printed::Out("\\x1b]0;owned\\x07\\x1b[2Jok\n".into())
        );
        let err = Response::Error {
            message: "no\nsupervise: fake second line".into(),
        };
        assert_eq!(
            render_response(&err, false, now),
            Printed::Refused("supervise: no\\x0asupervise: fake second line\n".into())
        );
        let mut c = JobStatus::new("\x1b[31mred", "/img".into());
        c.state = JobState::Superseded("\x1b[2J".into());
        c.last_error = Some("a\nb".into());
        c.extra.insert("k\x1b".into(), "v\x1b".into());
        c.last_checkpoint = Some(CheckpointSummary {
            id: "1\x1b".into(),
            time: now,
            duration_ms: 1,
            frozen_ms: None,
            bytes: 1,
        });
        let resp = Response::Status { jobs: vec![c] };
        for json in [false, true] {
            let Printed::Out(text) = render_response(&resp, json, now) else {
                panic!()
            };
            assert!(!text.contains('\x1b'), "{text}");
            if !json {
                assert_eq!(
                    text.lines().count(),
                    4,
                    "header, job, last error, extra: {text}"
                );
                assert!(text.contains("\\x1b[31mred"), "{text}");
                assert!(text.contains("  last error: a\\x0ab"), "{text}");
            }
        }
        let cp = Response::Checkpoint {
            checkpoint: CheckpointSummary {
                id: "x\u{9b}2J".into(),
                time: now,
                duration_ms: 5,
                frozen_ms: Some(1.0),
                bytes: 9,
            },
        };
        let Printed::Out(text) = render_response(&cp, false, now) else {
            panic!()
        };
        assert!(
            text.starts_with("checkpoint x\\u{9b}2J published"),
            "{text}"
        );
    }

    #[test]
    fn only_root_and_the_caller_are_believed() {
        assert!(server_allowed(0, 1000));
        assert!(server_allowed(1000, 1000));
        assert!(!server_allowed(65534, 1000));
        assert!(server_allowed(0, 0));
        assert!(!server_allowed(1000, 0));
    }

    #[test]
    fn socket_directory_is_checked_before_connecting() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        // Missing directory: no supervise runs.
        let missing = t.path().join("none/s.sock");
        assert!(matches!(
            check_socket_dir(&missing),
            Err(ClientError::NotRunning { .. })
        ));
        // Ours, private: fine.
        check_socket_dir(&t.path().join("s.sock")).unwrap();
        // Writable by others: refused before anything is sent, naming the
        // directory, its owner and mode.
        let open = t.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let sock = open.join("s.sock");
        let e = check_socket_dir(&sock).unwrap_err();
        assert!(matches!(e, ClientError::Untrusted { .. }), "{e}");
        let shown = e.to_string();
        assert!(
            shown.starts_with(&format!(
                "refusing to use control socket {}",
                sock.display()
            )) && shown.contains(&format!("{} is a directory owned by uid", open.display()))
                && shown.contains("with mode 0777"),
            "{shown}"
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        assert!(matches!(
            rt.block_on(call(&sock, &Request::Status)),
            Err(ClientError::Untrusted { .. })
        ));
    }

    #[test]
    #[cfg_attr(not(root), ignore = "needs root")]
    fn socket_directory_of_another_user_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("supervise-1000");
        std::fs::create_dir(&d).unwrap();
        nix::unistd::chown(&d, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
        let e = check_socket_dir(&d.join("supervise.sock"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("owned by uid 65534 (nobody)"), "{e}");
        assert!(e.contains("mode 0755"), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn status_table() {
        let now = chrono::Utc::now();
        let mut a = JobStatus::new("counter", "/img".into());
        a.state = JobState::Running;
        a.pid = Some(4242);
        a.uptime_s = Some(3725.0);
        a.restores = 2;
        a.last_checkpoint = Some(CheckpointSummary {
            id: "000007-20261128T140000Z".into(),
            time: now - chrono::Duration::seconds(75),
            duration_ms: 80,
            frozen_ms: Some(17.04),
            bytes: 1000,
        });
        a.next_checkpoint = Some(now + chrono::Duration::seconds(45));
        a.interval_s = Some(117.0 * 60.0);
        a.skipped_ticks = 3;
        a.auto = Some(crate::control::AutoStatus {
            cost_s: Some(0.0171),
            mtbf_s: 86400.0 + 3600.0,
            failures: 1,
        });
        let mut b = JobStatus::new("loop", "/img2".into());
        b.state = JobState::Failed("job died 3 times within 1h; giving up".into());
        let t = render_status(&[a, b], now);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("JOB"), "{t}");
        assert!(
            lines[1].contains("counter")
                && lines[1].contains("running")
                && lines[1].contains("4242")
                && lines[1].contains("1h02m")
                && lines[1].contains("000007-20261128T140000Z")
                && lines[1].contains("17.0ms")
                && lines[1].contains("1m15s ago")
                && lines[1].contains("in 45s")
                && lines[1].contains("1h57m auto")
                && lines[1].ends_with(" 3"),
            "{t}"
        );
        assert_eq!(
            lines[2],
            "  auto: C 17.1ms (median frozen time of the last checkpoints), M 1d01h (1 failure seen)"
        );
        assert!(
            lines[3].contains("loop") && lines[3].contains("failed"),
            "{t}"
        );
        assert_eq!(lines[4], "  failed: job died 3 times within 1h; giving up");
    }
}
