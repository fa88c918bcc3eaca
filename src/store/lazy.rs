//! Random-access reads of one stored file, for a lazy restore: CRIU's
//! lazy-pages daemon asks for pages as the restored job touches them, so
//! the page image is never written out; each request reads and verifies
//! just the chunks it covers (every piece authenticated or checked against
//! its hash, repaired from parity or the second copy where it can be, as
//! in any other read).

use super::format::ImageInfo;
use super::objects::{Hash, PieceError};
use super::reader::Reader;
use super::verify::{check_chunk_len, file_leaves};
use super::{ImageStore, StoreError};

/// Requests at least this many chunks are read by two threads.
const SPLIT_MIN_CHUNKS: usize = 256;

/// One file of a checkpoint, readable at any offset; from
/// [`ImageStore::file_reader`].
pub struct FileReader {
    store: ImageStore,
    id: String,
    name: String,
    sealed: bool,
    size: u64,
    chunk: u64,
    leaves: Vec<Hash>,
}

impl ImageStore {
    /// Opens the file `name` of `image` for [`FileReader::read_at`] (its
    /// chunk list is read and verified now).
    pub fn file_reader(&self, image: &ImageInfo, name: &str) -> Result<FileReader, StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt {
            id: image.id.clone(),
            reason,
        };
        let f = image
            .manifest
            .files
            .iter()
            .find(|f| f.name == name && f.link.is_none())
            .ok_or_else(|| corrupt(format!("the checkpoint has no file {name}")))?;
        let db = self.db()?;
        let mut reader = Reader::new(&db)
            .map_err(|e| super::io_err(db.dir())(e))?
            .sealed_only(image.sealed);
        let (leaves, chunk) =
            file_leaves(&mut reader, f).map_err(|e| super::verify::piece_error(&image.id, e))?;
        Ok(FileReader {
            store: self.clone(),
            id: image.id.clone(),
            name: name.to_string(),
            sealed: image.sealed,
            size: f.size,
            chunk,
            leaves,
        })
    }
}

impl FileReader {
    /// Size of the file.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends bytes `offset .. offset + len` of the file to `out`
    /// (`offset` a multiple of the chunk size), every chunk verified.
    pub fn read_at(&self, offset: u64, len: u64, out: &mut Vec<u8>) -> Result<(), StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt {
            id: self.id.clone(),
            reason: format!("file {}: {reason}", self.name),
        };
        if offset % self.chunk != 0 || offset.checked_add(len).map_or(true, |e| e > self.size) {
            return Err(corrupt(format!(
                "read of {len} bytes at {offset} is outside the file ({} bytes)",
                self.size
            )));
        }
        if len == 0 {
            return Ok(());
        }
        let lo = (offset / self.chunk) as usize;
        let hi = (offset + len).div_ceil(self.chunk) as usize;
        let start = out.len();
        out.resize(start + len as usize, 0);
        let db = self.store.db()?;
        let db = &*db;
        let last = self.leaves.len() - 1;
        let mid = if hi - lo >= SPLIT_MIN_CHUNKS {
            lo + (hi - lo) / 2
        } else {
            hi
        };
        let (first, second) =
            out[start..].split_at_mut(((mid - lo) as u64 * self.chunk).min(len) as usize);
        let part = |from: usize, to: usize, dst: &mut [u8]| -> Result<(), PieceError> {
            if from >= to {
                return Ok(());
            }
            let mut reader = Reader::new(db)
                .map_err(|e| PieceError::io("cannot start reading", &e))?
                .sealed_only(self.sealed);
            let items: Vec<(usize, Hash)> = (from..to).map(|i| (i, self.leaves[i])).collect();
            let base = from as u64 * self.chunk;
            reader.read_chunks(&items, &mut |i, data| {
                let f = super::format::FileEntry {
                    size: self.size,
                    ..Default::default()
                };
                check_chunk_len(&f, self.chunk, i, last, data.len())?;
                let at = (i as u64 * self.chunk - base) as usize;
                let n = data.len().min(dst.len().saturating_sub(at));
                dst[at..at + n].copy_from_slice(&data[..n]);
                Ok(())
            })
        };
        let (a, b) = if mid < hi {
            std::thread::scope(|s| {
                let h = s.spawn(|| part(mid, hi, second));
                let a = part(lo, mid, first);
                (
                    a,
                    h.join()
                        .unwrap_or_else(|_| Err(PieceError::new("read thread panicked"))),
                )
            })
        } else {
            (part(lo, hi, first), Ok(()))
        };
        a.and(b).map_err(|e| {
            out.truncate(start);
            if e.resource {
                StoreError::Resource(format!("checkpoint {}: file {}: {e}", self.id, self.name))
            } else {
                corrupt(e.message().to_string())
            }
        })
    }
}
