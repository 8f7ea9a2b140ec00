//! PIN and PUK: VERIFY, CHANGE REFERENCE DATA, RESET RETRY COUNTER, and the
//! Yubico extensions SET PIN RETRIES and RESET.
//!
//! PINs travel padded to 8 bytes with 0xFF. A wrong PIN or PUK decrements its
//! counter, and the decrement is on disk before the card answers, so pulling
//! the card cannot undo it.

use super::{Session, persist, require_mgm, respond};
use crate::softcard::apdu::{Command, Response, sw};
use crate::softcard::state::{CardState, Reference, StateStore};

const P2_PIN: u8 = 0x80;
const P2_PUK: u8 = 0x81;
const PADDED_LEN: usize = 8;
const MIN_LEN: usize = 6;

/// Which reference a command checks.
#[derive(Clone, Copy)]
enum Which {
    Pin,
    Puk,
}

impl Which {
    fn get(self, state: &CardState) -> &Reference {
        match self {
            Which::Pin => &state.pin,
            Which::Puk => &state.puk,
        }
    }

    fn get_mut(self, state: &mut CardState) -> &mut Reference {
        match self {
            Which::Pin => &mut state.pin,
            Which::Puk => &mut state.puk,
        }
    }
}

/// VERIFY (20): check the PIN, ask for the counter (empty data) or forget a
/// verification (P1 FF).
pub fn verify(s: &mut Session, store: &mut StateStore, cmd: &Command) -> Response {
    if cmd.p2 != P2_PIN || !matches!(cmd.p1, 0x00 | 0xFF) {
        return Response::status(sw::INCORRECT_P1P2);
    }
    if cmd.p1 == 0xFF {
        return unverify(s, cmd);
    }
    if cmd.data.is_empty() {
        return pin_status(s, store.get());
    }
    let Some(candidate) = unpad(&cmd.data) else {
        return Response::status(sw::WRONG_LENGTH);
    };
    // A failed attempt also ends an earlier verification, as on a real card.
    s.pin_verified = false;
    respond(check(store, Which::Pin, candidate).map(|()| {
        s.pin_verified = true;
        s.pin_just_verified = true;
        Response::success()
    }))
}

fn unverify(s: &mut Session, cmd: &Command) -> Response {
    if !cmd.data.is_empty() {
        return Response::status(sw::WRONG_LENGTH);
    }
    s.pin_verified = false;
    Response::success()
}

/// VERIFY without data: 9000 if verified, else 63Cx, or 6983 when blocked.
fn pin_status(s: &Session, state: &CardState) -> Response {
    if state.pin.is_blocked() {
        Response::status(sw::AUTH_BLOCKED)
    } else if s.pin_verified {
        Response::success()
    } else {
        Response::status(sw::tries_left(state.pin.tries_left))
    }
}

/// CHANGE REFERENCE DATA (24): old ‖ new for the PIN (P2 80) or PUK (P2 81).
pub fn change_reference(store: &mut StateStore, cmd: &Command) -> Response {
    let which = match (cmd.p1, cmd.p2) {
        (0, P2_PIN) => Which::Pin,
        (0, P2_PUK) => Which::Puk,
        _ => return Response::status(sw::INCORRECT_P1P2),
    };
    respond(change(store, which, &cmd.data).map(|()| Response::success()))
}

fn change(store: &mut StateStore, which: Which, data: &[u8]) -> Result<(), Response> {
    let (old, new) = split_pair(data)?;
    check(store, which, old)?;
    persist(store, |state| {
        let r = which.get_mut(state);
        r.value = new.to_vec().into();
        r.tries_left = r.tries_max;
    })
}

/// RESET RETRY COUNTER (2C): PUK ‖ new PIN unblocks and sets the PIN.
pub fn reset_retry_counter(store: &mut StateStore, cmd: &Command) -> Response {
    if (cmd.p1, cmd.p2) != (0, P2_PIN) {
        return Response::status(sw::INCORRECT_P1P2);
    }
    respond((|| {
        let (puk, new_pin) = split_pair(&cmd.data)?;
        check(store, Which::Puk, puk)?;
        persist(store, |state| {
            state.pin.value = new_pin.to_vec().into();
            state.pin.tries_left = state.pin.tries_max;
        })?;
        Ok(Response::success())
    })())
}

/// SET PIN RETRIES (FA, P1 PIN tries, P2 PUK tries): needs the management
/// key and the PIN; like a YubiKey it resets PIN and PUK to their defaults.
pub fn set_pin_retries(s: &mut Session, store: &mut StateStore, cmd: &Command) -> Response {
    respond((|| {
        require_mgm(s)?;
        if !s.pin_verified {
            return Err(Response::status(sw::SECURITY_STATUS));
        }
        if cmd.p1 == 0 || cmd.p2 == 0 {
            return Err(Response::status(sw::INCORRECT_P1P2));
        }
        persist(store, |state| state.reset_pin_puk(cmd.p1, cmd.p2))?;
        s.pin_verified = false;
        Ok(Response::success())
    })())
}

/// RESET (FB): back to factory state, allowed only once PIN and PUK are
/// both blocked. The serial survives, as on a YubiKey.
pub fn reset(s: &mut Session, store: &mut StateStore, _cmd: &Command) -> Response {
    let state = store.get();
    if !(state.pin.is_blocked() && state.puk.is_blocked()) {
        return Response::status(sw::CONDITIONS_NOT_SATISFIED);
    }
    respond(
        persist(store, |state| *state = CardState::factory(state.serial)).map(|()| {
            s.pin_verified = false;
            s.mgm_authenticated = false;
            Response::success()
        }),
    )
}

/// Compare against the PIN or PUK, counting a wrong attempt. Answers 63Cx on
/// a wrong value (63C0 on the one that uses up the last try, as the PIV
/// spec and a YubiKey do) and 6983 once blocked.
fn check(store: &mut StateStore, which: Which, candidate: &[u8]) -> Result<(), Response> {
    let reference = which.get(store.get());
    if reference.is_blocked() {
        return Err(Response::status(sw::AUTH_BLOCKED));
    }
    if reference.matches(candidate) {
        if reference.tries_left != reference.tries_max {
            persist(store, |state| {
                let r = which.get_mut(state);
                r.tries_left = r.tries_max;
            })?;
        }
        return Ok(());
    }
    let left = persist(store, |state| {
        let r = which.get_mut(state);
        r.tries_left = r.tries_left.saturating_sub(1);
        r.tries_left
    })?;
    Err(Response::status(sw::tries_left(left)))
}

/// Two padded 8-byte values; the second (a new PIN/PUK) must be 6–8 bytes.
fn split_pair(data: &[u8]) -> Result<(&[u8], &[u8]), Response> {
    if data.len() != 2 * PADDED_LEN {
        return Err(Response::status(sw::WRONG_LENGTH));
    }
    let (a, b) = data.split_at(PADDED_LEN);
    let old = unpad(a).ok_or(Response::status(sw::WRONG_LENGTH))?;
    let new = unpad(b).ok_or(Response::status(sw::WRONG_LENGTH))?;
    if new.len() < MIN_LEN {
        return Err(Response::status(sw::INCORRECT_DATA));
    }
    Ok((old, new))
}

/// Strip the 0xFF padding of an 8-byte PIN field.
fn unpad(field: &[u8]) -> Option<&[u8]> {
    if field.len() != PADDED_LEN {
        return None;
    }
    let len = field.iter().rposition(|&b| b != 0xFF).map_or(0, |i| i + 1);
    Some(&field[..len])
}
