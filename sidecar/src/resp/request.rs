//! Client requests: RESP arrays of bulk strings or inline command lines.

use bytes::{Bytes, BytesMut};

use super::*;

/// A client request: its arguments and its wire form. `raw` is forwarded
/// upstream as is when the command goes to one node, saving a re-encode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub raw: Bytes,
    pub args: Vec<Bytes>,
}

/// Parse a client request at the front of `buf`: either a RESP array of bulk
/// strings or an inline command line. Returns the arguments and consumes their
/// bytes; `Ok(None)` means more bytes are needed.
pub fn parse_command(buf: &mut BytesMut, limits: &Limits) -> Result<Option<Vec<Bytes>>, ProtocolError> {
    Ok(parse_request(buf, limits)?.map(|r| r.args))
}

/// [`parse_command`], keeping the request's wire form.
pub fn parse_request(buf: &mut BytesMut, limits: &Limits) -> Result<Option<Request>, ProtocolError> {
    parse_request_with(buf, &mut Checker::new(*limits), limits)
}

/// [`parse_request`] with a connection's [`Checker`], so a large request that
/// arrives over many reads is checked in linear time.
pub fn parse_request_with(
    buf: &mut BytesMut,
    checker: &mut Checker,
    limits: &Limits,
) -> Result<Option<Request>, ProtocolError> {
    parse_request_via(buf, checker, limits, true)
}

/// [`parse_request_with`], optionally without its one-pass fast path (the
/// tests hold the two equal).
pub(super) fn parse_request_via(
    buf: &mut BytesMut,
    checker: &mut Checker,
    limits: &Limits,
    fast: bool,
) -> Result<Option<Request>, ProtocolError> {
    loop {
        let Some(&first) = buf.first() else {
            return Ok(None);
        };
        if fast
            && first == b'*'
            && checker.is_fresh()
            && let Some(req) = super::quick::take(buf, checker)
        {
            return Ok(Some(req));
        }
        if first == b'*' {
            let Some(len) = checker.check(buf)? else {
                return Ok(None);
            };
            let raw = buf.split_to(len).freeze();
            // `check` validated the frame; walk it directly into arguments.
            let (end, mut pos) = match find_crlf(&raw, 1) {
                Some(end) => (end, end + 2),
                None => return Err(ProtocolError::ExpectedCrlf),
            };
            let n = parse_int(&raw[1..end])?;
            if n <= 0 {
                continue;
            }
            let mut args = Vec::with_capacity(n as usize);
            for _ in 0..n {
                if raw.get(pos) != Some(&b'$') {
                    return Err(ProtocolError::NotACommand);
                }
                let end = find_crlf(&raw, pos + 1).ok_or(ProtocolError::ExpectedCrlf)?;
                let blen = parse_int(&raw[pos + 1..end])?;
                if blen < 0 {
                    return Err(ProtocolError::NotACommand);
                }
                let start = end + 2;
                let stop = start + blen as usize;
                args.push(raw.slice(start..stop));
                pos = stop + 2;
            }
            return Ok(Some(Request { raw, args }));
        }
        // Inline command: one line, split on whitespace with redis-cli style quoting.
        let end = match buf.iter().position(|&b| b == b'\n') {
            Some(end) => end,
            None if buf.len() > limits.max_inline_len => {
                return Err(ProtocolError::InlineTooLong(limits.max_inline_len));
            }
            None => return Ok(None),
        };
        if end > limits.max_inline_len {
            return Err(ProtocolError::InlineTooLong(limits.max_inline_len));
        }
        let line = buf.split_to(end + 1);
        let text = line.strip_suffix(b"\n").unwrap_or(&line);
        let text = text.strip_suffix(b"\r").unwrap_or(text);
        let args = split_inline(text)?;
        if args.is_empty() {
            continue;
        }
        return Ok(Some(Request {
            raw: command_bytes(&args),
            args,
        }));
    }
}

fn split_inline(line: &[u8]) -> Result<Vec<Bytes>, ProtocolError> {
    let mut args = Vec::new();
    let mut i = 0;
    while i < line.len() {
        while i < line.len() && line[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= line.len() {
            break;
        }
        let mut cur = Vec::new();
        if line[i] == b'"' || line[i] == b'\'' {
            let q = line[i];
            i += 1;
            loop {
                let Some(&c) = line.get(i) else {
                    return Err(ProtocolError::UnbalancedQuotes);
                };
                i += 1;
                if c == q {
                    break;
                }
                if c == b'\\'
                    && q == b'"'
                    && let Some(&n) = line.get(i)
                {
                    i += 1;
                    cur.push(match n {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        other => other,
                    });
                    continue;
                }
                cur.push(c);
            }
            if i < line.len() && !line[i].is_ascii_whitespace() {
                return Err(ProtocolError::UnbalancedQuotes);
            }
        } else {
            while i < line.len() && !line[i].is_ascii_whitespace() {
                cur.push(line[i]);
                i += 1;
            }
        }
        args.push(Bytes::from(cur));
    }
    Ok(args)
}
