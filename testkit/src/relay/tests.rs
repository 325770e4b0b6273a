//! The relay against a plain TCP echo server on 127.0.0.1.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use super::{Cut, Relay};

async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n @ 1..) = s.read(&mut buf).await {
                    if s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Sends `msg` and reads the same number of bytes back, within `within`.
async fn round_trip(s: &mut TcpStream, msg: &[u8], within: Duration) -> Option<Vec<u8>> {
    s.write_all(msg).await.ok()?;
    let mut got = vec![0u8; msg.len()];
    match tokio::time::timeout(within, s.read_exact(&mut got)).await {
        Ok(Ok(_)) => Some(got),
        _ => None,
    }
}

#[tokio::test]
async fn the_relay_forwards_both_ways() {
    let relay = Relay::start(echo_server().await).await.unwrap();
    let mut s = TcpStream::connect(relay.addr()).await.unwrap();
    let back = round_trip(&mut s, b"hello", Duration::from_secs(5)).await;
    assert_eq!(back.as_deref(), Some(&b"hello"[..]));
}

#[tokio::test]
async fn a_refusing_cut_drops_open_connections_and_closes_new_ones_until_restored() {
    let relay = Relay::start(echo_server().await).await.unwrap();
    let mut open = TcpStream::connect(relay.addr()).await.unwrap();
    assert!(
        round_trip(&mut open, b"a", Duration::from_secs(5))
            .await
            .is_some()
    );
    relay.cut(Cut::Refuse);
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), open.read(&mut buf))
        .await
        .unwrap();
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "the open connection survived: {read:?}"
    );
    let mut new = TcpStream::connect(relay.addr()).await.unwrap();
    let read = tokio::time::timeout(Duration::from_secs(5), new.read(&mut buf))
        .await
        .unwrap();
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "a new connection was served: {read:?}"
    );

    relay.restore();
    let mut again = TcpStream::connect(relay.addr()).await.unwrap();
    assert!(
        round_trip(&mut again, b"b", Duration::from_secs(5))
            .await
            .is_some()
    );
}

#[tokio::test]
async fn a_blackhole_accepts_but_never_answers_and_delivers_once_restored() {
    let relay = Relay::start(echo_server().await).await.unwrap();
    let mut open = TcpStream::connect(relay.addr()).await.unwrap();
    assert!(
        round_trip(&mut open, b"a", Duration::from_secs(5))
            .await
            .is_some()
    );
    relay.cut(Cut::Blackhole);
    assert_eq!(
        round_trip(&mut open, b"b", Duration::from_millis(200)).await,
        None
    );
    let mut new = TcpStream::connect(relay.addr()).await.unwrap();
    assert_eq!(round_trip(&mut new, b"c", Duration::from_millis(200)).await, None);

    relay.restore();
    let mut got = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(5), open.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got, b"b", "held data is delivered after the partition heals");
    tokio::time::timeout(Duration::from_secs(5), new.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got, b"c");
}

#[tokio::test]
async fn a_delay_holds_each_direction_back_by_at_least_its_amount() {
    let relay = Relay::start(echo_server().await).await.unwrap();
    relay.set_delay(Duration::from_millis(150), Duration::from_millis(100));
    let mut s = TcpStream::connect(relay.addr()).await.unwrap();
    let start = Instant::now();
    let back = round_trip(&mut s, b"slow", Duration::from_secs(5)).await;
    let took = start.elapsed();
    assert_eq!(back.as_deref(), Some(&b"slow"[..]));
    // A lower bound only: the bytes must not arrive before both delays passed.
    assert!(took >= Duration::from_millis(250), "round trip took {took:?}");

    relay.set_delay(Duration::ZERO, Duration::ZERO);
    let back = round_trip(&mut s, b"fast", Duration::from_secs(5)).await;
    assert_eq!(back.as_deref(), Some(&b"fast"[..]));
}
