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
//!   .staging-000002/              # the checkpoint being written: receives the manifest;
//!                                 #   without encryption also CRIU's raw dump (with it, the
//!                                 #   dump is in memory: see "The job's memory in clear")
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
//! into a scratch directory made by [`restore_scratch`]: a fresh
//! `mkdtemp`-style directory on tmpfs (`/dev/shm`) when it has room, else
//! in the job's state directory (with encryption: a private tmpfs mounted
//! there). The caller removes it once CRIU has restored
//! ([`Materialised::remove`]); leftovers of a crash are removed by
//! [`remove_scratch`] (only directories that are ours).
//!
//! # The job's memory in clear
//!
//! With encryption on, the job's memory never reaches a disk in clear on
//! its way into the store or back out:
//!
//! * CRIU's dump goes into memory ([`ImageStore::begin_private`]): a
//!   private tmpfs mounted in the job's state directory, or a private
//!   directory on `/dev/shm`; when the job's memory does not fit, the pages
//!   are streamed into the store instead and only the small non-page
//!   images are in memory ([`DumpPlan`]).
//! * The spill file of a streamed checkpoint (`spill.rs`) has no name and
//!   holds each batch sealed under a key that exists only in memory.
//! * A restore's scratch directory is in memory ([`restore_scratch`] with
//!   `memory_only`), or the restore fails with [`ScratchError::NoRoom`]
//!   (the supervisor then tries a lazy restore, which writes out only the
//!   non-page files).
//! * A crash leaves a tmpfs mounted at most (memory), which the next start
//!   unmounts ([`remove_scratch`]); `.staging-*` directories of earlier
//!   releases (which held raw dumps) are deleted by [`ImageStore::open`].
//!
//! The details and the test knobs are in `scratch.rs` and `spill.rs`.
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
//!
//! # Where the code is
//!
//! * this file: [`ImageStore`] itself (open, lock, marker, listing) and
//!   [`StoreError`];
//! * `format.rs`: names, limits, ids and the manifest (`MANIFEST.json`, or
//!   `MANIFEST.sealed`: its types, how it is read, opened and checked);
//! * `ingest.rs`: [`ImageStore::begin`], [`Staging`], [`Staging::commit`];
//! * `materialise.rs`: [`ImageStore::materialise`];
//! * `verify.rs`: [`ImageStore::verify`], [`ImageStore::verify_all`] and
//!   version 1 checks;
//! * `maintain.rs`: retention, gc, repacking, crash leftovers;
//! * `scratch.rs`: [`restore_scratch`], [`scratch_dir`], [`remove_scratch`],
//!   private tmpfs mounts and tmpfs staging directories;
//! * `stream.rs`: streamed ingest of page files from CRIU's page server;
//! * `spill.rs`: the unnamed, sealed spill file of a streamed checkpoint;
//! * `objects.rs`: object, pack and index formats, the in-memory index
//!   ([`objects::ObjectDb`]) and its loading;
//! * `pack.rs`: writing packs and chunk trees, parallel batch ingest;
//! * `reader.rs`: verified reads of objects, with the repair fallback;
//! * `crypto.rs`: the store key, sealing and keyed ids;
//! * `keyring.rs`: which key a store needs (its marker), loading or
//!   generating it;
//! * `parity.rs`: Reed-Solomon sidecars (`<file>.par`);
//! * `heal.rs`: reading a damaged file through its parity or the second
//!   copy;
//! * `repair.rs`: [`ImageStore::repair`] (`verify --repair`, scrub);
//! * `options.rs`: the `[store]` table ([`StoreOptions`]);
//! * `util.rs`: small filesystem helpers shared by the above.
//!
//! # Encryption and redundancy
//!
//! With a store key (`crypto.rs`), objects are named by keyed BLAKE3 and
//! stored sealed (XChaCha20-Poly1305, nonce from the id, id as associated
//! data); indexes are sealed under their pack's name and manifests under
//! their checkpoint id (`MANIFEST.sealed`). Every new pack, index and
//! manifest gets a parity sidecar (`parity.rs`); with `copies = 2` every
//! file is also written under the second copy's root (same layout). Reads
//! take the file as it is and turn to `heal.rs` only when it fails to
//! authenticate, parse or read.

mod crypto;
mod format;
mod hash;
mod heal;
mod ingest;
mod keyring;
mod lazy;
mod maintain;
mod materialise;
mod objects;
mod options;
mod pack;
mod parity;
mod progress;
mod reader;
mod repair;
mod scratch;
mod spill;
mod stream;
mod util;
mod verify;

#[cfg(test)]
mod tests;

pub use format::{
    CheckpointExtra, CheckpointMeta, FileEntry, ImageInfo, Manifest, StoredInfo, DELETING_PREFIX,
    LOCK_NAME, MANIFEST_NAME, MANIFEST_SEALED_NAME, MANIFEST_VERSION, MANIFEST_VERSION_V1,
    MARKER_NAME, MAX_MANIFEST_BYTES, PACKS_DIR, STAGING_PREFIX,
};
pub use ingest::{DumpPlan, Staging};
pub use lazy::FileReader;
pub use maintain::GcReport;
pub use materialise::{Materialised, Select};
pub use objects::{Hash, PieceError, FANOUT, FILE_CHUNK, PAGE_CHUNK};
pub use options::{StoreOptions, DEFAULT_KEY_FILE};
pub use progress::{NoProgress, Progress};
pub use repair::RepairSummary;
pub use scratch::{
    human, mem_available, remove_scratch, restore_scratch, scratch_dir, Scratch, ScratchError,
    ScratchKind,
};
pub use stream::PageStream;
pub use util::dir_size;
pub use verify::VerifyReport;

use std::fs::{self, DirBuilder, File};
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::fsutil;
use tracing::{info, warn};

use format::{load_image, parse_id};
use objects::ObjectDb;

use keyring::{read_marker, MARKER_CONTENT};

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
    /// The store key is missing, wrong, unsafe or unreadable (names the key file).
    #[error(transparent)]
    Key(Box<crypto::KeyError>),
    /// No private directory in memory could be had for CRIU's dump (the
    /// store seals, so the dump may not go to disk).
    #[error(transparent)]
    Scratch(Box<scratch::ScratchError>),
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
    /// A resource ran short while reading or writing the store (file
    /// descriptors, memory, disk space): the stored data is not known to
    /// be damaged; the operation may work when tried again.
    #[error("{0} (a resource ran short; the stored data is not known to be damaged)")]
    Resource(String),
}

impl StoreError {
    /// True when the error says a resource ran short (descriptors,
    /// memory, disk space) and not that anything stored is damaged: the
    /// same operation may work later.
    pub fn is_resource(&self) -> bool {
        match self {
            StoreError::Resource(_) => true,
            StoreError::Io { source, .. } => crate::fdlimit::is_resource_error(source),
            _ => false,
        }
    }
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

/// The image store of one job. Clones share the in-memory pack index.
#[derive(Debug, Clone)]
pub struct ImageStore {
    dir: PathBuf,
    read_only: bool,
    db: Arc<Mutex<ObjectDb>>,
    tmpfs_staging: bool,
    /// The store key (sealed checkpoints are read with it).
    key: Option<Arc<crypto::StoreKey>>,
    /// New checkpoints are sealed with `key`.
    seal: bool,
    /// Checkpoints from this sequence number on must be sealed.
    sealed_from: Option<u64>,
    /// New store files get Reed-Solomon sidecars.
    parity: bool,
    /// The second copy (`[store] copies = 2`).
    mirror: heal::Mirror,
    /// Told how far long operations are ([`ImageStore::with_progress`]).
    progress: progress::ProgressHandle,
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
        let mut opts = StoreOptions::new(dir.join(".no-key"));
        opts.encryption = false;
        opts.parity = false;
        ImageStore::open_with(dir, &opts)
    }

    /// [`open`](Self::open) as a job's `[store]` table says: with
    /// encryption, the key file is loaded and checked against the store's
    /// marker (a missing or wrong key is [`StoreError::Key`], naming the
    /// key file; nothing is changed then), or generated if the store has
    /// no key yet; new checkpoints are sealed.
    pub fn open_with(dir: &Path, opts: &StoreOptions) -> Result<ImageStore, StoreError> {
        fsutil::ensure_trusted_dir("image directory", dir)?;
        check_marker(dir, true)?;
        let marker = read_marker(dir)?.unwrap_or_default();
        let packs = dir.join(PACKS_DIR);
        match DirBuilder::new().mode(0o700).create(&packs) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => check_packs_dir(&packs)?,
            Err(e) => return Err(io_err(&packs)(e)),
        }
        let mut store = ImageStore::new(dir, false);
        {
            let _lock = store.lock(true)?;
            store.remove_leftovers(true)?;
            let next = store.next_seq()?;
            let key = keyring::key_for_writer(dir, marker, opts, next)?;
            store.seal = opts.encryption && key.is_some();
            store.set_key(key);
            store.sealed_from = read_marker(dir)?.and_then(|m| m.sealed_from);
        }
        store.parity = opts.parity;
        if let Some(copy) = &opts.copy_dir {
            fsutil::ensure_trusted_dir("second copy directory", copy)?;
            check_marker(copy, true)?;
            let packs = copy.join(PACKS_DIR);
            match DirBuilder::new().mode(0o700).create(&packs) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => check_packs_dir(&packs)?,
                Err(e) => return Err(io_err(&packs)(e)),
            }
            // The copy's marker says the same as the store's.
            if let Some(m) = read_marker(dir)? {
                keyring::write_marker(copy, &m)?;
            }
            store.set_mirror(heal::Mirror::new(dir, Some(copy)));
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
        ImageStore::open_read_only_with(dir, &StoreOptions::new(dir.join(".no-key")))
    }

    /// [`open_read_only`](Self::open_read_only) with the job's `[store]`
    /// table: a store whose marker names a key needs that key
    /// ([`StoreError::Key`] otherwise).
    pub fn open_read_only_with(dir: &Path, opts: &StoreOptions) -> Result<ImageStore, StoreError> {
        fsutil::check_trusted("image directory", dir)?;
        check_marker(dir, false)?;
        let marker = read_marker(dir)?.unwrap_or_default();
        let key = keyring::key_for_reader(dir, &marker, opts)?;
        let mut store = ImageStore::new(dir, true);
        store.set_key(key);
        store.sealed_from = marker.sealed_from;
        // (Only `repair` writes through a read-only store.)
        store.parity = opts.parity;
        if let Some(copy) = opts.copy_dir.as_deref().filter(|c| c.is_dir()) {
            fsutil::check_trusted("second copy directory", copy)?;
            store.set_mirror(heal::Mirror::new(dir, Some(copy)));
        }
        Ok(store)
    }

    fn new(dir: &Path, read_only: bool) -> ImageStore {
        ImageStore {
            dir: dir.to_path_buf(),
            read_only,
            db: Arc::new(Mutex::new(ObjectDb::new(&dir.join(PACKS_DIR)))),
            tmpfs_staging: false,
            key: None,
            seal: false,
            sealed_from: None,
            parity: false,
            mirror: heal::Mirror::default(),
            progress: progress::ProgressHandle::default(),
        }
    }

    fn set_mirror(&mut self, mirror: heal::Mirror) {
        self.db
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_mirror(mirror.clone());
        self.mirror = mirror;
    }

    fn set_key(&mut self, key: Option<Arc<crypto::StoreKey>>) {
        self.db
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_key(key.clone());
        self.key = key;
    }

    /// True if new checkpoints are sealed with the store key.
    pub fn seals(&self) -> bool {
        self.seal
    }

    /// The store key's file and id, if a key is loaded.
    pub fn key_info(&self) -> Option<(PathBuf, String)> {
        self.key
            .as_ref()
            .map(|k| (k.path().to_path_buf(), k.key_id().to_string()))
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

    /// Report the progress of long operations to `progress` (default:
    /// [`NoProgress`]). Bytes and totals per operation:
    ///
    /// * [`verify_all`](ImageStore::verify_all) (and so `images`): one
    ///   phase "verifying"; total = the logical size of every listed
    ///   checkpoint (the sum of its regular files' sizes). A piece shared
    ///   with an image verified before counts as done without being read
    ///   again, so the bar may jump.
    /// * [`materialise`](ImageStore::materialise): "restoring"; total = the
    ///   image's logical size, advanced as pieces are written out.
    /// * [`repair`](ImageStore::repair): "checking store files" (total =
    ///   the size of the packs, indexes and manifests it checks against
    ///   their parity and second copy), then the verify phase(s) above.
    /// * [`gc`](ImageStore::gc): "marking" (total = the logical size of
    ///   every checkpoint; only tree nodes are read, so it is quick), then
    ///   "repacking" (total = the stored bytes of the live objects it
    ///   copies), when a pack is rewritten.
    ///
    /// Advances are batched (about one call per MiB).
    pub fn with_progress(mut self, progress: Arc<dyn Progress>) -> ImageStore {
        self.progress = progress::ProgressHandle(progress);
        self
    }

    /// The progress receiver ([`ImageStore::with_progress`]).
    fn progress(&self) -> &dyn Progress {
        &*self.progress.0
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
        self.load(id, seq, path)?
            .map_err(|reason| StoreError::Corrupt {
                id: id.to_string(),
                reason,
            })
    }

    /// Loads one checkpoint's manifest; an unsealed checkpoint numbered
    /// from the marker's `sealed-from` on is damage (it was not written by
    /// supervise with this store's key).
    fn load(
        &self,
        id: &str,
        seq: u64,
        path: PathBuf,
    ) -> Result<Result<ImageInfo, String>, StoreError> {
        Ok(
            load_image(id, seq, path, self.key.as_deref(), &self.mirror)?.and_then(
                |info| match self.sealed_from {
                    Some(from) if !info.sealed && info.seq >= from => Err(format!(
                        "not sealed, but this store seals every checkpoint from number {from} on: \
                     it was not written by supervise with this store's key"
                    )),
                    _ => Ok(info),
                },
            ),
        )
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
            match self.load(name, seq, entry.path())? {
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
    if read_marker(dir)?.is_some() {
        return Ok(());
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
