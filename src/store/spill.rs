//! The spill file of a streamed checkpoint ([`super::PageStream`]): where
//! 4 MiB batches of the job's pages wait when the ingest worker falls
//! behind CRIU.
//!
//! * **Unnamed.** The file is created with `O_TMPFILE` in the store's
//!   trusted `packs/` directory (or, where the file system lacks it,
//!   created under a fresh `.tmp-` name and unlinked at once), and the
//!   worker reads it through a duplicate of the same descriptor, never by
//!   reopening a path: nobody can open it, and a crash (even SIGKILL)
//!   leaves nothing behind, since the kernel frees an unnamed file with
//!   its last descriptor.
//! * **Sealed** (when the store seals): each batch is sealed with
//!   XChaCha20-Poly1305 under a random key made for this one file, which
//!   lives only in supervise's memory; the nonce is the batch's number
//!   (each batch is sealed once, so a nonce is never reused under a key).
//!   What reaches the disk (the page cache writes it back) is ciphertext;
//!   a batch that does not authenticate when the worker reads it back is
//!   an error of the checkpoint, never silently stored.
//!
//! The batch is sealed on the thread that receives CRIU's pages while the
//! job is frozen, so the cipher's speed is the job's. Measured on this
//! machine (2 cores with AES-NI and PCLMULQDQ, release build, sealing
//! 4 MiB batches, six runs each): RustCrypto's AES-256-GCM (`aes-gcm`
//! 0.10, hardware AES and carry-less multiply detected at run time)
//! 1.00-1.24 GB/s, median 1.11; XChaCha20-Poly1305 0.97-1.10 GB/s, median
//! 1.06: the same within the noise of this shared VM. So the store's own
//! cipher: no new dependency, and constant-time and as fast on nodes
//! without AES instructions (some HPC nodes are ARM).

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

use crate::fsutil;

/// Bytes a sealed batch grows by (the Poly1305 tag).
pub(super) const SPILL_TAG: usize = 16;

/// One batch in the spill file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct SpilledBatch {
    /// Offset in the file.
    pub off: u64,
    /// Bytes in the file (the batch, plus the tag when sealed).
    pub stored: usize,
    /// The batch's number (its nonce).
    pub n: u64,
}

/// The writing end (the thread receiving CRIU's pages).
pub(super) struct SpillWriter {
    file: File,
    cipher: Option<Arc<XChaCha20Poly1305>>,
    at: u64,
    next: u64,
}

/// The reading end (the ingest worker): a duplicate of the writer's
/// descriptor.
pub(super) struct SpillReader {
    file: File,
    cipher: Option<Arc<XChaCha20Poly1305>>,
}

/// A new unnamed spill file in `dir`, sealed with a fresh random key if
/// `seal`.
pub(super) fn create(dir: &Path, seal: bool) -> io::Result<(SpillWriter, SpillReader)> {
    create_with(dir, seal, false)
}

/// [`create`]; `named_first` skips `O_TMPFILE` (tests of the fallback).
pub(super) fn create_with(
    dir: &Path,
    seal: bool,
    named_first: bool,
) -> io::Result<(SpillWriter, SpillReader)> {
    let file = unnamed_file(dir, named_first)?;
    let reader = file.try_clone()?;
    let cipher = if seal {
        let mut key = [0u8; 32];
        fsutil::random_bytes(&mut key)?;
        let c = Arc::new(XChaCha20Poly1305::new(&key.into()));
        key.fill(0);
        Some(c)
    } else {
        None
    };
    Ok((
        SpillWriter {
            file,
            cipher: cipher.clone(),
            at: 0,
            next: 0,
        },
        SpillReader {
            file: reader,
            cipher,
        },
    ))
}

/// An open, unnamed, private (0600) file in `dir` for reading and writing:
/// `O_TMPFILE`, or where that is not supported a new `.tmp-spill-<random>`
/// file unlinked at once (a crash in between leaves a `.tmp-` name, which
/// the next open of the store removes).
fn unnamed_file(dir: &Path, named: bool) -> io::Result<File> {
    if !named {
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
            .open(dir)
        {
            Ok(f) => return Ok(f),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP) | Some(libc::EISDIR) | Some(libc::EINVAL)
                ) => {}
            Err(e) => return Err(e),
        }
    }
    for _ in 0..16 {
        let p = dir.join(format!(".tmp-spill-{}", fsutil::random_suffix()?));
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&p)
        {
            Ok(f) => {
                std::fs::remove_file(&p)?;
                return Ok(f);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!("{}: no free temporary name", dir.display()),
    ))
}

fn nonce(n: u64) -> XNonce {
    let mut b = [0u8; 24];
    b[..8].copy_from_slice(&n.to_le_bytes());
    b.into()
}

impl SpillWriter {
    /// Appends `batch` (sealed first, in place: it grows by the tag) and
    /// returns where it went. `batch` holds the stored bytes afterwards.
    pub fn append(&mut self, batch: &mut Vec<u8>) -> io::Result<SpilledBatch> {
        let n = self.next;
        if let Some(c) = &self.cipher {
            c.encrypt_in_place(&nonce(n), b"supervise spill", batch)
                .map_err(|_| io::Error::other("cannot seal a spilled batch"))?;
        }
        self.file.write_all_at(batch, self.at)?;
        let b = SpilledBatch {
            off: self.at,
            stored: batch.len(),
            n,
        };
        self.at += batch.len() as u64;
        self.next += 1;
        Ok(b)
    }

    /// The file itself (tests: tampering).
    #[cfg(test)]
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl SpillReader {
    /// Reads batch `b` into `out` (replacing its contents) and opens it. A
    /// batch that does not authenticate (changed on disk) is an
    /// `InvalidData` error.
    pub fn read(&self, b: SpilledBatch, out: &mut Vec<u8>) -> io::Result<()> {
        out.clear();
        out.resize(b.stored, 0);
        self.file.read_exact_at(out, b.off)?;
        if let Some(c) = &self.cipher {
            c.decrypt_in_place(&nonce(b.n), b"supervise spill", out)
                .map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "spilled batch {} of this checkpoint's pages does not authenticate: \
                             the spill file was changed on disk",
                            b.n
                        ),
                    )
                })?;
        }
        Ok(())
    }
}
