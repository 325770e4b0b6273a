//! One pass over the request nearly every client sends: a complete array of
//! a few bulk strings. [`take`] checks it and notes where each argument lies
//! at once (the request keeps those spans until a path needs the arguments
//! as `Bytes`), where the general path runs the resumable [`Checker`] over
//! the frame and then walks it again (together about one eighth of the
//! sidecar's instructions per request at `-P 16`).
//!
//! It only ever accepts what the general path accepts, with the same
//! arguments: anything else (an incomplete frame, more than [`MAX_ARGS`]
//! arguments, an element that is not a bulk string, a null, an empty array,
//! a non-canonical length, a limit exceeded, a missing CRLF, an offset past
//! 4 GiB) returns `None`
//! and leaves `buf` untouched for the general path, which then accepts it,
//! waits for more bytes or words the error exactly as before.

use bytes::BytesMut;

use super::{Checker, Request};

/// Most arguments taken on this path (their positions live on the stack).
pub(super) const MAX_ARGS: usize = 8;

/// The request at the front of `buf`, if it is a complete, canonical array of
/// 1..=[`MAX_ARGS`] bulk strings within the checker's limits.
pub(super) fn take(buf: &mut BytesMut, checker: &Checker) -> Option<Request> {
    let limits = &checker.limits;
    let b = &buf[..];
    let (n, mut pos) = header(b, 0, b'*')?;
    if n == 0 || n > MAX_ARGS || n > limits.max_array_len {
        return None;
    }
    let mut spans = [(0u32, 0u32); MAX_ARGS];
    for span in spans.iter_mut().take(n) {
        let (len, start) = header(b, pos, b'$')?;
        if len > limits.max_bulk_len {
            return None;
        }
        let stop = start.checked_add(len)?;
        if b.get(stop..stop.checked_add(2)?)? != b"\r\n" {
            return None;
        }
        // Offsets past `u32` (a request over 4 GiB) take the general path.
        *span = (u32::try_from(start).ok()?, u32::try_from(stop).ok()?);
        pos = stop + 2;
    }
    let n = u8::try_from(n).ok()?;
    let raw = buf.split_to(pos).freeze();
    Some(Request::from_spans(raw, n, spans))
}

/// `<ty><canonical non-negative length>\r\n` at `pos`: the length, and where
/// the bytes after its line start. Digits are read in the same pass as the
/// line's end is found; anything unusual (a sign, a leading zero, more than
/// 18 digits, a lone CR) is left to the general path.
fn header(b: &[u8], pos: usize, ty: u8) -> Option<(usize, usize)> {
    if b.get(pos) != Some(&ty) {
        return None;
    }
    let first = *b.get(pos + 1)?;
    if !first.is_ascii_digit() {
        return None;
    }
    let mut n = usize::from(first - b'0');
    let mut i = pos + 2;
    loop {
        let c = *b.get(i)?;
        if c == b'\r' {
            break;
        }
        // `n == 0`: a leading zero, which is not canonical.
        if !c.is_ascii_digit() || n == 0 || i - pos > MAX_DIGITS {
            return None;
        }
        n = n * 10 + usize::from(c - b'0');
        i += 1;
    }
    (b.get(i + 1) == Some(&b'\n')).then_some((n, i + 2))
}

/// Digits a length may have on this path (no overflow in `usize`).
const MAX_DIGITS: usize = 18;

#[cfg(test)]
mod tests {
    use super::super::request::parse_request_via;
    use super::super::{Checker, Limits, command_bytes};
    use bytes::BytesMut;
    use proptest::prelude::*;

    #[test]
    fn unusual_length_lines_are_left_to_the_general_path_and_end_alike() {
        let cases: [&[u8]; 12] = [
            b"*1\r\n$03\r\nGET\r\n",
            b"*1\r\n$+3\r\nGET\r\n",
            b"*1\r\n$-1\r\n",
            b"*01\r\n$3\r\nGET\r\n",
            b"*1\r\n$3\rxGET\r\n",
            b"*1\r\n$3\nGET\r\n",
            b"*1\r\n$99999999999999999999\r\nGET\r\n",
            b"*1\r\n$1234567890123456789\r\nGET\r\n",
            b"*1\r\n$\r\nGET\r\n",
            b"*1\r\n$0\r\n\r\n",
            b"*2\r\n$3\r\nGET\r\n$10\r\n0123456789\r\n",
            b"*1\r\n$3 \r\nGET\r\n",
        ];
        for case in cases {
            let run = |fast: bool| {
                let limits = Limits::default();
                let mut buf = BytesMut::from(case);
                let mut checker = Checker::new(limits);
                let r = parse_request_via(&mut buf, &mut checker, &limits, fast);
                (format!("{r:?}"), buf.len())
            };
            assert_eq!(run(true), run(false), "{}", String::from_utf8_lossy(case));
        }
    }

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
                        Ok(Some(r)) => out.push(Ok((r.clone().into_parts(), r))),
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
