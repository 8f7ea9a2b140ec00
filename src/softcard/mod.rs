//! A software PIV card for tests, demos and CI: a YubiKey 5 PIV applet
//! (firmware 5.4.3) plugged into the real pcscd through vsmartcard's virtual
//! reader (vpcd), good enough for the `yubikey` crate and yubico-piv-tool.
//!
//! **TEST DEVICE, NOT SECURE.** PIN, PUK, management key and private keys
//! are stored unencrypted in the JSON state file.
//!
//! Layers, bottom up:
//! - [`tlv`]: BER-TLV parsing and encoding,
//! - [`apdu`]: command/response APDUs and status words,
//! - `crypto`: 3DES (management key) and P-256 (slots),
//! - `state`: the persisted card ([`CardState`], [`StateStore`]),
//! - `applet`: the PIV instructions and the session's security state,
//! - `card`: [`Card`], the transport (chaining, GET RESPONSE, power events),
//! - `vpcd`: [`run`], the connection to pcscd's virtual reader.
//!
//! Tests can drive a [`Card`] directly with APDUs, without pcscd:
//!
//! ```
//! let mut card = keybound::softcard::Card::in_memory(12345678);
//! let select = [0x00, 0xA4, 0x04, 0x00, 0x05, 0xA0, 0x00, 0x00, 0x03, 0x08];
//! assert!(card.transmit(&select).ends_with(&[0x90, 0x00]));
//! assert_eq!(card.transmit(&[0x00, 0xFD, 0x00, 0x00]), [5, 4, 3, 0x90, 0x00]);
//! ```

pub mod apdu;
mod applet;
mod card;
mod crypto;
mod error;
mod state;
pub mod tlv;
mod vpcd;

pub use applet::{PIV_AID, VERSION};
pub use card::{ATR, Card};
pub use error::SoftcardError;
pub use state::{
    CardState, DEFAULT_MGM_KEY, DEFAULT_PIN, DEFAULT_PUK, DEFAULT_TRIES, Origin, PinPolicy,
    Reference, SlotKey, StateStore, TouchPolicy,
};
pub use vpcd::{DEFAULT_HOST, Event, Options, VPCD_BASE_PORT, run};

/// The warning every user-facing entry point shows.
pub const NOT_SECURE_WARNING: &str = "TEST DEVICE, NOT SECURE: this software card keeps its PIN, \
     PUK, management key and private keys unencrypted in the state file. Never use it for real secrets.";
