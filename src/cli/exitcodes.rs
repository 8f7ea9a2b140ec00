//! Stable exit codes, so scripts can tell failures apart (as gocryptfs does).
//! Documented in docs/user-guide.md; never renumber one.

use keybound::token::TokenError;

pub const OK: i32 = 0;
/// Anything without a more specific code.
pub const OTHER: i32 = 1;
/// Bad command line (clap uses 2 as well).
pub const USAGE: i32 = 2;
/// pcscd is not running or stopped answering.
pub const NO_PCSCD: i32 = 10;
/// No reader, no token, or not the token asked for.
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

/// The exit code for any error the CLI returns: the most specific cause wins.
pub fn for_error(err: &anyhow::Error) -> i32 {
    for cause in err.chain() {
        if let Some(t) = cause.downcast_ref::<TokenError>() {
            return for_token_error(t);
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
