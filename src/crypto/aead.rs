//! AES-256-GCM with 96-bit nonces, through `ring`.
//!
//! # The nonce-reuse bound
//!
//! GCM fails badly if a key ever seals two messages under the same nonce: the
//! XOR of the two plaintexts leaks, and so does the GHASH key, which lets an
//! attacker forge tags for any message under that key from then on.
//!
//! Sectors and key slots use random 96-bit nonces. NIST SP 800-38D (section
//! 8.3) allows at most 2^32 invocations of the sealing function per key with
//! random nonces; that keeps the chance that any two of them collide below
//! about 2^-33 (birthday bound: n² / 2^97). With 4 KiB sectors, 2^32 seals is
//! 16 TiB of sector writes under one sector key — reachable for a long-lived
//! vault that is written to heavily, so it cannot be left to luck:
//! [`RANDOM_NONCE_SEAL_LIMIT`] is the number the container layer counts every
//! sector write against (persistently, across mounts), refusing writes and
//! asking for a master-key rotation before the count would reach it.
//! [`SectorCipher`] itself does not count: one key is used through several
//! `SectorCipher`s over the vault's life, and only the container can keep a
//! count that survives them.

use std::fmt;

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, Tag, UnboundKey};

use super::keys::{KEY_LEN, KeyPurpose, SubKey};
use super::locked::Locked;
use super::{CryptoError, check_len, random};
use crate::secrets::SecretBytes;

/// Nonce length: 96 bits, the length GCM is designed for.
pub const NONCE_LEN: usize = 12;

/// Tag length: the full 128 bits; truncated tags would weaken authentication.
pub const TAG_LEN: usize = 16;

/// The most messages one key may seal with random nonces (NIST SP 800-38D,
/// section 8.3). See the module documentation.
pub const RANDOM_NONCE_SEAL_LIMIT: u64 = 1 << 32;

/// A fresh random nonce. Each call counts against [`RANDOM_NONCE_SEAL_LIMIT`]
/// for the key it is used with.
pub fn random_nonce() -> Result<[u8; NONCE_LEN], CryptoError> {
    random::array()
}

/// Build a `ring` key from raw bytes, its schedule placed in locked memory.
///
/// `ring` builds the schedule by value, so copies of it (the first two round
/// keys are the key itself) are left in the stack frames below this one;
/// they are scrubbed before returning.
fn locked_key(bytes: &[u8]) -> Result<Locked<LessSafeKey>, CryptoError> {
    let key = build_locked_key(bytes);
    crate::secrets::scrub_stack();
    key
}

#[inline(never)]
fn build_locked_key(bytes: &[u8]) -> Result<Locked<LessSafeKey>, CryptoError> {
    check_len("an AES-256-GCM key", bytes.len(), KEY_LEN)?;
    let unbound = UnboundKey::new(&AES_256_GCM, bytes).map_err(|_| CryptoError::Length {
        what: "an AES-256-GCM key",
        expected: KEY_LEN,
        actual: bytes.len(),
    })?;
    Ok(Locked::new(LessSafeKey::new(unbound))?)
}

fn seal_with(
    key: &LessSafeKey,
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    buf: &mut [u8],
) -> Result<[u8; TAG_LEN], CryptoError> {
    let tag = key
        .seal_in_place_separate_tag(Nonce::assume_unique_for_key(*nonce), Aad::from(aad), buf)
        // ring refuses only messages longer than GCM's 2^36 - 32 byte limit.
        .map_err(|_| CryptoError::TooLong { len: buf.len() })?;
    let mut out = [0u8; TAG_LEN];
    out.copy_from_slice(tag.as_ref());
    Ok(out)
}

fn open_with(
    key: &LessSafeKey,
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    buf: &mut [u8],
    tag: &[u8; TAG_LEN],
) -> Result<(), CryptoError> {
    let result = key.open_in_place_separate_tag(
        Nonce::assume_unique_for_key(*nonce),
        Aad::from(aad),
        Tag::from(*tag),
        buf,
        0..,
    );
    if result.is_err() {
        // ring already zeroes the buffer on failure; doing it here too makes
        // "no unauthenticated plaintext ever reaches the caller" our promise,
        // not an implementation detail of a dependency.
        buf.fill(0);
        return Err(CryptoError::Authentication);
    }
    Ok(())
}

/// AES-256-GCM under the sector-encryption sub-key, for the data area.
///
/// The expanded key lives in locked memory and is wiped when this is dropped.
pub struct SectorCipher {
    key: Locked<LessSafeKey>,
}

impl SectorCipher {
    /// Refuses a sub-key derived for any purpose other than sector encryption.
    pub fn new(key: &SubKey) -> Result<Self, CryptoError> {
        Self::from_key_bytes(key.expose_for(KeyPurpose::SectorEncryption)?)
    }

    fn from_key_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        Ok(SectorCipher {
            key: locked_key(bytes)?,
        })
    }

    /// Encrypt `buf` in place and return the tag. `aad` is authenticated but
    /// not encrypted (the container puts its id and the sector index there, so
    /// a sector moved elsewhere fails to open). `nonce` must never repeat
    /// under this key: use [`random_nonce`] and count seals.
    pub fn seal_in_place(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<[u8; TAG_LEN], CryptoError> {
        seal_with(self.key.get(), nonce, aad, buf)
    }

    /// Check `tag` and decrypt `buf` in place. On failure `buf` is zeroed, so
    /// tampered data can never be mistaken for plaintext.
    pub fn open_in_place(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        buf: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<(), CryptoError> {
        open_with(self.key.get(), nonce, aad, buf, tag)
    }
}

impl fmt::Debug for SectorCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SectorCipher(redacted)")
    }
}

/// Seal a small secret (a master key in a key slot) under a 32-byte `key`
/// (a key-encryption key). Returns ciphertext ‖ tag. The plaintext is only
/// copied into the output buffer to be encrypted there; if sealing fails, that
/// buffer is wiped before it is freed.
pub fn seal(
    key: &SecretBytes,
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let key = locked_key(key.expose())?;
    let mut out = Vec::with_capacity(plaintext.len() + TAG_LEN);
    out.extend_from_slice(plaintext);
    match seal_with(key.get(), nonce, aad, &mut out) {
        Ok(tag) => {
            out.extend_from_slice(&tag);
            Ok(out)
        }
        Err(e) => {
            zeroize::Zeroize::zeroize(&mut out);
            Err(e)
        }
    }
}

/// Open what [`seal`] produced. The plaintext is decrypted directly inside a
/// [`SecretBytes`], so it never sits in ordinary, unwiped memory.
pub fn open(
    key: &SecretBytes,
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    sealed: &[u8],
) -> Result<SecretBytes, CryptoError> {
    let key = locked_key(key.expose())?;
    // Too short to hold a tag: truncated or forged, not a different error class.
    let Some(split) = sealed.len().checked_sub(TAG_LEN) else {
        return Err(CryptoError::Authentication);
    };
    let (ciphertext, tag) = sealed.split_at(split);
    let tag: &[u8; TAG_LEN] = tag.try_into().expect("split leaves exactly TAG_LEN bytes");
    let mut plaintext = SecretBytes::from_slice(ciphertext)?;
    open_with(key.get(), nonce, aad, plaintext.as_mut(), tag)?;
    Ok(plaintext)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::keys::test_subkey;

    // NIST GCM test case 16 (AES-256, 60-byte plaintext, 20-byte AAD), from
    // McGrew & Viega, "The Galois/Counter Mode of Operation", as used to
    // validate SP 800-38D implementations.
    const KAT_KEY: &str = "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308";
    const KAT_NONCE: &str = "cafebabefacedbaddecaf888";
    const KAT_AAD: &str = "feedfacedeadbeeffeedfacedeadbeefabaddad2";
    const KAT_PLAIN: &str = "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72\
                             1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39";
    const KAT_CIPHER: &str = "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa\
                              8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662";
    const KAT_TAG: &str = "76fc6ece0f4e1768cddf8853bb2d551b";

    fn h(s: &str) -> Vec<u8> {
        hex::decode(s).unwrap()
    }

    fn kat_nonce() -> [u8; NONCE_LEN] {
        h(KAT_NONCE).try_into().unwrap()
    }

    #[test]
    fn sector_cipher_matches_nist_vector() {
        let cipher = SectorCipher::from_key_bytes(&h(KAT_KEY)).unwrap();
        let mut buf = h(KAT_PLAIN);
        let tag = cipher
            .seal_in_place(&kat_nonce(), &h(KAT_AAD), &mut buf)
            .unwrap();
        assert_eq!(hex::encode(&buf), KAT_CIPHER);
        assert_eq!(hex::encode(tag), KAT_TAG);
        cipher
            .open_in_place(&kat_nonce(), &h(KAT_AAD), &mut buf, &tag)
            .unwrap();
        assert_eq!(hex::encode(&buf), KAT_PLAIN);
    }

    #[test]
    fn seal_and_open_match_nist_vector() {
        let key = SecretBytes::from_vec(h(KAT_KEY)).unwrap();
        let sealed = seal(&key, &kat_nonce(), &h(KAT_AAD), &h(KAT_PLAIN)).unwrap();
        assert_eq!(hex::encode(&sealed), format!("{KAT_CIPHER}{KAT_TAG}"));
        let opened = open(&key, &kat_nonce(), &h(KAT_AAD), &sealed).unwrap();
        assert_eq!(opened.expose(), h(KAT_PLAIN));
    }

    fn sector_key(byte: u8) -> SubKey {
        test_subkey(KeyPurpose::SectorEncryption, &[byte; KEY_LEN])
    }

    /// Flip each bit of ciphertext, tag, nonce and AAD in turn: every one must
    /// fail to open, and leave no plaintext behind.
    #[test]
    fn any_flipped_bit_fails_to_open() {
        let cipher = SectorCipher::new(&sector_key(1)).unwrap();
        let nonce = random_nonce().unwrap();
        let aad = b"container id + sector index".to_vec();
        let plain: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        let mut sealed = plain.clone();
        let tag = cipher.seal_in_place(&nonce, &aad, &mut sealed).unwrap();

        let try_open = |n: &[u8; NONCE_LEN], a: &[u8], c: &[u8], t: &[u8; TAG_LEN]| {
            let mut buf = c.to_vec();
            let result = cipher.open_in_place(n, a, &mut buf, t);
            if result.is_err() {
                assert!(buf.iter().all(|&b| b == 0), "plaintext left after failure");
            }
            result
        };
        try_open(&nonce, &aad, &sealed, &tag).unwrap();

        for bit in 0..sealed.len() * 8 {
            let mut c = sealed.clone();
            c[bit / 8] ^= 1 << (bit % 8);
            assert!(matches!(
                try_open(&nonce, &aad, &c, &tag),
                Err(CryptoError::Authentication)
            ));
        }
        for bit in 0..TAG_LEN * 8 {
            let mut t = tag;
            t[bit / 8] ^= 1 << (bit % 8);
            assert!(
                try_open(&nonce, &aad, &sealed, &t).is_err(),
                "tag bit {bit}"
            );
        }
        for bit in 0..NONCE_LEN * 8 {
            let mut n = nonce;
            n[bit / 8] ^= 1 << (bit % 8);
            assert!(
                try_open(&n, &aad, &sealed, &tag).is_err(),
                "nonce bit {bit}"
            );
        }
        for bit in 0..aad.len() * 8 {
            let mut a = aad.clone();
            a[bit / 8] ^= 1 << (bit % 8);
            assert!(
                try_open(&nonce, &a, &sealed, &tag).is_err(),
                "aad bit {bit}"
            );
        }
        // Shortened or lengthened AAD and ciphertext fail too.
        assert!(try_open(&nonce, &aad[1..], &sealed, &tag).is_err());
        assert!(try_open(&nonce, &[&aad[..], b"x"].concat(), &sealed, &tag).is_err());
        assert!(try_open(&nonce, &aad, &sealed[..4095], &tag).is_err());
        // A different key fails.
        let other = SectorCipher::new(&sector_key(2)).unwrap();
        let mut buf = sealed.clone();
        assert!(other.open_in_place(&nonce, &aad, &mut buf, &tag).is_err());
    }

    #[test]
    fn sealed_slots_detect_tampering_and_truncation() {
        let key = SecretBytes::from_slice(&[9u8; KEY_LEN]).unwrap();
        let nonce = random_nonce().unwrap();
        let sealed = seal(&key, &nonce, b"slot 0 metadata", &[0x55; 32]).unwrap();
        assert_eq!(sealed.len(), 32 + TAG_LEN);
        assert_ne!(&sealed[..32], &[0x55; 32]);
        let opened = open(&key, &nonce, b"slot 0 metadata", &sealed).unwrap();
        assert_eq!(opened.expose(), [0x55; 32]);

        for bit in 0..sealed.len() * 8 {
            let mut s = sealed.clone();
            s[bit / 8] ^= 1 << (bit % 8);
            assert!(matches!(
                open(&key, &nonce, b"slot 0 metadata", &s),
                Err(CryptoError::Authentication)
            ));
        }
        assert!(open(&key, &nonce, b"slot 1 metadata", &sealed).is_err());
        let wrong = SecretBytes::from_slice(&[8u8; KEY_LEN]).unwrap();
        assert!(open(&wrong, &nonce, b"slot 0 metadata", &sealed).is_err());
        for len in 0..sealed.len() {
            assert!(open(&key, &nonce, b"slot 0 metadata", &sealed[..len]).is_err());
        }
    }

    #[test]
    fn empty_plaintext_is_still_authenticated() {
        let key = SecretBytes::from_slice(&[3u8; KEY_LEN]).unwrap();
        let nonce = [0u8; NONCE_LEN];
        let sealed = seal(&key, &nonce, b"aad", b"").unwrap();
        assert_eq!(sealed.len(), TAG_LEN);
        assert!(open(&key, &nonce, b"aad", &sealed).unwrap().is_empty());
        assert!(open(&key, &nonce, b"aaD", &sealed).is_err());
    }

    #[test]
    fn wrong_keys_are_refused() {
        let short = SecretBytes::from_slice(&[0u8; 16]).unwrap();
        assert!(matches!(
            seal(&short, &[0; NONCE_LEN], b"", b"x"),
            Err(CryptoError::Length {
                expected: 32,
                actual: 16,
                ..
            })
        ));
        let mac_key = test_subkey(KeyPurpose::HeaderMac, &[0u8; KEY_LEN]);
        assert!(matches!(
            SectorCipher::new(&mac_key),
            Err(CryptoError::WrongPurpose { .. })
        ));
    }

    #[test]
    fn nonces_are_random() {
        assert_ne!(random_nonce().unwrap(), random_nonce().unwrap());
    }
}
