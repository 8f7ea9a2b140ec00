//! `keybound rekey VAULT`: rotate the master key and re-encrypt every sector
//! under the new one (FORMAT.md §7); `keybound rekey VAULT --activate`: a
//! slot carried over by a rotation takes the new key (its owner's token,
//! PIN and password).
//!
//! Like the other admin commands it works on a locked vault only (the file
//! lock refuses a mounted one before anything is asked), says which
//! authority it needs and asks for it. An interrupted rotation (kill -9,
//! power loss, Ctrl-C) is resumed by running the same command again.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Args;
use keybound::audit::Event;
use keybound::container::{
    Access, Container, ContainerError, HeaderInfo, RekeyProgress, SECTOR_SIZE, SlotCarry, SlotKind,
};
use keybound::crypto::MasterKey;
use keybound::session::admin::rekey::{self as admin_rekey, AuthoritySecret};
use keybound::session::admin::{self, Authority, Credentials};
use serde::Serialize;

use super::admin_cmd::{AuthorityArgs, read_recovery_key};
use super::{audit_cmd, exitcodes};

#[derive(Args)]
pub struct RekeyArgs {
    /// The container file (it must not be mounted).
    vault: PathBuf,
    /// Activate your key slot after a rotation (your token, PIN and password),
    /// instead of rotating.
    #[arg(long)]
    activate: bool,
    /// With --activate: the key slot to activate (default: the slot of the
    /// enrolled token that is plugged in).
    #[arg(long, value_name = "N", requires = "activate")]
    slot: Option<u8>,
    /// Remove recovery-key slots whose key is not given (a recovery key cannot
    /// be carried over without it); enrol a new one afterwards.
    #[arg(long)]
    drop_recovery: bool,
    /// At most this many bytes per second (e.g. 50M; K, M, G are powers of 1024).
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    max_rate: Option<u64>,
    /// Print a JSON summary on stdout (and no progress bar).
    #[arg(long)]
    json: bool,
    /// Use the enrolled token with this serial (when several are plugged in):
    /// its key slot authorises (or, with --activate, is activated).
    #[arg(long, conflicts_with = "admin_slot")]
    serial: Option<u32>,
    #[command(flatten)]
    auth: AuthorityArgs,
}

impl RekeyArgs {
    /// The key slot named by --admin-slot / --slot, or by --serial.
    fn slot_by(&self, header: &HeaderInfo, slot: Option<u8>) -> Result<Option<u8>> {
        let Some(serial) = self.serial else {
            return Ok(slot);
        };
        header
            .slots
            .iter()
            .find(|s| matches!(s.kind, SlotKind::Token { serial: t, .. } if t == serial))
            .map(|s| Some(s.index))
            .ok_or_else(|| {
                anyhow::Error::from(exitcodes::Coded {
                    code: exitcodes::NO_TOKEN,
                    message: format!(
                        "token {serial} is not enrolled in {} (`keybound info` lists the slots)",
                        self.vault.display()
                    ),
                })
            })
    }
}

/// "50M" → 52428800 bytes per second.
pub fn parse_rate(text: &str) -> Result<u64, String> {
    let t = text
        .trim()
        .trim_end_matches("/s")
        .trim_end_matches(['B', 'b']);
    let (digits, unit) = match t.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => t.split_at(i),
        None => (t, ""),
    };
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" => 0,
        "K" | "KI" => 10,
        "M" | "MI" => 20,
        "G" | "GI" => 30,
        _ => return Err(format!("{text:?}: use a number with K, M or G (e.g. 50M)")),
    };
    let n: f64 = digits
        .trim()
        .parse()
        .map_err(|_| format!("{text:?}: use a number with K, M or G (e.g. 50M)"))?;
    let rate = (n * (1u64 << shift) as f64) as u64;
    if rate < SECTOR_SIZE as u64 {
        return Err(format!("{text:?}: at least 4K per second"));
    }
    Ok(rate)
}

/// The JSON summary.
#[derive(Serialize)]
struct Summary {
    vault: String,
    container_id: String,
    old_epoch: u32,
    new_epoch: u32,
    /// The run resumed an interrupted rotation that had done this many sectors.
    resumed_from_sector: Option<u64>,
    sectors: u64,
    bytes_this_run: u64,
    seconds: f64,
    mib_per_s: f64,
    already_new: u64,
    from_journal: u64,
    damaged_sectors: Vec<u64>,
    authority_slot: u8,
    rewrapped_slots: Vec<u8>,
    pending_slots: Vec<u8>,
    removed_slots: Vec<u8>,
}

pub fn run(args: RekeyArgs) -> Result<()> {
    let action = if args.activate {
        "rekey-activate"
    } else {
        "rekey"
    };
    let mut event = Event::new(action, &args.vault);
    let result = if args.activate {
        activate(&args, &mut event)
    } else {
        rekey(&args, &mut event)
    };
    audit_cmd::record_result(event, &result);
    result
}

/// Open read-write; a mounted vault holds the lock: say where.
fn open_locked(vault: &Path) -> Result<Container> {
    match Container::open(vault, Access::ReadWrite) {
        Ok(c) => Ok(c),
        Err(e @ ContainerError::Locked { .. }) => Err(super::admin_cmd::in_use(vault, e)),
        Err(e) => Err(e.into()),
    }
}

fn rekey(args: &RekeyArgs, event: &mut Event) -> Result<()> {
    let mut container = open_locked(&args.vault)?;
    let vault = args.vault.clone();
    let header = container.info().clone();
    event.update(|e| e.container_id(&header.id));
    let resuming = container.rekey_status();
    let pending = container.pending_slots();
    if resuming.is_none() && !pending.is_empty() {
        return Err(ContainerError::RekeyRefused {
            path: vault,
            reason: format!(
                "key slot(s) {pending:?} were carried over by the previous rotation and still \
                 await activation by their owners (`keybound rekey {} --activate`); a new \
                 rotation could not carry them over again. Activate or revoke them first",
                args.vault.display()
            ),
        }
        .into());
    }
    // Everything that needs no secret first.
    let authority = admin::choose_authority(
        &vault,
        &header,
        args.slot_by(&header, args.auth.admin_slot)?,
        args.auth.recovery_key_file.is_some(),
        None,
    )?;
    let lost = admin_rekey::recovery_slots_lost(&container, &authority);
    if lost > 0 && !args.drop_recovery {
        return Err(ContainerError::RekeyRefused {
            path: vault,
            reason: format!(
                "{lost} recovery-key slot(s) cannot be carried over without their key \
                 (authorise with --recovery-key-file to carry that one over), or pass \
                 --drop-recovery to remove them (enrol a new recovery key afterwards)"
            ),
        }
        .into());
    }
    match &resuming {
        Some(r) => eprintln!(
            "Resuming the master-key rotation of {} at sector {} of {}.",
            vault.display(),
            r.done,
            r.total
        ),
        None => eprintln!(
            "Rotating the master key of {}: {} sectors to re-encrypt.",
            vault.display(),
            header.extent_sectors
        ),
    }
    eprintln!("Authorise the rotation with {}.", authority.describe());

    // The authority's secrets, kept until its slot is wrapped for the new key.
    let (old, secret_holder, authority_slot) = match &authority {
        Authority::Token(choice) => {
            let (password, pin) =
                args.auth
                    .slot_secrets("Password", choice.slot.index, choice.serial)?;
            let mk = admin::authorise(
                &container,
                &authority,
                Credentials::Token {
                    password: &password,
                    pin: &pin,
                    last_try: args.auth.last_try(),
                },
            )?;
            event.update(|e| e.slot(choice.slot.index).token(choice.serial));
            (mk, password, choice.slot.index)
        }
        Authority::Recovery => {
            let key = read_recovery_key(args.auth.recovery_key_file.as_deref())?;
            let (mk, slot) = admin::unlock_recovery(&container, &key)?;
            event.update(|e| e.slot(slot).field("authority", "recovery key"));
            (mk, key, slot)
        }
    };
    if resuming.is_none() {
        // A crash between the two final header writes of an earlier
        // rotation leaves the other copy behind: rewrite it now.
        container.settle_header(&old)?;
    }
    let secret = match &authority {
        Authority::Token(_) => AuthoritySecret::Password(&secret_holder),
        Authority::Recovery => AuthoritySecret::RecoveryKey {
            key: &secret_holder,
            slot: authority_slot,
        },
    };
    let plan = admin_rekey::carry_plan(&container, authority_slot, secret, args.drop_recovery)?;
    drop(secret_holder);
    let (rewrapped, pending, removed) = describe_plan(&plan);

    let new = match &resuming {
        Some(_) => container.rekey_new_key(&old)?,
        None => container.begin_rekey(&old)?,
    };
    let old_epoch = header.key_epoch;
    let (report, elapsed, bytes) = reencrypt(args, &mut container, &old, &new)?;
    container.finish_rekey(&old, &new, plan)?;
    drop((old, new));
    keybound::secrets::scrub_stack();

    let summary = Summary {
        vault: vault.display().to_string(),
        container_id: hex::encode(header.id),
        old_epoch,
        new_epoch: old_epoch + 1,
        resumed_from_sector: resuming.map(|r| r.done),
        sectors: header.extent_sectors,
        bytes_this_run: bytes,
        seconds: elapsed.as_secs_f64(),
        mib_per_s: mib_per_s(bytes, elapsed),
        already_new: report.already_new,
        from_journal: report.from_journal,
        damaged_sectors: report.damaged.clone(),
        authority_slot,
        rewrapped_slots: rewrapped,
        pending_slots: pending,
        removed_slots: removed,
    };
    event.update(|e| {
        e.field("new_epoch", summary.new_epoch)
            .field("sectors", summary.sectors)
            .field("resumed", summary.resumed_from_sector.is_some())
            .field("pending_slots", summary.pending_slots.clone())
            .field("removed_slots", summary.removed_slots.clone())
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_summary(&summary);
    }
    Ok(())
}

fn describe_plan(plan: &[SlotCarry]) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let (mut rewrapped, mut pending, mut removed) = (Vec::new(), Vec::new(), Vec::new());
    for c in plan {
        match c {
            SlotCarry::Rewrap(s) => rewrapped.push(s.index),
            SlotCarry::Link { index, .. } => pending.push(*index),
            SlotCarry::Remove(i) => removed.push(*i),
        }
    }
    (rewrapped, pending, removed)
}

fn mib_per_s(bytes: u64, elapsed: Duration) -> f64 {
    let s = elapsed.as_secs_f64();
    if s > 0.0 {
        bytes as f64 / (1024.0 * 1024.0) / s
    } else {
        0.0
    }
}

/// The re-encryption pass, with a progress bar on a terminal and the
/// throttle. Returns the report, the time and the plaintext bytes done.
fn reencrypt(
    args: &RekeyArgs,
    container: &mut Container,
    old: &MasterKey,
    new: &MasterKey,
) -> Result<(keybound::container::ReencryptReport, Duration, u64)> {
    let sector = SECTOR_SIZE as u64;
    let total = container.info().extent_sectors;
    let done_before = container.rekey_status().map_or(0, |r| r.done);
    let bar = (!args.json && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(total * sector);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "re-encrypting {bar:40} {bytes}/{total_bytes} {bytes_per_sec} ({eta} left)",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_position(done_before * sector);
        bar
    });
    // Batches small enough that the throttle is smooth (about 8 per second).
    let batch = match args.max_rate {
        Some(rate) => (rate / 8 / sector).clamp(16, 1024),
        None => 1024,
    };
    let start = Instant::now();
    let mut this_run = 0u64;
    let report = container.reencrypt(old, new, batch, &mut |p: RekeyProgress| {
        this_run = p.this_run_sectors;
        if let Some(bar) = &bar {
            bar.set_position(p.done_sectors * sector);
        }
        if let Some(rate) = args.max_rate {
            let due = Duration::from_secs_f64((p.this_run_sectors * sector) as f64 / rate as f64);
            let elapsed = start.elapsed();
            if due > elapsed {
                std::thread::sleep(due - elapsed);
            }
        }
    })?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok((report, start.elapsed(), this_run * sector))
}

fn print_summary(s: &Summary) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "Rotated the master key of {}: key epoch {} → {}, {} sectors ({:.1} MiB) re-encrypted \
         in {:.1} s ({:.0} MiB/s){}.",
        s.vault,
        s.old_epoch,
        s.new_epoch,
        s.sectors,
        (s.sectors * SECTOR_SIZE as u64) as f64 / (1024.0 * 1024.0),
        s.seconds,
        s.mib_per_s,
        match s.resumed_from_sector {
            Some(n) => format!(", resumed at sector {n}"),
            None => String::new(),
        }
    );
    let _ = writeln!(
        out,
        "The old master key opens nothing any more: old header copies and backups (with any \
         slot revoked since) are useless against this vault."
    );
    let _ = writeln!(
        out,
        "Key slot {} (the authority) opens the vault with the new key now.",
        s.authority_slot
    );
    if !s.pending_slots.is_empty() {
        let _ = writeln!(
            out,
            "Key slot(s) {:?} were carried over: each owner activates theirs once with their \
             token, PIN and password:\n  keybound rekey {} --activate --slot N\n(until then \
             mount refuses those slots).",
            s.pending_slots, s.vault
        );
    }
    if !s.removed_slots.is_empty() {
        let _ = writeln!(
            out,
            "Removed recovery-key slot(s) {:?}; enrol a new recovery key with `keybound enroll \
             {} --recovery`.",
            s.removed_slots, s.vault
        );
    }
    if s.damaged_sectors.iter().all(|&n| n < 2) && !s.damaged_sectors.is_empty() {
        let _ = writeln!(
            out,
            "Note: sector {:?} (one copy of the store's page-0 pair) did not authenticate: a \
             write torn by an earlier crash, which the other copy covers; left as it was.",
            s.damaged_sectors
        );
    } else if !s.damaged_sectors.is_empty() {
        let _ = writeln!(
            out,
            "WARNING: {} sector(s) failed authentication under both keys (damaged before the \
             rotation) and were left as they were: {:?}",
            s.damaged_sectors.len(),
            s.damaged_sectors
        );
    }
}

fn activate(args: &RekeyArgs, event: &mut Event) -> Result<()> {
    let mut container = open_locked(&args.vault)?;
    let vault = args.vault.clone();
    let header = container.info().clone();
    event.update(|e| e.container_id(&header.id));
    if let Some(r) = container.rekey_status() {
        return Err(ContainerError::RekeyInProgress {
            path: vault,
            done: r.done,
            total: r.total,
        }
        .into());
    }
    let target = admin::passwd_target(&vault, &header, args.slot_by(&header, args.slot)?)?;
    if !matches!(target.slot.kind, SlotKind::Token { .. }) {
        unreachable!("passwd_target returns token slots");
    }
    event.update(|e| e.slot(target.slot.index).token(target.serial));
    eprintln!(
        "Activating key slot {} (token {}) for the new master key: its password and PIN.",
        target.slot.index, target.serial
    );
    let (password, pin) = args
        .auth
        .slot_secrets("Password", target.slot.index, target.serial)?;
    let mk = admin_rekey::activate(
        &mut container,
        &target,
        &password,
        &pin,
        args.auth.last_try(),
    )?;
    drop(mk);
    println!(
        "Activated key slot {} of {}: it opens the vault with the new master key.",
        target.slot.index,
        vault.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        assert_eq!(parse_rate("50M").unwrap(), 50 << 20);
        assert_eq!(parse_rate("50MB/s").unwrap(), 50 << 20);
        assert_eq!(parse_rate("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_rate("8192").unwrap(), 8192);
        assert_eq!(parse_rate("64k").unwrap(), 64 << 10);
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("1").is_err());
        assert!(parse_rate("5T").is_err());
    }
}
