//! Admin commands end to end, as an admin runs them: two software cards on
//! the two virtual readers, the real pcscd, real FUSE mounts, the `keybound`
//! CLI. Enrol (plugged-in token, certificate, recovery key), passwd and
//! reset, revoke, header backup/restore, policy; and every refusal says why.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Child, Output, Stdio};
use std::time::Duration;

use common::vault::{Fixture, assert_fails, assert_ok, s, second_card, stderr, stdout};

/// Exit codes from docs/user-guide.md.
const USAGE: i32 = 2;
const NO_TOKEN: i32 = 11;
const WRONG_PASSWORD: i32 = 20;
const VAULT_IN_USE: i32 = 22;
const EXISTS: i32 = 25;
const LOCKED_BY_COMMAND: i32 = 30;
const PASSWORD_CHANGE_REQUIRED: i32 = 41;
const POLICY_REFUSED: i32 = 42;
const SLOT_REFUSED: i32 = 43;
const HEADER_MISMATCH: i32 = 44;
const NOT_CONFIRMED: i32 = 45;

const SERIAL_1: u32 = 10_000_501;
const SERIAL_2: u32 = 10_000_502;
const PIN_2: &str = "13572468";
const PASSWORD_2: &str = "second token's password";

/// Header layout (docs/FORMAT.md §1–2).
const HEADER_COPIES: [u64; 2] = [0, 16384];
const SLOTS_AT: u64 = 128;
const SLOT_SIZE: usize = 1024;

/// `keybound ARGS` with the fastest KDF for commands that set a password.
fn run_kdf(fx: &Fixture, args: &[&str]) -> Output {
    let mut all = args.to_vec();
    all.extend_from_slice(&["--kdf-time", "50ms"]);
    fx.run(&all)
}

/// Authority flags: a token slot's password and PIN files.
fn auth<'a>(password: &'a Path, pin: &'a Path) -> [&'a str; 4] {
    [
        "--password-file",
        password.to_str().unwrap(),
        "--pin-file",
        pin.to_str().unwrap(),
    ]
}

fn mount_write_unmount(fx: &Fixture, password: &Path, pin: &Path, extra: &[&str], file: &str) {
    assert_ok(&fx.mount_with(password, pin, extra));
    std::fs::write(fx.mnt.join(file), file.as_bytes()).unwrap();
    assert_ok(&fx.unmount());
}

fn slot_bytes(vault: &Path, copy: usize, index: usize) -> Vec<u8> {
    let file = std::fs::File::open(vault).unwrap();
    let mut buf = vec![0u8; SLOT_SIZE];
    file.read_exact_at(
        &mut buf,
        HEADER_COPIES[copy] + SLOTS_AT + (index * SLOT_SIZE) as u64,
    )
    .unwrap();
    buf
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn two_tokens_enrol_mount_reset_revoke() {
    let mut fx = Fixture::new(SERIAL_1);
    assert_ok(&fx.create(&[]));
    let _card2 = second_card(&fx, SERIAL_2, PIN_2);
    let pin2 = fx.secret("pin2", PIN_2);
    let pw2 = fx.secret("pw2", PASSWORD_2);
    let (pw1, pin1) = (fx.password.clone(), fx.pin.clone());
    let vault = fx.vault.clone();
    let serial2 = SERIAL_2.to_string();

    // Enrol card 2, authorised by card 1 (the only enrolled token present).
    let mut args = vec![
        "enroll",
        s(&vault),
        "--serial",
        &serial2,
        "--label",
        "card 2",
    ];
    args.extend_from_slice(&["--new-password-file", s(&pw2), "--new-pin-file", s(&pin2)]);
    args.extend_from_slice(&auth(&pw1, &pin1));
    let out = run_kdf(&fx, &args);
    assert_ok(&out);
    assert!(
        stderr(&out).contains(&format!(
            "Authorise the enrolment with token {SERIAL_1} (key slot 0)"
        )),
        "{}",
        stderr(&out)
    );
    assert!(stdout(&out).contains("key slot 1"), "{}", stdout(&out));
    // The same token again is refused.
    assert_fails(
        &run_kdf(&fx, &args),
        SLOT_REFUSED,
        &["already enrolled", "key slot 1"],
    );

    // Both present: card 2 by serial; then card 1 out, card 2 alone.
    mount_write_unmount(&fx, &pw2, &pin2, &["--serial", &serial2], "by-card-2");
    fx.card().pull();
    mount_write_unmount(&fx, &pw2, &pin2, &[], "card-1-absent");
    fx.card().reinsert();

    // Card 1 still opens; while mounted, admin commands are refused.
    assert_ok(&fx.mount_with(&pw1, &pin1, &["--serial", &SERIAL_1.to_string()]));
    assert_eq!(
        std::fs::read(fx.mnt.join("card-1-absent")).unwrap(),
        b"card-1-absent"
    );
    let mut revoke0 = vec!["revoke", s(&vault), "--slot", "0"];
    let mut by_card2 = vec!["--admin-slot", "1"];
    by_card2.extend_from_slice(&auth(&pw2, &pin2));
    revoke0.extend_from_slice(&by_card2);
    assert_fails(
        &fx.run(&revoke0),
        VAULT_IN_USE,
        &["mounted at", "locked vault only"],
    );
    assert_ok(&fx.unmount());

    // Reset card 1's password by card 2's slot: temporary, so mount refuses.
    let temp = fx.secret("temp", "temporary password 1");
    let mut reset = vec![
        "passwd",
        s(&vault),
        "--slot",
        "0",
        "--new-password-file",
        s(&temp),
    ];
    reset.extend_from_slice(&by_card2);
    let out = run_kdf(&fx, &reset);
    assert_ok(&out);
    assert!(
        stdout(&out).contains("Reset the password"),
        "{}",
        stdout(&out)
    );
    let serial1 = SERIAL_1.to_string();
    assert_fails(
        &fx.mount_with(&temp, &pin1, &["--serial", &serial1]),
        PASSWORD_CHANGE_REQUIRED,
        &["temporary password", "keybound passwd"],
    );
    // A slot cannot authorise its own revocation.
    let mut self_revoke = vec!["revoke", s(&vault), "--slot", "0", "--admin-slot", "0"];
    self_revoke.extend_from_slice(&auth(&temp, &pin1));
    assert_fails(&fx.run(&self_revoke), SLOT_REFUSED, &["its own revocation"]);

    // Revoke card 1's slot: its bytes leave both header copies.
    let before: Vec<Vec<u8>> = (0..2).map(|c| slot_bytes(&vault, c, 0)).collect();
    let wrapped = before[0][276..324].to_vec();
    let out = fx.run(&revoke0);
    assert_ok(&out);
    assert!(
        stdout(&out).contains("Revoked key slot 0"),
        "{}",
        stdout(&out)
    );
    assert!(
        stderr(&out).contains("Only a master-key rotation"),
        "{}",
        stderr(&out)
    );
    let header = {
        let mut buf = vec![0u8; 32768];
        std::fs::File::open(&vault)
            .unwrap()
            .read_exact_at(&mut buf, 0)
            .unwrap();
        buf
    };
    for (copy, old) in before.iter().enumerate() {
        let now = slot_bytes(&vault, copy, 0);
        assert_eq!(now[0], 0, "slot 0 of copy {copy} is empty");
        assert_ne!(&now, old);
    }
    assert!(
        !contains(&header, &wrapped),
        "the revoked slot's wrapped key is still in the header"
    );
    // Card 1 no longer opens; card 2 does.
    assert_fails(
        &fx.mount_with(&temp, &pin1, &["--serial", &serial1]),
        NO_TOKEN,
        &["no token enrolled", &format!("token {SERIAL_2} (slot 1)")],
    );
    mount_write_unmount(&fx, &pw2, &pin2, &[], "after-revoke");
    // The last slot goes only with --force.
    let mut revoke1 = vec!["revoke", s(&vault), "--slot", "1"];
    revoke1.extend_from_slice(&auth(&pw2, &pin2));
    assert_fails(&fx.run(&revoke1), SLOT_REFUSED, &["last one", "--force"]);
}

/// Start `keybound mount --recovery-key-file` (it stays in the foreground).
fn recovery_mount(fx: &Fixture, key: &Path, extra: &[&str]) -> Child {
    let mut args = vec![
        "mount",
        s(&fx.vault),
        s(&fx.mnt),
        "--recovery-key-file",
        s(key),
    ];
    args.extend_from_slice(extra);
    let mut child = fx
        .command(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    common::wait_until("the recovery mount", Duration::from_secs(30), || {
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            panic!("recovery mount exited ({status}): {err}");
        }
        fx.is_mounted()
    });
    child
}

#[test]
fn passwd_policy_and_recovery_key() {
    let fx = Fixture::new(SERIAL_1);
    assert_ok(&fx.create(&[]));
    let vault = fx.vault.clone();
    let (pw1, pin1) = (fx.password.clone(), fx.pin.clone());

    // A recovery key, printed once in groups.
    let mut args = vec!["enroll", s(&vault), "--recovery", "--label", "safe"];
    args.extend_from_slice(&auth(&pw1, &pin1));
    let out = fx.run(&args);
    assert_ok(&out);
    let text = stdout(&out);
    assert!(text.contains("ONLY NOW"), "{text}");
    let key_line = text
        .lines()
        .find(|l| l.starts_with("    ") && l.matches('-').count() == 13)
        .unwrap_or_else(|| panic!("no recovery key in: {text}"))
        .trim()
        .to_string();
    let key = fx.secret("recovery", &key_line);

    // A recovery mount needs an idle limit; with one it opens, untethered.
    assert_fails(
        &fx.run(&[
            "mount",
            s(&vault),
            s(&fx.mnt),
            "--recovery-key-file",
            s(&key),
        ]),
        USAGE,
        &["needs an idle limit", "--idle"],
    );
    let mut child = recovery_mount(&fx, &key, &["--idle", "5m"]);
    std::fs::write(fx.mnt.join("recovered"), b"hello").unwrap();
    let status = fx.run(&["status"]);
    assert!(
        stdout(&status).contains("UNTETHERED"),
        "{}",
        stdout(&status)
    );
    assert_ok(&fx.run(&["lock", s(&fx.mnt)]));
    let exit = child.wait().unwrap();
    assert_eq!(exit.code(), Some(LOCKED_BY_COMMAND));
    assert!(!fx.is_mounted());
    // A wrong key and a typo are told apart.
    let mut typo = key_line.clone().into_bytes();
    typo[0] = if typo[0] == b'A' { b'B' } else { b'A' };
    let typo = fx.secret("typo", std::str::from_utf8(&typo).unwrap());
    let mut recovery_args = vec!["mount", s(&vault), s(&fx.mnt), "--idle", "1m"];
    recovery_args.extend_from_slice(&["--recovery-key-file", s(&typo)]);
    assert_fails(&fx.run(&recovery_args), WRONG_PASSWORD, &["typo"]);

    // Policy: minimum length and an idle default; `info` shows it.
    let mut policy = vec!["policy", s(&vault), "--min-password-length", "12"];
    policy.extend_from_slice(&["--idle-default", "10m"]);
    policy.extend_from_slice(&auth(&pw1, &pin1));
    assert_ok(&fx.run(&policy));
    let info = stdout(&fx.run(&["info", s(&vault)]));
    assert!(info.contains("minimum password length  12"), "{info}");
    assert!(info.contains("idle lock default        600 s"), "{info}");

    // passwd: too short for the policy, then a good one.
    let short = fx.secret("short", "eleven char");
    let mut passwd = vec!["passwd", s(&vault), "--new-password-file", s(&short)];
    passwd.extend_from_slice(&auth(&pw1, &pin1));
    assert_fails(&run_kdf(&fx, &passwd), POLICY_REFUSED, &["at least 12"]);
    let new = fx.secret("new", "a brand new password");
    let mut passwd = vec!["passwd", s(&vault), "--new-password-file", s(&new)];
    passwd.extend_from_slice(&auth(&pw1, &pin1));
    let out = run_kdf(&fx, &passwd);
    assert_ok(&out);
    assert!(stdout(&out).contains("Changed the password of key slot 0"));
    assert_fails(
        &fx.mount_with(&pw1, &pin1, &[]),
        WRONG_PASSWORD,
        &["wrong password"],
    );
    assert_ok(&fx.mount_with(&new, &pin1, &[]));
    let status: serde_json::Value =
        serde_json::from_slice(&fx.run(&["status", "--json"]).stdout).unwrap();
    assert_eq!(status[0]["idle_lock_secs"], 600, "{status}");
    assert_eq!(std::fs::read(fx.mnt.join("recovered")).unwrap(), b"hello");
    assert_ok(&fx.unmount());

    // Reset by the recovery key: temporary until the owner changes it.
    let temp = fx.secret("temp", "temporary password");
    let reset = vec![
        "passwd",
        s(&vault),
        "--recovery-key-file",
        s(&key),
        "--new-password-file",
        s(&temp),
    ];
    let out = run_kdf(&fx, &reset);
    assert_ok(&out);
    assert!(
        stderr(&out).contains("with the recovery key"),
        "{}",
        stderr(&out)
    );
    assert_fails(
        &fx.mount_with(&temp, &pin1, &[]),
        PASSWORD_CHANGE_REQUIRED,
        &["temporary password set by an admin", "keybound passwd"],
    );
    let mine = fx.secret("mine", "my own password again");
    let mut passwd = vec!["passwd", s(&vault), "--new-password-file", s(&mine)];
    passwd.extend_from_slice(&auth(&temp, &pin1));
    assert_ok(&run_kdf(&fx, &passwd));
    assert_ok(&fx.mount_with(&mine, &pin1, &[]));
    assert_ok(&fx.unmount());
}

#[test]
fn certificate_enrolment_and_header_backup_restore() {
    let mut fx = Fixture::new(SERIAL_1);
    assert_ok(&fx.create(&[]));
    let vault = fx.vault.clone();
    let (pw1, pin1) = (fx.password.clone(), fx.pin.clone());
    let pin2 = fx.secret("pin2", PIN_2);
    let serial2 = SERIAL_2.to_string();

    // Card 2 exports its certificate and leaves.
    let mut card2 = second_card(&fx, SERIAL_2, PIN_2);
    let cert = fx.path("card2.pem");
    assert_ok(&fx.run(&["token", "export", "--serial", &serial2, "-o", s(&cert)]));
    card2.pull();

    // The admin enrols it from the certificate with a temporary password.
    let temp = fx.secret("temp", "temporary for card 2");
    let mut args = vec!["enroll", s(&vault), "--certificate", s(&cert)];
    args.extend_from_slice(&["--serial", &serial2, "--new-password-file", s(&temp)]);
    args.extend_from_slice(&auth(&pw1, &pin1));
    let out = run_kdf(&fx, &args);
    assert_ok(&out);
    assert!(stdout(&out).contains("temporary"), "{}", stdout(&out));
    let info = stdout(&fx.run(&["info", s(&vault)]));
    assert!(info.contains("TEMPORARY password"), "{info}");

    // The user, with card 2 only: mount refused until passwd.
    fx.card().pull();
    card2.reinsert();
    assert_fails(
        &fx.mount_with(&temp, &pin2, &[]),
        PASSWORD_CHANGE_REQUIRED,
        &["key slot 1", "keybound passwd"],
    );
    let pw2 = fx.secret("pw2", PASSWORD_2);
    let mut passwd = vec!["passwd", s(&vault), "--new-password-file", s(&pw2)];
    passwd.extend_from_slice(&auth(&temp, &pin2));
    assert_ok(&run_kdf(&fx, &passwd));
    mount_write_unmount(&fx, &pw2, &pin2, &[], "from-card-2");

    // Back up the header (no key needed), never over an existing file.
    let backup = fx.path("header.bak");
    let out = fx.run(&["header", "backup", s(&vault), s(&backup)]);
    assert_ok(&out);
    assert!(stdout(&out).contains("2 key slot(s)"), "{}", stdout(&out));
    assert_fails(
        &fx.run(&["header", "backup", s(&vault), s(&backup)]),
        EXISTS,
        &["exists already"],
    );

    // Revoke card 2 (by card 1): card 2 is out...
    fx.card().reinsert();
    let mut revoke = vec!["revoke", s(&vault), "--slot", "1"];
    revoke.extend_from_slice(&auth(&pw1, &pin1));
    assert_ok(&fx.run(&revoke));
    fx.card().pull();
    assert_fails(
        &fx.mount_with(&pw2, &pin2, &[]),
        NO_TOKEN,
        &["no token enrolled"],
    );

    // ...and the backup brings it back. Refusals first.
    let garbage = fx.secret("garbage", "not a header");
    assert_fails(
        &fx.run(&["header", "restore", s(&vault), s(&garbage), "--yes"]),
        HEADER_MISMATCH,
        &["not a keybound header backup"],
    );
    let restore = ["header", "restore", s(&vault), s(&backup)];
    let out = fx.run(&restore);
    assert_fails(&out, NOT_CONFIRMED, &["--yes"]);
    assert!(
        stderr(&out).contains("come back and open the vault again: key slot 1 (token"),
        "{}",
        stderr(&out)
    );
    let mut restore_yes = restore.to_vec();
    restore_yes.push("--yes");
    assert_ok(&fx.run(&restore_yes));
    mount_write_unmount(&fx, &pw2, &pin2, &[], "restored");
}
