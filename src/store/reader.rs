//! Verified reads of stored objects: every object is checked (sealed ones
//! authenticate under the store key, plain ones match their hash) and,
//! when that fails, read the slow way: another copy in the store, the
//! pack's parity, the store's second copy (`heal.rs`).

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::heal;
use super::objects::{
    hash, hex, Hash, Loc, ObjectDb, PieceError, FANOUT, FLAG_SEALED, FLAG_ZSTD, RUN_MAX,
};
use crate::fsutil;

/// Receives each verified chunk: (chunk index, contents).
pub type ChunkSink<'a> = dyn FnMut(usize, &[u8]) -> Result<(), PieceError> + 'a;

/// Reads objects, verifying each against its hash.
pub struct Reader<'a> {
    db: &'a ObjectDb,
    files: HashMap<u32, File>,
    dctx: zstd::bulk::Decompressor<'static>,
    run: Vec<u8>,
    opened: Vec<u8>,
    sealed_only: bool,
}

/// How [`Reader::decode`] checks an object.
struct Decode<'b> {
    dctx: &'b mut zstd::bulk::Decompressor<'static>,
    opened: &'b mut Vec<u8>,
    sealed_only: bool,
}

impl<'a> Reader<'a> {
    /// A reader over `db`.
    pub fn new(db: &'a ObjectDb) -> io::Result<Reader<'a>> {
        Ok(Reader {
            db,
            files: HashMap::new(),
            dctx: zstd::bulk::Decompressor::new()?,
            run: Vec::new(),
            opened: Vec::new(),
            sealed_only: false,
        })
    }

    /// Accept only sealed objects (reading a sealed checkpoint: an
    /// unsealed object under one of its ids was not written by supervise
    /// with this key).
    pub fn sealed_only(mut self, on: bool) -> Reader<'a> {
        self.sealed_only = on;
        self
    }

    fn ctx(&mut self) -> Decode<'_> {
        Decode {
            dctx: &mut self.dctx,
            opened: &mut self.opened,
            sealed_only: self.sealed_only,
        }
    }

    /// True if `h` is stored.
    pub fn contains(&self, h: &Hash) -> bool {
        self.db.contains(h)
    }

    /// Reads object `h` after its direct read at `loc` failed with
    /// `first`: from another copy in the store, else rebuilt from its
    /// pack's parity, else from the store's second copy. An object none
    /// of these gives back is marked bad in the database (the next
    /// checkpoint that holds it stores it afresh).
    fn read_repaired(
        &mut self,
        h: &Hash,
        loc: &Loc,
        out: &mut Vec<u8>,
        first: PieceError,
    ) -> Result<(), PieceError> {
        // A read that failed for want of a resource says nothing about the
        // data: no repair is tried and nothing is marked bad.
        if first.resource {
            return Err(first);
        }
        let db = self.db;
        for alt in db.dups(h) {
            let mut stored = vec![0u8; alt.stored_len as usize];
            let read = match self.file(alt.pack) {
                Ok(f) => f.read_exact_at(&mut stored, alt.offset).is_ok(),
                Err(_) => false,
            };
            out.clear();
            if read && Self::decode(self.ctx(), db, h, alt, &stored, out).is_ok() {
                return Ok(());
            }
        }
        let path = db.pack_path(loc.pack);
        let (dctx, opened, sealed_only) = (&mut self.dctx, &mut self.opened, self.sealed_only);
        let mut tmp = Vec::new();
        let r = heal::read_range(
            db.mirror(),
            &path,
            loc.offset,
            loc.stored_len as usize,
            &mut |b| {
                tmp.clear();
                let cx = Decode {
                    dctx: &mut *dctx,
                    opened: &mut *opened,
                    sealed_only,
                };
                Self::decode(cx, db, h, loc, b, &mut tmp).is_ok()
            },
        );
        match r {
            Ok(_) => {
                out.clear();
                out.extend_from_slice(&tmp);
                Ok(())
            }
            Err(why) if why.resource => Err(PieceError::resource(format!(
                "{first}; the repair could not be tried: {why}"
            ))),
            Err(why) => {
                db.mark_bad(h);
                Err(PieceError::new(format!("{first}; not repairable: {why}")))
            }
        }
    }

    fn file(&mut self, pack: u32) -> Result<&File, PieceError> {
        if !self.files.contains_key(&pack) {
            let p = self.db.pack_path(pack);
            #[cfg(test)]
            if self.db.fail_this_open() {
                return Err(PieceError::io(
                    format_args!("cannot open {}", p.display()),
                    &io::Error::from_raw_os_error(libc::EMFILE),
                ));
            }
            let f = fsutil::open_regular(&p).map_err(|e| {
                let msg = format!("cannot open {}", fsutil::describe_error(&p, &e));
                if crate::fdlimit::is_resource_error(&e) {
                    PieceError::resource(msg)
                } else {
                    PieceError::new(msg)
                }
            })?;
            self.files.insert(pack, f);
        }
        Ok(&self.files[&pack])
    }

    /// Decodes one stored object into `out` (appended) and checks it: a
    /// sealed object must open under the store key with its id (which
    /// authenticates it), a plain one must match its hash.
    fn decode(
        cx: Decode<'_>,
        db: &ObjectDb,
        h: &Hash,
        loc: &Loc,
        stored: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), PieceError> {
        let dctx = cx.dctx;
        let pack = &db.packs[loc.pack as usize].name;
        let what = || format!("object {} in pack {pack}", &hex(h)[..16]);
        let sealed = loc.flags & FLAG_SEALED != 0;
        if sealed && loc.flags & FLAG_ZSTD == 0 {
            // Stored raw (incompressible, the common case for pages):
            // decrypt straight into the output.
            let Some(key) = db.key() else {
                return Err(PieceError::new(format!(
                    "{}: sealed, and no store key is loaded",
                    what()
                )));
            };
            if stored.len() != loc.raw_len as usize + super::crypto::TAG_LEN {
                return Err(PieceError::new(format!("{}: bad stored length", what())));
            }
            return key.open_object_append(h, stored, out).map_err(|_| {
                PieceError::new(format!(
                    "{}: does not authenticate under the store key (damaged, or not sealed by \
                     this store)",
                    what()
                ))
            });
        }
        let stored = if sealed {
            let Some(key) = db.key() else {
                return Err(PieceError::new(format!(
                    "{}: sealed, and no store key is loaded",
                    what()
                )));
            };
            cx.opened.clear();
            cx.opened.extend_from_slice(stored);
            key.open_object(h, cx.opened).map_err(|_| {
                PieceError::new(format!(
                    "{}: does not authenticate under the store key (damaged, or not sealed by \
                     this store)",
                    what()
                ))
            })?;
            &cx.opened[..]
        } else if cx.sealed_only {
            return Err(PieceError::new(format!(
                "{}: not sealed, but the checkpoint is (the object was not written with this \
                 store's key)",
                what()
            )));
        } else {
            stored
        };
        let start = out.len();
        if loc.flags & FLAG_ZSTD != 0 {
            out.resize(start + loc.raw_len as usize, 0);
            let n = dctx
                .decompress_to_buffer(stored, &mut out[start..])
                .map_err(|e| PieceError::new(format!("{}: cannot decompress: {e}", what())))?;
            if n != loc.raw_len as usize {
                return Err(PieceError::new(format!(
                    "{}: decompressed to {n} bytes, index says {}",
                    what(),
                    loc.raw_len
                )));
            }
        } else {
            if stored.len() != loc.raw_len as usize {
                return Err(PieceError::new(format!("{}: bad stored length", what())));
            }
            out.extend_from_slice(stored);
        }
        if !sealed && hash(&out[start..]) != *h {
            return Err(PieceError::new(format!(
                "{}: contents do not match their hash",
                what()
            )));
        }
        Ok(())
    }

    /// Reads and verifies one object into `out` (cleared first).
    pub fn read(&mut self, h: &Hash, out: &mut Vec<u8>) -> Result<(), PieceError> {
        let loc = self.db.get(h).ok_or_else(|| {
            PieceError::new(format!(
                "object {} is missing from the store",
                &hex(h)[..16]
            ))
        })?;
        let mut stored = std::mem::take(&mut self.run);
        stored.resize(loc.stored_len as usize, 0);
        let pack_name = &self.db.packs[loc.pack as usize].name;
        let r = self.file(loc.pack).and_then(|f| {
            f.read_exact_at(&mut stored, loc.offset).map_err(|e| {
                PieceError::io(
                    format_args!("object {}: cannot read pack {pack_name}", &hex(h)[..16]),
                    &e,
                )
            })
        });
        out.clear();
        let db = self.db;
        let res = r.and_then(|()| Self::decode(self.ctx(), db, h, &loc, &stored, out));
        self.run = stored;
        res.or_else(|e| {
            out.clear();
            self.read_repaired(h, &loc, out, e)
        })
    }

    /// Reads a verified object in its stored form (for repacking).
    pub fn read_stored(&mut self, h: &Hash, stored: &mut Vec<u8>) -> Result<Loc, PieceError> {
        let loc = self.db.get(h).ok_or_else(|| {
            PieceError::new(format!(
                "object {} is missing from the store",
                &hex(h)[..16]
            ))
        })?;
        stored.resize(loc.stored_len as usize, 0);
        let read = self.file(loc.pack).and_then(|f| {
            f.read_exact_at(stored, loc.offset)
                .map_err(|e| PieceError::io("cannot read pack", &e))
        });
        let mut out = Vec::new();
        let db = self.db;
        let first =
            match read.and_then(|()| Self::decode(self.ctx(), db, h, &loc, stored, &mut out)) {
                Ok(()) => return Ok(loc),
                Err(e) if e.resource => return Err(e),
                Err(e) => e,
            };
        // Repaired bytes of the stored form (gc copies them as they are).
        let path = db.pack_path(loc.pack);
        let (dctx, opened, sealed_only) = (&mut self.dctx, &mut self.opened, self.sealed_only);
        let bytes = heal::read_range(
            db.mirror(),
            &path,
            loc.offset,
            loc.stored_len as usize,
            &mut |b| {
                let cx = Decode {
                    dctx: &mut *dctx,
                    opened: &mut *opened,
                    sealed_only,
                };
                Self::decode(cx, db, h, &loc, b, &mut Vec::new()).is_ok()
            },
        )
        .map_err(|why| {
            let msg = format!("{first}; not repairable: {why}");
            if why.resource {
                PieceError::resource(msg)
            } else {
                PieceError::new(msg)
            }
        })?;
        *stored = bytes;
        Ok(loc)
    }

    /// The chunk hashes of a file's tree (nodes are read and verified).
    pub fn leaves(&mut self, root: &Hash, depth: u8) -> Result<Vec<Hash>, PieceError> {
        let mut level = vec![*root];
        let mut buf = Vec::new();
        for d in (1..=depth).rev() {
            let mut next = Vec::with_capacity(level.len() * FANOUT);
            for h in &level {
                self.read(h, &mut buf)?;
                if buf.is_empty() || buf.len() % 32 != 0 || buf.len() > FANOUT * 32 {
                    return Err(PieceError::new(format!(
                        "tree node {} (level {d}) has a bad length {}",
                        &hex(h)[..16],
                        buf.len()
                    )));
                }
                next.extend(buf.chunks_exact(32).map(|c| Hash::try_from(c).unwrap()));
            }
            level = next;
        }
        Ok(level)
    }

    /// Reads and verifies `hashes` (chunks of one file, in order), calling
    /// `sink` with each chunk's contents. Objects that lie back to back in
    /// a pack are read with one call.
    pub fn read_chunks(
        &mut self,
        hashes: &[(usize, Hash)],
        sink: &mut ChunkSink<'_>,
    ) -> Result<(), PieceError> {
        let mut i = 0;
        let mut out = Vec::new();
        while i < hashes.len() {
            let first = self.db.get(&hashes[i].1).ok_or_else(|| {
                PieceError::new(format!(
                    "chunk {} (object {}) is missing from the store",
                    hashes[i].0,
                    &hex(&hashes[i].1)[..16]
                ))
            })?;
            // Extend the run while the next object follows in the same pack.
            let mut j = i + 1;
            let mut end = first.offset + first.stored_len as u64;
            while j < hashes.len() && end - first.offset < RUN_MAX {
                match self.db.get(&hashes[j].1) {
                    Some(l) if l.pack == first.pack && l.offset == end => {
                        end += l.stored_len as u64;
                        j += 1;
                    }
                    _ => break,
                }
            }
            let mut run = std::mem::take(&mut self.run);
            run.resize((end - first.offset) as usize, 0);
            // A run that cannot be read (a lost tail, a missing pack) is
            // read object by object through the repair path.
            let run_err = match self.file(first.pack) {
                Ok(f) => f.read_exact_at(&mut run, first.offset).err().map(|e| {
                    PieceError::io(
                        format_args!(
                            "cannot read pack {}",
                            self.db.packs[first.pack as usize].name
                        ),
                        &e,
                    )
                }),
                Err(e) => Some(e),
            };
            let mut res = Ok(());
            for (idx, h) in &hashes[i..j] {
                let loc = self.db.get(h).unwrap();
                let s = (loc.offset - first.offset) as usize;
                out.clear();
                let db = self.db;
                let r = match &run_err {
                    Some(e) => Err(e.clone()),
                    None => Self::decode(
                        self.ctx(),
                        db,
                        h,
                        &loc,
                        &run[s..s + loc.stored_len as usize],
                        &mut out,
                    ),
                };
                let r = r
                    .or_else(|e| {
                        out.clear();
                        self.read_repaired(h, &loc, &mut out, e)
                    })
                    .map_err(|e| e.context(format_args!("chunk {idx}")))
                    .and_then(|()| sink(*idx, &out));
                if let Err(e) = r {
                    res = Err(e);
                    break;
                }
            }
            self.run = run;
            res?;
            i = j;
        }
        Ok(())
    }
}
