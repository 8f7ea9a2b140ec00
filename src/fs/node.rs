//! Inodes: lookup, attributes, creating nodes, links, and freeing inodes.

use super::schema::{Attr, FileKind, MAX_FILE_SIZE, NAME_MAX, ROOT_INO, SYMLINK_MAX, Timespec};
use super::store::Txn;
use super::{Caller, Fs, FsError, FsResult, Mode, SetAttr, SetTime};
use crate::secrets::PlainBuf;

/// Space-estimate weights of metadata records (bytes).
pub(crate) const INODE_META: u64 = 128;
pub(crate) const DIRENT_META: u64 = 48;
/// Space a metadata-only operation may add to the store, for the ENOSPC check.
pub(crate) const META_OP_BYTES: u64 = 16 << 10;
/// Most hard links to one inode (like ext4).
const LINK_MAX: u32 = 65_000;

pub(crate) fn get(tx: &Txn, ino: u64) -> FsResult<Attr> {
    tx.attr(ino)?.ok_or(FsError::NotFound)
}

/// The attributes of a live directory (a removed directory accepts no new entries).
pub(crate) fn get_dir(tx: &Txn, ino: u64) -> FsResult<Attr> {
    let a = get(tx, ino)?;
    if a.kind != FileKind::Dir {
        return Err(FsError::NotDir);
    }
    if a.nlink == 0 {
        return Err(FsError::NotFound);
    }
    Ok(a)
}

/// A name that can be a directory entry.
pub(crate) fn check_name(name: &[u8]) -> FsResult<()> {
    if name.len() > NAME_MAX {
        return Err(FsError::NameTooLong);
    }
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        return Err(FsError::Invalid);
    }
    Ok(())
}

pub(crate) fn touch_dir(p: &mut Attr, now: Timespec) {
    p.mtime = now;
    p.ctime = now;
}

fn set_time(t: SetTime, now: Timespec) -> Timespec {
    match t {
        SetTime::Now => now,
        SetTime::At(t) => t,
    }
}

impl Fs {
    /// Looks `name` up in directory `parent` ("." and ".." included).
    pub fn lookup(&mut self, parent: u64, name: &[u8]) -> FsResult<Attr> {
        if name.len() > NAME_MAX {
            return Err(FsError::NameTooLong);
        }
        self.run(Mode::Read, |_, tx| {
            let p = get(tx, parent)?;
            if p.kind != FileKind::Dir {
                return Err(FsError::NotDir);
            }
            match name {
                b"." => Ok(p),
                b".." => get(tx, p.parent),
                _ => {
                    let (ino, _) = tx.dirent(parent, name)?.ok_or(FsError::NotFound)?;
                    get(tx, ino)
                }
            }
        })
    }

    pub fn getattr(&mut self, ino: u64) -> FsResult<Attr> {
        self.run(Mode::Read, |_, tx| get(tx, ino))
    }

    /// Changes attributes (chmod, chown, truncate, utimens, …) and returns the new ones. ctime
    /// becomes now unless given; a size change also sets mtime unless given.
    pub fn setattr(&mut self, ino: u64, s: &SetAttr) -> FsResult<Attr> {
        self.run(Mode::Write, |fs, tx| {
            let mut a = get(tx, ino)?;
            let now = Timespec::now();
            if let Some(size) = s.size {
                match a.kind {
                    FileKind::File => {}
                    FileKind::Dir => return Err(FsError::IsDir),
                    _ => return Err(FsError::Invalid),
                }
                if size > MAX_FILE_SIZE {
                    return Err(FsError::TooBig);
                }
                fs.truncate(tx, &mut a, size)?;
                a.mtime = now;
            }
            let chown = s.uid.is_some() || s.gid.is_some();
            if let Some(by) = s.dropper
                && (chown || s.size.is_some())
            {
                fs.drop_privileges(tx, &mut a, by, chown)?;
            }
            if let Some(uid) = s.uid {
                a.uid = uid;
            }
            if let Some(gid) = s.gid {
                a.gid = gid;
            }
            if let Some(mode) = s.mode {
                a.perm = (mode & 0o7777) as u16;
            }
            if let Some(t) = s.atime {
                a.atime = set_time(t, now);
            }
            if let Some(t) = s.mtime {
                a.mtime = set_time(t, now);
            }
            a.ctime = s.ctime.unwrap_or(now);
            if let Some(t) = s.crtime {
                a.crtime = t;
            }
            if let Some(f) = s.flags {
                a.flags = f;
            }
            tx.put_attr(&a)?;
            Ok(a)
        })
    }

    /// Creates a regular file, device, fifo or socket (`mode` carries S_IFMT and permissions).
    pub fn mknod(
        &mut self,
        parent: u64,
        name: &[u8],
        mode: u32,
        rdev: u32,
        caller: Caller,
    ) -> FsResult<Attr> {
        let kind = FileKind::from_mode(mode).ok_or(FsError::Invalid)?;
        if matches!(kind, FileKind::Dir | FileKind::Symlink) {
            return Err(FsError::Invalid);
        }
        self.make_node(parent, name, kind, mode, rdev, caller, None)
    }

    pub fn mkdir(&mut self, parent: u64, name: &[u8], mode: u32, caller: Caller) -> FsResult<Attr> {
        self.make_node(parent, name, FileKind::Dir, mode, 0, caller, None)
    }

    pub fn symlink(
        &mut self,
        parent: u64,
        name: &[u8],
        target: &[u8],
        caller: Caller,
    ) -> FsResult<Attr> {
        if target.len() > SYMLINK_MAX {
            return Err(FsError::NameTooLong);
        }
        if target.is_empty() {
            return Err(FsError::NotFound);
        }
        self.make_node(
            parent,
            name,
            FileKind::Symlink,
            0o777,
            0,
            caller,
            Some(target),
        )
    }

    pub fn readlink(&mut self, ino: u64) -> FsResult<PlainBuf> {
        self.run(Mode::Read, |_, tx| {
            if get(tx, ino)?.kind != FileKind::Symlink {
                return Err(FsError::Invalid);
            }
            tx.symlink(ino)?
                .ok_or_else(|| FsError::Corrupt(format!("symlink {ino} has no target")))
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn make_node(
        &mut self,
        parent: u64,
        name: &[u8],
        kind: FileKind,
        mode: u32,
        rdev: u32,
        caller: Caller,
        target: Option<&[u8]>,
    ) -> FsResult<Attr> {
        check_name(name)?;
        self.ensure_space(META_OP_BYTES + target.map_or(0, |t| t.len() as u64))?;
        self.run(Mode::Write, |fs, tx| {
            let mut p = get_dir(tx, parent)?;
            if tx.dirent(parent, name)?.is_some() {
                return Err(FsError::Exists);
            }
            if kind == FileKind::Dir && p.nlink >= LINK_MAX {
                return Err(FsError::TooManyLinks);
            }
            let now = Timespec::now();
            let mut a = fs.new_attr(kind, mode, rdev, caller, &p, now);
            a.size = target.map_or(0, |t| t.len() as u64);
            // Probe where the new records go before writing them.
            tx.attr(a.ino)?;
            if target.is_some() {
                tx.symlink(a.ino)?;
            }
            tx.put_attr(&a)?;
            tx.put_dirent(parent, name, a.ino, kind)?;
            if let Some(t) = target {
                tx.put_symlink(a.ino, t)?;
            }
            p.size += 1;
            if kind == FileKind::Dir {
                p.nlink += 1;
            }
            touch_dir(&mut p, now);
            tx.put_attr(&p)?;
            fs.sb.inodes += 1;
            fs.sb.meta_bytes +=
                INODE_META + DIRENT_META + name.len() as u64 + target.map_or(0, |t| t.len() as u64);
            fs.pending_bytes += 3 * 4096;
            Ok(a)
        })
    }

    /// A new inode's attributes: group from a setgid parent, which directories also inherit.
    fn new_attr(
        &mut self,
        kind: FileKind,
        mode: u32,
        rdev: u32,
        caller: Caller,
        parent: &Attr,
        now: Timespec,
    ) -> Attr {
        let ino = self.sb.next_ino;
        self.sb.next_ino += 1;
        let setgid_parent = u32::from(parent.perm) & libc::S_ISGID != 0;
        let mut perm = (mode & 0o7777) as u16;
        if kind == FileKind::Dir && setgid_parent {
            perm |= libc::S_ISGID as u16;
        }
        Attr {
            ino,
            kind,
            perm,
            uid: caller.uid,
            gid: if setgid_parent {
                parent.gid
            } else {
                caller.gid
            },
            nlink: if kind == FileKind::Dir { 2 } else { 1 },
            size: 0,
            stored: 0,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            rdev: if matches!(kind, FileKind::CharDev | FileKind::BlockDev) {
                rdev
            } else {
                0
            },
            flags: 0,
            generation: 0,
            parent: if kind == FileKind::Dir { parent.ino } else { 0 },
        }
    }

    /// Creates a hard link `newparent/newname` to `ino`.
    pub fn link(&mut self, ino: u64, newparent: u64, newname: &[u8]) -> FsResult<Attr> {
        check_name(newname)?;
        self.ensure_space(META_OP_BYTES)?;
        self.run(Mode::Write, |fs, tx| {
            let mut a = get(tx, ino)?;
            if a.kind == FileKind::Dir {
                return Err(FsError::Perm);
            }
            if a.nlink == 0 {
                return Err(FsError::NotFound);
            }
            if a.nlink >= LINK_MAX {
                return Err(FsError::TooManyLinks);
            }
            let mut p = get_dir(tx, newparent)?;
            if tx.dirent(newparent, newname)?.is_some() {
                return Err(FsError::Exists);
            }
            let now = Timespec::now();
            tx.put_dirent(newparent, newname, ino, a.kind)?;
            a.nlink += 1;
            a.ctime = now;
            tx.put_attr(&a)?;
            p.size += 1;
            touch_dir(&mut p, now);
            tx.put_attr(&p)?;
            fs.sb.meta_bytes += DIRENT_META + newname.len() as u64;
            fs.pending_bytes += 3 * 4096;
            Ok(a)
        })
    }

    /// Whether dropping one link of `a` will free it (so its records must be probed first).
    pub(crate) fn frees_on_unlink(&self, a: &Attr) -> bool {
        (a.nlink <= 1 || a.kind == FileKind::Dir) && !self.open_files.contains_key(&a.ino)
    }

    /// Drops one link of a non-directory: frees it when no link and no open handle remain,
    /// keeps it as an orphan when handles remain.
    pub(crate) fn drop_link(&mut self, tx: &Txn, mut a: Attr, now: Timespec) -> FsResult<()> {
        a.nlink = a.nlink.saturating_sub(1);
        a.ctime = now;
        if a.nlink > 0 {
            tx.put_attr(&a)?;
        } else if self.open_files.contains_key(&a.ino) {
            tx.put_attr(&a)?;
            tx.put_orphan(a.ino)?;
        } else {
            self.purge(tx, a.ino)?;
        }
        Ok(())
    }

    /// Reads every record [`Fs::purge`] will remove, so damage shows before anything changes.
    pub(crate) fn probe_purge(&self, tx: &Txn, ino: u64) -> FsResult<()> {
        tx.probe_chunks(ino, 0, u64::MAX)?;
        tx.list_xattrs(ino, |_, _| {})?;
        tx.symlink(ino)?;
        tx.attr(ino)?;
        Ok(())
    }

    /// Removes an inode and everything it owns.
    pub(crate) fn purge(&mut self, tx: &Txn, ino: u64) -> FsResult<()> {
        let Some(a) = tx.attr(ino)? else {
            return tx.del_orphan(ino);
        };
        let (n, bytes) = tx.del_chunks(ino, 0, u64::MAX)?;
        let xbytes = tx.del_xattrs(ino)?;
        if a.kind == FileKind::Symlink {
            tx.del_symlink(ino)?;
        }
        tx.del_attr(ino)?;
        tx.del_orphan(ino)?;
        let sb = &mut self.sb;
        sb.chunks = sb.chunks.saturating_sub(n);
        sb.chunk_bytes = sb.chunk_bytes.saturating_sub(bytes);
        sb.inodes = sb.inodes.saturating_sub(1);
        let meta = INODE_META
            + xbytes
            + if a.kind == FileKind::Symlink {
                a.size
            } else {
                0
            };
        sb.meta_bytes = sb.meta_bytes.saturating_sub(meta);
        self.pending_bytes += 4096 * 4;
        Ok(())
    }

    /// Whether `dir` is `ancestor` or lies below it.
    pub(crate) fn is_within(tx: &Txn, mut dir: u64, ancestor: u64) -> FsResult<bool> {
        for _ in 0..(1u32 << 20) {
            if dir == ancestor {
                return Ok(true);
            }
            if dir == ROOT_INO {
                return Ok(false);
            }
            dir = get(tx, dir)?.parent;
        }
        Err(FsError::Corrupt("directory parent chain too long".into()))
    }
}
