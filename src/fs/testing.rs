//! A [`Storage`] over a plain file: no encryption; for tests.
//!
//! It can inject damage: reads of marked sectors return zeros and count as damaged reads,
//! exactly as the encrypted store treats a sector that fails authentication.

use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use super::Storage;

/// Sector size damage is injected in.
pub const SECTOR: u64 = 4096;

/// A plain file as storage. No encryption; for tests.
#[derive(Debug)]
pub struct PlainFileStorage {
    file: File,
    path: PathBuf,
    capacity: Option<u64>,
    damaged: Mutex<Vec<Range<u64>>>,
    damaged_reads: AtomicU64,
    /// The fsync log, in a file beside this one (`<path>.fsync-log`), and its pages that read
    /// as torn.
    log: Option<(File, u64)>,
    torn: Mutex<Vec<u64>>,
    /// Data sectors, in a file beside this one (`<path>.data`), sector n at n × 4096, and the
    /// sectors per segment; claimed segments are those below the file's length.
    data: Option<(File, u64)>,
    damaged_data: Mutex<Vec<u64>>,
}

impl PlainFileStorage {
    /// Creates (or empties) the file.
    pub fn create(path: impl AsRef<Path>) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path.as_ref())?;
        Ok(Self::from_file(file, path.as_ref()))
    }

    /// Opens an existing file.
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path.as_ref())?;
        Ok(Self::from_file(file, path.as_ref()))
    }

    fn from_file(file: File, path: &Path) -> Self {
        Self {
            file,
            path: path.to_path_buf(),
            capacity: None,
            damaged: Mutex::new(Vec::new()),
            damaged_reads: AtomicU64::new(0),
            log: None,
            torn: Mutex::new(Vec::new()),
            data: None,
            damaged_data: Mutex::new(Vec::new()),
        }
    }

    /// Gives the storage data segments of `sectors` sectors, kept in `<path>.data` (created
    /// empty if missing, so a reopen finds what was written).
    pub fn with_data_segments(mut self, sectors: u64) -> io::Result<Self> {
        let mut p = self.path.clone().into_os_string();
        p.push(".data");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(PathBuf::from(p))?;
        self.data = Some((file, sectors));
        Ok(self)
    }

    /// From now on, reads of data sector `sector` return zeros and count as damaged.
    pub fn damage_data_sector(&self, sector: u64) {
        self.damaged_data
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(sector);
    }

    fn data(&self) -> io::Result<&(File, u64)> {
        self.data
            .as_ref()
            .ok_or_else(|| io::ErrorKind::Unsupported.into())
    }

    /// Gives the storage an fsync log of `pages` pages, kept in `<path>.fsync-log` (created
    /// empty if missing, so a reopen finds what was logged).
    pub fn with_fsync_log(mut self, pages: u64) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(self.log_path())?;
        file.set_len(pages * SECTOR)?;
        self.log = Some((file, pages));
        Ok(self)
    }

    fn log_path(&self) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(".fsync-log");
        p.into()
    }

    /// From now on, page `index` of the fsync log reads as torn (as after a crash mid-write).
    pub fn tear_log_page(&self, index: u64) {
        self.torn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(index);
    }

    /// Makes the storage fixed-size: it refuses to grow past `capacity` bytes.
    pub fn with_capacity(mut self, capacity: Option<u64>) -> Self {
        self.capacity = capacity;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// From now on, reads of the sectors overlapping `offset..offset + len` return zeros there
    /// and count as damaged.
    pub fn damage(&self, offset: u64, len: u64) {
        let start = offset / SECTOR * SECTOR;
        let end = (offset + len).div_ceil(SECTOR) * SECTOR;
        self.lock().push(start..end);
    }

    /// Removes all injected damage.
    pub fn heal(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Range<u64>>> {
        self.damaged
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn apply_damage(&self, offset: u64, out: &mut [u8]) {
        let end = offset + out.len() as u64;
        for r in self.lock().iter() {
            let (lo, hi) = (r.start.max(offset), r.end.min(end));
            if lo < hi {
                out[(lo - offset) as usize..(hi - offset) as usize].fill(0);
                let sectors = (hi - lo).div_ceil(SECTOR);
                self.damaged_reads.fetch_add(sectors, Ordering::SeqCst);
            }
        }
    }
}

impl redb::StorageBackend for PlainFileStorage {
    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(out, offset)?;
        self.apply_damage(offset, out);
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        if let Some((log, _)) = &self.log {
            log.sync_data()?;
        }
        if let Some((data, _)) = &self.data {
            data.sync_data()?;
        }
        self.file.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, offset)
    }
}

impl Storage for PlainFileStorage {
    fn damaged_reads(&self) -> u64 {
        self.damaged_reads.load(Ordering::SeqCst)
    }

    fn capacity(&self) -> Option<u64> {
        self.capacity
    }

    fn host_free_bytes(&self) -> io::Result<u64> {
        // SAFETY: fstatvfs writes into the zeroed struct we own; the fd is open.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::fstatvfs(self.file.as_raw_fd(), &mut st) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(st.f_bavail.saturating_mul(st.f_frsize))
    }

    fn fsync_log_pages(&self) -> u64 {
        self.log.as_ref().map_or(0, |(_, pages)| *pages)
    }

    fn read_fsync_log_page(&self, index: u64, out: &mut [u8]) -> io::Result<bool> {
        let (file, _) = self.log.as_ref().ok_or(io::ErrorKind::Unsupported)?;
        file.read_exact_at(out, index * SECTOR)?;
        let torn = self
            .torn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(&index);
        if torn {
            out.fill(0);
        }
        Ok(!torn)
    }

    fn data_segment_sectors(&self) -> u64 {
        self.data.as_ref().map_or(0, |(_, n)| *n)
    }

    fn claim_data_segment(&self) -> io::Result<u64> {
        let (file, n) = self.data()?;
        let bytes = n * SECTOR;
        let len = file.metadata()?.len().div_ceil(bytes) * bytes;
        if self.capacity.is_some_and(|cap| len + bytes > cap) {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        file.set_len(len + bytes)?;
        Ok(len / SECTOR)
    }

    fn write_data_sectors(&self, first: u64, plain: &[u8]) -> io::Result<()> {
        let (file, _) = self.data()?;
        let end = first * SECTOR + plain.len() as u64;
        if !(plain.len() as u64).is_multiple_of(SECTOR) || end > file.metadata()?.len() {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        file.write_all_at(plain, first * SECTOR)?;
        self.damaged_data
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|s| !(first..end / SECTOR).contains(s));
        Ok(())
    }

    fn release_unused_segments(&self, data_in_use: &[u64]) -> io::Result<u64> {
        let (file, n) = self.data()?;
        let len = file.metadata()?.len();
        let keep = data_in_use
            .iter()
            .map(|s| (s + n) * SECTOR)
            .max()
            .unwrap_or(0);
        if keep >= len {
            return Ok(0);
        }
        file.set_len(keep)?;
        Ok(len - keep)
    }

    fn read_data_sectors(&self, first: u64, out: &mut [u8]) -> io::Result<()> {
        let (file, _) = self.data()?;
        if first * SECTOR >= file.metadata()?.len() {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        file.read_exact_at(out, first * SECTOR)?;
        let count = out.len() as u64 / SECTOR;
        for &s in self
            .damaged_data
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
        {
            if (first..first + count).contains(&s) {
                let at = ((s - first) * SECTOR) as usize;
                out[at..at + SECTOR as usize].fill(0);
                self.damaged_reads.fetch_add(1, Ordering::SeqCst);
            }
        }
        Ok(())
    }

    fn write_fsync_log(&self, index: u64, pages: &[u8]) -> io::Result<()> {
        let (file, _) = self.log.as_ref().ok_or(io::ErrorKind::Unsupported)?;
        file.write_all_at(pages, index * SECTOR)?;
        let first = index;
        let last = index + (pages.len() as u64).div_ceil(SECTOR);
        self.torn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|p| !(first..last).contains(p));
        Ok(())
    }
}
