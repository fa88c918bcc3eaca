//! Maintenance: retention ([`ImageStore::retain`]), garbage collection
//! (mark, sweep, repack: [`ImageStore::gc`]) and removal of crash
//! leftovers (see "Crash safety" in [`crate::store`]).

use std::fs;
use std::io;
use std::path::Path;

use tracing::{debug, info, warn};

use super::format::{
    parse_id, tree_of, DELETING_PREFIX, MANIFEST_VERSION, PACKS_DIR, STAGING_PREFIX,
};
use super::objects::{self, Hash, HashSetH, ObjectDb, PieceError};
use super::pack::{PackWriter, Published};
use super::parity;
use super::progress::{Batch, Phase};
use super::reader::Reader;
use super::scratch::{remove_ours_with_prefix, tmpfs_staging_prefix};
use super::util::{fsync_dir, remove_any};
use super::verify::logical_bytes;
use super::{check_packs_dir, io_err, ImageStore, StoreError};
use crate::fsutil;

/// Result of [`ImageStore::gc`].
#[derive(Debug, Clone, Default)]
pub struct GcReport {
    /// Packs removed because nothing referenced them.
    pub removed_packs: usize,
    /// Packs rewritten without their dead objects.
    pub rewritten_packs: usize,
    /// Bytes of pack files freed.
    pub freed_bytes: u64,
    /// Objects referenced by published checkpoints.
    pub live_objects: u64,
    /// Bytes of pack files after gc.
    pub pack_bytes: u64,
    /// Crash leftovers removed.
    pub leftovers: usize,
    /// Set when gc deleted nothing because the store could not be read whole.
    pub refused: Option<String>,
}

impl ImageStore {
    /// Keeps the newest `keep` published checkpoints (`keep >= 1`) and removes
    /// the rest crash-safely: each is renamed to `.deleting-<id>`, the store
    /// directory is fsynced, then the renamed directories are removed. Returns
    /// the removed ids, newest first. Their data is reclaimed by [`gc`](Self::gc).
    ///
    /// Only valid (listed) checkpoints count and are removed; invalid entries
    /// are left alone. A failure to remove an already-renamed directory is
    /// only logged (the leftover is removed by the next [`open`](Self::open)).
    pub fn retain(&self, keep: usize) -> Result<Vec<String>, StoreError> {
        if keep == 0 {
            return Err(StoreError::InvalidKeep {
                keep,
                dir: self.dir.clone(),
            });
        }
        let _lock = self.lock(true)?;
        let images = self.list()?;
        if images.len() <= keep {
            return Ok(Vec::new());
        }
        let mut renamed = Vec::new();
        let mut result = Ok(());
        for image in &images[keep..] {
            let target = self.dir.join(format!("{DELETING_PREFIX}{}", image.id));
            if let Err(e) = fs::rename(&image.path, &target) {
                result = Err(io_err(&image.path)(e));
                break;
            }
            renamed.push((image.id.clone(), target));
        }
        if !renamed.is_empty() {
            fsync_dir(&self.dir)?;
            crate::failpoint::point("retain-after-rename");
        }
        let mut removed = Vec::new();
        for (id, path) in renamed {
            if let Err(e) = fs::remove_dir_all(&path) {
                warn!(path = %path.display(), error = %e,
                    "failed to remove deleted checkpoint; will retry at next open");
            }
            debug!(checkpoint = %id, "retention removed checkpoint");
            if let Some(copy) = self.mirror.copy_root() {
                let p = copy.join(&id);
                if p.is_dir() {
                    if let Err(e) = fs::remove_dir_all(&p) {
                        warn!(path = %p.display(), error = %e, "failed to remove the second copy of a deleted checkpoint");
                    }
                }
            }
            removed.push(id);
        }
        result.map(|()| removed)
    }

    /// Reclaims space no published checkpoint references (see the module
    /// documentation): removes crash leftovers (never staging directories),
    /// unreferenced packs, and rewrites packs that are less than half live.
    /// Holds the exclusive lock, so it cannot race a commit or retention in
    /// another process.
    pub fn gc(&self) -> Result<GcReport, StoreError> {
        fsutil::check_trusted("image directory", &self.dir)?;
        let _lock = self.lock(true)?;
        let mut report = GcReport {
            leftovers: self.remove_leftovers(false)?,
            ..Default::default()
        };
        let (infos, skipped) = self.scan()?;
        let mut db = self.db()?;
        if let Some(s) = skipped.iter().find(|s| parse_id(&s.name).is_some()) {
            report.refused = Some(format!(
                "checkpoint directory {} cannot be read ({}); deleting nothing",
                s.name, s.reason
            ));
        }
        // Mark.
        let mut live = HashSetH::default();
        if report.refused.is_none() {
            let mut reader = Reader::new(&db).map_err(io_err(db.dir()))?;
            let total = infos.iter().map(logical_bytes).sum();
            let _phase = Phase::start(self.progress(), "marking", total);
            let mut batch = Batch::new(self.progress());
            'images: for img in &infos {
                for f in &img.manifest.files {
                    if f.link.is_none() {
                        batch.add(f.size);
                    }
                    let Some((root, depth)) = tree_of(f) else {
                        if img.manifest.version >= MANIFEST_VERSION && f.link.is_none() {
                            report.refused = Some(format!(
                                "checkpoint {}: file {} has no tree",
                                img.id, f.name
                            ));
                            break 'images;
                        }
                        continue;
                    };
                    if let Err(e) = mark(&mut reader, &root, depth, &mut live) {
                        report.refused = Some(format!(
                            "checkpoint {}: file {}: {e}; deleting nothing",
                            img.id, f.name
                        ));
                        break 'images;
                    }
                }
            }
        }
        if let Some(why) = &report.refused {
            warn!(store = %self.dir.display(), reason = %why, "gc deleted nothing");
            report.pack_bytes = db.file_bytes();
            return Ok(report);
        }
        report.live_objects = live.len() as u64;
        // Sweep: live bytes per pack (an object counts for the pack the index maps it to).
        let n = db.packs.len();
        let mut live_bytes = vec![0u64; n];
        let mut live_objs: Vec<Vec<(u64, Hash)>> = vec![Vec::new(); n];
        for (h, loc) in db.iter() {
            if live.contains(h) {
                live_bytes[loc.pack as usize] += loc.stored_len as u64;
                live_objs[loc.pack as usize].push((loc.offset, *h));
            }
        }
        let packs_dir = db.dir().to_path_buf();
        let mut changed = false;
        let rewrite = |i: usize, stored_bytes: u64| {
            let dead = stored_bytes - live_bytes[i];
            live_bytes[i] != 0 && dead > live_bytes[i] && dead >= (1 << 20)
        };
        let to_copy: u64 = (db.packs.iter().enumerate())
            .filter(|(i, p)| rewrite(*i, p.stored_bytes))
            .map(|(i, _)| live_bytes[i])
            .sum();
        let _phase = (to_copy > 0).then(|| Phase::start(self.progress(), "repacking", to_copy));
        for (i, pack) in db.packs.clone().iter().enumerate() {
            if live_bytes[i] == 0 {
                self.remove_pack_everywhere(&packs_dir, &pack.name)?;
                report.removed_packs += 1;
                report.freed_bytes += pack.file_bytes;
                changed = true;
                info!(pack = %pack.name, bytes = pack.file_bytes, "gc removed an unreferenced pack");
            } else if rewrite(i, pack.stored_bytes) {
                let objs = &mut live_objs[i];
                objs.sort_unstable();
                let mut batch = Batch::new(self.progress());
                match repack(&db, &packs_dir, objs, self.parity, &mut batch) {
                    Ok(Some(new)) => {
                        crate::failpoint::point("gc-after-repack");
                        self.remove_pack_everywhere(&packs_dir, &pack.name)?;
                        report.rewritten_packs += 1;
                        report.freed_bytes += pack.file_bytes.saturating_sub(new.file_bytes);
                        changed = true;
                        info!(pack = %pack.name, into = %new.name, live = new.objects, freed = pack.file_bytes.saturating_sub(new.file_bytes), "gc rewrote a mostly dead pack");
                    }
                    Ok(None) => {}
                    Err(e) => {
                        warn!(pack = %pack.name, error = %e, "gc could not rewrite a pack; kept as is")
                    }
                }
            }
        }
        if changed {
            fsync_dir(&packs_dir)?;
            db.refresh()?;
        }
        report.pack_bytes = db.file_bytes();
        Ok(report)
    }

    /// Removes a pack (and its sidecars) here and in the second copy.
    fn remove_pack_everywhere(&self, packs_dir: &Path, name: &str) -> Result<(), StoreError> {
        remove_pack(packs_dir, name)?;
        if let Some(alt) = self.mirror.alt(packs_dir) {
            if alt.is_dir() {
                if let Err(e) = remove_pack(&alt, name) {
                    warn!(pack = %name, error = %e, "cannot remove the pack's second copy");
                }
            }
        }
        Ok(())
    }

    /// Bytes of all pack files and the number of packs.
    pub fn pack_usage(&self) -> Result<(u64, usize), StoreError> {
        let _lock = self.lock(false)?;
        let db = self.db()?;
        Ok((db.file_bytes(), db.packs.len()))
    }

    /// Removes crash leftovers: `.deleting-*`, `packs/.tmp-*`, packs without
    /// an index and (with `staging`) `.staging-*`. Call under the exclusive lock.
    pub(super) fn remove_leftovers(&self, staging: bool) -> Result<usize, StoreError> {
        let mut n = 0;
        if staging {
            // Only our own directories: anyone may create names in /dev/shm.
            n += remove_ours_with_prefix(
                Path::new("/dev/shm"),
                &tmpfs_staging_prefix(&self.dir),
                "leftover of an interrupted checkpoint",
            );
        }
        for entry in fs::read_dir(&self.dir).map_err(io_err(&self.dir))? {
            let entry = entry.map_err(io_err(&self.dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if !((staging && name.starts_with(STAGING_PREFIX)) || name.starts_with(DELETING_PREFIX))
            {
                continue;
            }
            let path = entry.path();
            warn!(path = %path.display(), "removing leftover of an interrupted checkpoint operation");
            remove_any(&path)?;
            n += 1;
        }
        if n > 0 {
            fsync_dir(&self.dir)?;
        }
        let packs = self.dir.join(PACKS_DIR);
        let mut m = 0;
        match fs::symlink_metadata(&packs) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            _ => check_packs_dir(&packs)?,
        }
        if let Ok(rd) = fs::read_dir(&packs) {
            for entry in rd {
                let entry = entry.map_err(io_err(&packs))?;
                let name = entry.file_name();
                let Some(name) = name.to_str() else { continue };
                let orphan = name.strip_suffix(".pack").is_some_and(|stem| {
                    fs::symlink_metadata(packs.join(format!("{stem}.idx"))).is_err()
                        && self
                            .mirror
                            .alt(&packs.join(format!("{stem}.idx")))
                            .map_or(true, |a| a.symlink_metadata().is_err())
                }) || name.strip_suffix(parity::PAR_SUFFIX).is_some_and(|base| {
                    // A sidecar whose pack is gone (an index's sidecar is
                    // written before the index: it goes with its pack).
                    let stem = base
                        .strip_suffix(".pack")
                        .or_else(|| base.strip_suffix(".idx"));
                    stem.is_some_and(|stem| {
                        fs::symlink_metadata(packs.join(format!("{stem}.pack"))).is_err()
                            && fs::symlink_metadata(packs.join(format!("{stem}.idx"))).is_err()
                    })
                });
                if name.starts_with(objects::TMP_PREFIX) || orphan {
                    let path = entry.path();
                    warn!(path = %path.display(), "removing leftover of an interrupted pack write");
                    remove_any(&path)?;
                    m += 1;
                }
            }
            if m > 0 {
                fsync_dir(&packs)?;
            }
        }
        Ok(n + m)
    }
}

/// Removes a pack: its index first (so the data is never listed without
/// it), then the data.
fn remove_pack(dir: &Path, name: &str) -> Result<(), StoreError> {
    let idx = dir.join(format!("{name}.idx"));
    match fs::remove_file(&idx) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&idx)(e)),
    }
    crate::failpoint::point("gc-between-index-and-pack");
    let pack = dir.join(format!("{name}.pack"));
    for p in [
        pack.clone(),
        parity::par_path(&pack),
        parity::par_path(&idx),
    ] {
        match fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&p)(e)),
        }
    }
    Ok(())
}

/// Copies the live objects `objs` (sorted by offset) of one pack into a new
/// pack, verifying each. Returns the new pack.
fn repack(
    db: &ObjectDb,
    dir: &Path,
    objs: &[(u64, Hash)],
    parity: bool,
    batch: &mut Batch<'_>,
) -> Result<Option<Published>, String> {
    let mut reader = Reader::new(db).map_err(|e| e.to_string())?;
    let mut w = PackWriter::new(dir, db.key().cloned())
        .map_err(|e| e.to_string())?
        .with_parity(parity)
        .with_copy(db.mirror().alt(dir));
    let mut buf = Vec::new();
    for (_, h) in objs {
        let loc = reader.read_stored(h, &mut buf).map_err(|e| e.to_string())?;
        batch.add(loc.stored_len as u64);
        w.add_stored(*h, &buf, loc.raw_len, loc.flags)
            .map_err(|e| e.to_string())?;
    }
    w.finish().map_err(|e| e.to_string())
}

/// Adds every object of a tree to `live`; subtrees already marked are skipped.
fn mark(
    reader: &mut Reader<'_>,
    root: &Hash,
    depth: u8,
    live: &mut HashSetH,
) -> Result<(), PieceError> {
    let mut level = vec![*root];
    let mut buf = Vec::new();
    for d in (0..=depth).rev() {
        let mut next = Vec::new();
        for h in level {
            if !live.insert(h) {
                continue;
            }
            if d > 0 {
                reader.read(&h, &mut buf)?;
                if buf.len() % 32 != 0 {
                    return Err(PieceError::new(format!(
                        "tree node {} has a bad length",
                        objects::hex(&h)
                    )));
                }
                next.extend(buf.chunks_exact(32).map(|c| Hash::try_from(c).unwrap()));
            } else if reader_missing(reader, &h) {
                return Err(PieceError::new(format!(
                    "object {} is missing from the store",
                    &objects::hex(&h)[..16]
                )));
            }
        }
        level = next;
    }
    Ok(())
}

fn reader_missing(reader: &Reader<'_>, h: &Hash) -> bool {
    !reader.contains(h)
}
