//! The card's cryptography: 3DES for the management key, P-256 for key slots.

use des::TdesEde3;
use des::cipher::{BlockEncrypt, KeyInit, generic_array::GenericArray};
use p256::ecdsa::signature::hazmat::PrehashSigner;
use p256::ecdsa::{Signature, SigningKey};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use p256::{PublicKey, SecretKey};
use rand::RngCore;
use rand::rngs::OsRng;

/// Length of an uncompressed SEC1 P-256 point (04 ‖ X ‖ Y).
pub const P256_POINT_LEN: usize = 65;

/// Encrypt one 8-byte block with 3DES-EDE (three-key, ECB), as the PIV
/// management-key challenge/response does.
pub fn tdes_encrypt(key: &[u8; 24], block: [u8; 8]) -> [u8; 8] {
    let cipher = TdesEde3::new(GenericArray::from_slice(key));
    let mut block = GenericArray::from(block);
    cipher.encrypt_block(&mut block);
    block.into()
}

/// Fresh random bytes from the operating system.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    OsRng.fill_bytes(&mut out);
    out
}

/// Compare secrets without an early exit on the first differing byte.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Generate a P-256 private key.
pub fn generate_p256() -> SecretKey {
    SecretKey::random(&mut OsRng)
}

/// A P-256 private key from its 32-byte big-endian scalar; `None` if the
/// scalar is zero, too long or not below the group order.
pub fn p256_from_scalar(scalar: &[u8]) -> Option<SecretKey> {
    if scalar.len() != 32 {
        return None;
    }
    SecretKey::from_slice(scalar).ok()
}

/// Uncompressed public point of a private key.
pub fn public_point(secret: &SecretKey) -> Vec<u8> {
    secret
        .public_key()
        .to_encoded_point(false)
        .as_bytes()
        .to_vec()
}

/// ECDH: the x-coordinate of `secret` times the peer's point. `None` if the
/// peer point is not an uncompressed point on the curve.
pub fn ecdh(secret: &SecretKey, peer_point: &[u8]) -> Option<[u8; 32]> {
    if peer_point.len() != P256_POINT_LEN || peer_point[0] != 0x04 {
        return None;
    }
    let peer = PublicKey::from_sec1_bytes(peer_point).ok()?;
    let shared = p256::ecdh::diffie_hellman(secret.to_nonzero_scalar(), peer.as_affine());
    Some((*shared.raw_secret_bytes()).into())
}

/// ECDSA over a host-computed hash, DER-encoded. Like the YubiKey, take the
/// leftmost 32 bytes of a longer hash and treat a shorter one as a smaller
/// integer (left-padded with zeros), which is what ECDSA's bits2int does.
pub fn sign_prehash(secret: &SecretKey, hash: &[u8]) -> Option<Vec<u8>> {
    let mut digest = [0u8; 32];
    let used = hash.len().min(32);
    digest[32 - used..].copy_from_slice(&hash[..used]);
    let signer = SigningKey::from(secret);
    let signature: Signature = signer.sign_prehash(&digest).ok()?;
    Some(signature.to_der().as_bytes().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::VerifyingKey;
    use p256::ecdsa::signature::hazmat::PrehashVerifier;

    #[test]
    fn tdes_known_answer() {
        // With K1 = K2 = K3, 3DES-EDE degenerates to single DES: the classic
        // DES test vector (key 133457799BBCDFF1) must come out.
        let k = [0x13, 0x34, 0x57, 0x79, 0x9B, 0xBC, 0xDF, 0xF1];
        let mut key = [0u8; 24];
        for chunk in key.chunks_mut(8) {
            chunk.copy_from_slice(&k);
        }
        let out = tdes_encrypt(&key, [0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF]);
        assert_eq!(out, [0x85, 0xE8, 0x13, 0x54, 0x0F, 0x0A, 0xB4, 0x05]);
    }

    #[test]
    fn ecdh_matches_both_sides() {
        let card = generate_p256();
        let host = generate_p256();
        let a = ecdh(&card, &public_point(&host)).unwrap();
        let b = ecdh(&host, &public_point(&card)).unwrap();
        assert_eq!(a, b);
        assert!(ecdh(&card, &[0x04; 65]).is_none());
        assert!(ecdh(&card, &public_point(&host)[..33]).is_none());
    }

    #[test]
    fn short_hash_is_left_padded() {
        let key = generate_p256();
        let sig = sign_prehash(&key, &[0x42; 20]).unwrap();
        let sig = Signature::from_der(&sig).unwrap();
        let mut padded = [0u8; 32];
        padded[12..].copy_from_slice(&[0x42; 20]);
        VerifyingKey::from(key.public_key())
            .verify_prehash(&padded, &sig)
            .unwrap();
    }
}
