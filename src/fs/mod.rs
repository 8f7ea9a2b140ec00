//! The filesystem model over redb: inodes, directory entries, file chunks, xattrs, symlinks and
//! orphans, with POSIX semantics. No FUSE in here (see [`crate::fuse`]); docs/fs-schema.md has
//! the on-disk schema.
//!
//! All operations go through one open redb write transaction, which [`Fs::commit`] commits
//! (durably) on `fsync`, on close and — driven by the FUSE layer's timer calling
//! [`Fs::commit_if_dirty_older_than`] — at most about a second after the first uncommitted
//! change.
//!
//! Permissions are not checked here: the FUSE layer mounts with `default_permissions`, so the
//! kernel checks them before a request reaches us. This layer implements what the kernel leaves
//! to filesystems (setgid inheritance, link counts, times, the semantics of each operation).
//!
//! Damage: the storage never returns an error for a sector that fails authentication; it returns
//! zeros and counts ([`Storage::damaged_reads`]). Every operation compares the count before and
//! after; an operation that saw damage fails with EIO and never returns the bytes it read.
//! Operations that change the vault read (probe) everything they will change before changing
//! anything; damage seen after a change began stops all further writes and commits (the
//! "damaged" state), because redb may already have copied damaged bytes into a new page.

mod backend;
mod check;
mod data;
mod dir;
mod error;
mod extents;
mod fsync_log;
mod node;
mod schema;
mod store;
#[doc(hidden)]
pub mod testing;
mod xattr;

#[cfg(test)]
mod extents_tests;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use zeroize::Zeroize;

use backend::Backend;
pub use check::{
    CheckReport, CheckStep, DamagedItem, Inconsistency, SUBJECT_CHUNKS, SUBJECT_DIRENTS,
    SUBJECT_INODES, SUBJECT_ORPHANS, SUBJECT_SYMLINKS, SUBJECT_TABLES, SUBJECT_XATTRS, StepOutcome,
};
pub use error::{FsError, FsResult};
pub use schema::{
    Attr, CHUNK_SIZE, FileKind, MAX_FILE_SIZE, NAME_MAX, ROOT_INO, SYMLINK_MAX, Timespec,
    XATTR_NAME_MAX, XATTR_SIZE_MAX,
};
use schema::{CHUNK_PAGE, SCHEMA_VERSION, Superblock};
use store::{Db, Txn, open_db};

/// What the filesystem needs from its storage beyond redb's trait.
pub trait Storage: redb::StorageBackend {
    /// How many sector reads failed authentication since open. The encrypted store never returns
    /// an error to redb for a damaged sector (redb would latch it and fail every later
    /// operation); it returns zeros and counts. The fs compares this before/after each
    /// operation.
    fn damaged_reads(&self) -> u64;
    /// Space for statfs: Some(max store bytes) for a fixed-size vault; None = grows on the host
    /// fs.
    fn capacity(&self) -> Option<u64>;
    /// Host filesystem free bytes where the container lives (for statfs of growing vaults).
    fn host_free_bytes(&self) -> std::io::Result<u64>;
    /// Whether a backup is holding the storage still: the periodic commit then waits (writes
    /// stay in the open transaction) instead of blocking on the storage with the filesystem
    /// held. An explicit commit (fsync, unmount) still waits for the hold to end.
    fn holds_commits(&self) -> bool {
        false
    }
    /// Do up to `max_sectors` of the storage's deferred work for idle time (the encrypted store
    /// seals zeros into sectors it left unsealed); returns whether any is left.
    fn work_while_idle(&self, _max_sectors: u64) -> std::io::Result<bool> {
        Ok(false)
    }
    /// Pages of the fsync log ([`fsync_log`]) beside redb's store; 0: none, and every fsync
    /// is a commit.
    fn fsync_log_pages(&self) -> u64 {
        0
    }
    /// Reads page `index` of the fsync log into `out` (4096 bytes); `Ok(false)`, with zeros,
    /// when the page fails authentication (a crash tore it), which is not counted as damage.
    fn read_fsync_log_page(&self, _index: u64, _out: &mut [u8]) -> std::io::Result<bool> {
        Err(std::io::ErrorKind::Unsupported.into())
    }
    /// Writes whole pages of the fsync log from page `index` on; durable after `sync_data`.
    fn write_fsync_log(&self, _index: u64, _pages: &[u8]) -> std::io::Result<()> {
        Err(std::io::ErrorKind::Unsupported.into())
    }
    /// Sectors (4096 bytes of plaintext each) per data segment: the unit in which the storage
    /// hands out room for file data outside redb. 0, the default: it has none, and file data
    /// stays in redb's chunk table.
    fn data_segment_sectors(&self) -> u64 {
        0
    }
    /// Claims a new data segment and returns the number of its first sector. From then on the
    /// storage uses none of its sectors for anything else, and none of them holds data until
    /// [`Storage::write_data_sectors`] writes it (a read of a sector never written gives zeros).
    /// Durable at the next `sync_data`; a crash before it returns the segment to the storage.
    fn claim_data_segment(&self) -> std::io::Result<u64> {
        Err(std::io::ErrorKind::Unsupported.into())
    }
    /// Seals `plain` (whole 4096-byte sectors) into sectors `first..` of claimed data
    /// segments. Durable after the next `sync_data`.
    fn write_data_sectors(&self, _first: u64, _plain: &[u8]) -> std::io::Result<()> {
        Err(std::io::ErrorKind::Unsupported.into())
    }
    /// Opens sectors `first..` of claimed data segments into `out` (whole sectors). A sector
    /// that fails authentication reads as zeros and counts in [`Storage::damaged_reads`], as a
    /// sector of redb's store does. An empty `out` only checks that `first` lies in a data
    /// segment the storage still has (EINVAL if not).
    fn read_data_sectors(&self, _first: u64, _out: &mut [u8]) -> std::io::Result<()> {
        Err(std::io::ErrorKind::Unsupported.into())
    }
    /// Gives back to the host the segments at the end of the container that hold nothing:
    /// neither a data segment in `data_in_use` (first sectors of the data segments the
    /// filesystem still uses; every other data segment is free) nor a store segment redb's
    /// store needs (below its length). Durable when it returns. Returns the bytes given back.
    fn release_unused_segments(&self, _data_in_use: &[u64]) -> std::io::Result<u64> {
        Ok(0)
    }
}

/// Who asks: the uid and gid new inodes get.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

/// A time to set: the current time or a given one (utimensat's UTIME_NOW or a value; UTIME_OMIT
/// is `None` in [`SetAttr`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetTime {
    Now,
    At(Timespec),
}

/// Who made a write, truncate or chown, when the filesystem (not the kernel) takes from the file
/// what Linux takes on those: its `security.capability` attribute always, its set-user-ID bit and
/// its set-group-ID bit by the rules in [`Fs::drop_privileges`]. A FUSE mount leaves this to the
/// filesystem under `FUSE_HANDLE_KILLPRIV_V2`, and no longer asks for `security.capability`
/// before every write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dropper {
    /// The caller's (primary) group.
    pub gid: u32,
    /// The caller may keep set-ID bits on a write or truncate (holds CAP_FSETID).
    pub may_keep_setid: bool,
}

/// Attribute changes for [`Fs::setattr`]; `None` leaves a field alone.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SetAttr {
    /// Permission bits (mode & 0o7777 is used).
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Truncate or extend (regular files only).
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
    /// Explicit ctime (otherwise every change sets ctime to now).
    pub ctime: Option<Timespec>,
    pub crtime: Option<Timespec>,
    pub flags: Option<u32>,
    /// Who changes size or owner, when the filesystem drops privileges ([`Dropper`]); `None`:
    /// the kernel does.
    pub dropper: Option<Dropper>,
}

/// One directory entry. The name is wiped when the entry is dropped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub ino: u64,
    pub kind: FileKind,
    pub name: Vec<u8>,
}

impl Drop for DirEntry {
    fn drop(&mut self) {
        self.name.zeroize();
    }
}

/// Filesystem statistics for statfs(2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub frsize: u32,
    pub namelen: u32,
}

/// fallocate(2) mode bits this filesystem understands.
pub mod falloc {
    pub const KEEP_SIZE: i32 = libc::FALLOC_FL_KEEP_SIZE;
    pub const PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE;
    pub const ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE;
}

/// rename(2) flags (renameat2).
pub mod rename_flags {
    pub const NOREPLACE: u32 = libc::RENAME_NOREPLACE;
    pub const EXCHANGE: u32 = libc::RENAME_EXCHANGE;
    pub const WHITEOUT: u32 = libc::RENAME_WHITEOUT;
}

/// setxattr(2) flags.
pub mod xattr_flags {
    pub const CREATE: i32 = libc::XATTR_CREATE;
    pub const REPLACE: i32 = libc::XATTR_REPLACE;
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Read,
    Write,
}

/// Where the fsync log ([`fsync_log`]) stands.
#[derive(Debug, Default)]
struct LogState {
    /// Pages of the log; 0: there is none, every fsync commits.
    pages: u64,
    /// The epoch records are appended under: the one the last commit wrote.
    epoch: u64,
    /// The next free page and the next record number in this epoch.
    next_page: u64,
    next_seq: u64,
    /// The next commit must start a new epoch: something was appended in this one (or an
    /// append was tried, or a replay found records or torn pages).
    needs_new_epoch: bool,
    /// False after a failed append until a commit starts a new epoch: the log may hold part of
    /// a record there, which a later record must never be read as the rest of.
    usable: bool,
    /// A replay is running (a reopen within it must not start another).
    replaying: bool,
}

struct DirHandle {
    ino: u64,
    entries: Option<Vec<DirEntry>>,
}

/// Fixed slack kept free in a fixed-size vault, besides 1/64 of it.
const SPACE_MARGIN: u64 = 2 << 20;
/// Host space kept free under a growing vault.
const HOST_MARGIN: u64 = 64 << 20;
/// Space estimate of the store's own structures.
const BASE_BYTES: u64 = 256 << 10;
/// File data written after which a write commits (see [`Fs::commit_if_large`]): a quarter of
/// redb's cache ([`store::CACHE_BYTES`]), whose write buffer is half of it and also holds the
/// btree pages.
const COMMIT_BYTES: u64 = store::CACHE_BYTES as u64 / 4;
/// The same when file data lives in data sectors (see [`Fs::commit_if_large`]).
const EXTENT_COMMIT_BYTES: u64 = 256 << 20;

/// The filesystem. Not thread-safe by itself: the FUSE layer puts it behind one mutex.
pub struct Fs {
    // Field order is drop order: the transaction before the database.
    txn: Option<Txn>,
    db: Option<Db>,
    backend: Backend,
    read_only: bool,
    /// Writes and commits refused after damage or a storage failure.
    damaged: bool,
    /// Opening the database read a damaged page, which redb's cache may now hold: reopen
    /// before the next operation, and fail it if that open sees damage again.
    tainted: bool,
    sb: Superblock,
    /// When the open transaction was first changed (None: nothing to commit).
    dirty_since: Option<Instant>,
    /// Rough bytes of pages the open transaction rewrote (copy-on-write until commit).
    pending_bytes: u64,
    /// The same for the last commit, whose old pages are reused only a commit later.
    previous_bytes: u64,
    /// File data written into the open transaction.
    written_since_commit: u64,
    /// Store length at which growth was refused: the real ceiling of a fixed-size vault.
    ceiling: Option<u64>,
    open_files: HashMap<u64, u32>,
    dirs: HashMap<u64, DirHandle>,
    next_fh: u64,
    /// Some(true): no inode has an xattr (cleared by setxattr and every reopen).
    no_xattrs: Option<bool>,
    /// Where the fsync log stands.
    log: LogState,
    /// Where the next search for free data sectors starts (see [`extents`]).
    alloc_hint: Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for Fs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fs")
            .field("read_only", &self.read_only)
            .field("damaged", &self.damaged)
            .finish_non_exhaustive()
    }
}

fn drop_quietly<T>(x: T) {
    let _ = catch_unwind(AssertUnwindSafe(move || drop(x)));
}

impl Fs {
    fn new_unopened(storage: Arc<dyn Storage>, read_only: bool) -> FsResult<Self> {
        let mut fs = Self {
            txn: None,
            db: None,
            backend: Backend::new(storage),
            read_only,
            damaged: false,
            tainted: false,
            sb: Superblock::empty(),
            dirty_since: None,
            pending_bytes: 0,
            previous_bytes: 0,
            written_since_commit: 0,
            ceiling: None,
            open_files: HashMap::new(),
            dirs: HashMap::new(),
            next_fh: 1,
            no_xattrs: None,
            log: LogState::default(),
            alloc_hint: Arc::default(),
        };
        fs.log.pages = fs.backend.storage.fsync_log_pages();
        fs.open_db_checked()?;
        Ok(fs)
    }

    /// Opens the database, noting whether that read a damaged page.
    fn open_db_checked(&mut self) -> FsResult<()> {
        let before = self.damaged_reads();
        let db = catch_unwind(AssertUnwindSafe(|| open_db(&self.backend, self.read_only)));
        self.tainted = self.damaged_reads() != before;
        self.db = Some(db.map_err(|_| FsError::Damaged)??);
        Ok(())
    }

    /// Creates a new, empty filesystem on empty storage; the root directory (inode 1, mode
    /// 0755) belongs to `owner_uid:owner_gid`. Committed before returning.
    pub fn create(storage: Arc<dyn Storage>, owner_uid: u32, owner_gid: u32) -> FsResult<Self> {
        let mut fs = Self::new_unopened(storage, false)?;
        fs.run(Mode::Write, |fs, tx| {
            if tx.superblock()?.is_some() {
                return Err(FsError::Exists);
            }
            tx.create_tables()?;
            let now = Timespec::now();
            let root = Attr {
                ino: ROOT_INO,
                kind: FileKind::Dir,
                perm: 0o755,
                uid: owner_uid,
                gid: owner_gid,
                nlink: 2,
                size: 0,
                stored: 0,
                atime: now,
                mtime: now,
                ctime: now,
                crtime: now,
                rdev: 0,
                flags: 0,
                generation: 0,
                parent: ROOT_INO,
            };
            tx.put_attr(&root)?;
            // File data goes to data sectors where the storage has them (schema 2), else into
            // redb's chunk table (schema 1).
            let (version, chunk) = if extents::supported(&*fs.backend.storage) {
                (schema::SCHEMA_EXTENTS, schema::EXTENT_CHUNK_SIZE)
            } else {
                (SCHEMA_VERSION, CHUNK_SIZE)
            };
            fs.sb = Superblock {
                version,
                chunk_size: chunk as u32,
                next_ino: ROOT_INO + 1,
                uuid: rand::random(),
                created: now,
                inodes: 1,
                chunks: 0,
                chunk_bytes: 0,
                meta_bytes: node::INODE_META,
            };
            tx.put_superblock(&fs.sb)
        })?;
        fs.commit()?;
        // A new store has no epoch recorded: the first is 1 (see `Txn::log_epoch`).
        fs.log.start_epoch(1);
        Ok(fs)
    }

    /// Opens an existing filesystem. Read-write opens purge orphans (inodes unlinked while open
    /// when the vault was last closed or crashed).
    pub fn open(storage: Arc<dyn Storage>, read_only: bool) -> FsResult<Self> {
        let mut fs = Self::new_unopened(storage, read_only)?;
        fs.sb = fs.run(Mode::Read, |_, tx| {
            tx.superblock()?
                .ok_or_else(|| FsError::Corrupt("no superblock: not a keybound filesystem".into()))
        })?;
        if fs.sb.extents() && !extents::supported(&*fs.backend.storage) {
            return Err(FsError::Corrupt(
                "this filesystem keeps file data in data sectors, which the storage does not have"
                    .into(),
            ));
        }
        if read_only {
            fs.refuse_unreplayed_log()?;
        } else {
            fs.replay_fsync_log()?;
            fs.purge_orphans();
            if fs.sb.extents() {
                fs.forget_given_back_segments()?;
            }
            fs.commit()?;
        }
        Ok(fs)
    }

    /// Bytes per chunk of file data.
    pub(crate) fn chunk(&self) -> u64 {
        self.sb.chunk()
    }

    /// The filesystem's UUID (random at creation).
    pub fn uuid(&self) -> [u8; 16] {
        self.sb.uuid
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Whether writes are refused after damage or a storage failure.
    pub fn is_damaged(&self) -> bool {
        self.damaged
    }

    /// Whether there are changes not yet committed.
    pub fn is_dirty(&self) -> bool {
        self.dirty_since.is_some()
    }

    /// The storage, for its idle-time work ([`Storage::work_while_idle`]), which runs without
    /// the filesystem held.
    pub fn storage(&self) -> Arc<dyn Storage> {
        self.backend.storage.clone()
    }

    /// Moves the store's pages down and gives the freed tail of the container back
    /// (redb's `Database::compact`, one durable commit per step); `Ok(true)` if anything
    /// moved. Commits first. Read-write only, and meant for a vault nobody has mounted: the
    /// store refuses while any transaction is open.
    pub fn compact(&mut self) -> FsResult<bool> {
        if self.read_only {
            return Err(FsError::ReadOnly);
        }
        self.commit()?;
        let mut moved = false;
        if self.sb.extents() {
            moved |= self.pack_file_data()?;
        }
        // An unchanged transaction may still be open (reads begin one); compaction needs none.
        self.txn = None;
        let Some(Db::W(db)) = self.db.as_mut() else {
            return Err(FsError::Failed);
        };
        // redb repeats its compaction steps until one moves nothing.
        moved |= db.compact()?;
        if self.sb.extents() {
            self.give_back_empty_segments()?;
        }
        Ok(moved)
    }

    /// Schema 2, after packing: the storage gives back the segments at its end that hold no
    /// data, then the tables forget them (a commit). A crash in between is mended at the next
    /// open ([`Fs::forget_given_back_segments`]).
    fn give_back_empty_segments(&mut self) -> FsResult<()> {
        let seg = self.backend.storage.data_segment_sectors();
        let in_use = self.run(Mode::Read, |_, tx| tx.segments_holding_data(seg))?;
        self.txn = None;
        self.backend
            .storage
            .release_unused_segments(&in_use)
            .map_err(extents::io_error)?;
        self.forget_given_back_segments()
    }

    /// Schema 2: removes from the tables the data segments at the end that the storage gave
    /// back (reading one of their sectors is refused), then commits.
    fn forget_given_back_segments(&mut self) -> FsResult<()> {
        let storage = self.backend.storage.clone();
        self.run(Mode::Write, |_, tx| tx.forget_segments_gone(&*storage))?;
        self.commit()
    }

    /// Schema 2, for [`Fs::compact`]: moves file data down into the lowest free data sectors,
    /// highest chunk first, a durable commit per 64 MiB moved, until nothing moves. Each chunk is
    /// copied (the last commit keeps pointing at the old copy until the new one is committed).
    fn pack_file_data(&mut self) -> FsResult<bool> {
        const STEP_SECTORS: u64 = (64 << 20) / extents::SECTOR;
        let mut moved_any = false;
        loop {
            let moved = self.run(Mode::Write, |_, tx| tx.pack_step(STEP_SECTORS))?;
            self.commit()?;
            if moved == 0 {
                return Ok(moved_any);
            }
            moved_any = true;
        }
    }

    /// Commits the open transaction durably, if it changed anything.
    pub fn commit(&mut self) -> FsResult<()> {
        if self.damaged {
            return Err(FsError::Failed);
        }
        if self.dirty_since.is_none() {
            return Ok(());
        }
        let Some(txn) = self.txn.take() else {
            return Err(FsError::Failed);
        };
        let sb = self.sb.clone();
        let new_epoch = self.log.needs_new_epoch.then_some(self.log.epoch + 1);
        let before = self.damaged_reads();
        let outcome = catch_unwind(AssertUnwindSafe(move || -> FsResult<()> {
            txn.begin_op();
            txn.put_superblock(&sb)?;
            if let Some(epoch) = new_epoch {
                txn.put_log_epoch(epoch)?;
            }
            if let Txn::W { txn, .. } = txn {
                txn.commit()?;
            }
            Ok(())
        }));
        let damage = self.damaged_reads() != before;
        match outcome {
            Ok(Ok(())) if !damage => {
                if let Some(epoch) = new_epoch {
                    self.log.start_epoch(epoch);
                }
                self.dirty_since = None;
                self.previous_bytes = std::mem::take(&mut self.pending_bytes);
                self.written_since_commit = 0;
                Ok(())
            }
            Ok(Ok(())) => {
                self.set_damaged("a read failed authentication during a commit");
                self.reopen_quietly();
                Err(FsError::Damaged)
            }
            Ok(Err(e)) => Err(self.after_failed_commit(e)),
            Err(_) => {
                self.set_damaged("the store panicked during a commit");
                self.reopen_quietly();
                Err(FsError::Damaged)
            }
        }
    }

    fn after_failed_commit(&mut self, e: FsError) -> FsError {
        if self.backend.refused_growth.load(Ordering::SeqCst) {
            tracing::error!("vault full: a commit could not grow the store; recent changes lost");
            self.vault_full();
            return FsError::NoSpace;
        }
        self.set_damaged(&format!("a commit failed: {e}"));
        self.reopen_quietly();
        e
    }

    /// Commits once the open transaction holds [`COMMIT_BYTES`] of written data, while its dirty pages
    /// still fit redb's write buffer. Past it, redb spills dirty pages to the store, reads every
    /// spilled page back at commit (to checksum it: decrypting what was just encrypted) and
    /// writes it again. Not while a backup holds the vault still.
    /// Under extents the file data is not in the transaction, only its records: it commits
    /// every [`EXTENT_COMMIT_BYTES`], which bounds what the freed table holds back.
    pub(crate) fn commit_if_large(&mut self) -> FsResult<()> {
        let limit = if self.sb.extents() {
            EXTENT_COMMIT_BYTES
        } else {
            COMMIT_BYTES
        };
        if self.written_since_commit < limit || self.backend.storage.holds_commits() {
            return Ok(());
        }
        self.commit()
    }

    /// Commits if the open transaction has had changes for at least `age`. A timer calling this
    /// every `tick` makes every acknowledged change durable within `age + tick` plus the commit's
    /// own duration.
    pub fn commit_if_dirty_older_than(&mut self, age: Duration) -> FsResult<()> {
        match self.dirty_since {
            Some(t) if t.elapsed() >= age && !self.damaged => {
                if self.backend.storage.holds_commits() {
                    return Ok(());
                }
                self.commit()
            }
            _ => Ok(()),
        }
    }

    /// Commits and closes the database and the storage.
    pub fn close(mut self) -> FsResult<()> {
        let result = if self.damaged || self.read_only {
            Ok(())
        } else {
            self.commit()
        };
        // The data segments still in use, read before redb closes (and trims its tail).
        let in_use = if result.is_ok() && self.sb.extents() && !self.read_only {
            self.run(Mode::Read, |_, tx| tx.data_segments()).ok()
        } else {
            None
        };
        drop_quietly(self.txn.take());
        drop_quietly(self.db.take());
        if let Some(in_use) = in_use
            && let Err(e) = self.backend.storage.release_unused_segments(&in_use)
        {
            tracing::warn!("giving unused space at the end of the vault back failed: {e}");
        }
        let closed = redb::StorageBackend::close(&*self.backend.storage)
            .map_err(|e| FsError::Store(e.to_string()));
        result.and(closed)
    }

    fn damaged_reads(&self) -> u64 {
        self.backend.storage.damaged_reads()
    }

    fn set_damaged(&mut self, why: &str) {
        if !self.damaged {
            tracing::error!(
                "vault damaged ({why}); refusing further writes. Unmount it, then restore the \
                 container from a backup or verify it"
            );
        }
        self.damaged = true;
        self.dirty_since = None;
    }

    /// Runs one operation on the open transaction, enforcing the damage rule.
    pub(crate) fn run<T>(
        &mut self,
        mode: Mode,
        f: impl FnOnce(&mut Fs, &Txn) -> FsResult<T>,
    ) -> FsResult<T> {
        if mode == Mode::Write {
            if self.read_only {
                return Err(FsError::ReadOnly);
            }
            if self.damaged {
                return Err(FsError::Failed);
            }
        }
        if self.tainted {
            self.reopen()?;
            if self.tainted {
                return Err(FsError::Damaged);
            }
        }
        let before = self.damaged_reads();
        let txn = self.take_txn()?;
        txn.set_extents(self.sb.extents());
        txn.begin_op();
        let outcome = catch_unwind(AssertUnwindSafe(|| f(self, &txn)));
        let damage = self.damaged_reads() != before;
        match outcome {
            Err(_) => {
                self.set_damaged("the store panicked, probably on a damaged page");
                drop_quietly(txn);
                self.reopen_quietly();
                Err(FsError::Damaged)
            }
            Ok(_) if damage => {
                self.after_damage(txn);
                Err(FsError::Damaged)
            }
            Ok(Err(e)) if e.is_store() => Err(self.after_store_error(txn, e)),
            Ok(Err(FsError::NoSpace)) if txn.mutated() => {
                // No room for file data after the operation had changed something: what it
                // changed cannot be kept alone, so the transaction goes, as when redb's store
                // cannot grow (space checks commit early so that little is lost).
                tracing::error!("vault full: no room for file data; uncommitted changes lost");
                drop_quietly(txn);
                self.vault_full();
                Err(FsError::NoSpace)
            }
            Ok(r) => {
                if txn.mutated() && self.dirty_since.is_none() {
                    self.dirty_since = Some(Instant::now());
                }
                self.txn = Some(txn);
                r
            }
        }
    }

    fn take_txn(&mut self) -> FsResult<Txn> {
        if let Some(t) = self.txn.take() {
            return Ok(t);
        }
        if self.db.is_none() {
            self.reopen()?;
        }
        let db = self.db.as_ref().ok_or(FsError::Failed)?;
        let storage = &self.backend.storage;
        let hint = &self.alloc_hint;
        catch_unwind(AssertUnwindSafe(|| db.begin(storage, hint))).map_err(|_| FsError::Damaged)?
    }

    /// An operation read a damaged sector. Nothing it read is returned. redb's page cache may
    /// now hold the zeroed page, so the database is reopened (after committing earlier, clean
    /// changes if this operation changed nothing).
    fn after_damage(&mut self, txn: Txn) {
        tracing::warn!("a read failed authentication: the vault is damaged there");
        if txn.mutated() {
            self.set_damaged("a read failed authentication while changing the vault");
            drop_quietly(txn);
        } else if self.dirty_since.is_some() && !self.damaged {
            self.txn = Some(txn);
            if let Err(e) = self.commit() {
                tracing::error!("committing before reopening failed: {e}");
            }
        } else {
            drop_quietly(txn);
        }
        self.reopen_quietly();
    }

    fn after_store_error(&mut self, txn: Txn, e: FsError) -> FsError {
        if self.backend.refused_growth.load(Ordering::SeqCst) {
            if self.dirty_since.is_some() {
                tracing::error!("vault full: the store could not grow; uncommitted changes lost");
            }
            drop_quietly(txn);
            self.vault_full();
            return FsError::NoSpace;
        }
        if matches!(e, FsError::Corrupt(_)) && !txn.mutated() {
            tracing::error!("{e}");
            self.txn = Some(txn);
            return e;
        }
        self.set_damaged(&format!("store error: {e}"));
        drop_quietly(txn);
        self.reopen_quietly();
        e
    }

    /// The store hit the vault's capacity: redb latched the error, so reopen, and remember the
    /// length as the real ceiling.
    fn vault_full(&mut self) {
        self.ceiling = self.backend.storage.len().ok();
        self.dirty_since = None;
        self.pending_bytes = 0;
        self.written_since_commit = 0;
        self.reopen_quietly();
    }

    fn reopen(&mut self) -> FsResult<()> {
        self.no_xattrs = None;
        drop_quietly(self.txn.take());
        drop_quietly(self.db.take());
        self.backend.refused_growth.store(false, Ordering::SeqCst);
        self.open_db_checked()?;
        if !self.damaged && !self.tainted {
            self.reload_superblock();
        }
        // The transaction just lost may have had changes an fsync put in the log: they are
        // durable, so they come back now, as they would at the next open.
        if self.log.needs_new_epoch
            && !self.log.replaying
            && !self.read_only
            && !self.damaged
            && let Err(e) = self.replay_fsync_log()
        {
            self.set_damaged(&format!("replaying the fsync log failed: {e}"));
        }
        Ok(())
    }

    /// Commits, then closes and reopens the database, emptying redb's page cache.
    #[doc(hidden)]
    pub fn drop_caches(&mut self) -> FsResult<()> {
        if !self.damaged && !self.read_only {
            self.commit()?;
        }
        self.reopen()
    }

    /// After a reopen the counters are those of the last commit (any uncommitted transaction
    /// was lost with the old handle).
    fn reload_superblock(&mut self) {
        let Some(db) = &self.db else { return };
        let before = self.damaged_reads();
        let sb = catch_unwind(AssertUnwindSafe(|| {
            db.begin(&self.backend.storage, &self.alloc_hint)
                .and_then(|tx| tx.superblock())
        }));
        if self.damaged_reads() != before || sb.is_err() {
            self.set_damaged("the superblock is damaged");
            self.tainted = true;
        } else if let Ok(Ok(Some(sb))) = sb {
            self.sb = sb;
        }
    }

    fn reopen_quietly(&mut self) {
        if let Err(e) = self.reopen() {
            tracing::error!("reopening the store failed: {e}");
        }
    }

    fn purge_orphans(&mut self) {
        let orphans = match self.run(Mode::Read, |_, tx| tx.orphans()) {
            Ok(v) => v,
            Err(e) => {
                tracing::error!("reading the orphan list failed: {e}");
                return;
            }
        };
        for ino in orphans {
            let r = self.run(Mode::Write, |fs, tx| {
                fs.probe_purge(tx, ino)?;
                fs.purge(tx, ino)
            });
            if let Err(e) = r {
                tracing::warn!("could not purge orphan inode {ino}: {e}");
            }
        }
    }

    // --- space ---

    fn est_used(&self) -> u64 {
        self.sb.chunks * CHUNK_PAGE + self.sb.meta_bytes * 2 + BASE_BYTES
    }

    fn limit(&self) -> Option<u64> {
        let cap = self.backend.storage.capacity()?;
        Some(self.ceiling.map_or(cap, |c| c.min(cap)))
    }

    /// Refuses (ENOSPC) an operation that may add `new_bytes` to the store when it would not
    /// fit; commits first when the store will probably have to grow, so a refused growth (which
    /// redb cannot survive without a reopen) loses nothing acknowledged.
    pub(crate) fn ensure_space(&mut self, new_bytes: u64) -> FsResult<()> {
        if self.read_only || self.damaged {
            return Ok(());
        }
        let need = self.est_used() + self.pending_bytes + self.previous_bytes + new_bytes;
        if let Some(limit) = self.limit() {
            if need + SPACE_MARGIN + limit / 64 > limit {
                return Err(FsError::NoSpace);
            }
        } else if let Ok(free) = self.backend.storage.host_free_bytes()
            && free < new_bytes.saturating_mul(2) + HOST_MARGIN
        {
            return Err(FsError::NoSpace);
        }
        if self.dirty_since.is_some() && self.space_is_short_for(new_bytes) {
            self.commit()?;
        }
        Ok(())
    }

    /// Whether the open transaction, grown by `new_bytes`, may not find room at its commit:
    /// then it commits now, while it surely can (a refused growth loses the transaction), and
    /// an fsync commits rather than appending to the fsync log.
    fn space_is_short_for(&self, new_bytes: u64) -> bool {
        let need = self.est_used() + self.pending_bytes + self.previous_bytes + new_bytes;
        if let Some(limit) = self.limit()
            && self.sb.extents()
        {
            // File data takes data segments, which a nearly full vault may not have left; a
            // refused one drops the transaction, so commit first.
            need > limit / 8 * 7
        } else if self.limit().is_some() {
            let len = self.backend.storage.len().unwrap_or(0);
            need > len / 8 * 7
        } else if let Ok(free) = self.backend.storage.host_free_bytes() {
            free < self.pending_bytes * 2 + 4 * HOST_MARGIN
        } else {
            false
        }
    }

    pub(crate) fn space_is_short(&self) -> bool {
        self.space_is_short_for(0)
    }

    /// Filesystem statistics: 4 KiB blocks; total and free space from the vault's capacity, or
    /// for a growing vault from the host's free space plus what the vault uses.
    pub fn statfs(&self) -> StatFs {
        const BS: u64 = 4096;
        let used = self.est_used();
        let (total, free) = match self.limit() {
            Some(limit) => (limit, limit.saturating_sub(used)),
            None => {
                let host = self.backend.storage.host_free_bytes().unwrap_or(0);
                // Sectors cost 4124 bytes on the host per 4096 of store.
                let free = host / 4124 * 4096;
                (used + free, free)
            }
        };
        let ffree = free / 1024;
        StatFs {
            blocks: total / BS,
            bfree: free / BS,
            bavail: free / BS,
            files: self.sb.inodes + ffree,
            ffree,
            bsize: BS as u32,
            frsize: BS as u32,
            namelen: NAME_MAX as u32,
        }
    }

    fn next_fh(&mut self) -> u64 {
        let fh = self.next_fh;
        self.next_fh += 1;
        fh
    }
}

impl Drop for Fs {
    fn drop(&mut self) {
        drop_quietly(self.txn.take());
        drop_quietly(self.db.take());
    }
}
