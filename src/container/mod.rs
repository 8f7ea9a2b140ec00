//! The container file: a redundant header with key slots, and an encrypted,
//! authenticated sector store that redb runs on (docs/FORMAT.md).
//!
//! - [`Container`]: an open, locked container file and its parsed header. It
//!   holds no key; [`Container::unwrap_slot`] turns a KEK into the master
//!   key, and [`Container::into_store`] turns the master key into a
//!   [`SectorStore`].
//! - [`SectorStore`]: redb's `StorageBackend` over sealed sectors.
//! - [`Container::inspect`]: the header without a lock or a key, for
//!   `keybound info`.
//!
//! Nothing here reads a password or talks to a token: the session layer
//! derives key-encryption keys and hands them in.

mod backup;
mod cache;
mod direct;
mod error;
mod freeze;
mod header;
pub mod layout;
mod lock;
mod ranges;
mod rekey;
mod slot;
mod store;
mod verify;

#[cfg(test)]
mod tests;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ring::rand::SecureRandom;
use serde::Serialize;

pub use backup::{BACKUP_LEN, RestoreReport, inspect_backup, restore_header};
pub use error::ContainerError;
pub use freeze::{FreezeError, FreezeGate, Thawed};
pub use header::Policy;
pub use layout::SECTOR_SIZE;
pub use lock::lock_shared;
pub use rekey::{ReencryptReport, RekeyProgress, RekeyStatus, SlotCarry};
pub use slot::{NewSlot, NewSlotKind, SlotFlags, SlotInfo, SlotKind};
pub use store::{DEFAULT_CACHE_BYTES, SectorScan, SectorStore};
pub use verify::{
    CopyReport, CopyStatus, Finding, Geometry, MacStatus, Severity, ShallowReport, partial_marker,
    verify_container,
};

use crate::crypto::{
    CONTAINER_ID_LEN, CryptoError, HeaderMac, KeyPurpose, MasterKey, SectorCipher,
};
use error::io_err;
use header::{Choice, Copies, Header, HeaderWriter};
use layout::*;

/// Fill `buf` from the operating system's generator (no user-space state).
pub(crate) fn fill_random(buf: &mut [u8]) -> Result<(), CryptoError> {
    ring::rand::SystemRandom::new()
        .fill(buf)
        .map_err(|_| CryptoError::Random)
}

/// A fresh random container id.
pub fn new_container_id() -> Result<[u8; CONTAINER_ID_LEN], ContainerError> {
    let mut id = [0u8; CONTAINER_ID_LEN];
    fill_random(&mut id)?;
    Ok(id)
}

/// Serde helper: byte arrays as lowercase hex.
pub(crate) mod hexser {
    pub fn serialize<S: serde::Serializer, T: AsRef<[u8]>>(
        bytes: &T,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    ReadOnly,
    ReadWrite,
}

pub struct CreateOptions {
    pub id: [u8; CONTAINER_ID_LEN],
    /// Total file size in bytes for a preallocated container (rounded down
    /// to whole sectors); `None` for one that grows as it is written.
    pub fixed_size: Option<u64>,
    /// Give the vault an fsync log (FORMAT.md §4.9): [`FSYNC_LOG_PAGES`] store
    /// pages, unless it is a fixed-size container smaller than
    /// [`MIN_SECTORS_FOR_FSYNC_LOG`]. Without one, every fsync is a commit.
    pub fsync_log: bool,
}

/// Which header copy is in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum HeaderCopy {
    A,
    B,
}

/// What the header says, readable without a key. Nothing in it is secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HeaderInfo {
    pub version: u16,
    #[serde(with = "hexser")]
    pub id: [u8; CONTAINER_ID_LEN],
    pub generation: u64,
    /// Total file bytes of a preallocated container; `None` if it grows.
    pub fixed_size: Option<u64>,
    /// redb's logical length.
    pub store_len: u64,
    /// Sectors sealed at least once, but for `unsealed_sectors`.
    pub extent_sectors: u64,
    /// Sectors below the extent not sealed yet (they read as zeros): left by
    /// a mount that has not been unmounted cleanly (FORMAT.md §4.2).
    pub unsealed_sectors: u64,
    /// The file's length now.
    pub file_len: u64,
    pub copy_used: HeaderCopy,
    /// The other copy failed its checksum or a range check; it is rewritten
    /// at the next header write (at the next read-write mount).
    pub other_copy_damaged: bool,
    pub key_epoch: u32,
    pub seal_budget_reserved: u64,
    pub policy: Policy,
    pub slots: Vec<SlotInfo>,
    /// An interrupted master-key rotation: sectors done of the extent.
    pub rekey_in_progress: Option<RekeyInfo>,
    /// Key slots carried over by a rotation, awaiting activation.
    pub pending_slots: Vec<u8>,
    /// Store pages of the fsync log (FORMAT.md §4.9); 0: every fsync commits.
    pub fsync_log_pages: u64,
    /// The store segment map as runs (first physical segment, segments), FORMAT.md §4.10;
    /// `None` before version 4: redb's store has every segment (no file data outside it).
    pub store_segments: Option<Vec<(u32, u32)>>,
}

/// Where an interrupted rotation stands (FORMAT.md §7), for `keybound info`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct RekeyInfo {
    pub done_sectors: u64,
    pub total_sectors: u64,
    pub new_epoch: u32,
}

impl HeaderInfo {
    /// One line on the header copies, for `keybound info`.
    pub fn header_state(&self) -> String {
        let (used, other) = match self.copy_used {
            HeaderCopy::A => ("A", "B"),
            HeaderCopy::B => ("B", "A"),
        };
        if self.other_copy_damaged {
            format!(
                "copy {used} in use (generation {}); copy {other} is damaged and is rewritten \
                 at the next read-write mount",
                self.generation
            )
        } else {
            format!("copies A and B intact, generation {}", self.generation)
        }
    }
}

/// An open container file and its header: locked against other processes,
/// holding no key.
pub struct Container {
    path: PathBuf,
    file: File,
    access: Access,
    header: Header,
    /// The raw bytes of each copy, if it is valid.
    raw: [Option<Vec<u8>>; 2],
    used: usize,
    info: HeaderInfo,
}

impl std::fmt::Debug for Container {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Container")
            .field("path", &self.path)
            .field("id", &hex::encode(self.header.id))
            .field("access", &self.access)
            .finish_non_exhaustive()
    }
}

/// Removes a half-created container unless disarmed.
struct RemoveOnDrop<'a>(Option<&'a Path>);

impl Drop for RemoveOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(path) = self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Sector capacity for a requested total file size.
fn capacity_for(total: u64) -> Result<u64, ContainerError> {
    let minimum = file_len_for_sectors(MIN_FIXED_SECTORS);
    let maximum = file_len_for_sectors(MAX_SECTORS);
    if total < minimum {
        return Err(ContainerError::TooSmall {
            requested: total,
            minimum,
        });
    }
    Ok((total.min(maximum) - DATA_OFFSET) / SEALED_SECTOR_SIZE as u64)
}

fn mac_for(mk: &MasterKey, id: &[u8; CONTAINER_ID_LEN]) -> Result<HeaderMac, ContainerError> {
    Ok(HeaderMac::new(&mk.derive(KeyPurpose::HeaderMac, id)?)?)
}

impl Container {
    /// Create a new container at `path` with one key slot. Never overwrites
    /// an existing file; removes what it wrote if it fails. A fixed-size
    /// container is filled with random bytes first (`progress` sees it).
    pub fn create(
        path: &Path,
        opts: &CreateOptions,
        mk: &MasterKey,
        first: NewSlot,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Container, ContainerError> {
        let capacity = opts.fixed_size.map(capacity_for).transpose()?.unwrap_or(0);
        let roomy = capacity == 0 || capacity >= MIN_SECTORS_FOR_FSYNC_LOG;
        let fsync_log_pages = if opts.fsync_log && roomy {
            FSYNC_LOG_PAGES
        } else {
            0
        };
        // Encoding checks the slot (index, label, keys) before any file exists.
        let first_bytes = slot::encode(&opts.id, &first, mk, now_unix())?;
        let mut slots = Vec::with_capacity(SLOT_COUNT * SLOT_SIZE);
        for index in 0..SLOT_COUNT {
            if index == usize::from(first.index) {
                slots.extend_from_slice(&first_bytes);
            } else {
                slots.extend(slot::empty()?);
            }
        }
        let mut reserved = vec![0u8; H_UNSEALED - H_RESERVED_TAIL];
        fill_random(&mut reserved)?;
        let mut header = Header {
            generation: 0,
            id: opts.id,
            capacity,
            extent: 0,
            seal_reserve: 0,
            epoch: 0,
            store_len: 0,
            policy: Policy::default(),
            slots,
            reserved,
            unsealed: Vec::new(),
            rekeying: false,
            pending: 0,
            fsync_log_pages,
            segments: None,
            version: FORMAT_VERSION_WITHOUT_SEGMENTS,
        };
        let mac = mac_for(mk, &opts.id)?;

        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => ContainerError::Exists {
                    path: path.to_path_buf(),
                },
                _ => ContainerError::io(path, "create", e),
            })?;
        let mut cleanup = RemoveOnDrop(Some(path));
        lock::lock_exclusive(&file, path)?;
        write_body(&file, path, header.required_file_len(), progress)?;
        // Both copies, A then B, each synced: B (generation 2) is in use.
        let mut writer = HeaderWriter::new([None, None]);
        for _ in 0..2 {
            writer
                .write(&file, &mut header, &mac)
                .map_err(io_err(path, "write the header of"))?;
        }
        sync_parent(path)?;
        cleanup.0 = None;
        Container::from_file(path, file, Access::ReadWrite)
    }

    /// Open an existing container and lock it (for either access: even a
    /// read-only mount must not run while another process writes).
    pub fn open(path: &Path, access: Access) -> Result<Container, ContainerError> {
        let file = OpenOptions::new()
            .read(true)
            .write(access == Access::ReadWrite)
            .open(path)
            .map_err(io_err(path, "open"))?;
        lock::lock_exclusive(&file, path)?;
        Container::from_file(path, file, access)
    }

    /// The header without a lock or a key, for `keybound info` and early
    /// checks. (A concurrent header write may make it see the older copy.)
    pub fn inspect(path: &Path) -> Result<HeaderInfo, ContainerError> {
        let file = File::open(path).map_err(io_err(path, "open"))?;
        Ok(Container::from_file(path, file, Access::ReadOnly)?.info)
    }

    fn from_file(path: &Path, file: File, access: Access) -> Result<Container, ContainerError> {
        let HeaderCopies {
            file_len,
            copies,
            chosen,
        } = read_copies(path, &file)?;
        let Some((used, other_valid)) = chosen else {
            return Err(ContainerError::BothHeadersDamaged {
                path: path.to_path_buf(),
            });
        };
        let [a, b] = copies.parsed;
        let mut raw = [None, None];
        let mut parsed = [None, None];
        for (i, copy) in [a, b].into_iter().enumerate() {
            if let Ok((h, bytes)) = copy {
                raw[i] = Some(bytes);
                parsed[i] = Some(h);
            }
        }
        let header = parsed[used].take().expect("the chosen copy is valid");
        let expected = header.required_file_len();
        if file_len < expected {
            return Err(ContainerError::Truncated {
                path: path.to_path_buf(),
                expected_bytes: expected,
                actual_bytes: file_len,
            });
        }
        let info = header_info(&header, used, other_valid, file_len);
        Ok(Container {
            path: path.to_path_buf(),
            file,
            access,
            header,
            raw,
            used,
            info,
        })
    }

    pub fn info(&self) -> &HeaderInfo {
        &self.info
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn used_slot(&self, index: u8) -> Result<&[u8], ContainerError> {
        let in_use =
            usize::from(index) < SLOT_COUNT && self.info.slots.iter().any(|s| s.index == index);
        if !in_use {
            return Err(ContainerError::NoSuchSlot {
                path: self.path.clone(),
                index,
            });
        }
        Ok(self.header.slot_bytes(usize::from(index)))
    }

    /// The master key from slot `index`, given its KEK. A wrong KEK and a
    /// tampered slot are the same error: [`ContainerError::SlotUnwrap`].
    pub fn unwrap_slot(
        &self,
        index: u8,
        kek: &crate::secrets::SecretBytes,
    ) -> Result<MasterKey, ContainerError> {
        let bytes = self.used_slot(index)?;
        if self.header.pending & (1 << index) != 0 {
            // Rekey (FORMAT.md §7.4): it holds the old key until activated.
            return Err(ContainerError::SlotPending {
                path: self.path.clone(),
                index,
            });
        }
        slot::unwrap(&self.header.id, index, bytes, kek).map_err(|e| match e {
            CryptoError::Authentication => ContainerError::SlotUnwrap {
                path: self.path.clone(),
                index,
            },
            other => other.into(),
        })
    }

    /// Check the header MAC with `mk`; returns the MAC key and a writer that
    /// knows which copies can be trusted (a copy failing its MAC is the next
    /// one overwritten).
    fn verify(&self, mk: &MasterKey) -> Result<(HeaderMac, HeaderWriter), ContainerError> {
        let mac = mac_for(mk, &self.header.id)?;
        let used = self.raw[self.used]
            .as_deref()
            .expect("the used copy is valid");
        if !header::verify_mac(used, &mac) {
            return Err(ContainerError::HeaderMac {
                path: self.path.clone(),
            });
        }
        let generations = [0, 1].map(|i| {
            let raw = self.raw[i].as_deref()?;
            let h = Header::decode(raw, i).ok()?;
            header::verify_mac(raw, &mac).then_some(h.generation)
        });
        Ok((mac, HeaderWriter::new(generations)))
    }

    /// Verify the header MAC with `mk` and open the data area with the
    /// default cache size.
    pub fn into_store(self, mk: MasterKey) -> Result<SectorStore, ContainerError> {
        self.into_store_with_cache(mk, DEFAULT_CACHE_BYTES)
    }

    /// As [`Self::into_store`], with a plaintext cache of `cache_bytes`.
    pub fn into_store_with_cache(
        self,
        mk: MasterKey,
        cache_bytes: usize,
    ) -> Result<SectorStore, ContainerError> {
        let (mac, writer) = self.verify(&mk)?;
        if let Some(r) = self.rekey_status() {
            // Rekey (FORMAT.md §7.3): sectors of two epochs; finish first.
            return Err(ContainerError::RekeyInProgress {
                path: self.path,
                done: r.done,
                total: r.total,
            });
        }
        let cipher = SectorCipher::new(&mk.derive(KeyPurpose::SectorEncryption, &self.header.id)?)?;
        drop(mk);
        let needs_repair = !writer.both_valid();
        let read_only = self.access == Access::ReadOnly;
        let store = SectorStore::new(store::StoreParts {
            path: self.path,
            file: self.file,
            read_only,
            header: self.header,
            writer,
            mac,
            cipher,
            cache_bytes,
        })?;
        if needs_repair && !read_only {
            store.repair_header()?;
        }
        Ok(store)
    }

    /// Write `slot` into an empty slot (enrol a token, add a recovery key).
    /// Needs the master key: the header MAC is checked and rewritten.
    pub fn add_slot(&mut self, mk: &MasterKey, slot: NewSlot) -> Result<(), ContainerError> {
        self.add_slot_with_flags(mk, slot, SlotFlags::default())
    }

    /// [`Self::add_slot`] with slot flags (an enrolment with a temporary
    /// password sets `must_change_password`).
    pub fn add_slot_with_flags(
        &mut self,
        mk: &MasterKey,
        slot: NewSlot,
        flags: SlotFlags,
    ) -> Result<(), ContainerError> {
        if usize::from(slot.index) < SLOT_COUNT && self.used_slot(slot.index).is_ok() {
            return Err(ContainerError::SlotInUse {
                path: self.path.clone(),
                index: slot.index,
            });
        }
        let bytes = slot::encode_with_flags(&self.header.id, &slot, mk, now_unix(), flags)?;
        self.rewrite(mk, |h| h.set_slot_bytes(usize::from(slot.index), &bytes))
    }

    /// Overwrite the slot in use at `slot.index` (a new password for it),
    /// in both header copies, so the old wrapping is gone from the file.
    pub fn replace_slot(
        &mut self,
        mk: &MasterKey,
        slot: NewSlot,
        flags: SlotFlags,
    ) -> Result<(), ContainerError> {
        self.used_slot(slot.index)?;
        let bytes = slot::encode_with_flags(&self.header.id, &slot, mk, now_unix(), flags)?;
        self.rewrite(mk, |h| {
            h.set_slot_bytes(usize::from(slot.index), &bytes);
            h.pending &= !(1 << slot.index); // rekey: a fresh wrapping of the new key
        })?;
        self.rewrite(mk, |_| {})
    }

    /// Empty slot `index` (revoke a token) in both header copies: its bytes
    /// are overwritten with random ones in A and in B. The last slot cannot
    /// be removed.
    pub fn remove_slot(&mut self, mk: &MasterKey, index: u8) -> Result<(), ContainerError> {
        self.remove_slot_inner(mk, index, false)
    }

    /// [`Self::remove_slot`], even the last one: afterwards nothing in the
    /// file opens the vault (`keybound revoke --force`).
    pub fn remove_slot_even_last(
        &mut self,
        mk: &MasterKey,
        index: u8,
    ) -> Result<(), ContainerError> {
        self.remove_slot_inner(mk, index, true)
    }

    fn remove_slot_inner(
        &mut self,
        mk: &MasterKey,
        index: u8,
        allow_last: bool,
    ) -> Result<(), ContainerError> {
        self.used_slot(index)?;
        if self.info.slots.len() == 1 && !allow_last {
            return Err(ContainerError::LastSlot {
                path: self.path.clone(),
                index,
            });
        }
        let bytes = slot::empty()?;
        self.rewrite(mk, |h| {
            h.set_slot_bytes(usize::from(index), &bytes);
            h.pending &= !(1 << index); // rekey: a removed slot awaits nothing
        })?;
        // The other copy still holds the slot: write it too.
        self.rewrite(mk, |_| {})
    }

    /// Store a new vault policy (FORMAT.md §1; the session layer enforces it).
    pub fn set_policy(&mut self, mk: &MasterKey, policy: Policy) -> Result<(), ContainerError> {
        self.rewrite(mk, |h| h.policy = policy)
    }

    /// Verify the MAC, change the header, write it by the A/B rule and
    /// re-read this container's view of it.
    fn rewrite(
        &mut self,
        mk: &MasterKey,
        change: impl FnOnce(&mut Header),
    ) -> Result<(), ContainerError> {
        if self.access == Access::ReadOnly {
            return Err(ContainerError::ReadOnly {
                path: self.path.clone(),
            });
        }
        if let Some(r) = self.rekey_status() {
            return Err(ContainerError::RekeyInProgress {
                path: self.path.clone(),
                done: r.done,
                total: r.total,
            });
        }
        let (mac, mut writer) = self.verify(mk)?;
        let mut header = self.header.clone();
        change(&mut header);
        writer
            .write(&self.file, &mut header, &mac)
            .map_err(io_err(&self.path, "write the header of"))?;
        self.reload()
    }

    /// Read the header back after writing it, through a second descriptor:
    /// the original one is kept because it holds the lock.
    fn reload(&mut self) -> Result<(), ContainerError> {
        let file = self
            .file
            .try_clone()
            .map_err(io_err(&self.path, "reopen"))?;
        let fresh = Container::from_file(&self.path, file, self.access)?;
        self.header = fresh.header;
        self.raw = fresh.raw;
        self.used = fresh.used;
        self.info = fresh.info;
        Ok(())
    }
}

/// What `header` (copy `used`) says, for a file of `file_len` bytes.
fn header_info(header: &Header, used: usize, other_valid: bool, file_len: u64) -> HeaderInfo {
    HeaderInfo {
        version: header.version,
        id: header.id,
        generation: header.generation,
        fixed_size: header
            .fixed()
            .then(|| file_len_for_sectors(header.capacity)),
        store_len: header.store_len,
        extent_sectors: header.extent,
        unsealed_sectors: header.unsealed_sectors(),
        file_len,
        copy_used: if used == 0 {
            HeaderCopy::A
        } else {
            HeaderCopy::B
        },
        other_copy_damaged: !other_valid,
        key_epoch: header.epoch,
        fsync_log_pages: header.fsync_log_pages,
        store_segments: header.segments.clone(),
        seal_budget_reserved: header.seal_reserve,
        policy: header.policy,
        slots: header.slot_infos(),
        rekey_in_progress: rekey::status(header).map(|r| RekeyInfo {
            done_sectors: r.done,
            total_sectors: r.total,
            new_epoch: r.new_epoch,
        }),
        pending_slots: (0..SLOT_COUNT as u8)
            .filter(|i| header.pending & (1 << i) != 0)
            .collect(),
    }
}

/// The two header copies (or as much of them as the file holds), read by
/// position so the descriptor's offset never matters.
/// Both header copies of a file, and which one to use.
pub(crate) struct HeaderCopies {
    pub file_len: u64,
    pub copies: Copies,
    /// `(copy used, the other one valid too)`; `None` when both are damaged.
    pub chosen: Option<(usize, bool)>,
}

/// Read both header copies of `path` and choose the one to use. Not a
/// container, or a newer format: an error.
pub(crate) fn read_copies(path: &Path, file: &File) -> Result<HeaderCopies, ContainerError> {
    let file_len = file.metadata().map_err(io_err(path, "stat"))?.len();
    let area = read_header_area(file, file_len).map_err(io_err(path, "read the header of"))?;
    let copies = Copies::parse(&area);
    let chosen = match copies.choose() {
        Choice::Use { used, other_valid } => Some((used, other_valid)),
        Choice::BothDamaged => None,
        Choice::NotAContainer => {
            return Err(ContainerError::NotAContainer {
                path: path.to_path_buf(),
            });
        }
        Choice::UnsupportedVersion(version) => {
            return Err(ContainerError::UnsupportedVersion {
                path: path.to_path_buf(),
                version,
                supported: FORMAT_VERSION,
            });
        }
    };
    Ok(HeaderCopies {
        file_len,
        copies,
        chosen,
    })
}

fn read_header_area(file: &File, file_len: u64) -> std::io::Result<Vec<u8>> {
    let mut area = vec![0u8; file_len.min(RESERVED_AREA_OFFSET) as usize];
    file.read_exact_at(&mut area, 0)?;
    Ok(area)
}

/// Everything after the header copies: the reserved area (random) and, for
/// a fixed-size container, the whole data area (random), so the file looks
/// the same whether a sector was ever written or not.
fn write_body(
    file: &File,
    path: &Path,
    total: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), ContainerError> {
    const CHUNK: usize = 1 << 20;
    let mut buf = vec![0u8; CHUNK];
    let mut at = RESERVED_AREA_OFFSET;
    progress(at, total);
    while at < total {
        let n = CHUNK.min((total - at) as usize);
        fill_random(&mut buf[..n])?;
        file.write_all_at(&buf[..n], at)
            .map_err(io_err(path, "write"))?;
        at += n as u64;
        progress(at, total);
    }
    file.sync_all().map_err(io_err(path, "sync"))
}

/// fsync the directory holding `path`, so the new file's name is durable.
fn sync_parent(path: &Path) -> Result<(), ContainerError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(io_err(parent, "sync the directory"))
}

/// For tests elsewhere in the crate: a new growing container at `path` with one recovery slot
/// (slot 0) whose key-encryption key is `kek`, and its master key.
#[cfg(test)]
pub(crate) fn recovery_vault(
    path: &Path,
    kek: crate::secrets::SecretBytes,
) -> (Container, MasterKey) {
    let mk = MasterKey::generate().unwrap();
    let slot = NewSlot {
        index: 0,
        label: String::new(),
        salt: [1; crate::crypto::SALT_LEN],
        kind: NewSlotKind::Recovery,
        kek,
    };
    let opts = CreateOptions {
        id: new_container_id().unwrap(),
        fixed_size: None,
        fsync_log: false,
    };
    let c = Container::create(path, &opts, &mk, slot, &mut |_, _| {}).unwrap();
    (c, mk)
}
