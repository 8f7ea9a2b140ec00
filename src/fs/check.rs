//! The filesystem's consistency check, for `keybound verify --deep`.
//!
//! [`Fs::check`] walks the tree from the root and reads everything a mount could ever read:
//! every directory's entries, every inode record, every chunk of every regular file, every
//! symlink target and every xattr. Then it scans the tables whole for records the walk could not
//! reach. Nothing is changed.
//!
//! Damage shows as it does for any operation ([`super::Storage::damaged_reads`] moves, the step
//! fails with EIO), and each step covers one subject (a path, or a part of the metadata), so a
//! damaged read is attributed to the file whose read met it. The caller sees every step through
//! a callback ([`CheckStep`]) and can map the damaged sectors each step met to its subject.
//!
//! Attribution is exact for file data, inode records and symlink targets (each is read by its
//! key). Listing a directory's entries or an inode's xattrs is a range scan, which also reads
//! the first record after the range; when such a scan meets damage after everything it expected
//! (a directory's entry count is in its inode), the damage belongs to a neighbour and the step is
//! *inconclusive* rather than damaged. Reading a hole in a sparse file looks up the next stored
//! chunk, which may belong to the next file: damage there is then reported for both.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use super::node::check_name;
use super::schema::{Attr, FileKind, ROOT_INO, SYMLINK_MAX};
use super::{Fs, FsError, FsResult, Mode, Storage};

/// Consecutive unreadable chunks after which the rest of a file is not tried chunk by chunk
/// (every failed read reopens the store).
const MAX_BAD_RUN: u32 = 16;
/// Records of one kind of inconsistency listed one by one; more are counted.
const MAX_LISTED: usize = 50;

/// How a step of the check ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepOutcome {
    /// Everything read authenticated.
    Clean,
    /// A read of this subject's own records met damage.
    Damaged,
    /// A read met damage that may belong to a neighbouring record (see the module docs).
    Inconclusive,
}

/// One step of the check, as it ends: what it read, how it went, and how far the check is.
#[derive(Clone, Copy, Debug)]
pub struct CheckStep<'a> {
    /// A path (`/dir/file`), or a part of the metadata (`filesystem metadata (…)`).
    pub subject: &'a str,
    pub outcome: StepOutcome,
    pub inodes_done: u64,
    /// The live inodes the superblock counts (an estimate if it is off).
    pub inodes_total: u64,
}

/// Something that could not be read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DamagedItem {
    /// The path, or a description of a part of the metadata.
    pub path: String,
    pub ino: Option<u64>,
    pub kind: Option<&'static str>,
    /// What of it: "data at bytes 0–65511", "its inode record", "its entries", …
    pub unreadable: Vec<String>,
}

/// A record that contradicts another: a bug or damage the authentication did not catch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Inconsistency {
    pub path: Option<String>,
    pub ino: Option<u64>,
    pub problem: String,
}

/// What [`Fs::check`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CheckReport {
    pub directories: u64,
    pub files: u64,
    pub symlinks: u64,
    /// FIFOs, sockets and devices.
    pub special: u64,
    /// Bytes of file data read.
    pub data_bytes: u64,
    pub xattrs: u64,
    /// Inodes deleted while a file handle was open (open-but-deleted files at the time of a crash
    /// or of the copy): garbage the next read-write mount purges, not damage. Their data is
    /// still read.
    pub orphans: Vec<u64>,
    pub damaged: Vec<DamagedItem>,
    pub inconsistencies: Vec<Inconsistency>,
    /// Harmless findings (statistics counters off, orphans).
    pub notes: Vec<String>,
    /// Parts that could not be checked because of damage elsewhere.
    pub incomplete: Vec<String>,
    /// The check could not go on at all (the store's own structures are damaged).
    pub aborted: Option<String>,
}

impl CheckReport {
    /// No damage and no inconsistency.
    pub fn is_clean(&self) -> bool {
        self.damaged.is_empty() && self.inconsistencies.is_empty() && self.aborted.is_none()
    }
}

/// Subjects of the metadata steps.
pub const SUBJECT_TABLES: &str = "filesystem metadata (the table directory)";
pub const SUBJECT_ORPHANS: &str = "filesystem metadata (the orphan list)";
pub const SUBJECT_INODES: &str = "filesystem metadata (the inode table)";
pub const SUBJECT_DIRENTS: &str = "filesystem metadata (the directory entry table)";
pub const SUBJECT_SYMLINKS: &str = "filesystem metadata (the symlink table)";
pub const SUBJECT_XATTRS: &str = "filesystem metadata (the xattr table)";
pub const SUBJECT_CHUNKS: &str = "filesystem metadata (the chunk table)";
pub const SUBJECT_DATA_SECTORS: &str = "filesystem metadata (where file data lies)";

/// A file name for a report: UTF-8 as it is, other bytes and control characters escaped.
fn push_name(out: &mut String, name: &[u8]) {
    for chunk in name.utf8_chunks() {
        for ch in chunk.valid().chars() {
            if ch.is_control() || ch == '\\' {
                out.extend(ch.escape_default());
            } else {
                out.push(ch);
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
}

fn join(parent: &str, name: &[u8]) -> String {
    let mut path = parent.to_string();
    if !path.ends_with('/') {
        path.push('/');
    }
    push_name(&mut path, name);
    path
}

pub(crate) fn kind_name(kind: FileKind) -> &'static str {
    match kind {
        FileKind::File => "file",
        FileKind::Dir => "directory",
        FileKind::Symlink => "symlink",
        FileKind::Fifo => "fifo",
        FileKind::Socket => "socket",
        FileKind::CharDev => "character device",
        FileKind::BlockDev => "block device",
    }
}

fn run_owner(o: super::store::RunOwner) -> String {
    use super::store::RunOwner;
    match o {
        RunOwner::Chunk { ino, idx } => format!("chunk {idx} of inode {ino}"),
        RunOwner::Free => "the free list".into(),
        RunOwner::Freed => "the list freed by the last commit".into(),
    }
}

/// Chunk indices as byte ranges: "bytes 0–65511, 131024–196535".
fn byte_ranges(chunks: &[u64], size: u64, c: u64) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < chunks.len() {
        let mut j = i;
        while j + 1 < chunks.len() && chunks[j + 1] == chunks[j] + 1 {
            j += 1;
        }
        let lo = chunks[i] * c;
        let hi = ((chunks[j] + 1) * c).min(size.max(lo + 1)) - 1;
        parts.push(format!("{lo}–{hi}"));
        i = j + 1;
    }
    format!("data at bytes {}", parts.join(", "))
}

struct Seen {
    kind: FileKind,
    nlink: u32,
    links: u32,
    /// The first path found (directories and files with several links; else empty).
    path: String,
}

/// What the walk knows of the inode a record belongs to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Owner {
    /// Reached, and of the kind the record needs.
    Reached,
    /// Possibly behind damage the walk could not get past: not reached, but not known lost.
    Unknown,
    /// Not reachable from the root although the walk saw everything: a stray record.
    Stray,
}

fn owner(
    seen: &HashMap<u64, Seen>,
    unread: &HashSet<u64>,
    walk_complete: bool,
    ino: u64,
    kind: Option<FileKind>,
) -> Owner {
    match seen.get(&ino) {
        Some(s) if kind.is_none_or(|k| k == s.kind) => Owner::Reached,
        Some(_) => Owner::Stray,
        None if unread.contains(&ino) || !walk_complete => Owner::Unknown,
        None => Owner::Stray,
    }
}

impl Fs {
    /// Opens an existing filesystem for [`Fs::check`]: read-write, so that redb can replay its
    /// last commit and the fsync log its records if the store was not closed cleanly (give it
    /// storage that keeps writes away from the container), but without purging orphans, so the
    /// check sees them: what the next mount would see.
    pub fn open_for_check(storage: std::sync::Arc<dyn Storage>) -> FsResult<Self> {
        let mut fs = Self::new_unopened(storage, false)?;
        fs.sb = fs.run(Mode::Read, |_, tx| {
            tx.superblock()?
                .ok_or_else(|| FsError::Corrupt("no superblock: not a keybound filesystem".into()))
        })?;
        fs.replay_fsync_log()?;
        Ok(fs)
    }

    /// Checks the whole filesystem (see the module docs); `observe` sees every step as it ends.
    /// Changes nothing. Fails only if the check cannot start; damage and inconsistencies are in
    /// the report.
    pub fn check(&mut self, observe: &mut dyn FnMut(&CheckStep<'_>)) -> FsResult<CheckReport> {
        let total = self.sb.inodes;
        let mut checker = Checker {
            fs: self,
            observe,
            report: CheckReport::default(),
            seen: HashMap::new(),
            orphans: HashSet::new(),
            xattrs_present: true,
            unread: HashSet::new(),
            walk_complete: true,
            not_reached: 0,
            done: 0,
            total,
        };
        checker.run();
        Ok(checker.report)
    }
}

struct Checker<'a> {
    fs: &'a mut Fs,
    observe: &'a mut dyn FnMut(&CheckStep<'_>),
    report: CheckReport,
    seen: HashMap<u64, Seen>,
    orphans: HashSet<u64>,
    xattrs_present: bool,
    /// Inodes an entry names whose inode record could not be read: their records are not lost.
    unread: HashSet<u64>,
    /// Whether the walk reached everything the tree holds (no directory left unlisted).
    walk_complete: bool,
    /// Records the scans found whose inode the walk may have missed because of damage.
    not_reached: u64,
    done: u64,
    total: u64,
}

impl Checker<'_> {
    fn step(&mut self, subject: &str, outcome: StepOutcome) {
        (self.observe)(&CheckStep {
            subject,
            outcome,
            inodes_done: self.done,
            inodes_total: self.total.max(self.done),
        });
    }

    /// Whether the store itself cannot be opened without damage: then nothing can be read.
    fn store_unreadable(&mut self) -> bool {
        if self.fs.tainted && self.report.aborted.is_none() {
            self.walk_complete = false;
            self.report.aborted = Some(
                "the store's own structures are damaged (reopening it reads a damaged page): no \
                 file can be read"
                    .into(),
            );
        }
        self.report.aborted.is_some()
    }

    fn damaged(&mut self, path: &str, ino: Option<u64>, kind: Option<FileKind>, what: String) {
        if let Some(item) = self.report.damaged.iter_mut().find(|d| d.path == path) {
            item.unreadable.push(what);
            return;
        }
        self.report.damaged.push(DamagedItem {
            path: path.to_string(),
            ino,
            kind: kind.map(kind_name),
            unreadable: vec![what],
        });
    }

    fn inconsistent(&mut self, path: Option<&str>, ino: Option<u64>, problem: String) {
        self.report.inconsistencies.push(Inconsistency {
            path: path.map(str::to_string),
            ino,
            problem,
        });
    }

    /// A read of metadata as a whole failed with `e`.
    fn metadata_failed(&mut self, subject: &str, e: &FsError, consequence: &str) {
        if matches!(e, FsError::Damaged) {
            self.damaged(subject, None, None, format!("part of it ({consequence})"));
            self.step(subject, StepOutcome::Damaged);
        } else {
            self.inconsistent(Some(subject), None, format!("cannot be read: {e}"));
            self.step(subject, StepOutcome::Clean);
        }
    }

    fn run(&mut self) {
        let r = self.fs.run(Mode::Read, |_, tx| tx.no_xattrs());
        match r {
            Ok(none) => {
                self.xattrs_present = !none;
                self.step(SUBJECT_TABLES, StepOutcome::Clean);
            }
            Err(e) => self.metadata_failed(SUBJECT_TABLES, &e, "tables cannot be opened"),
        }
        if self.store_unreadable() {
            return;
        }
        self.read_orphans();
        self.walk();
        if self.store_unreadable() {
            return;
        }
        self.check_orphans();
        self.scan_inodes();
        self.scan_dirents();
        self.scan_symlinks();
        if self.xattrs_present {
            self.scan_xattrs();
        }
        self.scan_chunk_gaps();
        if self.fs.sb.extents() {
            self.scan_data_sectors();
        }
        self.store_unreadable();
        if self.not_reached > 0 {
            self.report.incomplete.push(format!(
                "{} record(s) belong to inodes the walk could not reach because of the damage \
                 above; whether any of them is lost cannot be told",
                self.not_reached
            ));
        }
    }

    fn read_orphans(&mut self) {
        match self.fs.run(Mode::Read, |_, tx| tx.orphans()) {
            Ok(list) => {
                self.orphans = list.into_iter().collect();
                self.step(SUBJECT_ORPHANS, StepOutcome::Clean);
            }
            Err(e) => self.metadata_failed(
                SUBJECT_ORPHANS,
                &e,
                "deleted-but-open files cannot be told from lost ones",
            ),
        }
    }

    // ---------------------------------------------------------------- the tree ----

    fn walk(&mut self) {
        let root = match self.fs.run(Mode::Read, |_, tx| tx.attr(ROOT_INO)) {
            Ok(Some(a)) => a,
            Ok(None) => {
                self.inconsistent(
                    Some("/"),
                    Some(ROOT_INO),
                    "there is no root directory".into(),
                );
                self.step("/", StepOutcome::Clean);
                return;
            }
            Err(e) => {
                self.walk_complete = false;
                self.record_attr_error("/", ROOT_INO, e);
                return;
            }
        };
        self.step("/", StepOutcome::Clean);
        if root.kind != FileKind::Dir {
            self.inconsistent(
                Some("/"),
                Some(ROOT_INO),
                format!("the root is a {}, not a directory", kind_name(root.kind)),
            );
            return;
        }
        if root.parent != ROOT_INO {
            self.inconsistent(
                Some("/"),
                Some(ROOT_INO),
                format!("the root's parent is inode {}, not itself", root.parent),
            );
        }
        self.seen.insert(
            ROOT_INO,
            Seen {
                kind: FileKind::Dir,
                nlink: root.nlink,
                links: 1,
                path: "/".into(),
            },
        );
        self.done += 1;
        self.report.directories += 1;
        let mut stack = vec![(ROOT_INO, root, "/".to_string())];
        while let Some((ino, attr, path)) = stack.pop() {
            if self.store_unreadable() {
                return;
            }
            self.check_dir(ino, &attr, &path, &mut stack);
            self.check_xattrs(ino, &path);
        }
    }

    fn record_attr_error(&mut self, path: &str, ino: u64, e: FsError) {
        if matches!(e, FsError::Damaged) {
            self.damaged(path, Some(ino), None, "its inode record".into());
            self.step(path, StepOutcome::Damaged);
        } else {
            self.inconsistent(Some(path), Some(ino), format!("its inode record: {e}"));
            self.step(path, StepOutcome::Clean);
        }
    }

    /// The entries of directory `ino`, as many as can be read, and whether that is all of them.
    fn list_entries(
        &mut self,
        ino: u64,
        attr: &Attr,
        path: &str,
    ) -> (Vec<(Vec<u8>, u64, u8)>, bool) {
        let mut got = Vec::new();
        let r = self.fs.run(Mode::Read, |fs, tx| {
            let start = fs.damaged_reads();
            tx.dirents_of(ino, |name, child, kind| {
                if fs.damaged_reads() != start {
                    return false;
                }
                got.push((name.to_vec(), child, kind));
                true
            })
        });
        match r {
            Ok(()) => {
                self.step(path, StepOutcome::Clean);
                (got, true)
            }
            Err(FsError::Damaged) if got.len() as u64 >= attr.size => {
                // Every entry the directory counts was read: the damage is past them.
                self.step(path, StepOutcome::Inconclusive);
                (got, true)
            }
            Err(FsError::Damaged) => {
                let what = format!(
                    "its entries ({} of the {} it records could be read)",
                    got.len(),
                    attr.size
                );
                self.damaged(path, Some(ino), Some(FileKind::Dir), what);
                self.step(path, StepOutcome::Damaged);
                self.walk_complete = false;
                (got, false)
            }
            Err(e) => {
                self.inconsistent(Some(path), Some(ino), format!("its entries: {e}"));
                self.step(path, StepOutcome::Clean);
                (got, false)
            }
        }
    }

    fn check_dir(
        &mut self,
        ino: u64,
        attr: &Attr,
        path: &str,
        stack: &mut Vec<(u64, Attr, String)>,
    ) {
        let (entries, complete) = self.list_entries(ino, attr, path);
        if complete && entries.len() as u64 != attr.size {
            self.inconsistent(
                Some(path),
                Some(ino),
                format!(
                    "the directory records {} entries, {} were found",
                    attr.size,
                    entries.len()
                ),
            );
        }
        let mut subdirs = 0u32;
        for (name, child, code) in entries {
            let cpath = join(path, &name);
            if check_name(&name).is_err() {
                self.inconsistent(Some(&cpath), Some(child), "an invalid name".into());
            }
            let kind = match FileKind::from_code(code) {
                Ok(k) => Some(k),
                Err(_) => {
                    self.inconsistent(
                        Some(&cpath),
                        Some(child),
                        format!("the entry has an unknown kind code {code}"),
                    );
                    None
                }
            };
            if kind == Some(FileKind::Dir) {
                subdirs += 1;
            }
            let a = match self.fs.run(Mode::Read, |_, tx| tx.attr(child)) {
                Ok(Some(a)) => a,
                Ok(None) => {
                    self.inconsistent(
                        Some(&cpath),
                        Some(child),
                        format!("the entry points to inode {child}, which does not exist"),
                    );
                    self.step(&cpath, StepOutcome::Clean);
                    continue;
                }
                Err(e) => {
                    if matches!(e, FsError::Damaged) {
                        self.unread.insert(child);
                        if kind.is_none_or(|k| k == FileKind::Dir) {
                            self.walk_complete = false;
                        }
                    }
                    self.record_attr_error(&cpath, child, e);
                    if self.store_unreadable() {
                        return;
                    }
                    continue;
                }
            };
            self.step(&cpath, StepOutcome::Clean);
            if let Some(k) = kind
                && k != a.kind
            {
                self.inconsistent(
                    Some(&cpath),
                    Some(child),
                    format!(
                        "the entry says {}, the inode is a {}",
                        kind_name(k),
                        kind_name(a.kind)
                    ),
                );
            }
            if a.nlink == 0 {
                self.inconsistent(
                    Some(&cpath),
                    Some(child),
                    "the entry points to an inode with link count 0".into(),
                );
            }
            if let Some(s) = self.seen.get_mut(&child) {
                s.links += 1;
                if a.kind == FileKind::Dir {
                    let first = s.path.clone();
                    self.inconsistent(
                        Some(&cpath),
                        Some(child),
                        format!("a directory reachable by two entries (also {first})"),
                    );
                }
                continue;
            }
            self.seen.insert(
                child,
                Seen {
                    kind: a.kind,
                    nlink: a.nlink,
                    links: 1,
                    // Kept only where a message may need it (memory: one per inode).
                    path: if a.kind == FileKind::Dir || a.nlink > 1 {
                        cpath.clone()
                    } else {
                        String::new()
                    },
                },
            );
            self.done += 1;
            match a.kind {
                FileKind::Dir => {
                    self.report.directories += 1;
                    if a.parent != ino {
                        self.inconsistent(
                            Some(&cpath),
                            Some(child),
                            format!(
                                "its parent pointer says inode {}, but it is an entry of inode {ino}",
                                a.parent
                            ),
                        );
                    }
                    stack.push((child, a, cpath));
                    continue;
                }
                FileKind::File => {
                    self.report.files += 1;
                    self.check_file(child, &a, &cpath);
                }
                FileKind::Symlink => {
                    self.report.symlinks += 1;
                    self.check_symlink(child, &a, &cpath);
                }
                _ => self.report.special += 1,
            }
            self.check_xattrs(child, &cpath);
            if self.store_unreadable() {
                return;
            }
        }
        if complete && attr.nlink != 2 + subdirs {
            self.inconsistent(
                Some(path),
                Some(ino),
                format!(
                    "link count {} but {subdirs} subdirectories (expected {})",
                    attr.nlink,
                    2 + subdirs
                ),
            );
        }
    }

    // ----------------------------------------------------------- file data ----

    /// Reads every chunk of regular file `ino` by its key, then looks for chunks past its end.
    fn check_file(&mut self, ino: u64, a: &Attr, path: &str) {
        let c = self.fs.chunk();
        let mut bad: Vec<u64> = Vec::new();
        let mut stored = 0u64;
        let mut oversized: Vec<u64> = Vec::new();
        let mut gave_up_at: Option<u64> = None;
        let mut other: Option<FsError> = None;
        if a.size > 0 {
            let last = (a.size - 1) / c;
            let mut next = 0u64;
            let mut bad_run = 0u32;
            while next <= last {
                let mut at = next;
                let size = a.size;
                let r = self.fs.run(Mode::Read, |fs, tx| {
                    for idx in next..=last {
                        at = idx;
                        let before = fs.damaged_reads();
                        let len = tx.chunk_len(ino, idx)?;
                        if fs.damaged_reads() != before {
                            return Err(FsError::Damaged);
                        }
                        if let Some(len) = len {
                            stored += len;
                            if len > c || idx * c + len > size {
                                oversized.push(idx);
                            }
                        }
                        bad_run = 0;
                    }
                    Ok(())
                });
                match r {
                    Ok(()) => break,
                    Err(FsError::Damaged) => {
                        bad.push(at);
                        next = at + 1;
                        bad_run += 1;
                        if bad_run >= MAX_BAD_RUN && next <= last {
                            gave_up_at = Some(next);
                            break;
                        }
                        if self.fs.tainted {
                            break;
                        }
                    }
                    Err(e) => {
                        other = Some(e);
                        break;
                    }
                }
            }
        }
        self.report.data_bytes += stored;
        if !bad.is_empty() || gave_up_at.is_some() {
            let mut what = byte_ranges(&bad, a.size, c);
            if let Some(from) = gave_up_at {
                what.push_str(&format!(
                    "; the rest, from byte {}, was not tried after {MAX_BAD_RUN} unreadable \
                     chunks in a row",
                    from * c
                ));
            }
            self.damaged(path, Some(ino), Some(FileKind::File), what);
            self.step(path, StepOutcome::Damaged);
        } else {
            self.step(path, StepOutcome::Clean);
        }
        if let Some(e) = other {
            self.inconsistent(Some(path), Some(ino), format!("its data: {e}"));
        }
        if !oversized.is_empty() {
            self.inconsistent(
                Some(path),
                Some(ino),
                format!(
                    "{} chunk(s) hold bytes past the file's size {} (first: chunk {})",
                    oversized.len(),
                    a.size,
                    oversized[0]
                ),
            );
        }
        if bad.is_empty() && gave_up_at.is_none() && stored != a.stored {
            self.report.notes.push(format!(
                "{path}: its inode counts {} stored bytes, its chunks hold {stored} (only `du` \
                 shows this)",
                a.stored
            ));
        }
        self.chunks_past_end(ino, a, path);
    }

    /// Chunks with an index past the one holding the file's last byte.
    fn chunks_past_end(&mut self, ino: u64, a: &Attr, path: &str) {
        let c = self.fs.chunk();
        let from = if a.size == 0 { 0 } else { (a.size - 1) / c + 1 };
        let mut beyond = Vec::new();
        let r = self.fs.run(Mode::Read, |fs, tx| {
            let start = fs.damaged_reads();
            tx.chunks_from((ino, from), |owner, idx, _| {
                if fs.damaged_reads() != start || owner != ino {
                    return false;
                }
                beyond.push(idx);
                true
            })
        });
        match r {
            Ok(()) => self.step(path, StepOutcome::Clean),
            Err(FsError::Damaged) => {
                self.report.incomplete.push(format!(
                    "{path}: chunks past its end could not be looked for (the record after its \
                     last chunk is damaged)"
                ));
                self.step(path, StepOutcome::Inconclusive);
            }
            Err(e) => {
                self.inconsistent(Some(path), Some(ino), format!("its chunks: {e}"));
                self.step(path, StepOutcome::Clean);
            }
        }
        if !beyond.is_empty() {
            self.inconsistent(
                Some(path),
                Some(ino),
                format!(
                    "{} chunk(s) past the end of the file (size {}; first: chunk {})",
                    beyond.len(),
                    a.size,
                    beyond[0]
                ),
            );
        }
    }

    fn check_symlink(&mut self, ino: u64, a: &Attr, path: &str) {
        match self.fs.run(Mode::Read, |_, tx| tx.symlink(ino)) {
            Ok(Some(target)) => {
                self.step(path, StepOutcome::Clean);
                let len = target.len();
                if len == 0 || len > SYMLINK_MAX || len as u64 != a.size {
                    self.inconsistent(
                        Some(path),
                        Some(ino),
                        format!("its target is {len} bytes, its inode says {}", a.size),
                    );
                }
            }
            Ok(None) => {
                self.step(path, StepOutcome::Clean);
                self.inconsistent(Some(path), Some(ino), "a symlink without a target".into());
            }
            Err(FsError::Damaged) => {
                self.damaged(
                    path,
                    Some(ino),
                    Some(FileKind::Symlink),
                    "its target".into(),
                );
                self.step(path, StepOutcome::Damaged);
            }
            Err(e) => {
                self.step(path, StepOutcome::Clean);
                self.inconsistent(Some(path), Some(ino), format!("its target: {e}"));
            }
        }
    }

    /// Reads every xattr of `ino` (listing them reads their values).
    fn check_xattrs(&mut self, ino: u64, path: &str) {
        if !self.xattrs_present {
            return;
        }
        let mut count = 0u64;
        let r = self.fs.run(Mode::Read, |fs, tx| {
            let start = fs.damaged_reads();
            tx.xattrs_of(ino, |_, _| {
                if fs.damaged_reads() != start {
                    return false;
                }
                count += 1;
                true
            })
        });
        self.report.xattrs += count;
        match r {
            Ok(()) => self.step(path, StepOutcome::Clean),
            Err(FsError::Damaged) => {
                self.report.incomplete.push(format!(
                    "{path}: its extended attributes could not all be read (a damaged record \
                     among them or right after them)"
                ));
                self.step(path, StepOutcome::Inconclusive);
            }
            Err(e) => {
                self.inconsistent(Some(path), Some(ino), format!("its xattrs: {e}"));
                self.step(path, StepOutcome::Clean);
            }
        }
    }

    // ------------------------------------------------------------- orphans ----

    fn check_orphans(&mut self) {
        let mut orphans: Vec<u64> = self.orphans.iter().copied().collect();
        orphans.sort_unstable();
        for ino in orphans {
            let subject = format!("(a deleted file still open at the time, inode {ino})");
            let a = match self.fs.run(Mode::Read, |_, tx| tx.attr(ino)) {
                Ok(Some(a)) => a,
                Ok(None) => {
                    self.step(&subject, StepOutcome::Clean);
                    self.report.notes.push(format!(
                        "the orphan list names inode {ino}, which no longer exists (the next \
                         read-write mount drops the entry)"
                    ));
                    continue;
                }
                Err(e) => {
                    self.record_attr_error(&subject, ino, e);
                    continue;
                }
            };
            self.step(&subject, StepOutcome::Clean);
            if self.seen.contains_key(&ino) || a.nlink != 0 {
                self.inconsistent(
                    Some(&subject),
                    Some(ino),
                    format!(
                        "listed as deleted, but it has link count {}{}",
                        a.nlink,
                        if self.seen.contains_key(&ino) {
                            " and is reachable from the root"
                        } else {
                            ""
                        }
                    ),
                );
                continue;
            }
            self.report.orphans.push(ino);
            self.seen.insert(
                ino,
                Seen {
                    kind: a.kind,
                    nlink: 0,
                    links: 0,
                    path: subject.clone(),
                },
            );
            if a.kind == FileKind::File {
                self.check_file(ino, &a, &subject);
            }
        }
        if !self.report.orphans.is_empty() {
            self.report.notes.push(format!(
                "{} file(s) were deleted while still open when the copy was taken (or the vault \
                 was last closed by a crash); they are not reachable, and the next read-write \
                 mount frees them",
                self.report.orphans.len()
            ));
        }
    }

    // ------------------------------------------------------- whole tables ----

    fn scan_inodes(&mut self) {
        let mut records: Vec<(u64, Result<Attr, FsError>)> = Vec::new();
        let r = self.fs.run(Mode::Read, |fs, tx| {
            let start = fs.damaged_reads();
            tx.inodes_all(|ino, raw| {
                if fs.damaged_reads() != start {
                    return false;
                }
                records.push((ino, Attr::decode(ino, raw)));
                true
            })
        });
        let complete = match &r {
            Ok(()) => {
                self.step(SUBJECT_INODES, StepOutcome::Clean);
                true
            }
            Err(e) => {
                self.metadata_failed(
                    SUBJECT_INODES,
                    e,
                    "inodes after the damage cannot be checked for being lost",
                );
                false
            }
        };
        let next_ino = self.fs.sb.next_ino;
        let mut lost = 0usize;
        let mut behind_damage: Vec<Attr> = Vec::new();
        for (ino, attr) in &records {
            let a = match attr {
                Ok(a) => a,
                Err(e) => {
                    self.inconsistent(None, Some(*ino), format!("inode {ino}: {e}"));
                    continue;
                }
            };
            if *ino >= next_ino {
                self.inconsistent(
                    None,
                    Some(*ino),
                    format!(
                        "inode {ino} is at or past the next inode number {next_ino} the \
                         superblock records"
                    ),
                );
            }
            match self.seen.get(ino) {
                Some(s) if s.kind != FileKind::Dir && s.links != s.nlink && s.nlink != 0 => {
                    let (path, links, nlink) = (s.path.clone(), s.links, s.nlink);
                    self.inconsistent(
                        (!path.is_empty()).then_some(path.as_str()),
                        Some(*ino),
                        format!("link count {nlink}, but {links} entr(y/ies) point to it"),
                    );
                }
                Some(_) => {}
                None if owner(&self.seen, &self.unread, self.walk_complete, *ino, None)
                    == Owner::Unknown =>
                {
                    self.not_reached += 1;
                    if a.kind == FileKind::File && !self.orphans.contains(ino) {
                        behind_damage.push(*a);
                    }
                }
                None => {
                    lost += 1;
                    if lost <= MAX_LISTED {
                        self.inconsistent(
                            None,
                            Some(*ino),
                            format!(
                                "inode {ino} (a {} of {} bytes, link count {}) is not reachable \
                                 from the root: it is lost",
                                kind_name(a.kind),
                                a.size,
                                a.nlink
                            ),
                        );
                    }
                }
            }
        }
        if lost > MAX_LISTED {
            self.inconsistent(
                None,
                None,
                format!("{} more lost inodes", lost - MAX_LISTED),
            );
        }
        // Files the walk could not reach because of damage on the way: their data is still
        // read, by inode number.
        for a in behind_damage {
            let subject = format!("(inode {}, a file behind the damage above)", a.ino);
            self.seen.insert(
                a.ino,
                Seen {
                    kind: FileKind::File,
                    nlink: a.nlink,
                    links: 0,
                    path: subject.clone(),
                },
            );
            self.check_file(a.ino, &a, &subject);
        }
        if complete && records.len() as u64 != self.fs.sb.inodes {
            self.report.notes.push(format!(
                "the superblock counts {} inodes, the inode table holds {} (a statistic for \
                 `df -i`; the next mount keeps counting from it)",
                self.fs.sb.inodes,
                records.len()
            ));
        }
    }

    fn scan_dirents(&mut self) {
        let mut strays: Vec<(u64, String, u64)> = Vec::new();
        let mut count = 0usize;
        let mut unknown = 0u64;
        let (seen, unread, complete) = (&self.seen, &self.unread, self.walk_complete);
        let r = self.fs.run(Mode::Read, |fs, tx| {
            let start = fs.damaged_reads();
            tx.dirents_all(|parent, name, child, _| {
                if fs.damaged_reads() != start {
                    return false;
                }
                match owner(seen, unread, complete, parent, Some(FileKind::Dir)) {
                    Owner::Reached => {}
                    Owner::Unknown => unknown += 1,
                    Owner::Stray => {
                        count += 1;
                        if strays.len() < MAX_LISTED {
                            strays.push((parent, join("", name), child));
                        }
                    }
                }
                true
            })
        });
        self.not_reached += unknown;
        match r {
            Ok(()) => self.step(SUBJECT_DIRENTS, StepOutcome::Clean),
            Err(e) => self.metadata_failed(
                SUBJECT_DIRENTS,
                &e,
                "entries after the damage cannot be checked",
            ),
        }
        for (parent, name, child) in strays {
            self.inconsistent(
                None,
                Some(child),
                format!(
                    "an entry {name} (inode {child}) under inode {parent}, which is not a \
                     directory reachable from the root"
                ),
            );
        }
        if count > MAX_LISTED {
            self.inconsistent(
                None,
                None,
                format!(
                    "{} more entries under unreachable directories",
                    count - MAX_LISTED
                ),
            );
        }
    }

    fn scan_symlinks(&mut self) {
        let mut strays = Vec::new();
        let mut unknown = 0u64;
        let (seen, unread, complete) = (&self.seen, &self.unread, self.walk_complete);
        let r = self.fs.run(Mode::Read, |fs, tx| {
            let start = fs.damaged_reads();
            tx.symlinks_all(|ino, _| {
                if fs.damaged_reads() != start {
                    return false;
                }
                match owner(seen, unread, complete, ino, Some(FileKind::Symlink)) {
                    Owner::Reached => {}
                    Owner::Unknown => unknown += 1,
                    Owner::Stray => strays.push(ino),
                }
                true
            })
        });
        self.not_reached += unknown;
        match r {
            Ok(()) => self.step(SUBJECT_SYMLINKS, StepOutcome::Clean),
            Err(e) => self.metadata_failed(
                SUBJECT_SYMLINKS,
                &e,
                "targets after the damage cannot be checked",
            ),
        }
        for ino in strays.into_iter().take(MAX_LISTED) {
            self.inconsistent(
                None,
                Some(ino),
                format!("a symlink target for inode {ino}, which is not a reachable symlink"),
            );
        }
    }

    fn scan_xattrs(&mut self) {
        let mut strays: Vec<u64> = Vec::new();
        let mut unknown = 0u64;
        let (seen, unread, complete) = (&self.seen, &self.unread, self.walk_complete);
        let r = self.fs.run(Mode::Read, |fs, tx| {
            let start = fs.damaged_reads();
            tx.xattrs_all(|ino, _, _| {
                if fs.damaged_reads() != start {
                    return false;
                }
                match owner(seen, unread, complete, ino, None) {
                    Owner::Reached => {}
                    Owner::Unknown => unknown += 1,
                    Owner::Stray if strays.last() != Some(&ino) => strays.push(ino),
                    Owner::Stray => {}
                }
                true
            })
        });
        self.not_reached += unknown;
        match r {
            Ok(()) => self.step(SUBJECT_XATTRS, StepOutcome::Clean),
            Err(e) => self.metadata_failed(
                SUBJECT_XATTRS,
                &e,
                "xattrs after the damage cannot be checked",
            ),
        }
        for ino in strays.into_iter().take(MAX_LISTED) {
            self.inconsistent(
                None,
                Some(ino),
                format!("extended attributes of inode {ino}, which is not reachable"),
            );
        }
    }

    /// Schema 2: every data sector is held by one chunk or is free, and lies in a recorded data
    /// segment. Two owners of a sector would let a write destroy another file's data; a sector
    /// owned by nobody is only space lost.
    fn scan_data_sectors(&mut self) {
        let seg = self.fs.backend.storage.data_segment_sectors();
        let r = self.fs.run(Mode::Read, |_, tx| tx.data_runs());
        let (runs, segments) = match r {
            Ok(x) => x,
            Err(e) => {
                self.metadata_failed(SUBJECT_DATA_SECTORS, &e, "data sectors not accounted");
                return;
            }
        };
        let segments: HashSet<u64> = segments.into_iter().collect();
        let mut problems = Vec::new();
        for w in runs.windows(2) {
            let ((a, n, x), (b, _, y)) = (w[0], w[1]);
            if a + n > b {
                problems.push(format!(
                    "data sectors from {b} are held twice: by {} and by {}",
                    run_owner(x),
                    run_owner(y)
                ));
            }
        }
        for &(first, n, owner) in &runs {
            let outside = seg == 0
                || super::extents::segments_of(first, n, seg).any(|s| !segments.contains(&s));
            if outside {
                problems.push(format!(
                    "data sectors {first}–{} ({}) lie outside the recorded data segments",
                    first + n - 1,
                    run_owner(owner)
                ));
            }
        }
        let clean = problems.is_empty();
        for p in problems.into_iter().take(MAX_LISTED) {
            self.inconsistent(Some(SUBJECT_DATA_SECTORS), None, p);
        }
        let held: u64 = runs.iter().map(|r| r.1).sum();
        let total = segments.len() as u64 * seg;
        if clean && held < total {
            self.report.notes.push(format!(
                "{} data sector(s) are neither used nor free: space lost, no data",
                total - held
            ));
        }
        self.step(SUBJECT_DATA_SECTORS, StepOutcome::Clean);
    }

    /// Chunks owned by no regular file: the key ranges between the files' own ranges (one
    /// lookup each; the files' chunks were read already).
    fn scan_chunk_gaps(&mut self) {
        let mut files: Vec<u64> = self
            .seen
            .iter()
            .filter(|(_, s)| s.kind == FileKind::File)
            .map(|(&ino, _)| ino)
            .collect();
        files.sort_unstable();
        let mut strays: Vec<(u64, u64)> = Vec::new();
        let mut unknown = 0u64;
        let mut unchecked = 0u64;
        let mut lo = 0u64;
        let (seen, unread, complete) = (&self.seen, &self.unread, self.walk_complete);
        for hi in files.iter().copied().map(Some).chain([None]) {
            let r = self.fs.run(Mode::Read, |fs, tx| {
                let start = fs.damaged_reads();
                tx.chunks_from((lo, 0), |ino, idx, _| {
                    if fs.damaged_reads() != start || hi.is_some_and(|hi| ino >= hi) {
                        return false;
                    }
                    match owner(seen, unread, complete, ino, Some(FileKind::File)) {
                        Owner::Reached => {}
                        Owner::Unknown => unknown += 1,
                        Owner::Stray if strays.len() < MAX_LISTED => strays.push((ino, idx)),
                        Owner::Stray => {}
                    }
                    true
                })
            });
            match r {
                Ok(()) => {}
                Err(FsError::Damaged) => unchecked += 1,
                Err(e) => {
                    self.inconsistent(None, None, format!("the chunk table: {e}"));
                    break;
                }
            }
            match hi {
                Some(hi) => lo = hi.saturating_add(1),
                None => break,
            }
            if self.fs.tainted {
                break;
            }
        }
        self.not_reached += unknown;
        if unchecked > 0 {
            self.report.incomplete.push(format!(
                "{unchecked} range(s) of the chunk table between files could not be searched \
                 for chunks of deleted files (a damaged record next to them)"
            ));
            self.step(SUBJECT_CHUNKS, StepOutcome::Inconclusive);
        } else {
            self.step(SUBJECT_CHUNKS, StepOutcome::Clean);
        }
        let mut owners: Vec<u64> = strays.iter().map(|&(o, _)| o).collect();
        owners.dedup();
        for owner in owners {
            let n = strays.iter().filter(|&&(o, _)| o == owner).count();
            self.inconsistent(
                None,
                Some(owner),
                format!("{n} chunk(s) of inode {owner}, which is not a reachable regular file"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::fs::Mode;
    use crate::fs::testing::PlainFileStorage;
    use crate::fs::tests::{ME, T, pattern};

    fn sample() -> (T, Vec<u8>) {
        let (t, mut fs) = T::new();
        let d = fs.mkdir(ROOT_INO, b"docs", 0o755, ME).unwrap();
        let big = pattern(7, 300_000);
        let f = fs
            .mknod(d.ino, b"big", libc::S_IFREG | 0o644, 0, ME)
            .unwrap();
        fs.write(f.ino, 0, &big).unwrap();
        let g = fs
            .mknod(ROOT_INO, b"small", libc::S_IFREG | 0o644, 0, ME)
            .unwrap();
        fs.write(g.ino, 0, b"small and intact").unwrap();
        fs.link(g.ino, d.ino, b"hard").unwrap();
        fs.symlink(ROOT_INO, b"ln", b"docs/big", ME).unwrap();
        fs.setxattr(g.ino, b"user.note", b"hello", 0).unwrap();
        fs.mknod(ROOT_INO, b"sparse", libc::S_IFREG | 0o600, 0, ME)
            .unwrap();
        fs.close().unwrap();
        (t, big)
    }

    fn check(storage: Arc<PlainFileStorage>) -> (CheckReport, Vec<(String, StepOutcome)>) {
        let mut fs = Fs::open_for_check(storage).unwrap();
        let mut steps = Vec::new();
        let report = fs
            .check(&mut |s| steps.push((s.subject.to_string(), s.outcome)))
            .unwrap();
        (report, steps)
    }

    #[test]
    fn a_good_filesystem_is_clean() {
        let (t, big) = sample();
        let (report, steps) = check(Arc::new(PlainFileStorage::open(&t.path).unwrap()));
        assert!(report.is_clean(), "{report:#?}");
        assert_eq!(report.directories, 2);
        assert_eq!(report.files, 3);
        assert_eq!(report.symlinks, 1);
        assert_eq!(report.xattrs, 1);
        assert_eq!(report.data_bytes, big.len() as u64 + 16);
        assert!(report.notes.is_empty(), "{:?}", report.notes);
        assert!(steps.iter().all(|(_, o)| *o == StepOutcome::Clean));
        assert!(steps.iter().any(|(s, _)| s == "/docs/big"));
        assert!(steps.iter().any(|(s, _)| s == SUBJECT_INODES));
    }

    #[test]
    fn damaged_data_is_attributed_to_its_file_only() {
        let (t, big) = sample();
        let hay = std::fs::read(&t.path).unwrap();
        let needle = &big[150_000..150_064];
        let off = hay.windows(needle.len()).position(|w| w == needle).unwrap() as u64;
        let storage = Arc::new(PlainFileStorage::open(&t.path).unwrap());
        storage.damage(off, 1);
        let (report, steps) = check(storage);
        assert_eq!(report.damaged.len(), 1, "{report:#?}");
        let item = &report.damaged[0];
        assert_eq!(item.path, "/docs/big");
        assert_eq!(item.kind, Some("file"));
        assert_eq!(
            item.unreadable,
            vec!["data at bytes 131024–196535".to_string()]
        );
        assert!(report.inconsistencies.is_empty(), "{report:#?}");
        let damaged: Vec<&str> = steps
            .iter()
            .filter(|(_, o)| *o == StepOutcome::Damaged)
            .map(|(s, _)| s.as_str())
            .collect();
        assert_eq!(damaged, vec!["/docs/big"]);
    }

    #[test]
    fn lost_inodes_wrong_link_counts_and_orphans_are_found() {
        let (t, _) = sample();
        let storage = Arc::new(PlainFileStorage::open(&t.path).unwrap());
        {
            let mut fs = Fs::open(storage.clone(), false).unwrap();
            // An open file unlinked, then a crash: an orphan.
            let o = fs
                .mknod(ROOT_INO, b"tmp", libc::S_IFREG | 0o600, 0, ME)
                .unwrap();
            fs.write(o.ino, 0, b"scratch").unwrap();
            fs.open_file(o.ino).unwrap();
            fs.unlink(ROOT_INO, b"tmp").unwrap();
            // Records changed behind the fs's back: an entry removed (its inode is lost) and
            // a link count raised.
            let small = fs.lookup(ROOT_INO, b"small").unwrap();
            let lost = fs.lookup(ROOT_INO, b"sparse").unwrap();
            fs.run(Mode::Write, |_, tx| {
                tx.del_dirent(ROOT_INO, b"sparse")?;
                let mut a = tx.attr(small.ino)?.unwrap();
                a.nlink = 5;
                tx.put_attr(&a)?;
                let mut root = tx.attr(ROOT_INO)?.unwrap();
                root.size -= 1;
                tx.put_attr(&root)
            })
            .unwrap();
            fs.commit().unwrap();
            assert!(lost.ino > 0);
            std::mem::forget(fs);
        }
        let (report, _) = check(Arc::new(PlainFileStorage::open(&t.path).unwrap()));
        assert!(report.damaged.is_empty(), "{report:#?}");
        assert_eq!(report.orphans.len(), 1, "{report:#?}");
        let problems: Vec<&str> = report
            .inconsistencies
            .iter()
            .map(|i| i.problem.as_str())
            .collect();
        assert_eq!(problems.len(), 2, "{problems:#?}");
        assert!(
            problems
                .iter()
                .any(|p| p.contains("not reachable from the root"))
        );
        assert!(problems.iter().any(|p| p.contains("link count 5, but 2")));
        assert!(
            report
                .notes
                .iter()
                .any(|n| n.contains("deleted while still open"))
        );
    }

    /// Damage in a directory's entries: that directory is named, the files that can still be
    /// listed are checked, and the ones behind the damage are "not reached", not "lost".
    #[test]
    fn damaged_entries_name_their_directory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fs");
        let storage = Arc::new(PlainFileStorage::create(&path).unwrap());
        let mut fs = Fs::create(storage, 1000, 1000).unwrap();
        let many = fs.mkdir(ROOT_INO, b"many", 0o755, ME).unwrap();
        for i in 0..400 {
            let name = format!("a-file-with-a-rather-long-name-{i:04}");
            let f = fs
                .mknod(many.ino, name.as_bytes(), libc::S_IFREG | 0o644, 0, ME)
                .unwrap();
            fs.write(f.ino, 0, &pattern(i, 100)).unwrap();
        }
        let outside = fs
            .mknod(ROOT_INO, b"outside", libc::S_IFREG | 0o644, 0, ME)
            .unwrap();
        fs.write(outside.ino, 0, b"fine").unwrap();
        fs.close().unwrap();
        // Every copy of the page holding this name (stale ones of older commits included).
        let hay = std::fs::read(&path).unwrap();
        let needle = b"a-file-with-a-rather-long-name-0200";
        let storage = Arc::new(PlainFileStorage::open(&path).unwrap());
        let mut hits = 0;
        for (at, w) in hay.windows(needle.len()).enumerate() {
            if w == needle {
                storage.damage(at as u64, 1);
                hits += 1;
            }
        }
        assert!(hits > 0);
        let (report, steps) = check(storage);
        let item = report
            .damaged
            .iter()
            .find(|d| d.path == "/many")
            .unwrap_or_else(|| panic!("{report:#?}"));
        assert!(item.unreadable[0].starts_with("its entries ("), "{item:?}");
        assert!(
            !report
                .inconsistencies
                .iter()
                .any(|i| i.problem.contains("lost") || i.problem.contains("not a")),
            "{report:#?}"
        );
        assert!(
            report
                .incomplete
                .iter()
                .any(|n| n.contains("could not reach")),
            "{report:#?}"
        );
        assert!(steps.contains(&("/outside".to_string(), StepOutcome::Clean)));
        assert!(report.files >= 1 && report.files < 401, "{report:#?}");
    }

    #[test]
    fn names_are_escaped() {
        assert_eq!(join("/", b"a\nb"), "/a\\nb");
        assert_eq!(join("/d", b"\xffx"), "/d/\\xffx");
        assert_eq!(join("/d/", "é".as_bytes()), "/d/é");
    }
}
