//! Reading store files that failed their own check: rebuilt from their
//! Reed-Solomon sidecar (`parity.rs`), else read from the second copy
//! (`[store] copies = 2`). Every repair is logged once, naming the file.
//!
//! The store reads its files the direct way first; this module is only
//! asked when that failed (an object that does not authenticate, an index
//! or manifest that does not parse, a short read at a lost tail, a missing
//! file), so the happy path costs nothing.

use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use tracing::warn;

use super::parity;
use crate::fsutil;

/// Where a store's second copy lives (the same layout under another root).
#[derive(Debug, Clone, Default)]
pub struct Mirror {
    primary: PathBuf,
    copy: Option<PathBuf>,
}

impl Mirror {
    /// `primary` mirrored to `copy` (if any).
    pub fn new(primary: &Path, copy: Option<&Path>) -> Mirror {
        Mirror {
            primary: primary.to_path_buf(),
            copy: copy.map(Path::to_path_buf),
        }
    }

    /// The copy's root, if the store keeps two copies.
    pub fn copy_root(&self) -> Option<&Path> {
        self.copy.as_deref()
    }

    /// The second copy of the store file `path`.
    pub fn alt(&self, path: &Path) -> Option<PathBuf> {
        let copy = self.copy.as_ref()?;
        let rel = path.strip_prefix(&self.primary).ok()?;
        Some(copy.join(rel))
    }
}

/// Why a store file could not be read the slow way either.
#[derive(Debug, Clone, Default)]
pub struct Unhealed {
    /// Every way that was tried, and why it failed.
    pub why: String,
    /// At least one way failed because a resource ran short (descriptors,
    /// memory): the file may well be intact, so nothing may be concluded
    /// from this failure.
    pub resource: bool,
}

impl std::fmt::Display for Unhealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.why)
    }
}

/// Collects the reasons of [`Unhealed`].
#[derive(Default)]
struct Why {
    lines: Vec<String>,
    resource: bool,
}

impl Why {
    fn push(&mut self, s: String) {
        self.lines.push(s);
    }

    fn io(&mut self, path: &Path, e: &io::Error) {
        self.resource |= crate::fdlimit::is_resource_error(e);
        self.lines.push(fsutil::describe_error(path, e));
    }

    fn parity(&mut self, e: &parity::ParityError) {
        self.resource |= e.is_resource();
        self.lines.push(e.to_string());
    }

    fn done(self) -> Unhealed {
        Unhealed {
            why: self.lines.join("; "),
            resource: self.resource,
        }
    }
}

/// `len` bytes at `offset` of the store file `path`, rebuilt from parity or
/// read from the second copy; `check` must accept them. `Err` says why
/// neither worked.
pub fn read_range(
    mirror: &Mirror,
    path: &Path,
    offset: u64,
    len: usize,
    check: &mut dyn FnMut(&[u8]) -> bool,
) -> Result<Vec<u8>, Unhealed> {
    let mut why = Why::default();
    if parity::par_path(path).exists() {
        match parity::read_range(path, offset, len) {
            Ok((bytes, rep)) if check(&bytes) => {
                warn!(file = %path.display(), repaired = %rep, "read a damaged store file through its parity");
                return Ok(bytes);
            }
            Ok(_) => why.push("parity rebuilt data that still does not check".to_string()),
            Err(e) => why.parity(&e),
        }
    } else {
        why.push(format!("{} has no parity", path.display()));
    }
    if let Some(alt) = mirror.alt(path) {
        let r = fsutil::open_regular(&alt).and_then(|f| {
            let mut b = vec![0u8; len];
            f.read_exact_at(&mut b, offset)?;
            Ok(b)
        });
        match r {
            Ok(b) if check(&b) => {
                warn!(file = %path.display(), copy = %alt.display(), "read a damaged store file from the second copy");
                return Ok(b);
            }
            Ok(_) => why.push(format!("the copy {} is damaged too", alt.display())),
            Err(e) => why.io(&alt, &e),
        }
        if parity::par_path(&alt).exists() {
            match parity::read_range(&alt, offset, len) {
                Ok((b, rep)) if check(&b) => {
                    warn!(file = %path.display(), copy = %alt.display(), repaired = %rep, "read a damaged store file from the second copy through its parity");
                    return Ok(b);
                }
                Ok(_) => {}
                Err(e) => why.resource |= e.is_resource(),
            }
        }
    }
    Err(why.done())
}

/// The whole store file `path` (at most `max` bytes), rebuilt from parity
/// or read from the second copy, parsed by `parse`.
pub fn read_all<T>(
    mirror: &Mirror,
    path: &Path,
    max: u64,
    parse: &mut dyn FnMut(&[u8]) -> Result<T, String>,
) -> Result<T, Unhealed> {
    let mut why = Why::default();
    let mut candidates = vec![path.to_path_buf()];
    candidates.extend(mirror.alt(path));
    for (i, p) in candidates.iter().enumerate() {
        if i > 0 {
            match read_capped(p, max) {
                Ok(b) => match parse(&b) {
                    Ok(v) => {
                        warn!(file = %path.display(), copy = %p.display(), "read a damaged store file from the second copy");
                        return Ok(v);
                    }
                    Err(e) => why.push(format!("{}: {e}", p.display())),
                },
                Err(e) => why.io(p, &e),
            }
        }
        if !parity::par_path(p).exists() {
            continue;
        }
        match parity::read_all(p, max) {
            Ok((b, rep)) => match parse(&b) {
                Ok(v) => {
                    warn!(file = %path.display(), from = %p.display(), repaired = %rep, "read a damaged store file through its parity");
                    return Ok(v);
                }
                Err(e) => why.push(format!("rebuilt from parity: {e}")),
            },
            Err(e) => why.parity(&e),
        }
    }
    Err(why.done())
}

fn read_capped(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let f = fsutil::open_regular(path)?;
    let mut b = Vec::new();
    f.take(max + 1).read_to_end(&mut b)?;
    if b.len() as u64 > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {max} bytes"),
        ));
    }
    Ok(b)
}

/// The original length of `path` recorded by its parity, if readable (a
/// pack whose tail was lost is shorter on disk than its index says).
pub fn recorded_len(path: &Path) -> Option<u64> {
    let f = fsutil::open_regular(&parity::par_path(path)).ok()?;
    let mut h = [0u8; 16];
    f.read_exact_at(&mut h, 0).ok()?;
    (&h[..8] == b"SVPAR001").then(|| u64::from_le_bytes(h[8..16].try_into().unwrap()))
}
