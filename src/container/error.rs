//! What can go wrong with a container, in words a person can act on: each
//! message names the file and, where there is one, what to do about it.

use std::io;
use std::path::{Path, PathBuf};

use crate::crypto::CryptoError;
use crate::secrets::SecretError;

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("{} is not a keybound container (it has no keybound header)", path.display())]
    NotAContainer { path: PathBuf },

    #[error(
        "{} is a keybound container of format version {version}, but this build only reads \
         versions up to {supported}; use a newer keybound",
        path.display()
    )]
    UnsupportedVersion {
        path: PathBuf,
        version: u16,
        supported: u16,
    },

    #[error(
        "both header copies of {} are damaged, so its key slots cannot be read; restore the \
         container from a backup",
        path.display()
    )]
    BothHeadersDamaged { path: PathBuf },

    #[error(
        "{} is truncated: its header says it holds {expected_bytes} bytes, but the file has only \
         {actual_bytes}; it was probably cut short while being copied. Restore it from a backup \
         (the missing part cannot be recreated)",
        path.display()
    )]
    Truncated {
        path: PathBuf,
        expected_bytes: u64,
        actual_bytes: u64,
    },

    #[error("{} is in use by {}; lock or unmount it there first", path.display(), holder_text(*holder))]
    Locked { path: PathBuf, holder: Option<u32> },

    #[error("{} already exists; refusing to overwrite it (choose another name or remove it)", path.display())]
    Exists { path: PathBuf },

    #[error(
        "cannot open key slot {index} of {}: wrong password, wrong token or a damaged key slot",
        path.display()
    )]
    SlotUnwrap { path: PathBuf, index: u8 },

    #[error(
        "the header of {} was modified by someone without the key (or damaged in a way its \
         checksum missed); refusing to use it. Restore the container from a backup",
        path.display()
    )]
    HeaderMac { path: PathBuf },

    #[error("{} has no key slot {index} in use", path.display())]
    NoSuchSlot { path: PathBuf, index: u8 },

    #[error("key slot {index} of {} is already in use; remove it first", path.display())]
    SlotInUse { path: PathBuf, index: u8 },

    #[error("key slot {index} is the last one of {}; removing it would lock the vault forever", path.display())]
    LastSlot { path: PathBuf, index: u8 },

    #[error("{} is not a keybound header backup: {reason}", path.display())]
    BackupInvalid { path: PathBuf, reason: String },

    #[error(
        "the header backup {} belongs to container {backup_id}, not to {} ({vault_id}); \
         refusing to restore it",
        backup.display(),
        path.display()
    )]
    BackupMismatch {
        path: PathBuf,
        backup: PathBuf,
        vault_id: String,
        backup_id: String,
    },

    #[error(
        "the data area of {} changed since the header backup {} was made ({detail}); restoring \
         it would make what was written since unreadable. Restore only if the current header is \
         lost anyway, with --force",
        path.display(),
        backup.display()
    )]
    BackupDataChanged {
        path: PathBuf,
        backup: PathBuf,
        detail: String,
    },

    #[error("invalid key slot: {0}")]
    InvalidSlot(String),

    #[error(
        "{} has sealed {seals} sectors under its current key, the most that random nonces allow \
         safely; it refuses further writes. Run `keybound rekey`",
        path.display()
    )]
    SealBudget { path: PathBuf, seals: u64 },

    #[error("a fixed-size container must be at least {minimum} bytes, not {requested}")]
    TooSmall { requested: u64, minimum: u64 },

    #[error("{} is opened read-only; it cannot be changed", path.display())]
    ReadOnly { path: PathBuf },

    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        source: io::Error,
    },

    // ------------------------------------------- master-key rotation ----
    #[error(
        "a master-key rotation (`keybound rekey`) of {} was interrupted after {done} of {total} \
         sectors; the vault cannot be mounted or changed until it is finished: run `keybound \
         rekey {}` (it resumes where it stopped; any key slot authorises it)",
        path.display(),
        path.display()
    )]
    RekeyInProgress {
        path: PathBuf,
        done: u64,
        total: u64,
    },

    #[error(
        "key slot {index} of {} was carried over by a master-key rotation and must be activated \
         once by its owner before it opens the vault: keybound rekey {} --activate --slot \
         {index} (with that slot's token, PIN and password)",
        path.display(),
        path.display()
    )]
    SlotPending { path: PathBuf, index: u8 },

    #[error("cannot rotate the master key of {}: {reason}", path.display())]
    RekeyRefused { path: PathBuf, reason: String },

    #[error(transparent)]
    Crypto(#[from] CryptoError),

    #[error(transparent)]
    Secret(#[from] SecretError),
}

fn holder_text(holder: Option<u32>) -> String {
    match holder {
        Some(pid) => format!("another keybound process (pid {pid})"),
        None => "another process".to_string(),
    }
}

impl ContainerError {
    pub(crate) fn io(path: &Path, op: &'static str, source: io::Error) -> Self {
        ContainerError::Io {
            path: path.to_path_buf(),
            op,
            source,
        }
    }
}

/// `map_err` helper: an I/O error on `path` while doing `op`.
pub(crate) fn io_err(path: &Path, op: &'static str) -> impl FnOnce(io::Error) -> ContainerError {
    move |source| ContainerError::io(path, op, source)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_file_and_the_remedy() {
        let path = PathBuf::from("/vaults/v.kb");
        let cases = [
            (
                ContainerError::Locked {
                    path: path.clone(),
                    holder: Some(42),
                },
                "pid 42",
            ),
            (
                ContainerError::Truncated {
                    path: path.clone(),
                    expected_bytes: 100,
                    actual_bytes: 50,
                },
                "backup",
            ),
            (
                ContainerError::BothHeadersDamaged { path: path.clone() },
                "backup",
            ),
            (
                ContainerError::SlotUnwrap {
                    path: path.clone(),
                    index: 3,
                },
                "wrong password, wrong token",
            ),
            (
                ContainerError::SealBudget {
                    path: path.clone(),
                    seals: 1,
                },
                "keybound rekey",
            ),
        ];
        for (err, remedy) in cases {
            let text = err.to_string();
            assert!(text.contains("/vaults/v.kb"), "{text}");
            assert!(text.contains(remedy), "{text}");
        }
    }
}
