//! Unlocking a locked vault with password + token, for the commands that need its master key
//! but no mount (`dump-key` and `verify --deep` read-only, `compact` read-write): the same flags
//! and the same order as `mount` — everything that needs no secret first (the container, its
//! lock, the token to use), then the password and the PIN.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;
use keybound::container::{Access, Container, ContainerError};
use keybound::crypto::MasterKey;
use keybound::session::unlock::{self, Choice};
use keybound::token::LastTry;

use super::prompt;

#[derive(Args)]
pub struct TokenUnlockArgs {
    /// Use the enrolled token with this serial (needed when several are plugged in).
    #[arg(long)]
    pub serial: Option<u32>,
    /// Read the vault password from FILE (`-` for stdin) instead of the terminal.
    #[arg(long, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// Read the token's PIN from FILE (`-` for stdin) instead of the terminal.
    #[arg(long, value_name = "FILE")]
    pub pin_file: Option<PathBuf>,
    /// Allow spending the token's last PIN try (a wrong PIN then blocks it).
    #[arg(long)]
    pub allow_last_pin_try: bool,
}

impl TokenUnlockArgs {
    /// Whether any of these flags was given.
    pub fn any_given(&self) -> bool {
        self.serial.is_some()
            || self.password_file.is_some()
            || self.pin_file.is_some()
            || self.allow_last_pin_try
    }
}

/// A vault opened (and locked against other processes) with its master key.
pub struct Unlocked {
    pub container: Container,
    pub choice: Choice,
    pub master_key: MasterKey,
}

/// Open `vault` with `access` and unwrap its master key with the token's slot. A vault another
/// process holds (mounted) is refused with `in_use`'s error.
pub fn unlock_unmounted(
    vault: &Path,
    access: Access,
    args: &TokenUnlockArgs,
    in_use: impl FnOnce(ContainerError) -> anyhow::Error,
) -> Result<Unlocked> {
    let header = Container::inspect(vault)?;
    let container = match Container::open(vault, access) {
        Ok(c) => c,
        Err(e @ ContainerError::Locked { .. }) => return Err(in_use(e)),
        Err(e) => return Err(e.into()),
    };
    let choice = unlock::choose_slot(vault, &header, args.serial)?;
    let password = prompt::secret(
        args.password_file.as_deref(),
        "password",
        &format!("Password for {}: ", vault.display()),
        "--password-file",
    )?;
    let pin = prompt::pin(
        args.pin_file.as_deref(),
        &format!("PIN of token {}: ", choice.serial),
    )?;
    let last_try = if args.allow_last_pin_try {
        LastTry::Allow
    } else {
        LastTry::Refuse
    };
    let master_key = unlock::unlock(&container, &choice, &password, &pin, last_try)?;
    drop((password, pin));
    Ok(Unlocked {
        container,
        choice,
        master_key,
    })
}
