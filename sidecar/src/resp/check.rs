//! Checking: whether a buffer holds one whole frame, and how long it is,
//! without allocating ([`check`], and the resumable [`Checker`]).

use super::*;

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
    pub(super) limits: Limits,
    pos: usize,
    /// Elements still expected at each open nesting level; the bottom entry
    /// is the one top-level frame.
    stack: Vec<usize>,
    /// The two bytes after a bulk string need not be CRLF: Redis skips them
    /// unread in a client's request (see [`Checker::for_requests`]).
    any_bulk_end: bool,
}

impl Checker {
    pub fn new(limits: Limits) -> Self {
        Checker {
            limits,
            pos: 0,
            stack: vec![1],
            any_bulk_end: false,
        }
    }

    /// A checker of a client's requests: like Redis reading a request, it
    /// takes the two bytes after each bulk string for its CRLF without
    /// looking at them (replies stay checked).
    pub fn for_requests(limits: Limits) -> Self {
        Checker {
            any_bulk_end: true,
            ..Checker::new(limits)
        }
    }

    /// No frame in progress (the fast path of
    /// [`parse_request_with`](super::parse_request_with) may only start
    /// where the checker would start too).
    pub(super) fn is_fresh(&self) -> bool {
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
                    if !self.any_bulk_end && &buf[total - 2..total] != b"\r\n" {
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
