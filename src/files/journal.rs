//! What the job did to the names in its watched directories, as the
//! tracker learned it from fanotify ([`super::tracker`]): pure state, no
//! I/O, so that its rules are unit-tested.
//!
//! * Every name the job created, wrote (closed after writing), renamed
//!   (either end) or deleted is *touched*. Each checkpoint keeps the state
//!   of every touched name ([`Journal::names`]): its content if it exists,
//!   else that it is absent. A restore puts them back by name.
//! * A name first touched after the image being restored was taken is not
//!   in that image. If it did not exist at the checkpoint before that first
//!   touch, the job created it: the restore removes it. Otherwise the job
//!   changed a file it had never written before, whose content no image
//!   holds: it is left as it is, with a warning ([`Journal::rollback_plan`]).
//! * Whether a name existed at a checkpoint: asked of the file system at
//!   that checkpoint for every name some event (the job's or another
//!   process's) concerned; for a name no event concerned, the listing of
//!   its directory taken when the directory was first watched.
//!   No directory is listed again at a checkpoint (it would lengthen the
//!   freeze with the size of the directories).
//! * A name another process touched after the job's last touch is not the
//!   job's any more: never removed.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};

/// See the module docs.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Journal {
    /// Touched names, with whether each was absent at the checkpoint
    /// before its first touch (the job created it).
    touched: BTreeMap<PathBuf, bool>,
    /// Touched names another process touched since the job's last touch.
    outsider_after: BTreeSet<PathBuf>,
    /// The names in each directory when it was first watched.
    listed: HashSet<PathBuf>,
    /// Whether each name some event concerned exists, after the last one.
    exists: HashMap<PathBuf, bool>,
    /// `exists` at the last checkpoint.
    at_checkpoint: HashMap<PathBuf, bool>,
    /// Why the journal may be incomplete (events lost), if it may.
    pub incomplete: Option<String>,
}

/// What a restore does with the names the image does not record.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Created by the job after the image: removed.
    pub remove: Vec<PathBuf>,
    /// Changed by the job after the image, but not its own before: left,
    /// with the reason.
    pub leave: Vec<(PathBuf, String)>,
}

impl Journal {
    fn existed_at_checkpoint(&self, p: &Path) -> bool {
        match self.at_checkpoint.get(p) {
            Some(&e) => e,
            None => self.listed.contains(p),
        }
    }

    /// A process of the job touched `p`, which exists after it (`now`) or
    /// not.
    pub fn job_touch(&mut self, p: &Path, now: bool) {
        let born = !self.existed_at_checkpoint(p);
        self.touched.entry(p.to_path_buf()).or_insert(born);
        self.outsider_after.remove(p);
        self.exists.insert(p.to_path_buf(), now);
    }

    /// Another process touched `p`.
    pub fn outsider_touch(&mut self, p: &Path, now: bool) {
        if self.touched.contains_key(p) {
            self.outsider_after.insert(p.to_path_buf());
        }
        self.exists.insert(p.to_path_buf(), now);
    }

    /// The job renamed directory `from` to `to`: every name under it moves.
    pub fn dir_renamed(&mut self, from: &Path, to: &Path) {
        let moved = |p: &PathBuf| -> PathBuf {
            match p.strip_prefix(from) {
                Ok(rest) if !rest.as_os_str().is_empty() => to.join(rest),
                _ => p.clone(),
            }
        };
        rekey(&mut self.touched, &moved);
        rekey(&mut self.exists, &moved);
        rekey(&mut self.at_checkpoint, &moved);
        self.outsider_after = std::mem::take(&mut self.outsider_after)
            .iter()
            .map(moved)
            .collect();
        self.listed = std::mem::take(&mut self.listed).iter().map(moved).collect();
    }

    /// A new run's watch begins: what was known of the names goes.
    pub fn new_run(&mut self) {
        self.listed.clear();
        self.exists.clear();
        self.at_checkpoint.clear();
    }

    /// The names found in a directory when it began to be watched.
    pub fn add_listing(&mut self, names: impl IntoIterator<Item = PathBuf>) {
        self.listed.extend(names);
    }

    /// A checkpoint (after it recorded [`names`](Self::names)): what
    /// exists now is what existed at it. A touched name that does not
    /// exist now needs no journal entry any more: no image after this one
    /// holds anything of it, and should the job touch it again, it is its
    /// creation (so a job that makes and removes a new temporary file at
    /// every step does not grow the journal, nor the images' records).
    ///
    /// Whether a name exists is asked of the file system (`exists_now`),
    /// for every name an event concerned: the events alone cannot say (a
    /// `RENAME_EXCHANGE` comes as two renames, each name "moved away").
    pub fn checkpoint(&mut self, exists_now: &dyn Fn(&Path) -> bool) {
        let names: Vec<PathBuf> = self
            .exists
            .keys()
            .chain(self.touched.keys())
            .cloned()
            .collect();
        for p in names {
            let e = exists_now(&p);
            self.exists.insert(p, e);
        }
        let gone: Vec<PathBuf> = self
            .touched
            .keys()
            .filter(|p| self.exists.get(*p) == Some(&false))
            .cloned()
            .collect();
        for p in &gone {
            self.touched.remove(p);
            self.outsider_after.remove(p);
        }
        let listed = &self.listed;
        self.exists.retain(|p, e| *e || listed.contains(p));
        self.at_checkpoint = self.exists.clone();
    }

    /// Every touched name, for the checkpoint to record.
    pub fn names(&self) -> Vec<PathBuf> {
        self.touched.keys().cloned().collect()
    }

    /// How a restore treats the touched names an image does not record
    /// (`recorded`: the paths it does record).
    pub fn rollback_plan(&self, recorded: &BTreeSet<PathBuf>) -> Plan {
        let mut plan = Plan::default();
        for (p, &born) in &self.touched {
            if recorded.contains(p) {
                continue;
            }
            if self.outsider_after.contains(p) {
                plan.leave.push((
                    p.clone(),
                    "another process changed it after the job did".into(),
                ));
            } else if born {
                plan.remove.push(p.clone());
            } else {
                plan.leave.push((
                    p.clone(),
                    "the job changed it after the checkpoint, but had not written it before, \
                     so no image holds its earlier content (list it in [files] snapshot)"
                        .into(),
                ));
            }
        }
        plan
    }

    /// When a restored job starts: it is its image again, and has touched
    /// exactly the names the image recorded as its own.
    pub fn reset(&mut self, names: impl IntoIterator<Item = PathBuf>) {
        self.touched = names.into_iter().map(|p| (p, false)).collect();
        self.outsider_after.clear();
        self.incomplete = None;
    }
}

/// Renames every key of `m` by `f`.
fn rekey<M>(m: &mut M, f: &impl Fn(&PathBuf) -> PathBuf)
where
    M: Default + IntoIterator<Item = (PathBuf, bool)> + FromIterator<(PathBuf, bool)>,
{
    *m = std::mem::take(m)
        .into_iter()
        .map(|(p, b)| (f(&p), b))
        .collect();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> PathBuf {
        PathBuf::from(s)
    }

    #[test]
    fn created_after_the_checkpoint_is_removed_existing_is_left() {
        let mut j = Journal::default();
        j.add_listing([p("/w/input"), p("/w/restart.dat")]);
        j.job_touch(&p("/w/restart.tmp"), true); // created
        j.job_touch(&p("/w/restart.tmp"), false); // renamed away...
        j.job_touch(&p("/w/restart.dat"), true); // ...over restart.dat
        j.job_touch(&p("/w/input"), false); // deleted
        let recorded: BTreeSet<PathBuf> = [p("/w/restart.dat")].into();
        let plan = j.rollback_plan(&recorded);
        assert_eq!(plan.remove, vec![p("/w/restart.tmp")]);
        assert_eq!(plan.leave.len(), 1);
        assert_eq!(plan.leave[0].0, p("/w/input"));
        assert_eq!(
            j.names(),
            vec![p("/w/input"), p("/w/restart.dat"), p("/w/restart.tmp")]
        );
    }

    #[test]
    fn existence_at_the_checkpoint_comes_from_the_events_before_it() {
        let mut j = Journal::default();
        j.add_listing([p("/w/old")]);
        // Another process creates `x` and removes `old` before the
        // checkpoint; the job then renames onto both after it.
        j.outsider_touch(&p("/w/x"), true);
        j.outsider_touch(&p("/w/old"), false);
        j.checkpoint(&|q| q == Path::new("/w/x"));
        j.outsider_touch(&p("/w/y"), true); // after the checkpoint
        j.job_touch(&p("/w/x"), true);
        j.job_touch(&p("/w/old"), true);
        j.job_touch(&p("/w/y"), false);
        let plan = j.rollback_plan(&BTreeSet::new());
        // `old` did not exist at the checkpoint: the job made it; nor did
        // `y` (made by another process after it, deleted by the job: the
        // restore's removal finds nothing); `x` existed.
        assert_eq!(plan.remove, vec![p("/w/old"), p("/w/y")]);
        assert_eq!(
            plan.leave.iter().map(|l| &l.0).collect::<Vec<_>>(),
            [&p("/w/x")]
        );
    }

    #[test]
    fn names_gone_at_a_checkpoint_leave_the_journal() {
        let mut j = Journal::default();
        j.add_listing([p("/w/input")]);
        for i in 0..100 {
            let t = p(&format!("/w/tmp.{i}"));
            j.job_touch(&t, true);
            j.job_touch(&t, false);
        }
        j.job_touch(&p("/w/input"), false); // an input the job deleted
        j.job_touch(&p("/w/keep"), true);
        j.checkpoint(&|q| q == Path::new("/w/keep"));
        assert_eq!(j.names(), vec![p("/w/keep")]);
        // Made again after the checkpoint: the job's creation.
        j.job_touch(&p("/w/tmp.7"), true);
        // Made again after the checkpoint: absent at it, so the job's.
        j.job_touch(&p("/w/input"), true);
        let plan = j.rollback_plan(&[p("/w/keep")].into());
        assert_eq!(plan.remove, vec![p("/w/input"), p("/w/tmp.7")]);
    }

    /// Another process swaps two names with RENAME_EXCHANGE (two rename
    /// events, each name "moved away"); both still exist, and the job
    /// writing the file now under the other name does not make it the
    /// job's creation.
    #[test]
    fn an_exchange_does_not_make_names_absent() {
        let mut j = Journal::default();
        j.add_listing([p("/w/out"), p("/w/link")]);
        j.outsider_touch(&p("/w/out"), false);
        j.outsider_touch(&p("/w/link"), true);
        j.outsider_touch(&p("/w/link"), false);
        j.outsider_touch(&p("/w/out"), true);
        j.checkpoint(&|q| q == Path::new("/w/out") || q == Path::new("/w/link"));
        j.job_touch(&p("/w/link"), true);
        assert!(j.rollback_plan(&BTreeSet::new()).remove.is_empty());
    }

    #[test]
    fn first_touch_decides_and_outsiders_win() {
        let mut j = Journal::default();
        j.job_touch(&p("/w/a"), true);
        j.checkpoint(&|q| q == Path::new("/w/a"));
        j.job_touch(&p("/w/a"), true);
        j.job_touch(&p("/w/c"), true);
        j.outsider_touch(&p("/w/c"), true);
        j.outsider_touch(&p("/w/zzz"), true); // never the job's: ignored
        let plan = j.rollback_plan(&BTreeSet::new());
        assert_eq!(plan.remove, vec![p("/w/a")]);
        assert_eq!(plan.leave.len(), 1);
        assert_eq!(plan.leave[0].0, p("/w/c"));
        // The job touching it again makes it the job's again.
        j.job_touch(&p("/w/c"), true);
        assert_eq!(
            j.rollback_plan(&BTreeSet::new()).remove,
            vec![p("/w/a"), p("/w/c")]
        );
    }

    #[test]
    fn directory_renames_move_names_and_reset_forgets() {
        let mut j = Journal::default();
        j.job_touch(&p("/w/out/x"), true);
        j.job_touch(&p("/w/outer"), true);
        j.dir_renamed(&p("/w/out"), &p("/w/done"));
        assert_eq!(j.names(), vec![p("/w/done/x"), p("/w/outer")]);
        j.reset([p("/w/r")]);
        assert_eq!(j.names(), vec![p("/w/r")]);
        assert!(j.rollback_plan(&BTreeSet::new()).remove.is_empty());
    }
}
