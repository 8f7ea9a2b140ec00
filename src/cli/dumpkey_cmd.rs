//! `keybound dump-key VAULT`: print the vault's master key, for disaster
//! recovery (what `cryptsetup luksDump --dump-volume-key` is to LUKS).
//!
//! Guarded exactly like `mount`: the token must be plugged in, and both its
//! PIN and the vault password are needed. The key goes to stdout as one line
//! of hex and nothing else, so a script can capture it; everything a person
//! should read (the warning) goes to stderr.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use keybound::secrets::SecretBytes;

use keybound::container::Access;

use super::unlock_args::{TokenUnlockArgs, unlock_unmounted};

#[derive(Args)]
pub struct DumpKeyArgs {
    /// The container file (it must not be mounted).
    vault: PathBuf,
    #[command(flatten)]
    token: TokenUnlockArgs,
}

const WARNING: &str = "\
WARNING: this is the vault's master key. Anyone who has it can decrypt this vault and every \
copy or backup of it, without password or token, until the master key is rotated. Do not \
store it next to the vault; keep it offline (paper in a safe), and never paste it into a \
chat, ticket or shell history.";

pub fn run(args: DumpKeyArgs) -> Result<()> {
    let result = dump_key(&args);
    // Who took the master key out, and when: the audit log keeps it.
    let event = keybound::audit::Event::new("dump-key", &args.vault);
    super::audit_cmd::record_result(event, &result);
    result
}

fn dump_key(args: &DumpKeyArgs) -> Result<()> {
    // Everything that needs no secret first, as `mount` does: the container,
    // its lock (a mounted vault is refused) and the token to use.
    let unlocked = unlock_unmounted(
        &args.vault,
        Access::ReadOnly,
        &args.token,
        anyhow::Error::from,
    )?;
    let master_key = unlocked.master_key;
    drop(unlocked.container);

    let line = hex_line(master_key.dangerous_export())?;
    drop(master_key);
    eprintln!("{WARNING}");
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(line.expose())
        .and_then(|()| stdout.flush())
        .context("cannot write the master key to stdout")?;
    Ok(())
}

/// `key` as lowercase hex and a newline, built in locked memory.
fn hex_line(key: &[u8]) -> Result<SecretBytes> {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut line = SecretBytes::zeroed(key.len() * 2 + 1)?;
    let out = line.as_mut();
    for (i, byte) in key.iter().enumerate() {
        out[2 * i] = DIGITS[usize::from(byte >> 4)];
        out[2 * i + 1] = DIGITS[usize::from(byte & 0x0f)];
    }
    out[key.len() * 2] = b'\n';
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_line_is_lowercase_hex_and_a_newline() {
        let line = hex_line(&[0x00, 0x9f, 0xa0, 0xff]).unwrap();
        assert_eq!(line.expose(), b"009fa0ff\n");
    }
}
