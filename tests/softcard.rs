//! The software card through the real pcscd and vpcd, driven by two clients
//! we did not write: yubico-piv-tool (C, libykpiv) and the `yubikey` crate.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{ReadersLock, SOFTCARD_BIN, SoftCard, reader_name};
use p256::ecdsa::signature::hazmat::PrehashVerifier;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use sha2::{Digest, Sha256};
use yubikey::piv::{self, AlgorithmId, Origin, RetiredSlotId, SlotId};
use yubikey::{MgmKey, PinPolicy, Serial, TouchPolicy, YubiKey};

const SERIAL: u32 = 12_345_678;
const DEFAULT_MGM_HEX: &str = "010203040506070801020304050607080102030405060708";
const SLOT_82: SlotId = SlotId::Retired(RetiredSlotId::R1);

// ---- helpers ----------------------------------------------------------------

fn piv_tool(reader: u8, args: &[&str]) -> Output {
    Command::new("yubico-piv-tool")
        .arg("-r")
        .arg(reader_name(reader))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run yubico-piv-tool (Debian package yubico-piv-tool)")
}

/// Run yubico-piv-tool, require success, return stdout + stderr.
fn piv_tool_ok(reader: u8, args: &[&str]) -> String {
    let out = piv_tool(reader, args);
    let text = output_text(&out);
    assert!(
        out.status.success(),
        "yubico-piv-tool {args:?} failed:\n{text}"
    );
    text
}

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn open(serial: u32) -> YubiKey {
    YubiKey::open_by_serial(Serial(serial)).expect("open the software card by serial")
}

/// Uncompressed SEC1 point of a public key (SPKI) the yubikey crate
/// returned; a macro because the crate does not re-export the SPKI type.
macro_rules! sec1 {
    ($spki:expr) => {
        $spki.subject_public_key.raw_bytes().to_vec()
    };
}

/// Run `op` on another thread and fail if it takes longer than `limit`.
fn within<T: Send + 'static>(limit: Duration, op: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(op());
    });
    rx.recv_timeout(limit).expect("operation hung")
}

// ---- yubico-piv-tool --------------------------------------------------------

#[test]
fn piv_tool_status_and_pin() {
    let _lock = ReadersLock::acquire();
    let dir = tempfile::tempdir().unwrap();
    let _card = SoftCard::insert(&dir.path().join("card.json"), SERIAL, 0);

    let status = piv_tool_ok(0, &["-a", "status"]);
    assert!(status.contains("Version:\t5.4.3"), "{status}");
    assert!(
        status.contains(&format!("Serial Number:\t{SERIAL}")),
        "{status}"
    );
    assert!(status.contains("PIN tries left:\t3"), "{status}");

    piv_tool_ok(0, &["-a", "verify-pin", "-P", "123456"]);
    let wrong = piv_tool(0, &["-a", "verify-pin", "-P", "000000"]);
    assert!(!wrong.status.success());
    assert!(
        output_text(&wrong).contains("2 tries left"),
        "{}",
        output_text(&wrong)
    );

    piv_tool_ok(0, &["-a", "change-pin", "-P", "123456", "-N", "654321"]);
    piv_tool_ok(0, &["-a", "verify-pin", "-P", "654321"]);
    let old = piv_tool(0, &["-a", "verify-pin", "-P", "123456"]);
    assert!(!old.status.success(), "the old PIN must no longer work");
}

/// yubico-piv-tool 2.2.0's own `selfsign-certificate` cannot work on Debian 12:
/// with OpenSSL 3 it fails before sending any APDU (Yubico/yubico-piv-tool#388),
/// so OpenSSL issues the certificate for the card's public key instead, and
/// yubico-piv-tool's `test-signature` proves the card holds the matching key.
#[test]
fn piv_tool_generate_import_and_read_certificate() {
    let _lock = ReadersLock::acquire();
    let dir = tempfile::tempdir().unwrap();
    let _card = SoftCard::insert(&dir.path().join("card.json"), SERIAL, 0);
    let file = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let key = format!("--key={DEFAULT_MGM_HEX}");

    let (public, cert, cert_back) = (file("pub.pem"), file("cert.pem"), file("back.pem"));
    piv_tool_ok(
        0,
        &[
            &key, "-a", "generate", "-s", "82", "-A", "ECCP256", "-o", &public,
        ],
    );
    let pem = std::fs::read_to_string(&public).unwrap();
    assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----"), "{pem}");

    issue_certificate(dir.path(), &public, &cert);
    piv_tool_ok(
        0,
        &[&key, "-a", "import-certificate", "-s", "82", "-i", &cert],
    );
    piv_tool_ok(0, &["-a", "read-certificate", "-s", "82", "-o", &cert_back]);
    assert_eq!(
        std::fs::read_to_string(&cert).unwrap(),
        std::fs::read_to_string(&cert_back).unwrap(),
        "read-certificate returns what was imported"
    );
    let status = piv_tool_ok(0, &["-a", "status"]);
    assert!(status.contains("Slot 82:"), "{status}");
    assert!(
        status.contains("ECCP256") && status.contains("CN=test"),
        "{status}"
    );

    let signed = piv_tool_ok(
        0,
        &[
            "-P",
            "123456",
            "-a",
            "verify-pin",
            "-a",
            "test-signature",
            "-s",
            "82",
            "-i",
            &cert,
        ],
    );
    assert!(signed.contains("Successful ECDSA verification"), "{signed}");
    let ecdh = piv_tool_ok(
        0,
        &[
            "-P",
            "123456",
            "-a",
            "verify-pin",
            "-a",
            "test-decipher",
            "-s",
            "82",
            "-i",
            &cert,
        ],
    );
    assert!(
        ecdh.contains("Successfully performed ECDH exchange"),
        "{ecdh}"
    );
}

/// A certificate with subject CN=test for `public_pem`, signed by a throwaway CA.
fn issue_certificate(dir: &Path, public_pem: &str, cert: &str) {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            output_text(&out)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &["-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=ca"],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req", "-new"][..],
            &ec,
            &["-keyout", "tmp.key", "-out", "req.csr", "-subj", "/CN=test"],
        ]
        .concat(),
    );
    openssl(&[
        "x509",
        "-req",
        "-in",
        "req.csr",
        "-force_pubkey",
        public_pem,
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-set_serial",
        "7",
        "-days",
        "2",
        "-out",
        cert,
    ]);
}

// ---- the yubikey crate ------------------------------------------------------

#[test]
fn yubikey_crate_version_serial_and_pin_counter() {
    let _lock = ReadersLock::acquire();
    let dir = tempfile::tempdir().unwrap();
    let _card = SoftCard::insert(&dir.path().join("card.json"), SERIAL, 0);

    let mut yk = open(SERIAL);
    assert_eq!(yk.serial(), Serial(SERIAL));
    assert_eq!(yk.version().to_string(), "5.4.3");
    assert_eq!(yk.name(), reader_name(0));
    assert_eq!(yk.get_pin_retries().unwrap(), 3);
    yk.verify_pin(b"123456").unwrap();

    let err = yk.verify_pin(b"654321").unwrap_err();
    assert_eq!(err, yubikey::Error::WrongPin { tries: 2 });
    assert_eq!(yk.get_pin_retries().unwrap(), 2, "a wrong PIN costs a try");
    yk.verify_pin(b"123456").unwrap();
    assert_eq!(
        yk.get_pin_retries().unwrap(),
        3,
        "the right PIN restores the tries"
    );
}

#[test]
fn blocked_pin_stays_blocked_after_reinserting() {
    let _lock = ReadersLock::acquire();
    let dir = tempfile::tempdir().unwrap();
    let mut card = SoftCard::insert(&dir.path().join("card.json"), SERIAL, 0);

    let mut yk = open(SERIAL);
    for _ in 0..3 {
        assert!(yk.verify_pin(b"000000").is_err());
    }
    assert_eq!(yk.get_pin_retries().unwrap(), 0);
    assert!(
        yk.verify_pin(b"123456").is_err(),
        "blocked: even the right PIN fails"
    );
    drop(yk);

    card.reinsert();
    let mut yk = open(SERIAL);
    assert_eq!(
        yk.get_pin_retries().unwrap(),
        0,
        "still blocked after a restart"
    );
    assert!(yk.verify_pin(b"123456").is_err());
    // The PUK still unblocks it.
    yk.unblock_pin(b"12345678", b"111111").unwrap();
    yk.verify_pin(b"111111").unwrap();
}

#[test]
fn generated_key_does_ecdh_and_ecdsa_and_persists() {
    let _lock = ReadersLock::acquire();
    let dir = tempfile::tempdir().unwrap();
    let mut card = SoftCard::insert(&dir.path().join("card.json"), SERIAL, 0);

    let mut yk = open(SERIAL);
    yk.authenticate(MgmKey::default()).unwrap();
    let spki = piv::generate(
        &mut yk,
        SLOT_82,
        AlgorithmId::EccP256,
        PinPolicy::Once,
        TouchPolicy::Never,
    )
    .unwrap();
    let card_public = p256::PublicKey::from_sec1_bytes(&sec1!(spki)).unwrap();

    let meta = piv::metadata(&mut yk, SLOT_82).unwrap();
    assert_eq!(meta.policy, Some((PinPolicy::Once, TouchPolicy::Never)));
    assert_eq!(meta.origin, Some(Origin::Generated));
    assert_eq!(meta.public.as_ref().map(|p| sec1!(p)), Some(sec1!(spki)));

    // ECDH with an ephemeral key, as keybound enrols a token.
    let ephemeral = p256::SecretKey::random(&mut rand::rngs::OsRng);
    let ephemeral_point = ephemeral.public_key().to_encoded_point(false);
    let expected =
        p256::ecdh::diffie_hellman(ephemeral.to_nonzero_scalar(), card_public.as_affine());
    let ecdh = |yk: &mut YubiKey| {
        piv::decrypt_data(
            yk,
            ephemeral_point.as_bytes(),
            AlgorithmId::EccP256,
            SLOT_82,
        )
    };
    assert_eq!(
        ecdh(&mut yk).unwrap_err(),
        yubikey::Error::AuthenticationError,
        "PIN once: needs the PIN"
    );
    yk.verify_pin(b"123456").unwrap();
    assert_eq!(
        &ecdh(&mut yk).unwrap()[..],
        &expected.raw_secret_bytes()[..]
    );

    let digest = Sha256::digest(b"keybound");
    let der = piv::sign_data(&mut yk, &digest, AlgorithmId::EccP256, SLOT_82).unwrap();
    let signature = Signature::from_der(&der).unwrap();
    VerifyingKey::from(card_public)
        .verify_prehash(&digest, &signature)
        .expect("the card's signature verifies with its public key");
    drop(yk);

    card.reinsert();
    let mut yk = open(SERIAL);
    yk.verify_pin(b"123456").unwrap();
    assert_eq!(
        &ecdh(&mut yk).unwrap()[..],
        &expected.raw_secret_bytes()[..],
        "the key survives a restart"
    );
}

#[test]
fn pin_protected_management_key() {
    let _lock = ReadersLock::acquire();
    let dir = tempfile::tempdir().unwrap();
    let _card = SoftCard::insert(&dir.path().join("card.json"), SERIAL, 0);

    let mut yk = open(SERIAL);
    yk.authenticate(MgmKey::default()).unwrap();
    let key = MgmKey::generate();
    key.set_protected(&mut yk).unwrap();
    drop(yk);

    let mut yk = open(SERIAL);
    assert!(
        MgmKey::get_protected(&mut yk).is_err(),
        "protected by the PIN"
    );
    yk.verify_pin(b"123456").unwrap();
    let stored = MgmKey::get_protected(&mut yk).unwrap();
    assert_eq!(stored.as_ref(), key.as_ref());
    assert!(
        yk.authenticate(MgmKey::default()).is_err(),
        "the default key was replaced"
    );
    yk.authenticate(stored).unwrap();
    let meta = piv::metadata(
        &mut yk,
        SlotId::Management(piv::ManagementSlotId::Management),
    )
    .unwrap();
    assert_eq!(meta.default, Some(false));
}

#[test]
fn pulling_the_card_fails_the_open_handle() {
    let _lock = ReadersLock::acquire();
    let dir = tempfile::tempdir().unwrap();
    let mut card = SoftCard::insert(&dir.path().join("card.json"), SERIAL, 0);

    let mut yk = open(SERIAL);
    yk.verify_pin(b"123456").unwrap();
    card.pull();
    let result = within(Duration::from_secs(10), move || {
        yk.get_pin_retries().map(|_| ())
    });
    assert!(result.is_err(), "an operation on a pulled card must fail");
}

#[test]
fn two_cards_in_two_readers() {
    let _lock = ReadersLock::acquire();
    let dir = tempfile::tempdir().unwrap();
    let _a = SoftCard::insert(&dir.path().join("a.json"), 11_111_111, 0);
    let _b = SoftCard::insert(&dir.path().join("b.json"), 22_222_222, 1);
    assert_eq!(open(22_222_222).name(), reader_name(1));
    assert_eq!(open(11_111_111).name(), reader_name(0));
}

// ---- the binary -------------------------------------------------------------

#[test]
fn prints_the_inserted_line_and_stops_on_sigterm() {
    let _lock = ReadersLock::acquire();
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(SOFTCARD_BIN)
        .arg("--state")
        .arg(dir.path().join("card.json"))
        .args(["--serial", "87654321", "--reader", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let line = within(Duration::from_secs(10), move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).map(|_| line)
    })
    .unwrap();
    assert_eq!(
        line,
        "keybound-softcard: card 87654321 inserted in reader 1 (127.0.0.1:35964)\n"
    );
    common::wait_for_card(1, true, Duration::from_secs(10));

    let started = Instant::now();
    // SAFETY: sending a signal to our own child process.
    assert_eq!(
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) },
        0
    );
    let out = child.wait_with_output().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "SIGTERM is obeyed promptly"
    );
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("TEST DEVICE, NOT SECURE"), "{stderr}");
    common::wait_for_card(1, false, Duration::from_secs(10));
}

#[test]
fn waits_for_a_missing_virtual_reader() {
    // A port where nothing listens: no pcscd involved, no lock needed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(SOFTCARD_BIN)
        .arg("--state")
        .arg(dir.path().join("card.json"))
        .args(["--port", &port.to_string()])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let expected =
        format!("waiting for pcscd's virtual reader at 127.0.0.1:{port} (is pcscd running?)");
    let seen = within(Duration::from_secs(10), move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .any(|l| l.contains(&expected))
    });
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(seen);
}

#[test]
fn refuses_damaged_state_and_wrong_serial() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("card.json");
    let run = |serial: &str| {
        Command::new(SOFTCARD_BIN)
            .arg("--state")
            .arg(&state)
            .args(["--serial", serial, "--port", "9"])
            .output()
            .unwrap()
    };
    std::fs::write(&state, "{ not json").unwrap();
    let out = run("5");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&state.display().to_string()) && stderr.contains("damaged"),
        "{stderr}"
    );

    // A good file of card 5; asking for card 6 is refused.
    std::fs::remove_file(&state).unwrap();
    let mut child = Command::new(SOFTCARD_BIN)
        .arg("--state")
        .arg(&state)
        .args(["--serial", "5", "--port", "9"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    common::wait_until(
        "the state file to be created",
        Duration::from_secs(10),
        || state.exists(),
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let out = run("6");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("belongs to card 5"), "{stderr}");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&state).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn help_says_it_is_not_secure() {
    let out = Command::new(SOFTCARD_BIN).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(help.contains("TEST DEVICE, NOT SECURE"), "{help}");
    assert!(help.contains("reconnects"), "{help}");
}
