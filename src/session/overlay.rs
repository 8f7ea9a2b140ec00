//! A copy-on-write view of a read-only store, for `keybound verify --deep`.
//!
//! A copy of a mounted vault (a backup) is in the state of a crash: redb's
//! last commit is not marked clean, and redb refuses to open such a database
//! read-only (`RepairAborted`): its repair writes. `verify` must never write
//! to the file it checks, so the filesystem is opened read-write over this
//! overlay: reads come from the read-only base (the sector store) unless a
//! page was written, every `write` and `set_len` stays in memory in whole
//! 4096-byte pages, and `sync_data` does nothing. redb repairs in memory;
//! nothing reaches the file.
//!
//! File data outside redb (data segments, FORMAT.md §4.10) is read from the
//! base; data sectors written are kept in memory like pages, and no segment
//! can be claimed (the overlay does not know where the base's file ends).
//!
//! The overlay also records which pages a read that met damage covered, so
//! that the caller can tell which damaged sectors each step of the
//! filesystem check touched ([`CowStorage::take_damaged_pages`]).

use std::collections::BTreeMap;
use std::io;
use std::ops::Range;
use std::sync::{Mutex, MutexGuard};

use zeroize::Zeroize;

use crate::container::{SECTOR_SIZE, SectorStore};

const PAGE: u64 = SECTOR_SIZE as u64;

/// What the overlay needs from the store under it.
pub(crate) trait OverlayBase: redb::StorageBackend {
    /// Reads that met a sector failing authentication, so far.
    fn damaged_reads(&self) -> u64;
    /// The store's capacity in bytes, for a fixed-size vault.
    fn capacity(&self) -> Option<u64>;
    /// Pages of the fsync log beside redb's store.
    fn fsync_log_pages(&self) -> u64 {
        0
    }
    /// Reads a page of the fsync log (see [`crate::fs::Storage::read_fsync_log_page`]).
    fn read_fsync_log_page(&self, _index: u64, _out: &mut [u8]) -> io::Result<bool> {
        Err(io::ErrorKind::Unsupported.into())
    }
    /// Sectors per data segment (see [`crate::fs::Storage::data_segment_sectors`]); 0: none.
    fn data_segment_sectors(&self) -> u64 {
        0
    }
    /// Reads data sectors (see [`crate::fs::Storage::read_data_sectors`]).
    fn read_data_sectors(&self, _first: u64, _out: &mut [u8]) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }
}

impl OverlayBase for SectorStore {
    fn damaged_reads(&self) -> u64 {
        SectorStore::damaged_reads(self)
    }

    fn capacity(&self) -> Option<u64> {
        SectorStore::capacity(self)
    }

    fn fsync_log_pages(&self) -> u64 {
        SectorStore::fsync_log_pages(self)
    }

    fn read_fsync_log_page(&self, index: u64, out: &mut [u8]) -> io::Result<bool> {
        SectorStore::read_fsync_log_page(self, index, out)
    }

    fn data_segment_sectors(&self) -> u64 {
        SectorStore::data_segment_sectors(self)
    }

    fn read_data_sectors(&self, first: u64, out: &mut [u8]) -> io::Result<()> {
        SectorStore::read_data_sectors(self, first, out)
    }
}

/// One page written to the overlay; wiped when dropped (it is plaintext).
struct Page(Box<[u8]>);

impl Page {
    fn zeroed() -> Self {
        Page(vec![0u8; SECTOR_SIZE].into_boxed_slice())
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

struct State {
    /// The length redb sees.
    len: u64,
    /// Bytes of the base still visible: its length, lowered by every
    /// shrink (bytes past a shrink read as zeros when the length grows
    /// again, as on a file).
    base_limit: u64,
    /// Pages written, by page number.
    pages: BTreeMap<u64, Page>,
    /// Data sectors written, by sector number.
    data: BTreeMap<u64, Page>,
    /// Page ranges of base reads during which the damage counter moved.
    damaged: Vec<Range<u64>>,
    /// Data sector ranges of base reads during which the damage counter moved.
    damaged_data: Vec<Range<u64>>,
}

/// The copy-on-write storage: a read-only base, changes in memory.
pub(crate) struct CowStorage<B: OverlayBase> {
    base: B,
    state: Mutex<State>,
}

impl<B: OverlayBase> std::fmt::Debug for CowStorage<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CowStorage").finish_non_exhaustive()
    }
}

fn poisoned() -> io::Error {
    io::Error::other("the overlay is unusable after a panic in another thread")
}

impl<B: OverlayBase> CowStorage<B> {
    pub(crate) fn new(base: B) -> io::Result<Self> {
        let len = base.len()?;
        Ok(CowStorage {
            base,
            state: Mutex::new(State {
                len,
                base_limit: len,
                pages: BTreeMap::new(),
                data: BTreeMap::new(),
                damaged: Vec::new(),
                damaged_data: Vec::new(),
            }),
        })
    }

    pub(crate) fn base(&self) -> &B {
        &self.base
    }

    fn state(&self) -> io::Result<MutexGuard<'_, State>> {
        self.state.lock().map_err(|_| poisoned())
    }

    /// The page ranges (redb pages, 4096 bytes) that reads which met damage
    /// covered since the last call. Page `k > 0` is physical sector `k + 1`;
    /// page 0 is the shadow pair, sectors 0 and 1 (FORMAT.md §4.1).
    pub(crate) fn take_damaged_pages(&self) -> Vec<Range<u64>> {
        self.state
            .lock()
            .map(|mut s| std::mem::take(&mut s.damaged))
            .unwrap_or_default()
    }

    /// The data sector ranges that reads which met damage covered since the last call.
    pub(crate) fn take_damaged_data_sectors(&self) -> Vec<Range<u64>> {
        self.state
            .lock()
            .map(|mut s| std::mem::take(&mut s.damaged_data))
            .unwrap_or_default()
    }

    /// Bytes held in memory by written pages and data sectors.
    pub(crate) fn overlay_bytes(&self) -> u64 {
        self.state
            .lock()
            .map(|s| (s.pages.len() + s.data.len()) as u64 * PAGE)
            .unwrap_or(0)
    }

    /// Data sectors `first..`: those written to the overlay from memory, runs of the others
    /// from the base in one read each. Notes the sectors of a base read that met damage.
    fn read_data_impl(&self, first: u64, out: &mut [u8]) -> io::Result<()> {
        if !out.len().is_multiple_of(SECTOR_SIZE) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let mut state = self.state()?;
        let count = (out.len() / SECTOR_SIZE) as u64;
        let end = first
            .checked_add(count)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let mut at = first;
        while at < end {
            let dst = &mut out[(at - first) as usize * SECTOR_SIZE..];
            if let Some(p) = state.data.get(&at) {
                dst[..SECTOR_SIZE].copy_from_slice(&p.0);
                at += 1;
                continue;
            }
            let run_end = state.data.range(at..end).next().map_or(end, |(&k, _)| k);
            let n = (run_end - at) as usize * SECTOR_SIZE;
            let before = self.base.damaged_reads();
            self.base.read_data_sectors(at, &mut dst[..n])?;
            if self.base.damaged_reads() != before {
                state.damaged_data.push(at..run_end);
            }
            at = run_end;
        }
        Ok(())
    }

    /// Data sectors written stay in memory. (Whether they lie in data
    /// segments is the base's to say when they are read.)
    fn write_data_impl(&self, first: u64, plain: &[u8]) -> io::Result<()> {
        if !plain.len().is_multiple_of(SECTOR_SIZE) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let mut state = self.state()?;
        for (i, src) in plain.chunks(SECTOR_SIZE).enumerate() {
            let sector = first
                .checked_add(i as u64)
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
            let mut page = Page::zeroed();
            page.0.copy_from_slice(src);
            state.data.insert(sector, page);
        }
        Ok(())
    }

    /// Fill `out` with bytes `offset..` of the base as the overlay sees it:
    /// zeros past `base_limit`. Notes the pages if the read met damage.
    fn read_base(&self, state: &mut State, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let end = offset + out.len() as u64;
        let visible = end.min(state.base_limit).saturating_sub(offset) as usize;
        out[visible..].fill(0);
        if visible == 0 {
            return Ok(());
        }
        let before = self.base.damaged_reads();
        self.base.read(offset, &mut out[..visible])?;
        if self.base.damaged_reads() != before {
            let last = offset + visible as u64 - 1;
            state.damaged.push(offset / PAGE..last / PAGE + 1);
        }
        Ok(())
    }

    /// Page `page` as the overlay sees it, copied into `out` (4096 bytes).
    fn load_page(&self, state: &mut State, page: u64, out: &mut [u8]) -> io::Result<()> {
        match state.pages.get(&page) {
            Some(p) => {
                out.copy_from_slice(&p.0);
                Ok(())
            }
            None => self.read_base(state, page * PAGE, out),
        }
    }

    fn read_impl(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        let mut state = self.state()?;
        let end = offset
            .checked_add(out.len() as u64)
            .filter(|&end| end <= state.len)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "read beyond the end of the store",
                )
            })?;
        // Runs of pages not in the overlay go to the base in one read each.
        let mut at = offset;
        while at < end {
            let page = at / PAGE;
            let dst = &mut out[(at - offset) as usize..];
            if let Some(p) = state.pages.get(&page) {
                let from = (at - page * PAGE) as usize;
                let n = (PAGE as usize - from).min(dst.len());
                dst[..n].copy_from_slice(&p.0[from..from + n]);
                at += n as u64;
                continue;
            }
            let next_written = state
                .pages
                .range(page..)
                .next()
                .map_or(u64::MAX, |(&k, _)| k * PAGE);
            let run_end = end.min(next_written);
            let n = (run_end - at) as usize;
            self.read_base(&mut state, at, &mut dst[..n])?;
            at = run_end;
        }
        Ok(())
    }

    fn write_impl(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))?;
        let mut state = self.state()?;
        let mut at = offset;
        while at < end {
            let page = at / PAGE;
            let from = (at - page * PAGE) as usize;
            let n = (PAGE as usize - from).min((end - at) as usize);
            if !state.pages.contains_key(&page) {
                // Read–modify–write of a page only partly covered (redb's
                // 320-byte header); a whole page needs no old bytes.
                let mut fresh = Page::zeroed();
                if n < PAGE as usize && page * PAGE < state.len {
                    self.load_page(&mut state, page, &mut fresh.0)?;
                }
                state.pages.insert(page, fresh);
            }
            let src = &data[(at - offset) as usize..(at - offset) as usize + n];
            if let Some(p) = state.pages.get_mut(&page) {
                p.0[from..from + n].copy_from_slice(src);
            }
            at += n as u64;
        }
        state.len = state.len.max(end);
        Ok(())
    }

    fn set_len_impl(&self, len: u64) -> io::Result<()> {
        let mut state = self.state()?;
        if len < state.len {
            // Bytes past the new length read as zeros if it grows again.
            state.base_limit = state.base_limit.min(len);
            let first_gone = len.div_ceil(PAGE);
            let gone: Vec<u64> = state.pages.range(first_gone..).map(|(&k, _)| k).collect();
            for page in gone {
                state.pages.remove(&page);
            }
            let tail = (len % PAGE) as usize;
            if tail != 0 {
                let page = len / PAGE;
                if let Some(p) = state.pages.get_mut(&page) {
                    p.0[tail..].fill(0);
                }
            }
        }
        state.len = len;
        Ok(())
    }
}

impl<B: OverlayBase> redb::StorageBackend for CowStorage<B> {
    fn len(&self) -> Result<u64, io::Error> {
        Ok(self.state()?.len)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        self.read_impl(offset, out)
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        self.set_len_impl(len)
    }

    /// Nothing to make durable: nothing is ever written to the file.
    fn sync_data(&self) -> Result<(), io::Error> {
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        self.write_impl(offset, data)
    }

    /// The base is not closed through the overlay (it writes nothing anyway).
    fn close(&self) -> Result<(), io::Error> {
        Ok(())
    }
}

impl<B: OverlayBase> crate::fs::Storage for CowStorage<B> {
    fn damaged_reads(&self) -> u64 {
        self.base.damaged_reads()
    }

    fn capacity(&self) -> Option<u64> {
        self.base.capacity()
    }

    /// Nothing is written to the host, so its free space does not matter.
    fn host_free_bytes(&self) -> io::Result<u64> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }

    /// The log is read from the base, so the check sees what the next mount will replay.
    fn fsync_log_pages(&self) -> u64 {
        self.base.fsync_log_pages()
    }

    fn read_fsync_log_page(&self, index: u64, out: &mut [u8]) -> io::Result<bool> {
        self.base.read_fsync_log_page(index, out)
    }

    /// Nothing reaches the file: the replay's rewrite of torn pages is left to the next mount.
    fn write_fsync_log(&self, _index: u64, _pages: &[u8]) -> io::Result<()> {
        Ok(())
    }

    /// File data is read from the base.
    fn data_segment_sectors(&self) -> u64 {
        self.base.data_segment_sectors()
    }

    /// Refused: the overlay cannot know where the base's file ends, and nothing may reach it.
    fn claim_data_segment(&self) -> io::Result<u64> {
        Err(io::Error::from_raw_os_error(libc::EROFS))
    }

    /// Kept in memory, like pages.
    fn write_data_sectors(&self, first: u64, plain: &[u8]) -> io::Result<()> {
        self.write_data_impl(first, plain)
    }

    fn read_data_sectors(&self, first: u64, out: &mut [u8]) -> io::Result<()> {
        self.read_data_impl(first, out)
    }

    /// Nothing reaches the file: nothing is given back.
    fn release_unused_segments(&self, _data_in_use: &[u64]) -> io::Result<u64> {
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::fs::testing::PlainFileStorage;
    use crate::fs::{Caller, Fs, ROOT_INO};
    use redb::StorageBackend;

    impl OverlayBase for PlainFileStorage {
        fn damaged_reads(&self) -> u64 {
            crate::fs::Storage::damaged_reads(self)
        }
        fn capacity(&self) -> Option<u64> {
            crate::fs::Storage::capacity(self)
        }
    }

    /// A base file of `pages` pages, page k filled with byte k + 1.
    fn base(pages: u64) -> (tempfile::TempDir, std::path::PathBuf, PlainFileStorage) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("base");
        let storage = PlainFileStorage::create(&path).unwrap();
        for k in 0..pages {
            storage
                .write(k * PAGE, &vec![k as u8 + 1; PAGE as usize])
                .unwrap();
        }
        (dir, path, storage)
    }

    fn digest(path: &std::path::Path) -> Vec<u8> {
        use sha2::{Digest, Sha256};
        Sha256::digest(std::fs::read(path).unwrap()).to_vec()
    }

    fn read(cow: &CowStorage<PlainFileStorage>, offset: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        cow.read(offset, &mut out).unwrap();
        out
    }

    #[test]
    fn writes_stay_in_memory_and_reads_see_them() {
        let (_dir, path, storage) = base(4);
        let before = digest(&path);
        let cow = CowStorage::new(storage).unwrap();
        // redb's header: 320 bytes at offset 0, the rest of page 0 kept.
        cow.write(0, &[0xAA; 320]).unwrap();
        let page0 = read(&cow, 0, PAGE as usize);
        assert!(page0[..320].iter().all(|&b| b == 0xAA));
        assert!(page0[320..].iter().all(|&b| b == 1));
        // An unaligned write across a page boundary, then a read across
        // written and unwritten pages.
        cow.write(2 * PAGE - 10, &[0xBB; 20]).unwrap();
        let span = read(&cow, PAGE - 5, (2 * PAGE + 10) as usize);
        assert!(span[..5].iter().all(|&b| b == 1));
        assert!(span[5..5 + PAGE as usize - 10].iter().all(|&b| b == 2));
        assert!(
            span[PAGE as usize - 5..PAGE as usize + 15]
                .iter()
                .all(|&b| b == 0xBB)
        );
        assert!(
            span[PAGE as usize + 15..2 * PAGE as usize + 5]
                .iter()
                .all(|&b| b == 3)
        );
        assert!(span[2 * PAGE as usize + 5..].iter().all(|&b| b == 4));
        // Growth by writing and by set_len; sync does nothing.
        cow.write(6 * PAGE, &[7; 100]).unwrap();
        assert_eq!(cow.len().unwrap(), 6 * PAGE + 100);
        assert!(read(&cow, 4 * PAGE, PAGE as usize).iter().all(|&b| b == 0));
        cow.set_len(8 * PAGE).unwrap();
        cow.sync_data().unwrap();
        cow.close().unwrap();
        assert_eq!(cow.len().unwrap(), 8 * PAGE);
        assert_eq!(cow.base().len().unwrap(), 4 * PAGE);
        assert!(cow.overlay_bytes() >= 3 * PAGE);
        drop(cow);
        assert_eq!(digest(&path), before, "the base file changed");
    }

    #[test]
    fn shrink_then_grow_reads_zeros() {
        let (_dir, _path, storage) = base(4);
        let cow = CowStorage::new(storage).unwrap();
        cow.write(PAGE, &[9; PAGE as usize]).unwrap();
        cow.set_len(PAGE + 100).unwrap();
        cow.set_len(4 * PAGE).unwrap();
        let back = read(&cow, 0, 4 * PAGE as usize);
        assert!(back[..PAGE as usize].iter().all(|&b| b == 1));
        assert!(
            back[PAGE as usize..PAGE as usize + 100]
                .iter()
                .all(|&b| b == 9)
        );
        assert!(back[PAGE as usize + 100..].iter().all(|&b| b == 0));
        let mut past = [0u8; 1];
        assert!(cow.read(4 * PAGE, &mut past).is_err());
    }

    #[test]
    fn reads_that_meet_damage_are_noted_by_page() {
        let (_dir, _path, storage) = base(8);
        storage.damage(5 * PAGE + 7, 1);
        let cow = CowStorage::new(storage).unwrap();
        read(&cow, 0, 2 * PAGE as usize);
        assert!(cow.take_damaged_pages().is_empty());
        read(&cow, 4 * PAGE, 3 * PAGE as usize);
        assert_eq!(cow.take_damaged_pages(), vec![4..7]);
        assert!(cow.take_damaged_pages().is_empty());
    }

    /// Over a real store with a data segment: data sectors are read from the
    /// base, written ones stay in memory, no segment can be claimed, and the
    /// file is left as it was.
    #[test]
    fn data_sectors_come_from_the_base_and_writes_stay_in_memory() {
        use crate::container::{Access, Container, recovery_vault};
        use crate::fs::Storage;
        use crate::secrets::SecretBytes;

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.kb");
        let kek = || SecretBytes::from_slice(&[3; 32]).unwrap();
        let (c, mk) = recovery_vault(&path, kek());
        let store = c.into_store(mk).unwrap();
        store.write(0, &[0u8; 320]).unwrap();
        let d = store.claim_data_segment().unwrap();
        store
            .write_data_sectors(d, &[7u8; 2 * SECTOR_SIZE])
            .unwrap();
        drop(store);
        // Data sector d + 1 damaged (a flipped bit in its ciphertext).
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .unwrap();
            let at = crate::container::layout::sector_offset(d + 1) + 100;
            let mut b = [0u8];
            f.read_exact_at(&mut b, at).unwrap();
            f.write_all_at(&[b[0] ^ 4], at).unwrap();
        }
        let before = digest(&path);

        let c = Container::open(&path, Access::ReadOnly).unwrap();
        let mk = c.unwrap_slot(0, &kek()).unwrap();
        let cow = CowStorage::new(c.into_store(mk).unwrap()).unwrap();
        assert_eq!(cow.data_segment_sectors(), 1024);
        assert!(cow.claim_data_segment().is_err());
        let mut out = vec![1u8; 3 * SECTOR_SIZE];
        cow.read_data_sectors(d, &mut out).unwrap();
        assert!(out[..SECTOR_SIZE].iter().all(|&b| b == 7));
        assert!(out[SECTOR_SIZE..].iter().all(|&b| b == 0));
        assert_eq!(cow.damaged_reads(), 1);
        assert_eq!(cow.take_damaged_data_sectors(), vec![d..d + 3]);
        cow.write_data_sectors(d + 1, &[9u8; 2 * SECTOR_SIZE])
            .unwrap();
        cow.read_data_sectors(d, &mut out).unwrap();
        assert!(out[..SECTOR_SIZE].iter().all(|&b| b == 7));
        assert!(out[SECTOR_SIZE..].iter().all(|&b| b == 9));
        // Store sectors are not data sectors.
        assert!(cow.read_data_sectors(0, &mut out).is_err());
        assert!(cow.take_damaged_data_sectors().is_empty());
        drop(cow);
        assert_eq!(digest(&path), before, "the base file changed");
    }

    /// A filesystem whose last commit was not closed cleanly opens
    /// read-write over the overlay, and the base stays as it was.
    #[test]
    fn a_filesystem_opens_and_changes_over_the_overlay_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fs");
        let me = Caller { uid: 1, gid: 1 };
        {
            let storage = Arc::new(PlainFileStorage::create(&path).unwrap());
            let mut fs = Fs::create(storage, 1, 1).unwrap();
            let a = fs
                .mknod(ROOT_INO, b"kept", libc::S_IFREG | 0o644, 0, me)
                .unwrap();
            fs.write(a.ino, 0, b"committed").unwrap();
            fs.commit().unwrap();
            // Never closed, not even dropped: a crash after the commit.
            std::mem::forget(fs);
        }
        let before = digest(&path);
        // The crash state: redb will not open it read-only (its repair writes).
        let plain = Arc::new(PlainFileStorage::open(&path).unwrap());
        assert!(Fs::open(plain, true).is_err());
        let cow = Arc::new(CowStorage::new(PlainFileStorage::open(&path).unwrap()).unwrap());
        let mut fs = Fs::open(cow.clone(), false).unwrap();
        let a = fs.lookup(ROOT_INO, b"kept").unwrap();
        assert_eq!(&fs.read(a.ino, 0, 100).unwrap()[..], b"committed");
        fs.mknod(ROOT_INO, b"new", libc::S_IFREG | 0o644, 0, me)
            .unwrap();
        fs.commit().unwrap();
        fs.close().unwrap();
        drop(cow);
        assert_eq!(digest(&path), before, "the base file changed");
    }
}
