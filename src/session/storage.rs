//! The encrypted sector store as the filesystem's storage: delegation to the
//! container's `redb::StorageBackend`, plus the health and space figures the
//! filesystem asks for.

use std::io;

use redb::StorageBackend;

use crate::container::SectorStore;

#[derive(Debug)]
pub(crate) struct EncryptedStorage {
    store: SectorStore,
}

impl EncryptedStorage {
    pub(crate) fn new(store: SectorStore) -> Self {
        EncryptedStorage { store }
    }
}

impl StorageBackend for EncryptedStorage {
    fn len(&self) -> Result<u64, io::Error> {
        self.store.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        self.store.read(offset, out)
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        self.store.set_len(len)
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        self.store.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        self.store.write(offset, data)
    }

    fn close(&self) -> Result<(), io::Error> {
        self.store.close()
    }
}

impl crate::fs::Storage for EncryptedStorage {
    fn damaged_reads(&self) -> u64 {
        self.store.damaged_reads()
    }

    fn capacity(&self) -> Option<u64> {
        self.store.capacity()
    }

    fn host_free_bytes(&self) -> io::Result<u64> {
        host_free_bytes(self.store.container_path())
    }

    fn holds_commits(&self) -> bool {
        self.store.is_held_still()
    }

    fn work_while_idle(&self, max_sectors: u64) -> io::Result<bool> {
        self.store.seal_unsealed(max_sectors)
    }

    fn fsync_log_pages(&self) -> u64 {
        self.store.fsync_log_pages()
    }

    fn read_fsync_log_page(&self, index: u64, out: &mut [u8]) -> io::Result<bool> {
        self.store.read_fsync_log_page(index, out)
    }

    fn write_fsync_log(&self, index: u64, pages: &[u8]) -> io::Result<()> {
        self.store.write_fsync_log(index, pages)
    }

    fn data_segment_sectors(&self) -> u64 {
        self.store.data_segment_sectors()
    }

    fn claim_data_segment(&self) -> io::Result<u64> {
        self.store.claim_data_segment()
    }

    fn write_data_sectors(&self, first: u64, plain: &[u8]) -> io::Result<()> {
        self.store.write_data_sectors(first, plain)
    }

    fn read_data_sectors(&self, first: u64, out: &mut [u8]) -> io::Result<()> {
        self.store.read_data_sectors(first, out)
    }

    fn release_unused_segments(&self, data_in_use: &[u64]) -> io::Result<u64> {
        self.store.release_unused_segments(data_in_use)
    }
}

/// Bytes an unprivileged user may still write on the filesystem holding `path`.
fn host_free_bytes(path: &std::path::Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let dir = path.parent().unwrap_or(path);
    let dir = if dir.as_os_str().is_empty() {
        std::path::Path::new(".")
    } else {
        dir
    };
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: statvfs is plain data; `c` is NUL-terminated and outlives the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}
