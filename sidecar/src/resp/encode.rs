//! Encoding frames and commands.

use bytes::{BufMut, Bytes, BytesMut};

use super::*;

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

/// `cmd` as sent to a node, and how many replies it brings: behind an
/// `ASKING` of its own when following an `ASK` redirect.
pub fn asking_if(asking: bool, cmd: &Bytes) -> (Bytes, usize) {
    if asking {
        let mut b = BytesMut::from(&command_bytes(&["ASKING"])[..]);
        b.extend_from_slice(cmd);
        (b.freeze(), 2)
    } else {
        (cmd.clone(), 1)
    }
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
