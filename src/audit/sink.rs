//! Best-effort copies of each entry to the system log (journald or a syslog
//! daemon listening on `/dev/log`), so the trail also exists somewhere a
//! user who can rewrite the audit file cannot reach.
//!
//! One RFC 3164 datagram per entry: `<PRI>Mmm dd hh:mm:ss host keybound[pid]:
//! {json}`, facility authpriv (journald and rsyslog both parse it). Nothing
//! here ever fails a command: a missing or full socket is ignored.

use std::os::unix::net::UnixDatagram;
use std::path::Path;

use super::system::Utc;

/// Where journald and syslog daemons listen.
pub const DEV_LOG: &str = "/dev/log";

/// authpriv: security and authorisation messages (private).
const FACILITY_AUTHPRIV: u8 = 10;
const SEVERITY_WARNING: u8 = 4;
const SEVERITY_INFO: u8 = 6;

/// Format one entry as an RFC 3164 message.
pub(crate) fn format(line: &str, failed: bool, time: &Utc, host: &str, pid: u32) -> String {
    let severity = if failed {
        SEVERITY_WARNING
    } else {
        SEVERITY_INFO
    };
    let pri = u16::from(FACILITY_AUTHPRIV) * 8 + u16::from(severity);
    let host = if host.is_empty() { "-" } else { host };
    format!("<{pri}>{} {host} keybound[{pid}]: {line}", time.rfc3164())
}

/// Send `message` to the syslog socket at `socket`, if there is one. Never
/// blocks (a full receive queue drops the message) and never fails.
pub(crate) fn send(socket: &Path, message: &str) -> bool {
    if !socket.exists() {
        return false;
    }
    let Ok(sock) = UnixDatagram::unbound() else {
        return false;
    };
    if sock.set_nonblocking(true).is_err() {
        return false;
    }
    sock.send_to(message.as_bytes(), socket).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3164_message() {
        let time = Utc::from_unix_millis(1_709_296_496_000);
        let msg = format("{\"seq\":1}", false, &time, "box", 42);
        assert_eq!(msg, "<86>Mar  1 12:34:56 box keybound[42]: {\"seq\":1}");
        let msg = format("{}", true, &time, "", 7);
        assert!(
            msg.starts_with("<84>Mar  1 12:34:56 - keybound[7]: "),
            "{msg}"
        );
    }

    #[test]
    fn sends_a_datagram_and_ignores_a_missing_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        assert!(!send(&path, "nobody listens"));
        let server = UnixDatagram::bind(&path).unwrap();
        assert!(send(&path, "<86>hello"));
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"<86>hello");
        drop(server);
        // The socket file remains but nobody listens: still no error.
        assert!(!send(&path, "gone"));
    }
}
