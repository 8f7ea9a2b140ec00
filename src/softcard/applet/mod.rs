//! The PIV applet of a YubiKey 5 (firmware 5.4.3, 3DES management key):
//! instruction dispatch and the volatile security state of one session.
//!
//! Only whole commands arrive here: chaining and GET RESPONSE are handled by
//! the transport layer in `card.rs`.

mod keys;
mod metadata;
mod mgm;
mod objects;
mod pin;

use super::apdu::{Command, Response, sw};
use super::state::{CardState, StateStore};

/// PIV application identifier (NIST SP 800-73): RID A0 00 00 03 08 + PIX.
pub const PIV_AID: [u8; 11] = [
    0xA0, 0x00, 0x00, 0x03, 0x08, 0x00, 0x00, 0x10, 0x00, 0x01, 0x00,
];
/// The shortest AID prefix that selects PIV (what the yubikey crate sends).
const PIV_AID_MIN: usize = 5;
/// PIV firmware version a YubiKey 5.4.3 reports.
pub const VERSION: [u8; 3] = [5, 4, 3];

const INS_VERIFY: u8 = 0x20;
const INS_CHANGE_REFERENCE: u8 = 0x24;
const INS_RESET_RETRY: u8 = 0x2C;
const INS_GENERATE: u8 = 0x47;
const INS_AUTHENTICATE: u8 = 0x87;
const INS_SELECT: u8 = 0xA4;
const INS_GET_DATA: u8 = 0xCB;
const INS_PUT_DATA: u8 = 0xDB;
const INS_GET_METADATA: u8 = 0xF7;
const INS_GET_SERIAL: u8 = 0xF8;
const INS_ATTEST: u8 = 0xF9;
const INS_SET_PIN_RETRIES: u8 = 0xFA;
const INS_RESET: u8 = 0xFB;
const INS_GET_VERSION: u8 = 0xFD;
const INS_IMPORT_KEY: u8 = 0xFE;
const INS_SET_MGM_KEY: u8 = 0xFF;

/// Security state that a power cycle, a reset or a re-select forgets.
#[derive(Default)]
pub struct Session {
    /// The PIV applet is selected.
    pub selected: bool,
    /// The PIN was verified in this session (PIN policy "once").
    pub pin_verified: bool,
    /// The command just before this one verified the PIN (PIN policy
    /// "always"): set by VERIFY, consumed by whatever command comes next.
    pub pin_just_verified: bool,
    /// The host proved knowledge of the management key.
    pub mgm_authenticated: bool,
    /// The first half of a management-key authentication, waiting for the
    /// second; any other command in between discards it.
    pub mgm_pending: Option<mgm::Pending>,
}

/// The PIV applet: its session plus the instruction handlers.
#[derive(Default)]
pub struct PivApplet {
    session: Session,
}

impl PivApplet {
    pub fn new() -> PivApplet {
        PivApplet::default()
    }

    /// Forget all volatile state (power off, power on, reset).
    pub fn power_cycle(&mut self) {
        self.session = Session::default();
    }

    /// Execute one complete command.
    pub fn handle(&mut self, store: &mut StateStore, cmd: &Command) -> Response {
        // "PIN always" and a half-done management-key handshake only survive
        // until the next command, whatever it is.
        let pin_just_verified = std::mem::take(&mut self.session.pin_just_verified);
        let mgm_pending = self.session.mgm_pending.take();
        if cmd.ins == INS_SELECT {
            return self.select(cmd);
        }
        if !self.session.selected {
            return Response::status(sw::NOT_FOUND);
        }
        let s = &mut self.session;
        match cmd.ins {
            INS_VERIFY => pin::verify(s, store, cmd),
            INS_CHANGE_REFERENCE => pin::change_reference(store, cmd),
            INS_RESET_RETRY => pin::reset_retry_counter(store, cmd),
            INS_SET_PIN_RETRIES => pin::set_pin_retries(s, store, cmd),
            INS_RESET => pin::reset(s, store, cmd),
            INS_AUTHENTICATE if cmd.p2 == mgm::SLOT_MGM => {
                mgm::authenticate(s, store.get(), cmd, mgm_pending)
            }
            INS_AUTHENTICATE => keys::authenticate(s, store.get(), cmd, pin_just_verified),
            INS_SET_MGM_KEY => mgm::set_key(s, store, cmd),
            INS_GENERATE => keys::generate(s, store, cmd),
            INS_IMPORT_KEY => keys::import(s, store, cmd),
            INS_GET_DATA => objects::get(s, store.get(), cmd),
            INS_PUT_DATA => objects::put(s, store, cmd),
            INS_GET_METADATA => metadata::get(store.get(), cmd),
            INS_GET_VERSION => Response::ok(VERSION.to_vec()),
            INS_GET_SERIAL => Response::ok(store.get().serial.to_be_bytes().to_vec()),
            // Attestation needs a Yubico-signed certificate chain we cannot have.
            INS_ATTEST => Response::status(sw::INS_NOT_SUPPORTED),
            _ => Response::status(sw::INS_NOT_SUPPORTED),
        }
    }

    fn select(&mut self, cmd: &Command) -> Response {
        if cmd.p1 != 0x04 {
            return Response::status(sw::INCORRECT_P1P2);
        }
        let aid = &cmd.data;
        let is_piv = aid.len() >= PIV_AID_MIN && PIV_AID.starts_with(aid);
        if !is_piv {
            // Leave the current selection alone, as a card does when a
            // SELECT fails.
            return Response::status(sw::NOT_FOUND);
        }
        // Selecting PIV resets PIN verification: the yubikey crate's
        // get_pin_retries relies on that to read the counter.
        self.session.selected = true;
        self.session.pin_verified = false;
        Response::ok(application_property_template())
    }
}

/// `61 11 4F 06 <PIX> 79 07 4F 05 <RID+PIX start>`, as a YubiKey answers SELECT.
fn application_property_template() -> Vec<u8> {
    use super::tlv;
    let mut inner = Vec::new();
    tlv::push(&mut inner, 0x4F, &PIV_AID[5..]);
    tlv::push(&mut inner, 0x79, &tlv::encode(0x4F, &PIV_AID[..5]));
    tlv::encode(0x61, &inner)
}

/// Apply and persist a state change; a failed write becomes 6581 (memory
/// failure) and leaves the card unchanged.
fn persist<R>(
    store: &mut StateStore,
    change: impl FnOnce(&mut CardState) -> R,
) -> Result<R, Response> {
    store.update(change).map_err(|e| {
        tracing::error!("{e}");
        Response::status(sw::MEMORY_FAILURE)
    })
}

/// 6982 unless the management key was authenticated in this session.
fn require_mgm(s: &Session) -> Result<(), Response> {
    if s.mgm_authenticated {
        Ok(())
    } else {
        Err(Response::status(sw::SECURITY_STATUS))
    }
}

/// Unwrap a handler's early-exit responses.
fn respond(result: Result<Response, Response>) -> Response {
    result.unwrap_or_else(|r| r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn select_answer_is_the_yubikey_template() {
        assert_eq!(
            hex::encode(application_property_template()),
            "61114f0600001000010079074f05a000000308"
        );
    }
}
