//! Verification: every piece of a checkpoint read and checked against its
//! hash ([`ImageStore::verify`], [`ImageStore::verify_all`]), and the
//! checks shared with materialising (chunk lists, chunk sizes, version 1
//! files re-hashed).

use std::io::{self, Read};

use sha2::{Digest, Sha256};
use tracing::warn;

use super::format::{
    parse_id, tree_of, valid_file_name, FileEntry, ImageInfo, MANIFEST_VERSION_V1,
};
use super::objects::{Hash, HashSetH, ObjectDb, PieceError};
use super::progress::{Batch, NoProgress, Phase};
use super::reader::Reader;
use super::{ImageStore, StoreError};
use crate::fsutil;

/// Buffer size for streaming hashes.
const HASH_BUF_SIZE: usize = 1 << 20;

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

impl ImageStore {
    /// Reads every piece of the checkpoint and checks it against its hash
    /// (version 1: re-hashes every file against its SHA-256).
    ///
    /// Fails with [`StoreError::Corrupt`] naming the file and piece on a
    /// missing or damaged piece, or a size mismatch.
    pub fn verify(&self, image: &ImageInfo) -> Result<(), StoreError> {
        let _lock = self.lock(false)?;
        let db = self.db()?;
        let mut checked = HashSetH::default();
        let mut batch = Batch::new(&NoProgress);
        check_image(&db, image, &mut checked, &mut batch, &mut |_, _, _| Ok(()))
            .map_err(|e| piece_error(&image.id, e))
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
        let total = infos.iter().map(logical_bytes).sum();
        let _phase = Phase::start(self.progress(), "verifying", total);
        let mut batch = Batch::new(self.progress());
        for img in &infos {
            let done = batch.added();
            let r = check_image(&db, img, &mut good, &mut batch, &mut |_, _, _| Ok(()));
            // A damaged image counts as done (the bar sums to its total).
            let rest = logical_bytes(img).saturating_sub(batch.added() - done);
            batch.add(rest);
            let r = match r {
                // Not evidence of anything: the whole verification fails.
                Err(e) if e.resource => return Err(piece_error(&img.id, e)),
                r => r.map_err(|e| e.message().to_string()),
            };
            if let Err(e) = &r {
                warn!(checkpoint = %img.id, error = %e, "checkpoint failed verification");
            }
            report.checkpoints.push((img.id.clone(), r));
        }
        report.objects_checked = (good.len() - before) as u64;
        Ok(report)
    }
}

/// Receives each verified chunk: (file index, chunk index, contents).
type FileChunkSink<'a> = dyn FnMut(usize, usize, &[u8]) -> Result<(), PieceError> + 'a;

/// What progress counts for an image: the sizes of its regular files.
pub(super) fn logical_bytes(image: &ImageInfo) -> u64 {
    image
        .manifest
        .files
        .iter()
        .filter(|f| f.link.is_none())
        .map(|f| f.size)
        .sum()
}

/// Checks every piece of `image` (skipping objects in `good`, adding the
/// ones found intact). `sink(file index, chunk index, data)` sees each chunk.
/// `batch` is advanced by each chunk's length, read or skipped (version 1:
/// by nothing; the caller accounts for it).
fn check_image(
    db: &ObjectDb,
    image: &ImageInfo,
    good: &mut HashSetH,
    batch: &mut Batch<'_>,
    sink: &mut FileChunkSink<'_>,
) -> Result<(), PieceError> {
    if image.manifest.version == MANIFEST_VERSION_V1 {
        return verify_v1(image).map_err(PieceError::new);
    }
    let mut reader = Reader::new(db)
        .map_err(|e| PieceError::io("cannot start reading", &e))?
        .sealed_only(image.sealed);
    for (fi, f) in image.manifest.files.iter().enumerate() {
        if !valid_file_name(&f.name) {
            return Err(PieceError::new(format!(
                "manifest lists invalid file name {:?}",
                f.name
            )));
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
        // Pieces already verified count as done.
        let skipped = leaves.len() - todo.len();
        if skipped > 0 {
            let last_len = f.size - chunk * last as u64;
            let last_skipped = good.contains(&leaves[last]);
            batch.add(
                (skipped - usize::from(last_skipped)) as u64 * chunk
                    + if last_skipped { last_len } else { 0 },
            );
        }
        let r = reader.read_chunks(&todo, &mut |i, data| {
            check_chunk_len(f, chunk, i, last, data.len())?;
            ok.push(leaves[i]);
            batch.add(data.len() as u64);
            sink(fi, i, data)
        });
        good.extend(ok);
        r.map_err(|e| e.context(format_args!("file {}", f.name)))?;
    }
    Ok(())
}

/// A failed read of checkpoint `id` as a store error: a resource that ran
/// short is [`StoreError::Resource`], anything else damage.
pub(super) fn piece_error(id: &str, e: PieceError) -> StoreError {
    if e.resource {
        StoreError::Resource(format!("checkpoint {id}: {e}"))
    } else {
        StoreError::Corrupt {
            id: id.to_string(),
            reason: e.message().to_string(),
        }
    }
}

pub(super) fn check_chunk_len(
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
        return Err(PieceError::new(format!(
            "chunk {i} has {len} bytes, expected {want} (file size {})",
            f.size
        )));
    }
    Ok(())
}

/// The chunk list of a version 2 file, checked against its size.
pub(super) fn file_leaves(
    reader: &mut Reader<'_>,
    f: &FileEntry,
) -> Result<(Vec<Hash>, u64), PieceError> {
    let (Some((root, depth)), Some(chunk)) = (tree_of(f), f.chunk) else {
        return Err(PieceError::new(format!(
            "file {}: manifest entry has no tree",
            f.name
        )));
    };
    if chunk == 0 {
        return Err(PieceError::new(format!("file {}: chunk size 0", f.name)));
    }
    let chunk = chunk as u64;
    let leaves = reader
        .leaves(&root, depth)
        .map_err(|e| e.context(format_args!("file {}", f.name)))?;
    let want = f.size.div_ceil(chunk).max(1) as usize;
    if leaves.len() != want {
        return Err(PieceError::new(format!(
            "file {}: tree has {} chunks, size {} needs {want}",
            f.name,
            leaves.len(),
            f.size
        )));
    }
    Ok((leaves, chunk))
}

/// Re-hashes the whole files of a version 1 checkpoint.
pub(super) fn verify_v1(image: &ImageInfo) -> Result<(), String> {
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
