//! On-disk image store for one supervised job.
//!
//! A CRIU checkpoint is a directory of files (`*.img`, `stats-dump`, ...)
//! produced by `criu dump` into a directory we choose. The store hands out
//! such a directory ([`ImageStore::begin`]), then publishes it atomically with
//! a checksummed manifest ([`Staging::commit`]), lists and verifies published
//! checkpoints, and applies retention crash-safely.
//!
//! # Layout
//!
//! ```text
//! <dir>/                         # created 0700 if missing (parents too); refused if it
//!                                #   exists and is writable by group or others
//!   000001-20261128T132955Z/     # a published checkpoint: "<seq:06>-<UTC %Y%m%dT%H%M%SZ>"
//!      *.img, stats-dump ...     # CRIU's files, mode 0600
//!      MANIFEST.json             # written last inside the staging dir, before the rename;
//!                                #   its presence marks the checkpoint complete
//!   .staging-000002/             # a checkpoint being written (never listed; removed by
//!                                #   open() as the leftover of a crash)
//!   .deleting-000001-.../        # a checkpoint being removed by retention (renamed first,
//!                                #   then remove_dir_all; leftovers removed by open())
//! ```
//!
//! * The id of a checkpoint is decided at [`ImageStore::begin`]: the sequence
//!   number plus the UTC time of `begin()` (to the second). Lexicographic order
//!   of ids equals age order (as long as sequence numbers have at most six
//!   digits; the store itself always orders by the numeric sequence number).
//! * Sequence numbers: next = 1 + the maximum sequence number among published,
//!   staging and deleting entries, so ids never repeat, even after retention.
//! * Publishing: every file is chmod 0600, hashed (SHA-256) and fsynced, then
//!   `MANIFEST.json` is written and fsynced, the staging directory is fsynced,
//!   renamed to `<dir>/<id>`, and `<dir>` is fsynced.
//! * A directory with a missing, unparseable or unknown-version manifest is
//!   skipped by [`ImageStore::list`] (with a warning) and never deleted by
//!   [`ImageStore::retain`].
//! * Dot-entries other than `.staging-*` / `.deleting-*` are ignored.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use chrono::{DateTime, NaiveDateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::{debug, warn};

/// Name of the manifest file inside a checkpoint directory.
pub const MANIFEST_NAME: &str = "MANIFEST.json";
/// The manifest format version written (and the only one accepted) by this store.
pub const MANIFEST_VERSION: u32 = 1;
/// Prefix of the directory of a checkpoint being written.
pub const STAGING_PREFIX: &str = ".staging-";
/// Prefix of the directory of a checkpoint being removed by retention.
pub const DELETING_PREFIX: &str = ".deleting-";
/// Time format used in checkpoint ids.
const ID_TIME_FORMAT: &str = "%Y%m%dT%H%M%SZ";
/// Buffer size for streaming hashes.
const HASH_BUF_SIZE: usize = 1 << 20;

/// Errors of the image store. Every variant names the path or id it concerns.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An I/O operation on `path` failed.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        /// The path the operation concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The store directory exists but is writable by group or others.
    #[error(
        "image store directory {} has insecure mode {mode:04o} (writable by group/other); refusing to use it",
        path.display()
    )]
    InsecureDir {
        /// The store directory.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The store path exists but is not a directory.
    #[error("image store path {} is not a directory", path.display())]
    NotADirectory {
        /// The offending path.
        path: PathBuf,
    },
    /// A published checkpoint does not match its manifest, or its manifest is invalid.
    #[error("checkpoint {id} is corrupt: {reason}")]
    Corrupt {
        /// The checkpoint id.
        id: String,
        /// What is wrong.
        reason: String,
    },
    /// No published checkpoint with this id exists.
    #[error("checkpoint {id} not found")]
    NotFound {
        /// The requested id.
        id: String,
    },
    /// The string is not a well-formed checkpoint id.
    #[error("invalid checkpoint id {id:?}")]
    InvalidId {
        /// The rejected string.
        id: String,
    },
    /// The staging directory contains something other than regular files.
    #[error("unexpected entry {} in staging directory: {reason}", path.display())]
    UnexpectedEntry {
        /// The offending entry.
        path: PathBuf,
        /// Why it is rejected.
        reason: String,
    },
    /// `retain` was asked to keep fewer than one checkpoint.
    #[error("invalid retention count {keep} for store {}: must keep at least 1", dir.display())]
    InvalidKeep {
        /// The requested count.
        keep: usize,
        /// The store directory.
        dir: PathBuf,
    },
    /// The manifest for `id` could not be serialized.
    #[error("cannot serialize manifest of checkpoint {id}: {source}")]
    Serialize {
        /// The checkpoint id.
        id: String,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
}

/// Builds a closure mapping an `io::Error` to [`StoreError::Io`] for `path`.
fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Checkpoint metadata supplied by the caller at commit time.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CheckpointMeta {
    /// Name of the job.
    pub job: String,
    /// Version of the CRIU binary that made the dump.
    pub criu_version: String,
    /// Wall time of the dump in milliseconds.
    pub duration_ms: u64,
    /// CRIU's frozen time in microseconds (from `stats-dump`), if known.
    pub frozen_us: Option<u64>,
    /// Number of pages written, if known.
    pub pages_written: Option<u64>,
    /// Pid of the dumped root inside its pid namespace.
    pub root_pid: i32,
    /// Room for later features.
    #[serde(default)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// Contents of `MANIFEST.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// Manifest format version (currently [`MANIFEST_VERSION`]).
    pub version: u32,
    /// Checkpoint id; equals the name of the checkpoint directory.
    pub id: String,
    /// Time of [`ImageStore::begin`], i.e. just before the dump started.
    #[serde(with = "rfc3339")]
    pub created: DateTime<Utc>,
    /// Caller-supplied metadata.
    pub meta: CheckpointMeta,
    /// Files of the checkpoint (excluding the manifest), sorted by name.
    pub files: Vec<FileEntry>,
}

/// One file of a checkpoint as recorded in the manifest.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileEntry {
    /// File name (no directory components).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Lower-case hex SHA-256 of the contents.
    pub sha256: String,
}

/// A published checkpoint.
#[derive(Debug, Clone)]
pub struct ImageInfo {
    /// Checkpoint id (`<seq:06>-<time>`).
    pub id: String,
    /// Sequence number parsed from the id.
    pub seq: u64,
    /// Path of the checkpoint directory (pass this to `criu restore -D`).
    pub path: PathBuf,
    /// Creation time (from the manifest).
    pub created: DateTime<Utc>,
    /// Sum of the file sizes in the manifest plus the size of the manifest file.
    pub size_bytes: u64,
    /// The parsed manifest.
    pub manifest: Manifest,
}

/// (De)serializes a `DateTime<Utc>` as RFC 3339 (chrono's `serde` feature is not enabled).
mod rfc3339 {
    use chrono::{DateTime, SecondsFormat, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let s = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&s)
            .map(|t| t.with_timezone(&Utc))
            .map_err(serde::de::Error::custom)
    }
}

/// The image store of one job.
#[derive(Debug, Clone)]
pub struct ImageStore {
    dir: PathBuf,
}

/// A checkpoint being written; obtained from [`ImageStore::begin`].
///
/// Dropping it without [`commit`](Staging::commit) or [`abort`](Staging::abort)
/// removes the staging directory.
#[derive(Debug)]
pub struct Staging {
    store_dir: PathBuf,
    path: PathBuf,
    id: String,
    seq: u64,
    created: DateTime<Utc>,
    done: bool,
}

/// Why a directory entry was not listed (internal; surfaced as warnings).
#[derive(Debug)]
struct Skipped {
    name: String,
    reason: String,
}

impl ImageStore {
    /// Opens (creating with mode 0700, parents included) the store directory
    /// and removes leftover `.staging-*` and `.deleting-*` entries, logging
    /// each with `tracing::warn!`.
    ///
    /// Fails with [`StoreError::InsecureDir`] if the directory is writable by
    /// group or others.
    pub fn open(dir: &Path) -> Result<ImageStore, StoreError> {
        match fs::metadata(dir) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(io_err(dir))?;
                fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(dir))?;
            }
            Err(e) => return Err(io_err(dir)(e)),
        }
        let md = fs::metadata(dir).map_err(io_err(dir))?;
        if !md.is_dir() {
            return Err(StoreError::NotADirectory {
                path: dir.to_path_buf(),
            });
        }
        let mode = md.mode() & 0o7777;
        if mode & 0o022 != 0 {
            return Err(StoreError::InsecureDir {
                path: dir.to_path_buf(),
                mode,
            });
        }

        let store = ImageStore {
            dir: dir.to_path_buf(),
        };
        store.remove_leftovers()?;
        Ok(store)
    }

    /// Opens an existing store for reading only: creates nothing and
    /// removes nothing (a `.staging-*` entry may belong to a checkpoint in
    /// progress in a running supervise). Used by `supervise images`.
    pub fn open_read_only(dir: &Path) -> Result<ImageStore, StoreError> {
        let md = fs::metadata(dir).map_err(io_err(dir))?;
        if !md.is_dir() {
            return Err(StoreError::NotADirectory {
                path: dir.to_path_buf(),
            });
        }
        Ok(ImageStore {
            dir: dir.to_path_buf(),
        })
    }

    /// The store directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Creates `.staging-<seq>` (mode 0700) for the next checkpoint. The id
    /// it will be published under is fixed now: `<seq:06>-<now, UTC>`.
    pub fn begin(&self) -> Result<Staging, StoreError> {
        let mut seq = self.next_seq()?;
        loop {
            let path = self.dir.join(format!("{STAGING_PREFIX}{seq:06}"));
            match DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => {
                    fs::set_permissions(&path, fs::Permissions::from_mode(0o700))
                        .map_err(io_err(&path))?;
                    let created = Utc::now();
                    let id = format!("{seq:06}-{}", created.format(ID_TIME_FORMAT));
                    debug!(id = %id, path = %path.display(), "began checkpoint staging");
                    return Ok(Staging {
                        store_dir: self.dir.clone(),
                        path,
                        id,
                        seq,
                        created,
                        done: false,
                    });
                }
                // Someone (another Staging of this store) raced us: take the next number.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => seq += 1,
                Err(e) => return Err(io_err(&path)(e)),
            }
        }
    }

    /// Published checkpoints, newest first.
    ///
    /// Entries whose `MANIFEST.json` is missing, unparseable, has an unknown
    /// version or a mismatching id are skipped with a warning (not an error);
    /// they are never deleted by [`retain`](Self::retain).
    pub fn list(&self) -> Result<Vec<ImageInfo>, StoreError> {
        let (infos, skipped) = self.scan()?;
        for s in &skipped {
            warn!(
                store = %self.dir.display(),
                entry = %s.name,
                reason = %s.reason,
                "skipping invalid checkpoint directory"
            );
        }
        Ok(infos)
    }

    /// Looks up one published checkpoint by id.
    ///
    /// Returns [`StoreError::NotFound`] if there is no such directory and
    /// [`StoreError::Corrupt`] if its manifest is missing or invalid.
    pub fn get(&self, id: &str) -> Result<ImageInfo, StoreError> {
        let Some(seq) = parse_id(id) else {
            return Err(StoreError::InvalidId { id: id.to_string() });
        };
        let path = self.dir.join(id);
        match fs::symlink_metadata(&path) {
            Ok(md) if md.is_dir() => {}
            Ok(_) => {
                return Err(StoreError::Corrupt {
                    id: id.to_string(),
                    reason: format!("{} is not a directory", path.display()),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound { id: id.to_string() })
            }
            Err(e) => return Err(io_err(&path)(e)),
        }
        load_image(id, seq, path).map_err(|reason| StoreError::Corrupt {
            id: id.to_string(),
            reason,
        })
    }

    /// Re-hashes every file of the checkpoint against its manifest.
    ///
    /// Fails with [`StoreError::Corrupt`] on a missing file, a non-regular
    /// file, a size mismatch or a hash mismatch. Files present on disk but not
    /// in the manifest are ignored.
    pub fn verify(&self, image: &ImageInfo) -> Result<(), StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt {
            id: image.id.clone(),
            reason,
        };
        let mut buf = vec![0u8; HASH_BUF_SIZE];
        for entry in &image.manifest.files {
            if !valid_file_name(&entry.name) {
                return Err(corrupt(format!(
                    "manifest lists invalid file name {:?}",
                    entry.name
                )));
            }
            let path = image.path.join(&entry.name);
            let mut file = match open_nofollow(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(corrupt(format!("missing file {}", entry.name)))
                }
                Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                    return Err(corrupt(format!("{} is a symlink", entry.name)))
                }
                Err(e) => return Err(io_err(&path)(e)),
            };
            let md = file.metadata().map_err(io_err(&path))?;
            if !md.is_file() {
                return Err(corrupt(format!("{} is not a regular file", entry.name)));
            }
            if md.len() != entry.size {
                return Err(corrupt(format!(
                    "{}: size {} but manifest says {}",
                    entry.name,
                    md.len(),
                    entry.size
                )));
            }
            let (size, sha) = hash_reader(&mut file, &mut buf).map_err(io_err(&path))?;
            if size != entry.size {
                return Err(corrupt(format!(
                    "{}: read {} bytes but manifest says {}",
                    entry.name, size, entry.size
                )));
            }
            if !sha.eq_ignore_ascii_case(&entry.sha256) {
                return Err(corrupt(format!(
                    "{}: sha256 {} but manifest says {}",
                    entry.name, sha, entry.sha256
                )));
            }
        }
        Ok(())
    }

    /// Keeps the newest `keep` published checkpoints (`keep >= 1`) and removes
    /// the rest crash-safely: each is renamed to `.deleting-<id>`, the store
    /// directory is fsynced, then the renamed directories are removed. Returns
    /// the removed ids, newest first.
    ///
    /// Only valid (listed) checkpoints count and are removed; invalid entries
    /// are left alone. A failure to remove an already-renamed directory is
    /// only logged (the leftover is removed by the next [`open`](Self::open)).
    pub fn retain(&self, keep: usize) -> Result<Vec<String>, StoreError> {
        if keep == 0 {
            return Err(StoreError::InvalidKeep {
                keep,
                dir: self.dir.clone(),
            });
        }
        let images = self.list()?;
        if images.len() <= keep {
            return Ok(Vec::new());
        }
        let mut renamed = Vec::new();
        let mut result = Ok(());
        for image in &images[keep..] {
            let target = self.dir.join(format!("{DELETING_PREFIX}{}", image.id));
            if let Err(e) = fs::rename(&image.path, &target) {
                result = Err(io_err(&image.path)(e));
                break;
            }
            renamed.push((image.id.clone(), target));
        }
        if !renamed.is_empty() {
            fsync_dir(&self.dir)?;
        }
        let mut removed = Vec::new();
        for (id, path) in renamed {
            if let Err(e) = fs::remove_dir_all(&path) {
                warn!(path = %path.display(), error = %e,
                    "failed to remove deleted checkpoint; will retry at next open");
            }
            debug!(id = %id, "retention removed checkpoint");
            removed.push(id);
        }
        result.map(|()| removed)
    }

    /// Removes `.staging-*` and `.deleting-*` leftovers of a crash.
    fn remove_leftovers(&self) -> Result<(), StoreError> {
        let mut any = false;
        for entry in fs::read_dir(&self.dir).map_err(io_err(&self.dir))? {
            let entry = entry.map_err(io_err(&self.dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if !(name.starts_with(STAGING_PREFIX) || name.starts_with(DELETING_PREFIX)) {
                continue;
            }
            let path = entry.path();
            warn!(path = %path.display(), "removing leftover of an interrupted checkpoint operation");
            let ft = entry.file_type().map_err(io_err(&path))?;
            if ft.is_dir() {
                fs::remove_dir_all(&path).map_err(io_err(&path))?;
            } else {
                fs::remove_file(&path).map_err(io_err(&path))?;
            }
            any = true;
        }
        if any {
            fsync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// 1 + the maximum sequence number among published, staging and deleting entries.
    fn next_seq(&self) -> Result<u64, StoreError> {
        let mut max = 0u64;
        for entry in fs::read_dir(&self.dir).map_err(io_err(&self.dir))? {
            let entry = entry.map_err(io_err(&self.dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let rest = name
                .strip_prefix(STAGING_PREFIX)
                .or_else(|| name.strip_prefix(DELETING_PREFIX))
                .unwrap_or(name);
            if let Some(seq) = leading_seq(rest) {
                max = max.max(seq);
            }
        }
        Ok(max + 1)
    }

    /// Reads all published entries: valid ones (newest first) and skipped ones.
    fn scan(&self) -> Result<(Vec<ImageInfo>, Vec<Skipped>), StoreError> {
        let mut infos = Vec::new();
        let mut skipped = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_err(&self.dir))? {
            let entry = entry.map_err(io_err(&self.dir))?;
            let os_name = entry.file_name();
            let Some(name) = os_name.to_str() else {
                skipped.push(Skipped {
                    name: os_name.to_string_lossy().into_owned(),
                    reason: "name is not UTF-8".into(),
                });
                continue;
            };
            if name.starts_with('.') {
                continue;
            }
            let Some(seq) = parse_id(name) else {
                skipped.push(Skipped {
                    name: name.to_string(),
                    reason: "name is not a checkpoint id".into(),
                });
                continue;
            };
            match entry.file_type() {
                Ok(ft) if ft.is_dir() => {}
                Ok(_) => {
                    skipped.push(Skipped {
                        name: name.to_string(),
                        reason: "not a directory".into(),
                    });
                    continue;
                }
                Err(e) => {
                    skipped.push(Skipped {
                        name: name.to_string(),
                        reason: format!("cannot stat: {e}"),
                    });
                    continue;
                }
            }
            match load_image(name, seq, entry.path()) {
                Ok(info) => infos.push(info),
                Err(reason) => skipped.push(Skipped {
                    name: name.to_string(),
                    reason,
                }),
            }
        }
        infos.sort_by(|a, b| b.seq.cmp(&a.seq).then_with(|| b.id.cmp(&a.id)));
        Ok((infos, skipped))
    }
}

impl Staging {
    /// The id this checkpoint will be published under.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The staging directory (pass this to `criu dump -D`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Publishes the checkpoint.
    ///
    /// Every regular file in the staging directory gets mode 0600, is hashed
    /// (SHA-256, streaming) and fsynced; `MANIFEST.json` is written (0600) and
    /// fsynced; the staging directory is fsynced, renamed to `<dir>/<id>`, and
    /// `<dir>` is fsynced. Subdirectories, symlinks, other special files and a
    /// pre-existing `MANIFEST.json` are errors. On error the staging
    /// directory is removed.
    pub fn commit(mut self, meta: CheckpointMeta) -> Result<ImageInfo, StoreError> {
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.path).map_err(io_err(&self.path))? {
            let entry = entry.map_err(io_err(&self.path))?;
            let path = entry.path();
            let ft = entry.file_type().map_err(io_err(&path))?;
            let unexpected = |reason: &str| StoreError::UnexpectedEntry {
                path: path.clone(),
                reason: reason.to_string(),
            };
            if ft.is_dir() {
                return Err(unexpected("subdirectories are not allowed"));
            }
            if !ft.is_file() {
                return Err(unexpected("not a regular file"));
            }
            let Ok(name) = entry.file_name().into_string() else {
                return Err(unexpected("file name is not UTF-8"));
            };
            if name == MANIFEST_NAME {
                return Err(unexpected("MANIFEST.json is reserved for the store"));
            }
            names.push(name);
        }
        names.sort();

        let mut buf = vec![0u8; HASH_BUF_SIZE];
        let mut files = Vec::with_capacity(names.len());
        for name in names {
            let path = self.path.join(&name);
            let mut file = open_nofollow(&path).map_err(io_err(&path))?;
            file.set_permissions(fs::Permissions::from_mode(0o600))
                .map_err(io_err(&path))?;
            let (size, sha256) = hash_reader(&mut file, &mut buf).map_err(io_err(&path))?;
            file.sync_all().map_err(io_err(&path))?;
            files.push(FileEntry { name, size, sha256 });
        }

        let manifest = Manifest {
            version: MANIFEST_VERSION,
            id: self.id.clone(),
            created: self.created,
            meta,
            files,
        };
        let mut json =
            serde_json::to_vec_pretty(&manifest).map_err(|source| StoreError::Serialize {
                id: self.id.clone(),
                source,
            })?;
        json.push(b'\n');
        let manifest_path = self.path.join(MANIFEST_NAME);
        {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&manifest_path)
                .map_err(io_err(&manifest_path))?;
            f.set_permissions(fs::Permissions::from_mode(0o600))
                .map_err(io_err(&manifest_path))?;
            f.write_all(&json).map_err(io_err(&manifest_path))?;
            f.sync_all().map_err(io_err(&manifest_path))?;
        }
        fsync_dir(&self.path)?;

        let final_path = self.store_dir.join(&self.id);
        rename_noreplace(&self.path, &final_path)?;
        self.done = true;
        fsync_dir(&self.store_dir)?;

        let size_bytes = manifest.files.iter().map(|f| f.size).sum::<u64>() + json.len() as u64;
        debug!(id = %self.id, size_bytes, "published checkpoint");
        Ok(ImageInfo {
            id: self.id.clone(),
            seq: self.seq,
            path: final_path,
            created: self.created,
            size_bytes,
            manifest,
        })
    }

    /// Removes the staging directory (errors are logged, not returned).
    pub fn abort(mut self) {
        self.remove();
    }

    fn remove(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        match fs::remove_dir_all(&self.path) {
            Ok(()) => debug!(path = %self.path.display(), "removed staging directory"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => warn!(path = %self.path.display(), error = %e,
                "failed to remove staging directory; will retry at next open"),
        }
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Total size in bytes of all regular files below `path` (recursively, not
/// following symlinks). Unreadable entries are ignored; a regular file yields
/// its own size.
pub fn dir_size(path: &Path) -> u64 {
    let Ok(md) = fs::symlink_metadata(path) else {
        return 0;
    };
    if md.is_file() {
        return md.len();
    }
    if !md.is_dir() {
        return 0;
    }
    let Ok(rd) = fs::read_dir(path) else { return 0 };
    rd.filter_map(Result::ok).map(|e| dir_size(&e.path())).sum()
}

/// Loads and validates the manifest of the checkpoint directory `path`.
/// Returns a human-readable reason on failure.
fn load_image(id: &str, seq: u64, path: PathBuf) -> Result<ImageInfo, String> {
    #[derive(Deserialize)]
    struct VersionProbe {
        version: u32,
    }

    let manifest_path = path.join(MANIFEST_NAME);
    let bytes = match fs::read(&manifest_path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(format!("{MANIFEST_NAME} is missing"))
        }
        Err(e) => return Err(format!("cannot read {}: {e}", manifest_path.display())),
    };
    let probe: VersionProbe = serde_json::from_slice(&bytes)
        .map_err(|e| format!("{MANIFEST_NAME} is unparseable: {e}"))?;
    if probe.version != MANIFEST_VERSION {
        return Err(format!(
            "{MANIFEST_NAME} has unknown version {} (expected {MANIFEST_VERSION})",
            probe.version
        ));
    }
    let manifest: Manifest = serde_json::from_slice(&bytes)
        .map_err(|e| format!("{MANIFEST_NAME} is unparseable: {e}"))?;
    if manifest.id != id {
        return Err(format!(
            "{MANIFEST_NAME} names id {:?} but the directory is {id:?}",
            manifest.id
        ));
    }
    let size_bytes = manifest.files.iter().map(|f| f.size).sum::<u64>() + bytes.len() as u64;
    Ok(ImageInfo {
        id: id.to_string(),
        seq,
        path,
        created: manifest.created,
        size_bytes,
        manifest,
    })
}

/// Parses a checkpoint id `<seq (>= 6 digits)>-<%Y%m%dT%H%M%SZ>`, returning the sequence number.
fn parse_id(id: &str) -> Option<u64> {
    let (seq, time) = id.split_once('-')?;
    if seq.len() < 6 || !seq.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if time.len() != 16 || NaiveDateTime::parse_from_str(time, ID_TIME_FORMAT).is_err() {
        return None;
    }
    seq.parse().ok()
}

/// The sequence number at the start of `s`: leading digits followed by `-` or end of string.
fn leading_seq(s: &str) -> Option<u64> {
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    if end == 0 || !(end == s.len() || s[end..].starts_with('-')) {
        return None;
    }
    s[..end].parse().ok()
}

/// A plain file name: non-empty, no `/`, not `.`/`..`, not the manifest.
fn valid_file_name(name: &str) -> bool {
    !name.is_empty() && !name.contains('/') && name != "." && name != ".." && name != MANIFEST_NAME
}

/// Opens `path` read-only without following a final symlink.
fn open_nofollow(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// Streams `r` through SHA-256 using `buf`; returns (bytes read, hex digest).
fn hash_reader(r: &mut impl Read, buf: &mut [u8]) -> io::Result<(u64, String)> {
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    loop {
        match r.read(buf) {
            Ok(0) => break,
            Ok(n) => {
                hasher.update(&buf[..n]);
                total += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok((total, hex::encode(hasher.finalize())))
}

/// fsyncs a directory.
fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io_err(dir))
}

/// Renames `from` to `to`, failing if `to` exists.
fn rename_noreplace(from: &Path, to: &Path) -> Result<(), StoreError> {
    use nix::errno::Errno;
    use nix::fcntl::{renameat2, RenameFlags};
    match renameat2(None, from, None, to, RenameFlags::RENAME_NOREPLACE) {
        Ok(()) => Ok(()),
        // Filesystem without RENAME_NOREPLACE support: check, then plain rename.
        Err(Errno::EINVAL) | Err(Errno::ENOSYS) => {
            if fs::symlink_metadata(to).is_ok() {
                return Err(io_err(to)(io::Error::from_raw_os_error(libc::EEXIST)));
            }
            fs::rename(from, to).map_err(io_err(to))
        }
        Err(e) => Err(io_err(to)(io::Error::from(e))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn meta() -> CheckpointMeta {
        CheckpointMeta {
            job: "job".into(),
            criu_version: "4.0".into(),
            duration_ms: 12,
            frozen_us: Some(345),
            pages_written: None,
            root_pid: 1,
            extra: Default::default(),
        }
    }

    fn write(path: &Path, data: &[u8]) {
        fs::write(path, data).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(0o644)).unwrap();
    }

    /// Creates and commits a checkpoint with two files.
    fn publish(store: &ImageStore, tag: &str) -> ImageInfo {
        let st = store.begin().unwrap();
        write(
            &st.path().join("pages-1.img"),
            format!("pages {tag}").as_bytes(),
        );
        write(&st.path().join("stats-dump"), &vec![7u8; 3000]);
        st.commit(meta()).unwrap()
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().mode() & 0o7777
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    /// Runs `f` with a tracing subscriber, returning its result and the log output.
    fn capture_logs<T>(f: impl FnOnce() -> T) -> (T, String) {
        #[derive(Clone)]
        struct W(Arc<Mutex<Vec<u8>>>);
        impl Write for W {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let buf = Arc::new(Mutex::new(Vec::new()));
        let w = W(buf.clone());
        let sub = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::WARN)
            .with_writer(move || w.clone())
            .finish();
        let r = tracing::subscriber::with_default(sub, f);
        let out = String::from_utf8(buf.lock().unwrap().clone()).unwrap();
        (r, out)
    }

    #[test]
    fn publish_and_list_newest_first() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::open(&tmp.path().join("a/b/store")).unwrap();
        let a = publish(&store, "a");
        let b = publish(&store, "b");
        let c = publish(&store, "c");
        assert_eq!((a.seq, b.seq, c.seq), (1, 2, 3));
        assert!(a.id.starts_with("000001-") && a.id.ends_with('Z') && a.id.len() == 23);
        let list = store.list().unwrap();
        let ids: Vec<_> = list.iter().map(|i| i.id.clone()).collect();
        assert_eq!(ids, vec![c.id.clone(), b.id.clone(), a.id.clone()]);
        // Lexicographic order of ids is age order.
        let mut sorted = ids.clone();
        sorted.sort_by(|x, y| y.cmp(x));
        assert_eq!(sorted, ids);

        let got = store.get(&b.id).unwrap();
        assert_eq!(got.manifest.meta, meta());
        assert_eq!(got.manifest.version, 1);
        assert_eq!(got.manifest.files.len(), 2);
        assert_eq!(got.manifest.files[0].name, "pages-1.img");
        assert_eq!(got.created, b.created);
        assert_eq!(got.size_bytes, b.size_bytes);
        assert_eq!(got.size_bytes, dir_size(&got.path));
        store.verify(&got).unwrap();
        assert!(matches!(
            store.get("000009-20260101T000000Z"),
            Err(StoreError::NotFound { .. })
        ));
        assert!(matches!(
            store.get("../etc"),
            Err(StoreError::InvalidId { .. })
        ));
    }

    #[test]
    fn permissions() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("store");
        let store = ImageStore::open(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        let st = store.begin().unwrap();
        assert_eq!(mode(st.path()), 0o700);
        write(&st.path().join("core-1.img"), b"core");
        let info = st.commit(meta()).unwrap();
        assert_eq!(mode(&info.path), 0o700);
        for n in ["core-1.img", MANIFEST_NAME] {
            assert_eq!(mode(&info.path.join(n)), 0o600, "{n}");
        }
    }

    #[test]
    fn insecure_dir_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("store");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        let err = ImageStore::open(&dir).unwrap_err();
        assert!(
            matches!(err, StoreError::InsecureDir { mode: 0o777, .. }),
            "{err}"
        );
        assert!(err.to_string().contains(&dir.display().to_string()));
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        ImageStore::open(&dir).unwrap();
    }

    #[test]
    fn staging_leftovers_removed_at_open_and_never_listed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("store");
        let store = ImageStore::open(&dir).unwrap();
        publish(&store, "a");
        let st = store.begin().unwrap();
        write(&st.path().join("pages-1.img"), b"half");
        let staging_path = st.path().to_path_buf();
        std::mem::forget(st); // simulated crash: no Drop
        assert!(staging_path.exists());
        assert_eq!(store.list().unwrap().len(), 1);

        let (store, logs) = capture_logs(|| ImageStore::open(&dir).unwrap());
        assert!(!staging_path.exists());
        assert!(logs.contains(".staging-000002"), "{logs}");
        assert_eq!(store.list().unwrap().len(), 1);
        // Its sequence number is reused after the crash cleanup; that is fine
        // since it was never published.
        assert_eq!(publish(&store, "b").seq, 2);
    }

    #[test]
    fn abort_and_drop_remove_staging() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::open(tmp.path()).unwrap();
        let st = store.begin().unwrap();
        let p = st.path().to_path_buf();
        write(&p.join("x.img"), b"x");
        st.abort();
        assert!(!p.exists());
        let st = store.begin().unwrap();
        let p = st.path().to_path_buf();
        drop(st);
        assert!(!p.exists());
        assert!(store.list().unwrap().is_empty());
    }

    #[test]
    fn concurrent_stagings_get_distinct_ids() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::open(tmp.path()).unwrap();
        let s1 = store.begin().unwrap();
        let s2 = store.begin().unwrap();
        assert_ne!(s1.id(), s2.id());
        assert_eq!(s2.id()[..6], *"000002");
    }

    #[test]
    fn commit_rejects_subdirectory_and_cleans_up() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::open(tmp.path()).unwrap();
        let st = store.begin().unwrap();
        let p = st.path().to_path_buf();
        fs::create_dir(p.join("sub")).unwrap();
        let err = st.commit(meta()).unwrap_err();
        assert!(matches!(err, StoreError::UnexpectedEntry { .. }), "{err}");
        assert!(!p.exists());
        assert!(store.list().unwrap().is_empty());
    }

    #[test]
    fn missing_manifest_not_listed() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::open(tmp.path()).unwrap();
        let a = publish(&store, "a");
        let fake = tmp.path().join("000009-20260101T000000Z");
        fs::create_dir(&fake).unwrap();
        write(&fake.join("pages-1.img"), b"x");
        let (list, logs) = capture_logs(|| store.list().unwrap());
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].id, a.id);
        assert!(logs.contains("000009-20260101T000000Z"), "{logs}");
        assert!(matches!(
            store.get("000009-20260101T000000Z"),
            Err(StoreError::Corrupt { .. })
        ));
        // It still counts for sequence numbers.
        assert_eq!(publish(&store, "b").seq, 10);
    }

    #[test]
    fn verify_detects_damage() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::open(tmp.path()).unwrap();

        // Flipped byte.
        let img = publish(&store, "a");
        let f = img.path.join("stats-dump");
        let mut data = fs::read(&f).unwrap();
        data[1234] ^= 0x01;
        fs::write(&f, &data).unwrap();
        let err = store.verify(&img).unwrap_err();
        assert!(
            matches!(&err, StoreError::Corrupt { id, reason }
            if *id == img.id && reason.contains("sha256")),
            "{err}"
        );

        // Truncated file.
        let img = publish(&store, "b");
        let f = OpenOptions::new()
            .write(true)
            .open(img.path.join("stats-dump"))
            .unwrap();
        f.set_len(10).unwrap();
        let err = store.verify(&img).unwrap_err();
        assert!(
            matches!(&err, StoreError::Corrupt { reason, .. }
            if reason.contains("size")),
            "{err}"
        );

        // Missing file.
        let img = publish(&store, "c");
        fs::remove_file(img.path.join("pages-1.img")).unwrap();
        let err = store.verify(&img).unwrap_err();
        assert!(
            matches!(&err, StoreError::Corrupt { reason, .. }
            if reason.contains("missing")),
            "{err}"
        );

        // Extra files are ignored.
        let img = publish(&store, "d");
        write(&img.path.join("extra.log"), b"extra");
        store.verify(&img).unwrap();
    }

    #[test]
    fn retain_keeps_newest_and_ids_increase() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("store");
        let store = ImageStore::open(&dir).unwrap();
        let all: Vec<_> = (0..5).map(|i| publish(&store, &i.to_string())).collect();
        assert!(matches!(
            store.retain(0),
            Err(StoreError::InvalidKeep { .. })
        ));
        let removed = store.retain(2).unwrap();
        assert_eq!(
            removed,
            vec![all[2].id.clone(), all[1].id.clone(), all[0].id.clone()]
        );
        let ids: Vec<_> = store.list().unwrap().into_iter().map(|i| i.id).collect();
        assert_eq!(ids, vec![all[4].id.clone(), all[3].id.clone()]);
        assert!(store.retain(2).unwrap().is_empty());
        assert_eq!(names(&dir), vec![all[3].id.clone(), all[4].id.clone()]);

        // Ids keep increasing after retention.
        assert_eq!(publish(&store, "x").seq, 6);
        store.retain(1).unwrap();
        assert_eq!(publish(&store, "y").seq, 7);

        // A `.deleting-*` leftover also counts for the next sequence number...
        let leftover = dir.join(".deleting-000042-20260101T000000Z");
        fs::create_dir(&leftover).unwrap();
        write(&leftover.join("pages-1.img"), b"x");
        let st = store.begin().unwrap();
        assert!(st.id().starts_with("000043-"));
        st.abort();
        assert_eq!(store.list().unwrap().len(), 2);

        // ...and is removed at the next open (simulated crash during retain).
        let (store, logs) = capture_logs(|| ImageStore::open(&dir).unwrap());
        assert!(!leftover.exists());
        assert!(logs.contains(".deleting-000042"), "{logs}");
        assert_eq!(store.list().unwrap().len(), 2);
    }

    #[test]
    fn unknown_manifest_version_skipped_and_not_retained_away() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("store");
        let store = ImageStore::open(&dir).unwrap();
        let old = publish(&store, "old");
        // Rewrite the oldest checkpoint's manifest as a future version.
        let mpath = old.path.join(MANIFEST_NAME);
        let mut v: serde_json::Value = serde_json::from_slice(&fs::read(&mpath).unwrap()).unwrap();
        v["version"] = 99.into();
        fs::write(&mpath, serde_json::to_vec(&v).unwrap()).unwrap();
        let a = publish(&store, "a");
        let b = publish(&store, "b");

        let (list, logs) = capture_logs(|| store.list().unwrap());
        let ids: Vec<_> = list.iter().map(|i| i.id.clone()).collect();
        assert_eq!(ids, vec![b.id.clone(), a.id.clone()]);
        assert!(
            logs.contains("WARN") && logs.contains("unknown version 99"),
            "{logs}"
        );
        assert!(logs.contains(&old.id), "{logs}");

        let removed = store.retain(1).unwrap();
        assert_eq!(removed, vec![a.id.clone()]);
        assert!(old.path.join(MANIFEST_NAME).exists());
        assert_eq!(names(&dir), vec![old.id.clone(), b.id.clone()]);
    }

    #[test]
    fn id_parsing() {
        assert_eq!(parse_id("000001-20261128T132955Z"), Some(1));
        assert_eq!(parse_id("1234567-20261128T132955Z"), Some(1234567));
        assert_eq!(parse_id("00001-20261128T132955Z"), None);
        assert_eq!(parse_id("000001-20261328T132955Z"), None);
        assert_eq!(parse_id("000001-20261128T132955"), None);
        assert_eq!(parse_id("000001"), None);
        assert_eq!(leading_seq("000007"), Some(7));
        assert_eq!(leading_seq("000007-x"), Some(7));
        assert_eq!(leading_seq("0007x"), None);
        assert_eq!(leading_seq("lost+found"), None);
    }

    #[test]
    fn manifest_roundtrip() {
        let m = Manifest {
            version: 1,
            id: "000001-20261128T132955Z".into(),
            created: Utc::now(),
            meta: meta(),
            files: vec![FileEntry {
                name: "a".into(),
                size: 1,
                sha256: "00".into(),
            }],
        };
        let s = serde_json::to_string(&m).unwrap();
        let back: Manifest = serde_json::from_str(&s).unwrap();
        assert_eq!(back.created, m.created);
        assert_eq!(back.meta, m.meta);
        // `extra` may be absent.
        let mut v: serde_json::Value = serde_json::from_str(&s).unwrap();
        v["meta"].as_object_mut().unwrap().remove("extra");
        let back: Manifest = serde_json::from_value(v).unwrap();
        assert!(back.meta.extra.is_empty());
    }
}
