//! The card as a reader sees it: an ATR, power events, and APDUs in and out.
//!
//! This layer owns the ISO 7816-4 transport details the applet should not
//! care about: command chaining (CLA bit 0x10), responses longer than a
//! short APDU can carry (61xx + GET RESPONSE), and forgetting the session on
//! power off, power on and reset.

use std::path::Path;

use super::apdu::{CLA_CHAINING, Command, Response, sw};
use super::applet::PivApplet;
use super::error::SoftcardError;
use super::state::{CardState, StateStore};

/// The ATR of a YubiKey 5 (USB, CCID), which advertises T=1.
pub const ATR: [u8; 23] = [
    0x3B, 0xFD, 0x13, 0x00, 0x00, 0x81, 0x31, 0xFE, 0x15, 0x80, 0x73, 0xC0, 0x21, 0xC0, 0x57, 0x59,
    0x75, 0x62, 0x69, 0x4B, 0x65, 0x79, 0x40,
];

const INS_GET_RESPONSE: u8 = 0xC0;
/// A short response carries at most 256 data bytes.
const SHORT_MAX: usize = 256;
/// vpcd frames have a 16-bit length; leave room for SW1 SW2.
const FRAME_DATA_MAX: usize = 0xFFFF - 2;
/// Refuse chains that grow beyond anything PIV needs.
const CHAIN_MAX: usize = 0x10000;

/// A software PIV card: persistent state, applet session, transport buffers.
pub struct Card {
    store: StateStore,
    applet: PivApplet,
    chain: Option<Chain>,
    pending: Option<PendingResponse>,
}

/// The parts of a chained command received so far.
struct Chain {
    header: (u8, u8, u8),
    data: Vec<u8>,
}

/// Response bytes waiting for GET RESPONSE, and the final status word.
struct PendingResponse {
    data: Vec<u8>,
    sw: u16,
}

impl Card {
    /// The card whose state lives in `state_file` (created factory-fresh if
    /// missing; `serial` must match an existing file).
    pub fn open(state_file: &Path, serial: Option<u32>) -> Result<Card, SoftcardError> {
        Ok(Card::with_store(StateStore::open(state_file, serial)?))
    }

    /// A factory-fresh card that is never written to disk.
    pub fn in_memory(serial: u32) -> Card {
        Card::with_store(StateStore::in_memory(CardState::factory(serial)))
    }

    pub fn with_store(store: StateStore) -> Card {
        Card {
            store,
            applet: PivApplet::new(),
            chain: None,
            pending: None,
        }
    }

    pub fn serial(&self) -> u32 {
        self.store.get().serial
    }

    /// The persistent state (for tests and diagnostics).
    pub fn state(&self) -> &CardState {
        self.store.get()
    }

    pub fn atr(&self) -> &'static [u8] {
        &ATR
    }

    pub fn power_off(&mut self) {
        self.forget_session();
    }

    pub fn power_on(&mut self) {
        self.forget_session();
    }

    pub fn reset(&mut self) {
        self.forget_session();
    }

    fn forget_session(&mut self) {
        self.applet.power_cycle();
        self.chain = None;
        self.pending = None;
    }

    /// Process one command APDU and return the response APDU (data + SW).
    /// Never panics, whatever the bytes.
    pub fn transmit(&mut self, raw: &[u8]) -> Vec<u8> {
        let response = match Command::parse(raw) {
            Ok(cmd) => {
                tracing::debug!(
                    "apdu cla={:02x} ins={:02x} p1={:02x} p2={:02x} lc={}",
                    cmd.cla,
                    cmd.ins,
                    cmd.p1,
                    cmd.p2,
                    cmd.data.len()
                );
                self.dispatch(cmd)
            }
            Err(status) => {
                self.chain = None;
                self.pending = None;
                Response::status(status).to_bytes()
            }
        };
        if let [.., sw1, sw2] = response[..] {
            tracing::debug!("apdu sw={sw1:02x}{sw2:02x} len={}", response.len() - 2);
        }
        response
    }

    fn dispatch(&mut self, cmd: Command) -> Vec<u8> {
        if cmd.cla & !CLA_CHAINING != 0 {
            return Response::status(sw::CLA_NOT_SUPPORTED).to_bytes();
        }
        if cmd.ins == INS_GET_RESPONSE {
            return self.get_response(&cmd);
        }
        // Any other command abandons an unread response.
        self.pending = None;
        let cmd = match self.collect_chain(cmd) {
            Ok(Some(cmd)) => cmd,
            Ok(None) => return Response::success().to_bytes(),
            Err(status) => return Response::status(status).to_bytes(),
        };
        let response = self.applet.handle(&mut self.store, &cmd);
        self.send(response, &cmd)
    }

    /// Accumulate chained parts; returns the whole command once the last
    /// part (CLA without bit 0x10) arrives.
    fn collect_chain(&mut self, mut cmd: Command) -> Result<Option<Command>, u16> {
        let header = (cmd.ins, cmd.p1, cmd.p2);
        if let Some(chain) = self.chain.take() {
            if chain.header == header {
                let mut data = chain.data;
                data.extend_from_slice(&cmd.data);
                cmd.data = data;
            } else {
                // A host that gives up on a chain starts over; follow it.
                tracing::debug!("chained command abandoned");
            }
        }
        if cmd.data.len() > CHAIN_MAX {
            return Err(sw::WRONG_LENGTH);
        }
        if cmd.cla & CLA_CHAINING != 0 {
            self.chain = Some(Chain {
                header,
                data: std::mem::take(&mut cmd.data),
            });
            return Ok(None);
        }
        Ok(Some(cmd))
    }

    /// Send what fits; keep the rest for GET RESPONSE. An extended-length
    /// command gets its whole response at once.
    fn send(&mut self, mut response: Response, cmd: &Command) -> Vec<u8> {
        let limit = if cmd.extended {
            cmd.max_response().clamp(SHORT_MAX, FRAME_DATA_MAX)
        } else {
            SHORT_MAX
        };
        if response.data.len() <= limit {
            return response.to_bytes();
        }
        let rest = response.data.split_off(limit);
        let status = more_data(rest.len());
        self.pending = Some(PendingResponse {
            data: rest,
            sw: response.sw,
        });
        Response {
            data: std::mem::take(&mut response.data),
            sw: status,
        }
        .to_bytes()
    }

    /// GET RESPONSE (C0): the next part of a long response.
    fn get_response(&mut self, cmd: &Command) -> Vec<u8> {
        let Some(mut pending) = self.pending.take() else {
            return Response::status(sw::CONDITIONS_NOT_SATISFIED).to_bytes();
        };
        let n = cmd
            .max_response()
            .min(FRAME_DATA_MAX)
            .min(pending.data.len());
        let rest = pending.data.split_off(n);
        let chunk = std::mem::replace(&mut pending.data, rest);
        let status = if pending.data.is_empty() {
            pending.sw
        } else {
            more_data(pending.data.len())
        };
        if !pending.data.is_empty() {
            self.pending = Some(pending);
        }
        Response {
            data: chunk,
            sw: status,
        }
        .to_bytes()
    }
}

/// 61xx: xx more bytes (00 meaning 256 or more).
fn more_data(remaining: usize) -> u16 {
    sw::MORE_DATA | (remaining.min(SHORT_MAX) & 0xFF) as u16
}

#[cfg(test)]
mod tests;
