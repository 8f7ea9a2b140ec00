//! Stable exit codes, so scripts can tell failures apart (as gocryptfs does).
//! Documented in docs/user-guide.md; never renumber one.

use keybound::container::ContainerError;
use keybound::session::SessionError;
use keybound::session::admin::{AdminError, RecoveryKeyError};
use keybound::session::backup::BackupError;
use keybound::session::tether::LockReason;
use keybound::token::{Presence, TokenError};

pub const OK: i32 = 0;
/// Anything without a more specific code.
pub const OTHER: i32 = 1;
/// Bad command line (clap uses 2 as well).
pub const USAGE: i32 = 2;
/// pcscd is not running or stopped answering.
pub const NO_PCSCD: i32 = 10;
/// No reader, no token, or not the token asked for (or not one enrolled in the vault).
pub const NO_TOKEN: i32 = 11;
/// Several tokens present and none chosen.
pub const AMBIGUOUS_TOKEN: i32 = 12;
/// The PIN was wrong (tries remain).
pub const WRONG_PIN: i32 = 13;
/// The PIN is blocked, or only the last try is left and it was not allowed.
pub const PIN_BLOCKED: i32 = 14;
/// The token was removed during the operation.
pub const TOKEN_REMOVED: i32 = 15;
/// The token refused: slot occupied, no free slot, unknown management key, …
pub const TOKEN_REFUSED: i32 = 16;
/// A secret could not be read (file missing, no terminal) or locked in memory.
pub const SECRET_INPUT: i32 = 17;
/// The vault password was wrong (or the key slot is damaged).
pub const WRONG_PASSWORD: i32 = 20;
/// Not a keybound vault, both headers damaged, truncated, header tampered with.
pub const VAULT_DAMAGED: i32 = 21;
/// The vault is already open (mounted) somewhere.
pub const VAULT_IN_USE: i32 = 22;
/// The mountpoint is missing, not empty or already a mount point.
pub const BAD_MOUNTPOINT: i32 = 23;
/// FUSE is not available (/dev/fuse).
pub const NO_FUSE: i32 = 24;
/// The vault file exists already (create), or another refusal to overwrite.
pub const EXISTS: i32 = 25;
/// `unmount`: files are still open in the mount.
pub const MOUNT_BUSY: i32 = 26;
/// `mount --read-only` of a vault that was not closed cleanly: mount it read-write once.
pub const NEEDS_RECOVERY: i32 = 27;

// A mount daemon's exit status says why its vault locked (0: unmounted).
/// Locked by `keybound lock`.
pub const LOCKED_BY_COMMAND: i32 = 30;
/// Locked because the token was removed (or removed and put back).
pub const LOCKED_TOKEN_REMOVED: i32 = 31;
/// Locked because another card appeared in the token's reader.
pub const LOCKED_OTHER_CARD: i32 = 32;
/// Locked because the token's reader disappeared.
pub const LOCKED_READER_GONE: i32 = 33;
/// Locked because pcscd stopped or stopped answering.
pub const LOCKED_PCSCD_GONE: i32 = 34;
/// Locked by SIGTERM, SIGINT or SIGHUP.
pub const LOCKED_SIGNAL: i32 = 35;
/// Locked after the idle timeout.
pub const LOCKED_IDLE: i32 = 36;

/// `keybound audit verify`: the audit log's hash chain is broken (a line was
/// edited, removed, inserted or reordered, or the tail was cut).
pub const AUDIT_TAMPERED: i32 = 40;

// Admin commands (enroll, passwd, revoke, header, policy).
/// The key slot has a temporary password (set by an admin): run `keybound passwd` first.
pub const PASSWORD_CHANGE_REQUIRED: i32 = 41;
/// Refused by the vault policy (password too short, token PIN policy).
pub const POLICY_REFUSED: i32 = 42;
/// A key-slot change refused: the last slot (without --force), no such slot,
/// no free slot, a token enrolled already, a slot authorising its own change.
pub const SLOT_REFUSED: i32 = 43;
/// `header restore`: the file is not a header backup, belongs to another
/// vault, or the vault's data area moved on since (without --force).
pub const HEADER_MISMATCH: i32 = 44;
/// A confirmation was needed and not given (no terminal and no --yes, or not "yes").
pub const NOT_CONFIRMED: i32 = 45;
/// A master-key rotation (`keybound rekey`) was interrupted: run `keybound rekey VAULT` to finish it.
pub const REKEY_UNFINISHED: i32 = 46;
/// The key slot was carried over by a rotation and awaits `keybound rekey VAULT --activate`.
pub const SLOT_PENDING: i32 = 47;

// Backups (backup, snapshot, verify).
/// The vault locked or unmounted while a backup or snapshot held it, and the
/// copy could not be retaken: the copy may be torn; run the command again.
pub const HOLD_BROKEN: i32 = 50;
/// `keybound verify` found damage (a header copy, the geometry, a sector, the filesystem).
pub const VERIFY_DAMAGE: i32 = 51;
/// `backup --incremental`: the destination is not a copy of this vault.
pub const BACKUP_MISMATCH: i32 = 52;

/// The exit status of a mount daemon that locked for `reason`.
pub fn for_lock_reason(reason: &LockReason) -> i32 {
    match reason {
        LockReason::Unmounted => OK,
        LockReason::Command => LOCKED_BY_COMMAND,
        LockReason::Signal(_) => LOCKED_SIGNAL,
        LockReason::Idle(_) => LOCKED_IDLE,
        LockReason::Token(Presence::Removed | Presence::Reinserted) => LOCKED_TOKEN_REMOVED,
        LockReason::Token(Presence::DifferentCard { .. }) => LOCKED_OTHER_CARD,
        LockReason::Token(Presence::ReaderGone) => LOCKED_READER_GONE,
        LockReason::Token(Presence::ServiceGone | Presence::Present) => LOCKED_PCSCD_GONE,
    }
}

/// An error that carries its own exit code (e.g. relayed from the mount daemon).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct Coded {
    pub code: i32,
    pub message: String,
}

/// The exit code for a token error.
pub fn for_token_error(err: &TokenError) -> i32 {
    use TokenError as E;
    match err {
        E::NoService => NO_PCSCD,
        E::NoReader | E::NoToken | E::NotFound { .. } | E::KeyMismatch { .. } => NO_TOKEN,
        E::Ambiguous { .. } => AMBIGUOUS_TOKEN,
        E::WrongPin { .. } | E::WrongPuk { .. } | E::BadPinLength { .. } => WRONG_PIN,
        E::PinBlocked { .. } | E::LastPinTry { .. } | E::PukBlocked { .. } => PIN_BLOCKED,
        E::Removed { .. } | E::Busy { .. } => TOKEN_REMOVED,
        E::Secret(_) => SECRET_INPUT,
        E::UnknownManagementKey { .. }
        | E::ManagementKeyRejected { .. }
        | E::NoFreeSlot { .. }
        | E::SlotOccupied { .. }
        | E::NotRetiredSlot { .. }
        | E::NoKeyInSlot { .. }
        | E::Refused { .. } => TOKEN_REFUSED,
        _ => OTHER,
    }
}

/// The exit code for a container error.
pub fn for_container_error(err: &ContainerError) -> i32 {
    use ContainerError as E;
    match err {
        E::NotAContainer { .. }
        | E::UnsupportedVersion { .. }
        | E::BothHeadersDamaged { .. }
        | E::Truncated { .. }
        | E::HeaderMac { .. } => VAULT_DAMAGED,
        E::Locked { .. } => VAULT_IN_USE,
        E::Exists { .. } => EXISTS,
        E::SlotUnwrap { .. } => WRONG_PASSWORD,
        E::Secret(_) => SECRET_INPUT,
        E::LastSlot { .. } | E::NoSuchSlot { .. } | E::SlotInUse { .. } => SLOT_REFUSED,
        E::RekeyRefused { .. } => SLOT_REFUSED,
        E::RekeyInProgress { .. } => REKEY_UNFINISHED,
        E::SlotPending { .. } => SLOT_PENDING,
        E::BackupInvalid { .. } | E::BackupMismatch { .. } | E::BackupDataChanged { .. } => {
            HEADER_MISMATCH
        }
        _ => OTHER,
    }
}

/// The exit code for an admin error.
pub fn for_admin_error(err: &AdminError) -> i32 {
    use AdminError as E;
    match err {
        E::Session(s) => for_session_error(s),
        E::RecoveryKey(RecoveryKeyError::Secret(_)) => SECRET_INPUT,
        E::RecoveryKey(RecoveryKeyError::Crypto(_)) => OTHER,
        E::RecoveryKey(_) => WRONG_PASSWORD,
        E::PasswordTooShort { .. } | E::PinPolicy { .. } => POLICY_REFUSED,
        E::NoFreeSlot { .. }
        | E::AlreadyEnrolled { .. }
        | E::SelfAuthority { .. }
        | E::NotATokenSlot { .. }
        | E::NoRecoverySlot { .. }
        | E::NoSuchSlot { .. } => SLOT_REFUSED,
    }
}

/// The exit code for a session error.
pub fn for_session_error(err: &SessionError) -> i32 {
    use SessionError as E;
    match err {
        E::Token(t) => for_token_error(t),
        E::Container(c) => for_container_error(c),
        E::Secret(_) => SECRET_INPUT,
        E::Mountpoint(_) => BAD_MOUNTPOINT,
        E::WrongPassword { .. } => WRONG_PASSWORD,
        E::AlreadyMounted { .. } => VAULT_IN_USE,
        E::TokenNotEnrolled { .. } | E::NoTokenSlot { .. } | E::NoKeyOnToken { .. } => NO_TOKEN,
        E::AmbiguousToken { .. } | E::SeveralKeysOnToken { .. } => AMBIGUOUS_TOKEN,
        E::NoFuse { .. } => NO_FUSE,
        E::PasswordChangeRequired { .. } => PASSWORD_CHANGE_REQUIRED,
        E::WrongRecoveryKey { .. } => WRONG_PASSWORD,
        E::PasswordTooShort { .. } => POLICY_REFUSED,
        E::NeedsRecovery { .. } => NEEDS_RECOVERY,
        _ => OTHER,
    }
}

/// The exit code for a backup error.
pub fn for_backup_error(err: &BackupError) -> i32 {
    use BackupError as E;
    match err {
        E::Container(c) => for_container_error(c),
        E::Busy { .. } => VAULT_IN_USE,
        E::HoldBroken { .. } => HOLD_BROKEN,
        E::NotACopy { .. } | E::NoCopyToUpdate { .. } => BACKUP_MISMATCH,
        E::SameFile { .. } | E::KeepNeedsDirectory { .. } => USAGE,
        E::CopyUnusable { .. } => VERIFY_DAMAGE,
        E::Io { .. } | E::Control { .. } => OTHER,
    }
}

/// The exit code for any error the CLI returns: the most specific cause wins.
pub fn for_error(err: &anyhow::Error) -> i32 {
    for cause in err.chain() {
        if let Some(coded) = cause.downcast_ref::<Coded>() {
            return coded.code;
        }
        if let Some(b) = cause.downcast_ref::<BackupError>() {
            return for_backup_error(b);
        }
        if let Some(a) = cause.downcast_ref::<AdminError>() {
            return for_admin_error(a);
        }
        if let Some(s) = cause.downcast_ref::<SessionError>() {
            return for_session_error(s);
        }
        if let Some(c) = cause.downcast_ref::<ContainerError>() {
            return for_container_error(c);
        }
        if let Some(t) = cause.downcast_ref::<TokenError>() {
            return for_token_error(t);
        }
        if cause
            .downcast_ref::<keybound::session::MountpointError>()
            .is_some()
        {
            return BAD_MOUNTPOINT;
        }
        if cause
            .downcast_ref::<keybound::secrets::SecretError>()
            .is_some()
        {
            return SECRET_INPUT;
        }
    }
    OTHER
}
