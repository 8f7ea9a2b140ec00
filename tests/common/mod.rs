//! Test harness: the real pcscd, the vsmartcard virtual reader and our software
//! card. Every test that touches a reader holds `ReadersLock`, so tests in
//! parallel processes (cargo-nextest) take turns on the two virtual readers.
#![allow(dead_code)]

pub mod memscan;
pub mod vault;

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

pub const SOFTCARD_BIN: &str = env!("CARGO_BIN_EXE_keybound-softcard");
pub const KEYBOUND_BIN: &str = env!("CARGO_BIN_EXE_keybound");

/// Name pcsc-lite gives the vpcd reader with this index ("Virtual PCD 00 00", "… 00 01").
pub fn reader_name(index: u8) -> String {
    format!("Virtual PCD 00 {index:02}")
}

/// Exclusive use of the virtual readers (and of pcscd) for one test.
pub struct ReadersLock(File);

impl ReadersLock {
    pub fn acquire() -> Self {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open("/tmp/keybound-test-readers.lock")
            .expect("open the readers lock file");
        // SAFETY: flock on a file descriptor we own; blocks until the lock is free.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(rc, 0, "flock the readers lock");
        ensure_pcscd();
        for index in 0..2 {
            wait_for_card(index, false, Duration::from_secs(10));
        }
        ReadersLock(file)
    }
}

fn pcscd_sees_virtual_readers() -> bool {
    let Ok(ctx) = pcsc::Context::establish(pcsc::Scope::User) else {
        return false;
    };
    let Ok(names) = ctx.list_readers_owned() else {
        return false;
    };
    names
        .iter()
        .any(|n| n.to_string_lossy().starts_with("Virtual PCD"))
}

/// Start pcscd if it is not running (it daemonises itself). The test scripts
/// start it too; this keeps `cargo test` usable on its own.
pub fn ensure_pcscd() {
    if pcscd_sees_virtual_readers() {
        return;
    }
    let status = Command::new("pcscd").status();
    assert!(
        matches!(status, Ok(s) if s.success()),
        "pcscd is not running and could not be started: run scripts/setup.sh first"
    );
    wait_until(
        "pcscd to show the virtual readers",
        Duration::from_secs(10),
        pcscd_sees_virtual_readers,
    );
}

/// Poll `done` every 50 ms until it holds; panic naming `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        sleep(Duration::from_millis(50));
    }
}

/// Whether a card is present in the virtual reader `index`.
pub fn card_present(index: u8) -> bool {
    let Ok(ctx) = pcsc::Context::establish(pcsc::Scope::User) else {
        return false;
    };
    let name = std::ffi::CString::new(reader_name(index)).unwrap();
    let mut states = [pcsc::ReaderState::new(name, pcsc::State::UNAWARE)];
    if ctx.get_status_change(Duration::ZERO, &mut states).is_err() {
        return false;
    }
    states[0].event_state().contains(pcsc::State::PRESENT)
}

/// Stop pcscd (every instance) and wait until it is gone; [`ensure_pcscd`]
/// brings it back.
pub fn stop_pcscd() {
    let _ = Command::new("pkill").args(["-x", "pcscd"]).status();
    wait_until("pcscd to stop", Duration::from_secs(10), || {
        !Command::new("pgrep")
            .args(["-x", "pcscd"])
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    });
}

/// Wait until the reader shows (or stops showing) a card; panics after `timeout`.
pub fn wait_for_card(index: u8, present: bool, timeout: Duration) {
    let state = if present { "occupied" } else { "empty" };
    let what = format!("reader {} to become {state}", reader_name(index));
    wait_until(&what, timeout, || card_present(index) == present);
}

/// A running software card. Dropping it pulls the card out of the reader.
pub struct SoftCard {
    child: Option<Child>,
    pub state: PathBuf,
    pub serial: u32,
    pub reader: u8,
}

impl SoftCard {
    /// Start a software card with this state file in reader `reader` and wait
    /// until pcscd reports it present.
    pub fn insert(state: &Path, serial: u32, reader: u8) -> Self {
        // The card's stderr goes next to its state file, so a card that fails
        // to start explains itself in the panic message.
        let log_path = state.with_extension("log");
        let log = File::create(&log_path).expect("create the softcard log");
        let mut cmd = Command::new(SOFTCARD_BIN);
        cmd.arg("--state")
            .arg(state)
            .arg("--serial")
            .arg(serial.to_string())
            .arg("--reader")
            .arg(reader.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // A test process that dies (a timeout, Ctrl-C) must not leave its card in
        // the reader for the next test: the card goes with the thread that made it.
        // SAFETY: prctl is async-signal-safe; nothing else runs before exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("start keybound-softcard");
        let what = format!("pcscd to see the card in {}", reader_name(reader));
        wait_until(&what, Duration::from_secs(10), || {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                panic!("keybound-softcard exited ({status}) before pcscd saw it:\n{log}");
            }
            card_present(reader)
        });
        SoftCard {
            child: Some(child),
            state: state.to_path_buf(),
            serial,
            reader,
        }
    }

    /// Pull the card out: stop the process and wait until pcscd sees the reader empty.
    pub fn pull(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            wait_for_card(self.reader, false, Duration::from_secs(10));
        }
    }

    /// Put the same card (same state file) back in.
    pub fn reinsert(&mut self) {
        self.pull();
        *self = SoftCard::insert(&self.state.clone(), self.serial, self.reader);
    }
}

impl Drop for SoftCard {
    fn drop(&mut self) {
        self.pull();
    }
}
