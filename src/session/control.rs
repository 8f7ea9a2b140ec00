//! The mount daemon's control socket: how a backup, which has no key, asks a
//! mounted vault to hold its container file still.
//!
//! One Unix socket per daemon, beside its status record (a 0700 directory;
//! the socket itself 0600), and only the daemon's own user or root is served
//! (checked with `SO_PEERCRED`). The protocol is a line each way:
//!
//! | client    | daemon                                                       |
//! |-----------|--------------------------------------------------------------|
//! | `hold`    | commits, closes the freeze gate: `held`, or `error <why>`    |
//! | `release` | opens it: `released intact`, or `released broken` if the vault began locking meanwhile |
//!
//! A client that goes away (crashes, is killed) releases its hold: a backup
//! can never leave a vault stuck. A hold also ends after [`MAX_HOLD`].

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::container::{FreezeError, FreezeGate, Thawed};

/// The longest a hold lasts; then the daemon releases it (and the client's
/// `release` is answered `broken`).
pub const MAX_HOLD: Duration = Duration::from_secs(3600);

/// How long a client waits for the daemon to commit and hold.
const HOLD_TIMEOUT: Duration = Duration::from_secs(60);

/// Commits the filesystem (and settles the storage) before a hold, so the copy has the latest
/// writes.
pub type Commit = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

/// The listening socket; removed when dropped.
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so its thread ends.
        let _ = UnixStream::connect(&self.path);
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Listen on `path` for hold requests against `gate`.
pub fn listen(path: &Path, gate: Arc<FreezeGate>, commit: Commit) -> io::Result<ControlServer> {
    // A socket file left by a daemon that died is in the way of bind.
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let stop = Arc::new(AtomicBool::new(false));
    let server = ControlServer {
        path: path.to_path_buf(),
        stop: stop.clone(),
    };
    let commit = Arc::new(commit);
    std::thread::Builder::new()
        .name("keybound-control".into())
        .spawn(move || accept_loop(&listener, &stop, &gate, &commit))?;
    Ok(server)
}

fn accept_loop(
    listener: &UnixListener,
    stop: &AtomicBool,
    gate: &Arc<FreezeGate>,
    commit: &Arc<Commit>,
) {
    for stream in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else { continue };
        let (gate, commit) = (gate.clone(), commit.clone());
        let spawned = std::thread::Builder::new()
            .name("keybound-control-client".into())
            .spawn(move || {
                if let Err(e) = serve_client(stream, &gate, &commit) {
                    tracing::warn!("control socket: {e}");
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("control socket: cannot serve a client: {e}");
        }
    }
}

/// The uid of the process at the other end of `stream`.
fn peer_uid(stream: &UnixStream) -> io::Result<u32> {
    use std::os::unix::io::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED fills a `ucred` of the size we pass; both outlive the call.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

fn serve_client(stream: UnixStream, gate: &FreezeGate, commit: &Commit) -> io::Result<()> {
    let uid = peer_uid(&stream)?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let mut reply = stream.try_clone()?;
    if uid != me && uid != 0 {
        writeln!(reply, "error only user {me} or root may hold this vault")?;
        return Ok(());
    }
    let mut lines = BufReader::new(stream);
    let mut line = String::new();
    lines.read_line(&mut line)?;
    if line.trim() != "hold" {
        writeln!(reply, "error unknown request")?;
        return Ok(());
    }
    // A second backup is turned away before the commit, which would wait for
    // the first one's hold while holding the filesystem.
    if gate.is_frozen() {
        writeln!(reply, "error {}", FreezeError::AlreadyFrozen)?;
        return Ok(());
    }
    if let Err(e) = commit() {
        // Still hold: what is committed is consistent; say what was not.
        tracing::warn!("commit before a backup hold failed: {e}");
    }
    let id = match gate.freeze() {
        Ok(id) => id,
        Err(e) => {
            writeln!(reply, "error {e}")?;
            return Ok(());
        }
    };
    let since = Instant::now();
    tracing::info!("container held still for a backup");
    if let Err(e) = writeln!(reply, "held") {
        gate.thaw(id);
        return Err(e);
    }
    lines.get_ref().set_read_timeout(Some(MAX_HOLD))?;
    line.clear();
    let asked = lines.read_line(&mut line);
    let thawed = gate.thaw(id);
    let held_for = since.elapsed();
    match asked {
        Ok(_) if line.trim() == "release" => {
            let word = match thawed {
                Thawed::Intact => "intact",
                Thawed::Broken => "broken",
            };
            tracing::info!(
                held_ms = held_for.as_millis() as u64,
                "backup hold released ({word})"
            );
            writeln!(reply, "released {word}")
        }
        Ok(_) => {
            tracing::warn!("backup client went away while holding the vault; released");
            Ok(())
        }
        Err(e) => {
            tracing::warn!("backup hold ended after {held_for:?}: {e}");
            Ok(())
        }
    }
}

/// A hold on a mounted vault, taken through its daemon's control socket.
#[derive(Debug)]
pub struct DaemonHold {
    stream: UnixStream,
    lines: BufReader<UnixStream>,
}

/// Why a hold through the control socket failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot reach the mount daemon at {socket}: {source}")]
    Connect { socket: PathBuf, source: io::Error },
    #[error("the mount daemon refused to hold the vault: {0}")]
    Refused(String),
    #[error("the mount daemon stopped answering: {0}")]
    Io(#[from] io::Error),
}

impl DaemonHold {
    /// Ask the daemon listening on `socket` to commit and hold its container still.
    pub fn take(socket: &Path) -> Result<DaemonHold, ControlError> {
        let stream = UnixStream::connect(socket).map_err(|source| ControlError::Connect {
            socket: socket.to_path_buf(),
            source,
        })?;
        stream.set_read_timeout(Some(HOLD_TIMEOUT))?;
        let mut lines = BufReader::new(stream.try_clone()?);
        let mut writer = &stream;
        writeln!(writer, "hold")?;
        let mut answer = String::new();
        lines.read_line(&mut answer)?;
        match answer.trim() {
            "held" => Ok(DaemonHold { stream, lines }),
            "" => Err(ControlError::Refused(
                "it closed the connection (is it locking?)".into(),
            )),
            other => Err(ControlError::Refused(
                other.strip_prefix("error ").unwrap_or(other).to_string(),
            )),
        }
    }

    /// Release the hold; `Broken` if the vault began locking (or ended) meanwhile, so the
    /// file may have changed under the copy.
    pub fn release(mut self) -> Thawed {
        let mut writer = &self.stream;
        if writeln!(writer, "release").is_err() {
            return Thawed::Broken;
        }
        let mut answer = String::new();
        match self.lines.read_line(&mut answer) {
            Ok(_) if answer.trim() == "released intact" => Thawed::Intact,
            _ => Thawed::Broken,
        }
    }
}
