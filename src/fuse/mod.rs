//! The kernel adapter: mounts an [`Fs`] through FUSE (fuser), serves requests on a background
//! thread, and commits on a timer. Thin: every request is one call into [`crate::fs`].
//!
//! Mounts always use `default_permissions` (the kernel checks permissions), `nosuid` and
//! `nodev`; `allow_other` only when asked. Attributes and entries are cached for one second.
//! The commit timer ticks every [`COMMIT_TICK`] and commits changes older than [`COMMIT_AGE`],
//! so an acknowledged write is durable within about one second (plus the commit's own time);
//! `fsync`, `fsyncdir`, unmount and [`MountHandle::sync`] commit at once.

mod adapter;

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fuser::{BackgroundSession, Config, MountOption, Notifier, SessionACL};

use crate::fs::{Fs, FsError, FsResult};
use adapter::{Adapter, KnownInodes, OnClose, SharedFs, lock};

/// How often the timer looks for changes to commit.
pub const COMMIT_TICK: Duration = Duration::from_millis(250);
/// Changes this old are committed at the next tick.
pub const COMMIT_AGE: Duration = Duration::from_millis(750);
/// After this long without a request, with everything committed, the timer thread lets the
/// storage do its idle-time work ([`crate::fs::Storage::work_while_idle`]).
const IDLE_WORK_AFTER: Duration = Duration::from_millis(500);
/// Sectors per step of idle-time work (4 MiB): a request that comes in meanwhile waits for
/// about that long (~10 ms here).
const IDLE_WORK_STEP: u64 = 1024;

/// How to mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountOptions {
    /// Let other users than the mounting one in (the kernel still checks permissions).
    pub allow_other: bool,
    pub read_only: bool,
    /// Shown as the mount's source (use the container path).
    pub fsname: String,
    /// Shown as `fuse.<subtype>`.
    pub subtype: String,
}

impl Default for MountOptions {
    fn default() -> Self {
        Self {
            allow_other: false,
            read_only: false,
            fsname: "keybound".into(),
            subtype: "keybound".into(),
        }
    }
}

/// When the mount last served a request: what an idle lock measures.
#[derive(Debug)]
pub struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }
}

impl Activity {
    pub(crate) fn touch(&self) {
        let now = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(now, Ordering::Relaxed);
    }

    /// How long no request has come in.
    pub fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

/// The commit timer thread and its stop flag.
type Timer = (JoinHandle<()>, Arc<(Mutex<bool>, Condvar)>);

/// Commits a mounted filesystem from any thread, between requests.
#[derive(Clone)]
pub struct Committer(SharedFs);

impl Committer {
    /// Commits now; fails once the filesystem is closed.
    pub fn commit(&self) -> FsResult<()> {
        lock(&self.0)
            .as_mut()
            .map(Fs::commit)
            .unwrap_or(Err(FsError::Failed))
    }

    /// Has the storage finish its idle-time work now, with the filesystem held so that nothing
    /// comes in between: a copy of the container taken next finds none of it pending (for the
    /// encrypted store: no unsealed sectors, which are zeros in the file).
    pub fn settle(&self) -> io::Result<()> {
        let guard = lock(&self.0);
        let Some(fs) = guard.as_ref() else {
            return Ok(());
        };
        let storage = fs.storage();
        while storage.work_while_idle(IDLE_WORK_STEP)? {}
        Ok(())
    }
}

/// A mounted filesystem. Dropping it unmounts (lazily and aborting the connection if the mount
/// is busy), which commits and closes the filesystem.
pub struct MountHandle {
    session: Option<BackgroundSession>,
    fs: SharedFs,
    closed: Arc<Mutex<Option<FsResult<()>>>>,
    on_close: OnClose,
    known: KnownInodes,
    timer: Option<Timer>,
    mountpoint: PathBuf,
    connection: Option<u64>,
    activity: Arc<Activity>,
    /// We aborted the connection: the session ending with ECONNABORTED is expected.
    aborted: bool,
}

impl std::fmt::Debug for MountHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MountHandle")
            .field("mountpoint", &self.mountpoint)
            .field("connection", &self.connection)
            .finish_non_exhaustive()
    }
}

fn config(opts: &MountOptions) -> Config {
    let mut c = Config::default();
    c.mount_options = vec![
        MountOption::FSName(opts.fsname.clone()),
        MountOption::Subtype(opts.subtype.clone()),
        MountOption::DefaultPermissions,
        MountOption::NoSuid,
        MountOption::NoDev,
        if opts.read_only {
            MountOption::RO
        } else {
            MountOption::RW
        },
    ];
    c.n_threads = Some(serving_threads());
    c.acl = if opts.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    c
}

/// How many threads read requests from the kernel. With one, a request waits
/// while the thread writes the previous reply and goes back to the device;
/// with two, untarring 6,069 files took half the time (3.1 s against 6.3 s)
/// and the daemon a third less CPU. The filesystem stays behind one mutex,
/// so more threads than cores only add switching.
fn serving_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 4))
}

/// Mounts `fs` at `mountpoint` and serves it on a background thread.
pub fn mount(fs: Fs, mountpoint: &Path, opts: &MountOptions) -> io::Result<MountHandle> {
    let shared: SharedFs = Arc::new(Mutex::new(Some(fs)));
    let closed = Arc::new(Mutex::new(None));
    let known = KnownInodes::default();
    let activity = Arc::new(Activity::default());
    let on_close = OnClose::default();
    let adapter = Adapter {
        fs: shared.clone(),
        closed: closed.clone(),
        known: known.clone(),
        activity: activity.clone(),
        on_close: on_close.clone(),
        drops_privileges: false,
    };
    let session = fuser::Session::new(adapter, mountpoint, &config(opts))?.spawn()?;
    let connection = connection_id(mountpoint);
    Ok(MountHandle {
        session: Some(session),
        timer: Some(start_timer(shared.clone(), activity.clone())),
        fs: shared,
        closed,
        on_close,
        known,
        mountpoint: mountpoint.to_path_buf(),
        connection,
        activity,
        aborted: false,
    })
}

/// The kernel's id of the FUSE connection mounted at `mountpoint` (its directory name under
/// /sys/fs/fuse/connections): the device number of the topmost mount there, read from
/// /proc/self/mountinfo rather than by `stat`, which would be a request to the filesystem.
fn connection_id(mountpoint: &Path) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = mountpoint.as_os_str().as_bytes();
    table
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let device = fields.nth(2)?;
            let target = fields.nth(1)?;
            (unescape_mountinfo(target) == want).then_some(device)
        })
        .next_back()
        .and_then(|device| {
            let (major, minor) = device.split_once(':')?;
            Some((major.parse::<u64>().ok()? << 20) | minor.parse::<u64>().ok()?)
        })
}

/// mountinfo writes space, tab, newline and backslash in paths as `\ooo` octal escapes.
pub(crate) fn unescape_mountinfo(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            let text = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(text, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    out
}

fn start_timer(fs: SharedFs, activity: Arc<Activity>) -> Timer {
    let stop = Arc::new((Mutex::new(false), Condvar::new()));
    let stop2 = stop.clone();
    let handle = std::thread::Builder::new()
        .name("keybound-commit".into())
        .spawn(move || commit_loop(&fs, &activity, &stop2))
        .expect("spawning the commit timer thread");
    (handle, stop)
}

fn commit_loop(fs: &SharedFs, activity: &Activity, stop: &(Mutex<bool>, Condvar)) {
    // This thread handles plaintext: wipe its stack when it ends.
    crate::secrets::scrub_stack_at_thread_exit();
    let (flag, cv) = stop;
    let stopped = || *flag.lock().unwrap_or_else(PoisonError::into_inner);
    loop {
        let guard = flag.lock().unwrap_or_else(PoisonError::into_inner);
        let (guard, _) = cv
            .wait_timeout_while(guard, COMMIT_TICK, |stopped| !*stopped)
            .unwrap_or_else(PoisonError::into_inner);
        if *guard {
            return;
        }
        drop(guard);
        let idle_storage = {
            let mut guard = lock(fs);
            let Some(fs) = guard.as_mut() else { return };
            if let Err(e) = fs.commit_if_dirty_older_than(COMMIT_AGE) {
                tracing::error!("periodic commit failed: {e}");
            }
            (!fs.is_dirty() && activity.idle_for() >= IDLE_WORK_AFTER).then(|| fs.storage())
        };
        // Without the filesystem held: a request that comes in waits for one step at most, and
        // the next step sees it and stops.
        while let Some(storage) = &idle_storage
            && activity.idle_for() >= IDLE_WORK_AFTER
            && !stopped()
        {
            match storage.work_while_idle(IDLE_WORK_STEP) {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    tracing::error!("idle-time storage work failed: {e}");
                    break;
                }
            }
        }
    }
}

impl MountHandle {
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The FUSE connection id: `/sys/fs/fuse/connections/<id>/abort` aborts it.
    pub fn connection_id(&self) -> Option<u64> {
        self.connection
    }

    /// A notifier to invalidate the kernel's caches (`inval_inode`, `inval_entry`).
    pub fn notifier(&self) -> Option<Notifier> {
        self.session.as_ref().map(BackgroundSession::notifier)
    }

    /// The inodes the kernel holds references to (besides the root, 1): what to invalidate
    /// with [`Notifier::inval_inode`] before aborting, so no cached plaintext stays readable.
    pub fn known_inodes(&self) -> Vec<u64> {
        let known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        known.keys().copied().collect()
    }

    /// When the mount last served a request.
    pub fn activity(&self) -> &Activity {
        &self.activity
    }

    /// Call `tell` once the kernel ends the session and the filesystem is closed (an
    /// unmount from outside), so the owner need not poll [`MountHandle::is_finished`].
    pub fn on_close(&self, tell: impl FnOnce() + Send + 'static) {
        *self.on_close.lock().unwrap_or_else(PoisonError::into_inner) = Some(Box::new(tell));
    }

    /// Whether the session has ended: the mount was unmounted from outside.
    pub fn is_finished(&self) -> bool {
        self.session.as_ref().is_none_or(|s| s.guard.is_finished())
    }

    /// The lock procedure's FUSE half (DESIGN.md, "Lock"), in an order that never lets
    /// plaintext out after it starts:
    ///
    /// 1. take the filesystem away from the request loop, so every later request fails
    ///    with EIO, then commit and close it (what was acknowledged is kept; the store
    ///    and with it keys and caches are dropped and wiped);
    /// 2. invalidate the kernel's page and attribute caches of every inode it knows,
    ///    so a file held open cannot read cached plaintext;
    /// 3. detach the mount and abort the FUSE connection: open handles get errors,
    ///    `ls` of the mountpoint shows the empty directory below.
    ///
    /// Returns the result of the commit.
    pub fn lock(mut self) -> io::Result<()> {
        let taken = lock(&self.fs).take();
        let committed = match taken {
            Some(fs) => fs.close().map_err(|e| io::Error::other(e.to_string())),
            None => Ok(()),
        };
        self.invalidate_kernel_caches();
        self.detach_and_abort();
        if let Err(e) = self.join() {
            tracing::warn!(
                "the FUSE session of {} ended badly: {e}",
                self.mountpoint.display()
            );
        }
        committed
    }

    fn invalidate_kernel_caches(&self) {
        let Some(notifier) = self.notifier() else {
            return;
        };
        let mut inodes = self.known_inodes();
        inodes.push(1);
        for ino in inodes {
            // ENOENT: the kernel already forgot it. Nothing else is expected.
            if let Err(e) = notifier.inval_inode(fuser::INodeNo(ino), 0, 0)
                && e.raw_os_error() != Some(libc::ENOENT)
            {
                tracing::warn!("invalidating inode {ino} failed: {e}");
            }
        }
    }

    /// Runs `f` on the filesystem between requests (None once it is closed).
    pub fn with_fs<R>(&self, f: impl FnOnce(&mut Fs) -> R) -> Option<R> {
        lock(&self.fs).as_mut().map(f)
    }

    /// Commits now.
    pub fn sync(&self) -> FsResult<()> {
        self.committer().commit()
    }

    /// Something another thread can commit the filesystem with (the control socket, before
    /// a backup holds the container still).
    pub fn committer(&self) -> Committer {
        Committer(self.fs.clone())
    }

    /// Waits until the filesystem is unmounted from outside (`umount`, `fusermount3 -u`); the
    /// filesystem is then committed and closed.
    pub fn wait(mut self) -> io::Result<()> {
        self.join()
    }

    /// Unmounts (fails with EBUSY, still mounted, while files are open) and closes.
    pub fn unmount(mut self) -> io::Result<()> {
        umount(&self.mountpoint, 0)?;
        self.join()
    }

    /// Detaches the mount and aborts the FUSE connection: processes holding files get errors
    /// from then on. Then commits and closes.
    pub fn abort(mut self) -> io::Result<()> {
        self.detach_and_abort();
        self.join()
    }

    /// Abort first, then detach: once detached, the kernel may give our connection id to
    /// the next FUSE mount, and a late abort would cut off someone else's filesystem. For the
    /// same reason, abort only while the id still names the mount at our mountpoint.
    fn detach_and_abort(&mut self) {
        match self.connection {
            Some(id) if connection_id(&self.mountpoint) == Some(id) => {
                abort_connection(id);
                self.aborted = true;
            }
            Some(id) => tracing::debug!("connection {id} is no longer mounted; not aborting"),
            None => {}
        }
        if let Err(e) = umount(&self.mountpoint, libc::MNT_DETACH)
            && e.raw_os_error() != Some(libc::EINVAL)
        {
            tracing::warn!("lazy unmount of {} failed: {e}", self.mountpoint.display());
        }
    }

    fn join(&mut self) -> io::Result<()> {
        let served = match self.session.take() {
            Some(s) => s.join(),
            None => Ok(()),
        };
        let served = match served {
            Err(e) if self.aborted && e.raw_os_error() == Some(libc::ECONNABORTED) => Ok(()),
            other => other,
        };
        self.stop_timer();
        // The session normally closed the filesystem in destroy; close it if it did not.
        if let Some(fs) = lock(&self.fs).take() {
            let r = fs.close();
            *self.closed.lock().unwrap_or_else(PoisonError::into_inner) = Some(r);
        }
        let closed = self
            .closed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .unwrap_or(Ok(()));
        served?;
        closed.map_err(|e| io::Error::other(e.to_string()))
    }

    fn stop_timer(&mut self) {
        if let Some((handle, stop)) = self.timer.take() {
            *stop.0.lock().unwrap_or_else(PoisonError::into_inner) = true;
            stop.1.notify_all();
            let _ = handle.join();
        }
    }
}

impl Drop for MountHandle {
    fn drop(&mut self) {
        if self.session.is_some() {
            if umount(&self.mountpoint, 0).is_err() {
                self.detach_and_abort();
            }
            if let Err(e) = self.join() {
                tracing::error!("unmounting {} failed: {e}", self.mountpoint.display());
            }
        }
        self.stop_timer();
    }
}

/// Where the kernel's fusectl filesystem lists FUSE connections.
const FUSECTL: &str = "/sys/fs/fuse/connections";

/// Make every pending and future request of connection `id` fail (fusectl's `abort`).
fn abort_connection(id: u64) {
    let dir = Path::new(FUSECTL).join(id.to_string());
    if !dir.exists() {
        mount_fusectl();
    }
    if let Err(e) = std::fs::write(dir.join("abort"), b"1") {
        tracing::warn!("aborting FUSE connection {id} failed: {e}");
    }
}

/// Mounts fusectl if it is not (needs root; errors are only logged).
fn mount_fusectl() {
    let (src, target, fstype) = (c"fusectl", c"/sys/fs/fuse/connections", c"fusectl");
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        tracing::warn!("mounting fusectl failed: {}", io::Error::last_os_error());
    }
}

/// umount2(2), falling back to `fusermount3 -u` when not allowed (not root).
fn umount(mountpoint: &Path, flags: i32) -> io::Result<()> {
    let c = CString::new(mountpoint.as_os_str().as_bytes())?;
    // SAFETY: c is a valid NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), flags) } == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EPERM) {
        return Err(err);
    }
    let lazy: &[&str] = if flags & libc::MNT_DETACH != 0 {
        &["-z"]
    } else {
        &[]
    };
    let status = std::process::Command::new("fusermount3")
        .arg("-u")
        .args(lazy)
        .arg(mountpoint)
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!("fusermount3 -u failed: {status}")))
    }
}
