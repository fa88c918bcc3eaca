//! Progress of long store operations ([`ImageStore::verify_all`],
//! [`ImageStore::repair`], [`ImageStore::gc`], [`ImageStore::materialise`]):
//! a hook the store calls, with no terminal code here. The command line
//! draws a bar with it on a terminal; everyone else gets [`NoProgress`].
//!
//! Calls are cheap but go through `dyn`: the store batches them
//! ([`Batch`]), one [`Progress::advance`] per [`BATCH_BYTES`] or so, never
//! one per chunk.
//!
//! [`ImageStore::verify_all`]: super::ImageStore::verify_all
//! [`ImageStore::repair`]: super::ImageStore::repair
//! [`ImageStore::gc`]: super::ImageStore::gc
//! [`ImageStore::materialise`]: super::ImageStore::materialise

use std::fmt;
use std::sync::Arc;

/// Receives the progress of a long store operation. One operation may run
/// several phases, each `start` .. `advance`* .. `finish`; `advance` may be
/// called from several threads at once (materialise writes large files
/// with several).
pub trait Progress: Send + Sync {
    /// A phase begins: `what` names it ("verifying", ...); `total_bytes`
    /// is what the `advance` calls of a phase that completes add up to
    /// (each operation documents what its bytes are).
    fn start(&self, what: &str, total_bytes: u64);
    /// `bytes` more are done.
    fn advance(&self, bytes: u64);
    /// The phase ended (also when it failed part way).
    fn finish(&self);
}

/// Reports nothing (the default).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _what: &str, _total_bytes: u64) {}
    fn advance(&self, _bytes: u64) {}
    fn finish(&self) {}
}

/// The store's handle on its [`Progress`] (shared by clones).
#[derive(Clone)]
pub(super) struct ProgressHandle(pub(super) Arc<dyn Progress>);

impl Default for ProgressHandle {
    fn default() -> Self {
        ProgressHandle(Arc::new(NoProgress))
    }
}

impl fmt::Debug for ProgressHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Progress")
    }
}

/// Pending bytes are passed on once at least this many have gathered.
pub(super) const BATCH_BYTES: u64 = 1 << 20;

/// Gathers small advances into one [`Progress::advance`] per
/// [`BATCH_BYTES`]; the rest is passed on when it is dropped.
pub(super) struct Batch<'a> {
    progress: &'a dyn Progress,
    pending: u64,
    added: u64,
}

impl<'a> Batch<'a> {
    pub(super) fn new(progress: &'a dyn Progress) -> Self {
        Batch {
            progress,
            pending: 0,
            added: 0,
        }
    }

    /// Everything added so far (passed on or not).
    pub(super) fn added(&self) -> u64 {
        self.added
    }

    #[inline]
    pub(super) fn add(&mut self, bytes: u64) {
        self.pending += bytes;
        self.added += bytes;
        if self.pending >= BATCH_BYTES {
            self.flush();
        }
    }

    pub(super) fn flush(&mut self) {
        if self.pending > 0 {
            self.progress.advance(self.pending);
            self.pending = 0;
        }
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        self.flush();
    }
}

/// A started phase: [`Progress::finish`] is called when it is dropped
/// (also on an early return).
pub(super) struct Phase<'a>(&'a dyn Progress);

impl<'a> Phase<'a> {
    pub(super) fn start(progress: &'a dyn Progress, what: &str, total_bytes: u64) -> Self {
        progress.start(what, total_bytes);
        Phase(progress)
    }
}

impl Drop for Phase<'_> {
    fn drop(&mut self) {
        self.0.finish();
    }
}
