//! RESP2/RESP3 codec.
//!
//! Check, then parse (the mini-redis `frame.rs` shape): [`check`] walks a buffer
//! without allocating and says whether one whole frame is present and how long it
//! is; only then does [`parse`] build a [`Frame`], slicing bulk payloads out of the
//! shared [`Bytes`] instead of copying them. Replies from Redis are usually passed
//! through to clients as the raw bytes `check` delimited, never rebuilt.
//!
//! Every length a peer sends is bounded by [`Limits`] before anything is reserved,
//! so a hostile `$99999999999` or a deeply nested array is refused with a
//! [`ProtocolError`] instead of an allocation or a stack overflow.

use bytes::{BufMut, Bytes, BytesMut};

mod quick;

/// Hard bounds on what a peer may send. Violations are protocol errors: the
/// connection gets one `-ERR` naming the limit and is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest bulk string payload (Redis' own `proto-max-bulk-len` default is 512 MiB).
    pub max_bulk_len: usize,
    /// Most elements in one aggregate (array, map, set, push).
    pub max_array_len: usize,
    /// Deepest nesting of aggregates.
    pub max_depth: usize,
    /// Longest inline command line (`PING\r\n` typed into telnet).
    pub max_inline_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_bulk_len: 512 * 1024 * 1024,
            max_array_len: 1024 * 1024,
            max_depth: 32,
            max_inline_len: 64 * 1024,
        }
    }
}

impl Limits {
    /// Limits for replies coming from Redis itself: trusted to be well-formed but
    /// still bounded so a corrupted stream cannot exhaust memory.
    pub fn upstream() -> Self {
        Self {
            max_bulk_len: 1024 * 1024 * 1024,
            max_array_len: 64 * 1024 * 1024,
            max_depth: 64,
            max_inline_len: 64 * 1024,
        }
    }
}

/// Why a byte stream is not RESP (or not RESP we accept).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("Protocol error: invalid type byte '{0}'")]
    InvalidType(char),
    #[error("Protocol error: invalid length")]
    InvalidLength,
    #[error("Protocol error: invalid integer")]
    InvalidInteger,
    #[error("Protocol error: expected CRLF")]
    ExpectedCrlf,
    #[error("Protocol error: bulk length {0} exceeds the limit of {1} bytes")]
    BulkTooLong(i64, usize),
    #[error("Protocol error: aggregate length {0} exceeds the limit of {1} elements")]
    ArrayTooLong(i64, usize),
    #[error("Protocol error: nesting deeper than {0} levels")]
    TooDeep(usize),
    #[error("Protocol error: inline command longer than {0} bytes")]
    InlineTooLong(usize),
    #[error("Protocol error: unbalanced quotes in inline command")]
    UnbalancedQuotes,
    #[error("Protocol error: expected an array of bulk strings as a command")]
    NotACommand,
}

/// One RESP value. RESP2 and RESP3 types share the enum; the encoder writes
/// whatever variant it is given, so callers choose the protocol.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Simple(Bytes),
    Error(Bytes),
    Integer(i64),
    Bulk(Bytes),
    /// RESP2 null bulk string `$-1`.
    NullBulk,
    /// RESP2 null array `*-1`.
    NullArray,
    Array(Vec<Frame>),
    /// RESP3 `_`.
    Null,
    Boolean(bool),
    /// RESP3 double, kept as its textual form so it round-trips exactly.
    Double(Bytes),
    BigNumber(Bytes),
    BulkError(Bytes),
    /// RESP3 verbatim string including its `xxx:` format prefix.
    Verbatim(Bytes),
    Map(Vec<(Frame, Frame)>),
    Set(Vec<Frame>),
    Attribute(Vec<(Frame, Frame)>),
    Push(Vec<Frame>),
}

/// Find `\r\n` from `start`; returns the index of `\r`.
fn find_crlf(buf: &[u8], start: usize) -> Option<usize> {
    let mut i = start;
    while i + 1 < buf.len() {
        match memchr_cr(&buf[i..buf.len() - 1]) {
            Some(off) => {
                let at = i + off;
                if buf[at + 1] == b'\n' {
                    return Some(at);
                }
                i = at + 1;
            }
            None => return None,
        }
    }
    None
}

fn memchr_cr(hay: &[u8]) -> Option<usize> {
    hay.iter().position(|&b| b == b'\r')
}

/// A length header (`$`, `*`, `%`, …) as Redis accepts it: `-1` or a decimal
/// with no sign and no leading zero. Redis refuses `$+4` or `$04` and closes
/// the connection; the sidecar forwards request bytes as they came, so a
/// non-canonical header let through here would break a shared upstream
/// connection for every other client on it.
fn parse_len(digits: &[u8]) -> Result<i64, ProtocolError> {
    let canonical = digits == b"-1"
        || digits == b"0"
        || (digits.first().is_some_and(|d| (b'1'..=b'9').contains(d))
            && digits.iter().all(u8::is_ascii_digit));
    if !canonical {
        return Err(ProtocolError::InvalidLength);
    }
    parse_int(digits)
}

fn parse_int(digits: &[u8]) -> Result<i64, ProtocolError> {
    if digits.is_empty() || digits.len() > 20 {
        return Err(ProtocolError::InvalidInteger);
    }
    let (neg, body) = match digits[0] {
        b'-' => (true, &digits[1..]),
        b'+' => (false, &digits[1..]),
        _ => (false, digits),
    };
    if body.is_empty() {
        return Err(ProtocolError::InvalidInteger);
    }
    let mut v: i64 = 0;
    for &d in body {
        if !d.is_ascii_digit() {
            return Err(ProtocolError::InvalidInteger);
        }
        v = v
            .checked_mul(10)
            .and_then(|v| {
                if neg {
                    v.checked_sub(i64::from(d - b'0'))
                } else {
                    v.checked_add(i64::from(d - b'0'))
                }
            })
            .ok_or(ProtocolError::InvalidInteger)?;
    }
    Ok(v)
}

/// Read a line starting at `pos`: returns (line end exclusive of CRLF, next pos).
fn line(buf: &[u8], pos: usize, max: usize) -> Result<Option<(usize, usize)>, ProtocolError> {
    match find_crlf(buf, pos) {
        Some(end) => Ok(Some((end, end + 2))),
        None => {
            if buf.len().saturating_sub(pos) > max {
                Err(ProtocolError::InlineTooLong(max))
            } else {
                Ok(None)
            }
        }
    }
}

/// Confirm that `buf` starts with one complete frame and return its length in
/// bytes. `Ok(None)` means "need more bytes". Never allocates.
///
/// The straightforward recursive statement of the rules; production code uses
/// the resumable [`Checker`], and the property tests hold the two equal.
#[cfg(test)]
pub fn check(buf: &[u8], limits: &Limits) -> Result<Option<usize>, ProtocolError> {
    check_at(buf, 0, limits, 0)
}

#[cfg(test)]
fn check_at(buf: &[u8], pos: usize, limits: &Limits, depth: usize) -> Result<Option<usize>, ProtocolError> {
    if depth > limits.max_depth {
        return Err(ProtocolError::TooDeep(limits.max_depth));
    }
    let Some(&ty) = buf.get(pos) else {
        return Ok(None);
    };
    // A header line is short; bound the search so a missing CRLF is an error
    // instead of unbounded buffering.
    let header_max = 64;
    match ty {
        b'+' | b'-' | b':' | b'_' | b'#' | b',' | b'(' => {
            let max = if matches!(ty, b'+' | b'-' | b'(') {
                limits.max_inline_len
            } else {
                header_max
            };
            let Some((end, next)) = line(buf, pos + 1, max)? else {
                return Ok(None);
            };
            let body = &buf[pos + 1..end];
            match ty {
                b':' => {
                    parse_int(body)?;
                }
                b'_' if !body.is_empty() => return Err(ProtocolError::ExpectedCrlf),
                b'#' if body != b"t" && body != b"f" => {
                    return Err(ProtocolError::InvalidInteger);
                }
                _ => {}
            }
            Ok(Some(next))
        }
        b'$' | b'!' | b'=' => {
            let Some((end, next)) = line(buf, pos + 1, header_max)? else {
                return Ok(None);
            };
            let len = parse_len(&buf[pos + 1..end])?;
            if len == -1 && ty == b'$' {
                return Ok(Some(next));
            }
            if len < 0 {
                return Err(ProtocolError::InvalidLength);
            }
            if len as u64 > limits.max_bulk_len as u64 {
                return Err(ProtocolError::BulkTooLong(len, limits.max_bulk_len));
            }
            let len = len as usize;
            let total = next + len + 2;
            if buf.len() < total {
                return Ok(None);
            }
            if &buf[next + len..total] != b"\r\n" {
                return Err(ProtocolError::ExpectedCrlf);
            }
            Ok(Some(total))
        }
        b'*' | b'%' | b'~' | b'|' | b'>' => {
            let Some((end, mut next)) = line(buf, pos + 1, header_max)? else {
                return Ok(None);
            };
            let len = parse_len(&buf[pos + 1..end])?;
            if len == -1 && ty == b'*' {
                return Ok(Some(next));
            }
            if len < 0 {
                return Err(ProtocolError::InvalidLength);
            }
            if len as u64 > limits.max_array_len as u64 {
                return Err(ProtocolError::ArrayTooLong(len, limits.max_array_len));
            }
            let elems = if matches!(ty, b'%' | b'|') {
                (len as usize) * 2
            } else {
                len as usize
            };
            for _ in 0..elems {
                match check_at(buf, next, limits, depth + 1)? {
                    Some(n) => next = n,
                    None => return Ok(None),
                }
            }
            // An attribute precedes the value it annotates; both form one frame.
            if ty == b'|' {
                return check_at(buf, next, limits, depth);
            }
            Ok(Some(next))
        }
        other => Err(ProtocolError::InvalidType(other as char)),
    }
}

/// [`check`] that remembers its progress between calls, for long frames that
/// arrive in many reads (a `KEYS` reply of millions of elements): each call
/// continues where the previous one stopped instead of rescanning the buffer
/// from the start, so checking stays linear in the frame size.
///
/// Feed it the same growing buffer (the frame always starting at offset 0)
/// until it returns the frame length; it then resets itself for the next frame.
#[derive(Debug, Clone)]
pub struct Checker {
    limits: Limits,
    pos: usize,
    /// Elements still expected at each open nesting level; the bottom entry
    /// is the one top-level frame.
    stack: Vec<usize>,
}

impl Checker {
    pub fn new(limits: Limits) -> Self {
        Checker {
            limits,
            pos: 0,
            stack: vec![1],
        }
    }

    /// No frame in progress (the fast path of [`parse_request_with`] may
    /// only start where the checker would start too).
    fn is_fresh(&self) -> bool {
        self.pos == 0 && self.stack.as_slice() == [1]
    }

    fn reset(&mut self) {
        self.pos = 0;
        self.stack.clear();
        self.stack.push(1);
    }

    /// Length of the complete frame at the start of `buf`, or `None` if more
    /// bytes are needed. After an error the checker must be discarded along
    /// with the connection.
    pub fn check(&mut self, buf: &[u8]) -> Result<Option<usize>, ProtocolError> {
        let header_max = 64;
        loop {
            while self.stack.last() == Some(&0) {
                self.stack.pop();
            }
            if self.stack.is_empty() {
                let n = self.pos;
                self.reset();
                return Ok(Some(n));
            }
            let pos = self.pos;
            // Nesting depth of the next element: open aggregates (the bottom
            // entry is the top-level slot, not a level).
            if self.stack.len() - 1 > self.limits.max_depth {
                return Err(ProtocolError::TooDeep(self.limits.max_depth));
            }
            let Some(&ty) = buf.get(pos) else {
                return Ok(None);
            };
            match ty {
                b'+' | b'-' | b':' | b'_' | b'#' | b',' | b'(' => {
                    let max = if matches!(ty, b'+' | b'-' | b'(') {
                        self.limits.max_inline_len
                    } else {
                        header_max
                    };
                    let Some((end, next)) = line(buf, pos + 1, max)? else {
                        return Ok(None);
                    };
                    let body = &buf[pos + 1..end];
                    match ty {
                        b':' => {
                            parse_int(body)?;
                        }
                        b'_' if !body.is_empty() => return Err(ProtocolError::ExpectedCrlf),
                        b'#' if body != b"t" && body != b"f" => return Err(ProtocolError::InvalidInteger),
                        _ => {}
                    }
                    self.consume_one(next);
                }
                b'$' | b'!' | b'=' => {
                    let Some((end, next)) = line(buf, pos + 1, header_max)? else {
                        return Ok(None);
                    };
                    let len = parse_len(&buf[pos + 1..end])?;
                    if len == -1 && ty == b'$' {
                        self.consume_one(next);
                        continue;
                    }
                    if len < 0 {
                        return Err(ProtocolError::InvalidLength);
                    }
                    if len as u64 > self.limits.max_bulk_len as u64 {
                        return Err(ProtocolError::BulkTooLong(len, self.limits.max_bulk_len));
                    }
                    let total = next + len as usize + 2;
                    if buf.len() < total {
                        return Ok(None);
                    }
                    if &buf[total - 2..total] != b"\r\n" {
                        return Err(ProtocolError::ExpectedCrlf);
                    }
                    self.consume_one(total);
                }
                b'*' | b'%' | b'~' | b'|' | b'>' => {
                    let Some((end, next)) = line(buf, pos + 1, header_max)? else {
                        return Ok(None);
                    };
                    let len = parse_len(&buf[pos + 1..end])?;
                    if len == -1 && ty == b'*' {
                        self.consume_one(next);
                        continue;
                    }
                    if len < 0 {
                        return Err(ProtocolError::InvalidLength);
                    }
                    if len as u64 > self.limits.max_array_len as u64 {
                        return Err(ProtocolError::ArrayTooLong(len, self.limits.max_array_len));
                    }
                    let elems = if matches!(ty, b'%' | b'|') {
                        (len as usize) * 2
                    } else {
                        len as usize
                    };
                    self.consume_one(next);
                    if ty == b'|' {
                        // An attribute is followed by the value it annotates,
                        // which fills the slot the attribute started in.
                        if let Some(top) = self.stack.last_mut() {
                            *top += 1;
                        }
                    }
                    self.stack.push(elems);
                }
                other => return Err(ProtocolError::InvalidType(other as char)),
            }
        }
    }

    /// One element ends at `next`: count it against the innermost level.
    fn consume_one(&mut self, next: usize) {
        self.pos = next;
        if let Some(top) = self.stack.last_mut() {
            *top = top.saturating_sub(1);
        }
    }
}

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
fn parse_request_via(
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
            && let Some(req) = quick::take(buf, checker)
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

impl Frame {
    pub fn simple(s: &'static str) -> Frame {
        Frame::Simple(Bytes::from_static(s.as_bytes()))
    }

    pub fn error(s: impl Into<String>) -> Frame {
        Frame::Error(Bytes::from(s.into()))
    }

    pub fn bulk(b: impl Into<Bytes>) -> Frame {
        Frame::Bulk(b.into())
    }

    /// Append the wire form of this frame to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        match self {
            Frame::Simple(s) => line_out(out, b'+', s),
            Frame::Error(s) => line_out(out, b'-', s),
            Frame::Integer(i) => {
                out.put_u8(b':');
                out.extend_from_slice(i.to_string().as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            Frame::Bulk(b) => bulk_out(out, b'$', b),
            Frame::BulkError(b) => bulk_out(out, b'!', b),
            Frame::Verbatim(b) => bulk_out(out, b'=', b),
            Frame::NullBulk => out.extend_from_slice(b"$-1\r\n"),
            Frame::NullArray => out.extend_from_slice(b"*-1\r\n"),
            Frame::Null => out.extend_from_slice(b"_\r\n"),
            Frame::Boolean(b) => out.extend_from_slice(if *b { b"#t\r\n" } else { b"#f\r\n" }),
            Frame::Double(d) => line_out(out, b',', d),
            Frame::BigNumber(d) => line_out(out, b'(', d),
            Frame::Array(items) | Frame::Set(items) | Frame::Push(items) => {
                let ty = match self {
                    Frame::Array(_) => b'*',
                    Frame::Set(_) => b'~',
                    _ => b'>',
                };
                header_out(out, ty, items.len());
                for f in items {
                    f.encode(out);
                }
            }
            Frame::Map(pairs) | Frame::Attribute(pairs) => {
                let ty = if matches!(self, Frame::Map(_)) { b'%' } else { b'|' };
                header_out(out, ty, pairs.len());
                for (k, v) in pairs {
                    k.encode(out);
                    v.encode(out);
                }
            }
        }
    }

    pub fn to_bytes(&self) -> Bytes {
        let mut out = BytesMut::new();
        self.encode(&mut out);
        out.freeze()
    }
}

fn line_out(out: &mut BytesMut, ty: u8, s: &[u8]) {
    out.put_u8(ty);
    // Simple strings cannot carry CR/LF; replace rather than corrupt the stream.
    for &b in s {
        out.put_u8(if b == b'\r' || b == b'\n' { b' ' } else { b });
    }
    out.extend_from_slice(b"\r\n");
}

fn header_out(out: &mut BytesMut, ty: u8, len: usize) {
    out.put_u8(ty);
    out.extend_from_slice(len.to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn bulk_out(out: &mut BytesMut, ty: u8, b: &[u8]) {
    header_out(out, ty, b.len());
    out.extend_from_slice(b);
    out.extend_from_slice(b"\r\n");
}

/// Encode a command (array of bulk strings).
pub fn encode_command<B: AsRef<[u8]>>(args: &[B], out: &mut BytesMut) {
    header_out(out, b'*', args.len());
    for a in args {
        bulk_out(out, b'$', a.as_ref());
    }
}

pub fn command_bytes<B: AsRef<[u8]>>(args: &[B]) -> Bytes {
    let mut out = BytesMut::new();
    encode_command(args, &mut out);
    out.freeze()
}

/// If a raw reply is an error, its message (without the leading `-`).
pub fn error_text(raw: &[u8]) -> Option<&[u8]> {
    if raw.first() == Some(&b'-') {
        let end = raw.len().saturating_sub(2).max(1);
        Some(&raw[1..end])
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(f: &Frame) -> Frame {
        let bytes = f.to_bytes();
        let n = check(&bytes, &Limits::default()).unwrap().unwrap();
        assert_eq!(n, bytes.len());
        parse(&bytes).unwrap()
    }

    #[test]
    fn every_prefix_of_a_frame_asks_for_more_bytes() {
        let f = Frame::Array(vec![
            Frame::bulk("hello"),
            Frame::Integer(-42),
            Frame::Map(vec![(Frame::simple("k"), Frame::Null)]),
        ]);
        let bytes = f.to_bytes();
        for i in 0..bytes.len() {
            assert_eq!(check(&bytes[..i], &Limits::default()).unwrap(), None, "{i}");
        }
        assert_eq!(roundtrip(&f), f);
    }

    #[test]
    fn oversized_bulk_is_refused_before_it_is_buffered() {
        let err = check(b"$999999999999\r\n", &Limits::default()).unwrap_err();
        assert!(matches!(err, ProtocolError::BulkTooLong(..)));
    }

    #[test]
    fn deep_nesting_is_refused() {
        let bytes = "*1\r\n".repeat(100);
        let err = check(bytes.as_bytes(), &Limits::default()).unwrap_err();
        assert_eq!(err, ProtocolError::TooDeep(32));
    }

    #[test]
    fn non_canonical_length_headers_are_refused_as_redis_refuses_them() {
        for bytes in [
            &b"*1\r\n$+4\r\nPING\r\n"[..],
            b"*1\r\n$04\r\nPING\r\n",
            b"*+1\r\n$4\r\nPING\r\n",
            b"*01\r\n$4\r\nPING\r\n",
        ] {
            assert_eq!(
                check(bytes, &Limits::default()).unwrap_err(),
                ProtocolError::InvalidLength,
                "{bytes:?}"
            );
            assert_eq!(
                Checker::new(Limits::default()).check(bytes).unwrap_err(),
                ProtocolError::InvalidLength,
                "{bytes:?}"
            );
        }
        assert!(
            check(b"*1\r\n$4\r\nPING\r\n", &Limits::default())
                .unwrap()
                .is_some()
        );
        assert!(check(b"$-1\r\n", &Limits::default()).unwrap().is_some());
        assert!(check(b"*0\r\n", &Limits::default()).unwrap().is_some());
    }

    #[test]
    fn huge_array_header_is_refused() {
        let err = check(b"*99999999\r\n", &Limits::default()).unwrap_err();
        assert!(matches!(err, ProtocolError::ArrayTooLong(..)));
    }

    #[test]
    fn inline_commands_split_on_whitespace_and_honour_quotes() {
        let mut buf = BytesMut::from(&b"SET k \"a b\\n\"\r\nPING\n"[..]);
        let l = Limits::default();
        let a = parse_command(&mut buf, &l).unwrap().unwrap();
        assert_eq!(
            a,
            vec![Bytes::from("SET"), Bytes::from("k"), Bytes::from("a b\n")]
        );
        let b = parse_command(&mut buf, &l).unwrap().unwrap();
        assert_eq!(b, vec![Bytes::from("PING")]);
        assert!(parse_command(&mut buf, &l).unwrap().is_none());
    }

    #[test]
    fn overlong_inline_line_is_refused() {
        let l = Limits {
            max_inline_len: 10,
            ..Limits::default()
        };
        let mut buf = BytesMut::from(&b"GET aaaaaaaaaaaaaaaaaaa"[..]);
        assert_eq!(
            parse_command(&mut buf, &l).unwrap_err(),
            ProtocolError::InlineTooLong(10)
        );
    }

    #[test]
    fn command_array_must_hold_bulk_strings() {
        let mut buf = BytesMut::from(&b"*1\r\n:1\r\n"[..]);
        assert_eq!(
            parse_command(&mut buf, &Limits::default()).unwrap_err(),
            ProtocolError::NotACommand
        );
    }

    fn arb_frame() -> impl Strategy<Value = Frame> {
        let leaf = prop_oneof![
            "[a-zA-Z0-9 ]{0,12}".prop_map(|s| Frame::Simple(Bytes::from(s))),
            "[a-zA-Z0-9 ]{0,12}".prop_map(|s| Frame::Error(Bytes::from(s))),
            any::<i64>().prop_map(Frame::Integer),
            proptest::collection::vec(any::<u8>(), 0..32).prop_map(|v| Frame::Bulk(Bytes::from(v))),
            Just(Frame::NullBulk),
            Just(Frame::NullArray),
            Just(Frame::Null),
            any::<bool>().prop_map(Frame::Boolean),
            "[0-9]{1,5}\\.[0-9]{1,3}".prop_map(|s| Frame::Double(Bytes::from(s))),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Frame::Array),
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Frame::Set),
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Frame::Push),
                proptest::collection::vec((inner.clone(), inner), 0..4).prop_map(Frame::Map),
            ]
        })
    }

    #[test]
    fn the_incremental_checker_agrees_with_check_byte_by_byte() {
        let f = Frame::Array(vec![
            Frame::bulk("hello"),
            Frame::Map(vec![(Frame::simple("k"), Frame::Array(vec![]))]),
            Frame::NullBulk,
            Frame::NullArray,
        ]);
        let mut bytes = f.to_bytes().to_vec();
        bytes.extend_from_slice(b"+next\r\n");
        let mut c = Checker::new(Limits::default());
        let first = f.to_bytes().len();
        for i in 0..first {
            assert_eq!(c.check(&bytes[..i]).unwrap(), None, "{i}");
        }
        assert_eq!(c.check(&bytes).unwrap(), Some(first));
        assert_eq!(c.check(&bytes[first..]).unwrap(), Some(7));
        let deep = "*1\r\n".repeat(100);
        assert_eq!(
            Checker::new(Limits::default())
                .check(deep.as_bytes())
                .unwrap_err(),
            ProtocolError::TooDeep(32)
        );
    }

    proptest! {
        #[test]
        fn encoded_frames_parse_back_to_themselves(f in arb_frame()) {
            prop_assert_eq!(roundtrip(&f), f);
        }

        #[test]
        fn the_incremental_checker_matches_check_at_any_split(f in arb_frame(), cut in 0usize..200) {
            let bytes = f.to_bytes();
            let cut = cut.min(bytes.len());
            let mut c = Checker::new(Limits::default());
            let early = c.check(&bytes[..cut]).unwrap();
            prop_assert_eq!(early, check(&bytes[..cut], &Limits::default()).unwrap());
            if early.is_none() {
                prop_assert_eq!(c.check(&bytes).unwrap(), Some(bytes.len()));
            }
            let shallow = Limits { max_depth: 2, ..Limits::default() };
            prop_assert_eq!(Checker::new(shallow).check(&bytes), check(&bytes, &shallow));
        }

        #[test]
        fn the_incremental_checker_agrees_with_check_on_arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..128)) {
            let limits = Limits { max_depth: 8, max_bulk_len: 1 << 16, max_array_len: 1 << 10, max_inline_len: 128 };
            let a = check(&data, &limits);
            let b = Checker::new(limits).check(&data);
            prop_assert_eq!(a.is_ok(), b.is_ok());
            if let (Ok(a), Ok(b)) = (a, b) {
                prop_assert_eq!(a, b);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic_the_codec(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let limits = Limits { max_depth: 8, max_bulk_len: 1 << 16, max_array_len: 1 << 10, max_inline_len: 128 };
            if let Ok(Some(n)) = check(&data, &limits) {
                let bytes = Bytes::copy_from_slice(&data[..n]);
                let _ = parse(&bytes);
            }
            let mut buf = BytesMut::from(&data[..]);
            for _ in 0..64 {
                match parse_command(&mut buf, &limits) {
                    Ok(Some(_)) => {}
                    _ => break,
                }
            }
        }

        #[test]
        fn commands_parse_back_to_their_arguments(args in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..16), 1..8)) {
            let bytes = command_bytes(&args);
            let mut buf = BytesMut::from(&bytes[..]);
            let parsed = parse_command(&mut buf, &Limits::default()).unwrap().unwrap();
            let parsed: Vec<Vec<u8>> = parsed.into_iter().map(|b| b.to_vec()).collect();
            prop_assert_eq!(parsed, args);
        }
    }
}
