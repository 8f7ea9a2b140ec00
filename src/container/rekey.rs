//! Master-key rotation (`keybound rekey`): a new master key, every sector
//! re-encrypted under it at a new key epoch, every key slot carried over.
//! FORMAT.md §7 describes the states and the key derivations; this is the
//! container side. The session layer (`session::admin::rekey`) supplies what
//! needs a token or a password: the authorising slot's new wrapping and the
//! card ECDH shares of the other token slots' links.
//!
//! Crash safety, in short: the header (both copies, MAC'd) records "rekey
//! in progress", the new master key (sealed under a key derived from the
//! old one), a watermark W and the batch in flight `W..W+n`. Below W every
//! sector is under the new key, from W + n on under the old one; inside the
//! batch a sector may be either (the AEAD says which) or torn, and a torn
//! one is rebuilt from the journal: the batch's old ciphertext, written and
//! synced past the end of the data area before any sector of the batch is
//! overwritten, and named by its SHA-256 in the header.

use std::os::unix::fs::FileExt;

use sha2::{Digest, Sha256};
use zeroize::Zeroize;

use super::error::{ContainerError, io_err};
use super::header::{Header, HeaderWriter};
use super::layout::*;
use super::ranges::RangeSet;
use super::slot::{self, get_u64};
use super::{Access, Container, NewSlot, fill_random, mac_for};
use crate::crypto::{
    CONTAINER_ID_LEN, CryptoError, HeaderMac, KEY_LEN, KeyPurpose, MasterKey, NONCE_LEN,
    SectorCipher, TAG_LEN, aead, random_nonce,
};
use crate::secrets::SecretBytes;

/// Where a rotation stands, readable without a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RekeyStatus {
    /// Sectors re-encrypted (below the watermark).
    pub done: u64,
    /// Sectors to re-encrypt: the extent.
    pub total: u64,
    /// The epoch the rotation moves to.
    pub new_epoch: u32,
}

/// Progress of [`Container::reencrypt`], after each batch.
#[derive(Clone, Copy, Debug)]
pub struct RekeyProgress {
    pub done_sectors: u64,
    pub total_sectors: u64,
    /// Sectors re-encrypted by this call so far (not counting earlier runs).
    pub this_run_sectors: u64,
}

/// What [`Container::reencrypt`] did.
#[derive(Clone, Debug, Default)]
pub struct ReencryptReport {
    /// Sectors re-sealed under the new key by this call.
    pub resealed: u64,
    /// Sectors found already under the new key (a batch a crash interrupted).
    pub already_new: u64,
    /// Torn sectors of an interrupted batch rebuilt from the journal.
    pub from_journal: u64,
    /// Sectors that open under neither key (damaged before the rotation, as
    /// reads of them reported): left as they are.
    pub damaged: Vec<u64>,
    /// Sectors the header lists as never sealed (FORMAT.md §4.2): nothing
    /// to re-encrypt, left as they are.
    pub unsealed: u64,
}

/// How each key slot is carried over to the new master key by
/// [`Container::finish_rekey`]. Every slot in use needs exactly one.
pub enum SlotCarry {
    /// Wrap the new master key in this slot now (the authorising slot, whose
    /// KEK the session could derive afresh). Keeps the slot's flags.
    Rewrap(NewSlot),
    /// Leave the slot's wrapping of the old key and add a link to the new
    /// key that only the slot's card can open (FORMAT.md §7.4).
    Link {
        index: u8,
        /// The ephemeral public key of a fresh ECDH share with the slot's card key.
        ephemeral_public: [u8; PUBLIC_KEY_LEN],
        /// That share's secret (what the card computes at activation).
        secret: SecretBytes,
    },
    /// Empty the slot (a recovery key whose key was not given).
    Remove(u8),
}

impl SlotCarry {
    fn index(&self) -> u8 {
        match self {
            SlotCarry::Rewrap(s) => s.index,
            SlotCarry::Link { index, .. } | SlotCarry::Remove(index) => *index,
        }
    }
}

// ------------------------------------------------------- the record ----

struct Record {
    watermark: u64,
    batch: u64,
    journal_hash: [u8; 32],
    new_seals: u64,
    nonce: [u8; NONCE_LEN],
    wrapped: [u8; WRAPPED_LEN],
}

fn record(h: &Header) -> Option<Record> {
    if !h.rekeying {
        return None;
    }
    let r = &h.reserved[..REKEY_RECORD_LEN];
    Some(Record {
        watermark: get_u64(r, R_WATERMARK),
        batch: get_u64(r, R_BATCH),
        journal_hash: r[R_JOURNAL_HASH..R_JOURNAL_HASH + 32]
            .try_into()
            .expect("32"),
        new_seals: get_u64(r, R_NEW_SEALS),
        nonce: r[R_NONCE..R_NONCE + NONCE_LEN].try_into().expect("12"),
        wrapped: r[R_WRAPPED..R_WRAPPED + WRAPPED_LEN]
            .try_into()
            .expect("48"),
    })
}

fn set_record(h: &mut Header, rec: &Record) {
    h.rekeying = true;
    let r = &mut h.reserved[..REKEY_RECORD_LEN];
    r.fill(0);
    r[R_WATERMARK..R_WATERMARK + 8].copy_from_slice(&rec.watermark.to_le_bytes());
    r[R_BATCH..R_BATCH + 8].copy_from_slice(&rec.batch.to_le_bytes());
    r[R_JOURNAL_HASH..R_JOURNAL_HASH + 32].copy_from_slice(&rec.journal_hash);
    r[R_NEW_SEALS..R_NEW_SEALS + 8].copy_from_slice(&rec.new_seals.to_le_bytes());
    r[R_NONCE..R_NONCE + NONCE_LEN].copy_from_slice(&rec.nonce);
    r[R_WRAPPED..R_WRAPPED + WRAPPED_LEN].copy_from_slice(&rec.wrapped);
}

/// End the rotation in `h`: the record's bytes become random again, so no
/// copy of the new key under the old one stays in the header.
fn clear_record(h: &mut Header) -> Result<(), CryptoError> {
    h.rekeying = false;
    fill_random(&mut h.reserved[..REKEY_RECORD_LEN])
}

/// Range checks on the rekey fields of a parsed header copy (a copy failing
/// them counts as damaged, FORMAT.md §1.1).
pub(crate) fn check_header(h: &Header) -> Result<(), String> {
    for i in 0..SLOT_COUNT {
        if h.pending & (1 << i) != 0 && h.slot_bytes(i)[S_KIND] != SLOT_KIND_TOKEN {
            return Err(format!(
                "slot {i} awaits activation but is not a token slot"
            ));
        }
    }
    let Some(rec) = record(h) else {
        return Ok(());
    };
    if h.pending != 0 {
        return Err("slots await activation during a rekey".into());
    }
    if h.epoch == u32::MAX {
        return Err("no key epoch left for a rekey".into());
    }
    let reserved_zero = h.reserved[R_RESERVED].iter().all(|&b| b == 0);
    let in_range = rec.batch <= REKEY_MAX_BATCH
        && rec
            .watermark
            .checked_add(rec.batch)
            .is_some_and(|end| end <= h.extent)
        && rec.new_seals <= SEAL_LIMIT;
    if !reserved_zero || !in_range {
        return Err("rekey record out of range".into());
    }
    Ok(())
}

// ------------------------------------------------------ derivations ----

/// HKDF-SHA256 to 32 bytes, into locked memory.
fn hkdf32(ikm: &[u8], salt: &[u8], info: &[u8]) -> Result<SecretBytes, CryptoError> {
    struct Len32;
    impl ring::hkdf::KeyType for Len32 {
        fn len(&self) -> usize {
            KEY_LEN
        }
    }
    let mut out = SecretBytes::zeroed(KEY_LEN)?;
    let info = [info];
    let result = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, salt)
        .extract(ikm)
        .expand(&info, Len32)
        .and_then(|okm| okm.fill(out.as_mut()));
    crate::secrets::scrub_stack();
    result.map_err(|_| CryptoError::Random)?;
    Ok(out)
}

/// K_link = HKDF-SHA256(ikm = old MK, salt = container id,
/// info = "keybound v1 rekey link" ‖ new epoch).
fn link_key(
    old: &MasterKey,
    id: &[u8; CONTAINER_ID_LEN],
    new_epoch: u32,
) -> Result<SecretBytes, CryptoError> {
    let mut info = REKEY_LINK_LABEL.to_vec();
    info.extend_from_slice(&new_epoch.to_le_bytes());
    hkdf32(old.expose(), id, &info)
}

fn record_aad(id: &[u8; CONTAINER_ID_LEN], new_epoch: u32) -> Vec<u8> {
    let mut aad = REKEY_RECORD_LABEL.to_vec();
    aad.extend_from_slice(id);
    aad.extend_from_slice(&new_epoch.to_le_bytes());
    aad
}

/// A slot link's key: HKDF-SHA256(ikm = S' ‖ K_link, salt = the slot's salt,
/// info = "keybound v1 slot link" ‖ id ‖ index ‖ new epoch).
fn slot_link_kek(
    share: &[u8],
    k_link: &SecretBytes,
    slot_bytes: &[u8],
    id: &[u8; CONTAINER_ID_LEN],
    index: u8,
    epoch: u32,
) -> Result<SecretBytes, CryptoError> {
    let mut ikm = SecretBytes::zeroed(share.len() + KEY_LEN)?;
    ikm.as_mut()[..share.len()].copy_from_slice(share);
    ikm.as_mut()[share.len()..].copy_from_slice(k_link.expose());
    let mut info = SLOT_LINK_LABEL.to_vec();
    info.extend_from_slice(id);
    info.push(index);
    info.extend_from_slice(&epoch.to_le_bytes());
    hkdf32(ikm.expose(), &slot_bytes[S_SALT..S_SALT + 32], &info)
}

/// A link's AAD: label ‖ id ‖ index ‖ epoch ‖ the slot's bytes up to its
/// tail (metadata and old wrapping) ‖ the link's ephemeral public key.
fn slot_link_aad(id: &[u8; CONTAINER_ID_LEN], index: u8, epoch: u32, slot_bytes: &[u8]) -> Vec<u8> {
    let mut aad = SLOT_LINK_LABEL.to_vec();
    aad.extend_from_slice(id);
    aad.push(index);
    aad.extend_from_slice(&epoch.to_le_bytes());
    aad.extend_from_slice(&slot_bytes[..S_RESERVED_TAIL]);
    aad.extend_from_slice(&slot_bytes[S_LINK_EPHEMERAL..S_LINK_EPHEMERAL + PUBLIC_KEY_LEN]);
    aad
}

fn sector_aad(id: &[u8; CONTAINER_ID_LEN], epoch: u32, sector: u64) -> [u8; SECTOR_AAD_LEN] {
    let mut aad = [0u8; SECTOR_AAD_LEN];
    let l = SECTOR_AAD_LABEL.len();
    aad[..l].copy_from_slice(SECTOR_AAD_LABEL);
    aad[l..l + CONTAINER_ID_LEN].copy_from_slice(id);
    aad[l + CONTAINER_ID_LEN..l + CONTAINER_ID_LEN + 4].copy_from_slice(&epoch.to_le_bytes());
    aad[l + CONTAINER_ID_LEN + 4..].copy_from_slice(&sector.to_le_bytes());
    aad
}

/// One epoch's sector key, for opening and sealing whole sealed sectors.
struct EpochCipher {
    cipher: SectorCipher,
    id: [u8; CONTAINER_ID_LEN],
    epoch: u32,
}

impl EpochCipher {
    fn new(mk: &MasterKey, id: [u8; CONTAINER_ID_LEN], epoch: u32) -> Result<Self, CryptoError> {
        Ok(EpochCipher {
            cipher: SectorCipher::new(&mk.derive(KeyPurpose::SectorEncryption, &id)?)?,
            id,
            epoch,
        })
    }

    /// Whether the sealed sector authenticates under this key (the plaintext
    /// is left in `plain` on success; `sealed` is not changed).
    fn open(&self, sector: u64, sealed: &[u8], plain: &mut [u8]) -> bool {
        let nonce: [u8; NONCE_LEN] = sealed[..NONCE_LEN].try_into().expect("nonce");
        let tag: [u8; TAG_LEN] = sealed[NONCE_LEN + SECTOR_SIZE..].try_into().expect("tag");
        plain.copy_from_slice(&sealed[NONCE_LEN..NONCE_LEN + SECTOR_SIZE]);
        self.cipher
            .open_in_place(
                &nonce,
                &sector_aad(&self.id, self.epoch, sector),
                plain,
                &tag,
            )
            .is_ok()
    }

    /// Seal `plain` as `sector` with `nonce` into `out` (nonce ‖ ct ‖ tag).
    fn seal(
        &self,
        sector: u64,
        nonce: &[u8],
        plain: &[u8],
        out: &mut [u8],
    ) -> Result<(), CryptoError> {
        let nonce: [u8; NONCE_LEN] = nonce.try_into().expect("nonce");
        out[..NONCE_LEN].copy_from_slice(&nonce);
        let body = &mut out[NONCE_LEN..NONCE_LEN + SECTOR_SIZE];
        body.copy_from_slice(plain);
        let tag =
            self.cipher
                .seal_in_place(&nonce, &sector_aad(&self.id, self.epoch, sector), body)?;
        out[NONCE_LEN + SECTOR_SIZE..].copy_from_slice(&tag);
        Ok(())
    }
}

/// What became of one sector of a batch.
enum Outcome {
    Resealed,
    AlreadyNew,
    FromJournal,
    Damaged,
    Unsealed,
}

/// The rotation `h` records, if any.
pub(crate) fn status(h: &Header) -> Option<RekeyStatus> {
    record(h).map(|r| RekeyStatus {
        done: r.watermark,
        total: h.extent,
        new_epoch: h.epoch + 1,
    })
}

impl Container {
    /// The rotation in progress, if one was interrupted.
    pub fn rekey_status(&self) -> Option<RekeyStatus> {
        status(&self.header)
    }

    /// Key slots that await activation by their owners after a rotation.
    pub fn pending_slots(&self) -> Vec<u8> {
        (0..SLOT_COUNT as u8)
            .filter(|i| self.header.pending & (1 << i) != 0)
            .collect()
    }

    /// A pending slot's link ephemeral public key (the card's ECDH peer at
    /// activation).
    pub fn link_ephemeral(&self, index: u8) -> Option<[u8; PUBLIC_KEY_LEN]> {
        if usize::from(index) >= SLOT_COUNT || self.header.pending & (1 << index) == 0 {
            return None;
        }
        let b = self.header.slot_bytes(usize::from(index));
        b[S_LINK_EPHEMERAL..S_LINK_EPHEMERAL + PUBLIC_KEY_LEN]
            .try_into()
            .ok()
    }

    fn refuse(&self, reason: impl Into<String>) -> ContainerError {
        ContainerError::RekeyRefused {
            path: self.path.clone(),
            reason: reason.into(),
        }
    }

    /// Write `header` (MAC'd with `mac`) to the older copy; `self` then
    /// reflects it. The descriptor (and its lock) is kept.
    fn write_and_reload(
        &mut self,
        writer: &mut HeaderWriter,
        header: &mut Header,
        mac: &HeaderMac,
    ) -> Result<(), ContainerError> {
        writer
            .write(&self.file, header, mac)
            .map_err(io_err(&self.path, "write the header of"))?;
        self.reload()
    }

    /// Start a rotation: a new master key, sealed under the link key of
    /// `old` in a rekey record written to both header copies (so that even
    /// a copy damaged later leaves one that knows about the rotation). No
    /// sector is touched yet. Returns the new master key.
    pub fn begin_rekey(&mut self, old: &MasterKey) -> Result<MasterKey, ContainerError> {
        if self.access == Access::ReadOnly {
            return Err(ContainerError::ReadOnly {
                path: self.path.clone(),
            });
        }
        if self.header.rekeying {
            return Err(self.refuse("a rotation is in progress already; resume it"));
        }
        if self.header.pending != 0 {
            return Err(self.refuse(format!(
                "key slot(s) {:?} still await activation after the previous rotation; their \
                 owners activate them with `keybound rekey --activate`, or revoke them first",
                self.pending_slots()
            )));
        }
        if self.header.epoch == u32::MAX {
            return Err(self.refuse("its key epoch counter is exhausted"));
        }
        if self.header.extent > SEAL_LIMIT {
            return Err(self.refuse(
                "it has more sectors than one key may seal with random nonces (FORMAT.md §4.6)",
            ));
        }
        let (mac, mut writer) = self.verify(old)?;
        let new = MasterKey::generate()?;
        let new_epoch = self.header.epoch + 1;
        let nonce = random_nonce()?;
        let k_link = link_key(old, &self.header.id, new_epoch)?;
        let wrapped = aead::seal(
            &k_link,
            &nonce,
            &record_aad(&self.header.id, new_epoch),
            new.expose(),
        )?;
        let rec = Record {
            watermark: 0,
            batch: 0,
            journal_hash: [0; 32],
            new_seals: 0,
            nonce,
            wrapped: wrapped.as_slice().try_into().expect("48 bytes"),
        };
        let mut header = self.header.clone();
        set_record(&mut header, &rec);
        for _ in 0..2 {
            self.write_and_reload(&mut writer, &mut header, &mac)?;
        }
        Ok(new)
    }

    /// The new master key of the rotation in progress, from the old one.
    pub fn rekey_new_key(&self, old: &MasterKey) -> Result<MasterKey, ContainerError> {
        let rec = record(&self.header).ok_or_else(|| self.refuse("no rotation is in progress"))?;
        self.verify(old)?;
        let new_epoch = self.header.epoch + 1;
        let k_link = link_key(old, &self.header.id, new_epoch)?;
        let secret = aead::open(
            &k_link,
            &rec.nonce,
            &record_aad(&self.header.id, new_epoch),
            &rec.wrapped,
        )
        .map_err(|_| ContainerError::HeaderMac {
            path: self.path.clone(),
        })?;
        Ok(MasterKey::from_secret(secret)?)
    }

    /// Where the journal of a batch lives: just past the data area.
    fn journal_offset(&self) -> u64 {
        file_len_for_sectors(self.header.extent.max(self.header.capacity))
    }

    /// Re-encrypt every sector from the watermark on under `new`, in batches
    /// of `batch` sectors (at most [`REKEY_MAX_BATCH`]), calling `progress`
    /// after each. Resumes an interrupted batch first. Afterwards the
    /// watermark is the extent, durably; [`Self::finish_rekey`] completes.
    pub fn reencrypt(
        &mut self,
        old: &MasterKey,
        new: &MasterKey,
        batch: u64,
        progress: &mut dyn FnMut(RekeyProgress),
    ) -> Result<ReencryptReport, ContainerError> {
        let mut rec =
            record(&self.header).ok_or_else(|| self.refuse("no rotation is in progress"))?;
        let batch = batch.clamp(1, REKEY_MAX_BATCH);
        let (mac, mut writer) = self.verify(old)?;
        let id = self.header.id;
        let old_c = EpochCipher::new(old, id, self.header.epoch)?;
        let new_c = EpochCipher::new(new, id, self.header.epoch + 1)?;
        let extent = self.header.extent;
        let unsealed: RangeSet = self.header.unsealed.iter().copied().collect();
        let journal_at = self.journal_offset();
        let mut header = self.header.clone();
        let mut report = ReencryptReport::default();
        let path = self.path.clone();
        let io = |op: &'static str| io_err(&path, op);

        // An interrupted batch: its sectors are old, new or torn.
        if rec.batch > 0 {
            // Its seals may have been spent already: reserve them again first.
            rec.new_seals = self.reserve(rec.new_seals, rec.batch)?;
            set_record(&mut header, &rec);
            self.write_and_reload(&mut writer, &mut header, &mac)?;
            let len = rec.batch as usize * SEALED_SECTOR_SIZE;
            let mut journal = vec![0u8; len];
            let journal_ok = self.file.read_exact_at(&mut journal, journal_at).is_ok()
                && Sha256::digest(&journal).as_slice() == rec.journal_hash;
            let journal = journal_ok.then_some(journal);
            let mut buf = vec![0u8; len];
            self.file
                .read_exact_at(&mut buf, sector_offset(rec.watermark))
                .map_err(io("read"))?;
            let outcomes = convert(
                &old_c,
                &new_c,
                &unsealed,
                rec.watermark,
                &mut buf,
                journal.as_deref(),
            )?;
            tally(&mut report, rec.watermark, &outcomes);
            self.file
                .write_all_at(&buf, sector_offset(rec.watermark))
                .and_then(|()| self.file.sync_data())
                .map_err(io("write"))?;
            buf.zeroize();
            rec.watermark += rec.batch;
            rec.batch = 0;
        }

        let mut this_run = 0;
        let mut buf = Vec::new();
        while rec.watermark < extent {
            let n = batch.min(extent - rec.watermark);
            let at = sector_offset(rec.watermark);
            buf.resize(n as usize * SEALED_SECTOR_SIZE, 0);
            self.file.read_exact_at(&mut buf, at).map_err(io("read"))?;
            // 1. The journal: the batch's old ciphertext, durable first.
            self.file
                .write_all_at(&buf, journal_at)
                .and_then(|()| self.file.sync_data())
                .map_err(io("write the rekey journal of"))?;
            // 2. The header names the batch, its journal and its seals.
            rec.new_seals = self.reserve(rec.new_seals, n)?;
            rec.batch = n;
            rec.journal_hash = Sha256::digest(&buf).into();
            set_record(&mut header, &rec);
            self.write_and_reload(&mut writer, &mut header, &mac)?;
            // 3. The batch in place, under the new key.
            let outcomes = convert(&old_c, &new_c, &unsealed, rec.watermark, &mut buf, None)?;
            tally(&mut report, rec.watermark, &outcomes);
            self.file
                .write_all_at(&buf, at)
                .and_then(|()| self.file.sync_data())
                .map_err(io("write"))?;
            rec.watermark += n;
            rec.batch = 0;
            this_run += n;
            progress(RekeyProgress {
                done_sectors: rec.watermark,
                total_sectors: extent,
                this_run_sectors: this_run,
            });
        }
        buf.zeroize();
        // Durably done: the watermark at the extent, no batch in flight.
        set_record(&mut header, &rec);
        self.write_and_reload(&mut writer, &mut header, &mac)?;
        Ok(report)
    }

    /// Count `n` more seals under the new key, refusing past the limit.
    fn reserve(&self, seals: u64, n: u64) -> Result<u64, ContainerError> {
        let needed = seals + n;
        if needed > SEAL_LIMIT {
            return Err(ContainerError::SealBudget {
                path: self.path.clone(),
                seals,
            });
        }
        Ok(needed)
    }

    /// Complete the rotation once every sector is under the new key: the new
    /// epoch, the slots carried over as `carry` says (every slot in use
    /// exactly once), the record erased, the header MAC'd with `new` — in
    /// both copies, so no copy keeps the new key sealed under the old one.
    /// Then the journal past the data area is cut off.
    pub fn finish_rekey(
        &mut self,
        old: &MasterKey,
        new: &MasterKey,
        carry: Vec<SlotCarry>,
    ) -> Result<(), ContainerError> {
        let rec = record(&self.header).ok_or_else(|| self.refuse("no rotation is in progress"))?;
        if rec.watermark != self.header.extent || rec.batch != 0 {
            return Err(self.refuse("not every sector is re-encrypted yet"));
        }
        let (_, mut writer) = self.verify(old)?;
        let mut used: Vec<u8> = self.info.slots.iter().map(|s| s.index).collect();
        let mut header = self.header.clone();
        let id = header.id;
        let new_epoch = header.epoch + 1;
        let k_link = link_key(old, &id, new_epoch)?;
        let mut pending = 0u8;
        for c in carry {
            let index = c.index();
            let Some(pos) = used.iter().position(|&i| i == index) else {
                return Err(self.refuse(format!("key slot {index} is not in use or named twice")));
            };
            used.remove(pos);
            let current = header.slot_bytes(usize::from(index)).to_vec();
            let bytes = match c {
                SlotCarry::Rewrap(slot) => {
                    let flags = slot::decode(index, &current)
                        .ok()
                        .flatten()
                        .map(|s| s.flags)
                        .unwrap_or_default();
                    slot::encode_with_flags(&id, &slot, new, super::now_unix(), flags)?
                }
                SlotCarry::Remove(_) => slot::empty()?,
                SlotCarry::Link {
                    ephemeral_public,
                    secret,
                    ..
                } => {
                    if current[S_KIND] != SLOT_KIND_TOKEN {
                        return Err(self.refuse(format!("key slot {index} is not a token slot")));
                    }
                    let mut b = current;
                    fill_random(&mut b[S_RESERVED_TAIL..])?;
                    b[S_LINK_EPHEMERAL..S_LINK_EPHEMERAL + PUBLIC_KEY_LEN]
                        .copy_from_slice(&ephemeral_public);
                    let kek = slot_link_kek(secret.expose(), &k_link, &b, &id, index, new_epoch)?;
                    let nonce = random_nonce()?;
                    let aad = slot_link_aad(&id, index, new_epoch, &b);
                    let wrapped = aead::seal(&kek, &nonce, &aad, new.expose())?;
                    b[S_LINK_NONCE..S_LINK_NONCE + NONCE_LEN].copy_from_slice(&nonce);
                    b[S_LINK_WRAPPED..S_LINK_WRAPPED + WRAPPED_LEN].copy_from_slice(&wrapped);
                    pending |= 1 << index;
                    b
                }
            };
            header.set_slot_bytes(usize::from(index), &bytes);
        }
        if !used.is_empty() {
            return Err(self.refuse(format!(
                "key slot(s) {used:?} would keep only the old master key"
            )));
        }
        header.epoch = new_epoch;
        header.seal_reserve = rec.new_seals;
        header.pending = pending;
        clear_record(&mut header)?;
        let mac = mac_for(new, &id)?;
        for _ in 0..2 {
            self.write_and_reload(&mut writer, &mut header, &mac)?;
        }
        self.cut_journal()
    }

    /// Cut off anything past the data area (a rekey journal holds old
    /// ciphertext of the last batch).
    pub(crate) fn cut_journal(&mut self) -> Result<(), ContainerError> {
        let end = self.header.required_file_len();
        let len = self
            .file
            .metadata()
            .map_err(io_err(&self.path, "stat"))?
            .len();
        if len > end && !self.header.rekeying {
            self.file
                .set_len(end)
                .and_then(|()| self.file.sync_all())
                .map_err(io_err(&self.path, "truncate"))?;
            self.reload()?;
        }
        Ok(())
    }

    /// Make sure both header copies authenticate under `mk`, rewriting the
    /// other one if not (e.g. a crash between the two final writes of a
    /// rotation left the old in-progress copy), and cut a leftover journal.
    pub fn settle_header(&mut self, mk: &MasterKey) -> Result<(), ContainerError> {
        let (mac, mut writer) = self.verify(mk)?;
        if !writer.both_valid() {
            let mut header = self.header.clone();
            self.write_and_reload(&mut writer, &mut header, &mac)?;
        }
        self.cut_journal()
    }

    /// Activate pending slot `index` after a rotation: `kek` is the slot's
    /// own KEK (card ECDH with its ephemeral key + password), `link_secret`
    /// the card's ECDH with the link's ephemeral key. The slot is re-sealed
    /// with the new master key under the same KEK (both header copies), and
    /// the new master key returned.
    pub fn activate_slot(
        &mut self,
        index: u8,
        kek: &SecretBytes,
        link_secret: &SecretBytes,
    ) -> Result<MasterKey, ContainerError> {
        if self.link_ephemeral(index).is_none() {
            return Err(self.refuse(format!("key slot {index} does not await activation")));
        }
        let unwrap_failed = || ContainerError::SlotUnwrap {
            path: self.path.clone(),
            index,
        };
        let id = self.header.id;
        let epoch = self.header.epoch;
        let bytes = self.header.slot_bytes(usize::from(index)).to_vec();
        let old = slot::unwrap(&id, index, &bytes, kek).map_err(|_| unwrap_failed())?;
        let k_link = link_key(&old, &id, epoch)?;
        drop(old);
        let link_kek = slot_link_kek(link_secret.expose(), &k_link, &bytes, &id, index, epoch)?;
        let nonce: [u8; NONCE_LEN] = bytes[S_LINK_NONCE..S_LINK_NONCE + NONCE_LEN]
            .try_into()
            .expect("12");
        let secret = aead::open(
            &link_kek,
            &nonce,
            &slot_link_aad(&id, index, epoch, &bytes),
            &bytes[S_LINK_WRAPPED..S_LINK_WRAPPED + WRAPPED_LEN],
        )
        .map_err(|_| unwrap_failed())?;
        let new = MasterKey::from_secret(secret)?;
        let fresh = slot::reseal(&id, index, &bytes, kek, &new)?;
        let (mac, mut writer) = self.verify(&new)?;
        let mut header = self.header.clone();
        header.set_slot_bytes(usize::from(index), &fresh);
        header.pending &= !(1 << index);
        for _ in 0..2 {
            self.write_and_reload(&mut writer, &mut header, &mac)?;
        }
        Ok(new)
    }
}

/// Turn the sealed sectors `first..` in `buf` into sectors under the new
/// key, in place. A sector under the old key is re-sealed with a fresh
/// nonce; one under the new key already is kept; one opening under neither
/// is taken from `journal` (the batch's old ciphertext) if that opens, else
/// left as it is (damaged).
fn convert(
    old: &EpochCipher,
    new: &EpochCipher,
    unsealed: &RangeSet,
    first: u64,
    buf: &mut [u8],
    journal: Option<&[u8]>,
) -> Result<Vec<Outcome>, ContainerError> {
    let count = buf.len() / SEALED_SECTOR_SIZE;
    let mut nonces = vec![0u8; count * NONCE_LEN];
    fill_random(&mut nonces)?;
    let mut plain = SecretBytes::zeroed(SECTOR_SIZE)?;
    let mut outcomes = Vec::with_capacity(count);
    for (i, sealed) in buf.chunks_mut(SEALED_SECTOR_SIZE).enumerate() {
        let sector = first + i as u64;
        let nonce = &nonces[i * NONCE_LEN..(i + 1) * NONCE_LEN];
        let outcome = if unsealed.contains(sector) {
            Outcome::Unsealed
        } else if old.open(sector, sealed, plain.as_mut()) {
            new.seal(sector, nonce, plain.expose(), sealed)?;
            Outcome::Resealed
        } else if new.open(sector, sealed, plain.as_mut()) {
            Outcome::AlreadyNew
        } else if let Some(j) = journal
            && old.open(
                sector,
                &j[i * SEALED_SECTOR_SIZE..(i + 1) * SEALED_SECTOR_SIZE],
                plain.as_mut(),
            )
        {
            new.seal(sector, nonce, plain.expose(), sealed)?;
            Outcome::FromJournal
        } else {
            Outcome::Damaged
        };
        outcomes.push(outcome);
    }
    Ok(outcomes)
}

fn tally(report: &mut ReencryptReport, first: u64, outcomes: &[Outcome]) {
    for (i, o) in outcomes.iter().enumerate() {
        match o {
            Outcome::Resealed => report.resealed += 1,
            Outcome::AlreadyNew => report.already_new += 1,
            Outcome::FromJournal => {
                report.resealed += 1;
                report.from_journal += 1;
            }
            Outcome::Damaged => report.damaged.push(first + i as u64),
            Outcome::Unsealed => report.unsealed += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use redb::StorageBackend;

    use super::*;
    use crate::container::{NewSlotKind, SectorStore};
    use crate::crypto::SALT_LEN;

    const PAGES: u64 = 300;

    fn kek() -> SecretBytes {
        SecretBytes::from_slice(&[7; 32]).unwrap()
    }

    fn page(k: u64) -> Vec<u8> {
        (0..SECTOR_SIZE)
            .map(|i| (k as usize * 31 + i * 7) as u8)
            .collect()
    }

    /// A container whose store holds pages 1..=PAGES with known contents.
    fn vault(dir: &Path) -> std::path::PathBuf {
        let path = dir.join("v.kb");
        let (c, mk) = super::super::recovery_vault(&path, kek());
        let store = c.into_store(mk).unwrap();
        store.write(0, &[0u8; 320]).unwrap();
        for k in 1..=PAGES {
            store.write(k * SECTOR_SIZE as u64, &page(k)).unwrap();
        }
        store.close().unwrap();
        path
    }

    fn open(path: &Path) -> (Container, MasterKey) {
        let c = Container::open(path, Access::ReadWrite).unwrap();
        let mk = c.unwrap_slot(0, &kek()).unwrap();
        (c, mk)
    }

    fn check_pages(store: &SectorStore) {
        let mut buf = vec![0u8; SECTOR_SIZE];
        for k in 1..=PAGES {
            store.read(k * SECTOR_SIZE as u64, &mut buf).unwrap();
            assert!(buf == page(k), "page {k}");
        }
        assert_eq!(store.damaged_reads(), 0);
    }

    /// Run a rotation in batches of 32 and stop it (as a crash would) after
    /// `batches` batches: the header then names batch `batches - 1` in flight.
    fn interrupted(path: &Path, batches: u64) -> u64 {
        let (mut c, old) = open(path);
        let new = c.begin_rekey(&old).unwrap();
        let mut seen = 0;
        let stopped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            c.reencrypt(&old, &new, 32, &mut |_| {
                seen += 1;
                if seen == batches {
                    panic!("simulated crash");
                }
            })
        }));
        assert!(stopped.is_err());
        (batches - 1) * 32
    }

    /// Put the old ciphertext (from the journal) back into the first `n`
    /// sectors of the batch at `first`, as if its in-place write had only
    /// partly happened.
    fn undo_part_of_batch(path: &Path, first: u64, n: u64) {
        let c = Container::open(path, Access::ReadOnly).unwrap();
        let journal_at = c.journal_offset();
        drop(c);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .read(true)
            .open(path)
            .unwrap();
        let mut buf = vec![0u8; n as usize * SEALED_SECTOR_SIZE];
        file.read_exact_at(&mut buf, journal_at).unwrap();
        file.write_all_at(&buf, sector_offset(first)).unwrap();
    }

    fn finish(path: &Path) -> ReencryptReport {
        let (mut c, old) = open(path);
        assert!(c.rekey_status().is_some());
        let new = c.rekey_new_key(&old).unwrap();
        let report = c.reencrypt(&old, &new, 64, &mut |_| {}).unwrap();
        let slot = NewSlot {
            index: 0,
            label: String::new(),
            salt: [2; SALT_LEN],
            kind: NewSlotKind::Recovery,
            kek: kek(),
        };
        c.finish_rekey(&old, &new, vec![SlotCarry::Rewrap(slot)])
            .unwrap();
        assert_eq!(c.info().key_epoch, 1);
        report
    }

    #[test]
    fn a_torn_sector_of_the_batch_in_flight_comes_back_from_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let path = vault(dir.path());
        let first = interrupted(&path, 4);
        undo_part_of_batch(&path, first, 20);
        // Sector first + 5 is torn: neither key opens it.
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[0x55; 100], sector_offset(first + 5) + 2000)
            .unwrap();
        drop(file);
        {
            let (c, old) = open(&path);
            let err = c.into_store(old).unwrap_err();
            assert!(
                matches!(err, ContainerError::RekeyInProgress { .. }),
                "{err}"
            );
        }
        let report = finish(&path);
        assert_eq!(report.from_journal, 1);
        assert_eq!(report.already_new, 12);
        assert!(report.damaged.is_empty());
        let (c, mk) = open(&path);
        check_pages(&c.into_store(mk).unwrap());
    }

    /// Data segments (FORMAT.md §4.10) are sectors like any other: a rotation
    /// re-encrypts them, and the store's segments, interleaved with them,
    /// still read back. Gaps of a segment a crash left half written stay
    /// unsealed.
    #[test]
    fn a_rotation_re_encrypts_data_segments_and_keeps_the_segment_map() {
        const SEG: u64 = SEGMENT_SECTORS;
        let dir = tempfile::tempdir().unwrap();
        let path = vault(dir.path());
        let data = |seed: u64, n: u64| -> Vec<u8> { (0..n).flat_map(|k| page(seed + k)).collect() };
        let (d1, d2, far);
        {
            let (c, mk) = open(&path);
            let store = c.into_store(mk).unwrap();
            d1 = store.claim_data_segment().unwrap();
            store.write_data_sectors(d1, &data(1000, SEG)).unwrap();
            far = SEG + 10;
            store.set_len((far + 1) * SECTOR_SIZE as u64).unwrap();
            store.write(far * SECTOR_SIZE as u64, &page(far)).unwrap();
            d2 = store.claim_data_segment().unwrap();
            store.write_data_sectors(d2 + 3, &data(5000, 10)).unwrap();
            store.sync_data().unwrap();
            store.abandon(); // the rest of d2 stays a gap
        }
        let before = Container::inspect(&path).unwrap();
        assert!(before.store_segments.as_ref().is_some_and(|r| r.len() == 2));
        let (mut c, old) = open(&path);
        c.begin_rekey(&old).unwrap();
        drop(c);
        let report = finish(&path);
        assert!(report.damaged.is_empty());
        assert_eq!(report.unsealed, before.unsealed_sectors);
        let after = Container::inspect(&path).unwrap();
        assert_eq!(after.store_segments, before.store_segments);
        assert_eq!(after.version, FORMAT_VERSION);
        let (c, mk) = open(&path);
        let store = c.into_store(mk).unwrap();
        check_pages(&store);
        let mut buf = vec![0u8; SECTOR_SIZE];
        store.read(far * SECTOR_SIZE as u64, &mut buf).unwrap();
        assert!(buf == page(far));
        let mut out = vec![0u8; SEG as usize * SECTOR_SIZE];
        store.read_data_sectors(d1, &mut out).unwrap();
        assert!(out == data(1000, SEG));
        let mut out = vec![9u8; 16 * SECTOR_SIZE];
        store.read_data_sectors(d2, &mut out).unwrap();
        assert!(out[..3 * SECTOR_SIZE].iter().all(|&b| b == 0));
        assert!(out[3 * SECTOR_SIZE..13 * SECTOR_SIZE] == data(5000, 10)[..]);
        assert!(out[13 * SECTOR_SIZE..].iter().all(|&b| b == 0));
        assert_eq!(store.damaged_reads(), 0);
    }

    #[test]
    fn sectors_a_crash_left_unsealed_are_skipped_and_still_read_as_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let path = vault(dir.path());
        let far = PAGES + 1500;
        {
            let (c, mk) = open(&path);
            let store = c.into_store(mk).unwrap();
            store.set_len((far + 1) * SECTOR_SIZE as u64).unwrap();
            store.write(far * SECTOR_SIZE as u64, &page(far)).unwrap();
            store.sync_data().unwrap();
            store.abandon(); // a crash: the gap below `far` stays unsealed
        }
        let unsealed = Container::inspect(&path).unwrap().unsealed_sectors;
        assert!(unsealed > 1000, "{unsealed}");
        let (mut c, old) = open(&path);
        c.begin_rekey(&old).unwrap();
        drop(c);
        let report = finish(&path);
        assert_eq!(report.unsealed, unsealed);
        assert!(report.damaged.is_empty());
        let (c, mk) = open(&path);
        let store = c.into_store(mk).unwrap();
        check_pages(&store);
        let mut buf = vec![9u8; SECTOR_SIZE];
        store.read(far * SECTOR_SIZE as u64, &mut buf).unwrap();
        assert!(buf == page(far));
        store
            .read((PAGES + 700) * SECTOR_SIZE as u64, &mut buf)
            .unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        assert_eq!(store.damaged_reads(), 0);
    }

    #[test]
    fn the_older_header_copy_alone_still_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let path = vault(dir.path());
        let first = interrupted(&path, 5);
        undo_part_of_batch(&path, first, 10);
        // Damage the newest header copy: the older one names the batch before.
        let c = Container::open(&path, Access::ReadOnly).unwrap();
        let newest = match c.info().copy_used {
            super::super::HeaderCopy::A => 0,
            super::super::HeaderCopy::B => 1,
        };
        drop(c);
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[0xAA; 64], HEADER_COPY_OFFSETS[newest] + 500)
            .unwrap();
        drop(file);
        let report = finish(&path);
        assert!(report.damaged.is_empty());
        assert!(report.already_new >= 32, "{report:?}");
        let (c, mk) = open(&path);
        check_pages(&c.into_store(mk).unwrap());
    }

    #[test]
    fn the_old_key_opens_nothing_and_a_header_field_check() {
        let dir = tempfile::tempdir().unwrap();
        let path = vault(dir.path());
        let (c, old) = open(&path);
        let old_bytes = old.dangerous_export().to_vec();
        drop((c, old));
        let (mut c, old) = open(&path);
        let new = c.begin_rekey(&old).unwrap();
        assert!(c.begin_rekey(&old).is_err(), "one rotation at a time");
        c.reencrypt(&old, &new, 1024, &mut |_| {}).unwrap();
        // A slot left without a carry is refused.
        assert!(c.finish_rekey(&old, &new, vec![]).is_err());
        drop(c);
        finish(&path);
        let (c, mk) = open(&path);
        assert_ne!(mk.dangerous_export(), &old_bytes[..]);
        let id = c.info().id;
        let old = MasterKey::from_secret(SecretBytes::from_slice(&old_bytes).unwrap()).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let extent = c.info().extent_sectors;
        let mut plain = vec![0u8; SECTOR_SIZE];
        for epoch in [0, 1] {
            let cipher = EpochCipher::new(&old, id, epoch).unwrap();
            for s in 0..extent {
                let mut sealed = vec![0u8; SEALED_SECTOR_SIZE];
                file.read_exact_at(&mut sealed, sector_offset(s)).unwrap();
                assert!(!cipher.open(s, &sealed, &mut plain), "sector {s}");
            }
        }
        // The record is gone from both copies: no new key under the old one.
        let raw = std::fs::read(&path).unwrap();
        for copy in HEADER_COPY_OFFSETS {
            let flags = u32::from_le_bytes(raw[copy as usize + H_FLAGS..][..4].try_into().unwrap());
            assert_eq!(flags & FLAG_REKEY, 0);
        }
        assert!(c.rekey_new_key(&mk).is_err());
        check_pages(&c.into_store(mk).unwrap());
    }
}
