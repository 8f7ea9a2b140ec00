//! The tether, measured: a mounted vault locks when its token leaves, when
//! pcscd goes away, on `keybound lock`, SIGTERM and an idle timeout. After a
//! lock the mount is gone, an open file gives errors (never cached plaintext),
//! what was fsynced before is intact, and the daemon's exit status says why.
//! Real pcscd, software card, FUSE; the daemon runs in the foreground as a
//! child of the test so its exit status can be read.

mod common;

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::vault::{Fixture, assert_ok, stdout};

/// Daemon exit codes from docs/user-guide.md.
const LOCKED_BY_COMMAND: i32 = 30;
const LOCKED_TOKEN_REMOVED: i32 = 31;
const LOCKED_OTHER_CARD: i32 = 32;
const LOCKED_READER_GONE: i32 = 33;
const LOCKED_PCSCD_GONE: i32 = 34;
const LOCKED_SIGNAL: i32 = 35;
const LOCKED_IDLE: i32 = 36;

/// Wait for the foreground daemon to exit; its exit code and stderr.
fn wait_daemon(mut child: Child, timeout: Duration) -> (i32, String) {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (status.code().unwrap_or(-1), err);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            panic!("the mount daemon did not lock within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What a user sees after a lock: no mount, an empty directory, no panic.
fn assert_locked(fx: &Fixture, code: i32, err: &str, expected: &[i32], words: &[&str]) {
    assert!(
        expected.contains(&code),
        "exit code {code}, expected one of {expected:?}; stderr:\n{err}"
    );
    for w in words {
        assert!(err.contains(w), "expected {w:?} in:\n{err}");
    }
    assert!(!err.contains("panicked"), "{err}");
    assert!(!fx.is_mounted(), "still mounted after the lock");
    let left: Vec<_> = fs::read_dir(&fx.mnt).unwrap().collect();
    assert!(left.is_empty(), "mountpoint not empty: {left:?}");
    let status = fx.run(&["status"]);
    assert!(stdout(&status).contains("No vault is mounted"));
}

/// Put the card back and mount again with password + PIN; read `name`.
fn reopen_and_read(fx: &mut Fixture, name: &str) -> Vec<u8> {
    if !common::card_present(0) {
        fx.card().reinsert();
    }
    assert_ok(&fx.mount(&[]));
    let data = fs::read(fx.mnt.join(name)).unwrap();
    assert_ok(&fx.unmount());
    data
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn pulling_the_token_while_idle_locks_and_reinserting_does_not_reopen() {
    let mut fx = Fixture::new(40000001);
    assert_ok(&fx.create(&[]));
    let daemon = fx.mount_foreground(&[]);
    fs::write(fx.mnt.join("kept"), b"written before the pull").unwrap();
    File::open(fx.mnt.join("kept")).unwrap().sync_all().unwrap();

    fx.card().pull();
    let (code, err) = wait_daemon(daemon, Duration::from_secs(10));
    assert_locked(
        &fx,
        code,
        &err,
        &[LOCKED_TOKEN_REMOVED],
        &["locked", "removed"],
    );

    // The token comes back: the vault stays shut until someone unlocks it.
    fx.card().reinsert();
    std::thread::sleep(Duration::from_millis(800));
    assert!(!fx.is_mounted());
    assert_eq!(reopen_and_read(&mut fx, "kept"), b"written before the pull");
}

#[test]
fn an_open_file_gets_errors_not_cached_plaintext_after_the_pull() {
    let mut fx = Fixture::new(40000002);
    assert_ok(&fx.create(&[]));
    let daemon = fx.mount_foreground(&[]);
    let secret = pattern(3 << 20, 7);
    fs::write(fx.mnt.join("held"), &secret).unwrap();

    // A reader that keeps the file open and rereads it in a loop; the page
    // cache holds its plaintext the whole time.
    let mut held = File::open(fx.mnt.join("held")).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let outcome = Arc::new(Mutex::new(None));
    let reader = {
        let (stop, outcome) = (stop.clone(), outcome.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 20];
            let mut good_reads = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let r = held
                    .seek(SeekFrom::Start(0))
                    .and_then(|_| held.read_exact(&mut buf));
                match r {
                    Ok(()) => {
                        assert_eq!(&buf[..], &secret[..1 << 20], "wrong bytes read");
                        good_reads += 1;
                    }
                    Err(e) => {
                        *outcome.lock().unwrap() = Some((good_reads, e.to_string()));
                        return held;
                    }
                }
            }
            held
        })
    };
    std::thread::sleep(Duration::from_millis(500));

    fx.card().pull();
    let (code, err) = wait_daemon(daemon, Duration::from_secs(10));
    assert_locked(&fx, code, &err, &[LOCKED_TOKEN_REMOVED], &["removed"]);
    // Give the reader a moment to hit the dead mount, then stop it.
    common::wait_until("the reader to get an error", Duration::from_secs(5), || {
        outcome.lock().unwrap().is_some()
    });
    stop.store(true, Ordering::Relaxed);
    let mut held = reader.join().unwrap();
    let (good_reads, error) = outcome.lock().unwrap().clone().unwrap();
    assert!(good_reads > 0, "the reader never read before the pull");
    // Any further read fails too: nothing is served from a cache.
    let mut one = [0u8; 16];
    let again = held
        .seek(SeekFrom::Start(4096))
        .and_then(|_| held.read(&mut one));
    assert!(again.is_err(), "read after the lock returned {again:?}");
    eprintln!("the reader got {good_reads} good reads, then: {error}");
    drop(held);

    assert_eq!(reopen_and_read(&mut fx, "held"), pattern(3 << 20, 7));
}

#[test]
fn a_streaming_writer_keeps_everything_fsynced_before_the_pull() {
    let mut fx = Fixture::new(40000003);
    assert_ok(&fx.create(&[]));
    let daemon = fx.mount_foreground(&[]);
    let path = fx.mnt.join("stream");
    let fsynced = Arc::new(Mutex::new(0usize));
    let writer = {
        let fsynced = fsynced.clone();
        std::thread::spawn(move || -> String {
            let mut file = File::create(&path).unwrap();
            let block = pattern(64 << 10, 3);
            let mut written = 0usize;
            loop {
                let step = file.write_all(&block).and_then(|()| file.sync_data());
                if let Err(e) = step {
                    return e.to_string();
                }
                written += block.len();
                *fsynced.lock().unwrap() = written;
            }
        })
    };
    common::wait_until("some fsynced data", Duration::from_secs(10), || {
        *fsynced.lock().unwrap() >= 4 << 20
    });

    fx.card().pull();
    let before_pull = *fsynced.lock().unwrap();
    let (code, err) = wait_daemon(daemon, Duration::from_secs(10));
    assert_locked(&fx, code, &err, &[LOCKED_TOKEN_REMOVED], &["removed"]);
    let writer_error = writer.join().unwrap();
    let acknowledged = *fsynced.lock().unwrap();
    eprintln!(
        "writer: {before_pull} B fsynced at the pull, {acknowledged} B in all, then: {writer_error}"
    );

    let data = reopen_and_read(&mut fx, "stream");
    assert!(
        data.len() >= acknowledged,
        "fsynced {acknowledged} B but only {} B came back",
        data.len()
    );
    let block = pattern(64 << 10, 3);
    for (i, chunk) in data.chunks(block.len()).enumerate() {
        assert_eq!(chunk, &block[..chunk.len()], "block {i} differs");
    }
}

#[test]
fn pcscd_going_away_locks_fail_closed() {
    let mut fx = Fixture::new(40000004);
    assert_ok(&fx.create(&[]));
    let daemon = fx.mount_foreground(&[]);
    fs::write(fx.mnt.join("kept"), b"before pcscd died").unwrap();
    File::open(fx.mnt.join("kept")).unwrap().sync_all().unwrap();

    common::stop_pcscd();
    let result = wait_daemon(daemon, Duration::from_secs(15));
    common::ensure_pcscd();
    let (code, err) = result;
    assert_locked(
        &fx,
        code,
        &err,
        &[LOCKED_PCSCD_GONE, LOCKED_READER_GONE],
        &["locked"],
    );
    assert_eq!(reopen_and_read(&mut fx, "kept"), b"before pcscd died");
}

#[test]
fn pcscd_that_stops_answering_locks_too() {
    let fx = Fixture::new(40000009);
    assert_ok(&fx.create(&[]));
    let daemon = fx.mount_foreground(&[]);
    let pcscd = pcscd_pids();
    assert!(!pcscd.is_empty(), "no pcscd");
    signal_all(&pcscd, libc::SIGSTOP);
    let started = Instant::now();
    let result = wait_daemon(daemon, Duration::from_secs(15));
    let waited = started.elapsed();
    signal_all(&pcscd, libc::SIGCONT);
    let (code, err) = result;
    assert_locked(&fx, code, &err, &[LOCKED_PCSCD_GONE], &["pcscd"]);
    eprintln!("a frozen pcscd was noticed after {waited:?}");
}

fn pcscd_pids() -> Vec<i32> {
    let out = Command::new("pgrep")
        .args(["-x", "pcscd"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn signal_all(pids: &[i32], sig: i32) {
    for &pid in pids {
        // SAFETY: signalling pcscd, which the test harness runs.
        unsafe { libc::kill(pid, sig) };
    }
}

#[test]
fn another_card_in_the_reader_locks() {
    let mut fx = Fixture::new(40000005);
    assert_ok(&fx.create(&[]));
    let daemon = fx.mount_foreground(&[]);
    // Swap in a different card as fast as we can. pcscd polls the reader
    // every 400 ms, so the daemon sees either the removal or the new card:
    // both lock, and the message says which.
    fx.card().pull();
    let other = common::SoftCard::insert(&fx.path("other.json"), 40000099, 0);
    let (code, err) = wait_daemon(daemon, Duration::from_secs(10));
    assert_locked(
        &fx,
        code,
        &err,
        &[LOCKED_TOKEN_REMOVED, LOCKED_OTHER_CARD],
        &["locked"],
    );
    drop(other);
}

#[test]
fn keybound_lock_cuts_off_an_open_file_where_unmount_refuses() {
    let mut fx = Fixture::new(40000006);
    assert_ok(&fx.create(&[]));
    let daemon = fx.mount_foreground(&[]);
    fs::write(fx.mnt.join("open"), pattern(100_000, 1)).unwrap();
    let mut held = File::open(fx.mnt.join("open")).unwrap();
    let mut first = vec![0u8; 4096];
    held.read_exact(&mut first).unwrap();

    let refused = fx.unmount();
    assert_eq!(refused.status.code(), Some(26), "unmount of a busy vault");
    assert!(fx.is_mounted());

    let locked = fx.run(&["lock", fx.mnt.to_str().unwrap()]);
    assert_ok(&locked);
    assert!(
        stdout(&locked).contains("keys wiped"),
        "{}",
        stdout(&locked)
    );
    let (code, err) = wait_daemon(daemon, Duration::from_secs(10));
    assert_locked(&fx, code, &err, &[LOCKED_BY_COMMAND], &["keybound lock"]);
    let mut rest = vec![0u8; 4096];
    assert!(held.read_exact(&mut rest).is_err());
    drop(held);
    assert_eq!(reopen_and_read(&mut fx, "open"), pattern(100_000, 1));

    // `lock --all` locks what is mounted (here, the daemon is detached), and
    // with nothing mounted says so and succeeds.
    assert_ok(&fx.mount(&[]));
    let all = fx.run(&["lock", "--all"]);
    assert_ok(&all);
    assert!(stdout(&all).contains("keys wiped"), "{}", stdout(&all));
    assert!(!fx.is_mounted());
    let none = fx.run(&["lock", "--all"]);
    assert_ok(&none);
    assert!(stdout(&none).contains("No vault is mounted"));
}

#[test]
fn sigterm_and_the_idle_timeout_lock_with_their_own_codes() {
    let fx = Fixture::new(40000007);
    assert_ok(&fx.create(&[]));
    let daemon = fx.mount_foreground(&[]);
    fs::write(fx.mnt.join("a"), b"a").unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let (code, err) = wait_daemon(daemon, Duration::from_secs(10));
    assert_locked(&fx, code, &err, &[LOCKED_SIGNAL], &["SIGTERM"]);

    // Activity keeps the vault open past its idle limit; silence locks it.
    let daemon = fx.mount_foreground(&["--idle", "2s"]);
    let status = stdout(&fx.run(&["status"]));
    assert!(status.contains("idle lock after 2 s"), "{status}");
    assert!(status.contains("token 40000007 present"), "{status}");
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(4) {
        assert_eq!(fs::read(fx.mnt.join("a")).unwrap(), b"a");
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(fx.is_mounted(), "locked although in use");
    let quiet = Instant::now();
    let (code, err) = wait_daemon(daemon, Duration::from_secs(10));
    let waited = quiet.elapsed();
    assert_locked(&fx, code, &err, &[LOCKED_IDLE], &["no file activity"]);
    assert!(
        waited >= Duration::from_millis(1500),
        "locked {waited:?} after the last access, before the 2 s limit"
    );
}

#[test]
fn mount_wait_waits_for_the_token() {
    let mut fx = Fixture::new(40000008);
    assert_ok(&fx.create(&[]));
    fx.card().pull();
    let mut waiting = fx
        .mount_command(&fx.password, &fx.pin, &["--wait"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(waiting.try_wait().unwrap().is_none(), "did not wait");
    assert!(!fx.is_mounted());
    fx.card().reinsert();
    let status = waiting.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(fx.is_mounted());
    assert_ok(&fx.unmount());
}
