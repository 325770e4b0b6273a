//! Pub/sub through the sidecar against real Redis Clusters on 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/mod.rs"]
mod support;

mod keyspace;

use std::time::Duration;

use bytes::Bytes;
use cachetier_sidecar::Sidecar;
use cachetier_sidecar::resp::{self, Frame, Limits};
use redis::AsyncCommands;
pub(crate) use support::Raw;
use support::{Cluster, client, config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The subscriber's side of a RESP2 session, its replies as raw bytes.
async fn resp2_subscriber_session(sub: &mut Raw) -> Vec<Bytes> {
    let mut got = Vec::new();
    sub.send(&["SUBSCRIBE", "news", "sport"]).await;
    got.extend(sub.frames(2).await);
    // Subscribed mode: only subscription commands, PING, QUIT and RESET.
    sub.send(&["GET", "k"]).await;
    sub.send(&["PING"]).await;
    sub.send(&["PSUBSCRIBE", "w*"]).await;
    got.extend(sub.frames(3).await);
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resp2_subscriber_sees_messages_and_subscribed_mode_as_from_redis() {
    let cluster = Cluster::start(3, 0);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    let mut publisher = client(&sidecar).await;

    // The same session straight against the node owning `k` (another one
    // would answer MOVED first), for the exact bytes.
    let (owner, _) = cluster.shard_of("k");
    let mut direct = Raw::connect(&owner).await;
    let expected = resp2_subscriber_session(&mut direct).await;
    let mut sub = Raw::connect(&sidecar.local_addr().to_string()).await;
    let got = resp2_subscriber_session(&mut sub).await;
    assert_eq!(got, expected, "same replies as Redis itself");
    assert!(
        String::from_utf8_lossy(&got[2]).contains("Can't execute 'get'"),
        "{:?}",
        got[2]
    );

    // A publisher on another connection (PUBLISH goes to one primary; the
    // cluster broadcasts it to the subscriber's node).
    let _: i64 = publisher.publish("news", "hello").await.unwrap();
    let _: i64 = publisher.publish("weather", "rain").await.unwrap();
    let msgs = sub.frames(2).await;
    assert_eq!(
        &msgs[0][..],
        b"*3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$5\r\nhello\r\n"
    );
    assert_eq!(
        &msgs[1][..],
        b"*4\r\n$8\r\npmessage\r\n$2\r\nw*\r\n$7\r\nweather\r\n$4\r\nrain\r\n"
    );

    // Leaving subscribed mode: ordinary commands work again, in order.
    sub.send(&["UNSUBSCRIBE"]).await;
    sub.send(&["PUNSUBSCRIBE"]).await;
    sub.send(&["SET", "after", "1"]).await;
    let tail = sub.frames(4).await;
    assert_eq!(resp::parse(&tail[2]).unwrap(), int_frame(0), "{:?}", tail[2]);
    assert_eq!(&tail[3][..], b"+OK\r\n");
    sidecar.shutdown().await;
}

fn int_frame(n: i64) -> Frame {
    Frame::Array(vec![
        Frame::Bulk(Bytes::from_static(b"punsubscribe")),
        Frame::Bulk(Bytes::from_static(b"w*")),
        Frame::Integer(n),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resp3_subscriber_gets_push_frames_and_may_run_other_commands() {
    let cluster = Cluster::start(3, 0);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    let mut publisher = client(&sidecar).await;
    let mut sub = Raw::connect(&sidecar.local_addr().to_string()).await;
    sub.send(&["HELLO", "3"]).await;
    let hello = sub.frame().await;
    assert!(hello.starts_with(b"%"), "{hello:?}");
    sub.send(&["SUBSCRIBE", "jobs"]).await;
    assert_eq!(
        &sub.frame().await[..],
        b">3\r\n$9\r\nsubscribe\r\n$4\r\njobs\r\n:1\r\n"
    );
    // RESP3 has no subscribed mode: any command runs.
    sub.send(&["SET", "r3", "v"]).await;
    assert_eq!(&sub.frame().await[..], b"+OK\r\n");
    sub.send(&["GET", "r3"]).await;
    assert_eq!(&sub.frame().await[..], b"$1\r\nv\r\n");
    let _: i64 = publisher.publish("jobs", "j1").await.unwrap();
    assert_eq!(
        &sub.frame().await[..],
        b">3\r\n$7\r\nmessage\r\n$4\r\njobs\r\n$2\r\nj1\r\n"
    );
    // RESET ends the subscriptions and the protocol, as in Redis.
    sub.send(&["RESET"]).await;
    assert_eq!(&sub.frame().await[..], b"+RESET\r\n");
    let _: i64 = publisher.publish("jobs", "j2").await.unwrap();
    sub.send(&["PING"]).await;
    assert_eq!(&sub.frame().await[..], b"+PONG\r\n", "no message after RESET");
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_crate_pubsub_client_receives_what_another_client_publishes() {
    let cluster = Cluster::start(3, 0);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    let url = format!("redis://{}/", sidecar.local_addr());
    let mut pubsub = redis::Client::open(url)
        .unwrap()
        .get_async_pubsub()
        .await
        .unwrap();
    pubsub.subscribe("orders").await.unwrap();
    pubsub.psubscribe("audit.*").await.unwrap();
    let mut publisher = client(&sidecar).await;
    let _: i64 = publisher.publish("orders", "o1").await.unwrap();
    let _: i64 = publisher.publish("audit.login", "u1").await.unwrap();
    let mut stream = pubsub.on_message();
    let mut got = Vec::new();
    for _ in 0..2 {
        let msg = tokio::time::timeout(Duration::from_secs(5), futures_util::StreamExt::next(&mut stream))
            .await
            .expect("a message within 5 s")
            .unwrap();
        got.push((
            msg.get_channel_name().to_string(),
            msg.get_payload::<String>().unwrap(),
        ));
    }
    assert_eq!(
        got,
        vec![
            ("orders".into(), "o1".into()),
            ("audit.login".into(), "u1".into())
        ]
    );
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_counts_every_primarys_subscribers_and_spublish_goes_to_the_channels_shard() {
    let cluster = Cluster::start(3, 0);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    let mut c = client(&sidecar).await;
    // One subscriber through the sidecar, one straight on each node.
    let mut via = Raw::connect(&sidecar.local_addr().to_string()).await;
    via.send(&["SUBSCRIBE", "a", "b"]).await;
    via.send(&["PSUBSCRIBE", "p*"]).await;
    via.frames(3).await;
    let mut direct = Vec::new();
    for n in &cluster.nodes {
        let mut d = Raw::connect(&n.addr()).await;
        d.send(&["SUBSCRIBE", "b", "c"]).await;
        d.frames(2).await;
        direct.push(d);
    }
    let mut channels: Vec<String> = redis::cmd("PUBSUB")
        .arg("CHANNELS")
        .query_async(&mut c)
        .await
        .unwrap();
    channels.sort();
    assert_eq!(channels, vec!["a", "b", "c"], "united over the primaries");
    let numsub: Vec<(String, i64)> = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg("a")
        .arg("b")
        .arg("zz")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(numsub, vec![("a".into(), 1), ("b".into(), 4), ("zz".into(), 0)]);
    let numpat: i64 = redis::cmd("PUBSUB")
        .arg("NUMPAT")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(numpat, 1);

    // A shard channel lives on its slot's primary.
    let (owner, _) = cluster.shard_of("orders:eu");
    let mut shard_sub = Raw::connect(&owner).await;
    shard_sub.send(&["SSUBSCRIBE", "orders:eu"]).await;
    shard_sub.frame().await;
    let shard_channels: Vec<String> = redis::cmd("PUBSUB")
        .arg("SHARDCHANNELS")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(shard_channels, vec!["orders:eu"]);
    let received: i64 = redis::cmd("SPUBLISH")
        .arg("orders:eu")
        .arg("o9")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(received, 1, "delivered on the channel's shard");
    assert_eq!(
        &shard_sub.frame().await[..],
        b"*3\r\n$8\r\nsmessage\r\n$9\r\norders:eu\r\n$2\r\no9\r\n"
    );
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_channel_subscriber_is_served_by_its_slots_primary() {
    let cluster = Cluster::start(3, 0);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    let mut publisher = client(&sidecar).await;
    let mut sub = Raw::connect(&sidecar.local_addr().to_string()).await;
    sub.send(&["SSUBSCRIBE", "orders:eu"]).await;
    assert_eq!(
        &sub.frame().await[..],
        b"*3\r\n$10\r\nssubscribe\r\n$9\r\norders:eu\r\n:1\r\n"
    );
    // Subscribed mode holds for shard channels too.
    sub.send(&["GET", "k"]).await;
    assert!(String::from_utf8_lossy(&sub.frame().await).contains("Can't execute 'get'"));
    let received: i64 = redis::cmd("SPUBLISH")
        .arg("orders:eu")
        .arg("o1")
        .query_async(&mut publisher)
        .await
        .unwrap();
    assert_eq!(received, 1);
    assert_eq!(
        &sub.frame().await[..],
        b"*3\r\n$8\r\nsmessage\r\n$9\r\norders:eu\r\n$2\r\no1\r\n"
    );
    // A shard channel of another shard on the same client connection (its
    // own upstream connection), counted with the first as one server would.
    let (eu_owner, _) = cluster.shard_of("orders:eu");
    let other = (0..100)
        .map(|i| format!("orders:{i}"))
        .find(|c| cluster.shard_of(c).0 != eu_owner)
        .unwrap();
    sub.send(&["SSUBSCRIBE", &other]).await;
    assert_eq!(
        confirmation(&sub.frame().await),
        (Some(Bytes::from(other.clone())), 2)
    );
    sub.send(&["SUNSUBSCRIBE", &other]).await;
    assert_eq!(
        confirmation(&sub.frame().await),
        (Some(Bytes::from(other.clone())), 1)
    );
    // A plain UNSUBSCRIBE leaves the shard channel (Redis counts it apart).
    sub.send(&["UNSUBSCRIBE"]).await;
    sub.frame().await;
    sub.send(&["GET", "k"]).await;
    assert!(String::from_utf8_lossy(&sub.frame().await).contains("Can't execute 'get'"));
    sub.send(&["SUNSUBSCRIBE"]).await;
    assert_eq!(
        &sub.frame().await[..],
        b"*3\r\n$12\r\nsunsubscribe\r\n$9\r\norders:eu\r\n:0\r\n"
    );
    sub.send(&["SET", "k", "v"]).await;
    assert_eq!(&sub.frame().await[..], b"+OK\r\n");
    sidecar.shutdown().await;
}

/// Redis drops a node's shard-channel subscribers with a `sunsubscribe`
/// they never asked for when the channel's slot moves away; one Redis server
/// never does that, and a plain client would silently stop receiving. The
/// sidecar closes such a subscriber's connection instead (as when its node
/// goes away): the client's reconnect subscribes again, at the new owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_channel_whose_slot_moves_closes_its_subscriber_who_resubscribes_at_the_new_owner() {
    let cluster = Cluster::start(3, 0);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    let addr = sidecar.local_addr().to_string();
    let mut sub = Raw::connect(&addr).await;
    sub.send(&["SSUBSCRIBE", "orders:eu"]).await;
    assert_eq!(
        &sub.frame().await[..],
        b"*3\r\n$10\r\nssubscribe\r\n$9\r\norders:eu\r\n:1\r\n"
    );
    let (from, _) = cluster.shard_of("orders:eu");
    let to = cluster.seeds().into_iter().find(|a| *a != from).unwrap();
    let slot = cluster.by_addr(&from).cli(&["CLUSTER", "KEYSLOT", "orders:eu"]);
    let to_id = cluster.by_addr(&to).node_id();
    // The new owner first (it takes the slot with a new epoch), then the
    // old one, which drops its subscribers of the slot's channels.
    for node in [&to, &from] {
        let set = cluster
            .by_addr(node)
            .cli(&["CLUSTER", "SETSLOT", slot.trim(), "NODE", &to_id]);
        assert_eq!(set.trim(), "OK", "{node}: {set}");
    }
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match sub.s.read_buf(&mut sub.buf).await {
                Ok(0) | Err(_) => return true,
                Ok(_) => rest.extend_from_slice(&sub.buf.split()),
            }
        }
    })
    .await;
    assert_eq!(closed, Ok(true), "the subscriber was not closed");
    assert!(
        !String::from_utf8_lossy(&rest).contains("sunsubscribe"),
        "the client saw an unsubscription it never asked for: {:?}",
        String::from_utf8_lossy(&rest)
    );

    // As a client library does: reconnect and subscribe again. The
    // sidecar may still route by the old slot map for a moment; a stale
    // route closes the connection again (and refreshes the map).
    let mut again = Raw::connect(&addr).await;
    let mut subscribed = false;
    for _ in 0..50 {
        again.send(&["SSUBSCRIBE", "orders:eu"]).await;
        let mut checker = resp::Checker::new(Limits::upstream());
        let reply = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if let Some(n) = checker.check(&again.buf).unwrap() {
                    return Some(again.buf.split_to(n).freeze());
                }
                match again.s.read_buf(&mut again.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
        .unwrap();
        if reply.as_deref() == Some(&b"*3\r\n$10\r\nssubscribe\r\n$9\r\norders:eu\r\n:1\r\n"[..]) {
            subscribed = true;
            break;
        }
        assert!(reply.is_none(), "neither a subscription nor a close: {reply:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        again = Raw::connect(&addr).await;
    }
    assert!(subscribed);
    let mut publisher = client(&sidecar).await;
    let mut received = 0;
    for _ in 0..50 {
        received = redis::cmd("SPUBLISH")
            .arg("orders:eu")
            .arg("o2")
            .query_async(&mut publisher)
            .await
            .unwrap();
        if received == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(received, 1, "the new owner has the subscriber");
    assert_eq!(
        &again.frame().await[..],
        b"*3\r\n$8\r\nsmessage\r\n$9\r\norders:eu\r\n$2\r\no2\r\n"
    );
    sidecar.shutdown().await;
}

/// Channels (shard channels, for SSUBSCRIBE) whose slots are on `n`
/// different primaries of `cluster`, one a primary.
fn channels_on_distinct_shards(cluster: &Cluster, n: usize) -> Vec<String> {
    let mut owners = Vec::new();
    let mut out = Vec::new();
    for i in 0..1000 {
        let c = format!("chan:{i}");
        let (owner, _) = cluster.shard_of(&c);
        if !owners.contains(&owner) {
            owners.push(owner);
            out.push(c);
        }
        if out.len() == n {
            return out;
        }
    }
    panic!("no {n} shards");
}

/// `(channel, count)` of a (un)subscribe confirmation.
fn confirmation(raw: &Bytes) -> (Option<Bytes>, i64) {
    let items = match resp::parse(raw).unwrap() {
        Frame::Array(items) | Frame::Push(items) => items,
        other => panic!("not a confirmation: {other:?}"),
    };
    let channel = match &items[1] {
        Frame::Bulk(b) => Some(b.clone()),
        _ => None,
    };
    match &items[2] {
        Frame::Integer(n) => (channel, *n),
        other => panic!("no count: {other:?}"),
    }
}

/// The replies to an argument-less (S|P)UNSUBSCRIBE: Redis lists the
/// channels in its hash table's order, so the channels as a sorted set and
/// the counts in order.
async fn unordered(c: &mut Raw, n: usize) -> Bytes {
    let mut channels = Vec::new();
    let mut counts = Vec::new();
    for f in c.frames(n).await {
        let (ch, count) = confirmation(&f);
        channels.push(ch);
        counts.push(count);
    }
    channels.sort();
    Bytes::from(format!("channels {channels:?} counts {counts:?}"))
}

/// One client's session with shard channels on three shards (`ch`), a plain
/// channel and a pattern, its replies as raw bytes; `publisher` publishes
/// to the same server (or sidecar).
async fn multi_shard_session(
    c: &mut Raw,
    publisher: &mut redis::aio::MultiplexedConnection,
    proto: u8,
    ch: &[String],
) -> Vec<Bytes> {
    let mut got = Vec::new();
    if proto == 3 {
        c.send(&["HELLO", "3"]).await;
        c.frame().await; // names the server: not compared
    }
    for args in [
        &["SSUBSCRIBE", ch[0].as_str()][..],
        &["SSUBSCRIBE", ch[1].as_str()],
        &["SUBSCRIBE", "news"],
        &["SSUBSCRIBE", ch[2].as_str()],
        &["PSUBSCRIBE", "n*"],
        &["GET", "k"],
        &["PING"],
    ] {
        c.send(args).await;
        got.push(c.frame().await);
    }
    for (i, channel) in ch.iter().enumerate() {
        let n: i64 = redis::cmd("SPUBLISH")
            .arg(channel)
            .arg(format!("m{i}"))
            .query_async(publisher)
            .await
            .unwrap();
        got.push(Bytes::from(format!("spublish reached {n}")));
        got.push(c.frame().await);
    }
    let _: i64 = publisher.publish("news", "hi").await.unwrap();
    got.extend(c.frames(2).await);
    // Pipelined over several upstream connections: Redis's order holds.
    let extra = format!("{}:again", ch[1]);
    let mut pipeline = Vec::new();
    for args in [
        &["SSUBSCRIBE", extra.as_str()][..],
        &["SUBSCRIBE", "x"],
        &["SUNSUBSCRIBE", ch[0].as_str()],
        &["PING", "between"],
    ] {
        pipeline.extend_from_slice(&resp::command_bytes(args));
    }
    c.s.write_all(&pipeline).await.unwrap();
    got.extend(c.frames(4).await);
    // Every shard channel, on every shard.
    c.send(&["SUNSUBSCRIBE"]).await;
    got.push(unordered(c, 3).await);
    let n: i64 = redis::cmd("SPUBLISH")
        .arg(&ch[1])
        .arg("gone")
        .query_async(publisher)
        .await
        .unwrap();
    got.push(Bytes::from(format!("spublish after sunsubscribe reached {n}")));
    for args in [
        &["GET", "k"][..],
        &["SUNSUBSCRIBE"],
        &["SUNSUBSCRIBE", ch[2].as_str()],
    ] {
        c.send(args).await;
        got.push(c.frame().await);
    }
    c.send(&["UNSUBSCRIBE"]).await;
    got.push(unordered(c, 2).await);
    for args in [
        &["GET", "k"][..],
        &["PUNSUBSCRIBE"],
        &["UNSUBSCRIBE"],
        &["GET", "k"],
    ] {
        c.send(args).await;
        got.push(c.frame().await);
    }
    got
}

/// What one Redis server says to a client that subscribes shard channels of
/// several shards, a channel and a pattern, the sidecar says too: the
/// counts over all its upstream connections, every message, the end of
/// RESP2 subscribed mode at a count of 0, argument-less unsubscribes.
async fn multi_shard_subscriber_sees_one_servers_replies(proto: u8) {
    let cluster = Cluster::start(3, 0);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    let ch = channels_on_distinct_shards(&cluster, 3);
    let single = support::RedisNode::start(&["--cluster-enabled", "no"]);
    let mut direct = Raw::connect(&single.addr()).await;
    let mut direct_pub = support::client_of(single.addr().parse().unwrap()).await;
    let expected = multi_shard_session(&mut direct, &mut direct_pub, proto, &ch).await;
    let mut via = Raw::connect(&sidecar.local_addr().to_string()).await;
    let mut publisher = client(&sidecar).await;
    let got = multi_shard_session(&mut via, &mut publisher, proto, &ch).await;
    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
        assert_eq!(g, e, "reply {i}: {g:?} where one server says {e:?}");
    }
    assert_eq!(got.len(), expected.len());
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resp2_client_subscribes_shard_channels_of_three_shards_and_a_channel_as_on_one_server() {
    multi_shard_subscriber_sees_one_servers_replies(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resp3_client_subscribes_shard_channels_of_three_shards_and_a_channel_as_on_one_server() {
    multi_shard_subscriber_sees_one_servers_replies(3).await;
}

/// Shard channels of different slots in one SSUBSCRIBE: Redis Cluster's
/// CROSSSLOT (a single server would accept them), as a cluster node says it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ssubscribe_of_channels_of_two_slots_gets_redis_clusters_crossslot() {
    let cluster = Cluster::start(3, 0);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    let ch = channels_on_distinct_shards(&cluster, 2);
    let (owner, _) = cluster.shard_of(&ch[0]);
    let mut direct = Raw::connect(&owner).await;
    let mut via = Raw::connect(&sidecar.local_addr().to_string()).await;
    for c in [&mut direct, &mut via] {
        c.send(&["SSUBSCRIBE", &ch[0], &ch[1]]).await;
    }
    let expected = direct.frame().await;
    assert!(expected.starts_with(b"-CROSSSLOT"), "{expected:?}");
    assert_eq!(via.frame().await, expected);
    // Not subscribed: ordinary commands run; then a subscription works.
    via.send(&["SET", "k", "v"]).await;
    assert_eq!(&via.frame().await[..], b"+OK\r\n");
    via.send(&["SSUBSCRIBE", &ch[1]]).await;
    assert_eq!(
        confirmation(&via.frame().await),
        (Some(Bytes::from(ch[1].clone())), 1)
    );
    sidecar.shutdown().await;
}

/// The output limit holds for messages of every shard a subscriber has
/// shard channels on: one that does not read is closed, others carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_of_two_shards_that_never_reads_is_closed_at_its_output_limit() {
    let cluster = Cluster::start(3, 0);
    let cfg = cachetier_sidecar::Config {
        client_output_limit: 1 << 20,
        ..config(&cluster)
    };
    let sidecar = Sidecar::bind(cfg).await.unwrap();
    let ch = channels_on_distinct_shards(&cluster, 2);
    let mut greedy = Raw::connect(&sidecar.local_addr().to_string()).await;
    for (i, c) in ch.iter().enumerate() {
        greedy.send(&["SSUBSCRIBE", c]).await;
        assert_eq!(confirmation(&greedy.frame().await).1, i as i64 + 1);
    }
    let mut publisher = client(&sidecar).await;
    let payload = "x".repeat(256 << 10);
    for i in 0..400 {
        if sidecar.metrics().output_limit_closes.get() == 1 {
            break;
        }
        let _: i64 = redis::cmd("SPUBLISH")
            .arg(&ch[i % 2])
            .arg(&payload)
            .query_async(&mut publisher)
            .await
            .unwrap();
    }
    support::eventually("the subscriber is closed", Duration::from_secs(10), || {
        sidecar.metrics().output_limit_closes.get() == 1
    })
    .await;
    let v: Option<String> = publisher.get("k").await.unwrap();
    assert_eq!(v, None, "others carry on");
    sidecar.shutdown().await;
}

/// A client that leaves subscribed mode and switches to RESP3 gets its next
/// confirmations as RESP3 pushes, as from one server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_switches_to_resp3_gets_pushes() {
    let cluster = Cluster::start(3, 0);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    let mut c = Raw::connect(&sidecar.local_addr().to_string()).await;
    c.send(&["SUBSCRIBE", "a"]).await;
    assert_eq!(
        &c.frame().await[..],
        b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n"
    );
    c.send(&["UNSUBSCRIBE", "a"]).await;
    assert_eq!(
        &c.frame().await[..],
        b"*3\r\n$11\r\nunsubscribe\r\n$1\r\na\r\n:0\r\n"
    );
    c.send(&["HELLO", "3"]).await;
    assert!(c.frame().await.starts_with(b"%"));
    c.send(&["SUBSCRIBE", "b"]).await;
    assert_eq!(
        &c.frame().await[..],
        b">3\r\n$9\r\nsubscribe\r\n$1\r\nb\r\n:1\r\n"
    );
    sidecar.shutdown().await;
}
