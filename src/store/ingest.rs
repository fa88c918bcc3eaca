//! Ingest: a checkpoint from [`ImageStore::begin`] to [`Staging::commit`].
//! CRIU dumps into a staging directory; commit cuts every file into
//! chunks, stores the new ones in one pack, writes the manifest and
//! publishes the checkpoint (see "Crash safety" in [`crate::store`]).

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use chrono::{DateTime, Utc};
use tracing::{debug, warn};

use super::format::{
    image_info, leading_seq, seal_manifest, valid_link, CheckpointMeta, FileEntry, ImageInfo,
    Manifest, StoredInfo, DELETING_PREFIX, ID_TIME_FORMAT, MANIFEST_NAME, MANIFEST_SEALED_NAME,
    MANIFEST_VERSION, STAGING_PREFIX,
};
use super::objects::{self, FILE_CHUNK, PAGE_CHUNK};
use super::pack::{self, PackWriter, TreeBuilder};
use super::parity;
use super::scratch::{self, tmpfs_dir, tmpfs_staging_prefix, Scratch, ScratchKind};
use super::stream::PageStream;
use super::util::{fsync_dir, rename_noreplace};
use super::{io_err, ImageStore, StoreError};
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
        let (_lock, mut w, mut files, mut chunks) = match stream {
            Some(s) => {
                let s = s.finish()?;
                (s.lock, s.writer, s.files, s.chunks)
            }
            None => {
                let lock = self.store.lock(true)?;
                let w = PackWriter::new(&packs_dir, key.clone())
                    .map_err(io_err(&packs_dir))?
                    .with_parity(self.store.parity)
                    .with_copy(self.store.mirror.alt(&packs_dir));
                (lock, w, Vec::new(), 0u64)
            }
        };
        for e in &entries {
            if files.iter().any(|f| f.name == entry_name(e)) {
                return Err(StoreError::UnexpectedEntry {
                    path: self.dump.join(entry_name(e)),
                    reason: "this file was also streamed into the checkpoint".into(),
                });
            }
        }
        let db = self.store.db()?;
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
                    let size = pack::for_each_batch(&path, chunk as usize, &mut |b| {
                        chunks += b.len().div_ceil(chunk as usize) as u64;
                        tree.push_batch(&db, &mut w, b, chunk as usize)
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
        files.sort_by(|a, b| a.name.cmp(&b.name));
        let new_objects = w.len() as u64;
        let new_raw_bytes = w.raw_bytes;
        let node_bytes = w.node_bytes;
        let published = w.finish().map_err(io_err(&packs_dir))?;
        drop(db);
        crate::failpoint::point("commit-after-pack");

        // The data is safe in a published pack: drop the raw dump.
        if let Some(m) = self.mem.take() {
            drop(m);
        } else if self.dump != self.publish_dir {
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
        let (manifest_path, bytes) = match &key {
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

/// Page images are cut into pages, everything else into 64 KiB pieces.
pub(super) fn chunk_size_for(name: &str) -> u32 {
    let base = name.rsplit('/').next().unwrap_or(name);
    if base.starts_with("pages-") && base.ends_with(".img") {
        PAGE_CHUNK
    } else {
        FILE_CHUNK
    }
}
