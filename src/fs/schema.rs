//! On-disk schema: redb table definitions and the fixed little-endian encodings of inode
//! attributes and the superblock. docs/fs-schema.md describes every byte.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redb::TableDefinition;

use super::FsError;

/// Inode number of the root directory.
pub const ROOT_INO: u64 = 1;
/// Bytes of file data per chunk value: the largest value that, with its 16-byte key and redb's
/// leaf overhead, still fits one 64 KiB redb page (measured: 65,513 bytes takes a 128 KiB page).
pub const CHUNK_SIZE: u64 = 65_512;
/// The redb page one full chunk occupies (for space estimates).
pub const CHUNK_PAGE: u64 = 65_536;
/// Longest name of a directory entry (bytes).
pub const NAME_MAX: usize = 255;
/// Longest symlink target (bytes), like Linux's PATH_MAX including the terminator.
pub const SYMLINK_MAX: usize = 4095;
/// Longest xattr name and value (Linux's XATTR_NAME_MAX and XATTR_SIZE_MAX).
pub const XATTR_NAME_MAX: usize = 255;
pub const XATTR_SIZE_MAX: usize = 65_536;
/// Largest file size (bytes); beyond it writes and truncates fail with EFBIG.
pub const MAX_FILE_SIZE: u64 = i64::MAX as u64;
/// Schema version of a filesystem whose file data lives in redb's chunk table (the first).
pub const SCHEMA_VERSION: u32 = 1;
/// Schema version of a filesystem whose chunk table holds extents: file data lives in the
/// storage's data sectors ([`super::extents`]), in chunks of [`EXTENT_CHUNK_SIZE`].
pub const SCHEMA_EXTENTS: u32 = 2;
/// Bytes per chunk under [`SCHEMA_EXTENTS`]: 16 whole sectors, so a write of whole mebibytes
/// is whole chunks.
pub const EXTENT_CHUNK_SIZE: u64 = 65_536;

/// ino → [`Attr`] encoding (ATTR_LEN bytes).
pub(crate) const INODES: TableDefinition<u64, &[u8]> = TableDefinition::new("inodes");
/// (parent ino, name) → (child ino, kind code).
pub(crate) const DIRENTS: TableDefinition<(u64, &[u8]), (u64, u8)> =
    TableDefinition::new("dirents");
/// (ino, chunk index) → up to CHUNK_SIZE bytes of data at offset index × CHUNK_SIZE; under
/// [`SCHEMA_EXTENTS`], the chunk's extent record instead ([`super::extents::Extent`]).
pub(crate) const CHUNKS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("chunks");
/// First sector → sectors: free runs in data segments ([`SCHEMA_EXTENTS`]).
pub(crate) const FREE_RUNS: TableDefinition<u64, u64> = TableDefinition::new("free_runs");
/// First sector → sectors: runs the open transaction stopped using; free from the next one.
pub(crate) const FREED_RUNS: TableDefinition<u64, u64> = TableDefinition::new("freed_runs");
/// First sector of each data segment the filesystem claimed → ().
pub(crate) const DATA_SEGMENTS: TableDefinition<u64, ()> = TableDefinition::new("data_segments");
/// (ino, xattr name) → value.
pub(crate) const XATTRS: TableDefinition<(u64, &[u8]), &[u8]> = TableDefinition::new("xattrs");
/// ino → symlink target bytes.
pub(crate) const SYMLINKS: TableDefinition<u64, &[u8]> = TableDefinition::new("symlinks");
/// ino → () for inodes unlinked while open; purged at the next read-write open.
pub(crate) const ORPHANS: TableDefinition<u64, ()> = TableDefinition::new("orphans");
/// 0 → [`Superblock`] encoding.
pub(crate) const SUPER: TableDefinition<u64, &[u8]> = TableDefinition::new("superblock");

/// Seconds and nanoseconds since the Unix epoch (negative seconds are before it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timespec {
    pub sec: i64,
    pub nsec: u32,
}

impl Timespec {
    pub fn now() -> Self {
        Self::from_system(SystemTime::now())
    }

    pub fn from_system(t: SystemTime) -> Self {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Self {
                sec: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                nsec: d.subsec_nanos(),
            },
            Err(e) => {
                let d = e.duration();
                let mut sec = -i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
                let mut nsec = d.subsec_nanos();
                if nsec > 0 {
                    sec -= 1;
                    nsec = 1_000_000_000 - nsec;
                }
                Self { sec, nsec }
            }
        }
    }

    pub fn to_system(self) -> SystemTime {
        let nsec = Duration::from_nanos(u64::from(self.nsec.min(999_999_999)));
        if self.sec >= 0 {
            UNIX_EPOCH + Duration::from_secs(self.sec.unsigned_abs()) + nsec
        } else {
            UNIX_EPOCH - Duration::from_secs(self.sec.unsigned_abs()) + nsec
        }
    }
}

/// What an inode is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

impl FileKind {
    pub(crate) fn code(self) -> u8 {
        match self {
            Self::File => 1,
            Self::Dir => 2,
            Self::Symlink => 3,
            Self::Fifo => 4,
            Self::Socket => 5,
            Self::CharDev => 6,
            Self::BlockDev => 7,
        }
    }

    pub(crate) fn from_code(c: u8) -> Result<Self, FsError> {
        Ok(match c {
            1 => Self::File,
            2 => Self::Dir,
            3 => Self::Symlink,
            4 => Self::Fifo,
            5 => Self::Socket,
            6 => Self::CharDev,
            7 => Self::BlockDev,
            _ => return Err(FsError::Corrupt(format!("unknown file kind {c}"))),
        })
    }

    /// The kind a `mknod`/`create` mode's S_IFMT bits name (0 means a regular file).
    pub fn from_mode(mode: u32) -> Option<Self> {
        Some(match mode & libc::S_IFMT {
            0 | libc::S_IFREG => Self::File,
            libc::S_IFDIR => Self::Dir,
            libc::S_IFLNK => Self::Symlink,
            libc::S_IFIFO => Self::Fifo,
            libc::S_IFSOCK => Self::Socket,
            libc::S_IFCHR => Self::CharDev,
            libc::S_IFBLK => Self::BlockDev,
            _ => return None,
        })
    }
}

/// An inode's attributes, as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: FileKind,
    /// Permission bits including setuid, setgid and sticky (mode & 0o7777).
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    /// Files: length in bytes. Symlinks: target length. Directories: number of entries.
    pub size: u64,
    /// Bytes of file data actually stored in chunks (holes excluded).
    pub stored: u64,
    pub atime: Timespec,
    pub mtime: Timespec,
    pub ctime: Timespec,
    pub crtime: Timespec,
    pub rdev: u32,
    pub flags: u32,
    pub generation: u64,
    /// Directories: the parent directory (the root is its own parent). Others: 0.
    pub parent: u64,
}

/// Length of an encoded [`Attr`].
pub(crate) const ATTR_LEN: usize = 112;
const ATTR_FORMAT: u8 = 1;

impl Attr {
    /// 512-byte blocks for `st_blocks`.
    pub fn blocks(&self) -> u64 {
        self.stored.div_ceil(512)
    }

    pub(crate) fn encode(&self) -> [u8; ATTR_LEN] {
        let mut b = [0u8; ATTR_LEN];
        let mut w = Writer(&mut b, 0);
        w.u8(ATTR_FORMAT);
        w.u8(self.kind.code());
        w.u16(self.perm);
        w.u32(self.uid);
        w.u32(self.gid);
        w.u32(self.nlink);
        w.u64(self.size);
        w.u64(self.stored);
        for t in [self.atime, self.mtime, self.ctime, self.crtime] {
            w.u64(t.sec as u64);
            w.u32(t.nsec);
        }
        w.u32(self.rdev);
        w.u32(self.flags);
        w.u64(self.generation);
        w.u64(self.parent);
        b
    }

    pub(crate) fn decode(ino: u64, b: &[u8]) -> Result<Self, FsError> {
        if b.len() != ATTR_LEN || b[0] != ATTR_FORMAT {
            return Err(FsError::Corrupt(format!(
                "inode {ino}: bad attribute record"
            )));
        }
        let mut r = Reader(b, 1);
        let kind = FileKind::from_code(r.u8())?;
        let (perm, uid, gid, nlink) = (r.u16(), r.u32(), r.u32(), r.u32());
        let (size, stored) = (r.u64(), r.u64());
        let mut times = [Timespec::default(); 4];
        for t in &mut times {
            *t = Timespec {
                sec: r.u64() as i64,
                nsec: r.u32(),
            };
        }
        Ok(Self {
            ino,
            kind,
            perm,
            uid,
            gid,
            nlink,
            size,
            stored,
            atime: times[0],
            mtime: times[1],
            ctime: times[2],
            crtime: times[3],
            rdev: r.u32(),
            flags: r.u32(),
            generation: r.u64(),
            parent: r.u64(),
        })
    }
}

/// Counters and identity of the filesystem (table `superblock`, key 0).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Superblock {
    pub version: u32,
    pub chunk_size: u32,
    pub next_ino: u64,
    pub uuid: [u8; 16],
    pub created: Timespec,
    /// Live inodes (including orphans).
    pub inodes: u64,
    /// Chunk values stored.
    pub chunks: u64,
    /// Sum of chunk value lengths.
    pub chunk_bytes: u64,
    /// Rough bytes of metadata (inodes, entries, xattrs, symlinks), for space estimates.
    pub meta_bytes: u64,
}

pub(crate) const SUPER_LEN: usize = 80;

impl Superblock {
    /// Placeholder until the real one is read.
    pub(crate) fn empty() -> Self {
        Self {
            version: SCHEMA_VERSION,
            chunk_size: CHUNK_SIZE as u32,
            next_ino: ROOT_INO + 1,
            uuid: [0; 16],
            created: Timespec::default(),
            inodes: 0,
            chunks: 0,
            chunk_bytes: 0,
            meta_bytes: 0,
        }
    }

    /// Whether file data lives in data sectors (the chunk table holds extents).
    pub(crate) fn extents(&self) -> bool {
        self.version == SCHEMA_EXTENTS
    }

    /// Bytes per chunk.
    pub(crate) fn chunk(&self) -> u64 {
        u64::from(self.chunk_size)
    }

    pub(crate) fn encode(&self) -> [u8; SUPER_LEN] {
        let mut b = [0u8; SUPER_LEN];
        let mut w = Writer(&mut b, 0);
        w.u32(self.version);
        w.u32(self.chunk_size);
        w.u64(self.next_ino);
        w.bytes(&self.uuid);
        w.u64(self.created.sec as u64);
        w.u32(self.created.nsec);
        w.u32(0);
        w.u64(self.inodes);
        w.u64(self.chunks);
        w.u64(self.chunk_bytes);
        w.u64(self.meta_bytes);
        b
    }

    pub(crate) fn decode(b: &[u8]) -> Result<Self, FsError> {
        if b.len() != SUPER_LEN {
            return Err(FsError::Corrupt("bad superblock record".into()));
        }
        let mut r = Reader(b, 0);
        let (version, chunk_size, next_ino) = (r.u32(), r.u32(), r.u64());
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(r.take(16));
        let created = Timespec {
            sec: r.u64() as i64,
            nsec: r.u32(),
        };
        r.u32();
        let sb = Self {
            version,
            chunk_size,
            next_ino,
            uuid,
            created,
            inodes: r.u64(),
            chunks: r.u64(),
            chunk_bytes: r.u64(),
            meta_bytes: r.u64(),
        };
        let known = matches!(
            (sb.version, u64::from(sb.chunk_size)),
            (SCHEMA_VERSION, CHUNK_SIZE) | (SCHEMA_EXTENTS, EXTENT_CHUNK_SIZE)
        );
        if !known {
            return Err(FsError::Corrupt(format!(
                "unsupported schema version {} / chunk size {}",
                sb.version, sb.chunk_size
            )));
        }
        Ok(sb)
    }
}

struct Writer<'a>(&'a mut [u8], usize);

impl Writer<'_> {
    fn bytes(&mut self, v: &[u8]) {
        self.0[self.1..self.1 + v.len()].copy_from_slice(v);
        self.1 += v.len();
    }
    fn u8(&mut self, v: u8) {
        self.bytes(&[v]);
    }
    fn u16(&mut self, v: u16) {
        self.bytes(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.bytes(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }
}

struct Reader<'a>(&'a [u8], usize);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        let s = &self.0[self.1..self.1 + n];
        self.1 += n;
        s
    }
    fn u8(&mut self) -> u8 {
        self.take(1)[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take(2).try_into().unwrap_or_default())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take(4).try_into().unwrap_or_default())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take(8).try_into().unwrap_or_default())
    }
}
