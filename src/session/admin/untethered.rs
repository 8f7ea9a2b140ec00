//! Serving a vault opened with its recovery key: there is no token to tether
//! to, so the mount locks only on `keybound lock`, SIGTERM/SIGINT/SIGHUP
//! (closing the terminal that runs it) and the idle limit, which is required.
//!
//! This is [`crate::session::daemon::serve`] without the token watch; the
//! lock procedure itself (`MountHandle::lock`) is the same.

use std::path::Path;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use crate::container::Container;
use crate::crypto::MasterKey;
use crate::fs::Fs;
use crate::fuse::{self, MountHandle, MountOptions};
use crate::session::SessionError;
use crate::session::daemon::{Ended, ServeOptions};
use crate::session::registry::{self, MountRecord};
use crate::session::storage::EncryptedStorage;
use crate::session::tether::{self, LockReason, Signals, Trigger};

const TICK: Duration = Duration::from_millis(100);

/// Mount `container` (unlocked with the recovery slot `key_slot`) and serve
/// it until it is unmounted or locks. `options.idle` must be set.
pub fn serve_untethered(
    container: Container,
    master_key: MasterKey,
    mountpoint: &Path,
    key_slot: u8,
    options: &ServeOptions,
    ready: impl FnOnce(&MountRecord),
) -> Result<Ended, SessionError> {
    let Some(idle) = options.idle else {
        return Err(SessionError::Io {
            what: "a recovery-key mount needs an idle limit".into(),
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        });
    };
    let vault = std::fs::canonicalize(container.path()).unwrap_or(container.path().to_path_buf());
    let store = container.into_store(master_key)?;
    let storage = std::sync::Arc::new(EncryptedStorage::new(store));
    let fs = Fs::open(storage, options.read_only).map_err(|e| SessionError::Filesystem {
        vault: vault.clone(),
        detail: e.to_string(),
    })?;
    let signals = Signals::block()?;
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
    signals.spawn(tx);
    let record = MountRecord {
        pid: std::process::id(),
        container: vault.clone(),
        mountpoint: mountpoint.to_path_buf(),
        key_slot,
        token_serial: None,
        read_only: options.read_only,
        since: registry::now(),
        log: options.log.clone(),
        reader: None,
        idle_lock_secs: Some(idle.as_secs()),
    };
    let registration = registry::register(&record);
    if let Err(e) = &registration {
        tracing::warn!("cannot record the mount ({e}); `keybound status` will not list it");
    }
    tracing::warn!(
        vault = %vault.display(),
        mountpoint = %mountpoint.display(),
        "mounted with the recovery key: untethered (locks on `keybound lock`, signals and idle)"
    );
    ready(&record);

    let trigger = wait_for_trigger(&handle, &triggers, idle);
    let why = trigger.reason.describe(None);
    let result = match trigger.reason {
        LockReason::Unmounted => handle.wait(),
        _ => handle.lock(),
    };
    drop(registration);
    let ended = Ended {
        took: trigger.at.elapsed(),
        reason: trigger.reason,
    };
    result.map_err(|e| SessionError::Filesystem {
        vault: vault.clone(),
        detail: format!("{e} (while locking: {why})"),
    })?;
    tracing::info!(vault = %vault.display(), reason = ended.reason.kind(), "locked: {why}; keys wiped");
    if ended.reason != LockReason::Unmounted {
        tether::notify_desktop(
            "keybound: vault locked",
            &format!("{} locked: {why}", vault.display()),
        );
    }
    Ok(ended)
}

fn wait_for_trigger(
    handle: &MountHandle,
    triggers: &mpsc::Receiver<Trigger>,
    idle: Duration,
) -> Trigger {
    loop {
        match triggers.recv_timeout(TICK) {
            Ok(trigger) => return trigger,
            // Fail closed if the signal thread is gone.
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
        if handle.activity().idle_for() >= idle {
            return Trigger {
                reason: LockReason::Idle(idle),
                at: now,
            };
        }
    }
}
