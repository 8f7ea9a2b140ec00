//! Watching a token's presence, so a vault can lock the moment it leaves.
//!
//! The watcher asks pcscd for reader state changes (SCardGetStatusChange) and
//! turns them into [`Presence`] events. Anything it cannot explain is reported
//! as a reason to lock: fail closed.

use std::ffi::CString;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use super::readers;
use super::{TokenError, TokenName};

/// What the watcher saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Presence {
    /// Still there, unchanged (a heartbeat).
    Present,
    /// The card left the reader.
    Removed,
    /// The card left and came back, or was reset: the token's session state is
    /// gone, so a vault must treat this like a removal.
    Reinserted,
    /// A different card is in the reader now.
    DifferentCard { serial: Option<u32> },
    /// The reader itself disappeared (a USB token's reader vanishes with it).
    ReaderGone,
    /// pcscd stopped or stopped answering.
    ServiceGone,
}

impl Presence {
    /// Whether a mounted vault must lock on this event.
    pub fn must_lock(&self) -> bool {
        !matches!(self, Presence::Present)
    }

    /// A one-line reason, for logs and the audit trail.
    pub fn describe(&self, token: &TokenName) -> String {
        match self {
            Presence::Present => format!("{token} is present"),
            Presence::Removed => format!("{token} was removed"),
            Presence::Reinserted => format!("{token} was removed and reinserted"),
            Presence::DifferentCard { serial: Some(s) } => {
                format!("{token} was replaced by token {s}")
            }
            Presence::DifferentCard { serial: None } => {
                format!("{token} was replaced by another card")
            }
            Presence::ReaderGone => format!("the reader of {token} disappeared"),
            Presence::ServiceGone => "pcscd stopped or stopped answering".into(),
        }
    }
}

/// Watches one token in one reader.
pub struct Watch {
    ctx: pcsc::Context,
    /// pcscd's state for the reader as we last saw it, event counter included:
    /// the counter moves on every insertion and removal, which is how a swap
    /// that happened between two polls is still seen.
    state: pcsc::ReaderState,
    serial: u32,
    event_count: u32,
}

impl Watch {
    /// Start watching the token `serial` in `reader`. Fails if it is not there now.
    pub fn new(reader: &str, serial: u32) -> Result<Self, TokenError> {
        let ctx = readers::context()?;
        let reader_c = CString::new(reader).map_err(|_| TokenError::NoReader)?;
        let mut states = [pcsc::ReaderState::new(reader_c, pcsc::State::UNAWARE)];
        ctx.get_status_change(Duration::ZERO, &mut states)
            .map_err(|e| TokenError::from_pcsc(e, None))?;
        let [mut state] = states;
        if !state.event_state().contains(pcsc::State::PRESENT) {
            return Err(TokenError::NotFound {
                serial,
                present: "none in that reader".into(),
            });
        }
        state.sync_current_state();
        Ok(Watch {
            ctx,
            event_count: state.event_count(),
            state,
            serial,
        })
    }

    /// The reader this watch is on.
    pub fn reader(&self) -> String {
        self.state.name().to_string_lossy().into_owned()
    }

    /// Block until something changes or `timeout` passes; `Present` on timeout.
    pub fn wait(&mut self, timeout: Duration) -> Presence {
        match self
            .ctx
            .get_status_change(timeout, std::slice::from_mut(&mut self.state))
        {
            Ok(()) => {}
            Err(pcsc::Error::Timeout) => return Presence::Present,
            Err(pcsc::Error::UnknownReader) | Err(pcsc::Error::ReaderUnavailable) => {
                return Presence::ReaderGone;
            }
            // Service gone, invalid context, comm error, cancelled: fail closed.
            Err(_) => return Presence::ServiceGone,
        }
        self.state.sync_current_state();
        let event = self.state.event_state();
        if event.intersects(pcsc::State::UNKNOWN | pcsc::State::UNAVAILABLE | pcsc::State::IGNORE) {
            return Presence::ReaderGone;
        }
        if event.contains(pcsc::State::EMPTY) || !event.contains(pcsc::State::PRESENT) {
            return Presence::Removed;
        }
        if self.state.event_count() != self.event_count {
            return self.identify_new_card();
        }
        Presence::Present
    }

    /// The card was swapped (the event counter moved): whose is it now?
    fn identify_new_card(&self) -> Presence {
        let reader = self.state.name().to_string_lossy();
        match readers::open_yubikey(&reader) {
            Ok(yk) => {
                let serial = u32::from(yk.serial());
                readers::leave(yk);
                if serial == self.serial {
                    Presence::Reinserted
                } else {
                    Presence::DifferentCard {
                        serial: Some(serial),
                    }
                }
            }
            Err(TokenError::NoService) => Presence::ServiceGone,
            Err(_) => Presence::DifferentCard { serial: None },
        }
    }

    /// Run the watch on its own thread. The receiver gets a `Present` heartbeat
    /// every `poll` and, at the end, the event that must lock the vault. If no
    /// message arrives for a few polls, pcscd is hanging: see [`next_event`].
    pub fn spawn(mut self, poll: Duration) -> mpsc::Receiver<Presence> {
        let (tx, rx) = mpsc::channel();
        thread::Builder::new()
            .name("keybound-token-watch".into())
            .spawn(move || {
                loop {
                    let event = self.wait(poll);
                    let last = event.must_lock();
                    if tx.send(event).is_err() || last {
                        break;
                    }
                }
            })
            .expect("spawn the token watch thread");
        rx
    }
}

/// The next event from a spawned watch. Silence for three polls means pcscd
/// stopped answering; a closed channel means the watcher died. Both fail closed.
pub fn next_event(rx: &mpsc::Receiver<Presence>, poll: Duration) -> Presence {
    match rx.recv_timeout(poll * 3 + Duration::from_secs(1)) {
        Ok(event) => event,
        Err(_) => Presence::ServiceGone,
    }
}
