//! GET METADATA (F7, P2 slot), in the YubiKey 5.3+ format: a flat list of
//! small TLVs (01 algorithm, 02 policies, 03 origin, 04 public key,
//! 05 is-default, 06 retries). The yubikey crate reads tag 04 only after
//! tag 01, so the order matters.

use super::mgm::{ALG_3DES, SLOT_MGM};
use crate::softcard::apdu::{Command, Response, sw};
use crate::softcard::crypto;
use crate::softcard::state::{
    ALG_ECCP256, CardState, DEFAULT_MGM_KEY, DEFAULT_PIN, DEFAULT_PUK, Reference, is_key_slot,
};
use crate::softcard::tlv;

/// Algorithm byte GET METADATA reports for the PIN and PUK.
const ALG_PIN: u8 = 0xFF;
const SLOT_PIN: u8 = 0x80;
const SLOT_PUK: u8 = 0x81;
const SLOT_ATTESTATION: u8 = 0xF9;

pub fn get(state: &CardState, cmd: &Command) -> Response {
    if cmd.p1 != 0 {
        return Response::status(sw::INCORRECT_P1P2);
    }
    match cmd.p2 {
        SLOT_PIN => Response::ok(reference(&state.pin, DEFAULT_PIN)),
        SLOT_PUK => Response::ok(reference(&state.puk, DEFAULT_PUK)),
        SLOT_MGM => Response::ok(management(state)),
        slot if is_key_slot(slot) => key_slot(state, slot),
        // A YubiKey's attestation key is Yubico's; this card has none.
        SLOT_ATTESTATION => Response::status(sw::NOT_FOUND),
        _ => Response::status(sw::WRONG_P1P2),
    }
}

fn reference(r: &Reference, default: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    tlv::push(&mut out, 0x01, &[ALG_PIN]);
    tlv::push(&mut out, 0x05, &[u8::from(r.matches(default))]);
    tlv::push(&mut out, 0x06, &[r.tries_max, r.tries_left]);
    out
}

fn management(state: &CardState) -> Vec<u8> {
    let touch = if state.mgm_touch { 2 } else { 1 };
    let is_default = crypto::ct_eq(&state.mgm_key[..], &DEFAULT_MGM_KEY);
    let mut out = Vec::new();
    tlv::push(&mut out, 0x01, &[ALG_3DES]);
    tlv::push(&mut out, 0x02, &[0, touch]);
    tlv::push(&mut out, 0x05, &[u8::from(is_default)]);
    out
}

fn key_slot(state: &CardState, slot: u8) -> Response {
    let Some(key) = state.keys.get(&slot) else {
        return Response::status(sw::NOT_FOUND);
    };
    // Tag 04 holds what GENERATE returns inside its 7F49 template.
    let point = tlv::encode(0x86, &crypto::public_point(&key.secret));
    let mut out = Vec::new();
    tlv::push(&mut out, 0x01, &[ALG_ECCP256]);
    tlv::push(
        &mut out,
        0x02,
        &[key.pin_policy as u8, key.touch_policy as u8],
    );
    tlv::push(&mut out, 0x03, &[key.origin as u8]);
    tlv::push(&mut out, 0x04, &point);
    Response::ok(out)
}
