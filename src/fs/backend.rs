//! The backend redb is given: a shared handle on the [`Storage`], so the filesystem can read its
//! damage counter and reopen the database on the same storage.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use redb::StorageBackend;

use super::Storage;

/// Forwards to the storage; refuses growth past a fixed capacity (recording that it did, so the
/// filesystem can tell "vault full" from a storage failure); does not forward `close`: the
/// filesystem may reopen the database on the same storage and closes the storage itself.
/// Locking is left to the storage's owner (redb's lock methods keep their `Unsupported`
/// defaults, which its `ExclusiveWriter` mode accepts), because a reopen must not find its own
/// lock still held.
#[derive(Debug, Clone)]
pub(crate) struct Backend {
    pub storage: Arc<dyn Storage>,
    pub refused_growth: Arc<AtomicBool>,
}

impl Backend {
    pub fn new(storage: Arc<dyn Storage>) -> Self {
        Self {
            storage,
            refused_growth: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl StorageBackend for Backend {
    fn len(&self) -> io::Result<u64> {
        self.storage.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.storage.read(offset, out)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if let Some(cap) = self.storage.capacity()
            && len > cap
        {
            self.refused_growth.store(true, Ordering::SeqCst);
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        // A fixed-size vault's capacity is shared with file data's segments: the store may find
        // no room even below it. That is "vault full" too, not a storage failure.
        self.storage.set_len(len).inspect_err(|e| {
            if e.raw_os_error() == Some(libc::ENOSPC) {
                self.refused_growth.store(true, Ordering::SeqCst);
            }
        })
    }

    fn sync_data(&self) -> io::Result<()> {
        self.storage.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.storage.write(offset, data)
    }

    fn close(&self) -> io::Result<()> {
        Ok(())
    }
}
