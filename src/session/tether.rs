//! The tether: everything that makes a mounted vault lock itself, gathered
//! into one channel of [`Trigger`]s so the daemon has a single place that
//! decides to lock (DESIGN.md, "Lock procedure").
//!
//! Sources: the token watch (removal, another card, reader or pcscd gone —
//! all fail closed), the termination signals and `keybound lock` (SIGUSR1),
//! and the idle clock, which the daemon checks on its own tick.

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use super::SessionError;
use crate::token::{Presence, TokenName, Watch, next_event};

/// How often the token watch sends a heartbeat. pcscd wakes the watch at
/// once on a change; this only bounds how long a hung pcscd goes unnoticed
/// (three missed heartbeats, see [`next_event`]).
pub const WATCH_POLL: Duration = Duration::from_millis(500);

/// Why a vault locked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockReason {
    /// Unmounted from outside (`keybound unmount`, `umount`): a clean end.
    Unmounted,
    /// `keybound lock` asked for it.
    Command,
    /// SIGTERM, SIGINT or SIGHUP.
    Signal(i32),
    /// The token watch saw something that must lock the vault.
    Token(Presence),
    /// No file activity for this long.
    Idle(Duration),
}

impl LockReason {
    /// A one-line reason for the log, the audit trail and notifications.
    pub fn describe(&self, token: Option<&TokenName>) -> String {
        match self {
            LockReason::Unmounted => "unmounted".into(),
            LockReason::Command => "`keybound lock` was run".into(),
            LockReason::Signal(sig) => format!("signal {} received", signal_name(*sig)),
            LockReason::Token(p) => match token {
                Some(t) => p.describe(t),
                None => format!("{p:?}"),
            },
            LockReason::Idle(d) => format!("no file activity for {} s", d.as_secs()),
        }
    }

    /// A stable machine-readable name, for `--json` and the audit log.
    pub fn kind(&self) -> &'static str {
        match self {
            LockReason::Unmounted => "unmounted",
            LockReason::Command => "lock-command",
            LockReason::Signal(_) => "signal",
            LockReason::Token(Presence::Removed | Presence::Reinserted) => "token-removed",
            LockReason::Token(Presence::DifferentCard { .. }) => "other-card",
            LockReason::Token(Presence::ReaderGone) => "reader-gone",
            LockReason::Token(Presence::ServiceGone | Presence::Present) => "pcscd-gone",
            LockReason::Idle(_) => "idle",
        }
    }
}

fn signal_name(sig: i32) -> String {
    match sig {
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGINT => "SIGINT".into(),
        libc::SIGHUP => "SIGHUP".into(),
        other => format!("{other}"),
    }
}

/// A reason to lock and when the daemon learned of it (the start of the
/// daemon's own share of the lock latency).
#[derive(Debug, Clone)]
pub struct Trigger {
    pub reason: LockReason,
    pub at: Instant,
}

pub type Triggers = mpsc::Sender<Trigger>;

fn send(tx: &Triggers, reason: LockReason) {
    let _ = tx.send(Trigger {
        reason,
        at: Instant::now(),
    });
}

/// Watch the token on a thread; the first event that must lock is sent.
pub fn spawn_token_watch(watch: Watch, tx: Triggers) {
    let events = watch.spawn(WATCH_POLL);
    thread::Builder::new()
        .name("keybound-tether".into())
        .spawn(move || {
            loop {
                let event = next_event(&events, WATCH_POLL);
                if event.must_lock() {
                    send(&tx, LockReason::Token(event));
                    return;
                }
            }
        })
        .expect("spawn the tether thread");
}

/// `keybound lock` signals the daemon with this.
pub const LOCK_SIGNAL: i32 = libc::SIGUSR1;
const WATCHED_SIGNALS: [i32; 4] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, LOCK_SIGNAL];

/// The signals that lock, blocked in every thread so one thread can wait for
/// them with `sigwait`. Create this before starting any other thread: threads
/// inherit the mask.
pub struct Signals {
    set: libc::sigset_t,
}

impl Signals {
    pub fn block() -> Result<Self, SessionError> {
        // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it,
        // and pthread_sigmask only reads it.
        let set = unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for sig in WATCHED_SIGNALS {
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
        Ok(Signals { set })
    }

    /// Wait for the first signal on a thread and send it as a trigger.
    pub fn spawn(self, tx: Triggers) {
        let set = self.set;
        thread::Builder::new()
            .name("keybound-signals".into())
            .spawn(move || {
                let mut sig = 0;
                // SAFETY: `set` is an initialised sigset; `sig` a valid out-pointer.
                if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                    return;
                }
                let reason = if sig == LOCK_SIGNAL {
                    LockReason::Command
                } else {
                    LockReason::Signal(sig)
                };
                send(&tx, reason);
            })
            .expect("spawn the signal thread");
    }
}

/// Tell the desktop, where there is one: best effort, never required.
pub fn notify_desktop(title: &str, body: &str) {
    if std::env::var_os("DBUS_SESSION_BUS_ADDRESS").is_none() {
        return;
    }
    let spawned = std::process::Command::new("notify-send")
        .args(["--app-name=keybound", "--icon=dialog-password", title, body])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    if let Err(e) = spawned {
        tracing::debug!("no desktop notification: {e}");
    }
}
