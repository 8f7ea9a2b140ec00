//! Token errors: each one says which token and what the user can do about it.

use std::fmt;

/// How a token is named in messages: serial if known, else reader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenName {
    pub serial: Option<u32>,
    pub reader: Option<String>,
}

impl fmt::Display for TokenName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.serial, &self.reader) {
            (Some(s), Some(r)) => write!(f, "token {s} (reader \"{r}\")"),
            (Some(s), None) => write!(f, "token {s}"),
            (None, Some(r)) => write!(f, "the token in reader \"{r}\""),
            (None, None) => write!(f, "the token"),
        }
    }
}

impl TokenName {
    pub fn serial(serial: u32) -> Self {
        TokenName {
            serial: Some(serial),
            reader: None,
        }
    }
}

fn tries(n: u8) -> String {
    if n == 1 {
        "1 try".into()
    } else {
        format!("{n} tries")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(
        "pcscd, the smart-card service, is not running; start it (`pcscd`, or \
         `systemctl start pcscd.socket`) and try again"
    )]
    NoService,
    #[error("no smart-card reader is connected; plug in your token and try again")]
    NoReader,
    #[error("no PIV token is plugged in; plug in your token and try again")]
    NoToken,
    #[error(
        "no token with serial {serial} is plugged in (present: {present}); plug it in and try again"
    )]
    NotFound { serial: u32, present: String },
    #[error("several tokens are plugged in ({present}); choose one with --serial")]
    Ambiguous { present: String },
    #[error("{token} was removed during the operation; plug it back in and try again")]
    Removed { token: TokenName },
    #[error("{token} is in use by another program (exclusive access); close it and try again")]
    Busy { token: TokenName },
    #[error("wrong PIN for {token}: {} left before the PIN is blocked", tries(*.tries_left))]
    WrongPin { token: TokenName, tries_left: u8 },
    #[error(
        "the PIN of {token} is blocked; unblock it with the PUK \
         (`yubico-piv-tool -a unblock-pin`, or `ykman piv access unblock-pin`)"
    )]
    PinBlocked { token: TokenName },
    #[error(
        "{token} has only one PIN try left; a wrong PIN now would block it. Check the PIN \
         and pass --allow-last-pin-try to spend the last try"
    )]
    LastPinTry { token: TokenName },
    #[error("wrong PUK for {token}: {} left before the PUK is blocked", tries(*.tries_left))]
    WrongPuk { token: TokenName, tries_left: u8 },
    #[error(
        "the PUK of {token} is blocked; only a PIV reset can recover the token (it erases all its keys)"
    )]
    PukBlocked { token: TokenName },
    #[error("a PIN must be 6 to 8 bytes long ({len} given)")]
    BadPinLength { len: usize },
    #[error(
        "{token} uses a management key keybound does not know (not the default, not \
         PIN-protected); pass it with --management-key-file FILE (48 hex digits)"
    )]
    UnknownManagementKey { token: TokenName },
    #[error("the management key of {token} was rejected")]
    ManagementKeyRejected { token: TokenName },
    #[error(
        "{token} has no free retired slot (82–95) for a keybound key; free one with `ykman piv keys delete`"
    )]
    NoFreeSlot { token: TokenName },
    #[error(
        "slot {slot:02x} of {token} already holds a key; keybound never overwrites a key — choose another slot"
    )]
    SlotOccupied { token: TokenName, slot: u8 },
    #[error("slot {slot:02x} is not a retired PIV slot (82–95)")]
    NotRetiredSlot { slot: u8 },
    #[error("{token} has no keybound key in slot {slot:02x}")]
    NoKeyInSlot { token: TokenName, slot: u8 },
    #[error("{token} does not hold the key this vault was bound to (fingerprint {fingerprint})")]
    KeyMismatch {
        token: TokenName,
        fingerprint: String,
    },
    #[error("the public key is not a valid P-256 point")]
    BadPublicKey,
    #[error("the certificate is not a keybound P-256 certificate: {0}")]
    BadCertificate(String),
    #[error("{token} refused the operation: {what} (needs the PIN first?)")]
    Refused { token: TokenName, what: String },
    #[error("{token}: {what} failed: {detail}")]
    Device {
        token: TokenName,
        what: String,
        detail: String,
    },
    #[error("the smart-card service failed: {0}")]
    Pcsc(String),
    #[error(transparent)]
    Secret(#[from] crate::secrets::SecretError),
}

impl TokenError {
    /// Translate a PC/SC error into a user-facing one.
    pub(crate) fn from_pcsc(err: pcsc::Error, token: Option<&TokenName>) -> Self {
        use pcsc::Error as E;
        let token = || {
            token.cloned().unwrap_or(TokenName {
                serial: None,
                reader: None,
            })
        };
        match err {
            E::NoService | E::ServiceStopped | E::CommError => TokenError::NoService,
            E::NoReadersAvailable | E::ReaderUnavailable | E::UnknownReader => TokenError::NoReader,
            E::RemovedCard | E::ResetCard | E::NoSmartcard => {
                TokenError::Removed { token: token() }
            }
            E::SharingViolation => TokenError::Busy { token: token() },
            other => TokenError::Pcsc(other.to_string()),
        }
    }

    /// Translate a `yubikey` crate error for `what`, done on `token`.
    pub(crate) fn from_device(err: yubikey::Error, token: &TokenName, what: &str) -> Self {
        use yubikey::Error as E;
        match err {
            E::PcscError { inner: Some(e) } => Self::from_pcsc(e, Some(token)),
            E::PcscError { inner: None } => TokenError::Removed {
                token: token.clone(),
            },
            E::WrongPin { tries: 0 } | E::PinLocked => TokenError::PinBlocked {
                token: token.clone(),
            },
            E::WrongPin { tries } => TokenError::WrongPin {
                token: token.clone(),
                tries_left: tries,
            },
            E::AuthenticationError => TokenError::Refused {
                token: token.clone(),
                what: what.to_string(),
            },
            other => TokenError::Device {
                token: token.clone(),
                what: what.to_string(),
                detail: other.to_string(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name() -> TokenName {
        TokenName {
            serial: Some(10_000_001),
            reader: Some("Virtual PCD 00 00".into()),
        }
    }

    #[test]
    fn pcsc_failures_become_actionable_messages() {
        let no_reader = TokenError::from_pcsc(pcsc::Error::NoReadersAvailable, None);
        assert!(matches!(no_reader, TokenError::NoReader));
        assert!(no_reader.to_string().contains("plug in your token"));
        let gone = TokenError::from_pcsc(pcsc::Error::NoService, None);
        assert!(gone.to_string().contains("pcscd"));
        let removed = TokenError::from_pcsc(pcsc::Error::RemovedCard, Some(&name()));
        assert!(removed.to_string().contains("token 10000001"), "{removed}");
        assert!(removed.to_string().contains("plug it back in"), "{removed}");
    }

    #[test]
    fn pin_errors_name_the_token_and_tries_left() {
        let wrong = TokenError::from_device(yubikey::Error::WrongPin { tries: 2 }, &name(), "x");
        assert_eq!(
            wrong.to_string(),
            "wrong PIN for token 10000001 (reader \"Virtual PCD 00 00\"): 2 tries left before the PIN is blocked"
        );
        let blocked = TokenError::from_device(yubikey::Error::WrongPin { tries: 0 }, &name(), "x");
        assert!(matches!(blocked, TokenError::PinBlocked { .. }));
    }
}
