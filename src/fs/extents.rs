//! File data outside redb (schema version 2, docs/fs-schema.md "Data sectors").
//!
//! A chunk's bytes live in data sectors of the storage ([`Storage::write_data_sectors`]); redb
//! keeps only its extent: the first sector and the length, 12 bytes in the chunk table. Copying
//! file data into redb's pages, checksumming them and caching them cost more than the
//! encryption itself (docs/benchmarks.md); here a 1 MiB write is one sealed run in file order.
//!
//! Every change is copy-on-write: a chunk is rewritten into sectors nobody uses, and the sectors
//! it had go to the *freed* table, which becomes free only in the next transaction, after the
//! commit that stopped using them is durable. So the last durable commit never points into
//! sectors that a later write overwrote, whatever the crash. The fsync log records extents, not
//! the free tables: its replay ([`Txn::replay_extent`]) frees what an entry replaces and takes
//! what it points to out of the free tables, which brings them back in line.
//!
//! Room comes from the storage in data segments ([`Storage::claim_data_segment`]), recorded in
//! their own table with their free runs, in the transaction that first takes from them.

use std::sync::Arc;

use redb::{ReadableTable, ReadableTableMetadata, WriteTransaction};

use super::Storage;
use super::error::{FsError, FsResult};
use super::schema::{DATA_SEGMENTS, FREE_RUNS, FREED_RUNS};
use crate::secrets::PlainBuf;

/// Plaintext bytes per data sector.
pub(crate) const SECTOR: u64 = 4096;

/// Free runs looked at, from the hint on, before a new segment is claimed: the free table is
/// searched first-fit, but not at any cost.
const SEARCH_RUNS: usize = 64;

/// Where a chunk's bytes are: `len` bytes from the start of sector `first` on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Extent {
    pub first: u64,
    pub len: u64,
}

/// Bytes of an extent record in the chunk table.
pub(crate) const RECORD_LEN: usize = 12;

impl Extent {
    /// Sectors the extent takes (a chunk of 0 bytes still has one, so every record points at
    /// something).
    pub fn sectors(&self) -> u64 {
        self.len.div_ceil(SECTOR).max(1)
    }

    pub fn encode(&self) -> [u8; RECORD_LEN] {
        let mut b = [0u8; RECORD_LEN];
        b[..8].copy_from_slice(&self.first.to_le_bytes());
        b[8..].copy_from_slice(&(self.len as u32).to_le_bytes());
        b
    }

    pub fn decode(v: &[u8]) -> FsResult<Self> {
        if v.len() != RECORD_LEN {
            return Err(FsError::Corrupt(format!(
                "a chunk's extent record is {} bytes, not {RECORD_LEN}",
                v.len()
            )));
        }
        Ok(Extent {
            first: u64::from_le_bytes(v[..8].try_into().expect("8 bytes")),
            len: u64::from(u32::from_le_bytes(v[8..].try_into().expect("4 bytes"))),
        })
    }
}

/// A storage error as the filesystem's: ENOSPC (no room for another data segment in a
/// fixed-size vault) is "vault full", which [`super::Fs::run`] turns into dropping the operation's
/// transaction, as when redb's store cannot grow; anything else is a store failure.
pub(crate) fn io_error(e: std::io::Error) -> FsError {
    if e.raw_os_error() == Some(libc::ENOSPC) {
        return FsError::NoSpace;
    }
    FsError::Store(format!("data sectors: {e}"))
}

/// [`io_error`] for an access to the data sectors from `first` on, which it names.
pub(crate) fn io_error_at(first: u64) -> impl Fn(std::io::Error) -> FsError {
    move |e| match io_error(e) {
        FsError::Store(m) => FsError::Store(format!("{m} (sectors from {first})")),
        other => other,
    }
}

/// Reads the extent's bytes (its length, the rest of its last sector dropped).
pub(crate) fn read_extent(storage: &Arc<dyn Storage>, e: Extent) -> FsResult<PlainBuf> {
    let mut buf = PlainBuf::from(vec![0u8; (e.sectors() * SECTOR) as usize]);
    storage
        .read_data_sectors(e.first, &mut buf)
        .map_err(io_error_at(e.first))?;
    buf.truncate(e.len as usize);
    Ok(buf)
}

/// Writes `bytes` into sectors `first..` as consecutive chunks of `chunk` bytes (the last one
/// may be shorter), each from a sector boundary, with one call to the storage; returns their
/// extents.
pub(crate) fn write_chunks(
    storage: &Arc<dyn Storage>,
    first: u64,
    bytes: &[u8],
    chunk: u64,
) -> FsResult<Vec<Extent>> {
    let mut extents = Vec::new();
    let mut at = first;
    for part in bytes.chunks(chunk as usize) {
        let e = Extent {
            first: at,
            len: part.len() as u64,
        };
        at += e.sectors();
        extents.push(e);
    }
    if !bytes.is_empty()
        && (bytes.len() as u64).is_multiple_of(SECTOR)
        && chunk.is_multiple_of(SECTOR)
    {
        // The common case, a large write: the caller's bytes are the sectors already.
        storage
            .write_data_sectors(first, bytes)
            .map_err(io_error_at(first))?;
    } else {
        let mut buf = PlainBuf::from(vec![0u8; ((at - first) * SECTOR) as usize]);
        for (part, e) in bytes.chunks(chunk as usize).zip(&extents) {
            let o = ((e.first - first) * SECTOR) as usize;
            buf[o..o + part.len()].copy_from_slice(part);
        }
        storage
            .write_data_sectors(first, &buf)
            .map_err(io_error_at(first))?;
    }
    Ok(extents)
}

/// Sectors `write_chunks` takes for `len` bytes in chunks of `chunk` bytes.
pub(crate) fn sectors_for(len: u64, chunk: u64) -> u64 {
    let whole = len / chunk;
    let rest = len % chunk;
    whole * chunk.div_ceil(SECTOR) + if rest > 0 { rest.div_ceil(SECTOR) } else { 0 }
}

/// The free-space tables of one write transaction.
pub(crate) struct Space<'t> {
    pub w: &'t WriteTransaction,
    pub storage: &'t Arc<dyn Storage>,
    pub hint: &'t std::sync::atomic::AtomicU64,
    /// Set when a data segment is claimed.
    pub claimed: &'t std::cell::Cell<bool>,
}

impl Space<'_> {
    /// Takes `n` consecutive free sectors (claiming a segment if no free run is long enough);
    /// `None` if `n` is more than a segment holds.
    pub fn take(&self, n: u64) -> FsResult<Option<u64>> {
        use std::sync::atomic::Ordering;
        let seg = self.storage.data_segment_sectors();
        if n == 0 || n > seg {
            return Ok(None);
        }
        let hint = self.hint.load(Ordering::Relaxed);
        let found = match self.first_fit(hint.., n)? {
            Some(run) => Some(run),
            None => self.first_fit(..hint, n)?,
        };
        let (start, count) = match found {
            Some(run) => run,
            None => {
                let s = self.storage.claim_data_segment().map_err(io_error)?;
                self.claimed.set(true);
                self.w.open_table(DATA_SEGMENTS)?.insert(s, ())?;
                (s, seg)
            }
        };
        let mut free = self.w.open_table(FREE_RUNS)?;
        free.remove(start)?;
        if count > n {
            free.insert(start + n, count - n)?;
        }
        self.hint.store(start + n, Ordering::Relaxed);
        Ok(Some(start))
    }

    fn first_fit(
        &self,
        range: impl std::ops::RangeBounds<u64>,
        n: u64,
    ) -> FsResult<Option<(u64, u64)>> {
        let free = self.w.open_table(FREE_RUNS)?;
        for e in free.range(range)?.take(SEARCH_RUNS) {
            let (k, v) = e?;
            if v.value() >= n {
                return Ok(Some((k.value(), v.value())));
            }
        }
        Ok(None)
    }

    /// Sectors the open transaction stopped using: free once it is durably committed.
    pub fn release(&self, e: Extent) -> FsResult<()> {
        self.w
            .open_table(FREED_RUNS)?
            .insert(e.first, e.sectors())?;
        Ok(())
    }

    /// Sectors that no durable state ever named (written by this transaction, not logged):
    /// free at once.
    pub fn free_now(&self, e: Extent) -> FsResult<()> {
        self.add_free(e.first, e.sectors())
    }

    /// Takes `n` sectors from `first` on, which must start a free run (checked by the caller
    /// in the same operation).
    pub fn take_at(&self, first: u64, n: u64) -> FsResult<()> {
        let mut free = self.w.open_table(FREE_RUNS)?;
        let count = free.remove(first)?.map(|v| v.value());
        match count {
            Some(c) if c >= n => {
                if c > n {
                    free.insert(first + n, c - n)?;
                }
                Ok(())
            }
            _ => Err(FsError::Corrupt(format!(
                "data sectors from {first} are not free as planned"
            ))),
        }
    }

    /// At the start of a transaction: what the last one freed is free now (its commit is
    /// durable). Merges each run with free neighbours.
    pub fn settle_freed(&self) -> FsResult<bool> {
        let runs: Vec<(u64, u64)> = {
            let freed = self.w.open_table(FREED_RUNS)?;
            if freed.is_empty()? {
                return Ok(false);
            }
            freed
                .iter()?
                .map(|e| e.map(|(k, v)| (k.value(), v.value())))
                .collect::<Result<_, _>>()?
        };
        self.w.delete_table(FREED_RUNS)?;
        self.w.open_table(FREED_RUNS)?;
        for (start, count) in runs {
            self.add_free(start, count)?;
        }
        Ok(true)
    }

    /// Adds a run to the free table, merged with the runs it touches.
    fn add_free(&self, mut start: u64, mut count: u64) -> FsResult<()> {
        let mut free = self.w.open_table(FREE_RUNS)?;
        let before = free
            .range(..start)?
            .next_back()
            .transpose()?
            .map(|(k, v)| (k.value(), v.value()));
        if let Some((s, c)) = before
            && s + c == start
        {
            free.remove(s)?;
            start = s;
            count += c;
        }
        let after = free.get(start + count)?.map(|v| v.value());
        if let Some(c) = after {
            free.remove(start + count)?;
            count += c;
        }
        free.insert(start, count)?;
        Ok(())
    }

    /// Replaying an fsync-log entry that points a chunk at `e`: its sectors come out of the
    /// free tables (the transaction that took them was lost with the crash), and a segment
    /// claimed then is recorded now.
    pub fn take_exact(&self, e: Extent) -> FsResult<()> {
        let seg = self.storage.data_segment_sectors();
        if seg == 0 {
            return Err(FsError::Corrupt(
                "the fsync log names data sectors, but the storage has none".into(),
            ));
        }
        for segment in segments_of(e.first, e.sectors(), seg) {
            let known = self.w.open_table(DATA_SEGMENTS)?.get(segment)?.is_some();
            if !known {
                self.w.open_table(DATA_SEGMENTS)?.insert(segment, ())?;
                self.add_free(segment, seg)?;
            }
        }
        for table in [FREE_RUNS, FREED_RUNS] {
            carve(&mut self.w.open_table(table)?, e.first, e.sectors())?;
        }
        Ok(())
    }
}

/// Removes sectors `first..first + n` from the runs of `t`, keeping what is left of a run.
pub(crate) fn carve(t: &mut redb::Table<u64, u64>, first: u64, n: u64) -> FsResult<()> {
    let end = first + n;
    let overlapping: Vec<(u64, u64)> = {
        let before = t
            .range(..first)?
            .next_back()
            .transpose()?
            .map(|(k, v)| (k.value(), v.value()));
        let mut runs: Vec<(u64, u64)> = before.into_iter().collect();
        for e in t.range(first..end)? {
            let (k, v) = e?;
            runs.push((k.value(), v.value()));
        }
        runs.into_iter()
            .filter(|&(s, c)| s < end && s + c > first)
            .collect()
    };
    for (s, c) in overlapping {
        t.remove(s)?;
        if s < first {
            t.insert(s, first - s)?;
        }
        if s + c > end {
            t.insert(end, s + c - end)?;
        }
    }
    Ok(())
}

/// The first sectors of the segments of `seg` (> 0) sectors that sectors `first..first + n`
/// touch (a run may cross segments: free runs of neighbouring segments merge).
pub(crate) fn segments_of(first: u64, n: u64, seg: u64) -> impl Iterator<Item = u64> {
    let last = first + n.max(1) - 1;
    (first - first % seg..=last - last % seg).step_by(seg as usize)
}

/// Whether the storage keeps file data in data sectors.
pub(crate) fn supported(storage: &dyn Storage) -> bool {
    storage.data_segment_sectors() > 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_count_sectors() {
        let e = Extent {
            first: 5000,
            len: 65_536,
        };
        assert_eq!(Extent::decode(&e.encode()).unwrap(), e);
        assert_eq!(e.sectors(), 16);
        assert_eq!(Extent { first: 1, len: 1 }.sectors(), 1);
        assert_eq!(Extent { first: 1, len: 0 }.sectors(), 1);
        assert_eq!(
            Extent {
                first: 1,
                len: 4097
            }
            .sectors(),
            2
        );
        assert!(Extent::decode(&[0; 11]).is_err());
    }
}
