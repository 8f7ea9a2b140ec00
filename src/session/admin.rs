//! Admin operations on a locked vault: enrol a token or a recovery key,
//! change or reset a slot's password, revoke a slot, set the vault policy,
//! open a vault with its recovery key. Header backups are in
//! `container::{restore_header, inspect_backup}`.
//!
//! Every operation works on a container opened read-write, which takes the
//! file lock: a mounted vault is refused (`ContainerError::Locked`). Each
//! needs the master key, from an *authority*: any token slot (its token,
//! PIN and password) or the recovery key. Choosing the authority costs no
//! secret, so the CLI can say what it will ask for before it asks.
//!
//! A token slot's KEK mixes the card's ECDH secret `S = x(e·C)` with the
//! password. Re-wrapping a slot (new password, reset) needs only the card's
//! public key `C`, which the slot stores: a fresh ephemeral key gives a
//! fresh `S`, as at enrolment. So an admin can reset a slot whose token is
//! elsewhere, and the user's passwd never needs more than one card ECDH.

pub mod recovery;
pub mod rekey;

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::SessionError;
use super::create::{Binding, MIN_PASSWORD_LEN, TokenSlot};
use super::unlock::{self, Choice};
use crate::container::{
    Container, ContainerError, HeaderInfo, NewSlot, NewSlotKind, Policy, SlotFlags, SlotInfo,
    SlotKind,
};
use crate::crypto::{
    Argon2Params, CryptoError, MasterKey, new_slot_params, random_salt, recovery_kek, slot_info,
};
use crate::secrets::{SecretBytes, SecretError};
use crate::token::{self, EphemeralShare, LastTry, Pin, TokenError, TokenPublicKey};

pub use recovery::RecoveryKeyError;

/// PIN policy values in the policy block (the PIV encoding: 2 once, 3 always).
pub const PIN_POLICY_ONCE: u8 = 2;
pub const PIN_POLICY_ALWAYS: u8 = 3;

/// Why an admin operation was refused. Messages name the vault and the slot
/// and say what to do; they never contain a secret.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error(transparent)]
    RecoveryKey(#[from] RecoveryKeyError),

    #[error(
        "the vault policy of {vault} asks for passwords of at least {min} characters",
        vault = vault.display()
    )]
    PasswordTooShort { vault: PathBuf, min: usize },
    #[error(
        "token {serial}'s key {fingerprint} has PIN policy {actual}, but the vault policy of \
         {vault} requires {required}; set up a key with `keybound token setup --pin-policy \
         {required}`",
        vault = vault.display()
    )]
    PinPolicy {
        vault: PathBuf,
        serial: u32,
        fingerprint: String,
        actual: String,
        required: String,
    },
    #[error("{vault} has no free key slot (8 are in use); revoke one first", vault = vault.display())]
    NoFreeSlot { vault: PathBuf },
    #[error(
        "the key of token {serial} ({fingerprint}) is already enrolled in {vault} (key slot \
         {slot}); change that slot's password with `keybound passwd` instead",
        vault = vault.display()
    )]
    AlreadyEnrolled {
        vault: PathBuf,
        serial: u32,
        fingerprint: String,
        slot: u8,
    },
    #[error(
        "key slot {slot} of {vault} cannot authorise its own {what}; authorise with another \
         slot (--admin-slot N, or --recovery-key-file FILE)",
        vault = vault.display()
    )]
    SelfAuthority {
        vault: PathBuf,
        slot: u8,
        what: &'static str,
    },
    #[error(
        "key slot {slot} of {vault} is a recovery key slot; it has no password (authorise with \
         it using --recovery-key-file)",
        vault = vault.display()
    )]
    NotATokenSlot { vault: PathBuf, slot: u8 },
    #[error("{vault} has no recovery key slot; enrol one with `keybound enroll --recovery`", vault = vault.display())]
    NoRecoverySlot { vault: PathBuf },
    #[error("key slot {slot} of {vault} is not in use (`keybound info` lists the slots)", vault = vault.display())]
    NoSuchSlot { vault: PathBuf, slot: u8 },
}

impl From<ContainerError> for AdminError {
    fn from(e: ContainerError) -> Self {
        AdminError::Session(e.into())
    }
}

impl From<TokenError> for AdminError {
    fn from(e: TokenError) -> Self {
        AdminError::Session(e.into())
    }
}

impl From<CryptoError> for AdminError {
    fn from(e: CryptoError) -> Self {
        AdminError::Session(e.into())
    }
}

impl From<SecretError> for AdminError {
    fn from(e: SecretError) -> Self {
        AdminError::Session(e.into())
    }
}

// ------------------------------------------------------------ authority ----

/// Which slot will authorise an operation. Choosing it needs no secret.
#[derive(Debug, Clone)]
pub enum Authority {
    /// A token slot: its token (plugged in), PIN and password.
    Token(Box<Choice>),
    /// The recovery key (every recovery slot is tried).
    Recovery,
}

impl Authority {
    /// "token 123 (key slot 0): password, PIN" — what will be asked.
    pub fn describe(&self) -> String {
        match self {
            Authority::Token(c) => {
                format!(
                    "token {} (key slot {}): its password and PIN",
                    c.serial, c.slot.index
                )
            }
            Authority::Recovery => "the recovery key".into(),
        }
    }

    pub fn slot(&self) -> Option<u8> {
        match self {
            Authority::Token(c) => Some(c.slot.index),
            Authority::Recovery => None,
        }
    }
}

/// What may authorise: `admin_slot` names a token slot; `recovery` uses the
/// recovery key; otherwise the slot of the enrolled token that is plugged in
/// (never `exclude`, the slot being changed, unless it is the only way).
pub fn choose_authority(
    vault: &Path,
    header: &HeaderInfo,
    admin_slot: Option<u8>,
    recovery: bool,
    exclude: Option<u8>,
) -> Result<Authority, AdminError> {
    if recovery {
        if !header.slots.iter().any(|s| s.kind == SlotKind::Recovery) {
            return Err(AdminError::NoRecoverySlot {
                vault: vault.to_path_buf(),
            });
        }
        return Ok(Authority::Recovery);
    }
    if let Some(index) = admin_slot {
        let slot = find_slot(vault, header, index)?;
        let SlotKind::Token { serial, .. } = slot.kind else {
            return Err(AdminError::NotATokenSlot {
                vault: vault.to_path_buf(),
                slot: index,
            });
        };
        return Ok(Authority::Token(Box::new(Choice {
            slot: slot.clone(),
            serial,
        })));
    }
    // The plugged-in enrolled token, not counting the slot being changed
    // when another one is there.
    let mut others = header.clone();
    if let Some(ex) = exclude {
        others.slots.retain(|s| s.index != ex);
    }
    match unlock::choose_slot(vault, &others, None) {
        Ok(choice) => Ok(Authority::Token(Box::new(choice))),
        Err(e) => match exclude {
            Some(ex) if header.slots.iter().any(|s| s.index == ex) => {
                // Only the excluded slot's token is here, perhaps.
                match unlock::choose_slot(vault, header, None) {
                    Ok(choice) => Ok(Authority::Token(Box::new(choice))),
                    Err(_) => Err(e.into()),
                }
            }
            _ => Err(e.into()),
        },
    }
}

fn find_slot<'a>(
    vault: &Path,
    header: &'a HeaderInfo,
    index: u8,
) -> Result<&'a SlotInfo, AdminError> {
    header
        .slots
        .iter()
        .find(|s| s.index == index)
        .ok_or_else(|| AdminError::NoSuchSlot {
            vault: vault.to_path_buf(),
            slot: index,
        })
}

/// The secrets an authority needs.
pub enum Credentials<'a> {
    Token {
        password: &'a SecretBytes,
        pin: &'a Pin,
        last_try: LastTry,
    },
    /// The 32-byte recovery key (see [`recovery::parse`]).
    Recovery(&'a SecretBytes),
}

/// The master key, from `authority` and its secrets. A token slot with a
/// temporary password is refused (its password must be changed first).
pub fn authorise(
    container: &Container,
    authority: &Authority,
    credentials: Credentials,
) -> Result<MasterKey, AdminError> {
    match (authority, credentials) {
        (
            Authority::Token(choice),
            Credentials::Token {
                password,
                pin,
                last_try,
            },
        ) => Ok(unlock::unlock(container, choice, password, pin, last_try)?),
        (Authority::Recovery, Credentials::Recovery(key)) => Ok(unlock_recovery(container, key)?.0),
        _ => panic!("credentials do not match the authority"),
    }
}

/// Open the vault with the recovery key: the master key and the recovery
/// slot that accepted it.
pub fn unlock_recovery(
    container: &Container,
    key: &SecretBytes,
) -> Result<(MasterKey, u8), AdminError> {
    let vault = container.path().to_path_buf();
    let slots: Vec<&SlotInfo> = container
        .info()
        .slots
        .iter()
        .filter(|s| s.kind == SlotKind::Recovery)
        .collect();
    if slots.is_empty() {
        return Err(AdminError::NoRecoverySlot { vault });
    }
    for slot in slots {
        let kek = recovery_kek(
            key,
            &slot.salt,
            &slot_info(&container.info().id, slot.index),
        )?;
        match container.unwrap_slot(slot.index, &kek) {
            Ok(mk) => return Ok((mk, slot.index)),
            Err(ContainerError::SlotUnwrap { .. }) => continue,
            Err(other) => return Err(other.into()),
        }
    }
    Err(SessionError::WrongRecoveryKey { vault }.into())
}

// ------------------------------------------------------------- policy ----

/// The shortest password the vault accepts: its policy, never below the
/// built-in minimum.
pub fn min_password_len(policy: &Policy) -> usize {
    MIN_PASSWORD_LEN.max(usize::from(policy.min_password_len))
}

/// Refuse a new password the vault policy does not allow.
pub fn check_new_password(
    vault: &Path,
    policy: &Policy,
    password: &SecretBytes,
) -> Result<(), AdminError> {
    let chars = std::str::from_utf8(password.expose())
        .map(|s| s.chars().count())
        .unwrap_or(password.len());
    let min = min_password_len(policy);
    if chars < min {
        return Err(AdminError::PasswordTooShort {
            vault: vault.to_path_buf(),
            min,
        });
    }
    Ok(())
}

/// The policy's Argon2id floor (zero fields mean no floor beyond the
/// built-in minimum).
pub fn argon_floor(policy: &Policy) -> Argon2Params {
    Argon2Params {
        memory_kib: policy
            .argon_min_memory_kib
            .max(Argon2Params::MIN.memory_kib),
        iterations: policy
            .argon_min_iterations
            .max(Argon2Params::MIN.iterations),
        parallelism: policy
            .argon_min_parallelism
            .max(Argon2Params::MIN.parallelism),
    }
}

/// Whether `argon` meets the policy's floor.
pub fn meets_floor(policy: &Policy, argon: &Argon2Params) -> bool {
    let floor = argon_floor(policy);
    argon.memory_kib >= floor.memory_kib
        && argon.iterations >= floor.iterations
        && argon.parallelism >= floor.parallelism
}

/// How long Argon2id should take for a new slot (RFC 9106's recommended
/// passes and lanes if `None`), and how much memory.
#[derive(Debug, Clone, Copy)]
pub struct KdfTarget {
    pub time: Option<Duration>,
    pub memory_kib: u32,
}

/// Argon2id for `target` (see [`new_slot_params`]), lifted to the policy's floor.
pub fn kdf_params(policy: &Policy, target: KdfTarget) -> Result<Argon2Params, AdminError> {
    let floor = argon_floor(policy);
    let mut params = new_slot_params(target.time, target.memory_kib.max(floor.memory_kib))?;
    params.iterations = params.iterations.max(floor.iterations);
    params.parallelism = params.parallelism.max(floor.parallelism);
    params.validate()?;
    Ok(params)
}

/// A PIN policy byte as a word.
pub fn pin_policy_name(value: u8) -> &'static str {
    match value {
        0 => "none",
        PIN_POLICY_ONCE => "once",
        PIN_POLICY_ALWAYS => "always",
        _ => "unknown",
    }
}

/// Check the card key's PIN policy against the vault policy, if the vault
/// requires one. `Ok(Some(note))` when the token cannot say (the key is
/// accepted, and the note says so).
fn check_pin_policy(
    vault: &Path,
    policy: &Policy,
    serial: u32,
    card_key: &TokenPublicKey,
) -> Result<Option<String>, AdminError> {
    if policy.pin_policy == 0 {
        return Ok(None);
    }
    let required = pin_policy_name(policy.pin_policy);
    let fingerprint = card_key.fingerprint();
    let reported = token::list_tokens()?
        .into_iter()
        .filter(|t| t.serial == Some(serial))
        .flat_map(|t| t.keybound_keys)
        .find(|k| k.fingerprint == fingerprint)
        .and_then(|k| k.pin_policy);
    let Some(actual) = reported else {
        return Ok(Some(format!(
            "token {serial} cannot report its key's PIN policy; the vault requires \
             \"{required}\": check it yourself"
        )));
    };
    let ok = match policy.pin_policy {
        PIN_POLICY_ALWAYS => actual == "always",
        // "once" or stricter.
        _ => actual == "always" || actual == "once",
    };
    if ok {
        Ok(None)
    } else {
        Err(AdminError::PinPolicy {
            vault: vault.to_path_buf(),
            serial,
            fingerprint,
            actual,
            required: required.into(),
        })
    }
}

/// Store a new policy (needs the master key: the header MAC is rewritten).
pub fn set_policy(
    container: &mut Container,
    mk: &MasterKey,
    policy: Policy,
) -> Result<(), AdminError> {
    if policy.argon_min_memory_kib > 0 || policy.argon_min_iterations > 0 {
        argon_floor(&policy).validate()?;
    }
    container.set_policy(mk, policy)?;
    Ok(())
}

// ------------------------------------------------------------- enrol ----

/// What to enrol.
pub enum Enrolment<'a> {
    /// A token that is plugged in (its key found by `create::find_binding`);
    /// its PIN proves, before anything is written, that its ECDH matches.
    Token {
        binding: Binding,
        pin: &'a Pin,
        last_try: LastTry,
    },
    /// A token that is elsewhere, from its certificate: the admin sets a
    /// temporary password, which the user must change at first use.
    Certificate {
        card_key: TokenPublicKey,
        serial: u32,
        piv_slot: u8,
    },
    /// A recovery key: generated here and returned once.
    Recovery,
}

/// What was enrolled, for the CLI to report.
pub struct Enrolled {
    pub slot: u8,
    pub serial: Option<u32>,
    pub fingerprint: Option<String>,
    pub argon: Option<Argon2Params>,
    pub must_change_password: bool,
    /// The new recovery key (32 bytes), to show once.
    pub recovery_key: Option<SecretBytes>,
    /// Something the admin should know (e.g. a PIN policy that could not be checked).
    pub notes: Vec<String>,
}

/// The first free key slot.
pub fn free_slot(vault: &Path, header: &HeaderInfo) -> Result<u8, AdminError> {
    (0..crate::container::layout::SLOT_COUNT as u8)
        .find(|i| header.slots.iter().all(|s| s.index != *i))
        .ok_or_else(|| AdminError::NoFreeSlot {
            vault: vault.to_path_buf(),
        })
}

/// Refuse a card key that is enrolled already (two slots of one token
/// could not be told apart at mount).
pub fn check_not_enrolled(
    vault: &Path,
    header: &HeaderInfo,
    serial: u32,
    card_key: &TokenPublicKey,
) -> Result<(), AdminError> {
    let sec1 = card_key.to_sec1();
    for slot in &header.slots {
        if let SlotKind::Token {
            card_public,
            serial: s,
            ..
        } = &slot.kind
            && (card_public[..] == sec1[..] || *s == serial)
        {
            return Err(AdminError::AlreadyEnrolled {
                vault: vault.to_path_buf(),
                serial: *s,
                fingerprint: card_key.fingerprint(),
                slot: slot.index,
            });
        }
    }
    Ok(())
}

/// Refuse, before anything is asked, a token serial that has a slot already.
pub fn check_serial_not_enrolled(
    vault: &Path,
    header: &HeaderInfo,
    serial: u32,
) -> Result<(), AdminError> {
    for slot in &header.slots {
        if let SlotKind::Token {
            serial: s,
            card_public,
            ..
        } = &slot.kind
            && *s == serial
        {
            return Err(AdminError::AlreadyEnrolled {
                vault: vault.to_path_buf(),
                serial,
                fingerprint: TokenPublicKey::from_sec1(card_public)
                    .map(|k| k.fingerprint())
                    .unwrap_or_else(|_| "?".into()),
                slot: slot.index,
            });
        }
    }
    Ok(())
}

/// Add a key slot. `password` is the new slot's password (token and
/// certificate forms; checked against the policy by the caller first).
pub fn enroll(
    container: &mut Container,
    mk: &MasterKey,
    what: Enrolment,
    password: Option<&SecretBytes>,
    kdf: KdfTarget,
    label: String,
) -> Result<Enrolled, AdminError> {
    let vault = container.path().to_path_buf();
    let header = container.info().clone();
    let index = free_slot(&vault, &header)?;
    let mut notes = Vec::new();
    let (card_key, serial, piv_slot, secret, must_change) = match what {
        Enrolment::Recovery => {
            let info = slot_info(&header.id, index);
            let salt = random_salt()?;
            let key = recovery::generate()?;
            let slot = NewSlot {
                index,
                label,
                salt,
                kind: NewSlotKind::Recovery,
                kek: recovery_kek(&key, &salt, &info)?,
            };
            container.add_slot(mk, slot)?;
            return Ok(Enrolled {
                slot: index,
                serial: None,
                fingerprint: None,
                argon: None,
                must_change_password: false,
                recovery_key: Some(key),
                notes,
            });
        }
        Enrolment::Token {
            binding,
            pin,
            last_try,
        } => {
            let Binding {
                mut token,
                piv_slot,
                card_key,
            } = binding;
            let serial = token.serial();
            check_not_enrolled(&vault, &header, serial, &card_key)?;
            let share = EphemeralShare::new(&card_key)?;
            token.verify_pin(pin, last_try)?;
            let card_side = token.ecdh(piv_slot, &share.ephemeral_public)?;
            if card_side.expose() != share.secret.expose() {
                return Err(TokenError::KeyMismatch {
                    token: token.name().clone(),
                    fingerprint: card_key.fingerprint(),
                }
                .into());
            }
            drop(token);
            if let Some(note) = check_pin_policy(&vault, &header.policy, serial, &card_key)? {
                notes.push(note);
            }
            (card_key, serial, piv_slot, share, false)
        }
        Enrolment::Certificate {
            card_key,
            serial,
            piv_slot,
        } => {
            check_not_enrolled(&vault, &header, serial, &card_key)?;
            if header.policy.pin_policy != 0 {
                notes.push(format!(
                    "a certificate does not say which PIN policy the key has; the vault \
                     requires \"{}\": check it on the token (`keybound token list`)",
                    pin_policy_name(header.policy.pin_policy)
                ));
            }
            let share = EphemeralShare::new(&card_key)?;
            (card_key, serial, piv_slot, share, true)
        }
    };
    let password = password.expect("a token slot needs a password");
    let argon = kdf_params(&header.policy, kdf)?;
    let slot = TokenSlot {
        container_id: &header.id,
        index,
        label,
        serial,
        piv_slot,
        card_key: &card_key,
        argon,
    }
    .wrap(&secret, password)?;
    container.add_slot_with_flags(
        mk,
        slot,
        SlotFlags {
            must_change_password: must_change,
        },
    )?;
    Ok(Enrolled {
        slot: index,
        serial: Some(serial),
        fingerprint: Some(card_key.fingerprint()),
        argon: Some(argon),
        must_change_password: must_change,
        recovery_key: None,
        notes,
    })
}

// ------------------------------------------------------------ passwd ----

/// The token slot `index` (or the one whose token is plugged in).
pub fn passwd_target(
    vault: &Path,
    header: &HeaderInfo,
    index: Option<u8>,
) -> Result<Choice, AdminError> {
    match index {
        Some(i) => {
            let slot = find_slot(vault, header, i)?;
            match slot.kind {
                SlotKind::Token { serial, .. } => Ok(Choice {
                    slot: slot.clone(),
                    serial,
                }),
                SlotKind::Recovery => Err(AdminError::NotATokenSlot {
                    vault: vault.to_path_buf(),
                    slot: i,
                }),
            }
        }
        None => Ok(unlock::choose_slot(vault, header, None)?),
    }
}

/// Open `target` with its own token and (old or temporary) password; the
/// master key, for [`rewrap`].
pub fn open_own_slot(
    container: &Container,
    target: &Choice,
    old_password: &SecretBytes,
    pin: &Pin,
    last_try: LastTry,
) -> Result<MasterKey, AdminError> {
    Ok(unlock::unlock_slot(container, target, old_password, pin, last_try)?.0)
}

/// Wrap the master key in slot `target` again under a new password (a fresh
/// ephemeral share with the slot's card key, a fresh salt), in both header
/// copies. `must_change` marks the password as temporary (a reset).
pub fn rewrap(
    container: &mut Container,
    mk: &MasterKey,
    target: &SlotInfo,
    new_password: &SecretBytes,
    kdf: KdfTarget,
    must_change: bool,
) -> Result<Argon2Params, AdminError> {
    let SlotKind::Token {
        serial,
        piv_slot,
        card_public,
        ..
    } = &target.kind
    else {
        return Err(AdminError::NotATokenSlot {
            vault: container.path().to_path_buf(),
            slot: target.index,
        });
    };
    let policy = container.info().policy;
    let card_key = TokenPublicKey::from_sec1(card_public)?;
    let share = EphemeralShare::new(&card_key)?;
    let argon = kdf_params(&policy, kdf)?;
    let slot = TokenSlot {
        container_id: &container.info().id,
        index: target.index,
        label: target.label.clone(),
        serial: *serial,
        piv_slot: *piv_slot,
        card_key: &card_key,
        argon,
    }
    .wrap(&share, new_password)?;
    container.replace_slot(
        mk,
        slot,
        SlotFlags {
            must_change_password: must_change,
        },
    )?;
    Ok(argon)
}

// ------------------------------------------------------------ revoke ----

/// Remove key slot `index` (its bytes overwritten in both header copies).
/// The last slot only with `force`.
pub fn revoke(
    container: &mut Container,
    mk: &MasterKey,
    index: u8,
    force: bool,
) -> Result<(), AdminError> {
    if force && container.info().slots.len() == 1 {
        container.remove_slot_even_last(mk, index)?;
    } else {
        container.remove_slot(mk, index)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_floor_and_password_length() {
        let mut policy = Policy::default();
        assert_eq!(min_password_len(&policy), MIN_PASSWORD_LEN);
        policy.min_password_len = 4;
        assert_eq!(min_password_len(&policy), MIN_PASSWORD_LEN);
        policy.min_password_len = 16;
        let short = SecretBytes::from_slice(b"twelve chars").unwrap();
        let err = check_new_password(Path::new("/v"), &policy, &short).unwrap_err();
        assert!(err.to_string().contains("at least 16"), "{err}");
        let long = SecretBytes::from_slice("sixteen chars ✓✓✓".as_bytes()).unwrap();
        check_new_password(Path::new("/v"), &policy, &long).unwrap();

        assert_eq!(argon_floor(&Policy::default()), Argon2Params::MIN);
        policy.argon_min_memory_kib = 128 * 1024;
        policy.argon_min_iterations = 5;
        let floor = argon_floor(&policy);
        assert_eq!((floor.memory_kib, floor.iterations), (128 * 1024, 5));
        assert!(!meets_floor(&policy, &Argon2Params::MIN));
        assert!(meets_floor(&policy, &floor));
    }

    #[test]
    fn pin_policy_names() {
        assert_eq!(pin_policy_name(0), "none");
        assert_eq!(pin_policy_name(PIN_POLICY_ONCE), "once");
        assert_eq!(pin_policy_name(PIN_POLICY_ALWAYS), "always");
    }
}
