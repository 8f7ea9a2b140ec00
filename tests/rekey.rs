//! `keybound rekey` end to end, on the real software card, pcscd and FUSE:
//! files survive a rotation; the old master key opens no sector afterwards;
//! an old header backup (with a slot revoked since) opens nothing; other
//! token slots are carried over and activated by their owners; a rotation
//! killed with SIGKILL at random points resumes and loses nothing.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::vault::{
    Fixture, assert_fails, assert_ok, content, s, second_card, stderr, stdout, tree_digests,
};
use keybound::crypto::{KeyPurpose, MasterKey, SectorCipher};
use keybound::secrets::SecretBytes;

/// Exit codes from docs/user-guide.md.
const REKEY_UNFINISHED: i32 = 46;
const SLOT_PENDING: i32 = 47;

const SERIAL_1: u32 = 30_000_601;
const SERIAL_2: u32 = 30_000_602;
const PIN_2: &str = "13572468";
const PASSWORD_2: &str = "second token's password";

/// FORMAT.md §4.1.
const DATA_OFFSET: u64 = 65536;
const SEALED: usize = 4124;

/// A tree of `files` files (a few directories, sizes up to ~300 KiB).
fn write_tree(root: &Path, files: u64) {
    for i in 0..files {
        let dir = root.join(format!("d{}", i % 5)).join(format!("e{}", i % 3));
        fs::create_dir_all(&dir).unwrap();
        let len = ((i * 7919) % 300_000 + 1000) as usize;
        fs::write(dir.join(format!("f{i}.bin")), content(i, len)).unwrap();
    }
}

/// Mount, check the tree is exactly `expected`, unmount.
#[track_caller]
fn assert_tree(
    fx: &Fixture,
    password: &Path,
    pin: &Path,
    extra: &[&str],
    expected: &BTreeMap<PathBuf, String>,
) {
    assert_ok(&fx.mount_with(password, pin, extra));
    let got = tree_digests(&fx.mnt);
    assert_ok(&fx.unmount());
    assert_eq!(got.len(), expected.len(), "file count");
    assert!(&got == expected, "file contents differ after rekey");
}

fn auth<'a>(password: &'a Path, pin: &'a Path) -> Vec<&'a str> {
    vec!["--password-file", s(password), "--pin-file", s(pin)]
}

fn rekey(fx: &Fixture, extra: &[&str]) -> Output {
    let mut args = vec!["rekey", s(&fx.vault), "--json"];
    args.extend(auth(&fx.password, &fx.pin));
    args.extend_from_slice(extra);
    fx.run(&args)
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", stdout(out), stderr(out)))
}

fn dump_key(fx: &Fixture) -> Vec<u8> {
    let out = fx.run(&[
        "dump-key",
        s(&fx.vault),
        "--password-file",
        s(&fx.password),
        "--pin-file",
        s(&fx.pin),
    ]);
    assert_ok(&out);
    hex::decode(stdout(&out).trim()).expect("hex master key")
}

/// How many of the first `n` sealed sectors open with `key` at `epoch`.
fn sectors_opening(vault: &Path, key: &[u8], epoch: u32, n: u64) -> u64 {
    let header = fs::read(vault).unwrap();
    let id: [u8; 16] = header[24..40].try_into().unwrap();
    let mk = MasterKey::from_secret(SecretBytes::from_slice(key).unwrap()).unwrap();
    let cipher = SectorCipher::new(&mk.derive(KeyPurpose::SectorEncryption, &id).unwrap()).unwrap();
    let file = fs::File::open(vault).unwrap();
    let mut opened = 0;
    for sector in 0..n {
        let mut buf = vec![0u8; SEALED];
        file.read_exact_at(&mut buf, DATA_OFFSET + sector * SEALED as u64)
            .unwrap();
        let mut aad = b"keybound v1 sector".to_vec();
        aad.extend_from_slice(&id);
        aad.extend_from_slice(&epoch.to_le_bytes());
        aad.extend_from_slice(&sector.to_le_bytes());
        let nonce: [u8; 12] = buf[..12].try_into().unwrap();
        let tag: [u8; 16] = buf[12 + 4096..].try_into().unwrap();
        if cipher
            .open_in_place(&nonce, &aad, &mut buf[12..12 + 4096], &tag)
            .is_ok()
        {
            opened += 1;
        }
    }
    opened
}

#[test]
fn rekey_keeps_every_file_and_retires_the_old_key() {
    let fx = Fixture::new(SERIAL_1);
    assert_ok(&fx.create(&[]));
    assert_ok(&fx.mount(&[]));
    write_tree(&fx.mnt, 40);
    let expected = tree_digests(&fx.mnt);
    assert_ok(&fx.unmount());
    let old_key = dump_key(&fx);
    let backup = fx.path("header.bak");
    assert_ok(&fx.run(&["header", "backup", s(&fx.vault), s(&backup)]));
    let extent = fx.info_json(&fx.vault)["extent_sectors"].as_u64().unwrap();
    assert!(extent > 1000, "a few MiB were written: {extent} sectors");
    assert_eq!(sectors_opening(&fx.vault, &old_key, 0, extent), extent);

    // Refused while mounted, before anything is asked.
    assert_ok(&fx.mount(&[]));
    let out = rekey(&fx, &[]);
    assert_fails(&out, 22, &["mounted", "unmount"]);
    assert_ok(&fx.unmount());

    let out = rekey(&fx, &[]);
    assert_ok(&out);
    let summary = json(&out);
    assert_eq!(summary["old_epoch"], 0);
    assert_eq!(summary["new_epoch"], 1);
    assert_eq!(summary["sectors"].as_u64(), Some(extent));
    assert_eq!(summary["damaged_sectors"].as_array().unwrap().len(), 0);
    assert_eq!(summary["rewrapped_slots"], serde_json::json!([0]));
    eprintln!(
        "rekey: {extent} sectors in {:.2} s = {:.0} MiB/s",
        summary["seconds"].as_f64().unwrap(),
        summary["mib_per_s"].as_f64().unwrap()
    );
    let h = fx.info_json(&fx.vault);
    assert_eq!(h["key_epoch"], 1);
    assert!(h["rekey_in_progress"].is_null());
    assert_eq!(h["seal_budget_reserved"].as_u64(), Some(extent));

    assert_tree(&fx, &fx.password, &fx.pin, &[], &expected);

    // The old key opens no sector (at either epoch); the new one opens all.
    let new_key = dump_key(&fx);
    assert_ne!(new_key, old_key);
    let extent = fx.info_json(&fx.vault)["extent_sectors"].as_u64().unwrap();
    assert_eq!(sectors_opening(&fx.vault, &old_key, 0, extent), 0);
    assert_eq!(sectors_opening(&fx.vault, &old_key, 1, extent), 0);
    assert_eq!(sectors_opening(&fx.vault, &new_key, 1, extent), extent);
    // Nothing past the data area is left behind (the journal is cut off).
    assert_eq!(
        fs::metadata(&fx.vault).unwrap().len(),
        DATA_OFFSET + extent * SEALED as u64
    );

    // The header from before the rotation opens the old key only: nothing mounts.
    let out = fx.run(&[
        "header",
        "restore",
        s(&fx.vault),
        s(&backup),
        "--yes",
        "--force",
    ]);
    assert_ok(&out);
    let out = fx.mount(&[]);
    assert!(
        !out.status.success(),
        "the pre-rekey header must not mount the vault"
    );
    assert!(!fx.is_mounted());
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
}

#[test]
fn other_slots_are_carried_over_and_a_revoked_slot_in_an_old_header_opens_nothing() {
    let fx = Fixture::new(SERIAL_1);
    assert_ok(&fx.create(&[]));
    let _card2 = second_card(&fx, SERIAL_2, PIN_2);
    let (pw1, pin1) = (fx.password.clone(), fx.pin.clone());
    let pw2 = fx.secret("pw2", PASSWORD_2);
    let pin2 = fx.secret("pin2", PIN_2);
    let mut args = vec![
        "enroll",
        s(&fx.vault),
        "--serial",
        "30000602",
        "--new-password-file",
        s(&pw2),
    ];
    args.extend_from_slice(&["--new-pin-file", s(&pin2), "--kdf-time", "50ms"]);
    args.extend(auth(&pw1, &pin1));
    args.extend_from_slice(&["--admin-slot", "0"]);
    assert_ok(&fx.run(&args));
    assert_ok(&fx.mount_with(&pw1, &pin1, &["--serial", "30000601"]));
    write_tree(&fx.mnt, 12);
    let expected = tree_digests(&fx.mnt);
    assert_ok(&fx.unmount());

    // Rotation authorised by card 1: slot 1 (card 2) is carried over by a link.
    let out = rekey(&fx, &["--admin-slot", "0"]);
    assert_ok(&out);
    let summary = json(&out);
    assert_eq!(summary["rewrapped_slots"], serde_json::json!([0]));
    assert_eq!(summary["pending_slots"], serde_json::json!([1]));
    assert_eq!(
        fx.info_json(&fx.vault)["pending_slots"],
        serde_json::json!([1])
    );

    // Until its owner activates it, slot 1 does not mount, and says why.
    let out = fx.mount_with(&pw2, &pin2, &["--serial", "30000602"]);
    assert_fails(&out, SLOT_PENDING, &["rekey", "--activate"]);
    // A second rotation would strand it: refused until it is activated.
    assert_fails(
        &rekey(&fx, &["--admin-slot", "0"]),
        43,
        &["await activation"],
    );
    // A wrong password does not activate it.
    let wrong = fx.secret("wrong", "not the password");
    let act = |pw: &Path| {
        let mut a = vec!["rekey", s(&fx.vault), "--activate", "--slot", "1"];
        a.extend(auth(pw, &pin2));
        fx.run(&a)
    };
    assert_fails(&act(&wrong), 20, &["password"]);
    assert_ok(&act(&pw2));
    assert!(
        fx.info_json(&fx.vault)["pending_slots"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert_tree(&fx, &pw2, &pin2, &["--serial", "30000602"], &expected);
    assert_ok(&fx.mount_with(&pw1, &pin1, &["--serial", "30000601"]));
    assert_ok(&fx.unmount());

    // Card 2 is lost. An old header copy keeps its slot: revoke, then rekey.
    let backup = fx.path("with-card2.bak");
    assert_ok(&fx.run(&["header", "backup", s(&fx.vault), s(&backup)]));
    let mut args = vec!["revoke", s(&fx.vault), "--slot", "1", "--admin-slot", "0"];
    args.extend(auth(&pw1, &pin1));
    assert_ok(&fx.run(&args));
    // Without the rotation, the old header would still open the vault with card 2:
    // check on a copy of the file.
    let copy = fx.path("copy.kb");
    fs::copy(&fx.vault, &copy).unwrap();
    let out = fx.run(&["header", "restore", s(&copy), s(&backup), "--yes"]);
    assert_ok(&out);
    let key2 = {
        let out = fx.run(&[
            "dump-key",
            s(&copy),
            "--serial",
            "30000602",
            "--password-file",
            s(&pw2),
            "--pin-file",
            s(&pin2),
        ]);
        assert_ok(&out);
        hex::decode(stdout(&out).trim()).unwrap()
    };
    let extent = fx.info_json(&fx.vault)["extent_sectors"].as_u64().unwrap();
    assert_eq!(
        sectors_opening(&copy, &key2, 1, extent),
        extent,
        "revocation alone protects nothing here"
    );

    assert_ok(&rekey(&fx, &["--admin-slot", "0"]));
    assert_tree(&fx, &pw1, &pin1, &["--serial", "30000601"], &expected);
    let extent = fx.info_json(&fx.vault)["extent_sectors"].as_u64().unwrap();
    assert_eq!(sectors_opening(&fx.vault, &key2, 1, extent), 0);
    assert_eq!(sectors_opening(&fx.vault, &key2, 2, extent), 0);
    // The attacker restores the old header into the rotated vault: card 2
    // opens its slot again, but the key it gets opens no sector.
    assert_ok(&fx.run(&[
        "header",
        "restore",
        s(&fx.vault),
        s(&backup),
        "--yes",
        "--force",
    ]));
    let out = fx.mount_with(&pw2, &pin2, &["--serial", "30000602"]);
    assert!(
        !out.status.success(),
        "the old header must not open the rotated vault"
    );
    assert!(!fx.is_mounted());
}

/// Wait (polling) until `child` exits or `deadline` passes; true if it exited.
fn wait_child(child: &mut std::process::Child, deadline: Instant) -> bool {
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

#[test]
fn rekey_killed_at_random_points_resumes_and_loses_nothing() {
    let fx = Fixture::new(SERIAL_1);
    assert_ok(&fx.create(&[]));
    assert_ok(&fx.mount(&[]));
    write_tree(&fx.mnt, 30);
    let expected = tree_digests(&fx.mnt);
    assert_ok(&fx.unmount());
    let extent = fx.info_json(&fx.vault)["extent_sectors"].as_u64().unwrap();
    // A full pass at 4 MiB/s takes about extent/1024 seconds.
    let full = Duration::from_secs_f64(extent as f64 / 1024.0);
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64
        | 1;
    let mut killed_mid_rotation = 0;
    for run in 0..4 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let delay = full.mul_f64(0.05 + (seed % 1000) as f64 / 1000.0 * 0.85);
        let mut args = vec![
            "rekey".to_string(),
            s(&fx.vault).into(),
            "--max-rate".into(),
            "4M".into(),
        ];
        args.extend(auth(&fx.password, &fx.pin).iter().map(|a| a.to_string()));
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut child = fx
            .command(&argv)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Start-up (PIN, card ECDH, Argon2id twice) varies with the load:
        // wait for the rotation to begin (or the process to end), then pick
        // a random point of the throttled pass.
        let began = Instant::now();
        while child.try_wait().unwrap().is_none()
            && fx.info_json(&fx.vault)["rekey_in_progress"].is_null()
            && began.elapsed() < Duration::from_secs(30)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        let exited = wait_child(&mut child, Instant::now() + delay);
        if !exited {
            child.kill().unwrap(); // SIGKILL
        }
        child.wait().unwrap();
        let h = fx.info_json(&fx.vault);
        let state = &h["rekey_in_progress"];
        eprintln!(
            "run {run}: killed {:.2} s into the pass (exited by itself: {exited}); epoch {}, in progress: {state}",
            delay.as_secs_f64(),
            h["key_epoch"]
        );
        if !state.is_null() {
            killed_mid_rotation += 1;
            // An unfinished rotation refuses to mount, and says what to do.
            let out = fx.mount(&[]);
            assert_fails(&out, REKEY_UNFINISHED, &["keybound rekey"]);
        }
    }
    assert!(
        killed_mid_rotation >= 2,
        "most kills should land mid-rotation"
    );
    // Finish (or, if the last kill came after the end, rotate once more).
    let out = rekey(&fx, &[]);
    assert_ok(&out);
    assert!(fx.info_json(&fx.vault)["rekey_in_progress"].is_null());
    assert_tree(&fx, &fx.password, &fx.pin, &[], &expected);
}
