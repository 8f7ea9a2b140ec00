//! Errors of the software card. Every message names what to look at (the
//! state file, the reader address) because it ends up as a one-line message
//! from `keybound-softcard`.

use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum SoftcardError {
    #[error("cannot read card state file {}: {source}", .path.display())]
    StateRead {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("card state file {} is damaged: {reason}", .path.display())]
    StateCorrupt { path: PathBuf, reason: String },

    #[error("cannot write card state file {}: {source}", .path.display())]
    StateWrite {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error(
        "card state file {} belongs to card {stored}, not {requested}: \
         drop --serial or use another state file",
        .path.display()
    )]
    SerialMismatch {
        path: PathBuf,
        stored: u32,
        requested: u32,
    },

    #[error("cannot resolve the virtual reader address {addr}: {source}")]
    Resolve {
        addr: String,
        #[source]
        source: io::Error,
    },

    #[error("connection to pcscd's virtual reader at {addr} failed: {source}")]
    Vpcd {
        addr: String,
        #[source]
        source: io::Error,
    },
}
