//! `keybound audit verify` and `keybound audit show`, and the helpers the
//! other commands use to record what they did (see `keybound::audit`).

use std::path::Path;

use anyhow::Result;
use clap::{Args, Subcommand};
use keybound::audit::{self, Anchor, AuditError, Event};
use keybound::session::SessionError;
use keybound::token::TokenError;

use super::exitcodes;

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Walk the log's hash chain: report the first removed, reordered, edited
    /// or inserted line (exit 40), or "N entries, chain intact".
    Verify(VerifyArgs),
    /// Show the log's entries (newest last). Does not verify them.
    Show(ShowArgs),
}

#[derive(Args)]
pub struct VerifyArgs {
    /// A head printed by an earlier `verify` and kept elsewhere (SEQ:HASH):
    /// entry SEQ must still hash to HASH, which also catches a rewrite of the
    /// whole log. Repeatable.
    #[arg(long, value_name = "SEQ:HASH")]
    anchor: Vec<Anchor>,
}

#[derive(Args)]
pub struct ShowArgs {
    /// Print the entries as they are stored (JSON lines).
    #[arg(long)]
    json: bool,
    /// Only the last N entries.
    #[arg(long, value_name = "N")]
    last: Option<usize>,
}

pub fn run(cmd: AuditCommand) -> Result<()> {
    let log = audit::log_path()?;
    match cmd {
        AuditCommand::Verify(args) => verify(&log, &args),
        AuditCommand::Show(args) => show(&log, &args),
    }
}

fn verify(log: &Path, args: &VerifyArgs) -> Result<()> {
    match audit::verify(log, &args.anchor) {
        Ok(verified) => {
            println!("{} entries, chain intact", verified.entries);
            match verified.head {
                Some(head) => println!(
                    "log {}\nlast entry {}:{}\n(keep this line elsewhere; `keybound audit verify \
                     --anchor {}:{}` later proves entries 1–{} were not rewritten)",
                    log.display(),
                    head.seq,
                    head.hash,
                    head.seq,
                    head.hash,
                    head.seq
                ),
                None => println!("log {}", log.display()),
            }
            Ok(())
        }
        Err(err @ AuditError::Tampered { .. }) => Err(exitcodes::Coded {
            code: exitcodes::AUDIT_TAMPERED,
            message: err.to_string(),
        }
        .into()),
        Err(err) => Err(err.into()),
    }
}

fn show(log: &Path, args: &ShowArgs) -> Result<()> {
    let audit::chain::Contents { lines, exists, .. } = audit::chain::read(log)?;
    if !exists {
        return Err(AuditError::Missing {
            path: log.to_path_buf(),
        }
        .into());
    }
    let skip = args
        .last
        .map(|n| lines.len().saturating_sub(n))
        .unwrap_or(0);
    for (index, raw) in lines.iter().enumerate().skip(skip) {
        if args.json {
            println!("{}", String::from_utf8_lossy(raw));
            continue;
        }
        match serde_json::from_slice::<serde_json::Value>(raw) {
            Ok(entry) => println!("{}", describe(&entry)),
            Err(_) => println!(
                "line {}: not an audit entry: {}",
                index + 1,
                String::from_utf8_lossy(raw)
            ),
        }
    }
    Ok(())
}

/// One entry on one line, for people.
fn describe(e: &serde_json::Value) -> String {
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    };
    let mut out = format!(
        "#{} {} {}@{} pid {}: {} {}",
        text(&e["seq"]),
        text(&e["time"]),
        e["user"]["name"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| format!("uid {}", text(&e["user"]["uid"]))),
        text(&e["host"]),
        text(&e["pid"]),
        text(&e["action"]),
        text(&e["outcome"]),
    );
    if let Some(path) = e["vault"]["path"].as_str() {
        out.push_str(&format!(" {path}"));
    }
    if let Some(slot) = e["slot"].as_u64() {
        out.push_str(&format!(" slot {slot}"));
    }
    if let Some(serial) = e["token_serial"].as_u64() {
        out.push_str(&format!(" token {serial}"));
    }
    if let Some(reason) = e["reason"].as_str() {
        out.push_str(&format!(" — {reason}"));
    }
    if e["error"].is_object() {
        out.push_str(&format!(
            " — {}: {}",
            text(&e["error"]["kind"]),
            text(&e["error"]["message"])
        ));
    }
    if let Some(extra) = e["extra"].as_object() {
        for (key, value) in extra {
            out.push_str(&format!(" {key}={}", text(value)));
        }
    }
    out
}

/// Record `event` (never fails the command; see `keybound::audit::record`).
pub fn record(event: Event) {
    audit::record(&event);
}

/// Record `event` as failed with `err`: its stable kind, its message (which
/// never holds a secret) and, for a wrong PIN, the tries left.
pub fn record_failure(event: Event, err: &anyhow::Error) {
    record(failure(event, err));
}

pub fn failure(event: Event, err: &anyhow::Error) -> Event {
    let event = event.failed(
        error_kind(exitcodes::for_error(err)),
        super::error_text(err),
    );
    match pin_tries_left(err) {
        Some(tries) => event.field("pin_tries_left", tries),
        None => event,
    }
}

/// Record the outcome of an action that returned `result`.
pub fn record_result<T>(event: Event, result: &Result<T>) {
    match result {
        Ok(_) => record(event.ok()),
        Err(err) => record_failure(event, err),
    }
}

fn pin_tries_left(err: &anyhow::Error) -> Option<u8> {
    err.chain().find_map(|cause| {
        let token = cause.downcast_ref::<TokenError>().or_else(|| {
            match cause.downcast_ref::<SessionError>() {
                Some(SessionError::Token(t)) => Some(t),
                _ => None,
            }
        });
        match token {
            Some(TokenError::WrongPin { tries_left, .. }) => Some(*tries_left),
            _ => None,
        }
    })
}

/// The stable name of an exit code, for the audit log's `error.kind`.
pub fn error_kind(code: i32) -> &'static str {
    use exitcodes as C;
    match code {
        C::USAGE => "usage",
        C::NO_PCSCD => "no-pcscd",
        C::NO_TOKEN => "no-token",
        C::AMBIGUOUS_TOKEN => "ambiguous-token",
        C::WRONG_PIN => "wrong-pin",
        C::PIN_BLOCKED => "pin-blocked",
        C::TOKEN_REMOVED => "token-removed",
        C::TOKEN_REFUSED => "token-refused",
        C::SECRET_INPUT => "secret-input",
        C::WRONG_PASSWORD => "wrong-password",
        C::VAULT_DAMAGED => "vault-damaged",
        C::VAULT_IN_USE => "vault-in-use",
        C::BAD_MOUNTPOINT => "bad-mountpoint",
        C::NO_FUSE => "no-fuse",
        C::EXISTS => "exists",
        C::MOUNT_BUSY => "mount-busy",
        C::NEEDS_RECOVERY => "needs-recovery",
        C::AUDIT_TAMPERED => "audit-tampered",
        C::PASSWORD_CHANGE_REQUIRED => "password-change-required",
        C::POLICY_REFUSED => "policy-refused",
        C::SLOT_REFUSED => "slot-refused",
        C::HEADER_MISMATCH => "header-mismatch",
        C::NOT_CONFIRMED => "not-confirmed",
        C::REKEY_UNFINISHED => "rekey-unfinished",
        C::SLOT_PENDING => "slot-pending-activation",
        C::HOLD_BROKEN => "hold-broken",
        C::VERIFY_DAMAGE => "damage-found",
        C::BACKUP_MISMATCH => "backup-mismatch",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrong_pin_records_its_kind_and_tries() {
        let err: anyhow::Error = SessionError::Token(TokenError::WrongPin {
            token: keybound::token::TokenName::serial(7),
            tries_left: 2,
        })
        .into();
        let event = failure(Event::without_vault("unlock").token(7), &err);
        assert_eq!(event.outcome, audit::Outcome::Failed);
        let error = event.error.as_ref().unwrap();
        assert_eq!(error.kind, "wrong-pin");
        assert!(error.message.contains("2 tries left"), "{}", error.message);
        assert_eq!(event.extra["pin_tries_left"], 2);
    }

    #[test]
    fn entries_read_as_one_line() {
        let entry = serde_json::json!({
            "seq": 4, "prev": "00", "time": "2025-01-01T00:00:00.000Z", "host": "h",
            "user": {"uid": 1000, "name": "ann"}, "pid": 9, "action": "lock",
            "vault": {"path": "/v.kb"}, "outcome": "ok", "slot": 0,
            "token_serial": 10000001, "reason": "token removed", "extra": {"took_ms": 12.5}
        });
        assert_eq!(
            describe(&entry),
            "#4 2025-01-01T00:00:00.000Z ann@h pid 9: lock ok /v.kb slot 0 token 10000001 \
             — token removed took_ms=12.5"
        );
    }
}
