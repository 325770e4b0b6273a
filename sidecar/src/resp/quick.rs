//! One pass over the request nearly every client sends: a complete array of
//! a few bulk strings. [`take`] checks it and splits it into arguments at
//! once, where the general path runs the resumable [`Checker`] over the frame
//! and then walks it again (together about one eighth of the sidecar's
//! instructions per request at `-P 16`).
//!
//! It only ever accepts what the general path accepts, with the same
//! arguments: anything else (an incomplete frame, more than [`MAX_ARGS`]
//! arguments, an element that is not a bulk string, a null, an empty array,
//! a non-canonical length, a limit exceeded, a missing CRLF) returns `None`
//! and leaves `buf` untouched for the general path, which then accepts it,
//! waits for more bytes or words the error exactly as before.

use bytes::BytesMut;

use super::{Checker, Request, find_crlf, parse_len};

/// Most arguments taken on this path (their positions live on the stack).
pub(super) const MAX_ARGS: usize = 8;

/// As the [`Checker`]: a length line longer than this is not a length.
const HEADER_MAX: usize = 64;

/// The request at the front of `buf`, if it is a complete, canonical array of
/// 1..=[`MAX_ARGS`] bulk strings within the checker's limits.
pub(super) fn take(buf: &mut BytesMut, checker: &Checker) -> Option<Request> {
    let limits = &checker.limits;
    let b = &buf[..];
    let (n, mut pos) = header(b, 0, b'*')?;
    if n == 0 || n > MAX_ARGS || n > limits.max_array_len {
        return None;
    }
    let mut spans = [(0usize, 0usize); MAX_ARGS];
    for span in spans.iter_mut().take(n) {
        let (len, start) = header(b, pos, b'$')?;
        if len > limits.max_bulk_len {
            return None;
        }
        let stop = start.checked_add(len)?;
        if b.get(stop..stop.checked_add(2)?)? != b"\r\n" {
            return None;
        }
        *span = (start, stop);
        pos = stop + 2;
    }
    let raw = buf.split_to(pos).freeze();
    let args = spans[..n].iter().map(|&(s, e)| raw.slice(s..e)).collect();
    Some(Request { raw, args })
}

/// `<ty><canonical non-negative length>\r\n` at `pos`: the length, and where
/// the bytes after its line start.
fn header(b: &[u8], pos: usize, ty: u8) -> Option<(usize, usize)> {
    if b.get(pos) != Some(&ty) {
        return None;
    }
    let window = &b[..b.len().min(pos + 1 + HEADER_MAX + 2)];
    let end = find_crlf(window, pos + 1)?;
    let len = parse_len(&b[pos + 1..end]).ok()?;
    Some((usize::try_from(len).ok()?, end + 2))
}

#[cfg(test)]
mod tests {
    use super::super::request::parse_request_via;
    use super::super::{Checker, Limits, command_bytes};
    use bytes::BytesMut;
    use proptest::prelude::*;

    proptest! {
    #[test]
    fn the_fast_path_parses_exactly_as_the_checker_does(
        cmds in proptest::collection::vec(proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..12), 0..11), 1..4),
        noise in proptest::collection::vec(any::<u8>(), 0..24),
        cut in 0usize..400,
    ) {
        // Commands of 0..=10 arguments (around the fast path's 8), then
        // arbitrary bytes, offered whole and cut short.
        let mut bytes: Vec<u8> = Vec::new();
        for c in &cmds {
            if c.is_empty() {
                bytes.extend_from_slice(b"*0\r\n");
            } else {
                bytes.extend_from_slice(&command_bytes(c));
            }
        }
        bytes.extend_from_slice(&noise);
        let loose = Limits { max_bulk_len: 8, max_array_len: 9, ..Limits::default() };
        let tight = Limits { max_bulk_len: 4, max_array_len: 3, ..Limits::default() };
        for (data, limits) in [
            (&bytes[..], loose),
            (&bytes[..cut.min(bytes.len())], loose),
            (&bytes[..], tight),
        ] {
            let run = |fast: bool| {
                let mut buf = BytesMut::from(data);
                let mut checker = Checker::new(limits);
                let mut out = Vec::new();
                for _ in 0..8 {
                    match parse_request_via(&mut buf, &mut checker, &limits, fast) {
                        Ok(Some(r)) => out.push(Ok(r)),
                        Ok(None) => break,
                        Err(e) => {
                            out.push(Err(e));
                            break;
                        }
                    }
                }
                (out, buf.len())
            };
            prop_assert_eq!(run(true), run(false));
        }
    }
    }
}
