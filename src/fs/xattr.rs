//! Extended attributes (user., trusted., security.; no ACLs).

use super::node::{META_OP_BYTES, get};
use super::schema::{Attr, FileKind, Timespec, XATTR_NAME_MAX, XATTR_SIZE_MAX};
use super::store::Txn;
use super::xattr_flags::{CREATE, REPLACE};
use super::{Dropper, Fs, FsError, FsResult, Mode};
use crate::secrets::PlainBuf;

/// Overhead counted per xattr in space estimates.
const XATTR_META: u64 = 48;

/// A name this filesystem stores: non-empty, at most 255 bytes (ERANGE otherwise, as Linux),
/// in a namespace it supports. POSIX ACLs (system.posix_acl_*) are not supported.
fn check_name(name: &[u8]) -> FsResult<()> {
    if name.is_empty() || name.len() > XATTR_NAME_MAX {
        return Err(FsError::Range);
    }
    const SUPPORTED: [&[u8]; 3] = [b"user.", b"trusted.", b"security."];
    if SUPPORTED
        .iter()
        .any(|p| name.starts_with(p) && name.len() > p.len())
    {
        Ok(())
    } else {
        Err(FsError::NotSupported)
    }
}

/// File capabilities: what a write, truncate or chown takes away.
const CAPABILITY: &[u8] = b"security.capability";

impl Fs {
    /// Takes from a file (not a directory) what Linux's VFS takes when `by` writes to it,
    /// truncates it, or (`chown`) changes its owner or group: the `security.capability`
    /// attribute; the set-user-ID bit on a chown, or from a caller who may not keep it; the
    /// set-group-ID bit likewise where group-execute is set (without it the bit marks
    /// mandatory locking, and only a caller outside the file's group, as far as its primary
    /// group tells, who may not keep it, loses it).
    pub(super) fn drop_privileges(
        &mut self,
        tx: &Txn,
        a: &mut Attr,
        by: Dropper,
        chown: bool,
    ) -> FsResult<()> {
        if a.kind == FileKind::Dir {
            return Ok(());
        }
        let (suid, sgid, gx) = (
            libc::S_ISUID as u16,
            libc::S_ISGID as u16,
            libc::S_IXGRP as u16,
        );
        let loses_setid = chown || !by.may_keep_setid;
        if loses_setid {
            a.perm &= !suid;
        }
        let drops_sgid = if a.perm & gx != 0 {
            loses_setid
        } else {
            !by.may_keep_setid && by.gid != a.gid
        };
        if drops_sgid {
            a.perm &= !sgid;
        }
        if self.no_xattrs != Some(true) && tx.xattr(a.ino, CAPABILITY)?.is_some() {
            self.delete_xattr(tx, a.ino, CAPABILITY)?;
        }
        Ok(())
    }

    /// Deletes xattr `name` of `ino` and its bytes from the space estimate.
    fn delete_xattr(&mut self, tx: &Txn, ino: u64, name: &[u8]) -> FsResult<()> {
        let len = tx.del_xattr(ino, name)?.unwrap_or(0);
        self.sb.meta_bytes = self
            .sb
            .meta_bytes
            .saturating_sub(XATTR_META + name.len() as u64 + len);
        Ok(())
    }

    /// The value of xattr `name` (ENODATA if absent).
    pub fn getxattr(&mut self, ino: u64, name: &[u8]) -> FsResult<PlainBuf> {
        if name.is_empty() || name.len() > XATTR_NAME_MAX {
            return Err(FsError::Range);
        }
        // `ls -l` asks every file for security.selinux and system.posix_acl_access; most vaults
        // have no xattrs at all, which is known without reading anything.
        if self.no_xattrs == Some(true) {
            return Err(FsError::NoData);
        }
        let (none, value) = self.run(Mode::Read, |_, tx| {
            let none = tx.no_xattrs()?;
            get(tx, ino)?;
            Ok((none, tx.xattr(ino, name)?))
        })?;
        // Only what an operation that saw no damage read is remembered.
        self.no_xattrs = Some(none);
        value.ok_or(FsError::NoData)
    }

    /// Sets xattr `name`; `flags` may hold XATTR_CREATE (EEXIST if present) or XATTR_REPLACE
    /// (ENODATA if absent).
    pub fn setxattr(&mut self, ino: u64, name: &[u8], value: &[u8], flags: i32) -> FsResult<()> {
        check_name(name)?;
        self.no_xattrs = None;
        if value.len() > XATTR_SIZE_MAX {
            return Err(FsError::TooLong);
        }
        if flags & !(CREATE | REPLACE) != 0 {
            return Err(FsError::Invalid);
        }
        self.ensure_space(META_OP_BYTES + 2 * value.len() as u64)?;
        self.run(Mode::Write, |fs, tx| {
            let mut a = get(tx, ino)?;
            let old = tx.xattr(ino, name)?;
            if old.is_some() && flags & CREATE != 0 {
                return Err(FsError::Exists);
            }
            if old.is_none() && flags & REPLACE != 0 {
                return Err(FsError::NoData);
            }
            tx.put_xattr(ino, name, value)?;
            a.ctime = Timespec::now();
            tx.put_attr(&a)?;
            let old_bytes = old.map_or(0, |v| v.len() as u64 + name.len() as u64 + XATTR_META);
            fs.sb.meta_bytes = (fs.sb.meta_bytes + XATTR_META + (name.len() + value.len()) as u64)
                .saturating_sub(old_bytes);
            fs.pending_bytes += 2 * 4096 + value.len() as u64;
            Ok(())
        })
    }

    /// The names of all xattrs, each followed by a NUL byte (listxattr's format).
    pub fn listxattr(&mut self, ino: u64) -> FsResult<PlainBuf> {
        self.run(Mode::Read, |_, tx| {
            get(tx, ino)?;
            let mut out = PlainBuf::from(Vec::new());
            tx.list_xattrs(ino, |name, _| {
                out.extend_from_slice(name);
                out.push(0);
            })?;
            Ok(out)
        })
    }

    /// Removes xattr `name` (ENODATA if absent).
    pub fn removexattr(&mut self, ino: u64, name: &[u8]) -> FsResult<()> {
        if name.is_empty() || name.len() > XATTR_NAME_MAX {
            return Err(FsError::Range);
        }
        self.run(Mode::Write, |fs, tx| {
            let mut a = get(tx, ino)?;
            if tx.xattr(ino, name)?.is_none() {
                return Err(FsError::NoData);
            }
            fs.delete_xattr(tx, ino, name)?;
            a.ctime = Timespec::now();
            tx.put_attr(&a)?;
            Ok(())
        })
    }
}
