//! `keybound backup` and `keybound snapshot`: consistent copies of a vault's
//! container, mounted or not, without any key.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitStatus;

use anyhow::{Context, Result};
use clap::Args;
use keybound::container::Thawed;
use keybound::session::backup::{self, BackupOptions, BackupReport, Hold};

use super::exitcodes::{self, Coded};

#[derive(Args)]
pub struct BackupArgs {
    /// The container file (mounted or not).
    vault: PathBuf,
    /// Where the copy goes: a file (replaced atomically), or a directory that
    /// gets a dated copy (VAULTNAME-YYYYMMDDTHHMMSSZ.EXT).
    dest: PathBuf,
    /// Update the existing copy DEST in place, writing only the sectors that
    /// differ (so rsync, restic or borg downstream see small changes).
    #[arg(long)]
    incremental: bool,
    /// With a directory DEST: keep only the newest N dated copies.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    keep: Option<u64>,
    /// Print a JSON summary on stdout (and no progress bar).
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct SnapshotArgs {
    /// The container file (mounted or not).
    vault: PathBuf,
    /// The command to run while the container holds still, after `--`
    /// (e.g. `-- rsync -a vault.kbv backup:/vaults/`). It gets the
    /// container's path in KEYBOUND_SNAPSHOT.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<OsString>,
}

pub fn backup(args: BackupArgs) -> Result<()> {
    let options = BackupOptions {
        incremental: args.incremental,
        keep: args.keep.map(|k| k as usize),
    };
    let bar = (!args.json && std::io::stderr().is_terminal()).then(progress_bar);
    let mut progress = |done: u64, total: u64| {
        if let Some(bar) = &bar {
            bar.set_length(total);
            bar.set_position(done);
        }
    };
    let report = backup::backup(&args.vault, &args.dest, &options, &mut progress)
        .with_context(|| format!("backing up {}", args.vault.display()));
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let report = report?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

fn progress_bar() -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "copying {bar:40} {bytes}/{total_bytes} ({binary_bytes_per_sec}, {eta} left)",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

fn print_report(r: &BackupReport) {
    let how = if r.mounted {
        "mounted: its daemon held commits"
    } else {
        "not mounted: held with a shared lock"
    };
    println!("Backed up {} ({how})", r.vault.display());
    println!("  copy:    {}", r.copy.display());
    if r.incremental {
        println!(
            "  written: {} of {} bytes ({:.2} %), only the sectors that changed",
            r.bytes_written,
            r.bytes,
            100.0 * r.bytes_written as f64 / r.bytes.max(1) as f64
        );
    } else {
        println!("  size:    {} bytes", r.bytes);
    }
    println!(
        "  took:    {:.2} s (vault held still for {} ms)",
        r.seconds, r.held_ms
    );
    if r.retried {
        println!("  note:    the vault locked during the first copy; the copy was taken again");
    }
    for w in &r.warnings {
        println!("  warning: {w} (the vault has this too: run `keybound verify` on it)");
    }
    for old in &r.pruned {
        println!("  removed: {} (--keep)", old.display());
    }
}

pub fn snapshot(args: SnapshotArgs) -> Result<()> {
    let (program, rest) = args
        .command
        .split_first()
        .context("snapshot needs a command after `--`")?;
    let hold = Hold::take(&args.vault)
        .with_context(|| format!("holding {} still", args.vault.display()))?;
    tracing::info!(vault = %args.vault.display(), mounted = hold.mounted(), "held; running the command");
    let status = std::process::Command::new(program)
        .args(rest)
        .env("KEYBOUND_SNAPSHOT", &args.vault)
        .status();
    // Release before anything else: the vault's writers are waiting.
    let thawed = hold.release();
    let shown = program.to_string_lossy();
    let status = status.with_context(|| format!("running {shown}"))?;
    if thawed == Thawed::Broken {
        return Err(Coded {
            code: exitcodes::HOLD_BROKEN,
            message: format!(
                "{} locked while {shown} ran, so what it copied may be torn: run it again \
                 (the vault is now locked and holds still)",
                args.vault.display()
            ),
        }
        .into());
    }
    match exit_code(status) {
        0 => Ok(()),
        code => Err(Coded {
            code,
            message: format!("{shown} failed ({status}); the vault was held still throughout"),
        }
        .into()),
    }
}

/// The command's exit code, or 128 + signal as a shell reports it.
fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(exitcodes::OTHER)
}
