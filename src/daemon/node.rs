//! What the control socket's requests reach: the jobs of this supervise
//! (a [`Registry`]) and, for the node service, submitting and cancelling
//! users' jobs and reading their stores on their behalf.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::config::JobConfig;
use crate::control::{
    dispatch, find, job_channel, Caller, Command, Handler, ImageRow, JobHandle, Request, Response,
    Shutdown,
};
use crate::metrics::Metrics;
use crate::service::{Entry, Registry, ServiceConfig, Submission, UserJob};
use crate::slurm::SlurmContext;
use crate::store::ImageStore;
use crate::supervisor::{Criu, Quota, Supervisor, SupervisorError};

/// Makes supervisors that share the daemon's engine, metrics and dump
/// slots.
pub(super) struct Factory {
    pub(super) engine: Arc<Criu>,
    pub(super) metrics: Metrics,
    pub(super) slots: Arc<tokio::sync::Semaphore>,
    pub(super) slurm: Option<SlurmContext>,
    pub(super) criu_version: Option<String>,
}

impl Factory {
    /// A supervisor for `cfg` and its registry entry; a job of user `uid`
    /// (named `<user>/<name>`) when `owned`, with its image quota.
    /// `slurm`: the job's own Slurm run (a job submitted from a batch
    /// job), else the daemon's.
    pub(super) fn make(
        &self,
        mut cfg: JobConfig,
        owned: Option<(u32, &str)>,
        quota: Option<Quota>,
        slurm: Option<SlurmContext>,
    ) -> Result<(Supervisor<Criu>, Entry), SupervisorError> {
        let short = cfg.name.clone();
        if let Some((_, user)) = owned {
            cfg.name = format!("{user}/{short}");
        }
        let (mut handle, port) = job_channel(&cfg.name, cfg.checkpoint.dir.clone());
        if let Some((uid, user)) = owned {
            handle = handle.owned_by(uid, user, &short);
        }
        let cfg = Arc::new(cfg);
        let slurm = slurm.or_else(|| self.slurm.clone());
        let mut s = Supervisor::new((*cfg).clone(), slurm, self.engine.clone())?;
        if let Some(v) = &self.criu_version {
            s.set_criu_version(v.clone());
        }
        s.connect(port, self.metrics.clone());
        s.set_dump_slots(self.slots.clone());
        if let Some(q) = quota {
            s.set_quota(q);
        }
        Ok((s, Entry { handle, cfg }))
    }
}

/// The daemon's answer to every control request.
pub(super) struct Node {
    pub(super) registry: Arc<Registry>,
    /// Set when this supervise is the node service.
    pub(super) service: Option<ServiceConfig>,
    pub(super) factory: Factory,
    /// New supervisors for the daemon to run.
    pub(super) spawn: mpsc::UnboundedSender<Supervisor<Criu>>,
    pub(super) shutdown: watch::Receiver<Shutdown>,
}

impl Handler for Node {
    fn handle<'a>(
        &'a self,
        caller: Caller,
        req: Request,
        fds: Vec<OwnedFd>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Response> + Send + 'a>> {
        Box::pin(async move {
            match req {
                Request::Submit {
                    text,
                    path,
                    cwd,
                    slurm,
                } => {
                    let slurm = slurm.map(|r| SlurmContext {
                        job_id: r.job_id,
                        node: r.node,
                        restart_count: r.restart_count,
                    });
                    // Names the job's per-run directory: what a client
                    // says is checked first.
                    if let Some(Err(e)) = slurm.as_ref().map(SlurmContext::validate) {
                        return error(format!("refused: {e}"));
                    }
                    self.submit(
                        caller,
                        Submission {
                            text,
                            path,
                            cwd,
                            fds,
                            slurm,
                        },
                    )
                    .await
                }
                Request::Cancel { job, purge } => self.cancel(caller, &job, purge).await,
                Request::Images { job, verify } => self.images(caller, &job, verify).await,
                Request::Verify { job, repair } => self.verify(caller, &job, repair).await,
                Request::Gc { job } => self.gc(caller, &job).await,
                req => dispatch(&self.registry.handles(), caller, req).await,
            }
        })
    }

    fn admits(&self, caller: Caller) -> bool {
        // The node service: any local user who can reach the socket (its
        // mode, and `allow_group`, decide who can); each request is
        // authorized per job. Else supervise's own user and root only.
        self.service.is_some() || caller.is_admin()
    }

    fn jobs(&self) -> usize {
        self.registry.len()
    }
}

fn error(message: String) -> Response {
    Response::Error { message }
}

impl Node {
    /// The store of the job `name`, if `caller` may use it.
    fn store_of(&self, caller: Caller, name: &str) -> Result<(JobHandle, Arc<JobConfig>), String> {
        let handles = self.registry.handles();
        let h = find(&handles, caller, name)?;
        let e = self
            .registry
            .get(&h.name)
            .ok_or_else(|| format!("job {name} is gone"))?;
        Ok((e.handle, e.cfg))
    }

    async fn submit(&self, caller: Caller, sub: Submission) -> Response {
        let Some(svc) = self.service.clone() else {
            return error(
                "this supervise does not take jobs from users (it is not the node service: \
                 `supervise run --service`)"
                    .into(),
            );
        };
        if *self.shutdown.borrow() != Shutdown::No {
            return error("supervise is shutting down; submit again once it is back".into());
        }
        let uid = caller.uid;
        let mine = self.registry.of_owner(uid).len();
        if mine >= svc.max_jobs_per_user {
            return error(format!(
                "limit reached: you have {mine} jobs here, the most this node allows \
                 (limits.max_jobs_per_user = {}); cancel one first",
                svc.max_jobs_per_user
            ));
        }
        let svc2 = svc.clone();
        let prepared = tokio::task::spawn_blocking(move || {
            let used = UserJob::usage(&svc2, uid);
            if let Some(max) = svc2.max_image_bytes_per_user {
                if used >= max {
                    return Err(format!(
                        "limit reached: your images take {used} bytes, the most this node \
                         allows (limits.max_image_bytes_per_user = {max}); cancel a job with \
                         --purge first"
                    ));
                }
            }
            let job =
                crate::service::submit_prepare(&sub, uid, &svc2).map_err(|e| e.to_string())?;
            Ok((job, sub))
        })
        .await;
        let (mut job, sub) = match prepared {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => return error(e),
            Err(e) => return error(format!("cannot prepare the job: {e}")),
        };
        let full = format!("{}/{}", job.user, job.cfg.name);
        // Submitting a job of that name again: a stopped one (e.g. after
        // its final checkpoint at a Slurm job's pre-termination signal) is
        // resumed from its newest image, with the new job file; a running
        // one is refused.
        let resumed = match self.registry.get(&full) {
            Some(e) if !e.handle.status.borrow().state.is_at_rest() => {
                return error(format!(
                    "you already have a job named {} and it runs (cancel it first, or give this \
                     one another `name`)",
                    job.cfg.name
                ));
            }
            Some(e) => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                if e.handle.commands.send(Command::Cancel(tx)).await.is_ok() {
                    let _ = rx.await;
                }
                self.registry.remove(&full);
                true
            }
            None => {
                // Kept by another node's service (a shared users' area):
                // taken over only by a later run of its Slurm job.
                let (svc2, uid, short) = (svc.clone(), job.uid, job.cfg.name.clone());
                let kept =
                    tokio::task::spawn_blocking(move || UserJob::placement(&svc2, uid, &short))
                        .await
                        .ok()
                        .flatten();
                if let Err(e) = crate::service::may_take(
                    &svc.node,
                    &job.cfg.name,
                    kept.as_ref(),
                    job.slurm.as_ref(),
                ) {
                    return error(e);
                }
                if let Some(k) = kept.filter(|k| k.node != svc.node) {
                    info!(
                        job = %full,
                        from = %k.node,
                        "taking over a job from another node: a later run of its Slurm job"
                    );
                }
                false
            }
        };
        if let Err(e) = job.keep(&sub, &svc) {
            return error(format!("cannot keep the job: {e}"));
        }
        // The old supervisor releases the job's lock as its task ends.
        let mut tries = 0;
        let started = loop {
            match self.start(job, &svc) {
                Err((e, Some(again))) if resumed && tries < 50 => {
                    tries += 1;
                    let _ = e;
                    job = *again;
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                r => break r.map_err(|(e, _)| e),
            }
        };
        match started {
            Ok(name) => Response::Done {
                message: format!("submitted job {name}"),
            },
            Err(e) => error(e),
        }
    }

    /// Supervises a user's job (submitted now, or kept from before).
    /// `Err` gives the job back when its lock is still held (an earlier
    /// supervisor of it is ending).
    pub(super) fn start(
        &self,
        job: UserJob,
        svc: &ServiceConfig,
    ) -> Result<String, (String, Option<Box<UserJob>>)> {
        let quota = svc.max_image_bytes_per_user.map(|max| Quota {
            root: svc.users_dir.join(job.uid.to_string()),
            max_bytes: max,
        });
        let owner = job
            .cfg
            .owner
            .as_ref()
            .map(|o| format!(", running as {} (uid {})", o.name, o.uid))
            .unwrap_or_default();
        let (sup, entry) = match self.factory.make(
            job.cfg.clone(),
            Some((job.uid, &job.user)),
            quota,
            job.slurm.clone(),
        ) {
            Ok(x) => x,
            Err(e @ SupervisorError::Busy { .. }) => {
                return Err((e.to_string(), Some(Box::new(job))))
            }
            Err(e) => return Err((e.to_string(), None)),
        };
        let name = entry.handle.name.clone();
        if !self.registry.add(entry) {
            return Err((format!("a job named {name} is already supervised"), None));
        }
        info!(job = %name, "supervising a user's job{owner}");
        self.spawn
            .send(sup)
            .map_err(|_| ("supervise is shutting down".to_string(), None))?;
        Ok(format!("{name}{owner}"))
    }

    async fn cancel(&self, caller: Caller, name: &str, purge: bool) -> Response {
        let (h, _) = match self.store_of(caller, name) {
            Ok(x) => x,
            Err(e) => return error(e),
        };
        let (Some(svc), Some(uid)) = (self.service.clone(), h.owner) else {
            return error(format!(
                "job {name} comes from a job file, not from `supervise submit`: stop it with \
                 `supervise stop` and remove its file"
            ));
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let stopped = match h.commands.send(Command::Cancel(tx)).await {
            Ok(()) => rx.await.ok(),
            Err(_) => None,
        };
        if let Some(Response::Error { message }) = &stopped {
            return error(message.clone());
        }
        self.registry.remove(&h.name);
        let short = h.short.clone();
        let forgot =
            tokio::task::spawn_blocking(move || UserJob::forget(&svc, uid, &short, purge)).await;
        match forgot {
            Ok(Ok(Some(node))) => Response::Done {
                message: format!(
                    "job {} stopped here; node {node} supervises it now (a later run of its \
                     Slurm job), so its record and images are left to that node",
                    h.name
                ),
            },
            Ok(Ok(None)) => Response::Done {
                message: format!(
                    "job {} cancelled{}",
                    h.name,
                    if purge {
                        "; its images are deleted"
                    } else {
                        "; its images are kept until `cancel --purge`"
                    }
                ),
            },
            Ok(Err(e)) => {
                warn!(job = %h.name, error = %e, "cannot forget the cancelled job");
                error(format!(
                    "job {} stopped, but cannot be forgotten: {e}",
                    h.name
                ))
            }
            Err(e) => error(format!(
                "job {} stopped, but cannot be forgotten: {e}",
                h.name
            )),
        }
    }

    /// Opens the job's store for reading (root's, on the caller's behalf).
    async fn with_store<T: Send + 'static>(
        &self,
        caller: Caller,
        name: &str,
        f: impl FnOnce(ImageStore) -> Result<T, String> + Send + 'static,
    ) -> Result<T, String> {
        let (_, cfg) = self.store_of(caller, name)?;
        tokio::task::spawn_blocking(move || {
            let store = ImageStore::open_read_only_with(&cfg.checkpoint.dir, &cfg.store)
                .map_err(|e| e.to_string())?;
            f(store)
        })
        .await
        .map_err(|e| e.to_string())?
    }

    async fn images(&self, caller: Caller, name: &str, verify: bool) -> Response {
        let r = self
            .with_store(caller, name, move |s| {
                let list = s.list().map_err(|e| e.to_string())?;
                let verdicts = if verify && !list.is_empty() {
                    s.verify_all().map_err(|e| e.to_string())?.checkpoints
                } else {
                    Vec::new()
                };
                Ok(list
                    .iter()
                    .map(|i| {
                        image_row(i, verdicts.iter().find(|(id, _)| *id == i.id).map(|v| &v.1))
                    })
                    .collect())
            })
            .await;
        match r {
            Ok(images) => Response::Images { images },
            Err(e) => error(e),
        }
    }

    async fn verify(&self, caller: Caller, name: &str, repair: bool) -> Response {
        let r = self
            .with_store(caller, name, move |s| {
                if repair {
                    let r = s.repair().map_err(|e| e.to_string())?;
                    return Ok((format!("{r:?}"), false));
                }
                let report = s.verify_all().map_err(|e| e.to_string())?;
                let mut text = String::new();
                for (id, r) in &report.checkpoints {
                    match r {
                        Ok(()) => text.push_str(&format!("ok {id}\n")),
                        Err(e) => text.push_str(&format!("DAMAGED {id}: {e}\n")),
                    }
                }
                for (id, why) in &report.unreadable {
                    text.push_str(&format!("DAMAGED {id}: {why}\n"));
                }
                Ok((text, report.damaged()))
            })
            .await;
        match r {
            Ok((text, false)) => Response::Done { message: text },
            Ok((text, true)) => error(text),
            Err(e) => error(e),
        }
    }

    async fn gc(&self, caller: Caller, name: &str) -> Response {
        let (_, cfg) = match self.store_of(caller, name) {
            Ok(x) => x,
            Err(e) => return error(e),
        };
        let r = tokio::task::spawn_blocking(move || {
            let s = ImageStore::open_with(&cfg.checkpoint.dir, &cfg.store)
                .map_err(|e| e.to_string())?;
            s.gc().map_err(|e| e.to_string())
        })
        .await;
        match r {
            Ok(Ok(r)) => Response::Done {
                message: format!(
                    "gc: removed {} pack(s), rewrote {}, freed {} bytes",
                    r.removed_packs, r.rewritten_packs, r.freed_bytes
                ),
            },
            Ok(Err(e)) => error(e),
            Err(e) => error(e.to_string()),
        }
    }
}

/// One image as `supervise images` shows it.
pub fn image_row(i: &crate::store::ImageInfo, verdict: Option<&Result<(), String>>) -> ImageRow {
    ImageRow {
        id: i.id.clone(),
        created: i.created,
        sealed: i.sealed,
        pack: i.manifest.stored.as_ref().and_then(|s| s.pack.clone()),
        size_bytes: i.size_bytes,
        new_bytes: i.new_bytes,
        duration_ms: i.manifest.meta.duration_ms,
        frozen_us: i.manifest.meta.frozen_us,
        job_files: i.manifest.meta.extra.files,
        job_files_copied_bytes: i.manifest.meta.extra.files_copied_bytes,
        verified: verdict.map(|r| r.is_ok()),
        damage: verdict.and_then(|r| r.as_ref().err().cloned()),
        path: PathBuf::from(&i.path),
    }
}
