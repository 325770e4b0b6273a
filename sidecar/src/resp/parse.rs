//! Parsing a frame [`check`](super::check) delimited into a [`Frame`],
//! zero-copy.

use bytes::Bytes;

use super::*;

/// Build the frame that [`check`] delimited. `buf` must be exactly that frame
/// (or start with it); bulk payloads are zero-copy slices of `buf`.
pub fn parse(buf: &Bytes) -> Result<Frame, ProtocolError> {
    let (frame, _) = parse_at(buf, 0)?;
    Ok(frame)
}

fn parse_at(buf: &Bytes, pos: usize) -> Result<(Frame, usize), ProtocolError> {
    let ty = *buf.get(pos).ok_or(ProtocolError::InvalidLength)?;
    let (end, next) = match find_crlf(buf, pos + 1) {
        Some(end) => (end, end + 2),
        None => return Err(ProtocolError::ExpectedCrlf),
    };
    let body = || buf.slice(pos + 1..end);
    Ok(match ty {
        b'+' => (Frame::Simple(body()), next),
        b'-' => (Frame::Error(body()), next),
        b':' => (Frame::Integer(parse_int(&buf[pos + 1..end])?), next),
        b'_' => (Frame::Null, next),
        b'#' => (Frame::Boolean(&buf[pos + 1..end] == b"t"), next),
        b',' => (Frame::Double(body()), next),
        b'(' => (Frame::BigNumber(body()), next),
        b'$' | b'!' | b'=' => {
            let len = parse_len(&buf[pos + 1..end])?;
            if len < 0 {
                return Ok((Frame::NullBulk, next));
            }
            let len = len as usize;
            if buf.len() < next + len + 2 {
                return Err(ProtocolError::InvalidLength);
            }
            let data = buf.slice(next..next + len);
            let f = match ty {
                b'$' => Frame::Bulk(data),
                b'!' => Frame::BulkError(data),
                _ => Frame::Verbatim(data),
            };
            (f, next + len + 2)
        }
        b'*' | b'~' | b'>' => {
            let len = parse_len(&buf[pos + 1..end])?;
            if len < 0 {
                return Ok((Frame::NullArray, next));
            }
            let mut items = Vec::with_capacity((len as usize).min(1024));
            let mut at = next;
            for _ in 0..len {
                let (f, n) = parse_at(buf, at)?;
                items.push(f);
                at = n;
            }
            let f = match ty {
                b'*' => Frame::Array(items),
                b'~' => Frame::Set(items),
                _ => Frame::Push(items),
            };
            (f, at)
        }
        b'%' | b'|' => {
            let len = parse_len(&buf[pos + 1..end])?;
            let mut pairs = Vec::with_capacity((len.max(0) as usize).min(1024));
            let mut at = next;
            for _ in 0..len {
                let (k, n) = parse_at(buf, at)?;
                let (v, n) = parse_at(buf, n)?;
                pairs.push((k, v));
                at = n;
            }
            if ty == b'|' {
                // Attributes are advisory; return the annotated value.
                return parse_at(buf, at);
            }
            (Frame::Map(pairs), at)
        }
        other => return Err(ProtocolError::InvalidType(other as char)),
    })
}
