//! HKDF-SHA256 (RFC 5869), the one key-derivation step behind sub-keys and
//! key-encryption keys.

use ring::hkdf::{HKDF_SHA256, KeyType, Salt};

use super::CryptoError;
use super::locked::Locked;

/// `ring` asks for the output length as a "key type"; this is just a length.
struct OutputLen(usize);

impl KeyType for OutputLen {
    fn len(&self) -> usize {
        self.0
    }
}

/// HKDF-SHA256 extract-then-expand of `ikm` into `out` (at most 255 × 32 bytes).
///
/// `out` is the caller's buffer, normally inside a `SecretBytes`, so the
/// derived key is written straight into locked memory. The HMAC states and
/// output blocks `ring` leaves in dead stack frames are scrubbed.
pub(crate) fn hkdf_sha256(
    ikm: &[u8],
    salt: &[u8],
    info: &[u8],
    out: &mut [u8],
) -> Result<(), CryptoError> {
    let result = hkdf_inner(ikm, salt, info, out);
    crate::secrets::scrub_stack();
    result
}

#[inline(never)]
fn hkdf_inner(ikm: &[u8], salt: &[u8], info: &[u8], out: &mut [u8]) -> Result<(), CryptoError> {
    // The pseudo-random key holds HMAC pad states computed from `ikm`: anyone
    // with them can derive every output, so it goes into locked memory too.
    let prk = Locked::new(Salt::new(HKDF_SHA256, salt).extract(ikm))?;
    let info = [info];
    prk.get()
        .expand(&info, OutputLen(out.len()))
        .and_then(|okm| okm.fill(out))
        // The only failure is asking for more than 255 × 32 bytes, which no
        // caller in this crate does; report it rather than panic.
        .map_err(|_| CryptoError::TooLong { len: out.len() })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 5869, appendix A.1 (test case 1).
    #[test]
    fn rfc5869_test_case_1() {
        let ikm = [0x0bu8; 22];
        let salt = hex::decode("000102030405060708090a0b0c").unwrap();
        let info = hex::decode("f0f1f2f3f4f5f6f7f8f9").unwrap();
        let mut okm = [0u8; 42];
        hkdf_sha256(&ikm, &salt, &info, &mut okm).unwrap();
        assert_eq!(
            hex::encode(okm),
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf\
             34007208d5b887185865"
        );
    }

    #[test]
    fn refuses_oversized_output() {
        let mut out = vec![0u8; 255 * 32 + 1];
        assert!(matches!(
            hkdf_sha256(b"ikm", b"salt", b"info", &mut out),
            Err(CryptoError::TooLong { .. })
        ));
    }
}
