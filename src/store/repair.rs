//! Self-healing: [`ImageStore::repair`] (`supervise verify --repair`, and
//! the background scrub) rewrites what reads only repair in memory.
//!
//! Under the exclusive lock, for every store file (packs, indexes,
//! manifests): a file its sidecar says is damaged is rebuilt from parity
//! and rewritten; one parity cannot rebuild is copied back from the
//! second copy (when that copy checks); a missing or damaged second copy
//! is rewritten from the good one; a sidecar whose tables are gone is
//! written afresh once the file itself has verified by its own means
//! (objects and indexes authenticate, manifests parse). Then every
//! checkpoint is verified; objects that are still damaged are dropped from
//! their pack's index, so the next checkpoint that holds them (the job
//! still has those pages) stores them afresh, and the damage heals by
//! itself while the job lives.

use std::fs;
use std::path::{Path, PathBuf};

use tracing::{info, warn};

use super::format::{MANIFEST_NAME, MANIFEST_SEALED_NAME, PACKS_DIR};
use super::objects::{self, HashSetH};
use super::parity;
use super::progress::{Batch, Phase};
use super::util::copy_file;
use super::{ImageStore, StoreError};

/// What [`ImageStore::repair`] found and did.
#[derive(Debug, Clone, Default)]
pub struct RepairSummary {
    /// Files rebuilt from parity and rewritten.
    pub rebuilt: Vec<String>,
    /// Files copied back from (or into) the second copy.
    pub copied: Vec<String>,
    /// Sidecars written afresh.
    pub sidecars: Vec<String>,
    /// Files that could not be repaired, with why.
    pub unrepaired: Vec<(String, String)>,
    /// Objects dropped from indexes (damaged beyond repair).
    pub dropped_objects: u64,
    /// The verification after repairing.
    pub verify: super::VerifyReport,
}

impl RepairSummary {
    /// True if anything was changed on disk.
    pub fn changed(&self) -> bool {
        !self.rebuilt.is_empty()
            || !self.copied.is_empty()
            || !self.sidecars.is_empty()
            || self.dropped_objects > 0
    }
}

impl ImageStore {
    /// Repairs the store on disk (see the module documentation) and
    /// verifies it. Takes the exclusive lock.
    pub fn repair(&self) -> Result<RepairSummary, StoreError> {
        let mut sum = RepairSummary::default();
        {
            let _lock = self.lock(true)?;
            let files = self.store_files()?;
            let size = |f: &PathBuf| fs::symlink_metadata(f).map_or(0, |m| m.len());
            let sizes: Vec<u64> = files.iter().map(size).collect();
            let _phase = Phase::start(self.progress(), "checking store files", sizes.iter().sum());
            let mut batch = Batch::new(self.progress());
            for (f, n) in files.iter().zip(sizes) {
                self.repair_file(f, &mut sum);
                batch.add(n);
            }
        }
        // Verify everything (takes the shared lock itself).
        sum.verify = self.verify_all()?;
        {
            let _lock = self.lock(true)?;
            let mut db = self.db()?;
            let bad: HashSetH = db.bad_objects().into_iter().collect();
            if !bad.is_empty() {
                sum.dropped_objects = drop_objects(&mut db, &bad, &mut sum.unrepaired);
            }
            // Sidecars that were unusable: rewrite them for files that
            // verified.
            if self.parity {
                for f in &self.store_files()? {
                    let par = parity::par_path(f);
                    let usable = parity::check(f).is_ok();
                    if f.exists() && !usable && !sum.unrepaired.iter().any(|(n, _)| n == &name(f)) {
                        match parity::rewrite_par(f) {
                            Ok(_) => sum.sidecars.push(name(&par)),
                            Err(e) => sum.unrepaired.push((name(&par), e.to_string())),
                        }
                    }
                }
            }
        }
        if sum.changed() {
            sum.verify = self.verify_all()?;
        }
        Ok(sum)
    }

    /// Every pack, index and manifest of the store (also those only the
    /// second copy still has).
    fn store_files(&self) -> Result<Vec<PathBuf>, StoreError> {
        let mut out = Vec::new();
        let packs = self.dir.join(PACKS_DIR);
        let mut names = std::collections::BTreeSet::new();
        for d in [Some(packs.clone()), self.mirror.alt(&packs)]
            .into_iter()
            .flatten()
        {
            if let Ok(rd) = fs::read_dir(&d) {
                for e in rd.flatten() {
                    let n = e.file_name().to_string_lossy().into_owned();
                    if !n.starts_with('.') && (n.ends_with(".pack") || n.ends_with(".idx")) {
                        names.insert(n);
                    }
                }
            }
        }
        out.extend(names.into_iter().map(|n| packs.join(n)));
        let (infos, skipped) = self.scan()?;
        let ids = infos
            .iter()
            .map(|i| i.id.clone())
            .chain(skipped.into_iter().map(|s| s.name));
        for id in ids {
            let dir = self.dir.join(&id);
            for m in [MANIFEST_SEALED_NAME, MANIFEST_NAME] {
                let p = dir.join(m);
                let alt = self.mirror.alt(&p);
                if p.exists() || parity::par_path(&p).exists() || alt.is_some_and(|a| a.exists()) {
                    out.push(p);
                }
            }
        }
        Ok(out)
    }

    fn repair_file(&self, f: &Path, sum: &mut RepairSummary) {
        let alt = self.mirror.alt(f);
        let has_par = parity::par_path(f).exists();
        let mut good = !f.exists() && !has_par;
        if !f.exists() && !has_par && alt.is_none() {
            return;
        }
        if has_par {
            match parity::check(f) {
                Ok(r) if r.is_clean() => good = true,
                Ok(r) if r.recoverable => match parity::repair(f) {
                    Ok(rep) => {
                        good = true;
                        if rep.file_rewritten || rep.par_rewritten {
                            warn!(file = %f.display(), repaired = %rep.repaired, "repaired a damaged store file from its parity");
                            sum.rebuilt.push(name(f));
                        }
                    }
                    Err(e) => warn!(file = %f.display(), error = %e, "cannot repair from parity"),
                },
                Ok(_) => warn!(file = %f.display(), "damaged beyond what its parity repairs"),
                // A sidecar whose tables are gone: the file is judged by
                // its own check later.
                Err(parity::ParityError::TablesDamaged { .. }) => good = f.exists(),
                Err(e) => warn!(file = %f.display(), error = %e, "cannot check the parity"),
            }
        } else {
            good = f.exists();
        }
        let Some(alt) = alt else {
            if !good {
                sum.unrepaired
                    .push((name(f), "damaged and no second copy".into()));
            }
            return;
        };
        let alt_good = alt.exists()
            && match parity::check(&alt) {
                Ok(r) => r.is_clean() || (r.recoverable && parity::repair(&alt).is_ok()),
                Err(_) => !parity::par_path(&alt).exists(),
            };
        if !good && alt_good {
            let r = copy_file(&alt, f).and_then(|()| {
                let ap = parity::par_path(&alt);
                if ap.exists() {
                    copy_file(&ap, &parity::par_path(f))
                } else {
                    Ok(())
                }
            });
            match r {
                Ok(()) => {
                    warn!(file = %f.display(), from = %alt.display(), "restored a damaged store file from the second copy");
                    sum.copied.push(name(f));
                }
                Err(e) => sum.unrepaired.push((name(f), e.to_string())),
            }
        } else if good && !alt_good && f.exists() {
            if let Some(dir) = alt.parent() {
                let _ = fs::create_dir_all(dir);
            }
            let r = copy_file(f, &alt).and_then(|()| {
                let p = parity::par_path(f);
                if p.exists() {
                    copy_file(&p, &parity::par_path(&alt))
                } else {
                    Ok(())
                }
            });
            match r {
                Ok(()) => {
                    info!(file = %alt.display(), "rewrote the second copy of a store file");
                    sum.copied.push(name(&alt));
                }
                Err(e) => {
                    warn!(file = %alt.display(), error = %e, "cannot rewrite the second copy")
                }
            }
        } else if !good {
            sum.unrepaired
                .push((name(f), "damaged here and in the second copy".into()));
        }
    }
}

/// Rewrites the indexes that list objects in `bad` without them; returns
/// how many entries were dropped.
fn drop_objects(
    db: &mut objects::ObjectDb,
    bad: &HashSetH,
    unrepaired: &mut Vec<(String, String)>,
) -> u64 {
    let mut dropped = 0;
    let names: Vec<String> = db.packs.iter().map(|p| p.name.clone()).collect();
    for name in names {
        match db.rewrite_index_without(&name, bad) {
            Ok(0) => {}
            Ok(n) => {
                warn!(pack = %name, objects = n, "dropped damaged objects from the pack's index; the next checkpoint stores them afresh");
                dropped += n;
            }
            Err(e) => unrepaired.push((format!("{name}.idx"), e.to_string())),
        }
    }
    for h in bad {
        db.forget(h);
    }
    dropped
}

fn name(p: &Path) -> String {
    p.display().to_string()
}
