//! Command and response APDUs (ISO 7816-4): parsing of short and extended
//! command forms, and the status words this card answers with.

/// Status words the card uses.
pub mod sw {
    pub const OK: u16 = 0x9000;
    /// 61xx: more response data waiting for GET RESPONSE.
    pub const MORE_DATA: u16 = 0x6100;
    /// 63Cx: verification failed, x tries left.
    pub const VERIFY_FAILED: u16 = 0x63C0;
    pub const MEMORY_FAILURE: u16 = 0x6581;
    pub const WRONG_LENGTH: u16 = 0x6700;
    pub const LAST_COMMAND_EXPECTED: u16 = 0x6883;
    pub const SECURITY_STATUS: u16 = 0x6982;
    pub const AUTH_BLOCKED: u16 = 0x6983;
    pub const CONDITIONS_NOT_SATISFIED: u16 = 0x6985;
    pub const INCORRECT_DATA: u16 = 0x6A80;
    pub const NOT_FOUND: u16 = 0x6A82;
    pub const NOT_ENOUGH_MEMORY: u16 = 0x6A84;
    pub const INCORRECT_P1P2: u16 = 0x6A86;
    /// YubiKey answers a bad key slot with 6B00 (the yubikey crate's IncorrectSlotError).
    pub const WRONG_P1P2: u16 = 0x6B00;
    pub const INS_NOT_SUPPORTED: u16 = 0x6D00;
    pub const CLA_NOT_SUPPORTED: u16 = 0x6E00;

    /// 63Cx with the count capped at 15, the most four bits can say.
    pub fn tries_left(tries: u8) -> u16 {
        VERIFY_FAILED | u16::from(tries.min(15))
    }
}

/// CLA bit 5: more parts of a chained command follow.
pub const CLA_CHAINING: u8 = 0x10;

/// A parsed command APDU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub cla: u8,
    pub ins: u8,
    pub p1: u8,
    pub p2: u8,
    pub data: Vec<u8>,
    /// Expected response length (Ne); `None` when the command carried no Le.
    pub le: Option<usize>,
    /// Whether the command used the extended-length form.
    pub extended: bool,
}

impl Command {
    /// Parse the bytes of a command APDU; a malformed one yields the status
    /// word to answer with (6700).
    pub fn parse(raw: &[u8]) -> Result<Command, u16> {
        let (header, body) = match raw {
            [cla, ins, p1, p2, body @ ..] => ([*cla, *ins, *p1, *p2], body),
            _ => return Err(sw::WRONG_LENGTH),
        };
        let (data, le, extended) = parse_body(body)?;
        let [cla, ins, p1, p2] = header;
        Ok(Command {
            cla,
            ins,
            p1,
            p2,
            data: data.to_vec(),
            le,
            extended,
        })
    }

    /// The number of response bytes the host asked for, with the ISO
    /// convention that an Le of zero means the maximum (256 or 65536).
    pub fn max_response(&self) -> usize {
        match (self.le, self.extended) {
            (Some(n), _) => n,
            (None, true) => 65536,
            (None, false) => 256,
        }
    }
}

/// Split the body after the four header bytes into (data, Ne, extended).
fn parse_body(body: &[u8]) -> Result<(&[u8], Option<usize>, bool), u16> {
    match body {
        // Case 1: no data, no Le.
        [] => Ok((&[], None, false)),
        // Case 2 short: Le only (00 means 256).
        [le] => Ok((&[], Some(short_le(*le)), false)),
        // Extended forms start with a zero byte.
        [0, rest @ ..] => parse_extended(rest),
        // Case 3 / case 4 short.
        [lc, rest @ ..] => {
            let lc = usize::from(*lc);
            if rest.len() == lc {
                Ok((rest, None, false))
            } else if rest.len() == lc + 1 {
                Ok((&rest[..lc], Some(short_le(rest[lc])), false))
            } else {
                Err(sw::WRONG_LENGTH)
            }
        }
    }
}

fn parse_extended(rest: &[u8]) -> Result<(&[u8], Option<usize>, bool), u16> {
    match rest {
        // Case 2 extended: 00 Le1 Le2.
        [hi, lo] => Ok((&[], Some(extended_le(*hi, *lo)), true)),
        [hi, lo, rest @ ..] => {
            let lc = (usize::from(*hi) << 8) | usize::from(*lo);
            if lc == 0 {
                return Err(sw::WRONG_LENGTH);
            }
            if rest.len() == lc {
                Ok((rest, None, true))
            } else if rest.len() == lc + 2 {
                let le = extended_le(rest[lc], rest[lc + 1]);
                Ok((&rest[..lc], Some(le), true))
            } else {
                Err(sw::WRONG_LENGTH)
            }
        }
        _ => Err(sw::WRONG_LENGTH),
    }
}

fn short_le(le: u8) -> usize {
    if le == 0 { 256 } else { usize::from(le) }
}

fn extended_le(hi: u8, lo: u8) -> usize {
    match (usize::from(hi) << 8) | usize::from(lo) {
        0 => 65536,
        n => n,
    }
}

/// A response APDU before it is split for the transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub data: Vec<u8>,
    pub sw: u16,
}

impl Response {
    /// 9000 with data.
    pub fn ok(data: Vec<u8>) -> Response {
        Response { data, sw: sw::OK }
    }

    /// 9000 without data.
    pub fn success() -> Response {
        Response::status(sw::OK)
    }

    /// A bare status word.
    pub fn status(sw: u16) -> Response {
        Response {
            data: Vec::new(),
            sw,
        }
    }

    /// Response data followed by SW1 SW2, as sent on the wire.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.data.len() + 2);
        out.extend_from_slice(&self.data);
        out.extend_from_slice(&self.sw.to_be_bytes());
        out
    }
}

impl Drop for Response {
    // Responses carry shared secrets (ECDH) and PIN-protected objects.
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_forms() {
        let c = Command::parse(&[0, 0xFD, 0, 0]).unwrap();
        assert_eq!((c.data.len(), c.le), (0, None));
        let c = Command::parse(&[0, 0xFD, 0, 0, 0]).unwrap();
        assert_eq!(c.le, Some(256));
        let c = Command::parse(&[0, 0x20, 0, 0x80, 2, 1, 2]).unwrap();
        assert_eq!((c.data, c.le), (vec![1, 2], None));
        let c = Command::parse(&[0, 0x20, 0, 0x80, 2, 1, 2, 0x10]).unwrap();
        assert_eq!(c.le, Some(0x10));
        assert_eq!(
            Command::parse(&[0, 0x20, 0, 0x80, 3, 1]),
            Err(sw::WRONG_LENGTH)
        );
        assert_eq!(Command::parse(&[0, 0x20, 0]), Err(sw::WRONG_LENGTH));
    }

    #[test]
    fn extended_forms() {
        let c = Command::parse(&[0, 0xCB, 0x3F, 0xFF, 0, 0, 0]).unwrap();
        assert_eq!((c.le, c.extended), (Some(65536), true));
        let c = Command::parse(&[0, 0xCB, 0x3F, 0xFF, 0, 0, 2, 9, 9]).unwrap();
        assert_eq!((c.data, c.le, c.extended), (vec![9, 9], None, true));
        let c = Command::parse(&[0, 0xCB, 0x3F, 0xFF, 0, 0, 1, 9, 0x01, 0x00]).unwrap();
        assert_eq!((c.data, c.le), (vec![9], Some(256)));
        assert!(Command::parse(&[0, 0xCB, 0x3F, 0xFF, 0, 0, 3, 9]).is_err());
    }
}
