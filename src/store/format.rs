//! The on-disk format of the image store: names and limits of what a store
//! directory holds, checkpoint ids, and `MANIFEST.json` (its types, and how
//! it is read and checked). The layout is drawn in the documentation of
//! [`crate::store`]; packs, indexes and trees are in `objects.rs`.

use std::io;
use std::path::{Path, PathBuf};

use chrono::{DateTime, NaiveDateTime, Utc};
use serde::{Deserialize, Serialize};

use super::crypto::StoreKey;
use super::heal::{self, Mirror};
use super::objects::{self, Hash};
use super::parity;
use super::{io_err, StoreError};
use crate::fsutil;

/// Name of the manifest file inside a checkpoint directory.
pub const MANIFEST_NAME: &str = "MANIFEST.json";
/// Name of a sealed manifest (an encrypted checkpoint): the manifest's
/// JSON, zstd-compressed, sealed with the store key under
/// [`MANIFEST_MAGIC_SEALED`] and the checkpoint id. A checkpoint has one
/// of the two.
pub const MANIFEST_SEALED_NAME: &str = "MANIFEST.sealed";
/// Magic of a sealed manifest.
pub const MANIFEST_MAGIC_SEALED: &[u8; 8] = b"SVMAN003";
/// The marker file that makes a directory a supervise image store: written
/// (0600) when [`ImageStore::open`] creates or adopts a directory; a
/// non-empty directory without it is refused.
///
/// [`ImageStore::open`]: super::ImageStore::open
pub const MARKER_NAME: &str = ".supervise-store";
/// Largest `MANIFEST.json` read (both versions); a larger one makes its
/// checkpoint damaged. A manifest costs ~250 bytes per file of the dump
/// (CRIU writes ~6-8 files per process), so 64 MiB is ~250k files, a job
/// of tens of thousands of processes, far beyond real ones; reading and
/// parsing that much is still cheap, while a hostile sparse file or
/// `/dev/zero` can no longer make `list` allocate without bound.
pub const MAX_MANIFEST_BYTES: u64 = 64 << 20;
/// The manifest format version written by this store.
pub const MANIFEST_VERSION: u32 = 2;
/// The oldest manifest version still read (whole files + SHA-256).
pub const MANIFEST_VERSION_V1: u32 = 1;
/// Prefix of the directory of a checkpoint being written.
pub const STAGING_PREFIX: &str = ".staging-";
/// Prefix of the directory of a checkpoint being removed by retention.
pub const DELETING_PREFIX: &str = ".deleting-";
/// The store's lock file.
pub const LOCK_NAME: &str = ".lock";
/// The directory of pack files.
pub const PACKS_DIR: &str = "packs";
/// Time format used in checkpoint ids.
pub(super) const ID_TIME_FORMAT: &str = "%Y%m%dT%H%M%SZ";

/// Checkpoint metadata supplied by the caller at commit time.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CheckpointMeta {
    /// Name of the job.
    pub job: String,
    /// Version of the CRIU binary that made the dump.
    pub criu_version: String,
    /// Wall time of the dump in milliseconds.
    pub duration_ms: u64,
    /// CRIU's frozen time in microseconds (from `stats-dump`), if known.
    pub frozen_us: Option<u64>,
    /// Number of pages written, if known.
    pub pages_written: Option<u64>,
    /// Pid of the dumped root inside its pid namespace.
    pub root_pid: i32,
    /// What the supervisor recorded besides CRIU's image (kept under the
    /// manifest key `extra`).
    #[serde(default)]
    pub extra: CheckpointExtra,
}

/// The supervisor's own facts about a checkpoint, typed; stored as the
/// manifest's `extra` object (keys unchanged since they were free-form).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CheckpointExtra {
    /// Job files recorded for rollback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<u64>,
    /// Of which copied whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_copied: Option<u64>,
    /// Bytes copied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_copied_bytes: Option<u64>,
    /// Time spent recording them (inside the freeze), microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_us: Option<u64>,
    /// An attached job's processes at the checkpoint (PID and start time),
    /// killed before a restore if they outlived the job's root.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tree: Vec<crate::proc::ProcId>,
    /// Keys written by later releases, kept as they are.
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

/// Contents of `MANIFEST.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// Manifest format version ([`MANIFEST_VERSION`] or [`MANIFEST_VERSION_V1`]).
    pub version: u32,
    /// Checkpoint id; equals the name of the checkpoint directory.
    pub id: String,
    /// Time of [`ImageStore::begin`], i.e. just before the dump started.
    ///
    /// [`ImageStore::begin`]: super::ImageStore::begin
    #[serde(with = "rfc3339")]
    pub created: DateTime<Utc>,
    /// Caller-supplied metadata.
    pub meta: CheckpointMeta,
    /// Files of the checkpoint (excluding the manifest), sorted by name.
    pub files: Vec<FileEntry>,
    /// What the commit added to the store (version 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored: Option<StoredInfo>,
}

/// One file of a checkpoint as recorded in the manifest.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct FileEntry {
    /// Path relative to the image directory: a plain name, or `dir/name`
    /// one level down (CRIU's pre-dump images).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Version 1: lower-case hex SHA-256 of the file kept whole in the
    /// checkpoint directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Version 2: chunk size the file was cut into.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk: Option<u32>,
    /// Version 2: levels of tree nodes above the chunks (0: `root` is the only chunk).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub depth: Option<u8>,
    /// Version 2: hex BLAKE3 of the tree's root object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<String>,
    /// A symbolic link (CRIU's `parent` link to pre-dump images) and its target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
}

/// What a commit added to the store.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StoredInfo {
    /// Bytes of the new pack and index files (the manifest's own size is
    /// added when it is read: see [`ImageInfo::new_bytes`]).
    pub pack_bytes: u64,
    /// Objects that were not in the store yet.
    pub new_objects: u64,
    /// Raw (uncompressed) bytes of those objects.
    pub new_raw_bytes: u64,
    /// Raw bytes of the new tree nodes among them (metadata).
    #[serde(default)]
    pub node_bytes: u64,
    /// Chunks in the checkpoint (all files).
    pub chunks: u64,
    /// The pack holding the new objects, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pack: Option<String>,
    /// Milliseconds spent ingesting the dump.
    pub ingest_ms: u64,
}

/// A published checkpoint.
#[derive(Debug, Clone)]
pub struct ImageInfo {
    /// Checkpoint id (`<seq:06>-<time>`).
    pub id: String,
    /// Sequence number parsed from the id.
    pub seq: u64,
    /// Path of the checkpoint directory (holds the manifest; restore with
    /// [`ImageStore::materialise`]).
    ///
    /// [`ImageStore::materialise`]: super::ImageStore::materialise
    pub path: PathBuf,
    /// Creation time (from the manifest).
    pub created: DateTime<Utc>,
    /// Logical size: the sum of the image files' sizes (what CRIU wrote).
    pub size_bytes: u64,
    /// Bytes this checkpoint added to the disk when it was committed: its
    /// new pack and index plus its manifest (version 1: all its files).
    pub new_bytes: u64,
    /// The parsed manifest.
    pub manifest: Manifest,
    /// The checkpoint is sealed with the store key (its manifest is
    /// [`MANIFEST_SEALED_NAME`]; its objects must all be sealed).
    pub sealed: bool,
}

/// (De)serializes a `DateTime<Utc>` as RFC 3339 (chrono's `serde` feature is not enabled).
mod rfc3339 {
    use chrono::{DateTime, SecondsFormat, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let s = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&s)
            .map(|t| t.with_timezone(&Utc))
            .map_err(serde::de::Error::custom)
    }
}

/// The tree of a version 2 file entry.
pub(super) fn tree_of(f: &FileEntry) -> Option<(Hash, u8)> {
    Some((objects::parse_hex(f.root.as_deref()?)?, f.depth?))
}

/// Builds an [`ImageInfo`] from a manifest whose file is `manifest_len` bytes.
pub(super) fn image_info(
    id: &str,
    seq: u64,
    path: PathBuf,
    manifest: Manifest,
    manifest_len: u64,
    sealed: bool,
) -> ImageInfo {
    let size_bytes = manifest.files.iter().map(|f| f.size).sum::<u64>();
    let new_bytes = match &manifest.stored {
        Some(s) => s.pack_bytes + manifest_len,
        None => size_bytes + manifest_len,
    };
    ImageInfo {
        id: id.to_string(),
        seq,
        path,
        created: manifest.created,
        size_bytes,
        new_bytes,
        manifest,
        sealed,
    }
}

/// Loads and validates the manifest of the checkpoint directory `path`
/// (a real directory: the caller checked it with lstat): the sealed
/// manifest if there is one (opened with `key`), else `MANIFEST.json`.
/// The manifest must be a regular file of at most [`MAX_MANIFEST_BYTES`],
/// read without following a symlink or blocking on a FIFO. A manifest that
/// does not read, authenticate or parse is rebuilt from its parity or read
/// from the store's second copy when it can be (logged); else the reason
/// it is damaged is returned. Only a manifest the caller may not read is
/// an error ([`StoreError::PermissionDenied`]).
pub(super) fn load_image(
    id: &str,
    seq: u64,
    path: PathBuf,
    key: Option<&StoreKey>,
    mirror: &Mirror,
) -> Result<Result<ImageInfo, String>, StoreError> {
    let direct = load_direct(id, seq, &path, key)?;
    let Err(why) = direct else {
        return Ok(direct);
    };
    for (name, sealed) in [(MANIFEST_SEALED_NAME, true), (MANIFEST_NAME, false)] {
        let p = path.join(name);
        let present = p.symlink_metadata().is_ok()
            || parity::par_path(&p).exists()
            || mirror.alt(&p).is_some_and(|a| a.exists());
        if !present {
            continue;
        }
        let mut parse = |b: &[u8]| parse_bytes(id, seq, &path, key, b, sealed);
        return Ok(
            match heal::read_all(mirror, &p, MAX_MANIFEST_BYTES, &mut parse) {
                Ok(info) => Ok(info),
                Err(more) if more.resource => {
                    return Err(StoreError::Resource(format!("{why}; {more}")))
                }
                Err(more) if more.why.is_empty() => Err(why),
                Err(more) => Err(format!("{why}; cannot repair it: {more}")),
            },
        );
    }
    Ok(Err(why))
}

/// The manifest as it is on disk, without repair.
fn load_direct(
    id: &str,
    seq: u64,
    path: &Path,
    key: Option<&StoreKey>,
) -> Result<Result<ImageInfo, String>, StoreError> {
    for (name, sealed) in [(MANIFEST_SEALED_NAME, true), (MANIFEST_NAME, false)] {
        let p = path.join(name);
        match fsutil::read_limited(&p, MAX_MANIFEST_BYTES) {
            Ok(bytes) => return Ok(parse_bytes(id, seq, path, key, &bytes, sealed)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) if fsutil::is_permission_denied(&e) || crate::fdlimit::is_resource_error(&e) => {
                return Err(io_err(&p)(e))
            }
            Err(e) => {
                return Ok(Err(format!(
                    "cannot read {}",
                    fsutil::describe_error(&p, &e)
                )))
            }
        }
    }
    Ok(Err(format!("{MANIFEST_NAME} is missing")))
}

/// Parses a manifest file's bytes (a sealed one is opened with `key` first).
fn parse_bytes(
    id: &str,
    seq: u64,
    path: &Path,
    key: Option<&StoreKey>,
    bytes: &[u8],
    sealed: bool,
) -> Result<ImageInfo, String> {
    let len = bytes.len() as u64;
    if !sealed {
        return parse_manifest(id, seq, path.to_path_buf(), bytes, len, false);
    }
    let Some(key) = key else {
        return Err(format!(
            "{MANIFEST_SEALED_NAME} is sealed and no store key is loaded"
        ));
    };
    let zjson = key
        .open_blob(MANIFEST_MAGIC_SEALED, id, bytes)
        .map_err(|_| {
            format!(
                "{} does not authenticate under the store key {} (damaged, or sealed with \
                 another key)",
                path.join(MANIFEST_SEALED_NAME).display(),
                key.path().display()
            )
        })?;
    let json = zstd::bulk::decompress(&zjson, MAX_MANIFEST_BYTES as usize)
        .map_err(|e| format!("{MANIFEST_SEALED_NAME}: cannot decompress: {e}"))?;
    parse_manifest(id, seq, path.to_path_buf(), &json, len, true)
}

/// Seals a manifest's JSON for [`MANIFEST_SEALED_NAME`].
pub(super) fn seal_manifest(key: &StoreKey, id: &str, json: &[u8]) -> io::Result<Vec<u8>> {
    let z = zstd::bulk::compress(json, 3)?;
    key.seal_blob(MANIFEST_MAGIC_SEALED, id, &z)
}

/// Parses and checks a manifest's JSON (`file_len`: bytes of its file).
fn parse_manifest(
    id: &str,
    seq: u64,
    path: PathBuf,
    bytes: &[u8],
    file_len: u64,
    sealed: bool,
) -> Result<ImageInfo, String> {
    #[derive(Deserialize)]
    struct VersionProbe {
        version: u32,
    }

    let probe: VersionProbe = serde_json::from_slice(bytes)
        .map_err(|e| format!("{MANIFEST_NAME} is unparseable: {e}"))?;
    if probe.version != MANIFEST_VERSION && probe.version != MANIFEST_VERSION_V1 {
        return Err(format!(
            "{MANIFEST_NAME} has unknown version {} (expected {MANIFEST_VERSION})",
            probe.version
        ));
    }
    let manifest: Manifest = serde_json::from_slice(bytes)
        .map_err(|e| format!("{MANIFEST_NAME} is unparseable: {e}"))?;
    if manifest.id != id {
        return Err(format!(
            "{MANIFEST_NAME} names id {:?} but the directory is {id:?}",
            manifest.id
        ));
    }
    Ok(image_info(id, seq, path, manifest, file_len, sealed))
}

/// Parses a checkpoint id `<seq (>= 6 digits)>-<%Y%m%dT%H%M%SZ>`, returning the sequence number.
pub(super) fn parse_id(id: &str) -> Option<u64> {
    let (seq, time) = id.split_once('-')?;
    if seq.len() < 6 || !seq.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if time.len() != 16 || NaiveDateTime::parse_from_str(time, ID_TIME_FORMAT).is_err() {
        return None;
    }
    seq.parse().ok()
}

/// The sequence number at the start of `s`: leading digits followed by `-` or end of string.
pub(super) fn leading_seq(s: &str) -> Option<u64> {
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    if end == 0 || !(end == s.len() || s[end..].starts_with('-')) {
        return None;
    }
    s[..end].parse().ok()
}

/// A plain name, or `dir/name` one level down: no empty, `.` or `..`
/// components, not the manifest.
pub(super) fn valid_file_name(name: &str) -> bool {
    let parts: Vec<&str> = name.split('/').collect();
    parts.len() <= 2
        && parts
            .iter()
            .all(|p| !p.is_empty() && *p != "." && *p != "..")
        && name != MANIFEST_NAME
}

/// A symlink target the store keeps: one relative plain name (a subdirectory).
pub(super) fn valid_link(target: &str) -> bool {
    !target.is_empty() && !target.contains('/') && target != "." && target != ".."
}
