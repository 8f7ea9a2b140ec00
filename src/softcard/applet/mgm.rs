//! Management key (slot 9B, 3DES): GENERAL AUTHENTICATE and SET MANAGEMENT KEY.
//!
//! Mutual authentication, as the yubikey crate and yubico-piv-tool run it:
//!
//! 1. host `7C 02 80 00`, card picks a witness W and answers
//!    `7C 0A 80 08 enc(W)`;
//! 2. host decrypts, sends `7C 14 80 08 W 81 08 C`; card checks W and
//!    answers `7C 0A 82 08 enc(C)`, which lets the host check the card.
//!
//! The yubikey crate's `get_auth_challenge`/`verify_auth_response` run the
//! one-way variant: `7C 02 81 00` → `7C 0A 81 08 X`, then `7C 0A 82 08 enc(X)`.

use super::{Session, persist, require_mgm, respond};
use crate::softcard::apdu::{Command, Response, sw};
use crate::softcard::crypto::{ct_eq, random_bytes, tdes_encrypt};
use crate::softcard::state::{CardState, StateStore};
use crate::softcard::tlv::{self, Tlv};

/// Key reference of the management key.
pub const SLOT_MGM: u8 = 0x9B;
/// PIV algorithm id of 3DES.
pub const ALG_3DES: u8 = 0x03;

const TAG_DYNAMIC_AUTH: u32 = 0x7C;
const TAG_WITNESS: u32 = 0x80;
const TAG_CHALLENGE: u32 = 0x81;
const TAG_RESPONSE: u32 = 0x82;
const BLOCK: usize = 8;

/// The card's half of an unfinished handshake.
pub enum Pending {
    /// Mutual authentication: the plaintext witness the host must return.
    Witness([u8; BLOCK]),
    /// One-way authentication: the challenge the host must encrypt.
    Challenge([u8; BLOCK]),
}

/// GENERAL AUTHENTICATE (87) with P2 = 9B.
pub fn authenticate(
    s: &mut Session,
    state: &CardState,
    cmd: &Command,
    pending: Option<Pending>,
) -> Response {
    if cmd.p1 != ALG_3DES {
        return Response::status(sw::INCORRECT_DATA);
    }
    let Ok(items) = tlv::expect_single(&cmd.data, TAG_DYNAMIC_AUTH).and_then(tlv::parse_all) else {
        return Response::status(sw::INCORRECT_DATA);
    };
    if state.mgm_touch {
        tracing::info!("touch simulated (management key)");
    }
    let key = &state.mgm_key;
    match step(&items) {
        Step::WitnessRequest => {
            let witness = random_bytes::<BLOCK>();
            s.mgm_pending = Some(Pending::Witness(witness));
            Response::ok(dynamic_auth(TAG_WITNESS, &tdes_encrypt(key, witness)))
        }
        Step::WitnessReply { witness, challenge } => {
            let ok = matches!(pending, Some(Pending::Witness(w)) if ct_eq(&w, &witness));
            s.mgm_authenticated = ok;
            if !ok {
                return Response::status(sw::SECURITY_STATUS);
            }
            Response::ok(dynamic_auth(TAG_RESPONSE, &tdes_encrypt(key, challenge)))
        }
        Step::ChallengeRequest => {
            let challenge = random_bytes::<BLOCK>();
            s.mgm_pending = Some(Pending::Challenge(challenge));
            Response::ok(dynamic_auth(TAG_CHALLENGE, &challenge))
        }
        Step::ChallengeReply { response } => {
            let ok = matches!(pending, Some(Pending::Challenge(c))
                if ct_eq(&tdes_encrypt(key, c), &response));
            s.mgm_authenticated = ok;
            if ok {
                Response::success()
            } else {
                Response::status(sw::SECURITY_STATUS)
            }
        }
        Step::Invalid => Response::status(sw::INCORRECT_DATA),
    }
}

/// What the host sent inside the 7C template.
enum Step {
    WitnessRequest,
    WitnessReply {
        witness: [u8; BLOCK],
        challenge: [u8; BLOCK],
    },
    ChallengeRequest,
    ChallengeReply {
        response: [u8; BLOCK],
    },
    Invalid,
}

fn step(items: &[Tlv<'_>]) -> Step {
    let block = |v: &[u8]| <[u8; BLOCK]>::try_from(v).ok();
    let get = |tag| tlv::find(items, tag);
    match (
        get(TAG_WITNESS),
        get(TAG_CHALLENGE),
        get(TAG_RESPONSE),
        items.len(),
    ) {
        (Some([]), None, None, 1) => Step::WitnessRequest,
        (Some(w), Some(c), None, 2) => match (block(w), block(c)) {
            (Some(witness), Some(challenge)) => Step::WitnessReply { witness, challenge },
            _ => Step::Invalid,
        },
        (None, Some([]), None, 1) => Step::ChallengeRequest,
        (None, None, Some(r), 1) => match block(r) {
            Some(response) => Step::ChallengeReply { response },
            None => Step::Invalid,
        },
        _ => Step::Invalid,
    }
}

/// `7C <len> <tag> 08 <block>`.
fn dynamic_auth(tag: u32, block: &[u8]) -> Vec<u8> {
    tlv::encode(TAG_DYNAMIC_AUTH, &tlv::encode(tag, block))
}

/// SET MANAGEMENT KEY (FF, P1 FF, P2 FF or FE for touch): `03 9B 18 <key>`.
pub fn set_key(s: &mut Session, store: &mut StateStore, cmd: &Command) -> Response {
    respond((|| {
        require_mgm(s)?;
        let touch = match (cmd.p1, cmd.p2) {
            (0xFF, 0xFF) => false,
            (0xFF, 0xFE) => true,
            _ => return Err(Response::status(sw::INCORRECT_P1P2)),
        };
        let key: [u8; 24] = match cmd.data.as_slice() {
            [ALG_3DES, SLOT_MGM, 24, key @ ..] => key
                .try_into()
                .map_err(|_| Response::status(sw::WRONG_LENGTH))?,
            // AES management keys (YubiKey 5.4+) are not implemented.
            _ => return Err(Response::status(sw::INCORRECT_DATA)),
        };
        persist(store, |state| {
            *state.mgm_key = key;
            state.mgm_touch = touch;
        })?;
        Ok(Response::success())
    })())
}
