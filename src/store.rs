//! On-disk image store for one supervised job: deduplicating, compressed,
//! verified, crash-safe.
//!
//! CRIU dumps a checkpoint as a directory of files. The store hands out such
//! a directory ([`ImageStore::begin`]), and on [`Staging::commit`] *ingests*
//! it: page images are cut into pages, every other file into 64 KiB pieces,
//! each piece is named by its BLAKE3 hash and stored once, zstd-compressed,
//! in a pack file; the checkpoint itself becomes a small manifest naming the
//! root of each file's chunk tree. The raw dump is then deleted. A restore
//! writes the files back out ([`ImageStore::materialise`]), verifying every
//! piece against its hash as it is read.
//!
//! # Why this design
//!
//! * **Page-granular, content-addressed dedup.** Two dumps of a running job
//!   differ in a few scattered pages (measured: 88 of 262,173 pages of a 1 GiB
//!   job, 6 s apart). CRIU's `pages-*.img` are raw 4 KiB pages, so cutting
//!   them at page boundaries finds exactly the unchanged ones, wherever they
//!   moved in the file. No kernel support is needed (CRIU's own incremental
//!   mode needs soft-dirty tracking), and no checkpoint depends on another:
//!   each manifest names all of its pieces, so retention may delete any
//!   checkpoint and every retained one still restores on its own.
//! * **Merkle chunk lists.** A flat list of 262k hashes per GiB would cost
//!   8 MiB per checkpoint. Instead chunk hashes are grouped 64 to a node (a
//!   2 KiB object), nodes again 64 to a node, up to one root; unchanged
//!   subtrees are unchanged objects and deduplicate like data, so a
//!   checkpoint's metadata grows with what changed (about one 2 KiB node per
//!   changed region plus its ancestors), not with the job's size.
//! * **One pack per checkpoint.** New objects of one commit go into one pack
//!   file with one index, instead of one file per page. Packs are immutable;
//!   garbage collection deletes packs nobody references and rewrites packs
//!   that are mostly dead.
//! * **BLAKE3 + zstd level 1**: both run at GB/s, so verifying everything a
//!   restore reads costs little; an object is stored raw when compressing
//!   does not make it smaller.
//!
//! # Layout
//!
//! ```text
//! <dir>/                          # created 0700 (parents too); must be a trusted location
//!                                 #   (fsutil::check_trusted: owned by root/us, not group/other-writable, same above)
//!   .supervise-store              # marker: a non-empty directory without it is not taken as a store
//!   .lock                         # flock: exclusive for commit/retain/gc, shared for reads
//!   packs/                        # 0700
//!     <name>.pack                 # objects (see objects.rs), written once, fsynced
//!     <name>.idx                  # its index with a checksum; renamed in after the pack
//!     .tmp-*                      # a pack/index being written (crash leftover if idle)
//!   000001-20261128T132955Z/      # a published checkpoint: "<seq:06>-<UTC %Y%m%dT%H%M%SZ>"
//!      MANIFEST.json              # version 2: files with size, chunk size, tree root/depth,
//!                                 #   metadata, bytes newly stored; mode 0600
//!   .staging-000002/              # CRIU's raw dump being written / ingested
//!   .deleting-000001-.../         # a checkpoint being removed by retention
//! ```
//!
//! Version 1 checkpoints (whole files next to a SHA-256 manifest, written by
//! earlier releases) are still listed, verified, restored and retained.
//!
//! # Crash safety
//!
//! Everything is write, fsync, rename, fsync the directory; nothing
//! published is ever modified in place.
//!
//! * **Commit**, under the exclusive lock: ingest into a temporary pack,
//!   fsync, rename to `<name>.pack`, write and rename `<name>.idx`, fsync
//!   `packs/`; only then delete the raw files, write `MANIFEST.json` into the
//!   staging directory, fsync, rename it to `<id>`, fsync `<dir>`. A crash
//!   before the last rename leaves a staging directory (removed by the next
//!   [`ImageStore::open`]) and possibly an unreferenced pack (reclaimed by
//!   [`ImageStore::gc`]); published checkpoints are untouched.
//! * **Retention**, under the exclusive lock: rename to `.deleting-<id>`,
//!   fsync, remove. Data stays in packs until gc.
//! * **gc**, under the exclusive lock, so it never runs while a commit has
//!   new objects that no manifest references yet (a CRIU dump still writing
//!   into staging references nothing in the store). It marks every object
//!   reachable from every published manifest; a pack with no live object is
//!   removed (index first, then data); a pack less than half live is
//!   rewritten: live objects are copied (each verified) into a new pack that
//!   is published completely before the old index and pack are removed. If
//!   any published checkpoint cannot be read (unknown manifest version, a
//!   damaged tree node), gc deletes nothing.
//! * `open` (by the supervising process, which holds the job's lock) removes
//!   `.staging-*`, `.deleting-*` and `packs/.tmp-*` leftovers; gc removes the
//!   latter two. `open_read_only` (`supervise images`, `verify`) changes
//!   nothing.
//!
//! # Integrity
//!
//! Every object read for a restore is decompressed and checked against its
//! hash, and every file's size and chunk count against the manifest, while
//! it is being written out; a checkpoint with a bad or missing piece fails
//! [`ImageStore::materialise`] with [`StoreError::Corrupt`] naming the file,
//! chunk, object and pack, and the supervisor falls back to an older one.
//! [`ImageStore::verify_all`] checks every checkpoint (each shared object
//! once) plus the pack indexes' own checksums.
//!
//! # Restore speed
//!
//! [`ImageStore::materialise`] writes the image directory with several
//! threads (objects that lie back to back in a pack are read with one call)
//! into a scratch directory made by [`scratch_dir`]: a fresh `mkdtemp`-style
//! directory on tmpfs (`/dev/shm`) when it has room, else in the job's state
//! directory. The caller removes it once CRIU has restored; leftovers of a
//! crash are removed by [`remove_scratch`] (only directories that are ours).
//!
//! # Hostile files
//!
//! supervise runs as root; the store directory must be trusted, but a store
//! file may still be damaged or replaced. Every store file is read through
//! [`crate::fsutil`]: opened `O_NOFOLLOW|O_NONBLOCK` and used only if it is a
//! regular file, so a symlink is never followed and a FIFO or device never
//! blocks or feeds endless bytes. Metadata has a size limit
//! ([`MAX_MANIFEST_BYTES`], `objects::index_limit`); a file over it is
//! damage, like any other damaged file: its checkpoint is skipped (or its
//! pack's objects unavailable), named in the warning or error. Image
//! directories, `packs/` and staging directories are looked at with
//! `lstat`: a symlink or non-directory there is damage, never followed.

mod objects;

pub use objects::{Hash, PieceError, FANOUT, FILE_CHUNK, PAGE_CHUNK};

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDateTime, Utc};

use crate::fsutil;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};

use objects::{HashSetH, ObjectDb, PackWriter, Reader, TreeBuilder};

/// Name of the manifest file inside a checkpoint directory.
pub const MANIFEST_NAME: &str = "MANIFEST.json";
/// The marker file that makes a directory a supervise image store: written
/// (0600) when [`ImageStore::open`] creates or adopts a directory; a
/// non-empty directory without it is refused.
pub const MARKER_NAME: &str = ".supervise-store";
/// What the marker file holds.
const MARKER_CONTENT: &[u8] = b"supervise image store\n";
/// Largest marker file read (it holds [`MARKER_CONTENT`]).
const MAX_MARKER_BYTES: u64 = 4096;
/// Largest `MANIFEST.json` read (both versions); a larger one makes its
/// checkpoint damaged. A manifest costs ~250 bytes per file of the dump
/// (CRIU writes ~6-8 files per process), so 64 MiB is ~250k files, a job
/// of tens of thousands of processes, far beyond real ones; reading and
/// parsing that much is still cheap, while a hostile sparse file or
/// `/dev/zero` can no longer make `list` allocate without bound.
pub const MAX_MANIFEST_BYTES: u64 = 64 << 20;
/// The manifest format version written by this store.
pub const MANIFEST_VERSION: u32 = 2;
/// The oldest manifest version still read (whole files + SHA-256).
pub const MANIFEST_VERSION_V1: u32 = 1;
/// Prefix of the directory of a checkpoint being written.
pub const STAGING_PREFIX: &str = ".staging-";
/// Prefix of the directory of a checkpoint being removed by retention.
pub const DELETING_PREFIX: &str = ".deleting-";
/// The store's lock file.
pub const LOCK_NAME: &str = ".lock";
/// The directory of pack files.
pub const PACKS_DIR: &str = "packs";
/// Time format used in checkpoint ids.
const ID_TIME_FORMAT: &str = "%Y%m%dT%H%M%SZ";
/// Buffer size for streaming hashes.
const HASH_BUF_SIZE: usize = 1 << 20;
/// Output is written in pieces of at most this size.
const WRITE_BATCH: usize = 4 << 20;
/// Files with more chunks than this are materialised by several threads.
const PARALLEL_MIN_CHUNKS: usize = 2048;

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
    /// The store directory (or a directory or symlink above it) is
    /// controlled by someone other than root or supervise's own user, is
    /// not a directory, or cannot be examined: one line naming the path,
    /// the culprit's owner and mode.
    #[error(transparent)]
    Untrusted(Box<fsutil::TrustError>),
    /// The directory holds entries that are not a store's and has no
    /// [`MARKER_NAME`] marker: it is some other directory (e.g. `/etc`).
    #[error(
        "image directory {} is not empty and is not a supervise image store (found `{found}`; \
         no {MARKER_NAME} marker): use a new or empty directory",
        dir.display()
    )]
    NotAStore {
        /// The configured directory.
        dir: PathBuf,
        /// One of its unexpected entries.
        found: String,
    },
    /// The caller may not read (or lock) part of the store, e.g. a user
    /// running `supervise images` on root's store.
    #[error("permission denied: {}", path.display())]
    PermissionDenied {
        /// The file or directory that could not be accessed.
        path: PathBuf,
    },
    /// A store file or directory is not what it must be: a symlink, a FIFO
    /// or device, a non-directory, or larger than its limit. `reason`
    /// names the path.
    #[error("{reason}")]
    BadFile {
        /// The offending path.
        path: PathBuf,
        /// What is wrong with it (names the path).
        reason: String,
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
    /// The staging directory contains something the store cannot keep.
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

/// Builds a closure mapping an `io::Error` to [`StoreError::Io`] for `path`
/// ([`StoreError::PermissionDenied`] for EACCES/EPERM).
fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| {
        if fsutil::is_permission_denied(&source) {
            StoreError::PermissionDenied {
                path: path.to_path_buf(),
            }
        } else {
            StoreError::Io {
                path: path.to_path_buf(),
                source: objects::without_path(path, source),
            }
        }
    }
}

/// Maps an error of an `fsutil` open or read of the store file `path`:
/// permission denied, not found (as I/O), or [`StoreError::BadFile`] saying
/// what the file is instead (symlink, FIFO, device, too large).
fn file_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |e| {
        if fsutil::is_permission_denied(&e) || e.kind() == io::ErrorKind::NotFound {
            io_err(path)(e)
        } else {
            StoreError::BadFile {
                path: path.to_path_buf(),
                reason: fsutil::describe_error(path, &e),
            }
        }
    }
}

impl From<fsutil::TrustError> for StoreError {
    /// A directory on the path that cannot be examined for lack of
    /// permission is [`StoreError::PermissionDenied`]; the rest is
    /// [`StoreError::Untrusted`].
    fn from(e: fsutil::TrustError) -> StoreError {
        match e {
            fsutil::TrustError::Io { path, source, .. }
                if fsutil::is_permission_denied(&source) =>
            {
                StoreError::PermissionDenied { path }
            }
            e => StoreError::Untrusted(Box::new(e)),
        }
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
    /// Manifest format version ([`MANIFEST_VERSION`] or [`MANIFEST_VERSION_V1`]).
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
    /// What the commit added to the store (version 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored: Option<StoredInfo>,
}

/// One file of a checkpoint as recorded in the manifest.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct FileEntry {
    /// Path relative to the image directory: a plain name, or `dir/name`
    /// one level down (CRIU's pre-dump images).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Version 1: lower-case hex SHA-256 of the file kept whole in the
    /// checkpoint directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Version 2: chunk size the file was cut into.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk: Option<u32>,
    /// Version 2: levels of tree nodes above the chunks (0: `root` is the only chunk).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub depth: Option<u8>,
    /// Version 2: hex BLAKE3 of the tree's root object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<String>,
    /// A symbolic link (CRIU's `parent` link to pre-dump images) and its target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
}

/// What a commit added to the store.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StoredInfo {
    /// Bytes of the new pack and index files (the manifest's own size is
    /// added when it is read: see [`ImageInfo::new_bytes`]).
    pub pack_bytes: u64,
    /// Objects that were not in the store yet.
    pub new_objects: u64,
    /// Raw (uncompressed) bytes of those objects.
    pub new_raw_bytes: u64,
    /// Raw bytes of the new tree nodes among them (metadata).
    #[serde(default)]
    pub node_bytes: u64,
    /// Chunks in the checkpoint (all files).
    pub chunks: u64,
    /// The pack holding the new objects, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pack: Option<String>,
    /// Milliseconds spent ingesting the dump.
    pub ingest_ms: u64,
}

/// A published checkpoint.
#[derive(Debug, Clone)]
pub struct ImageInfo {
    /// Checkpoint id (`<seq:06>-<time>`).
    pub id: String,
    /// Sequence number parsed from the id.
    pub seq: u64,
    /// Path of the checkpoint directory (holds the manifest; restore with
    /// [`ImageStore::materialise`]).
    pub path: PathBuf,
    /// Creation time (from the manifest).
    pub created: DateTime<Utc>,
    /// Logical size: the sum of the image files' sizes (what CRIU wrote).
    pub size_bytes: u64,
    /// Bytes this checkpoint added to the disk when it was committed: its
    /// new pack and index plus its manifest (version 1: all its files).
    pub new_bytes: u64,
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

/// The image store of one job. Clones share the in-memory pack index.
#[derive(Debug, Clone)]
pub struct ImageStore {
    dir: PathBuf,
    read_only: bool,
    db: Arc<Mutex<ObjectDb>>,
    tmpfs_staging: bool,
}

/// A checkpoint being written; obtained from [`ImageStore::begin`].
///
/// Dropping it without [`commit`](Staging::commit) or [`abort`](Staging::abort)
/// removes the staging directory.
#[derive(Debug)]
pub struct Staging {
    store: ImageStore,
    /// `<dir>/.staging-<seq>`: receives the manifest and is renamed into place.
    publish_dir: PathBuf,
    /// Where CRIU writes the dump: `path` itself, or a directory on tmpfs.
    dump: PathBuf,
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

/// A held `flock` on the store's lock file (released on drop).
#[derive(Debug)]
pub struct StoreLock {
    _file: Option<File>,
}

/// What [`ImageStore::materialise`] did.
#[derive(Debug, Clone)]
pub struct Materialised {
    /// The image directory written (pass it to CRIU).
    pub path: PathBuf,
    /// Bytes written.
    pub bytes: u64,
    /// Wall time.
    pub duration: Duration,
}

/// Result of [`ImageStore::verify_all`].
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    /// Every listed checkpoint, newest first, with `Err(reason)` if damaged.
    pub checkpoints: Vec<(String, Result<(), String>)>,
    /// Entries that look like checkpoints but cannot be read (bad manifest).
    pub unreadable: Vec<(String, String)>,
    /// Pack indexes that failed their own checksum: (pack, why).
    pub bad_indexes: Vec<(String, String)>,
    /// Objects read and checked.
    pub objects_checked: u64,
}

impl VerifyReport {
    /// True if anything is damaged.
    pub fn damaged(&self) -> bool {
        !self.unreadable.is_empty()
            || !self.bad_indexes.is_empty()
            || self.checkpoints.iter().any(|(_, r)| r.is_err())
    }
}

/// Result of [`ImageStore::gc`].
#[derive(Debug, Clone, Default)]
pub struct GcReport {
    /// Packs removed because nothing referenced them.
    pub removed_packs: usize,
    /// Packs rewritten without their dead objects.
    pub rewritten_packs: usize,
    /// Bytes of pack files freed.
    pub freed_bytes: u64,
    /// Objects referenced by published checkpoints.
    pub live_objects: u64,
    /// Bytes of pack files after gc.
    pub pack_bytes: u64,
    /// Crash leftovers removed.
    pub leftovers: usize,
    /// Set when gc deleted nothing because the store could not be read whole.
    pub refused: Option<String>,
}

/// Creates a fresh, empty, private (0700) directory to materialise an
/// image into for a restore, and returns it: on tmpfs (`/dev/shm`) when
/// that has room for `need` bytes with a margin, else next to `fallback`
/// (in its parent, the job's state directory). Its name is
/// `supervise-restore-<tag>-<random>` (`<tag>` derived from `fallback`),
/// created with `mkdir`, so nobody can pre-create or redirect it; a
/// leftover of a crash is removed by [`remove_scratch`].
pub fn scratch_dir(fallback: &Path, need: u64) -> io::Result<PathBuf> {
    let prefix = scratch_prefix(fallback);
    if let Some(shm) = tmpfs_dir(need) {
        match fsutil::private_temp_dir(shm, &prefix) {
            Ok(d) => return Ok(d),
            Err(e) => {
                debug!(dir = %shm.display(), error = %e, "cannot use tmpfs for the restore; using the state directory")
            }
        }
    }
    let parent = match fallback.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    fsutil::private_temp_dir(parent, &prefix)
}

/// Prefix of the scratch directories of the job whose fallback is `fallback`.
fn scratch_prefix(fallback: &Path) -> String {
    format!("supervise-restore-{}-", path_tag(fallback))
}

/// Removes what [`scratch_dir`] may have left for `fallback` (a restore
/// interrupted by a crash), on tmpfs and on disk: entries named
/// `supervise-restore-<tag>-*` that are real directories (not symlinks)
/// owned by our effective uid, plus the fixed names of earlier releases
/// (`/dev/shm/supervise-restore-<tag>`, `fallback` itself) under the same
/// rule. Anything else (someone else's directory, a symlink) is left alone:
/// it cannot be in the way, since every restore makes a fresh name.
pub fn remove_scratch(fallback: &Path) {
    let prefix = scratch_prefix(fallback);
    let shm = Path::new("/dev/shm");
    let legacy_shm = shm.join(&prefix[..prefix.len() - 1]);
    for p in [legacy_shm.as_path(), fallback] {
        remove_if_ours(p, "leftover restore directory");
    }
    let parent = fallback.parent().filter(|p| !p.as_os_str().is_empty());
    for dir in [Some(shm), parent].into_iter().flatten() {
        remove_ours_with_prefix(dir, &prefix, "leftover restore directory");
    }
}

/// Removes every entry of `dir` named `<prefix>*` that is ours (see
/// [`remove_if_ours`]); returns how many were removed.
fn remove_ours_with_prefix(dir: &Path, prefix: &str, what: &str) -> usize {
    let Ok(rd) = fs::read_dir(dir) else { return 0 };
    let mut n = 0;
    for entry in rd.flatten() {
        if entry
            .file_name()
            .as_encoded_bytes()
            .starts_with(prefix.as_bytes())
            && remove_if_ours(&entry.path(), what)
        {
            n += 1;
        }
    }
    n
}

/// Removes `path` (recursively) if it is a real directory (lstat: not a
/// symlink) owned by our effective uid; anything else is left alone and
/// logged. Returns true if it was removed.
fn remove_if_ours(path: &Path, what: &str) -> bool {
    let Ok(md) = fs::symlink_metadata(path) else {
        return false;
    };
    if !md.is_dir() || md.uid() != fsutil::own_uid() {
        debug!(path = %path.display(), uid = md.uid(), "not ours; leaving it alone");
        return false;
    }
    match fs::remove_dir_all(path) {
        Ok(()) => {
            warn!(path = %path.display(), "removed {what}");
            true
        }
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot remove {what}");
            false
        }
    }
}

/// `/dev/shm` if it is a tmpfs with room for twice `need` (at least half
/// of it, i.e. of RAM, stays free for everything else).
fn tmpfs_dir(need: u64) -> Option<&'static Path> {
    let shm = Path::new("/dev/shm");
    let st = nix::sys::statfs::statfs(shm).ok()?;
    let avail = st.blocks_available() * st.block_size() as u64;
    (st.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC && need.saturating_mul(2) < avail)
        .then_some(shm)
}

/// A short stable tag naming `p` in shared directories.
fn path_tag(p: &Path) -> String {
    objects::hex(&objects::hash(p.as_os_str().as_encoded_bytes()))[..16].to_string()
}

/// Prefix of this store's dump directories on tmpfs.
fn tmpfs_staging_prefix(store_dir: &Path) -> String {
    format!("supervise-staging-{}-", path_tag(store_dir))
}

impl ImageStore {
    /// Opens (creating with mode 0700, parents included) the store directory
    /// for the supervising process and removes leftovers of a crash
    /// (`.staging-*`, `.deleting-*`, `packs/.tmp-*`), logging each with
    /// `tracing::warn!`. Only the process that holds the job's lock may call
    /// this: a `.staging-*` directory may be a dump in progress otherwise.
    ///
    /// Fails with [`StoreError::Untrusted`] if the directory, or one above
    /// it, is not a trusted location ([`fsutil::check_trusted`]: owned by
    /// root or us, not writable by group or others), and with
    /// [`StoreError::NotAStore`] if it holds anything but a store and has
    /// no [`MARKER_NAME`] marker; nothing is created in it then. An empty
    /// directory, or one holding only what earlier releases put into a
    /// store, gets the marker.
    pub fn open(dir: &Path) -> Result<ImageStore, StoreError> {
        fsutil::ensure_trusted_dir("image directory", dir)?;
        check_marker(dir, true)?;
        let packs = dir.join(PACKS_DIR);
        match DirBuilder::new().mode(0o700).create(&packs) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => check_packs_dir(&packs)?,
            Err(e) => return Err(io_err(&packs)(e)),
        }
        let store = ImageStore::new(dir, false);
        {
            let _lock = store.lock(true)?;
            store.remove_leftovers(true)?;
        }
        Ok(store)
    }

    /// Opens an existing store for reading only: creates nothing and
    /// removes nothing (a `.staging-*` entry may belong to a checkpoint in
    /// progress in a running supervise). Used by `supervise images` and
    /// `supervise verify`; [`gc`](Self::gc) works on it too (it never
    /// touches staging directories).
    ///
    /// The directory must be trusted and be a store, as for
    /// [`open`](Self::open) (a directory of an earlier release without the
    /// marker is accepted, not marked); one the caller cannot read is
    /// [`StoreError::PermissionDenied`].
    pub fn open_read_only(dir: &Path) -> Result<ImageStore, StoreError> {
        fsutil::check_trusted("image directory", dir)?;
        check_marker(dir, false)?;
        Ok(ImageStore::new(dir, true))
    }

    fn new(dir: &Path, read_only: bool) -> ImageStore {
        ImageStore {
            dir: dir.to_path_buf(),
            read_only,
            db: Arc::new(Mutex::new(ObjectDb::new(&dir.join(PACKS_DIR)))),
            tmpfs_staging: false,
        }
    }

    /// Let CRIU dump into tmpfs (`/dev/shm`, when it has room) instead of
    /// the store's own disk. Off by default: measured here, CRIU keeps the
    /// job frozen longer writing a dump into freshly allocated tmpfs pages
    /// (512 MiB job: 290 ms vs 206 ms frozen), which the job pays for; the
    /// disk's page cache is what plain `criu dump` uses too.
    pub fn with_tmpfs_staging(mut self, on: bool) -> ImageStore {
        self.tmpfs_staging = on;
        self
    }

    /// The store directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Takes the store lock: exclusive for writers (commit, retention, gc),
    /// shared for readers (materialise, verify). Blocks until granted. A
    /// read-only store without a lock file (nothing ever wrote to it with
    /// this version) is read unlocked.
    pub fn lock(&self, exclusive: bool) -> Result<StoreLock, StoreError> {
        let path = self.dir.join(LOCK_NAME);
        let file = if exclusive || !self.read_only {
            fsutil::open_rw_nofollow(&path, 0o600).map_err(file_err(&path))?
        } else {
            match fsutil::open_regular(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Ok(StoreLock { _file: None })
                }
                Err(e) => return Err(file_err(&path)(e)),
            }
        };
        fsutil::flock(&file, exclusive, false).map_err(io_err(&path))?;
        Ok(StoreLock { _file: Some(file) })
    }

    /// The in-memory pack index, brought up to date (call under the lock).
    fn db(&self) -> Result<MutexGuard<'_, ObjectDb>, StoreError> {
        let mut db = self.db.lock().unwrap_or_else(|e| e.into_inner());
        db.refresh()?;
        Ok(db)
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
                    let dump = match self.tmpfs_staging(seq) {
                        Some(d) => d,
                        None => path.clone(),
                    };
                    debug!(checkpoint = %id, path = %path.display(), dump = %dump.display(), "began checkpoint staging");
                    return Ok(Staging {
                        store: self.clone(),
                        publish_dir: path,
                        dump,
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

    /// With [`with_tmpfs_staging`](Self::with_tmpfs_staging): a private
    /// directory on tmpfs for CRIU to dump into, when tmpfs has room for
    /// twice the newest checkpoint (the first one goes to disk: its size is
    /// unknown).
    fn tmpfs_staging(&self, seq: u64) -> Option<PathBuf> {
        if !self.tmpfs_staging {
            return None;
        }
        let need = self.list().ok()?.first()?.size_bytes;
        let shm = tmpfs_dir(need)?;
        let prefix = format!("{}{seq:06}-", tmpfs_staging_prefix(&self.dir));
        match fsutil::private_temp_dir(shm, &prefix) {
            Ok(dir) => Some(dir),
            Err(e) => {
                debug!(dir = %shm.display(), error = %e, "cannot stage on tmpfs; staging on disk");
                None
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
        load_image(id, seq, path)?.map_err(|reason| StoreError::Corrupt {
            id: id.to_string(),
            reason,
        })
    }

    /// Reads every piece of the checkpoint and checks it against its hash
    /// (version 1: re-hashes every file against its SHA-256).
    ///
    /// Fails with [`StoreError::Corrupt`] naming the file and piece on a
    /// missing or damaged piece, or a size mismatch.
    pub fn verify(&self, image: &ImageInfo) -> Result<(), StoreError> {
        let _lock = self.lock(false)?;
        let db = self.db()?;
        let mut checked = HashSetH::default();
        check_image(&db, image, &mut checked, &mut |_, _, _| Ok(())).map_err(|reason| {
            StoreError::Corrupt {
                id: image.id.clone(),
                reason,
            }
        })
    }

    /// Verifies the whole store: every listed checkpoint (objects shared by
    /// several are read once), unreadable manifests and damaged pack indexes.
    pub fn verify_all(&self) -> Result<VerifyReport, StoreError> {
        let _lock = self.lock(false)?;
        let (infos, skipped) = self.scan()?;
        let db = self.db()?;
        let mut report = VerifyReport {
            unreadable: skipped
                .into_iter()
                .filter(|s| parse_id(&s.name).is_some())
                .map(|s| (s.name, s.reason))
                .collect(),
            bad_indexes: db.bad_indexes.clone(),
            ..Default::default()
        };
        let mut good = HashSetH::default();
        let before = good.len();
        for img in &infos {
            let r = check_image(&db, img, &mut good, &mut |_, _, _| Ok(()));
            if let Err(e) = &r {
                warn!(checkpoint = %img.id, error = %e, "checkpoint failed verification");
            }
            report.checkpoints.push((img.id.clone(), r));
        }
        report.objects_checked = (good.len() - before) as u64;
        Ok(report)
    }

    /// Writes the checkpoint's files into `work_dir` as real files CRIU can
    /// restore from, verifying every piece as it is read. `work_dir` is an
    /// empty directory (as made by [`scratch_dir`]), or is created 0700 if
    /// missing; anything else there (a file, a symlink, a non-empty
    /// directory) is refused and left alone. Large files are written by
    /// several threads. On error the directory is removed and
    /// [`StoreError::Corrupt`] names the file and piece that failed.
    pub fn materialise(
        &self,
        image: &ImageInfo,
        work_dir: &Path,
    ) -> Result<Materialised, StoreError> {
        let start = Instant::now();
        match fs::symlink_metadata(work_dir) {
            Ok(md) if md.is_dir() => {
                let mut rd = fs::read_dir(work_dir).map_err(io_err(work_dir))?;
                if rd.next().is_some() {
                    return Err(StoreError::BadFile {
                        path: work_dir.to_path_buf(),
                        reason: format!(
                            "restore directory {} is not empty; refusing to write into it",
                            work_dir.display()
                        ),
                    });
                }
            }
            Ok(_) => {
                return Err(StoreError::BadFile {
                    path: work_dir.to_path_buf(),
                    reason: format!(
                        "restore directory {} is not a directory",
                        work_dir.display()
                    ),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if let Some(parent) = work_dir.parent() {
                    DirBuilder::new()
                        .recursive(true)
                        .mode(0o700)
                        .create(parent)
                        .map_err(io_err(parent))?;
                }
                DirBuilder::new()
                    .mode(0o700)
                    .create(work_dir)
                    .map_err(io_err(work_dir))?;
            }
            Err(e) => return Err(io_err(work_dir)(e)),
        }
        let res = (|| {
            let _lock = self.lock(false)?;
            let db = self.db()?;
            let mut checked = HashSetH::default();
            let mut bytes = 0u64;
            write_image(&db, image, work_dir, &mut checked, &mut bytes).map_err(|e| match e {
                WriteError::Store(e) => e,
                WriteError::Damage(reason) => StoreError::Corrupt {
                    id: image.id.clone(),
                    reason,
                },
            })?;
            Ok(bytes)
        })();
        match res {
            Ok(bytes) => {
                let duration = start.elapsed();
                debug!(checkpoint = %image.id, bytes, ms = duration.as_millis() as u64, dir = %work_dir.display(), "materialised");
                Ok(Materialised {
                    path: work_dir.to_path_buf(),
                    bytes,
                    duration,
                })
            }
            Err(e) => {
                let _ = fs::remove_dir_all(work_dir);
                Err(e)
            }
        }
    }

    /// Keeps the newest `keep` published checkpoints (`keep >= 1`) and removes
    /// the rest crash-safely: each is renamed to `.deleting-<id>`, the store
    /// directory is fsynced, then the renamed directories are removed. Returns
    /// the removed ids, newest first. Their data is reclaimed by [`gc`](Self::gc).
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
        let _lock = self.lock(true)?;
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
            failpoint("retain-after-rename");
        }
        let mut removed = Vec::new();
        for (id, path) in renamed {
            if let Err(e) = fs::remove_dir_all(&path) {
                warn!(path = %path.display(), error = %e,
                    "failed to remove deleted checkpoint; will retry at next open");
            }
            debug!(checkpoint = %id, "retention removed checkpoint");
            removed.push(id);
        }
        result.map(|()| removed)
    }

    /// Reclaims space no published checkpoint references (see the module
    /// documentation): removes crash leftovers (never staging directories),
    /// unreferenced packs, and rewrites packs that are less than half live.
    /// Holds the exclusive lock, so it cannot race a commit or retention in
    /// another process.
    pub fn gc(&self) -> Result<GcReport, StoreError> {
        fsutil::check_trusted("image directory", &self.dir)?;
        let _lock = self.lock(true)?;
        let mut report = GcReport {
            leftovers: self.remove_leftovers(false)?,
            ..Default::default()
        };
        let (infos, skipped) = self.scan()?;
        let mut db = self.db()?;
        if let Some(s) = skipped.iter().find(|s| parse_id(&s.name).is_some()) {
            report.refused = Some(format!(
                "checkpoint directory {} cannot be read ({}); deleting nothing",
                s.name, s.reason
            ));
        }
        // Mark.
        let mut live = HashSetH::default();
        if report.refused.is_none() {
            let mut reader = Reader::new(&db).map_err(io_err(db.dir()))?;
            'images: for img in &infos {
                for f in &img.manifest.files {
                    let Some((root, depth)) = tree_of(f) else {
                        if img.manifest.version >= MANIFEST_VERSION && f.link.is_none() {
                            report.refused = Some(format!(
                                "checkpoint {}: file {} has no tree",
                                img.id, f.name
                            ));
                            break 'images;
                        }
                        continue;
                    };
                    if let Err(e) = mark(&mut reader, &root, depth, &mut live) {
                        report.refused = Some(format!(
                            "checkpoint {}: file {}: {e}; deleting nothing",
                            img.id, f.name
                        ));
                        break 'images;
                    }
                }
            }
        }
        if let Some(why) = &report.refused {
            warn!(store = %self.dir.display(), reason = %why, "gc deleted nothing");
            report.pack_bytes = db.file_bytes();
            return Ok(report);
        }
        report.live_objects = live.len() as u64;
        // Sweep: live bytes per pack (an object counts for the pack the index maps it to).
        let n = db.packs.len();
        let mut live_bytes = vec![0u64; n];
        let mut live_objs: Vec<Vec<(u64, Hash)>> = vec![Vec::new(); n];
        for (h, loc) in db.iter() {
            if live.contains(h) {
                live_bytes[loc.pack as usize] += loc.stored_len as u64;
                live_objs[loc.pack as usize].push((loc.offset, *h));
            }
        }
        let packs_dir = db.dir().to_path_buf();
        let mut changed = false;
        for (i, pack) in db.packs.clone().iter().enumerate() {
            let dead = pack.stored_bytes - live_bytes[i];
            if live_bytes[i] == 0 {
                remove_pack(&packs_dir, &pack.name)?;
                report.removed_packs += 1;
                report.freed_bytes += pack.file_bytes;
                changed = true;
                info!(pack = %pack.name, bytes = pack.file_bytes, "gc removed an unreferenced pack");
            } else if dead > live_bytes[i] && dead >= (1 << 20) {
                let objs = &mut live_objs[i];
                objs.sort_unstable();
                match repack(&db, &packs_dir, objs) {
                    Ok(Some(new)) => {
                        failpoint("gc-after-repack");
                        remove_pack(&packs_dir, &pack.name)?;
                        report.rewritten_packs += 1;
                        report.freed_bytes += pack.file_bytes.saturating_sub(new.file_bytes);
                        changed = true;
                        info!(pack = %pack.name, into = %new.name, live = new.objects, freed = pack.file_bytes.saturating_sub(new.file_bytes), "gc rewrote a mostly dead pack");
                    }
                    Ok(None) => {}
                    Err(e) => {
                        warn!(pack = %pack.name, error = %e, "gc could not rewrite a pack; kept as is")
                    }
                }
            }
        }
        if changed {
            fsync_dir(&packs_dir)?;
            db.refresh()?;
        }
        report.pack_bytes = db.file_bytes();
        Ok(report)
    }

    /// Bytes of all pack files and the number of packs.
    pub fn pack_usage(&self) -> Result<(u64, usize), StoreError> {
        let _lock = self.lock(false)?;
        let db = self.db()?;
        Ok((db.file_bytes(), db.packs.len()))
    }

    /// Removes crash leftovers: `.deleting-*`, `packs/.tmp-*`, packs without
    /// an index and (with `staging`) `.staging-*`. Call under the exclusive lock.
    fn remove_leftovers(&self, staging: bool) -> Result<usize, StoreError> {
        let mut n = 0;
        if staging {
            // Only our own directories: anyone may create names in /dev/shm.
            n += remove_ours_with_prefix(
                Path::new("/dev/shm"),
                &tmpfs_staging_prefix(&self.dir),
                "leftover of an interrupted checkpoint",
            );
        }
        for entry in fs::read_dir(&self.dir).map_err(io_err(&self.dir))? {
            let entry = entry.map_err(io_err(&self.dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if !((staging && name.starts_with(STAGING_PREFIX)) || name.starts_with(DELETING_PREFIX))
            {
                continue;
            }
            let path = entry.path();
            warn!(path = %path.display(), "removing leftover of an interrupted checkpoint operation");
            remove_any(&path)?;
            n += 1;
        }
        if n > 0 {
            fsync_dir(&self.dir)?;
        }
        let packs = self.dir.join(PACKS_DIR);
        let mut m = 0;
        match fs::symlink_metadata(&packs) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            _ => check_packs_dir(&packs)?,
        }
        if let Ok(rd) = fs::read_dir(&packs) {
            for entry in rd {
                let entry = entry.map_err(io_err(&packs))?;
                let name = entry.file_name();
                let Some(name) = name.to_str() else { continue };
                let orphan = name.strip_suffix(".pack").is_some_and(|stem| {
                    fs::symlink_metadata(packs.join(format!("{stem}.idx"))).is_err()
                });
                if name.starts_with(objects::TMP_PREFIX) || orphan {
                    let path = entry.path();
                    warn!(path = %path.display(), "removing leftover of an interrupted pack write");
                    remove_any(&path)?;
                    m += 1;
                }
            }
            if m > 0 {
                fsync_dir(&packs)?;
            }
        }
        Ok(n + m)
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
            if name.starts_with('.') || name == PACKS_DIR {
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
            match load_image(name, seq, entry.path())? {
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

/// Crash testing: when `SUPERVISE_FAILPOINT` names this point, the process
/// SIGKILLs itself here (points: `commit-after-pack`, `retain-after-rename`,
/// `gc-after-repack`, `gc-between-index-and-pack`).
fn failpoint(name: &str) {
    if std::env::var_os("SUPERVISE_FAILPOINT").is_some_and(|v| v == name) {
        warn!(
            failpoint = name,
            "SUPERVISE_FAILPOINT reached: killing this process"
        );
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}

/// True for a name that earlier releases (and this one) put into a store
/// directory: `.lock`, `packs`, checkpoint ids, `.staging-*`,
/// `.deleting-*`, the Slurm fence's `.lease.json`, `.lease.lock`,
/// `.lease.json.tmp` (and any `.lease*`), `.released-<epoch>`, and the
/// marker's own temporary files.
fn known_store_entry(name: &str) -> bool {
    name == LOCK_NAME
        || name == PACKS_DIR
        || name == MARKER_NAME
        || parse_id(name).is_some()
        || name.starts_with(STAGING_PREFIX)
        || name.starts_with(DELETING_PREFIX)
        || name.starts_with(".lease")
        || name
            .strip_prefix(crate::fence::RELEASED_PREFIX)
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        || name.starts_with(&format!(".{MARKER_NAME}.tmp-"))
}

/// Makes sure the trusted directory `dir` is an image store: it has the
/// [`MARKER_NAME`] marker (a small regular file), or is empty, or holds
/// only [`known_store_entry`] names (a store of an earlier release). With
/// `adopt`, the marker is written into an empty or earlier-release store.
/// Anything else is [`StoreError::NotAStore`], and nothing is written.
fn check_marker(dir: &Path, adopt: bool) -> Result<(), StoreError> {
    let marker = dir.join(MARKER_NAME);
    match fsutil::read_limited(&marker, MAX_MARKER_BYTES) {
        Ok(_) => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(file_err(&marker)(e)),
    }
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    if let Some(found) = names.iter().find(|n| !known_store_entry(n)) {
        return Err(StoreError::NotAStore {
            dir: dir.to_path_buf(),
            found: found.clone(),
        });
    }
    if adopt {
        if !names.is_empty() {
            info!(store = %dir.display(), "adopting an image store of an earlier release (adding its {MARKER_NAME} marker)");
        }
        fsutil::write_atomic(&marker, MARKER_CONTENT, 0o600).map_err(io_err(&marker))?;
    }
    Ok(())
}

/// Checks that an existing `packs/` is a real directory (not a symlink).
fn check_packs_dir(packs: &Path) -> Result<(), StoreError> {
    let md = fs::symlink_metadata(packs).map_err(io_err(packs))?;
    if md.file_type().is_symlink() || !md.is_dir() {
        return Err(StoreError::BadFile {
            path: packs.to_path_buf(),
            reason: objects::not_a_dir_reason(packs, &md),
        });
    }
    Ok(())
}

fn remove_any(path: &Path) -> Result<(), StoreError> {
    let md = fs::symlink_metadata(path).map_err(io_err(path))?;
    if md.is_dir() {
        fs::remove_dir_all(path).map_err(io_err(path))
    } else {
        fs::remove_file(path).map_err(io_err(path))
    }
}

/// Removes a pack: its index first (so the data is never listed without
/// it), then the data.
fn remove_pack(dir: &Path, name: &str) -> Result<(), StoreError> {
    let idx = dir.join(format!("{name}.idx"));
    fs::remove_file(&idx).map_err(io_err(&idx))?;
    failpoint("gc-between-index-and-pack");
    let pack = dir.join(format!("{name}.pack"));
    match fs::remove_file(&pack) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(&pack)(e)),
    }
}

/// Copies the live objects `objs` (sorted by offset) of one pack into a new
/// pack, verifying each. Returns the new pack.
fn repack(
    db: &ObjectDb,
    dir: &Path,
    objs: &[(u64, Hash)],
) -> Result<Option<objects::Published>, String> {
    let mut reader = Reader::new(db).map_err(|e| e.to_string())?;
    let mut w = PackWriter::new(dir).map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    for (_, h) in objs {
        let loc = reader.read_stored(h, &mut buf).map_err(|e| e.0)?;
        w.add_stored(*h, &buf, loc.raw_len, loc.flags)
            .map_err(|e| e.to_string())?;
    }
    w.finish().map_err(|e| e.to_string())
}

/// Adds every object of a tree to `live`; subtrees already marked are skipped.
fn mark(
    reader: &mut Reader<'_>,
    root: &Hash,
    depth: u8,
    live: &mut HashSetH,
) -> Result<(), PieceError> {
    let mut level = vec![*root];
    let mut buf = Vec::new();
    for d in (0..=depth).rev() {
        let mut next = Vec::new();
        for h in level {
            if !live.insert(h) {
                continue;
            }
            if d > 0 {
                reader.read(&h, &mut buf)?;
                if buf.len() % 32 != 0 {
                    return Err(PieceError(format!(
                        "tree node {} has a bad length",
                        objects::hex(&h)
                    )));
                }
                next.extend(buf.chunks_exact(32).map(|c| Hash::try_from(c).unwrap()));
            } else if reader_missing(reader, &h) {
                return Err(PieceError(format!(
                    "object {} is missing from the store",
                    &objects::hex(&h)[..16]
                )));
            }
        }
        level = next;
    }
    Ok(())
}

fn reader_missing(reader: &Reader<'_>, h: &Hash) -> bool {
    !reader.contains(h)
}

/// The tree of a version 2 file entry.
fn tree_of(f: &FileEntry) -> Option<(Hash, u8)> {
    Some((objects::parse_hex(f.root.as_deref()?)?, f.depth?))
}

/// A failure while writing or checking an image.
enum WriteError {
    Store(StoreError),
    Damage(String),
}

/// Receives each verified chunk: (file index, chunk index, contents).
type FileChunkSink<'a> = dyn FnMut(usize, usize, &[u8]) -> Result<(), PieceError> + 'a;

/// Checks every piece of `image` (skipping objects in `good`, adding the
/// ones found intact). `sink(file index, chunk index, data)` sees each chunk.
fn check_image(
    db: &ObjectDb,
    image: &ImageInfo,
    good: &mut HashSetH,
    sink: &mut FileChunkSink<'_>,
) -> Result<(), String> {
    if image.manifest.version == MANIFEST_VERSION_V1 {
        return verify_v1(image);
    }
    let mut reader = Reader::new(db).map_err(|e| e.to_string())?;
    for (fi, f) in image.manifest.files.iter().enumerate() {
        if !valid_file_name(&f.name) {
            return Err(format!("manifest lists invalid file name {:?}", f.name));
        }
        if f.link.is_some() {
            continue;
        }
        let (leaves, chunk) = file_leaves(&mut reader, f)?;
        let todo: Vec<(usize, Hash)> = leaves
            .iter()
            .copied()
            .enumerate()
            .filter(|(_, h)| !good.contains(h))
            .collect();
        let mut ok = Vec::with_capacity(todo.len());
        let last = leaves.len() - 1;
        let r = reader.read_chunks(&todo, &mut |i, data| {
            check_chunk_len(f, chunk, i, last, data.len())?;
            ok.push(leaves[i]);
            sink(fi, i, data)
        });
        good.extend(ok);
        r.map_err(|e| format!("file {}: {e}", f.name))?;
    }
    Ok(())
}

fn check_chunk_len(
    f: &FileEntry,
    chunk: u64,
    i: usize,
    last: usize,
    len: usize,
) -> Result<(), PieceError> {
    let want = if i < last {
        chunk
    } else {
        f.size - chunk * last as u64
    };
    if len as u64 != want {
        return Err(PieceError(format!(
            "chunk {i} has {len} bytes, expected {want} (file size {})",
            f.size
        )));
    }
    Ok(())
}

/// The chunk list of a version 2 file, checked against its size.
fn file_leaves(reader: &mut Reader<'_>, f: &FileEntry) -> Result<(Vec<Hash>, u64), String> {
    let (Some((root, depth)), Some(chunk)) = (tree_of(f), f.chunk) else {
        return Err(format!("file {}: manifest entry has no tree", f.name));
    };
    if chunk == 0 {
        return Err(format!("file {}: chunk size 0", f.name));
    }
    let chunk = chunk as u64;
    let leaves = reader
        .leaves(&root, depth)
        .map_err(|e| format!("file {}: {e}", f.name))?;
    let want = f.size.div_ceil(chunk).max(1) as usize;
    if leaves.len() != want {
        return Err(format!(
            "file {}: tree has {} chunks, size {} needs {want}",
            f.name,
            leaves.len(),
            f.size
        ));
    }
    Ok((leaves, chunk))
}

/// Re-hashes the whole files of a version 1 checkpoint.
fn verify_v1(image: &ImageInfo) -> Result<(), String> {
    let mut buf = vec![0u8; HASH_BUF_SIZE];
    for entry in &image.manifest.files {
        if !valid_file_name(&entry.name) || entry.name.contains('/') {
            return Err(format!("manifest lists invalid file name {:?}", entry.name));
        }
        let path = image.path.join(&entry.name);
        let mut file = match fsutil::open_regular(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(format!("missing file {}", entry.name))
            }
            Err(e) => return Err(fsutil::describe_error(&path, &e)),
        };
        let md = file.metadata().map_err(|e| e.to_string())?;
        if md.len() != entry.size {
            return Err(format!(
                "{}: size {} but manifest says {}",
                entry.name,
                md.len(),
                entry.size
            ));
        }
        let (size, sha) = hash_reader(&mut file, &mut buf).map_err(|e| e.to_string())?;
        if size != entry.size {
            return Err(format!(
                "{}: read {} bytes but manifest says {}",
                entry.name, size, entry.size
            ));
        }
        let want = entry.sha256.as_deref().unwrap_or("");
        if !sha.eq_ignore_ascii_case(want) {
            return Err(format!(
                "{}: sha256 {} but manifest says {}",
                entry.name, sha, want
            ));
        }
    }
    Ok(())
}

/// Writes all files of `image` into `dir`.
fn write_image(
    db: &ObjectDb,
    image: &ImageInfo,
    dir: &Path,
    good: &mut HashSetH,
    bytes: &mut u64,
) -> Result<(), WriteError> {
    let damage = WriteError::Damage;
    if image.manifest.version == MANIFEST_VERSION_V1 {
        verify_v1(image).map_err(damage)?;
        for f in &image.manifest.files {
            let from = image.path.join(&f.name);
            let mut src = fsutil::open_regular(&from)
                .map_err(|e| damage(fsutil::describe_error(&from, &e)))?;
            let to = dir.join(&f.name);
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&to)
                .and_then(|mut out| io::copy(&mut (&mut src).take(f.size), &mut out))
                .map_err(|e| WriteError::Store(io_err(&to)(e)))?;
            *bytes += f.size;
        }
        return Ok(());
    }
    let mut reader = Reader::new(db).map_err(|e| WriteError::Store(io_err(db.dir())(e)))?;
    for f in &image.manifest.files {
        if !valid_file_name(&f.name) {
            return Err(damage(format!(
                "manifest lists invalid file name {:?}",
                f.name
            )));
        }
        let path = dir.join(&f.name);
        if let Some((sub, _)) = f.name.split_once('/') {
            let d = dir.join(sub);
            if fs::symlink_metadata(&d).is_err() {
                DirBuilder::new()
                    .mode(0o700)
                    .create(&d)
                    .map_err(|e| WriteError::Store(io_err(&d)(e)))?;
            }
        }
        if let Some(target) = &f.link {
            if !valid_link(target) {
                return Err(damage(format!(
                    "{}: invalid link target {target:?}",
                    f.name
                )));
            }
            std::os::unix::fs::symlink(target, &path)
                .map_err(|e| WriteError::Store(io_err(&path)(e)))?;
            continue;
        }
        let (leaves, chunk) = file_leaves(&mut reader, f).map_err(damage)?;
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| WriteError::Store(io_err(&path)(e)))?;
        file.set_len(f.size)
            .map_err(|e| WriteError::Store(io_err(&path)(e)))?;
        let threads = if leaves.len() >= PARALLEL_MIN_CHUNKS {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                .clamp(1, 4)
        } else {
            1
        };
        let per = leaves.len().div_ceil(threads);
        let results: Vec<Result<(), String>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let lo = (t * per).min(leaves.len());
                    let hi = ((t + 1) * per).min(leaves.len());
                    let file = &file;
                    let leaves = &leaves;
                    s.spawn(move || write_range(db, f, leaves, chunk, lo, hi, file))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err("materialise thread panicked".into()))
                })
                .collect()
        });
        for r in results {
            r.map_err(|e| damage(format!("file {}: {e}", f.name)))?;
        }
        good.extend(leaves.iter().copied());
        *bytes += f.size;
    }
    Ok(())
}

/// Writes chunks `lo..hi` of one file at their offsets.
fn write_range(
    db: &ObjectDb,
    f: &FileEntry,
    leaves: &[Hash],
    chunk: u64,
    lo: usize,
    hi: usize,
    file: &File,
) -> Result<(), String> {
    if lo >= hi {
        return Ok(());
    }
    let mut reader = Reader::new(db).map_err(|e| e.to_string())?;
    let items: Vec<(usize, Hash)> = (lo..hi).map(|i| (i, leaves[i])).collect();
    let last = leaves.len() - 1;
    let mut buf: Vec<u8> = Vec::with_capacity(WRITE_BATCH + chunk as usize);
    let mut buf_start = lo as u64 * chunk;
    let mut io_error: Option<String> = None;
    let flush = |buf: &mut Vec<u8>, at: u64| -> Result<(), String> {
        file.write_all_at(buf, at)
            .map_err(|e| format!("cannot write: {e}"))?;
        buf.clear();
        Ok(())
    };
    reader
        .read_chunks(&items, &mut |i, data| {
            check_chunk_len(f, chunk, i, last, data.len())?;
            buf.extend_from_slice(data);
            if buf.len() >= WRITE_BATCH {
                let at = buf_start;
                buf_start += buf.len() as u64;
                if let Err(e) = flush(&mut buf, at) {
                    io_error = Some(e.clone());
                    return Err(PieceError(e));
                }
            }
            Ok(())
        })
        .map_err(|e| io_error.take().unwrap_or(e.0))?;
    if !buf.is_empty() {
        flush(&mut buf, buf_start)?;
    }
    Ok(())
}

/// One entry of a staging directory to ingest.
enum StagedEntry {
    File(String),
    Link(String, String),
}

impl Staging {
    /// The id this checkpoint will be published under.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The directory to dump into (pass this to `criu dump -D`): on tmpfs
    /// when it has room, else the store's `.staging-<seq>` directory.
    pub fn path(&self) -> &Path {
        &self.dump
    }

    /// Lists what the staging directory holds: regular files, regular files
    /// one directory level down, and symbolic links with a relative target
    /// inside the directory (CRIU's `parent` link to pre-dump images).
    fn entries(&self) -> Result<Vec<StagedEntry>, StoreError> {
        let mut out = Vec::new();
        let mut walk = vec![(self.dump.clone(), String::new())];
        while let Some((dir, prefix)) = walk.pop() {
            for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
                let entry = entry.map_err(io_err(&dir))?;
                let path = entry.path();
                let ft = entry.file_type().map_err(io_err(&path))?;
                let unexpected = |reason: &str| StoreError::UnexpectedEntry {
                    path: path.clone(),
                    reason: reason.to_string(),
                };
                let Ok(name) = entry.file_name().into_string() else {
                    return Err(unexpected("file name is not UTF-8"));
                };
                let rel = format!("{prefix}{name}");
                if rel == MANIFEST_NAME {
                    return Err(unexpected("MANIFEST.json is reserved for the store"));
                }
                if ft.is_dir() {
                    if !prefix.is_empty() {
                        return Err(unexpected("only one level of subdirectories is allowed"));
                    }
                    walk.push((path.clone(), format!("{rel}/")));
                } else if ft.is_symlink() {
                    let target = fs::read_link(&path).map_err(io_err(&path))?;
                    let target = target
                        .to_str()
                        .filter(|t| prefix.is_empty() && valid_link(t))
                        .ok_or_else(|| {
                            unexpected("symbolic links must be top-level and point to a subdirectory by a relative name")
                        })?;
                    out.push(StagedEntry::Link(rel, target.to_string()));
                } else if ft.is_file() {
                    out.push(StagedEntry::File(rel));
                } else {
                    return Err(unexpected("not a regular file"));
                }
            }
        }
        out.sort_by(|a, b| entry_name(a).cmp(entry_name(b)));
        Ok(out)
    }

    /// Publishes the checkpoint (see the module documentation, "Crash
    /// safety"): ingests every file into the content-addressed store under
    /// the exclusive lock, deletes the raw files, writes `MANIFEST.json`
    /// and renames the staging directory to `<dir>/<id>`. On error the
    /// staging directory is removed (new objects already in a published
    /// pack are reclaimed by gc).
    pub fn commit(mut self, meta: CheckpointMeta) -> Result<ImageInfo, StoreError> {
        let start = Instant::now();
        let entries = self.entries()?;
        let _lock = self.store.lock(true)?;
        let db = self.store.db()?;
        let packs_dir = db.dir().to_path_buf();
        let mut w = PackWriter::new(&packs_dir).map_err(io_err(&packs_dir))?;
        let mut files = Vec::with_capacity(entries.len());
        let mut chunks = 0u64;
        for e in &entries {
            match e {
                StagedEntry::Link(name, target) => files.push(FileEntry {
                    name: name.clone(),
                    link: Some(target.clone()),
                    ..Default::default()
                }),
                StagedEntry::File(name) => {
                    let path = self.dump.join(name);
                    let chunk = chunk_size_for(name);
                    let mut tree = TreeBuilder::new();
                    // Tell a failure to store (e.g. ENOSPC in the pack) from
                    // a failure to read the dump.
                    let mut store_failed = false;
                    let size = objects::for_each_chunk(&path, chunk as usize, &mut |c| {
                        chunks += 1;
                        tree.push(&db, &mut w, c)
                            .inspect_err(|_| store_failed = true)
                    })
                    .map_err(|e| {
                        if store_failed {
                            io_err(&packs_dir)(e)
                        } else {
                            io_err(&path)(e)
                        }
                    })?;
                    let (root, depth) = tree.finish(&db, &mut w).map_err(io_err(&packs_dir))?;
                    files.push(FileEntry {
                        name: name.clone(),
                        size,
                        chunk: Some(chunk),
                        depth: Some(depth),
                        root: Some(objects::hex(&root)),
                        ..Default::default()
                    });
                }
            }
        }
        let new_objects = w.len() as u64;
        let new_raw_bytes = w.raw_bytes;
        let node_bytes = w.node_bytes;
        let published = w.finish().map_err(io_err(&packs_dir))?;
        drop(db);
        failpoint("commit-after-pack");

        // The data is safe in a published pack: drop the raw dump.
        if self.dump != self.publish_dir {
            fs::remove_dir_all(&self.dump).map_err(io_err(&self.dump))?;
        }
        for e in entries
            .iter()
            .rev()
            .filter(|_| self.dump == self.publish_dir)
        {
            let p = self.publish_dir.join(entry_name(e));
            fs::remove_file(&p).map_err(io_err(&p))?;
        }
        for e in entries.iter().filter(|_| self.dump == self.publish_dir) {
            if let Some((sub, _)) = entry_name(e).split_once('/') {
                let d = self.publish_dir.join(sub);
                match fs::remove_dir(&d) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err(&d)(e)),
                }
            }
        }
        let stored = StoredInfo {
            pack_bytes: published.as_ref().map(|p| p.file_bytes).unwrap_or(0),
            new_objects,
            new_raw_bytes,
            node_bytes,
            chunks,
            pack: published.as_ref().map(|p| p.name.clone()),
            ingest_ms: start.elapsed().as_millis() as u64,
        };
        let manifest = Manifest {
            version: MANIFEST_VERSION,
            id: self.id.clone(),
            created: self.created,
            meta,
            files,
            stored: Some(stored),
        };
        let mut json =
            serde_json::to_vec_pretty(&manifest).map_err(|source| StoreError::Serialize {
                id: self.id.clone(),
                source,
            })?;
        json.push(b'\n');
        let manifest_path = self.publish_dir.join(MANIFEST_NAME);
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
        fsync_dir(&self.publish_dir)?;

        let final_path = self.store.dir.join(&self.id);
        rename_noreplace(&self.publish_dir, &final_path)?;
        self.done = true;
        fsync_dir(&self.store.dir)?;

        let info = image_info(&self.id, self.seq, final_path, manifest, json.len() as u64);
        debug!(checkpoint = %self.id, size_bytes = info.size_bytes, new_bytes = info.new_bytes, "published checkpoint");
        Ok(info)
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
        if self.dump != self.publish_dir {
            let _ = fs::remove_dir_all(&self.dump);
        }
        match fs::remove_dir_all(&self.publish_dir) {
            Ok(()) => debug!(path = %self.publish_dir.display(), "removed staging directory"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => warn!(path = %self.publish_dir.display(), error = %e,
                "failed to remove staging directory; will retry at next open"),
        }
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        self.remove();
    }
}

fn entry_name(e: &StagedEntry) -> &str {
    match e {
        StagedEntry::File(n) | StagedEntry::Link(n, _) => n,
    }
}

/// Page images are cut into pages, everything else into 64 KiB pieces.
fn chunk_size_for(name: &str) -> u32 {
    let base = name.rsplit('/').next().unwrap_or(name);
    if base.starts_with("pages-") && base.ends_with(".img") {
        PAGE_CHUNK
    } else {
        FILE_CHUNK
    }
}

/// Builds an [`ImageInfo`] from a manifest whose file is `manifest_len` bytes.
fn image_info(
    id: &str,
    seq: u64,
    path: PathBuf,
    manifest: Manifest,
    manifest_len: u64,
) -> ImageInfo {
    let size_bytes = manifest.files.iter().map(|f| f.size).sum::<u64>();
    let new_bytes = match &manifest.stored {
        Some(s) => s.pack_bytes + manifest_len,
        None => size_bytes + manifest_len,
    };
    ImageInfo {
        id: id.to_string(),
        seq,
        path,
        created: manifest.created,
        size_bytes,
        new_bytes,
        manifest,
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

/// Loads and validates the manifest of the checkpoint directory `path`
/// (a real directory: the caller checked it with lstat). The manifest must
/// be a regular file of at most [`MAX_MANIFEST_BYTES`], read without
/// following a symlink or blocking on a FIFO. Returns a human-readable
/// reason if the checkpoint is damaged; only a manifest the caller may not
/// read is an error ([`StoreError::PermissionDenied`]).
fn load_image(id: &str, seq: u64, path: PathBuf) -> Result<Result<ImageInfo, String>, StoreError> {
    let manifest_path = path.join(MANIFEST_NAME);
    let bytes = match fsutil::read_limited(&manifest_path, MAX_MANIFEST_BYTES) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(Err(format!("{MANIFEST_NAME} is missing")))
        }
        Err(e) if fsutil::is_permission_denied(&e) => return Err(io_err(&manifest_path)(e)),
        Err(e) => {
            return Ok(Err(format!(
                "cannot read {}",
                fsutil::describe_error(&manifest_path, &e)
            )))
        }
    };
    Ok(parse_manifest(id, seq, path, &bytes))
}

/// Parses and checks a manifest read from `<path>/MANIFEST.json`.
fn parse_manifest(id: &str, seq: u64, path: PathBuf, bytes: &[u8]) -> Result<ImageInfo, String> {
    #[derive(Deserialize)]
    struct VersionProbe {
        version: u32,
    }

    let probe: VersionProbe = serde_json::from_slice(bytes)
        .map_err(|e| format!("{MANIFEST_NAME} is unparseable: {e}"))?;
    if probe.version != MANIFEST_VERSION && probe.version != MANIFEST_VERSION_V1 {
        return Err(format!(
            "{MANIFEST_NAME} has unknown version {} (expected {MANIFEST_VERSION})",
            probe.version
        ));
    }
    let manifest: Manifest = serde_json::from_slice(bytes)
        .map_err(|e| format!("{MANIFEST_NAME} is unparseable: {e}"))?;
    if manifest.id != id {
        return Err(format!(
            "{MANIFEST_NAME} names id {:?} but the directory is {id:?}",
            manifest.id
        ));
    }
    Ok(image_info(id, seq, path, manifest, bytes.len() as u64))
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

/// A plain name, or `dir/name` one level down: no empty, `.` or `..`
/// components, not the manifest.
fn valid_file_name(name: &str) -> bool {
    let parts: Vec<&str> = name.split('/').collect();
    parts.len() <= 2
        && parts
            .iter()
            .all(|p| !p.is_empty() && *p != "." && *p != "..")
        && name != MANIFEST_NAME
}

/// A symlink target the store keeps: one relative plain name (a subdirectory).
fn valid_link(target: &str) -> bool {
    !target.is_empty() && !target.contains('/') && target != "." && target != ".."
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
    fsutil::fsync_dir(dir).map_err(io_err(dir))
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

    /// Deterministic incompressible bytes.
    fn noise(seed: u64, n: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
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

    /// Commits the given files.
    fn publish_files(store: &ImageStore, files: &[(&str, &[u8])]) -> ImageInfo {
        let st = store.begin().unwrap();
        for (n, d) in files {
            if let Some((sub, _)) = n.split_once('/') {
                let _ = fs::create_dir(st.path().join(sub));
            }
            write(&st.path().join(n), d);
        }
        st.commit(meta()).unwrap()
    }

    /// Materialises `img` and returns name -> contents.
    fn contents(store: &ImageStore, img: &ImageInfo, work: &Path) -> Vec<(String, Vec<u8>)> {
        let m = store.materialise(img, work).unwrap();
        let mut out = Vec::new();
        for f in &img.manifest.files {
            let p = m.path.join(&f.name);
            if f.link.is_some() {
                out.push((
                    f.name.clone(),
                    fs::read_link(&p)
                        .unwrap()
                        .into_os_string()
                        .into_encoded_bytes(),
                ));
            } else {
                assert_eq!(mode(&p), 0o600, "{}", f.name);
                out.push((f.name.clone(), fs::read(&p).unwrap()));
            }
        }
        out
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().mode() & 0o7777
    }

    /// Checkpoint ids and other non-hidden entries of the store, sorted.
    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n != PACKS_DIR && n != LOCK_NAME && n != MARKER_NAME)
            .collect();
        v.sort();
        v
    }

    fn packs(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir.join(PACKS_DIR))
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
        assert_eq!(got.manifest.version, MANIFEST_VERSION);
        assert_eq!(got.manifest.files.len(), 2);
        assert_eq!(got.manifest.files[0].name, "pages-1.img");
        assert_eq!(got.manifest.files[0].chunk, Some(PAGE_CHUNK));
        assert_eq!(got.manifest.files[1].chunk, Some(FILE_CHUNK));
        assert_eq!(got.created, b.created);
        assert_eq!(got.size_bytes, b.size_bytes);
        assert_eq!(got.size_bytes, 7 + 3000);
        assert_eq!(got.new_bytes, b.new_bytes);
        // Only the manifest is left in the checkpoint directory.
        assert_eq!(names(&got.path), vec![MANIFEST_NAME.to_string()]);
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
        assert_eq!(mode(&dir.join(PACKS_DIR)), 0o700);
        let st = store.begin().unwrap();
        assert_eq!(mode(st.path()), 0o700);
        write(&st.path().join("core-1.img"), b"core");
        let info = st.commit(meta()).unwrap();
        assert_eq!(mode(&info.path), 0o700);
        assert_eq!(mode(&info.path.join(MANIFEST_NAME)), 0o600);
        assert_eq!(mode(&dir.join(LOCK_NAME)), 0o600);
        for p in packs(&dir) {
            assert_eq!(mode(&dir.join(PACKS_DIR).join(&p)), 0o600, "{p}");
        }
    }

    #[test]
    fn insecure_dir_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("store");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        let err = ImageStore::open(&dir).unwrap_err();
        assert!(matches!(err, StoreError::Untrusted(_)), "{err}");
        let s = err.to_string();
        assert!(s.contains(&dir.display().to_string()), "{s}");
        assert!(s.contains("mode 0777") && !s.contains('\n'), "{s}");
        assert!(ImageStore::open_read_only(&dir).is_err());
        assert!(
            fs::read_dir(&dir).unwrap().next().is_none(),
            "nothing created"
        );
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
        // gc never touches a staging directory (it may be a dump in progress).
        store.gc().unwrap();
        assert!(staging_path.exists());

        let (store, logs) = capture_logs(|| ImageStore::open(&dir).unwrap());
        assert!(!staging_path.exists());
        assert!(logs.contains(".staging-000002"), "{logs}");
        assert_eq!(store.list().unwrap().len(), 1);
        // Its sequence number is reused after the crash cleanup; that is fine
        // since it was never published.
        assert_eq!(publish(&store, "b").seq, 2);
    }

    #[test]
    fn later_dumps_are_staged_on_tmpfs_and_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let disk = ImageStore::open(&tmp.path().join("d")).unwrap();
        publish(&disk, "a");
        assert!(
            disk.begin().unwrap().path().starts_with(tmp.path()),
            "disk by default"
        );
        let store = ImageStore::open(&tmp.path().join("s"))
            .unwrap()
            .with_tmpfs_staging(true);
        let first = store.begin().unwrap();
        assert!(first.path().starts_with(tmp.path()), "first dump on disk");
        first.abort();
        publish(&store, "a");
        let st = store.begin().unwrap();
        let dump = st.path().to_path_buf();
        if tmpfs_dir(1 << 20).is_none() {
            return;
        }
        assert!(dump.starts_with("/dev/shm"), "{}", dump.display());
        assert_eq!(mode(&dump), 0o700);
        write(&dump.join("pages-1.img"), &job_pages(1, 3));
        let img = st.commit(meta()).unwrap();
        assert!(!dump.exists());
        assert_eq!(names(&img.path), vec![MANIFEST_NAME.to_string()]);
        assert_eq!(
            contents(&store, &img, &tmp.path().join("w"))[0].1,
            job_pages(1, 3)
        );
        // A crash leaves it behind; the next open removes it.
        let st = store.begin().unwrap();
        let dump = st.path().to_path_buf();
        std::mem::forget(st);
        assert!(dump.exists());
        ImageStore::open(&tmp.path().join("s")).unwrap();
        assert!(!dump.exists());
        // Dropping a staging removes both directories.
        let st = store.begin().unwrap();
        let dump = st.path().to_path_buf();
        drop(st);
        assert!(!dump.exists());
        assert_eq!(names(&tmp.path().join("s")).len(), 2);
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
    fn commit_rejects_deep_subdirectory_and_absolute_link_and_cleans_up() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::open(tmp.path()).unwrap();
        let st = store.begin().unwrap();
        let p = st.path().to_path_buf();
        fs::create_dir_all(p.join("sub/deeper")).unwrap();
        let err = st.commit(meta()).unwrap_err();
        assert!(matches!(err, StoreError::UnexpectedEntry { .. }), "{err}");
        assert!(!p.exists());
        let st = store.begin().unwrap();
        std::os::unix::fs::symlink("/etc", st.path().join("parent")).unwrap();
        let err = st.commit(meta()).unwrap_err();
        assert!(matches!(err, StoreError::UnexpectedEntry { .. }), "{err}");
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
        // gc deletes nothing while a checkpoint cannot be read.
        let r = store.gc().unwrap();
        assert!(r.refused.is_some(), "{r:?}");
        assert!(store.verify_all().unwrap().damaged());
        // It still counts for sequence numbers.
        assert_eq!(publish(&store, "b").seq, 10);
    }

    /// Pages of a job: `n` pages, some zero, the rest noise.
    fn job_pages(seed: u64, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n * 4096);
        for i in 0..n {
            if i % 5 == 0 {
                v.extend_from_slice(&[0u8; 4096]);
            } else {
                v.extend_from_slice(&noise(seed * 100_000 + i as u64, 4096));
            }
        }
        v
    }

    #[test]
    fn later_checkpoints_store_only_what_changed() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::open(&tmp.path().join("s")).unwrap();
        let n = 3000; // ~12 MiB, depth-2 trees
        let mut pages = job_pages(1, n);
        let core = noise(9, 10_000);
        let first = publish_files(
            &store,
            &[
                ("pages-1.img", &pages),
                ("core-1.img", &core),
                ("supervise-files.json", b"{}"),
            ],
        );
        // Change 10 scattered pages and the core file.
        for k in 0..10 {
            let at = (k * 293 + 7) * 4096 + 100;
            pages[at] ^= 0x5a;
        }
        let core2 = noise(10, 10_000);
        let second = publish_files(
            &store,
            &[
                ("pages-1.img", &pages),
                ("core-1.img", &core2),
                ("supervise-files.json", b"{}"),
            ],
        );
        let s1 = first.manifest.stored.clone().unwrap();
        let s2 = second.manifest.stored.clone().unwrap();
        assert!(s1.new_raw_bytes >= (n as u64 * 4 / 5) * 4096, "{s1:?}");
        // 10 pages + 1 core chunk + the changed tree nodes (10 leaves' parents + root).
        assert!(s2.new_objects <= 10 + 1 + 10 + 1 + 1, "{s2:?}");
        assert!(
            second.new_bytes * 50 < first.new_bytes,
            "second {} vs first {}",
            second.new_bytes,
            first.new_bytes
        );
        let w = tmp.path().join("w");
        let got = contents(&store, &second, &w);
        assert_eq!(got[0].0, "core-1.img");
        assert_eq!(got[0].1, core2);
        assert_eq!(got[1].0, "pages-1.img");
        assert_eq!(got[1].1, pages);
        assert_eq!(got[2].1, b"{}");
        // Nothing of the raw dump is left outside the packs.
        assert_eq!(names(&second.path), vec![MANIFEST_NAME.to_string()]);
        store.verify(&first).unwrap();
        let report = store.verify_all().unwrap();
        assert!(!report.damaged(), "{report:?}");
        assert_eq!(report.checkpoints.len(), 2);
    }

    #[test]
    fn retention_then_gc_keeps_newest_restorable_and_frees_space() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("s");
        let store = ImageStore::open(&dir).unwrap();
        let n = 1000;
        let mut pages = job_pages(2, n);
        let mut imgs = Vec::new();
        for round in 0..5u64 {
            // Each round rewrites 300 pages: old packs become mostly dead.
            for i in 0..300 {
                let p = ((round as usize * 300 + i) % n) * 4096;
                pages[p..p + 4096].copy_from_slice(&noise(round * 7777 + i as u64, 4096));
            }
            imgs.push(publish_files(
                &store,
                &[("pages-7.img", &pages), ("mm-7.img", b"mm")],
            ));
        }
        let before = store.pack_usage().unwrap().0;
        let removed = store.retain(1).unwrap();
        assert_eq!(removed.len(), 4);
        let r = store.gc().unwrap();
        assert!(r.refused.is_none(), "{r:?}");
        assert!(r.removed_packs + r.rewritten_packs > 0, "{r:?}");
        let after = store.pack_usage().unwrap().0;
        assert!(after < before, "gc freed nothing: {before} -> {after}");
        // Close to the live data: the newest checkpoint's ~4 MiB (noise pages).
        assert!(after < (n as u64 * 4096) * 13 / 10, "{after}");
        let newest = store.list().unwrap().remove(0);
        assert_eq!(newest.id, imgs[4].id);
        let got = contents(&store, &newest, &tmp.path().join("w"));
        assert_eq!(got[1].1, pages);
        // A second gc finds nothing to do.
        let r2 = store.gc().unwrap();
        assert_eq!((r2.removed_packs, r2.rewritten_packs), (0, 0), "{r2:?}");
        assert!(!store.verify_all().unwrap().damaged());
    }

    #[test]
    fn flipped_byte_is_detected_and_older_checkpoint_still_restores() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("s");
        let store = ImageStore::open(&dir).unwrap();
        let mut pages = job_pages(3, 200);
        let old = publish_files(&store, &[("pages-1.img", &pages)]);
        pages[4096 * 17 + 5] ^= 1;
        let new = publish_files(&store, &[("pages-1.img", &pages)]);
        let pack = new.manifest.stored.as_ref().unwrap().pack.clone().unwrap();
        let pp = dir.join(PACKS_DIR).join(format!("{pack}.pack"));
        let mut bytes = fs::read(&pp).unwrap();
        // The first object after the magic is the changed page.
        bytes[8 + 100] ^= 0x01;
        fs::write(&pp, &bytes).unwrap();
        let w = tmp.path().join("w");
        let err = store.materialise(&new, &w).unwrap_err();
        let s = err.to_string();
        assert!(
            matches!(&err, StoreError::Corrupt { id, .. } if *id == new.id),
            "{s}"
        );
        assert!(
            s.contains("pages-1.img") && s.contains("chunk 17") && s.contains(&pack),
            "{s}"
        );
        assert!(
            !w.exists(),
            "a failed materialisation leaves nothing behind"
        );
        assert!(store.verify(&new).is_err());
        store.verify(&old).unwrap();
        let got = contents(&store, &old, &w);
        pages[4096 * 17 + 5] ^= 1;
        assert_eq!(got[0].1, pages);
        let report = store.verify_all().unwrap();
        assert!(report.damaged());
        let bad: Vec<_> = report.checkpoints.iter().filter(|c| c.1.is_err()).collect();
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].0, new.id);
    }

    #[test]
    fn damaged_pack_truncated_or_missing() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("s");
        let store = ImageStore::open(&dir).unwrap();
        let img = publish_files(&store, &[("pages-1.img", &job_pages(4, 50))]);
        let pack = img.manifest.stored.as_ref().unwrap().pack.clone().unwrap();
        let pp = dir.join(PACKS_DIR).join(format!("{pack}.pack"));
        let f = OpenOptions::new().write(true).open(&pp).unwrap();
        f.set_len(1000).unwrap();
        let err = store.verify(&img).unwrap_err().to_string();
        assert!(err.contains("missing") || err.contains("pack"), "{err}");
        let report = store.verify_all().unwrap();
        assert!(
            report.bad_indexes.iter().any(|(n, _)| *n == pack),
            "{report:?}"
        );
        fs::remove_file(&pp).unwrap();
        assert!(store.materialise(&img, &tmp.path().join("w")).is_err());
    }

    #[test]
    fn gc_removes_crash_leftovers_and_orphan_packs() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("s");
        let store = ImageStore::open(&dir).unwrap();
        let img = publish_files(&store, &[("pages-1.img", &job_pages(5, 20))]);
        // A pack published by a commit that crashed before its manifest.
        {
            let db = ObjectDb::new(&dir.join(PACKS_DIR));
            let mut w = PackWriter::new(&dir.join(PACKS_DIR)).unwrap();
            let mut t = TreeBuilder::new();
            t.push(&db, &mut w, &noise(77, 4096)).unwrap();
            w.finish().unwrap().unwrap();
        }
        write(&dir.join(PACKS_DIR).join(".tmp-1-0.pack"), b"partial");
        write(
            &dir.join(PACKS_DIR).join("0123.pack"),
            b"pack without index",
        );
        fs::create_dir(dir.join(".deleting-000000-20260101T000000Z")).unwrap();
        assert_eq!(packs(&dir).len(), 2 + 2 + 2);
        let r = store.gc().unwrap();
        assert_eq!(r.leftovers, 3, "{r:?}");
        assert_eq!(r.removed_packs, 1, "{r:?}");
        assert_eq!(packs(&dir).len(), 2, "{:?}", packs(&dir));
        assert_eq!(names(&dir), vec![img.id.clone()]);
        store.verify(&img).unwrap();
    }

    #[test]
    fn predump_layout_and_other_files_roundtrip() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::open(&tmp.path().join("s")).unwrap();
        let st = store.begin().unwrap();
        let p = st.path().to_path_buf();
        fs::create_dir(p.join("pre")).unwrap();
        write(&p.join("pre/pages-1.img"), &job_pages(6, 30));
        write(&p.join("pre/pagemap-1.img"), b"pm");
        write(&p.join("pages-1.img"), &job_pages(7, 3));
        write(&p.join("supervise-files.json"), b"{\"a\":1}");
        write(&p.join("supervise-blob-0"), &noise(8, 200_000));
        write(&p.join("empty"), b"");
        std::os::unix::fs::symlink("pre", p.join("parent")).unwrap();
        let img = st.commit(meta()).unwrap();
        assert!(!p.exists());
        let w = tmp.path().join("w");
        let got = contents(&store, &img, &w);
        let names: Vec<_> = got.iter().map(|g| g.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "empty",
                "pages-1.img",
                "parent",
                "pre/pagemap-1.img",
                "pre/pages-1.img",
                "supervise-blob-0",
                "supervise-files.json"
            ]
        );
        assert_eq!(got[0].1, b"");
        assert_eq!(got[2].1, b"pre");
        assert_eq!(got[4].1, job_pages(6, 30));
        assert_eq!(got[5].1, noise(8, 200_000));
        assert_eq!(
            fs::read(w.join("parent/pages-1.img")).unwrap(),
            job_pages(6, 30)
        );
        assert_eq!(mode(&w), 0o700);
        // A non-empty directory is refused and left alone.
        let e = store.materialise(&img, &w).unwrap_err().to_string();
        assert!(e.contains("not empty"), "{e}");
        assert!(w.join("parent/pages-1.img").exists());
        // An empty one (as scratch_dir makes) is written into.
        fs::remove_dir_all(&w).unwrap();
        fs::create_dir(&w).unwrap();
        store.materialise(&img, &w).unwrap();
        assert!(w.join("supervise-blob-0").exists());
    }

    #[test]
    fn version1_checkpoints_still_work() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("s");
        let store = ImageStore::open(&dir).unwrap();
        let id = "000001-20260101T000000Z";
        let cp = dir.join(id);
        fs::create_dir(&cp).unwrap();
        write(&cp.join("pages-1.img"), b"v1 pages");
        let m = serde_json::json!({
            "version": 1, "id": id, "created": "2026-01-01T00:00:00Z",
            "meta": meta(),
            "files": [{"name": "pages-1.img", "size": 8,
                "sha256": hex::encode(Sha256::digest(b"v1 pages"))}]
        });
        write(&cp.join(MANIFEST_NAME), m.to_string().as_bytes());
        let v1 = store.get(id).unwrap();
        store.verify(&v1).unwrap();
        assert_eq!(
            contents(&store, &v1, &tmp.path().join("w"))[0].1,
            b"v1 pages"
        );
        let v2 = publish(&store, "x");
        assert_eq!(v2.seq, 2);
        assert!(store.gc().unwrap().refused.is_none());
        assert!(!store.verify_all().unwrap().damaged());
        write(&cp.join("pages-1.img"), b"v1 pagez");
        assert!(store.verify(&v1).is_err());
        assert_eq!(store.retain(1).unwrap(), vec![id.to_string()]);
    }

    #[test]
    fn writers_exclude_each_other_across_handles() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("s");
        let a = ImageStore::open(&dir).unwrap();
        let b = ImageStore::open_read_only(&dir).unwrap();
        let held = a.lock(true).unwrap();
        let f = File::open(dir.join(LOCK_NAME)).unwrap();
        // SAFETY: flock on our own descriptor.
        let rc = unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&f),
                libc::LOCK_SH | libc::LOCK_NB,
            )
        };
        assert_eq!(rc, -1, "a reader must wait for a writer");
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            let r = b.gc().unwrap();
            tx.send(()).unwrap();
            r
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(200)).is_err(),
            "gc ran under a held lock"
        );
        drop(held);
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
        t.join().unwrap();
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
        // Its objects may still be needed by a newer supervise: gc keeps everything.
        let n = packs(&dir).len();
        assert!(store.gc().unwrap().refused.is_some());
        assert_eq!(packs(&dir).len(), n);
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
        assert!(valid_file_name("pre/pages-1.img"));
        assert!(!valid_file_name("a/b/c"));
        assert!(!valid_file_name("../x"));
        assert!(!valid_file_name(MANIFEST_NAME));
        assert_eq!(chunk_size_for("pre/pages-12.img"), PAGE_CHUNK);
        assert_eq!(chunk_size_for("pagemap-12.img"), FILE_CHUNK);
        assert_eq!(chunk_size_for("supervise-pages-1.img.json"), FILE_CHUNK);
    }

    #[test]
    fn manifest_roundtrip() {
        let m = Manifest {
            version: 2,
            id: "000001-20261128T132955Z".into(),
            created: Utc::now(),
            meta: meta(),
            files: vec![FileEntry {
                name: "a".into(),
                size: 1,
                chunk: Some(4096),
                depth: Some(0),
                root: Some("00".repeat(32)),
                ..Default::default()
            }],
            stored: Some(StoredInfo::default()),
        };
        let s = serde_json::to_string(&m).unwrap();
        assert!(!s.contains("sha256") && !s.contains("link"), "{s}");
        let back: Manifest = serde_json::from_str(&s).unwrap();
        assert_eq!(back.created, m.created);
        assert_eq!(back.meta, m.meta);
        assert_eq!(back.files, m.files);
        // `extra` may be absent.
        let mut v: serde_json::Value = serde_json::from_str(&s).unwrap();
        v["meta"].as_object_mut().unwrap().remove("extra");
        let back: Manifest = serde_json::from_value(v).unwrap();
        assert!(back.meta.extra.is_empty());
    }

    #[test]
    fn scratch_dir_prefers_tmpfs_with_room_and_is_fresh_each_time() {
        let tmp = tempfile::tempdir().unwrap();
        let fb = tmp.path().join("restore");
        let prefix = scratch_prefix(&fb);
        let d = scratch_dir(&fb, 1 << 20).unwrap();
        let d2 = scratch_dir(&fb, 1 << 20).unwrap();
        assert_ne!(d, d2, "a fresh name every time");
        for p in [&d, &d2] {
            assert_eq!(mode(p), 0o700);
            assert!(fs::read_dir(p).unwrap().next().is_none());
            let name = p.file_name().unwrap().to_str().unwrap();
            assert!(name.starts_with(&prefix), "{name}");
            assert!(name.len() >= prefix.len() + 16, "{name}");
        }
        if tmpfs_dir(1 << 20).is_some() {
            assert!(d.starts_with("/dev/shm"), "{}", d.display());
        }
        // No room on tmpfs: next to the fallback, in the state directory.
        let disk = scratch_dir(&fb, u64::MAX / 4).unwrap();
        assert_eq!(disk.parent(), Some(tmp.path()));
        // Leftovers of ours are removed; look-alikes that are not real
        // directories of ours are left alone.
        let link = tmp.path().join(format!("{prefix}link"));
        std::os::unix::fs::symlink(tmp.path(), &link).unwrap();
        fs::write(d.join("pages-1.img"), b"x").unwrap();
        remove_scratch(&fb);
        assert!(!d.exists() && !d2.exists() && !disk.exists());
        assert!(fs::symlink_metadata(&link).is_ok(), "symlink left alone");
        assert!(tmp.path().exists());
    }

    #[test]
    fn foreign_scratch_and_staging_names_are_left_alone() {
        if !nix::unistd::geteuid().is_root() || tmpfs_dir(1 << 20).is_none() {
            eprintln!("SKIPPED: needs root and tmpfs");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let fb = tmp.path().join("restore");
        let theirs = Path::new("/dev/shm").join(format!("{}attacker", scratch_prefix(&fb)));
        fs::create_dir(&theirs).unwrap();
        nix::unistd::chown(&theirs, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
        remove_scratch(&fb);
        assert!(theirs.exists(), "someone else's directory is not removed");
        let d = scratch_dir(&fb, 1 << 20).unwrap();
        assert_ne!(d, theirs);
        fs::remove_dir(&d).unwrap();
        fs::remove_dir(&theirs).unwrap();
        // The same for tmpfs staging directories.
        let dir = tmp.path().join("s");
        let store = ImageStore::open(&dir).unwrap().with_tmpfs_staging(true);
        publish(&store, "a");
        let theirs = Path::new("/dev/shm").join(format!("{}000002-x", tmpfs_staging_prefix(&dir)));
        fs::create_dir(&theirs).unwrap();
        nix::unistd::chown(&theirs, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
        let st = store.begin().unwrap();
        assert!(st.path().starts_with("/dev/shm"));
        assert_ne!(st.path(), theirs);
        drop(st);
        ImageStore::open(&dir).unwrap();
        assert!(theirs.exists());
        fs::remove_dir(&theirs).unwrap();
    }

    #[test]
    fn marker_written_and_foreign_directories_refused() {
        let tmp = tempfile::tempdir().unwrap();
        // New and empty directories become stores.
        let new = tmp.path().join("new");
        ImageStore::open(&new).unwrap();
        assert_eq!(fs::read(new.join(MARKER_NAME)).unwrap(), MARKER_CONTENT);
        assert_eq!(mode(&new.join(MARKER_NAME)), 0o600);
        let empty = tmp.path().join("empty");
        fs::create_dir(&empty).unwrap();
        ImageStore::open_read_only(&empty).unwrap();
        assert!(
            !empty.join(MARKER_NAME).exists(),
            "read-only writes nothing"
        );
        ImageStore::open(&empty).unwrap();
        assert!(empty.join(MARKER_NAME).exists());
        // A directory with foreign files is refused, and nothing is created.
        let etc = tmp.path().join("etc");
        fs::create_dir(&etc).unwrap();
        fs::write(etc.join("passwd"), b"root:x:0:0").unwrap();
        fs::create_dir(etc.join("000001-20260101T000000Z")).unwrap();
        let before = {
            let mut v: Vec<_> = fs::read_dir(&etc)
                .unwrap()
                .flatten()
                .map(|e| e.file_name())
                .collect();
            v.sort();
            v
        };
        for r in [ImageStore::open(&etc), ImageStore::open_read_only(&etc)] {
            let e = r.unwrap_err();
            assert!(matches!(e, StoreError::NotAStore { .. }), "{e}");
            let s = e.to_string();
            assert!(
                s.contains(&etc.display().to_string()) && s.contains("`passwd`"),
                "{s}"
            );
        }
        let after = {
            let mut v: Vec<_> = fs::read_dir(&etc)
                .unwrap()
                .flatten()
                .map(|e| e.file_name())
                .collect();
            v.sort();
            v
        };
        assert_eq!(before, after);
        // A store of an earlier release (no marker) is adopted.
        let old = tmp.path().join("old");
        let store = ImageStore::open(&old).unwrap();
        let img = publish(&store, "a");
        let st = store.begin().unwrap();
        std::mem::forget(st);
        fs::remove_file(old.join(MARKER_NAME)).unwrap();
        for n in [
            ".lease.json",
            ".lease.lock",
            ".lease.json.tmp",
            ".released-3",
        ] {
            fs::write(old.join(n), b"").unwrap();
        }
        fs::create_dir(old.join(".deleting-000001-20260101T000000Z")).unwrap();
        ImageStore::open_read_only(&old).unwrap();
        let store = ImageStore::open(&old).unwrap();
        assert!(old.join(MARKER_NAME).exists());
        assert_eq!(store.list().unwrap()[0].id, img.id);
        // A marker that is not a regular file is refused, naming it.
        let bad = tmp.path().join("bad");
        fs::create_dir(&bad).unwrap();
        nix::unistd::mkfifo(&bad.join(MARKER_NAME), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let e = ImageStore::open(&bad).unwrap_err().to_string();
        assert!(e.contains(MARKER_NAME) && e.contains("FIFO"), "{e}");
    }

    #[test]
    fn non_regular_and_oversized_store_files_are_damage() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("s");
        let store = ImageStore::open(&dir).unwrap();
        let old = publish(&store, "a");
        let new = publish(&store, "b");
        let manifest = new.path.join(MANIFEST_NAME);
        // FIFO, /dev/zero, a sparse file over the limit: skipped, named.
        for kind in 0..3 {
            fs::remove_file(&manifest).unwrap();
            match kind {
                0 => nix::unistd::mkfifo(&manifest, nix::sys::stat::Mode::S_IRWXU).unwrap(),
                1 => std::os::unix::fs::symlink("/dev/zero", &manifest).unwrap(),
                _ => File::create(&manifest)
                    .unwrap()
                    .set_len(MAX_MANIFEST_BYTES + 1)
                    .unwrap(),
            }
            let list = store.list().unwrap();
            assert_eq!(list.len(), 1, "kind {kind}");
            assert_eq!(list[0].id, old.id);
            let r = store.verify_all().unwrap();
            assert!(
                r.unreadable[0].1.contains(&manifest.display().to_string()),
                "{r:?}"
            );
            let e = store.get(&new.id).unwrap_err().to_string();
            assert!(e.contains(MANIFEST_NAME), "{e}");
        }
        fs::remove_file(&manifest).unwrap();
        // An index that is a symlink to /dev/zero is a bad index.
        let pack = new.manifest.stored.as_ref().unwrap().pack.clone().unwrap();
        let idx = dir.join(PACKS_DIR).join(format!("{pack}.idx"));
        fs::remove_file(&idx).unwrap();
        std::os::unix::fs::symlink("/dev/zero", &idx).unwrap();
        // (A fresh handle: a loaded index is never re-read, packs are immutable.)
        let r = ImageStore::open_read_only(&dir)
            .unwrap()
            .verify_all()
            .unwrap();
        assert!(
            r.bad_indexes
                .iter()
                .any(|(n, why)| *n == pack && why.contains("symlink")),
            "{r:?}"
        );
        // A sparse index far larger than its pack could need.
        fs::remove_file(&idx).unwrap();
        File::create(&idx).unwrap().set_len(1 << 40).unwrap();
        let r = ImageStore::open_read_only(&dir)
            .unwrap()
            .verify_all()
            .unwrap();
        assert!(
            r.bad_indexes
                .iter()
                .any(|(n, why)| *n == pack && why.contains("larger than")),
            "{r:?}"
        );
        // packs/ as a symlink: refused, never followed.
        let packs = dir.join(PACKS_DIR);
        fs::rename(&packs, tmp.path().join("real-packs")).unwrap();
        std::os::unix::fs::symlink(tmp.path().join("real-packs"), &packs).unwrap();
        let e = ImageStore::open(&dir).unwrap_err().to_string();
        assert!(e.contains("packs is a symlink"), "{e}");
        let e = store.verify_all().unwrap_err().to_string();
        assert!(e.contains("packs is a symlink"), "{e}");
        assert!(store.gc().is_err());
        // .lock as a FIFO: refused, not opened.
        fs::remove_file(&packs).unwrap();
        fs::rename(tmp.path().join("real-packs"), &packs).unwrap();
        fs::remove_file(dir.join(LOCK_NAME)).unwrap();
        nix::unistd::mkfifo(&dir.join(LOCK_NAME), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let e = store.verify(&old).unwrap_err().to_string();
        assert!(e.contains(".lock is a FIFO"), "{e}");
    }
}
