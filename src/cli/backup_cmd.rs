//! `keybound backup` and `keybound snapshot`: consistent copies without keys.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;

#[derive(Args)]
pub struct BackupArgs {
    /// The container file.
    vault: PathBuf,
    /// Where the copy goes.
    dest: PathBuf,
}

#[derive(Args)]
pub struct SnapshotArgs {
    /// The container file.
    vault: PathBuf,
}

pub fn backup(args: BackupArgs) -> Result<()> {
    bail!(
        "backup {} {}: not implemented yet",
        args.vault.display(),
        args.dest.display()
    )
}

pub fn snapshot(args: SnapshotArgs) -> Result<()> {
    bail!("snapshot {}: not implemented yet", args.vault.display())
}
