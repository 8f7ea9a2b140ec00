//! Master-key rotation, the session side (FORMAT.md §7, threat-model.md).
//!
//! The container re-encrypts; this module supplies what needs a token, a
//! password or a recovery key:
//!
//! - the authorising slot is wrapped for the new master key at once: the
//!   admin gave its password (or recovery key), and its card's public key is
//!   in the slot, so a fresh ECDH share + salt + Argon2id give a new KEK, as
//!   `passwd` does (the slot's Argon2id parameters are kept);
//! - every other token slot gets a *link*: the new master key sealed under
//!   HKDF(S' ‖ K_link), where S' is a fresh ECDH share with that slot's card
//!   key (only that card can compute it again) and K_link comes from the old
//!   master key (which only that slot's password + card, or another old
//!   slot, gives). Its owner activates it once ([`activate`]);
//! - recovery slots other than the authorising one cannot be carried over
//!   (a recovery key has no public half to encrypt to): the admin must agree
//!   to remove them (`--drop-recovery`) and may enrol a new one afterwards.

use super::{AdminError, Authority};
use crate::container::{Container, ContainerError, NewSlot, NewSlotKind, SlotCarry, SlotKind};
use crate::crypto::{
    MasterKey, argon2id, key_encryption_key, random_salt, recovery_kek, slot_info,
};
use crate::secrets::SecretBytes;
use crate::session::SessionError;
use crate::session::create::{TokenSlot, sec1_array};
use crate::session::unlock::Choice;
use crate::token::{EphemeralShare, LastTry, Pin, Token, TokenPublicKey};

/// The secret the authority gave, to wrap the new key in its slot.
pub enum AuthoritySecret<'a> {
    /// A token slot's password.
    Password(&'a SecretBytes),
    /// The recovery key, and the recovery slot it opened.
    RecoveryKey { key: &'a SecretBytes, slot: u8 },
}

/// Recovery slots the rotation would have to remove: all of them, except
/// the one the recovery-key authority opens (unknown before unlock, so with
/// a recovery authority one of them is expected to stay).
pub fn recovery_slots_lost(container: &Container, authority: &Authority) -> usize {
    let n = container
        .info()
        .slots
        .iter()
        .filter(|s| s.kind == SlotKind::Recovery)
        .count();
    match authority {
        Authority::Recovery => n.saturating_sub(1),
        Authority::Token(_) => n,
    }
}

/// How each slot is carried over: computed before any sector is touched, so
/// that a failure here (Argon2id memory, a bad card key) changes nothing.
pub fn carry_plan(
    container: &Container,
    authority_slot: u8,
    secret: AuthoritySecret,
    drop_recovery: bool,
) -> Result<Vec<SlotCarry>, AdminError> {
    let header = container.info();
    let vault = container.path().to_path_buf();
    let mut plan = Vec::new();
    for slot in &header.slots {
        let info = slot_info(&header.id, slot.index);
        match (&slot.kind, &secret) {
            (
                SlotKind::Token {
                    serial,
                    piv_slot,
                    card_public,
                    argon,
                    ..
                },
                AuthoritySecret::Password(password),
            ) if slot.index == authority_slot => {
                let card_key = TokenPublicKey::from_sec1(card_public)?;
                let share = EphemeralShare::new(&card_key)?;
                let slot = TokenSlot {
                    container_id: &header.id,
                    index: slot.index,
                    label: slot.label.clone(),
                    serial: *serial,
                    piv_slot: *piv_slot,
                    card_key: &card_key,
                    argon: *argon,
                }
                .wrap(&share, password)?;
                plan.push(SlotCarry::Rewrap(slot));
            }
            (SlotKind::Recovery, AuthoritySecret::RecoveryKey { key, slot: opened })
                if slot.index == *opened =>
            {
                let salt = random_salt()?;
                plan.push(SlotCarry::Rewrap(NewSlot {
                    index: slot.index,
                    label: slot.label.clone(),
                    salt,
                    kind: NewSlotKind::Recovery,
                    kek: recovery_kek(key, &salt, &info)?,
                }));
            }
            (SlotKind::Token { card_public, .. }, _) => {
                let card_key = TokenPublicKey::from_sec1(card_public)?;
                let share = EphemeralShare::new(&card_key)?;
                plan.push(SlotCarry::Link {
                    index: slot.index,
                    ephemeral_public: sec1_array(&share.ephemeral_public),
                    secret: SecretBytes::from_slice(share.secret.expose())?,
                });
            }
            (SlotKind::Recovery, _) if drop_recovery => plan.push(SlotCarry::Remove(slot.index)),
            (SlotKind::Recovery, _) => {
                return Err(ContainerError::RekeyRefused {
                    path: vault,
                    reason: format!(
                        "key slot {} holds a recovery key, which cannot be carried over without \
                         it; pass --recovery-key-file with that key, or --drop-recovery to \
                         remove the slot (enrol a new recovery key afterwards)",
                        slot.index
                    ),
                }
                .into());
            }
        }
    }
    Ok(plan)
}

/// Activate a slot carried over by a rotation, with its own token, PIN and
/// password: two card ECDHs (the slot's own ephemeral key, and the link's),
/// one PIN. The slot then holds the new master key, which is returned.
pub fn activate(
    container: &mut Container,
    choice: &Choice,
    password: &SecretBytes,
    pin: &Pin,
    last_try: LastTry,
) -> Result<MasterKey, AdminError> {
    let vault = container.path().to_path_buf();
    let index = choice.slot.index;
    let SlotKind::Token {
        card_public,
        ephemeral_public,
        argon,
        ..
    } = &choice.slot.kind
    else {
        return Err(AdminError::NotATokenSlot { vault, slot: index });
    };
    let Some(link) = container.link_ephemeral(index) else {
        return Err(ContainerError::RekeyRefused {
            path: vault,
            reason: format!("key slot {index} does not await activation; it opens as it is"),
        }
        .into());
    };
    let card_key = TokenPublicKey::from_sec1(card_public)?;
    let ephemeral = TokenPublicKey::from_sec1(ephemeral_public)?;
    let link = TokenPublicKey::from_sec1(&link)?;
    let (mut token, piv_slot) = Token::find_key(Some(choice.serial), &card_key)?;
    token.verify_pin(pin, last_try)?;
    let shared = token.ecdh(piv_slot, &ephemeral)?;
    // A key with PIN policy "always" wants the PIN before each operation.
    token.verify_pin(pin, last_try)?;
    let link_shared = token.ecdh(piv_slot, &link)?;
    drop(token);
    let salt = &choice.slot.salt;
    let hash = argon2id(password, salt, *argon)?;
    let kek = key_encryption_key(
        shared.expose(),
        &hash,
        salt,
        &slot_info(&container.info().id, index),
    )?;
    let link_secret = SecretBytes::from_slice(link_shared.expose())?;
    container
        .activate_slot(index, &kek, &link_secret)
        .map_err(|e| match e {
            ContainerError::SlotUnwrap { .. } => SessionError::WrongPassword {
                vault,
                slot: index,
                serial: choice.serial,
            }
            .into(),
            other => other.into(),
        })
}
