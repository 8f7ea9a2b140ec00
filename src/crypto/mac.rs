//! HMAC-SHA256 under the header-MAC sub-key.
//!
//! The container header carries an unkeyed checksum (to pick the intact copy
//! of A/B before any key is known) and this keyed MAC, checked after unlock,
//! so that nobody without the master key can alter the header unnoticed.

use std::fmt;

use ring::hmac;

use super::CryptoError;
use super::keys::{KeyPurpose, SubKey};
use super::locked::Locked;

/// Length of a MAC tag: the full SHA-256 output.
pub const MAC_LEN: usize = 32;

/// HMAC-SHA256 keyed with the header-MAC sub-key; its pad states live in
/// locked memory and are wiped on drop.
pub struct HeaderMac {
    key: Locked<hmac::Key>,
}

impl HeaderMac {
    /// Refuses a sub-key derived for any purpose other than the header MAC.
    pub fn new(key: &SubKey) -> Result<Self, CryptoError> {
        Self::from_key_bytes(key.expose_for(KeyPurpose::HeaderMac)?)
    }

    /// `ring` computes the pad states by value, leaving copies (and the key
    /// XORed with the pads) in dead stack frames: scrubbed before returning.
    fn from_key_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        let key = Self::build(bytes);
        crate::secrets::scrub_stack();
        key
    }

    #[inline(never)]
    fn build(bytes: &[u8]) -> Result<Self, CryptoError> {
        Ok(HeaderMac {
            key: Locked::new(hmac::Key::new(hmac::HMAC_SHA256, bytes))?,
        })
    }

    pub fn sign(&self, data: &[u8]) -> [u8; MAC_LEN] {
        let mut out = [0u8; MAC_LEN];
        out.copy_from_slice(hmac::sign(self.key.get(), data).as_ref());
        out
    }

    /// Constant-time check of `tag` over `data`.
    pub fn verify(&self, data: &[u8], tag: &[u8]) -> Result<(), CryptoError> {
        hmac::verify(self.key.get(), data, tag).map_err(|_| CryptoError::Authentication)
    }
}

impl fmt::Debug for HeaderMac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HeaderMac(redacted)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::keys::{KEY_LEN, test_subkey};

    /// RFC 4231, test case 2 (a key shorter than the block, "Jefe").
    #[test]
    fn rfc4231_test_case_2() {
        let mac = HeaderMac::from_key_bytes(b"Jefe").unwrap();
        let data = b"what do ya want for nothing?";
        let tag = mac.sign(data);
        assert_eq!(
            hex::encode(tag),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        mac.verify(data, &tag).unwrap();
    }

    #[test]
    fn tampering_fails_verification() {
        let mac = HeaderMac::new(&test_subkey(KeyPurpose::HeaderMac, &[5u8; KEY_LEN])).unwrap();
        let header = b"keybound header generation 7".to_vec();
        let tag = mac.sign(&header);
        for bit in 0..header.len() * 8 {
            let mut h = header.clone();
            h[bit / 8] ^= 1 << (bit % 8);
            assert!(matches!(
                mac.verify(&h, &tag),
                Err(CryptoError::Authentication)
            ));
        }
        for bit in 0..MAC_LEN * 8 {
            let mut t = tag;
            t[bit / 8] ^= 1 << (bit % 8);
            assert!(mac.verify(&header, &t).is_err());
        }
        assert!(mac.verify(&header, &tag[..31]).is_err());
        let other = HeaderMac::new(&test_subkey(KeyPurpose::HeaderMac, &[6u8; KEY_LEN])).unwrap();
        assert!(other.verify(&header, &tag).is_err());
    }

    #[test]
    fn sector_key_is_refused() {
        let key = test_subkey(KeyPurpose::SectorEncryption, &[5u8; KEY_LEN]);
        assert!(matches!(
            HeaderMac::new(&key),
            Err(CryptoError::WrongPurpose { .. })
        ));
    }
}
