//! Directories: unlink, rmdir, rename and listing.

use super::node::{DIRENT_META, META_OP_BYTES, check_name, get, get_dir, touch_dir};
use super::rename_flags::{EXCHANGE, NOREPLACE, WHITEOUT};
use super::schema::{Attr, FileKind, Timespec};
use super::store::Txn;
use super::{DirEntry, DirHandle, Fs, FsError, FsResult, Mode};

/// The two parent directories of a rename; one value when they are the same directory, so
/// changes to "both" apply to it once.
struct Parents {
    src: Attr,
    dst: Option<Attr>,
}

impl Parents {
    fn load(tx: &Txn, parent: u64, newparent: u64) -> FsResult<Self> {
        let src = get_dir(tx, parent)?;
        let dst = (newparent != parent)
            .then(|| get_dir(tx, newparent))
            .transpose()?;
        Ok(Self { src, dst })
    }

    fn dst(&mut self) -> &mut Attr {
        self.dst.as_mut().unwrap_or(&mut self.src)
    }

    fn same(&self) -> bool {
        self.dst.is_none()
    }

    fn store(mut self, tx: &Txn, now: Timespec) -> FsResult<()> {
        touch_dir(&mut self.src, now);
        tx.put_attr(&self.src)?;
        if let Some(mut d) = self.dst {
            touch_dir(&mut d, now);
            tx.put_attr(&d)?;
        }
        Ok(())
    }
}

impl Fs {
    /// Removes a non-directory entry.
    pub fn unlink(&mut self, parent: u64, name: &[u8]) -> FsResult<()> {
        self.run(Mode::Write, |fs, tx| {
            let mut p = get_dir(tx, parent)?;
            let (ino, kind) = tx.dirent(parent, name)?.ok_or(FsError::NotFound)?;
            if kind == FileKind::Dir {
                return Err(FsError::IsDir);
            }
            let a = get(tx, ino)?;
            if fs.frees_on_unlink(&a) {
                fs.probe_purge(tx, ino)?;
            }
            let now = Timespec::now();
            tx.del_dirent(parent, name)?;
            p.size = p.size.saturating_sub(1);
            touch_dir(&mut p, now);
            tx.put_attr(&p)?;
            fs.sb.meta_bytes = fs
                .sb
                .meta_bytes
                .saturating_sub(DIRENT_META + name.len() as u64);
            fs.drop_link(tx, a, now)
        })
    }

    /// Removes an empty directory.
    pub fn rmdir(&mut self, parent: u64, name: &[u8]) -> FsResult<()> {
        if name == b"." {
            return Err(FsError::Invalid);
        }
        if name == b".." {
            return Err(FsError::NotEmpty);
        }
        self.run(Mode::Write, |fs, tx| {
            let mut p = get_dir(tx, parent)?;
            let (ino, kind) = tx.dirent(parent, name)?.ok_or(FsError::NotFound)?;
            if kind != FileKind::Dir {
                return Err(FsError::NotDir);
            }
            if !tx.dir_is_empty(ino)? {
                return Err(FsError::NotEmpty);
            }
            fs.probe_purge(tx, ino)?;
            let now = Timespec::now();
            tx.del_dirent(parent, name)?;
            p.size = p.size.saturating_sub(1);
            p.nlink = p.nlink.saturating_sub(1);
            touch_dir(&mut p, now);
            tx.put_attr(&p)?;
            fs.sb.meta_bytes = fs
                .sb
                .meta_bytes
                .saturating_sub(DIRENT_META + name.len() as u64);
            fs.purge(tx, ino)
        })
    }

    /// Renames `parent/name` to `newparent/newname`, replacing a compatible target;
    /// `flags` are renameat2's RENAME_NOREPLACE and RENAME_EXCHANGE.
    pub fn rename(
        &mut self,
        parent: u64,
        name: &[u8],
        newparent: u64,
        newname: &[u8],
        flags: u32,
    ) -> FsResult<()> {
        if flags & !(NOREPLACE | EXCHANGE | WHITEOUT) != 0
            || flags & WHITEOUT != 0
            || flags & (NOREPLACE | EXCHANGE) == (NOREPLACE | EXCHANGE)
        {
            return Err(FsError::Invalid);
        }
        check_name(newname)?;
        if name.is_empty() || name == b"." || name == b".." {
            return Err(FsError::Invalid);
        }
        self.ensure_space(META_OP_BYTES)?;
        self.run(Mode::Write, |fs, tx| {
            let mut ps = Parents::load(tx, parent, newparent)?;
            let (sino, skind) = tx.dirent(parent, name)?.ok_or(FsError::NotFound)?;
            let dst = tx.dirent(newparent, newname)?;
            if flags & EXCHANGE != 0 {
                let (dino, dkind) = dst.ok_or(FsError::NotFound)?;
                return fs.exchange(tx, ps, (name, sino, skind), (newname, dino, dkind));
            }
            if let Some((dino, _)) = dst {
                if flags & NOREPLACE != 0 {
                    return Err(FsError::Exists);
                }
                if dino == sino {
                    return Ok(());
                }
            }
            if skind == FileKind::Dir && !ps.same() && Self::is_within(tx, newparent, sino)? {
                return Err(FsError::Invalid);
            }
            let mut s = get(tx, sino)?;
            let victim = match dst {
                Some((dino, dkind)) => Some(fs.check_victim(tx, skind, dino, dkind)?),
                None => None,
            };
            let now = Timespec::now();
            tx.del_dirent(parent, name)?;
            tx.put_dirent(newparent, newname, sino, skind)?;
            ps.src.size = ps.src.size.saturating_sub(1);
            ps.dst().size += 1;
            if let Some(v) = victim {
                fs.replace_victim(tx, &mut ps, v, now)?;
            }
            if skind == FileKind::Dir && !ps.same() {
                ps.src.nlink = ps.src.nlink.saturating_sub(1);
                ps.dst().nlink += 1;
                s.parent = newparent;
            }
            s.ctime = now;
            tx.put_attr(&s)?;
            fs.sb.meta_bytes += newname.len() as u64;
            fs.sb.meta_bytes = fs.sb.meta_bytes.saturating_sub(name.len() as u64);
            fs.pending_bytes += 5 * 4096;
            ps.store(tx, now)
        })
    }

    /// Checks that a rename may replace `dino` and probes what replacing it will remove.
    fn check_victim(
        &mut self,
        tx: &Txn,
        skind: FileKind,
        dino: u64,
        dkind: FileKind,
    ) -> FsResult<Attr> {
        match (skind == FileKind::Dir, dkind == FileKind::Dir) {
            (true, false) => return Err(FsError::NotDir),
            (false, true) => return Err(FsError::IsDir),
            (true, true) if !tx.dir_is_empty(dino)? => return Err(FsError::NotEmpty),
            _ => {}
        }
        let d = get(tx, dino)?;
        if self.frees_on_unlink(&d) {
            self.probe_purge(tx, dino)?;
        }
        Ok(d)
    }

    /// The target's entry was overwritten: drop its link (a directory goes entirely).
    fn replace_victim(
        &mut self,
        tx: &Txn,
        ps: &mut Parents,
        v: Attr,
        now: Timespec,
    ) -> FsResult<()> {
        let dp = ps.dst();
        dp.size = dp.size.saturating_sub(1);
        if v.kind == FileKind::Dir {
            dp.nlink = dp.nlink.saturating_sub(1);
            self.purge(tx, v.ino)
        } else {
            self.drop_link(tx, v, now)
        }
    }

    /// RENAME_EXCHANGE: swaps two entries atomically.
    fn exchange(
        &mut self,
        tx: &Txn,
        mut ps: Parents,
        (sname, sino, skind): (&[u8], u64, FileKind),
        (dname, dino, dkind): (&[u8], u64, FileKind),
    ) -> FsResult<()> {
        if sino == dino {
            return Ok(());
        }
        let (sparent, dparent) = (ps.src.ino, ps.dst().ino);
        if !ps.same() {
            if skind == FileKind::Dir && Self::is_within(tx, dparent, sino)? {
                return Err(FsError::Invalid);
            }
            if dkind == FileKind::Dir && Self::is_within(tx, sparent, dino)? {
                return Err(FsError::Invalid);
            }
        }
        let mut s = get(tx, sino)?;
        let mut d = get(tx, dino)?;
        let now = Timespec::now();
        tx.put_dirent(sparent, sname, dino, dkind)?;
        tx.put_dirent(dparent, dname, sino, skind)?;
        if !ps.same() {
            if skind == FileKind::Dir {
                ps.src.nlink = ps.src.nlink.saturating_sub(1);
                ps.dst().nlink += 1;
                s.parent = dparent;
            }
            if dkind == FileKind::Dir {
                ps.dst().nlink = ps.dst().nlink.saturating_sub(1);
                ps.src.nlink += 1;
                d.parent = sparent;
            }
        }
        s.ctime = now;
        d.ctime = now;
        tx.put_attr(&s)?;
        tx.put_attr(&d)?;
        self.pending_bytes += 6 * 4096;
        ps.store(tx, now)
    }

    /// Opens a directory for listing; returns the handle for [`Fs::readdir`].
    pub fn opendir(&mut self, ino: u64) -> FsResult<u64> {
        self.run(Mode::Read, |_, tx| {
            let a = get(tx, ino)?;
            if a.kind != FileKind::Dir {
                return Err(FsError::NotDir);
            }
            Ok(())
        })?;
        let fh = self.next_fh();
        self.dirs.insert(fh, DirHandle { ino, entries: None });
        Ok(fh)
    }

    /// The entries of an open directory from position `offset` on ("." and ".." first); entry
    /// `i` of the slice has position `offset + i`, and the next call continues at `offset + i +
    /// 1`. The listing is a snapshot taken at the first call and at every call with offset 0
    /// (rewinddir), so removing entries while listing does not skip others.
    pub fn readdir(&mut self, fh: u64, offset: u64) -> FsResult<&[DirEntry]> {
        let (ino, fresh) = match self.dirs.get(&fh) {
            Some(h) => (h.ino, h.entries.is_none() || offset == 0),
            None => return Err(FsError::BadHandle),
        };
        if fresh {
            let entries = self.list(ino)?;
            if let Some(h) = self.dirs.get_mut(&fh) {
                h.entries = Some(entries);
            }
        }
        let entries = self
            .dirs
            .get(&fh)
            .and_then(|h| h.entries.as_deref())
            .unwrap_or(&[]);
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(entries.len());
        Ok(&entries[start..])
    }

    /// As [`Fs::readdir`], with the attributes of each entry (for READDIRPLUS): at most `max`
    /// entries from position `offset` on, each with its position. Entries removed since the
    /// snapshot was taken are left out. None at the end of the listing.
    pub fn readdir_plus(
        &mut self,
        fh: u64,
        offset: u64,
        max: usize,
    ) -> FsResult<Option<Vec<(u64, DirEntry, Attr)>>> {
        let batch: Vec<DirEntry> = self
            .readdir(fh, offset)?
            .iter()
            .take(max)
            .cloned()
            .collect();
        if batch.is_empty() {
            return Ok(None);
        }
        self.run(Mode::Read, |_, tx| {
            let mut out = Vec::with_capacity(batch.len());
            for (i, e) in batch.into_iter().enumerate() {
                if let Some(a) = tx.attr(e.ino)? {
                    out.push((offset + i as u64, e, a));
                }
            }
            Ok(Some(out))
        })
    }

    /// Closes a directory handle.
    pub fn releasedir(&mut self, fh: u64) {
        self.dirs.remove(&fh);
    }

    /// All entries of a directory, "." and ".." first.
    pub fn list(&mut self, ino: u64) -> FsResult<Vec<DirEntry>> {
        self.run(Mode::Read, |_, tx| {
            let a = get(tx, ino)?;
            if a.kind != FileKind::Dir {
                return Err(FsError::NotDir);
            }
            let dot = |name: &[u8], ino| DirEntry {
                ino,
                kind: FileKind::Dir,
                name: name.to_vec(),
            };
            let mut v = vec![dot(b".", ino), dot(b"..", a.parent)];
            tx.list_dir(ino, |name, ino, kind| {
                v.push(DirEntry {
                    ino,
                    kind,
                    name: name.to_vec(),
                });
                Ok(())
            })?;
            Ok(v)
        })
    }
}
