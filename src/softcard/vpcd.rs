//! Plugging the card into pcscd through vsmartcard's virtual reader (vpcd).
//!
//! vpcd listens on TCP (35963 for reader 0, 35964 for reader 1) and the card
//! connects as a client: an open connection is a card in the reader. Every
//! message, both ways, is a 2-byte big-endian length and a payload. A
//! one-byte payload is a control message (00 power off, 01 power on,
//! 02 reset, 04 "send your ATR"); only the ATR request is answered. Anything
//! else is a command APDU, answered with the response APDU.
//!
//! pcscd asks for the ATR every ~400 ms to see whether the card is still
//! there, so closing the connection (or the process dying) is pulling the
//! card out. If pcscd goes away, the card waits and reconnects: like a token
//! left plugged in while the smart card service restarts.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

use super::card::Card;
use super::error::SoftcardError;

/// vpcd's port for reader 0; reader N listens on this plus N.
pub const VPCD_BASE_PORT: u16 = 35963;
/// Where pcscd's vpcd listens by default.
pub const DEFAULT_HOST: &str = "127.0.0.1";

const RETRY_INTERVAL: Duration = Duration::from_millis(500);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How often a blocked read looks at the stop flag.
const STOP_POLL: Duration = Duration::from_millis(100);

const CTRL_POWER_OFF: u8 = 0x00;
const CTRL_POWER_ON: u8 = 0x01;
const CTRL_RESET: u8 = 0x02;
const CTRL_GET_ATR: u8 = 0x04;

/// How to run the software card.
#[derive(Debug, Clone)]
pub struct Options {
    /// The state file (created factory-fresh if missing).
    pub state: PathBuf,
    /// Serial for a new card; must match an existing state file.
    pub serial: Option<u32>,
    /// vpcd reader index; selects the port unless `port` is set.
    pub reader: u8,
    pub host: String,
    pub port: Option<u16>,
}

impl Options {
    /// Reader 0 on the local pcscd, serial from the file or random.
    pub fn new(state: impl Into<PathBuf>) -> Options {
        Options {
            state: state.into(),
            serial: None,
            reader: 0,
            host: DEFAULT_HOST.to_string(),
            port: None,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
            .unwrap_or_else(|| VPCD_BASE_PORT.saturating_add(u16::from(self.reader)))
    }

    /// `HOST:PORT` as shown to users.
    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port())
    }
}

/// What happened, for the caller to report (the library itself never prints).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event<'a> {
    /// vpcd is not listening; retrying every 500 ms. Sent once per outage.
    Waiting { address: &'a str },
    /// Connected: pcscd will see the card within about 400 ms.
    Inserted {
        serial: u32,
        reader: u8,
        address: &'a str,
    },
    /// pcscd closed the connection; the card will wait and reconnect.
    Disconnected { address: &'a str },
}

/// Load the card and keep it plugged into vpcd until `stop` is set.
/// Returns `Ok(())` when stopped; errors are about the state file or an
/// unresolvable address.
pub fn run(
    opts: &Options,
    stop: &AtomicBool,
    mut on_event: impl FnMut(Event<'_>),
) -> Result<(), SoftcardError> {
    let mut card = Card::open(&opts.state, opts.serial)?;
    let address = opts.address();
    let target = resolve(&address)?;
    while let Some(stream) = connect(target, &address, stop, &mut on_event) {
        on_event(Event::Inserted {
            serial: card.serial(),
            reader: opts.reader,
            address: &address,
        });
        let outcome = serve(&mut card, stream, stop);
        // Whatever ended the connection, the card lost power with it.
        card.power_off();
        match outcome {
            Ok(Ended::Stopped) => return Ok(()),
            Ok(Ended::Closed) => tracing::info!("pcscd closed the connection"),
            Err(e) => tracing::warn!("connection to {address} failed: {e}"),
        }
        on_event(Event::Disconnected { address: &address });
    }
    Ok(())
}

fn resolve(address: &str) -> Result<SocketAddr, SoftcardError> {
    let resolve_error = |source| SoftcardError::Resolve {
        addr: address.to_string(),
        source,
    };
    address
        .to_socket_addrs()
        .map_err(resolve_error)?
        .next()
        .ok_or_else(|| resolve_error(io::Error::new(io::ErrorKind::NotFound, "no address")))
}

/// Connect, retrying every 500 ms; `None` once `stop` is set.
fn connect(
    target: SocketAddr,
    address: &str,
    stop: &AtomicBool,
    on_event: &mut impl FnMut(Event<'_>),
) -> Option<TcpStream> {
    let mut announced = false;
    while !stop.load(Ordering::SeqCst) {
        match TcpStream::connect_timeout(&target, CONNECT_TIMEOUT) {
            Ok(stream) => return Some(stream),
            Err(e) => {
                tracing::debug!("connecting to {address}: {e}");
                if !announced {
                    on_event(Event::Waiting { address });
                    announced = true;
                }
                sleep_unless_stopped(RETRY_INTERVAL, stop);
            }
        }
    }
    None
}

fn sleep_unless_stopped(duration: Duration, stop: &AtomicBool) {
    let deadline = Instant::now() + duration;
    while !stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        if now >= deadline {
            return;
        }
        sleep((deadline - now).min(STOP_POLL));
    }
}

/// Why a connection ended without an I/O error.
enum Ended {
    Stopped,
    Closed,
}

/// Answer vpcd until it disconnects or `stop` is set.
fn serve(card: &mut Card, mut stream: TcpStream, stop: &AtomicBool) -> io::Result<Ended> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(STOP_POLL))?;
    loop {
        let payload = match read_frame(&mut stream, stop)? {
            Frame::Payload(p) => p,
            Frame::Closed => return Ok(Ended::Closed),
            Frame::Stopped => return Ok(Ended::Stopped),
        };
        if let Some(reply) = handle(card, &payload) {
            write_frame(&mut stream, &reply)?;
        }
    }
}

/// One message from vpcd; `None` if it needs no reply.
fn handle(card: &mut Card, payload: &[u8]) -> Option<Vec<u8>> {
    match payload {
        [CTRL_GET_ATR] => Some(card.atr().to_vec()),
        [control] => {
            control_message(card, *control);
            None
        }
        apdu => Some(card.transmit(apdu)),
    }
}

fn control_message(card: &mut Card, control: u8) {
    tracing::debug!("vpcd control {control:02x}");
    match control {
        CTRL_POWER_OFF => card.power_off(),
        CTRL_POWER_ON => card.power_on(),
        CTRL_RESET => card.reset(),
        other => tracing::warn!("unknown vpcd control message {other:02x}"),
    }
}

enum Frame {
    Payload(Vec<u8>),
    Closed,
    Stopped,
}

fn read_frame(stream: &mut TcpStream, stop: &AtomicBool) -> io::Result<Frame> {
    let mut header = [0u8; 2];
    match fill(stream, &mut header, stop)? {
        Fill::Full => {}
        Fill::Closed => return Ok(Frame::Closed),
        Fill::Stopped => return Ok(Frame::Stopped),
    }
    let mut payload = vec![0u8; usize::from(u16::from_be_bytes(header))];
    match fill(stream, &mut payload, stop)? {
        Fill::Full => Ok(Frame::Payload(payload)),
        Fill::Closed => Err(io::ErrorKind::UnexpectedEof.into()),
        Fill::Stopped => Ok(Frame::Stopped),
    }
}

enum Fill {
    Full,
    Closed,
    Stopped,
}

/// Fill `buf` completely, looking at `stop` between reads. `Closed` means
/// end of stream; if part of `buf` was already read it is an error.
fn fill(stream: &mut TcpStream, buf: &mut [u8], stop: &AtomicBool) -> io::Result<Fill> {
    let mut filled = 0;
    while filled < buf.len() {
        if stop.load(Ordering::SeqCst) {
            return Ok(Fill::Stopped);
        }
        quick_ack(stream);
        match stream.read(&mut buf[filled..]) {
            Ok(0) if filled == 0 => return Ok(Fill::Closed),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(e) if is_retry(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Fill::Full)
}

/// Acknowledge received data at once instead of delaying the ACK.
///
/// vpcd before vsmartcard 0.9 (Debian 12 ships such a one) writes the 2-byte
/// length and the payload with two send() calls; Nagle's algorithm then
/// holds the payload until the length is acknowledged, and Linux delays that
/// ACK by 40 ms. Measured: 44 ms per APDU without this, ~0.2 ms with it.
/// The kernel may fall back to delayed ACKs, so this is set before each read.
fn quick_ack(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: setsockopt on a socket we own, with a pointer to a c_int that
    // outlives the call and its correct size.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_QUICKACK,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        tracing::debug!("TCP_QUICKACK: {}", io::Error::last_os_error());
    }
}

fn is_retry(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

fn write_frame(stream: &mut TcpStream, payload: &[u8]) -> io::Result<()> {
    let len = u16::try_from(payload.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "reply too long for vpcd"))?;
    let mut frame = Vec::with_capacity(payload.len() + 2);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(payload);
    stream.write_all(&frame)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A fake vpcd: the card connects, answers the ATR request and an APDU,
    /// and stops promptly when asked.
    #[test]
    fn speaks_vpcd_framing_and_stops() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let dir = tempfile::tempdir().unwrap();
        let mut opts = Options::new(dir.path().join("card.json"));
        opts.port = Some(port);
        opts.serial = Some(4242);
        let stop = AtomicBool::new(false);
        std::thread::scope(|scope| {
            let card = scope.spawn(|| {
                let mut events = Vec::new();
                run(&opts, &stop, |e| events.push(format!("{e:?}"))).map(|()| events)
            });
            let (mut vpcd, _) = listener.accept().unwrap();
            let exchange = |vpcd: &mut TcpStream, msg: &[u8]| {
                write_frame(vpcd, msg).unwrap();
                let mut len = [0u8; 2];
                vpcd.read_exact(&mut len).unwrap();
                let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
                vpcd.read_exact(&mut reply).unwrap();
                reply
            };
            assert_eq!(
                exchange(&mut vpcd, &[CTRL_GET_ATR]),
                super::super::card::ATR
            );
            write_frame(&mut vpcd, &[CTRL_POWER_ON]).unwrap();
            let select = [0, 0xA4, 4, 0, 5, 0xA0, 0, 0, 3, 8];
            assert_eq!(exchange(&mut vpcd, &select)[19..], [0x90, 0x00]);
            assert_eq!(
                exchange(&mut vpcd, &[0, 0xF8, 0, 0]),
                [0, 0, 0x10, 0x92, 0x90, 0]
            );
            let started = Instant::now();
            stop.store(true, Ordering::SeqCst);
            let events = card.join().unwrap().unwrap();
            assert!(started.elapsed() < Duration::from_secs(1));
            assert_eq!(events.len(), 1, "{events:?}");
            assert!(events[0].contains("Inserted"), "{events:?}");
            // The connection is closed: the card was pulled.
            let mut buf = [0u8; 1];
            assert_eq!(vpcd.read(&mut buf).unwrap(), 0);
        });
    }

    /// pcscd restarting (vpcd closing the connection) is not the end: the
    /// card reconnects and is inserted again, with its session forgotten.
    #[test]
    fn reconnects_after_vpcd_closes() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let dir = tempfile::tempdir().unwrap();
        let mut opts = Options::new(dir.path().join("card.json"));
        opts.port = Some(port);
        let stop = AtomicBool::new(false);
        let events = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|scope| {
            let card = scope.spawn(|| {
                run(&opts, &stop, |e| {
                    events.lock().unwrap().push(format!("{e:?}"))
                })
            });
            drop(listener.accept().unwrap());
            let (mut vpcd, _) = listener.accept().unwrap();
            write_frame(&mut vpcd, &[CTRL_GET_ATR]).unwrap();
            let mut reply = [0u8; 25];
            vpcd.read_exact(&mut reply).unwrap();
            assert_eq!(reply[2..], super::super::card::ATR);
            stop.store(true, Ordering::SeqCst);
            card.join().unwrap().unwrap();
        });
        let events = events.into_inner().unwrap();
        let kinds: Vec<_> = events
            .iter()
            .map(|e| e.split(' ').next().unwrap())
            .collect();
        assert_eq!(
            kinds,
            ["Inserted", "Disconnected", "Inserted"],
            "{events:?}"
        );
    }

    #[test]
    fn waits_for_vpcd_and_announces_it_once() {
        // A port nobody listens on: bind, learn the port, close.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let mut opts = Options::new(dir.path().join("card.json"));
        opts.port = Some(port);
        let stop = AtomicBool::new(false);
        let mut events = Vec::new();
        std::thread::scope(|scope| {
            scope.spawn(|| {
                sleep(Duration::from_millis(1300));
                stop.store(true, Ordering::SeqCst);
            });
            run(&opts, &stop, |e| events.push(format!("{e:?}"))).unwrap();
        });
        assert_eq!(events.len(), 1, "{events:?}");
        assert!(events[0].contains("Waiting"), "{events:?}");
    }
}
