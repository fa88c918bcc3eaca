//! The node service: one root `supervise run --service` that runs every
//! local user's jobs as that user.
//!
//! Users hand it jobs over the control socket (`supervise submit`); each
//! client is identified by `SO_PEERCRED`, never by what it says. A
//! submitted job runs as its owner in a user namespace of its own
//! ([`crate::userns`]); its images and state live in a root-owned
//! per-user area (`<users_dir>/<uid>/<name>/`) that the owner cannot
//! write; the job file's text is kept there too, so that submitted jobs
//! survive a restart of the service (and are re-adopted). Users see and
//! control only their own jobs ([`crate::control::Caller`]). Limits per
//! user (jobs, image bytes) come from the daemon's configuration
//! ([`ServiceConfig`], `/etc/supervise/supervise.toml`).
//!
//! * `config.rs`: the daemon's configuration file.
//! * `submit.rs`: checking a submitted job (keys a user may not set,
//!   paths with the owner's rights, limits) and keeping it on disk.
//! * `registry.rs`: the jobs the running service supervises, by name.
//!
//! On a cluster, `users_dir` may be shared by the nodes' services (a
//! cluster file system): each kept job names the node that supervises
//! it, a service supervises again after a restart only its own node's
//! jobs, and a job moves to another node only with a later run of the
//! Slurm batch job it was submitted from (`submit --wait` as the batch
//! step, rerun there after a node failure); the image store's lease
//! ([`crate::fence`]) then stops any copy still running on the old node.

mod config;
mod registry;
mod submit;

pub use config::{host_name, ServiceConfig, ServiceConfigError, DEFAULT_CONFIG};
pub use registry::{Entry, Registry};
pub use submit::{
    forbidden_key, load_user_jobs, may_take, prepare as submit_prepare, Placement, Submission,
    SubmitError, UserJob,
};
