//! From the raw job file to a [`JobConfig`]: cross-field rules, defaults,
//! path resolution, and loading one or several job files.

use std::path::{Path, PathBuf};

use toml::Spanned;

use super::diagnostics::{one_line, Ctx};
use super::raw::{
    is_valid_name, CronExpr, Every, IntervalDur, JobName, PathValue, RawCheckpoint, RawFiles,
    RawJob, RawRestore, RawStore, Table, NAME_RULE,
};
use super::*;

impl JobConfig {
    /// Reads and validates a job file. Relative paths resolve against the
    /// job file's directory (see the module docs).
    ///
    /// A job file must be a regular file (a symlink to one is followed) of
    /// at most [`MAX_JOB_FILE_SIZE`] bytes: a FIFO, a device or a directory
    /// is refused without being opened, and the file is read from the
    /// descriptor that was checked, so that neither can hang supervise nor
    /// feed it endless bytes.
    pub fn load(path: &Path) -> Result<JobConfig, ConfigError> {
        let text = read_job_file(path)?;
        JobConfig::from_str_at(&text, path)
    }

    /// Reads several job files; a directory stands for the `*.toml` files
    /// in it (sorted by name). Two jobs may not share a name, a state
    /// directory, an image directory or a second copy directory.
    pub fn load_all(paths: &[PathBuf]) -> Result<Vec<JobConfig>, ConfigError> {
        let mut files = Vec::new();
        for p in paths {
            if p.is_dir() {
                let rd = std::fs::read_dir(p).map_err(|source| ConfigError::Read {
                    path: absolute(p),
                    source,
                })?;
                // Every `*.toml` that is a file of some kind is a job file,
                // and must then be a regular one (`load` refuses a FIFO or a
                // device, naming it). Directories and dangling symlinks
                // (editors' lock files such as `.#job.toml`) are not files
                // and are skipped.
                let mut found: Vec<PathBuf> = rd
                    .flatten()
                    .map(|e| e.path())
                    .filter(|f| f.extension().is_some_and(|x| x == "toml"))
                    .filter(|f| std::fs::metadata(f).is_ok_and(|m| !m.is_dir()))
                    .collect();
                if found.is_empty() {
                    return Err(ConfigError::Invalid {
                        path: absolute(p),
                        position: None,
                        key: None,
                        message: "no job files (*.toml) in this directory".into(),
                    });
                }
                found.sort();
                files.extend(found);
            } else {
                files.push(p.clone());
            }
        }
        let mut cfgs: Vec<JobConfig> = Vec::new();
        for f in &files {
            let c = JobConfig::load(f)?;
            for other in &cfgs {
                let clash = if other.name == c.name {
                    Some(("name", format!("job name {:?}", c.name)))
                } else if other.state_dir == c.state_dir {
                    Some((
                        "state_dir",
                        format!("state directory {}", c.state_dir.display()),
                    ))
                } else if other.checkpoint.dir == c.checkpoint.dir {
                    Some((
                        "checkpoint.dir",
                        format!("image directory {}", c.checkpoint.dir.display()),
                    ))
                } else {
                    c.store
                        .copy_dir
                        .as_ref()
                        .filter(|d| {
                            other.store.copy_dir.as_ref() == Some(*d) || other.checkpoint.dir == **d
                        })
                        .map(|d| {
                            (
                                "store.copy_dir",
                                format!("second copy directory {}", d.display()),
                            )
                        })
                };
                if let Some((key, what)) = clash {
                    return Err(ConfigError::Invalid {
                        path: c.source.clone(),
                        position: None,
                        key: Some(key.into()),
                        message: format!(
                            "{what} is also used by {}; each job needs its own",
                            other.source.display()
                        ),
                    });
                }
            }
            cfgs.push(c);
        }
        Ok(cfgs)
    }

    /// Like [`JobConfig::load`], from text. `path` is used for messages and
    /// relative-path resolution; it need not exist.
    pub fn from_str_at(text: &str, path: &Path) -> Result<JobConfig, ConfigError> {
        let source = absolute(path);
        let ctx = Ctx {
            text,
            path: &source,
        };

        // Syntax first, so that TOML errors are reported as such.
        if let Err(e) = text.parse::<toml::Table>() {
            return Err(ConfigError::Syntax {
                path: source.clone(),
                position: e.span().map(|s| Position::of_offset(text, s.start)),
                message: one_line(e.message()),
            });
        }
        let raw: RawJob = serde_path_to_error::deserialize(toml::Deserializer::new(text))
            .map_err(|e| ctx.de_error(e))?;
        build(raw, &ctx)
    }
}

// ---------------------------------------------------------------------------
// Semantic checks and path resolution

fn build(raw: RawJob, ctx: &Ctx<'_>) -> Result<JobConfig, ConfigError> {
    let base_dir = ctx
        .path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/"));

    let name = match raw.name {
        Some(JobName(n)) => n,
        None => {
            let stem = ctx
                .path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            if !is_valid_name(&stem) {
                return ctx.err(
                    None,
                    "name",
                    format!(
                        "no `name` given and the file name stem {stem:?} is not a valid job name \
                         ({NAME_RULE}); set `name` explicitly"
                    ),
                );
            }
            stem
        }
    };

    let state_dir = match raw.state_dir {
        Some(PathValue(p)) => resolve(&base_dir, &p),
        None => base_dir.join(STATE_PARENT).join(&name),
    };

    let owner = build_owner(raw.user, raw.group, raw.attach.is_some(), ctx)?;
    let target = match (raw.command, raw.attach) {
        (Some(cmd), Some(pid)) => {
            let (span, key) = if cmd.span().start > pid.span().start {
                (cmd.span(), "command")
            } else {
                (pid.span(), "attach")
            };
            return ctx.err(
                Some(span),
                key,
                "`command` and `attach` are mutually exclusive".to_string(),
            );
        }
        (None, None) => {
            return ctx.err(
                None,
                "",
                "one of `command` or `attach` is required".to_string(),
            )
        }
        (None, Some(pid)) => {
            let launch_only = [
                ("cwd", raw.cwd.as_ref().map(|v| Some(v.span()))),
                ("env", raw.env.as_ref().map(|e| e.first_span.clone())),
                ("stdout", raw.stdout.as_ref().map(|v| Some(v.span()))),
                ("stderr", raw.stderr.as_ref().map(|v| Some(v.span()))),
            ];
            for (key, present) in launch_only {
                if let Some(span) = present {
                    return ctx.err(
                        span,
                        key,
                        format!("`{key}` can only be used with `command`, not with `attach`"),
                    );
                }
            }
            Target::Attach {
                pid: pid.into_inner().0,
            }
        }
        (Some(cmd), None) => {
            let cwd = match raw.cwd {
                Some(c) => resolve(&base_dir, &c.into_inner().0),
                None => base_dir.clone(),
            };
            let mut command = cmd.into_inner().0;
            if command[0].contains('/') && Path::new(&command[0]).is_relative() {
                command[0] = resolve(&cwd, Path::new(&command[0]))
                    .to_string_lossy()
                    .into_owned();
            }
            // A job that runs as its owner writes its output where the
            // owner can reach it (its CRIU reopens it by path, as the
            // owner): by default into its working directory.
            let out = |p: Option<Spanned<PathValue>>, default: &str| match p {
                Some(p) => resolve(&base_dir, &p.into_inner().0),
                None if owner.is_some() => cwd.join(format!("{name}.{default}")),
                None => state_dir.join(default),
            };
            let (stdout, stderr) = (out(raw.stdout, "stdout.log"), out(raw.stderr, "stderr.log"));
            Target::Launch(LaunchSpec {
                command,
                cwd,
                env: raw.env.map(|e| e.vars).unwrap_or_default(),
                stdout,
                stderr,
                private_tmp: raw.private_tmp.unwrap_or(true),
            })
        }
    };

    let checkpoint = build_checkpoint(raw.checkpoint, &base_dir, &state_dir, ctx)?;
    let restore = build_restore(raw.restore, ctx)?;
    let shutdown = match raw.shutdown {
        None => ShutdownConfig::default(),
        Some(Table(s)) => ShutdownConfig {
            action: s.action.unwrap_or_default(),
            checkpoint: s.checkpoint.unwrap_or(true),
        },
    };

    let files = build_files(raw.files, &base_dir, ctx)?;
    let slurm = match raw.slurm {
        None => SlurmConfig::default(),
        Some(Table(r)) => SlurmConfig {
            signal: r.signal.unwrap_or_default(),
            requeue: r.requeue.unwrap_or(true),
            fence_wait: r
                .fence_wait
                .map_or(SlurmConfig::default().fence_wait, |d| d.0),
        },
    };

    let store = build_store(raw.store, &base_dir, &state_dir, &checkpoint.dir, ctx)?;

    Ok(JobConfig {
        name,
        source: ctx.path.to_path_buf(),
        base_dir,
        target,
        state_dir,
        checkpoint,
        restore,
        shutdown,
        files,
        slurm,
        store,
        owner,
    })
}

/// `user` and `group`: the job runs as that user (in a user namespace of
/// its own). Only a launched job, and only for a supervise running as
/// root (which alone can create the namespace and switch to the user).
fn build_owner(
    user: Option<Spanned<String>>,
    group: Option<Spanned<String>>,
    attach: bool,
    ctx: &Ctx<'_>,
) -> Result<Option<crate::userns::Owner>, ConfigError> {
    let Some(user) = user else {
        if let Some(g) = group {
            return ctx.err(Some(g.span()), "group", "`group` needs `user`".to_string());
        }
        return Ok(None);
    };
    let span = user.span();
    if attach {
        return ctx.err(
            Some(span),
            "user",
            "`user` can only be used with `command` (an attached process already has its owner)"
                .to_string(),
        );
    }
    if !nix::unistd::geteuid().is_root() {
        return ctx.err(
            Some(span),
            "user",
            "only a supervise running as root can run a job as another user".to_string(),
        );
    }
    let gspan = group.as_ref().map(|g| g.span());
    let group = group.map(|g| g.into_inner());
    match crate::userns::Owner::lookup(user.get_ref(), group.as_deref()) {
        Ok(o) => Ok(Some(o)),
        Err(e @ crate::userns::OwnerError::NoGroup(_)) => ctx.err(gspan, "group", e.to_string()),
        Err(e) => ctx.err(Some(span), "user", e.to_string()),
    }
}

fn build_store(
    raw: Option<Table<RawStore>>,
    base_dir: &Path,
    state_dir: &Path,
    image_dir: &Path,
    ctx: &Ctx<'_>,
) -> Result<StoreOptions, ConfigError> {
    let default_key = state_dir.join(DEFAULT_KEY_FILE);
    let Some(Table(raw)) = raw else {
        return Ok(StoreOptions::new(default_key));
    };
    let copies = raw.copies.as_ref().map_or(1, |c| c.get_ref().0);
    let copy_dir = match (copies, raw.copy_dir) {
        (2, None) => {
            let span = raw.copies.as_ref().map(|c| c.span());
            return ctx.err(
                span,
                "store.copies",
                "`copies = 2` needs `copy_dir`, the directory (ideally on another disk) \
                 that holds the second copy"
                    .to_string(),
            );
        }
        (1, Some(d)) if raw.copies.is_some() => {
            return ctx.err(
                Some(d.span()),
                "store.copy_dir",
                "`copy_dir` is only used with `copies = 2`".to_string(),
            )
        }
        (_, Some(d)) => {
            let span = d.span();
            let dir = resolve(base_dir, &d.into_inner().0);
            if dir.starts_with(image_dir) || image_dir.starts_with(&dir) {
                return ctx.err(
                    Some(span),
                    "store.copy_dir",
                    format!(
                        "{} overlaps the image directory {}: the second copy must be a \
                         separate directory (ideally on another disk)",
                        dir.display(),
                        image_dir.display()
                    ),
                );
            }
            Some(dir)
        }
        (_, None) => None,
    };
    Ok(StoreOptions {
        encryption: raw.encryption.unwrap_or(true),
        key_file: raw
            .key_file
            .map_or(default_key, |PathValue(p)| resolve(base_dir, &p)),
        parity: raw.parity.unwrap_or(true),
        copy_dir,
        scrub: raw.scrub.map(|d| d.0),
    })
}

fn build_files(
    raw: Option<Table<RawFiles>>,
    base_dir: &Path,
    ctx: &Ctx<'_>,
) -> Result<FilesConfig, ConfigError> {
    let Some(Table(raw)) = raw else {
        return Ok(FilesConfig::default());
    };
    type Spans = Vec<(PathBuf, std::ops::Range<usize>)>;
    let list = |v: Option<Vec<Spanned<PathValue>>>| -> Spans {
        v.unwrap_or_default()
            .into_iter()
            .map(|p| {
                let span = p.span();
                (resolve(base_dir, &p.into_inner().0), span)
            })
            .collect()
    };
    let snapshot = list(raw.snapshot);
    let append = list(raw.append);
    let exclude = list(raw.exclude);
    // One path, one treatment: a later list naming a path an earlier one
    // already names is an error at the later mention.
    let named: [(&str, &Spans); 3] = [
        ("files.snapshot", &snapshot),
        ("files.append", &append),
        ("files.exclude", &exclude),
    ];
    for (i, (key, paths)) in named.iter().enumerate() {
        for (j, (other, others)) in named.iter().enumerate().skip(i) {
            for (n, (p, span)) in others.iter().enumerate() {
                let dup = if i == j {
                    paths[..n].iter().any(|(q, _)| q == p)
                } else {
                    paths.iter().any(|(q, _)| q == p)
                };
                if dup {
                    let msg = if i == j {
                        format!("{} is listed twice", p.display())
                    } else {
                        format!("{} is already listed in `{key}`", p.display())
                    };
                    return ctx.err(Some(span.clone()), other, msg);
                }
            }
        }
    }
    let strip = |v: Spans| v.into_iter().map(|(p, _)| p).collect();
    Ok(FilesConfig {
        rollback: raw.rollback.unwrap_or(true),
        watch: raw.watch.unwrap_or(true),
        snapshot: strip(snapshot),
        append: strip(append),
        exclude: strip(exclude),
        views: Vec::new(),
        shadow_dir: None,
    })
}

fn build_checkpoint(
    raw: Option<Table<RawCheckpoint>>,
    base_dir: &Path,
    state_dir: &Path,
    ctx: &Ctx<'_>,
) -> Result<CheckpointConfig, ConfigError> {
    let default_dir = state_dir.join("images");
    let Some(Table(raw)) = raw else {
        return Ok(CheckpointConfig {
            schedule: ScheduleSpec::Every(DEFAULT_EVERY),
            dir: default_dir,
            keep: DEFAULT_KEEP,
            criu: CriuOptions::default(),
            timeout: None,
            stream: true,
        });
    };

    let auto_only = [
        ("checkpoint.mtbf", raw.mtbf.as_ref().map(|v| v.span())),
        (
            "checkpoint.max_overhead",
            raw.max_overhead.as_ref().map(|v| v.span()),
        ),
        ("checkpoint.min", raw.min.as_ref().map(|v| v.span())),
        ("checkpoint.max", raw.max.as_ref().map(|v| v.span())),
    ];
    let is_auto = matches!(raw.every.as_ref().map(|e| e.get_ref()), Some(Every::Auto));
    if !is_auto {
        if let Some((key, span)) = auto_only.iter().find(|(_, s)| s.is_some()) {
            return ctx.err(
                span.clone(),
                key,
                format!(
                    "`{}` is only valid together with `every = \"auto\"`",
                    key.trim_start_matches("checkpoint.")
                ),
            );
        }
    }
    let schedule = match (raw.every, raw.cron) {
        (Some(every), Some(cron)) => {
            let (span, key) = if cron.span().start > every.span().start {
                (cron.span(), "checkpoint.cron")
            } else {
                (every.span(), "checkpoint.every")
            };
            return ctx.err(
                Some(span),
                key,
                "`every` and `cron` are mutually exclusive (use one of them)".to_string(),
            );
        }
        (every, None) => {
            if let Some(tz) = &raw.timezone {
                return ctx.err(
                    Some(tz.span()),
                    "checkpoint.timezone",
                    "`timezone` is only valid together with `cron`".to_string(),
                );
            }
            match every {
                None => ScheduleSpec::Every(DEFAULT_EVERY),
                Some(e) => {
                    let span = e.span();
                    match e.into_inner() {
                        Every::Fixed(d) => ScheduleSpec::Every(d),
                        Every::Auto => auto_params(
                            span,
                            raw.mtbf,
                            raw.max_overhead.map(|p| p.into_inner().0),
                            raw.min,
                            raw.max,
                            ctx,
                        )?,
                    }
                }
            }
        }
        (None, Some(cron)) => {
            let tz = raw
                .timezone
                .map_or(chrono_tz::Tz::UTC, |t| t.into_inner().0);
            let span = cron.span();
            let CronExpr { expr, schedule } = cron.into_inner();
            let spec = ScheduleSpec::Cron { expr, schedule, tz };
            if spec.next_after(chrono::Utc::now()).is_none() {
                return ctx.err(
                    Some(span),
                    "checkpoint.cron",
                    "this cron expression never fires again (all its times are in the past)"
                        .to_string(),
                );
            }
            spec
        }
    };

    let criu = CriuOptions {
        shell_job: raw.shell_job.unwrap_or(false),
        tcp_established: raw.tcp_established.unwrap_or(false),
        file_locks: raw.file_locks.unwrap_or(false),
        ext_unix_sk: raw.ext_unix_sk.unwrap_or(false),
        log_level: raw.log_level.map_or(DEFAULT_CRIU_LOG_LEVEL, |l| l.0 as u32),
        network_lock: raw.network_lock.unwrap_or_default(),
        ghost_limit: raw.ghost_limit.map(|g| g.0 as u32),
        skip_in_flight: raw.skip_in_flight.unwrap_or(false),
        link_remap: raw.link_remap.unwrap_or(false),
        tcp_close: raw.tcp_close.unwrap_or(false),
        pass_through: raw.criu_opts.map(|Table(t)| t.0).unwrap_or_default(),
    };

    Ok(CheckpointConfig {
        schedule,
        dir: raw
            .dir
            .map_or(default_dir, |PathValue(p)| resolve(base_dir, &p)),
        keep: raw.keep.map_or(DEFAULT_KEEP, |k| k.0 as usize),
        criu,
        timeout: raw.timeout.map(|t| t.0),
        stream: raw.stream.unwrap_or(true),
    })
}

/// `every = "auto"`: `mtbf` is required; `min <= max`.
fn auto_params(
    every_span: std::ops::Range<usize>,
    mtbf: Option<Spanned<IntervalDur>>,
    max_overhead_ppm: Option<u32>,
    min: Option<Spanned<IntervalDur>>,
    max: Option<Spanned<IntervalDur>>,
    ctx: &Ctx<'_>,
) -> Result<ScheduleSpec, ConfigError> {
    let Some(mtbf) = mtbf else {
        return ctx.err(
            Some(every_span),
            "checkpoint.every",
            "`every = \"auto\"` needs `mtbf`, your estimate of the job's mean time between \
             failures (e.g. mtbf = \"24h\")"
                .to_string(),
        );
    };
    let max_span = max.as_ref().map(|m| m.span());
    let min = min.map_or(DEFAULT_AUTO_MIN, |m| m.into_inner().0);
    let max = max.map_or(DEFAULT_AUTO_MAX.max(min), |m| m.into_inner().0);
    if min > max {
        return ctx.err(
            max_span,
            "checkpoint.max",
            format!(
                "must be at least `min` ({})",
                humantime::format_duration(min)
            ),
        );
    }
    Ok(ScheduleSpec::Auto(crate::interval::AutoParams {
        mtbf: mtbf.into_inner().0,
        max_overhead_ppm,
        min,
        max,
    }))
}

fn build_restore(
    raw: Option<Table<RawRestore>>,
    ctx: &Ctx<'_>,
) -> Result<RestoreConfig, ConfigError> {
    let Some(Table(raw)) = raw else {
        return Ok(RestoreConfig::default());
    };
    let backoff = raw
        .backoff
        .as_ref()
        .map_or(DEFAULT_BACKOFF, |b| b.get_ref().0);
    let backoff_max = raw
        .backoff_max
        .as_ref()
        .map_or(DEFAULT_BACKOFF_MAX, |b| b.get_ref().0);
    if backoff_max < backoff {
        let fmt = |d| humantime::format_duration(d).to_string();
        return match (&raw.backoff_max, &raw.backoff) {
            (Some(m), _) => ctx.err(
                Some(m.span()),
                "restore.backoff_max",
                format!(
                    "must be at least `backoff` ({}), found {}",
                    fmt(backoff),
                    fmt(backoff_max)
                ),
            ),
            (None, b) => ctx.err(
                b.as_ref().map(Spanned::span),
                "restore.backoff",
                format!(
                    "{} exceeds `backoff_max` ({}, the default); raise `backoff_max` too",
                    fmt(backoff),
                    fmt(backoff_max)
                ),
            ),
        };
    }
    Ok(RestoreConfig {
        on: raw.on.unwrap_or_default(),
        max_restores: raw
            .max_restores
            .map_or(DEFAULT_MAX_RESTORES, |m| m.0 as u32),
        window: raw.window.map_or(DEFAULT_RESTORE_WINDOW, |w| w.0),
        backoff,
        backoff_max,
        healthy_after: raw
            .healthy_after
            .map_or(crate::config::DEFAULT_HEALTHY_AFTER, |d| d.0),
        lazy: raw.lazy.unwrap_or(true),
    })
}

/// Reads a job file: a regular file (symlinks followed) of at most
/// [`MAX_JOB_FILE_SIZE`] bytes, read from the checked descriptor
/// ([`crate::fsutil::read_regular_following`]), in UTF-8.
fn read_job_file(path: &Path) -> Result<String, ConfigError> {
    let read_error = |source| ConfigError::Read {
        path: absolute(path),
        source,
    };
    use crate::fsutil::RegularReadError;
    let bytes = crate::fsutil::read_regular_following(path, MAX_JOB_FILE_SIZE).map_err(|e| {
        let invalid = |text: String| std::io::Error::new(std::io::ErrorKind::InvalidData, text);
        read_error(match e {
            RegularReadError::NotRegular(kind) => invalid(format!(
                "{kind}, not a regular file (a job file must be a regular file or a symlink \
                 to one)"
            )),
            RegularReadError::TooLarge(max) => invalid(format!(
                "larger than {} KiB ({max} bytes), the limit for a job file",
                max / 1024
            )),
            RegularReadError::Io(e) => e,
        })
    })?;
    String::from_utf8(bytes).map_err(|_| {
        read_error(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not valid UTF-8",
        ))
    })
}

/// Makes `path` absolute (against the current directory) without touching
/// the file system beyond `current_dir`; falls back to `path` itself.
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path)
        .map(|p| p.components().collect())
        .unwrap_or_else(|_| path.to_path_buf())
}

/// `p` if absolute, else `base/p`; `.` components and doubled separators are
/// dropped (lexically; `..` is kept since symlinks may be involved).
fn resolve(base: &Path, p: &Path) -> PathBuf {
    base.join(p).components().collect()
}
