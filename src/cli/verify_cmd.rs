//! `keybound verify VAULT [--deep]`: check a container or a backup copy.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;

#[derive(Args)]
pub struct VerifyArgs {
    /// The container file or backup copy to check.
    vault: PathBuf,
}

pub fn run(args: VerifyArgs) -> Result<()> {
    bail!("verify {}: not implemented yet", args.vault.display())
}
