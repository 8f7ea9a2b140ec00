//! Admin commands on a locked vault: `enroll`, `passwd`, `revoke`, `header
//! backup|restore`, `policy`; and the admin hooks of `mount` (the policy's
//! idle default, refusing a temporary password, `--recovery-key-file`).
//!
//! Each command opens the container read-write first — the file lock refuses
//! a mounted vault before anything is asked — then says which authority it
//! needs ("Authorise with token 123 (key slot 0): …") and asks for it.
//!
//! Every command records its outcome, success or failure, in the audit log
//! (src/audit).

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use keybound::container::{
    self, Access, Container, ContainerError, HeaderInfo, Policy, SlotInfo, SlotKind,
};
use keybound::crypto::MasterKey;
use keybound::secrets::SecretBytes;
use keybound::session::admin::{
    self, Authority, Credentials, Enrolment, KdfTarget, PIN_POLICY_ALWAYS, PIN_POLICY_ONCE,
    recovery,
};
use keybound::session::{create, daemon, registry};
use keybound::token::{self, LastTry, Pin, TokenPublicKey};

use super::{audit_cmd, exitcodes, prompt};
use keybound::audit::Event;

/// Who authorises the change: a token slot (its token, password and PIN) or
/// the recovery key.
#[derive(Args)]
pub struct AuthorityArgs {
    /// Authorise with this token key slot (its token must be plugged in).
    /// Default: the slot of the enrolled token that is plugged in.
    #[arg(long, value_name = "N", conflicts_with = "recovery_key_file")]
    pub(super) admin_slot: Option<u8>,
    /// Authorise with the recovery key, read from FILE (`-` for stdin).
    #[arg(long, value_name = "FILE")]
    pub(super) recovery_key_file: Option<PathBuf>,
    /// The authorising slot's password, from FILE (`-` for stdin).
    #[arg(long, value_name = "FILE")]
    pub(super) password_file: Option<PathBuf>,
    /// The authorising token's PIN, from FILE (`-` for stdin).
    #[arg(long, value_name = "FILE")]
    pub(super) pin_file: Option<PathBuf>,
    /// Allow spending a token's last PIN try.
    #[arg(long)]
    pub(super) allow_last_pin_try: bool,
}

impl AuthorityArgs {
    /// Authority from another slot or the recovery key: an admin acting on
    /// someone else's slot (a passwd is then a reset).
    fn is_admin(&self) -> bool {
        self.admin_slot.is_some() || self.recovery_key_file.is_some()
    }

    /// The password of token key slot `slot` and the PIN of its token
    /// `serial`, from --password-file / --pin-file or the terminal. `label`
    /// starts the password prompt ("Password", "Current password").
    pub(super) fn slot_secrets(
        &self,
        label: &str,
        slot: u8,
        serial: u32,
    ) -> Result<(SecretBytes, Pin)> {
        let password = prompt::secret(
            self.password_file.as_deref(),
            "password",
            &format!("{label} of key slot {slot} (token {serial}): "),
            "--password-file",
        )?;
        let pin = prompt::pin(
            self.pin_file.as_deref(),
            &format!("PIN of token {serial}: "),
        )?;
        Ok((password, pin))
    }

    pub(super) fn last_try(&self) -> LastTry {
        if self.allow_last_pin_try {
            LastTry::Allow
        } else {
            LastTry::Refuse
        }
    }
}

/// How long Argon2id takes for a new password.
#[derive(Args)]
pub struct KdfArgs {
    /// How long one password derivation (Argon2id) should take on this machine
    /// (raised to the vault policy's floor if that is higher). Default: RFC
    /// 9106's recommendation (64 MiB, 3 passes, 4 lanes).
    #[arg(long, value_parser = super::vault_cmd::parse_duration)]
    kdf_time: Option<Duration>,
    /// Argon2id memory in MiB (at least 64, and at least the policy's floor).
    #[arg(long, default_value_t = 64)]
    kdf_memory_mib: u32,
}

impl KdfArgs {
    fn target(&self) -> KdfTarget {
        KdfTarget {
            time: self.kdf_time,
            memory_kib: self.kdf_memory_mib.saturating_mul(1024),
        }
    }
}

#[derive(Args)]
pub struct EnrollArgs {
    /// The container file (it must not be mounted).
    vault: PathBuf,
    /// Enrol the plugged-in token with this serial; with --certificate, the
    /// serial of the token the certificate belongs to.
    #[arg(long, required_unless_present = "recovery")]
    serial: Option<u32>,
    /// The keybound key of the new token (retired PIV slot, hex); its only one by default.
    /// With --certificate: the slot the key is in (shown by `keybound token list`).
    #[arg(long, value_parser = super::token_cmd::parse_slot)]
    slot: Option<u8>,
    /// Enrol a token that is not here, from its certificate (`keybound token
    /// export`). The password you set is temporary: the user must change it
    /// (`keybound passwd`) before the first mount.
    #[arg(long, value_name = "FILE", conflicts_with = "recovery")]
    certificate: Option<PathBuf>,
    /// Create a recovery key (printed once) instead of a token slot.
    #[arg(long)]
    recovery: bool,
    /// The new slot's password, from FILE (`-` for stdin).
    #[arg(long, value_name = "FILE")]
    new_password_file: Option<PathBuf>,
    /// The new token's PIN, from FILE: it proves the token's key works.
    #[arg(long, value_name = "FILE")]
    new_pin_file: Option<PathBuf>,
    /// A name for the new key slot (shown by `keybound info`).
    #[arg(long, default_value = "")]
    label: String,
    #[command(flatten)]
    kdf: KdfArgs,
    #[command(flatten)]
    auth: AuthorityArgs,
}

#[derive(Args)]
pub struct PasswdArgs {
    /// The container file (it must not be mounted).
    vault: PathBuf,
    /// The key slot whose password changes. Default: the slot of the enrolled
    /// token that is plugged in.
    #[arg(long, value_name = "N")]
    slot: Option<u8>,
    /// The new password, from FILE (`-` for stdin).
    #[arg(long, value_name = "FILE")]
    new_password_file: Option<PathBuf>,
    #[command(flatten)]
    kdf: KdfArgs,
    /// Without --admin-slot or --recovery-key-file: the slot's own token and
    /// current password (--password-file, --pin-file). With either: a reset by
    /// an admin; the new password is temporary and must be changed by the user.
    #[command(flatten)]
    auth: AuthorityArgs,
}

#[derive(Args)]
pub struct RevokeArgs {
    /// The container file (it must not be mounted).
    vault: PathBuf,
    /// The key slot to remove (`keybound info` lists them).
    #[arg(long, value_name = "N")]
    slot: u8,
    /// Allow removing the last key slot: nothing will open the vault any more
    /// (except an old header backup).
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    auth: AuthorityArgs,
}

#[derive(Subcommand)]
pub enum HeaderCommand {
    /// Copy the vault's header (its key slots) to FILE. Needs no key.
    Backup {
        /// The container file (it must not be mounted).
        vault: PathBuf,
        /// Where to write the backup (it must not exist).
        file: PathBuf,
    },
    /// Put a header backup back. The backup's key slots come back with it,
    /// including slots revoked since.
    Restore {
        /// The container file (it must not be mounted).
        vault: PathBuf,
        /// The backup made by `keybound header backup`.
        file: PathBuf,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        /// Restore even though the data area changed since the backup
        /// (data written since may become unreadable).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Args)]
pub struct PolicyArgs {
    /// The container file (it must not be mounted to change the policy).
    vault: PathBuf,
    /// Shortest password accepted at enroll and passwd (0: the built-in 8).
    #[arg(long, value_name = "N")]
    min_password_length: Option<u16>,
    /// Argon2id memory floor in MiB for new passwords (0: the built-in 64).
    #[arg(long, value_name = "MiB")]
    argon_memory_floor: Option<u32>,
    /// Argon2id passes floor for new passwords (0: the built-in 3).
    #[arg(long, value_name = "N")]
    argon_time_floor: Option<u32>,
    /// PIN policy a token's key must have to be enrolled: always, once or none.
    #[arg(long, value_parser = parse_pin_policy)]
    require_pin_policy: Option<u8>,
    /// Idle lock for mounts without --idle (e.g. 15m; 0 for none).
    #[arg(long, value_name = "DURATION", value_parser = super::vault_cmd::parse_duration)]
    idle_default: Option<Duration>,
    #[command(flatten)]
    auth: AuthorityArgs,
}

fn parse_pin_policy(text: &str) -> Result<u8, String> {
    match text {
        "always" => Ok(PIN_POLICY_ALWAYS),
        "once" => Ok(PIN_POLICY_ONCE),
        "none" => Ok(0),
        _ => Err(format!("{text:?}: use always, once or none")),
    }
}

// -------------------------------------------------------------- common ----

/// Open the vault read-write. A mounted vault holds the file lock: say where.
fn open_locked_vault(vault: &Path) -> Result<Container> {
    match Container::open(vault, Access::ReadWrite) {
        Ok(c) => Ok(c),
        Err(e @ ContainerError::Locked { .. }) => Err(in_use(vault, e)),
        Err(e) => Err(e.into()),
    }
}

pub(super) fn in_use(vault: &Path, err: ContainerError) -> anyhow::Error {
    match registry::find_by_container(vault) {
        Some(r) => exitcodes::Coded {
            code: exitcodes::VAULT_IN_USE,
            message: format!(
                "{} is mounted at {} (process {}); admin commands work on a locked vault only: \
                 keybound unmount {} first",
                vault.display(),
                r.mountpoint.display(),
                r.pid,
                r.mountpoint.display()
            ),
        }
        .into(),
        None => anyhow::Error::from(err).context(format!(
            "admin commands work on a locked vault only, and {} is in use",
            vault.display()
        )),
    }
}

/// Say which authority is needed, ask for its secrets and unwrap the master key.
fn authorise(
    container: &Container,
    auth: &AuthorityArgs,
    authority: &Authority,
    what: &str,
) -> Result<MasterKey> {
    eprintln!("Authorise {what} with {}.", authority.describe());
    match authority {
        Authority::Token(choice) => {
            let (password, pin) =
                auth.slot_secrets("Password", choice.slot.index, choice.serial)?;
            Ok(admin::authorise(
                container,
                authority,
                Credentials::Token {
                    password: &password,
                    pin: &pin,
                    last_try: auth.last_try(),
                },
            )?)
        }
        Authority::Recovery => {
            let key = read_recovery_key(auth.recovery_key_file.as_deref())?;
            Ok(admin::authorise(
                container,
                authority,
                Credentials::Recovery(&key),
            )?)
        }
    }
}

pub(super) fn read_recovery_key(file: Option<&Path>) -> Result<SecretBytes> {
    let text = prompt::secret(
        file,
        "recovery key",
        "Recovery key: ",
        "--recovery-key-file",
    )?;
    Ok(recovery::parse(text.expose()).map_err(admin::AdminError::from)?)
}

fn choose(container: &Container, auth: &AuthorityArgs, exclude: Option<u8>) -> Result<Authority> {
    Ok(admin::choose_authority(
        container.path(),
        container.info(),
        auth.admin_slot,
        auth.recovery_key_file.is_some(),
        exclude,
    )?)
}

fn new_password(
    file: Option<&Path>,
    vault: &Path,
    policy: &Policy,
    what: &'static str,
) -> Result<SecretBytes> {
    let password = prompt::new_secret(file, what, "--new-password-file")?;
    admin::check_new_password(vault, policy, &password)?;
    Ok(password)
}

fn describe_slot(slot: &SlotInfo) -> String {
    match &slot.kind {
        SlotKind::Token { serial, .. } => format!("key slot {} (token {serial})", slot.index),
        SlotKind::Recovery => format!("key slot {} (recovery key)", slot.index),
    }
}

// -------------------------------------------------------------- enroll ----

pub fn enroll(args: EnrollArgs) -> Result<()> {
    let result = enroll_inner(&args);
    let form = if args.recovery {
        "recovery"
    } else if args.certificate.is_some() {
        "certificate"
    } else {
        "token"
    };
    let mut event = Event::new("enroll", &args.vault).field("form", form);
    if let Some(serial) = args.serial {
        event = event.token(serial);
    }
    audit_cmd::record_result(event, &result);
    result
}

fn enroll_inner(args: &EnrollArgs) -> Result<()> {
    let mut container = open_locked_vault(&args.vault)?;
    let vault = args.vault.clone();
    let header = container.info().clone();
    admin::free_slot(&vault, &header)?;
    if let (Some(serial), false) = (args.serial, args.recovery) {
        admin::check_serial_not_enrolled(&vault, &header, serial)?;
    }
    // Everything that needs no secret first: the new token's key.
    let certificate_key = match &args.certificate {
        Some(path) => {
            let bytes = std::fs::read(path)
                .with_context(|| format!("cannot read the certificate {}", path.display()))?;
            let key = TokenPublicKey::from_certificate(&bytes)
                .with_context(|| format!("{} is not a usable certificate", path.display()))?;
            let serial = args.serial.expect("clap requires --serial");
            admin::check_not_enrolled(&vault, &header, serial, &key)?;
            Some(key)
        }
        None => None,
    };
    if !args.recovery && certificate_key.is_none() {
        let serial = args.serial.expect("clap requires --serial");
        let present = token::piv_tokens()?;
        if !present.iter().any(|t| t.serial == serial) {
            return Err(token::TokenError::NotFound {
                serial,
                present: token::describe(&present),
            }
            .into());
        }
    }
    let authority = choose(&container, &args.auth, None)?;
    let mk = authorise(&container, &args.auth, &authority, "the enrolment")?;

    let kdf = args.kdf.target();
    let label = args.label.clone();
    let enrolled = if args.recovery {
        admin::enroll(&mut container, &mk, Enrolment::Recovery, None, kdf, label)?
    } else if let Some(card_key) = certificate_key {
        let serial = args.serial.expect("clap requires --serial");
        let password = new_password(
            args.new_password_file.as_deref(),
            &vault,
            &header.policy,
            "temporary password",
        )?;
        admin::enroll(
            &mut container,
            &mk,
            Enrolment::Certificate {
                card_key,
                serial,
                piv_slot: args.slot.unwrap_or(0x82),
            },
            Some(&password),
            kdf,
            label,
        )?
    } else {
        let serial = args.serial.expect("clap requires --serial");
        let binding = create::find_binding(Some(serial), args.slot)?;
        admin::check_not_enrolled(&vault, &header, serial, &binding.card_key)?;
        let password = new_password(
            args.new_password_file.as_deref(),
            &vault,
            &header.policy,
            "password for the new key slot",
        )?;
        let pin = prompt::pin(
            args.new_pin_file.as_deref(),
            &format!("PIN of the new token {serial}: "),
        )?;
        admin::enroll(
            &mut container,
            &mk,
            Enrolment::Token {
                binding,
                pin: &pin,
                last_try: args.auth.last_try(),
            },
            Some(&password),
            kdf,
            label,
        )?
    };
    drop(mk);
    for note in &enrolled.notes {
        eprintln!("Note: {note}");
    }
    if let Some(key) = &enrolled.recovery_key {
        let text = recovery::format(key).map_err(admin::AdminError::from)?;
        print_recovery_key(&vault, enrolled.slot, &text)?;
        return Ok(());
    }
    println!(
        "Enrolled token {} (key {}) in {}, key slot {}.",
        enrolled.serial.unwrap_or_default(),
        enrolled.fingerprint.as_deref().unwrap_or("?"),
        vault.display(),
        enrolled.slot
    );
    if let Some(argon) = enrolled.argon {
        println!(
            "  password KDF  Argon2id, {} MiB, {} passes, {} lane(s)",
            argon.memory_kib / 1024,
            argon.iterations,
            argon.parallelism
        );
    }
    if enrolled.must_change_password {
        println!(
            "The password is temporary: before the first mount, the token's owner must set their \
             own with\n  keybound passwd {} --slot {}\n(it needs the token, its PIN and the \
             temporary password). Check that the certificate's fingerprint {} is the one \
             `keybound token list` shows on the owner's machine.",
            vault.display(),
            enrolled.slot,
            enrolled.fingerprint.as_deref().unwrap_or("?")
        );
    }
    Ok(())
}

fn print_recovery_key(vault: &Path, slot: u8, text: &SecretBytes) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "Recovery key for {} (key slot {slot}). It is shown ONLY NOW; write it down and keep it \
         offline (a safe, not next to the vault). Anyone who has it opens the vault without \
         token or password:\n",
        vault.display()
    )?;
    out.write_all(b"    ")?;
    out.write_all(text.expose())?;
    writeln!(
        out,
        "\n\nOpen the vault with it: keybound mount {} DIR --recovery-key-file FILE --idle 15m",
        vault.display()
    )?;
    out.flush()?;
    Ok(())
}

// -------------------------------------------------------------- passwd ----

pub fn passwd(args: PasswdArgs) -> Result<()> {
    let result = passwd_inner(&args);
    let mut event = Event::new("passwd", &args.vault);
    if let Some(slot) = args.slot {
        event = event.slot(slot);
    }
    audit_cmd::record_result(event.field("reset", args.auth.is_admin()), &result);
    result
}

fn passwd_inner(args: &PasswdArgs) -> Result<()> {
    let mut container = open_locked_vault(&args.vault)?;
    let vault = args.vault.clone();
    let header = container.info().clone();
    let target = admin::passwd_target(&vault, &header, args.slot)?;
    let reset = args.auth.is_admin();
    let mk = if reset {
        let authority = choose(&container, &args.auth, Some(target.slot.index))?;
        if authority.slot() == Some(target.slot.index) {
            return Err(admin::AdminError::SelfAuthority {
                vault,
                slot: target.slot.index,
                what: "password reset (without --admin-slot it changes its own password)",
            }
            .into());
        }
        eprintln!(
            "Resetting the password of {}: the new password is temporary.",
            describe_slot(&target.slot)
        );
        authorise(&container, &args.auth, &authority, "the reset")?
    } else {
        eprintln!(
            "Changing the password of {}: needs token {}, its PIN and the current password.",
            describe_slot(&target.slot),
            target.serial
        );
        let (old, pin) =
            args.auth
                .slot_secrets("Current password", target.slot.index, target.serial)?;
        admin::open_own_slot(&container, &target, &old, &pin, args.auth.last_try())?
    };
    let password = new_password(
        args.new_password_file.as_deref(),
        &vault,
        &header.policy,
        "password",
    )?;
    let argon = admin::rewrap(
        &mut container,
        &mk,
        &target.slot,
        &password,
        args.kdf.target(),
        reset,
    )?;
    drop(mk);
    if reset {
        println!(
            "Reset the password of {} in {} (a reset by an admin, not a change by the owner). \
             The new password is temporary: the token's owner must change it with\n  keybound \
             passwd {} --slot {}\nbefore the vault mounts with this slot.",
            describe_slot(&target.slot),
            vault.display(),
            vault.display(),
            target.slot.index
        );
    } else {
        println!(
            "Changed the password of {} in {} (Argon2id {} MiB, {} passes). The old password no \
             longer opens it; old copies of the header (backups) still do.",
            describe_slot(&target.slot),
            vault.display(),
            argon.memory_kib / 1024,
            argon.iterations
        );
    }
    Ok(())
}

// -------------------------------------------------------------- revoke ----

pub fn revoke(args: RevokeArgs) -> Result<()> {
    let result = revoke_inner(&args);
    let event = Event::new("revoke", &args.vault)
        .slot(args.slot)
        .field("forced", args.force);
    audit_cmd::record_result(event, &result);
    result
}

fn revoke_inner(args: &RevokeArgs) -> Result<()> {
    let mut container = open_locked_vault(&args.vault)?;
    let vault = args.vault.clone();
    let header = container.info().clone();
    let target = header
        .slots
        .iter()
        .find(|s| s.index == args.slot)
        .cloned()
        .ok_or_else(|| admin::AdminError::NoSuchSlot {
            vault: vault.clone(),
            slot: args.slot,
        })?;
    let last = header.slots.len() == 1;
    if last && !args.force {
        return Err(ContainerError::LastSlot {
            path: vault,
            index: args.slot,
        })
        .context("pass --force to remove it anyway");
    }
    let authority = choose(&container, &args.auth, Some(args.slot))?;
    if authority.slot() == Some(args.slot) && !last {
        return Err(admin::AdminError::SelfAuthority {
            vault,
            slot: args.slot,
            what: "revocation",
        }
        .into());
    }
    let mk = authorise(&container, &args.auth, &authority, "the revocation")?;
    admin::revoke(&mut container, &mk, args.slot, args.force)?;
    drop(mk);
    println!(
        "Revoked {} of {}: its bytes are overwritten in both header copies.",
        describe_slot(&target),
        vault.display()
    );
    if last {
        println!("It was the last key slot: nothing in the file opens the vault any more.");
    }
    eprintln!(
        "WARNING: copies of the container or of its header made before now (backups, synced \
         copies, `keybound header backup` files) still hold this slot and still open with it. \
         Only a master-key rotation (`keybound rekey`) protects against those."
    );
    Ok(())
}

// -------------------------------------------------------------- header ----

pub fn header(cmd: HeaderCommand) -> Result<()> {
    match cmd {
        HeaderCommand::Backup { vault, file } => {
            let result = header_backup(&vault, &file);
            let event =
                Event::new("header-backup", &vault).field("file", file.display().to_string());
            audit_cmd::record_result(event, &result);
            result
        }
        HeaderCommand::Restore {
            vault,
            file,
            yes,
            force,
        } => {
            let result = header_restore(&vault, &file, yes, force);
            let event = Event::new("header-restore", &vault)
                .field("backup", file.display().to_string())
                .field("forced", force);
            audit_cmd::record_result(event, &result);
            result
        }
    }
}

fn header_backup(vault: &Path, file: &Path) -> Result<()> {
    let container = match Container::open(vault, Access::ReadOnly) {
        Err(e @ ContainerError::Locked { .. }) => return Err(in_use(vault, e)),
        other => other?,
    };
    let bytes = container.header_backup();
    let info = container.info().clone();
    drop(container);
    write_new_file(file, &bytes)?;
    println!(
        "Backed up the header of {} (container {}, {} key slot(s)) to {}.",
        vault.display(),
        hex::encode(info.id),
        info.slots.len(),
        file.display()
    );
    eprintln!(
        "Keep it like the vault itself: it holds today's key slots, and every token, password \
         and recovery key enrolled now will open the vault with it, even after being revoked."
    );
    Ok(())
}

fn write_new_file(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => anyhow::Error::from(exitcodes::Coded {
                code: exitcodes::EXISTS,
                message: format!(
                    "{} exists already; refusing to overwrite it",
                    path.display()
                ),
            }),
            _ => anyhow::Error::from(e).context(format!("cannot create {}", path.display())),
        })?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

fn header_restore(vault: &Path, file: &Path, yes: bool, force: bool) -> Result<()> {
    let bytes = std::fs::read(file)
        .with_context(|| format!("cannot read the backup {}", file.display()))?;
    let backup = container::inspect_backup(file, &bytes)?;
    let current = Container::inspect(vault).ok();
    if let Some(current) = &current
        && current.id != backup.id
    {
        return Err(ContainerError::BackupMismatch {
            path: vault.to_path_buf(),
            backup: file.to_path_buf(),
            vault_id: hex::encode(current.id),
            backup_id: hex::encode(backup.id),
        }
        .into());
    }
    // Refuse a mounted vault before asking anything.
    if let Err(e @ ContainerError::Locked { .. }) = Container::open(vault, Access::ReadOnly) {
        return Err(in_use(vault, e));
    }
    eprintln!("WARNING: restoring a header brings back ITS key slots, exactly as they were:");
    eprintln!("  backup  {}", slot_list(&backup));
    match &current {
        Some(c) => eprintln!("  now     {}", slot_list(c)),
        None => eprintln!("  now     (the current header is unreadable)"),
    }
    let returning: Vec<String> = backup
        .slots
        .iter()
        .filter(|b| {
            current
                .as_ref()
                .is_some_and(|c| !c.slots.iter().any(|s| s.salt == b.salt))
        })
        .map(describe_slot)
        .collect();
    if !returning.is_empty() {
        eprintln!(
            "  Slots revoked or changed since the backup come back and open the vault again: {}",
            returning.join(", ")
        );
    }
    eprintln!("  Passwords changed since the backup revert to the old ones.");
    if !yes {
        confirm(&format!(
            "Restore the header of {} from {}?",
            vault.display(),
            file.display()
        ))?;
    }
    let report = container::restore_header(vault, file, &bytes, force).map_err(|e| match e {
        e @ ContainerError::Locked { .. } => in_use(vault, e),
        other => other.into(),
    })?;
    println!(
        "Restored the header of {} from {}: key slots {}.",
        vault.display(),
        file.display(),
        slot_list(&report.restored)
    );
    Ok(())
}

fn slot_list(h: &HeaderInfo) -> String {
    if h.slots.is_empty() {
        return "none".into();
    }
    h.slots
        .iter()
        .map(describe_slot)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Ask "yes" on the terminal; without a terminal, refuse (use --yes).
fn confirm(question: &str) -> Result<()> {
    let refused = |why: &str| -> anyhow::Error {
        exitcodes::Coded {
            code: exitcodes::NOT_CONFIRMED,
            message: format!("{why}; nothing was changed (pass --yes to confirm in a script)"),
        }
        .into()
    };
    if !std::io::stdin().is_terminal() {
        return Err(refused("no terminal to confirm on"));
    }
    eprint!("{question} Type \"yes\" to go on: ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    if answer.trim() == "yes" {
        Ok(())
    } else {
        Err(refused("not confirmed"))
    }
}

// -------------------------------------------------------------- policy ----

pub fn policy(args: PolicyArgs) -> Result<()> {
    let changes = args.min_password_length.is_some()
        || args.argon_memory_floor.is_some()
        || args.argon_time_floor.is_some()
        || args.require_pin_policy.is_some()
        || args.idle_default.is_some();
    if !changes {
        let header = Container::inspect(&args.vault)?;
        println!("Policy of {}:", args.vault.display());
        for line in policy_lines(&header.policy) {
            println!("  {line}");
        }
        return Ok(());
    }
    let result = policy_inner(&args);
    audit_cmd::record_result(Event::new("policy", &args.vault), &result);
    result
}

fn policy_inner(args: &PolicyArgs) -> Result<()> {
    let mut container = open_locked_vault(&args.vault)?;
    let mut policy = container.info().policy;
    if let Some(n) = args.min_password_length {
        policy.min_password_len = n;
    }
    if let Some(mib) = args.argon_memory_floor {
        policy.argon_min_memory_kib = mib.saturating_mul(1024);
    }
    if let Some(t) = args.argon_time_floor {
        policy.argon_min_iterations = t;
    }
    if let Some(p) = args.require_pin_policy {
        policy.pin_policy = p;
    }
    if let Some(idle) = args.idle_default {
        policy.idle_timeout_s =
            u32::try_from(idle.as_secs()).context("the idle default is too long")?;
        if !idle.is_zero() && policy.idle_timeout_s == 0 {
            anyhow::bail!("the idle default must be at least 1 s (or 0 for none)");
        }
    }
    let authority = choose(&container, &args.auth, None)?;
    let mk = authorise(&container, &args.auth, &authority, "the policy change")?;
    admin::set_policy(&mut container, &mk, policy)?;
    drop(mk);
    println!("Set the policy of {}:", args.vault.display());
    for line in policy_lines(&policy) {
        println!("  {line}");
    }
    let below: Vec<String> = container
        .info()
        .slots
        .iter()
        .filter(|s| match &s.kind {
            SlotKind::Token { argon, .. } => !admin::meets_floor(&policy, argon),
            SlotKind::Recovery => false,
        })
        .map(describe_slot)
        .collect();
    if !below.is_empty() {
        println!(
            "Below the new Argon2id floor (they still open; `keybound passwd` raises them): {}",
            below.join(", ")
        );
    }
    if policy.pin_policy != 0 {
        println!(
            "The PIN policy is checked when a token is enrolled; tokens enrolled already are not \
             checked."
        );
    }
    Ok(())
}

/// The policy in words, for `policy` and `info`.
pub fn policy_lines(p: &Policy) -> Vec<String> {
    let floor = admin::argon_floor(p);
    vec![
        format!(
            "minimum password length  {}{}",
            admin::min_password_len(p),
            if p.min_password_len == 0 {
                " (built-in)"
            } else {
                ""
            }
        ),
        format!(
            "Argon2id floor           {} MiB, {} passes{}",
            floor.memory_kib / 1024,
            floor.iterations,
            if p.argon_min_memory_kib == 0 && p.argon_min_iterations == 0 {
                " (built-in)"
            } else {
                ""
            }
        ),
        format!(
            "token PIN policy         {}",
            match p.pin_policy {
                0 => "any".to_string(),
                v => format!("{} required", admin::pin_policy_name(v)),
            }
        ),
        format!(
            "idle lock default        {}",
            match p.idle_timeout_s {
                0 => "none".to_string(),
                s => format!("{s} s (when mount has no --idle)"),
            }
        ),
    ]
}

// --------------------------------------------------------- mount hooks ----

/// The policy's idle default, when `--idle` was not given.
pub fn idle_default(vault: &Path, idle: Option<Duration>) -> Result<Option<Duration>> {
    if idle.is_some() {
        return Ok(idle);
    }
    let header = Container::inspect(vault)?;
    Ok(match header.policy.idle_timeout_s {
        0 => None,
        s => Some(Duration::from_secs(u64::from(s))),
    })
}

/// Refuse, before any secret is asked, a slot whose password is temporary.
pub fn check_mountable(vault: &Path, slot: &SlotInfo) -> Result<()> {
    if slot.flags.must_change_password {
        return Err(keybound::session::SessionError::PasswordChangeRequired {
            vault: vault.to_path_buf(),
            slot: slot.index,
        }
        .into());
    }
    Ok(())
}

/// What a recovery-key mount needs from `mount`'s arguments.
pub struct RecoveryMount<'a> {
    pub vault: &'a Path,
    pub dir: &'a Path,
    pub key_file: Option<&'a Path>,
    pub read_only: bool,
    pub allow_other: bool,
    pub idle: Option<Duration>,
}

/// `keybound mount --recovery-key-file FILE`: open with the recovery key and
/// serve in the foreground. Nothing tethers such a mount to a token, so an
/// idle limit is required, and it runs only as long as this process (Ctrl-C,
/// closing the terminal, `keybound lock` and the idle limit lock it).
pub fn mount_recovery(m: RecoveryMount) -> Result<()> {
    let Some(idle) = m.idle else {
        return Err(exitcodes::Coded {
            code: exitcodes::USAGE,
            message: format!(
                "a mount with the recovery key is tethered to no token, so it needs an idle \
                 limit: pass --idle (e.g. --idle 15m), or set a default with `keybound policy {} \
                 --idle-default 15m`",
                m.vault.display()
            ),
        }
        .into());
    };
    keybound::session::mountpoint::check_fuse()?;
    Container::inspect(m.vault)?;
    let mountpoint = keybound::session::mountpoint::check(m.dir)?;
    let access = if m.read_only {
        Access::ReadOnly
    } else {
        Access::ReadWrite
    };
    let container = match Container::open(m.vault, access) {
        Err(e @ ContainerError::Locked { .. }) => return Err(in_use(m.vault, e)),
        other => other?,
    };
    // As every serving process: all memory locked before the key is read.
    keybound::secrets::lock_all_memory()?;
    let key = read_recovery_key(m.key_file)?;
    let (mk, slot) = match admin::unlock_recovery(&container, &key) {
        Ok(ok) => ok,
        Err(e) => {
            let err = anyhow::Error::from(e);
            let event = Event::new("unlock", m.vault).field("with", "recovery key");
            audit_cmd::record_failure(event, &err);
            return Err(err);
        }
    };
    drop(key);
    keybound::secrets::scrub_stack();
    audit_cmd::record(
        Event::new("unlock", m.vault)
            .slot(slot)
            .field("with", "recovery key")
            .field("tethered", false)
            .ok(),
    );
    let options = keybound::session::daemon::ServeOptions {
        read_only: m.read_only,
        allow_other: m.allow_other,
        log: None,
        idle: Some(idle),
    };
    let vault = m.vault.display().to_string();
    let ended = daemon::serve(container, mk, &mountpoint, slot, None, &options, |record| {
        println!(
            "Mounted {vault} at {} with the recovery key (key slot {slot}). UNTETHERED: no token \
             locks it; it locks after {} s idle, on `keybound lock {}`, Ctrl-C or when this \
             terminal closes.",
            record.mountpoint.display(),
            idle.as_secs(),
            record.mountpoint.display()
        );
        let _ = std::io::stdout().flush();
    })?;
    keybound::secrets::scrub_stack();
    let action = match ended.reason {
        keybound::session::tether::LockReason::Unmounted => "unmount",
        _ => "lock",
    };
    audit_cmd::record(
        Event::new(action, m.vault)
            .slot(slot)
            .reason(ended.reason.kind())
            .field("detail", ended.reason.describe(None))
            .ok(),
    );
    match ended.reason {
        keybound::session::tether::LockReason::Unmounted => Ok(()),
        reason => Err(exitcodes::Coded {
            code: exitcodes::for_lock_reason(&reason),
            message: format!("locked {vault}: {}; keys wiped", reason.describe(None)),
        }
        .into()),
    }
}
