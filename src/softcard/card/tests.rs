//! The card driven directly with APDUs, as a host would, without pcscd.

use super::*;
use crate::softcard::state::DEFAULT_MGM_KEY;
use crate::softcard::{crypto, tlv};
use des::TdesEde3;
use des::cipher::{BlockDecrypt, KeyInit, generic_array::GenericArray};
use p256::ecdsa::signature::hazmat::PrehashVerifier;
use p256::ecdsa::{Signature, VerifyingKey};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const OK: u16 = 0x9000;

/// A short APDU; data longer than 255 bytes is sent as a chain.
fn apdu(ins: u8, p1: u8, p2: u8, data: &[u8]) -> Vec<Vec<u8>> {
    let mut parts: Vec<&[u8]> = data.chunks(255).collect();
    if parts.is_empty() {
        parts.push(&[]);
    }
    let last = parts.len() - 1;
    parts
        .iter()
        .enumerate()
        .map(|(i, part)| {
            let cla = if i == last { 0x00 } else { CLA_CHAINING };
            let mut a = vec![cla, ins, p1, p2];
            if !part.is_empty() {
                a.push(part.len() as u8);
                a.extend_from_slice(part);
            }
            a
        })
        .collect()
}

fn split(resp: &[u8]) -> (Vec<u8>, u16) {
    let n = resp.len() - 2;
    (
        resp[..n].to_vec(),
        u16::from_be_bytes([resp[n], resp[n + 1]]),
    )
}

/// Send a command (chained if long) and collect a long response with GET RESPONSE.
fn send(card: &mut Card, ins: u8, p1: u8, p2: u8, data: &[u8]) -> (Vec<u8>, u16) {
    let mut last = Vec::new();
    for part in apdu(ins, p1, p2, data) {
        last = card.transmit(&part);
    }
    let (mut out, mut status) = split(&last);
    while status >> 8 == 0x61 {
        let (more, s) = split(&card.transmit(&[0, INS_GET_RESPONSE, 0, 0, 0]));
        assert!(more.len() <= 256);
        out.extend(more);
        status = s;
    }
    (out, status)
}

fn pin_field(pin: &[u8]) -> Vec<u8> {
    let mut field = pin.to_vec();
    field.resize(8, 0xFF);
    field
}

fn tdes_decrypt(key: &[u8; 24], block: &[u8]) -> [u8; 8] {
    let mut b = GenericArray::clone_from_slice(block);
    TdesEde3::new(GenericArray::from_slice(key)).decrypt_block(&mut b);
    b.into()
}

fn selected_card() -> Card {
    let mut card = Card::in_memory(12345678);
    card.power_on();
    let (_, status) = send(&mut card, 0xA4, 0x04, 0x00, &crate::softcard::PIV_AID[..5]);
    assert_eq!(status, OK);
    card
}

fn verify_pin(card: &mut Card, pin: &[u8]) -> u16 {
    send(card, 0x20, 0x00, 0x80, &pin_field(pin)).1
}

/// The mutual authentication the yubikey crate runs.
fn authenticate(card: &mut Card, key: &[u8; 24]) -> u16 {
    let (resp, status) = send(card, 0x87, 0x03, 0x9B, &[0x7C, 0x02, 0x80, 0x00]);
    assert_eq!(status, OK);
    assert_eq!(&resp[..4], &[0x7C, 0x0A, 0x80, 0x08]);
    let witness = tdes_decrypt(key, &resp[4..12]);
    let challenge = [7u8; 8];
    let mut data = vec![0x7C, 0x14, 0x80, 0x08];
    data.extend_from_slice(&witness);
    data.extend_from_slice(&[0x81, 0x08]);
    data.extend_from_slice(&challenge);
    let (resp, status) = send(card, 0x87, 0x03, 0x9B, &data);
    if status == OK {
        assert_eq!(&resp[..4], &[0x7C, 0x0A, 0x82, 0x08]);
        assert_eq!(resp[4..12], crypto::tdes_encrypt(key, challenge));
    }
    status
}

fn generate(card: &mut Card, slot: u8, extra: &[u8]) -> (Vec<u8>, u16) {
    let mut data = vec![0xAC, 3 + extra.len() as u8, 0x80, 0x01, 0x11];
    data.extend_from_slice(extra);
    send(card, 0x47, 0x00, slot, &data)
}

fn public_key(resp: &[u8]) -> VerifyingKey {
    assert_eq!(&resp[..5], &[0x7F, 0x49, 0x43, 0x86, 0x41]);
    VerifyingKey::from_sec1_bytes(&resp[5..]).unwrap()
}

fn sign(card: &mut Card, slot: u8, hash: &[u8]) -> (Vec<u8>, u16) {
    let mut data = vec![
        0x7C,
        (hash.len() + 4) as u8,
        0x82,
        0x00,
        0x81,
        hash.len() as u8,
    ];
    data.extend_from_slice(hash);
    send(card, 0x87, 0x11, slot, &data)
}

#[test]
fn version_serial_and_unselected_card() {
    let mut card = Card::in_memory(0x01020304);
    assert_eq!(send(&mut card, 0xFD, 0, 0, &[]).1, sw::NOT_FOUND);
    let (_, status) = send(&mut card, 0xA4, 0x04, 0x00, &[0xA0, 0, 0, 5, 0x27, 0x20, 1]);
    assert_eq!(status, sw::NOT_FOUND);
    let (resp, status) = send(&mut card, 0xA4, 0x04, 0x00, &crate::softcard::PIV_AID);
    assert_eq!((resp[0], status), (0x61, OK));
    assert_eq!(send(&mut card, 0xFD, 0, 0, &[]), (vec![5, 4, 3], OK));
    assert_eq!(send(&mut card, 0xF8, 0, 0, &[]), (vec![1, 2, 3, 4], OK));
    assert_eq!(send(&mut card, 0x42, 0, 0, &[]).1, sw::INS_NOT_SUPPORTED);
    assert_eq!(card.transmit(&[0x80, 0xFD, 0, 0]), [0x6E, 0x00]);
}

#[test]
fn pin_counter_blocks_and_puk_unblocks() {
    let mut card = selected_card();
    assert_eq!(send(&mut card, 0x20, 0, 0x80, &[]).1, 0x63C3);
    assert_eq!(verify_pin(&mut card, b"000000"), 0x63C2);
    assert_eq!(verify_pin(&mut card, b"123456"), OK);
    assert_eq!(send(&mut card, 0x20, 0, 0x80, &[]).1, OK, "verified");
    assert_eq!(
        card.state().pin.tries_left,
        3,
        "right PIN resets the counter"
    );
    // Re-selecting forgets the verification.
    send(&mut card, 0xA4, 0x04, 0x00, &crate::softcard::PIV_AID);
    assert_eq!(send(&mut card, 0x20, 0, 0x80, &[]).1, 0x63C3);
    assert_eq!(verify_pin(&mut card, b"000000"), 0x63C2);
    assert_eq!(verify_pin(&mut card, b"000000"), 0x63C1);
    assert_eq!(verify_pin(&mut card, b"000000"), 0x63C0);
    assert_eq!(verify_pin(&mut card, b"123456"), sw::AUTH_BLOCKED);
    assert_eq!(send(&mut card, 0x20, 0, 0x80, &[]).1, sw::AUTH_BLOCKED);
    // Wrong PUK costs a PUK try; the right one sets a new PIN.
    let mut data = pin_field(b"87654321");
    data.extend(pin_field(b"654321"));
    assert_eq!(send(&mut card, 0x2C, 0, 0x80, &data).1, 0x63C2);
    let mut data = pin_field(b"12345678");
    data.extend(pin_field(b"654321"));
    assert_eq!(send(&mut card, 0x2C, 0, 0x80, &data).1, OK);
    assert_eq!(card.state().puk.tries_left, 3);
    assert_eq!(verify_pin(&mut card, b"654321"), OK);
}

#[test]
fn change_pin_and_reset_when_blocked() {
    let mut card = selected_card();
    let mut data = pin_field(b"123456");
    data.extend(pin_field(b"12"));
    assert_eq!(
        send(&mut card, 0x24, 0, 0x80, &data).1,
        sw::INCORRECT_DATA,
        "new PIN too short"
    );
    let mut data = pin_field(b"123456");
    data.extend(pin_field(b"11112222"));
    assert_eq!(send(&mut card, 0x24, 0, 0x80, &data).1, OK);
    assert_eq!(verify_pin(&mut card, b"11112222"), OK);
    // RESET needs both PIN and PUK blocked.
    assert_eq!(
        send(&mut card, 0xFB, 0, 0, &[]).1,
        sw::CONDITIONS_NOT_SATISFIED
    );
    for _ in 0..3 {
        verify_pin(&mut card, b"999999");
        let mut data = pin_field(b"99999999");
        data.extend(pin_field(b"99999999"));
        send(&mut card, 0x24, 0, 0x81, &data);
    }
    assert_eq!(send(&mut card, 0xFB, 0, 0, &[]).1, OK);
    assert_eq!(card.serial(), 12345678);
    assert_eq!(verify_pin(&mut card, b"123456"), OK);
}

#[test]
fn management_key_authentication() {
    let mut card = selected_card();
    assert_eq!(generate(&mut card, 0x9A, &[]).1, sw::SECURITY_STATUS);
    let wrong = [9u8; 24];
    assert_eq!(authenticate(&mut card, &wrong), sw::SECURITY_STATUS);
    // The second step alone (no witness pending) fails too.
    let mut data = vec![0x7C, 0x14, 0x80, 0x08];
    data.extend([0; 8]);
    data.extend([0x81, 0x08]);
    data.extend([0; 8]);
    assert_eq!(
        send(&mut card, 0x87, 0x03, 0x9B, &data).1,
        sw::SECURITY_STATUS
    );
    assert_eq!(authenticate(&mut card, &DEFAULT_MGM_KEY), OK);
    // Change the key; the old one stops working.
    let new_key = [0x11u8; 24];
    let mut data = vec![0x03, 0x9B, 0x18];
    data.extend(new_key);
    assert_eq!(send(&mut card, 0xFF, 0xFF, 0xFF, &data).1, OK);
    card.reset();
    send(&mut card, 0xA4, 0x04, 0x00, &crate::softcard::PIV_AID);
    assert_eq!(
        authenticate(&mut card, &DEFAULT_MGM_KEY),
        sw::SECURITY_STATUS
    );
    assert_eq!(authenticate(&mut card, &new_key), OK);
}

#[test]
fn one_way_management_key_authentication() {
    let mut card = selected_card();
    let (resp, status) = send(&mut card, 0x87, 0x03, 0x9B, &[0x7C, 0x02, 0x81, 0x00]);
    assert_eq!((status, &resp[..4]), (OK, &[0x7C, 0x0A, 0x81, 0x08][..]));
    let answer = crypto::tdes_encrypt(&DEFAULT_MGM_KEY, resp[4..12].try_into().unwrap());
    let mut data = vec![0x7C, 0x0A, 0x82, 0x08];
    data.extend(answer);
    assert_eq!(send(&mut card, 0x87, 0x03, 0x9B, &data).1, OK);
    assert_eq!(generate(&mut card, 0x82, &[]).1, OK);
}

#[test]
fn generate_sign_ecdh_and_pin_policies() {
    let mut card = selected_card();
    assert_eq!(authenticate(&mut card, &DEFAULT_MGM_KEY), OK);
    assert_eq!(
        generate(&mut card, 0x9B, &[]).1,
        sw::WRONG_P1P2,
        "not a key slot"
    );
    let rsa = [0xAC, 3, 0x80, 1, 0x07];
    assert_eq!(send(&mut card, 0x47, 0, 0x82, &rsa).1, sw::INCORRECT_DATA);

    let (resp, status) = generate(&mut card, 0x82, &[]);
    assert_eq!(status, OK);
    let public = public_key(&resp);
    let hash = [0x5Au8; 32];
    assert_eq!(
        sign(&mut card, 0x82, &hash).1,
        sw::SECURITY_STATUS,
        "PIN once, not verified"
    );
    assert_eq!(verify_pin(&mut card, b"123456"), OK);
    let (resp, status) = sign(&mut card, 0x82, &hash);
    assert_eq!(status, OK);
    assert_eq!(&resp[..1], &[0x7C]);
    let sig = Signature::from_der(&resp[4..]).unwrap();
    public.verify_prehash(&hash, &sig).unwrap();
    // A second use needs no new VERIFY.
    assert_eq!(sign(&mut card, 0x82, &hash).1, OK);

    // ECDH against an ephemeral key.
    let host = crypto::generate_p256();
    let mut data = vec![0x7C, 0x45, 0x82, 0x00, 0x85, 0x41];
    data.extend(crypto::public_point(&host));
    let (resp, status) = send(&mut card, 0x87, 0x11, 0x82, &data);
    assert_eq!(status, OK);
    assert_eq!(&resp[..4], &[0x7C, 0x22, 0x82, 0x20]);
    let card_point = public.to_encoded_point(false);
    assert_eq!(
        resp[4..],
        crypto::ecdh(&host, card_point.as_bytes()).unwrap()
    );
    // A point off the curve.
    let mut bad = data.clone();
    bad[40] ^= 1;
    assert_eq!(
        send(&mut card, 0x87, 0x11, 0x82, &bad).1,
        sw::INCORRECT_DATA
    );
    // Empty slot.
    assert_eq!(sign(&mut card, 0x83, &hash).1, sw::NOT_FOUND);

    // PIN always: only the command right after VERIFY may use the key.
    let (_, status) = generate(&mut card, 0x84, &[0xAA, 0x01, 0x03, 0xAB, 0x01, 0x02]);
    assert_eq!(status, OK);
    assert_eq!(sign(&mut card, 0x84, &hash).1, sw::SECURITY_STATUS);
    assert_eq!(verify_pin(&mut card, b"123456"), OK);
    assert_eq!(sign(&mut card, 0x84, &hash).1, OK);
    assert_eq!(sign(&mut card, 0x84, &hash).1, sw::SECURITY_STATUS);
    // PIN never.
    generate(&mut card, 0x85, &[0xAA, 0x01, 0x01]);
    card.reset();
    send(&mut card, 0xA4, 0x04, 0x00, &crate::softcard::PIV_AID);
    assert_eq!(sign(&mut card, 0x85, &hash).1, OK);
    assert_eq!(sign(&mut card, 0x82, &hash).1, sw::SECURITY_STATUS);
}

#[test]
fn metadata() {
    let mut card = selected_card();
    let (resp, status) = send(&mut card, 0xF7, 0, 0x80, &[]);
    assert_eq!(
        (resp, status),
        (
            hex::decode("0101ff050101060203 03".replace(' ', "")).unwrap(),
            OK
        )
    );
    assert_eq!(verify_pin(&mut card, b"000000"), 0x63C2);
    assert_eq!(send(&mut card, 0xF7, 0, 0x80, &[]).0[9], 2, "tries left");
    let (resp, _) = send(&mut card, 0xF7, 0, 0x9B, &[]);
    assert_eq!(
        resp,
        hex::decode("010103020200010501 01".replace(' ', "")).unwrap()
    );
    assert_eq!(send(&mut card, 0xF7, 0, 0x9A, &[]).1, sw::NOT_FOUND);
    authenticate(&mut card, &DEFAULT_MGM_KEY);
    let (gen_resp, _) = generate(&mut card, 0x9C, &[]);
    let (resp, status) = send(&mut card, 0xF7, 0, 0x9C, &[]);
    assert_eq!(status, OK);
    // Slot 9C defaults to PIN always, like a YubiKey.
    assert_eq!(&resp[..11], &[1, 1, 0x11, 2, 2, 3, 1, 3, 1, 1, 4]);
    assert_eq!(resp[12..], gen_resp[3..]);
}

#[test]
fn data_objects_chaining_and_get_response() {
    let mut card = selected_card();
    let object: Vec<u8> = (0..2000u32).map(|i| i as u8).collect();
    let mut put = vec![0x5C, 0x03, 0x5F, 0xC1, 0x05];
    put.extend(tlv::encode(0x53, &object));
    let get = [0x5C, 0x03, 0x5F, 0xC1, 0x05];
    assert_eq!(
        send(&mut card, 0xDB, 0x3F, 0xFF, &put).1,
        sw::SECURITY_STATUS
    );
    authenticate(&mut card, &DEFAULT_MGM_KEY);
    assert_eq!(
        send(&mut card, 0xDB, 0x3F, 0xFF, &put).1,
        OK,
        "chained PUT DATA"
    );
    let (resp, status) = send(&mut card, 0xCB, 0x3F, 0xFF, &get);
    assert_eq!(status, OK);
    assert_eq!(resp, tlv::encode(0x53, &object));
    // The first part of a long response comes with 61xx.
    let first = card.transmit(&apdu(0xCB, 0x3F, 0xFF, &get)[0]);
    assert_eq!((first.len(), first[256]), (258, 0x61));
    // An extended-length command gets everything at once.
    let mut ext = vec![0x00, 0xCB, 0x3F, 0xFF, 0x00, 0x00, get.len() as u8];
    ext.extend(get);
    ext.extend([0x00, 0x00]);
    let (all, status) = split(&card.transmit(&ext));
    assert_eq!((all, status), (tlv::encode(0x53, &object), OK));
    // Deleting.
    let del = [0x5C, 0x03, 0x5F, 0xC1, 0x05, 0x53, 0x00];
    assert_eq!(send(&mut card, 0xDB, 0x3F, 0xFF, &del).1, OK);
    assert_eq!(send(&mut card, 0xCB, 0x3F, 0xFF, &get).1, sw::NOT_FOUND);
    // Discovery object is built in; the printed object needs the PIN.
    assert_eq!(
        send(&mut card, 0xCB, 0x3F, 0xFF, &[0x5C, 0x01, 0x7E]).0[0],
        0x7E
    );
    let printed = [0x5C, 0x03, 0x5F, 0xC1, 0x09];
    let mut put = printed.to_vec();
    put.extend([0x53, 0x02, 0x88, 0x00]);
    assert_eq!(send(&mut card, 0xDB, 0x3F, 0xFF, &put).1, OK);
    assert_eq!(
        send(&mut card, 0xCB, 0x3F, 0xFF, &printed).1,
        sw::SECURITY_STATUS
    );
    verify_pin(&mut card, b"123456");
    assert_eq!(
        send(&mut card, 0xCB, 0x3F, 0xFF, &printed),
        (vec![0x53, 2, 0x88, 0], OK)
    );
}

#[test]
fn set_pin_retries_needs_mgm_and_pin() {
    let mut card = selected_card();
    assert_eq!(send(&mut card, 0xFA, 5, 6, &[]).1, sw::SECURITY_STATUS);
    authenticate(&mut card, &DEFAULT_MGM_KEY);
    assert_eq!(send(&mut card, 0xFA, 5, 6, &[]).1, sw::SECURITY_STATUS);
    verify_pin(&mut card, b"123456");
    assert_eq!(send(&mut card, 0xFA, 5, 6, &[]).1, OK);
    assert_eq!(
        (card.state().pin.tries_max, card.state().puk.tries_left),
        (5, 6)
    );
}

#[test]
fn power_events_forget_the_session() {
    let mut card = selected_card();
    verify_pin(&mut card, b"123456");
    card.power_off();
    card.power_on();
    assert_eq!(
        send(&mut card, 0x20, 0, 0x80, &[]).1,
        sw::NOT_FOUND,
        "nothing selected"
    );
    send(&mut card, 0xA4, 0x04, 0x00, &crate::softcard::PIV_AID);
    assert_eq!(send(&mut card, 0x20, 0, 0x80, &[]).1, 0x63C3);
}

#[test]
fn import_p256_key() {
    let mut card = selected_card();
    authenticate(&mut card, &DEFAULT_MGM_KEY);
    let secret = crypto::generate_p256();
    let mut data = tlv::encode(0x06, &secret.to_bytes());
    data.extend([0xAA, 0x01, 0x01]);
    assert_eq!(send(&mut card, 0xFE, 0x11, 0x9D, &data).1, OK);
    let (resp, _) = send(&mut card, 0xF7, 0, 0x9D, &[]);
    assert_eq!(
        &resp[3..10],
        &[2, 2, 1, 1, 3, 1, 2],
        "PIN never, touch never, imported"
    );
    let (resp, status) = sign(&mut card, 0x9D, &[1; 32]);
    assert_eq!(status, OK);
    let sig = Signature::from_der(&resp[4..]).unwrap();
    VerifyingKey::from(secret.public_key())
        .verify_prehash(&[1; 32], &sig)
        .unwrap();
}

/// Random, truncated and mutated APDUs in every session state: the card
/// must always answer with at least a status word and never panic.
#[test]
fn never_panics_on_any_bytes() {
    let mut rng = StdRng::seed_from_u64(0x5EED);
    let mut valid: Vec<Vec<u8>> = Vec::new();
    let host = crypto::public_point(&crypto::generate_p256());
    let mut ecdh = vec![0x7C, 0x45, 0x82, 0x00, 0x85, 0x41];
    ecdh.extend(&host);
    for (ins, p1, p2, data) in [
        (0xA4, 4, 0, crate::softcard::PIV_AID.to_vec()),
        (0x20, 0, 0x80, pin_field(b"123456")),
        (0x87, 3, 0x9B, vec![0x7C, 0x02, 0x80, 0x00]),
        (0x47, 0, 0x82, vec![0xAC, 0x03, 0x80, 0x01, 0x11]),
        (0x87, 0x11, 0x82, ecdh),
        (
            0x87,
            0x11,
            0x82,
            vec![0x7C, 0x24, 0x82, 0x00, 0x81, 0x20]
                .into_iter()
                .chain([1; 32])
                .collect(),
        ),
        (0xCB, 0x3F, 0xFF, vec![0x5C, 0x03, 0x5F, 0xC1, 0x0D]),
        (
            0xDB,
            0x3F,
            0xFF,
            vec![0x5C, 0x03, 0x5F, 0xC1, 0x0D, 0x53, 0x01, 0x00],
        ),
        (0xF7, 0, 0x82, vec![]),
        (0xFE, 0x11, 0x83, tlv::encode(0x06, &[3; 32])),
        (
            0xFF,
            0xFF,
            0xFF,
            [3, 0x9B, 0x18].into_iter().chain([1; 24]).collect(),
        ),
        (0x24, 0, 0x81, [b'1'; 16].to_vec()),
        (0x2C, 0, 0x80, [b'1'; 16].to_vec()),
        (0xFA, 3, 3, vec![]),
        (0xC0, 0, 0, vec![]),
    ] {
        valid.extend(apdu(ins, p1, p2, &data));
    }
    for round in 0..20_000 {
        let mut card = Card::in_memory(1);
        if round % 2 == 0 {
            // Reach a deep state first: selected, PIN verified, authenticated, key present.
            card = selected_card();
            verify_pin(&mut card, b"123456");
            authenticate(&mut card, &DEFAULT_MGM_KEY);
            generate(&mut card, 0x82, &[]);
        }
        for _ in 0..8 {
            let msg = match rng.gen_range(0..4) {
                0 => (0..rng.gen_range(0..300)).map(|_| rng.r#gen()).collect(),
                1 => {
                    let v = &valid[rng.gen_range(0..valid.len())];
                    v[..rng.gen_range(0..=v.len())].to_vec()
                }
                2 => {
                    let mut v = valid[rng.gen_range(0..valid.len())].clone();
                    for _ in 0..rng.gen_range(1..4) {
                        let i = rng.gen_range(0..v.len());
                        v[i] = rng.r#gen();
                    }
                    v
                }
                _ => valid[rng.gen_range(0..valid.len())].clone(),
            };
            let resp = card.transmit(&msg);
            assert!(resp.len() >= 2, "{msg:02x?} -> {resp:02x?}");
            assert!(resp.len() <= 258 || msg.get(4) == Some(&0), "{msg:02x?}");
        }
    }
}
