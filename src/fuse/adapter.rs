//! The fuser `Filesystem`: each request locks the filesystem, calls it, replies.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::fs::{
    Attr, Caller, Dropper, FileKind, Fs, FsError, FsResult, SetAttr, SetTime, Timespec,
};
use crate::secrets::PlainBuf;

/// How long the kernel may cache attributes and entries.
pub(crate) const TTL: Duration = Duration::from_secs(1);
/// Open files keep the kernel's page cache from earlier opens: every change goes through this
/// mount (no other writer), so it cannot be stale, and a re-read needs no round trip. The lock
/// procedure invalidates every inode the kernel knows, which drops those pages.
const KEEP_CACHE: FopenFlags = FopenFlags::FOPEN_KEEP_CACHE;
/// Largest write request (and so largest plaintext buffer per request).
const MAX_WRITE: u32 = 1 << 20;

/// The filesystem shared by the FUSE thread, the commit timer and the mount handle. `None`
/// once closed.
pub(crate) type SharedFs = Arc<Mutex<Option<Fs>>>;

pub(crate) fn lock(fs: &SharedFs) -> MutexGuard<'_, Option<Fs>> {
    // Every thread that reaches the filesystem handles plaintext (fuser's worker among
    // them, which we do not start ourselves): wipe its stack when it ends.
    crate::secrets::scrub_stack_at_thread_exit();
    fs.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Inodes the kernel holds references to (lookup count), so a lock can invalidate their caches.
pub(crate) type KnownInodes = Arc<Mutex<HashMap<u64, u64>>>;

pub(crate) struct Adapter {
    pub fs: SharedFs,
    /// Set when `destroy` closed the filesystem: the result of that close.
    pub closed: Arc<Mutex<Option<FsResult<()>>>>,
    pub known: KnownInodes,
    /// When a request last came in (for the idle lock).
    pub activity: Arc<super::Activity>,
    /// Called once `destroy` closed the filesystem (an unmount from outside).
    pub on_close: OnClose,
    /// The kernel left it to us to drop privileges on write, truncate and chown
    /// (`FUSE_HANDLE_KILLPRIV_V2`, see [`Dropper`]); set at init.
    pub drops_privileges: bool,
}

/// What to tell when the kernel ended the session (see [`super::MountHandle::on_close`]).
pub(crate) type OnClose = Arc<Mutex<Option<Box<dyn FnOnce() + Send>>>>;

fn errno(e: &FsError) -> Errno {
    Errno::from_i32(e.errno())
}

fn kind(k: FileKind) -> FileType {
    match k {
        FileKind::File => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::CharDev => FileType::CharDevice,
        FileKind::BlockDev => FileType::BlockDevice,
    }
}

pub(crate) fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks(),
        atime: a.atime.to_system(),
        mtime: a.mtime.to_system(),
        ctime: a.ctime.to_system(),
        crtime: a.crtime.to_system(),
        kind: kind(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: 4096,
        flags: a.flags,
    }
}

fn set_time(t: TimeOrNow) -> SetTime {
    match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(t) => SetTime::At(Timespec::from_system(t)),
    }
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
    }
}

fn bytes(s: &OsStr) -> &[u8] {
    s.as_bytes()
}

impl Adapter {
    /// Runs `f` on the open filesystem (EIO once it is closed).
    fn with<T>(&self, f: impl FnOnce(&mut Fs) -> FsResult<T>) -> Result<T, Errno> {
        self.activity.touch();
        let mut guard = lock(&self.fs);
        let fs = guard.as_mut().ok_or(Errno::EIO)?;
        f(fs).map_err(|e| errno(&e))
    }

    fn entry(&self, reply: ReplyEntry, f: impl FnOnce(&mut Fs) -> FsResult<Attr>) {
        match self.with(f) {
            Ok(a) => {
                self.remember(a.ino);
                reply.entry(&TTL, &file_attr(&a), Generation(a.generation));
            }
            Err(e) => reply.error(e),
        }
    }

    /// The kernel got a reference to `ino` (an entry reply).
    fn remember(&self, ino: u64) {
        *self
            .known
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(ino)
            .or_insert(0) += 1;
    }

    fn empty(&self, reply: ReplyEmpty, f: impl FnOnce(&mut Fs) -> FsResult<()>) {
        match self.with(f) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn xattr_reply(
        &self,
        reply: ReplyXattr,
        size: u32,
        f: impl FnOnce(&mut Fs) -> FsResult<PlainBuf>,
    ) {
        match self.with(f) {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(e),
        }
    }
}

impl Filesystem for Adapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_WRITE);
        // READDIRPLUS: a listing carries each entry's attributes, so `ls -l` and `find` need no
        // LOOKUP per entry (AUTO: the kernel uses it when the listing is followed by stats).
        let plus = InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO;
        // HANDLE_KILLPRIV_V2: we drop set-ID bits and file capabilities on write, truncate and
        // chown (`Fs::drop_privileges`), so the kernel no longer asks for security.capability
        // before every write: one round trip less per write (untar: ~6-17 % faster).
        let killpriv = InitFlags::FUSE_HANDLE_KILLPRIV_V2 & config.capabilities();
        let _ = config.add_capabilities((plus & config.capabilities()) | killpriv);
        self.drops_privileges = !killpriv.is_empty();
        Ok(())
    }

    fn destroy(&mut self) {
        if let Some(fs) = lock(&self.fs).take() {
            let r = fs.close();
            if let Err(e) = &r {
                tracing::error!("closing the vault's filesystem failed: {e}");
            }
            *self.closed.lock().unwrap_or_else(PoisonError::into_inner) = Some(r);
            let tell = self
                .on_close
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            if let Some(tell) = tell {
                tell();
            }
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.entry(reply, |fs| fs.lookup(parent.0, bytes(name)));
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let mut known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = known.get_mut(&ino.0) {
            *n = n.saturating_sub(nlookup);
            if *n == 0 {
                known.remove(&ino.0);
            }
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.with(|fs| fs.getattr(ino.0)) {
            Ok(a) => reply.attr(&TTL, &file_attr(&a)),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let s = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(set_time),
            mtime: mtime.map(set_time),
            ctime: ctime.map(Timespec::from_system),
            crtime: crtime.map(Timespec::from_system),
            flags: flags.map(|f| f.bits()),
            dropper: self.drops_privileges.then(|| Dropper {
                gid: req.gid(),
                // The kernel's own flag for a truncate without CAP_FSETID (FATTR_KILL_SUIDGID)
                // does not reach us through fuser: root stands for holding it.
                may_keep_setid: req.uid() == 0,
            }),
        };
        match self.with(|fs| fs.setattr(ino.0, &s)) {
            Ok(a) => reply.attr(&TTL, &file_attr(&a)),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.with(|fs| fs.readlink(ino.0)) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let mode = mode & !(umask & 0o7777);
        self.entry(reply, |fs| {
            fs.mknod(parent.0, bytes(name), mode, rdev, caller(req))
        });
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let mode = mode & !umask;
        self.entry(reply, |fs| {
            fs.mkdir(parent.0, bytes(name), mode, caller(req))
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.empty(reply, |fs| fs.unlink(parent.0, bytes(name)));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.empty(reply, |fs| fs.rmdir(parent.0, bytes(name)));
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let target = target.as_os_str().as_bytes();
        self.entry(reply, |fs| {
            fs.symlink(parent.0, bytes(link_name), target, caller(req))
        });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        self.empty(reply, |fs| {
            fs.rename(
                parent.0,
                bytes(name),
                newparent.0,
                bytes(newname),
                flags.bits(),
            )
        });
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.entry(reply, |fs| fs.link(ino.0, newparent.0, bytes(newname)));
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.with(|fs| fs.open_file(ino.0)) {
            Ok(fh) => reply.opened(FileHandle(fh), KEEP_CACHE),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.with(|fs| fs.read(ino.0, offset, size)) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let dropper = self.drops_privileges.then(|| Dropper {
            gid: req.gid(),
            // The kernel asks when the writer lacks CAP_FSETID.
            may_keep_setid: !write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID),
        });
        match self.with(|fs| fs.write_by(ino.0, offset, data, dropper)) {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // ENOSYS once, and the kernel stops sending FLUSH (its `no_flush`): close(2) no longer
        // waits for a round trip to us, and nothing happens at close that we need to see.
        // Writes are write-through (no writeback cache), locks are the kernel's, and RELEASE
        // still comes. 5,000 small files, each fsynced: 2,205–2,338 → 2,322–2,439 files/s.
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.empty(reply, |fs| fs.release_file(ino.0));
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _ds: bool, reply: ReplyEmpty) {
        self.empty(reply, Fs::sync);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.with(|fs| fs.opendir(ino.0)) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let mut guard = lock(&self.fs);
        let Some(fs) = guard.as_mut() else {
            return reply.error(Errno::EIO);
        };
        match fs.readdir(fh.0, offset) {
            Ok(entries) => {
                for (i, e) in entries.iter().enumerate() {
                    let next = offset + i as u64 + 1;
                    let name = OsStr::from_bytes(&e.name);
                    if reply.add(INodeNo(e.ino), next, kind(e.kind), name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        mut offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        // Attributes are read in batches; the reply buffer (one page, usually) fills first.
        const BATCH: usize = 64;
        loop {
            let batch = match self.with(|fs| fs.readdir_plus(fh.0, offset, BATCH)) {
                Ok(Some(b)) => b,
                Ok(None) => return reply.ok(),
                Err(e) => return reply.error(e),
            };
            offset += BATCH as u64;
            for (pos, e, a) in &batch {
                let name = OsStr::from_bytes(&e.name);
                let attr = file_attr(a);
                if reply.add(
                    INodeNo(e.ino),
                    pos + 1,
                    name,
                    &TTL,
                    &attr,
                    Generation(a.generation),
                ) {
                    return reply.ok();
                }
                // The kernel takes a reference on every entry but "." and "..".
                if e.name != b"." && e.name != b".." {
                    self.remember(e.ino);
                }
            }
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.empty(reply, |fs| {
            fs.releasedir(fh.0);
            Ok(())
        });
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _ds: bool,
        reply: ReplyEmpty,
    ) {
        self.empty(reply, Fs::sync);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.with(|fs| Ok(fs.statfs())) {
            Ok(s) => reply.statfs(
                s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        position: u32,
        reply: ReplyEmpty,
    ) {
        if position != 0 {
            return reply.error(Errno::EINVAL);
        }
        self.empty(reply, |fs| fs.setxattr(ino.0, bytes(name), value, flags));
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        self.xattr_reply(reply, size, |fs| fs.getxattr(ino.0, bytes(name)));
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.xattr_reply(reply, size, |fs| fs.listxattr(ino.0));
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.empty(reply, |fs| fs.removexattr(ino.0, bytes(name)));
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // Not called with default_permissions, which every mount uses.
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let mode = mode & !umask;
        match self.with(|fs| fs.create_file(parent.0, bytes(name), mode, caller(req))) {
            Ok((a, fh)) => {
                self.remember(a.ino);
                reply.created(
                    &TTL,
                    &file_attr(&a),
                    Generation(a.generation),
                    FileHandle(fh),
                    KEEP_CACHE,
                );
            }
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        self.empty(reply, |fs| fs.fallocate(ino.0, offset, length, mode));
    }
}
