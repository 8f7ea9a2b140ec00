//! Header backups (`keybound header backup` / `restore`), FORMAT.md §1.4.
//!
//! A backup file is 32768 bytes: the header copy in use, written as copy A
//! and again as copy B (only the copy index and the checksum differ; the MAC
//! does not cover the index). Nothing in it is secret beyond what the
//! container itself shows, but it holds the key slots of its time: anyone
//! with a token, password or recovery key that was enrolled then can open
//! the vault with it, whatever was revoked since.
//!
//! A restore needs no key (the header may be too damaged to unlock). It
//! writes the backup's copy over both copies, so it cannot change the
//! generation (the MAC covers it) and cannot merge anything: the data-area
//! fields (length, extent, seal reserve) come back as they were. A restore
//! that would move them backwards is refused unless forced.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::error::io_err;
use super::header::{self, Choice, Copies, Header};
use super::layout::*;
use super::{Access, Container, ContainerError, HeaderInfo, header_info, lock, read_header_area};

/// The size of a header backup file.
pub const BACKUP_LEN: usize = 2 * HEADER_COPY_SIZE;

impl Container {
    /// The header in use as a backup file's bytes ([`BACKUP_LEN`]).
    pub fn header_backup(&self) -> Vec<u8> {
        let used = self.raw[self.used]
            .as_deref()
            .expect("the used copy is valid");
        let mut out = Vec::with_capacity(BACKUP_LEN);
        for copy in 0..2 {
            out.extend(header::reindex(used, copy));
        }
        out
    }
}

/// The valid copy of a backup, and its raw bytes.
fn parse_backup(path: &Path, bytes: &[u8]) -> Result<(Header, Vec<u8>, usize), ContainerError> {
    let invalid = |reason: &str| ContainerError::BackupInvalid {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    if bytes.len() != BACKUP_LEN {
        return Err(invalid(&format!(
            "it is {} bytes long, a backup is {BACKUP_LEN}",
            bytes.len()
        )));
    }
    let copies = Copies::parse(bytes);
    let used = match copies.choose() {
        Choice::Use { used, .. } => used,
        Choice::NotAContainer => return Err(invalid("it holds no keybound header")),
        Choice::UnsupportedVersion(v) => {
            return Err(invalid(&format!("it is of format version {v}")));
        }
        Choice::BothDamaged => return Err(invalid("both header copies in it are damaged")),
    };
    let [a, b] = copies.parsed;
    let (h, raw) = [a, b]
        .into_iter()
        .nth(used)
        .and_then(Result::ok)
        .expect("the chosen copy is valid");
    Ok((h, raw, used))
}

/// What a backup file holds, without a key (`file_len` is reported as the
/// length the backup's header promises).
pub fn inspect_backup(path: &Path, bytes: &[u8]) -> Result<HeaderInfo, ContainerError> {
    let (h, _, used) = parse_backup(path, bytes)?;
    let len = h.required_file_len();
    Ok(header_info(&h, used, true, len))
}

/// What a restore replaced and what it wrote.
#[derive(Debug, Clone)]
pub struct RestoreReport {
    /// The header before, if a valid copy was there.
    pub before: Option<HeaderInfo>,
    pub restored: HeaderInfo,
}

/// Write the backup in `bytes` (read from `backup`) over both header copies
/// of `path`. Refuses while the vault is open elsewhere (the file lock), if
/// the backup belongs to another container, and — unless `force` — if the
/// data area moved on since the backup (length, extent, capacity, key epoch,
/// or a seal reserve the backup would lower).
pub fn restore_header(
    path: &Path,
    backup: &Path,
    bytes: &[u8],
    force: bool,
) -> Result<RestoreReport, ContainerError> {
    let (restored, raw, _) = parse_backup(backup, bytes)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_err(path, "open"))?;
    lock::lock_exclusive(&file, path)?;
    let file_len = file.metadata().map_err(io_err(path, "stat"))?.len();
    let area = read_header_area(&file, file_len).map_err(io_err(path, "read the header of"))?;
    let copies = Copies::parse(&area);
    let mismatch = |vault_id: String| ContainerError::BackupMismatch {
        path: path.to_path_buf(),
        backup: backup.to_path_buf(),
        vault_id,
        backup_id: hex::encode(restored.id),
    };
    let before = match copies.choose() {
        Choice::Use { used, other_valid } => {
            let [a, b] = copies.parsed;
            let (current, _) = [a, b]
                .into_iter()
                .nth(used)
                .and_then(Result::ok)
                .expect("the chosen copy is valid");
            if current.id != restored.id {
                return Err(mismatch(hex::encode(current.id)));
            }
            let changed = data_changes(&current, &restored);
            if !changed.is_empty() && !force {
                return Err(ContainerError::BackupDataChanged {
                    path: path.to_path_buf(),
                    backup: backup.to_path_buf(),
                    detail: changed.join(", "),
                });
            }
            Some(header_info(&current, used, other_valid, file_len))
        }
        Choice::UnsupportedVersion(_) | Choice::BothDamaged | Choice::NotAContainer => {
            // No valid copy: the id can still be read from a copy whose
            // magic survived. With none, nothing says the file is this vault.
            let ids: Vec<[u8; 16]> = HEADER_COPY_OFFSETS
                .iter()
                .filter_map(|&at| {
                    let at = at as usize;
                    let copy = area.get(at..at + H_ID + 16)?;
                    (&copy[..8] == MAGIC).then(|| copy[H_ID..].try_into().expect("16 bytes"))
                })
                .collect();
            if ids.is_empty() {
                return Err(mismatch("no readable id".into()));
            }
            if let Some(other) = ids.iter().find(|id| **id != restored.id) {
                return Err(mismatch(hex::encode(other)));
            }
            None
        }
    };
    if file_len < restored.required_file_len() {
        return Err(ContainerError::Truncated {
            path: path.to_path_buf(),
            expected_bytes: restored.required_file_len(),
            actual_bytes: file_len,
        });
    }
    // A, then B, each synced: a crash in between leaves one whole copy of
    // either header, and the higher generation wins.
    for (copy, &at) in HEADER_COPY_OFFSETS.iter().enumerate() {
        file.write_all_at(&header::reindex(&raw, copy), at)
            .map_err(io_err(path, "write the header of"))?;
        file.sync_data().map_err(io_err(path, "sync"))?;
    }
    drop(file);
    let restored = Container::open(path, Access::ReadOnly)?.info().clone();
    Ok(RestoreReport { before, restored })
}

/// How the data-area fields of `backup` differ from `current`, in words.
fn data_changes(current: &Header, backup: &Header) -> Vec<String> {
    let mut out = Vec::new();
    let mut check = |what: &str, now: u64, then: u64, bad: bool| {
        if bad {
            out.push(format!("{what} {then} in the backup, {now} now"));
        }
    };
    check(
        "store length",
        current.store_len,
        backup.store_len,
        current.store_len != backup.store_len,
    );
    check(
        "extent",
        current.extent,
        backup.extent,
        current.extent != backup.extent,
    );
    check(
        "capacity",
        current.capacity,
        backup.capacity,
        current.capacity != backup.capacity,
    );
    check(
        "key epoch",
        u64::from(current.epoch),
        u64::from(backup.epoch),
        current.epoch != backup.epoch,
    );
    check(
        "seal reserve",
        current.seal_reserve,
        backup.seal_reserve,
        backup.seal_reserve < current.seal_reserve,
    );
    // Sectors sealed since the backup would read as zeros again.
    check(
        "unsealed sectors",
        current.unsealed_sectors(),
        backup.unsealed_sectors(),
        current.unsealed != backup.unsealed,
    );
    // Data segments claimed or store segments taken since the backup.
    let runs = |h: &Header| h.segments.as_ref().map_or(0, Vec::len) as u64;
    check(
        "store segment runs",
        runs(current),
        runs(backup),
        current.segments != backup.segments,
    );
    out
}
