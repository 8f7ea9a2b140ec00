//! PC/SC readers: which are connected, which hold a card, which cards are PIV tokens.

use std::ffi::CString;
use std::time::Duration;

use yubikey::YubiKey;

use super::TokenError;

/// A PIV token seen in a reader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresentToken {
    pub reader: String,
    pub serial: u32,
}

/// What a reader holds right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReaderContent {
    Empty,
    /// A card that answers as a PIV token.
    Token(PresentToken),
    /// A card that is not a PIV token (or is in exclusive use by another program).
    OtherCard(String),
}

pub(crate) fn context() -> Result<pcsc::Context, TokenError> {
    pcsc::Context::establish(pcsc::Scope::System).map_err(|e| TokenError::from_pcsc(e, None))
}

/// Names of all readers pcscd knows. No reader is `Ok(vec![])`.
pub fn reader_names() -> Result<Vec<String>, TokenError> {
    let ctx = context()?;
    match ctx.list_readers_owned() {
        Ok(names) => Ok(names
            .into_iter()
            .map(|n| n.to_string_lossy().into_owned())
            .collect()),
        Err(pcsc::Error::NoReadersAvailable) => Ok(Vec::new()),
        Err(e) => Err(TokenError::from_pcsc(e, None)),
    }
}

/// Whether a card sits in `reader`, from pcscd's reader state (no card I/O).
pub fn card_present(ctx: &pcsc::Context, reader: &str) -> Result<bool, TokenError> {
    let name = CString::new(reader).map_err(|_| TokenError::NoReader)?;
    let mut states = [pcsc::ReaderState::new(name, pcsc::State::UNAWARE)];
    ctx.get_status_change(Duration::ZERO, &mut states)
        .map_err(|e| TokenError::from_pcsc(e, None))?;
    Ok(states[0].event_state().contains(pcsc::State::PRESENT))
}

/// What every reader holds.
pub fn survey() -> Result<Vec<(String, ReaderContent)>, TokenError> {
    let names = reader_names()?;
    if names.is_empty() {
        return Err(TokenError::NoReader);
    }
    let ctx = context()?;
    let mut out = Vec::new();
    for reader in names {
        let content = if !card_present(&ctx, &reader)? {
            ReaderContent::Empty
        } else {
            match open_yubikey(&reader) {
                Ok(yk) => {
                    let token = PresentToken {
                        reader: reader.clone(),
                        serial: u32::from(yk.serial()),
                    };
                    leave(yk);
                    ReaderContent::Token(token)
                }
                Err(TokenError::NoService) => return Err(TokenError::NoService),
                Err(e) => ReaderContent::OtherCard(e.to_string()),
            }
        };
        out.push((reader, content));
    }
    Ok(out)
}

/// Every PIV token present.
pub fn piv_tokens() -> Result<Vec<PresentToken>, TokenError> {
    Ok(survey()?
        .into_iter()
        .filter_map(|(_, content)| match content {
            ReaderContent::Token(t) => Some(t),
            _ => None,
        })
        .collect())
}

/// "10000001 in Virtual PCD 00 00, 10000002 in …" for error messages.
pub fn describe(tokens: &[PresentToken]) -> String {
    if tokens.is_empty() {
        return "none".into();
    }
    tokens
        .iter()
        .map(|t| format!("{} in \"{}\"", t.serial, t.reader))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Connect to the PIV applet of the card in `reader`.
pub(crate) fn open_yubikey(reader: &str) -> Result<YubiKey, TokenError> {
    let mut ctx = yubikey::reader::Context::open().map_err(|e| pcsc_or_device(e, reader))?;
    let readers = ctx.iter().map_err(|e| pcsc_or_device(e, reader))?;
    for candidate in readers {
        if candidate.name() == reader {
            return candidate.open().map_err(|e| pcsc_or_device(e, reader));
        }
    }
    Err(TokenError::NoReader)
}

fn pcsc_or_device(err: yubikey::Error, reader: &str) -> TokenError {
    let name = super::TokenName {
        serial: None,
        reader: Some(reader.to_string()),
    };
    TokenError::from_device(err, &name, "opening the PIV application")
}

/// Disconnect without resetting the card, so we do not disturb other programs.
pub(crate) fn leave(yk: YubiKey) {
    let _ = yk.disconnect(pcsc::Disposition::LeaveCard);
}
