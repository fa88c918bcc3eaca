//! Writing the store's objects: a new pack and its index
//! ([`PackWriter`]), a file's chunk tree ([`TreeBuilder`], with batches
//! hashed, compressed and sealed on several threads), reading a dump in
//! batches, and copying a store file (the second copy). The formats are
//! in `objects.rs`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::crypto::StoreKey;
use super::objects::{
    hash, hex, Hash, HashSetH, ObjectDb, FANOUT, FLAG_SEALED, FLAG_ZSTD, IDX_ENTRY, IDX_MAGIC,
    IDX_MAGIC_SEALED, PACK_MAGIC, TMP_PREFIX, ZSTD_LEVEL,
};
use super::parity;
use crate::fsutil;

/// Writes new objects into one new pack.
pub struct PackWriter {
    dir: PathBuf,
    tmp: PathBuf,
    out: BufWriter<File>,
    offset: u64,
    entries: Vec<(Hash, u64, u32, u32, u32)>,
    seen: HashSetH,
    cctx: zstd::bulk::Compressor<'static>,
    cbuf: Vec<u8>,
    key: Option<Arc<StoreKey>>,
    parity: bool,
    copy_to: Option<PathBuf>,
    /// Raw bytes of the objects added.
    pub raw_bytes: u64,
    /// Raw bytes of the tree nodes among them.
    pub node_bytes: u64,
}

/// A pack published by [`PackWriter::finish`].
#[derive(Debug, Clone)]
pub struct Published {
    /// Its name.
    pub name: String,
    /// Objects in it.
    pub objects: u64,
    /// Size of `.pack` + `.idx`.
    pub file_bytes: u64,
}

impl PackWriter {
    /// Starts a pack in `dir` (a temporary file until [`finish`](Self::finish)).
    /// With a `key`, objects get keyed ids ([`id`](Self::id)) and are
    /// sealed, and so is the index.
    pub fn new(dir: &Path, key: Option<Arc<StoreKey>>) -> io::Result<PackWriter> {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = dir.join(format!("{TMP_PREFIX}{}-{n}.pack", std::process::id()));
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        let mut out = BufWriter::with_capacity(1 << 20, f);
        out.write_all(PACK_MAGIC)?;
        Ok(PackWriter {
            dir: dir.to_path_buf(),
            tmp,
            out,
            offset: PACK_MAGIC.len() as u64,
            entries: Vec::new(),
            seen: HashSetH::default(),
            cctx: zstd::bulk::Compressor::new(ZSTD_LEVEL)?,
            cbuf: Vec::new(),
            key,
            parity: false,
            copy_to: None,
            raw_bytes: 0,
            node_bytes: 0,
        })
    }

    /// Writes Reed-Solomon sidecars for the pack and its index.
    pub fn with_parity(mut self, on: bool) -> PackWriter {
        self.parity = on;
        self
    }

    /// Also publishes the pack (and sidecars) into `dir`, the `packs/`
    /// directory of the store's second copy.
    pub fn with_copy(mut self, dir: Option<PathBuf>) -> PackWriter {
        self.copy_to = dir;
        self
    }

    /// The id of an object with contents `data`: its keyed hash with a
    /// key, else its BLAKE3 hash.
    pub fn id(&self, data: &[u8]) -> Hash {
        match &self.key {
            Some(k) => k.id(data),
            None => hash(data),
        }
    }

    /// True if `h` was added to this pack already.
    pub fn contains(&self, h: &Hash) -> bool {
        self.seen.contains(h)
    }

    /// Objects added so far.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Adds `data` (whose id is `h`, see [`id`](Self::id)), compressing
    /// it when that helps, sealing it with a key. Does nothing if `h` was
    /// added before.
    pub fn add(&mut self, h: Hash, data: &[u8]) -> io::Result<()> {
        if !self.seen.insert(h) {
            return Ok(());
        }
        let mut cbuf = std::mem::take(&mut self.cbuf);
        let flags = encode(self.key.as_deref(), &mut self.cctx, &h, data, &mut cbuf)?;
        let r = self.add_stored(h, &cbuf, data.len() as u32, flags);
        cbuf.clear();
        self.cbuf = cbuf;
        r
    }

    /// Adds an object in its stored form (used by gc when repacking).
    pub fn add_stored(
        &mut self,
        h: Hash,
        stored: &[u8],
        raw_len: u32,
        flags: u32,
    ) -> io::Result<()> {
        self.seen.insert(h);
        self.out.write_all(stored)?;
        self.entries
            .push((h, self.offset, stored.len() as u32, raw_len, flags));
        self.offset += stored.len() as u64;
        self.raw_bytes += raw_len as u64;
        Ok(())
    }

    /// Publishes the pack: fsyncs the data, renames it to `<name>.pack`,
    /// writes, fsyncs and renames `<name>.idx`, then fsyncs the directory.
    /// Returns `None` (and removes the temporary file) if nothing was added.
    pub fn finish(mut self) -> io::Result<Option<Published>> {
        if self.entries.is_empty() {
            let _ = fs::remove_file(&self.tmp);
            return Ok(None);
        }
        self.out.flush()?;
        let f = self.out.get_ref();
        f.sync_all()?;
        let mut body = Vec::with_capacity(8 + self.entries.len() * IDX_ENTRY);
        body.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        for (h, off, stored, raw, flags) in &self.entries {
            body.extend_from_slice(h);
            body.extend_from_slice(&off.to_le_bytes());
            body.extend_from_slice(&stored.to_le_bytes());
            body.extend_from_slice(&raw.to_le_bytes());
            body.extend_from_slice(&flags.to_le_bytes());
        }
        let (name, idx) = match &self.key {
            Some(key) => {
                // A random name: the index's hash would have to be known
                // before sealing it under that name.
                let mut n = [0u8; 16];
                fsutil::random_bytes(&mut n)?;
                let name = hex::encode(n);
                let idx = key.seal_blob(IDX_MAGIC_SEALED, &name, &body)?;
                (name, idx)
            }
            None => {
                let mut idx = Vec::with_capacity(8 + body.len() + 32);
                idx.extend_from_slice(IDX_MAGIC);
                idx.extend_from_slice(&body);
                let sum = hash(&idx);
                idx.extend_from_slice(&sum);
                (hex(&sum)[..32].to_string(), idx)
            }
        };
        let pack_path = self.dir.join(format!("{name}.pack"));
        fs::rename(&self.tmp, &pack_path)?;
        let idx_path = self.dir.join(format!("{name}.idx"));
        let mut par_bytes = 0;
        if self.parity {
            // Both sidecars exist before the index names the pack.
            par_bytes += parity::write_for_file(&pack_path)?;
            par_bytes += parity::write_for_bytes(&idx_path, &idx)?;
        }
        let idx_tmp = self.dir.join(format!("{TMP_PREFIX}{name}.idx"));
        {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&idx_tmp)?;
            f.write_all(&idx)?;
            f.sync_all()?;
        }
        fs::rename(&idx_tmp, &idx_path)?;
        fsutil::fsync_dir(&self.dir)?;
        if let Some(copy) = &self.copy_to {
            // The second copy: data and sidecars first, the index last.
            let mut files = vec![pack_path.clone()];
            if self.parity {
                files.push(parity::par_path(&pack_path));
                files.push(parity::par_path(&idx_path));
            }
            files.push(idx_path.clone());
            let r = files
                .iter()
                .try_for_each(|f| super::util::copy_file(f, &copy.join(f.file_name().unwrap())))
                .and_then(|()| fsutil::fsync_dir(copy));
            if let Err(e) = r {
                tracing::warn!(pack = %name, copy = %copy.display(), error = %e,
                    "cannot write the pack's second copy; it is kept in the image directory only");
            }
        }
        Ok(Some(Published {
            name,
            objects: self.entries.len() as u64,
            file_bytes: self.offset + idx.len() as u64 + par_bytes,
        }))
    }
}

impl Drop for PackWriter {
    fn drop(&mut self) {
        // After finish() the temporary name no longer exists.
        let _ = fs::remove_file(&self.tmp);
    }
}

/// The stored form of object `h` (contents `data`) into `out` (cleared):
/// zstd-compressed when that is smaller, sealed with `key`. Returns its
/// flags.
fn encode(
    key: Option<&StoreKey>,
    cctx: &mut zstd::bulk::Compressor<'static>,
    h: &Hash,
    data: &[u8],
    out: &mut Vec<u8>,
) -> io::Result<u32> {
    out.resize(zstd::zstd_safe::compress_bound(data.len()), 0);
    let n = cctx.compress_to_buffer(data, &mut out[..])?;
    let mut flags = 0;
    if n < data.len() {
        out.truncate(n);
        flags |= FLAG_ZSTD;
    } else {
        out.clear();
        out.extend_from_slice(data);
    }
    if let Some(key) = key {
        key.seal_object(h, out);
        flags |= FLAG_SEALED;
    }
    Ok(flags)
}

/// Threads for a batch of `n` chunks: one for small batches, else up to
/// the machine's parallelism (at most 4).
fn workers(n: usize) -> usize {
    if n < 64 {
        return 1;
    }
    std::thread::available_parallelism()
        .map(|p| p.get())
        .unwrap_or(1)
        .clamp(1, 4)
}

/// `f` over `items` on `threads` scoped threads (contiguous ranges, one
/// `init()` state per thread), results in order.
fn par_map<T: Sync, S, R: Send>(
    items: &[T],
    threads: usize,
    init: impl Fn() -> io::Result<S> + Sync,
    f: impl Fn(&mut S, &T) -> io::Result<R> + Sync,
) -> io::Result<Vec<R>> {
    let per = items.len().div_ceil(threads.max(1)).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = items
            .chunks(per)
            .map(|part| {
                let (init, f) = (&init, &f);
                s.spawn(move || -> io::Result<Vec<R>> {
                    let mut st = init()?;
                    part.iter().map(|t| f(&mut st, t)).collect()
                })
            })
            .collect();
        let mut out = Vec::with_capacity(items.len());
        for h in handles {
            out.extend(
                h.join()
                    .map_err(|_| io::Error::other("ingest thread panicked"))??,
            );
        }
        Ok(out)
    })
}

/// Splits `data` into `chunk`-sized pieces, stores the new ones in `w`, and
/// returns the root of the file's tree and its depth.
pub struct TreeBuilder {
    leaves: Vec<Hash>,
}

impl TreeBuilder {
    /// An empty tree.
    pub fn new() -> TreeBuilder {
        TreeBuilder { leaves: Vec::new() }
    }

    /// Adds one chunk of the file (in order).
    pub fn push(&mut self, db: &ObjectDb, w: &mut PackWriter, chunk: &[u8]) -> io::Result<()> {
        let h = w.id(chunk);
        if !db.contains_good(&h) && !w.contains(&h) {
            w.add(h, chunk)?;
        }
        self.leaves.push(h);
        Ok(())
    }

    /// Adds a batch of consecutive chunks of the file (`batch` cut every
    /// `chunk` bytes; only its last chunk may be short): ids are computed,
    /// and the new objects compressed and sealed, by several threads; they
    /// are appended to the pack in order, as [`push`](Self::push) would.
    pub fn push_batch(
        &mut self,
        db: &ObjectDb,
        w: &mut PackWriter,
        batch: &[u8],
        chunk: usize,
    ) -> io::Result<()> {
        let chunks: Vec<&[u8]> = batch.chunks(chunk.max(1)).collect();
        let threads = workers(chunks.len());
        if threads == 1 {
            return chunks.iter().try_for_each(|c| self.push(db, w, c));
        }
        let key = w.key.clone();
        let ids = par_map(
            &chunks,
            threads,
            || Ok(()),
            |_, c| {
                Ok(match &key {
                    Some(k) => k.id(c),
                    None => hash(c),
                })
            },
        )?;
        let mut fresh = HashSetH::default();
        let new: Vec<usize> = (0..ids.len())
            .filter(|&i| {
                let h = &ids[i];
                !db.contains_good(h) && !w.contains(h) && fresh.insert(*h)
            })
            .collect();
        let encoded = par_map(
            &new,
            threads,
            || zstd::bulk::Compressor::new(ZSTD_LEVEL),
            |cctx, &i| {
                let mut out = Vec::new();
                let flags = encode(key.as_deref(), cctx, &ids[i], chunks[i], &mut out)?;
                Ok((out, flags))
            },
        )?;
        for (&i, (stored, flags)) in new.iter().zip(encoded) {
            w.add_stored(ids[i], &stored, chunks[i].len() as u32, flags)?;
        }
        self.leaves.extend(ids);
        Ok(())
    }

    /// Builds the nodes above the chunks; returns (root, depth).
    pub fn finish(mut self, db: &ObjectDb, w: &mut PackWriter) -> io::Result<(Hash, u8)> {
        if self.leaves.is_empty() {
            let h = w.id(&[]);
            if !db.contains_good(&h) && !w.contains(&h) {
                w.add(h, &[])?;
            }
            return Ok((h, 0));
        }
        let mut depth = 0u8;
        while self.leaves.len() > 1 {
            let mut next = Vec::with_capacity(self.leaves.len().div_ceil(FANOUT));
            for group in self.leaves.chunks(FANOUT) {
                let node: Vec<u8> = group.iter().flatten().copied().collect();
                let h = w.id(&node);
                if !db.contains_good(&h) && !w.contains(&h) {
                    w.add(h, &node)?;
                    w.node_bytes += node.len() as u64;
                }
                next.push(h);
            }
            self.leaves = next;
            depth += 1;
        }
        Ok((self.leaves[0], depth))
    }
}

impl Default for TreeBuilder {
    fn default() -> Self {
        Self::new()
    }
}

/// Reads a whole regular file in batches of up to 4 MiB, each a whole
/// number of `chunk`-sized pieces (except at the end of the file).
pub fn for_each_batch(
    path: &Path,
    chunk: usize,
    f: &mut dyn FnMut(&[u8]) -> io::Result<()>,
) -> io::Result<u64> {
    let mut file = fsutil::open_regular(path)?;
    let per = (4 << 20) / chunk.max(1);
    let mut buf = vec![0u8; chunk * per.max(1)];
    let mut total = 0u64;
    loop {
        // Fill the buffer as far as possible (short reads are allowed).
        let mut n = 0;
        while n < buf.len() {
            match file.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        if n == 0 {
            break;
        }
        f(&buf[..n])?;
        total += n as u64;
        if n < buf.len() {
            break;
        }
    }
    Ok(total)
}
