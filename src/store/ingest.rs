//! Ingest: a checkpoint from [`ImageStore::begin`] to [`Staging::commit`].
//! CRIU dumps into a staging directory; commit cuts every file into
//! chunks, stores the new ones in one pack, writes the manifest and
//! publishes the checkpoint (see "Crash safety" in [`crate::store`]).

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use tracing::{debug, warn};

use super::crypto::StoreKey;
use super::format::{
    image_info, leading_seq, seal_manifest, valid_link, CheckpointMeta, FileEntry, ImageInfo,
    Manifest, StoredInfo, DELETING_PREFIX, ID_TIME_FORMAT, MANIFEST_NAME, MANIFEST_SEALED_NAME,
    MANIFEST_VERSION, STAGING_PREFIX,
};
use super::objects::ObjectDb;
use super::objects::{self, FILE_CHUNK, PAGE_CHUNK};
use super::pack::{self, PackWriter, Published, TreeBuilder};
use super::parity;
use super::scratch::{self, tmpfs_dir, tmpfs_staging_prefix, Scratch, ScratchKind};
use super::stream::PageStream;
use super::util::{fsync_dir, rename_noreplace};
use super::{io_err, ImageStore, StoreError, StoreLock};
use crate::fsutil;

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
    /// `dump` when it is a private directory in memory (removed with the
    /// staging; a tmpfs of ours is unmounted).
    mem: Option<Scratch>,
    id: String,
    seq: u64,
    created: DateTime<Utc>,
    done: bool,
}

/// Where a sealed store's checkpoint keeps CRIU's images (from
/// [`ImageStore::begin_private`]).
#[derive(Debug, Clone)]
pub struct DumpPlan {
    /// The pages are streamed into the store; only CRIU's other images go
    /// into the dump directory.
    pub stream: bool,
    /// The pages are streamed because there is not enough memory to dump
    /// them into (not because the caller asked for it).
    pub forced: bool,
    /// Where the dump directory is.
    pub place: ScratchKind,
    /// Why, for the log.
    pub reason: String,
}

/// The cap of a private tmpfs that receives only CRIU's non-page images
/// (page maps, cores, file and socket images, pipe data, ghost files): a
/// quarter of the available memory, within 64 MiB..4 GiB (a cap only:
/// memory is used as files are written).
fn streamed_dump_cap(available: u64) -> u64 {
    (available / 4).clamp(64 << 20, 4 << 30)
}

impl ImageStore {
    /// Creates `.staging-<seq>` (mode 0700) for the next checkpoint. The id
    /// it will be published under is fixed now: `<seq:06>-<now, UTC>`.
    pub fn begin(&self) -> Result<Staging, StoreError> {
        self.begin_with(None)
    }

    /// For a store that seals: begins the next checkpoint with CRIU's dump
    /// directory in memory, never on disk (see `scratch.rs`): a private
    /// tmpfs mounted in `root` (the job's trusted state directory), else a
    /// private directory on `/dev/shm`. `job_bytes` estimates the job's
    /// memory; with `stream` the pages are streamed into the store anyway.
    /// A dump that would write the pages (`stream` false) gets a directory
    /// with room for them (`job_bytes` + 1/4 + 64 MiB) when the system has
    /// twice that available; when it has not, the pages are streamed
    /// instead (the plan says so and why), and only the small non-page
    /// images sit in memory.
    pub fn begin_private(
        &self,
        root: &Path,
        job_bytes: u64,
        stream: bool,
    ) -> Result<(Staging, DumpPlan), StoreError> {
        let available = scratch::mem_available().unwrap_or(0);
        let small = streamed_dump_cap(available);
        let to_err = |e| StoreError::Scratch(Box::new(e));
        let asked = stream;
        let (mem, stream, reason) = if stream {
            let m = scratch::dump_dir(root, 0, small).map_err(to_err)?;
            (m, true, "the pages are streamed into the store".to_string())
        } else {
            let need = job_bytes + job_bytes / 4 + (64 << 20);
            match scratch::dump_dir(root, need, need) {
                Ok(m) => {
                    let why = format!(
                        "the job's memory (about {}) fits in memory ({} available)",
                        scratch::human(job_bytes),
                        scratch::human(available)
                    );
                    (m, false, why)
                }
                Err(e) if e.is_no_room() => {
                    let m = scratch::dump_dir(root, 0, small).map_err(to_err)?;
                    let why = format!("{e}: the pages are streamed into the store instead");
                    (m, true, why)
                }
                Err(e) => return Err(to_err(e)),
            }
        };
        let plan = DumpPlan {
            forced: stream && !asked,
            stream,
            place: mem.kind(),
            reason,
        };
        Ok((self.begin_with(Some(mem))?, plan))
    }

    fn begin_with(&self, mem: Option<Scratch>) -> Result<Staging, StoreError> {
        let mut seq = self.next_seq()?;
        loop {
            let path = self.dir.join(format!("{STAGING_PREFIX}{seq:06}"));
            match DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => {
                    fs::set_permissions(&path, fs::Permissions::from_mode(0o700))
                        .map_err(io_err(&path))?;
                    let created = Utc::now();
                    let id = format!("{seq:06}-{}", created.format(ID_TIME_FORMAT));
                    let dump = match &mem {
                        Some(m) => m.path().to_path_buf(),
                        None => self.tmpfs_staging(seq).unwrap_or_else(|| path.clone()),
                    };
                    debug!(checkpoint = %id, path = %path.display(), dump = %dump.display(), "began checkpoint staging");
                    return Ok(Staging {
                        store: self.clone(),
                        publish_dir: path,
                        dump,
                        mem,
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

    /// 1 + the maximum sequence number among published, staging and deleting entries.
    pub(super) fn next_seq(&self) -> Result<u64, StoreError> {
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
}

/// One entry of a staging directory to ingest.
enum StagedEntry {
    File(String),
    Link(String, String),
}

impl Staging {
    /// Starts streaming files into this checkpoint (see
    /// [`PageStream`]). Takes the store's exclusive lock until the commit
    /// (or until the stream is dropped).
    pub fn stream(&self) -> Result<PageStream, StoreError> {
        PageStream::start(self.store().clone())
    }

    /// The id this checkpoint will be published under.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The store this checkpoint goes to.
    pub(super) fn store(&self) -> &ImageStore {
        &self.store
    }

    /// The directory to dump into (pass this to `criu dump -D`): the
    /// private directory in memory of [`ImageStore::begin_private`], or
    /// with [`ImageStore::with_tmpfs_staging`] one on tmpfs when it has
    /// room, else the store's `.staging-<seq>` directory.
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
                if rel == MANIFEST_NAME || rel == MANIFEST_SEALED_NAME {
                    return Err(unexpected("MANIFEST.* names are reserved for the store"));
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
    pub fn commit(self, meta: CheckpointMeta) -> Result<ImageInfo, StoreError> {
        self.commit_with(meta, None)
    }

    /// [`commit`](Self::commit), with the files of `stream` (already
    /// stored in its pack, which this commit completes) added to the
    /// staged ones.
    ///
    /// The steps, in order: take the store's exclusive lock and a pack
    /// ([`open_pack`](Self::open_pack)); refuse a file both staged and
    /// streamed; cut every staged file into the pack
    /// ([`ingest_entry`](Self::ingest_entry)) and publish it
    /// ([`PackInProgress::publish`]); drop the raw dump
    /// ([`drop_raw_dump`](Self::drop_raw_dump)); write the manifest
    /// ([`write_manifest`](Self::write_manifest)); rename the checkpoint
    /// into place and write its second copy ([`publish`](Self::publish)).
    /// The lock is held until the checkpoint is published.
    pub fn commit_with(
        mut self,
        meta: CheckpointMeta,
        stream: Option<PageStream>,
    ) -> Result<ImageInfo, StoreError> {
        let start = Instant::now();
        let entries = self.entries()?;
        let key = if self.store.seal {
            self.store.key.clone()
        } else {
            None
        };
        let packs_dir = self.store.dir.join(super::format::PACKS_DIR);
        let mut pack = self.open_pack(stream, key.clone(), &packs_dir)?;
        self.refuse_streamed_twice(&entries, &pack.files)?;
        let db = self.store.db()?;
        for e in &entries {
            self.ingest_entry(e, &db, &mut pack, &packs_dir)?;
        }
        let (_lock, files, written) = pack.publish(&packs_dir)?;
        drop(db);
        crate::failpoint::point("commit-after-pack");

        self.drop_raw_dump(&entries)?;
        let manifest = Manifest {
            version: MANIFEST_VERSION,
            id: self.id.clone(),
            created: self.created,
            meta,
            files,
            stored: Some(written.stored_info(start)),
        };
        let manifest_len = self.write_manifest(&manifest, key.as_deref())?;
        let final_path = self.publish()?;

        let info = image_info(
            &self.id,
            self.seq,
            final_path,
            manifest,
            manifest_len,
            key.is_some(),
        );
        debug!(checkpoint = %self.id, size_bytes = info.size_bytes, new_bytes = info.new_bytes, "published checkpoint");
        Ok(info)
    }

    /// Commit step: the pack this checkpoint's new objects go into, under
    /// the store's exclusive lock. With a `stream`, its own (which already
    /// holds the streamed files' objects, and the lock); else a new pack in
    /// `packs_dir`, sealed under `key` if any, with the store's parity and
    /// second copy.
    fn open_pack(
        &self,
        stream: Option<PageStream>,
        key: Option<Arc<StoreKey>>,
        packs_dir: &Path,
    ) -> Result<PackInProgress, StoreError> {
        Ok(match stream {
            Some(s) => {
                let s = s.finish()?;
                PackInProgress {
                    lock: s.lock,
                    writer: s.writer,
                    files: s.files,
                    chunks: s.chunks,
                }
            }
            None => {
                let lock = self.store.lock(true)?;
                let writer = PackWriter::new(packs_dir, key)
                    .map_err(io_err(packs_dir))?
                    .with_parity(self.store.parity)
                    .with_copy(self.store.mirror.alt(packs_dir));
                PackInProgress {
                    lock,
                    writer,
                    files: Vec::new(),
                    chunks: 0,
                }
            }
        })
    }

    /// Commit step: refuses a staged file that was also streamed into the
    /// checkpoint (`streamed`: the stream's files), naming it.
    fn refuse_streamed_twice(
        &self,
        entries: &[StagedEntry],
        streamed: &[FileEntry],
    ) -> Result<(), StoreError> {
        for e in entries {
            if streamed.iter().any(|f| f.name == entry_name(e)) {
                return Err(StoreError::UnexpectedEntry {
                    path: self.dump.join(entry_name(e)),
                    reason: "this file was also streamed into the checkpoint".into(),
                });
            }
        }
        Ok(())
    }

    /// Commit step: adds one staged entry to `pack`. A link becomes a
    /// manifest entry as it is; a file is read from the dump directory, cut
    /// into chunks ([`chunk_size_for`]), its new chunks and tree nodes are
    /// written into the pack (`db`: the objects the store already has), and
    /// its entry records the tree's root. An error names the pack directory
    /// when storing failed (e.g. ENOSPC), the staged file when reading it
    /// did.
    fn ingest_entry(
        &self,
        e: &StagedEntry,
        db: &ObjectDb,
        pack: &mut PackInProgress,
        packs_dir: &Path,
    ) -> Result<(), StoreError> {
        let name = match e {
            StagedEntry::Link(name, target) => {
                pack.files.push(FileEntry {
                    name: name.clone(),
                    link: Some(target.clone()),
                    ..Default::default()
                });
                return Ok(());
            }
            StagedEntry::File(name) => name,
        };
        let path = self.dump.join(name);
        let chunk = chunk_size_for(name);
        let mut tree = TreeBuilder::new();
        let (w, chunks) = (&mut pack.writer, &mut pack.chunks);
        // Tell a failure to store (e.g. ENOSPC in the pack) from a failure
        // to read the dump.
        let mut store_failed = false;
        let size = pack::for_each_batch(&path, chunk as usize, &mut |b| {
            *chunks += b.len().div_ceil(chunk as usize) as u64;
            tree.push_batch(db, w, b, chunk as usize)
                .inspect_err(|_| store_failed = true)
        })
        .map_err(|e| {
            if store_failed {
                io_err(packs_dir)(e)
            } else {
                io_err(&path)(e)
            }
        })?;
        let (root, depth) = tree.finish(db, w).map_err(io_err(packs_dir))?;
        pack.files.push(FileEntry {
            name: name.clone(),
            size,
            chunk: Some(chunk),
            depth: Some(depth),
            root: Some(objects::hex(&root)),
            ..Default::default()
        });
        Ok(())
    }

    /// Commit step, once the data is safe in a published pack: removes
    /// CRIU's raw dump. A dump in memory goes with its private directory, a
    /// dump on tmpfs with its directory; a dump in the staging directory
    /// itself (`entries`: what it held) file by file, then its
    /// subdirectories, so that the staging directory is left for the
    /// manifest.
    fn drop_raw_dump(&mut self, entries: &[StagedEntry]) -> Result<(), StoreError> {
        if let Some(m) = self.mem.take() {
            drop(m);
        } else if self.dump != self.publish_dir {
            fs::remove_dir_all(&self.dump).map_err(io_err(&self.dump))?;
        }
        if self.dump != self.publish_dir {
            return Ok(());
        }
        for e in entries.iter().rev() {
            let p = self.publish_dir.join(entry_name(e));
            fs::remove_file(&p).map_err(io_err(&p))?;
        }
        for e in entries {
            if let Some((sub, _)) = entry_name(e).split_once('/') {
                let d = self.publish_dir.join(sub);
                match fs::remove_dir(&d) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err(&d)(e)),
                }
            }
        }
        Ok(())
    }

    /// Commit step: writes `manifest` into the staging directory (mode
    /// 0600, synced): `MANIFEST.json`, or sealed under `key` as
    /// `MANIFEST.sealed`; with parity, its sidecar too; then syncs the
    /// directory. Returns the bytes written (manifest and sidecar).
    fn write_manifest(
        &self,
        manifest: &Manifest,
        key: Option<&StoreKey>,
    ) -> Result<u64, StoreError> {
        let mut json =
            serde_json::to_vec_pretty(manifest).map_err(|source| StoreError::Serialize {
                id: self.id.clone(),
                source,
            })?;
        json.push(b'\n');
        let (manifest_path, bytes) = match key {
            Some(k) => (
                self.publish_dir.join(MANIFEST_SEALED_NAME),
                seal_manifest(k, &self.id, &json).map_err(io_err(&self.publish_dir))?,
            ),
            None => (self.publish_dir.join(MANIFEST_NAME), json),
        };
        {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&manifest_path)
                .map_err(io_err(&manifest_path))?;
            f.set_permissions(fs::Permissions::from_mode(0o600))
                .map_err(io_err(&manifest_path))?;
            f.write_all(&bytes).map_err(io_err(&manifest_path))?;
            f.sync_all().map_err(io_err(&manifest_path))?;
        }
        let mut manifest_len = bytes.len() as u64;
        if self.store.parity {
            manifest_len +=
                parity::write_for_bytes(&manifest_path, &bytes).map_err(io_err(&manifest_path))?;
        }
        fsync_dir(&self.publish_dir)?;
        Ok(manifest_len)
    }

    /// Commit step, the publication itself: renames the staging directory
    /// to `<dir>/<id>` (from then on the checkpoint is the store's, and
    /// dropping this `Staging` removes nothing), syncs the store directory,
    /// and writes the second copy if the store keeps one (a failure there
    /// is a warning: the checkpoint stays published). Returns its path.
    fn publish(&mut self) -> Result<PathBuf, StoreError> {
        let final_path = self.store.dir.join(&self.id);
        rename_noreplace(&self.publish_dir, &final_path)?;
        self.done = true;
        fsync_dir(&self.store.dir)?;
        if let Some(copy) = self.store.mirror.copy_root() {
            if let Err(e) = copy_checkpoint(&final_path, copy, &self.id, self.seq) {
                warn!(checkpoint = %self.id, copy = %copy.display(), error = %e,
                    "cannot write the checkpoint's second copy; it is kept in the image directory only");
            }
        }
        Ok(final_path)
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
        if let Some(m) = self.mem.take() {
            drop(m);
        } else if self.dump != self.publish_dir {
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

/// The pack a commit writes its new objects into, and what it has put
/// there so far; from [`Staging::open_pack`]. Owns the store's exclusive
/// lock until [`publish`](Self::publish) hands it back.
struct PackInProgress {
    /// The store's exclusive lock.
    lock: StoreLock,
    /// The pack being written.
    writer: PackWriter,
    /// The manifest's entries so far (streamed files first).
    files: Vec<FileEntry>,
    /// Chunks cut so far (the manifest's `stored.chunks`).
    chunks: u64,
}

/// What publishing a commit's pack wrote, for the manifest's
/// [`StoredInfo`].
struct PackWritten {
    new_objects: u64,
    new_raw_bytes: u64,
    node_bytes: u64,
    chunks: u64,
    published: Option<Published>,
}

impl PackInProgress {
    /// Commit step: publishes the pack (a pack with no new object is not
    /// written). Returns the lock (still held), the manifest's entries in
    /// name order, and what was written.
    fn publish(
        self,
        packs_dir: &Path,
    ) -> Result<(StoreLock, Vec<FileEntry>, PackWritten), StoreError> {
        let PackInProgress {
            lock,
            writer: w,
            mut files,
            chunks,
        } = self;
        files.sort_by(|a, b| a.name.cmp(&b.name));
        let new_objects = w.len() as u64;
        let new_raw_bytes = w.raw_bytes;
        let node_bytes = w.node_bytes;
        let published = w.finish().map_err(io_err(packs_dir))?;
        let written = PackWritten {
            new_objects,
            new_raw_bytes,
            node_bytes,
            chunks,
            published,
        };
        Ok((lock, files, written))
    }
}

impl PackWritten {
    /// The manifest's record of what this checkpoint stored, with the time
    /// since the commit `start`ed.
    fn stored_info(self, start: Instant) -> StoredInfo {
        StoredInfo {
            pack_bytes: self.published.as_ref().map(|p| p.file_bytes).unwrap_or(0),
            new_objects: self.new_objects,
            new_raw_bytes: self.new_raw_bytes,
            node_bytes: self.node_bytes,
            chunks: self.chunks,
            pack: self.published.map(|p| p.name),
            ingest_ms: start.elapsed().as_millis() as u64,
        }
    }
}

fn entry_name(e: &StagedEntry) -> &str {
    match e {
        StagedEntry::File(n) | StagedEntry::Link(n, _) => n,
    }
}

/// Copies the published checkpoint directory `from` into the second copy
/// `copy` as `<copy>/<id>` (a staging directory renamed into place).
fn copy_checkpoint(from: &Path, copy: &Path, id: &str, seq: u64) -> Result<(), StoreError> {
    let staging = copy.join(format!("{STAGING_PREFIX}{seq:06}"));
    let _ = fs::remove_dir_all(&staging);
    DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .map_err(io_err(&staging))?;
    for e in fs::read_dir(from).map_err(io_err(from))? {
        let e = e.map_err(io_err(from))?;
        if e.file_type().map(|t| t.is_file()).unwrap_or(false) {
            let to = staging.join(e.file_name());
            super::util::copy_file(&e.path(), &to).map_err(io_err(&to))?;
        }
    }
    fsync_dir(&staging)?;
    rename_noreplace(&staging, &copy.join(id))?;
    fsync_dir(copy)
}

/// Page images are cut into pages, and so are the copies of the job's own
/// files (`supervise-file-*`: a file rewritten in place changes a few
/// pages here and there, and a 4 KiB cut stores only those again); every
/// other file into 64 KiB pieces.
pub(super) fn chunk_size_for(name: &str) -> u32 {
    let base = name.rsplit('/').next().unwrap_or(name);
    if (base.starts_with("pages-") && base.ends_with(".img"))
        || base.starts_with(crate::files::BLOB_PREFIX)
    {
        PAGE_CHUNK
    } else {
        FILE_CHUNK
    }
}
