//! The job's memory between CRIU's page server and the image store:
//!
//! * [`StreamSink`]: a streamed dump's page maps become `pagemap-*.img`
//!   files in the staging directory (small), its pages a streamed
//!   `pages-<n>.img` in the store (only new chunks are written);
//! * [`StoreSource`]: a lazy restore's page requests are answered from the
//!   stored `pages-<n>.img`, located through the materialised page maps;
//! * [`lazy_select`]: what of each file a lazy restore materialises (page
//!   files only where CRIU restores eagerly).

use std::collections::{HashMap, HashSet};
use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::criu::page_server::{DumpSink, MapKind, PageSource};
use crate::criu::pagemap::{self, PageIndex, Pagemap, PagemapEntry, PAGE_SIZE};
use crate::store::{FileReader, ImageInfo, ImageStore, PageStream, Select};

/// Writes a streamed dump: page maps into `dir`, pages into `stream`.
pub struct StreamSink {
    dir: PathBuf,
    stream: PageStream,
    next_id: u32,
    map: Option<(String, Vec<u8>)>,
    /// The entry being extended: CRIU sends runs of at most 1 MiB, and a
    /// lazy restore's daemon asks for at most one entry per request, so
    /// consecutive runs (same flags) are written as one entry.
    last: Option<PagemapEntry>,
}

impl StreamSink {
    /// A sink writing page maps into the staging directory `dir`.
    pub fn new(dir: &Path, stream: PageStream) -> StreamSink {
        StreamSink {
            dir: dir.to_path_buf(),
            stream,
            next_id: 1,
            map: None,
            last: None,
        }
    }

    /// The stream, to commit with the checkpoint.
    pub fn into_stream(self) -> PageStream {
        self.stream
    }

    fn end_entry(&mut self) {
        if let (Some(e), Some((_, bytes))) = (self.last.take(), self.map.as_mut()) {
            pagemap::encode_entry(&e, bytes);
        }
    }

    fn write_map(&mut self) -> io::Result<()> {
        self.end_entry();
        let Some((name, bytes)) = self.map.take() else {
            return Ok(());
        };
        let path = self.dir.join(&name);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)?;
        f.write_all(&bytes)
    }
}

impl DumpSink for StreamSink {
    fn open(&mut self, kind: MapKind, id: u64) -> io::Result<()> {
        self.write_map()?;
        let pages_id = self.next_id;
        self.next_id += 1;
        let mut bytes = pagemap::magic().to_vec();
        pagemap::encode_head(pages_id, &mut bytes);
        self.map = Some((kind.pagemap_name(id), bytes));
        self.stream.begin_file(&format!("pages-{pages_id}.img"))
    }

    fn entry(&mut self, vaddr: u64, nr_pages: u64, flags: u32) -> io::Result<()> {
        if self.map.is_none() {
            return Err(io::Error::other("page map entry before a page map"));
        }
        if let Some(e) = self.last.as_mut() {
            if e.pe_flags() == flags && e.vaddr + e.pages() * PAGE_SIZE == vaddr {
                e.nr_pages = Some(e.pages() + nr_pages);
                return Ok(());
            }
        }
        self.end_entry();
        self.last = Some(PagemapEntry::new(vaddr, nr_pages, flags));
        Ok(())
    }

    fn pages(&mut self, from: &mut dyn Read, len: u64) -> io::Result<()> {
        self.stream.write_from(from, len)
    }

    fn finish(&mut self) -> io::Result<()> {
        self.write_map()?;
        self.stream.end_file()
    }
}

/// The process page maps (`pagemap-<pid>.img`, not shared memory) in a
/// materialised image directory: pid -> map.
fn process_maps(dir: &Path) -> Result<HashMap<u64, Pagemap>, String> {
    let mut out = HashMap::new();
    let rd = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(pid) = name
            .strip_prefix("pagemap-")
            .and_then(|r| r.strip_suffix(".img"))
            .and_then(|p| p.parse::<u64>().ok())
        else {
            continue;
        };
        let bytes = std::fs::read(e.path()).map_err(|e| format!("{name}: {e}"))?;
        let map = Pagemap::parse(&bytes).map_err(|e| format!("{name}: {e}"))?;
        out.insert(pid, map);
    }
    Ok(out)
}

/// For [`ImageStore::materialise_select`] in a lazy restore: a page file of
/// a process is written only where its pages are not lazy (the rest stays
/// a hole); every other file whole.
pub fn lazy_select() -> impl FnMut(&str, &Path) -> Select {
    let mut eager: Option<HashMap<u32, Vec<(u64, u64)>>> = None;
    move |name, dir| {
        let Some(id) = name
            .strip_prefix("pages-")
            .and_then(|r| r.strip_suffix(".img"))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            return Select::Whole;
        };
        let ranges = eager.get_or_insert_with(|| {
            process_maps(dir)
                .unwrap_or_default()
                .values()
                .map(|m| (m.pages_id, m.eager_ranges()))
                .collect()
        });
        match ranges.get(&id) {
            Some(r) => Select::Ranges(r.clone()),
            None => Select::Whole,
        }
    }
}

/// About how many bytes a lazy restore of `img` writes out: every file
/// but the page files whole, and of the page files what CRIU restores
/// eagerly (stacks, file-backed and shared memory; taken as 1/16 of them,
/// an estimate: the rest stays a hole, which takes no memory on tmpfs).
pub fn lazy_bytes(img: &ImageInfo) -> u64 {
    img.manifest
        .files
        .iter()
        .map(|f| {
            let base = f.name.rsplit('/').next().unwrap_or(&f.name);
            if base.starts_with("pages-") && base.ends_with(".img") {
                f.size / 16
            } else {
                f.size
            }
        })
        .sum()
}

/// Images whose lazy restore found a page that could not be served: they
/// are restored eagerly from then on (which verifies everything first).
pub type LazyFailures = Arc<Mutex<HashSet<String>>>;

/// Serves a lazy restore's page requests from the store.
pub struct StoreSource {
    image: String,
    reads: u64,
    /// The range after the last one served, being read ahead (the
    /// daemon's background push asks for consecutive ranges).
    ahead: Option<Ahead>,
    procs: HashMap<u64, (PageIndex, Arc<FileReader>)>,
    failures: LazyFailures,
}

impl StoreSource {
    /// Reads the page maps materialised in `dir` and opens each process's
    /// page file in the store.
    pub fn open(
        store: &ImageStore,
        image: &ImageInfo,
        dir: &Path,
        failures: LazyFailures,
    ) -> Result<StoreSource, crate::store::StoreError> {
        let corrupt = |reason: String| crate::store::StoreError::Corrupt {
            id: image.id.clone(),
            reason,
        };
        let mut procs = HashMap::new();
        let mut readers: HashMap<u32, Arc<FileReader>> = HashMap::new();
        for (pid, map) in process_maps(dir).map_err(corrupt)? {
            let reader = match readers.get(&map.pages_id) {
                Some(r) => r.clone(),
                None => {
                    let name = format!("pages-{}.img", map.pages_id);
                    let r = Arc::new(store.file_reader(image, &name)?);
                    if r.size() < map.pages_bytes() {
                        return Err(corrupt(format!(
                            "{name} holds {} bytes, its page map needs {}",
                            r.size(),
                            map.pages_bytes()
                        )));
                    }
                    readers.insert(map.pages_id, r.clone());
                    r
                }
            };
            procs.insert(pid, (map.index(), reader));
        }
        Ok(StoreSource {
            image: image.id.clone(),
            reads: 0,
            ahead: None,
            procs,
            failures,
        })
    }

    fn fail(&self, why: String) -> String {
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(self.image.clone());
        why
    }
}

impl PageSource for StoreSource {
    fn read(&mut self, pid: u64, vaddr: u64, nr: u64, out: &mut Vec<u8>) -> Result<u64, String> {
        let Some((index, reader)) = self.procs.get(&pid) else {
            return Err(self.fail(format!("the image has no page map for process {pid}")));
        };
        let Some((offset, n)) = index.locate(vaddr, nr) else {
            return Err(self.fail(format!(
                "the page map of process {pid} does not hold {vaddr:#x}"
            )));
        };
        self.reads += 1;
        if self.reads == 8 {
            // Tests: stop serving in the middle of the background push.
            crate::failpoint::point("lazy-push");
        }
        let reader = reader.clone();
        let ahead = match self.ahead.take() {
            Some(a) if a.pid == pid && a.vaddr == vaddr => match a.data.join() {
                Ok(Ok((got, data))) => {
                    let take = got.min(nr);
                    out.extend_from_slice(&data[..(take * PAGE_SIZE) as usize]);
                    Some(take)
                }
                // The read-ahead failed (perhaps for want of a resource):
                // read it directly.
                _ => None,
            },
            _ => None,
        };
        let n = match ahead {
            Some(n) => n,
            None => match read_resilient(&reader, offset, n * PAGE_SIZE, out) {
                Ok(()) => n,
                // Nothing is known to be wrong with the image.
                Err(e) if e.is_resource() => return Err(e.to_string()),
                Err(e) => return Err(self.fail(e.to_string())),
            },
        };
        // Read the next range while this one is sent and copied in.
        let next = vaddr + n * PAGE_SIZE;
        // The daemon's next request is usually 16 pages longer.
        if let Some((off, m)) = index.locate(next, (nr + 16).clamp(16, AHEAD_MAX_PAGES)) {
            let r = reader.clone();
            let data = std::thread::spawn(move || {
                let mut buf = Vec::with_capacity((m * PAGE_SIZE) as usize);
                r.read_at(off, m * PAGE_SIZE, &mut buf)
                    .map(|()| (m, buf))
                    .map_err(|e| e.to_string())
            });
            self.ahead = Some(Ahead {
                pid,
                vaddr: next,
                data,
            });
        }
        Ok(n)
    }
}

/// A read that fails for want of a resource (descriptors, memory) is
/// tried again, with growing pauses, for up to [`RESOURCE_PATIENCE`]: the
/// restored job waits for its page meanwhile instead of being killed.
fn read_resilient(
    reader: &FileReader,
    offset: u64,
    len: u64,
    out: &mut Vec<u8>,
) -> Result<(), crate::store::StoreError> {
    let start = std::time::Instant::now();
    let mut pause = std::time::Duration::from_millis(20);
    loop {
        match reader.read_at(offset, len, out) {
            Err(e) if e.is_resource() && start.elapsed() < RESOURCE_PATIENCE => {
                tracing::warn!(error = %e, "cannot read a page for the restored job now (a resource ran short); trying again");
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_secs(2));
            }
            r => return r,
        }
    }
}

/// How long a page read is retried after resource shortages.
const RESOURCE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

/// Largest read-ahead (the daemon's largest request: 4 MiB).
const AHEAD_MAX_PAGES: u64 = 1024;

/// A range being read ahead.
struct Ahead {
    pid: u64,
    vaddr: u64,
    data: std::thread::JoinHandle<Result<(u64, Vec<u8>), String>>,
}
