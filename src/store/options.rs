//! The `[store]` table of a job file: how a job's image store protects what
//! it keeps (encryption, parity, a second copy) and checks it (scrub).

use std::path::PathBuf;
use std::time::Duration;

/// Default name of the store key, inside the job's state directory.
pub const DEFAULT_KEY_FILE: &str = "store.key";

/// How a job's image store is written and looked after.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreOptions {
    /// Seal new checkpoints (objects, indexes, manifests) with the store
    /// key (`encryption`, default true).
    pub encryption: bool,
    /// The store key (`key_file`, default `<state_dir>/store.key`):
    /// generated when the store gets its first encrypted checkpoint; must
    /// be in a trusted location and readable by its owner only.
    pub key_file: PathBuf,
    /// Write Reed-Solomon parity next to every new store file (`parity`,
    /// default true).
    pub parity: bool,
    /// With `copies = 2`: the directory that holds a second copy of every
    /// store file (`copy_dir`).
    pub copy_dir: Option<PathBuf>,
    /// Verify (and repair) the whole store in the background this often
    /// (`scrub`, default off).
    pub scrub: Option<Duration>,
}

impl StoreOptions {
    /// The defaults, with the key at `key_file`.
    pub fn new(key_file: PathBuf) -> StoreOptions {
        StoreOptions {
            encryption: true,
            key_file,
            parity: true,
            copy_dir: None,
            scrub: None,
        }
    }
}
