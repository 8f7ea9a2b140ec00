//! The command line: the only layer that prints to or reads from a user.

mod admin_cmd;
mod audit_cmd;
mod backup_cmd;
mod compact_cmd;
mod dumpkey_cmd;
pub mod exitcodes;
mod mount_cmd;
mod prompt;
mod rekey_cmd;
mod token_cmd;
mod unlock_args;
mod vault_cmd;
mod verify_cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "keybound",
    version,
    about = "An encrypted virtual disk that is open only while its owner's hardware key is plugged in",
    long_about = "An encrypted virtual disk that is open only while its owner's hardware key is \
                  plugged in.\n\nSecrets (PINs, passwords) are read from the terminal without echo, \
                  or from files given with --pin-file and friends (`-` reads stdin); never from \
                  the command line.\n\nExit codes are stable; see docs/user-guide.md."
)]
pub struct Cli {
    /// Log more (repeat for more detail); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Append audit entries to FILE instead of KEYBOUND_AUDIT_LOG or the default
    /// (~/.local/state/keybound/audit.log; root: /var/log/keybound/audit.log).
    #[arg(long, global = true, value_name = "FILE")]
    pub audit_log: Option<std::path::PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// PIV tokens (YubiKeys, smart cards): list, set up, export.
    #[command(subcommand)]
    Token(token_cmd::TokenCommand),
    /// Create a new vault bound to a plugged-in token and a password.
    Create(vault_cmd::CreateArgs),
    /// Unlock a vault (password + token PIN) and mount it on an empty directory.
    Mount(mount_cmd::MountArgs),
    /// Commit everything, unmount a vault and wipe its keys (refused while files are open).
    Unmount(mount_cmd::UnmountArgs),
    /// Lock a vault now: commit, cut off open files, unmount, wipe its keys.
    Lock(mount_cmd::LockArgs),
    /// List mounted vaults.
    Status(vault_cmd::StatusArgs),
    /// Show a vault's header: format, container id, key slots, KDF settings. Never secrets.
    Info(vault_cmd::InfoArgs),
    /// Give the free space inside a growing (unmounted) vault back to the disk; needs password +
    /// token.
    Compact(compact_cmd::CompactArgs),
    /// Print the vault's master key (hex, on stdout) for disaster recovery; needs password + token.
    DumpKey(dumpkey_cmd::DumpKeyArgs),
    /// Add a key slot: another token (plugged in, or from its certificate) or a recovery key.
    Enroll(admin_cmd::EnrollArgs),
    /// Change a key slot's password (its token + current password), or reset it as an admin.
    Passwd(admin_cmd::PasswdArgs),
    /// Remove a key slot (overwritten in both header copies).
    Revoke(admin_cmd::RevokeArgs),
    /// Rotate the master key: re-encrypt every sector, carry every key slot over (resumable).
    Rekey(rekey_cmd::RekeyArgs),
    /// Back up or restore the vault's header (its key slots).
    #[command(subcommand)]
    Header(admin_cmd::HeaderCommand),
    /// Show or set the vault policy: password length, Argon2id floor, PIN policy, idle default.
    Policy(admin_cmd::PolicyArgs),
    /// The audit log: check its hash chain, show its entries.
    #[command(subcommand)]
    Audit(audit_cmd::AuditCommand),
    /// Copy a vault (mounted or not) to a consistent backup, no key needed; `--incremental`
    /// rewrites only what changed.
    Backup(backup_cmd::BackupArgs),
    /// Run a command (rsync, restic, …) while the vault's container holds still, so it copies
    /// a consistent file; no key needed.
    Snapshot(backup_cmd::SnapshotArgs),
    /// Check a container (or a backup copy): headers and geometry without keys; with
    /// `--deep`, password and token, every sector and the filesystem.
    Verify(verify_cmd::VerifyArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(log) = &cli.audit_log {
        keybound::audit::set_log_path(log);
    }
    match cli.command {
        Command::Token(cmd) => token_cmd::run(cmd),
        Command::Create(args) => vault_cmd::create(args),
        Command::Mount(args) => mount_cmd::mount(args),
        Command::Unmount(args) => mount_cmd::unmount(args),
        Command::Lock(args) => mount_cmd::lock(args),
        Command::Status(args) => vault_cmd::status(args),
        Command::Info(args) => vault_cmd::info(args),
        Command::Compact(args) => compact_cmd::run(args),
        Command::DumpKey(args) => dumpkey_cmd::run(args),
        Command::Enroll(args) => admin_cmd::enroll(args),
        Command::Passwd(args) => admin_cmd::passwd(args),
        Command::Revoke(args) => admin_cmd::revoke(args),
        Command::Rekey(args) => rekey_cmd::run(args),
        Command::Header(cmd) => admin_cmd::header(cmd),
        Command::Policy(args) => admin_cmd::policy(args),
        Command::Audit(cmd) => audit_cmd::run(cmd),
        Command::Backup(args) => backup_cmd::backup(args),
        Command::Snapshot(args) => backup_cmd::snapshot(args),
        Command::Verify(args) => verify_cmd::run(args),
    }
}

/// An error and its causes on one line, as `{:#}` prints them, but without a cause whose text
/// the message before it already ends with: many of our errors say what failed *and* why
/// (`cannot create F: No such file or directory`) while also naming the I/O error as their
/// source, and the chain would then repeat the reason.
pub fn error_text(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let part = cause.to_string();
        if text.is_empty() {
            text = part;
        } else if !text.ends_with(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_text_says_each_reason_once() {
        let io = std::io::Error::from_raw_os_error(libc::ENOENT);
        let err = keybound::container::ContainerError::Io {
            path: "/v/vault.kbd".into(),
            op: "create",
            source: io,
        };
        let err = anyhow::Error::from(err).context("keybound create failed");
        assert_eq!(
            error_text(&err),
            "keybound create failed: cannot create /v/vault.kbd: No such file or directory (os error 2)"
        );
        // A cause the message does not spell out is kept.
        let plain = anyhow::anyhow!("disk on fire").context("cannot write /v/vault.kbd");
        assert_eq!(
            error_text(&plain),
            "cannot write /v/vault.kbd: disk on fire"
        );
    }
}
