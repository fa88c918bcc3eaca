//! Streamed ingest: files of a checkpoint that never touch the staging
//! directory. CRIU's page server (supervise's own, `criu::page_server`)
//! hands over each `pages-<n>.img` as a byte stream while the job is
//! frozen; [`PageStream`] cuts it into the same page chunks a staged file
//! would get, hashes them and stores only the new ones, in the pack that
//! [`Staging::commit_with`](super::ingest::Staging::commit_with) then completes with the staged files. Nothing
//! of the page contents is written except new chunks, so a checkpoint in
//! which little changed writes little.
//!
//! Receiving and storing are two threads: the caller's thread copies the
//! stream into 4 MiB batches, a worker hashes and stores them in order
//! (itself using several threads per batch, as the staged ingest does).
//! The receiving side never waits for the worker, so CRIU (and the frozen
//! job) never waits for sealing and compression: up to [`MAX_IN_FLIGHT`]
//! bytes wait in memory; beyond that (a first checkpoint, where every page
//! is new) batches are appended to a spill file and stored from there
//! after the job has resumed. The spill file has no name (nothing is left
//! by a crash) and, when the store seals, holds each batch sealed under a
//! key that exists only in memory (`spill.rs`). A later checkpoint, whose
//! pages are mostly known, keeps up in memory and writes only what is new.

use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::format::FileEntry;
use super::objects::{self, PAGE_CHUNK};
use super::pack::{PackWriter, TreeBuilder};
use super::spill::{self, SpillReader, SpillWriter, SpilledBatch, SPILL_TAG};
use super::{io_err, ImageStore, StoreError, StoreLock};

/// Size of one batch handed to the worker.
const BATCH: usize = 4 << 20;
/// Bytes of batches queued in memory for the worker before further ones
/// are spilled to disk.
pub const MAX_IN_FLIGHT: usize = 64 << 20;
/// Spare batch buffers kept for reuse.
const RECYCLED: usize = 4;

enum Msg {
    Begin(String),
    Data(Vec<u8>),
    /// The spill file, sent once before its first batch.
    SpillFile(SpillReader),
    /// A batch in the spill file.
    Spilled(SpilledBatch),
    End,
}

/// What the worker hands back at the end.
pub(super) struct Streamed {
    pub(super) lock: StoreLock,
    pub(super) writer: PackWriter,
    pub(super) files: Vec<FileEntry>,
    pub(super) chunks: u64,
}

/// Files streamed into a checkpoint being written; from
/// [`Staging::stream`](super::ingest::Staging::stream). Dropping it without [`Staging::commit_with`](super::ingest::Staging::commit_with)
/// discards what it stored (the unpublished pack is removed).
pub struct PageStream {
    tx: Option<Sender<Msg>>,
    recycle: Receiver<Vec<u8>>,
    in_flight: Arc<AtomicUsize>,
    /// The spill file (created when first needed).
    spill: Option<SpillWriter>,
    /// Spilled batches are sealed (the store seals).
    seal_spill: bool,
    packs_dir: PathBuf,
    /// Bytes that went through the spill file.
    pub spilled: u64,
    max_in_flight: usize,
    worker: Option<JoinHandle<Result<Streamed, StoreError>>>,
    buf: Vec<u8>,
    names: Vec<String>,
    open: bool,
    /// Bytes received.
    pub bytes: u64,
}

impl PageStream {
    /// Starts streaming files into a checkpoint of `store` (through
    /// `Staging::stream`). Takes the store's exclusive lock until the
    /// commit (or until the stream is dropped).
    pub(super) fn start(store: ImageStore) -> Result<PageStream, StoreError> {
        let lock = store.lock(true)?;
        let packs_dir = store.dir.join(super::format::PACKS_DIR);
        let key = if store.seal { store.key.clone() } else { None };
        let seal_spill = key.is_some();
        let writer = PackWriter::new(&packs_dir, key)
            .map_err(io_err(&packs_dir))?
            .with_parity(store.parity)
            .with_copy(store.mirror.alt(&packs_dir));
        let (tx, rx) = channel::<Msg>();
        let (back, recycle) = sync_channel::<Vec<u8>>(RECYCLED);
        let in_flight = Arc::new(AtomicUsize::new(0));
        let counted = in_flight.clone();
        let worker = std::thread::Builder::new()
            .name("page-ingest".into())
            .spawn(move || ingest(store, lock, writer, rx, back, counted))
            .map_err(|e| StoreError::Io {
                path: packs_dir.clone(),
                source: e,
            })?;
        Ok(PageStream {
            tx: Some(tx),
            recycle,
            in_flight,
            spill: None,
            seal_spill,
            packs_dir,
            spilled: 0,
            max_in_flight: test_max_in_flight().unwrap_or(MAX_IN_FLIGHT),
            worker: Some(worker),
            buf: Vec::with_capacity(BATCH + SPILL_TAG),
            names: Vec::new(),
            open: false,
            bytes: 0,
        })
    }
}

fn ingest(
    store: ImageStore,
    lock: StoreLock,
    mut writer: PackWriter,
    rx: Receiver<Msg>,
    back: SyncSender<Vec<u8>>,
    in_flight: Arc<AtomicUsize>,
) -> Result<Streamed, StoreError> {
    let packs_dir = store.dir.join(super::format::PACKS_DIR);
    let err = |e: io::Error| io_err(&packs_dir)(e);
    let mut files = Vec::new();
    let mut chunks = 0u64;
    let mut cur: Option<(String, TreeBuilder, u64)> = None;
    let mut spill: Option<SpillReader> = None;
    let mut spilled = Vec::new();
    for msg in rx {
        let (data, from_memory) = match msg {
            Msg::Begin(name) => {
                cur = Some((name, TreeBuilder::new(), 0));
                continue;
            }
            Msg::Data(data) => (data, true),
            Msg::SpillFile(r) => {
                spill = Some(r);
                continue;
            }
            Msg::Spilled(b) => {
                let spill_err = |e| io_err(&packs_dir.join("(spill file)"))(e);
                spill
                    .as_ref()
                    .ok_or_else(|| spill_err(io::Error::other("no spill file")))?
                    .read(b, &mut spilled)
                    .map_err(spill_err)?;
                (std::mem::take(&mut spilled), false)
            }
            Msg::End => {
                let (name, tree, size) = cur.take().expect("End follows Begin");
                let db = store.db()?;
                let (root, depth) = tree.finish(&db, &mut writer).map_err(err)?;
                files.push(FileEntry {
                    name,
                    size,
                    chunk: Some(PAGE_CHUNK),
                    depth: Some(depth),
                    root: Some(objects::hex(&root)),
                    ..Default::default()
                });
                continue;
            }
        };
        let (_, tree, size) = cur.as_mut().expect("data follows Begin");
        let db = store.db()?;
        tree.push_batch(&db, &mut writer, &data, PAGE_CHUNK as usize)
            .map_err(err)?;
        drop(db);
        chunks += data.len().div_ceil(PAGE_CHUNK as usize) as u64;
        *size += data.len() as u64;
        if from_memory {
            in_flight.fetch_sub(data.len(), Ordering::Relaxed);
            let _ = back.try_send(data);
        } else {
            spilled = data;
        }
    }
    Ok(Streamed {
        lock,
        writer,
        files,
        chunks,
    })
}

impl PageStream {
    fn send(&mut self, m: Msg) -> io::Result<()> {
        let failed = match &self.tx {
            Some(tx) => tx.send(m).is_err(),
            None => true,
        };
        if failed {
            // The worker stopped: its error is the one to report.
            return Err(match self.join() {
                Err(e) => io::Error::other(e.to_string()),
                Ok(_) => io::Error::other("the page ingest thread stopped"),
            });
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let len = self.buf.len();
        if self.in_flight.load(Ordering::Relaxed) + len > self.max_in_flight {
            // The worker is behind: to disk, not back-pressure on CRIU.
            if self.spill.is_none() {
                let (w, r) = spill::create(&self.packs_dir, self.seal_spill)?;
                self.spill = Some(w);
                self.send(Msg::SpillFile(r))?;
            }
            let b = self
                .spill
                .as_mut()
                .expect("created")
                .append(&mut self.buf)?;
            self.spilled += len as u64;
            self.buf.clear();
            return self.send(Msg::Spilled(b));
        }
        self.in_flight.fetch_add(len, Ordering::Relaxed);
        let next = self
            .recycle
            .try_recv()
            .map(|mut v| {
                v.clear();
                v
            })
            .unwrap_or_else(|_| Vec::with_capacity(BATCH + SPILL_TAG));
        let full = std::mem::replace(&mut self.buf, next);
        self.send(Msg::Data(full))
    }

    /// Starts the file `name` (a plain file name of the image; the
    /// previous file, if any, ends).
    pub fn begin_file(&mut self, name: &str) -> io::Result<()> {
        if !super::format::valid_file_name(name) || name.contains('/') {
            return Err(io::Error::other(format!(
                "invalid streamed file name {name:?}"
            )));
        }
        if self.names.iter().any(|n| n == name) {
            return Err(io::Error::other(format!("{name} streamed twice")));
        }
        self.end_file()?;
        self.names.push(name.to_string());
        self.open = true;
        self.send(Msg::Begin(name.to_string()))
    }

    /// Appends exactly `len` bytes read from `r` to the current file.
    pub fn write_from(&mut self, r: &mut dyn Read, len: u64) -> io::Result<()> {
        if !self.open {
            return Err(io::Error::other("no streamed file is open"));
        }
        let mut left = len;
        while left > 0 {
            let room = BATCH - self.buf.len();
            let want = (room as u64).min(left) as usize;
            let at = self.buf.len();
            self.buf.resize(at + want, 0);
            if let Err(e) = r.read_exact(&mut self.buf[at..]) {
                self.buf.truncate(at);
                return Err(e);
            }
            left -= want as u64;
            self.bytes += want as u64;
            if self.buf.len() == BATCH {
                self.flush()?;
            }
        }
        Ok(())
    }

    /// Appends `data` to the current file.
    pub fn write(&mut self, mut data: &[u8]) -> io::Result<()> {
        let len = data.len() as u64;
        self.write_from(&mut data, len)
    }

    /// Ends the current file (if one is open).
    pub fn end_file(&mut self) -> io::Result<()> {
        if !self.open {
            return Ok(());
        }
        self.flush()?;
        self.open = false;
        self.send(Msg::End)
    }

    /// Bytes queued in memory before batches are spilled (tests).
    pub fn with_max_in_flight(mut self, bytes: usize) -> PageStream {
        self.max_in_flight = bytes;
        self
    }

    /// Names of the files streamed so far.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    fn join(&mut self) -> Result<Streamed, StoreError> {
        self.tx = None;
        match self.worker.take() {
            Some(h) => h.join().unwrap_or_else(|_| {
                Err(StoreError::Io {
                    path: std::path::PathBuf::from("page-ingest"),
                    source: io::Error::other("page ingest thread panicked"),
                })
            }),
            None => Err(StoreError::Io {
                path: std::path::PathBuf::from("page-ingest"),
                source: io::Error::other("page ingest already ended"),
            }),
        }
    }

    /// Ends the stream: everything received is stored (not yet published).
    pub(super) fn finish(mut self) -> Result<Streamed, StoreError> {
        self.end_file().map_err(|e| StoreError::Io {
            path: std::path::PathBuf::from("page-ingest"),
            source: e,
        })?;
        let r = self.join();
        if self.spilled > 0 {
            tracing::info!(
                spilled_bytes = self.spilled,
                sealed = self.seal_spill,
                "storing the pages fell behind CRIU; some went through the spill file"
            );
        }
        r
    }
}

/// Test knob: `SUPERVISE_TEST_MAX_IN_FLIGHT=<bytes>` replaces
/// [`MAX_IN_FLIGHT`] (e.g. `0`: every batch goes through the spill file).
fn test_max_in_flight() -> Option<usize> {
    std::env::var("SUPERVISE_TEST_MAX_IN_FLIGHT")
        .ok()?
        .parse()
        .ok()
}

impl Drop for PageStream {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(h) = self.worker.take() {
            // The writer's drop removes the unpublished pack.
            let _ = h.join();
        }
        // The spill file has no name: closing it frees it.
    }
}
