//! `keybound compact`: give the free space inside a growing container back to
//! the disk.
//!
//! redb grows its file by doubling (by 4 GiB regions past 4 GiB) and, after
//! deletes, shrinks it only by half of the free tail per commit, so a vault
//! whose files were deleted can stay far larger than what it holds. Compaction
//! moves the pages in use to the start of the store, one durable commit per
//! step, and the store then truncates the container behind them.

use std::sync::Arc;

use crate::container::Container;
use crate::crypto::MasterKey;
use crate::fs::Fs;

use super::SessionError;
use super::storage::EncryptedStorage;

/// Compact the filesystem in `container` (opened read-write, so locked against
/// mounts) with its master key. `Ok(true)` if any page moved. An interrupted
/// compaction loses nothing: every step is a commit, and the next open
/// recovers from the last one (walking the whole store, as after a crash).
pub fn compact(container: Container, master_key: MasterKey) -> Result<bool, SessionError> {
    let vault = container.path().to_path_buf();
    let filesystem = |e: crate::fs::FsError| SessionError::Filesystem {
        vault: vault.clone(),
        detail: e.to_string(),
    };
    let store = container.into_store(master_key)?;
    let storage = Arc::new(EncryptedStorage::new(store));
    let mut fs = Fs::open(storage, false).map_err(filesystem)?;
    let moved = fs.compact().map_err(filesystem)?;
    // Closing makes the store's last state durable: header, sealed gaps, truncation.
    fs.close().map_err(filesystem)?;
    Ok(moved)
}
