//! What the files module records and rolls back for a job (the job file's
//! `[files]` table, built by `crate::config`).

use std::path::PathBuf;

/// The `[files]` table: rolling the job's own files back with a restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilesConfig {
    /// Record the files the job has open for writing at each checkpoint and
    /// put them back to that state before a restore.
    pub rollback: bool,
    /// Also watch the job's directories (fanotify) and roll back every file
    /// it created, wrote, renamed or deleted since a checkpoint
    /// ([`crate::files::Tracker`]).
    pub watch: bool,
    /// Absolute paths whose full content is kept with every checkpoint
    /// (whether or not the job has them open at that moment).
    pub snapshot: Vec<PathBuf>,
    /// Absolute paths the job only ever extends: their size is enough, even
    /// when they are open read-write.
    pub append: Vec<PathBuf>,
    /// Absolute paths (files, or directories with everything under them)
    /// never recorded nor touched.
    pub exclude: Vec<PathBuf>,
    /// Directories supervise bound in the job's mount namespace, as (the
    /// path the job sees, the path outside): the job's private /tmp. The
    /// job's paths under them are recorded and rolled back at the outside
    /// path. Set by the supervisor, not by the job file.
    pub views: Vec<(PathBuf, PathBuf)>,
    /// Where the content of the copied files as of the last checkpoint is
    /// kept (root's, in the job's trusted run directory): while the job is
    /// frozen a copied file is only compared with it and the pieces that
    /// changed rewritten; the copy into the checkpoint is made from it
    /// after the job runs again ([`crate::files::finish_copies`]). `None`:
    /// the whole file is copied while the job is frozen. Set by the
    /// supervisor.
    pub shadow_dir: Option<PathBuf>,
}

impl Default for FilesConfig {
    fn default() -> Self {
        FilesConfig {
            rollback: true,
            watch: true,
            snapshot: Vec::new(),
            append: Vec::new(),
            exclude: Vec::new(),
            views: Vec::new(),
            shadow_dir: None,
        }
    }
}
