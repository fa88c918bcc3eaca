//! Content-addressed objects of the image store: pack files, their indexes
//! and chunk trees (verified reads are in `reader.rs`). See the documentation of
//! [`crate::store`] for the design; this module is its mechanics.
//!
//! # Formats
//!
//! * **Object**: a byte string named by its BLAKE3 hash ([`Hash`], 32 bytes).
//!   Data chunks (a 4 KiB page, a 64 KiB piece of another file) and tree
//!   nodes (a list of child hashes) are both objects.
//! * **Pack** `packs/<name>.pack`: `PACK_MAGIC`, then the stored form of each
//!   object back to back: zstd frames (flag [`FLAG_ZSTD`]) or raw bytes when
//!   compression does not help (flag 0). Immutable once published.
//! * **Index** `packs/<name>.idx`: `IDX_MAGIC`, `u64` count, then per object
//!   `hash[32] offset:u64 stored_len:u32 raw_len:u32 flags:u32` (all little
//!   endian), then the BLAKE3 hash of everything before it. The index is
//!   renamed into place after its pack, so an index names a complete pack; a
//!   pack without index is a crash leftover. `<name>` is derived from the hash
//!   of the index, so names never collide.
//! * **Tree**: a file's chunk hashes, grouped [`FANOUT`] per node; node hashes
//!   are grouped again until one root remains. A file of one chunk has depth
//!   0 and its root is the chunk itself. Unchanged parts of a file yield
//!   unchanged nodes, which deduplicate like data, so a checkpoint's metadata
//!   grows with what changed, not with the job's size.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use std::sync::{Arc, Mutex};

use super::crypto::StoreKey;
use super::heal::{self, Mirror};
use super::parity;
use super::util::copy_file;
use super::{io_err, StoreError};
use crate::fsutil;

pub use super::hash::{hash, hex, parse_hex, Hash, HashMapH, HashSetH};

/// Children per tree node (a node is `FANOUT * 32` bytes = 2 KiB).
pub const FANOUT: usize = 64;
/// Chunk size of `pages-*.img` files: one page.
pub const PAGE_CHUNK: u32 = 4096;
/// Chunk size of every other file.
pub const FILE_CHUNK: u32 = 64 * 1024;
/// zstd level for new objects.
pub const ZSTD_LEVEL: i32 = 1;
/// Stored form is a zstd frame.
pub const FLAG_ZSTD: u32 = 1;
/// Stored form is sealed with the store key (see `crypto.rs`); the id is
/// a keyed hash.
pub const FLAG_SEALED: u32 = 2;

pub(super) const PACK_MAGIC: &[u8; 8] = b"SVPACK01";
pub(super) const IDX_MAGIC: &[u8; 8] = b"SVIDX001";
/// A sealed index: `IDX_MAGIC_SEALED`, then the index body (count and
/// entries, as in a plain index, without the trailing hash) sealed with
/// the store key, the pack's name as associated data.
pub(super) const IDX_MAGIC_SEALED: &[u8; 8] = b"SVIDX003";
pub(super) const IDX_ENTRY: usize = 32 + 8 + 4 + 4 + 4;
pub use super::util::TMP_PREFIX;
/// Largest read of contiguous objects at once.
pub(super) const RUN_MAX: u64 = 8 << 20;
/// Absolute cap on a pack index file (it is read whole into memory). An
/// index costs 52 bytes per object, so 8 GiB is ~165 million objects, at
/// least 630 GiB of distinct 4 KiB pages stored by one checkpoint: beyond
/// any job this runs. The tighter per-pack bound is [`index_limit`].
pub const MAX_INDEX_BYTES: u64 = 8 << 30;

/// The largest index `<name>.idx` whose pack is `pack_len` bytes can
/// have: objects are distinct and at most one is empty, so a pack of `n`
/// bytes after its magic holds at most `n + 1` objects. A bigger index
/// (e.g. a sparse file next to a small pack) is damage and is not read.
pub fn index_limit(pack_len: u64) -> u64 {
    let objects = pack_len.saturating_sub(PACK_MAGIC.len() as u64) + 1;
    objects
        .saturating_mul(IDX_ENTRY as u64)
        .saturating_add(16 + 32)
        .min(MAX_INDEX_BYTES)
}

/// `e` without a leading "`path`: " in its message (fsutil's errors name
/// the path; the store's errors name it themselves).
pub(super) fn without_path(path: &Path, e: io::Error) -> io::Error {
    let msg = e.to_string();
    match msg.strip_prefix(&format!("{}: ", path.display())) {
        Some(rest) => io::Error::new(e.kind(), rest.to_string()),
        None => e,
    }
}

/// "PATH is a symlink (not followed)" or "PATH is not a directory".
pub(super) fn not_a_dir_reason(path: &Path, md: &fs::Metadata) -> String {
    if md.file_type().is_symlink() {
        format!("{} is a symlink (not followed)", path.display())
    } else {
        format!("{} is not a directory", path.display())
    }
}

/// Where an object lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loc {
    /// Index into [`ObjectDb::packs`].
    pub pack: u32,
    /// Byte offset in the pack file.
    pub offset: u64,
    /// Stored (possibly compressed) length.
    pub stored_len: u32,
    /// Length of the object itself.
    pub raw_len: u32,
    /// [`FLAG_ZSTD`] or 0.
    pub flags: u32,
}

/// One published pack.
#[derive(Debug, Clone)]
pub struct Pack {
    /// File stem (`<name>.pack`, `<name>.idx`).
    pub name: String,
    /// Objects listed by its index.
    #[allow(dead_code)]
    pub objects: u64,
    /// Sum of stored lengths.
    pub stored_bytes: u64,
    /// Size of the `.pack` plus the `.idx` file.
    pub file_bytes: u64,
}

/// A problem reading one object, described for the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PieceError {
    msg: String,
    /// The read failed because a resource ran short (descriptors,
    /// memory): it says nothing about the stored data, which must not be
    /// taken for damaged.
    pub resource: bool,
}

impl PieceError {
    /// Evidence about the data (it does not authenticate, is short, is
    /// missing, ...).
    pub fn new(msg: impl Into<String>) -> PieceError {
        PieceError {
            msg: msg.into(),
            resource: false,
        }
    }

    /// A resource ran short: not damage.
    pub fn resource(msg: impl Into<String>) -> PieceError {
        PieceError {
            msg: msg.into(),
            resource: true,
        }
    }

    /// From an I/O error while reading `what`: resource shortage or
    /// evidence, as the error says.
    pub fn io(what: impl std::fmt::Display, e: &io::Error) -> PieceError {
        let msg = format!("{what}: {e}");
        if crate::fdlimit::is_resource_error(e) {
            PieceError::resource(msg)
        } else {
            PieceError::new(msg)
        }
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.msg
    }

    /// The same error with `prefix: ` in front of its message.
    pub fn context(self, prefix: impl std::fmt::Display) -> PieceError {
        PieceError {
            msg: format!("{prefix}: {}", self.msg),
            resource: self.resource,
        }
    }
}

impl std::fmt::Display for PieceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.msg)
    }
}

/// All published packs of a store, with an in-memory index of their objects.
#[derive(Debug, Default)]
pub struct ObjectDb {
    dir: PathBuf,
    /// Published packs, in load order.
    pub packs: Vec<Pack>,
    index: HashMapH<Loc>,
    loaded: HashMap<String, u32>,
    key: Option<Arc<StoreKey>>,
    /// Further locations of objects stored more than once (an object
    /// stored afresh after its first copy was found damaged).
    dups: HashMapH<Vec<Loc>>,
    mirror: Mirror,
    /// Objects found damaged beyond repair (kept across reloads).
    bad: Arc<Mutex<HashSetH>>,
    /// (inode, mtime) of each index when it was read.
    stamps: HashMap<String, (u64, i64, i64)>,
    /// Index files that failed their checksum or format check: (name, why).
    pub bad_indexes: Vec<(String, String)>,
    /// Tests: this many pack opens fail with EMFILE.
    #[cfg(test)]
    pub(super) fail_opens: Arc<std::sync::atomic::AtomicU32>,
}

impl ObjectDb {
    /// An empty database over `dir` (the `packs/` directory); call
    /// [`refresh`](Self::refresh) to load it.
    pub fn new(dir: &Path) -> ObjectDb {
        ObjectDb {
            dir: dir.to_path_buf(),
            ..Default::default()
        }
    }

    /// Sets the store key that opens sealed indexes and objects (and
    /// forgets what was loaded without it).
    pub fn set_key(&mut self, key: Option<Arc<StoreKey>>) {
        let dir = std::mem::take(&mut self.dir);
        let mirror = std::mem::take(&mut self.mirror);
        let bad = std::mem::take(&mut self.bad);
        *self = ObjectDb::new(&dir);
        self.key = key;
        self.mirror = mirror;
        self.bad = bad;
    }

    /// Sets where the second copy of the store is (reads fall back to it).
    pub fn set_mirror(&mut self, mirror: Mirror) {
        self.mirror = mirror;
    }

    /// The second copy, if any.
    pub fn mirror(&self) -> &Mirror {
        &self.mirror
    }

    /// The store key, if one is loaded.
    pub fn key(&self) -> Option<&Arc<StoreKey>> {
        self.key.as_ref()
    }

    /// The `packs/` directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Brings the in-memory index up to date with the `.idx` files on disk:
    /// new ones are loaded; if any loaded pack disappeared (gc), everything
    /// is reloaded. Packs are immutable, so known ones are not re-read.
    ///
    /// `packs/` must be a real directory (a symlink is not followed), and
    /// an index or directory the caller may not read is
    /// [`StoreError::PermissionDenied`]; a damaged index is only recorded
    /// in [`bad_indexes`](Self::bad_indexes).
    pub fn refresh(&mut self) -> Result<(), StoreError> {
        let mut names = Vec::new();
        let dir = self.dir.clone();
        match fs::symlink_metadata(&dir) {
            Ok(md) if md.is_dir() => {}
            Ok(md) => {
                return Err(StoreError::BadFile {
                    reason: not_a_dir_reason(&dir, &md),
                    path: dir,
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&dir)(e)),
        }
        match fs::read_dir(&dir) {
            Ok(rd) => {
                for e in rd {
                    let e = e.map_err(io_err(&dir))?;
                    let n = e.file_name();
                    let Some(n) = n.to_str() else { continue };
                    if n.starts_with('.') {
                        continue;
                    }
                    if let Some(stem) = n.strip_suffix(".idx") {
                        names.push(stem.to_string());
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&dir)(e)),
        }
        if let Some(alt) = self.mirror.alt(&dir) {
            // Packs whose index survives only in the second copy.
            if let Ok(rd) = fs::read_dir(&alt) {
                for e in rd.flatten() {
                    let n = e.file_name();
                    let Some(n) = n.to_str() else { continue };
                    if let Some(stem) = n.strip_suffix(".idx") {
                        if !n.starts_with('.') && !names.iter().any(|x| x == stem) {
                            names.push(stem.to_string());
                        }
                    }
                }
            }
        }
        names.sort();
        let present: HashSet<&String> = names.iter().collect();
        // An index rewritten in place (`verify --repair` dropped damaged
        // objects from it) is re-read: its stamp changed.
        let stamps: HashMap<String, (u64, i64, i64)> = names
            .iter()
            .filter_map(|n| {
                let md = fs::symlink_metadata(dir.join(format!("{n}.idx"))).ok()?;
                Some((n.clone(), (md.ino(), md.mtime(), md.mtime_nsec())))
            })
            .collect();
        if self.loaded.keys().any(|k| !present.contains(k))
            || self
                .stamps
                .iter()
                .any(|(n, s)| stamps.get(n).is_some_and(|now| now != s))
        {
            let key = self.key.take();
            self.set_key(key);
        }
        self.stamps = stamps;
        self.bad_indexes.clear();
        for name in names {
            if self.loaded.contains_key(&name) {
                continue;
            }
            match read_index(&self.dir, &name, self.key.as_deref(), &self.mirror)? {
                Ok(entries) => {
                    let id = self.packs.len() as u32;
                    let stored_bytes = entries.iter().map(|e| e.1.stored_len as u64).sum();
                    let file_bytes = file_len(&self.dir.join(format!("{name}.pack")))
                        + file_len(&self.dir.join(format!("{name}.idx")));
                    self.packs.push(Pack {
                        name: name.clone(),
                        objects: entries.len() as u64,
                        stored_bytes,
                        file_bytes,
                    });
                    for (h, mut loc) in entries {
                        loc.pack = id;
                        match self.index.entry(h) {
                            std::collections::hash_map::Entry::Vacant(v) => {
                                v.insert(loc);
                            }
                            std::collections::hash_map::Entry::Occupied(_) => {
                                self.dups.entry(h).or_default().push(loc)
                            }
                        }
                    }
                    self.loaded.insert(name, id);
                }
                Err(why) => {
                    tracing::warn!(pack = %name, error = %why, "pack index is damaged; its objects are unavailable");
                    self.bad_indexes.push((name, why));
                }
            }
        }
        Ok(())
    }

    /// Where `h` is stored, if anywhere.
    pub fn get(&self, h: &Hash) -> Option<Loc> {
        self.index.get(h).copied()
    }

    /// True if `h` is stored.
    pub fn contains(&self, h: &Hash) -> bool {
        self.index.contains_key(h)
    }

    /// Tests: true if this open is to fail with EMFILE.
    #[cfg(test)]
    pub(super) fn fail_this_open(&self) -> bool {
        use std::sync::atomic::Ordering;
        self.fail_opens
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    /// True if `h` is stored and not known to be damaged: what
    /// deduplication asks (a damaged object is stored afresh, and reads
    /// then find the new copy among its [`dups`](Self::dups)).
    pub fn contains_good(&self, h: &Hash) -> bool {
        self.index.contains_key(h)
            && !self
                .bad
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(h)
    }

    /// Records that `h` could not be read or repaired.
    pub fn mark_bad(&self, h: &Hash) {
        self.bad
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(*h);
    }

    /// Objects found damaged beyond repair so far.
    pub fn bad_objects(&self) -> Vec<Hash> {
        self.bad
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .copied()
            .collect()
    }

    /// Other locations of `h`, if it is stored more than once.
    pub fn dups(&self, h: &Hash) -> &[Loc] {
        self.dups.get(h).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Forgets `h` (found damaged beyond repair): the next checkpoint that
    /// holds it stores it afresh, and reads use its other copies.
    pub fn forget(&mut self, h: &Hash) {
        self.index.remove(h);
        if let Some(mut more) = self.dups.remove(h) {
            let first = more.remove(0);
            self.index.insert(*h, first);
            if !more.is_empty() {
                self.dups.insert(*h, more);
            }
        }
    }

    /// Rewrites the index of pack `name` without the objects in `bad`
    /// (sealed again if it was sealed; sidecar and second copy updated).
    /// Returns how many entries were dropped.
    pub fn rewrite_index_without(&mut self, name: &str, bad: &HashSetH) -> io::Result<u64> {
        let invalid = |e: String| io::Error::new(io::ErrorKind::InvalidData, e);
        let entries = match read_index(&self.dir, name, self.key.as_deref(), &self.mirror) {
            Ok(Ok(e)) => e,
            Ok(Err(why)) => return Err(invalid(why)),
            Err(e) => return Err(invalid(e.to_string())),
        };
        let kept: Vec<&(Hash, Loc)> = entries.iter().filter(|(h, _)| !bad.contains(h)).collect();
        let dropped = (entries.len() - kept.len()) as u64;
        if dropped == 0 {
            return Ok(0);
        }
        let path = self.dir.join(format!("{name}.idx"));
        let sealed = fs::read(&path)
            .map(|b| b.starts_with(IDX_MAGIC_SEALED))
            .unwrap_or(self.key.is_some());
        let mut body = Vec::with_capacity(8 + kept.len() * IDX_ENTRY);
        body.extend_from_slice(&(kept.len() as u64).to_le_bytes());
        for (h, l) in kept {
            body.extend_from_slice(h);
            body.extend_from_slice(&l.offset.to_le_bytes());
            body.extend_from_slice(&l.stored_len.to_le_bytes());
            body.extend_from_slice(&l.raw_len.to_le_bytes());
            body.extend_from_slice(&l.flags.to_le_bytes());
        }
        let idx = match (&self.key, sealed) {
            (Some(key), true) => key.seal_blob(IDX_MAGIC_SEALED, name, &body)?,
            _ => {
                let mut idx = IDX_MAGIC.to_vec();
                idx.extend_from_slice(&body);
                let sum = hash(&idx);
                idx.extend_from_slice(&sum);
                idx
            }
        };
        fsutil::write_atomic(&path, &idx, 0o600)?;
        if parity::par_path(&path).exists() {
            parity::write_for_bytes(&path, &idx)?;
        }
        if let Some(alt) = self.mirror.alt(&path) {
            if alt.exists() {
                copy_file(&path, &alt)?;
                if parity::par_path(&path).exists() {
                    copy_file(&parity::par_path(&path), &parity::par_path(&alt))?;
                }
            }
        }
        Ok(dropped)
    }

    /// Every stored object with its location.
    pub fn iter(&self) -> impl Iterator<Item = (&Hash, &Loc)> {
        self.index.iter()
    }

    /// The path of a pack's data file.
    pub fn pack_path(&self, pack: u32) -> PathBuf {
        self.dir
            .join(format!("{}.pack", self.packs[pack as usize].name))
    }

    /// Total bytes of all pack and index files.
    pub fn file_bytes(&self) -> u64 {
        self.packs.iter().map(|p| p.file_bytes).sum()
    }
}

/// Size of a regular file (not followed through a symlink), else 0.
fn file_len(p: &Path) -> u64 {
    fs::symlink_metadata(p)
        .ok()
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .unwrap_or(0)
}

/// Reads and checks `<name>.idx`, returning its entries (pack field 0),
/// or why it is damaged. The index and its pack must be regular files
/// (symlinks are not followed, FIFOs and devices not opened) and the index
/// no larger than [`index_limit`] of its pack. Only "permission denied" is
/// an error of the whole read.
#[allow(clippy::type_complexity)]
fn read_index(
    dir: &Path,
    name: &str,
    key: Option<&StoreKey>,
    mirror: &Mirror,
) -> Result<Result<Vec<(Hash, Loc)>, String>, StoreError> {
    let path = dir.join(format!("{name}.idx"));
    let pack = dir.join(format!("{name}.pack"));
    let mut pack_len = match fs::symlink_metadata(&pack) {
        Ok(md) if md.is_file() => md.len(),
        Ok(_) => {
            let e = io::Error::new(io::ErrorKind::InvalidData, "not a regular file");
            return Ok(Err(fsutil::describe_error(&pack, &e)));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
        Err(e) => return Err(io_err(&pack)(e)),
    };
    // A pack that lost its tail (or is lost) is still readable through
    // its parity or second copy: bound the index by the pack's real size.
    pack_len = pack_len.max(heal::recorded_len(&pack).unwrap_or(0));
    if let Some(alt) = mirror.alt(&pack) {
        if let Ok(md) = fs::symlink_metadata(&alt) {
            if md.is_file() {
                pack_len = pack_len.max(md.len());
            }
        }
    }
    let direct = read_index_direct(&path, name, key, pack_len)?;
    let Err(why) = direct else {
        return Ok(direct);
    };
    let max = index_limit(pack_len);
    match heal::read_all(mirror, &path, max, &mut |b| {
        parse_index(name, b, pack_len, key)
    }) {
        Ok(entries) => Ok(Ok(entries)),
        Err(more) if more.resource => Err(StoreError::Resource(format!("{why}; {more}"))),
        Err(more) if more.why.is_empty() => Ok(Err(why)),
        Err(more) => Ok(Err(format!("{why}; cannot repair it: {more}"))),
    }
}

fn read_index_direct(
    path: &Path,
    name: &str,
    key: Option<&StoreKey>,
    pack_len: u64,
) -> Result<Result<Vec<(Hash, Loc)>, String>, StoreError> {
    let max = index_limit(pack_len);
    let bytes = match read_capped(path, max) {
        Ok(Some(b)) => b,
        Err(e) if fsutil::is_permission_denied(&e) || crate::fdlimit::is_resource_error(&e) => {
            return Err(io_err(path)(e))
        }
        Ok(None) => {
            return Ok(Err(format!(
                "{} is larger than {max} bytes, more than its pack {name}.pack ({pack_len} bytes) \
                 can hold: the index is damaged or the pack truncated or missing",
                path.display()
            )))
        }
        Err(e) => return Ok(Err(fsutil::describe_error(path, &e))),
    };
    Ok(parse_index(name, &bytes, pack_len, key))
}

/// Reads the regular file `path` if it is at most `max` bytes (else
/// `None`, having read no more than `max + 1` bytes).
fn read_capped(path: &Path, max: u64) -> io::Result<Option<Vec<u8>>> {
    let f = fsutil::open_regular(path)?;
    let len = f.metadata()?.len();
    if len > max {
        return Ok(None);
    }
    let mut buf = Vec::with_capacity(len as usize);
    f.take(max + 1).read_to_end(&mut buf)?;
    Ok((buf.len() as u64 <= max).then_some(buf))
}

/// Checks an index's format and checksum and that its objects lie within
/// the pack.
fn parse_index(
    name: &str,
    bytes: &[u8],
    pack_len: u64,
    key: Option<&StoreKey>,
) -> Result<Vec<(Hash, Loc)>, String> {
    let opened;
    let entries: &[u8] = if bytes.len() >= 8 && &bytes[..8] == IDX_MAGIC_SEALED {
        let Some(key) = key else {
            return Err("the index is sealed and no store key is loaded".into());
        };
        opened = key.open_blob(IDX_MAGIC_SEALED, name, bytes).map_err(|_| {
            "the index does not authenticate under the store key (damaged, or sealed \
                 with another key)"
                .to_string()
        })?;
        if opened.len() < 8 {
            return Err("sealed index is too short".into());
        }
        &opened
    } else {
        if bytes.len() < 16 + 32 || &bytes[..8] != IDX_MAGIC {
            return Err("not an index file (bad magic or too short)".into());
        }
        let (body, sum) = bytes.split_at(bytes.len() - 32);
        if hash(body) != sum {
            return Err("index checksum mismatch".into());
        }
        &body[8..]
    };
    let count = u64::from_le_bytes(entries[..8].try_into().unwrap());
    if (entries.len() as u64 - 8) / IDX_ENTRY as u64 != count
        || (entries.len() - 8) % IDX_ENTRY != 0
    {
        return Err(format!("index length does not match its {count} entries"));
    }
    let count = count as usize;
    let mut out = Vec::with_capacity(count);
    for e in entries[8..].chunks_exact(IDX_ENTRY) {
        let h: Hash = e[..32].try_into().unwrap();
        let loc = Loc {
            pack: 0,
            offset: u64::from_le_bytes(e[32..40].try_into().unwrap()),
            stored_len: u32::from_le_bytes(e[40..44].try_into().unwrap()),
            raw_len: u32::from_le_bytes(e[44..48].try_into().unwrap()),
            flags: u32::from_le_bytes(e[48..52].try_into().unwrap()),
        };
        if loc.offset + loc.stored_len as u64 > pack_len {
            return Err(format!(
                "object {} lies beyond the end of {name}.pack ({pack_len} bytes): the pack is truncated or missing",
                &hex(&h)[..16]
            ));
        }
        out.push((h, loc));
    }
    Ok(out)
}

#[cfg(test)]
#[path = "objects_tests.rs"]
mod tests;
