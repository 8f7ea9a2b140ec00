//! The vault end to end, as a user runs it: real pcscd and software card,
//! real container file, real FUSE mount, driven through the `keybound` CLI.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::vault::{
    Fixture, assert_fails, assert_ok, content, flip_bit, s, stdout, tree_digests, wait_for_exit,
};

/// Exit codes from docs/user-guide.md.
const NO_PCSCD: i32 = 10;
const NO_TOKEN: i32 = 11;
const WRONG_PIN: i32 = 13;
const WRONG_PASSWORD: i32 = 20;
const VAULT_DAMAGED: i32 = 21;
const VAULT_IN_USE: i32 = 22;
const BAD_MOUNTPOINT: i32 = 23;
const EXISTS: i32 = 25;
const NEEDS_RECOVERY: i32 = 27;

const DATA_OFFSET: u64 = 65536;

/// Write a 200 MiB file in 1 MiB pieces.
fn write_big_file(path: &Path, mib: usize) {
    let mut file = fs::File::create(path).unwrap();
    for i in 0..mib {
        file.write_all(&content(1000 + i as u64, 1 << 20)).unwrap();
    }
    file.sync_all().unwrap();
}

#[test]
fn round_trip_big_and_small_files_survive_remount() {
    let fx = Fixture::create_and_mount(20000001, &[]);
    let m = fx.mnt.clone();
    write_big_file(&m.join("big.bin"), 200);
    for d in 0..10 {
        let dir = m.join(format!("dir{d}/sub"));
        fs::create_dir_all(&dir).unwrap();
        for f in 0..50 {
            let len = (d * 50 + f) * 97 % 20_000;
            fs::write(
                dir.join(format!("f{f}.txt")),
                content((d * 50 + f) as u64, len),
            )
            .unwrap();
        }
    }
    fs::write(m.join("empty"), b"").unwrap();
    std::os::unix::fs::symlink("dir0/sub/f1.txt", m.join("link")).unwrap();
    let before = tree_digests(&m);
    assert_eq!(before.len(), 502);

    let status = fx.run(&["status"]);
    assert_ok(&status);
    assert!(stdout(&status).contains("20000001"), "{}", stdout(&status));

    assert_ok(&fx.unmount());
    assert!(!fx.is_mounted());
    assert_eq!(
        fs::read_dir(&m).unwrap().count(),
        0,
        "the mountpoint is empty again"
    );

    assert_ok(&fx.mount(&[]));
    assert_eq!(tree_digests(&m), before);
    assert_eq!(
        fs::read_link(m.join("link")).unwrap(),
        PathBuf::from("dir0/sub/f1.txt")
    );
    assert_ok(&fx.unmount());
}

/// Shannon entropy, bits per byte.
fn entropy(bytes: &[u8]) -> f64 {
    let mut counts = [0u64; 256];
    for b in bytes {
        counts[*b as usize] += 1;
    }
    let n = bytes.len() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.log2()
        })
        .sum()
}

#[test]
fn container_shows_no_plaintext_no_names_and_looks_random() {
    let fx = Fixture::create_and_mount(20000002, &[]);
    let marker = "keybound-canary-7f3a9c1e-plaintext";
    let name = "secret-name-b41d07e2";
    fs::write(fx.mnt.join(name), marker.repeat(2000)).unwrap();
    fs::create_dir(fx.mnt.join("dir-e5c4b3a2")).unwrap();
    fs::write(fx.mnt.join("dir-e5c4b3a2/zeros"), vec![0u8; 1 << 20]).unwrap();
    assert_ok(&fx.unmount());

    let bytes = fs::read(&fx.vault).unwrap();
    for needle in [marker, name, "dir-e5c4b3a2", "zeros"] {
        assert!(
            memchr_all(&bytes, needle.as_bytes()).is_none(),
            "{needle:?} found in the container"
        );
    }
    let data = &bytes[DATA_OFFSET as usize..];
    assert!(
        data.len() > 1 << 20,
        "the data area holds the 1 MiB of zeros"
    );
    let e = entropy(data);
    assert!(
        e > 7.99,
        "data area entropy {e:.4} bits/byte, expected > 7.99"
    );
    // No 4 KiB stretch may look structured either (e.g. an unsealed hole).
    for (i, block) in data
        .chunks(4096)
        .enumerate()
        .filter(|(_, b)| b.len() == 4096)
    {
        let e = entropy(block);
        assert!(e > 7.8, "block {i} of the data area has entropy {e:.3}");
    }
}

#[test]
fn a_mount_left_idle_seals_its_free_space_before_any_unmount() {
    let fx = Fixture::create_and_mount(20000021, &[]);
    // Requests every 20 ms keep the mount busy (its idle time seals nothing)
    // while a big file grows the store, which leaves gaps listed as unsealed.
    // (Listing the directory: a stat would be answered from the kernel's
    // attribute cache, without a request.)
    let busy = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let poker = {
        let (busy, mnt) = (busy.clone(), fx.mnt.clone());
        std::thread::spawn(move || {
            while busy.load(std::sync::atomic::Ordering::SeqCst) {
                let _ = fs::read_dir(&mnt).map(|entries| entries.count());
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    // 16 MiB in a fresh vault: redb doubles the store past what it fills.
    write_big_file(&fx.mnt.join("big"), 16);
    let before = fx.unsealed_sectors(&fx.vault);
    busy.store(false, std::sync::atomic::Ordering::SeqCst);
    poker.join().unwrap();
    assert!(before > 0, "a growing store left no gap to seal");
    // Idle now: within seconds the header lists none, and the file has no
    // 4 KiB stretch of zeros where the gaps were.
    common::wait_until(
        "the idle mount to seal its gaps",
        Duration::from_secs(20),
        || fx.unsealed_sectors(&fx.vault) == 0,
    );
    let bytes = fs::read(&fx.vault).unwrap();
    let zero_blocks = bytes[DATA_OFFSET as usize..]
        .chunks_exact(4124)
        .filter(|sector| sector.iter().all(|&b| b == 0))
        .count();
    assert_eq!(zero_blocks, 0, "{before} sectors were unsealed");
    assert!(fs::read(fx.mnt.join("big")).unwrap().len() == 16 << 20);
}

fn memchr_all(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[test]
fn wrong_secrets_and_missing_or_foreign_tokens_are_refused_without_change() {
    let mut fx = Fixture::new(20000003);
    assert_ok(&fx.create(&[]));
    let before = fx.vault_digest();

    let bad_password = fx.secret("bad-password", "not the password");
    assert_fails(
        &fx.mount_with(&bad_password, &fx.pin.clone(), &[]),
        WRONG_PASSWORD,
        &["wrong password", "vault.kb"],
    );
    let bad_pin = fx.secret("bad-pin", "11112222");
    assert_fails(
        &fx.mount_with(&fx.password.clone(), &bad_pin, &[]),
        WRONG_PIN,
        &["wrong PIN", "20000003", "2 tries left"],
    );
    assert!(!fx.is_mounted());

    // Another token (same PIN, never enrolled) in the reader instead.
    let state = fx.card().state.clone();
    fx.card().pull();
    let other = common::SoftCard::insert(&fx.path("other-card.json"), 20000099, 0);
    assert_ok(&fx.run(&["token", "setup", "--new-pin-file", fx.pin.to_str().unwrap()]));
    assert_fails(
        &fx.mount(&[]),
        NO_TOKEN,
        &["no token enrolled", "20000003", "20000099"],
    );
    drop(other);
    // No token at all.
    assert_fails(&fx.mount(&[]), NO_TOKEN, &["no PIV token"]);
    // No smart-card service.
    let out = fx
        .mount_command(&fx.password, &fx.pin, &[])
        .env("PCSCLITE_CSOCK_NAME", "/nonexistent/pcscd.comm")
        .output()
        .unwrap();
    assert_fails(&out, NO_PCSCD, &["pcscd", "not running"]);
    assert!(!fx.is_mounted());
    assert_eq!(fx.vault_digest(), before, "refusals changed the container");

    // The right card again: the right PIN works (and the counter is reset).
    let _card = common::SoftCard::insert(&state, 20000003, 0);
    assert_ok(&fx.mount(&[]));
    assert_ok(&fx.unmount());
}

#[test]
fn mountpoint_problems_and_a_second_mount_are_refused() {
    let fx = Fixture::new(20000004);
    assert_ok(&fx.create(&[]));
    assert_fails(
        &fx.create(&[]),
        EXISTS,
        &["exists already", "never overwrites"],
    );
    let missing = fx.path("missing");
    let out = fx.run(&[
        "mount",
        fx.vault.to_str().unwrap(),
        missing.to_str().unwrap(),
        "--password-file",
        fx.password.to_str().unwrap(),
        "--pin-file",
        fx.pin.to_str().unwrap(),
    ]);
    assert_fails(&out, BAD_MOUNTPOINT, &["does not exist", "mkdir"]);
    fs::write(fx.mnt.join("stray"), b"x").unwrap();
    assert_fails(&fx.mount(&[]), BAD_MOUNTPOINT, &["not empty"]);
    fs::remove_file(fx.mnt.join("stray")).unwrap();

    assert_ok(&fx.mount(&[]));
    let pid = fx.daemon_pid();
    let other_mnt = fx.path("mnt2");
    fs::create_dir(&other_mnt).unwrap();
    let out = fx.run(&[
        "mount",
        fx.vault.to_str().unwrap(),
        other_mnt.to_str().unwrap(),
        "--password-file",
        fx.password.to_str().unwrap(),
        "--pin-file",
        fx.pin.to_str().unwrap(),
    ]);
    assert_fails(
        &out,
        VAULT_IN_USE,
        &[
            "already open",
            &pid.to_string(),
            fx.mnt.file_name().unwrap().to_str().unwrap(),
        ],
    );
    // Mounting something else on top of the live mount is refused too.
    assert_fails(&fx.mount(&[]), VAULT_IN_USE, &["already open"]);
    assert_ok(&fx.unmount());
    wait_for_exit(pid, Duration::from_secs(10));
}

#[test]
fn damaged_header_copy_falls_back_and_both_damaged_is_refused() {
    let fx = Fixture::new(20000005);
    assert_ok(&fx.create(&[]));
    // Copy A: its generation field.
    flip_bit(&fx.vault, 20);
    let info = fx.run(&["info", fx.vault.to_str().unwrap()]);
    assert_ok(&info);
    assert!(stdout(&info).contains("20000005"), "{}", stdout(&info));
    assert_ok(&fx.mount(&[]));
    fs::write(fx.mnt.join("after-repair"), b"still here").unwrap();
    assert_ok(&fx.unmount());
    assert_ok(&fx.mount(&[]));
    assert_eq!(
        fs::read(fx.mnt.join("after-repair")).unwrap(),
        b"still here"
    );
    assert_ok(&fx.unmount());

    // Both copies: the vault is refused with a clear message, unchanged.
    flip_bit(&fx.vault, 20);
    flip_bit(&fx.vault, 16384 + 20);
    let before = fx.vault_digest();
    assert_fails(
        &fx.mount(&[]),
        VAULT_DAMAGED,
        &["both header copies", "vault.kb"],
    );
    assert_fails(
        &fx.run(&["info", fx.vault.to_str().unwrap()]),
        VAULT_DAMAGED,
        &["both header copies"],
    );
    assert_eq!(fx.vault_digest(), before);
}

#[test]
fn flipped_data_bit_is_an_io_error_on_that_file_only() {
    let fx = Fixture::create_and_mount(20000006, &[]);
    let big = content(7, 24 << 20);
    fs::write(fx.mnt.join("big"), &big).unwrap();
    fs::write(fx.mnt.join("small"), b"small and intact").unwrap();
    assert_ok(&fx.unmount());

    // The big file is almost all of the data area: hit the middle of it.
    let len = fs::metadata(&fx.vault).unwrap().len();
    let target = DATA_OFFSET + (len - DATA_OFFSET) / 2;
    flip_bit(&fx.vault, target);

    assert_ok(&fx.mount(&[]));
    let mut file = fs::File::open(fx.mnt.join("big")).unwrap();
    let mut read_back = Vec::new();
    let err = file
        .read_to_end(&mut read_back)
        .expect_err("reading a damaged file must fail, not return bytes");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // Whatever was returned before the error is right.
    assert_eq!(&read_back[..], &big[..read_back.len()]);
    drop(file);
    assert_eq!(fs::read(fx.mnt.join("small")).unwrap(), b"small and intact");
    assert_ok(&fx.unmount());
}

#[test]
fn truncated_container_is_refused_with_a_clear_message() {
    let fx = Fixture::create_and_mount(20000007, &[]);
    fs::write(fx.mnt.join("data"), content(9, 3 << 20)).unwrap();
    assert_ok(&fx.unmount());
    let len = fs::metadata(&fx.vault).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&fx.vault)
        .unwrap()
        .set_len(len - 10_000)
        .unwrap();
    let before = fx.vault_digest();
    assert_fails(&fx.mount(&[]), VAULT_DAMAGED, &["truncated", "vault.kb"]);
    assert_eq!(fx.vault_digest(), before);
    assert!(!fx.is_mounted());

    // A vault that is not there: the message names it and says why, once (assert_fails).
    let gone = fx.path("gone.kb");
    let out = fx.run(&["info", s(&gone)]);
    assert_fails(
        &out,
        1,
        &["cannot open", "gone.kb", "No such file or directory"],
    );
}

/// The Argon2id parameters of slot 0, from `keybound info --json`.
fn slot0_argon(fx: &Fixture) -> (u64, u64, u64) {
    let json = fx.info_json(&fx.vault);
    let argon = &json["slots"][0]["kind"]["argon"];
    let field = |name: &str| argon[name].as_u64().unwrap_or_else(|| panic!("{json}"));
    (
        field("memory_kib"),
        field("iterations"),
        field("parallelism"),
    )
}

#[test]
fn a_new_vault_hashes_its_password_as_rfc9106_recommends_unless_told_a_time() {
    let fx = Fixture::new(20000014);
    let created = fx.create(&[]);
    assert_ok(&created);
    assert!(
        stdout(&created).contains("Argon2id, 64 MiB, 3 passes, 4 lanes (RFC 9106"),
        "{}",
        stdout(&created)
    );
    assert_eq!(slot0_argon(&fx), (65536, 3, 4));
    // And it opens with them.
    assert_ok(&fx.mount(&[]));
    assert_ok(&fx.unmount());

    fs::remove_file(&fx.vault).unwrap();
    let created = fx.create(&["--kdf-time", "300ms"]);
    assert_ok(&created);
    assert!(
        stdout(&created).contains("calibrated to"),
        "{}",
        stdout(&created)
    );
    let (memory, passes, lanes) = slot0_argon(&fx);
    assert_eq!((memory, lanes), (65536, 4));
    assert!(passes >= 3, "{passes} passes");
}

#[test]
fn preallocated_vault_has_its_fixed_size_and_says_so() {
    let fx = Fixture::new(20000008);
    assert_ok(&fx.create(&["--size", "64M"]));
    // Exactly the size asked for, less a partial sector.
    let len = fs::metadata(&fx.vault).unwrap().len();
    assert!(
        ((64 << 20) - 4124..=64 << 20).contains(&len),
        "container is {len} bytes"
    );
    let json = fx.info_json(&fx.vault);
    assert!(json["fixed_size"].as_u64().is_some(), "{json}");
    assert_ok(&fx.mount(&[]));
    fs::write(fx.mnt.join("a"), content(1, 8 << 20)).unwrap();
    // Filling it up is ENOSPC, not a dead filesystem.
    let mut file = fs::File::create(fx.mnt.join("fill")).unwrap();
    let chunk = content(2, 1 << 20);
    let err = loop {
        if let Err(e) = file.write_all(&chunk).and_then(|()| file.sync_data()) {
            break e;
        }
    };
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    drop(file);
    fs::remove_file(fx.mnt.join("fill")).unwrap();
    assert_eq!(fs::read(fx.mnt.join("a")).unwrap(), content(1, 8 << 20));
    assert_ok(&fx.unmount());
    assert_eq!(
        fs::metadata(&fx.vault).unwrap().len(),
        len,
        "fixed size never grows"
    );
}

/// `keybound compact VAULT` with the fixture's secrets.
fn compact(fx: &Fixture) -> std::process::Output {
    fx.run_with_secrets("compact", &[])
}

#[test]
fn compact_gives_deleted_space_back_and_keeps_every_file() {
    let fx = Fixture::create_and_mount(20000015, &[]);
    fs::write(fx.mnt.join("kept"), content(3, 100_000)).unwrap();
    let mut big = fs::File::create(fx.mnt.join("big")).unwrap();
    big.write_all(&content(4, 48 << 20)).unwrap();
    big.sync_all().unwrap();
    drop(big);
    fs::remove_file(fx.mnt.join("big")).unwrap();

    // While mounted the vault is in use: refused, and the mount carries on.
    assert_fails(&compact(&fx), VAULT_IN_USE, &["in use"]);
    assert!(fx.is_mounted());
    assert_eq!(fs::read(fx.mnt.join("kept")).unwrap(), content(3, 100_000));
    assert_ok(&fx.unmount());
    // The unmount's commit gave back only part of the deleted space (redb halves
    // the free tail per commit).
    let grown = fs::metadata(&fx.vault).unwrap().len();
    assert!(
        grown > 16 << 20,
        "{grown} bytes: the deleted space is already gone, nothing to test"
    );

    let out = compact(&fx);
    assert_ok(&out);
    assert!(stdout(&out).contains("given back"), "{}", stdout(&out));
    // What stays: redb's store in its first 4 MiB segment, and the 4 MiB data segment that
    // holds `kept` (FORMAT.md §4.10).
    let compacted = fs::metadata(&fx.vault).unwrap().len();
    assert!(
        compacted < 10 << 20,
        "{grown} bytes before, {compacted} after: the deleted 48 MiB stayed"
    );

    assert_ok(&fx.mount(&[]));
    assert_eq!(fs::read(fx.mnt.join("kept")).unwrap(), content(3, 100_000));
    assert!(!fx.mnt.join("big").exists());
    assert_ok(&fx.unmount());
}

#[test]
fn compact_refuses_a_fixed_size_vault_and_changes_nothing() {
    let fx = Fixture::new(20000016);
    assert_ok(&fx.create(&["--size", "16M"]));
    let before = fx.vault_digest();
    let out = compact(&fx);
    assert!(!out.status.success(), "{}", stdout(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("fixed size"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fx.vault_digest(), before);
}

#[test]
fn read_only_mount_refuses_writes_and_changes_nothing() {
    let fx = Fixture::create_and_mount(20000009, &[]);
    fs::write(fx.mnt.join("kept"), b"kept").unwrap();
    assert_ok(&fx.unmount());
    let before = fx.vault_digest();
    assert_ok(&fx.mount(&["--read-only"]));
    assert_eq!(fs::read(fx.mnt.join("kept")).unwrap(), b"kept");
    let err = fs::write(fx.mnt.join("new"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    assert_ok(&fx.unmount());
    assert_eq!(fx.vault_digest(), before);
}

#[test]
fn sigterm_unmounts_cleanly_and_keeps_what_was_written() {
    let fx = Fixture::create_and_mount(20000010, &[]);
    fs::write(fx.mnt.join("note"), b"written before SIGTERM").unwrap();
    let pid = fx.daemon_pid();
    // SAFETY: sending a signal to the daemon we started.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    wait_for_exit(pid, Duration::from_secs(10));
    assert!(!fx.is_mounted());
    assert_ok(&fx.mount(&[]));
    assert_eq!(
        fs::read(fx.mnt.join("note")).unwrap(),
        b"written before SIGTERM"
    );
    assert_ok(&fx.unmount());
}

/// A writer that creates files with fsync and records each one only after its
/// fsync returned; the daemon is killed with SIGKILL in the middle.
#[test]
fn kill_9_during_a_write_storm_keeps_every_fsynced_file() {
    let fx = Fixture::create_and_mount(20000011, &[]);
    let pid = fx.daemon_pid();
    let mnt = fx.mnt.clone();
    let journal = fx.path("fsynced.txt");
    let journal2 = journal.clone();
    let writer = std::thread::spawn(move || {
        let mut log = fs::File::create(&journal2).unwrap();
        for i in 0u64.. {
            let path = mnt.join(format!("f{i:05}"));
            let data = content(i, 1000 + (i as usize * 7919) % 300_000);
            let ok = fs::File::create(&path)
                .and_then(|mut f| f.write_all(&data).and_then(|()| f.sync_all()));
            if ok.is_err() {
                return i;
            }
            writeln!(log, "{i}").unwrap();
            log.sync_all().unwrap();
        }
        unreachable!()
    });
    std::thread::sleep(Duration::from_millis(2500));
    // SAFETY: killing the daemon we started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let stopped_at = writer.join().unwrap();
    assert!(stopped_at > 5, "the storm wrote only {stopped_at} files");
    wait_for_exit(pid, Duration::from_secs(10));

    // The dead mount is cleaned up by `unmount`, then the vault opens again.
    assert_ok(&fx.unmount());
    assert_ok(&fx.mount(&[]));
    let fsynced: Vec<u64> = fs::read_to_string(&journal)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    for i in &fsynced {
        let data = fs::read(fx.mnt.join(format!("f{i:05}")))
            .unwrap_or_else(|e| panic!("fsynced file f{i:05} is gone: {e}"));
        assert!(
            data == content(*i, 1000 + (*i as usize * 7919) % 300_000),
            "fsynced file f{i:05} differs"
        );
    }
    // Everything else is consistent: every file reads without error.
    let all = tree_digests(&fx.mnt);
    assert!(all.len() >= fsynced.len());
    // And the vault still takes writes.
    fs::write(fx.mnt.join("after"), b"after the crash").unwrap();
    assert_ok(&fx.unmount());
}

/// Writes nobody fsynced are committed by the daemon's timer within about a
/// second (docs/fs-schema.md): after two seconds, even kill -9 keeps them.
#[test]
fn unsynced_writes_are_durable_within_a_second_or_so() {
    let fx = Fixture::create_and_mount(20000012, &[]);
    let pid = fx.daemon_pid();
    fs::write(fx.mnt.join("no-fsync"), content(12, 300_000)).unwrap();
    fs::create_dir(fx.mnt.join("dir-no-fsync")).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    // SAFETY: killing the daemon we started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    wait_for_exit(pid, Duration::from_secs(10));
    assert_ok(&fx.unmount());
    assert_ok(&fx.mount(&[]));
    assert_eq!(
        fs::read(fx.mnt.join("no-fsync")).unwrap(),
        content(12, 300_000)
    );
    assert!(fx.mnt.join("dir-no-fsync").is_dir());
    assert_ok(&fx.unmount());
}

/// After a crash, a read-only mount cannot replay the store's recovery (that
/// writes); it must say so and what to do, and change nothing.
#[test]
fn read_only_mount_after_a_crash_explains_itself() {
    let fx = Fixture::create_and_mount(20000020, &[]);
    // A new vault has an fsync log (FORMAT.md §4.9): this fsync goes there, and the kill
    // comes before the timer's commit, so only a replay of the log brings "f" back.
    let info = fx.info_json(&fx.vault);
    assert_eq!(info["version"], 3);
    assert_eq!(info["fsync_log_pages"], 256);
    let mut f = fs::File::create(fx.mnt.join("f")).unwrap();
    f.write_all(b"x").unwrap();
    f.sync_all().unwrap();
    drop(f);
    let pid = fx.daemon_pid();
    // SAFETY: killing the daemon this test started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    wait_for_exit(pid, Duration::from_secs(10));
    let _ = std::process::Command::new("umount")
        .arg("-l")
        .arg(&fx.mnt)
        .status();
    let before = fx.vault_digest();
    let out = fx.mount(&["--read-only"]);
    assert_fails(
        &out,
        NEEDS_RECOVERY,
        &[
            "not closed cleanly",
            "read-write once",
            "then mount it read-only",
        ],
    );
    assert_eq!(fx.vault_digest(), before);
    assert!(!fx.is_mounted());
    // As told: read-write once, then read-only works and shows the data.
    assert_ok(&fx.mount(&[]));
    assert_ok(&fx.unmount());
    assert_ok(&fx.mount(&["--read-only"]));
    assert_eq!(fs::read(fx.mnt.join("f")).unwrap(), b"x");
    assert_ok(&fx.unmount());
}
