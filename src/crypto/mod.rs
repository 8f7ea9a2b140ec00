//! Cryptographic primitives for the vault: key types, AEAD, HKDF, Argon2id.
//!
//! Everything secret that passes through this layer lives in a
//! [`SecretBytes`](crate::secrets::SecretBytes) (locked, non-dumpable, wiped on
//! drop), and the expanded key schedules that `ring` builds from those secrets
//! live in the same kind of memory (see `locked`), so locking the vault can wipe
//! them too.
//!
//! - [`keys`]: the master key and the sub-keys derived from it by HKDF.
//! - [`aead`]: AES-256-GCM for sectors ([`SectorCipher`]) and small sealed
//!   things such as key slots ([`aead::seal`], [`aead::open`]).
//! - [`kdf`]: Argon2id for the password, HKDF for key-encryption keys.
//! - [`mac`]: HMAC-SHA256 for the keyed header MAC.
//!
//! Nothing here panics on bad input: a wrong key or tampered data is
//! [`CryptoError::Authentication`].

pub mod aead;
mod hkdf;
pub mod kdf;
pub mod keys;
mod locked;
pub mod mac;
mod random;

pub use aead::{NONCE_LEN, RANDOM_NONCE_SEAL_LIMIT, SectorCipher, TAG_LEN, random_nonce};
pub use kdf::{
    Argon2Params, SALT_LEN, argon2id, calibrate, generate_recovery_key, key_encryption_key,
    new_slot_params, random_salt, recovery_kek, slot_info,
};
pub use keys::{CONTAINER_ID_LEN, KEY_LEN, KeyPurpose, MasterKey, SubKey};
pub use mac::{HeaderMac, MAC_LEN};

use crate::secrets::SecretError;

/// Why a cryptographic operation failed. Messages are meant for a person.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// The one answer for a wrong key, a wrong password or token, and tampered
    /// or damaged data: AEAD and MAC checks cannot tell these apart, and
    /// telling an attacker which one happened would only help them.
    #[error("authentication failed: wrong key, or the data was changed or damaged")]
    Authentication,

    #[error("{what} must be {expected} bytes long, not {actual}")]
    Length {
        what: &'static str,
        expected: usize,
        actual: usize,
    },

    /// A sub-key was handed to the primitive of another purpose; using one key
    /// for two purposes would void the separation HKDF labels give us.
    #[error("a {actual} key cannot be used for {expected}")]
    WrongPurpose {
        expected: KeyPurpose,
        actual: KeyPurpose,
    },

    #[error("Argon2id parameter {field} = {value} is {problem}")]
    Argon2Params {
        field: &'static str,
        value: u32,
        problem: String,
    },

    #[error("Argon2id failed: {0}")]
    Argon2(String),

    #[error("{len} bytes is too long for one AES-256-GCM message")]
    TooLong { len: usize },

    #[error("the system's random number generator failed")]
    Random,

    #[error(transparent)]
    Secret(#[from] SecretError),
}

/// Check a secret's length, naming what it is in the error.
pub(crate) fn check_len(
    what: &'static str,
    actual: usize,
    expected: usize,
) -> Result<(), CryptoError> {
    if actual == expected {
        Ok(())
    } else {
        Err(CryptoError::Length {
            what,
            expected,
            actual,
        })
    }
}
