//! `keybound verify VAULT [--deep]`: check a container or a backup copy.
//!
//! Without keys: both header copies, which one is used and whether they agree, the geometry
//! against the file's length, an unfinished key rotation, an interrupted incremental backup.
//! With `--deep` (password + token + PIN, like `mount`): the header MACs, every sector's
//! authentication, and the filesystem's consistency, naming every damaged file. Nothing is
//! written to the file checked. Exit 0 when all is well, 51 when damage was found.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;
use keybound::container::{
    Access, ContainerError, CopyStatus, HeaderCopy, MacStatus, Severity, ShallowReport,
    verify_container,
};
use keybound::session::registry;
use keybound::session::verify::{DamagedSector, DeepProgress, DeepReport, verify_deep};
use serde::Serialize;

use super::exitcodes;
use super::unlock_args::{TokenUnlockArgs, unlock_unmounted};

#[derive(Args)]
pub struct VerifyArgs {
    /// The container file or backup copy to check.
    vault: PathBuf,
    /// Also unlock it (password + token + PIN) and check every sector's authentication and the
    /// filesystem, naming the damaged files. The vault must not be mounted: verify a copy
    /// (`keybound backup`) of a mounted vault.
    #[arg(long)]
    deep: bool,
    /// Print the report as JSON on stdout (and no progress bar).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    token: TokenUnlockArgs,
}

/// The whole report, for `--json`.
#[derive(Serialize)]
struct JsonReport<'a> {
    vault: &'a Path,
    /// No damage found.
    ok: bool,
    /// Every path (or part of the metadata) that could not be read, for scripts.
    damaged_files: Vec<String>,
    shallow: &'a ShallowReport,
    deep: Option<&'a DeepReport>,
    /// Why `--deep` did not run although asked for.
    deep_skipped: Option<&'a str>,
}

const DEEP_SKIPPED: &str = "the deep check needs a usable header and the whole data area; \
                            fix what the keyless check found first";

pub fn run(args: VerifyArgs) -> Result<()> {
    if !args.deep && args.token.any_given() {
        return Err(exitcodes::Coded {
            code: exitcodes::USAGE,
            message: "--serial, --password-file, --pin-file and --allow-last-pin-try are for \
                      `verify --deep`"
                .into(),
        }
        .into());
    }
    let shallow = verify_container(&args.vault)?;
    let mut deep = None;
    let mut skipped = None;
    if args.deep {
        if shallow.unlockable() {
            let mut event = keybound::audit::Event::new("verify", &args.vault).field("deep", true);
            let result = deep_check(&args, &mut event);
            record(event, &result);
            deep = Some(result?);
        } else {
            skipped = Some(DEEP_SKIPPED);
        }
    }
    let damage = shallow.damaged() || deep.as_ref().is_some_and(DeepReport::damaged);
    if args.json {
        let report = JsonReport {
            vault: &args.vault,
            ok: !damage,
            damaged_files: deep.as_ref().map(damaged_paths).unwrap_or_default(),
            shallow: &shallow,
            deep: deep.as_ref(),
            deep_skipped: skipped,
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&args.vault, &shallow, deep.as_ref(), skipped);
    }
    if damage {
        return Err(exitcodes::Coded {
            code: exitcodes::VERIFY_DAMAGE,
            message: format!(
                "{} is damaged (see the report{})",
                args.vault.display(),
                if args.json { "" } else { " above" }
            ),
        }
        .into());
    }
    Ok(())
}

/// Unlock read-only and run the deep check, with a progress bar on a terminal.
fn deep_check(args: &VerifyArgs, event: &mut keybound::audit::Event) -> Result<DeepReport> {
    let unlocked = unlock_unmounted(&args.vault, Access::ReadOnly, &args.token, |e| {
        mounted(&args.vault, e)
    })?;
    let id = unlocked.container.info().id;
    let (slot, serial) = (unlocked.choice.slot.index, unlocked.choice.serial);
    event.update(|e| e.container_id(&id).slot(slot).token(serial));
    let bar = (!args.json && std::io::stderr().is_terminal()).then(progress_bar);
    let mut phase = None;
    let mut progress = |p: DeepProgress| {
        let Some(bar) = &bar else { return };
        let (name, done, total) = match p {
            DeepProgress::Sectors { done, total } => ("sectors", done, total),
            DeepProgress::Files { done, total } => ("inodes ", done, total),
        };
        if phase != Some(name) {
            phase = Some(name);
            bar.set_message(name);
            bar.reset();
        }
        bar.set_length(total);
        bar.set_position(done);
    };
    let quiet = QuietRedbPanics::install();
    let report = verify_deep(unlocked.container, unlocked.master_key, &mut progress);
    drop(quiet);
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    Ok(report?)
}

/// redb panics on some damaged pages; the filesystem catches that and reports the read as
/// damaged. While the deep check runs, the default hook's message for those panics (which looks
/// like a crash of `keybound`) goes to the debug log instead; any other panic is reported as
/// usual.
struct QuietRedbPanics;

impl QuietRedbPanics {
    fn install() -> Self {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info.location().is_some_and(|l| l.file().contains("/redb-")) {
                tracing::debug!("the store panicked on a damaged page (caught): {info}");
            } else {
                previous(info);
            }
        }));
        QuietRedbPanics
    }
}

impl Drop for QuietRedbPanics {
    fn drop(&mut self) {
        // Back to the default hook (the CLI installs no other).
        let _ = std::panic::take_hook();
    }
}

fn progress_bar() -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("checking {msg} {bar:40} {pos}/{len} ({eta} left)")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

/// A deep check of a mounted vault is refused by its lock: say where it is mounted and what to
/// do instead.
fn mounted(vault: &Path, err: ContainerError) -> anyhow::Error {
    let holder = match &err {
        ContainerError::Locked { holder, .. } => *holder,
        _ => None,
    };
    let record =
        registry::find_by_container(vault).or_else(|| holder.and_then(registry::find_by_pid));
    let (where_, unmount) = match (&record, holder) {
        (Some(r), _) => (
            format!(
                "mounted at {} by keybound process {}",
                r.mountpoint.display(),
                r.pid
            ),
            format!("keybound unmount {}", r.mountpoint.display()),
        ),
        (None, Some(pid)) => (
            format!("in use by process {pid} (mounted, a backup in progress, or an admin command)"),
            "unmount it".to_string(),
        ),
        (None, None) => ("in use by another process".into(), "unmount it".to_string()),
    };
    exitcodes::Coded {
        code: exitcodes::VAULT_IN_USE,
        message: format!(
            "{v} is {where_}; `verify --deep` needs the vault locked (it opens the file \
             read-only and must see it hold still). Verify a copy instead — `keybound backup {v} \
             COPY`, then `keybound verify --deep COPY` — or {unmount} first",
            v = vault.display()
        ),
    }
    .into()
}

/// The audit log keeps who used the key to check the vault (never a path inside it).
fn record(event: keybound::audit::Event, result: &Result<DeepReport>) {
    let event = match result {
        Ok(r) => event
            .field("damage_found", r.damaged())
            .field(
                "damaged_files",
                r.filesystem.as_ref().map_or(0, |f| f.damaged.len()),
            )
            .field("damaged_sectors", r.damaged_sectors.len())
            .field("sectors_checked", r.sectors_checked),
        Err(_) => event,
    };
    super::audit_cmd::record_result(event, result);
}

/// Every path whose reads met damage, in the order found.
fn damaged_paths(deep: &DeepReport) -> Vec<String> {
    let mut out: Vec<String> = deep
        .filesystem
        .iter()
        .flat_map(|f| f.damaged.iter().map(|d| d.path.clone()))
        .collect();
    for s in &deep.damaged_sectors {
        for p in &s.used_by {
            if !out.contains(p) {
                out.push(p.clone());
            }
        }
    }
    out
}

fn copy_letter(c: HeaderCopy) -> &'static str {
    match c {
        HeaderCopy::A => "A",
        HeaderCopy::B => "B",
    }
}

fn mark(ok: bool) -> &'static str {
    if ok { "ok     " } else { "DAMAGED" }
}

fn print_report(
    vault: &Path,
    shallow: &ShallowReport,
    deep: Option<&DeepReport>,
    skipped: Option<&str>,
) {
    println!("Verifying {}", vault.display());
    println!("Without keys:");
    for c in &shallow.copies {
        let used = shallow.copy_used == Some(c.copy);
        let state = match (c.status, c.generation) {
            (CopyStatus::Valid, Some(g)) => format!("valid, generation {g}"),
            _ => c.problem.clone().unwrap_or_else(|| "not valid".into()),
        };
        println!(
            "  {} header copy {} (offset {}): {state}{}",
            mark(c.status == CopyStatus::Valid),
            copy_letter(c.copy),
            c.offset,
            if used { " — in use" } else { "" }
        );
    }
    if !shallow.copies_differ_in.is_empty() {
        println!(
            "          the older copy differs in: {} (normal: it is one header write behind)",
            shallow.copies_differ_in.join(", ")
        );
    }
    if let Some(id) = &shallow.container_id {
        println!("          container id {id}");
    }
    if let Some(g) = &shallow.geometry {
        let ok = g.file_len >= g.expected_len;
        let sectors = g.capacity_sectors.unwrap_or(0).max(g.extent_sectors);
        println!(
            "  {} geometry: {}-byte sectors sealed in {} bytes from offset {}; extent {} \
             sectors{}; store length {} bytes",
            mark(ok),
            g.sector_size,
            g.sealed_sector_size,
            g.data_offset,
            g.extent_sectors,
            g.capacity_sectors
                .map(|c| format!(", fixed size {c} sectors"))
                .unwrap_or_default(),
            g.store_len
        );
        println!(
            "          file length {} bytes, header promises {} ({} + {sectors} × {})",
            g.file_len, g.expected_len, g.data_offset, g.sealed_sector_size
        );
    }
    for f in &shallow.findings {
        let tag = match f.severity {
            Severity::Damage => "DAMAGED",
            Severity::Note => "note   ",
        };
        println!("  {tag} {}", f.message);
        // Damage's advice goes under "What to do".
        if let (Severity::Note, Some(advice)) = (f.severity, &f.advice) {
            println!("          → {advice}");
        }
    }

    match (deep, skipped) {
        (Some(d), _) => print_deep(d),
        (None, Some(why)) => println!("With keys: not checked: {why}"),
        (None, None) => println!(
            "With keys: not checked (add --deep, with the password and the token, to \
             authenticate every sector and check the filesystem)"
        ),
    }

    let damage = shallow.damaged() || deep.is_some_and(DeepReport::damaged);
    if damage {
        println!("Result: DAMAGE FOUND.");
        print_advice(vault, shallow, deep);
    } else if deep.is_some() {
        println!(
            "Result: no damage found; every sector authenticates and the filesystem is consistent."
        );
    } else {
        println!("Result: no damage found in the header and the geometry.");
    }
}

fn print_deep(d: &DeepReport) {
    println!("With keys:");
    for (i, status) in d.header_macs.iter().enumerate() {
        let copy = if i == 0 { HeaderCopy::A } else { HeaderCopy::B };
        let used = d.copy_used == copy;
        let (tag, text) = match (status, used) {
            (MacStatus::Valid, _) => ("ok     ", "MAC valid"),
            (MacStatus::Mismatch, true) => (
                "DAMAGED",
                "MAC MISMATCH: changed by someone without the key (or damaged in a way the \
                 checksum missed); nothing behind it was checked",
            ),
            (MacStatus::Mismatch, false) => (
                "note   ",
                "MAC does not match: stale after an interrupted key rotation, or changed \
                 without the key; a read-write mount rewrites it",
            ),
            (MacStatus::NotChecked, _) => {
                ("note   ", "not checked (the copy is damaged, see above)")
            }
        };
        println!("  {tag} header copy {}: {text}", copy_letter(copy));
    }
    if d.sectors_checked == 0 && d.filesystem.is_none() && d.filesystem_error.is_none() {
        return;
    }
    println!(
        "  {} sectors: {} checked, {} failed authentication",
        mark(d.damaged_sectors.is_empty()),
        d.sectors_checked,
        d.damaged_sectors.len()
    );
    if let Some(s) = d.page0_stale_copy {
        println!(
            "  note    sector {s}, the older copy of the store's header page, does not \
             authenticate: a torn write (a crash, or a copy taken mid-commit); the newer copy is \
             used, nothing is lost"
        );
    }
    for s in &d.damaged_sectors {
        println!(
            "          sector {} (file offset {}): {}",
            s.sector,
            s.file_offset,
            sector_owner(s)
        );
    }
    if let Some(e) = &d.filesystem_error {
        println!("  DAMAGED filesystem: {e}");
    }
    if let Some(f) = &d.filesystem {
        println!(
            "  {} filesystem: {} directories, {} files, {} symlinks, {} other; {} bytes of \
             data and {} xattrs read{}",
            mark(f.is_clean()),
            f.directories,
            f.files,
            f.symlinks,
            f.special,
            f.data_bytes,
            f.xattrs,
            if f.is_clean() { "; consistent" } else { "" }
        );
        if let Some(why) = &f.aborted {
            println!("          the check stopped: {why}");
        }
        for item in &f.damaged {
            println!(
                "          damaged: {}{}: {} cannot be read",
                item.path,
                item.kind.map(|k| format!(" ({k})")).unwrap_or_default(),
                item.unreadable.join("; ")
            );
        }
        for i in &f.inconsistencies {
            let at = i
                .path
                .as_ref()
                .map(|p| format!("{p}: "))
                .unwrap_or_default();
            println!("          inconsistent: {at}{}", i.problem);
        }
        for n in &f.incomplete {
            println!("          not checked: {n}");
        }
        for n in &f.notes {
            println!("  note    {n}");
        }
    }
}

/// Who a damaged sector belongs to, as far as the check could tell.
fn sector_owner(s: &DamagedSector) -> String {
    if !s.used_by.is_empty() {
        format!("used by {}", s.used_by.join(", "))
    } else if !s.near.is_empty() {
        format!(
            "a filesystem record next to {} (whose could not be told)",
            s.near.join(", ")
        )
    } else {
        "not used by any file, directory or table the filesystem has now: free space or a page \
         of an older commit (no file is affected)"
            .into()
    }
}

fn print_advice(vault: &Path, shallow: &ShallowReport, deep: Option<&DeepReport>) {
    let v = vault.display();
    println!("What to do:");
    for f in shallow
        .findings
        .iter()
        .filter(|f| f.severity == Severity::Damage)
    {
        if let Some(advice) = &f.advice {
            println!("  - {advice}");
        }
    }
    let Some(d) = deep else { return };
    let used = match d.copy_used {
        HeaderCopy::A => 0,
        HeaderCopy::B => 1,
    };
    if d.header_macs[used] == MacStatus::Mismatch {
        println!(
            "  - the header in use fails its MAC: do not trust this container; restore it from \
             a backup (verify the backup first)"
        );
    }
    let files = d.filesystem.as_ref().is_some_and(|f| !f.damaged.is_empty());
    if files {
        println!(
            "  - the files listed as damaged fail with an I/O error when read; everything else \
             reads fine. Copy them from a backup (mount a backup copy elsewhere, or restore \
             the whole container from one after `keybound verify --deep` on it). A damaged file \
             cannot be deleted in the vault until the container is restored"
        );
    }
    let metadata = d.filesystem_error.is_some()
        || d.filesystem
            .as_ref()
            .is_some_and(|f| f.aborted.is_some() || !f.inconsistencies.is_empty())
        || d.damaged_sectors.iter().any(|s| {
            s.used_by
                .iter()
                .any(|p| p.starts_with("filesystem metadata"))
        });
    if metadata {
        println!(
            "  - the filesystem's own records are damaged or inconsistent: restore {v} from a \
             backup; until then mount it read-only (if it mounts) and copy out what still reads"
        );
    }
    let unowned = d
        .damaged_sectors
        .iter()
        .any(|s| s.used_by.is_empty() && s.near.is_empty());
    if unowned {
        println!(
            "  - damaged sectors that no file uses lose nothing now, but something changed the \
             file: check the disk it is on, and make a fresh backup"
        );
    }
}
