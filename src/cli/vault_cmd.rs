//! `keybound create`, `keybound info` and `keybound status`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use keybound::audit;
use keybound::container::{Container, HeaderInfo, SlotKind};
use keybound::session::{create, registry};
use keybound::token::{LastTry, TokenPublicKey};

use super::{audit_cmd, exitcodes, prompt};

#[derive(Args)]
pub struct CreateArgs {
    /// The container file to create (it must not exist).
    vault: PathBuf,
    /// Bind to the token with this serial (needed when several are plugged in).
    #[arg(long)]
    serial: Option<u32>,
    /// The token's keybound key to bind (retired slot, hex); its only one by default.
    #[arg(long, value_parser = super::token_cmd::parse_slot)]
    slot: Option<u8>,
    /// Preallocate a fixed-size container (e.g. 10G, 500M), so its size says
    /// nothing about how much is stored. Without it the container grows as needed.
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// A name for the first key slot (shown by `keybound info`).
    #[arg(long, default_value = "owner")]
    label: String,
    /// Read the new vault password from FILE (`-` for stdin) instead of the terminal.
    #[arg(long, value_name = "FILE")]
    password_file: Option<PathBuf>,
    /// Read the token's PIN from FILE (`-` for stdin) instead of the terminal.
    #[arg(long, value_name = "FILE")]
    pin_file: Option<PathBuf>,
    /// How long one password derivation (Argon2id) should take on this
    /// machine: calibrates the passes. Longer is stronger against guessing;
    /// every mount pays it once. Default: RFC 9106's recommendation (64 MiB,
    /// 3 passes, 4 lanes; ~50 ms on two cores).
    #[arg(long, value_parser = parse_duration)]
    kdf_time: Option<Duration>,
    /// Argon2id memory in MiB (at least 64).
    #[arg(long, default_value_t = 64)]
    kdf_memory_mib: u32,
    /// Allow spending the token's last PIN try.
    #[arg(long)]
    allow_last_pin_try: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct InfoArgs {
    /// The container file.
    vault: PathBuf,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct StatusArgs {
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

pub fn create(args: CreateArgs) -> Result<()> {
    let mut event = audit::Event::new("create", &args.vault);
    let result = create_vault(&args, &mut event);
    audit_cmd::record_result(event, &result);
    result
}

fn create_vault(args: &CreateArgs, event: &mut audit::Event) -> Result<()> {
    if args.vault.exists() {
        return Err(exitcodes::Coded {
            code: exitcodes::EXISTS,
            message: format!(
                "{} exists already; keybound never overwrites a file — choose another name",
                args.vault.display()
            ),
        }
        .into());
    }
    let binding = create::find_binding(args.serial, args.slot)?;
    let serial = binding.token.serial();
    event.update(|e| {
        e.token(serial)
            .field("piv_slot", format!("{:02x}", binding.piv_slot))
    });
    let password = prompt::new_secret(
        args.password_file.as_deref(),
        "vault password",
        "--password-file",
    )?;
    create::check_password(&password)?;
    let pin = prompt::pin(
        args.pin_file.as_deref(),
        &format!("PIN of token {serial}: "),
    )?;
    let request = create::CreateRequest {
        vault: &args.vault,
        serial: args.serial,
        piv_slot: args.slot,
        fixed_size: args.size,
        label: args.label.clone(),
        kdf_time: args.kdf_time,
        kdf_memory_kib: args.kdf_memory_mib.saturating_mul(1024),
        last_try: if args.allow_last_pin_try {
            LastTry::Allow
        } else {
            LastTry::Refuse
        },
        owner: owner(),
    };
    let bar = args.size.map(progress_bar);
    let created = create::create(&request, binding, &password, &pin, &mut |done, total| {
        if let Some(bar) = &bar {
            bar.set_length(total);
            bar.set_position(done);
        }
    })?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    event.update(|e| {
        let e = e.container_id(&created.header.id);
        match created.header.slots.first() {
            Some(slot) => e.slot(slot.index),
            None => e,
        }
        .field("fixed_size", created.header.fixed_size)
    });
    if args.json {
        let report = serde_json::json!({
            "vault": created.vault,
            "container_id": hex::encode(created.header.id),
            "token_serial": created.serial,
            "piv_slot": format!("{:02x}", created.piv_slot),
            "key_fingerprint": created.fingerprint,
            "argon2id": created.argon,
            "fixed_size": created.header.fixed_size,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("Created {}", created.vault.display());
    println!("  container id  {}", hex::encode(created.header.id));
    println!(
        "  bound to      token {}, PIV slot {:02x}, key {}",
        created.serial, created.piv_slot, created.fingerprint
    );
    println!(
        "  password KDF  Argon2id, {} MiB, {} passes, {} lanes ({})",
        created.argon.memory_kib / 1024,
        created.argon.iterations,
        created.argon.parallelism,
        match args.kdf_time {
            Some(time) => format!("calibrated to {} here", humantime(time)),
            None => "RFC 9106's recommendation".to_string(),
        }
    );
    println!(
        "  size          {}",
        match created.header.fixed_size {
            Some(bytes) => format!("fixed, {}", human_bytes(bytes)),
            None => "grows as needed".to_string(),
        }
    );
    println!(
        "Mount it with: keybound mount {} DIR",
        created.vault.display()
    );
    Ok(())
}

fn owner() -> (u32, u32) {
    // SAFETY: getuid/getgid have no preconditions and cannot fail.
    unsafe { (libc::getuid(), libc::getgid()) }
}

fn progress_bar(total: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "preallocating {bar:40} {bytes}/{total_bytes} ({eta} left)",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

pub fn info(args: InfoArgs) -> Result<()> {
    let header = Container::inspect(&args.vault)?;
    let mounted = registry::find_by_container(&args.vault);
    if args.json {
        let mut value = serde_json::to_value(&header)?;
        value["mounted"] = serde_json::to_value(&mounted)?;
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    print_header(&args.vault, &header);
    if let Some(m) = mounted {
        println!(
            "  mounted       at {} by process {} since {}",
            m.mountpoint.display(),
            m.pid,
            format_time(m.since)
        );
    }
    Ok(())
}

fn print_header(vault: &std::path::Path, h: &HeaderInfo) {
    println!(
        "{}: keybound vault, format version {}",
        vault.display(),
        h.version
    );
    println!("  container id  {}", hex::encode(h.id));
    println!("  header        {}", h.header_state());
    println!(
        "  size          {} on disk; {}",
        human_bytes(h.file_len),
        match h.fixed_size {
            Some(bytes) => format!("fixed at {}", human_bytes(bytes)),
            None => "grows as needed".to_string(),
        }
    );
    if h.unsealed_sectors > 0 && h.fixed_size.is_none() {
        println!(
            "  unsealed      {} sectors hold zeros, not ciphertext, until the next clean unmount \
             (the vault is mounted, or its last mount ended without one)",
            h.unsealed_sectors
        );
    }
    println!("  key slots");
    for slot in &h.slots {
        let what = match &slot.kind {
            SlotKind::Token {
                serial,
                piv_slot,
                card_public,
                argon,
                ..
            } => format!(
                "token {serial}, PIV slot {piv_slot:02x}, key {}, Argon2id {} MiB/{} passes/{} lane(s)",
                TokenPublicKey::from_sec1(card_public)
                    .map(|k| k.fingerprint())
                    .unwrap_or_else(|_| "(invalid key)".into()),
                argon.memory_kib / 1024,
                argon.iterations,
                argon.parallelism
            ),
            SlotKind::Recovery => "recovery key".to_string(),
        };
        println!(
            "    {}  {what}; label {:?}, created {}{}",
            slot.index,
            slot.label,
            format_time(slot.created),
            if slot.flags.must_change_password {
                "; TEMPORARY password (must be changed: keybound passwd)"
            } else if h.pending_slots.contains(&slot.index) {
                "; awaits activation after a rekey (its owner runs: keybound rekey VAULT --activate)"
            } else {
                ""
            }
        );
    }
    if let Some(r) = &h.rekey_in_progress {
        println!(
            "  rekey         UNFINISHED: {} of {} sectors under key epoch {}; \
             run `keybound rekey {}` to finish it (the vault does not mount until then)",
            r.done_sectors,
            r.total_sectors,
            r.new_epoch,
            vault.display()
        );
    }
    // Admin: the vault policy (src/cli/admin_cmd.rs).
    println!("  policy");
    for line in super::admin_cmd::policy_lines(&h.policy) {
        println!("    {line}");
    }
}

pub fn status(args: StatusArgs) -> Result<()> {
    let mounts = registry::list();
    // Which tokens are plugged in now: the tether's state, seen from outside.
    let present = if mounts.is_empty() {
        Ok(Vec::new())
    } else {
        keybound::token::piv_tokens()
    };
    if args.json {
        let list: Vec<serde_json::Value> = mounts
            .iter()
            .map(|m| {
                let mut value = serde_json::to_value(m).unwrap_or_default();
                value["token_present"] = match &present {
                    Ok(tokens) => serde_json::Value::Bool(token_present(m, tokens)),
                    Err(_) => serde_json::Value::Null,
                };
                value
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    if mounts.is_empty() {
        println!("No vault is mounted.");
        return Ok(());
    }
    for m in &mounts {
        println!(
            "{}  mounted at {}{}\n    key slot {}, since {}, process {}\n    tether: {}",
            m.container.display(),
            m.mountpoint.display(),
            if m.read_only { " (read-only)" } else { "" },
            m.key_slot,
            format_time(m.since),
            m.pid,
            tether_state(m, &present),
        );
    }
    Ok(())
}

fn token_present(m: &registry::MountRecord, tokens: &[keybound::token::PresentToken]) -> bool {
    tokens.iter().any(|t| {
        Some(t.serial) == m.token_serial && m.reader.as_ref().is_none_or(|r| *r == t.reader)
    })
}

/// "token 123 present in 'Reader' (locks when it leaves); idle lock after 900 s".
fn tether_state(
    m: &registry::MountRecord,
    present: &Result<Vec<keybound::token::PresentToken>, keybound::token::TokenError>,
) -> String {
    let Some(serial) = m.token_serial else {
        // Admin: a mount opened with the recovery key (daemon::serve without a tether).
        return format!(
            "UNTETHERED (opened with the recovery key): locks on `keybound lock`, signals and \
             after {} s idle",
            m.idle_lock_secs.unwrap_or_default()
        );
    };
    let token = format!("token {serial}");
    let reader = m.reader.as_deref().unwrap_or("its reader");
    let mut state = match present {
        Ok(tokens) if token_present(m, tokens) => {
            format!("{token} present in '{reader}' (the vault locks when it leaves)")
        }
        Ok(_) => format!("{token} NOT present in '{reader}': the vault is locking"),
        Err(e) => format!("{token}: cannot ask pcscd ({e}); the vault locks when pcscd is gone"),
    };
    if let Some(secs) = m.idle_lock_secs {
        state.push_str(&format!("; idle lock after {secs} s"));
    }
    state
}

/// "10G", "512M", "1T", "4096" (bytes); powers of 1024.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, unit) = text.split_at(
        text.find(|c: char| c.is_ascii_alphabetic())
            .unwrap_or(text.len()),
    );
    let number: f64 = digits
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a size (try 10G or 500M)"))?;
    let shift = match unit
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("unknown size unit in {text:?} (use K, M, G or T)")),
    };
    let bytes = number * (1u64 << shift) as f64;
    if !(1.0..=(u64::MAX as f64)).contains(&bytes) {
        return Err(format!("{text:?} is not a usable size"));
    }
    Ok(bytes as u64)
}

/// "1s", "500ms", "2.5s", "15m", "1h".
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: f64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (try 1s or 500ms)"))?;
    let seconds = match unit {
        "ms" => number / 1000.0,
        "s" | "" => number,
        "m" | "min" => number * 60.0,
        "h" => number * 3600.0,
        _ => return Err(format!("unknown time unit in {text:?} (use ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("{text:?} is not a usable duration"))
}

pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn humantime(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{} ms", d.as_millis())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

/// Unix seconds as UTC "YYYY-MM-DD HH:MM:SS UTC" (no time-zone database needed).
pub fn format_time(unix: u64) -> String {
    let t = keybound::audit::Utc::from_unix_secs(unix);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
        t.year, t.month, t.day, t.hour, t.minute, t.second
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_durations_and_dates_parse() {
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("ten").is_err());
        assert!(parse_size("5X").is_err());
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("soon").is_err());
        assert_eq!(format_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_time(1_795_430_096), "2026-11-23 10:34:56 UTC");
    }

    #[test]
    fn bytes_read_like_people_write_them() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(10 << 30), "10.0 GiB");
    }
}
