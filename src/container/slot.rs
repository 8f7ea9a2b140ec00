//! Key slots: the master key sealed under a key-encryption key (FORMAT.md §2).
//!
//! A slot's metadata (kind, token, public keys, salt, KDF parameters, label…)
//! is the AEAD's associated data, so changing any of it makes the unwrap fail
//! exactly like a wrong password does. Nothing here sees a password or a
//! card: the caller derives the KEK (`crypto::key_encryption_key` or
//! `crypto::recovery_kek`) and hands it in.

use serde::Serialize;

use super::error::ContainerError;
use super::layout::*;
use super::{fill_random, hexser};
use crate::crypto::{
    Argon2Params, CONTAINER_ID_LEN, CryptoError, KEY_LEN, MasterKey, NONCE_LEN, SALT_LEN, aead,
    random_nonce,
};
use crate::secrets::SecretBytes;

/// A key slot in use, as `keybound info` shows it. Nothing in it is secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SlotInfo {
    pub index: u8,
    pub kind: SlotKind,
    pub label: String,
    /// Unix seconds.
    pub created: u64,
    #[serde(with = "hexser")]
    pub salt: [u8; SALT_LEN],
    pub flags: SlotFlags,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum SlotKind {
    /// Opened by a PIV token (ECDH) and a password (Argon2id).
    Token {
        serial: u32,
        piv_slot: u8,
        #[serde(with = "hexser")]
        card_public: [u8; PUBLIC_KEY_LEN],
        #[serde(with = "hexser")]
        ephemeral_public: [u8; PUBLIC_KEY_LEN],
        argon: Argon2Params,
    },
    /// Opened by the 256-bit recovery key alone.
    Recovery,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SlotFlags {
    /// The password must be changed at the next mount (an admin set it).
    pub must_change_password: bool,
}

impl SlotFlags {
    fn to_byte(self) -> u8 {
        if self.must_change_password {
            SLOT_FLAG_CHANGE_PASSWORD
        } else {
            0
        }
    }
}

/// A slot to write: its metadata and the KEK it seals the master key under.
pub struct NewSlot {
    pub index: u8,
    pub label: String,
    pub salt: [u8; SALT_LEN],
    pub kind: NewSlotKind,
    /// From `crypto::key_encryption_key(.., slot_info(id, index))` or
    /// `crypto::recovery_kek(.., slot_info(id, index))`.
    pub kek: SecretBytes,
}

pub enum NewSlotKind {
    Token {
        serial: u32,
        piv_slot: u8,
        card_public: [u8; PUBLIC_KEY_LEN],
        ephemeral_public: [u8; PUBLIC_KEY_LEN],
        argon: Argon2Params,
    },
    Recovery,
}

/// An empty slot: kind 0, every other byte random, so the slot area does not
/// show a pattern of zeros where slots are unused.
pub(crate) fn empty() -> Result<Vec<u8>, ContainerError> {
    let mut bytes = vec![0u8; SLOT_SIZE];
    fill_random(&mut bytes)?;
    bytes[S_KIND] = SLOT_KIND_EMPTY;
    Ok(bytes)
}

fn check_new(slot: &NewSlot) -> Result<(), ContainerError> {
    let bad = |m: String| Err(ContainerError::InvalidSlot(m));
    if usize::from(slot.index) >= SLOT_COUNT {
        return bad(format!(
            "slot index {} is out of range 0..{SLOT_COUNT}",
            slot.index
        ));
    }
    if slot.label.len() > LABEL_LEN {
        return bad(format!(
            "the label is {} bytes long; at most {LABEL_LEN} fit",
            slot.label.len()
        ));
    }
    if slot.label.contains('\0') {
        return bad("the label contains a NUL character".into());
    }
    if let NewSlotKind::Token {
        piv_slot,
        card_public,
        ephemeral_public,
        ..
    } = &slot.kind
    {
        if !PIV_RETIRED_SLOTS.contains(piv_slot) {
            return bad(format!(
                "PIV slot {piv_slot:#04x} is not a retired key slot (0x82-0x95)"
            ));
        }
        if card_public[0] != 4 || ephemeral_public[0] != 4 {
            return bad("public keys must be SEC1 uncompressed points".into());
        }
    }
    Ok(())
}

/// The associated data of slot `index`: label ‖ container id ‖ index ‖
/// slot bytes 0..264.
fn aad(id: &[u8; CONTAINER_ID_LEN], index: u8, slot: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(SLOT_AAD_LABEL.len() + CONTAINER_ID_LEN + 1 + S_METADATA_END);
    aad.extend_from_slice(SLOT_AAD_LABEL);
    aad.extend_from_slice(id);
    aad.push(index);
    aad.extend_from_slice(&slot[..S_METADATA_END]);
    aad
}

/// Encode `slot` with `mk` sealed under its KEK. The reserved tail is random.
pub(crate) fn encode(
    id: &[u8; CONTAINER_ID_LEN],
    slot: &NewSlot,
    mk: &MasterKey,
    created: u64,
) -> Result<Vec<u8>, ContainerError> {
    encode_with_flags(id, slot, mk, created, SlotFlags::default())
}

/// [`encode`] with `flags` (e.g. a temporary password set by an admin). The
/// flags byte is in the AAD, so it cannot be cleared without the KEK.
pub(crate) fn encode_with_flags(
    id: &[u8; CONTAINER_ID_LEN],
    slot: &NewSlot,
    mk: &MasterKey,
    created: u64,
    flags: SlotFlags,
) -> Result<Vec<u8>, ContainerError> {
    check_new(slot)?;
    let mut b = vec![0u8; SLOT_SIZE];
    fill_random(&mut b[S_RESERVED_TAIL..])?;
    match &slot.kind {
        NewSlotKind::Token {
            serial,
            piv_slot,
            card_public,
            ephemeral_public,
            argon,
        } => {
            b[S_KIND] = SLOT_KIND_TOKEN;
            put_u32(&mut b, S_SERIAL, *serial);
            b[S_PIV_SLOT] = *piv_slot;
            b[S_CARD_PUBLIC..][..PUBLIC_KEY_LEN].copy_from_slice(card_public);
            b[S_EPHEMERAL_PUBLIC..][..PUBLIC_KEY_LEN].copy_from_slice(ephemeral_public);
            put_u32(&mut b, S_ARGON, argon.memory_kib);
            put_u32(&mut b, S_ARGON + 4, argon.iterations);
            put_u32(&mut b, S_ARGON + 8, argon.parallelism);
        }
        NewSlotKind::Recovery => b[S_KIND] = SLOT_KIND_RECOVERY,
    }
    b[S_FLAGS] = flags.to_byte();
    b[S_SALT..][..SALT_LEN].copy_from_slice(&slot.salt);
    b[S_CREATED..][..8].copy_from_slice(&created.to_le_bytes());
    b[S_LABEL..][..slot.label.len()].copy_from_slice(slot.label.as_bytes());
    let nonce = random_nonce()?;
    let wrapped = aead::seal(&slot.kek, &nonce, &aad(id, slot.index, &b), mk.expose())?;
    debug_assert_eq!(wrapped.len(), WRAPPED_LEN);
    b[S_NONCE..][..NONCE_LEN].copy_from_slice(&nonce);
    b[S_WRAPPED..][..WRAPPED_LEN].copy_from_slice(&wrapped);
    Ok(b)
}

/// Parse slot `index`: `Ok(None)` for an empty slot, `Err(reason)` for bytes
/// no keybound ever writes (the header copy then counts as damaged).
pub(crate) fn decode(index: u8, b: &[u8]) -> Result<Option<SlotInfo>, String> {
    if b.len() != SLOT_SIZE {
        return Err(format!("slot {index} is {} bytes", b.len()));
    }
    let kind = match b[S_KIND] {
        SLOT_KIND_EMPTY => return Ok(None),
        SLOT_KIND_TOKEN => decode_token(index, b)?,
        SLOT_KIND_RECOVERY => {
            let token_fields = S_SERIAL..S_RESERVED_3.end;
            let argon = S_ARGON..S_ARGON + 12;
            if b[token_fields].iter().chain(&b[argon]).any(|&x| x != 0) {
                return Err(format!("recovery slot {index} has token fields set"));
            }
            SlotKind::Recovery
        }
        other => return Err(format!("slot {index} has unknown kind {other}")),
    };
    let flags = b[S_FLAGS];
    if flags & !SLOT_FLAG_CHANGE_PASSWORD != 0 {
        return Err(format!("slot {index} has unknown flags {flags:#04x}"));
    }
    if b[S_RESERVED_1]
        .iter()
        .chain(&b[S_RESERVED_2])
        .any(|&x| x != 0)
        || b[S_RESERVED_3].iter().any(|&x| x != 0)
    {
        return Err(format!("slot {index} has non-zero reserved bytes"));
    }
    Ok(Some(SlotInfo {
        index,
        kind,
        label: decode_label(index, &b[S_LABEL..S_LABEL + LABEL_LEN])?,
        created: get_u64(b, S_CREATED),
        salt: b[S_SALT..S_SALT + SALT_LEN]
            .try_into()
            .expect("fixed length"),
        flags: SlotFlags {
            must_change_password: flags & SLOT_FLAG_CHANGE_PASSWORD != 0,
        },
    }))
}

fn decode_token(index: u8, b: &[u8]) -> Result<SlotKind, String> {
    let piv_slot = b[S_PIV_SLOT];
    if !PIV_RETIRED_SLOTS.contains(&piv_slot) {
        return Err(format!(
            "slot {index} names PIV slot {piv_slot:#04x}, not a retired key slot"
        ));
    }
    let key = |at: usize| -> Result<[u8; PUBLIC_KEY_LEN], String> {
        let key: [u8; PUBLIC_KEY_LEN] = b[at..at + PUBLIC_KEY_LEN].try_into().expect("length");
        if key[0] == 4 {
            Ok(key)
        } else {
            Err(format!(
                "slot {index} has a public key that is not SEC1 uncompressed"
            ))
        }
    };
    Ok(SlotKind::Token {
        serial: get_u32(b, S_SERIAL),
        piv_slot,
        card_public: key(S_CARD_PUBLIC)?,
        ephemeral_public: key(S_EPHEMERAL_PUBLIC)?,
        argon: Argon2Params {
            memory_kib: get_u32(b, S_ARGON),
            iterations: get_u32(b, S_ARGON + 4),
            parallelism: get_u32(b, S_ARGON + 8),
        },
    })
}

/// UTF-8, zero-padded: the label is everything before the first NUL, and
/// everything after it must be NUL too.
fn decode_label(index: u8, raw: &[u8]) -> Result<String, String> {
    let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
    if raw[end..].iter().any(|&c| c != 0) {
        return Err(format!("slot {index} has a label with bytes after its end"));
    }
    String::from_utf8(raw[..end].to_vec())
        .map_err(|_| format!("slot {index} has a non-UTF-8 label"))
}

/// Unseal the master key from slot `index` with `kek`. A wrong KEK and a
/// tampered slot both fail with [`CryptoError::Authentication`].
pub(crate) fn unwrap(
    id: &[u8; CONTAINER_ID_LEN],
    index: u8,
    b: &[u8],
    kek: &SecretBytes,
) -> Result<MasterKey, CryptoError> {
    let nonce: [u8; NONCE_LEN] = b[S_NONCE..S_NONCE + NONCE_LEN].try_into().expect("length");
    let secret = aead::open(
        kek,
        &nonce,
        &aad(id, index, b),
        &b[S_WRAPPED..S_WRAPPED + WRAPPED_LEN],
    )?;
    debug_assert_eq!(secret.len(), KEY_LEN);
    MasterKey::from_secret(secret)
}

/// Slot `index` (bytes `b`) with `mk` sealed again under the same `kek`:
/// metadata unchanged, a fresh nonce, a fresh random tail (rekey activation).
pub(crate) fn reseal(
    id: &[u8; CONTAINER_ID_LEN],
    index: u8,
    b: &[u8],
    kek: &SecretBytes,
    mk: &MasterKey,
) -> Result<Vec<u8>, ContainerError> {
    let mut out = b[..SLOT_SIZE].to_vec();
    fill_random(&mut out[S_RESERVED_TAIL..])?;
    let nonce = random_nonce()?;
    let wrapped = aead::seal(kek, &nonce, &aad(id, index, &out), mk.expose())?;
    out[S_NONCE..][..NONCE_LEN].copy_from_slice(&nonce);
    out[S_WRAPPED..][..WRAPPED_LEN].copy_from_slice(&wrapped);
    Ok(out)
}

pub(crate) fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

pub(crate) fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

pub(crate) fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kek(byte: u8) -> SecretBytes {
        SecretBytes::from_slice(&[byte; KEY_LEN]).unwrap()
    }

    fn token_slot(index: u8) -> NewSlot {
        let mut card = [7u8; PUBLIC_KEY_LEN];
        card[0] = 4;
        let mut eph = [9u8; PUBLIC_KEY_LEN];
        eph[0] = 4;
        NewSlot {
            index,
            label: "laptop ✓".into(),
            salt: [3u8; SALT_LEN],
            kind: NewSlotKind::Token {
                serial: 123456,
                piv_slot: 0x82,
                card_public: card,
                ephemeral_public: eph,
                argon: Argon2Params::MIN,
            },
            kek: kek(1),
        }
    }

    #[test]
    fn token_slot_round_trips_and_unwraps() {
        let id = [5u8; 16];
        let mk = MasterKey::generate().unwrap();
        let bytes = encode(&id, &token_slot(2), &mk, 1_700_000_000).unwrap();
        let info = decode(2, &bytes).unwrap().unwrap();
        assert_eq!(info.label, "laptop ✓");
        assert_eq!(info.created, 1_700_000_000);
        assert!(matches!(
            info.kind,
            SlotKind::Token {
                serial: 123456,
                piv_slot: 0x82,
                ..
            }
        ));
        let got = unwrap(&id, 2, &bytes, &kek(1)).unwrap();
        assert_eq!(got.dangerous_export(), mk.dangerous_export());
        // Bound to the slot index and the container id.
        assert!(unwrap(&id, 3, &bytes, &kek(1)).is_err());
        assert!(unwrap(&[6u8; 16], 2, &bytes, &kek(1)).is_err());
        assert!(unwrap(&id, 2, &bytes, &kek(2)).is_err());
    }

    #[test]
    fn every_metadata_bit_is_authenticated() {
        let id = [5u8; 16];
        let mk = MasterKey::generate().unwrap();
        let bytes = encode(&id, &token_slot(0), &mk, 1).unwrap();
        for bit in 0..S_RESERVED_TAIL * 8 {
            let mut b = bytes.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            assert!(unwrap(&id, 0, &b, &kek(1)).is_err(), "bit {bit}");
        }
    }

    #[test]
    fn must_change_flag_round_trips_and_is_authenticated() {
        let id = [5u8; 16];
        let mk = MasterKey::generate().unwrap();
        let flags = SlotFlags {
            must_change_password: true,
        };
        let bytes = encode_with_flags(&id, &token_slot(1), &mk, 1, flags).unwrap();
        assert_eq!(bytes[S_FLAGS], SLOT_FLAG_CHANGE_PASSWORD);
        assert_eq!(decode(1, &bytes).unwrap().unwrap().flags, flags);
        let mut cleared = bytes.clone();
        cleared[S_FLAGS] = 0;
        assert!(unwrap(&id, 1, &cleared, &kek(1)).is_err());
        unwrap(&id, 1, &bytes, &kek(1)).unwrap();
    }

    #[test]
    fn recovery_slot_and_empty_slot() {
        let id = [5u8; 16];
        let mk = MasterKey::generate().unwrap();
        let slot = NewSlot {
            index: 7,
            label: String::new(),
            salt: [1u8; SALT_LEN],
            kind: NewSlotKind::Recovery,
            kek: kek(4),
        };
        let bytes = encode(&id, &slot, &mk, 2).unwrap();
        let info = decode(7, &bytes).unwrap().unwrap();
        assert_eq!(info.kind, SlotKind::Recovery);
        assert_eq!(info.label, "");
        unwrap(&id, 7, &bytes, &kek(4)).unwrap();
        assert_eq!(decode(1, &empty().unwrap()).unwrap(), None);
    }

    #[test]
    fn bad_new_slots_are_refused() {
        let mut slot = token_slot(8);
        let mk = MasterKey::generate().unwrap();
        assert!(encode(&[0; 16], &slot, &mk, 0).is_err());
        slot.index = 0;
        slot.label = "x".repeat(65);
        assert!(encode(&[0; 16], &slot, &mk, 0).is_err());
        slot.label = "a\0b".into();
        assert!(encode(&[0; 16], &slot, &mk, 0).is_err());
    }

    #[test]
    fn garbage_slots_decode_without_panicking() {
        let mut buf = vec![0u8; SLOT_SIZE];
        for round in 0..2000u32 {
            fill_random(&mut buf).unwrap();
            buf[0] = (round % 4) as u8;
            let _ = decode(0, &buf);
        }
        assert!(decode(0, &[1u8; 10]).is_err());
    }
}
