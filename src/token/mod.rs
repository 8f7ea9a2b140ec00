//! PIV tokens over PC/SC: find them, provision a keybound key, verify the PIN,
//! do the ECDH that unwraps a vault, and watch that the token stays plugged in.
//!
//! Built on the `yubikey` crate for the PIV protocol and `pcsc` for readers and
//! presence. See docs/token-binding.md for what lives on the card and why.

mod binding;
mod device;
mod error;
mod info;
mod presence;
mod readers;
mod setup;

pub use binding::{CERT_ORGANIZATION, EphemeralShare, SharedSecret, TokenPublicKey};
pub use device::{KeySlot, LastTry, Token, retired_slots};
pub use error::{TokenError, TokenName};
pub use info::{KeyInfo, TokenInfo, list_tokens};
pub use presence::{Presence, Watch, next_event};
pub use readers::{PresentToken, ReaderContent, describe, piv_tokens, reader_names, survey};
pub use setup::{
    DEFAULT_PIN, DEFAULT_PUK, PinPolicyChoice, SetupOptions, SetupPrompts, SetupReport,
    TouchPolicyChoice, setup,
};

use crate::secrets::SecretBytes;

/// A PIV PIN: 6 to 8 bytes, in locked memory, wiped on drop.
pub struct Pin(SecretBytes);

impl Pin {
    pub fn new(secret: SecretBytes) -> Result<Self, TokenError> {
        match secret.len() {
            6..=8 => Ok(Pin(secret)),
            len => Err(TokenError::BadPinLength { len }),
        }
    }

    pub fn from_slice(bytes: &[u8]) -> Result<Self, TokenError> {
        Self::new(SecretBytes::from_slice(bytes)?)
    }

    pub fn expose(&self) -> &[u8] {
        self.0.expose()
    }
}

impl std::fmt::Debug for Pin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pin(redacted)")
    }
}
