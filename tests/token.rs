//! The token layer against real parts: pcscd, the vsmartcard virtual reader and
//! the software card, driven through the `keybound` CLI and the library API.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::vault::{assert_fails, assert_ok, stdout};
use common::{KEYBOUND_BIN, ReadersLock, SoftCard};
use keybound::token::{
    EphemeralShare, LastTry, Pin, Presence, Token, TokenError, TokenPublicKey, Watch,
};

const NEW_PIN: &str = "24681357";

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Self {
        Env {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A secret file as a script would make it: mode 0600, one line.
    fn secret(&self, name: &str, value: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, format!("{value}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path
    }

    fn card(&self, name: &str, serial: u32, reader: u8) -> SoftCard {
        SoftCard::insert(&self.path(name), serial, reader)
    }
}

fn keybound(args: &[&str]) -> Output {
    keybound_env(args, &[])
}

fn keybound_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(KEYBOUND_BIN);
    cmd.args(args).env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run keybound")
}

fn list_json() -> serde_json::Value {
    let out = keybound(&["token", "list", "--json"]);
    assert_ok(&out);
    serde_json::from_slice(&out.stdout).expect("token list --json is JSON")
}

fn token_entry(list: &serde_json::Value, serial: u32) -> serde_json::Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|t| t["serial"] == serial)
        .unwrap_or_else(|| panic!("token {serial} not listed in {list}"))
        .clone()
}

/// `keybound token setup` of a factory-fresh card with its PINs in files.
fn setup_fresh(env: &Env, serial: u32) -> Output {
    let new_pin = env.secret("new-pin", NEW_PIN);
    keybound(&[
        "token",
        "setup",
        "--serial",
        &serial.to_string(),
        "--new-pin-file",
        new_pin.to_str().unwrap(),
    ])
}

fn setup_again(env: &Env, serial: u32, pin: &str, extra: &[&str]) -> Output {
    let pin_file = env.secret("pin", pin);
    let serial = serial.to_string();
    let mut args = vec![
        "token",
        "setup",
        "--serial",
        &serial,
        "--pin-file",
        pin_file.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    keybound(&args)
}

fn pin(value: &str) -> Pin {
    Pin::from_slice(value.as_bytes()).unwrap()
}

#[test]
fn list_shows_a_fresh_token() {
    let _lock = ReadersLock::acquire();
    let env = Env::new();
    let _card = env.card("card", 10_000_101, 0);

    let entry = token_entry(&list_json(), 10_000_101);
    assert_eq!(entry["reader"], common::reader_name(0));
    assert_eq!(entry["version"], "5.4.3");
    assert_eq!(entry["pin_tries_left"], 3);
    assert_eq!(entry["keybound_keys"].as_array().unwrap().len(), 0);

    let human = keybound(&["token", "list"]);
    assert_ok(&human);
    let text = stdout(&human);
    assert!(text.contains("token 10000101"), "{text}");
    assert!(text.contains("PIN tries left: 3"), "{text}");
    assert!(
        text.contains("keybound token setup --serial 10000101"),
        "{text}"
    );
}

#[test]
fn setup_provisions_a_key_and_replaces_factory_secrets() {
    let _lock = ReadersLock::acquire();
    let env = Env::new();
    let mut card = env.card("card", 10_000_102, 0);

    let out = setup_fresh(&env, 10_000_102);
    assert_ok(&out);
    assert!(stdout(&out).contains("slot 82"), "{}", stdout(&out));

    // What a user checks: the key is listed, with the policy asked for…
    let entry = token_entry(&list_json(), 10_000_102);
    let keys = entry["keybound_keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1, "{entry}");
    assert_eq!(keys[0]["slot"], "82");
    assert_eq!(keys[0]["pin_policy"], "always");
    assert_eq!(keys[0]["touch_policy"], "never");

    // …it survives pulling the token out…
    card.reinsert();
    let entry = token_entry(&list_json(), 10_000_102);
    assert_eq!(
        entry["keybound_keys"][0]["fingerprint"],
        keys[0]["fingerprint"]
    );

    // …the factory PIN no longer works, the new one does, and the PUK is the new PIN.
    let mut token = Token::open(Some(10_000_102)).unwrap();
    let err = token
        .verify_pin(&pin("123456"), LastTry::Refuse)
        .unwrap_err();
    assert!(
        matches!(err, TokenError::WrongPin { tries_left: 2, .. }),
        "{err}"
    );
    token.verify_pin(&pin(NEW_PIN), LastTry::Refuse).unwrap();
    assert_eq!(token.pin_tries_left().unwrap(), 3);
    drop(token);

    // An independent client (yubico-piv-tool) sees our certificate in slot 82.
    let status = Command::new("yubico-piv-tool")
        .args(["-r", &common::reader_name(0), "-a", "status"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{text}");
    assert!(text.contains("O=keybound"), "{text}");
}

#[test]
fn setup_never_overwrites_an_existing_key() {
    let _lock = ReadersLock::acquire();
    let env = Env::new();
    let _card = env.card("card", 10_000_103, 0);
    assert_ok(&setup_fresh(&env, 10_000_103));
    let first = token_entry(&list_json(), 10_000_103)["keybound_keys"][0].clone();

    let refused = setup_again(&env, 10_000_103, NEW_PIN, &["--slot", "82"]);
    assert_fails(
        &refused,
        16,
        &["slot 82", "already holds a key", "never overwrites"],
    );

    assert_ok(&setup_again(
        &env,
        10_000_103,
        NEW_PIN,
        &["--label", "second"],
    ));
    let keys = token_entry(&list_json(), 10_000_103)["keybound_keys"].clone();
    let keys = keys.as_array().unwrap();
    assert_eq!(keys.len(), 2);
    assert_eq!(keys[0], first, "the first key must be untouched");
    assert_eq!(keys[1]["slot"], "83");
    assert_eq!(keys[1]["label"], "second");
}

#[test]
fn ecdh_on_the_card_matches_enrolment_from_the_certificate() {
    let _lock = ReadersLock::acquire();
    let env = Env::new();
    let _card = env.card("card", 10_000_104, 0);
    assert_ok(&setup_fresh(&env, 10_000_104));

    // An admin enrols from the exported certificate, without the card…
    let cert = env.path("cert.pem");
    assert_ok(&keybound(&[
        "token",
        "export",
        "--serial",
        "10000104",
        "-o",
        cert.to_str().unwrap(),
    ]));
    let card_key = TokenPublicKey::from_certificate(&std::fs::read(&cert).unwrap()).unwrap();
    let share = EphemeralShare::new(&card_key).unwrap();

    // …and the card, after its PIN, computes the same secret.
    let (mut token, slot) = Token::find_key(Some(10_000_104), &card_key).unwrap();
    assert_eq!(slot, 0x82);
    let refused = token.ecdh(slot, &share.ephemeral_public);
    assert!(
        refused.is_err(),
        "PIN policy 'always' must refuse ECDH without the PIN"
    );
    token.verify_pin(&pin(NEW_PIN), LastTry::Refuse).unwrap();
    let secret = token.ecdh(slot, &share.ephemeral_public).unwrap();
    assert_eq!(secret.expose(), share.secret.expose());

    // A different ephemeral key gives a different secret.
    let other = EphemeralShare::new(&card_key).unwrap();
    token.verify_pin(&pin(NEW_PIN), LastTry::Refuse).unwrap();
    let other_secret = token.ecdh(slot, &other.ephemeral_public).unwrap();
    assert_ne!(other_secret.expose(), secret.expose());

    // A key that is not on this card is reported as such.
    let stranger = TokenPublicKey::from_sec1(
        &EphemeralShare::new(&card_key)
            .unwrap()
            .ephemeral_public
            .to_sec1(),
    )
    .unwrap();
    let err = Token::find_key(Some(10_000_104), &stranger).unwrap_err();
    assert!(matches!(err, TokenError::KeyMismatch { .. }), "{err}");
}

#[test]
fn wrong_pin_counts_down_refuses_the_last_try_and_blocks() {
    let _lock = ReadersLock::acquire();
    let env = Env::new();
    let mut card = env.card("card", 10_000_105, 0);
    assert_ok(&setup_fresh(&env, 10_000_105));

    let wrong = setup_again(&env, 10_000_105, "999999", &[]);
    assert_fails(&wrong, 13, &["wrong PIN", "token 10000105", "2 tries left"]);
    let wrong = setup_again(&env, 10_000_105, "999999", &[]);
    assert_fails(&wrong, 13, &["1 try left"]);

    // The last try is not spent without an explicit flag — not even a right PIN.
    let guarded = setup_again(&env, 10_000_105, "999999", &[]);
    assert_fails(
        &guarded,
        14,
        &["only one PIN try left", "--allow-last-pin-try"],
    );
    assert_eq!(token_entry(&list_json(), 10_000_105)["pin_tries_left"], 1);

    let spent = setup_again(&env, 10_000_105, "999999", &["--allow-last-pin-try"]);
    assert_fails(&spent, 14, &["blocked", "PUK"]);

    // Blocked stays blocked when the token is pulled and plugged back in.
    card.reinsert();
    assert_eq!(token_entry(&list_json(), 10_000_105)["pin_tries_left"], 0);
    let after = setup_again(&env, 10_000_105, NEW_PIN, &[]);
    assert_fails(&after, 14, &["blocked"]);
    let human = stdout(&keybound(&["token", "list"]));
    assert!(human.contains("PIN BLOCKED"), "{human}");
}

#[test]
fn missing_pcscd_reader_or_token_are_clear_errors() {
    let _lock = ReadersLock::acquire();
    let env = Env::new();

    // No pcscd: point the PC/SC client at a socket nobody listens on.
    let no_service = [("PCSCLITE_CSOCK_NAME", "/nonexistent/pcscd.comm")];
    let out = keybound_env(&["token", "list"], &no_service);
    assert_fails(&out, 10, &["pcscd", "not running", "start it"]);

    // pcscd running, but no reader at all (a laptop without its USB token).
    {
        let _restore = PcscdWithoutReaders::start(&env);
        let out = keybound(&["token", "list"]);
        assert_fails(
            &out,
            11,
            &["no smart-card reader is connected", "plug in your token"],
        );
    }

    // Readers, but no token in them.
    let out = keybound(&["token", "list"]);
    assert_ok(&out);
    assert!(
        stdout(&out).contains("No token is plugged in"),
        "{}",
        stdout(&out)
    );
    let out = setup_fresh(&env, 10_000_106);
    assert_fails(&out, 11, &["no token with serial 10000106", "plug it in"]);
    let out = keybound(&["token", "setup", "--pin-file", "/dev/null"]);
    assert_fails(&out, 11, &["no PIV token is plugged in"]);

    // Secrets must come from a file or a terminal; a missing file is named.
    let _card = env.card("card", 10_000_106, 0);
    let out = keybound(&["token", "setup", "--new-pin-file", "/nonexistent/new-pin"]);
    assert_fails(&out, 17, &["/nonexistent/new-pin"]);
}

#[test]
fn two_tokens_need_a_serial() {
    let _lock = ReadersLock::acquire();
    let env = Env::new();
    let _a = env.card("a", 10_000_107, 0);
    let _b = env.card("b", 10_000_108, 1);

    let list = list_json();
    token_entry(&list, 10_000_107);
    token_entry(&list, 10_000_108);

    let new_pin = env.secret("new-pin", NEW_PIN);
    let out = keybound(&[
        "token",
        "setup",
        "--new-pin-file",
        new_pin.to_str().unwrap(),
    ]);
    assert_fails(
        &out,
        12,
        &["several tokens", "10000107", "10000108", "--serial"],
    );

    assert_ok(&setup_fresh(&env, 10_000_108));
    let list = list_json();
    assert_eq!(
        token_entry(&list, 10_000_107)["keybound_keys"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    assert_eq!(
        token_entry(&list, 10_000_108)["keybound_keys"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn a_token_pulled_mid_session_is_an_error_not_a_hang() {
    let _lock = ReadersLock::acquire();
    let env = Env::new();
    let mut card = env.card("card", 10_000_109, 0);
    let mut token = Token::open(Some(10_000_109)).unwrap();
    assert_eq!(token.pin_tries_left().unwrap(), 3);
    card.pull();
    let started = Instant::now();
    let err = token.pin_tries_left().unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(matches!(err, TokenError::Removed { .. }), "{err}");
    assert!(err.to_string().contains("10000109"), "{err}");
}

fn wait_for_lock_event(watch: &mut Watch) -> Presence {
    let started = Instant::now();
    loop {
        let event = watch.wait(Duration::from_millis(250));
        if event.must_lock() {
            return event;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "no event within 5 s"
        );
    }
}

#[test]
fn watch_reports_removal_and_a_different_card() {
    let _lock = ReadersLock::acquire();
    let env = Env::new();
    let mut card = env.card("card", 10_000_110, 0);
    let reader = common::reader_name(0);

    let mut watch = Watch::new(&reader, 10_000_110).unwrap();
    assert_eq!(watch.wait(Duration::from_millis(300)), Presence::Present);
    card.pull();
    let event = wait_for_lock_event(&mut watch);
    assert_eq!(event, Presence::Removed);

    // Swap cards while nobody is looking: the watch still sees the swap.
    card.reinsert();
    let mut watch = Watch::new(&reader, 10_000_110).unwrap();
    card.pull();
    let _other = env.card("other", 10_000_111, 0);
    let event = wait_for_lock_event(&mut watch);
    assert_eq!(
        event,
        Presence::DifferentCard {
            serial: Some(10_000_111)
        }
    );
}

#[test]
fn watch_fails_closed_when_pcscd_goes_away() {
    let _lock = ReadersLock::acquire();
    let env = Env::new();
    let _card = env.card("card", 10_000_112, 0);
    let mut watch = Watch::new(&common::reader_name(0), 10_000_112).unwrap();
    let rx = {
        // The spawned form: heartbeats while all is well.
        let spawned = Watch::new(&common::reader_name(0), 10_000_112).unwrap();
        spawned.spawn(Duration::from_millis(200))
    };
    assert_eq!(
        keybound::token::next_event(&rx, Duration::from_millis(200)),
        Presence::Present
    );

    common::stop_pcscd();
    let event = wait_for_lock_event(&mut watch);
    let spawned_event = loop {
        let e = keybound::token::next_event(&rx, Duration::from_millis(200));
        if e.must_lock() {
            break e;
        }
    };
    common::ensure_pcscd();
    assert!(
        matches!(event, Presence::ServiceGone | Presence::ReaderGone),
        "{event:?}"
    );
    assert!(spawned_event.must_lock(), "{spawned_event:?}");
}

/// pcscd with an empty reader configuration; the normal pcscd comes back on drop.
struct PcscdWithoutReaders;

impl PcscdWithoutReaders {
    fn start(env: &Env) -> Self {
        common::stop_pcscd();
        let empty = env.path("no-readers.conf.d");
        std::fs::create_dir_all(&empty).unwrap();
        let status = Command::new("pcscd").arg("--config").arg(&empty).status();
        assert!(
            matches!(status, Ok(s) if s.success()),
            "start pcscd without readers"
        );
        common::wait_until(
            "pcscd without readers to answer",
            Duration::from_secs(10),
            || pcsc::Context::establish(pcsc::Scope::System).is_ok(),
        );
        PcscdWithoutReaders
    }
}

impl Drop for PcscdWithoutReaders {
    fn drop(&mut self) {
        common::stop_pcscd();
        common::ensure_pcscd();
    }
}
