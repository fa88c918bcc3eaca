//! Materialise (the restore side): a checkpoint's files written out as a
//! directory CRIU can restore from, every piece verified as it is read,
//! large files by several threads.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::debug;

use super::format::{valid_file_name, valid_link, FileEntry, ImageInfo, MANIFEST_VERSION_V1};
use super::objects::{Hash, HashSetH, ObjectDb, PieceError};
use super::progress::{Batch, Phase, Progress};
use super::reader::Reader;
use super::verify::{check_chunk_len, file_leaves, logical_bytes, verify_v1};
use super::{io_err, ImageStore, StoreError};
use crate::fsutil;

/// Output is written in pieces of at most this size.
const WRITE_BATCH: usize = 4 << 20;
/// Files with more chunks than this are materialised by several threads.
const PARALLEL_MIN_CHUNKS: usize = 2048;

/// What [`ImageStore::materialise`] did.
#[derive(Debug, Clone)]
pub struct Materialised {
    /// The image directory written (pass it to CRIU).
    pub path: PathBuf,
    /// Bytes written.
    pub bytes: u64,
    /// Wall time.
    pub duration: Duration,
    /// The scratch directory `path` is, when it is to be removed with this
    /// (see [`Materialised::in_scratch`]).
    pub scratch: Option<std::sync::Arc<super::Scratch>>,
}

impl Materialised {
    /// Ties the scratch directory this was written into to it: removed
    /// (a private tmpfs unmounted) by [`remove`](Self::remove).
    pub fn in_scratch(mut self, dir: super::Scratch) -> Materialised {
        self.scratch = Some(std::sync::Arc::new(dir));
        self
    }

    /// Removes the written image directory.
    pub fn remove(self) {
        match self.scratch {
            Some(s) => drop(s),
            None => {
                let _ = fs::remove_dir_all(&self.path);
            }
        }
    }
}

impl ImageStore {
    /// Writes the checkpoint's files into `work_dir` as real files CRIU can
    /// restore from, verifying every piece as it is read. `work_dir` is an
    /// empty directory (as made by [`scratch_dir`]), or is created 0700 if
    /// missing; anything else there (a file, a symlink, a non-empty
    /// directory) is refused and left alone. Large files are written by
    /// several threads. On error the directory is removed and
    /// [`StoreError::Corrupt`] names the file and piece that failed.
    ///
    /// [`scratch_dir`]: super::scratch_dir
    pub fn materialise(
        &self,
        image: &ImageInfo,
        work_dir: &Path,
    ) -> Result<Materialised, StoreError> {
        self.materialise_select(image, work_dir, &mut |_, _| Select::Whole)
    }

    /// [`materialise`](Self::materialise), writing of each file only what
    /// `select(name, work_dir)` asks for. Files are written in the order of
    /// the manifest (by name), so `select` may read files written before.
    pub fn materialise_select(
        &self,
        image: &ImageInfo,
        work_dir: &Path,
        select: &mut dyn FnMut(&str, &Path) -> Select,
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
            let progress = self.progress();
            let _phase = Phase::start(progress, "restoring", logical_bytes(image));
            write_image(
                &db,
                image,
                work_dir,
                &mut checked,
                &mut bytes,
                progress,
                select,
            )
            .map_err(|e| match e {
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
                    scratch: None,
                })
            }
            Err(e) => {
                let _ = fs::remove_dir_all(work_dir);
                Err(e)
            }
        }
    }
}

/// What of a file [`ImageStore::materialise_select`] writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Select {
    /// All of it.
    Whole,
    /// A file of the right size holding only these byte ranges (start,
    /// end), aligned to the file's chunks; the rest is a hole that reads
    /// as zeros and takes no space.
    Ranges(Vec<(u64, u64)>),
}

/// A failure while writing or checking an image.
enum WriteError {
    Store(StoreError),
    Damage(String),
}

impl WriteError {
    /// A failed read: damage, unless a resource ran short.
    fn piece(e: PieceError) -> WriteError {
        if e.resource {
            WriteError::Store(StoreError::Resource(e.to_string()))
        } else {
            WriteError::Damage(e.to_string())
        }
    }

    /// The same error, about file `name`.
    fn in_file(self, name: &str) -> WriteError {
        match self {
            WriteError::Damage(e) => WriteError::Damage(format!("file {name}: {e}")),
            WriteError::Store(StoreError::Resource(e)) => {
                WriteError::Store(StoreError::Resource(format!("file {name}: {e}")))
            }
            e => e,
        }
    }
}

/// Writes all files of `image` into `dir`.
fn write_image(
    db: &ObjectDb,
    image: &ImageInfo,
    dir: &Path,
    good: &mut HashSetH,
    bytes: &mut u64,
    progress: &dyn Progress,
    select: &mut dyn FnMut(&str, &Path) -> Select,
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
            progress.advance(f.size);
        }
        return Ok(());
    }
    let mut reader = Reader::new(db)
        .map_err(|e| WriteError::Store(io_err(db.dir())(e)))?
        .sealed_only(image.sealed);
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
        let (leaves, chunk) = file_leaves(&mut reader, f).map_err(WriteError::piece)?;
        let ranges: Vec<(usize, usize)> = match select(&f.name, dir) {
            Select::Whole => vec![(0, leaves.len())],
            Select::Ranges(r) => r
                .iter()
                .map(|&(s, e)| {
                    let lo = (s / chunk) as usize;
                    let hi = (e.div_ceil(chunk) as usize).min(leaves.len());
                    (lo.min(hi), hi)
                })
                .collect(),
        };
        let wanted: usize = ranges.iter().map(|(lo, hi)| hi - lo).sum();
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| WriteError::Store(io_err(&path)(e)))?;
        file.set_len(f.size)
            .map_err(|e| WriteError::Store(io_err(&path)(e)))?;
        let threads = if wanted >= PARALLEL_MIN_CHUNKS {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                .clamp(1, 4)
        } else {
            1
        };
        // Each thread takes an equal share of the wanted chunks.
        let per = wanted.div_ceil(threads).max(1);
        let mut shares: Vec<Vec<(usize, usize)>> = vec![Vec::new(); threads];
        let (mut t, mut taken) = (0, 0);
        for &(mut lo, hi) in &ranges {
            while lo < hi {
                let n = (hi - lo).min(per - taken);
                shares[t].push((lo, lo + n));
                lo += n;
                taken += n;
                if taken == per && t + 1 < threads {
                    t += 1;
                    taken = 0;
                }
            }
        }
        let results: Vec<Result<(), WriteError>> = std::thread::scope(|s| {
            let handles: Vec<_> = shares
                .iter()
                .map(|share| {
                    let file = &file;
                    let leaves = &leaves;
                    let sealed = image.sealed;
                    let path = &path;
                    s.spawn(move || {
                        share.iter().try_for_each(|&(lo, hi)| {
                            write_range(db, sealed, f, leaves, chunk, lo, hi, file, path, progress)
                        })
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(WriteError::Damage("materialise thread panicked".into()))
                    })
                })
                .collect()
        });
        for r in results {
            r.map_err(|e| e.in_file(&f.name))?;
        }
        for &(lo, hi) in &ranges {
            good.extend(leaves[lo..hi].iter().copied());
            *bytes += (hi as u64 * chunk).min(f.size) - lo as u64 * chunk;
        }
    }
    Ok(())
}

/// Writes chunks `lo..hi` of one file (`path`) at their offsets.
#[allow(clippy::too_many_arguments)]
fn write_range(
    db: &ObjectDb,
    sealed: bool,
    f: &FileEntry,
    leaves: &[Hash],
    chunk: u64,
    lo: usize,
    hi: usize,
    file: &File,
    path: &Path,
    progress: &dyn Progress,
) -> Result<(), WriteError> {
    if lo >= hi {
        return Ok(());
    }
    let mut reader = Reader::new(db)
        .map_err(|e| WriteError::Store(io_err(db.dir())(e)))?
        .sealed_only(sealed);
    let items: Vec<(usize, Hash)> = (lo..hi).map(|i| (i, leaves[i])).collect();
    let last = leaves.len() - 1;
    let mut buf: Vec<u8> = Vec::with_capacity(WRITE_BATCH + chunk as usize);
    let mut buf_start = lo as u64 * chunk;
    // A failed write is the destination's problem, never the image's.
    let mut write_error: Option<io::Error> = None;
    let mut batch = Batch::new(progress);
    let flush = |buf: &mut Vec<u8>, at: u64| -> io::Result<()> {
        file.write_all_at(buf, at)?;
        buf.clear();
        Ok(())
    };
    let read = reader.read_chunks(&items, &mut |i, data| {
        check_chunk_len(f, chunk, i, last, data.len())?;
        buf.extend_from_slice(data);
        batch.add(data.len() as u64);
        if buf.len() >= WRITE_BATCH {
            let at = buf_start;
            buf_start += buf.len() as u64;
            if let Err(e) = flush(&mut buf, at) {
                let msg = e.to_string();
                write_error = Some(e);
                return Err(PieceError::resource(msg));
            }
        }
        Ok(())
    });
    if let Some(e) = write_error {
        return Err(WriteError::Store(io_err(path)(e)));
    }
    read.map_err(WriteError::piece)?;
    if !buf.is_empty() {
        flush(&mut buf, buf_start).map_err(|e| WriteError::Store(io_err(path)(e)))?;
    }
    Ok(())
}
