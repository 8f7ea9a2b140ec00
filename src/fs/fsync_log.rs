//! The fsync log (FORMAT.md §4.9): what makes an `fsync` durable without a commit.
//!
//! A durable redb commit costs two `fdatasync`s and a rewrite of every b-tree page on the path to
//! each change. An fsync instead appends the current value of every record the open transaction
//! changed since the last append to a log of store pages, and syncs once. The next commit writes
//! a new log epoch into the superblock table, in the same transaction as the changes, which
//! retires every record of the old epoch at once. Opening the store after a crash replays the
//! records of the current epoch, in order, on top of the last commit.
//!
//! A record is a run of whole pages; each page says which epoch, record and place in the record
//! it belongs to, so a page left over from an older epoch or from another record never passes for
//! part of this one. The sector store authenticates every page, so a page torn by a crash fails
//! to read and ends the replay there: that record's fsync never returned.

use std::collections::BTreeSet;
use std::io;

use zeroize::Zeroize;

use crate::secrets::PlainBuf;

use super::Storage;
use super::error::{FsError, FsResult};

const PAGE: usize = 4096;
const PAGE_HEADER: usize = 40;
/// Payload bytes one log page carries.
pub(crate) const PAYLOAD_PER_PAGE: usize = PAGE - PAGE_HEADER;

// Page header fields (little-endian).
const P_EPOCH: usize = 0; // u64, never 0 (a page never written reads as zeros)
const P_SEQ: usize = 8; // u64: the record's number within the epoch, from 0
const P_RECORD_ID: usize = 16; // u64: random, the same on every page of one record
const P_INDEX: usize = 24; // u32: this page's place in the record
const P_COUNT: usize = 28; // u32: pages in the record
const P_LEN: usize = 32; // u32: payload bytes on this page
const P_RESERVED: usize = 36; // u32, zero

/// A name (of a directory entry or an extended attribute) in a log key; wiped on drop.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Name(pub Vec<u8>);

impl Drop for Name {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// A record of the filesystem's tables that the open transaction changed.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Key {
    Inode(u64),
    Dirent(u64, Name),
    Chunk(u64, u64),
    Xattr(u64, Name),
    Symlink(u64),
    Orphan(u64),
    /// The superblock (key 0 of its table).
    Superblock,
}

impl Key {
    fn table_tag(&self) -> u8 {
        match self {
            Key::Inode(_) => 1,
            Key::Dirent(..) => 2,
            Key::Chunk(..) => 3,
            Key::Xattr(..) => 4,
            Key::Symlink(_) => 5,
            Key::Orphan(_) => 6,
            Key::Superblock => 7,
        }
    }
}

/// The keys changed since the last append (or commit).
pub(crate) type Dirty = BTreeSet<Key>;

/// One change: the key and its value now (`None`: deleted).
pub(crate) type Entry = (Key, Option<PlainBuf>);

const DELETED: u8 = 0x80;

/// Appends one entry to a record's payload: table tag (| 0x80 when deleted), the key's fields,
/// then for a value its length (u32) and bytes.
pub(crate) fn encode_entry(out: &mut Vec<u8>, key: &Key, value: Option<&[u8]>) {
    out.push(key.table_tag() | if value.is_none() { DELETED } else { 0 });
    match key {
        Key::Inode(ino) | Key::Symlink(ino) | Key::Orphan(ino) => out.extend(ino.to_le_bytes()),
        Key::Dirent(ino, name) | Key::Xattr(ino, name) => {
            out.extend(ino.to_le_bytes());
            out.extend((name.0.len() as u32).to_le_bytes());
            out.extend_from_slice(&name.0);
        }
        Key::Chunk(ino, idx) => {
            out.extend(ino.to_le_bytes());
            out.extend(idx.to_le_bytes());
        }
        Key::Superblock => {}
    }
    if let Some(v) = value {
        out.extend((v.len() as u32).to_le_bytes());
        out.extend_from_slice(v);
    }
}

/// Reads the entries of a record's payload back.
pub(crate) fn decode_entries(mut b: &[u8]) -> FsResult<Vec<Entry>> {
    let bad = || FsError::Corrupt("a record of the fsync log does not decode".into());
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (b.len() >= n).then(|| b.split_at(n))?;
        *b = rest;
        Some(head)
    }
    let u64_of = |b: &mut &[u8]| take(b, 8).map(|x| u64::from_le_bytes(x.try_into().unwrap()));
    let u32_of = |b: &mut &[u8]| take(b, 4).map(|x| u32::from_le_bytes(x.try_into().unwrap()));
    let mut entries = Vec::new();
    while let Some(&tag) = b.first() {
        b = &b[1..];
        let ino = |b: &mut &[u8]| u64_of(b).ok_or_else(bad);
        let name = |b: &mut &[u8]| -> FsResult<Name> {
            let n = u32_of(b).ok_or_else(bad)? as usize;
            Ok(Name(take(b, n).ok_or_else(bad)?.to_vec()))
        };
        let key = match tag & !DELETED {
            1 => Key::Inode(ino(&mut b)?),
            2 => Key::Dirent(ino(&mut b)?, name(&mut b)?),
            3 => Key::Chunk(ino(&mut b)?, ino(&mut b)?),
            4 => Key::Xattr(ino(&mut b)?, name(&mut b)?),
            5 => Key::Symlink(ino(&mut b)?),
            6 => Key::Orphan(ino(&mut b)?),
            7 => Key::Superblock,
            _ => return Err(bad()),
        };
        let value = if tag & DELETED != 0 {
            None
        } else {
            let n = u32_of(&mut b).ok_or_else(bad)? as usize;
            Some(PlainBuf::from(take(&mut b, n).ok_or_else(bad)?.to_vec()))
        };
        entries.push((key, value));
    }
    Ok(entries)
}

/// Pages a record of `payload_len` bytes takes.
pub(crate) fn pages_for(payload_len: usize) -> u64 {
    payload_len.div_ceil(PAYLOAD_PER_PAGE).max(1) as u64
}

/// The pages of record `seq` of `epoch`, ready to write.
pub(crate) fn record_pages(epoch: u64, seq: u64, payload: &[u8]) -> PlainBuf {
    let count = pages_for(payload.len()) as usize;
    let id: u64 = rand::random();
    let mut pages = PlainBuf::from(vec![0u8; count * PAGE]);
    for (i, page) in pages.chunks_mut(PAGE).enumerate() {
        let part = payload.chunks(PAYLOAD_PER_PAGE).nth(i).unwrap_or_default();
        page[P_EPOCH..P_EPOCH + 8].copy_from_slice(&epoch.to_le_bytes());
        page[P_SEQ..P_SEQ + 8].copy_from_slice(&seq.to_le_bytes());
        page[P_RECORD_ID..P_RECORD_ID + 8].copy_from_slice(&id.to_le_bytes());
        page[P_INDEX..P_INDEX + 4].copy_from_slice(&(i as u32).to_le_bytes());
        page[P_COUNT..P_COUNT + 4].copy_from_slice(&(count as u32).to_le_bytes());
        page[P_LEN..P_LEN + 4].copy_from_slice(&(part.len() as u32).to_le_bytes());
        page[PAGE_HEADER..PAGE_HEADER + part.len()].copy_from_slice(part);
    }
    pages
}

/// A page's header fields.
struct PageHeader {
    epoch: u64,
    seq: u64,
    id: u64,
    index: u32,
    count: u32,
    len: usize,
}

fn page_header(page: &[u8]) -> Option<PageHeader> {
    let u64_at = |at: usize| u64::from_le_bytes(page[at..at + 8].try_into().unwrap());
    let u32_at = |at: usize| u32::from_le_bytes(page[at..at + 4].try_into().unwrap());
    let h = PageHeader {
        epoch: u64_at(P_EPOCH),
        seq: u64_at(P_SEQ),
        id: u64_at(P_RECORD_ID),
        index: u32_at(P_INDEX),
        count: u32_at(P_COUNT),
        len: u32_at(P_LEN) as usize,
    };
    (u32_at(P_RESERVED) == 0 && h.len <= PAYLOAD_PER_PAGE && h.index < h.count).then_some(h)
}

/// What a scan of the log found.
pub(crate) struct Scan {
    /// The payloads of the current epoch's records, in order.
    pub records: Vec<PlainBuf>,
    /// Log pages that failed authentication (torn by a crash, or damaged).
    pub torn: Vec<u64>,
}

/// A record being read: its first page's header, the pages read so far, the payload so far.
struct Partial {
    first: PageHeader,
    pages: u32,
    payload: PlainBuf,
}

/// Reads the log: the records of `epoch` from page 0 on, up to the first page that is not the
/// next page of the next record; and every page that fails authentication. With `whole` false
/// the scan stops after the records (a read-only open only needs to know whether there are any).
pub(crate) fn scan(storage: &dyn Storage, epoch: u64, whole: bool) -> io::Result<Scan> {
    let pages = storage.fsync_log_pages();
    let mut found = Scan {
        records: Vec::new(),
        torn: Vec::new(),
    };
    let mut page = PlainBuf::from(vec![0u8; PAGE]);
    let mut partial: Option<Partial> = None;
    let mut in_records = true;
    for index in 0..pages {
        let authentic = storage.read_fsync_log_page(index, &mut page)?;
        if !authentic {
            found.torn.push(index);
        }
        if in_records {
            in_records = authentic && take_page(&page, epoch, &mut partial, &mut found);
            if !in_records && !whole {
                break;
            }
        }
    }
    Ok(found)
}

/// Adds `page` to the record being read, or starts the next record with it; false when it
/// does not belong there, which ends the records.
fn take_page(page: &[u8], epoch: u64, partial: &mut Option<Partial>, found: &mut Scan) -> bool {
    let Some(h) = page_header(page) else {
        return false;
    };
    let payload = &page[PAGE_HEADER..PAGE_HEADER + h.len];
    let record = match partial.take() {
        None if h.epoch == epoch && h.seq == found.records.len() as u64 && h.index == 0 => {
            Partial {
                first: h,
                pages: 1,
                payload: PlainBuf::from(payload.to_vec()),
            }
        }
        Some(mut r)
            if (h.epoch, h.seq, h.id, h.count, h.index)
                == (epoch, r.first.seq, r.first.id, r.first.count, r.pages) =>
        {
            r.pages += 1;
            r.payload.extend_from_slice(payload);
            r
        }
        _ => return false,
    };
    if record.pages == record.first.count {
        found.records.push(record.payload);
    } else {
        *partial = Some(record);
    }
    true
}

// ----------------------------------------------------------------------------------------------
// The filesystem's side: append at fsync, retire at commit, replay at open.

use super::{Fs, LogState, Mode};

impl LogState {
    /// A commit wrote `epoch`: the log is empty again.
    pub(super) fn start_epoch(&mut self, epoch: u64) {
        self.epoch = epoch;
        self.next_page = 0;
        self.next_seq = 0;
        self.needs_new_epoch = false;
        self.usable = true;
    }
}

fn io_error(e: io::Error) -> FsError {
    FsError::Store(format!("the fsync log: {e}"))
}

impl Fs {
    /// Makes every change so far durable, for `fsync`: appends them to the fsync log when the
    /// store has one, they fit in it and space is not short; else commits.
    pub fn sync(&mut self) -> FsResult<()> {
        if self.damaged {
            return Err(FsError::Failed);
        }
        if self.dirty_since.is_none() {
            return Ok(());
        }
        if self.log.pages > 0 && self.log.usable && !self.space_is_short() {
            match self.append_to_log() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!("appending to the fsync log failed ({e}); committing instead");
                    self.log.usable = false;
                }
            }
        }
        self.commit()
    }

    /// Appends a record of what changed since the last append; `Ok(false)` if it does not fit
    /// in what is left of the log.
    fn append_to_log(&mut self) -> FsResult<bool> {
        let unlogged = self.txn.as_ref().is_some_and(|t| t.has_unlogged_changes());
        if !unlogged {
            return Ok(true);
        }
        let free = self.log.pages - self.log.next_page;
        let limit = free as usize * PAYLOAD_PER_PAGE;
        let sb = self.sb.clone();
        let Some(payload) = self.run(Mode::Read, |_, tx| tx.log_payload(&sb, limit))? else {
            return Ok(false);
        };
        let pages = record_pages(self.log.epoch, self.log.next_seq, &payload);
        self.log.needs_new_epoch = true;
        let claimed = self.txn.as_ref().is_some_and(|t| t.take_claimed());
        if let Some(txn) = &self.txn {
            txn.log_started();
        }
        let storage = &self.backend.storage;
        if claimed {
            // A segment claimed since the last sync is durable only after one: a record naming
            // its sectors must not be readable before (a crash between the two would replay it
            // into a segment the container does not know).
            storage.sync_data().map_err(io_error)?;
        }
        storage
            .write_fsync_log(self.log.next_page, &pages)
            .and_then(|()| storage.sync_data())
            .map_err(io_error)?;
        self.log.next_page += pages_for(payload.len());
        self.log.next_seq += 1;
        if let Some(txn) = &self.txn {
            txn.clear_logged();
        }
        Ok(true)
    }

    /// Replays the records of the current epoch onto the last commit, then commits (which
    /// retires them) and rewrites the pages a crash tore. At a read-write open, and after a
    /// transaction with logged changes was lost.
    pub(super) fn replay_fsync_log(&mut self) -> FsResult<()> {
        if self.log.pages == 0 {
            return Ok(());
        }
        self.log.replaying = true;
        let result = self.replay_records();
        self.log.replaying = false;
        result
    }

    fn replay_records(&mut self) -> FsResult<()> {
        let epoch = self.run(Mode::Read, |_, tx| tx.log_epoch())?;
        self.log.start_epoch(epoch);
        let found = scan(&*self.backend.storage, epoch, true).map_err(io_error)?;
        if found.records.is_empty() && found.torn.is_empty() {
            return Ok(());
        }
        tracing::info!(
            records = found.records.len(),
            torn_pages = found.torn.len(),
            "the vault was not closed cleanly: replaying its fsync log"
        );
        self.log.needs_new_epoch = true;
        for payload in &found.records {
            let entries = decode_entries(payload)?;
            self.run(Mode::Write, |_, tx| {
                entries.iter().try_for_each(|e| tx.apply_log_entry(e))
            })?;
        }
        // The superblock is the records' (each carries it); the epoch is written again so that
        // the commit happens even when only torn pages were found.
        self.sb = self
            .run(Mode::Write, |_, tx| {
                tx.put_log_epoch(epoch)?;
                tx.superblock()
            })?
            .ok_or_else(|| FsError::Corrupt("the fsync log left no superblock".into()))?;
        self.commit()?;
        self.rewrite_torn(&found.torn)
    }

    /// Seals zeros over log pages that fail authentication, so that no damage stays behind
    /// for `verify` to find. Their records were void already.
    fn rewrite_torn(&mut self, torn: &[u64]) -> FsResult<()> {
        let zeros = [0u8; PAGE];
        let storage = &self.backend.storage;
        for &page in torn {
            storage.write_fsync_log(page, &zeros).map_err(io_error)?;
        }
        if !torn.is_empty() {
            storage.sync_data().map_err(io_error)?;
        }
        Ok(())
    }

    /// A read-only open cannot apply the log: if it holds records (the vault was not closed
    /// cleanly), refuse, as for a store redb must repair.
    pub(super) fn refuse_unreplayed_log(&mut self) -> FsResult<()> {
        if self.log.pages == 0 {
            return Ok(());
        }
        let epoch = self.run(Mode::Read, |_, tx| tx.log_epoch())?;
        let found = scan(&*self.backend.storage, epoch, false).map_err(io_error)?;
        if found.records.is_empty() {
            Ok(())
        } else {
            Err(FsError::Unreplayed)
        }
    }
}
