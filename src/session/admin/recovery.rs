//! Recovery keys as people read and type them.
//!
//! A recovery key is 256 random bits (the recovery slot's KEK input,
//! `crypto::recovery_kek`). It is written as 56 characters of Crockford's
//! base32 (digits and capitals without I, L, O, U) in 14 groups of four: 52
//! characters carry the key (260 bits, the last 4 zero), the last group is a
//! 20-bit checksum (SHA-256 over a label and the key), so a typo is reported
//! as a typo rather than as a wrong key. Reading is forgiving: case, spaces,
//! dashes and line breaks are ignored, and O/I/L are read as 0/1/1.

use sha2::{Digest, Sha256};

use crate::crypto::{CryptoError, KEY_LEN, generate_recovery_key};
use crate::secrets::{SecretBytes, SecretError};

const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
const KEY_CHARS: usize = 52;
const CHECK_CHARS: usize = 4;
/// Characters of a recovery key, without separators.
pub const TEXT_CHARS: usize = KEY_CHARS + CHECK_CHARS;
const GROUP: usize = 4;
const CHECK_LABEL: &[u8] = b"keybound recovery key checksum";

/// Why a recovery key could not be read (never containing the key).
#[derive(Debug, thiserror::Error)]
pub enum RecoveryKeyError {
    #[error(
        "not a recovery key: it has {0} characters (not counting spaces and dashes); a recovery \
         key has {TEXT_CHARS}, in 14 groups of four"
    )]
    Length(usize),
    #[error(
        "not a recovery key: {0:?} is not one of its characters (digits and letters but I, L, O, U)"
    )]
    Character(char),
    #[error("the recovery key has a typo: its last group (a checksum) does not match the rest")]
    Checksum,
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
}

/// A fresh recovery key (32 random bytes, locked memory).
pub fn generate() -> Result<SecretBytes, CryptoError> {
    generate_recovery_key()
}

fn checksum(key: &[u8]) -> u32 {
    let digest = Sha256::new()
        .chain_update(CHECK_LABEL)
        .chain_update(key)
        .finalize();
    u32::from_be_bytes([0, digest[0], digest[1], digest[2]]) >> 4
}

/// The key as text: "XXXX-XXXX-…" (14 groups), in locked memory.
pub fn format(key: &SecretBytes) -> Result<SecretBytes, RecoveryKeyError> {
    assert_eq!(key.len(), KEY_LEN, "a recovery key is 32 bytes");
    let mut chars = SecretBytes::zeroed(TEXT_CHARS)?;
    let out = chars.as_mut();
    // 256 key bits then 4 zero bits, 5 bits per character, most significant first.
    let bit = |i: usize| -> u8 {
        key.expose()
            .get(i / 8)
            .map_or(0, |b| (b >> (7 - i % 8)) & 1)
    };
    for (c, slot) in out[..KEY_CHARS].iter_mut().enumerate() {
        let v = (0..5).fold(0u8, |acc, j| (acc << 1) | bit(c * 5 + j));
        *slot = ALPHABET[usize::from(v)];
    }
    let sum = checksum(key.expose());
    for (c, slot) in out[KEY_CHARS..].iter_mut().enumerate() {
        *slot = ALPHABET[((sum >> (5 * (CHECK_CHARS - 1 - c))) & 31) as usize];
    }
    let groups = TEXT_CHARS / GROUP;
    let mut text = SecretBytes::zeroed(TEXT_CHARS + groups - 1)?;
    let mut at = 0;
    for (g, group) in chars.expose().chunks(GROUP).enumerate() {
        if g > 0 {
            text.as_mut()[at] = b'-';
            at += 1;
        }
        text.as_mut()[at..at + GROUP].copy_from_slice(group);
        at += GROUP;
    }
    Ok(text)
}

fn value(c: u8) -> Option<u8> {
    let c = match c.to_ascii_uppercase() {
        b'O' => b'0',
        b'I' | b'L' => b'1',
        other => other,
    };
    ALPHABET.iter().position(|&a| a == c).map(|v| v as u8)
}

/// Read a recovery key typed by a person: 32 bytes, checksum verified.
pub fn parse(text: &[u8]) -> Result<SecretBytes, RecoveryKeyError> {
    let mut values = SecretBytes::zeroed(text.len())?;
    let mut n = 0;
    for &c in text {
        if c == b'-' || c.is_ascii_whitespace() {
            continue;
        }
        let v = value(c).ok_or(RecoveryKeyError::Character(char::from(c)))?;
        values.as_mut()[n] = v;
        n += 1;
    }
    if n != TEXT_CHARS {
        return Err(RecoveryKeyError::Length(n));
    }
    let values = &values.expose()[..n];
    let mut key = SecretBytes::zeroed(KEY_LEN)?;
    let mut padding = 0u8;
    for (c, &v) in values[..KEY_CHARS].iter().enumerate() {
        for j in 0..5 {
            let i = c * 5 + j;
            let b = (v >> (4 - j)) & 1;
            if i / 8 < KEY_LEN {
                key.as_mut()[i / 8] |= b << (7 - i % 8);
            } else {
                padding |= b;
            }
        }
    }
    let sum = values[KEY_CHARS..]
        .iter()
        .fold(0u32, |acc, &v| (acc << 5) | u32::from(v));
    if padding != 0 || sum != checksum(key.expose()) {
        return Err(RecoveryKeyError::Checksum);
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_reads_forgivingly() {
        for _ in 0..50 {
            let key = generate().unwrap();
            let text = format(&key).unwrap();
            let shown = std::str::from_utf8(text.expose()).unwrap().to_string();
            assert_eq!(shown.len(), TEXT_CHARS + 13);
            assert_eq!(shown.split('-').count(), 14);
            assert_eq!(parse(text.expose()).unwrap().expose(), key.expose());
            let sloppy = shown.to_lowercase().replace('-', " ").replace('0', "o");
            assert_eq!(parse(sloppy.as_bytes()).unwrap().expose(), key.expose());
        }
    }

    #[test]
    fn typos_are_caught_by_the_checksum() {
        let key = generate().unwrap();
        let text = std::str::from_utf8(format(&key).unwrap().expose())
            .unwrap()
            .to_string();
        let mut caught = 0;
        for at in [0usize, 7, 20, 33, 50, 60] {
            let mut bytes = text.clone().into_bytes();
            if bytes[at] == b'-' {
                continue;
            }
            bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
            if matches!(parse(&bytes), Err(RecoveryKeyError::Checksum)) {
                caught += 1;
            }
        }
        assert!(caught >= 5, "caught {caught}");
        assert!(matches!(parse(b"ABCD"), Err(RecoveryKeyError::Length(4))));
        let mut bad = text.into_bytes();
        bad[0] = b'U';
        assert!(matches!(parse(&bad), Err(RecoveryKeyError::Character('U'))));
    }
}
