//! Client requests: RESP arrays of bulk strings or inline command lines.

use bytes::{Bytes, BytesMut};

use super::quick::MAX_ARGS;
use super::*;

/// A client request: its arguments and its wire form. `raw` is forwarded
/// upstream as is when the command goes to one node, saving a re-encode.
///
/// A request parsed on the one-pass path keeps its arguments as spans of
/// `raw` until a path needs them as `Bytes` ([`Request::into_parts`]): the
/// direct path reads the name and keys in place, which saves a vector and
/// two reference-count updates (atomic) per argument.
#[derive(Clone)]
pub struct Request {
    pub raw: Bytes,
    args: Args,
}

#[derive(Clone)]
enum Args {
    Owned(Vec<Bytes>),
    /// `(start, end)` in `raw` of each of the first `n` arguments.
    Spans {
        n: u8,
        at: [(u32, u32); MAX_ARGS],
    },
}

/// Arguments read by position, whichever way they are held.
pub trait ArgList {
    fn argc(&self) -> usize;
    fn arg(&self, i: usize) -> Option<&[u8]>;
}

impl ArgList for [Bytes] {
    fn argc(&self) -> usize {
        self.len()
    }

    fn arg(&self, i: usize) -> Option<&[u8]> {
        self.get(i).map(|b| &b[..])
    }
}

impl ArgList for Vec<Bytes> {
    fn argc(&self) -> usize {
        self.len()
    }

    fn arg(&self, i: usize) -> Option<&[u8]> {
        self.get(i).map(|b| &b[..])
    }
}

impl ArgList for Request {
    fn argc(&self) -> usize {
        Request::argc(self)
    }

    fn arg(&self, i: usize) -> Option<&[u8]> {
        Request::arg(self, i)
    }
}

#[cfg(test)]
impl Request {
    /// The request a client sends for `args` (for unit tests).
    pub fn of(args: &[&str]) -> Request {
        let args: Vec<Bytes> = args
            .iter()
            .map(|a| Bytes::copy_from_slice(a.as_bytes()))
            .collect();
        Request::new(super::command_bytes(&args), args)
    }
}

impl Request {
    pub fn argc(&self) -> usize {
        match &self.args {
            Args::Owned(v) => v.len(),
            Args::Spans { n, .. } => usize::from(*n),
        }
    }

    pub fn arg(&self, i: usize) -> Option<&[u8]> {
        match &self.args {
            Args::Owned(v) => v.get(i).map(|b| &b[..]),
            Args::Spans { n, at } => {
                let &(s, e) = at[..usize::from(*n)].get(i)?;
                self.raw.get(s as usize..e as usize)
            }
        }
    }

    pub fn new(raw: Bytes, args: Vec<Bytes>) -> Request {
        Request {
            raw,
            args: Args::Owned(args),
        }
    }

    /// The first `n` arguments at `at`, `(start, end)` offsets in `raw`
    /// (the one-pass parser checked both).
    pub(super) fn from_spans(raw: Bytes, n: u8, at: [(u32, u32); MAX_ARGS]) -> Request {
        Request {
            raw,
            args: Args::Spans { n, at },
        }
    }

    /// The command's name as sent (empty for no arguments).
    pub fn name(&self) -> &[u8] {
        self.arg(0).unwrap_or_default()
    }

    /// Argument `i` as `Bytes` sharing the request's buffer.
    pub fn arg_bytes(&self, i: usize) -> Option<Bytes> {
        match &self.args {
            Args::Owned(v) => v.get(i).cloned(),
            Args::Spans { n, at } => {
                let &(s, e) = at[..usize::from(*n)].get(i)?;
                Some(self.raw.slice(s as usize..e as usize))
            }
        }
    }

    /// The wire form and the arguments as `Bytes`.
    pub fn into_parts(self) -> (Bytes, Vec<Bytes>) {
        let args = match self.args {
            Args::Owned(v) => v,
            Args::Spans { n, at } => at[..usize::from(n)]
                .iter()
                .map(|&(s, e)| self.raw.slice(s as usize..e as usize))
                .collect(),
        };
        (self.raw, args)
    }

    fn arg_slices(&self) -> impl Iterator<Item = &[u8]> {
        (0..self.argc()).filter_map(|i| self.arg(i))
    }
}

/// Equal when the wire forms and the arguments are, however they are held.
impl PartialEq for Request {
    fn eq(&self, other: &Request) -> bool {
        self.raw == other.raw && self.argc() == other.argc() && self.arg_slices().eq(other.arg_slices())
    }
}

impl Eq for Request {}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let args: Vec<Bytes> = self.arg_slices().map(Bytes::copy_from_slice).collect();
        f.debug_struct("Request")
            .field("raw", &self.raw)
            .field("args", &args)
            .finish()
    }
}

/// Parse a client request at the front of `buf`: either a RESP array of bulk
/// strings or an inline command line. Returns the arguments and consumes their
/// bytes; `Ok(None)` means more bytes are needed.
pub fn parse_command(buf: &mut BytesMut, limits: &Limits) -> Result<Option<Vec<Bytes>>, ProtocolError> {
    Ok(parse_request(buf, limits)?.map(|r| r.into_parts().1))
}

/// [`parse_command`], keeping the request's wire form.
pub fn parse_request(buf: &mut BytesMut, limits: &Limits) -> Result<Option<Request>, ProtocolError> {
    parse_request_with(buf, &mut Checker::for_requests(*limits), limits)
}

/// The request of `args` as it should have been sent, each bulk string
/// ended by CRLF (what goes upstream is then well-formed RESP).
fn with_crlfs(args: &[Bytes], limits: &Limits) -> Result<Request, ProtocolError> {
    let mut raw = BytesMut::new();
    super::encode_command(args, &mut raw);
    match parse_request_via(&mut raw, &mut Checker::new(*limits), limits, false)? {
        Some(req) => Ok(req),
        None => Err(ProtocolError::ExpectedCrlf),
    }
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
            let mut canonical = true;
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
                canonical &= raw.get(stop..stop + 2) == Some(b"\r\n");
                pos = stop + 2;
            }
            if !canonical {
                return Ok(Some(with_crlfs(&args, limits)?));
            }
            return Ok(Some(Request::new(raw, args)));
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
        return Ok(Some(Request::new(command_bytes(&args), args)));
    }
}

/// Splits an inline command as Redis's `sdssplitargs` does: blanks
/// separate arguments; inside double quotes `\xHH`, `\n`, `\r`, `\t`, `\b`,
/// `\a` and `\<c>` are escapes, inside single quotes only `\'`; quotes may
/// start inside an argument, and a closing quote must be followed by a
/// blank or the end of the line. The line ends at a NUL, as the C string
/// Redis splits does.
fn split_inline(line: &[u8]) -> Result<Vec<Bytes>, ProtocolError> {
    let line = line.iter().position(|&b| b == 0).map_or(line, |nul| &line[..nul]);
    let at = |i: usize| line.get(i).copied();
    let mut args = Vec::new();
    let mut i = 0;
    loop {
        while at(i).is_some_and(is_c_space) {
            i += 1;
        }
        if i >= line.len() {
            return Ok(args);
        }
        let mut cur = Vec::new();
        let mut quote = None;
        loop {
            let c = at(i);
            match (quote, c) {
                (Some(_), None) => return Err(ProtocolError::UnbalancedQuotes),
                (Some(b'"'), Some(b'\\')) => {
                    match (at(i + 1), at(i + 2).and_then(hex), at(i + 3).and_then(hex)) {
                        (Some(b'x'), Some(h), Some(l)) => {
                            cur.push(h * 16 + l);
                            i += 3;
                        }
                        (Some(e), ..) => {
                            cur.push(match e {
                                b'n' => b'\n',
                                b'r' => b'\r',
                                b't' => b'\t',
                                b'b' => 0x08,
                                b'a' => 0x07,
                                other => other,
                            });
                            i += 1;
                        }
                        (None, ..) => cur.push(b'\\'),
                    }
                }
                (Some(b'\''), Some(b'\\')) if at(i + 1) == Some(b'\'') => {
                    cur.push(b'\'');
                    i += 1;
                }
                (Some(q), Some(c)) if c == q => {
                    if at(i + 1).is_some_and(|n| !is_c_space(n)) {
                        return Err(ProtocolError::UnbalancedQuotes);
                    }
                    i += 1;
                    break;
                }
                (Some(_), Some(c)) => cur.push(c),
                (None, None | Some(b' ' | b'\n' | b'\r' | b'\t')) => break,
                (None, Some(q @ (b'"' | b'\''))) => quote = Some(q),
                (None, Some(c)) => cur.push(c),
            }
            i += 1;
        }
        args.push(Bytes::from(cur));
    }
}

/// C's `isspace`.
fn is_c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}
