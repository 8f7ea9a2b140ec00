//! Unit tests of the filesystem model on plain-file storage.

use std::sync::Arc;

use super::testing::PlainFileStorage;
use super::*;

pub(super) const ME: Caller = Caller {
    uid: 1000,
    gid: 1000,
};

thread_local! {
    /// Sectors per data segment of the storage the tests on this thread build; 0: none, file
    /// data in redb's chunk table (schema 1).
    static DATA_SEGMENTS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Runs `test` with storages that have data segments of 64 sectors (file data outside redb,
/// schema 2), small so that tests cross segments.
pub(super) fn with_extents(test: impl FnOnce()) {
    DATA_SEGMENTS.with(|d| d.set(64));
    test();
    DATA_SEGMENTS.with(|d| d.set(0));
}

/// A filesystem on plain-file storage in a temp dir (also used by the fs check's tests).
pub(super) struct T {
    _dir: tempfile::TempDir,
    pub(super) path: std::path::PathBuf,
    pub(super) storage: Arc<PlainFileStorage>,
    log_pages: u64,
    data_segments: u64,
}

impl T {
    pub(super) fn new() -> (Self, Fs) {
        Self::with_capacity(None)
    }

    fn with_capacity(cap: Option<u64>) -> (Self, Fs) {
        Self::build(cap, 0)
    }

    /// With an fsync log of `pages` pages.
    pub(super) fn with_log(pages: u64) -> (Self, Fs) {
        Self::build(None, pages)
    }

    fn build(cap: Option<u64>, log_pages: u64) -> (Self, Fs) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vault");
        let mut storage = PlainFileStorage::create(&path).unwrap().with_capacity(cap);
        if log_pages > 0 {
            storage = storage.with_fsync_log(log_pages).unwrap();
        }
        let data_segments = DATA_SEGMENTS.with(|d| d.get());
        if data_segments > 0 {
            storage = storage.with_data_segments(data_segments).unwrap();
        }
        let storage = Arc::new(storage);
        let fs = Fs::create(storage.clone(), 1000, 1000).unwrap();
        let t = Self {
            _dir: dir,
            path,
            storage,
            log_pages,
            data_segments,
        };
        (t, fs)
    }

    pub(super) fn reopen(&mut self, read_only: bool) -> Fs {
        self.try_reopen(read_only).unwrap()
    }

    fn try_reopen(&mut self, read_only: bool) -> FsResult<Fs> {
        self.storage = Arc::new(self.reopened_storage());
        Fs::open(self.storage.clone(), read_only)
    }

    /// The storage opened again, with the same capacity and log.
    fn reopened_storage(&self) -> PlainFileStorage {
        let cap = redb_cap(&self.storage);
        let storage = PlainFileStorage::open(&self.path)
            .unwrap()
            .with_capacity(cap);
        let storage = match self.log_pages {
            0 => storage,
            pages => storage.with_fsync_log(pages).unwrap(),
        };
        match self.data_segments {
            0 => storage,
            n => storage.with_data_segments(n).unwrap(),
        }
    }
}

fn redb_cap(s: &PlainFileStorage) -> Option<u64> {
    Storage::capacity(s)
}

fn mkfile(fs: &mut Fs, parent: u64, name: &str, data: &[u8]) -> u64 {
    let a = fs
        .mknod(parent, name.as_bytes(), libc::S_IFREG | 0o644, 0, ME)
        .unwrap();
    assert_eq!(fs.write(a.ino, 0, data).unwrap(), data.len());
    a.ino
}

fn read_all(fs: &mut Fs, ino: u64) -> Vec<u8> {
    let size = fs.getattr(ino).unwrap().size;
    fs.read(ino, 0, size as u32).unwrap().to_vec()
}

pub(super) fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn names(fs: &mut Fs, dir: u64) -> Vec<String> {
    fs.list(dir)
        .unwrap()
        .iter()
        .map(|e| String::from_utf8(e.name.clone()).unwrap())
        .collect()
}

#[test]
pub(super) fn root_and_basic_files() {
    let (_t, mut fs) = T::new();
    let root = fs.getattr(ROOT_INO).unwrap();
    assert_eq!(
        (root.kind, root.uid, root.gid, root.nlink),
        (FileKind::Dir, 1000, 1000, 2)
    );
    let d = fs.mkdir(ROOT_INO, b"d", 0o755, ME).unwrap();
    assert_eq!(fs.getattr(ROOT_INO).unwrap().nlink, 3);
    let data = pattern(1, 300_000);
    let f = mkfile(&mut fs, d.ino, "f", &data);
    assert_eq!(read_all(&mut fs, f), data);
    assert_eq!(fs.lookup(d.ino, b"f").unwrap().ino, f);
    assert_eq!(fs.lookup(d.ino, b"..").unwrap().ino, ROOT_INO);
    assert!(matches!(fs.lookup(d.ino, b"nope"), Err(FsError::NotFound)));
    assert!(matches!(
        fs.mkdir(d.ino, b"f", 0o755, ME),
        Err(FsError::Exists)
    ));
    let long = vec![b'x'; 256];
    assert!(matches!(
        fs.mkdir(d.ino, &long, 0o755, ME),
        Err(FsError::NameTooLong)
    ));
    assert!(matches!(fs.lookup(f, b"x"), Err(FsError::NotDir)));
    assert_eq!(names(&mut fs, d.ino), [".", "..", "f"]);
    // Inode numbers are never reused.
    fs.unlink(d.ino, b"f").unwrap();
    let g = mkfile(&mut fs, d.ino, "g", b"x");
    assert!(g > f);
}

#[test]
pub(super) fn unaligned_writes_match_a_model() {
    let (mut t, mut fs) = T::new();
    let ino = mkfile(&mut fs, ROOT_INO, "m", b"");
    let mut model = Vec::new();
    let ops = pattern(7, 4000);
    for (i, w) in ops.chunks(4).take(600).enumerate() {
        let off = (u32::from_le_bytes([w[0], w[1], w[2], 0]) % 400_000) as usize;
        let len = (u16::from_le_bytes([w[3], w[0]]) as usize) % 140_000;
        match w[1] % 5 {
            0 => {
                let size = off / 2;
                fs.setattr(
                    ino,
                    &SetAttr {
                        size: Some(size as u64),
                        ..Default::default()
                    },
                )
                .unwrap();
                model.resize(size, 0);
            }
            1 => {
                let got = fs.read(ino, off as u64, len as u32).unwrap();
                let end = (off + len).min(model.len());
                let want = if off < model.len() {
                    &model[off..end]
                } else {
                    &[][..]
                };
                assert_eq!(&got[..], want, "op {i}");
            }
            _ => {
                let data = pattern(i as u64, len);
                fs.write(ino, off as u64, &data).unwrap();
                if model.len() < off + len {
                    model.resize(off + len, 0);
                }
                model[off..off + len].copy_from_slice(&data);
            }
        }
        if i % 97 == 0 {
            fs.commit().unwrap();
        }
        if i % 251 == 0 {
            fs.close().unwrap();
            fs = t.reopen(false);
        }
    }
    assert_eq!(read_all(&mut fs, ino), model);
    assert_eq!(fs.getattr(ino).unwrap().size, model.len() as u64);
}

#[test]
pub(super) fn sparse_files_and_truncate() {
    let (_t, mut fs) = T::new();
    let ino = mkfile(&mut fs, ROOT_INO, "s", b"");
    fs.write(ino, 10 << 20, b"end").unwrap();
    let a = fs.getattr(ino).unwrap();
    assert_eq!(a.size, (10 << 20) + 3);
    assert!(
        a.blocks() < 200,
        "a hole takes no space: {} blocks",
        a.blocks()
    );
    let mid = fs.read(ino, 5 << 20, 4096).unwrap();
    assert!(mid.iter().all(|&b| b == 0));
    // Shrinking zeroes the tail: a later extension reads zeros.
    let f = mkfile(&mut fs, ROOT_INO, "t", &[0xAA; 100_000]);
    let set = |s| SetAttr {
        size: Some(s),
        ..Default::default()
    };
    fs.setattr(f, &set(70_000)).unwrap();
    fs.setattr(f, &set(100_000)).unwrap();
    let d = read_all(&mut fs, f);
    assert!(d[..70_000].iter().all(|&b| b == 0xAA));
    assert!(d[70_000..].iter().all(|&b| b == 0));
    fs.setattr(f, &set(0)).unwrap();
    assert_eq!(fs.getattr(f).unwrap().stored, 0);
    assert!(matches!(fs.setattr(ROOT_INO, &set(0)), Err(FsError::IsDir)));
}

#[test]
pub(super) fn fallocate_modes() {
    let (_t, mut fs) = T::new();
    let f = mkfile(&mut fs, ROOT_INO, "f", &[1; 200_000]);
    fs.fallocate(f, 0, 300_000, 0).unwrap();
    assert_eq!(fs.getattr(f).unwrap().size, 300_000);
    fs.fallocate(f, 0, 400_000, falloc::KEEP_SIZE).unwrap();
    assert_eq!(fs.getattr(f).unwrap().size, 300_000);
    fs.fallocate(f, 1000, 150_000, falloc::PUNCH_HOLE | falloc::KEEP_SIZE)
        .unwrap();
    let d = read_all(&mut fs, f);
    assert!(d[..1000].iter().all(|&b| b == 1));
    assert!(d[1000..151_000].iter().all(|&b| b == 0));
    assert!(d[151_000..200_000].iter().all(|&b| b == 1));
    assert!(d[200_000..].iter().all(|&b| b == 0));
    fs.fallocate(f, 299_000, 2000, falloc::ZERO_RANGE).unwrap();
    assert_eq!(fs.getattr(f).unwrap().size, 301_000);
    assert!(matches!(
        fs.fallocate(f, 0, 10, 0x40),
        Err(FsError::NotSupported)
    ));
}

#[test]
pub(super) fn renames() {
    let (_t, mut fs) = T::new();
    let a = fs.mkdir(ROOT_INO, b"a", 0o755, ME).unwrap().ino;
    let b = fs.mkdir(ROOT_INO, b"b", 0o755, ME).unwrap().ino;
    let f1 = mkfile(&mut fs, a, "f1", b"one");
    let f2 = mkfile(&mut fs, b, "f2", b"two");
    // File over file across directories.
    fs.rename(a, b"f1", b, b"f2", 0).unwrap();
    assert_eq!(fs.lookup(b, b"f2").unwrap().ino, f1);
    assert!(matches!(fs.getattr(f2), Err(FsError::NotFound)));
    assert!(matches!(fs.lookup(a, b"f1"), Err(FsError::NotFound)));
    // Directory moves update link counts and "..".
    let c = fs.mkdir(a, b"c", 0o755, ME).unwrap().ino;
    assert_eq!(fs.getattr(a).unwrap().nlink, 3);
    fs.rename(a, b"c", b, b"c", 0).unwrap();
    assert_eq!(fs.getattr(a).unwrap().nlink, 2);
    assert_eq!(fs.getattr(b).unwrap().nlink, 3);
    assert_eq!(fs.lookup(c, b"..").unwrap().ino, b);
    // Into its own subtree.
    assert!(matches!(
        fs.rename(ROOT_INO, b"b", c, b"x", 0),
        Err(FsError::Invalid)
    ));
    // Kind mismatches and non-empty targets.
    mkfile(&mut fs, a, "file", b"");
    fs.mkdir(a, b"empty", 0o755, ME).unwrap();
    assert!(matches!(
        fs.rename(a, b"file", a, b"empty", 0),
        Err(FsError::IsDir)
    ));
    assert!(matches!(
        fs.rename(a, b"empty", b, b"f2", 0),
        Err(FsError::NotDir)
    ));
    assert!(matches!(
        fs.rename(a, b"empty", ROOT_INO, b"b", 0),
        Err(FsError::NotEmpty)
    ));
    // Directory over empty directory.
    fs.rename(b, b"c", a, b"empty", 0).unwrap();
    assert_eq!(fs.getattr(a).unwrap().nlink, 3);
    assert_eq!(fs.getattr(b).unwrap().nlink, 2);
    // NOREPLACE and EXCHANGE.
    assert!(matches!(
        fs.rename(a, b"file", b, b"f2", rename_flags::NOREPLACE),
        Err(FsError::Exists)
    ));
    fs.rename(a, b"file", b, b"f2", rename_flags::EXCHANGE)
        .unwrap();
    assert_eq!(fs.lookup(a, b"file").unwrap().ino, f1);
    fs.rename(a, b"empty", b, b"f2", rename_flags::EXCHANGE)
        .unwrap();
    assert_eq!(fs.lookup(b, b"f2").unwrap().ino, c);
    assert_eq!(fs.lookup(c, b"..").unwrap().ino, b);
    assert_eq!(fs.getattr(a).unwrap().nlink, 2);
    assert_eq!(fs.getattr(b).unwrap().nlink, 3);
    // Same inode: nothing happens.
    fs.link(f1, a, b"hard").unwrap();
    fs.rename(a, b"file", a, b"hard", 0).unwrap();
    assert_eq!(fs.getattr(f1).unwrap().nlink, 2);
}

#[test]
pub(super) fn links_and_unlink_while_open() {
    let (mut t, mut fs) = T::new();
    let f = mkfile(&mut fs, ROOT_INO, "f", b"hello");
    fs.link(f, ROOT_INO, b"g").unwrap();
    assert_eq!(fs.getattr(f).unwrap().nlink, 2);
    assert!(matches!(
        fs.link(ROOT_INO, ROOT_INO, b"x"),
        Err(FsError::Perm)
    ));
    fs.unlink(ROOT_INO, b"f").unwrap();
    assert_eq!(read_all(&mut fs, f), b"hello");
    fs.open_file(f).unwrap();
    fs.unlink(ROOT_INO, b"g").unwrap();
    assert_eq!(fs.getattr(f).unwrap().nlink, 0);
    fs.write(f, 5, b" world").unwrap();
    assert_eq!(read_all(&mut fs, f), b"hello world");
    fs.release_file(f).unwrap();
    assert!(matches!(fs.getattr(f), Err(FsError::NotFound)));

    // An orphan left by a crash is purged at the next open.
    let h = mkfile(&mut fs, ROOT_INO, "h", &[5; 100_000]);
    fs.open_file(h).unwrap();
    fs.unlink(ROOT_INO, b"h").unwrap();
    fs.commit().unwrap();
    drop(fs);
    let mut fs = t.reopen(false);
    assert!(matches!(fs.getattr(h), Err(FsError::NotFound)));
    // One statfs: its figures follow the host's free space, which other tests change.
    let stats = fs.statfs();
    assert_eq!(stats.files - stats.ffree, 1);
}

#[test]
pub(super) fn xattrs() {
    let (_t, mut fs) = T::new();
    let f = mkfile(&mut fs, ROOT_INO, "f", b"");
    fs.setxattr(f, b"user.a", b"1", 0).unwrap();
    assert!(matches!(
        fs.setxattr(f, b"user.a", b"2", xattr_flags::CREATE),
        Err(FsError::Exists)
    ));
    assert!(matches!(
        fs.setxattr(f, b"user.b", b"2", xattr_flags::REPLACE),
        Err(FsError::NoData)
    ));
    fs.setxattr(f, b"user.a", b"22", xattr_flags::REPLACE)
        .unwrap();
    fs.setxattr(f, b"user.b", &[7; 65536], 0).unwrap();
    assert_eq!(&fs.getxattr(f, b"user.a").unwrap()[..], b"22");
    assert_eq!(fs.getxattr(f, b"user.b").unwrap().len(), 65536);
    assert_eq!(&fs.listxattr(f).unwrap()[..], b"user.a\0user.b\0");
    fs.removexattr(f, b"user.a").unwrap();
    assert!(matches!(fs.getxattr(f, b"user.a"), Err(FsError::NoData)));
    assert!(matches!(fs.removexattr(f, b"user.a"), Err(FsError::NoData)));
    assert!(matches!(
        fs.setxattr(f, b"user.c", &[0; 65537], 0),
        Err(FsError::TooLong)
    ));
    assert!(matches!(
        fs.setxattr(f, &[b'u'; 256], b"", 0),
        Err(FsError::Range)
    ));
    assert!(matches!(
        fs.setxattr(f, b"system.posix_acl_access", b"", 0),
        Err(FsError::NotSupported)
    ));
    fs.unlink(ROOT_INO, b"f").unwrap();
}

#[test]
pub(super) fn setattr_times_and_modes() {
    let (_t, mut fs) = T::new();
    let f = mkfile(&mut fs, ROOT_INO, "f", b"x");
    let t0 = Timespec {
        sec: 1_000_000,
        nsec: 5,
    };
    let a = fs
        .setattr(
            f,
            &SetAttr {
                atime: Some(SetTime::At(t0)),
                mtime: Some(SetTime::At(t0)),
                mode: Some(0o4755),
                uid: Some(7),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!((a.atime, a.mtime, a.perm, a.uid), (t0, t0, 0o4755, 7));
    assert!(a.ctime > t0);
    // setgid directories pass their group on, and directories inherit the bit.
    let d = fs.mkdir(ROOT_INO, b"d", 0o755, ME).unwrap().ino;
    fs.setattr(
        d,
        &SetAttr {
            mode: Some(0o2775),
            gid: Some(50),
            ..Default::default()
        },
    )
    .unwrap();
    let sub = fs.mkdir(d, b"sub", 0o755, ME).unwrap();
    assert_eq!((sub.gid, sub.perm & 0o2000), (50, 0o2000));
    let file = fs.mknod(d, b"f", libc::S_IFREG | 0o644, 0, ME).unwrap();
    assert_eq!((file.gid, file.perm), (50, 0o644));
    let dev = fs
        .mknod(d, b"dev", libc::S_IFCHR | 0o600, 0x0102, ME)
        .unwrap();
    assert_eq!((dev.kind, dev.rdev), (FileKind::CharDev, 0x0102));
    let l = fs.symlink(d, b"l", b"/some/where", ME).unwrap();
    assert_eq!(&fs.readlink(l.ino).unwrap()[..], b"/some/where");
    assert_eq!(l.size, 11);
}

#[test]
pub(super) fn rmdir_and_readdir_snapshot() {
    let (_t, mut fs) = T::new();
    let d = fs.mkdir(ROOT_INO, b"d", 0o755, ME).unwrap().ino;
    for i in 0..50 {
        mkfile(&mut fs, d, &format!("f{i:02}"), b"");
    }
    assert!(matches!(fs.rmdir(ROOT_INO, b"d"), Err(FsError::NotEmpty)));
    // rm -rf style: list a few, unlink them, continue from the offset.
    let fh = fs.opendir(d).unwrap();
    let mut offset = 0;
    let mut seen = 0;
    loop {
        let batch: Vec<Vec<u8>> = fs
            .readdir(fh, offset)
            .unwrap()
            .iter()
            .take(7)
            .map(|e| e.name.clone())
            .collect();
        if batch.is_empty() {
            break;
        }
        offset += batch.len() as u64;
        for n in batch {
            if n != b"." && n != b".." {
                fs.unlink(d, &n).unwrap();
                seen += 1;
            }
        }
    }
    fs.releasedir(fh);
    assert_eq!(seen, 50);
    fs.rmdir(ROOT_INO, b"d").unwrap();
    assert_eq!(fs.getattr(ROOT_INO).unwrap().nlink, 2);
    assert!(matches!(fs.getattr(d), Err(FsError::NotFound)));
}

#[test]
pub(super) fn persistence_and_crash() {
    let (mut t, mut fs) = T::new();
    let data = pattern(3, 1 << 20);
    let f = mkfile(&mut fs, ROOT_INO, "kept", &data);
    fs.setxattr(f, b"user.k", b"v", 0).unwrap();
    fs.close().unwrap();
    let mut fs = t.reopen(false);
    assert_eq!(read_all(&mut fs, f), data);
    assert_eq!(&fs.getxattr(f, b"user.k").unwrap()[..], b"v");
    // Changes after the last commit vanish in a crash; committed ones stay.
    mkfile(&mut fs, ROOT_INO, "committed", b"c");
    fs.commit().unwrap();
    mkfile(&mut fs, ROOT_INO, "lost", b"l");
    fs.write(f, 0, b"XXXX").unwrap();
    drop(fs);
    let mut fs = t.reopen(false);
    assert!(fs.lookup(ROOT_INO, b"committed").is_ok());
    assert!(matches!(
        fs.lookup(ROOT_INO, b"lost"),
        Err(FsError::NotFound)
    ));
    assert_eq!(read_all(&mut fs, f), data);
    // The inode counter does not go back to a number a lost file had, once committed.
    let n = mkfile(&mut fs, ROOT_INO, "new", b"");
    assert!(n > f);
    fs.close().unwrap();
    // Read-only opens read and refuse changes.
    let mut fs = t.reopen(true);
    assert_eq!(read_all(&mut fs, f), data);
    assert!(matches!(
        fs.mkdir(ROOT_INO, b"x", 0o755, ME),
        Err(FsError::ReadOnly)
    ));
    fs.close().unwrap();
}

#[test]
pub(super) fn commit_timer_policy() {
    let (_t, mut fs) = T::new();
    assert!(!fs.is_dirty());
    mkfile(&mut fs, ROOT_INO, "f", b"x");
    assert!(fs.is_dirty());
    fs.commit_if_dirty_older_than(std::time::Duration::from_secs(3600))
        .unwrap();
    assert!(fs.is_dirty());
    fs.commit_if_dirty_older_than(std::time::Duration::ZERO)
        .unwrap();
    assert!(!fs.is_dirty());
    // Reads do not dirty.
    fs.getattr(ROOT_INO).unwrap();
    assert!(!fs.is_dirty());
}

#[test]
pub(super) fn a_large_write_commits_once_it_would_outgrow_the_write_buffer() {
    let (mut t, mut fs) = T::new();
    let ino = mkfile(&mut fs, ROOT_INO, "big", b"");
    let block = pattern(7, 1 << 20);
    for i in 0..COMMIT_BYTES / (1 << 20) - 1 {
        fs.write(ino, i << 20, &block).unwrap();
    }
    assert!(fs.is_dirty(), "committed before {COMMIT_BYTES} bytes");
    fs.write(ino, COMMIT_BYTES - (1 << 20), &block).unwrap();
    assert!(!fs.is_dirty(), "no commit after {COMMIT_BYTES} bytes");
    // Committed means durable: a crash now (no close) keeps all of it.
    drop(fs);
    let mut fs = t.reopen(true);
    let end = COMMIT_BYTES - 1;
    assert_eq!(fs.getattr(ino).unwrap().size, COMMIT_BYTES);
    assert_eq!(
        &fs.read(ino, end - 9, 10).unwrap()[..],
        &block[(1 << 20) - 10..]
    );
}

/// Where `needle` sits in the container file.
fn find(path: &std::path::Path, needle: &[u8]) -> u64 {
    let hay = std::fs::read(path).unwrap();
    hay.windows(needle.len())
        .position(|w| w == needle)
        .expect("pattern in container") as u64
}

/// Whether redb reads every page when it opens (it does with debug assertions, which then
/// caches a damaged page at open: the fs must fail everything rather than trust that cache).
const REDB_WALKS_AT_OPEN: bool = cfg!(debug_assertions);

fn is_eio<T: std::fmt::Debug>(r: &FsResult<T>) -> bool {
    matches!(r, Err(e) if e.errno() == libc::EIO)
}

#[test]
pub(super) fn damage_fails_that_file_only() {
    let (mut t, mut fs) = T::new();
    let a_data = pattern(11, 200_000);
    let b_data = pattern(12, 200_000);
    let a = mkfile(&mut fs, ROOT_INO, "a", &a_data);
    let b = mkfile(&mut fs, ROOT_INO, "b", &b_data);
    let small = mkfile(&mut fs, ROOT_INO, "small", b"small file");
    fs.close().unwrap();
    let off = find(&t.path, &a_data[70_000..70_064]);
    let mut fs = t.reopen(false);
    t.storage.damage(off, 1);
    fs.drop_caches().unwrap();
    for _ in 0..3 {
        assert!(is_eio(&fs.read(a, 0, 200_000)));
        // Other files, and the same file's undamaged pages, read fine — never wrong bytes.
        for (ino, want) in [
            (b, &b_data[..]),
            (small, b"small file"),
            (a, &a_data[..1000]),
        ] {
            match fs.read(ino, 0, want.len() as u32) {
                Ok(got) => assert_eq!(&got[..], want),
                Err(e) => assert!(REDB_WALKS_AT_OPEN && e.errno() == libc::EIO, "{e:?}"),
            }
        }
    }
    // Writing into the damaged chunk is refused before anything changes...
    assert!(is_eio(&fs.write(a, 70_000, b"zz")));
    assert!(!fs.is_damaged());
    if !REDB_WALKS_AT_OPEN {
        // ...and the rest of the vault stays writable.
        fs.write(b, 0, b"still writable").unwrap();
        fs.commit().unwrap();
        assert_eq!(&fs.read(b, 0, 14).unwrap()[..], b"still writable");
    }
    // Deleting the damaged file is refused too (its data must be read to be freed).
    assert!(is_eio(&fs.unlink(ROOT_INO, b"a")));
    assert!(!fs.is_damaged());
    fs.close().unwrap();
    t.storage.heal();
    let mut fs = t.reopen(false);
    assert_eq!(read_all(&mut fs, a), a_data);
}

#[test]
pub(super) fn damaged_structure_pages_do_not_panic() {
    let (mut t, mut fs) = T::new();
    for i in 0..300 {
        mkfile(
            &mut fs,
            ROOT_INO,
            &format!("file-with-a-long-name-{i:04}"),
            &pattern(i, 100),
        );
    }
    fs.close().unwrap();
    let len = std::fs::metadata(&t.path).unwrap().len();
    // Damage every page but the header: every access fails, without panics or wrong bytes.
    let storage = Arc::new(PlainFileStorage::open(&t.path).unwrap());
    storage.damage(4096, len - 4096);
    match Fs::open(storage.clone(), false) {
        Err(e) => assert_eq!(e.errno(), libc::EIO, "{e:?}"),
        Ok(mut fs) => {
            for i in 0..300 {
                let r = fs.lookup(ROOT_INO, format!("file-with-a-long-name-{i:04}").as_bytes());
                assert!(is_eio(&r), "{r:?}");
            }
            assert!(fs.mkdir(ROOT_INO, b"x", 0o755, ME).is_err());
        }
    }
    drop(storage);
    let mut fs = t.reopen(false);
    assert!(fs.lookup(ROOT_INO, b"file-with-a-long-name-0007").is_ok());
}

#[test]
pub(super) fn fixed_capacity_gives_enospc_not_failure() {
    let (mut t, mut fs) = T::with_capacity(Some(24 << 20));
    let keep = mkfile(&mut fs, ROOT_INO, "keep", b"precious");
    fs.commit().unwrap();
    let f = mkfile(&mut fs, ROOT_INO, "big", b"");
    let chunk = pattern(5, 1 << 20);
    let mut written = 0u64;
    let err = loop {
        match fs.write(f, written, &chunk) {
            Ok(n) => written += n as u64,
            Err(e) => break e,
        }
        assert!(written < 64 << 20, "capacity not enforced");
    };
    assert!(matches!(err, FsError::NoSpace), "{err:?}");
    // Nothing acknowledged was lost on the way.
    assert_eq!(fs.getattr(f).unwrap().size, written);
    let tail = fs.read(f, written - (1 << 20), 1 << 20).unwrap();
    assert_eq!(&tail[..], &chunk[..]);
    // Space comes back after a delete.
    fs.unlink(ROOT_INO, b"big").unwrap();
    fs.commit().unwrap();
    let g = mkfile(&mut fs, ROOT_INO, "again", &chunk);
    assert_eq!(read_all(&mut fs, g), chunk);
    assert_eq!(read_all(&mut fs, keep), b"precious");
    fs.close().unwrap();
    let mut fs = t.reopen(false);
    assert_eq!(read_all(&mut fs, keep), b"precious");
}

#[test]
pub(super) fn statfs_is_sane() {
    let (_t, mut fs) = T::new();
    let before = fs.statfs();
    mkfile(&mut fs, ROOT_INO, "f", &[1; 1 << 20]);
    let after = fs.statfs();
    assert_eq!(after.bsize, 4096);
    assert_eq!(after.namelen, 255);
    assert!(after.blocks >= after.bfree);
    assert_eq!(after.files - after.ffree, 2);
    assert!(before.files - before.ffree == 1);
}

// --- the fsync log ---

/// Whether the store's last commit holds `name` in the root: what a read-write open would show
/// without the log (a read-only open refuses while the log holds records).
fn committed_has(t: &mut T, name: &str) -> bool {
    let mut fs = t.reopen_without_log();
    let found = fs.lookup(ROOT_INO, name.as_bytes()).is_ok();
    drop(fs);
    found
}

impl T {
    /// Opens the store alone, read-only, as if it had no log: the last commit.
    fn reopen_without_log(&mut self) -> Fs {
        let mut storage = PlainFileStorage::open(&self.path).unwrap();
        if self.data_segments > 0 {
            storage = storage.with_data_segments(self.data_segments).unwrap();
        }
        Fs::open(Arc::new(storage), true).unwrap()
    }
}

#[test]
pub(super) fn an_fsync_goes_to_the_log_and_a_crash_keeps_it() {
    let (mut t, mut fs) = T::with_log(64);
    let data = pattern(11, 10_000);
    let f = mkfile(&mut fs, ROOT_INO, "synced", &data);
    fs.setxattr(f, b"user.k", b"v", 0).unwrap();
    let d = fs.mkdir(ROOT_INO, b"dir", 0o755, ME).unwrap().ino;
    fs.symlink(d, b"link", b"../synced", ME).unwrap();
    fs.sync().unwrap();
    // After the fsync: not committed, so only the log has it.
    mkfile(&mut fs, ROOT_INO, "unsynced", b"lost in the crash");
    drop(fs);
    assert!(!committed_has(&mut t, "synced"), "the fsync committed");
    // A read-only open cannot replay: it refuses instead of showing less than was synced.
    assert!(matches!(t.try_reopen(true), Err(FsError::Unreplayed)));

    let mut fs = t.reopen(false);
    let f2 = fs.lookup(ROOT_INO, b"synced").unwrap().ino;
    assert_eq!(f2, f);
    assert_eq!(read_all(&mut fs, f), data);
    assert_eq!(&fs.getxattr(f, b"user.k").unwrap()[..], b"v");
    let d2 = fs.lookup(ROOT_INO, b"dir").unwrap().ino;
    let link = fs.lookup(d2, b"link").unwrap().ino;
    assert_eq!(&fs.readlink(link).unwrap()[..], b"../synced");
    assert!(matches!(
        fs.lookup(ROOT_INO, b"unsynced"),
        Err(FsError::NotFound)
    ));
    // The replay was committed: the store alone has it now, and a new inode gets a new number.
    drop(fs);
    assert!(committed_has(&mut t, "synced"));
    let mut fs = t.reopen(false);
    let n = mkfile(&mut fs, ROOT_INO, "new", b"");
    assert!(n > link, "inode {n} reused a logged number");
    fs.close().unwrap();
}

#[test]
pub(super) fn records_replay_in_order_and_deletions_count() {
    let (mut t, mut fs) = T::with_log(64);
    let a = mkfile(&mut fs, ROOT_INO, "a", b"first");
    mkfile(&mut fs, ROOT_INO, "b", b"bee");
    fs.sync().unwrap();
    fs.write(a, 0, b"FIRST, then more").unwrap();
    fs.unlink(ROOT_INO, b"b").unwrap();
    fs.rename(ROOT_INO, b"a", ROOT_INO, b"c", 0).unwrap();
    fs.sync().unwrap();
    drop(fs);
    let mut fs = t.reopen(false);
    assert_eq!(names(&mut fs, ROOT_INO), vec![".", "..", "c"]);
    let c = fs.lookup(ROOT_INO, b"c").unwrap().ino;
    assert_eq!(read_all(&mut fs, c), b"FIRST, then more");
    fs.close().unwrap();
}

#[test]
pub(super) fn a_torn_record_ends_the_replay() {
    let (mut t, mut fs) = T::with_log(64);
    mkfile(&mut fs, ROOT_INO, "one", b"1");
    fs.sync().unwrap();
    // The second record starts on page 1 (the first fits on page 0).
    mkfile(&mut fs, ROOT_INO, "two", &pattern(2, 6000));
    fs.sync().unwrap();
    mkfile(&mut fs, ROOT_INO, "three", b"3");
    fs.sync().unwrap();
    drop(fs);
    // A crash tore the second page of record 2: that fsync never returned, and nothing after
    // it counts either.
    let storage = t.reopened_storage();
    storage.tear_log_page(2);
    t.storage = Arc::new(storage);
    let mut fs = Fs::open(t.storage.clone(), false).unwrap();
    assert_eq!(names(&mut fs, ROOT_INO), vec![".", "..", "one"]);
    // The torn page was rewritten: it reads again.
    let mut page = vec![0u8; 4096];
    assert!(t.storage.read_fsync_log_page(2, &mut page).unwrap());
    fs.close().unwrap();
}

#[test]
pub(super) fn a_commit_retires_the_records_before_it() {
    let (mut t, mut fs) = T::with_log(64);
    mkfile(&mut fs, ROOT_INO, "gone", b"g");
    fs.sync().unwrap();
    fs.commit().unwrap();
    fs.unlink(ROOT_INO, b"gone").unwrap();
    fs.commit().unwrap();
    drop(fs);
    // The record that created "gone" is still on its page, but of an old epoch.
    let mut fs = t.reopen(false);
    assert!(matches!(
        fs.lookup(ROOT_INO, b"gone"),
        Err(FsError::NotFound)
    ));
    fs.close().unwrap();
    let fs = t.reopen(true);
    fs.close().unwrap();
}

#[test]
pub(super) fn an_fsync_that_does_not_fit_the_log_commits() {
    let (mut t, mut fs) = T::with_log(4);
    mkfile(&mut fs, ROOT_INO, "big", &pattern(5, 100_000));
    fs.sync().unwrap();
    assert!(
        !fs.is_dirty(),
        "an fsync larger than the log did not commit"
    );
    drop(fs);
    assert!(committed_has(&mut t, "big"));
    // A log that fills up: each fsync appends until one no longer fits, which commits.
    let mut fs = t.reopen(false);
    for i in 0..6 {
        mkfile(&mut fs, ROOT_INO, &format!("f{i}"), &pattern(i, 3000));
        fs.sync().unwrap();
    }
    drop(fs);
    let mut fs = t.reopen(false);
    for i in 0..6 {
        let ino = fs.lookup(ROOT_INO, format!("f{i}").as_bytes()).unwrap().ino;
        assert_eq!(read_all(&mut fs, ino), pattern(i, 3000));
    }
    fs.close().unwrap();
}

#[test]
pub(super) fn an_orphan_logged_at_fsync_is_purged_after_the_crash() {
    let (mut t, mut fs) = T::with_log(64);
    let f = mkfile(&mut fs, ROOT_INO, "open", &pattern(9, 5000));
    fs.open_file(f).unwrap();
    fs.unlink(ROOT_INO, b"open").unwrap();
    fs.sync().unwrap();
    drop(fs);
    let mut fs = t.reopen(false);
    assert!(matches!(fs.getattr(f), Err(FsError::NotFound)));
    // One statfs: two would see the host's free space change in between.
    let st = fs.statfs();
    assert_eq!(st.files - st.ffree, 1, "only the root is left");
    fs.close().unwrap();
}

#[test]
pub(super) fn the_check_sees_what_the_log_holds() {
    let (t, mut fs) = T::with_log(64);
    let f = mkfile(&mut fs, ROOT_INO, "synced", &pattern(4, 9000));
    fs.sync().unwrap();
    drop(fs);
    let mut fs = Fs::open_for_check(Arc::new(t.reopened_storage())).unwrap();
    assert_eq!(fs.lookup(ROOT_INO, b"synced").unwrap().ino, f);
    let report = fs.check(&mut |_| {}).unwrap();
    assert!(report.is_clean(), "{report:#?}");
}
