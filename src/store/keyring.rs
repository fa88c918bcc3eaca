//! Which key a store needs: the marker file records the id of the store
//! key (and from which checkpoint on every checkpoint is sealed); opening
//! a store loads, checks or generates the key accordingly.
//!
//! Marker file (`.supervise-store`), one fact per line:
//!
//! ```text
//! supervise image store
//! key-id 3f2a9c0d11e4b7a2      # the store key's fingerprint (crypto.rs)
//! sealed-from 12               # checkpoints with seq >= 12 must be sealed
//! ```
//!
//! A store without a `key-id` line has never been sealed (a store of an
//! earlier release, or one with `encryption = false` throughout).

use std::io;
use std::path::Path;
use std::sync::Arc;

use tracing::{info, warn};

use super::crypto::{KeyError, StoreKey};
use super::{file_err, io_err, StoreError, StoreOptions, MARKER_NAME};
use crate::fsutil;

/// First line of the marker.
pub(super) const MARKER_CONTENT: &[u8] = b"supervise image store\n";
/// Largest marker file read.
pub(super) const MAX_MARKER_BYTES: u64 = 4096;

/// What a marker records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Marker {
    /// The store key's id.
    pub key_id: Option<String>,
    /// Checkpoints from this sequence number on are sealed.
    pub sealed_from: Option<u64>,
}

impl Marker {
    /// Parses a marker's text (unknown lines are ignored: later releases).
    pub fn parse(bytes: &[u8]) -> Marker {
        let text = String::from_utf8_lossy(bytes);
        let mut m = Marker::default();
        for line in text.lines() {
            let mut w = line.split_whitespace();
            match (w.next(), w.next()) {
                (Some("key-id"), Some(id))
                    if id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()) =>
                {
                    m.key_id = Some(id.to_ascii_lowercase())
                }
                (Some("sealed-from"), Some(n)) => m.sealed_from = n.parse().ok(),
                _ => {}
            }
        }
        m
    }

    fn render(&self) -> Vec<u8> {
        let mut out = MARKER_CONTENT.to_vec();
        if let Some(id) = &self.key_id {
            out.extend_from_slice(format!("key-id {id}\n").as_bytes());
        }
        if let Some(n) = self.sealed_from {
            out.extend_from_slice(format!("sealed-from {n}\n").as_bytes());
        }
        out
    }
}

/// Reads the marker of `dir` (missing: `None`).
pub(super) fn read_marker(dir: &Path) -> Result<Option<Marker>, StoreError> {
    let path = dir.join(MARKER_NAME);
    match fsutil::read_limited(&path, MAX_MARKER_BYTES) {
        Ok(b) => Ok(Some(Marker::parse(&b))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(file_err(&path)(e)),
    }
}

/// Writes the marker of `dir`.
pub(super) fn write_marker(dir: &Path, m: &Marker) -> Result<(), StoreError> {
    let path = dir.join(MARKER_NAME);
    fsutil::write_atomic(&path, &m.render(), 0o600).map_err(io_err(&path))
}

fn key_err(e: KeyError) -> StoreError {
    StoreError::Key(Box::new(e))
}

/// The key for the store `dir` whose marker is `marker`, as the
/// supervising process needs it: loaded (and checked against the marker),
/// or generated when encryption is on and the store has none yet; the
/// marker is updated (`next_seq`: the first checkpoint that will be
/// sealed). Returns the key and whether new checkpoints are sealed.
pub(super) fn key_for_writer(
    dir: &Path,
    mut marker: Marker,
    opts: &StoreOptions,
    next_seq: u64,
) -> Result<Option<Arc<StoreKey>>, StoreError> {
    let path = &opts.key_file;
    let key = match (&marker.key_id, load_if_present(path)?) {
        (Some(want), Some(k)) => {
            check_id(dir, want, &k)?;
            Some(k)
        }
        (Some(want), None) => {
            return Err(key_err(KeyError::Missing {
                path: path.clone(),
                store: dir.to_path_buf(),
                store_key_id: want.clone(),
            }))
        }
        (None, Some(k)) if opts.encryption => Some(k),
        (None, Some(_)) | (None, None) if !opts.encryption => None,
        (None, _) => {
            let k = match StoreKey::generate(path) {
                // Another copy of this job (Slurm) generated it just now.
                Err(KeyError::Io { source, .. })
                    if source.kind() == io::ErrorKind::AlreadyExists =>
                {
                    StoreKey::load(path).map_err(key_err)?
                }
                r => r.map_err(key_err)?,
            };
            info!(store = %dir.display(), key_file = %path.display(), key_id = %k.key_id(),
                "generated the store key: keep a copy of it, without it the images cannot be read");
            Some(k)
        }
    };
    let before = marker.clone();
    if let Some(k) = &key {
        marker.key_id = Some(k.key_id().to_string());
    }
    if opts.encryption && key.is_some() {
        marker.sealed_from.get_or_insert(next_seq);
    } else if marker.sealed_from.take().is_some() {
        warn!(store = %dir.display(),
            "encryption is off: new checkpoints are written unsealed and unsealed checkpoints \
             are accepted again");
    }
    if marker != before {
        write_marker(dir, &marker)?;
    }
    Ok(key.map(Arc::new))
}

/// The key for reading the store `dir` (`supervise images`, `verify`,
/// `gc`): needed, and checked, when the marker names one.
pub(super) fn key_for_reader(
    dir: &Path,
    marker: &Marker,
    opts: &StoreOptions,
) -> Result<Option<Arc<StoreKey>>, StoreError> {
    let Some(want) = &marker.key_id else {
        return Ok(None);
    };
    match load_if_present(&opts.key_file)? {
        Some(k) => {
            check_id(dir, want, &k)?;
            Ok(Some(Arc::new(k)))
        }
        None => Err(key_err(KeyError::Missing {
            path: opts.key_file.clone(),
            store: dir.to_path_buf(),
            store_key_id: want.clone(),
        })),
    }
}

fn check_id(dir: &Path, want: &str, k: &StoreKey) -> Result<(), StoreError> {
    if k.key_id() != want {
        return Err(key_err(KeyError::Wrong {
            path: k.path().to_path_buf(),
            key_id: k.key_id().to_string(),
            store: dir.to_path_buf(),
            store_key_id: want.to_string(),
        }));
    }
    Ok(())
}

fn load_if_present(path: &Path) -> Result<Option<StoreKey>, StoreError> {
    match StoreKey::load(path) {
        Ok(k) => Ok(Some(k)),
        Err(KeyError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(key_err(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_roundtrip() {
        let m = Marker {
            key_id: Some("0123456789abcdef".into()),
            sealed_from: Some(7),
        };
        assert_eq!(Marker::parse(&m.render()), m);
        assert_eq!(Marker::parse(MARKER_CONTENT), Marker::default());
        assert_eq!(Marker::parse(b"junk\nkey-id zz\n"), Marker::default());
    }
}
