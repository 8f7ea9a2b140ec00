//! The database and its one transaction, and typed access to the tables.
//!
//! Every helper opens the table it needs and closes it before returning, so helpers never nest
//! (redb refuses to open a table twice in one write transaction). Helpers that change anything
//! mark the transaction as mutated first, which is what the damage rule keys on.

use crate::secrets::PlainBuf;
use std::cell::{Cell, RefCell};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use redb::{
    Database, ReadOnlyDatabase, ReadTransaction, ReadableDatabase, ReadableTable,
    ReadableTableMetadata, WriteTransaction,
};

use super::Storage;
use super::backend::Backend;
use super::error::{FsError, FsResult};
use super::extents::{self, Extent, Space};
use super::fsync_log::{self, Dirty, Entry, Key, Name};
use super::schema::{
    Attr, CHUNKS, DATA_SEGMENTS, DIRENTS, FREE_RUNS, FREED_RUNS, FileKind, INODES, ORPHANS, SUPER,
    SYMLINKS, Superblock, XATTRS,
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
        /// Keys changed since the last append to the fsync log, when the store has one.
        dirty: Option<RefCell<Dirty>>,
        /// Whether the chunk table holds extents ([`extents`]), as the superblock says.
        extents: Cell<bool>,
        /// Whether what the last transaction freed was made free in this one.
        settled: Cell<bool>,
        /// Where the next search for free sectors starts.
        hint: Arc<AtomicU64>,
        /// First sectors of the extents this transaction wrote that no durable state knows
        /// (not in the last commit, not in the fsync log): they may be changed in place, and
        /// are free at once when replaced.
        fresh: RefCell<std::collections::HashSet<u64>>,
        /// A data segment was claimed since [`Txn::take_claimed`] last asked.
        claimed: Cell<bool>,
    },
    R {
        txn: ReadTransaction,
        storage: Arc<dyn Storage>,
        extents: Cell<bool>,
    },
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
    pub fn begin(&self, storage: &Arc<dyn Storage>, hint: &Arc<AtomicU64>) -> FsResult<Txn> {
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
                    dirty: (storage.fsync_log_pages() > 0).then(RefCell::default),
                    extents: Cell::new(false),
                    settled: Cell::new(false),
                    hint: hint.clone(),
                    fresh: RefCell::default(),
                    claimed: Cell::new(false),
                }
            }
            Db::R(db) => Txn::R {
                txn: db.begin_read()?,
                storage: storage.clone(),
                extents: Cell::new(false),
            },
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
            Txn::R { txn, .. } => {
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
                ..
            } => {
                if !mutated.get() && storage.damaged_reads() != start.get() {
                    return Err(FsError::Damaged);
                }
                mutated.set(true);
                Ok(txn)
            }
            Txn::R { .. } => Err(FsError::ReadOnly),
        }
    }

    /// Notes that `key` changed, for the next append to the fsync log.
    fn touch(&self, key: Key) {
        if let Txn::W {
            dirty: Some(dirty), ..
        } = self
        {
            dirty.borrow_mut().insert(key);
        }
    }

    fn name(name: &[u8]) -> Name {
        Name(name.to_vec())
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
        w.open_table(FREE_RUNS)?;
        w.open_table(FREED_RUNS)?;
        w.open_table(DATA_SEGMENTS)?;
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
        self.touch(Key::Inode(a.ino));
        let mut t = w.open_table(INODES)?;
        Ok(t.insert(a.ino, &a.encode()[..])?.is_some())
    }

    pub fn del_attr(&self, ino: u64) -> FsResult<()> {
        self.w()?.open_table(INODES)?.remove(ino)?;
        self.touch(Key::Inode(ino));
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
        self.touch(Key::Dirent(parent, Self::name(name)));
        w.open_table(DIRENTS)?
            .insert((parent, name), (ino, kind.code()))?;
        Ok(())
    }

    pub fn del_dirent(&self, parent: u64, name: &[u8]) -> FsResult<()> {
        self.w()?.open_table(DIRENTS)?.remove((parent, name))?;
        self.touch(Key::Dirent(parent, Self::name(name)));
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

    /// Tells the transaction whether the chunk table holds extents (the superblock's schema).
    pub fn set_extents(&self, on: bool) {
        match self {
            Txn::W { extents, .. } | Txn::R { extents, .. } => extents.set(on),
        }
    }

    fn extents(&self) -> bool {
        match self {
            Txn::W { extents, .. } | Txn::R { extents, .. } => extents.get(),
        }
    }

    fn storage(&self) -> &Arc<dyn Storage> {
        match self {
            Txn::W { storage, .. } | Txn::R { storage, .. } => storage,
        }
    }

    /// The free-space tables, for a change. The first change of each transaction makes free
    /// what the last one freed ([`Space::settle_freed`]): its commit is durable now.
    fn space(&self) -> FsResult<Space<'_>> {
        let w = self.w()?;
        let Txn::W {
            storage,
            hint,
            settled,
            claimed,
            ..
        } = self
        else {
            return Err(FsError::ReadOnly);
        };
        let space = Space {
            w,
            storage,
            hint: hint.as_ref(),
            claimed,
        };
        if !settled.get() {
            space.settle_freed()?;
            settled.set(true);
        }
        Ok(space)
    }

    /// The length of the chunk whose value is `value`.
    fn value_len(&self, value: &[u8]) -> FsResult<u64> {
        if self.extents() {
            Ok(Extent::decode(value)?.len)
        } else {
            Ok(len64(value))
        }
    }

    /// Under extents, where chunk `idx` of `ino` lies (its record).
    fn extent(&self, ino: u64, idx: u64) -> FsResult<Option<Extent>> {
        read_table!(self, CHUNKS, |t| t
            .get((ino, idx))?
            .map(|v| Extent::decode(v.value()))
            .transpose())
    }

    pub fn chunk(&self, ino: u64, idx: u64) -> FsResult<Option<PlainBuf>> {
        if self.extents() {
            return self
                .extent(ino, idx)?
                .map(|e| extents::read_extent(self.storage(), e))
                .transpose();
        }
        read_table!(self, CHUNKS, |t| Ok(t
            .get((ino, idx))?
            .map(|v| PlainBuf::from(v.value().to_vec()))))
    }

    /// Reads the chunk's record without keeping it (a probe: damage shows before anything
    /// changes).
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
        if self.extents() {
            let found: Vec<(u64, Extent)> = read_table!(self, CHUNKS, |t| {
                let mut found = Vec::new();
                for idx in first..=last {
                    if let Some(v) = t.get((ino, idx))? {
                        found.push((idx, Extent::decode(v.value())?));
                    }
                }
                found
            });
            return self.read_extents(&found, f);
        }
        read_table!(self, CHUNKS, |t| {
            for idx in first..=last {
                if let Some(v) = t.get((ino, idx))? {
                    f(idx, v.value());
                }
            }
            Ok(())
        })
    }

    /// Reads the extents, those that follow one another on the storage with one call, and
    /// hands each chunk's bytes to `f` in order.
    fn read_extents(&self, found: &[(u64, Extent)], mut f: impl FnMut(u64, &[u8])) -> FsResult<()> {
        let s = extents::SECTOR;
        let mut buf = PlainBuf::default();
        let mut at = 0;
        while at < found.len() {
            let mut end = at + 1;
            while end < found.len() {
                let (prev, next) = (found[end - 1].1, found[end].1);
                if prev.len % s != 0 || prev.first + prev.sectors() != next.first {
                    break;
                }
                end += 1;
            }
            let run = &found[at..end];
            let sectors: u64 = run.iter().map(|(_, e)| e.sectors()).sum();
            buf.clear();
            buf.resize((sectors * s) as usize, 0);
            self.storage()
                .read_data_sectors(run[0].1.first, &mut buf)
                .map_err(extents::io_error_at(run[0].1.first))?;
            for (idx, e) in run {
                let o = ((e.first - run[0].1.first) * s) as usize;
                f(*idx, &buf[o..o + e.len as usize]);
            }
            at = end;
        }
        Ok(())
    }

    fn is_fresh(&self, e: Extent) -> bool {
        matches!(self, Txn::W { fresh, .. } if fresh.borrow().contains(&e.first))
    }

    fn mark_fresh(&self, e: Extent) {
        if let Txn::W { fresh, .. } = self {
            fresh.borrow_mut().insert(e.first);
        }
    }

    /// Gives up an extent the chunk table no longer names: free at once if fresh, else once
    /// this transaction is durably committed.
    fn give_up(&self, space: &Space<'_>, e: Extent) -> FsResult<()> {
        let was_fresh = matches!(self, Txn::W { fresh, .. } if fresh.borrow_mut().remove(&e.first));
        if was_fresh {
            space.free_now(e)
        } else {
            space.release(e)
        }
    }

    /// Under extents, reads what a write of bytes `lo..hi` into chunk `idx` needs of the
    /// chunk's old contents, before anything changes (so damage shows first). A fresh chunk
    /// ([`Txn::is_fresh`]) that can grow where it lies is patched in place: only its edge
    /// sectors are read. Otherwise the whole chunk is read, to be copied.
    pub fn prepare_patch(&self, ino: u64, idx: u64, lo: u64, hi: u64) -> FsResult<Patch> {
        let s = extents::SECTOR;
        let old = self.extent(ino, idx)?;
        if let Some(e) = old.filter(|e| self.is_fresh(*e)) {
            let new_len = e.len.max(hi);
            let (have, need) = (e.sectors(), new_len.div_ceil(s).max(1));
            let grows_in_place = need <= have
                || read_table!(self, FREE_RUNS, |t| t
                    .get(e.first + have)?
                    .map(|v| v.value()))
                .is_some_and(|n| n >= need - have);
            if grows_in_place {
                let (s0, s1) = (lo.min(e.len) / s, hi.div_ceil(s));
                let mut buf = PlainBuf::from(vec![0u8; ((s1 - s0) * s) as usize]);
                let keep_head = s0 * s < lo.min(e.len);
                let keep_tail = hi < (s1 * s).min(e.len);
                if keep_head {
                    self.read_sector(e.first + s0, &mut buf[..s as usize])?;
                }
                if keep_tail && !(keep_head && s1 - 1 == s0) {
                    let at = ((s1 - 1 - s0) * s) as usize;
                    self.read_sector(e.first + s1 - 1, &mut buf[at..])?;
                }
                return Ok(Patch::InPlace(InPlace {
                    old: e,
                    s0,
                    new_len,
                    buf,
                }));
            }
        }
        let base = old
            .map(|e| extents::read_extent(self.storage(), e))
            .transpose()?;
        Ok(Patch::Copy { base })
    }

    fn read_sector(&self, sector: u64, out: &mut [u8]) -> FsResult<()> {
        self.storage()
            .read_data_sectors(sector, out)
            .map_err(extents::io_error_at(sector))
    }

    /// Writes `src` at byte `lo` of the fresh chunk `idx` in place, as `patch` planned;
    /// returns the chunk's old length and its new one.
    pub fn patch_in_place(
        &self,
        ino: u64,
        idx: u64,
        patch: InPlace,
        lo: u64,
        src: &[u8],
    ) -> FsResult<(u64, u64)> {
        let s = extents::SECTOR;
        let InPlace {
            old,
            s0,
            new_len,
            mut buf,
        } = patch;
        let space = self.space()?;
        let (have, need) = (old.sectors(), new_len.div_ceil(s).max(1));
        if need > have {
            space.take_at(old.first + have, need - have)?;
        }
        let at = (lo - s0 * s) as usize;
        buf[at..at + src.len()].copy_from_slice(src);
        let end = (new_len - s0 * s) as usize;
        if end < buf.len() {
            buf[end..].fill(0);
        }
        self.storage()
            .write_data_sectors(old.first + s0, &buf)
            .map_err(extents::io_error_at(old.first + s0))?;
        let new = Extent {
            first: old.first,
            len: new_len,
        };
        self.touch(Key::Chunk(ino, idx));
        space
            .w
            .open_table(CHUNKS)?
            .insert((ino, idx), &new.encode()[..])?;
        Ok((old.len, new_len))
    }

    /// Under extents, the bytes `idx * chunk ..` of `len` bytes straight into one buffer, when
    /// the chunks from `idx` on hold them whole, in sectors that follow one another (a large
    /// read of a file written in order: one read, no copy). `None`: read chunk by chunk.
    pub fn read_contiguous(
        &self,
        ino: u64,
        idx: u64,
        len: u64,
        chunk: u64,
    ) -> FsResult<Option<PlainBuf>> {
        if !self.extents() || len == 0 {
            return Ok(None);
        }
        let last = idx + (len - 1) / chunk;
        let mut start = None;
        let mut next = 0;
        let ok = read_table!(self, CHUNKS, |t| {
            let mut ok = true;
            for i in idx..=last {
                let Some(v) = t.get((ino, i))? else {
                    ok = false;
                    break;
                };
                let e = Extent::decode(v.value())?;
                let need = if i == last {
                    len - (i - idx) * chunk
                } else {
                    chunk
                };
                let follows = start.is_none() || e.first == next;
                if e.len < need || !follows {
                    ok = false;
                    break;
                }
                start.get_or_insert(e.first);
                next = e.first + e.sectors();
            }
            ok
        });
        let Some(first) = start.filter(|_| ok) else {
            return Ok(None);
        };
        let mut buf = PlainBuf::from(vec![
            0u8;
            (len.div_ceil(extents::SECTOR) * extents::SECTOR)
                as usize
        ]);
        self.storage()
            .read_data_sectors(first, &mut buf)
            .map_err(extents::io_error_at(first))?;
        buf.truncate(len as usize);
        Ok(Some(buf))
    }

    /// Reads the records of the chunks with index in `first..=last` (a range scan), without
    /// their data: a probe before they are removed.
    pub fn probe_chunks(&self, ino: u64, first: u64, last: u64) -> FsResult<()> {
        read_table!(self, CHUNKS, |t| {
            for e in t.range((ino, first)..=(ino, last))? {
                e?;
            }
            Ok(())
        })
    }

    /// Stores a chunk; returns the length of the value it replaced, if any.
    pub fn put_chunk(&self, ino: u64, idx: u64, data: &[u8]) -> FsResult<Option<u64>> {
        if self.extents() {
            if data.is_empty() {
                // An empty chunk reads as the hole it leaves.
                let old = self.chunk_len_only(ino, idx)?;
                self.del_chunks(ino, idx, idx)?;
                return Ok(old);
            }
            return Ok(self.put_chunks(ino, idx, data, data.len() as u64)?[0]);
        }
        let w = self.w()?;
        self.touch(Key::Chunk(ino, idx));
        let mut t = w.open_table(CHUNKS)?;
        Ok(t.insert((ino, idx), data)?.map(|old| len64(old.value())))
    }

    /// Stores `data` as chunks `first..` of `chunk` bytes each (the last may be shorter);
    /// returns the length each replaced. Under extents, one run of sectors where there is room
    /// for all of them, written at once.
    pub fn put_chunks(
        &self,
        ino: u64,
        first: u64,
        data: &[u8],
        chunk: u64,
    ) -> FsResult<Vec<Option<u64>>> {
        if !self.extents() {
            return data
                .chunks(chunk as usize)
                .enumerate()
                .map(|(i, part)| self.put_chunk(ino, first + i as u64, part))
                .collect();
        }
        let space = self.space()?;
        let sectors = extents::sectors_for(data.len() as u64, chunk);
        let written = match space.take(sectors)? {
            Some(at) => extents::write_chunks(self.storage(), at, data, chunk)?,
            None => {
                // No single run holds them all (or more than a segment): one chunk at a time.
                let mut all = Vec::new();
                for part in data.chunks(chunk as usize) {
                    let n = extents::sectors_for(part.len() as u64, chunk);
                    let at = space.take(n)?.ok_or_else(|| {
                        FsError::Store("a chunk is larger than a data segment".into())
                    })?;
                    all.extend(extents::write_chunks(self.storage(), at, part, chunk)?);
                }
                all
            }
        };
        let mut t = space.w.open_table(CHUNKS)?;
        let mut replaced = Vec::with_capacity(written.len());
        for (i, e) in written.iter().enumerate() {
            let idx = first + i as u64;
            self.touch(Key::Chunk(ino, idx));
            let old = t.insert((ino, idx), &e.encode()[..])?;
            let old = old.map(|v| Extent::decode(v.value())).transpose()?;
            self.mark_fresh(*e);
            if let Some(old) = old {
                self.give_up(&space, old)?;
            }
            replaced.push(old.map(|o| o.len));
        }
        Ok(replaced)
    }

    /// Removes the chunks with index in `first..=last`; returns (count, bytes) removed.
    pub fn del_chunks(&self, ino: u64, first: u64, last: u64) -> FsResult<(u64, u64)> {
        let extents = self.extents();
        let space = if extents { Some(self.space()?) } else { None };
        let w = self.w()?;
        let mut t = w.open_table(CHUNKS)?;
        let (mut n, mut bytes) = (0, 0);
        for e in t.extract_from_if((ino, first)..=(ino, last), |_, _| true)? {
            let (k, v) = e?;
            self.touch(Key::Chunk(ino, k.value().1));
            n += 1;
            match &space {
                Some(space) => {
                    let e = Extent::decode(v.value())?;
                    bytes += e.len;
                    self.give_up(space, e)?;
                }
                None => bytes += len64(v.value()),
            }
        }
        Ok((n, bytes))
    }

    // --- xattrs ---

    pub fn xattr(&self, ino: u64, name: &[u8]) -> FsResult<Option<PlainBuf>> {
        read_table!(self, XATTRS, |t| Ok(t
            .get((ino, name))?
            .map(|v| PlainBuf::from(v.value().to_vec()))))
    }

    /// Whether no inode has any xattr (an O(1) look at the table's length).
    pub fn no_xattrs(&self) -> FsResult<bool> {
        read_table!(self, XATTRS, |t| Ok(t.len()? == 0))
    }

    /// Stores an xattr; returns the length of the value it replaced, if any.
    pub fn put_xattr(&self, ino: u64, name: &[u8], value: &[u8]) -> FsResult<Option<u64>> {
        let w = self.w()?;
        self.touch(Key::Xattr(ino, Self::name(name)));
        let mut t = w.open_table(XATTRS)?;
        Ok(t.insert((ino, name), value)?.map(|old| len64(old.value())))
    }

    /// Removes an xattr; returns the length of its value, if it existed.
    pub fn del_xattr(&self, ino: u64, name: &[u8]) -> FsResult<Option<u64>> {
        let w = self.w()?;
        self.touch(Key::Xattr(ino, Self::name(name)));
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
            self.touch(Key::Xattr(ino, Self::name(k.value().1)));
            bytes += len64(k.value().1) + len64(v.value());
        }
        Ok(bytes)
    }

    // --- symlinks ---

    pub fn symlink(&self, ino: u64) -> FsResult<Option<PlainBuf>> {
        read_table!(self, SYMLINKS, |t| Ok(t
            .get(ino)?
            .map(|v| PlainBuf::from(v.value().to_vec()))))
    }

    pub fn put_symlink(&self, ino: u64, target: &[u8]) -> FsResult<()> {
        self.w()?.open_table(SYMLINKS)?.insert(ino, target)?;
        self.touch(Key::Symlink(ino));
        Ok(())
    }

    pub fn del_symlink(&self, ino: u64) -> FsResult<()> {
        self.w()?.open_table(SYMLINKS)?.remove(ino)?;
        self.touch(Key::Symlink(ino));
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
        self.touch(Key::Orphan(ino));
        Ok(())
    }

    pub fn del_orphan(&self, ino: u64) -> FsResult<()> {
        self.w()?.open_table(ORPHANS)?.remove(ino)?;
        self.touch(Key::Orphan(ino));
        Ok(())
    }
}

/// The key of the superblock table under which the fsync log's epoch is kept (the superblock
/// itself is key 0).
const LOG_EPOCH_KEY: u64 = 1;

// The fsync log (`super::fsync_log`): what an append records and what a replay applies.
impl Txn {
    /// The fsync log's epoch: records of any other epoch are void. 1 until a commit retires a
    /// log for the first time.
    pub fn log_epoch(&self) -> FsResult<u64> {
        read_table!(self, SUPER, |t| match t.get(LOG_EPOCH_KEY)? {
            Some(v) => Ok(u64::from_le_bytes(v.value().try_into().map_err(|_| {
                FsError::Corrupt("the fsync log's epoch is not 8 bytes".into())
            })?)),
            None => Ok(1),
        })
    }

    /// Sets the epoch (in the transaction: it takes effect with its commit).
    pub fn put_log_epoch(&self, epoch: u64) -> FsResult<()> {
        self.w()?
            .open_table(SUPER)?
            .insert(LOG_EPOCH_KEY, &epoch.to_le_bytes()[..])?;
        Ok(())
    }

    /// Whether anything changed since the last append.
    pub fn has_unlogged_changes(&self) -> bool {
        matches!(self, Txn::W { dirty: Some(d), .. } if !d.borrow().is_empty())
    }

    /// An append to the fsync log begins: from now on the log may name every extent written so
    /// far, so none of them is fresh any more.
    pub fn log_started(&self) {
        if let Txn::W { fresh, .. } = self {
            fresh.borrow_mut().clear();
        }
    }

    /// Forgets the changed keys: they are in the log now (or committed).
    pub fn clear_logged(&self) {
        if let Txn::W {
            dirty: Some(dirty), ..
        } = self
        {
            dirty.borrow_mut().clear();
        }
    }

    /// The payload of a log record: the current value of every key changed since the last
    /// append, and the superblock `sb`. `None` if it would exceed `limit` bytes.
    pub fn log_payload(&self, sb: &Superblock, limit: usize) -> FsResult<Option<PlainBuf>> {
        let Txn::W {
            dirty: Some(dirty), ..
        } = self
        else {
            return Ok(None);
        };
        let mut out = PlainBuf::from(Vec::new());
        fsync_log::encode_entry(&mut out, &Key::Superblock, Some(&sb.encode()));
        for key in dirty.borrow().iter() {
            let value = self.current_value(key)?;
            fsync_log::encode_entry(&mut out, key, value.as_ref().map(|v| &v[..]));
            if out.len() > limit {
                return Ok(None);
            }
        }
        Ok(Some(out))
    }

    /// The value stored under `key` now, encoded as the log carries it.
    fn current_value(&self, key: &Key) -> FsResult<Option<PlainBuf>> {
        let bytes = |v: &[u8]| PlainBuf::from(v.to_vec());
        Ok(match key {
            Key::Inode(ino) => {
                read_table!(self, INODES, |t| t.get(*ino)?.map(|v| bytes(v.value())))
            }
            Key::Dirent(parent, name) => {
                read_table!(self, DIRENTS, |t| t.get((*parent, &name.0[..]))?.map(|v| {
                    let (ino, kind) = v.value();
                    let mut b = PlainBuf::from(ino.to_le_bytes().to_vec());
                    b.push(kind);
                    b
                }))
            }
            // Under extents: the record, then the chunk's bytes. The replay writes them again,
            // so a record never points at sectors whose data did not reach the disk before it.
            Key::Chunk(ino, idx) if self.extents() => {
                let record = read_table!(self, CHUNKS, |t| t
                    .get((*ino, *idx))?
                    .map(|v| bytes(v.value())));
                match record {
                    Some(mut r) => {
                        let data = extents::read_extent(self.storage(), Extent::decode(&r)?)?;
                        r.extend_from_slice(&data);
                        Some(r)
                    }
                    None => None,
                }
            }
            Key::Chunk(ino, idx) => self.chunk(*ino, *idx)?,
            Key::Xattr(ino, name) => self.xattr(*ino, &name.0)?,
            Key::Symlink(ino) => self.symlink(*ino)?,
            Key::Orphan(ino) => {
                read_table!(self, ORPHANS, |t| t.get(*ino)?.map(|_| bytes(&[])))
            }
            Key::Superblock => {
                read_table!(self, SUPER, |t| t.get(0)?.map(|v| bytes(v.value())))
            }
        })
    }

    /// Applies one entry of a log record: the key gets the value, or is removed.
    pub fn apply_log_entry(&self, (key, value): &Entry) -> FsResult<()> {
        if let Key::Chunk(ino, idx) = key
            && self.extents()
        {
            return self.replay_extent(*ino, *idx, value.as_ref().map(|v| &v[..]));
        }
        let w = self.w()?;
        let bad = || FsError::Corrupt("a directory entry in the fsync log is not 9 bytes".into());
        match (key, value.as_deref()) {
            (Key::Inode(ino), Some(v)) => drop(w.open_table(INODES)?.insert(*ino, &v[..])?),
            (Key::Inode(ino), None) => drop(w.open_table(INODES)?.remove(*ino)?),
            (Key::Dirent(parent, name), Some(v)) => {
                let ino = u64::from_le_bytes(v.get(..8).ok_or_else(bad)?.try_into().unwrap());
                let kind = *v.get(8).filter(|_| v.len() == 9).ok_or_else(bad)?;
                drop(
                    w.open_table(DIRENTS)?
                        .insert((*parent, &name.0[..]), (ino, kind))?,
                )
            }
            (Key::Dirent(parent, name), None) => {
                drop(w.open_table(DIRENTS)?.remove((*parent, &name.0[..]))?)
            }
            (Key::Chunk(ino, idx), Some(v)) => {
                drop(w.open_table(CHUNKS)?.insert((*ino, *idx), &v[..])?)
            }
            (Key::Chunk(ino, idx), None) => drop(w.open_table(CHUNKS)?.remove((*ino, *idx))?),
            (Key::Xattr(ino, name), Some(v)) => {
                drop(w.open_table(XATTRS)?.insert((*ino, &name.0[..]), &v[..])?)
            }
            (Key::Xattr(ino, name), None) => {
                drop(w.open_table(XATTRS)?.remove((*ino, &name.0[..]))?)
            }
            (Key::Symlink(ino), Some(v)) => drop(w.open_table(SYMLINKS)?.insert(*ino, &v[..])?),
            (Key::Symlink(ino), None) => drop(w.open_table(SYMLINKS)?.remove(*ino)?),
            (Key::Orphan(ino), Some(_)) => drop(w.open_table(ORPHANS)?.insert(*ino, ())?),
            (Key::Orphan(ino), None) => drop(w.open_table(ORPHANS)?.remove(*ino)?),
            (Key::Superblock, Some(v)) => drop(w.open_table(SUPER)?.insert(0, &v[..])?),
            (Key::Superblock, None) => drop(w.open_table(SUPER)?.remove(0)?),
        }
        Ok(())
    }
}

impl Txn {
    /// Replays a log entry that points chunk `idx` of `ino` at an extent (or removes it): the
    /// extent it replaces is freed, and the one it names is taken out of the free tables (the
    /// transaction that took it was lost).
    fn replay_extent(&self, ino: u64, idx: u64, value: Option<&[u8]>) -> FsResult<()> {
        let (record, data) = match value {
            Some(v) if v.len() >= extents::RECORD_LEN => {
                let (r, d) = v.split_at(extents::RECORD_LEN);
                (Some(r), d)
            }
            Some(_) => {
                return Err(FsError::Corrupt(
                    "an extent in the fsync log is shorter than its record".into(),
                ));
            }
            None => (None, &[][..]),
        };
        let new = record.map(Extent::decode).transpose()?;
        if let Some(e) = new
            && e.len != data.len() as u64
        {
            return Err(FsError::Corrupt(
                "an extent in the fsync log does not carry its bytes".into(),
            ));
        }
        let space = self.space()?;
        let mut t = space.w.open_table(CHUNKS)?;
        let old = match new {
            Some(e) => t.insert((ino, idx), &e.encode()[..])?,
            None => t.remove((ino, idx))?,
        };
        let old = old.map(|v| Extent::decode(v.value())).transpose()?;
        drop(t);
        if old == new {
            return Ok(());
        }
        if let Some(old) = old {
            space.release(old)?;
        }
        if let Some(new) = new {
            space.take_exact(new)?;
            extents::write_chunks(self.storage(), new.first, data, new.len.max(1))?;
        }
        Ok(())
    }

    /// Whether this transaction claimed a data segment since the last call: the claim must be
    /// durable before an fsync-log record names sectors in it.
    pub fn take_claimed(&self) -> bool {
        matches!(self, Txn::W { claimed, .. } if claimed.replace(false))
    }
}

impl Txn {
    /// The length of a chunk from its record alone.
    fn chunk_len_only(&self, ino: u64, idx: u64) -> FsResult<Option<u64>> {
        read_table!(self, CHUNKS, |t| match t.get((ino, idx))? {
            Some(v) => Ok(Some(self.value_len(v.value())?)),
            None => Ok(None),
        })
    }

    /// First sectors of the data segments the filesystem holds.
    pub fn data_segments(&self) -> FsResult<Vec<u64>> {
        read_table!(self, DATA_SEGMENTS, |t| Ok(t
            .iter()?
            .map(|e| e.map(|(k, _)| k.value()))
            .collect::<Result<Vec<u64>, _>>()?))
    }

    /// One step of packing file data down (schema 2): chunks from the highest on move into
    /// the lowest free run below them that holds them, until `max` sectors moved. Returns the
    /// sectors moved; 0 when no chunk can move down.
    pub fn pack_step(&self, max: u64) -> FsResult<u64> {
        let space = self.space()?;
        let mut chunks: Vec<(Extent, u64, u64)> = Vec::new();
        read_table!(self, CHUNKS, |t| {
            for e in t.iter()? {
                let (k, v) = e?;
                let (ino, idx) = k.value();
                chunks.push((Extent::decode(v.value())?, ino, idx));
            }
        });
        chunks.sort_unstable_by_key(|(e, ..)| std::cmp::Reverse(e.first));
        let mut free: Vec<(u64, u64)> = read_table!(self, FREE_RUNS, |t| t
            .iter()?
            .map(|e| e.map(|(k, v)| (k.value(), v.value())))
            .collect::<Result<Vec<_>, _>>()?);
        let mut moved = 0;
        for (old, ino, idx) in chunks.into_iter().filter(|(e, ..)| e.len > 0) {
            let n = old.sectors();
            let Some(run) = free
                .iter_mut()
                .find(|(first, count)| *count >= n && *first + n <= old.first)
            else {
                continue;
            };
            let to = run.0;
            space.take_at(to, n)?;
            run.0 += n;
            run.1 -= n;
            let bytes = extents::read_extent(self.storage(), old)?;
            let new = extents::write_chunks(self.storage(), to, &bytes, old.len.max(1))?[0];
            self.touch(Key::Chunk(ino, idx));
            space
                .w
                .open_table(CHUNKS)?
                .insert((ino, idx), &new.encode()[..])?;
            self.give_up(&space, old)?;
            moved += n;
            if moved >= max {
                break;
            }
        }
        Ok(moved)
    }

    /// The data segments that hold a chunk or a freed run (schema 2).
    pub fn segments_holding_data(&self, seg: u64) -> FsResult<Vec<u64>> {
        let (runs, _) = self.data_runs()?;
        let mut held: Vec<u64> = runs
            .iter()
            .filter(|r| r.2 != RunOwner::Free && seg > 0)
            .flat_map(|r| extents::segments_of(r.0, r.1, seg))
            .collect();
        held.dedup();
        Ok(held)
    }

    /// Forgets the data segments, from the last one down, that the storage no longer has (it
    /// refuses to read them: given back by a release); their sectors leave the free table.
    pub fn forget_segments_gone(&self, storage: &dyn Storage) -> FsResult<()> {
        let seg = storage.data_segment_sectors();
        let mut segments = self.data_segments()?;
        segments.sort_unstable();
        let mut gone = Vec::new();
        while let Some(s) = segments.pop() {
            match storage.read_data_sectors(s, &mut []) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => gone.push(s),
                _ => break,
            }
        }
        if gone.is_empty() {
            return Ok(());
        }
        let space = self.space()?;
        for s in gone {
            space.w.open_table(DATA_SEGMENTS)?.remove(s)?;
            extents::carve(&mut space.w.open_table(FREE_RUNS)?, s, seg)?;
        }
        Ok(())
    }
}

/// A write into part of a chunk under extents, planned by [`Txn::prepare_patch`].
pub(crate) enum Patch {
    /// Patch the fresh chunk where it lies ([`Txn::patch_in_place`]).
    InPlace(InPlace),
    /// Copy the chunk (`base`: its old bytes, if it exists) into new sectors, as any
    /// read-modify-write of a chunk does.
    Copy { base: Option<PlainBuf> },
}

/// Write sectors `s0..` of the fresh extent `old` from `buf` (which holds the old bytes of the
/// edge sectors), growing it into the free run after it if needed, to `new_len` bytes.
pub(crate) struct InPlace {
    old: Extent,
    s0: u64,
    new_len: u64,
    buf: PlainBuf,
}

/// Runs of data sectors as (first, sectors, owner), sorted, and the recorded segments' first
/// sectors.
pub(crate) type DataRuns = (Vec<(u64, u64, RunOwner)>, Vec<u64>);

/// Who holds a run of data sectors, for the check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum RunOwner {
    Chunk { ino: u64, idx: u64 },
    Free,
    Freed,
}

impl Txn {
    /// Every run of data sectors the tables account for, as (first, sectors, owner), and the
    /// first sectors of the recorded data segments (schema 2).
    pub fn data_runs(&self) -> FsResult<DataRuns> {
        let mut runs = Vec::new();
        read_table!(self, CHUNKS, |t| {
            for e in t.iter()? {
                let (k, v) = e?;
                let (ino, idx) = k.value();
                let x = Extent::decode(v.value())?;
                runs.push((x.first, x.sectors(), RunOwner::Chunk { ino, idx }));
            }
        });
        for (table, owner) in [(FREE_RUNS, RunOwner::Free), (FREED_RUNS, RunOwner::Freed)] {
            read_table!(self, table, |t| {
                for e in t.iter()? {
                    let (k, v) = e?;
                    runs.push((k.value(), v.value(), owner));
                }
            });
        }
        runs.sort_unstable();
        Ok((runs, self.data_segments()?))
    }
}

// Reads for the consistency check (`super::check`). Each calls `f` for every record in key order
// until `f` returns false; none of them changes anything.
impl Txn {
    /// The length of chunk `idx` of `ino`, if it is stored (its value is read).
    pub fn chunk_len(&self, ino: u64, idx: u64) -> FsResult<Option<u64>> {
        // Under extents the data sectors are read too: the check reports damage there.
        Ok(self.chunk(ino, idx)?.map(|v| len64(&v)))
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
                if !f(ino, idx, self.value_len(v.value())?) {
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
