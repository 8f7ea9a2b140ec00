//! The master key and the sub-keys derived from it.
//!
//! The master key is 256 random bits, generated once per vault and only ever
//! stored sealed in key slots. Nothing encrypts or authenticates with it
//! directly: each job gets its own sub-key, HKDF-SHA256(ikm = master key,
//! salt = container id, info = a label naming the job). Distinct labels make
//! the sub-keys independent, so a weakness in how one is used says nothing
//! about the others; the container id as salt makes two vaults that somehow
//! shared a master key still use different sub-keys. Rotating the master key
//! rotates every sub-key at once.

use std::fmt;

use super::hkdf::hkdf_sha256;
use super::{CryptoError, check_len, random};
use crate::secrets::SecretBytes;

/// Length of the master key and of every sub-key: 256 bits.
pub const KEY_LEN: usize = 32;

/// Length of a container id, the HKDF salt for sub-keys.
pub const CONTAINER_ID_LEN: usize = 16;

/// What a sub-key is for. Each purpose has its own HKDF label; adding a purpose
/// means adding a variant with a new label, never reusing one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KeyPurpose {
    /// AES-256-GCM over the data area's sectors.
    SectorEncryption,
    /// HMAC-SHA256 over the container header, checked after unlock.
    HeaderMac,
}

impl KeyPurpose {
    /// Every purpose, so tests can check that no two labels collide.
    pub const ALL: &'static [KeyPurpose] = &[KeyPurpose::SectorEncryption, KeyPurpose::HeaderMac];

    /// The HKDF info string. These bytes are part of the on-disk format: once
    /// a vault exists, changing one makes its data unreadable. The "v1" leaves
    /// room for a future derivation scheme beside this one.
    pub fn label(self) -> &'static [u8] {
        match self {
            KeyPurpose::SectorEncryption => b"keybound v1 sector encryption",
            KeyPurpose::HeaderMac => b"keybound v1 header mac",
        }
    }
}

impl fmt::Display for KeyPurpose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyPurpose::SectorEncryption => "sector encryption",
            KeyPurpose::HeaderMac => "header MAC",
        })
    }
}

/// The vault's 256-bit master key. Not `Clone`: there is one copy, in locked
/// memory, wiped when dropped.
pub struct MasterKey(SecretBytes);

impl MasterKey {
    /// A fresh random master key, generated directly in locked memory.
    pub fn generate() -> Result<Self, CryptoError> {
        Ok(MasterKey(random::secret(KEY_LEN)?))
    }

    /// Take a master key unwrapped from a key slot (see [`super::aead::open`]).
    pub fn from_secret(secret: SecretBytes) -> Result<Self, CryptoError> {
        check_len("a master key", secret.len(), KEY_LEN)?;
        Ok(MasterKey(secret))
    }

    /// The raw key, for sealing it into a key slot. Crate-only: outside the
    /// crate the only way to the bytes is [`Self::dangerous_export`].
    pub(crate) fn expose(&self) -> &[u8] {
        self.0.expose()
    }

    /// The raw master key, for the admin `dump-key` command and nothing else.
    /// Whoever holds these bytes can decrypt the vault without token or
    /// password, forever (until the master key is rotated).
    pub fn dangerous_export(&self) -> &[u8] {
        self.0.expose()
    }

    /// The sub-key for `purpose` in the container `container_id`.
    pub fn derive(
        &self,
        purpose: KeyPurpose,
        container_id: &[u8; CONTAINER_ID_LEN],
    ) -> Result<SubKey, CryptoError> {
        let mut key = SecretBytes::zeroed(KEY_LEN)?;
        hkdf_sha256(self.expose(), container_id, purpose.label(), key.as_mut())?;
        Ok(SubKey { purpose, key })
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(redacted)")
    }
}

/// A 256-bit key derived from the master key for one purpose. It remembers the
/// purpose, so the primitives can refuse a key meant for something else.
pub struct SubKey {
    purpose: KeyPurpose,
    key: SecretBytes,
}

impl SubKey {
    pub fn purpose(&self) -> KeyPurpose {
        self.purpose
    }

    pub(crate) fn expose(&self) -> &[u8] {
        self.key.expose()
    }

    /// The key bytes, if it is a key for `expected`.
    pub(crate) fn expose_for(&self, expected: KeyPurpose) -> Result<&[u8], CryptoError> {
        if self.purpose == expected {
            Ok(self.expose())
        } else {
            Err(CryptoError::WrongPurpose {
                expected,
                actual: self.purpose,
            })
        }
    }
}

impl fmt::Debug for SubKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SubKey({}, redacted)", self.purpose)
    }
}

#[cfg(test)]
pub(crate) fn test_subkey(purpose: KeyPurpose, bytes: &[u8]) -> SubKey {
    SubKey {
        purpose,
        key: SecretBytes::from_slice(bytes).unwrap(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn master(byte: u8) -> MasterKey {
        MasterKey::from_secret(SecretBytes::from_slice(&[byte; KEY_LEN]).unwrap()).unwrap()
    }

    #[test]
    fn labels_are_distinct_and_versioned() {
        for (i, a) in KeyPurpose::ALL.iter().enumerate() {
            assert!(a.label().starts_with(b"keybound v1 "));
            for b in &KeyPurpose::ALL[i + 1..] {
                assert_ne!(a.label(), b.label(), "{a} and {b}");
            }
        }
    }

    #[test]
    fn derivation_is_deterministic() {
        let id = [7u8; CONTAINER_ID_LEN];
        let a = master(1).derive(KeyPurpose::SectorEncryption, &id).unwrap();
        let b = master(1).derive(KeyPurpose::SectorEncryption, &id).unwrap();
        assert_eq!(a.expose(), b.expose());
        assert_eq!(a.purpose(), KeyPurpose::SectorEncryption);
    }

    #[test]
    fn derivation_matches_plain_hkdf() {
        // Pins the wire format: ikm = master key, salt = container id,
        // info = label. Swapping salt and ikm, or dropping the label, fails here.
        let id = [7u8; CONTAINER_ID_LEN];
        let key = master(1).derive(KeyPurpose::HeaderMac, &id).unwrap();
        let salt = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, &id);
        let prk = salt.extract(&[1u8; KEY_LEN]);
        let mut expected = [0u8; KEY_LEN];
        prk.expand(&[b"keybound v1 header mac"], ring::hkdf::HKDF_SHA256)
            .unwrap()
            .fill(&mut expected)
            .unwrap();
        assert_eq!(key.expose(), expected);
    }

    #[test]
    fn purposes_containers_and_masters_separate_keys() {
        let id = [7u8; CONTAINER_ID_LEN];
        let mut other_id = id;
        other_id[15] ^= 1;
        let m = master(1);
        let sector = m.derive(KeyPurpose::SectorEncryption, &id).unwrap();
        let mac = m.derive(KeyPurpose::HeaderMac, &id).unwrap();
        let elsewhere = m.derive(KeyPurpose::SectorEncryption, &other_id).unwrap();
        let other_master = master(2).derive(KeyPurpose::SectorEncryption, &id).unwrap();
        let all = [&sector, &mac, &elsewhere, &other_master];
        for (i, a) in all.iter().enumerate() {
            assert_ne!(a.expose(), m.expose(), "a sub-key equals the master key");
            for b in &all[i + 1..] {
                assert_ne!(a.expose(), b.expose());
            }
        }
    }

    #[test]
    fn generated_keys_are_random() {
        let a = MasterKey::generate().unwrap();
        let b = MasterKey::generate().unwrap();
        assert_eq!(a.dangerous_export().len(), KEY_LEN);
        assert_ne!(a.dangerous_export(), b.dangerous_export());
    }

    #[test]
    fn wrong_length_is_refused() {
        let err = MasterKey::from_secret(SecretBytes::from_slice(&[0u8; 31]).unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("master key") && err.contains("32"), "{err}");
    }

    #[test]
    fn purpose_is_checked() {
        let key = test_subkey(KeyPurpose::HeaderMac, &[0u8; KEY_LEN]);
        assert!(key.expose_for(KeyPurpose::HeaderMac).is_ok());
        assert!(matches!(
            key.expose_for(KeyPurpose::SectorEncryption),
            Err(CryptoError::WrongPurpose { .. })
        ));
    }

    #[test]
    fn debug_output_is_redacted() {
        let m = master(0xab);
        let sub = m.derive(KeyPurpose::HeaderMac, &[0u8; 16]).unwrap();
        for shown in [format!("{m:?}"), format!("{sub:?}")] {
            assert!(shown.contains("redacted"), "{shown}");
            assert!(!shown.contains("171") && !shown.contains("abab"), "{shown}");
        }
    }
}
