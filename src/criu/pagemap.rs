//! CRIU's pagemap images (`pagemap-<pid>.img`, `pagemap-shmem-<id>.img`):
//! which pages of a process (or of a shared memory segment) a dump holds,
//! and where their contents lie in the matching `pages-<n>.img`.
//!
//! The format (CRIU's `images/pagemap.proto`, `criu/include/magic.h`): two
//! little-endian magic words (`IMG_COMMON_MAGIC`, `PAGEMAP_MAGIC`), then
//! length-prefixed protobuf records: one `pagemap_head` (the number of the
//! pages image), then `pagemap_entry`s in address order. Every entry with
//! [`PE_PRESENT`] and without [`PE_PARENT`] owns the next `nr_pages` pages
//! of the pages image. [`PE_LAZY`] marks pages a lazy restore may leave to
//! userfaultfd (private anonymous memory, not a thread's current stack
//! page); CRIU sets it on every dump.

use prost::Message;

/// Size of a page (x86-64).
pub const PAGE_SIZE: u64 = 4096;
/// The pages are in the parent image (incremental dumps only).
pub const PE_PARENT: u32 = 1 << 0;
/// The pages may be restored lazily.
pub const PE_LAZY: u32 = 1 << 1;
/// The pages are present in the pages image.
pub const PE_PRESENT: u32 = 1 << 2;

const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
const PAGEMAP_MAGIC: u32 = 0x5608_4025;
/// Largest record accepted (a pagemap entry is ~20 bytes).
const MAX_RECORD: usize = 1 << 16;

/// `pagemap_head`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PagemapHead {
    /// `N` of `pages-N.img`.
    #[prost(uint32, required, tag = "1")]
    pub pages_id: u32,
}

/// `pagemap_entry`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PagemapEntry {
    /// First address.
    #[prost(uint64, required, tag = "1")]
    pub vaddr: u64,
    /// Page count of images older than CRIU 3.x (0 otherwise).
    #[prost(uint32, required, tag = "2")]
    pub compat_nr_pages: u32,
    /// Old form of [`PE_PARENT`].
    #[prost(bool, optional, tag = "3")]
    pub in_parent: Option<bool>,
    /// `PE_*` flags.
    #[prost(uint32, optional, tag = "4")]
    pub flags: Option<u32>,
    /// Page count.
    #[prost(uint64, optional, tag = "5")]
    pub nr_pages: Option<u64>,
}

impl PagemapEntry {
    /// An entry as CRIU writes it.
    pub fn new(vaddr: u64, nr_pages: u64, flags: u32) -> PagemapEntry {
        PagemapEntry {
            vaddr,
            compat_nr_pages: 0,
            in_parent: None,
            flags: Some(flags),
            nr_pages: Some(nr_pages),
        }
    }

    /// Page count (new or old field).
    pub fn pages(&self) -> u64 {
        self.nr_pages.unwrap_or(self.compat_nr_pages as u64)
    }

    /// `PE_*` flags, old images' `in_parent` included (an old entry
    /// without flags is present unless in the parent).
    pub fn pe_flags(&self) -> u32 {
        match self.flags {
            Some(f) => f,
            None if self.in_parent == Some(true) => PE_PARENT,
            None => PE_PRESENT,
        }
    }

    /// True if the entry's pages are in this image's pages file.
    pub fn in_pages_file(&self) -> bool {
        let f = self.pe_flags();
        f & PE_PRESENT != 0 && f & PE_PARENT == 0
    }
}

/// A parsed pagemap image.
#[derive(Debug, Clone, PartialEq)]
pub struct Pagemap {
    /// The pages image number.
    pub pages_id: u32,
    /// The entries, in file order.
    pub entries: Vec<PagemapEntry>,
}

/// Why a pagemap image could not be read.
#[derive(Debug, thiserror::Error)]
#[error("bad pagemap image: {0}")]
pub struct PagemapError(pub String);

impl Pagemap {
    /// Parses a pagemap image.
    pub fn parse(bytes: &[u8]) -> Result<Pagemap, PagemapError> {
        let bad = |m: &str| PagemapError(m.to_string());
        let word = |at: usize| -> Option<u32> {
            Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
        };
        if word(0) != Some(IMG_COMMON_MAGIC) || word(4) != Some(PAGEMAP_MAGIC) {
            return Err(bad("wrong magic"));
        }
        let mut at = 8;
        let mut next = || -> Result<Option<&[u8]>, PagemapError> {
            if at == bytes.len() {
                return Ok(None);
            }
            let len = word(at).ok_or_else(|| bad("truncated record length"))? as usize;
            if len > MAX_RECORD {
                return Err(bad("record too long"));
            }
            let rec = bytes
                .get(at + 4..at + 4 + len)
                .ok_or_else(|| bad("truncated record"))?;
            at += 4 + len;
            Ok(Some(rec))
        };
        let head = next()?.ok_or_else(|| bad("no pagemap_head"))?;
        let head = PagemapHead::decode(head).map_err(|e| bad(&e.to_string()))?;
        let mut entries = Vec::new();
        while let Some(rec) = next()? {
            entries.push(PagemapEntry::decode(rec).map_err(|e| bad(&e.to_string()))?);
        }
        Ok(Pagemap {
            pages_id: head.pages_id,
            entries,
        })
    }

    /// The image bytes (as CRIU writes them).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.entries.len() * 24);
        out.extend_from_slice(&IMG_COMMON_MAGIC.to_le_bytes());
        out.extend_from_slice(&PAGEMAP_MAGIC.to_le_bytes());
        encode_head(self.pages_id, &mut out);
        for e in &self.entries {
            encode_entry(e, &mut out);
        }
        out
    }

    /// Byte ranges of the pages file that hold pages *not* marked lazy
    /// (what a lazy restore still reads from the file), merged.
    pub fn eager_ranges(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut off = 0u64;
        for e in self.entries.iter().filter(|e| e.in_pages_file()) {
            let len = e.pages() * PAGE_SIZE;
            if e.pe_flags() & PE_LAZY == 0 {
                match out.last_mut() {
                    Some(last) if last.1 == off => last.1 += len,
                    _ => out.push((off, off + len)),
                }
            }
            off += len;
        }
        out
    }

    /// Size of the pages file this map describes.
    pub fn pages_bytes(&self) -> u64 {
        self.entries
            .iter()
            .filter(|e| e.in_pages_file())
            .map(|e| e.pages() * PAGE_SIZE)
            .sum()
    }

    /// An index for locating pages by address.
    pub fn index(&self) -> PageIndex {
        let mut spans: Vec<Span> = Vec::with_capacity(self.entries.len());
        let mut off = 0u64;
        for e in self.entries.iter().filter(|e| e.in_pages_file()) {
            let len = e.pages() * PAGE_SIZE;
            // CRIU cuts long runs into entries of at most 1 MiB: entries
            // that follow each other in memory and in the file are one span.
            match spans.last_mut() {
                Some(s) if s.end == e.vaddr && s.offset + (s.end - s.vaddr) == off => s.end += len,
                _ => spans.push(Span {
                    vaddr: e.vaddr,
                    end: e.vaddr + len,
                    offset: off,
                }),
            }
            off += len;
        }
        spans.sort_by_key(|s| s.vaddr);
        PageIndex { spans }
    }
}

/// Appends the length-prefixed `pagemap_head`.
pub fn encode_head(pages_id: u32, out: &mut Vec<u8>) {
    let h = PagemapHead { pages_id };
    out.extend_from_slice(&(h.encoded_len() as u32).to_le_bytes());
    h.encode(out).expect("vec grows");
}

/// Appends one length-prefixed `pagemap_entry`.
pub fn encode_entry(e: &PagemapEntry, out: &mut Vec<u8>) {
    out.extend_from_slice(&(e.encoded_len() as u32).to_le_bytes());
    e.encode(out).expect("vec grows");
}

/// The magic words that open a pagemap image.
pub fn magic() -> [u8; 8] {
    let mut m = [0u8; 8];
    m[..4].copy_from_slice(&IMG_COMMON_MAGIC.to_le_bytes());
    m[4..].copy_from_slice(&PAGEMAP_MAGIC.to_le_bytes());
    m
}

#[derive(Debug, Clone, Copy)]
struct Span {
    vaddr: u64,
    end: u64,
    offset: u64,
}

/// Address -> offset in the pages file.
#[derive(Debug, Clone, Default)]
pub struct PageIndex {
    spans: Vec<Span>,
}

impl PageIndex {
    /// Where the pages from `vaddr` lie in the pages file: (offset, how
    /// many of the `nr` requested pages follow contiguously there).
    pub fn locate(&self, vaddr: u64, nr: u64) -> Option<(u64, u64)> {
        let i = self.spans.partition_point(|s| s.end <= vaddr);
        let s = self.spans.get(i)?;
        if vaddr < s.vaddr || vaddr % PAGE_SIZE != 0 {
            return None;
        }
        let avail = (s.end - vaddr) / PAGE_SIZE;
        Some((s.offset + (vaddr - s.vaddr), nr.min(avail)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> Pagemap {
        Pagemap {
            pages_id: 7,
            entries: vec![
                PagemapEntry::new(0x1000, 2, PE_PRESENT),
                PagemapEntry::new(0x10000, 3, PE_PRESENT | PE_LAZY),
                PagemapEntry::new(0x20000, 1, PE_PARENT),
                PagemapEntry::new(0x30000, 1, PE_PRESENT),
                PagemapEntry::new(0x31000, 2, PE_PRESENT),
            ],
        }
    }

    #[test]
    fn round_trip_and_offsets() {
        let m = map();
        let b = m.encode();
        assert_eq!(&b[..8], &magic());
        assert_eq!(Pagemap::parse(&b).unwrap(), m);
        assert_eq!(m.pages_bytes(), 8 * PAGE_SIZE);
        // Lazy pages 2..5 are left out; the two last entries merge.
        assert_eq!(
            m.eager_ranges(),
            vec![(0, 2 * PAGE_SIZE), (5 * PAGE_SIZE, 8 * PAGE_SIZE)]
        );
        let ix = m.index();
        assert_eq!(ix.locate(0x10000, 10), Some((2 * PAGE_SIZE, 3)));
        assert_eq!(ix.locate(0x11000, 1), Some((3 * PAGE_SIZE, 1)));
        assert_eq!(ix.locate(0x31000, 4), Some((6 * PAGE_SIZE, 2)));
        // Entries back to back in memory and in the file are one span.
        assert_eq!(ix.locate(0x30000, 4), Some((5 * PAGE_SIZE, 3)));
        assert_eq!(ix.locate(0x20000, 1), None, "pages in the parent");
        assert_eq!(ix.locate(0x5000, 1), None);
        assert_eq!(ix.locate(0x10001, 1), None, "unaligned");
    }

    /// The head of a pagemap image as CRIU 4.2.1 wrote it (`criu dump` of a
    /// test process: magic words, then `pagemap_head { pages_id: 1 }`).
    #[test]
    fn parses_criu_bytes() {
        let criu: [u8; 16] = [
            0x19, 0x43, 0x56, 0x54, 0x25, 0x40, 0x08, 0x56, 0x02, 0x00, 0x00, 0x00, 0x08, 0x01,
            0x0e, 0x00,
        ];
        assert_eq!(&criu[..8], &magic());
        let m = Pagemap::parse(&criu[..14]).unwrap();
        assert_eq!((m.pages_id, m.entries.len()), (1, 0));
    }

    #[test]
    fn damaged_images_are_refused() {
        let b = map().encode();
        assert!(Pagemap::parse(&b[..b.len() - 3]).is_err());
        assert!(Pagemap::parse(&b[4..]).is_err());
        let mut long = b.clone();
        long[8..12].copy_from_slice(&(1u32 << 30).to_le_bytes());
        assert!(Pagemap::parse(&long).is_err());
    }

    #[test]
    fn old_entries_without_flags() {
        let e = PagemapEntry {
            vaddr: 0,
            compat_nr_pages: 4,
            in_parent: Some(true),
            flags: None,
            nr_pages: None,
        };
        assert_eq!(e.pages(), 4);
        assert!(!e.in_pages_file());
    }
}
