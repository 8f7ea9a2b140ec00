//! Serving an unlocked vault: filesystem on the encrypted store, FUSE mount,
//! a record for `keybound status`, and the tether: the vault locks itself when
//! its token leaves, on `keybound lock`, on SIGTERM/SIGINT/SIGHUP or when idle
//! (see [`super::tether`]), and ends cleanly when unmounted from outside.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use super::registry::{self, MountRecord};
use super::storage::EncryptedStorage;
use super::tether::{self, LockReason, Signals, Trigger};
use super::{SessionError, control, mountpoint};
use crate::container::{Container, FreezeGate};
use crate::crypto::MasterKey;
use crate::fs::{Fs, FsError};
use crate::fuse::{self, MountHandle, MountOptions};
use crate::token::{TokenName, Watch};

pub struct ServeOptions {
    pub read_only: bool,
    pub allow_other: bool,
    /// Where this daemon logs, for the status record.
    pub log: Option<PathBuf>,
    /// Lock after this long without file activity.
    pub idle: Option<Duration>,
}

/// What a mount is tethered to: the token that unlocked it, watched in its reader.
pub struct Tether {
    pub serial: u32,
    pub watch: Watch,
}

/// How the mount ended.
#[derive(Debug, Clone)]
pub struct Ended {
    pub reason: LockReason,
    /// From learning of the reason to the mount being gone and the keys wiped:
    /// the daemon's own share of the lock latency.
    pub took: Duration,
}

/// How often the daemon checks for an outside unmount and the idle clock.
const TICK: Duration = Duration::from_millis(100);

/// Mount `container` (unlocked with `master_key` from key slot `key_slot`) on
/// `mountpoint` and serve it until it is unmounted or locks. `tether` is the
/// token's presence watch; without one (a recovery-key mount) `options.idle`
/// is required. `ready` is called once the mount is usable.
pub fn serve(
    container: Container,
    master_key: MasterKey,
    mountpoint: &Path,
    key_slot: u8,
    tether: Option<Tether>,
    options: &ServeOptions,
    ready: impl FnOnce(&MountRecord),
) -> Result<Ended, SessionError> {
    let vault = std::fs::canonicalize(container.path()).unwrap_or(container.path().to_path_buf());
    if tether.is_none() && options.idle.is_none() {
        // Fail closed: something must be able to lock a mount nobody watches.
        return Err(SessionError::Io {
            what: format!("serving {} without a token", vault.display()),
            source: std::io::Error::other("a mount tethered to no token needs an idle limit"),
        });
    }
    // First, before any thread starts (the store's writeback thread, FUSE, the
    // commit timer, the watch): threads inherit the mask, and a signal meant to
    // lock the vault must not find a thread that would let it kill the process.
    let signals = Signals::block()?;
    let serial = tether.as_ref().map(|t| t.serial);
    let reader = tether.as_ref().map(|t| t.watch.reader());
    let store = container.into_store(master_key)?;
    let gate = store.freeze_gate();
    let storage = std::sync::Arc::new(EncryptedStorage::new(store));
    let fs = Fs::open(storage, options.read_only).map_err(|e| match e {
        // redb replays its last commit on open after a crash; read-only, it cannot.
        FsError::Store(detail)
            if options.read_only && detail == redb::DatabaseError::RepairAborted.to_string() =>
        {
            SessionError::NeedsRecovery {
                vault: vault.clone(),
            }
        }
        FsError::Unreplayed => SessionError::NeedsRecovery {
            vault: vault.clone(),
        },
        other => SessionError::Filesystem {
            vault: vault.clone(),
            detail: other.to_string(),
        },
    })?;
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
    let (tx, triggers) = mpsc::channel();
    if let Some(t) = tether {
        tether::spawn_token_watch(t.watch, tx.clone());
    }
    // An unmount from outside is noticed at once, not at the next tick.
    let unmounted = tx.clone();
    handle.on_close(move || {
        let _ = unmounted.send(Trigger {
            reason: LockReason::Unmounted,
            at: Instant::now(),
        });
    });
    signals.spawn(tx);
    let control = serve_control(&handle, gate.clone());
    let record = MountRecord {
        pid: std::process::id(),
        container: vault.clone(),
        mountpoint: mountpoint.to_path_buf(),
        key_slot,
        token_serial: serial,
        read_only: options.read_only,
        since: registry::now(),
        log: options.log.clone(),
        reader,
        idle_lock_secs: options.idle.map(|d| d.as_secs()),
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
    match serial {
        Some(serial) => tracing::info!(
            vault = %vault.display(), mountpoint = %mountpoint.display(), serial, "mounted"
        ),
        None => tracing::warn!(
            vault = %vault.display(), mountpoint = %mountpoint.display(),
            "mounted untethered (recovery key): locks only on `keybound lock`, signals and idle"
        ),
    }
    ready(&record);

    let trigger = wait_for_trigger(&handle, &triggers, options.idle);
    let token = serial.map(TokenName::serial);
    let why = trigger.reason.describe(token.as_ref());
    if trigger.reason != LockReason::Unmounted {
        tracing::info!(reason = %why, "locking");
    }
    // Locking commits, which writes: a backup's hold gives way (and is told so).
    gate.break_freeze();
    let result = finish(handle, &trigger.reason);
    drop(control);
    drop(registration);
    let ended = Ended {
        took: trigger.at.elapsed(),
        reason: trigger.reason,
    };
    result.map_err(|e| SessionError::Filesystem {
        vault: vault.clone(),
        detail: format!("{e} (while locking: {why})"),
    })?;
    tracing::info!(
        vault = %vault.display(),
        reason = ended.reason.kind(),
        took_ms = %format!("{:.1}", ended.took.as_secs_f64() * 1000.0),
        "locked: {why}; keys wiped"
    );
    if ended.reason != LockReason::Unmounted {
        tether::notify_desktop(
            "keybound: vault locked",
            &format!("{} locked: {why}", vault.display()),
        );
    }
    Ok(ended)
}

/// Listen for backups asking to hold the container still. Without the socket
/// the vault still works; only `keybound backup` of it will say it cannot.
fn serve_control(handle: &MountHandle, gate: Arc<FreezeGate>) -> Option<control::ControlServer> {
    let committer = handle.committer();
    // Committed and settled: the copy shows no unsealed sectors (FORMAT.md §4.9).
    let commit: control::Commit = Box::new(move || {
        committer.commit().map_err(|e| e.to_string())?;
        committer.settle().map_err(|e| e.to_string())
    });
    let socket = registry::control_socket(std::process::id());
    let listening =
        registry::create_mounts_dir().and_then(|_| control::listen(&socket, gate, commit));
    match listening {
        Ok(server) => Some(server),
        Err(e) => {
            tracing::warn!(
                "cannot listen on {}: {e}; `keybound backup` cannot hold this mount",
                socket.display()
            );
            None
        }
    }
}

/// Block until something ends the mount.
fn wait_for_trigger(
    handle: &MountHandle,
    triggers: &mpsc::Receiver<Trigger>,
    idle: Option<Duration>,
) -> Trigger {
    loop {
        match triggers.recv_timeout(TICK) {
            Ok(trigger) => return trigger,
            // Both sources gone cannot happen while we hold a receiver with
            // live senders; fail closed if it does.
            Err(RecvTimeoutError::Disconnected) => {
                return Trigger {
                    reason: LockReason::Command,
                    at: Instant::now(),
                };
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
        let now = Instant::now();
        if handle.is_finished() {
            return Trigger {
                reason: LockReason::Unmounted,
                at: now,
            };
        }
        if let Some(limit) = idle
            && handle.activity().idle_for() >= limit
        {
            return Trigger {
                reason: LockReason::Idle(limit),
                at: now,
            };
        }
    }
}

/// An outside unmount already happened: wait for the filesystem to close.
/// Anything else runs the lock procedure.
fn finish(handle: MountHandle, reason: &LockReason) -> std::io::Result<()> {
    match reason {
        LockReason::Unmounted => handle.wait(),
        _ => handle.lock(),
    }
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

/// Whether `path` is a keybound mount: a FUSE mount whose source is a
/// keybound container (also true of a mount whose daemon died).
pub fn is_keybound_mount(path: &Path) -> bool {
    mountpoint::mount_at(path).is_some_and(|m| is_keybound_entry(&m))
}

pub fn is_keybound_entry(entry: &mountpoint::MountEntry) -> bool {
    (entry.fstype == "fuse" || entry.fstype.starts_with("fuse."))
        && Container::inspect(Path::new(&entry.source)).is_ok()
}
