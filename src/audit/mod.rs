//! The audit log: one JSON line per security-relevant event (create, unlock
//! success and failure, mount, lock and why, admin changes), hash-chained so
//! that an edited, removed, inserted or reordered line is detected, and
//! copied to the system log when one listens on `/dev/log`.
//!
//! Recording an event:
//!
//! ```no_run
//! use keybound::audit::{self, Event};
//! # let vault = std::path::Path::new("/srv/team.kb");
//! audit::record(&Event::new("enroll", vault).slot(3).token(12345678).ok());
//! ```
//!
//! [`record`] finds the log itself (`--audit-log`, set once by the CLI with
//! [`set_log_path`]; else `KEYBOUND_AUDIT_LOG`; else the per-user default,
//! see [`default_path`]) and never fails the caller: a log that cannot be
//! written is a warning (through `tracing`, so on stderr or in the daemon's
//! log), and the entry still goes to the system log. Entries never contain a
//! secret: callers pass slot numbers, token serials, reasons and error
//! messages, which never carry one either.
//!
//! Format of one line (fields in this order; absent ones are left out):
//! `seq`, `prev` (see [`chain`]), `time` (RFC 3339 UTC), `host`, `user`
//! (`uid`, `name`), `pid`, `action`, `vault` (`path`, `container_id`),
//! `outcome` (`ok`/`failed`), `error` (`kind`, `message`), `slot`,
//! `token_serial`, `reason`, `extra` (an object of action-specific fields).

pub mod chain;
mod error;
pub mod sink;
mod system;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde::Serialize;

pub use chain::{Anchor, Appended, Head, Verified, head_path, verify};
pub use error::AuditError;
pub use system::Utc;

/// The environment variable naming the audit log (below `--audit-log`).
pub const ENV: &str = "KEYBOUND_AUDIT_LOG";

/// Root's default log.
pub const SYSTEM_LOG: &str = "/var/log/keybound/audit.log";

static LOG_OPTION: OnceLock<PathBuf> = OnceLock::new();

/// Set the log chosen on the command line (`--audit-log`), once, before any
/// [`record`]. A relative path is taken from the current directory.
pub fn set_log_path(path: &Path) {
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let _ = LOG_OPTION.set(path);
}

/// Where entries go: `--audit-log`, else `KEYBOUND_AUDIT_LOG`, else
/// [`default_path`].
pub fn log_path() -> Result<PathBuf, AuditError> {
    if let Some(path) = LOG_OPTION.get() {
        return Ok(path.clone());
    }
    if let Some(path) = std::env::var_os(ENV).filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        return Ok(std::path::absolute(&path).unwrap_or(path));
    }
    default_path()
}

/// The default log: root's is `/var/log/keybound/audit.log`; a user's is
/// `$XDG_STATE_HOME/keybound/audit.log`, or `~/.local/state/keybound/audit.log`.
pub fn default_path() -> Result<PathBuf, AuditError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return Ok(PathBuf::from(SYSTEM_LOG));
    }
    let state = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .filter(|p| p.is_absolute())
                .map(|home| home.join(".local/state"))
        })
        .ok_or(AuditError::NoLocation)?;
    Ok(state.join("keybound").join("audit.log"))
}

/// Whether the action worked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Ok,
    Failed,
}

/// Why an action failed: a stable kind (as in the exit-code table) and the
/// message the user saw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Failure {
    pub kind: String,
    pub message: String,
}

/// The vault an event is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VaultRef {
    /// Canonical path of the container file.
    pub path: String,
    /// The container id (hex), when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
}

/// One event, built by the caller; [`record`] adds the sequence number,
/// chain hash, time, host, user and process.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    pub action: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vault: Option<VaultRef>,
    pub outcome: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<Failure>,
    /// The vault's key slot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slot: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_serial: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Event {
    /// An event about the vault at `vault` (its path is made canonical).
    /// The outcome is `ok` until [`Event::failed`].
    pub fn new(action: &str, vault: impl AsRef<Path>) -> Self {
        let mut event = Event::without_vault(action);
        event.vault = Some(VaultRef {
            path: canonical(vault.as_ref()).display().to_string(),
            container_id: None,
        });
        event
    }

    /// An event about no particular vault.
    pub fn without_vault(action: &str) -> Self {
        Event {
            action: action.to_string(),
            vault: None,
            outcome: Outcome::Ok,
            error: None,
            slot: None,
            token_serial: None,
            reason: None,
            extra: serde_json::Map::new(),
        }
    }

    pub fn container_id(mut self, id: &[u8]) -> Self {
        if let Some(v) = &mut self.vault {
            v.container_id = Some(hex::encode(id));
        }
        self
    }

    pub fn slot(mut self, slot: u8) -> Self {
        self.slot = Some(slot);
        self
    }

    pub fn token(mut self, serial: u32) -> Self {
        self.token_serial = Some(serial);
        self
    }

    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    /// An action-specific field under `extra`. Never pass a secret.
    pub fn field(mut self, key: &str, value: impl Serialize) -> Self {
        let value = serde_json::to_value(value).unwrap_or(serde_json::Value::Null);
        self.extra.insert(key.to_string(), value);
        self
    }

    /// Apply builder calls to an event held by reference, e.g. one that a
    /// longer function fills in as it learns things:
    /// `event.update(|e| e.token(serial))`.
    pub fn update(&mut self, f: impl FnOnce(Event) -> Event) {
        let event = std::mem::replace(self, Event::without_vault(""));
        *self = f(event);
    }

    pub fn ok(mut self) -> Self {
        self.outcome = Outcome::Ok;
        self.error = None;
        self
    }

    /// The action failed: `kind` is a stable name (`wrong-pin`,
    /// `wrong-password`, …), `message` what the user was told.
    pub fn failed(mut self, kind: &str, message: impl Into<String>) -> Self {
        self.outcome = Outcome::Failed;
        self.error = Some(Failure {
            kind: kind.to_string(),
            message: message.into(),
        });
        self
    }
}

/// The canonical form of a path that may not exist (yet, or any more): its
/// directory made canonical, its name kept.
fn canonical(path: &Path) -> PathBuf {
    if let Ok(p) = std::fs::canonicalize(path) {
        return p;
    }
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    match (absolute.parent(), absolute.file_name()) {
        (Some(dir), Some(name)) => std::fs::canonicalize(dir)
            .map(|d| d.join(name))
            .unwrap_or(absolute.clone()),
        _ => absolute,
    }
}

#[derive(Serialize)]
struct User {
    uid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
}

/// One line of the log.
#[derive(Serialize)]
struct Entry<'a> {
    /// `None` only in a copy for the system log whose file append failed.
    seq: Option<u64>,
    prev: Option<&'a str>,
    time: String,
    host: &'a str,
    user: &'a User,
    pid: u32,
    #[serde(flatten)]
    event: &'a Event,
}

/// Append `event` to the log (see [`log_path`]) and copy it to the system
/// log. Never fails: if the file cannot be written, that is logged as a
/// warning (stderr, or the mount daemon's log) and `None` is returned.
pub fn record(event: &Event) -> Option<Appended> {
    match log_path() {
        Ok(path) => record_to(&path, event),
        Err(e) => {
            warn(&e);
            syslog_only(event);
            None
        }
    }
}

/// [`record`] to an explicit log file.
pub fn record_to(log: &Path, event: &Event) -> Option<Appended> {
    match try_record_to(log, event) {
        Ok(appended) => Some(appended),
        Err(e) => {
            warn(&e);
            syslog_only(event);
            None
        }
    }
}

fn warn(err: &AuditError) {
    tracing::warn!("the audit log was not written: {err}");
}

/// Append `event` to `log` (and copy it to the system log), reporting failure.
pub fn try_record_to(log: &Path, event: &Event) -> Result<Appended, AuditError> {
    try_record_with(log, Path::new(sink::DEV_LOG), event)
}

fn try_record_with(log: &Path, syslog: &Path, event: &Event) -> Result<Appended, AuditError> {
    let time = system::Utc::now();
    let host = system::hostname();
    let (uid, name) = system::user();
    let user = User { uid, name };
    let pid = std::process::id();
    let appended = chain::append(log, |seq, prev| {
        let entry = Entry {
            seq: Some(seq),
            prev: Some(prev),
            time: time.rfc3339(),
            host: &host,
            user: &user,
            pid,
            event,
        };
        Ok(serde_json::to_string(&entry)?)
    })?;
    let failed = event.outcome == Outcome::Failed;
    sink::send(
        syslog,
        &sink::format(&appended.line, failed, &time, &host, pid),
    );
    Ok(appended)
}

/// The entry without chain fields, for the system log only.
fn syslog_only(event: &Event) {
    let time = system::Utc::now();
    let host = system::hostname();
    let (uid, name) = system::user();
    let pid = std::process::id();
    let entry = Entry {
        seq: None,
        prev: None,
        time: time.rfc3339(),
        host: &host,
        user: &User { uid, name },
        pid,
        event,
    };
    if let Ok(line) = serde_json::to_string(&entry) {
        let failed = event.outcome == Outcome::Failed;
        sink::send(
            Path::new(sink::DEV_LOG),
            &sink::format(&line, failed, &time, &host, pid),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_has_every_field() {
        let dir = tempfile::tempdir().unwrap();
        let vault = dir.path().join("v.kb");
        std::fs::write(&vault, b"").unwrap();
        let log = dir.path().join("audit.log");
        let syslog = dir.path().join("syslog");
        let server = std::os::unix::net::UnixDatagram::bind(&syslog).unwrap();
        let event = Event::new("unlock", dir.path().join(".").join("v.kb"))
            .container_id(&[0xab, 0xcd])
            .slot(2)
            .token(10000001)
            .field("pin_tries_left", 2)
            .failed("wrong-pin", "wrong PIN for token 10000001: 2 tries left");
        let appended = try_record_with(&log, &syslog, &event).unwrap();
        let text = std::fs::read_to_string(&log).unwrap();
        assert_eq!(text, format!("{}\n", appended.line));
        let v: serde_json::Value = serde_json::from_str(&appended.line).unwrap();
        assert_eq!(v["seq"], 1);
        assert_eq!(v["prev"], chain::ZERO_HASH);
        assert_eq!(v["action"], "unlock");
        assert_eq!(
            v["vault"]["path"],
            std::fs::canonicalize(&vault).unwrap().display().to_string()
        );
        assert_eq!(v["vault"]["container_id"], "abcd");
        assert_eq!(v["outcome"], "failed");
        assert_eq!(v["error"]["kind"], "wrong-pin");
        assert_eq!(v["slot"], 2);
        assert_eq!(v["token_serial"], 10000001);
        assert_eq!(v["extra"]["pin_tries_left"], 2);
        assert_eq!(v["pid"], std::process::id());
        assert!(v["user"]["uid"].is_u64());
        assert!(v["host"].is_string());
        let time = v["time"].as_str().unwrap();
        assert!(
            time.len() == 24 && time.ends_with('Z') && time.as_bytes()[10] == b'T',
            "{time}"
        );
        assert!(v.get("reason").is_none(), "absent fields are left out");
        // The same line went to the system log, as a warning (failed).
        let mut buf = vec![0u8; 8192];
        let n = server.recv(&mut buf).unwrap();
        let message = String::from_utf8_lossy(&buf[..n]);
        assert!(message.starts_with("<84>"), "{message}");
        assert!(message.ends_with(&appended.line), "{message}");

        let next = try_record_with(&log, &syslog, &Event::without_vault("x").reason("r")).unwrap();
        assert_eq!(next.seq, 2);
        assert_eq!(verify(&log, &[]).unwrap().entries, 2);
    }

    #[test]
    fn a_log_that_cannot_be_written_is_not_an_error_for_the_caller() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should be.
        let log = dir.path().join("audit.log");
        std::fs::create_dir(&log).unwrap();
        assert!(try_record_to(&log, &Event::without_vault("x")).is_err());
        assert!(record_to(&log, &Event::without_vault("x")).is_none());
    }

    #[test]
    fn canonical_paths_of_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        let real = std::fs::canonicalize(dir.path()).unwrap();
        std::os::unix::fs::symlink(&real, dir.path().join("link")).unwrap();
        assert_eq!(
            canonical(&dir.path().join("link/new.kb")),
            real.join("new.kb")
        );
    }
}
