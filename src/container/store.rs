//! The encrypted sector store: redb's `StorageBackend` over sealed sectors
//! (FORMAT.md §4).
//!
//! redb sees a plain byte array of `store_len` bytes in 4096-byte pages.
//! Page 0 (redb's header, rewritten on every commit) is a shadow pair in
//! *store positions* 0 and 1; page k > 0 is store position k + 1. Store
//! positions become physical sectors through the segment map (FORMAT.md
//! §4.10): physical sectors come in segments of [`SEGMENT_SECTORS`], each
//! either redb's store's or file data's ([`SectorStore::write_data_sectors`]);
//! store segment j is physical segment `map[j]`. Before a data segment is
//! claimed the map is the identity and position p is physical sector p. Every
//! physical sector below the *extent* has been sealed at least once and must
//! authenticate (except the gaps); sectors at or beyond it read as zeros
//! without touching the file, which is what `set_len` growth must look like.
//!
//! Concurrency: `live` is a read–write lock. Reads share it (and may run in
//! parallel); writes, `set_len` and `close` hold it exclusively, so a read
//! never sees a half-written sector or inserts stale plaintext into the
//! cache. `sync_data` holds it shared: it changes no sector. Lock order:
//! `live`, then `cache`, then `meta`.

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use zeroize::{Zeroize, Zeroizing};

use super::cache::SectorCache;
use super::direct::DirectReader;
use super::error::ContainerError;
use super::fill_random;
use super::freeze::FreezeGate;
use super::header::{Header, HeaderWriter};
use super::layout::*;
use super::ranges::RangeSet;
use crate::crypto::{CONTAINER_ID_LEN, HeaderMac, NONCE_LEN, SectorCipher, TAG_LEN};

/// Default size of the plaintext sector cache.
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;

/// Sectors sealed or opened per `pwrite`/`pread` at most (1 MiB of
/// plaintext), bounding the buffers a large request needs.
const IO_CHUNK_SECTORS: u64 = 256;

/// Data sectors sealed per `pwrite` at most (4 MiB of plaintext): file data
/// comes in long runs in file order, and fewer system calls is most of what
/// keeping it out of redb gains.
const DATA_IO_CHUNK_SECTORS: u64 = 1024;

/// Runs of data sectors at least this long have the aligned middle of their
/// sealed bytes written with `O_DIRECT` ([`SectorStore::write_direct`]); shorter
/// ones go through the page cache whole.
const DIRECT_WRITE_MIN_SECTORS: usize = 32;

/// Alignment of a direct write's offset, length and buffer (as `direct.rs`).
const ALIGN: u64 = 4096;

/// Reads and writes of at most this many pages (redb's btree pages, its
/// header) go into the cache; larger ones (file data, which the kernel caches
/// above us) are not cached, and writes evict what they overwrite, so a
/// stream of data does not push the metadata out of the cache.
const CACHE_RUN_PAGES: usize = 4;

/// Written bytes after which the kernel is asked to start writing the
/// container's dirty pages out (`sync_file_range(SYNC_FILE_RANGE_WRITE)`,
/// which does not wait for the writes). With a lot of memory the kernel would
/// otherwise keep everything dirty until the commit's `fdatasync`, which then
/// writes it all while every request waits. Durability is unchanged: only
/// `sync_data` promises anything.
const WRITEBACK_BYTES: u64 = 8 << 20;

/// How far ahead of a sequential read the kernel is asked to read the
/// container (4 MiB of sectors).
const READ_AHEAD_SECTORS: u64 = 1024;

/// How far ahead of short data writes the container is read (see
/// [`SectorStore::read_ahead_for_write`]).
const WRITE_AHEAD_BYTES: u64 = 2 << 20;

/// Gap sectors sealed as zeros per batch when `sync_data` fills the gaps
/// (bounds the list of sectors a batch builds).
const GAP_FILL_BATCH: u64 = 4096;

/// The header sees the data area in blocks of this many sectors (1 MiB):
/// after a sync each block below the extent is sealed whole or listed as
/// unsealed whole, so the list changes (a header write) once per block that
/// writes reach, not at every commit (FORMAT.md §4.2).
const BLOCK_SECTORS: u64 = 256;

/// Nonces drawn from the system's random source at once (one `getrandom`
/// per this many sealed sectors, instead of one per write).
const NONCE_POOL: usize = 256;

const S: u64 = SECTOR_SIZE as u64;

const SEG: u64 = SEGMENT_SECTORS;

/// Which physical segments hold redb's store, and in what order (FORMAT.md
/// §4.10): runs of consecutive physical segments, in store order, each run
/// after the previous one in the file (new store segments are always taken at
/// the physical end).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct SegmentMap {
    /// `(first physical segment, segments)`.
    runs: Vec<(u64, u64)>,
    /// The store segment each run starts at.
    starts: Vec<u64>,
    /// Store segments mapped in all.
    len: u64,
}

impl SegmentMap {
    fn from_runs(runs: &[(u32, u32)]) -> Self {
        let mut map = SegmentMap::default();
        for &(first, count) in runs {
            map.starts.push(map.len);
            map.runs.push((u64::from(first), u64::from(count)));
            map.len += u64::from(count);
        }
        map
    }

    /// Store segments `0..n` where physical segments `0..n` are.
    fn identity(n: u64) -> Self {
        SegmentMap {
            runs: vec![(0, n)],
            starts: vec![0],
            len: n,
        }
    }

    fn to_runs(&self) -> Vec<(u32, u32)> {
        // Segments are bounded by MAX_SECTORS / SEGMENT_SECTORS < 2^32 (checked
        // when they are added and when a header is read).
        self.runs
            .iter()
            .map(|&(first, count)| (first as u32, count as u32))
            .collect()
    }

    /// The physical segment of store segment `j`.
    fn physical(&self, j: u64) -> Option<u64> {
        if j >= self.len {
            return None;
        }
        let i = self.starts.partition_point(|&start| start <= j) - 1;
        Some(self.runs[i].0 + (j - self.starts[i]))
    }

    /// Whether physical segment `q` is one of the store's.
    fn holds(&self, q: u64) -> bool {
        let i = self.runs.partition_point(|&(first, _)| first <= q);
        i > 0 && {
            let (first, count) = self.runs[i - 1];
            q < first + count
        }
    }

    /// One past the last physical segment of the store.
    fn physical_end(&self) -> u64 {
        self.runs.last().map_or(0, |&(first, count)| first + count)
    }

    /// Unmaps every store segment at or past physical segment `q` (at least
    /// 1: segment 0 stays). Runs are sorted by physical segment, so these are
    /// the map's trailing store segments.
    fn cut_at(&mut self, q: u64) {
        let q = q.max(1);
        while let Some(last) = self.runs.last_mut() {
            if last.0 >= q {
                self.runs.pop();
                self.starts.pop();
                continue;
            }
            last.1 = last.1.min(q - last.0);
            break;
        }
        self.len = match (self.starts.last(), self.runs.last()) {
            (Some(start), Some(&(_, count))) => start + count,
            _ => 0,
        };
    }

    /// Makes physical segments `q..q + n` (past every segment the map has)
    /// the next `n` store segments.
    fn push(&mut self, q: u64, n: u64) -> io::Result<()> {
        let runs = self.runs.len();
        match self.runs.last_mut() {
            Some((first, count)) if *first + *count == q => *count += n,
            _ if runs >= MAX_SEGMENT_RUNS => {
                return Err(io::Error::new(
                    io::ErrorKind::StorageFull,
                    format!(
                        "the vault's store cannot grow: its segment map is full \
                         ({MAX_SEGMENT_RUNS} runs of segments between file data)"
                    ),
                ));
            }
            _ => {
                self.starts.push(self.len);
                self.runs.push((q, n));
            }
        }
        self.len += n;
        Ok(())
    }
}

/// The state every access consults: redb's length, the extent, the shadow
/// pair of page 0 and the seal count.
#[derive(Debug)]
struct Live {
    /// redb's logical length: what `len()` returns.
    store_len: u64,
    /// Physical sectors `0..extent` have been sealed at least once, except
    /// those in `gaps`.
    extent: u64,
    /// Sectors below `extent` never sealed yet, as disjoint ranges: the gap
    /// a write far beyond the extent leaves (redb writes a page near the new
    /// end when it doubles the store). They read as zeros, like sectors
    /// beyond the extent, and `sync_data` records them in the header as the
    /// unsealed ranges (FORMAT.md §4.2) instead of sealing zeros that data
    /// mostly overwrites soon after. Idle time ([`SectorStore::seal_unsealed`])
    /// and a clean close seal zeros into what is left.
    gaps: RangeSet,
    /// The store segment map; `None`: the identity map (a header before
    /// version 4, and no data segment claimed since).
    map: Option<SegmentMap>,
    /// The physical sector (0 or 1) holding the newest copy of page 0.
    page0_newest: Option<u64>,
    /// Its generation (0 if none authenticates).
    page0_generation: u64,
    /// Seals spent under this key epoch (counting from the header's reserve
    /// at open: seals before that are unknowable, so all are assumed spent).
    seals: u64,
    /// The seal budget reserved in the header on disk.
    reserve: u64,
    /// Random nonces not used yet: `nonces[nonces_used..]`. Each is used once.
    nonces: Vec<u8>,
    nonces_used: usize,
    /// The buffer runs of sectors are sealed in, kept between writes: allocating it for each
    /// run cost a zeroing at allocation and another at free (the wiping allocator), a fifth
    /// of the daemon's `memset` on a sequential write. Between writes it holds ciphertext
    /// only.
    sealed: Vec<u8>,
}

impl Live {
    /// The physical sector of store position `pos` (FORMAT.md §4.10); `None`
    /// where the map has no segment for it yet.
    fn phys(&self, pos: u64) -> Option<u64> {
        match &self.map {
            None => Some(pos),
            Some(map) => map.physical(pos / SEG).map(|q| q * SEG + pos % SEG),
        }
    }

    /// The first physical segment after every segment in use: the store's,
    /// and everything below the extent (data segments among it).
    fn physical_end(&self) -> u64 {
        let mapped = self.map.as_ref().map_or(0, SegmentMap::physical_end);
        self.extent.div_ceil(SEG).max(mapped)
    }

    /// Whether physical sector `s` is a data sector: in a segment that is not
    /// the store's, below the physical end.
    fn is_data_sector(&self, s: u64) -> bool {
        let q = s / SEG;
        match &self.map {
            None => false,
            Some(map) => !map.holds(q) && q < self.physical_end(),
        }
    }

    /// Fill `out` (a whole number of nonces) with fresh random nonces.
    fn take_nonces(&mut self, out: &mut [u8]) -> io::Result<()> {
        let mut at = 0;
        while at < out.len() {
            if self.nonces_used == self.nonces.len() {
                self.nonces.resize(NONCE_POOL * NONCE_LEN, 0);
                fill_random(&mut self.nonces).map_err(io::Error::other)?;
                self.nonces_used = 0;
            }
            let n = (out.len() - at).min(self.nonces.len() - self.nonces_used);
            out[at..at + n].copy_from_slice(&self.nonces[self.nonces_used..self.nonces_used + n]);
            // A nonce is never handed out twice.
            self.nonces[self.nonces_used..self.nonces_used + n].fill(0);
            self.nonces_used += n;
            at += n;
        }
        Ok(())
    }
}

/// The header as last written, and the means to write it.
struct Meta {
    header: Header,
    writer: HeaderWriter,
    mac: HeaderMac,
}

impl Meta {
    fn write(&mut self, file: &File) -> io::Result<()> {
        self.writer
            .write(file, &mut self.header, &self.mac)
            .map(|_| ())
    }
}

/// An authentic copy of redb's page 0 in the shadow pair.
#[derive(Clone, Copy)]
struct Page0Copy {
    /// Physical sector: 0 or 1.
    sector: u64,
    generation: u64,
}

/// What a physical sector about to be sealed holds.
#[derive(Clone, Copy)]
enum Source {
    /// Plaintext page `i` of the write's buffer.
    Page(usize),
    /// Zeros: a gap below the new extent that was never written.
    Zero,
}

/// An unlocked container's data area, ready for redb. Holds the container's
/// file lock, the sector key and a cache of plaintext in locked memory; all
/// are released and wiped when it is dropped.
pub struct SectorStore {
    path: PathBuf,
    file: File,
    id: [u8; CONTAINER_ID_LEN],
    epoch: u32,
    read_only: bool,
    /// Fixed size in physical sectors, for preallocated containers.
    capacity: Option<u64>,
    /// Store pages `1..=fsync_log_pages` hold the fsync log; redb sees the
    /// store without them (its page k > 0 is store page k + fsync_log_pages).
    fsync_log_pages: u64,
    cipher: SectorCipher,
    live: RwLock<Live>,
    cache: Mutex<SectorCache>,
    meta: Mutex<Meta>,
    damaged_reads: AtomicU64,
    damaged_sectors: Mutex<BTreeSet<u64>>,
    /// Physical sectors written since the last `sync_data`. redb reads them
    /// back at commit (to checksum its dirty pages) and writes them again
    /// unchanged, so a read of them is cached even when long, for
    /// [`Self::already_holds`] to find. Lock order: after `live`.
    recent: Mutex<RangeSet>,
    /// Sectors were written since the last `fdatasync`. A close right after
    /// redb's own final sync then skips a sync that would change nothing.
    unsynced: AtomicBool,
    /// Set by tests that simulate a crash: drop then writes nothing.
    abandoned: AtomicBool,
    /// Bytes written since writeback was last started.
    unstarted: AtomicU64,
    /// Where the last read of sectors ended, and up to where the kernel was
    /// asked to read ahead (physical sectors): see [`Self::read_ahead`].
    read_end: AtomicU64,
    read_ahead_to: AtomicU64,
    /// Up to where the kernel was asked to read the container ahead of short data writes
    /// ([`Self::read_ahead_for_write`]).
    write_ahead_to: AtomicU64,
    /// Long sequential reads bypass the page cache through this (see [`DirectReader`]);
    /// `None` where the file refuses `O_DIRECT`.
    direct: Option<DirectReader>,
    /// The container opened again with `O_DIRECT`, for the aligned middle of
    /// long runs of data sectors ([`Self::write_direct`]); `None` when
    /// read-only or refused.
    direct_write: Option<File>,
    /// Cleared for good when a direct write failed: then everything is
    /// written through the page cache.
    direct_write_ok: AtomicBool,
    /// Every change to the file passes here, so a backup can hold it still.
    gate: Arc<FreezeGate>,
    #[cfg(test)]
    page0_tail_writes: AtomicU64,
    /// Runs of sectors served by the direct reader.
    #[cfg(test)]
    direct_runs: AtomicU64,
    /// Direct writes that succeeded.
    #[cfg(test)]
    direct_writes: AtomicU64,
}

/// Everything `Container::into_store` hands over.
pub(crate) struct StoreParts {
    pub path: PathBuf,
    pub file: File,
    pub read_only: bool,
    pub header: Header,
    pub writer: HeaderWriter,
    pub mac: HeaderMac,
    pub cipher: SectorCipher,
    pub cache_bytes: usize,
}

fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// Copy `bytes`, found at byte `pos` of a run of sealed sectors (nonce, ciphertext, tag
/// each), to where they belong: the ciphertexts into `dst`, the nonces and tags into `frames`.
fn scatter_sealed(
    mut pos: usize,
    mut bytes: &[u8],
    dst: &mut [u8],
    frames: &mut [[u8; NONCE_LEN + TAG_LEN]],
) {
    while !bytes.is_empty() {
        let (i, r) = (pos / SEALED_SECTOR_SIZE, pos % SEALED_SECTOR_SIZE);
        let target: &mut [u8] = if r < NONCE_LEN {
            &mut frames[i][r..NONCE_LEN]
        } else if r < NONCE_LEN + SECTOR_SIZE {
            &mut dst[i * SECTOR_SIZE + r - NONCE_LEN..(i + 1) * SECTOR_SIZE]
        } else {
            &mut frames[i][r - SECTOR_SIZE..]
        };
        let n = target.len().min(bytes.len());
        target[..n].copy_from_slice(&bytes[..n]);
        pos += n;
        bytes = &bytes[n..];
    }
}

/// The container opened again for writing with `O_DIRECT`, through
/// `/proc/self/fd` (the same file even if its path changed), as
/// [`DirectReader::open`] does for reading. `None` where that is refused.
fn open_direct_writer(file: &File) -> Option<File> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let path = format!("/proc/self/fd/{}", file.as_raw_fd());
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .inspect_err(|e| tracing::debug!("no direct writes to the container: {e}"))
        .ok()
}

/// A present store page without a sector: the map lost a segment, which no
/// code path does.
fn unmapped() -> io::Error {
    io::Error::other("a store page has no sector in the segment map")
}

fn poisoned() -> io::Error {
    io::Error::other("the sector store is unusable after a panic in another thread")
}

impl SectorStore {
    pub(crate) fn new(parts: StoreParts) -> Result<SectorStore, ContainerError> {
        let h = &parts.header;
        let live = Live {
            store_len: h.store_len,
            extent: h.extent,
            map: h.segments.as_deref().map(SegmentMap::from_runs),
            page0_newest: None,
            page0_generation: 0,
            gaps: h.unsealed.iter().copied().collect(),
            seals: h.seal_reserve,
            reserve: h.seal_reserve,
            nonces: Vec::new(),
            nonces_used: 0,
            sealed: Vec::new(),
        };
        let direct = DirectReader::open(&parts.file);
        let direct_write = (!parts.read_only)
            .then(|| open_direct_writer(&parts.file))
            .flatten();
        let store = SectorStore {
            id: h.id,
            epoch: h.epoch,
            capacity: h.fixed().then_some(h.capacity),
            fsync_log_pages: h.fsync_log_pages,
            path: parts.path,
            file: parts.file,
            read_only: parts.read_only,
            cipher: parts.cipher,
            live: RwLock::new(live),
            cache: Mutex::new(SectorCache::new(cache_limit(parts.cache_bytes))),
            meta: Mutex::new(Meta {
                header: parts.header,
                writer: parts.writer,
                mac: parts.mac,
            }),
            damaged_reads: AtomicU64::new(0),
            damaged_sectors: Mutex::new(BTreeSet::new()),
            recent: Mutex::default(),
            unsynced: AtomicBool::new(false),
            abandoned: AtomicBool::new(false),
            unstarted: AtomicU64::new(0),
            read_end: AtomicU64::new(0),
            read_ahead_to: AtomicU64::new(0),
            write_ahead_to: AtomicU64::new(0),
            direct,
            direct_write_ok: AtomicBool::new(direct_write.is_some()),
            direct_write,
            gate: Arc::default(),
            #[cfg(test)]
            page0_tail_writes: AtomicU64::new(0),
            #[cfg(test)]
            direct_runs: AtomicU64::new(0),
            #[cfg(test)]
            direct_writes: AtomicU64::new(0),
        };
        store
            .find_page0()
            .map_err(|e| ContainerError::io(&store.path, "read", e))?;
        Ok(store)
    }

    /// Reads that met a sector failing authentication (each such sector
    /// counts once per read). The filesystem compares this before and after
    /// an operation and fails the operation with EIO if it moved.
    pub fn damaged_reads(&self) -> u64 {
        self.damaged_reads.load(Ordering::Acquire)
    }

    /// Physical sector numbers that failed authentication so far.
    pub fn damaged_sectors(&self) -> Vec<u64> {
        self.damaged_sectors
            .lock()
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }

    /// The most bytes redb's store and the data segments can hold together,
    /// for a fixed-size container (its sectors less page 0's second copy and
    /// the fsync log); `None` when it grows with the host filesystem. Data
    /// segments take their share of it: [`Self::written_bytes`] counts them.
    pub fn capacity(&self) -> Option<u64> {
        self.capacity
            .map(|cap| (cap - 1 - self.fsync_log_pages) * S)
    }

    /// Bytes of the data area in use: the extent (every sector below it is
    /// sealed, or promised as a gap), less page 0's second copy, as bytes. It
    /// counts redb's store and every claimed data segment whole, whether its
    /// sectors were written yet or not. Never more than [`Self::capacity`]
    /// (plus the fsync log's pages).
    pub fn written_bytes(&self) -> u64 {
        self.live
            .read()
            .map(|l| l.extent.saturating_sub(1) * S)
            .unwrap_or(0)
    }

    /// The gate a backup closes to hold the file still (see [`FreezeGate`]).
    pub fn freeze_gate(&self) -> Arc<FreezeGate> {
        self.gate.clone()
    }

    /// Whether a backup holds the file still now.
    pub fn is_held_still(&self) -> bool {
        self.gate.is_frozen()
    }

    pub fn container_path(&self) -> &Path {
        &self.path
    }

    pub fn container_id(&self) -> [u8; CONTAINER_ID_LEN] {
        self.id
    }

    fn live_read(&self) -> io::Result<RwLockReadGuard<'_, Live>> {
        self.live.read().map_err(|_| poisoned())
    }

    fn live_write(&self) -> io::Result<RwLockWriteGuard<'_, Live>> {
        self.live.write().map_err(|_| poisoned())
    }

    fn cache(&self) -> io::Result<MutexGuard<'_, SectorCache>> {
        self.cache.lock().map_err(|_| poisoned())
    }

    fn meta(&self) -> io::Result<MutexGuard<'_, Meta>> {
        self.meta.lock().map_err(|_| poisoned())
    }

    // ------------------------------------------------- the fsync log ----

    /// Store pages the fsync log has (0: none).
    pub fn fsync_log_pages(&self) -> u64 {
        self.fsync_log_pages
    }

    /// Where redb's byte `offset` lies in the store: past the log, except
    /// within redb's page 0.
    fn store_offset(&self, redb_offset: u64) -> u64 {
        if redb_offset < S {
            redb_offset
        } else {
            redb_offset + self.fsync_log_pages * S
        }
    }

    /// The store length for redb's length `len`.
    fn store_len_for(&self, len: u64) -> u64 {
        if len <= S {
            len
        } else {
            len + self.fsync_log_pages * S
        }
    }

    fn redb_len(&self, store_len: u64) -> u64 {
        if store_len <= S {
            store_len
        } else {
            store_len.saturating_sub(self.fsync_log_pages * S).max(S)
        }
    }

    /// Runs `f(store offset, range of the buffer)` for the part of redb's
    /// `offset..offset + len` in its page 0 and for the part after it, which
    /// lie apart in the store when there is a log.
    fn in_store_pieces(
        &self,
        offset: u64,
        len: usize,
        mut f: impl FnMut(u64, std::ops::Range<usize>) -> io::Result<()>,
    ) -> io::Result<()> {
        let end = offset.saturating_add(len as u64);
        if offset < S && end > S && self.fsync_log_pages > 0 {
            let split = (S - offset) as usize;
            f(offset, 0..split)?;
            return f(self.store_offset(S), split..len);
        }
        f(self.store_offset(offset), 0..len)
    }

    /// Reads page `index` of the fsync log. `Ok(false)` (and zeros in `out`)
    /// when it fails authentication: that is what a crash in the middle of
    /// an append leaves, so it is not counted as damage.
    pub fn read_fsync_log_page(&self, index: u64, out: &mut [u8]) -> io::Result<bool> {
        let page = self.fsync_log_page(index, out.len())?;
        let live = self.live_read()?;
        if !Self::present(&live, page) {
            out.fill(0);
            return Ok(true);
        }
        if self.cache()?.get(page, out) {
            return Ok(true);
        }
        let sector = live.phys(page + 1).ok_or_else(unmapped)?;
        let mut frame = [[0u8; NONCE_LEN + TAG_LEN]];
        self.read_sealed_into(sector, out, &mut frame)?;
        let (nonce, tag) = frame[0].split_at(NONCE_LEN);
        if self.open_parts(sector, nonce, out, tag) {
            Ok(true)
        } else {
            out.fill(0);
            Ok(false)
        }
    }

    /// Writes whole pages of the fsync log from page `index` on. Durable
    /// after the next `sync_data`.
    pub fn write_fsync_log(&self, index: u64, pages: &[u8]) -> io::Result<()> {
        let count = pages.len() / SECTOR_SIZE;
        if !pages.len().is_multiple_of(SECTOR_SIZE) || index + count as u64 > self.fsync_log_pages {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a write past the end of the fsync log",
            ));
        }
        let _change = self.gate.change();
        self.write_impl((1 + index) * S, pages)
    }

    fn fsync_log_page(&self, index: u64, len: usize) -> io::Result<u64> {
        if index >= self.fsync_log_pages || len != SECTOR_SIZE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a read past the end of the fsync log",
            ));
        }
        Ok(1 + index)
    }

    // ------------------------------------------------ data segments ----

    /// Sectors per data segment ([`SEGMENT_SECTORS`]).
    pub fn data_segment_sectors(&self) -> u64 {
        SEG
    }

    /// Give the store segments up to store position `end` (exclusive), at
    /// the physical end, when it has a segment map; past the capacity of a
    /// fixed-size container none (writes there fail with `ENOSPC`).
    fn map_through(&self, live: &mut Live, end: u64) -> io::Result<()> {
        let q = live.physical_end();
        let Some(map) = &mut live.map else {
            return Ok(());
        };
        let wanted = end.div_ceil(SEG).saturating_sub(map.len);
        // Segments that start within the capacity (the last may be cut
        // short), and within MAX_SECTORS.
        let room = self
            .capacity
            .map_or(MAX_SECTORS / SEG, |cap| cap.div_ceil(SEG))
            .min(MAX_SECTORS / SEG)
            .saturating_sub(q);
        match wanted.min(room) {
            0 => Ok(()),
            n => map.push(q, n),
        }
    }

    /// Claims the segment at the physical end for file data and returns its
    /// first sector (FORMAT.md §4.10). The first claim turns the identity map
    /// into an explicit one (the store keeps the segments its length and
    /// extent reach). The segment joins the extent as a gap: it reads as
    /// zeros, the header records it at the next `sync_data` (a crash before
    /// gives it back), and idle time seals zeros into what data leaves.
    pub fn claim_data_segment(&self) -> io::Result<u64> {
        if self.read_only {
            return Err(errno(libc::EROFS));
        }
        let _change = self.gate.change();
        let mut live = self.live_write()?;
        let mut map = match &live.map {
            Some(map) => map.clone(),
            None => {
                let used = live.extent.max(sectors_for_len(live.store_len));
                let mut n = used.div_ceil(SEG).max(1);
                if let Some(cap) = self.capacity {
                    n = n.min(cap.div_ceil(SEG));
                }
                SegmentMap::identity(n)
            }
        };
        let q = live.extent.div_ceil(SEG).max(map.physical_end());
        let end = (q + 1) * SEG;
        if end > MAX_SECTORS || self.capacity.is_some_and(|cap| end > cap) {
            return Err(errno(libc::ENOSPC));
        }
        if live.extent < 2 {
            // Page 0's shadow pair is never a gap: zeros in both copies.
            let extent = live.extent;
            self.fill_range(&mut live, extent, 2)?;
            live.extent = 2;
        }
        // The file must be as long as the extent the header will promise
        // (FORMAT.md §1.1): a growing one gets a hole (a gap reads as zeros
        // without touching it), made durable by the next sync's `fdatasync`
        // before the header records the extent.
        let want = file_len_for_sectors(end);
        if self.capacity.is_none() && self.file.metadata()?.len() < want {
            self.file.set_len(want)?;
            self.unsynced.store(true, Ordering::Release);
        }
        // The map changes only now that nothing can fail any more.
        map.runs.shrink_to_fit();
        live.map = Some(map);
        let extent = live.extent;
        live.gaps.insert(extent, end);
        live.extent = end;
        Ok(q * SEG)
    }

    /// Refuse (`EINVAL`) sectors `first..first + count` unless all lie in
    /// data segments: segments that are not the store's, below the physical
    /// end. The store cannot tell a data segment the filesystem recorded
    /// from one it claimed and forgot, so it accepts either.
    fn check_data_sectors(live: &Live, first: u64, count: u64) -> io::Result<()> {
        let end = first
            .checked_add(count)
            .ok_or_else(|| errno(libc::EINVAL))?;
        let mut q = first / SEG;
        while q * SEG < end {
            if !live.is_data_sector(q * SEG) {
                return Err(errno(libc::EINVAL));
            }
            q += 1;
        }
        Ok(())
    }

    /// Seals `plain` (whole 4096-byte sectors) into data sectors `first..`,
    /// as store writes seal pages (extent, gaps, seal budget, writeback), but
    /// never into the plaintext cache, and long runs mostly past the page
    /// cache ([`Self::write_direct`]). Durable after the next `sync_data`.
    pub fn write_data_sectors(&self, first: u64, plain: &[u8]) -> io::Result<()> {
        if self.read_only {
            return Err(errno(libc::EROFS));
        }
        if !plain.len().is_multiple_of(SECTOR_SIZE) {
            return Err(errno(libc::EINVAL));
        }
        if plain.is_empty() {
            return Ok(());
        }
        let count = (plain.len() / SECTOR_SIZE) as u64;
        let _change = self.gate.change();
        let mut live = self.live_write()?;
        Self::check_data_sectors(&live, first, count)?;
        // The cache is keyed by store page, and no store page lies in a data
        // segment: there is nothing in it to drop.
        let sectors = (0..count as usize)
            .map(|i| (first + i as u64, Source::Page(i)))
            .collect();
        self.seal_sectors(&mut live, sectors, plain, true)
    }

    /// Opens data sectors `first..` into `out` (whole sectors). A sector never
    /// written (a gap, or beyond the extent) reads as zeros without touching
    /// the file; one failing authentication reads as zeros and is counted
    /// ([`Self::damaged_reads`]). Long runs read in order go past the page
    /// cache (the direct reader); nothing goes into the plaintext cache.
    pub fn read_data_sectors(&self, first: u64, out: &mut [u8]) -> io::Result<()> {
        if !out.len().is_multiple_of(SECTOR_SIZE) {
            return Err(errno(libc::EINVAL));
        }
        let count = (out.len() / SECTOR_SIZE) as u64;
        let live = self.live_read()?;
        // An empty read still checks that `first` lies in a data segment: a probe.
        Self::check_data_sectors(&live, first, count.max(1))?;
        let sealed = |s: u64| s < live.extent && !live.gaps.contains(s);
        let mut i = 0;
        while i < count {
            let at = i as usize * SECTOR_SIZE;
            if !sealed(first + i) {
                out[at..at + SECTOR_SIZE].fill(0);
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < count && j - i < IO_CHUNK_SECTORS && sealed(first + j) {
                j += 1;
            }
            self.load_run(first + i, &mut out[at..j as usize * SECTOR_SIZE], None)?;
            i = j;
        }
        Ok(())
    }

    // ------------------------------------------------------ sealing ----

    fn aad(&self, sector: u64) -> [u8; SECTOR_AAD_LEN] {
        let mut aad = [0u8; SECTOR_AAD_LEN];
        let (label, rest) = aad.split_at_mut(SECTOR_AAD_LABEL.len());
        label.copy_from_slice(SECTOR_AAD_LABEL);
        let (id, rest) = rest.split_at_mut(CONTAINER_ID_LEN);
        id.copy_from_slice(&self.id);
        let (epoch, n) = rest.split_at_mut(4);
        epoch.copy_from_slice(&self.epoch.to_le_bytes());
        n.copy_from_slice(&sector.to_le_bytes());
        aad
    }

    /// Seal the plaintext already in `slot[NONCE..NONCE + 4096]` as physical
    /// sector `sector`, with `nonce`.
    fn seal(&self, sector: u64, nonce: &[u8], slot: &mut [u8]) -> io::Result<()> {
        let nonce: [u8; NONCE_LEN] = nonce.try_into().expect("nonce length");
        let (head, rest) = slot.split_at_mut(NONCE_LEN);
        let (body, tag_out) = rest.split_at_mut(SECTOR_SIZE);
        head.copy_from_slice(&nonce);
        let tag = self
            .cipher
            .seal_in_place(&nonce, &self.aad(sector), body)
            .map_err(io::Error::other)?;
        tag_out.copy_from_slice(&tag);
        Ok(())
    }

    /// Open a sealed sector in place; on success its plaintext is
    /// `slot[NONCE..NONCE + 4096]`. On failure that range is zeros.
    fn open(&self, sector: u64, slot: &mut [u8]) -> bool {
        let (head, rest) = slot.split_at_mut(NONCE_LEN);
        let (body, tag) = rest.split_at_mut(SECTOR_SIZE);
        self.open_parts(sector, head, body, tag)
    }

    /// Open sector `sector` whose nonce, ciphertext and tag lie apart; on
    /// success `body` is the plaintext.
    fn open_parts(&self, sector: u64, nonce: &[u8], body: &mut [u8], tag: &[u8]) -> bool {
        let nonce: [u8; NONCE_LEN] = nonce.try_into().expect("nonce length");
        let tag: [u8; TAG_LEN] = tag.try_into().expect("tag length");
        self.cipher
            .open_in_place(&nonce, &self.aad(sector), body, &tag)
            .is_ok()
    }

    fn note_damage(&self, sector: u64) {
        self.damaged_reads.fetch_add(1, Ordering::AcqRel);
        let first_time = self
            .damaged_sectors
            .lock()
            .map(|mut s| s.insert(sector))
            .unwrap_or(false);
        if first_time {
            tracing::warn!(
                sector,
                "a sector of the container failed authentication (damaged or tampered); \
                 reads of it return an I/O error"
            );
        }
    }

    // ------------------------------------------------------ reading ----

    /// Read physical sectors `first..first + count` (all below the extent).
    fn read_sealed(&self, first: u64, count: u64) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; count as usize * SEALED_SECTOR_SIZE];
        self.file
            .read_exact_at(&mut buf, sector_offset(first))
            .map_err(|e| {
                if e.kind() == io::ErrorKind::UnexpectedEof {
                    io::Error::new(
                        e.kind(),
                        format!(
                            "{} is shorter than its header says (sector {first} is missing); \
                             it was truncated",
                            self.path.display()
                        ),
                    )
                } else {
                    e
                }
            })?;
        Ok(buf)
    }

    /// Both copies of page 0 that lie below the extent, opened: the newest
    /// authentic one, and its plaintext (zeros if none authenticates).
    fn read_page0_copies(&self, extent: u64) -> io::Result<(Option<Page0Copy>, Vec<u8>)> {
        let present = extent.min(2);
        let mut plain = vec![0u8; SECTOR_SIZE];
        if present == 0 {
            return Ok((None, plain));
        }
        let mut buf = self.read_sealed(0, present)?;
        let mut best: Option<Page0Copy> = None;
        for (i, slot) in buf.chunks_mut(SEALED_SECTOR_SIZE).enumerate() {
            let sector = i as u64;
            if !self.open(sector, slot) {
                continue;
            }
            let body = &slot[NONCE_LEN..NONCE_LEN + SECTOR_SIZE];
            let generation =
                u64::from_le_bytes(body[PAGE0_GENERATION_OFFSET..].try_into().expect("8 bytes"));
            if best.is_none_or(|b| generation > b.generation) {
                best = Some(Page0Copy { sector, generation });
                plain.copy_from_slice(body);
            }
        }
        buf.zeroize();
        plain[PAGE0_GENERATION_OFFSET..].fill(0);
        Ok((best, plain))
    }

    /// At open: which copy of page 0 is newest.
    fn find_page0(&self) -> io::Result<()> {
        let mut live = self.live_write()?;
        let (best, mut plain) = self.read_page0_copies(live.extent)?;
        plain.zeroize();
        if let Some(copy) = best {
            live.page0_newest = Some(copy.sector);
            live.page0_generation = copy.generation;
        }
        Ok(())
    }

    /// Whether store page `page` has been written (its sector is mapped,
    /// below the extent and not in a gap).
    fn present(live: &Live, page: u64) -> bool {
        if page == 0 {
            live.extent > 0
        } else {
            live.phys(page + 1)
                .is_some_and(|s| s < live.extent && !live.gaps.contains(s))
        }
    }

    /// Fill `out` (whole pages, starting at redb page `first`) with
    /// plaintext: from the cache, as zeros beyond the extent, else from the
    /// file. A sector failing authentication reads as zeros and is counted.
    fn load_pages(&self, live: &Live, first: u64, out: &mut [u8]) -> io::Result<()> {
        let mut misses = Vec::new();
        {
            let mut cache = self.cache()?;
            for (i, dst) in out.chunks_mut(SECTOR_SIZE).enumerate() {
                let page = first + i as u64;
                if !Self::present(live, page) {
                    dst.fill(0);
                } else if !cache.get(page, dst) {
                    misses.push(page);
                }
            }
        }
        // Present pages are mapped.
        let sector = |page: u64| live.phys(page + 1).unwrap_or(u64::MAX);
        let mut at = 0;
        while at < misses.len() {
            // A run of consecutive pages in consecutive sectors (a store
            // segment boundary may part them), up to one I/O chunk.
            let start = misses[at];
            let mut end = at + 1;
            while end < misses.len()
                && misses[end] == misses[end - 1] + 1
                && sector(misses[end]) == sector(misses[end - 1]) + 1
                && (end - at) < IO_CHUNK_SECTORS as usize
                && start != 0
            {
                end += 1;
            }
            let dst_at = (start - first) as usize * SECTOR_SIZE;
            let dst = &mut out[dst_at..dst_at + (end - at) * SECTOR_SIZE];
            if start == 0 {
                self.load_page0(live, dst)?;
            } else {
                let phys = sector(start);
                let cache = (end - at) <= CACHE_RUN_PAGES
                    || self.written_since_sync(phys, (end - at) as u64)?;
                self.load_run(phys, dst, cache.then_some(start))?;
            }
            at = end;
        }
        Ok(())
    }

    fn load_page0(&self, live: &Live, dst: &mut [u8]) -> io::Result<()> {
        let (best, mut plain) = self.read_page0_copies(live.extent)?;
        dst.copy_from_slice(&plain);
        match (best, live.page0_newest) {
            // The copy this session wrote (or found newest at open) no
            // longer authenticates: damage since, not a torn write.
            (Some(b), Some(newest)) if b.sector != newest => self.note_damage(newest),
            (Some(_), _) => self.cache()?.insert(0, &plain),
            (None, newest) => self.note_damage(newest.unwrap_or(0)),
        }
        plain.zeroize();
        Ok(())
    }

    /// Whether physical sectors `first..first + count` were all written since
    /// the last sync.
    fn written_since_sync(&self, first: u64, count: u64) -> io::Result<bool> {
        let recent = self.recent.lock().map_err(|_| poisoned())?;
        Ok(recent.covers(first, first + count))
    }

    /// Read and open the physical sectors `first..` filling `dst`, which are
    /// all below the extent and not cached; put them in the cache as the
    /// store pages from `cache` on, if given. Each sector's ciphertext is
    /// read straight into its place in `dst` and opened there, so no buffer
    /// ever holds plaintext but `dst`. The caller caches short runs (redb's
    /// btree pages) and what was written since the last sync (see
    /// [`Self::recent`]), not other long runs: they are file data, which the
    /// kernel caches above us, and would push the metadata out. Data sectors
    /// are never cached.
    fn load_run(&self, first: u64, dst: &mut [u8], cache: Option<u64>) -> io::Result<()> {
        let count = dst.len() / SECTOR_SIZE;
        let mut frames = vec![[0u8; NONCE_LEN + TAG_LEN]; count];
        let sequential = self.follows_last_read(first, count as u64);
        // File data read in order skips the page cache; what is cached here, read out of
        // order, or written since the last sync (still in the page cache: a direct read would
        // first wait for its writeback, then read a whole window from the disk — an fsync's log
        // record reads back the chunk it names) goes through it.
        let buffered = cache.is_some() || self.written_since_sync(first, count as u64)?;
        if buffered || !self.read_direct(first, dst, &mut frames, sequential) {
            if sequential {
                self.read_ahead(first, count as u64);
            }
            self.read_sealed_into(first, dst, &mut frames)?;
        }
        let mut authentic = vec![false; count];
        for (i, (out, frame)) in dst.chunks_mut(SECTOR_SIZE).zip(&frames).enumerate() {
            let sector = first + i as u64;
            let (nonce, tag) = frame.split_at(NONCE_LEN);
            if self.open_parts(sector, nonce, out, tag) {
                authentic[i] = true;
            } else {
                out.fill(0);
                self.note_damage(sector);
            }
        }
        if let Some(page) = cache {
            let mut cache = self.cache()?;
            for (i, out) in dst.chunks(SECTOR_SIZE).enumerate() {
                if authentic[i] {
                    cache.insert(page + i as u64, out);
                }
            }
        }
        Ok(())
    }

    /// Whether a read of physical sectors `first..first + count` starts
    /// where the last one ended; notes where this one ends.
    fn follows_last_read(&self, first: u64, count: u64) -> bool {
        self.read_end.swap(first + count, Ordering::AcqRel) == first
    }

    /// Read physical sectors `first..` into `dst` and `frames` as
    /// [`Self::read_sealed_into`] does, from the direct reader's window, which
    /// a `sequential` read may refill. False: read them buffered.
    fn read_direct(
        &self,
        first: u64,
        dst: &mut [u8],
        frames: &mut [[u8; NONCE_LEN + TAG_LEN]],
        sequential: bool,
    ) -> bool {
        let Some(direct) = &self.direct else {
            return false;
        };
        let len = frames.len() * SEALED_SECTOR_SIZE;
        let served = direct.read(sector_offset(first), len, sequential, |at, sealed| {
            scatter_sealed(at, sealed, dst, frames)
        });
        #[cfg(test)]
        if served {
            self.direct_runs.fetch_add(1, Ordering::AcqRel);
        }
        served
    }

    /// On a sequential buffered read, ask the kernel to read the next
    /// [`READ_AHEAD_SECTORS`] of the container in the background, once the
    /// window already asked for is half used. The kernel's own readahead of
    /// the container stays at 128 KiB here, so without this a long read waits
    /// for the disk every few requests, with the filesystem's lock held.
    fn read_ahead(&self, first: u64, count: u64) {
        use std::os::fd::AsRawFd;
        let end = first + count;
        let ahead = self.read_ahead_to.load(Ordering::Acquire);
        if ahead >= end + READ_AHEAD_SECTORS / 2 {
            return;
        }
        let from = ahead.max(end);
        let to = end + READ_AHEAD_SECTORS;
        self.read_ahead_to.store(to, Ordering::Release);
        let (Ok(offset), Ok(len)) = (
            libc::off_t::try_from(sector_offset(from)),
            libc::off_t::try_from((to - from) * SEALED_SECTOR_SIZE as u64),
        ) else {
            return;
        };
        // SAFETY: a valid fd owned by `self.file`; no memory is passed. Advice
        // only: its failure changes nothing.
        unsafe {
            libc::posix_fadvise(
                self.file.as_raw_fd(),
                offset,
                len,
                libc::POSIX_FADV_WILLNEED,
            )
        };
    }

    /// Read physical sectors `first..` with one `preadv`: each one's
    /// ciphertext into its 4096 bytes of `dst`, its nonce and tag into
    /// `frames`. A short read (the file ends early) falls back to
    /// [`Self::read_sealed`], which says that the file was truncated.
    fn read_sealed_into(
        &self,
        first: u64,
        dst: &mut [u8],
        frames: &mut [[u8; NONCE_LEN + TAG_LEN]],
    ) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let count = frames.len();
        let mut iov = Vec::with_capacity(3 * count);
        for (body, frame) in dst.chunks_mut(SECTOR_SIZE).zip(frames.iter_mut()) {
            let (nonce, tag) = frame.split_at_mut(NONCE_LEN);
            for part in [nonce, body, tag] {
                iov.push(libc::iovec {
                    iov_base: part.as_mut_ptr().cast(),
                    iov_len: part.len(),
                });
            }
        }
        let want = count * SEALED_SECTOR_SIZE;
        let offset = libc::off_t::try_from(sector_offset(first)).map_err(io::Error::other)?;
        let n = loop {
            // SAFETY: every iovec points into `dst` or `frames`, which are
            // borrowed mutably for this call and outlive it; the count is the
            // vector's length (at most 3 × IO_CHUNK_SECTORS, below IOV_MAX).
            let n = unsafe {
                libc::preadv(
                    self.file.as_raw_fd(),
                    iov.as_ptr(),
                    iov.len() as i32,
                    offset,
                )
            };
            if n >= 0 {
                break n as usize;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        };
        if n == want {
            return Ok(());
        }
        let buf = self.read_sealed(first, count as u64)?;
        scatter_sealed(0, &buf, dst, frames);
        Ok(())
    }

    fn read_impl(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        let live = self.live_read()?;
        let end = offset
            .checked_add(out.len() as u64)
            .filter(|&end| end <= live.store_len)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "read beyond the end of the sector store",
                )
            })?;
        let first = offset / S;
        let pages = end.div_ceil(S) - first;
        if offset.is_multiple_of(S) && out.len() as u64 == pages * S {
            return self.load_pages(&live, first, out);
        }
        // An unaligned read (redb's header): go through a page buffer.
        let mut buf = vec![0u8; (pages * S) as usize];
        let result = self.load_pages(&live, first, &mut buf);
        let at = (offset - first * S) as usize;
        out.copy_from_slice(&buf[at..at + out.len()]);
        buf.zeroize();
        result
    }

    // ------------------------------------------------------ writing ----

    fn write_impl(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        if self.read_only {
            return Err(errno(libc::EROFS));
        }
        if data.is_empty() {
            return Ok(());
        }
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|&end| end <= MAX_STORE_LEN)
            .ok_or_else(|| errno(libc::EFBIG))?;
        let mut live = self.live_write()?;
        self.write_locked(&mut live, offset, data, end)
    }

    /// Refuse a write into page 0's generation bytes. redb's header is 320
    /// bytes and the rest of its page 0 stays zero, so only zeros there are
    /// accepted (they are what a read returns).
    fn check_page0_tail(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let tail = PAGE0_GENERATION_OFFSET as u64..S;
        let start = offset.max(tail.start);
        let end = (offset + data.len() as u64).min(tail.end);
        if start >= end {
            return Ok(());
        }
        #[cfg(test)]
        self.page0_tail_writes.fetch_add(1, Ordering::AcqRel);
        let touched = &data[(start - offset) as usize..(end - offset) as usize];
        if touched.iter().any(|&b| b != 0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "write into bytes 4088..4096 of page 0, which the container reserves",
            ));
        }
        Ok(())
    }

    /// Whether the sectors of pages `first..` already hold `data` (whole
    /// pages, not page 0), as the cache knows them. redb computes a dirty
    /// page's checksum at commit through a writable handle (`get_page_mut`
    /// in `finalize_dirty_checksums`), so every page of a transaction that
    /// left its write buffer is read back and written again unchanged: for a
    /// large file, every 64 KiB data page twice. Skipping the identical
    /// rewrite saves a seal, a nonce and a `pwrite` per sector and changes
    /// nothing on disk: the cache holds exactly the plaintext of the sealed
    /// sector (read-after-write coherent), and what is not yet durable stays
    /// for `sync_data` to make durable, as the rewrite would have.
    fn already_holds(&self, live: &Live, first: u64, data: &[u8]) -> io::Result<bool> {
        let mut cache = self.cache()?;
        let mut held = Zeroizing::new([0u8; SECTOR_SIZE]);
        for (i, page) in data.chunks(SECTOR_SIZE).enumerate() {
            let n = first + i as u64;
            if !Self::present(live, n) || !cache.get(n, &mut held[..]) || held[..] != *page {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn write_locked(&self, live: &mut Live, offset: u64, data: &[u8], end: u64) -> io::Result<()> {
        let first = offset / S;
        let last = (end - 1) / S;
        self.map_through(live, last + 2)?;
        if end > live.store_len {
            let from = sectors_for_len(live.store_len);
            Self::expose(live, from, last + 2);
        }
        // The map only grows at the physical end, so the last page has the
        // highest sector; a page the map has no segment for does not fit.
        let top = match last {
            0 => Some(1),
            _ => live.phys(last + 1),
        };
        match (top, self.capacity) {
            (None, _) => return Err(errno(libc::ENOSPC)),
            (Some(top), Some(cap)) if top + 1 > cap => return Err(errno(libc::ENOSPC)),
            _ => {}
        }
        if first == 0 {
            self.check_page0_tail(offset, data)?;
        }
        let count = (last - first + 1) as usize;
        // Whole pages (all of redb's writes but its header): sealed straight
        // from `data`, without a plaintext copy.
        let whole = first != 0 && offset.is_multiple_of(S) && end.is_multiple_of(S);
        if whole && self.already_holds(live, first, data)? {
            live.store_len = live.store_len.max(end);
            return Ok(());
        }
        let result = if whole {
            self.fill_and_write(live, first, offset, data, None)
        } else {
            let mut plain = vec![0u8; count * SECTOR_SIZE];
            let r = self.fill_and_write(live, first, offset, data, Some(&mut plain));
            plain.zeroize();
            r
        };
        if result.is_err() {
            // The file may hold the new data, the old or a torn sector:
            // forget what the cache believes.
            if let Ok(mut cache) = self.cache() {
                for page in first..=last {
                    cache.remove(page);
                }
            }
        }
        result?;
        live.store_len = live.store_len.max(end);
        Ok(())
    }

    /// Build the plaintext of the pages a write touches (read–modify–write
    /// at the edges, in `plain`; `None` when `data` is whole pages other than
    /// page 0), seal them and any gap below the new extent, write, then
    /// update the cache and `live`.
    fn fill_and_write(
        &self,
        live: &mut Live,
        first: u64,
        offset: u64,
        data: &[u8],
        plain: Option<&mut [u8]>,
    ) -> io::Result<()> {
        let Some(plain) = plain else {
            let count = data.len() / SECTOR_SIZE;
            return self.seal_pages(live, first, count, data);
        };
        let count = (plain.len() / SECTOR_SIZE) as u64;
        let last = first + count - 1;
        let end = offset + data.len() as u64;
        if !offset.is_multiple_of(S) || (count == 1 && !end.is_multiple_of(S)) {
            self.load_pages(live, first, &mut plain[..SECTOR_SIZE])?;
        }
        if count > 1 && !end.is_multiple_of(S) {
            let at = (count as usize - 1) * SECTOR_SIZE;
            self.load_pages(live, last, &mut plain[at..])?;
        }
        let at = (offset - first * S) as usize;
        plain[at..at + data.len()].copy_from_slice(data);

        // Page 0 goes to the older copy of its shadow pair, one generation up.
        let page0 = (first == 0).then(|| {
            let target = match live.page0_newest {
                Some(newest) => 1 - newest,
                None => 0,
            };
            (target, live.page0_generation + 1)
        });
        if let Some((_, generation)) = page0 {
            plain[PAGE0_GENERATION_OFFSET..SECTOR_SIZE].copy_from_slice(&generation.to_le_bytes());
        }
        self.seal_pages(live, first, count as usize, plain)?;
        if let Some((target, generation)) = page0 {
            live.page0_newest = Some(target);
            live.page0_generation = generation;
        }
        Ok(())
    }

    /// Seal and write `pages` (the plaintext of `count` whole pages from
    /// store page `first` on, page 0's generation already in place), then
    /// update the cache and, through [`Self::seal_sectors`], the extent.
    fn seal_pages(
        &self,
        live: &mut Live,
        first: u64,
        count: usize,
        pages: &[u8],
    ) -> io::Result<()> {
        // Page 0 goes to the older copy of its shadow pair.
        let page0 = (first == 0).then(|| match live.page0_newest {
            Some(newest) => 1 - newest,
            None => 0,
        });
        let mut sectors = Vec::with_capacity(count);
        for i in 0..count {
            let page = first + i as u64;
            let sector = match (page, page0) {
                (0, Some(target)) => target,
                _ => live.phys(page + 1).ok_or_else(unmapped)?,
            };
            sectors.push((sector, Source::Page(i)));
        }
        self.seal_sectors(live, sectors, pages, false)?;

        let mut cache = self.cache()?;
        for (i, page) in pages.chunks(SECTOR_SIZE).enumerate() {
            let n = first + i as u64;
            if count > CACHE_RUN_PAGES {
                cache.remove(n);
            } else if n == 0 {
                // The cache holds page 0 as redb wrote it: generation bytes zero.
                let mut copy = [0u8; SECTOR_SIZE];
                copy[..PAGE0_GENERATION_OFFSET].copy_from_slice(&page[..PAGE0_GENERATION_OFFSET]);
                cache.insert(0, &copy);
                copy.zeroize();
            } else {
                cache.insert(n, page);
            }
        }
        Ok(())
    }

    /// Seal and write `sectors` (physical sectors and what they hold), then
    /// account for them: every never-written sector between the old extent
    /// and the new one becomes a gap (`Live::gaps`), or — next to page 0's
    /// shadow pair, in a store of under two sectors, which is never part of
    /// a gap — is sealed as zeros with the write; written sectors leave the
    /// gaps and are recent. `data`: file data, written past the page cache
    /// where it can be.
    fn seal_sectors(
        &self,
        live: &mut Live,
        mut sectors: Vec<(u64, Source)>,
        plain: &[u8],
        data: bool,
    ) -> io::Result<()> {
        sectors.sort_unstable_by_key(|&(s, _)| s);
        let (Some(&(low, _)), Some(&(top, _))) = (sectors.first(), sectors.last()) else {
            return Ok(());
        };
        // A write of page 0 needs both sectors of its shadow pair.
        let top = if low < 2 { top.max(1) } else { top };
        let new_extent = live.extent.max(top + 1);
        // Sectors in `old extent..new extent` that this write leaves out.
        let mut unwritten = Vec::new();
        let mut cursor = live.extent;
        for &(s, _) in &sectors {
            if s >= cursor {
                if s > cursor {
                    unwritten.push((cursor, s));
                }
                cursor = s + 1;
            }
        }
        if cursor < new_extent {
            unwritten.push((cursor, new_extent));
        }
        let deferred = if live.extent >= 2 {
            unwritten
        } else {
            for &(lo, hi) in &unwritten {
                sectors.extend((lo..hi).map(|s| (s, Source::Zero)));
            }
            sectors.sort_unstable_by_key(|&(s, _)| s);
            Vec::new()
        };

        self.reserve_seals(live, sectors.len() as u64)?;
        self.seal_and_write(live, &sectors, plain, data)?;

        // The written sectors, as runs (page 0's shadow pair is no gap and
        // never recent: §4.1 has its own rules).
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for &(s, source) in &sectors {
            if s < 2 || matches!(source, Source::Zero) {
                continue;
            }
            match runs.last_mut() {
                Some((_, end)) if *end == s => *end += 1,
                _ => runs.push((s, s + 1)),
            }
        }
        {
            let mut recent = self.recent.lock().map_err(|_| poisoned())?;
            for &(lo, hi) in &runs {
                live.gaps.remove(lo, hi);
                recent.insert(lo, hi);
            }
        }
        for (lo, hi) in deferred {
            live.gaps.insert(lo, hi);
        }
        live.extent = new_extent;
        Ok(())
    }

    /// Seal zeros into up to `max` gap sectors, lowest first.
    fn fill_gaps(&self, live: &mut Live, mut max: u64) -> io::Result<()> {
        while let Some((start, end)) = live.gaps.first()
            && max > 0
        {
            let stop = end.min(start.saturating_add(max));
            self.fill_range(live, start, stop)?;
            max -= stop - start;
        }
        Ok(())
    }

    /// Seal zeros into the shortest gaps until the rest fit the header's
    /// list of unsealed ranges.
    fn fill_excess_gaps(&self, live: &mut Live) -> io::Result<()> {
        while live.gaps.range_count() > MAX_UNSEALED_RANGES {
            let (start, end) = live.gaps.shortest().expect("more than none");
            self.fill_range(live, start, end)?;
        }
        Ok(())
    }

    /// Seal zeros into sectors `start..stop` (a gap, or beyond the extent),
    /// `GAP_FILL_BATCH` at a time.
    fn fill_range(&self, live: &mut Live, start: u64, stop: u64) -> io::Result<()> {
        for at in (start..stop).step_by(GAP_FILL_BATCH as usize) {
            let end = stop.min(at + GAP_FILL_BATCH);
            let sectors: Vec<(u64, Source)> = (at..end).map(|s| (s, Source::Zero)).collect();
            self.reserve_seals(live, sectors.len() as u64)?;
            self.seal_and_write(live, &sectors, &[], false)?;
            live.gaps.remove(at, end);
        }
        Ok(())
    }

    /// Seal zeros into up to `max` sectors the header lists as unsealed, and
    /// once none is left, sync so that the header's list is empty too.
    /// Returns whether any remain. For a mount's idle time: a clean close
    /// seals what is left all at once. A fixed-size container skips it (its
    /// unsealed sectors hold the random fill, which already looks like the
    /// rest), and so does a store held still by a backup.
    pub fn seal_unsealed(&self, max: u64) -> io::Result<bool> {
        if self.read_only || self.capacity.is_some() || self.gate.is_frozen() {
            return Ok(false);
        }
        let _change = self.gate.change();
        let mut live = self.live_write()?;
        if live.gaps.is_empty() {
            return Ok(false);
        }
        self.fill_gaps(&mut live, max)?;
        if !live.gaps.is_empty() {
            return Ok(true);
        }
        self.sync_sectors()?;
        self.record_data_area(&live)?;
        Ok(false)
    }

    /// Seal `sectors` (sorted) and write each run of consecutive ones with
    /// one `pwrite`, in the buffer kept in `live`; long runs of file data
    /// (`data`) mostly past the page cache ([`Self::write_direct`]).
    fn seal_and_write(
        &self,
        live: &mut Live,
        sectors: &[(u64, Source)],
        plain: &[u8],
        data: bool,
    ) -> io::Result<()> {
        let mut buf = std::mem::take(&mut live.sealed);
        let result = self.seal_and_write_in(live, sectors, plain, &mut buf, data);
        live.sealed = buf;
        result
    }

    fn seal_and_write_in(
        &self,
        live: &mut Live,
        sectors: &[(u64, Source)],
        plain: &[u8],
        buf: &mut Vec<u8>,
        data: bool,
    ) -> io::Result<()> {
        let max_run = if data {
            DATA_IO_CHUNK_SECTORS
        } else {
            IO_CHUNK_SECTORS
        } as usize;
        let mut at = 0;
        while at < sectors.len() {
            let mut end = at + 1;
            while end < sectors.len()
                && sectors[end].0 == sectors[end - 1].0 + 1
                && end - at < max_run
            {
                end += 1;
            }
            let run = &sectors[at..end];
            let len = run.len() * SEALED_SECTOR_SIZE;
            let offset = sector_offset(run[0].0);
            // The sealed run lies in `buf` as it will in the file relative to
            // the 4 KiB pages around it: `buf[base]` is aligned in memory and
            // stands for the file offset `offset - pad`, so the aligned middle
            // can be written with O_DIRECT straight from here. (The buffer
            // never moves unless it grows, so `base` is found again each time.)
            let pad = (offset % ALIGN) as usize;
            if buf.len() < len + 2 * ALIGN as usize {
                buf.resize(len + 2 * ALIGN as usize, 0);
            }
            let base = buf.as_ptr().align_offset(ALIGN as usize);
            let slots = &mut buf[base + pad..base + pad + len];
            let mut nonces = vec![0u8; run.len() * NONCE_LEN];
            live.take_nonces(&mut nonces)?;
            let sealed = run
                .iter()
                .zip(slots.chunks_mut(SEALED_SECTOR_SIZE))
                .zip(nonces.chunks(NONCE_LEN))
                .try_for_each(|((&(sector, source), slot), nonce)| {
                    let body = &mut slot[NONCE_LEN..NONCE_LEN + SECTOR_SIZE];
                    match source {
                        Source::Page(i) => {
                            body.copy_from_slice(&plain[i * SECTOR_SIZE..(i + 1) * SECTOR_SIZE])
                        }
                        Source::Zero => body.fill(0),
                    }
                    self.seal(sector, nonce, slot)
                });
            if let Err(e) = sealed {
                // Some slots may still hold plaintext.
                buf.zeroize();
                return Err(e);
            }
            self.unsynced.store(true, Ordering::Release);
            if let Some(direct) = &self.direct {
                direct.forget(offset, len as u64);
            }
            if data && run.len() >= DIRECT_WRITE_MIN_SECTORS {
                self.write_direct(&buf[base..base + pad + len], pad, offset)?;
            } else {
                if data {
                    self.read_ahead_for_write(offset);
                }
                self.file
                    .write_all_at(&buf[base + pad..base + pad + len], offset)?;
                self.start_writeback(len as u64);
            }
            at = end;
        }
        Ok(())
    }

    /// Before a short buffered write of data sectors at file offset `offset`: ask the kernel
    /// to read the next [`WRITE_AHEAD_BYTES`] of the container, once half of the last window is
    /// used. A sealed sector (4,124 bytes) never fills whole pages, so a buffered write must
    /// read the pages at its ends first; sectors reused after a file was deleted were mostly
    /// written past the page cache, so those reads went to the disk, one at a time. Small
    /// files are allocated one after another, so reading ahead serves the next ones: untar of
    /// `drivers/net` right after a 1 GiB file was deleted, 5.0–5.5 s without, 2.3–2.5 s with.
    fn read_ahead_for_write(&self, offset: u64) {
        use std::os::fd::AsRawFd;
        let ahead = self.write_ahead_to.load(Ordering::Acquire);
        let window = WRITE_AHEAD_BYTES;
        if offset + window / 2 < ahead && offset + window >= ahead {
            return;
        }
        let start = offset / 4096 * 4096;
        self.write_ahead_to.store(start + window, Ordering::Release);
        let (Ok(at), Ok(len)) = (libc::off_t::try_from(start), libc::off_t::try_from(window))
        else {
            return;
        };
        // SAFETY: a valid fd owned by `self.file`; no memory is passed. Advice only.
        unsafe { libc::posix_fadvise(self.file.as_raw_fd(), at, len, libc::POSIX_FADV_WILLNEED) };
    }

    /// Write `aligned[pad..]` at file offset `offset`, where `aligned` starts
    /// on a 4 KiB boundary in memory and stands for the file from `offset -
    /// pad` (a 4 KiB boundary too): the whole 4 KiB pages in the middle with
    /// one `O_DIRECT` `pwrite`, the partial pages at either end through the
    /// page cache. A buffered write makes the kernel allocate and fill a
    /// page-cache page for every 4 KiB, and write it back later; file data is
    /// cached above us (in the mount's page cache), so that is all cost. Where
    /// a direct write fails (a file system without `O_DIRECT`, or anything
    /// else), it and every later one go through the page cache instead.
    /// Nothing here is durable before `sync_data`'s `fdatasync`.
    fn write_direct(&self, aligned: &[u8], pad: usize, offset: u64) -> io::Result<()> {
        let len = (aligned.len() - pad) as u64;
        let end = offset + len;
        let (a0, a1) = (offset.next_multiple_of(ALIGN), end - end % ALIGN);
        let direct = self
            .direct_write
            .as_ref()
            .filter(|_| self.direct_write_ok.load(Ordering::Acquire));
        let Some(direct) = direct.filter(|_| a0 < a1) else {
            self.file.write_all_at(&aligned[pad..], offset)?;
            self.start_writeback(len);
            return Ok(());
        };
        let base = offset - pad as u64;
        let part = |from: u64, to: u64| &aligned[(from - base) as usize..(to - base) as usize];
        self.file.write_all_at(part(offset, a0), offset)?;
        let middle = part(a0, a1);
        match direct.write_all_at(middle, a0) {
            Ok(()) => {
                #[cfg(test)]
                self.direct_writes.fetch_add(1, Ordering::AcqRel);
            }
            Err(e) => {
                tracing::debug!("direct writes to the container stop: {e}");
                self.direct_write_ok.store(false, Ordering::Release);
                self.file.write_all_at(middle, a0)?;
            }
        }
        self.file.write_all_at(part(a1, end), a1)?;
        self.start_writeback((a0 - offset) + (end - a1));
        Ok(())
    }

    /// Note `bytes` written; every [`WRITEBACK_BYTES`], start the kernel's
    /// writeback of the file without waiting for it.
    fn start_writeback(&self, bytes: u64) {
        use std::os::fd::AsRawFd;
        let total = self.unstarted.fetch_add(bytes, Ordering::AcqRel) + bytes;
        if total >= WRITEBACK_BYTES {
            self.unstarted.store(0, Ordering::Release);
            // SAFETY: a valid fd owned by `self.file`; no memory is passed.
            unsafe {
                libc::sync_file_range(self.file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE)
            };
        }
    }

    /// Count `n` seals against the budget, raising the reserve in the header
    /// (durably) before they are spent. Past the limit, refuse.
    fn reserve_seals(&self, live: &mut Live, n: u64) -> io::Result<()> {
        let needed = live.seals + n;
        if needed > SEAL_LIMIT {
            return Err(io::Error::other(ContainerError::SealBudget {
                path: self.path.clone(),
                seals: live.seals,
            }));
        }
        if needed > live.reserve {
            let reserve = needed.div_ceil(SEAL_RESERVE_STEP) * SEAL_RESERVE_STEP;
            let mut meta = self.meta()?;
            let old = meta.header.seal_reserve;
            meta.header.seal_reserve = reserve.min(SEAL_LIMIT);
            if let Err(e) = meta.write(&self.file) {
                meta.header.seal_reserve = old;
                return Err(e);
            }
            live.reserve = meta.header.seal_reserve;
        }
        live.seals = needed;
        Ok(())
    }

    // ------------------------------------------ length and durability ----

    fn set_len_impl(&self, len: u64) -> io::Result<()> {
        if self.read_only {
            return Err(errno(libc::EROFS));
        }
        if len > MAX_STORE_LEN {
            return Err(errno(libc::EFBIG));
        }
        let mut live = self.live_write()?;
        if len >= live.store_len {
            // Growth: the new bytes are beyond the extent (or in segments
            // not mapped yet, or gaps), so they read as zeros. Nothing
            // physical happens until they are written; with a segment map
            // their segments are taken now, at the physical end, so one
            // growth stays one run of segments.
            self.map_through(&mut live, sectors_for_len(len))?;
            let from = sectors_for_len(live.store_len);
            Self::expose(&mut live, from, sectors_for_len(len));
            live.store_len = len;
            return Ok(());
        }
        // A shrink to mid-page: zero the rest of that page, so that growing
        // again reads zeros there (redb only uses whole pages; be exact anyway).
        let page_end = len.div_ceil(S) * S;
        if !len.is_multiple_of(S) && Self::present(&live, len / S) {
            let zeros = vec![0u8; (page_end.min(live.store_len) - len) as usize];
            let end = len + zeros.len() as u64;
            self.write_locked(&mut live, len, &zeros, end)?;
        }
        live.store_len = len;
        if live.map.is_some() {
            self.shrink_mapped(&mut live, len)?;
        } else {
            live.extent = live.extent.min(sectors_for_len(len));
        }
        let extent = live.extent;
        live.gaps.remove(extent, u64::MAX);
        if live.extent == 0 {
            live.page0_newest = None;
        }
        self.cache()?.remove_from(len.div_ceil(S));
        if self.capacity.is_none() {
            self.truncate_file(&mut live)?;
        }
        Ok(())
    }

    /// A shrink with a segment map. The extent comes down to the end of what
    /// is still in use — the store's sectors the new length needs, and every
    /// data segment. The store's segments above that point, past the new
    /// length with no data segment after them, leave the map (as the file is
    /// cut there, that is what a vault without data segments has always done
    /// when redb trims its tail at close); the store's other segments stay
    /// mapped (one in the middle could not be told from a data segment
    /// later). The store's sectors past the new length below the extent keep
    /// what they hold (nothing reads them: they are past the length) until a
    /// growth brings them back, as gaps ([`Self::expose`]); making them gaps
    /// now would have a clean close seal zeros into all of them at every
    /// unmount after redb trims its tail.
    fn shrink_mapped(&self, live: &mut Live, len: u64) -> io::Result<()> {
        let Some(map) = live.map.clone() else {
            return Ok(());
        };
        let needed = sectors_for_len(len);
        if needed < 2 && live.extent > 0 {
            // Page 0's shadow pair cannot be a gap: zeros in both copies.
            let stop = live.extent.min(2);
            self.fill_range(live, 0, stop)?;
            live.page0_newest = None;
            live.page0_generation = 0;
        }
        let store_end = Self::store_end(live, len)?;
        let mut keep = store_end;
        // The highest data segment below the extent.
        let mut q = live.extent.div_ceil(SEG);
        while q * SEG > keep {
            q -= 1;
            if !map.holds(q) {
                keep = (q + 1) * SEG;
                break;
            }
        }
        live.extent = keep.min(live.extent).max(live.extent.min(2));
        let cut = live.extent.max(store_end).div_ceil(SEG);
        if let Some(map) = &mut live.map {
            map.cut_at(cut);
        }
        Ok(())
    }

    /// One past the physical sector of the last store position a store of
    /// `len` bytes uses (0 for an empty store). With a segment map the store's
    /// positions rise with their sectors, so nothing of the store's below the
    /// length lies higher.
    fn store_end(live: &Live, len: u64) -> io::Result<u64> {
        let needed = sectors_for_len(len);
        let mapped = live.map.as_ref().map_or(needed, |map| map.len * SEG);
        Ok(match needed.min(mapped) {
            0 => 0,
            n => live.phys(n - 1).ok_or_else(unmapped)? + 1,
        })
    }

    /// Gives the host back the segments at the end of a growing container
    /// that hold nothing (see `crate::fs::Storage::release_unused_segments`):
    /// `data_in_use` lists the first sectors of the data segments the
    /// filesystem still uses, every other data segment is free. The end kept
    /// is the highest of: segment 0, the store's sectors below its length,
    /// the listed data segments. Everything physically above it leaves the
    /// data area: store segments there leave the map, the extent and the
    /// unsealed ranges are cut to it (never raised). Segments in between stay
    /// as they are (nothing is moved). In this order: the sectors written so
    /// far are synced, the header records the smaller data area (durably),
    /// the file is truncated to it, and `fdatasync`. A crash after the header
    /// write leaves a file longer than its extent, which opens as any such
    /// file does (the bytes past the extent are ignored) and which the next
    /// release truncates. Returns the bytes the file shrank by. A fixed-size
    /// container changes nothing (`Ok(0)`); read-only access is `EROFS`; an
    /// entry of `data_in_use` that is not the first sector of a data segment
    /// is `EINVAL`, and then nothing changes.
    pub fn release_unused_segments(&self, data_in_use: &[u64]) -> io::Result<u64> {
        if self.read_only {
            return Err(errno(libc::EROFS));
        }
        if self.capacity.is_some() {
            return Ok(0);
        }
        let _change = self.gate.change();
        let mut live = self.live_write()?;
        let want = self.record_release(&mut live, data_in_use)?;
        let len = self.file.metadata()?.len();
        if len <= want {
            return Ok(0);
        }
        if let Some(direct) = &self.direct {
            direct.forget(want, len - want);
        }
        self.file.set_len(want)?;
        self.file.sync_data()?;
        Ok(len - want)
    }

    /// The first part of [`Self::release_unused_segments`]: cut the data area
    /// in `live` and record it in the header (durably), or change nothing.
    /// Returns the file length the smaller data area needs.
    fn record_release(&self, live: &mut Live, data_in_use: &[u64]) -> io::Result<u64> {
        let mut keep = Self::store_end(live, live.store_len)?;
        for &first in data_in_use {
            if !first.is_multiple_of(SEG) || !live.is_data_sector(first) {
                return Err(errno(libc::EINVAL));
            }
            keep = keep.max(first + SEG);
        }
        let old = (live.extent, live.gaps.clone(), live.map.clone());
        let extent = keep.min(live.extent).max(live.extent.min(2));
        live.extent = extent;
        live.gaps.remove(extent, u64::MAX);
        if let Some(map) = &mut live.map {
            map.cut_at(keep.div_ceil(SEG));
        }
        let recorded = self
            .fill_excess_gaps(live)
            .and_then(|()| self.sync_sectors())
            .and_then(|()| self.record_data_area(live));
        if let Err(e) = recorded {
            // Nothing durable describes the smaller area: it is all still there.
            (live.extent, live.gaps, live.map) = old;
            return Err(e);
        }
        Ok(file_len_for_sectors(extent))
    }

    /// A release interrupted by a crash after its header write: the header
    /// describes the smaller data area, the file keeps its length.
    #[cfg(test)]
    pub(crate) fn release_without_truncate(&self, data_in_use: &[u64]) -> io::Result<u64> {
        let mut live = self.live_write()?;
        self.record_release(&mut live, data_in_use)
    }

    /// Store positions `from..to` come back into the store's length (a
    /// growth, with a segment map): those of their sectors still sealed from
    /// before a shrink (below the extent, which data segments keep up)
    /// become gaps, so that they read as zeros, as new bytes must.
    fn expose(live: &mut Live, from: u64, to: u64) {
        let Some(map) = &live.map else {
            return;
        };
        let to = to.min(map.len * SEG);
        let mut at = from.max(2);
        while at < to {
            let seg_end = ((at / SEG + 1) * SEG).min(to);
            if let Some(first) = live.phys(at) {
                let end = (first + (seg_end - at)).min(live.extent);
                if first < end {
                    live.gaps.insert(first, end);
                }
            }
            at = seg_end;
        }
    }

    /// Give back the file space beyond the extent of a growing container:
    /// first make the smaller length and extent durable in the header, then
    /// truncate, so a crash in between never leaves a header that promises
    /// more file than there is.
    fn truncate_file(&self, live: &mut Live) -> io::Result<()> {
        let needed = file_len_for_sectors(live.extent);
        if self.file.metadata()?.len() <= needed {
            return Ok(());
        }
        self.fill_excess_gaps(live)?;
        self.sync_sectors()?;
        self.record_data_area(live)?;
        self.file.set_len(needed)
    }

    /// Write the live length, extent and unsealed ranges into the header if
    /// they changed. The caller has made the sectors below the extent that
    /// are not in a gap durable, and left at most `MAX_UNSEALED_RANGES` gaps.
    fn record_data_area(&self, live: &Live) -> io::Result<()> {
        let mut meta = self.meta()?;
        let unsealed = live.gaps.to_vec();
        let segments = live.map.as_ref().map(SegmentMap::to_runs);
        let h = &meta.header;
        if (h.store_len, h.extent, &h.unsealed, &h.segments)
            == (live.store_len, live.extent, &unsealed, &segments)
        {
            return Ok(());
        }
        let old = (
            h.store_len,
            h.extent,
            h.unsealed.clone(),
            h.segments.clone(),
        );
        meta.header.store_len = live.store_len;
        meta.header.extent = live.extent;
        meta.header.unsealed = unsealed;
        meta.header.segments = segments;
        meta.write(&self.file).inspect_err(|_| {
            (
                meta.header.store_len,
                meta.header.extent,
                meta.header.unsealed,
                meta.header.segments,
            ) = old;
        })
    }

    /// Fdatasync the sectors, then record the length, extent and gaps that
    /// describe them. redb calls this before it writes a commit's header, so
    /// a durable commit never references a page beyond the durable extent or
    /// in a gap the header still lists. Unless there are more gaps than the
    /// header can list, reads go on meanwhile.
    fn sync_impl(&self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        {
            let live = self.live_read()?;
            if live.gaps.range_count() <= MAX_UNSEALED_RANGES
                && self.partly_sealed_blocks(&live)?.is_empty()
            {
                self.sync_sectors()?;
                return self.record_data_area(&live);
            }
        }
        let mut live = self.live_write()?;
        self.seal_partly_sealed_blocks(&mut live)?;
        self.fill_excess_gaps(&mut live)?;
        self.sync_sectors()?;
        self.record_data_area(&live)
    }

    /// The blocks (`start..end`, cut at what the store may use) that writes
    /// since the last sync reached and that still have unsealed sectors: in
    /// a gap, or beyond the extent.
    fn partly_sealed_blocks(&self, live: &Live) -> io::Result<Vec<(u64, u64)>> {
        let recent = self.recent.lock().map_err(|_| poisoned())?;
        let mut blocks: Vec<(u64, u64)> = Vec::new();
        for (lo, hi) in recent.to_vec() {
            for block in lo / BLOCK_SECTORS..hi.div_ceil(BLOCK_SECTORS) {
                let start = block * BLOCK_SECTORS;
                let end = (start + BLOCK_SECTORS).min(self.sector_limit(live, start));
                let unsealed = live.extent < end || !live.gaps.pieces(start, end).is_empty();
                if start < end && unsealed && blocks.last() != Some(&(start, end)) {
                    blocks.push((start, end));
                }
            }
        }
        Ok(blocks)
    }

    /// Seal zeros into what is unsealed of each block writes reached since
    /// the last sync, so that the header's list only changes when writes
    /// reach a block it lists (BLOCK_SECTORS).
    fn seal_partly_sealed_blocks(&self, live: &mut Live) -> io::Result<()> {
        for (start, end) in self.partly_sealed_blocks(live)? {
            for (lo, hi) in live.gaps.pieces(start, end) {
                self.fill_range(live, lo, hi)?;
            }
            // Page 0's shadow pair is written by its own rules (§4.1).
            let from = live.extent.max(2);
            if from < end {
                self.fill_range(live, from, end)?;
                live.extent = end;
            }
        }
        Ok(())
    }

    /// Where sealing the block at physical sector `start` must stop: at the
    /// sectors the store's length needs, within the capacity of a fixed-size
    /// container. With a segment map that end lies in one segment; a block in
    /// another (a data segment, or a store segment the length covers whole)
    /// may be sealed to the end of its segment.
    fn sector_limit(&self, live: &Live, start: u64) -> u64 {
        let needed = sectors_for_len(live.store_len);
        let limit = match live.map {
            None => needed,
            Some(_) => match needed.checked_sub(1).and_then(|p| live.phys(p)) {
                Some(last) if last / SEG == start / SEG => last + 1,
                _ => (start / SEG + 1) * SEG,
            },
        };
        self.capacity.map_or(limit, |capacity| limit.min(capacity))
    }

    /// `fdatasync`, unless no sector was written since the last one; then
    /// nothing written is recent any more. The caller holds `live`, so no
    /// write comes in between.
    fn sync_sectors(&self) -> io::Result<()> {
        if self.unsynced.swap(false, Ordering::AcqRel) {
            self.file
                .sync_data()
                .inspect_err(|_| self.unsynced.store(true, Ordering::Release))?;
        }
        self.recent.lock().map_err(|_| poisoned())?.clear();
        Ok(())
    }

    /// Sync, then lower the header's seal reserve to the seals actually
    /// counted, so a clean close wastes none of the budget. The store stays
    /// usable (a later write reserves again).
    fn close_impl(&self) -> io::Result<()> {
        if self.read_only || self.abandoned.load(Ordering::Acquire) {
            return Ok(());
        }
        // At rest a growing container has no unsealed sectors: they would be
        // holes of zeros among random-looking bytes.
        if self.capacity.is_none() {
            let mut live = self.live_write()?;
            self.fill_gaps(&mut live, u64::MAX)?;
        }
        self.sync_impl()?;
        let mut live = self.live_write()?;
        if live.reserve > live.seals {
            let mut meta = self.meta()?;
            let old = meta.header.seal_reserve;
            meta.header.seal_reserve = live.seals;
            if let Err(e) = meta.write(&self.file) {
                meta.header.seal_reserve = old;
                return Err(e);
            }
            live.reserve = live.seals;
        }
        Ok(())
    }

    /// Rewrite the header now (at unlock, when one copy is damaged or failed
    /// its MAC), so both copies are intact again.
    pub(crate) fn repair_header(&self) -> Result<(), ContainerError> {
        let mut meta = self
            .meta()
            .map_err(|e| ContainerError::io(&self.path, "repair the header of", e))?;
        meta.write(&self.file)
            .map_err(|e| ContainerError::io(&self.path, "repair the header of", e))
    }

    /// Simulate a crash: from now on nothing more is written on close/drop.
    #[cfg(test)]
    pub(crate) fn abandon(&self) {
        self.abandoned.store(true, Ordering::Release);
    }

    #[cfg(test)]
    pub(crate) fn page0_tail_writes(&self) -> u64 {
        self.page0_tail_writes.load(Ordering::Acquire)
    }

    #[cfg(test)]
    pub(crate) fn direct_runs(&self) -> u64 {
        self.direct_runs.load(Ordering::Acquire)
    }

    #[cfg(test)]
    pub(crate) fn direct_writes(&self) -> u64 {
        self.direct_writes.load(Ordering::Acquire)
    }

    /// Whether direct writes are (still) used.
    #[cfg(test)]
    pub(crate) fn direct_write_available(&self) -> bool {
        self.direct_write_ok.load(Ordering::Acquire)
    }

    /// Stop using direct writes (to compare against buffered ones).
    #[cfg(test)]
    pub(crate) fn disable_direct_writes(&self) {
        self.direct_write_ok.store(false, Ordering::Release);
    }

    #[cfg(test)]
    pub(crate) fn page0_newest(&self) -> Option<u64> {
        self.live.read().unwrap().page0_newest
    }

    #[cfg(test)]
    pub(crate) fn set_seals(&self, seals: u64) {
        self.live.write().unwrap().seals = seals;
    }
}

/// The cache size actually used: what was asked for, but never more than
/// half the locked-memory limit of an unprivileged process, so that keys
/// and other secrets can still be locked after the cache has filled.
fn cache_limit(requested: usize) -> usize {
    // SAFETY: getrlimit/geteuid only write the struct we pass / read ids.
    let (limit, root) = unsafe {
        let mut rl = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        let ok = libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut rl) == 0;
        (ok.then_some(rl.rlim_cur), libc::geteuid() == 0)
    };
    match limit {
        _ if root => requested,
        Some(libc::RLIM_INFINITY) => requested,
        Some(cur) => requested.min(usize::try_from(cur / 2).unwrap_or(usize::MAX)),
        None => requested,
    }
}

/// redb's view of the store: the store without the fsync log's pages, which
/// lie between redb's page 0 and its page 1 (FORMAT.md §4.9).
impl redb::StorageBackend for SectorStore {
    fn len(&self) -> Result<u64, io::Error> {
        Ok(self.redb_len(self.live_read()?.store_len))
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        self.in_store_pieces(offset, out.len(), |at, range| {
            self.read_impl(at, &mut out[range])
        })
    }

    // Each change to the file passes the freeze gate once, here at the entry
    // points (never nested: a change waiting inside another would deadlock a
    // freeze that waits for the first to finish).
    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        let _change = self.gate.change();
        self.set_len_impl(self.store_len_for(len))
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        let _change = self.gate.change();
        self.sync_impl()
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        let _change = self.gate.change();
        self.in_store_pieces(offset, data.len(), |at, range| {
            self.write_impl(at, &data[range])
        })
    }

    fn close(&self) -> Result<(), io::Error> {
        let _change = self.gate.change();
        self.close_impl()
    }
}

impl Drop for SectorStore {
    fn drop(&mut self) {
        let gate = self.gate.clone();
        let _change = gate.change();
        if let Err(e) = self.close_impl() {
            tracing::error!(
                container = %self.path.display(),
                "closing the sector store failed: {e}"
            );
        }
    }
}

impl std::fmt::Debug for SectorStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SectorStore")
            .field("path", &self.path)
            .field("id", &hex::encode(self.id))
            .field("read_only", &self.read_only)
            .field("capacity", &self.capacity())
            .finish_non_exhaustive()
    }
}

/// What [`SectorStore::scan_sectors`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SectorScan {
    /// Sealed sectors checked: `0..extent`.
    pub checked: u64,
    /// Sectors that fail authentication, in order. A lone copy of redb's
    /// page-0 shadow pair is not among them (see `page0_stale_copy`).
    pub damaged: Vec<u64>,
    /// Sector 0 or 1: one copy of the page-0 shadow pair that does not
    /// authenticate while the other does. That is what a torn write of
    /// page 0 leaves (FORMAT.md §4.1); the intact copy is used, nothing is
    /// lost.
    pub page0_stale_copy: Option<u64>,
}

// `keybound verify --deep` (`crate::session::verify`).
impl SectorStore {
    /// The physical sectors redb's pages `pages` live in (FORMAT.md §4.1,
    /// §4.9, §4.10): page 0 in sectors 0 and 1, the others through the fsync
    /// log's offset and the segment map. Pages the map has no segment for
    /// have no sector.
    pub fn sectors_of_redb_pages(&self, pages: std::ops::Range<u64>) -> Vec<u64> {
        let Ok(live) = self.live_read() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for page in pages {
            match page {
                0 => out.extend([0, 1]),
                k => out.extend(live.phys(k + self.fsync_log_pages + 1)),
            }
        }
        out
    }

    /// Read and authenticate every sealed sector below the extent, straight
    /// from the file: no cache, no damage counters, nothing written.
    /// `progress(done, total)` sees the sectors checked so far.
    pub fn scan_sectors(
        &self,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<SectorScan, ContainerError> {
        let live = self
            .live_read()
            .map_err(|e| ContainerError::io(&self.path, "read", e))?;
        let extent = live.extent;
        let mut damaged = Vec::new();
        let mut first = 0;
        progress(0, extent);
        while first < extent {
            let count = IO_CHUNK_SECTORS.min(extent - first);
            let mut buf = self
                .read_sealed(first, count)
                .map_err(|e| ContainerError::io(&self.path, "read", e))?;
            for (i, slot) in buf.chunks_mut(SEALED_SECTOR_SIZE).enumerate() {
                let sector = first + i as u64;
                // A gap is not written yet (it reads as zeros): not damage.
                if !self.open(sector, slot) && !live.gaps.contains(sector) {
                    damaged.push(sector);
                }
            }
            buf.zeroize();
            first += count;
            progress(first, extent);
        }
        // The page-0 pair: one copy failing beside an intact one is a torn
        // write of the older copy, which reads never use.
        let pair_bad: Vec<u64> = damaged.iter().copied().filter(|&s| s < 2).collect();
        let page0_stale_copy = match pair_bad.as_slice() {
            [lone] if extent >= 2 => Some(*lone),
            _ => None,
        };
        if let Some(lone) = page0_stale_copy {
            damaged.retain(|&s| s != lone);
        }
        Ok(SectorScan {
            checked: extent,
            damaged,
            page0_stale_copy,
        })
    }
}
