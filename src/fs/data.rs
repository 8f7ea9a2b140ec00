//! File data: open handles, read, write, truncate, fallocate.
//!
//! A file's bytes live in chunks of CHUNK_SIZE bytes, key (ino, index). A missing chunk is a
//! hole; a chunk shorter than CHUNK_SIZE reads as zeros past its end. No chunk extends past the
//! file size: truncation trims the last one, so a later extension reads zeros.

use crate::secrets::PlainBuf;

use super::falloc::{KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE};
use super::node::get;
use super::schema::{Attr, CHUNK_PAGE, FileKind, MAX_FILE_SIZE, Timespec};
use super::store::{Patch, Txn};
use super::{Dropper, Fs, FsError, FsResult, Mode};

fn usize_of(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// The whole chunks of chunks `first..=last` whose first and last may be only partly covered:
/// `None` when there is none.
fn whole_chunks(first: u64, last: u64, partial: impl Fn(u64) -> bool) -> Option<(u64, u64)> {
    let lo = first + u64::from(partial(first));
    let hi = if partial(last) {
        last.checked_sub(1)?
    } else {
        last
    };
    (lo <= hi).then_some((lo, hi))
}

fn regular(a: &Attr) -> FsResult<()> {
    match a.kind {
        FileKind::File => Ok(()),
        FileKind::Dir => Err(FsError::IsDir),
        _ => Err(FsError::Invalid),
    }
}

impl Fs {
    /// Records an open handle on `ino` (an unlinked file lives until its last handle closes).
    pub fn open_file(&mut self, ino: u64) -> FsResult<u64> {
        self.run(Mode::Read, |_, tx| get(tx, ino).map(|_| ()))?;
        *self.open_files.entry(ino).or_insert(0) += 1;
        Ok(self.next_fh())
    }

    /// Records that a handle from [`Fs::open_file`] (or [`Fs::create_file`]'s) was closed; frees the inode
    /// if it was the last handle on an unlinked file.
    pub fn release_file(&mut self, ino: u64) -> FsResult<()> {
        match self.open_files.get_mut(&ino) {
            Some(n) if *n > 1 => {
                *n -= 1;
                return Ok(());
            }
            Some(_) => {
                self.open_files.remove(&ino);
            }
            None => return Ok(()),
        }
        if self.read_only || self.damaged {
            return Ok(());
        }
        let orphan = self.run(Mode::Read, |_, tx| {
            Ok(tx.attr(ino)?.is_some_and(|a| a.nlink == 0))
        })?;
        if orphan {
            self.run(Mode::Write, |fs, tx| {
                fs.probe_purge(tx, ino)?;
                fs.purge(tx, ino)
            })?;
        }
        Ok(())
    }

    /// Number of open handles on `ino`.
    pub fn open_count(&self, ino: u64) -> u32 {
        self.open_files.get(&ino).copied().unwrap_or(0)
    }

    /// Creates and opens a regular file; returns its attributes and a handle.
    pub fn create_file(
        &mut self,
        parent: u64,
        name: &[u8],
        mode: u32,
        caller: super::Caller,
    ) -> FsResult<(Attr, u64)> {
        let a = self.mknod(parent, name, (mode & 0o7777) | libc::S_IFREG, 0, caller)?;
        *self.open_files.entry(a.ino).or_insert(0) += 1;
        Ok((a, self.next_fh()))
    }

    /// Reads up to `size` bytes at `offset` (short only at end of file).
    pub fn read(&mut self, ino: u64, offset: u64, size: u32) -> FsResult<PlainBuf> {
        let c = self.chunk();
        self.run(Mode::Read, |_, tx| {
            let a = get(tx, ino)?;
            regular(&a)?;
            if offset >= a.size || size == 0 {
                return Ok(PlainBuf::default());
            }
            let end = a.size.min(offset.saturating_add(u64::from(size)));
            let len = usize_of(end - offset);
            if offset.is_multiple_of(c)
                && let Some(buf) = tx.read_contiguous(ino, offset / c, end - offset, c)?
            {
                return Ok(buf);
            }
            // Filled in order, holes and short chunks padded with zeros: no byte is written
            // twice.
            let mut buf = PlainBuf::from(Vec::with_capacity(len));
            tx.chunks_each(ino, offset / c, (end - 1) / c, |idx, data| {
                let cs = idx * c;
                let lo = offset.max(cs);
                let hi = end.min(cs + data.len() as u64);
                if lo < hi {
                    buf.resize(usize_of(lo - offset), 0);
                    buf.extend_from_slice(&data[usize_of(lo - cs)..usize_of(hi - cs)]);
                }
            })?;
            buf.resize(len, 0);
            Ok(buf)
        })
    }

    /// Writes `data` at `offset`; returns the bytes written (all of them).
    pub fn write(&mut self, ino: u64, offset: u64, data: &[u8]) -> FsResult<usize> {
        self.write_by(ino, offset, data, None)
    }

    /// [`Fs::write`], also taking from the file what a write by `dropper` takes, if given
    /// ([`Dropper`]).
    pub fn write_by(
        &mut self,
        ino: u64,
        offset: u64,
        data: &[u8],
        dropper: Option<Dropper>,
    ) -> FsResult<usize> {
        let c = self.chunk();
        if data.is_empty() {
            return Ok(0);
        }
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|e| *e <= MAX_FILE_SIZE)
            .ok_or(FsError::TooBig)?;
        let (first, last) = (offset / c, (end - 1) / c);
        self.ensure_space((last - first + 1) * CHUNK_PAGE)?;
        if self.sb.extents() {
            return self
                .write_extents(ino, offset, data, dropper)
                .and_then(|n| self.commit_if_large().map(|()| n));
        }
        self.run(Mode::Write, |fs, tx| {
            let mut a = get(tx, ino)?;
            regular(&a)?;
            // Probe: the edge chunks are read for read-modify-write, the others touched.
            let partial = |idx: u64| offset > idx * c || end < (idx + 1) * c;
            let head = if partial(first) {
                tx.chunk(ino, first)?
            } else {
                None
            };
            let tail = if last != first && partial(last) {
                tx.chunk(ino, last)?
            } else {
                None
            };
            for idx in first..=last {
                if !partial(idx) {
                    tx.probe_chunk(ino, idx)?;
                }
            }
            // Whole chunks in one call (under extents: one run of sectors, one write); the
            // edges read-modify-write.
            if let Some((inner_first, il)) = whole_chunks(first, last, partial) {
                let bytes =
                    &data[usize_of(inner_first * c - offset)..usize_of((il + 1) * c - offset)];
                for old in tx.put_chunks(ino, inner_first, bytes, c)? {
                    fs.account_chunk(&mut a, old, Some(c));
                }
            }
            if partial(first) {
                fs.write_chunk(
                    tx,
                    &mut a,
                    first,
                    offset,
                    data,
                    head.as_ref().map(|v| &v[..]),
                )?;
            }
            if last != first && partial(last) {
                fs.write_chunk(
                    tx,
                    &mut a,
                    last,
                    offset,
                    data,
                    tail.as_ref().map(|v| &v[..]),
                )?;
            }
            fs.pending_bytes += (last - first + 1) * CHUNK_PAGE;
            fs.finish_write(tx, &mut a, dropper, end, data.len())
        })
        .and_then(|n| self.commit_if_large().map(|()| n))
    }

    /// [`Fs::write_by`] under extents: the edge chunks are planned first (reading what they
    /// need, so damage shows before anything changes), patched (fresh ones in place first, so
    /// nothing takes the free sectors they grow into), then the whole chunks go in one run.
    fn write_extents(
        &mut self,
        ino: u64,
        offset: u64,
        data: &[u8],
        dropper: Option<Dropper>,
    ) -> FsResult<usize> {
        let c = self.chunk();
        let end = offset + data.len() as u64;
        let (first, last) = (offset / c, (end - 1) / c);
        self.run(Mode::Write, |fs, tx| {
            let mut a = get(tx, ino)?;
            regular(&a)?;
            let span = |idx: u64| {
                (
                    offset.max(idx * c) - idx * c,
                    end.min((idx + 1) * c) - idx * c,
                )
            };
            let partial = |idx: u64| span(idx) != (0, c);
            let mut edges = Vec::new();
            for idx in [first, last] {
                if partial(idx) && edges.iter().all(|(i, _)| *i != idx) {
                    let (lo, hi) = span(idx);
                    edges.push((idx, tx.prepare_patch(ino, idx, lo, hi)?));
                }
            }
            let inner = whole_chunks(first, last, partial);
            if let Some((inner_first, il)) = inner {
                for idx in inner_first..=il {
                    tx.probe_chunk(ino, idx)?;
                }
            }
            edges.sort_by_key(|(_, p)| !matches!(p, Patch::InPlace(_)));
            for (idx, patch) in edges {
                match patch {
                    Patch::InPlace(p) => {
                        let (lo, hi) = span(idx);
                        let src =
                            &data[usize_of(idx * c + lo - offset)..usize_of(idx * c + hi - offset)];
                        let (old, new) = tx.patch_in_place(ino, idx, p, lo, src)?;
                        fs.account_chunk(&mut a, Some(old), Some(new));
                    }
                    Patch::Copy { base } => {
                        let base = base.as_ref().map(|v| &v[..]);
                        fs.write_chunk(tx, &mut a, idx, offset, data, base)?;
                    }
                }
            }
            if let Some((inner_first, il)) = inner {
                let bytes =
                    &data[usize_of(inner_first * c - offset)..usize_of((il + 1) * c - offset)];
                for old in tx.put_chunks(ino, inner_first, bytes, c)? {
                    fs.account_chunk(&mut a, old, Some(c));
                }
            }
            fs.pending_bytes += 4 * 4096;
            fs.finish_write(tx, &mut a, dropper, end, data.len())
        })
    }

    /// The end of a write of `len` bytes ending at `end`: what the writer takes from the file
    /// ([`Dropper`]), the new size and times, and the counters.
    fn finish_write(
        &mut self,
        tx: &Txn,
        a: &mut Attr,
        dropper: Option<Dropper>,
        end: u64,
        len: usize,
    ) -> FsResult<usize> {
        if let Some(by) = dropper {
            self.drop_privileges(tx, a, by, false)?;
        }
        let now = Timespec::now();
        a.size = a.size.max(end);
        a.mtime = now;
        a.ctime = now;
        tx.put_attr(a)?;
        self.written_since_commit += len as u64;
        Ok(len)
    }

    /// Writes the part of `data` (which starts at file offset `offset`) that falls in chunk
    /// `idx`, over the chunk's old contents `base`.
    fn write_chunk(
        &mut self,
        tx: &Txn,
        a: &mut Attr,
        idx: u64,
        offset: u64,
        data: &[u8],
        base: Option<&[u8]>,
    ) -> FsResult<()> {
        let c = self.chunk();
        let cs = idx * c;
        let lo = offset.max(cs) - cs;
        let hi = (offset + data.len() as u64).min(cs + c) - cs;
        let src = &data[usize_of(cs + lo - offset)..usize_of(cs + hi - offset)];
        let old = if lo == 0 && hi == c {
            tx.put_chunk(a.ino, idx, src)?
        } else {
            let base = base.unwrap_or(&[]);
            let mut buf = PlainBuf::from(vec![0u8; base.len().max(usize_of(hi))]);
            buf[..base.len()].copy_from_slice(base);
            buf[usize_of(lo)..usize_of(hi)].copy_from_slice(src);
            tx.put_chunk(a.ino, idx, &buf)?
        };
        let new_len = if lo == 0 && hi == c {
            c
        } else {
            base.map_or(0, |b| b.len() as u64).max(hi)
        };
        self.account_chunk(a, old, Some(new_len));
        Ok(())
    }

    /// Updates the stored-bytes counters after a chunk went from `old` to `new` bytes.
    fn account_chunk(&mut self, a: &mut Attr, old: Option<u64>, new: Option<u64>) {
        let (o, n) = (old.unwrap_or(0), new.unwrap_or(0));
        a.stored = (a.stored + n).saturating_sub(o);
        self.sb.chunk_bytes = (self.sb.chunk_bytes + n).saturating_sub(o);
        match (old.is_some(), new.is_some()) {
            (false, true) => self.sb.chunks += 1,
            (true, false) => self.sb.chunks = self.sb.chunks.saturating_sub(1),
            _ => {}
        }
    }

    /// Sets the size of a regular file: shrinking removes chunks past the end and trims the
    /// last one (so a later extension reads zeros); growing leaves a hole. Probes first.
    pub(crate) fn truncate(&mut self, tx: &Txn, a: &mut Attr, size: u64) -> FsResult<()> {
        let c = self.chunk();
        if size < a.size {
            let keep = size.div_ceil(c);
            let tail = size % c;
            let last = if tail != 0 {
                tx.chunk(a.ino, size / c)?
            } else {
                None
            };
            tx.probe_chunks(a.ino, keep, u64::MAX)?;
            let (n, bytes) = tx.del_chunks(a.ino, keep, u64::MAX)?;
            a.stored = a.stored.saturating_sub(bytes);
            self.sb.chunks = self.sb.chunks.saturating_sub(n);
            self.sb.chunk_bytes = self.sb.chunk_bytes.saturating_sub(bytes);
            if let Some(data) = last.filter(|d| d.len() as u64 > tail) {
                let old = tx.put_chunk(a.ino, size / c, &data[..usize_of(tail)])?;
                self.account_chunk(a, old, Some(tail));
            }
            self.pending_bytes += 4 * 4096;
        }
        a.size = size;
        Ok(())
    }

    /// fallocate(2): mode 0 and KEEP_SIZE check space and (mode 0) extend the size — blocks are
    /// not reserved, holes stay holes; PUNCH_HOLE (with KEEP_SIZE) and ZERO_RANGE zero the
    /// range.
    pub fn fallocate(&mut self, ino: u64, offset: u64, len: u64, mode: i32) -> FsResult<()> {
        if len == 0 {
            return Err(FsError::Invalid);
        }
        let end = offset
            .checked_add(len)
            .filter(|e| *e <= MAX_FILE_SIZE)
            .ok_or(FsError::TooBig)?;
        let keep = mode & KEEP_SIZE != 0;
        match mode & !KEEP_SIZE {
            0 => self.ensure_space(len)?,
            PUNCH_HOLE if keep => {}
            ZERO_RANGE => {}
            _ => return Err(FsError::NotSupported),
        }
        self.run(Mode::Write, |fs, tx| {
            let mut a = get(tx, ino)?;
            regular(&a)?;
            let now = Timespec::now();
            if mode & (PUNCH_HOLE | ZERO_RANGE) != 0 {
                fs.punch(tx, &mut a, offset, end)?;
                a.mtime = now;
            }
            if !keep && end > a.size {
                a.size = end;
                a.mtime = now;
            }
            a.ctime = now;
            tx.put_attr(&a)?;
            Ok(())
        })
    }

    /// Zeroes bytes `lo..hi` (clipped to the file): whole chunks are removed, edge chunks
    /// rewritten. Probes first.
    fn punch(&mut self, tx: &Txn, a: &mut Attr, lo: u64, hi: u64) -> FsResult<()> {
        let c = self.chunk();
        let hi = hi.min(a.size);
        if lo >= hi {
            return Ok(());
        }
        let (first, last) = (lo / c, (hi - 1) / c);
        let span = |idx: u64| (lo.max(idx * c) - idx * c, hi.min((idx + 1) * c) - idx * c);
        let partial = |idx: u64| span(idx) != (0, c);
        let mut edges = Vec::new();
        if partial(first) {
            edges.push((first, tx.chunk(a.ino, first)?));
        }
        if last != first && partial(last) {
            edges.push((last, tx.chunk(a.ino, last)?));
        }
        tx.probe_chunks(a.ino, first, last)?;
        if let Some((whole_first, wl)) = whole_chunks(first, last, partial) {
            let (n, bytes) = tx.del_chunks(a.ino, whole_first, wl)?;
            a.stored = a.stored.saturating_sub(bytes);
            self.sb.chunks = self.sb.chunks.saturating_sub(n);
            self.sb.chunk_bytes = self.sb.chunk_bytes.saturating_sub(bytes);
        }
        for (idx, data) in edges {
            let Some(mut data) = data else { continue };
            let (l, h) = span(idx);
            let (l, h, old_len) = (usize_of(l), usize_of(h), data.len() as u64);
            if l >= data.len() {
                continue;
            }
            if h >= data.len() {
                data.truncate(l);
            } else {
                data[l..h].fill(0);
            }
            if data.is_empty() {
                tx.del_chunks(a.ino, idx, idx)?;
                self.account_chunk(a, Some(old_len), None);
            } else {
                let old = tx.put_chunk(a.ino, idx, &data)?;
                self.account_chunk(a, old, Some(data.len() as u64));
            }
        }
        self.pending_bytes += 4 * 4096;
        Ok(())
    }
}
