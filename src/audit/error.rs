//! Why the audit log could not be written, read or trusted.

use std::path::PathBuf;

/// An audit-log failure. Messages name the file; they never contain a secret
/// (entries carry none).
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error(
        "no place for the audit log: HOME is not set and neither --audit-log nor \
         KEYBOUND_AUDIT_LOG was given"
    )]
    NoLocation,
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no audit log at {path} (nothing has been recorded there yet?)")]
    Missing { path: PathBuf },
    /// The log cannot be appended to without breaking its chain (its last
    /// line is not a complete entry); `keybound audit verify` says more.
    #[error(
        "the audit log {path} cannot be continued: {problem}; run `keybound audit verify` \
         and move the damaged log aside"
    )]
    Unusable { path: PathBuf, problem: String },
    /// The chain is broken: the first bad line and what is wrong with it.
    #[error("audit log {path} was tampered with: line {line}: {problem}")]
    Tampered {
        path: PathBuf,
        line: u64,
        problem: String,
    },
    #[error("an audit entry cannot be encoded: {0}")]
    Encode(#[from] serde_json::Error),
}

impl AuditError {
    pub(crate) fn io(what: &'static str, path: &std::path::Path, source: std::io::Error) -> Self {
        AuditError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    }
}
