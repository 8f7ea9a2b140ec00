//! The database and its one transaction, and typed access to the tables.
//!
//! Every helper opens the table it needs and closes it before returning, so helpers never nest
//! (redb refuses to open a table twice in one write transaction). Helpers that change anything
//! mark the transaction as mutated first, which is what the damage rule keys on.

use std::cell::Cell;
use std::sync::Arc;

use redb::{
    Database, ReadOnlyDatabase, ReadTransaction, ReadableDatabase, ReadableTable,
    ReadableTableMetadata, WriteTransaction,
};
use zeroize::Zeroizing;

use super::Storage;
use super::backend::Backend;
use super::error::{FsError, FsResult};
use super::schema::{
    Attr, CHUNKS, DIRENTS, FileKind, INODES, ORPHANS, SUPER, SYMLINKS, Superblock, XATTRS,
};

/// redb's page cache and write buffer (half of it at most). Sized for the write buffer: a
/// transaction whose dirty pages outgrow it spills them to the store and, at commit, reads every
/// spilled page back and writes it again, so large writes commit every quarter of this (see
/// `Fs::commit_if_large`). Plaintext, like the store's own cache: the mount daemon's memory is
/// locked, and both caches are bounded and freed (wiped) when the vault locks.
pub(crate) const CACHE_BYTES: usize = 64 << 20;

pub(crate) enum Db {
    W(Database),
    R(ReadOnlyDatabase),
}

pub(crate) enum Txn {
    W {
        txn: Box<WriteTransaction>,
        /// Whether the current operation changed anything.
        mutated: Cell<bool>,
        /// The storage's damage counter when the current operation began.
        start: Cell<u64>,
        storage: Arc<dyn Storage>,
    },
    R(ReadTransaction),
}

pub(crate) fn open_db(backend: &Backend, read_only: bool) -> FsResult<Db> {
    let mut b = Database::builder();
    b.set_cache_size(CACHE_BYTES);
    Ok(if read_only {
        Db::R(b.open_read_only_with_backend(backend.clone())?)
    } else {
        Db::W(b.create_with_backend(backend.clone())?)
    })
}

impl Db {
    pub fn begin(&self, storage: &Arc<dyn Storage>) -> FsResult<Txn> {
        Ok(match self {
            Db::W(db) => {
                let mut txn = db.begin_write()?;
                txn.set_two_phase_commit(true);
                txn.set_quick_repair(true);
                Txn::W {
                    txn: Box::new(txn),
                    mutated: Cell::new(false),
                    start: Cell::new(storage.damaged_reads()),
                    storage: storage.clone(),
                }
            }
            Db::R(db) => Txn::R(db.begin_read()?),
        })
    }
}

/// Runs `$body` with `$t` bound to the table opened read-only or through the write transaction.
macro_rules! read_table {
    ($txn:expr, $def:expr, |$t:ident| $body:expr) => {
        match $txn {
            Txn::W { txn, .. } => {
                let $t = txn.open_table($def)?;
                $body
            }
            Txn::R(txn) => {
                let $t = txn.open_table($def)?;
                $body
            }
        }
    };
}

fn len64(v: &[u8]) -> u64 {
    v.len() as u64
}

impl Txn {
    /// The write transaction, marked as mutated; EROFS for a read-only mount. The gate of
    /// every change: if the operation has read a damaged sector so far (its probe), it fails
    /// here, before changing anything.
    fn w(&self) -> FsResult<&WriteTransaction> {
        match self {
            Txn::W {
                txn,
                mutated,
                start,
                storage,
            } => {
                if !mutated.get() && storage.damaged_reads() != start.get() {
                    return Err(FsError::Damaged);
                }
                mutated.set(true);
                Ok(txn)
            }
            Txn::R(_) => Err(FsError::ReadOnly),
        }
    }

    pub fn mutated(&self) -> bool {
        matches!(self, Txn::W { mutated, .. } if mutated.get())
    }

    /// Starts an operation: nothing changed yet, damage counted from now.
    pub fn begin_op(&self) {
        if let Txn::W {
            mutated,
            start,
            storage,
            ..
        } = self
        {
            mutated.set(false);
            start.set(storage.damaged_reads());
        }
    }

    /// Creates every table (a fresh database has none).
    pub fn create_tables(&self) -> FsResult<()> {
        let w = self.w()?;
        w.open_table(INODES)?;
        w.open_table(DIRENTS)?;
        w.open_table(CHUNKS)?;
        w.open_table(XATTRS)?;
        w.open_table(SYMLINKS)?;
        w.open_table(ORPHANS)?;
        w.open_table(SUPER)?;
        Ok(())
    }

    // --- superblock ---

    pub fn superblock(&self) -> FsResult<Option<Superblock>> {
        read_table!(self, SUPER, |t| match t.get(0)? {
            Some(v) => Ok(Some(Superblock::decode(v.value())?)),
            None => Ok(None),
        })
    }

    pub fn put_superblock(&self, sb: &Superblock) -> FsResult<()> {
        self.w()?.open_table(SUPER)?.insert(0, &sb.encode()[..])?;
        Ok(())
    }

    // --- inodes ---

    pub fn attr(&self, ino: u64) -> FsResult<Option<Attr>> {
        read_table!(self, INODES, |t| match t.get(ino)? {
            Some(v) => Ok(Some(Attr::decode(ino, v.value())?)),
            None => Ok(None),
        })
    }

    /// Writes the attributes; true if the inode existed before.
    pub fn put_attr(&self, a: &Attr) -> FsResult<bool> {
        let w = self.w()?;
        let mut t = w.open_table(INODES)?;
        Ok(t.insert(a.ino, &a.encode()[..])?.is_some())
    }

    pub fn del_attr(&self, ino: u64) -> FsResult<()> {
        self.w()?.open_table(INODES)?.remove(ino)?;
        Ok(())
    }

    // --- directory entries ---

    pub fn dirent(&self, parent: u64, name: &[u8]) -> FsResult<Option<(u64, FileKind)>> {
        read_table!(self, DIRENTS, |t| match t.get((parent, name))? {
            Some(v) => {
                let (ino, kind) = v.value();
                Ok(Some((ino, FileKind::from_code(kind)?)))
            }
            None => Ok(None),
        })
    }

    pub fn put_dirent(&self, parent: u64, name: &[u8], ino: u64, kind: FileKind) -> FsResult<()> {
        let w = self.w()?;
        w.open_table(DIRENTS)?
            .insert((parent, name), (ino, kind.code()))?;
        Ok(())
    }

    pub fn del_dirent(&self, parent: u64, name: &[u8]) -> FsResult<()> {
        self.w()?.open_table(DIRENTS)?.remove((parent, name))?;
        Ok(())
    }

    /// Calls `f(name, ino, kind)` for each entry of `dir` in name order.
    pub fn list_dir(
        &self,
        dir: u64,
        mut f: impl FnMut(&[u8], u64, FileKind) -> FsResult<()>,
    ) -> FsResult<()> {
        let empty: &[u8] = &[];
        read_table!(self, DIRENTS, |t| {
            for e in t.range((dir, empty)..(dir.saturating_add(1), empty))? {
                let (k, v) = e?;
                let (ino, kind) = v.value();
                f(k.value().1, ino, FileKind::from_code(kind)?)?;
            }
            Ok(())
        })
    }

    pub fn dir_is_empty(&self, dir: u64) -> FsResult<bool> {
        let empty: &[u8] = &[];
        read_table!(self, DIRENTS, |t| {
            let mut r = t.range((dir, empty)..(dir.saturating_add(1), empty))?;
            Ok(r.next().transpose()?.is_none())
        })
    }

    // --- chunks ---

    pub fn chunk(&self, ino: u64, idx: u64) -> FsResult<Option<Zeroizing<Vec<u8>>>> {
        read_table!(self, CHUNKS, |t| Ok(t
            .get((ino, idx))?
            .map(|v| Zeroizing::new(v.value().to_vec()))))
    }

    /// Reads the chunk without keeping it (a probe: damage shows before anything changes).
    pub fn probe_chunk(&self, ino: u64, idx: u64) -> FsResult<()> {
        read_table!(self, CHUNKS, |t| {
            t.get((ino, idx))?;
            Ok(())
        })
    }

    /// Calls `f(index, data)` for each stored chunk with index in `first..=last`, looking each
    /// one up by key (a range scan would also touch the leaf after the range, so damage next
    /// to what is read would fail the read).
    pub fn chunks_each(
        &self,
        ino: u64,
        first: u64,
        last: u64,
        mut f: impl FnMut(u64, &[u8]),
    ) -> FsResult<()> {
        read_table!(self, CHUNKS, |t| {
            for idx in first..=last {
                if let Some(v) = t.get((ino, idx))? {
                    f(idx, v.value());
                }
            }
            Ok(())
        })
    }

    /// Calls `f(index, data)` for each stored chunk with index in `first..=last` (a range scan).
    pub fn chunks_in(
        &self,
        ino: u64,
        first: u64,
        last: u64,
        mut f: impl FnMut(u64, &[u8]),
    ) -> FsResult<()> {
        read_table!(self, CHUNKS, |t| {
            for e in t.range((ino, first)..=(ino, last))? {
                let (k, v) = e?;
                f(k.value().1, v.value());
            }
            Ok(())
        })
    }

    /// Stores a chunk; returns the length of the value it replaced, if any.
    pub fn put_chunk(&self, ino: u64, idx: u64, data: &[u8]) -> FsResult<Option<u64>> {
        let w = self.w()?;
        let mut t = w.open_table(CHUNKS)?;
        Ok(t.insert((ino, idx), data)?.map(|old| len64(old.value())))
    }

    /// Removes the chunks with index in `first..=last`; returns (count, bytes) removed.
    pub fn del_chunks(&self, ino: u64, first: u64, last: u64) -> FsResult<(u64, u64)> {
        let w = self.w()?;
        let mut t = w.open_table(CHUNKS)?;
        let (mut n, mut bytes) = (0, 0);
        for e in t.extract_from_if((ino, first)..=(ino, last), |_, _| true)? {
            let (_, v) = e?;
            n += 1;
            bytes += len64(v.value());
        }
        Ok((n, bytes))
    }

    // --- xattrs ---

    pub fn xattr(&self, ino: u64, name: &[u8]) -> FsResult<Option<Zeroizing<Vec<u8>>>> {
        read_table!(self, XATTRS, |t| Ok(t
            .get((ino, name))?
            .map(|v| Zeroizing::new(v.value().to_vec()))))
    }

    /// Whether no inode has any xattr (an O(1) look at the table's length).
    pub fn no_xattrs(&self) -> FsResult<bool> {
        read_table!(self, XATTRS, |t| Ok(t.len()? == 0))
    }

    /// Stores an xattr; returns the length of the value it replaced, if any.
    pub fn put_xattr(&self, ino: u64, name: &[u8], value: &[u8]) -> FsResult<Option<u64>> {
        let w = self.w()?;
        let mut t = w.open_table(XATTRS)?;
        Ok(t.insert((ino, name), value)?.map(|old| len64(old.value())))
    }

    /// Removes an xattr; returns the length of its value, if it existed.
    pub fn del_xattr(&self, ino: u64, name: &[u8]) -> FsResult<Option<u64>> {
        let w = self.w()?;
        let mut t = w.open_table(XATTRS)?;
        Ok(t.remove((ino, name))?.map(|old| len64(old.value())))
    }

    /// Calls `f(name, value_len)` for each xattr of `ino`.
    pub fn list_xattrs(&self, ino: u64, mut f: impl FnMut(&[u8], u64)) -> FsResult<()> {
        let empty: &[u8] = &[];
        read_table!(self, XATTRS, |t| {
            for e in t.range((ino, empty)..(ino.saturating_add(1), empty))? {
                let (k, v) = e?;
                f(k.value().1, len64(v.value()));
            }
            Ok(())
        })
    }

    /// Removes every xattr of `ino`; returns the bytes of names and values removed.
    pub fn del_xattrs(&self, ino: u64) -> FsResult<u64> {
        let empty: &[u8] = &[];
        let w = self.w()?;
        let mut t = w.open_table(XATTRS)?;
        let mut bytes = 0;
        let range = (ino, empty)..(ino.saturating_add(1), empty);
        for e in t.extract_from_if(range, |_, _| true)? {
            let (k, v) = e?;
            bytes += len64(k.value().1) + len64(v.value());
        }
        Ok(bytes)
    }

    // --- symlinks ---

    pub fn symlink(&self, ino: u64) -> FsResult<Option<Zeroizing<Vec<u8>>>> {
        read_table!(self, SYMLINKS, |t| Ok(t
            .get(ino)?
            .map(|v| Zeroizing::new(v.value().to_vec()))))
    }

    pub fn put_symlink(&self, ino: u64, target: &[u8]) -> FsResult<()> {
        self.w()?.open_table(SYMLINKS)?.insert(ino, target)?;
        Ok(())
    }

    pub fn del_symlink(&self, ino: u64) -> FsResult<()> {
        self.w()?.open_table(SYMLINKS)?.remove(ino)?;
        Ok(())
    }

    // --- orphans ---

    pub fn orphans(&self) -> FsResult<Vec<u64>> {
        read_table!(self, ORPHANS, |t| {
            let mut v = Vec::new();
            for e in t.range::<u64>(..)? {
                v.push(e?.0.value());
            }
            Ok(v)
        })
    }

    pub fn put_orphan(&self, ino: u64) -> FsResult<()> {
        self.w()?.open_table(ORPHANS)?.insert(ino, ())?;
        Ok(())
    }

    pub fn del_orphan(&self, ino: u64) -> FsResult<()> {
        self.w()?.open_table(ORPHANS)?.remove(ino)?;
        Ok(())
    }
}

// Reads for the consistency check (`super::check`). Each calls `f` for every record in key order
// until `f` returns false; none of them changes anything.
impl Txn {
    /// The length of chunk `idx` of `ino`, if it is stored (its value is read).
    pub fn chunk_len(&self, ino: u64, idx: u64) -> FsResult<Option<u64>> {
        read_table!(self, CHUNKS, |t| Ok(t
            .get((ino, idx))?
            .map(|v| len64(v.value()))))
    }

    /// `f(ino, index, len)` for each chunk from key `from` on.
    pub fn chunks_from(
        &self,
        from: (u64, u64),
        mut f: impl FnMut(u64, u64, u64) -> bool,
    ) -> FsResult<()> {
        read_table!(self, CHUNKS, |t| {
            for e in t.range(from..)? {
                let (k, v) = e?;
                let (ino, idx) = k.value();
                if !f(ino, idx, len64(v.value())) {
                    break;
                }
            }
            Ok(())
        })
    }

    /// `f(name, child, kind code)` for each entry of `dir` (kind codes undecoded).
    pub fn dirents_of(&self, dir: u64, mut f: impl FnMut(&[u8], u64, u8) -> bool) -> FsResult<()> {
        let empty: &[u8] = &[];
        read_table!(self, DIRENTS, |t| {
            for e in t.range((dir, empty)..(dir.saturating_add(1), empty))? {
                let (k, v) = e?;
                let (child, kind) = v.value();
                if !f(k.value().1, child, kind) {
                    break;
                }
            }
            Ok(())
        })
    }

    /// `f(parent, name, child, kind code)` for every directory entry.
    pub fn dirents_all(&self, mut f: impl FnMut(u64, &[u8], u64, u8) -> bool) -> FsResult<()> {
        read_table!(self, DIRENTS, |t| {
            for e in t.range::<(u64, &[u8])>(..)? {
                let (k, v) = e?;
                let (parent, name) = k.value();
                let (child, kind) = v.value();
                if !f(parent, name, child, kind) {
                    break;
                }
            }
            Ok(())
        })
    }

    /// `f(ino, encoded attributes)` for every inode.
    pub fn inodes_all(&self, mut f: impl FnMut(u64, &[u8]) -> bool) -> FsResult<()> {
        read_table!(self, INODES, |t| {
            for e in t.range::<u64>(..)? {
                let (k, v) = e?;
                if !f(k.value(), v.value()) {
                    break;
                }
            }
            Ok(())
        })
    }

    /// `f(ino, target length)` for every symlink target.
    pub fn symlinks_all(&self, mut f: impl FnMut(u64, u64) -> bool) -> FsResult<()> {
        read_table!(self, SYMLINKS, |t| {
            for e in t.range::<u64>(..)? {
                let (k, v) = e?;
                if !f(k.value(), len64(v.value())) {
                    break;
                }
            }
            Ok(())
        })
    }

    /// `f(name, value length)` for each xattr of `ino` (the values are read).
    pub fn xattrs_of(&self, ino: u64, mut f: impl FnMut(&[u8], u64) -> bool) -> FsResult<()> {
        let empty: &[u8] = &[];
        read_table!(self, XATTRS, |t| {
            for e in t.range((ino, empty)..(ino.saturating_add(1), empty))? {
                let (k, v) = e?;
                if !f(k.value().1, len64(v.value())) {
                    break;
                }
            }
            Ok(())
        })
    }

    /// `f(ino, name, value length)` for every xattr.
    pub fn xattrs_all(&self, mut f: impl FnMut(u64, &[u8], u64) -> bool) -> FsResult<()> {
        read_table!(self, XATTRS, |t| {
            for e in t.range::<(u64, &[u8])>(..)? {
                let (k, v) = e?;
                let (ino, name) = k.value();
                if !f(ino, name, len64(v.value())) {
                    break;
                }
            }
            Ok(())
        })
    }
}
