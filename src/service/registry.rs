//! The jobs a running supervise supervises, by name: the control socket's
//! server looks requests up here, the service adds submitted jobs and
//! removes cancelled ones.

use std::sync::{Arc, RwLock};

use crate::config::JobConfig;
use crate::control::JobHandle;

/// One supervised job.
#[derive(Clone)]
pub struct Entry {
    /// Its control side.
    pub handle: JobHandle,
    /// Its configuration (the service's overrides applied).
    pub cfg: Arc<JobConfig>,
}

/// The supervised jobs.
#[derive(Default)]
pub struct Registry {
    entries: RwLock<Vec<Entry>>,
}

impl Registry {
    /// A registry of `entries`.
    pub fn new(entries: Vec<Entry>) -> Registry {
        Registry {
            entries: RwLock::new(entries),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Entry>> {
        self.entries.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Entry>> {
        self.entries.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The jobs' control sides, now.
    pub fn handles(&self) -> Vec<JobHandle> {
        self.read().iter().map(|e| e.handle.clone()).collect()
    }

    /// The job named `name` exactly (its full name).
    pub fn get(&self, name: &str) -> Option<Entry> {
        self.read().iter().find(|e| e.handle.name == name).cloned()
    }

    /// Adds a job; `false` if one of that name is already there.
    pub fn add(&self, entry: Entry) -> bool {
        let mut w = self.write();
        if w.iter().any(|e| e.handle.name == entry.handle.name) {
            return false;
        }
        w.push(entry);
        true
    }

    /// Removes the job named `name`.
    pub fn remove(&self, name: &str) -> Option<Entry> {
        let mut w = self.write();
        let i = w.iter().position(|e| e.handle.name == name)?;
        Some(w.remove(i))
    }

    /// The jobs of user `uid`.
    pub fn of_owner(&self, uid: u32) -> Vec<Entry> {
        self.read()
            .iter()
            .filter(|e| e.handle.owner == Some(uid))
            .cloned()
            .collect()
    }

    /// How many jobs there are.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// True if there is none.
    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }
}
