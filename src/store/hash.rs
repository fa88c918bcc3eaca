//! Object ids: BLAKE3 hashes (keyed when the store is sealed), their hex
//! form, and maps keyed by them. The bottom of the store: it imports no
//! other part of it.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

/// An object's name: the BLAKE3 hash of its contents.
pub type Hash = [u8; 32];

/// BLAKE3 of `data`.
pub fn hash(data: &[u8]) -> Hash {
    *blake3::hash(data).as_bytes()
}

/// Lower-case hex of a hash.
pub fn hex(h: &Hash) -> String {
    hex::encode(h)
}

/// Parses a 64-digit hex hash.
pub fn parse_hex(s: &str) -> Option<Hash> {
    let v = hex::decode(s).ok()?;
    v.try_into().ok()
}

/// Hashes are uniformly random: their first 8 bytes are a perfect hash key.
#[derive(Default)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.0 ^= u64::from_le_bytes(b);
        }
    }
}

/// A map keyed by [`Hash`].
pub type HashMapH<V> = HashMap<Hash, V, BuildHasherDefault<IdHasher>>;
/// A set of [`Hash`]es.
pub type HashSetH = HashSet<Hash, BuildHasherDefault<IdHasher>>;
