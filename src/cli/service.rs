//! `supervise submit` (with `--wait` for a Slurm batch step) and the
//! other requests a user makes of the node service.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use supervise::config::JobConfig;
use supervise::control::client::{self, ClientError, Printed};
use supervise::control::{JobState, Request, Response};

/// A directory, opened to be sent to the service (`O_PATH`: no rights
/// are needed on it beyond reaching it).
fn open_dir(p: &Path) -> Result<OwnedFd> {
    nix::fcntl::open(
        p,
        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    // SAFETY: a fresh descriptor we own.
    .map(|fd| unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
    .with_context(|| format!("{}", p.display()))
}

/// Prints a response; the exit code it means.
fn print(resp: &Response, json: bool) -> ExitCode {
    match client::render_response(resp, json, chrono::Utc::now()) {
        Printed::Out(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Printed::Refused(text) => {
            eprint!("{text}");
            ExitCode::FAILURE
        }
    }
}

fn client_failed(e: ClientError) -> ExitCode {
    eprintln!("supervise: {e}");
    match e {
        ClientError::PermissionDenied { .. } => ExitCode::FAILURE,
        _ => ExitCode::from(2),
    }
}

/// `supervise submit JOB.toml [--wait]`: the job file is read here, with
/// the caller's rights, and its text sent to the node service along with
/// descriptors of the working directory and of the job file's directory;
/// the service runs the job as the caller.
pub fn submit(socket: &Path, job: &Path, wait: bool) -> Result<ExitCode> {
    let path = std::path::absolute(job).with_context(|| job.display().to_string())?;
    let bytes = supervise::fsutil::read_regular_following(&path, 1 << 20)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let text = String::from_utf8(bytes)
        .map_err(|_| anyhow::anyhow!("{}: not UTF-8 text", path.display()))?;
    // Parsed here too, for its name and [slurm] table (and to say what is
    // wrong with it without a round trip).
    let cfg = JobConfig::from_str_at(&text, &path)?;
    let cwd = std::env::current_dir().context("the working directory")?;
    let dirs = [
        open_dir(&cwd)?,
        open_dir(path.parent().unwrap_or(Path::new("/")))?,
    ];
    let fds: Vec<_> = dirs.iter().map(|d| d.as_raw_fd()).collect();
    // Inside a Slurm batch job: which run of it this is, so that the
    // service follows the job to the node Slurm reruns it on.
    let slurm = client::slurm_run();
    let req = Request::Submit {
        text,
        path: path.clone(),
        cwd,
        slurm,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let resp = match rt.block_on(client::call_with_fds(socket, &req, &fds)) {
        Ok(r) => r,
        Err(e) => return Ok(client_failed(e)),
    };
    let code = print(&resp, false);
    if !wait || code != ExitCode::SUCCESS {
        return Ok(code);
    }
    let me = nix::unistd::User::from_uid(nix::unistd::geteuid())
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| nix::unistd::geteuid().to_string());
    let name = if nix::unistd::geteuid().is_root() {
        format!("root/{}", cfg.name)
    } else {
        format!("{me}/{}", cfg.name)
    };
    rt.block_on(wait_for(socket, &name, &cfg))
}

/// `--wait`: until the job's supervision ends (exit with the job's own
/// exit status), the job is stopped or cancelled (exit 1). Inside a Slurm
/// batch job, the job's pre-termination signal (`[slurm] signal`, e.g.
/// `sbatch --signal=B:USR1@120`) makes the service take a final
/// checkpoint and stop the job; once it is published the batch job is
/// requeued (as this user, `scontrol requeue`), and this client ends when
/// Slurm's SIGTERM comes. SIGTERM otherwise, inside Slurm, stops the job
/// (after its final checkpoint, as `[shutdown] checkpoint` says); outside
/// Slurm, SIGTERM or SIGINT only ends the waiting: the job runs on.
async fn wait_for(socket: &Path, name: &str, cfg: &JobConfig) -> Result<ExitCode> {
    use tokio::signal::unix::{signal, SignalKind};
    let slurm = std::env::var("SLURM_JOB_ID").ok().filter(|s| !s.is_empty());
    let mut pre = signal(SignalKind::from_raw(cfg.slurm.signal.number()))?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let req = Request::Wait {
        job: name.to_string(),
    };
    let waiting = client::call(socket, &req);
    tokio::select! {
        r = waiting => Ok(match r {
            Ok(Response::Status { jobs }) => ended(jobs.first()),
            Ok(other) => print(&other, false),
            Err(e) => client_failed(e),
        }),
        _ = pre.recv(), if slurm.is_some() => {
            final_checkpoint(socket, name, cfg, slurm.as_deref().unwrap_or_default()).await
        }
        _ = term.recv() => {
            if slurm.is_some() {
                // Slurm ends the batch step (scancel, a time limit without
                // a signal ahead of it): the job ends with it, after its
                // final checkpoint if the job file asks for one.
                let _ = client::call(
                    socket,
                    &Request::Stop {
                        job: name.to_string(),
                        checkpoint: cfg.shutdown.checkpoint,
                    },
                )
                .await;
                eprintln!("supervise: the Slurm job ends; job {name} is stopped");
            } else {
                eprintln!("supervise: no longer waiting; job {name} runs on");
            }
            Ok(ExitCode::from(143))
        }
        _ = int.recv() => {
            eprintln!("supervise: no longer waiting; job {name} runs on");
            Ok(ExitCode::from(130))
        }
    }
}

/// The job's end as an exit code: its own on completion, else 1.
fn ended(job: Option<&supervise::control::JobStatus>) -> ExitCode {
    match job {
        Some(j) if j.state == JobState::Completed => {
            ExitCode::from(j.exit_code.unwrap_or(0).clamp(0, 255) as u8)
        }
        Some(j) => {
            eprintln!("supervise: job {} is {}", j.name, j.state.describe());
            ExitCode::FAILURE
        }
        None => ExitCode::FAILURE,
    }
}

/// Slurm's pre-termination signal: final checkpoint and stop, then
/// requeue the batch job, then wait for Slurm's SIGTERM.
async fn final_checkpoint(
    socket: &Path,
    name: &str,
    cfg: &JobConfig,
    slurm_job: &str,
) -> Result<ExitCode> {
    eprintln!("supervise: Slurm's pre-termination signal: final checkpoint of {name}");
    let r = client::call(
        socket,
        &Request::Stop {
            job: name.to_string(),
            checkpoint: true,
        },
    )
    .await;
    match r {
        Ok(Response::Done { message }) => eprintln!("supervise: {message}"),
        Ok(other) => {
            print(&other, false);
            // Stop it anyway: the requeued run resumes from the newest
            // earlier image.
            let _ = client::call(
                socket,
                &Request::Stop {
                    job: name.to_string(),
                    checkpoint: false,
                },
            )
            .await;
        }
        Err(e) => return Ok(client_failed(e)),
    }
    if cfg.slurm.requeue {
        let job = slurm_job.to_string();
        let st = tokio::task::spawn_blocking(move || {
            std::process::Command::new("scontrol")
                .args(["requeue", &job])
                .status()
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r);
        match st {
            Ok(s) if s.success() => {
                eprintln!(
                    "supervise: asked Slurm to requeue job {slurm_job}; waiting for its SIGTERM"
                )
            }
            Ok(s) => eprintln!("supervise: scontrol requeue {slurm_job} failed ({s})"),
            Err(e) => eprintln!("supervise: cannot run scontrol: {e}"),
        }
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    term.recv().await;
    Ok(ExitCode::SUCCESS)
}
