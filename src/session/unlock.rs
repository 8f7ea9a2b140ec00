//! Password + token → master key.
//!
//! Choosing the key slot needs no secret (which enrolled token is plugged
//! in?), so the CLI can report a missing or foreign token before it asks for
//! anything. Unlocking then verifies the PIN (refusing to spend the last
//! try), lets the card compute the ECDH secret with the slot's ephemeral key,
//! runs Argon2id on the password and unwraps the master key (docs/FORMAT.md §2).

use std::path::Path;

use super::SessionError;
use crate::container::{Container, ContainerError, HeaderInfo, SlotInfo, SlotKind};
use crate::crypto::{MasterKey, argon2id, key_encryption_key, slot_info};
use crate::secrets::SecretBytes;
use crate::token::{self, LastTry, Pin, Token, TokenError, TokenPublicKey, Watch};

/// The token slot a present token can open.
#[derive(Debug, Clone)]
pub struct Choice {
    pub slot: SlotInfo,
    pub serial: u32,
}

/// Which key slot to use: the one bound to a token that is plugged in
/// (`serial` narrows the choice). Costs no PIN try.
pub fn choose_slot(
    vault: &Path,
    header: &HeaderInfo,
    serial: Option<u32>,
) -> Result<Choice, SessionError> {
    let token_slots: Vec<(&SlotInfo, u32)> = header
        .slots
        .iter()
        .filter_map(|s| match &s.kind {
            SlotKind::Token { serial, .. } => Some((s, *serial)),
            _ => None,
        })
        .collect();
    if token_slots.is_empty() {
        return Err(SessionError::NoTokenSlot {
            vault: vault.to_path_buf(),
        });
    }
    let present = token::piv_tokens()?;
    let candidates: Vec<Choice> = token_slots
        .iter()
        .filter(|(_, s)| serial.is_none_or(|want| want == *s))
        .filter(|(_, s)| present.iter().any(|p| p.serial == *s))
        .map(|(slot, s)| Choice {
            slot: (*slot).clone(),
            serial: *s,
        })
        .collect();
    match candidates.as_slice() {
        [one] => Ok(one.clone()),
        [] if present.is_empty() => Err(TokenError::NoToken.into()),
        [] => Err(SessionError::TokenNotEnrolled {
            vault: vault.to_path_buf(),
            enrolled: describe_enrolled(&token_slots),
            present: token::describe(&present),
        }),
        several => Err(SessionError::AmbiguousToken {
            vault: vault.to_path_buf(),
            present: several
                .iter()
                .map(|c| format!("token {} (slot {})", c.serial, c.slot.index))
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

fn describe_enrolled(slots: &[(&SlotInfo, u32)]) -> String {
    let names: Vec<String> = slots
        .iter()
        .map(|(slot, serial)| format!("token {serial} (slot {})", slot.index))
        .collect();
    names.join(" or ")
}

/// Unwrap the master key of `choice`'s slot with the token and the password.
pub fn unlock(
    container: &Container,
    choice: &Choice,
    password: &SecretBytes,
    pin: &Pin,
    last_try: LastTry,
) -> Result<MasterKey, SessionError> {
    unlock_and_watch(container, choice, password, pin, last_try).map(|(key, _)| key)
}

/// [`unlock`], and a presence watch on the token that unlocked, started
/// before its PIN is checked so that a swap of cards in between is seen.
/// A slot whose password an admin set (must be changed) is refused before
/// the PIN is touched: only `keybound passwd` opens it ([`unlock_slot`]).
pub fn unlock_and_watch(
    container: &Container,
    choice: &Choice,
    password: &SecretBytes,
    pin: &Pin,
    last_try: LastTry,
) -> Result<(MasterKey, Watch), SessionError> {
    if choice.slot.flags.must_change_password {
        return Err(SessionError::PasswordChangeRequired {
            vault: container.path().to_path_buf(),
            slot: choice.slot.index,
        });
    }
    unlock_slot(container, choice, password, pin, last_try)
}

/// [`unlock_and_watch`] without the temporary-password check, for
/// `keybound passwd`, which is how such a slot gets its own password.
pub fn unlock_slot(
    container: &Container,
    choice: &Choice,
    password: &SecretBytes,
    pin: &Pin,
    last_try: LastTry,
) -> Result<(MasterKey, Watch), SessionError> {
    let SlotKind::Token {
        card_public,
        ephemeral_public,
        argon,
        ..
    } = &choice.slot.kind
    else {
        return Err(SessionError::NoTokenSlot {
            vault: container.path().to_path_buf(),
        });
    };
    let card_key = TokenPublicKey::from_sec1(card_public)?;
    let ephemeral = TokenPublicKey::from_sec1(ephemeral_public)?;
    let (mut token, piv_slot) = Token::find_key(Some(choice.serial), &card_key)?;
    let watch = Watch::new(token.reader(), choice.serial)?;
    token.verify_pin(pin, last_try)?;
    let shared = token.ecdh(piv_slot, &ephemeral)?;
    drop(token);

    let salt = &choice.slot.salt;
    let password_hash = argon2id(password, salt, *argon)?;
    let info = slot_info(&container.info().id, choice.slot.index);
    let kek = key_encryption_key(shared.expose(), &password_hash, salt, &info)?;
    let key = container
        .unwrap_slot(choice.slot.index, &kek)
        .map_err(|e| match e {
            ContainerError::SlotUnwrap { .. } => SessionError::WrongPassword {
                vault: container.path().to_path_buf(),
                slot: choice.slot.index,
                serial: choice.serial,
            },
            other => other.into(),
        })?;
    Ok((key, watch))
}
