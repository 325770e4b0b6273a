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

use bytes::Bytes;

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

impl ProtocolError {
    /// What a client whose request this is gets before its connection
    /// closes: Redis 7.0's own words where it has them for the fault.
    pub fn client_error(&self) -> String {
        match self {
            ProtocolError::UnbalancedQuotes => "ERR Protocol error: unbalanced quotes in request".into(),
            ProtocolError::InlineTooLong(_) => "ERR Protocol error: too big inline request".into(),
            other => format!("ERR {other}; closing the connection"),
        }
    }
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

mod check;
mod encode;
mod parse;
mod quick;
mod request;
#[cfg(test)]
mod tests;

pub use check::Checker;
#[cfg(test)]
pub use check::check;
pub use encode::{asking_if, command_bytes, encode_command, error_text};
pub use parse::parse;
pub use request::{ArgList, Request, parse_command, parse_request, parse_request_with};

/// An integer argument as Redis reads one (`string2ll`): an optional `-`, digits, no
/// leading zero, no `+`, no space, within `i64`.
pub fn int_arg(b: &[u8]) -> Option<i64> {
    let digits = b.strip_prefix(b"-").unwrap_or(b);
    let canonical = match digits {
        [b'0'] => digits.len() == b.len(),
        [b'1'..=b'9', rest @ ..] => rest.iter().all(u8::is_ascii_digit),
        _ => false,
    };
    if !canonical {
        return None;
    }
    std::str::from_utf8(b).ok()?.parse().ok()
}
