//! What `keybound token list` reports about every token present.

use serde::Serialize;
use yubikey::piv::{self, SlotId};
use yubikey::{PinPolicy, TouchPolicy};

use super::device::retired_slot;
use super::readers::{self, ReaderContent};
use super::{Token, TokenError};

#[derive(Debug, Serialize)]
pub struct TokenInfo {
    pub reader: String,
    /// `None` when the reader holds a card that is not a usable PIV token.
    pub serial: Option<u32>,
    pub version: Option<String>,
    pub pin_tries_left: Option<u8>,
    pub keybound_keys: Vec<KeyInfo>,
    /// Why the card could not be read, if it could not.
    pub problem: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct KeyInfo {
    /// Retired slot, hex ("82").
    pub slot: String,
    pub label: String,
    pub fingerprint: String,
    /// "always", "once", "never", or null if the card cannot say (firmware < 5.3).
    pub pin_policy: Option<String>,
    pub touch_policy: Option<String>,
}

/// Every token present, with its keybound keys. Empty readers are left out.
pub fn list_tokens() -> Result<Vec<TokenInfo>, TokenError> {
    let mut out = Vec::new();
    for (reader, content) in readers::survey()? {
        match content {
            ReaderContent::Empty => {}
            ReaderContent::OtherCard(problem) => out.push(TokenInfo {
                reader,
                serial: None,
                version: None,
                pin_tries_left: None,
                keybound_keys: Vec::new(),
                problem: Some(problem),
            }),
            ReaderContent::Token(_) => out.push(describe_token(&reader)?),
        }
    }
    Ok(out)
}

fn describe_token(reader: &str) -> Result<TokenInfo, TokenError> {
    let mut token = Token::open_reader(reader)?;
    let pin_tries_left = Some(token.pin_tries_left()?);
    let mut keybound_keys = Vec::new();
    for key in token.keybound_keys()? {
        let (pin_policy, touch_policy) = policies(&mut token, key.slot);
        keybound_keys.push(KeyInfo {
            slot: format!("{:02x}", key.slot),
            label: key.label,
            fingerprint: key.public_key.fingerprint(),
            pin_policy,
            touch_policy,
        });
    }
    Ok(TokenInfo {
        reader: reader.to_string(),
        serial: Some(token.serial()),
        version: Some(token.version()),
        pin_tries_left,
        keybound_keys,
        problem: None,
    })
}

fn policies(token: &mut Token, slot: u8) -> (Option<String>, Option<String>) {
    let Ok(retired) = retired_slot(slot) else {
        return (None, None);
    };
    match piv::metadata(token.yubikey(), SlotId::Retired(retired)) {
        Ok(meta) => match meta.policy {
            Some((pin, touch)) => (Some(pin_name(pin)), Some(touch_name(touch))),
            None => (None, None),
        },
        Err(_) => (None, None),
    }
}

fn pin_name(p: PinPolicy) -> String {
    match p {
        PinPolicy::Default => "default",
        PinPolicy::Never => "never",
        PinPolicy::Once => "once",
        PinPolicy::Always => "always",
    }
    .into()
}

fn touch_name(t: TouchPolicy) -> String {
    match t {
        TouchPolicy::Default => "default",
        TouchPolicy::Never => "never",
        TouchPolicy::Always => "always",
        TouchPolicy::Cached => "cached",
    }
    .into()
}
