//! Data objects: GET DATA and PUT DATA (P1 3F, P2 FF).
//!
//! Objects are stored by tag as the content of their `53` wrapper.
//! Certificates live in 5FC1xx objects, Yubico's admin data in 5FFF00 and
//! the PIN-protected management key in the "printed information" object
//! 5FC109, which therefore needs the PIN to read.

use super::{Session, persist, require_mgm, respond};
use crate::softcard::apdu::{Command, Response, sw};
use crate::softcard::state::{CardState, StateStore};
use crate::softcard::tlv;

const TAG_OBJECT_ID: u32 = 0x5C;
const TAG_DATA: u32 = 0x53;
const OBJ_DISCOVERY: u32 = 0x7E;
const OBJ_PRINTED: u32 = 0x5FC109;
/// Largest object a YubiKey 5 stores (the yubikey crate's CB_OBJ_MAX).
const MAX_OBJECT: usize = 3063;

/// The discovery object of a YubiKey: the PIV AID, and a PIN usage policy
/// saying only the application PIN is supported.
const DISCOVERY: [u8; 20] = [
    0x7E, 0x12, 0x4F, 0x0B, 0xA0, 0x00, 0x00, 0x03, 0x08, 0x00, 0x00, 0x10, 0x00, 0x01, 0x00, 0x5F,
    0x2F, 0x02, 0x40, 0x00,
];

/// GET DATA: `5C <tag>` → `53 <len> <object>`.
pub fn get(s: &Session, state: &CardState, cmd: &Command) -> Response {
    respond((|| {
        check_p1p2(cmd)?;
        let tag = object_tag(&cmd.data)?;
        if tag == OBJ_DISCOVERY {
            return Ok(Response::ok(DISCOVERY.to_vec()));
        }
        if tag == OBJ_PRINTED && !s.pin_verified {
            return Err(Response::status(sw::SECURITY_STATUS));
        }
        let object = state
            .objects
            .get(&tag)
            .ok_or(Response::status(sw::NOT_FOUND))?;
        Ok(Response::ok(tlv::encode(TAG_DATA, object)))
    })())
}

/// PUT DATA: `5C <tag> 53 <len> <object>`; an empty object deletes it.
pub fn put(s: &Session, store: &mut StateStore, cmd: &Command) -> Response {
    respond((|| {
        check_p1p2(cmd)?;
        require_mgm(s)?;
        let bad = || Response::status(sw::INCORRECT_DATA);
        let (id, rest) = tlv::parse_one(&cmd.data).map_err(|_| bad())?;
        let (data, rest) = tlv::parse_one(rest).map_err(|_| bad())?;
        if id.tag != TAG_OBJECT_ID || data.tag != TAG_DATA || !rest.is_empty() {
            return Err(bad());
        }
        let tag = tag_number(id.value)
            .filter(|t| is_writable(*t))
            .ok_or_else(bad)?;
        if data.value.len() > MAX_OBJECT {
            return Err(Response::status(sw::NOT_ENOUGH_MEMORY));
        }
        let value = data.value.to_vec();
        persist(store, |state| {
            if value.is_empty() {
                state.objects.remove(&tag);
            } else {
                state.objects.insert(tag, value);
            }
        })?;
        Ok(Response::success())
    })())
}

fn check_p1p2(cmd: &Command) -> Result<(), Response> {
    if (cmd.p1, cmd.p2) == (0x3F, 0xFF) {
        Ok(())
    } else {
        Err(Response::status(sw::INCORRECT_P1P2))
    }
}

/// The object tag of a GET DATA request (`5C 01 7E`, `5C 03 5F C1 xx`).
fn object_tag(data: &[u8]) -> Result<u32, Response> {
    tlv::expect_single(data, TAG_OBJECT_ID)
        .ok()
        .and_then(tag_number)
        .ok_or(Response::status(sw::INCORRECT_DATA))
}

fn tag_number(bytes: &[u8]) -> Option<u32> {
    if bytes.is_empty() || bytes.len() > 3 {
        return None;
    }
    Some(bytes.iter().fold(0u32, |acc, &b| (acc << 8) | u32::from(b)))
}

/// PIV data objects (5FC101–5FC1FF) and Yubico's (5FFF00–5FFFFF).
fn is_writable(tag: u32) -> bool {
    matches!(tag >> 8, 0x5FC1 | 0x5FFF)
}
