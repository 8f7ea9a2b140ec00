//! Filesystem errors and their errno values.

/// An error of a filesystem operation. [`FsError::errno`] gives the value FUSE replies with.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("file exists")]
    Exists,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("directory not empty")]
    NotEmpty,
    #[error("name too long")]
    NameTooLong,
    #[error("invalid argument")]
    Invalid,
    #[error("operation not permitted")]
    Perm,
    #[error("no space left in the vault")]
    NoSpace,
    #[error("file too large")]
    TooBig,
    #[error("read-only filesystem")]
    ReadOnly,
    #[error("no such attribute")]
    NoData,
    #[error("buffer too small")]
    Range,
    #[error("argument list too long")]
    TooLong,
    #[error("operation not supported")]
    NotSupported,
    #[error("bad file handle")]
    BadHandle,
    #[error("too many links")]
    TooManyLinks,
    /// A read failed authentication (the vault is damaged there), or the store panicked on a
    /// damaged page. Never wrong bytes: the operation fails instead.
    #[error("damaged data in the vault (unmount, then restore or verify the container)")]
    Damaged,
    /// The filesystem stopped accepting writes after damage or a storage failure.
    #[error("the vault refuses writes after an earlier failure; unmount it")]
    Failed,
    /// The embedded store reported an error.
    #[error("store error: {0}")]
    Store(String),
    /// A read-only open met records in the fsync log: the vault was not closed cleanly, and
    /// only a read-write open can apply them.
    #[error("the vault was not closed cleanly; a read-write open must replay its fsync log first")]
    Unreplayed,
    /// A record did not decode.
    #[error("corrupt record: {0}")]
    Corrupt(String),
}

impl FsError {
    /// The errno to report to the kernel.
    pub fn errno(&self) -> i32 {
        match self {
            Self::NotFound => libc::ENOENT,
            Self::Exists => libc::EEXIST,
            Self::NotDir => libc::ENOTDIR,
            Self::IsDir => libc::EISDIR,
            Self::NotEmpty => libc::ENOTEMPTY,
            Self::NameTooLong => libc::ENAMETOOLONG,
            Self::Invalid => libc::EINVAL,
            Self::Perm => libc::EPERM,
            Self::NoSpace => libc::ENOSPC,
            Self::TooBig => libc::EFBIG,
            Self::ReadOnly => libc::EROFS,
            Self::NoData => libc::ENODATA,
            Self::Range => libc::ERANGE,
            Self::TooLong => libc::E2BIG,
            Self::NotSupported => libc::EOPNOTSUPP,
            Self::BadHandle => libc::EBADF,
            Self::TooManyLinks => libc::EMLINK,
            Self::Damaged | Self::Failed | Self::Store(_) | Self::Corrupt(_) | Self::Unreplayed => {
                libc::EIO
            }
        }
    }

    /// Whether this error came from the store (as opposed to a refusal the fs decided on).
    pub(crate) fn is_store(&self) -> bool {
        matches!(self, Self::Store(_) | Self::Corrupt(_))
    }
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for FsError {
            fn from(e: $t) -> Self {
                Self::Store(e.to_string())
            }
        }
    )*};
}

from_redb!(
    redb::StorageError,
    redb::TableError,
    redb::TransactionError,
    redb::CommitError,
    redb::DatabaseError,
    redb::CompactionError
);

/// Result of filesystem operations.
pub type FsResult<T> = Result<T, FsError>;
