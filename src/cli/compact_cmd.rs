//! `keybound compact VAULT`: give the free space inside a growing container
//! back to the disk (see `session::compact`). The vault must not be mounted;
//! it is unlocked like `mount` (token, PIN, password), because moving pages
//! means decrypting and resealing them.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use keybound::container::{Access, Container};

use super::unlock_args::{TokenUnlockArgs, unlock_unmounted};

#[derive(Args)]
pub struct CompactArgs {
    /// The container file (it must not be mounted).
    vault: PathBuf,
    #[command(flatten)]
    token: TokenUnlockArgs,
}

pub fn run(args: CompactArgs) -> Result<()> {
    let result = compact(&args);
    let event = keybound::audit::Event::new("compact", &args.vault);
    super::audit_cmd::record_result(event, &result);
    result
}

fn compact(args: &CompactArgs) -> Result<()> {
    // Before any secret is asked for (and a PIN try spent): the header says it all.
    if Container::inspect(&args.vault)?.fixed_size.is_some() {
        anyhow::bail!(
            "{} has a fixed size (made with `create --size`): its size never changes, so there \
             is nothing to give back",
            args.vault.display()
        );
    }
    let before = file_len(&args.vault)?;
    let unlocked = unlock_unmounted(
        &args.vault,
        Access::ReadWrite,
        &args.token,
        anyhow::Error::from,
    )?;
    eprintln!("Compacting {} …", args.vault.display());
    let moved = keybound::session::compact::compact(unlocked.container, unlocked.master_key)?;
    let after = file_len(&args.vault)?;
    println!(
        "Compacted {}: {} → {} ({} given back{})",
        args.vault.display(),
        super::vault_cmd::human_bytes(before),
        super::vault_cmd::human_bytes(after),
        super::vault_cmd::human_bytes(before.saturating_sub(after)),
        if moved { "" } else { "; no page needed moving" }
    );
    Ok(())
}

fn file_len(vault: &Path) -> Result<u64> {
    Ok(std::fs::metadata(vault)
        .with_context(|| format!("cannot read the size of {}", vault.display()))?
        .len())
}
