//! BER-TLV as PIV uses it: tags of one to three bytes, definite lengths of up
//! to two length bytes (`81 xx`, `82 xx xx`). Parsing never panics; anything
//! malformed is a [`TlvError`], which the applet answers with 6A80.

/// The input is not well-formed BER-TLV.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlvError;

/// One parsed element, borrowing its value from the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tlv<'a> {
    /// The tag bytes as a big-endian number (`5F C1 09` is `0x5FC109`).
    pub tag: u32,
    pub value: &'a [u8],
}

/// Parse one element from the front of `input`; returns it and the rest.
pub fn parse_one(input: &[u8]) -> Result<(Tlv<'_>, &[u8]), TlvError> {
    let (tag, rest) = parse_tag(input)?;
    let (len, rest) = parse_len(rest)?;
    if rest.len() < len {
        return Err(TlvError);
    }
    let (value, rest) = rest.split_at(len);
    Ok((Tlv { tag, value }, rest))
}

/// Parse a sequence of elements that must fill `input` exactly.
pub fn parse_all(mut input: &[u8]) -> Result<Vec<Tlv<'_>>, TlvError> {
    let mut out = Vec::new();
    while !input.is_empty() {
        let (tlv, rest) = parse_one(input)?;
        out.push(tlv);
        input = rest;
    }
    Ok(out)
}

/// Parse `input` as exactly one element with tag `tag` and return its value.
pub fn expect_single(input: &[u8], tag: u32) -> Result<&[u8], TlvError> {
    let (tlv, rest) = parse_one(input)?;
    if tlv.tag != tag || !rest.is_empty() {
        return Err(TlvError);
    }
    Ok(tlv.value)
}

/// First element with `tag` in an already parsed list.
pub fn find<'a>(items: &[Tlv<'a>], tag: u32) -> Option<&'a [u8]> {
    items.iter().find(|t| t.tag == tag).map(|t| t.value)
}

fn parse_tag(input: &[u8]) -> Result<(u32, &[u8]), TlvError> {
    let (&first, mut rest) = input.split_first().ok_or(TlvError)?;
    let mut tag = u32::from(first);
    // Low five bits all set: the tag number continues in following bytes,
    // each with bit 8 set except the last. PIV never needs more than three.
    if first & 0x1F == 0x1F {
        loop {
            let (&b, r) = rest.split_first().ok_or(TlvError)?;
            rest = r;
            tag = (tag << 8) | u32::from(b);
            if tag > 0xFF_FFFF {
                return Err(TlvError);
            }
            if b & 0x80 == 0 {
                break;
            }
        }
    }
    Ok((tag, rest))
}

fn parse_len(input: &[u8]) -> Result<(usize, &[u8]), TlvError> {
    let (&first, rest) = input.split_first().ok_or(TlvError)?;
    match first {
        0x00..=0x7F => Ok((usize::from(first), rest)),
        0x81 => {
            let (&b, rest) = rest.split_first().ok_or(TlvError)?;
            Ok((usize::from(b), rest))
        }
        0x82 => match rest {
            [hi, lo, rest @ ..] => Ok(((usize::from(*hi) << 8) | usize::from(*lo), rest)),
            _ => Err(TlvError),
        },
        // 0x80 is BER's indefinite length, 0x83+ are longer than any APDU.
        _ => Err(TlvError),
    }
}

/// Append the BER length of `len` to `out` (shortest form).
pub fn push_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else if len <= 0xFF {
        out.extend_from_slice(&[0x81, len as u8]);
    } else {
        // Callers never build values of 64 KiB or more (APDU limit).
        let len = len.min(0xFFFF);
        out.extend_from_slice(&[0x82, (len >> 8) as u8, len as u8]);
    }
}

/// Append the tag bytes of `tag` (one to three bytes, leading zeros dropped).
pub fn push_tag(out: &mut Vec<u8>, tag: u32) {
    if tag > 0xFFFF {
        out.push((tag >> 16) as u8);
    }
    if tag > 0xFF {
        out.push((tag >> 8) as u8);
    }
    out.push(tag as u8);
}

/// Append a whole element.
pub fn push(out: &mut Vec<u8>, tag: u32, value: &[u8]) {
    push_tag(out, tag);
    push_len(out, value.len());
    out.extend_from_slice(value);
}

/// Encode one element into a new buffer.
pub fn encode(tag: u32, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() + 6);
    push(&mut out, tag, value);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_short_and_long_lengths() {
        for len in [0usize, 1, 0x7F, 0x80, 0xFF, 0x100, 3000] {
            let value = vec![0xAB; len];
            let enc = encode(0x5FC109, &value);
            let (tlv, rest) = parse_one(&enc).unwrap();
            assert_eq!(tlv.tag, 0x5FC109);
            assert_eq!(tlv.value, &value[..]);
            assert!(rest.is_empty());
        }
    }

    #[test]
    fn two_byte_tag() {
        let (tlv, _) = parse_one(&[0x7F, 0x49, 0x01, 0x00]).unwrap();
        assert_eq!(tlv.tag, 0x7F49);
    }

    #[test]
    fn malformed_is_error() {
        for bad in [
            &[][..],
            &[0x7C],
            &[0x7C, 0x02, 0x80],
            &[0x7C, 0x80],
            &[0x7C, 0x83, 0, 0, 1],
            &[0x7C, 0x81],
            &[0x7C, 0x82, 0x01],
            &[0x5F],
            &[0x5F, 0xC1],
            &[0x5F, 0xFF, 0xFF, 0xFF, 0x01, 0x00],
        ] {
            assert_eq!(parse_one(bad), Err(TlvError), "{bad:02x?}");
        }
    }

    #[test]
    fn parse_all_requires_exact_fill() {
        assert_eq!(parse_all(&[0x80, 0x00, 0x81, 0x01, 0x05]).unwrap().len(), 2);
        assert!(parse_all(&[0x80, 0x00, 0x81, 0x02, 0x05]).is_err());
    }
}
