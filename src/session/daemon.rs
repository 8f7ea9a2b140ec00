//! Serving an unlocked vault: filesystem on the encrypted store, FUSE mount,
//! a record for `keybound status`, and a clean unmount on SIGTERM, SIGINT or
//! SIGHUP (or when someone runs `keybound unmount`).

use std::path::{Path, PathBuf};

use super::registry::{self, MountRecord};
use super::storage::EncryptedStorage;
use super::unlock::Choice;
use super::{SessionError, mountpoint};
use crate::container::Container;
use crate::crypto::MasterKey;
use crate::fs::Fs;
use crate::fuse::{self, MountOptions};

pub struct ServeOptions {
    pub read_only: bool,
    pub allow_other: bool,
    /// Where this daemon logs, for the status record.
    pub log: Option<PathBuf>,
}

/// How the mount ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// Unmounted from outside (`keybound unmount`, `umount`).
    Unmounted,
    /// A signal asked us to stop.
    Signal(i32),
}

/// Mount `container` (unlocked with `master_key`) on `mountpoint` and serve it
/// until it is unmounted. `ready` is called once: with `Ok` when the mount is
/// usable, or never if an error is returned first.
pub fn serve(
    container: Container,
    master_key: MasterKey,
    mountpoint: &Path,
    choice: &Choice,
    options: &ServeOptions,
    ready: impl FnOnce(&MountRecord),
) -> Result<Ended, SessionError> {
    let vault = std::fs::canonicalize(container.path()).unwrap_or(container.path().to_path_buf());
    let store = container.into_store(master_key)?;
    let storage = std::sync::Arc::new(EncryptedStorage::new(store));
    let fs = Fs::open(storage, options.read_only).map_err(|e| SessionError::Filesystem {
        vault: vault.clone(),
        detail: e.to_string(),
    })?;
    let signals = SignalWatch::block()?;
    let mount_options = MountOptions {
        allow_other: options.allow_other,
        read_only: options.read_only,
        fsname: vault.display().to_string(),
        subtype: "keybound".into(),
    };
    let handle =
        fuse::mount(fs, mountpoint, &mount_options).map_err(|source| SessionError::Mount {
            vault: vault.clone(),
            mountpoint: mountpoint.to_path_buf(),
            source,
        })?;
    let record = MountRecord {
        pid: std::process::id(),
        container: vault.clone(),
        mountpoint: mountpoint.to_path_buf(),
        key_slot: choice.slot.index,
        token_serial: Some(choice.serial),
        read_only: options.read_only,
        since: registry::now(),
        log: options.log.clone(),
    };
    let registration = registry::register(&record).map_err(|source| SessionError::Io {
        what: format!(
            "recording the mount in {}",
            registry::runtime_dir().display()
        ),
        source,
    });
    if let Err(e) = &registration {
        tracing::warn!("{e}; `keybound status` will not list this mount");
    }
    tracing::info!(vault = %vault.display(), mountpoint = %mountpoint.display(), "mounted");
    ready(&record);

    let stopper = signals.spawn_unmounter(mountpoint.to_path_buf());
    handle.wait().map_err(|e| SessionError::Filesystem {
        vault: vault.clone(),
        detail: e.to_string(),
    })?;
    drop(registration);
    let ended = match stopper.signal() {
        Some(sig) => Ended::Signal(sig),
        None => Ended::Unmounted,
    };
    tracing::info!(vault = %vault.display(), ?ended, "unmounted; keys wiped");
    Ok(ended)
}

/// Unmount `mountpoint`: cleanly if nothing is open there, else lazily (the
/// mount disappears from the namespace now and ends when the last file closes).
pub fn unmount(mountpoint: &Path, lazy_if_busy: bool) -> std::io::Result<()> {
    match umount(mountpoint, false) {
        Err(e) if lazy_if_busy && e.raw_os_error() == Some(libc::EBUSY) => umount(mountpoint, true),
        other => other,
    }
}

fn umount(mountpoint: &Path, lazy: bool) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return fusermount_unmount(mountpoint, lazy);
    }
    let path = std::ffi::CString::new(mountpoint.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: `path` is a valid NUL-terminated string that outlives the call.
    if unsafe { libc::umount2(path.as_ptr(), flags) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Unprivileged users unmount FUSE mounts through the setuid helper.
fn fusermount_unmount(mountpoint: &Path, lazy: bool) -> std::io::Result<()> {
    let flag = if lazy { "-uz" } else { "-u" };
    let out = std::process::Command::new("fusermount3")
        .arg(flag)
        .arg(mountpoint)
        .output()?;
    if out.status.success() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&out.stderr);
    if text.contains("busy") {
        Err(std::io::Error::from_raw_os_error(libc::EBUSY))
    } else {
        Err(std::io::Error::other(text.trim().to_string()))
    }
}

/// The termination signals, blocked in every thread so that one thread can
/// wait for them with `sigwait` and unmount cleanly.
struct SignalWatch {
    set: libc::sigset_t,
}

const STOP_SIGNALS: [i32; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

impl SignalWatch {
    /// Block the stop signals in this thread; threads started afterwards
    /// (FUSE, commit timer) inherit the mask.
    fn block() -> Result<Self, SessionError> {
        // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it,
        // and pthread_sigmask only reads it.
        let set = unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for sig in STOP_SIGNALS {
                libc::sigaddset(&mut set, sig);
            }
            set
        };
        // SAFETY: as above.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(SessionError::Io {
                what: "blocking termination signals".into(),
                source: std::io::Error::from_raw_os_error(rc),
            });
        }
        Ok(SignalWatch { set })
    }

    fn spawn_unmounter(self, mountpoint: PathBuf) -> Stopper {
        let (tx, rx) = std::sync::mpsc::channel();
        let set = self.set;
        std::thread::spawn(move || {
            let mut sig = 0;
            // SAFETY: `set` is an initialised sigset; `sig` is a valid out-pointer.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                return;
            }
            tracing::info!(signal = sig, "signal received; unmounting");
            let _ = tx.send(sig);
            if let Err(e) = unmount(&mountpoint, true) {
                tracing::error!("cannot unmount {}: {e}", mountpoint.display());
            }
        });
        Stopper { rx }
    }
}

struct Stopper {
    rx: std::sync::mpsc::Receiver<i32>,
}

impl Stopper {
    fn signal(&self) -> Option<i32> {
        self.rx.try_recv().ok()
    }
}

/// Whether `path` is a keybound mount: a FUSE mount whose source is a
/// keybound container (also true of a mount whose daemon died).
pub fn is_keybound_mount(path: &Path) -> bool {
    mountpoint::mount_at(path).is_some_and(|m| is_keybound_entry(&m))
}

pub fn is_keybound_entry(entry: &mountpoint::MountEntry) -> bool {
    (entry.fstype == "fuse" || entry.fstype.starts_with("fuse."))
        && Container::inspect(Path::new(&entry.source)).is_ok()
}
