//! Memory hygiene, proven on the running daemon (issue 4): after `keybound
//! lock`, the daemon's memory holds no master key, no sub-key, no password
//! or PIN and no plaintext, read through `/proc/PID/mem` while the process
//! still lives (`mount --diagnostic-linger`). The same scan before the lock
//! must find the sector key and the plaintext, so this test can fail.
//!
//! Real parts: pcscd, the software card, FUSE, the `keybound` binary. Runs as
//! root (reading another process's memory needs it: the daemon makes itself
//! non-dumpable).

mod common;

use std::fs;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use common::memscan::{self, Scan};
use common::vault::{Fixture, PASSWORD, PIN, assert_ok, stderr, stdout, wait_for_exit};

/// HKDF-SHA256(ikm = master key, salt = container id, info = label): the
/// sub-key derivation of docs/FORMAT.md §3, computed here independently.
fn sub_key(master: &[u8], container_id: &[u8], label: &[u8]) -> Vec<u8> {
    let prk = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, container_id).extract(master);
    let mut out = vec![0u8; 32];
    prk.expand(&[label], ring::hkdf::HKDF_SHA256)
        .unwrap()
        .fill(&mut out)
        .unwrap();
    out
}

/// A 32-byte pattern no process holds by chance: a tag and 24 random bytes.
fn canary_pattern() -> Vec<u8> {
    let mut pattern = b"KBCANARY".to_vec();
    let mut random = [0u8; 24];
    fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut random)
        .unwrap();
    pattern.extend_from_slice(&random);
    pattern
}

fn container_id(fx: &Fixture) -> Vec<u8> {
    let info = fx.info_json(&fx.vault);
    hex::decode(info["id"].as_str().expect("container id in info --json")).unwrap()
}

/// The secrets that exist only while unlocking, recomputed from the card's
/// state file and the header (docs/FORMAT.md §2): the ECDH secret S the card
/// computes, the password hash P = Argon2id(password), and the slot's KEK =
/// HKDF(S ‖ P). Checked by unwrapping the slot with the KEK through the
/// library: it must give the master key `dump-key` printed.
struct UnlockSecrets {
    ecdh: Vec<u8>,
    password_hash: Vec<u8>,
    kek: Vec<u8>,
}

fn unlock_secrets(fx: &Fixture, master: &[u8]) -> UnlockSecrets {
    let info = fx.info_json(&fx.vault);
    let id = hex::decode(info["id"].as_str().unwrap()).unwrap();
    let slot = &info["slots"][0];
    let kind = &slot["kind"];
    assert_eq!(kind["type"], "token", "{info}");
    let hex_field = |v: &serde_json::Value| hex::decode(v.as_str().unwrap()).unwrap();
    let index = slot["index"].as_u64().unwrap() as u8;
    let salt = hex_field(&slot["salt"]);

    let card: serde_json::Value =
        serde_json::from_slice(&fs::read(fx.path("card.json")).unwrap()).unwrap();
    let piv_slot = format!("{:02x}", kind["piv_slot"].as_u64().unwrap());
    let card_secret =
        p256::SecretKey::from_slice(&hex_field(&card["keys"][&piv_slot]["private_key"])).unwrap();
    let ephemeral =
        p256::PublicKey::from_sec1_bytes(&hex_field(&kind["ephemeral_public"])).unwrap();
    let shared = p256::ecdh::diffie_hellman(card_secret.to_nonzero_scalar(), ephemeral.as_affine());
    let ecdh = shared.raw_secret_bytes().to_vec();

    let argon = &kind["argon"];
    let field = |name: &str| argon[name].as_u64().unwrap() as u32;
    let params = argon2::Params::new(
        field("memory_kib"),
        field("iterations"),
        field("parallelism"),
        Some(32),
    )
    .unwrap();
    let mut password_hash = vec![0u8; 32];
    argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
        .hash_password_into(PASSWORD.as_bytes(), &salt, &mut password_hash)
        .unwrap();

    let mut info_label = b"keybound v1 key slot".to_vec();
    info_label.extend_from_slice(&id);
    info_label.push(index);
    let ikm = [ecdh.as_slice(), password_hash.as_slice()].concat();
    let kek = sub_key(&ikm, &salt, &info_label);

    let container =
        keybound::container::Container::open(&fx.vault, keybound::container::Access::ReadOnly)
            .unwrap();
    let unwrapped = container
        .unwrap_slot(
            index,
            &keybound::secrets::SecretBytes::from_slice(&kek).unwrap(),
        )
        .expect("the recomputed KEK opens the key slot");
    assert_eq!(unwrapped.dangerous_export(), master);
    UnlockSecrets {
        ecdh,
        password_hash,
        kek,
    }
}

fn dump_key(fx: &Fixture) -> Vec<u8> {
    let out = fx.run_with_secrets("dump-key", &[]);
    assert_ok(&out);
    assert!(
        stderr(&out).contains("WARNING") && stderr(&out).contains("master key"),
        "no warning on stderr: {}",
        stderr(&out)
    );
    let text = stdout(&out);
    assert!(
        text.ends_with('\n') && text.lines().count() == 1,
        "stdout must be the key and nothing else: {text:?}"
    );
    let key = hex::decode(text.trim_end()).expect("the key is hex");
    assert_eq!(key.len(), 32);
    key
}

fn scan(pid: u32, needles: &[(&str, &[u8])]) -> Scan {
    let start = Instant::now();
    let scan = memscan::scan(pid, needles);
    eprintln!("{} ({:?})", scan.summary(), start.elapsed());
    assert!(
        scan.bytes_read > 1 << 20,
        "the scan read next to nothing: {}",
        scan.summary()
    );
    scan
}

#[test]
fn locked_daemon_holds_no_key_and_no_plaintext() {
    let fx = Fixture::new(73_400_001);
    assert_ok(&fx.create(&[]));
    let master = dump_key(&fx);
    // dump-key is guarded: a wrong password gets no key.
    let wrong = fx.secret("wrong-password", "not the password");
    let refused = fx.run(&[
        "dump-key",
        fx.vault.to_str().unwrap(),
        "--password-file",
        wrong.to_str().unwrap(),
        "--pin-file",
        fx.pin.to_str().unwrap(),
    ]);
    assert!(!refused.status.success() && refused.stdout.is_empty());

    let id = container_id(&fx);
    let sector_key = sub_key(&master, &id, b"keybound v1 sector encryption");
    let mac_key = sub_key(&master, &id, b"keybound v1 header mac");
    let canary = canary_pattern();
    let unlock = unlock_secrets(&fx, &master);

    assert_ok(&fx.mount(&["--diagnostic-linger"]));
    let pid = fx.daemon_pid();
    // A lingering daemon only ends with SIGKILL: make sure a failed assertion
    // below does not leave it running.
    let _reaper = KillOnDrop(pid);

    // Plaintext through the mount: written, made durable, dropped from the
    // kernel's page cache and read back, so the daemon handled it both ways.
    let file_data = canary.repeat((1 << 20) / canary.len());
    let path = fx.mnt.join("canary.bin");
    {
        let mut file = fs::File::create(&path).unwrap();
        file.write_all(&file_data).unwrap();
        file.sync_all().unwrap();
        // SAFETY: fadvise on a descriptor we own; no memory is involved.
        let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(rc, 0);
    }
    assert!(
        fs::read(&path).unwrap() == file_data,
        "canary read back wrong"
    );

    let needles: [(&str, &[u8]); 9] = [
        ("master key", &master),
        ("sector key", &sector_key),
        ("header MAC key", &mac_key),
        ("canary", &canary),
        ("password", PASSWORD.as_bytes()),
        ("PIN", PIN.as_bytes()),
        ("ECDH secret", &unlock.ecdh),
        ("password hash", &unlock.password_hash),
        ("KEK", &unlock.kek),
    ];

    // Before the lock the scan must find what the vault needs to be open:
    // the sector key (the first two round keys of the AES-256 key schedule
    // are the key itself) and the plaintext. The master key itself is not
    // kept while mounted (dropped once the sub-keys are derived), nor is the
    // header-MAC key (only HMAC pad states are), and the unlock-time secrets
    // (PIN, password, ECDH secret, password hash, KEK) are wiped right after
    // unlocking: all reported, not required.
    let before = scan(pid, &needles);
    assert!(
        before.found("sector key"),
        "the scan cannot see the open vault's key: {}",
        before.summary()
    );
    assert!(
        before.found("canary"),
        "the scan cannot see plaintext: {}",
        before.summary()
    );

    let out = fx.run(&["lock", fx.mnt.to_str().unwrap()]);
    assert_ok(&out);
    assert!(
        memscan::alive(pid),
        "the daemon must linger after the lock (--diagnostic-linger)"
    );
    assert!(!fx.is_mounted());

    let after = scan(pid, &needles);
    let left: Vec<String> = needles
        .iter()
        .filter(|(name, _)| after.found(name))
        .map(|(name, _)| after.describe(name))
        .collect();
    assert!(
        left.is_empty(),
        "secrets left in the locked daemon's memory:\n{}",
        left.join("\n")
    );

    // SAFETY: kill sends a signal; the pid is the daemon we started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    wait_for_exit(pid, Duration::from_secs(10));

    // The plaintext was committed before the lock: intact after a remount.
    assert_ok(&fx.mount(&[]));
    assert!(
        fs::read(&path).unwrap() == file_data,
        "canary damaged after remount"
    );
    assert_ok(&fx.unmount());
}

/// SIGKILLs a process when dropped (the lingering daemon ignores everything else).
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: kill sends a signal; ESRCH (already gone) is fine.
        unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
    }
}
