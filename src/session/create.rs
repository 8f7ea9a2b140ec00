//! `keybound create`: a new container bound to a token and a password, with
//! an empty filesystem inside.
//!
//! The slot is made from the card's public key (an ephemeral ECDH, as at any
//! enrolment), and then the card itself computes the same secret after its
//! PIN: the vault is only written once we know the token and the PIN can
//! open it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::SessionError;
use crate::container::{
    Container, CreateOptions, HeaderInfo, NewSlot, NewSlotKind, new_container_id,
};
use crate::crypto::{
    Argon2Params, CONTAINER_ID_LEN, MasterKey, argon2id, key_encryption_key, new_slot_params,
    random_salt, slot_info,
};
use crate::fs::Fs;
use crate::secrets::SecretBytes;
use crate::token::{EphemeralShare, LastTry, Pin, Token, TokenError, TokenPublicKey};

/// The shortest password `create` accepts (admins may raise it per vault later).
pub const MIN_PASSWORD_LEN: usize = 8;

pub struct CreateRequest<'a> {
    pub vault: &'a Path,
    pub serial: Option<u32>,
    /// The retired PIV slot of the key to bind; the token's only keybound key if `None`.
    pub piv_slot: Option<u8>,
    pub fixed_size: Option<u64>,
    pub label: String,
    /// How long one Argon2id derivation should take on this machine; RFC
    /// 9106's recommended passes and lanes if `None`.
    pub kdf_time: Option<Duration>,
    pub kdf_memory_kib: u32,
    pub last_try: LastTry,
    /// The owner of the filesystem's root directory.
    pub owner: (u32, u32),
}

/// What was made, for the CLI to report.
pub struct Created {
    pub vault: PathBuf,
    pub header: HeaderInfo,
    pub serial: u32,
    pub piv_slot: u8,
    pub fingerprint: String,
    pub argon: Argon2Params,
}

/// The token and key a new vault will be bound to, found without a PIN.
pub struct Binding {
    pub token: Token,
    pub piv_slot: u8,
    pub card_key: crate::token::TokenPublicKey,
}

/// Find the token and its keybound key (before asking for any secret).
pub fn find_binding(serial: Option<u32>, piv_slot: Option<u8>) -> Result<Binding, SessionError> {
    let mut token = Token::open(serial)?;
    let keys = token.keybound_keys()?;
    let key = match (piv_slot, keys.as_slice()) {
        (Some(want), _) => keys
            .iter()
            .find(|k| k.slot == want)
            .cloned()
            .ok_or_else(|| TokenError::NoKeyInSlot {
                token: token.name().clone(),
                slot: want,
            })?,
        (None, [only]) => only.clone(),
        (None, []) => {
            return Err(SessionError::NoKeyOnToken {
                serial: token.serial(),
            });
        }
        (None, several) => {
            return Err(SessionError::SeveralKeysOnToken {
                serial: token.serial(),
                slots: several
                    .iter()
                    .map(|k| format!("{:02x}", k.slot))
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
    };
    Ok(Binding {
        token,
        piv_slot: key.slot,
        card_key: key.public_key,
    })
}

pub fn check_password(password: &SecretBytes) -> Result<(), SessionError> {
    let chars = std::str::from_utf8(password.expose())
        .map(|s| s.chars().count())
        .unwrap_or(password.len());
    if chars < MIN_PASSWORD_LEN {
        return Err(SessionError::PasswordTooShort {
            min: MIN_PASSWORD_LEN,
        });
    }
    Ok(())
}

/// Create the vault. `progress(done, total)` reports preallocation.
pub fn create(
    req: &CreateRequest,
    binding: Binding,
    password: &SecretBytes,
    pin: &Pin,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Created, SessionError> {
    check_password(password)?;
    let Binding {
        mut token,
        piv_slot,
        card_key,
    } = binding;
    let serial = token.serial();
    let share = EphemeralShare::new(&card_key)?;
    token.verify_pin(pin, req.last_try)?;
    let card_side = token.ecdh(piv_slot, &share.ephemeral_public)?;
    if card_side.expose() != share.secret.expose() {
        return Err(SessionError::Token(TokenError::KeyMismatch {
            token: token.name().clone(),
            fingerprint: card_key.fingerprint(),
        }));
    }
    drop(token);

    let argon = new_slot_params(req.kdf_time, req.kdf_memory_kib)?;
    let id = new_container_id()?;
    let slot = TokenSlot {
        container_id: &id,
        index: 0,
        label: req.label.clone(),
        serial,
        piv_slot,
        card_key: &card_key,
        argon,
    }
    .wrap(&share, password)?;
    let master_key = MasterKey::generate()?;
    let options = CreateOptions {
        id,
        fixed_size: req.fixed_size,
        fsync_log: true,
    };
    let container = Container::create(req.vault, &options, &master_key, slot, progress)?;
    let header = container.info().clone();
    if let Err(e) = make_filesystem(container, master_key, req) {
        // The half-made vault holds nothing yet; do not leave it behind.
        let _ = std::fs::remove_file(req.vault);
        return Err(e);
    }
    Ok(Created {
        vault: req.vault.to_path_buf(),
        header,
        serial,
        piv_slot,
        fingerprint: card_key.fingerprint(),
        argon,
    })
}

fn make_filesystem(
    container: Container,
    master_key: MasterKey,
    req: &CreateRequest,
) -> Result<(), SessionError> {
    let store = container.into_store(master_key)?;
    let storage = std::sync::Arc::new(super::storage::EncryptedStorage::new(store));
    let fs =
        Fs::create(storage, req.owner.0, req.owner.1).map_err(|e| SessionError::Filesystem {
            vault: req.vault.to_path_buf(),
            detail: e.to_string(),
        })?;
    fs.close().map_err(|e| SessionError::Filesystem {
        vault: req.vault.to_path_buf(),
        detail: e.to_string(),
    })
}

/// A token key slot to write: which card key, and how the password is hashed.
/// [`TokenSlot::wrap`] is the one place that turns a password and the card's
/// key agreement into a slot's KEK (docs/FORMAT.md §2), for create, enroll,
/// passwd and rekey alike.
pub struct TokenSlot<'a> {
    pub container_id: &'a [u8; CONTAINER_ID_LEN],
    pub index: u8,
    pub label: String,
    pub serial: u32,
    pub piv_slot: u8,
    pub card_key: &'a TokenPublicKey,
    pub argon: Argon2Params,
}

impl TokenSlot<'_> {
    /// The slot for `password`, with a fresh salt, wrapping with the KEK of
    /// `share` (an ephemeral key agreement with the card key) and the
    /// password's Argon2id hash.
    pub fn wrap(
        self,
        share: &EphemeralShare,
        password: &SecretBytes,
    ) -> Result<NewSlot, SessionError> {
        let salt = random_salt()?;
        let password_hash = argon2id(password, &salt, self.argon)?;
        let info = slot_info(self.container_id, self.index);
        let kek = key_encryption_key(share.secret.expose(), &password_hash, &salt, &info)?;
        Ok(NewSlot {
            index: self.index,
            label: self.label,
            salt,
            kind: NewSlotKind::Token {
                serial: self.serial,
                piv_slot: self.piv_slot,
                card_public: sec1_array(self.card_key),
                ephemeral_public: sec1_array(&share.ephemeral_public),
                argon: self.argon,
            },
            kek,
        })
    }
}

/// A public key in SEC1 uncompressed form, as key slots store it.
pub fn sec1_array(key: &TokenPublicKey) -> [u8; 65] {
    let mut out = [0u8; 65];
    out.copy_from_slice(&key.to_sec1());
    out
}
