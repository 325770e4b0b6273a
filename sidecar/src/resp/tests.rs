//! The codec against hand-written and generated frames.

use bytes::BytesMut;
use proptest::prelude::*;

use super::*;

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
fn inline_commands_split_as_sdssplitargs_does() {
    let l = Limits::default();
    let split = |line: &[u8]| {
        let mut buf = BytesMut::from(line);
        parse_command(&mut buf, &l)
    };
    let args = |a: &[&[u8]]| Some(a.iter().map(|x| Bytes::copy_from_slice(x)).collect::<Vec<_>>());
    assert_eq!(
        split(b"SET k \"\\x41\\a\\b\\q\"\r\n"),
        Ok(args(&[b"SET", b"k", b"A\x07\x08q"]))
    );
    assert_eq!(
        split(b"SET k a\"b c\"d\r\n"),
        Err(ProtocolError::UnbalancedQuotes)
    );
    assert_eq!(split(b"SET k a\"b c\"\r\n"), Ok(args(&[b"SET", b"k", b"ab c"])));
    assert_eq!(split(b"ECHO 'it\\'s' \"\"\n"), Ok(args(&[b"ECHO", b"it's", b""])));
    assert_eq!(split(b"ECHO \"\\xZZ\"\n"), Ok(args(&[b"ECHO", b"xZZ"])));
    assert_eq!(split(b"ECHO 'a\n"), Err(ProtocolError::UnbalancedQuotes));
    assert_eq!(split(b"ECHO a\x00b c\n"), Ok(args(&[b"ECHO", b"a"])));
    assert_eq!(split(b"ECHO a\x0bb\n"), Ok(args(&[b"ECHO", b"a\x0bb"])));
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

#[test]
fn a_request_s_bulk_strings_may_end_in_any_two_bytes_as_redis_reads_them() {
    let mut buf = BytesMut::from(&b"*2\r\n$3\r\nGET\r\n$1\r\nkXY*1\r\n$4\r\nPING\n"[..]);
    let mut checker = Checker::for_requests(Limits::default());
    let req = parse_request_with(&mut buf, &mut checker, &Limits::default())
        .unwrap()
        .unwrap();
    // What goes upstream is the well-formed request.
    assert_eq!(&req.raw[..], b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n");
    assert_eq!((req.arg(0), req.arg(1)), (Some(&b"GET"[..]), Some(&b"k"[..])));
    // The last two bytes are still to come.
    assert!(
        parse_request_with(&mut buf, &mut checker, &Limits::default())
            .unwrap()
            .is_none()
    );
    buf.extend_from_slice(b"\r");
    let ping = parse_request_with(&mut buf, &mut checker, &Limits::default())
        .unwrap()
        .unwrap();
    assert_eq!(&ping.raw[..], b"*1\r\n$4\r\nPING\r\n");
    // A reply's bulk string is still checked.
    assert_eq!(
        Checker::new(Limits::default()).check(b"$1\r\nkXY"),
        Err(ProtocolError::ExpectedCrlf)
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
