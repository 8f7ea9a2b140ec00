//! keybound-softcard: a software PIV card (YubiKey 5) on pcscd's virtual
//! reader. TEST DEVICE, NOT SECURE. See `keybound::softcard`.

use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::Parser;
use keybound::softcard::{self, DEFAULT_HOST, Event, NOT_SECURE_WARNING, Options};

const ABOUT: &str = "A software PIV smart card (YubiKey 5) for tests and demos. \
                     TEST DEVICE, NOT SECURE: keys are stored unencrypted in the state file.";

const LONG_ABOUT: &str = "\
A software PIV smart card for tests and demos: a YubiKey 5 PIV applet (firmware 5.4.3,
3DES management key, P-256 keys) plugged into pcscd through vsmartcard's virtual reader
(vpcd). The yubikey crate and yubico-piv-tool see it as a YubiKey in reader
'Virtual PCD 00 0N'.

*** TEST DEVICE, NOT SECURE ***
The PIN, PUK, management key and private keys are stored UNENCRYPTED in the state file.
Never put a real secret on this card.

A new state file is a factory-fresh YubiKey: PIN 123456, PUK 12345678 (3 tries each),
management key 010203040506070801020304050607080102030405060708, no keys, no objects.
Every change (including a wrong PIN) is saved before the card answers, so a blocked PIN
stays blocked across restarts.

Reader N is TCP port 35963+N on HOST (vpcd's defaults); --port overrides it. On
connecting the card prints one line on stdout:
    keybound-softcard: card <serial> inserted in reader <N> (<host>:<port>)
If pcscd is not running, or stops later, the card waits and reconnects every 500 ms; it
does not exit because of pcscd. Stopping the process (SIGTERM, SIGINT, kill) pulls the
card out of the reader. Debug logs (APDU instruction and status words only): RUST_LOG=debug.";

#[derive(Parser, Debug)]
#[command(name = "keybound-softcard", version, about = ABOUT, long_about = LONG_ABOUT)]
struct Args {
    /// The card's state file (JSON, mode 0600); created factory-fresh if missing.
    #[arg(long, value_name = "FILE")]
    state: PathBuf,

    /// Serial number of a new card (random 8 digits if omitted); must match an existing file.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    serial: Option<u32>,

    /// Virtual reader index: 0 is port 35963, 1 is port 35964.
    #[arg(long, value_name = "0|1", default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=1))]
    reader: u8,

    /// Host where pcscd's vpcd listens.
    #[arg(long, default_value = DEFAULT_HOST)]
    host: String,

    /// TCP port of vpcd (overrides the one implied by --reader).
    #[arg(long, value_name = "P")]
    port: Option<u16>,
}

/// Set by SIGINT/SIGTERM; the card loop polls it every 100 ms.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_signal: libc::c_int) {
    if STOP.swap(true, Ordering::SeqCst) {
        // A second signal: the user insists. _exit is async-signal-safe.
        // SAFETY: terminates the process without running any Rust code.
        unsafe { libc::_exit(130) };
    }
}

fn install_signal_handlers() -> io::Result<()> {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction is valid; the handler only touches an
        // atomic and calls _exit, both async-signal-safe.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Print a line; a closed stdout/stderr is not worth a panic.
fn say(mut out: impl Write, line: &str) {
    let _ = writeln!(out, "keybound-softcard: {line}");
    let _ = out.flush();
}

fn report(event: Event<'_>) {
    match event {
        Event::Waiting { address } => say(
            io::stderr(),
            &format!("waiting for pcscd's virtual reader at {address} (is pcscd running?)"),
        ),
        Event::Inserted {
            serial,
            reader,
            address,
        } => say(
            io::stdout(),
            &format!("card {serial} inserted in reader {reader} ({address})"),
        ),
        Event::Disconnected { address } => say(
            io::stderr(),
            &format!("pcscd closed the virtual reader at {address}; card out, reconnecting"),
        ),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(io::stderr)
        .init();
    say(io::stderr(), NOT_SECURE_WARNING);
    if let Err(e) = install_signal_handlers() {
        say(
            io::stderr(),
            &format!("error: cannot install signal handlers: {e}"),
        );
        return ExitCode::FAILURE;
    }
    let opts = Options {
        state: args.state,
        serial: args.serial,
        reader: args.reader,
        host: args.host,
        port: args.port,
    };
    match softcard::run(&opts, &STOP, report) {
        Ok(()) => {
            say(io::stderr(), "stopped: card removed");
            ExitCode::SUCCESS
        }
        Err(e) => {
            say(io::stderr(), &format!("error: {e}"));
            ExitCode::FAILURE
        }
    }
}
