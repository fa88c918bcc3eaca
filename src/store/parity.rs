//! Reed-Solomon parity sidecars: `F.par` next to a store file `F` (a pack,
//! an index, a manifest), from which any single damaged region of `F` can
//! be rebuilt.
//!
//! # Layout
//!
//! For a file of `L` bytes:
//!
//! * `k` data shards, `k = clamp(floor(L / 4096), 1, 32)`; shard size
//!   `s = ceil(L / k)` rounded up to a multiple of 64 (at least 64). Data
//!   shard `i` is bytes `[i*s, (i+1)*s)` of `F`, zero-padded past `L`.
//!   Whenever `k > 1`, `s >= 4096` (`k <= L / 4096`), so a 4 KiB region
//!   touches at most two shards.
//! * `m` parity shards of `s` bytes each: `m = 1` when `k = 1` (any damage
//!   to `F` is then damage to its one data shard, which one parity shard,
//!   a copy, repairs), `m = 2` when `k >= 2`.
//! * Every shard is cut into rows of `w = min(s, 65536)` bytes (the last row
//!   of a shard may be shorter; all lengths are multiples of 64); row `r` of
//!   the `k` data shards is encoded on its own with `reed_solomon_simd`
//!   (`k` originals, `m` recovery shards). Memory is `(k+m)*w` (at most
//!   2.1 MiB) whatever the file size, and a read rebuilds only the rows it
//!   needs.
//! * A check hash for every row of every shard (data and parity): the first
//!   16 bytes of BLAKE3 of the row. Reed-Solomon here is an erasure code;
//!   the hashes say which shards of a row are damaged.
//!
//! The `.par` file, all integers little endian:
//!
//! ```text
//! 0                 copy A: header  "SVPAR001" L:u64 k:u16 m:u16 s:u64 w:u64   (36 bytes)
//!                           table   rows*(k+m) hashes of 16 bytes, row-major
//!                                   (row 0: shard 0..k data, then k..k+m parity; row 1: ...)
//!                           BLAKE3(header || table)                          (32 bytes)
//! c                 parity shard 0 (s bytes), ..., parity shard m-1 (s bytes)
//! c + m*s           copy B: the same header, table and checksum again
//! 2c + m*s          end of file
//! ```
//!
//! where `c = 36 + 16*rows*(k+m) + 32`. The two copies sit at the two ends
//! of the `.par`, with no padding. The header must describe exactly the
//! layout computed from its `L` (`k`, `m`, `s`, `w` all as `L` implies), so
//! nothing is allocated from an unchecked length: the table size follows
//! from `L` and must also fit in the `.par` as it is on disk. If copy A does
//! not check, copy B is found by scanning backwards from the end of the
//! `.par` for its magic at the offset its own header implies. A `.par` of
//! the wrong size is reported as damaged (and rewritten by [`repair`]).
//!
//! `F` is "the first `L` bytes" of whatever is on disk: a shorter `F` (lost
//! tail) reads as zeros past its end, which the hashes then flag; bytes past
//! `L` are ignored on reads and dropped by [`repair`]. A missing `F` reads as
//! empty (so only files with `k <= m`, below 12 KiB, can come back from
//! their `.par` alone).
//!
//! # Guarantees
//!
//! The damage model is **one** damaged region in **one** file. A row is
//! rebuilt when at most `m` of its `k + m` shard rows are damaged (the
//! hashes find them). With one damaged region in `F` (and `F.par` intact),
//! reads return the original bytes and [`repair`] restores `F` byte for
//! byte, for:
//!
//! * any damage inside one region of at most `s + 1` bytes of `F` (it
//!   touches at most two shards; with `k = 1` everything is one shard and
//!   `m = 1` suffices), in particular any number of flipped bytes or a
//!   zeroed block of up to 4096 bytes at any offset, for every `L`
//!   (`s >= 4096` once `k > 1`); `s + 1 > L/32`. When `k <= 2`
//!   (`L < 12 KiB`) any damage to `F` at all, even its loss, is repaired;
//! * a lost tail of `t` bytes (truncation, or zeros or garbage in place of
//!   the last `t` bytes) with `t <= L - (k-m)*s`, which is all of `F` when
//!   `k <= m` (`L < 12 KiB`). From the layout this is at least:
//!   all of `F` below 12 KiB; 6 KiB for 12 KiB <= `L` < 750 KiB;
//!   6 % of `L` from 750 KiB on (`L/16 - 1920` once `k = 32`). Checked by
//!   the unit tests `tail_tolerance_bound` (the formula against these
//!   numbers) and `lost_tail_up_to_the_layout_limit` (exactly
//!   `L - (k-m)*s` repairs, one byte more does not);
//! * bytes appended to `F` (ignored by reads, cut by [`repair`]).
//!
//! With the one damaged region in `F.par` instead, `F` itself is intact, so
//! the guarantee for `F` never needs the `.par` to survive its own damage:
//!
//! * when one table copy still checks (any damage that spares a whole copy:
//!   a region smaller than the `.par`'s parity shards, a lost tail that
//!   leaves copy A whole, flipped bytes anywhere), reads of `F` succeed
//!   (its rows verify against the table; damaged parity rows fail their
//!   hashes and are not used) and [`repair`] rewrites the `.par`;
//! * when both copies are gone (possible for small files, whose `.par` is a
//!   few KiB: one 4 KiB region can cover it), `F` cannot be verified by its
//!   `.par`: reads, [`check`] and [`repair`] fail with
//!   [`ParityError::TablesDamaged`] rather than guess. The store, having
//!   verified `F` by its own means (its AEAD), then calls [`rewrite_par`].
//!
//! Damage beyond that is detected and reported as an error
//! ([`ParityError::Unrecoverable`], [`ParityError::TablesDamaged`]), never
//! returned as data; [`repair`] then changes nothing. `F` itself is assumed
//! to be correct when its `.par` is written.
//!
//! # Measured
//!
//! `.par` size / `L` (unit test `overhead_numbers`, `--nocapture`):
//!
//! | `L`     | k  | m | s         | `.par` bytes | ratio  |
//! |---------|----|---|-----------|--------------|--------|
//! | 1.5 KiB | 1  | 1 | 1536      | 1,736        | 1.130  |
//! | 4 KiB   | 1  | 1 | 4096      | 4,296        | 1.049  |
//! | 16 KiB  | 4  | 2 | 4096      | 8,520        | 0.520  |
//! | 256 KiB | 32 | 2 | 8192      | 17,608       | 0.0672 |
//! | 1 MiB   | 32 | 2 | 32,768    | 66,760       | 0.0637 |
//! | 64 MiB  | 32 | 2 | 2 MiB     | 4,229,256    | 0.0630 |
//!
//! Files below 8 KiB pay one whole parity shard (a copy); larger ones two,
//! approaching `m/k = 6.25 %`, plus two tables (`2*16*rows*(k+m)` bytes).
//! A later checkpoint (a pack of 250 KiB, an index of 5-20 KiB, a manifest
//! of 1-2 KiB) thus writes about 9-10 % more for parity.
//!
//! Throughput (ignored unit test `encode_throughput`, `cargo test --release
//! --lib -- --ignored parity --nocapture`, 256 MiB file in the page cache,
//! 2-vCPU VM, ext4): [`write_for_file`] 0.7-1.1 GB/s (read, hash, encode,
//! write, fsync of the 32 MiB `.par`; one run at 0.29 GB/s while the disk
//! was still writing back the test file); a full [`check`] 1.0-2.2 GB/s.
//! Measured with the earlier layout (`k <= 16`: a 32 MiB `.par`, now
//! about 16 MiB); not yet re-measured with `k <= 32`.

// The store calls this module once the sidecars are integrated.
#![allow(dead_code)]

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use reed_solomon_simd::{ReedSolomonDecoder, ReedSolomonEncoder};

use crate::fsutil;

/// Suffix of a parity sidecar: `F` gets `F.par`.
pub(crate) const PAR_SUFFIX: &str = ".par";

const MAGIC: &[u8; 8] = b"SVPAR001";
const HEADER_LEN: u64 = 36;
const SUM_LEN: u64 = 32;
const HASH_LEN: usize = 16;
/// Parity shards per row when `k >= 2` (`k = 1` has one: a copy).
const M: usize = 2;
const MAX_K: u64 = 32;
const MIN_SHARD: u64 = 4096;
const MAX_WINDOW: u64 = 65536;
/// Largest `L` a header may claim (keeps all offset arithmetic far from
/// overflow): 2^48 bytes.
const MAX_LEN: u64 = 1 << 48;
/// Prefix of temporary files (the store removes `packs/.tmp-*` leftovers).
const TMP_PREFIX: &str = "tmp"; // create_temp_file_at names it ".tmp-<random>"

/// `F` + `.par`.
pub(crate) fn par_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(PAR_SUFFIX);
    PathBuf::from(s)
}

/// Why a parity read, check or repair failed. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ParityError {
    /// There is no `F.par`.
    #[error("{}: missing", par.display())]
    Missing {
        /// The `.par` path.
        par: PathBuf,
    },
    /// Neither copy of the `.par`'s header and table checks (or it is not a
    /// parity file at all).
    #[error("{}: both copies of its table are damaged", par.display())]
    TablesDamaged {
        /// The `.par` path.
        par: PathBuf,
    },
    /// `F` or `F.par` cannot be opened or read (a symlink, not a regular
    /// file, an I/O error); the message comes from
    /// [`fsutil::describe_error`] and names the path.
    #[error("{msg}")]
    Io {
        /// The path that failed.
        path: PathBuf,
        /// One line naming it.
        msg: String,
        /// A resource ran short (descriptors, memory): not damage.
        resource: bool,
    },
    /// The requested range is not inside the file.
    #[error("{}: range {offset}+{len} is outside the file's {file_len} bytes", path.display())]
    OutOfRange {
        /// `F`.
        path: PathBuf,
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
        /// `L` from the `.par`.
        file_len: u64,
    },
    /// The `.par` describes a file larger than the caller accepts.
    #[error("{}: parity describes {file_len} bytes, more than the limit of {max}", path.display())]
    TooLarge {
        /// `F`.
        path: PathBuf,
        /// `L` from the `.par`.
        file_len: u64,
        /// The caller's limit.
        max: u64,
    },
    /// A row has more damaged shards than parity can rebuild.
    #[error(
        "{}: {damaged} of {total} shards damaged in row {row}, parity repairs {m}: unrecoverable",
        path.display()
    )]
    Unrecoverable {
        /// `F`.
        path: PathBuf,
        /// Damaged shards in the row.
        damaged: usize,
        /// `k + m`.
        total: usize,
        /// The row.
        row: u64,
        /// Parity shards.
        m: usize,
    },
    /// The Reed-Solomon codec refused or produced a row that does not match
    /// its hash (should not happen).
    #[error("{}: rebuilding row {row} failed: {msg}", path.display())]
    Codec {
        /// `F`.
        path: PathBuf,
        /// The row.
        row: u64,
        /// What went wrong.
        msg: String,
    },
}

fn io_error(path: &Path, e: &io::Error) -> ParityError {
    ParityError::Io {
        path: path.to_path_buf(),
        msg: fsutil::describe_error(path, e),
        resource: crate::fdlimit::is_resource_error(e),
    }
}

impl ParityError {
    /// True when a resource ran short: says nothing about the file.
    pub(crate) fn is_resource(&self) -> bool {
        matches!(self, ParityError::Io { resource: true, .. })
    }
}

/// One rebuilt row of one data shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RebuiltRow {
    /// Data shard index.
    pub shard: usize,
    /// Row index.
    pub row: u64,
    /// Where the row's bytes are in `F`.
    pub offset: u64,
    /// How many of them are inside `F` (padding excluded).
    pub len: u64,
}

/// What a read rebuilt from parity; empty when the data was intact.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Repaired {
    /// Rebuilt data rows, in row order.
    pub rows: Vec<RebuiltRow>,
}

impl Repaired {
    /// True when nothing had to be rebuilt.
    pub(crate) fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The distinct data shards that were rebuilt (in part).
    pub(crate) fn shards(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self.rows.iter().map(|r| r.shard).collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

fn size_text(n: u64) -> String {
    if n >= 1024 && n % 1024 == 0 {
        format!("{} KiB", n / 1024)
    } else if n == 1 {
        "1 byte".into()
    } else {
        format!("{n} bytes")
    }
}

impl fmt::Display for Repaired {
    /// "intact", or "rebuilt 1 row of shard 3 (64 KiB at offset 196608)
    /// from parity".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.rows.is_empty() {
            return write!(f, "intact");
        }
        let n = self.rows.len();
        let shards = self.shards();
        let list = shards
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        write!(
            f,
            "rebuilt {n} row{} of shard{} {list} (",
            if n == 1 { "" } else { "s" },
            if shards.len() == 1 { "" } else { "s" },
        )?;
        for (i, r) in self.rows.iter().take(4).enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{} at offset {}", size_text(r.len), r.offset)?;
        }
        if n > 4 {
            write!(f, ", ...")?;
        }
        write!(f, ") from parity")
    }
}

/// What [`check`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CheckReport {
    /// `L` from the `.par`.
    pub file_len: u64,
    /// `F`'s length on disk (`None`: missing). Anything but `L` is damage.
    pub actual_len: Option<u64>,
    /// Damaged rows of data shards: (shard, row).
    pub data_damaged: Vec<(usize, u64)>,
    /// Damaged rows of parity shards: (parity index 0..m, row).
    pub parity_damaged: Vec<(usize, u64)>,
    /// How many of the two table copies do not check (0 or 1; 2 is an error).
    pub bad_table_copies: u8,
    /// The `.par` is not the size its layout implies.
    pub par_size_wrong: bool,
    /// Every row has at most `m` damaged shards.
    pub recoverable: bool,
}

impl CheckReport {
    /// `F` differs from what its `.par` describes.
    pub(crate) fn file_damaged(&self) -> bool {
        !self.data_damaged.is_empty() || self.actual_len != Some(self.file_len)
    }

    /// The `.par` itself is damaged (a table copy, parity rows, its size).
    pub(crate) fn par_damaged(&self) -> bool {
        self.bad_table_copies > 0 || !self.parity_damaged.is_empty() || self.par_size_wrong
    }

    /// Nothing is damaged.
    pub(crate) fn is_clean(&self) -> bool {
        !self.file_damaged() && !self.par_damaged()
    }
}

/// What [`repair`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RepairReport {
    /// `F` was rewritten from repaired contents.
    pub file_rewritten: bool,
    /// `F.par` was rewritten.
    pub par_rewritten: bool,
    /// The data rows rebuilt for `F`.
    pub repaired: Repaired,
}

// ---------------------------------------------------------------------
// Layout

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Layout {
    len: u64,
    k: usize,
    /// Parity shards: 1 when `k = 1`, else [`M`].
    m: usize,
    s: u64,
    w: u64,
    rows: u64,
}

impl Layout {
    fn for_len(len: u64) -> Layout {
        let k = (len / MIN_SHARD).clamp(1, MAX_K);
        let s = len.div_ceil(k).max(1).next_multiple_of(64);
        let w = s.min(MAX_WINDOW);
        Layout {
            len,
            k: k as usize,
            m: if k == 1 { 1 } else { M },
            s,
            w,
            rows: s.div_ceil(w),
        }
    }

    fn shards(&self) -> usize {
        self.k + self.m
    }

    fn row_len(&self, r: u64) -> usize {
        (self.s - r * self.w).min(self.w) as usize
    }

    fn table_len(&self) -> u64 {
        self.rows * self.shards() as u64 * HASH_LEN as u64
    }

    fn copy_len(&self) -> u64 {
        HEADER_LEN + self.table_len() + SUM_LEN
    }

    /// Copy B follows the parity shards, at the end of the `.par`.
    fn copy_b_off(&self) -> u64 {
        self.parity_off(self.m)
    }

    fn parity_off(&self, p: usize) -> u64 {
        self.copy_len() + p as u64 * self.s
    }

    fn par_len(&self) -> u64 {
        self.copy_b_off() + self.copy_len()
    }

    /// Largest tail of `F` that may be lost (see the module docs).
    #[cfg(test)]
    fn tail_tolerance(&self) -> u64 {
        if self.k <= self.m {
            self.len
        } else {
            self.len - (self.k - self.m) as u64 * self.s
        }
    }

    fn header(&self) -> [u8; HEADER_LEN as usize] {
        let mut h = [0u8; HEADER_LEN as usize];
        h[0..8].copy_from_slice(MAGIC);
        h[8..16].copy_from_slice(&self.len.to_le_bytes());
        h[16..18].copy_from_slice(&(self.k as u16).to_le_bytes());
        h[18..20].copy_from_slice(&(self.m as u16).to_le_bytes());
        h[20..28].copy_from_slice(&self.s.to_le_bytes());
        h[28..36].copy_from_slice(&self.w.to_le_bytes());
        h
    }

    /// The layout a header describes, if it is one of ours and consistent.
    fn parse_header(h: &[u8]) -> Option<Layout> {
        if h.len() < HEADER_LEN as usize || &h[0..8] != MAGIC {
            return None;
        }
        let u64_at = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().unwrap());
        let len = u64_at(8);
        if len > MAX_LEN {
            return None;
        }
        let l = Layout::for_len(len);
        let k = u16::from_le_bytes([h[16], h[17]]) as usize;
        let m = u16::from_le_bytes([h[18], h[19]]) as usize;
        (k == l.k && m == l.m && u64_at(20) == l.s && u64_at(28) == l.w).then_some(l)
    }
}

fn row_hash(data: &[u8]) -> [u8; HASH_LEN] {
    let h = blake3::hash(data);
    h.as_bytes()[..HASH_LEN].try_into().unwrap()
}

/// Reads as much of `buf` as the file has at `off`; returns the count
/// (short only at end of file).
fn read_at_most(f: &File, off: u64, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

// ---------------------------------------------------------------------
// Writing

/// Where the data of `F` comes from while writing its `.par`.
enum Source<'a> {
    File(&'a File, &'a Path),
    Bytes(&'a [u8]),
}

impl Source<'_> {
    /// Fills `buf` with `F[off..]`, exactly (the caller stays within `L`).
    fn read_exact_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        match self {
            Source::Bytes(b) => {
                buf.copy_from_slice(&b[off as usize..off as usize + buf.len()]);
                Ok(())
            }
            Source::File(f, path) => {
                if read_at_most(f, off, buf)? < buf.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "{}: file shrank while its parity was written",
                            path.display()
                        ),
                    ));
                }
                Ok(())
            }
        }
    }
}

/// Writes `F.par` for the file at `path`, reading it a row at a time
/// (memory `(k+m)*w`, about 2.1 MiB at most), atomically (`.tmp-<random>`
/// in the same directory, mode 0600, fsync, rename, fsync the directory).
/// `F` must be known good (just written). Returns the `.par`'s size.
pub(crate) fn write_for_file(path: &Path) -> io::Result<u64> {
    let f = fsutil::open_regular(path)
        .map_err(|e| io::Error::new(e.kind(), fsutil::describe_error(path, &e)))?;
    let len = f.metadata()?.len();
    write_par(path, len, &Source::File(&f, path))
}

/// Regenerates `F.par` from `F` as it is on disk (= [`write_for_file`]).
/// For the store to call after it has verified `F` by its own means (its
/// AEAD), when [`repair`] cannot: a `.par` whose two table copies are both
/// damaged ([`ParityError::TablesDamaged`]) cannot tell a good `F` from a
/// bad one. Returns the `.par`'s size.
pub(crate) fn rewrite_par(path: &Path) -> io::Result<u64> {
    write_for_file(path)
}

/// Writes `F.par` for `data`, the contents of the file at `path` (which is
/// not read), as [`write_for_file`] does. Returns the `.par`'s size.
pub(crate) fn write_for_bytes(path: &Path, data: &[u8]) -> io::Result<u64> {
    write_par(path, data.len() as u64, &Source::Bytes(data))
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

fn open_dir(dir: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dir)
        .map_err(|e| fsutil::WithPath::with_path(e, dir))
}

/// Creates `<dir of target>/.tmp-<random>`, lets `fill` write it, fsyncs,
/// renames it over `target`, fsyncs the directory. The temporary file is
/// removed on failure.
fn replace_atomically(target: &Path, fill: impl FnOnce(&File) -> io::Result<()>) -> io::Result<()> {
    let dir = parent_dir(target);
    let name = target
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let dirf = open_dir(dir)?;
    let (tmp, tmp_name) = fsutil::create_temp_file_at(dirf.as_fd(), TMP_PREFIX, 0o600)
        .map_err(|e| fsutil::WithPath::with_path(e, dir))?;
    let res = (|| {
        fill(&tmp)?;
        tmp.sync_all()?;
        drop(tmp);
        nix::fcntl::renameat(
            Some(std::os::fd::AsRawFd::as_raw_fd(&dirf)),
            tmp_name.as_str(),
            Some(std::os::fd::AsRawFd::as_raw_fd(&dirf)),
            name,
        )?;
        dirf.sync_all()
    })();
    if res.is_err() {
        let _ = nix::unistd::unlinkat(
            Some(std::os::fd::AsRawFd::as_raw_fd(&dirf)),
            tmp_name.as_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        );
    }
    res.map_err(|e| fsutil::WithPath::with_path(e, target))
}

fn codec_io(e: reed_solomon_simd::Error) -> io::Error {
    io::Error::other(format!("reed-solomon: {e}"))
}

fn write_par(path: &Path, len: u64, src: &Source<'_>) -> io::Result<u64> {
    if len > MAX_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: too large for a parity sidecar", path.display()),
        ));
    }
    let l = Layout::for_len(len);
    let par = par_path(path);
    replace_atomically(&par, |out| {
        let mut table = Vec::with_capacity(l.table_len() as usize);
        let mut bufs = vec![vec![0u8; l.w as usize]; l.k];
        let mut enc = ReedSolomonEncoder::new(l.k, l.m, l.w as usize).map_err(codec_io)?;
        for r in 0..l.rows {
            let n = l.row_len(r);
            if n != l.w as usize {
                enc.reset(l.k, l.m, n).map_err(codec_io)?;
            }
            for (i, buf) in bufs.iter_mut().enumerate() {
                let buf = &mut buf[..n];
                fill_data_row(&l, i, r, buf, |off, b| {
                    src.read_exact_at(off, b).map(|()| b.len())
                })?;
                table.extend_from_slice(&row_hash(buf));
                enc.add_original_shard(&*buf).map_err(codec_io)?;
            }
            let res = enc.encode().map_err(codec_io)?;
            for p in 0..l.m {
                let rec = res.recovery(p).expect("recovery shard");
                table.extend_from_slice(&row_hash(rec));
                out.write_all_at(rec, l.parity_off(p) + r * l.w)?;
            }
        }
        let mut copy = Vec::with_capacity(l.copy_len() as usize);
        copy.extend_from_slice(&l.header());
        copy.extend_from_slice(&table);
        let sum = blake3::hash(&copy);
        copy.extend_from_slice(sum.as_bytes());
        out.write_all_at(&copy, 0)?;
        out.write_all_at(&copy, l.copy_b_off())?;
        debug_assert_eq!(l.copy_b_off() + copy.len() as u64, l.par_len());
        out.set_len(l.par_len())
    })?;
    Ok(l.par_len())
}

/// Fills `buf` with row `r` of data shard `i`: the file's bytes where the
/// row lies inside `[0, L)` (via `read(offset, buf) -> bytes read`, which
/// may come up short: the rest reads as zeros), zeros past `L`.
fn fill_data_row(
    l: &Layout,
    i: usize,
    r: u64,
    buf: &mut [u8],
    mut read: impl FnMut(u64, &mut [u8]) -> io::Result<usize>,
) -> io::Result<()> {
    let off = i as u64 * l.s + r * l.w;
    let inside = l.len.saturating_sub(off).min(buf.len() as u64) as usize;
    let got = if inside > 0 {
        read(off, &mut buf[..inside])?
    } else {
        0
    };
    buf[got..].fill(0);
    Ok(())
}

// ---------------------------------------------------------------------
// Reading

/// An open `F` and `F.par` with a verified table.
struct Opened {
    path: PathBuf,
    file: Option<File>,
    actual_len: Option<u64>,
    par: File,
    par_size: u64,
    l: Layout,
    table: Vec<u8>,
    bad_table_copies: u8,
}

/// Reads and verifies one table copy at `off`.
fn try_copy(par: &File, par_size: u64, off: u64) -> io::Result<Option<(Layout, Vec<u8>)>> {
    if off.checked_add(HEADER_LEN).map_or(true, |e| e > par_size) {
        return Ok(None);
    }
    let mut h = [0u8; HEADER_LEN as usize];
    if read_at_most(par, off, &mut h)? < h.len() {
        return Ok(None);
    }
    let Some(l) = Layout::parse_header(&h) else {
        return Ok(None);
    };
    // The table size follows from L, and must fit in the file as it is:
    // nothing is allocated beyond what is on disk.
    if off + l.copy_len() > par_size {
        return Ok(None);
    }
    let tl = l.table_len() as usize;
    let mut rest = vec![0u8; tl + SUM_LEN as usize];
    if read_at_most(par, off + HEADER_LEN, &mut rest)? < rest.len() {
        return Ok(None);
    }
    let mut hasher = blake3::Hasher::new();
    hasher.update(&h);
    hasher.update(&rest[..tl]);
    if hasher.finalize().as_bytes() != &rest[tl..] {
        return Ok(None);
    }
    rest.truncate(tl);
    Ok(Some((l, rest)))
}

/// Looks for copy B when copy A is unusable: a magic at offset `o` whose
/// header puts copy B at `o` and whose checksum holds. Copy B ends the
/// `.par`, so the scan runs backwards from the end (an intact copy B is
/// found within its own length).
fn find_copy_b(par: &File, par_size: u64) -> io::Result<Option<(Layout, Vec<u8>)>> {
    const CHUNK: u64 = 1 << 20;
    let overlap = MAGIC.len() as u64 - 1;
    let mut buf = vec![0u8; (CHUNK + overlap) as usize];
    // Copy B never starts before the end of the smallest copy A.
    let lowest = HEADER_LEN + SUM_LEN;
    let mut end = par_size;
    while end > lowest {
        let start = end.saturating_sub(CHUNK).max(lowest);
        // Magics starting in [start, end); read past `end` to see them whole.
        let want = ((end - start) + overlap).min(par_size - start) as usize;
        let n = read_at_most(par, start, &mut buf[..want])?;
        if n >= MAGIC.len() {
            for i in (0..=n - MAGIC.len()).rev() {
                let o = start + i as u64;
                if o >= end || buf[i..i + MAGIC.len()] != MAGIC[..] {
                    continue;
                }
                if let Some((l, t)) = try_copy(par, par_size, o)? {
                    if l.copy_b_off() == o {
                        return Ok(Some((l, t)));
                    }
                }
            }
        }
        end = start;
    }
    Ok(None)
}

impl Opened {
    fn open(path: &Path) -> Result<Opened, ParityError> {
        let par_p = par_path(path);
        let par = match fsutil::open_regular(&par_p) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ParityError::Missing { par: par_p })
            }
            Err(e) => return Err(io_error(&par_p, &e)),
        };
        let pio = |e: io::Error| io_error(&par_p, &e);
        let par_size = par.metadata().map_err(pio)?.len();
        let a = try_copy(&par, par_size, 0).map_err(pio)?;
        let (l, table, bad) = match a {
            Some((l, table)) => {
                let b = try_copy(&par, par_size, l.copy_b_off()).map_err(pio)?;
                let b_ok = matches!(&b, Some((lb, tb)) if *lb == l && *tb == table);
                (l, table, u8::from(!b_ok))
            }
            None => match find_copy_b(&par, par_size).map_err(pio)? {
                Some((l, table)) => (l, table, 1),
                None => return Err(ParityError::TablesDamaged { par: par_p }),
            },
        };
        let (file, actual_len) = match fsutil::open_regular(path) {
            Ok(f) => {
                let n = f.metadata().map_err(|e| io_error(path, &e))?.len();
                (Some(f), Some(n))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => (None, None),
            Err(e) => return Err(io_error(path, &e)),
        };
        Ok(Opened {
            path: path.to_path_buf(),
            file,
            actual_len,
            par,
            par_size,
            l,
            table,
            bad_table_copies: bad,
        })
    }

    fn hash(&self, r: u64, j: usize) -> &[u8] {
        let at = (r as usize * self.l.shards() + j) * HASH_LEN;
        &self.table[at..at + HASH_LEN]
    }

    fn fio(&self) -> impl Fn(io::Error) -> ParityError + '_ {
        |e| io_error(&self.path, &e)
    }

    /// Loads row `r` of data shard `i` into `buf`; true if it checks.
    fn load_data(&self, r: u64, i: usize, buf: &mut [u8]) -> Result<bool, ParityError> {
        let file = self.file.as_ref();
        fill_data_row(&self.l, i, r, buf, |off, b| match file {
            Some(f) => read_at_most(f, off, b),
            None => Ok(0),
        })
        .map_err(self.fio())?;
        Ok(row_hash(buf) == self.hash(r, i))
    }

    /// Loads row `r` of parity shard `p` into `buf`; true if it checks.
    fn load_parity(&self, r: u64, p: usize, buf: &mut [u8]) -> Result<bool, ParityError> {
        let got = read_at_most(&self.par, self.l.parity_off(p) + r * self.l.w, buf)
            .map_err(|e| io_error(&par_path(&self.path), &e))?;
        buf[got..].fill(0);
        Ok(row_hash(buf) == self.hash(r, self.l.k + p))
    }

    /// Loads row `r` into `bufs` (k + m buffers of at least the row's
    /// length) and rebuilds damaged data rows. Data shards `need` are read
    /// first; when they are intact (and `all_parity` is false) nothing else
    /// is read. Otherwise every shard is read, parity included, and the
    /// damaged data rows are rebuilt. Returns the damaged shard indices
    /// (data `< k`, parity `k..k+m`); the data rows read are then correct.
    fn load_row(
        &self,
        r: u64,
        bufs: &mut [Vec<u8>],
        need: std::ops::Range<usize>,
        all_parity: bool,
        dec: &mut Option<ReedSolomonDecoder>,
    ) -> Result<Vec<usize>, ParityError> {
        let n = self.l.row_len(r);
        let k = self.l.k;
        let mut bad = Vec::new();
        for i in need.clone() {
            if !self.load_data(r, i, &mut bufs[i][..n])? {
                bad.push(i);
            }
        }
        if bad.is_empty() && !all_parity {
            return Ok(bad);
        }
        for i in (0..k).filter(|i| !need.contains(i)) {
            if !self.load_data(r, i, &mut bufs[i][..n])? {
                bad.push(i);
            }
        }
        bad.sort_unstable();
        for p in 0..self.l.m {
            if !self.load_parity(r, p, &mut bufs[k + p][..n])? {
                bad.push(k + p);
            }
        }
        if bad.iter().all(|&j| j >= k) {
            return Ok(bad);
        }
        if bad.len() > self.l.m {
            return Err(ParityError::Unrecoverable {
                path: self.path.clone(),
                damaged: bad.len(),
                total: self.l.shards(),
                row: r,
                m: self.l.m,
            });
        }
        let codec = |e: reed_solomon_simd::Error| ParityError::Codec {
            path: self.path.clone(),
            row: r,
            msg: e.to_string(),
        };
        let d = match dec {
            Some(d) => {
                d.reset(k, self.l.m, n).map_err(codec)?;
                d
            }
            None => dec.insert(ReedSolomonDecoder::new(k, self.l.m, n).map_err(codec)?),
        };
        for (j, buf) in bufs.iter().enumerate() {
            if bad.contains(&j) {
                continue;
            }
            if j < k {
                d.add_original_shard(j, &buf[..n]).map_err(codec)?;
            } else {
                d.add_recovery_shard(j - k, &buf[..n]).map_err(codec)?;
            }
        }
        let res = d.decode().map_err(codec)?;
        for &i in bad.iter().filter(|&&j| j < k) {
            let restored = res.restored_original(i).ok_or_else(|| ParityError::Codec {
                path: self.path.clone(),
                row: r,
                msg: format!("shard {i} not restored"),
            })?;
            bufs[i][..n].copy_from_slice(restored);
            if row_hash(&bufs[i][..n]) != self.hash(r, i) {
                return Err(ParityError::Codec {
                    path: self.path.clone(),
                    row: r,
                    msg: format!("rebuilt shard {i} does not match its hash"),
                });
            }
        }
        Ok(bad)
    }

    fn rebuilt(&self, r: u64, bad: &[usize], out: &mut Repaired) {
        for &i in bad.iter().filter(|&&j| j < self.l.k) {
            let offset = i as u64 * self.l.s + r * self.l.w;
            let len = self
                .l
                .len
                .saturating_sub(offset)
                .min(self.l.row_len(r) as u64);
            out.rows.push(RebuiltRow {
                shard: i,
                row: r,
                offset,
                len,
            });
        }
    }

    fn bufs(&self) -> Vec<Vec<u8>> {
        vec![vec![0u8; self.l.w as usize]; self.l.shards()]
    }

    fn read_range(&self, offset: u64, len: usize) -> Result<(Vec<u8>, Repaired), ParityError> {
        let l = &self.l;
        let end = offset.checked_add(len as u64).filter(|&e| e <= l.len);
        let Some(end) = end else {
            return Err(ParityError::OutOfRange {
                path: self.path.clone(),
                offset,
                len: len as u64,
                file_len: l.len,
            });
        };
        let mut out = vec![0u8; len];
        let mut repaired = Repaired::default();
        if len == 0 {
            return Ok((out, repaired));
        }
        // Rows needed: those any byte of the range falls in.
        let mut need = vec![false; l.rows as usize];
        let (first_shard, last_shard) = (offset / l.s, (end - 1) / l.s);
        let need_shards = first_shard as usize..last_shard as usize + 1;
        if last_shard - first_shard >= 2 {
            need.fill(true);
        } else {
            for sh in first_shard..=last_shard {
                let a = offset.max(sh * l.s) - sh * l.s;
                let b = (end - 1).min(sh * l.s + l.s - 1) - sh * l.s;
                for r in a / l.w..=b / l.w {
                    need[r as usize] = true;
                }
            }
        }
        let mut bufs = self.bufs();
        let mut dec = None;
        for r in (0..l.rows).filter(|&r| need[r as usize]) {
            let bad = self.load_row(r, &mut bufs, need_shards.clone(), false, &mut dec)?;
            self.rebuilt(r, &bad, &mut repaired);
            let n = l.row_len(r) as u64;
            for (i, buf) in bufs[..l.k].iter().enumerate() {
                let row_off = i as u64 * l.s + r * l.w;
                let a = row_off.max(offset);
                let b = (row_off + n).min(end);
                if a < b {
                    out[(a - offset) as usize..(b - offset) as usize]
                        .copy_from_slice(&buf[(a - row_off) as usize..(b - row_off) as usize]);
                }
            }
        }
        Ok((out, repaired))
    }

    /// Reads every row of every shard: what is damaged, and whether it can
    /// all be rebuilt.
    fn check(&self) -> Result<CheckReport, ParityError> {
        let l = &self.l;
        let mut rep = CheckReport {
            file_len: l.len,
            actual_len: self.actual_len,
            data_damaged: Vec::new(),
            parity_damaged: Vec::new(),
            bad_table_copies: self.bad_table_copies,
            par_size_wrong: self.par_size != l.par_len(),
            recoverable: true,
        };
        let mut bufs = self.bufs();
        let mut dec = None;
        for r in 0..l.rows {
            let bad = match self.load_row(r, &mut bufs, 0..l.k, true, &mut dec) {
                Ok(bad) => bad,
                Err(ParityError::Unrecoverable { .. }) => {
                    rep.recoverable = false;
                    // Record which shards: recompute without decoding.
                    let n = l.row_len(r);
                    let mut bad = Vec::new();
                    for (j, buf) in bufs.iter_mut().enumerate() {
                        let ok = if j < l.k {
                            self.load_data(r, j, &mut buf[..n])?
                        } else {
                            self.load_parity(r, j - l.k, &mut buf[..n])?
                        };
                        if !ok {
                            bad.push(j);
                        }
                    }
                    bad
                }
                Err(e) => return Err(e),
            };
            for j in bad {
                if j < l.k {
                    rep.data_damaged.push((j, r));
                } else {
                    rep.parity_damaged.push((j - l.k, r));
                }
            }
        }
        Ok(rep)
    }
}

/// Reads `F[offset..offset+len]`, rebuilding damaged rows from parity (see
/// the module docs). Only the rows covering the range are read (parity
/// rows only where data rows are damaged).
pub(crate) fn read_range(
    path: &Path,
    offset: u64,
    len: usize,
) -> Result<(Vec<u8>, Repaired), ParityError> {
    Opened::open(path)?.read_range(offset, len)
}

/// Reads all of `F`, repaired, refusing when its `.par` says `L > max_len`.
pub(crate) fn read_all(path: &Path, max_len: u64) -> Result<(Vec<u8>, Repaired), ParityError> {
    let o = Opened::open(path)?;
    if o.l.len > max_len {
        return Err(ParityError::TooLarge {
            path: path.to_path_buf(),
            file_len: o.l.len,
            max: max_len,
        });
    }
    o.read_range(0, o.l.len as usize)
}

/// Scans `F` and `F.par` completely. An unrecoverable row is reported
/// (`recoverable: false`), not an error; errors are for a missing or
/// unusable `.par` and I/O failures.
pub(crate) fn check(path: &Path) -> Result<CheckReport, ParityError> {
    Opened::open(path)?.check()
}

/// Rewrites `F` from repaired contents when it is damaged (temporary
/// `.tmp-<random>` in its directory, mode 0600, fsync, rename, fsync the
/// directory), then rewrites `F.par` when that is damaged. When something
/// cannot be rebuilt, nothing is changed and the error says why; in
/// particular, when both table copies of `F.par` are damaged it returns
/// [`ParityError::TablesDamaged`] without guessing whether `F` is good (the
/// store verifies `F` itself, then calls [`rewrite_par`]).
pub(crate) fn repair(path: &Path) -> Result<RepairReport, ParityError> {
    let o = Opened::open(path)?;
    let rep = o.check()?;
    let mut out = RepairReport {
        file_rewritten: false,
        par_rewritten: false,
        repaired: Repaired::default(),
    };
    if !rep.recoverable {
        // Name the first row with too many damaged shards.
        let mut per_row = std::collections::BTreeMap::<u64, usize>::new();
        for &(_, r) in rep.data_damaged.iter().chain(&rep.parity_damaged) {
            *per_row.entry(r).or_default() += 1;
        }
        let (row, damaged) = per_row
            .into_iter()
            .find(|&(_, n)| n > o.l.m)
            .unwrap_or((0, o.l.m + 1));
        return Err(ParityError::Unrecoverable {
            path: path.to_path_buf(),
            damaged,
            total: o.l.shards(),
            row,
            m: o.l.m,
        });
    }
    if rep.file_damaged() {
        let l = o.l;
        let mut repaired = Repaired::default();
        let mut failed = None;
        let res = replace_atomically(path, |tmp| {
            let mut bufs = o.bufs();
            let mut dec = None;
            for r in 0..l.rows {
                let bad = match o.load_row(r, &mut bufs, 0..l.k, false, &mut dec) {
                    Ok(bad) => bad,
                    Err(e) => {
                        // Changed since the check: keep the real error.
                        failed = Some(e);
                        return Err(io::Error::other("row failed"));
                    }
                };
                o.rebuilt(r, &bad, &mut repaired);
                let n = l.row_len(r) as u64;
                for (i, buf) in bufs[..l.k].iter().enumerate() {
                    let off = i as u64 * l.s + r * l.w;
                    let inside = l.len.saturating_sub(off).min(n) as usize;
                    if inside > 0 {
                        tmp.write_all_at(&buf[..inside], off)?;
                    }
                }
            }
            tmp.set_len(l.len)
        });
        if let Some(e) = failed {
            return Err(e);
        }
        res.map_err(|e| io_error(path, &e))?;
        out.file_rewritten = true;
        out.repaired = repaired;
    }
    if rep.par_damaged() {
        drop(o);
        write_for_file(path).map_err(|e| io_error(&par_path(path), &e))?;
        out.par_rewritten = true;
    }
    Ok(out)
}

#[cfg(test)]
#[path = "parity_tests.rs"]
mod tests;
