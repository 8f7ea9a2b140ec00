//! Key slots: GENERATE ASYMMETRIC KEY PAIR, IMPORT ASYMMETRIC KEY and the
//! private-key operations of GENERAL AUTHENTICATE (ECDSA sign, ECDH).
//! Only P-256 is implemented; RSA and P-384 answer 6A80 ("algorithm not
//! supported" to the yubikey crate and yubico-piv-tool).

use super::{Session, persist, require_mgm, respond};
use crate::softcard::apdu::{Command, Response, sw};
use crate::softcard::crypto;
use crate::softcard::state::{
    ALG_ECCP256, CardState, Origin, PinPolicy, SlotKey, StateStore, TouchPolicy, is_key_slot,
};
use crate::softcard::tlv::{self, Tlv};

const TAG_DYNAMIC_AUTH: u32 = 0x7C;
const TAG_CHALLENGE: u32 = 0x81;
const TAG_RESPONSE: u32 = 0x82;
const TAG_EXPONENTIATION: u32 = 0x85;
const TAG_GEN_TEMPLATE: u32 = 0xAC;
const TAG_ALGORITHM: u32 = 0x80;
const TAG_PIN_POLICY: u32 = 0xAA;
const TAG_TOUCH_POLICY: u32 = 0xAB;
const TAG_EC_PRIVATE: u32 = 0x06;
const TAG_PUBLIC_KEY: u32 = 0x7F49;
const TAG_EC_POINT: u32 = 0x86;

/// GENERAL AUTHENTICATE (87) with a key slot in P2:
/// `7C { 82 00, 81 <hash> }` signs, `7C { 82 00, 85 <point> }` does ECDH.
pub fn authenticate(
    s: &Session,
    state: &CardState,
    cmd: &Command,
    pin_just_verified: bool,
) -> Response {
    respond((|| {
        if !is_key_slot(cmd.p2) {
            return Err(Response::status(sw::WRONG_P1P2));
        }
        let key = state
            .keys
            .get(&cmd.p2)
            .ok_or(Response::status(sw::NOT_FOUND))?;
        if cmd.p1 != ALG_ECCP256 {
            return Err(Response::status(sw::INCORRECT_DATA));
        }
        let items = tlv::expect_single(&cmd.data, TAG_DYNAMIC_AUTH)
            .and_then(tlv::parse_all)
            .map_err(|_| Response::status(sw::INCORRECT_DATA))?;
        if tlv::find(&items, TAG_RESPONSE) != Some(&[]) {
            return Err(Response::status(sw::INCORRECT_DATA));
        }
        check_pin_policy(s, key.pin_policy, pin_just_verified)?;
        if key.touch_policy != TouchPolicy::Never {
            tracing::info!("touch simulated (slot {:02x})", cmd.p2);
        }
        private_key_operation(key, &items)
    })())
}

fn check_pin_policy(
    s: &Session,
    policy: PinPolicy,
    pin_just_verified: bool,
) -> Result<(), Response> {
    let satisfied = match policy {
        PinPolicy::Never => true,
        PinPolicy::Once => s.pin_verified,
        PinPolicy::Always => s.pin_verified && pin_just_verified,
    };
    if satisfied {
        Ok(())
    } else {
        Err(Response::status(sw::SECURITY_STATUS))
    }
}

fn private_key_operation(key: &SlotKey, items: &[Tlv<'_>]) -> Result<Response, Response> {
    let bad = || Response::status(sw::INCORRECT_DATA);
    let output = if let Some(point) = tlv::find(items, TAG_EXPONENTIATION) {
        crypto::ecdh(&key.secret, point).ok_or_else(bad)?.to_vec()
    } else if let Some(hash) = tlv::find(items, TAG_CHALLENGE) {
        crypto::sign_prehash(&key.secret, hash).ok_or_else(bad)?
    } else {
        return Err(bad());
    };
    Ok(Response::ok(tlv::encode(
        TAG_DYNAMIC_AUTH,
        &tlv::encode(TAG_RESPONSE, &output),
    )))
}

/// GENERATE ASYMMETRIC KEY PAIR (47, P2 slot): `AC { 80 alg [AA pin] [AB touch] }`.
pub fn generate(s: &Session, store: &mut StateStore, cmd: &Command) -> Response {
    respond((|| {
        let slot = writable_slot(s, cmd.p2)?;
        if cmd.p1 != 0 {
            return Err(Response::status(sw::INCORRECT_P1P2));
        }
        let items = tlv::expect_single(&cmd.data, TAG_GEN_TEMPLATE)
            .and_then(tlv::parse_all)
            .map_err(|_| Response::status(sw::INCORRECT_DATA))?;
        if tlv::find(&items, TAG_ALGORITHM) != Some(&[ALG_ECCP256]) {
            return Err(Response::status(sw::INCORRECT_DATA));
        }
        let key = SlotKey {
            secret: crypto::generate_p256(),
            pin_policy: pin_policy(slot, tlv::find(&items, TAG_PIN_POLICY))?,
            touch_policy: touch_policy(tlv::find(&items, TAG_TOUCH_POLICY))?,
            origin: Origin::Generated,
        };
        let point = crypto::public_point(&key.secret);
        persist(store, |state| state.keys.insert(slot, key))?;
        tracing::info!("generated a P-256 key in slot {slot:02x}");
        Ok(Response::ok(public_key_template(&point)))
    })())
}

/// IMPORT ASYMMETRIC KEY (FE, P1 alg, P2 slot): `06 <scalar> [AA pin] [AB touch]`.
pub fn import(s: &Session, store: &mut StateStore, cmd: &Command) -> Response {
    respond((|| {
        let slot = writable_slot(s, cmd.p2)?;
        if cmd.p1 != ALG_ECCP256 {
            return Err(Response::status(sw::INCORRECT_DATA));
        }
        let items = tlv::parse_all(&cmd.data).map_err(|_| Response::status(sw::INCORRECT_DATA))?;
        let secret = tlv::find(&items, TAG_EC_PRIVATE)
            .and_then(crypto::p256_from_scalar)
            .ok_or(Response::status(sw::INCORRECT_DATA))?;
        let key = SlotKey {
            secret,
            pin_policy: pin_policy(slot, tlv::find(&items, TAG_PIN_POLICY))?,
            touch_policy: touch_policy(tlv::find(&items, TAG_TOUCH_POLICY))?,
            origin: Origin::Imported,
        };
        persist(store, |state| state.keys.insert(slot, key))?;
        tracing::info!("imported a P-256 key into slot {slot:02x}");
        Ok(Response::success())
    })())
}

/// A slot a key may be written to, by a host holding the management key.
fn writable_slot(s: &Session, slot: u8) -> Result<u8, Response> {
    if !is_key_slot(slot) {
        return Err(Response::status(sw::WRONG_P1P2));
    }
    require_mgm(s)?;
    Ok(slot)
}

/// `7F 49 <len> 86 41 04‖X‖Y`.
pub fn public_key_template(point: &[u8]) -> Vec<u8> {
    tlv::encode(TAG_PUBLIC_KEY, &tlv::encode(TAG_EC_POINT, point))
}

/// The requested PIN policy, or the slot's YubiKey default: 9C (signature)
/// always asks, 9E (card authentication) never does, the rest ask once.
fn pin_policy(slot: u8, requested: Option<&[u8]>) -> Result<PinPolicy, Response> {
    match requested {
        None | Some([0]) => Ok(match slot {
            0x9C => PinPolicy::Always,
            0x9E => PinPolicy::Never,
            _ => PinPolicy::Once,
        }),
        Some([1]) => Ok(PinPolicy::Never),
        Some([2]) => Ok(PinPolicy::Once),
        Some([3]) => Ok(PinPolicy::Always),
        Some(_) => Err(Response::status(sw::INCORRECT_DATA)),
    }
}

/// The requested touch policy; the default is never.
fn touch_policy(requested: Option<&[u8]>) -> Result<TouchPolicy, Response> {
    match requested {
        None | Some([0]) | Some([1]) => Ok(TouchPolicy::Never),
        Some([2]) => Ok(TouchPolicy::Always),
        Some([3]) => Ok(TouchPolicy::Cached),
        Some(_) => Err(Response::status(sw::INCORRECT_DATA)),
    }
}
