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
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use fuser::{BackgroundSession, Config, MountOption, Notifier, SessionACL};

use crate::fs::{Fs, FsError, FsResult};
use adapter::{Adapter, KnownInodes, SharedFs, lock};

/// How often the timer looks for changes to commit.
pub const COMMIT_TICK: Duration = Duration::from_millis(250);
/// Changes this old are committed at the next tick.
pub const COMMIT_AGE: Duration = Duration::from_millis(750);

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

/// The commit timer thread and its stop flag.
type Timer = (JoinHandle<()>, Arc<(Mutex<bool>, Condvar)>);

/// A mounted filesystem. Dropping it unmounts (lazily and aborting the connection if the mount
/// is busy), which commits and closes the filesystem.
pub struct MountHandle {
    session: Option<BackgroundSession>,
    fs: SharedFs,
    closed: Arc<Mutex<Option<FsResult<()>>>>,
    known: KnownInodes,
    timer: Option<Timer>,
    mountpoint: PathBuf,
    connection: Option<u64>,
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
    c.acl = if opts.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    c
}

/// Mounts `fs` at `mountpoint` and serves it on a background thread.
pub fn mount(fs: Fs, mountpoint: &Path, opts: &MountOptions) -> io::Result<MountHandle> {
    let shared: SharedFs = Arc::new(Mutex::new(Some(fs)));
    let closed = Arc::new(Mutex::new(None));
    let known = KnownInodes::default();
    let adapter = Adapter {
        fs: shared.clone(),
        closed: closed.clone(),
        known: known.clone(),
    };
    let session = fuser::Session::new(adapter, mountpoint, &config(opts))?.spawn()?;
    let connection = connection_id(mountpoint);
    Ok(MountHandle {
        session: Some(session),
        timer: Some(start_timer(shared.clone())),
        fs: shared,
        closed,
        known,
        mountpoint: mountpoint.to_path_buf(),
        connection,
    })
}

/// The kernel's id of the FUSE connection serving `mountpoint` (its directory name under
/// /sys/fs/fuse/connections).
fn connection_id(mountpoint: &Path) -> Option<u64> {
    let dev = std::fs::metadata(mountpoint).ok()?.dev();
    let (major, minor) = (u64::from(libc::major(dev)), u64::from(libc::minor(dev)));
    Some((major << 20) | minor)
}

fn start_timer(fs: SharedFs) -> Timer {
    let stop = Arc::new((Mutex::new(false), Condvar::new()));
    let stop2 = stop.clone();
    let handle = std::thread::Builder::new()
        .name("keybound-commit".into())
        .spawn(move || commit_loop(&fs, &stop2))
        .expect("spawning the commit timer thread");
    (handle, stop)
}

fn commit_loop(fs: &SharedFs, stop: &(Mutex<bool>, Condvar)) {
    let (flag, cv) = stop;
    let mut stopped = flag.lock().unwrap_or_else(PoisonError::into_inner);
    while !*stopped {
        stopped = cv
            .wait_timeout(stopped, COMMIT_TICK)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
        let mut guard = lock(fs);
        let Some(fs) = guard.as_mut() else { return };
        if let Err(e) = fs.commit_if_dirty_older_than(COMMIT_AGE) {
            tracing::error!("periodic commit failed: {e}");
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

    /// Runs `f` on the filesystem between requests (None once it is closed).
    pub fn with_fs<R>(&self, f: impl FnOnce(&mut Fs) -> R) -> Option<R> {
        lock(&self.fs).as_mut().map(f)
    }

    /// Commits now.
    pub fn sync(&self) -> FsResult<()> {
        self.with_fs(Fs::commit).unwrap_or(Err(FsError::Failed))
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

    fn detach_and_abort(&mut self) {
        if let Err(e) = umount(&self.mountpoint, libc::MNT_DETACH) {
            tracing::warn!("lazy unmount of {} failed: {e}", self.mountpoint.display());
        }
        if let Some(id) = self.connection {
            let dir = Path::new(FUSECTL).join(id.to_string());
            if !dir.exists() {
                mount_fusectl();
            }
            if let Err(e) = std::fs::write(dir.join("abort"), b"1") {
                tracing::warn!("aborting FUSE connection {id} failed: {e}");
            }
        }
    }

    fn join(&mut self) -> io::Result<()> {
        let served = match self.session.take() {
            Some(s) => s.join(),
            None => Ok(()),
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
