//! A submitted job: what a user may not set, the paths checked with the
//! owner's rights before anything starts, the limits, and the copy kept
//! in `<users_dir>/<uid>/jobs/` so that it survives a restart.

use std::fs;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::config::ServiceConfig;
use crate::config::{ConfigError, JobConfig, Target};
use crate::slurm::SlurmContext;
use crate::userns::Owner;

/// What a client handed over.
pub struct Submission {
    /// The job file's text.
    pub text: String,
    /// Its path, as the client sees it.
    pub path: PathBuf,
    /// The client's working directory.
    pub cwd: PathBuf,
    /// Descriptors of the client's working directory and of the job
    /// file's directory (`SCM_RIGHTS`), when sent.
    pub fds: Vec<OwnedFd>,
    /// The run of the Slurm batch job the client runs in, if any.
    pub slurm: Option<SlurmContext>,
}

/// A job of a user, ready to be supervised.
pub struct UserJob {
    /// Its configuration, the service's settings applied.
    pub cfg: JobConfig,
    /// The submitting user's uid.
    pub uid: u32,
    /// Their name.
    pub user: String,
    /// The run of the Slurm batch job it belongs to (`submit --wait` as
    /// the batch step), if any: its per-run files and the image store's
    /// lease follow that run ([`crate::fence`]).
    pub slurm: Option<SlurmContext>,
}

/// Why a submission is refused.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The job file is wrong (file, line, key).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The job may not be run (one line, naming the path or the limit).
    #[error("{0}")]
    Refused(String),
}

/// Keys a user's job file may not set: where supervise keeps the job's
/// state and images (the service keeps them, root-owned, per user), whom
/// it runs as, and `attach` (a process the service did not start).
const FORBIDDEN: [(&str, &str, &str); 7] = [
    ("", "state_dir", "the service keeps a submitted job's state"),
    (
        "",
        "user",
        "a submitted job runs as the user who submits it",
    ),
    (
        "",
        "group",
        "a submitted job runs as the user who submits it",
    ),
    ("", "attach", "the service runs only jobs it starts"),
    (
        "checkpoint",
        "dir",
        "the service keeps a submitted job's images",
    ),
    (
        "store",
        "key_file",
        "the service keeps a submitted job's key",
    ),
    (
        "store",
        "copy_dir",
        "the service keeps a submitted job's images",
    ),
];

/// The first key of `text` a non-root user may not set, as
/// `FILE:LINE: key `K`: why`.
pub fn forbidden_key(text: &str, path: &Path) -> Option<String> {
    let table: toml::Table = text.parse().ok()?;
    for (tab, key, why) in FORBIDDEN {
        let present = match tab {
            "" => table.contains_key(key),
            t => table
                .get(t)
                .and_then(|v| v.as_table())
                .is_some_and(|t| t.contains_key(key)),
        };
        if present {
            let line = line_of(text, tab, key)
                .map(|l| format!(":{l}"))
                .unwrap_or_default();
            let dotted = if tab.is_empty() {
                key.to_string()
            } else {
                format!("{tab}.{key}")
            };
            return Some(format!(
                "{}{line}: key `{dotted}`: not allowed in a submitted job ({why})",
                path.display()
            ));
        }
    }
    None
}

/// The line (1-based) of `key = ` in table `tab` ("" for the top level).
fn line_of(text: &str, tab: &str, key: &str) -> Option<usize> {
    let mut current = String::new();
    for (i, l) in text.lines().enumerate() {
        let t = l.trim();
        if let Some(h) = t.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            current = h.trim().to_string();
            continue;
        }
        if current == tab
            && t.strip_prefix(key)
                .is_some_and(|r| r.trim_start().starts_with('='))
        {
            return Some(i + 1);
        }
    }
    None
}

/// Checks a submission by user `uid` and prepares the job: the job file
/// parsed (as for `supervise run`), keys a user may not set refused, the
/// service's places applied (`<users_dir>/<uid>/<name>/`), and the job's
/// paths checked with the owner's rights (working directory entered,
/// output files opened for appending, and the directories the client
/// handed over being those the paths name).
pub fn prepare(sub: &Submission, uid: u32, svc: &ServiceConfig) -> Result<UserJob, SubmitError> {
    let owner = match uid {
        0 => None,
        u => Some(Owner::of_uid(u).map_err(|e| SubmitError::Refused(e.to_string()))?),
    };
    if owner.is_some() {
        if let Some(why) = forbidden_key(&sub.text, &sub.path) {
            return Err(SubmitError::Refused(why));
        }
    }
    let cfg = JobConfig::from_str_at(&sub.text, &sub.path)?;
    let user = owner
        .as_ref()
        .map(|o| o.name.clone())
        .unwrap_or_else(|| "root".into());
    let cfg = apply_service(cfg, uid, owner, svc);
    check_paths(&cfg, sub)?;
    Ok(UserJob {
        cfg,
        uid,
        user,
        slurm: sub.slurm.clone(),
    })
}

/// The service's places and the owner, applied to a parsed job file.
fn apply_service(
    mut cfg: JobConfig,
    uid: u32,
    owner: Option<Owner>,
    svc: &ServiceConfig,
) -> JobConfig {
    let parsed_state = cfg.state_dir.clone();
    let state = svc.users_dir.join(uid.to_string()).join(&cfg.name);
    cfg.checkpoint.dir = state.join("images");
    cfg.store.key_file = state.join(crate::store::DEFAULT_KEY_FILE);
    if let Target::Launch(spec) = &mut cfg.target {
        // Default output files: where the owner can reach them (its CRIU
        // reopens them by path, as the owner), not in the service's area.
        for (p, name) in [
            (&mut spec.stdout, "stdout.log"),
            (&mut spec.stderr, "stderr.log"),
        ] {
            if *p == parsed_state.join(name) {
                *p = if owner.is_some() {
                    spec.cwd.join(format!("{}.{name}", cfg.name))
                } else {
                    state.join(name)
                };
            }
        }
    }
    cfg.state_dir = state;
    if owner.is_some() {
        cfg.owner = owner;
    }
    cfg
}

/// The job's paths, with the owner's rights: the working directory can
/// be entered, the output files opened for appending (created if need
/// be); the descriptors the client sent name the same directories as the
/// paths.
fn check_paths(cfg: &JobConfig, sub: &Submission) -> Result<(), SubmitError> {
    let Target::Launch(spec) = &cfg.target else {
        return Ok(());
    };
    let refused = |m: String| SubmitError::Refused(m);
    let check = || -> Result<(), String> {
        fs::metadata(spec.cwd.join(".")).map_err(|e| {
            format!(
                "cannot enter the working directory {}: {e}",
                spec.cwd.display()
            )
        })?;
        for p in [&spec.stdout, &spec.stderr] {
            use std::os::unix::fs::OpenOptionsExt;
            fs::OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o640)
                .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
                .open(p)
                .map_err(|e| format!("cannot open {} for the job's output: {e}", p.display()))?;
        }
        let dirs = [
            sub.cwd.as_path(),
            sub.path.parent().unwrap_or(Path::new("/")),
        ];
        for (fd, dir) in sub.fds.iter().zip(dirs) {
            let sent = nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(fd))
                .map_err(|e| format!("cannot examine a directory you sent: {e}"))?;
            let named = fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            if (sent.st_dev, sent.st_ino) != (named.dev(), named.ino()) {
                return Err(format!(
                    "{} is not the directory you sent (it changed meanwhile)",
                    dir.display()
                ));
            }
        }
        Ok(())
    };
    match &cfg.owner {
        Some(o) => crate::userns::as_owner(o, check)
            .map_err(|e| refused(format!("cannot take {}'s credentials: {e}", o.name)))?
            .map_err(refused),
        None => check().map_err(refused),
    }
}

/// What is kept of a submitted job besides its text.
#[derive(Serialize, Deserialize)]
struct Kept {
    path: PathBuf,
    cwd: PathBuf,
    submitted: chrono::DateTime<chrono::Utc>,
    /// The node whose service supervises it (`None`: kept before nodes
    /// were recorded; this node).
    #[serde(default)]
    node: Option<String>,
    /// Its Slurm run, if submitted from a batch job.
    #[serde(default)]
    slurm: Option<SlurmContext>,
}

/// Where a kept job runs: the node, and its Slurm run if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The node whose service supervises it.
    pub node: String,
    /// Its Slurm run.
    pub slurm: Option<SlurmContext>,
}

/// Whether this node (`here`) may take a job now submitted with `slurm`
/// when it is kept as `kept`: always when the job is kept here or nowhere;
/// from another node only for a later run of the same Slurm job (Slurm
/// reran the batch job here after that node failed or was drained). `Err`
/// is the refusal, naming the node.
pub fn may_take(
    here: &str,
    name: &str,
    kept: Option<&Placement>,
    slurm: Option<&SlurmContext>,
) -> Result<(), String> {
    let Some(k) = kept.filter(|k| k.node != here) else {
        return Ok(());
    };
    match (&k.slurm, slurm) {
        (Some(old), Some(new))
            if old.job_id == new.job_id && new.restart_count > old.restart_count =>
        {
            Ok(())
        }
        (Some(old), Some(new)) if old.job_id == new.job_id => Err(format!(
            "job {name} belongs to run {} of Slurm job {} on node {}, a later run than this \
             one ({}): this copy is stale",
            old.restart_count, old.job_id, k.node, new.restart_count
        )),
        _ => Err(format!(
            "you already have a job named {name}, supervised on node {} (the users' area is \
             shared): cancel it there first, or give this one another `name`",
            k.node
        )),
    }
}

fn jobs_dir(svc: &ServiceConfig, uid: u32) -> PathBuf {
    svc.users_dir.join(uid.to_string()).join("jobs")
}

impl UserJob {
    /// Keeps the submission in `<users_dir>/<uid>/jobs/` (root's).
    pub fn keep(&self, sub: &Submission, svc: &ServiceConfig) -> std::io::Result<()> {
        let dir = jobs_dir(svc, self.uid);
        crate::fsutil::ensure_trusted_dir("service users directory", &dir)
            .map_err(std::io::Error::other)?;
        let kept = Kept {
            path: sub.path.clone(),
            cwd: sub.cwd.clone(),
            submitted: chrono::Utc::now(),
            node: Some(svc.node.clone()),
            slurm: self.slurm.clone(),
        };
        crate::fsutil::write_atomic(
            &dir.join(format!("{}.json", self.cfg.name)),
            &serde_json::to_vec(&kept).map_err(std::io::Error::other)?,
            0o600,
        )?;
        crate::fsutil::write_atomic(
            &dir.join(format!("{}.toml", self.cfg.name)),
            sub.text.as_bytes(),
            0o600,
        )
    }

    /// Where the job `name` of user `uid` is kept, if it is.
    pub fn placement(svc: &ServiceConfig, uid: u32, name: &str) -> Option<Placement> {
        let p = jobs_dir(svc, uid).join(format!("{name}.json"));
        let kept = read_kept(&p)?;
        Some(Placement {
            node: kept.node.unwrap_or_else(|| svc.node.clone()),
            slurm: kept.slurm,
        })
    }

    /// Forgets the job (with `purge`, its state and images too), unless
    /// another node's service supervises it now (a Slurm rerun there):
    /// then nothing is removed, and `Ok(Some(node))` names that node.
    pub fn forget(
        svc: &ServiceConfig,
        uid: u32,
        name: &str,
        purge: bool,
    ) -> std::io::Result<Option<String>> {
        if let Some(p) = Self::placement(svc, uid, name).filter(|p| p.node != svc.node) {
            return Ok(Some(p.node));
        }
        let dir = jobs_dir(svc, uid);
        for ext in ["toml", "json"] {
            match fs::remove_file(dir.join(format!("{name}.{ext}"))) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        // The job's private /tmp goes with the job.
        let tmp =
            crate::supervisor::private_tmp_dir(&svc.users_dir.join(uid.to_string()).join(name));
        match fs::remove_dir_all(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        if purge {
            let state = svc.users_dir.join(uid.to_string()).join(name);
            match fs::remove_dir_all(&state) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(None)
    }

    /// Bytes user `uid` keeps in the service's area (images, state).
    pub fn usage(svc: &ServiceConfig, uid: u32) -> u64 {
        crate::store::dir_size(&svc.users_dir.join(uid.to_string()))
    }
}

/// The jobs kept in `users_dir`, to supervise again after a restart: each
/// `Ok` ready, each `Err` one line saying which and why.
pub fn load_user_jobs(svc: &ServiceConfig) -> Vec<Result<UserJob, String>> {
    let mut out = Vec::new();
    let Ok(users) = fs::read_dir(&svc.users_dir) else {
        return out;
    };
    for u in users.flatten() {
        let Some(uid) = u.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(jobs) = fs::read_dir(jobs_dir(svc, uid)) else {
            continue;
        };
        let mut names: Vec<PathBuf> = jobs
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        names.sort();
        for toml_path in names {
            let elsewhere = read_kept(&toml_path.with_extension("json"))
                .and_then(|k| k.node)
                .filter(|n| *n != svc.node);
            if let Some(node) = elsewhere {
                tracing::info!(
                    job = %toml_path.display(),
                    node = %node,
                    "not supervising a kept job here: node {node} supervises it now"
                );
                continue;
            }
            out.push(load_one(svc, uid, &toml_path));
        }
    }
    out
}

fn load_one(svc: &ServiceConfig, uid: u32, toml_path: &Path) -> Result<UserJob, String> {
    let text = crate::fsutil::read_limited(toml_path, 1 << 20)
        .map_err(|e| crate::fsutil::describe_error(toml_path, &e))?;
    let kept = read_kept(&toml_path.with_extension("json"))
        .ok_or_else(|| format!("{}: its submission record is missing", toml_path.display()))?;
    let owner = match uid {
        0 => None,
        u => Some(Owner::of_uid(u).map_err(|e| format!("{}: {e}", toml_path.display()))?),
    };
    let text = String::from_utf8_lossy(&text).into_owned();
    let cfg = JobConfig::from_str_at(&text, &kept.path).map_err(|e| e.to_string())?;
    let user = owner
        .as_ref()
        .map(|o| o.name.clone())
        .unwrap_or_else(|| "root".into());
    Ok(UserJob {
        cfg: apply_service(cfg, uid, owner, svc),
        uid,
        user,
        slurm: kept.slurm,
    })
}

fn read_kept(p: &Path) -> Option<Kept> {
    crate::fsutil::read_limited(p, 64 << 10)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forbidden_keys_are_named_with_their_line() {
        let p = Path::new("/home/alice/job.toml");
        assert_eq!(forbidden_key("command = [\"x\"]\n", p), None);
        assert_eq!(
            forbidden_key("command = [\"x\"]\nstate_dir = \"/etc\"\n", p).as_deref(),
            Some(
                "/home/alice/job.toml:2: key `state_dir`: not allowed in a submitted job (the \
                 service keeps a submitted job's state)"
            )
        );
        let e = forbidden_key(
            "command = [\"x\"]\n[checkpoint]\nevery = \"1s\"\ndir = \"/tmp/x\"\n",
            p,
        )
        .unwrap();
        assert!(
            e.starts_with("/home/alice/job.toml:4: key `checkpoint.dir`"),
            "{e}"
        );
        assert!(forbidden_key("command = [\"x\"]\nuser = \"root\"\n", p).is_some());
    }

    fn run(id: &str, node: &str, n: u32) -> SlurmContext {
        SlurmContext {
            job_id: id.into(),
            node: node.into(),
            restart_count: n,
        }
    }

    #[test]
    fn only_a_later_run_of_the_same_slurm_job_takes_a_job_from_another_node() {
        let on = |node: &str, s: Option<SlurmContext>| Placement {
            node: node.into(),
            slurm: s,
        };
        // Kept nowhere, or here: always.
        assert!(may_take("n2", "sim", None, None).is_ok());
        assert!(may_take("n2", "sim", Some(&on("n2", None)), None).is_ok());
        let kept = on("n1", Some(run("42", "n1", 0)));
        // The rerun of Slurm job 42 on n2.
        assert!(may_take("n2", "sim", Some(&kept), Some(&run("42", "n2", 1))).is_ok());
        // Not a Slurm job, another Slurm job, or the same run again.
        let e = may_take("n2", "sim", Some(&kept), None).unwrap_err();
        assert!(e.contains("supervised on node n1"), "{e}");
        assert!(may_take("n2", "sim", Some(&kept), Some(&run("43", "n2", 1))).is_err());
        let e = may_take("n2", "sim", Some(&kept), Some(&run("42", "n2", 0))).unwrap_err();
        assert!(e.contains("stale"), "{e}");
        // A job kept on n1 without Slurm is n1's.
        assert!(may_take(
            "n2",
            "sim",
            Some(&on("n1", None)),
            Some(&run("42", "n2", 1))
        )
        .is_err());
    }

    #[test]
    fn the_service_keeps_state_and_images_and_the_owner_keeps_output() {
        let svc = ServiceConfig {
            users_dir: PathBuf::from("/var/lib/sv/users"),
            ..Default::default()
        };
        let cfg =
            JobConfig::from_str_at("command = [\"/bin/true\"]\n", Path::new("/home/a/sim.toml"))
                .unwrap();
        let owner = Owner {
            name: "a".into(),
            uid: 1500,
            gid: 1500,
            groups: vec![],
        };
        let c = apply_service(cfg, 1500, Some(owner), &svc);
        assert_eq!(c.state_dir, Path::new("/var/lib/sv/users/1500/sim"));
        assert_eq!(
            c.checkpoint.dir,
            Path::new("/var/lib/sv/users/1500/sim/images")
        );
        assert_eq!(
            c.store.key_file,
            Path::new("/var/lib/sv/users/1500/sim/store.key")
        );
        let Target::Launch(spec) = &c.target else {
            panic!()
        };
        assert_eq!(spec.stdout, Path::new("/home/a/sim.stdout.log"));
        assert_eq!(c.owner.unwrap().uid, 1500);
    }
}
