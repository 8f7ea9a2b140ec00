//! Opening and closing vaults: create a container bound to a token, unlock
//! it with password + token, serve it through FUSE, record it for `status`.
//!
//! Data flows one way: the CLI asks for secrets and calls in here; this layer
//! drives the token and the container, builds the filesystem on the unlocked
//! store and hands it to the FUSE adapter. Nothing here prints.

pub mod admin;
pub mod backup;
pub mod compact;
pub mod control;
pub mod create;
pub mod daemon;
pub mod mountpoint;
mod overlay;
pub mod registry;
mod storage;
pub mod tether;
pub mod unlock;
pub mod verify;

use std::path::PathBuf;

use crate::container::ContainerError;
use crate::crypto::CryptoError;
use crate::secrets::SecretError;
use crate::token::TokenError;

pub use mountpoint::MountpointError;
pub use registry::MountRecord;

/// Why opening, creating or serving a vault failed. Messages name the file or
/// token involved and say what to do; they never contain a secret.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Container(#[from] ContainerError),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error(transparent)]
    Mountpoint(#[from] MountpointError),

    #[error(
        "wrong password for {vault} (key slot {slot}, token {serial}: the PIN was right); \
         if the password is right, the key slot is damaged: restore a header backup"
    )]
    WrongPassword {
        vault: PathBuf,
        slot: u8,
        serial: u32,
    },
    #[error(
        "{vault} is already open: mounted at {mountpoint} by process {pid}; \
         unmount it first (keybound unmount {mountpoint})"
    )]
    AlreadyMounted {
        vault: PathBuf,
        mountpoint: String,
        pid: u32,
    },
    #[error("{vault} has no key slot for a token; open it with its recovery key")]
    NoTokenSlot { vault: PathBuf },
    #[error(
        "no token enrolled in {vault} is plugged in; plug in {enrolled} \
         (present: {present})"
    )]
    TokenNotEnrolled {
        vault: PathBuf,
        enrolled: String,
        present: String,
    },
    #[error(
        "several tokens enrolled in {vault} are plugged in ({present}); choose one with --serial"
    )]
    AmbiguousToken { vault: PathBuf, present: String },
    #[error(
        "token {serial} has no keybound key; provision it with `keybound token setup --serial {serial}`"
    )]
    NoKeyOnToken { serial: u32 },
    #[error("token {serial} has several keybound keys (slots {slots}); choose one with --slot")]
    SeveralKeysOnToken { serial: u32, slots: String },
    #[error(
        "key slot {slot} of {vault} has a temporary password set by an admin; change it \
         first: keybound passwd {vault} --slot {slot} (needs the token and the temporary password)",
        vault = vault.display()
    )]
    PasswordChangeRequired { vault: PathBuf, slot: u8 },
    #[error(
        "the recovery key does not open {vault} (no recovery key slot accepts it); check it \
         for typos",
        vault = vault.display()
    )]
    WrongRecoveryKey { vault: PathBuf },
    #[error("the password must be at least {min} characters long")]
    PasswordTooShort { min: usize },
    #[error(
        "FUSE is not available: {detail}. Load the module (`modprobe fuse`); in a container, \
         pass the device through (`--device /dev/fuse`)"
    )]
    NoFuse { detail: String },
    #[error("the filesystem inside {vault} cannot be opened: {detail}")]
    Filesystem { vault: PathBuf, detail: String },
    #[error(
        "{vault} was not closed cleanly (its mount daemon was killed or crashed), and a \
         read-only mount cannot run the recovery, which writes. Mount it read-write once \
         (`keybound mount {vault} DIR`; it reopens at its last commit, with everything that \
         was fsynced), unmount it, then mount it read-only"
    )]
    NeedsRecovery { vault: PathBuf },
    #[error("mounting {vault} on {mountpoint} failed: {source}")]
    Mount {
        vault: PathBuf,
        mountpoint: PathBuf,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}
