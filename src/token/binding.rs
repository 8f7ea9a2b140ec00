//! The card-free half of the token binding: P-256 public keys, fingerprints,
//! certificates, and the ephemeral ECDH an admin does at enrolment.
//!
//! Enrolment needs only the card's public key: an ephemeral key pair does ECDH
//! with it, the ephemeral public key is stored in the vault's key slot and the
//! ephemeral private key is dropped. At unlock the card computes the same shared
//! secret from the stored ephemeral public key, after its PIN. (age-plugin-yubikey
//! wraps file keys the same way; see docs/token-binding.md.)

use std::fmt;

use der::{Decode, DecodePem, Encode};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use sha2::{Digest, Sha256};

use super::TokenError;
use crate::secrets::SecretBytes;

/// Organisation name in the certificate of every key keybound generates; this
/// is how `token list` tells keybound keys from other keys on the card.
pub const CERT_ORGANIZATION: &str = "keybound";

/// A card's P-256 public key as keybound stores and compares it.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenPublicKey(p256::PublicKey);

impl TokenPublicKey {
    pub fn from_sec1(bytes: &[u8]) -> Result<Self, TokenError> {
        p256::PublicKey::from_sec1_bytes(bytes)
            .map(TokenPublicKey)
            .map_err(|_| TokenError::BadPublicKey)
    }

    /// From a DER SubjectPublicKeyInfo (what the card returns at key generation).
    pub fn from_spki(
        spki: &x509_cert::spki::SubjectPublicKeyInfoOwned,
    ) -> Result<Self, TokenError> {
        let der = spki.to_der().map_err(|_| TokenError::BadPublicKey)?;
        use p256::pkcs8::DecodePublicKey;
        p256::PublicKey::from_public_key_der(&der)
            .map(TokenPublicKey)
            .map_err(|_| TokenError::BadPublicKey)
    }

    /// From a certificate (DER or PEM), as exported by `keybound token export`
    /// or `yubico-piv-tool -a read-certificate`.
    pub fn from_certificate(bytes: &[u8]) -> Result<Self, TokenError> {
        let cert = if bytes.starts_with(b"-----BEGIN") {
            x509_cert::Certificate::from_pem(bytes)
        } else {
            x509_cert::Certificate::from_der(bytes)
        }
        .map_err(|e| TokenError::BadCertificate(e.to_string()))?;
        Self::from_spki(&cert.tbs_certificate.subject_public_key_info)
            .map_err(|_| TokenError::BadCertificate("its key is not a P-256 key".into()))
    }

    /// Uncompressed SEC1 encoding (65 bytes), the form the card takes for ECDH.
    pub fn to_sec1(&self) -> Vec<u8> {
        self.0.to_encoded_point(false).as_bytes().to_vec()
    }

    /// A short, stable name for the key: the first 16 bytes of SHA-256 over
    /// its uncompressed encoding, hex, in groups of four.
    pub fn fingerprint(&self) -> String {
        let digest = Sha256::digest(self.to_sec1());
        digest[..16]
            .chunks(2)
            .map(hex::encode)
            .collect::<Vec<_>>()
            .join(":")
    }

    pub fn as_p256(&self) -> &p256::PublicKey {
        &self.0
    }
}

impl fmt::Debug for TokenPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenPublicKey({})", self.fingerprint())
    }
}

/// A 32-byte ECDH shared secret (x-coordinate), in locked memory.
pub struct SharedSecret(SecretBytes);

impl SharedSecret {
    pub(crate) fn from_bytes(bytes: &[u8]) -> Result<Self, TokenError> {
        if bytes.len() != 32 {
            return Err(TokenError::Device {
                token: super::TokenName {
                    serial: None,
                    reader: None,
                },
                what: "ECDH".into(),
                detail: format!("the card returned {} bytes instead of 32", bytes.len()),
            });
        }
        Ok(SharedSecret(SecretBytes::from_slice(bytes)?))
    }

    pub fn expose(&self) -> &[u8] {
        self.0.expose()
    }
}

impl fmt::Debug for SharedSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SharedSecret(redacted)")
    }
}

/// The enrolment side of the binding: an ephemeral key agreed with the card's
/// public key. Store `ephemeral_public`; use `secret`; the private half is gone.
pub struct EphemeralShare {
    pub ephemeral_public: TokenPublicKey,
    pub secret: SharedSecret,
}

impl EphemeralShare {
    pub fn new(card_key: &TokenPublicKey) -> Result<Self, TokenError> {
        let ephemeral = p256::ecdh::EphemeralSecret::random(&mut rand::rngs::OsRng);
        let ephemeral_public = TokenPublicKey(ephemeral.public_key());
        let shared = ephemeral.diffie_hellman(card_key.as_p256());
        let secret = SharedSecret::from_bytes(shared.raw_secret_bytes().as_slice())?;
        // `ephemeral` and `shared` zeroize themselves on drop (p256's own types).
        Ok(EphemeralShare {
            ephemeral_public,
            secret,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ephemeral_share_matches_the_static_side() {
        let card_secret = p256::SecretKey::random(&mut rand::rngs::OsRng);
        let card_public = TokenPublicKey(card_secret.public_key());
        let share = EphemeralShare::new(&card_public).unwrap();
        let card_side = p256::ecdh::diffie_hellman(
            card_secret.to_nonzero_scalar(),
            share.ephemeral_public.as_p256().as_affine(),
        );
        assert_eq!(
            share.secret.expose(),
            card_side.raw_secret_bytes().as_slice()
        );
    }

    #[test]
    fn fingerprint_is_stable_and_distinct() {
        let a = TokenPublicKey(p256::SecretKey::random(&mut rand::rngs::OsRng).public_key());
        let b = TokenPublicKey(p256::SecretKey::random(&mut rand::rngs::OsRng).public_key());
        assert_eq!(a.fingerprint(), a.clone().fingerprint());
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint().len(), 8 * 4 + 7);
        assert_eq!(TokenPublicKey::from_sec1(&a.to_sec1()).unwrap(), a);
    }

    #[test]
    fn garbage_is_not_a_key_or_certificate() {
        assert!(matches!(
            TokenPublicKey::from_sec1(&[4u8; 65]),
            Err(TokenError::BadPublicKey)
        ));
        assert!(matches!(
            TokenPublicKey::from_certificate(b"-----BEGIN CERTIFICATE-----\nAAAA\n"),
            Err(TokenError::BadCertificate(_))
        ));
        assert!(TokenPublicKey::from_certificate(&[0x30, 0x82, 0xff]).is_err());
    }
}
