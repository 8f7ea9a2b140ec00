//! Which vaults are mounted, by whom: one small JSON record per mount daemon
//! in a runtime directory, so `keybound status` can list them and a refused
//! second mount can say who holds the vault.
//!
//! The record is advisory. The container's file lock is what actually keeps a
//! second mount out; a record whose daemon has died is ignored and removed.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// What `keybound status` shows for one mounted vault. Never a secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountRecord {
    /// The mount daemon.
    pub pid: u32,
    pub container: PathBuf,
    pub mountpoint: PathBuf,
    /// The key slot that opened the vault, and its token's serial.
    pub key_slot: u8,
    pub token_serial: Option<u32>,
    pub read_only: bool,
    /// Unix seconds.
    pub since: u64,
    /// Where the daemon logs.
    pub log: Option<PathBuf>,
    /// The reader the token is watched in (the tether).
    #[serde(default)]
    pub reader: Option<String>,
    /// Locks after this many seconds without file activity.
    #[serde(default)]
    pub idle_lock_secs: Option<u64>,
}

/// Where records live: /run/keybound for root, $XDG_RUNTIME_DIR/keybound or
/// /tmp/keybound-UID otherwise. `KEYBOUND_RUNTIME_DIR` overrides (tests).
pub fn runtime_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KEYBOUND_RUNTIME_DIR") {
        return PathBuf::from(dir);
    }
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    if uid == 0 {
        return PathBuf::from("/run/keybound");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) => PathBuf::from(dir).join("keybound"),
        None => PathBuf::from(format!("/tmp/keybound-{uid}")),
    }
}

fn mounts_dir() -> PathBuf {
    runtime_dir().join("mounts")
}

fn create_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// The control socket of the mount daemon `pid` (see [`super::control`]).
pub fn control_socket(pid: u32) -> PathBuf {
    mounts_dir().join(format!("{pid}.sock"))
}

/// Create the directory the records and control sockets live in (0700).
pub fn create_mounts_dir() -> io::Result<PathBuf> {
    let dir = mounts_dir();
    create_private_dir(&dir)?;
    Ok(dir)
}

/// The daemon's log file for a mount (created by the caller).
pub fn log_path(pid: u32) -> io::Result<PathBuf> {
    let dir = runtime_dir().join("logs");
    create_private_dir(&dir)?;
    Ok(dir.join(format!("mount-{pid}.log")))
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A registered mount; the record is removed when this is dropped.
#[derive(Debug)]
pub struct Registration {
    path: PathBuf,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Write `record` (atomically: temp file + rename).
pub fn register(record: &MountRecord) -> io::Result<Registration> {
    let dir = create_mounts_dir()?;
    let path = dir.join(format!("{}.json", record.pid));
    let tmp = dir.join(format!(".{}.json.tmp", record.pid));
    let json = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
    fs::write(&tmp, json)?;
    fs::rename(&tmp, &path)?;
    Ok(Registration { path })
}

/// Every mount whose daemon is alive, oldest first. Records of dead daemons
/// are removed on the way.
pub fn list() -> Vec<MountRecord> {
    let Ok(entries) = fs::read_dir(mounts_dir()) else {
        return Vec::new();
    };
    let mut records: Vec<MountRecord> = entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| {
            let record = read_record(&e.path())?;
            if process_alive(record.pid) {
                Some(record)
            } else {
                let _ = fs::remove_file(e.path());
                None
            }
        })
        .collect();
    records.sort_by_key(|r| (r.since, r.pid));
    records
}

fn read_record(path: &Path) -> Option<MountRecord> {
    serde_json::from_slice(&fs::read(path).ok()?).ok()
}

/// The live mount of `container` (compared by canonical path), if any.
pub fn find_by_container(container: &Path) -> Option<MountRecord> {
    let want = fs::canonicalize(container).ok()?;
    list().into_iter().find(|r| r.container == want)
}

/// The live mount at `mountpoint`, if any.
pub fn find_by_mountpoint(mountpoint: &Path) -> Option<MountRecord> {
    let want = fs::canonicalize(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
    list().into_iter().find(|r| r.mountpoint == want)
}

/// The live mount whose daemon is `pid`, if any.
pub fn find_by_pid(pid: u32) -> Option<MountRecord> {
    list().into_iter().find(|r| r.pid == pid)
}

pub fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    let exists = rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    exists && !is_zombie(pid)
}

/// Wait until process `pid` has exited, at most `timeout`; whether it did.
///
/// Sleeps on a pidfd (Linux 5.3+), which wakes the moment the process ends,
/// so `keybound unmount` returns as soon as the daemon is done instead of at
/// the next tick of a poll. Falls back to polling every 20 ms without pidfds.
pub fn wait_for_exit(pid: u32, timeout: Duration) -> bool {
    let start = Instant::now();
    let pidfd = open_pidfd(pid);
    while process_alive(pid) {
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            return false;
        }
        match &pidfd {
            Some(fd) => {
                let mut p = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1);
                // SAFETY: one valid pollfd. EINTR just loops.
                unsafe { libc::poll(&mut p, 1, ms) };
            }
            None => std::thread::sleep(left.min(Duration::from_millis(20))),
        }
    }
    true
}

/// A descriptor that becomes readable when process `pid` ends (None without
/// pidfds, or if it is already gone).
fn open_pidfd(pid: u32) -> Option<std::os::fd::OwnedFd> {
    let raw = libc::pid_t::try_from(pid).ok()?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor.
    let fd = i32::try_from(unsafe { libc::syscall(libc::SYS_pidfd_open, raw, 0) }).ok()?;
    // SAFETY: `fd` was just returned to us and is closed by the OwnedFd only.
    (fd >= 0).then(|| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// A process that exited but was not reaped yet (state `Z` in /proc/PID/stat).
fn is_zombie(pid: libc::pid_t) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('Z')))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_dead_daemons_vanish() {
        let dir = tempfile::tempdir().unwrap();
        // SAFETY: tests in this module are the only users of this variable.
        unsafe { std::env::set_var("KEYBOUND_RUNTIME_DIR", dir.path()) };
        let me = MountRecord {
            pid: std::process::id(),
            container: dir.path().join("v.kb"),
            mountpoint: dir.path().join("mnt"),
            key_slot: 0,
            token_serial: Some(10000001),
            read_only: false,
            since: now(),
            log: None,
            reader: None,
            idle_lock_secs: None,
        };
        let dead = MountRecord {
            pid: u32::MAX - 1,
            ..me.clone()
        };
        let registration = register(&me).unwrap();
        let _stale = register(&dead).unwrap();
        assert_eq!(list(), vec![me.clone()]);
        assert_eq!(find_by_mountpoint(&me.mountpoint), Some(me.clone()));
        assert_eq!(find_by_pid(me.pid), Some(me));
        drop(registration);
        assert!(list().is_empty());
    }
}
