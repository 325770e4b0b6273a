//! Client tracking: what each client is sent, and the memory bounds.

use super::options::tests::{args, on};
use super::*;

#[tokio::test]
async fn a_client_is_sent_only_the_keys_it_read_once_each_and_flushes() {
    let hub = Hub::new(Metrics::new().unwrap());
    let mut t = Tracker::start(&hub, Options::default());
    assert_eq!(hub.watched.clients(), 1);
    assert!(t.read(&args(&["a"])).is_empty());
    let mut out = Vec::new();
    let keys = Invalidation::Keys(args(&["a", "b"]).into());
    t.pushes(&keys, &mut out);
    assert_eq!(out, vec![push(Some(args(&["a"])))]);
    assert_eq!(
        out[0],
        Bytes::from_static(b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\na\r\n")
    );
    out.clear();
    // Sent once: tracked again only when read again.
    t.pushes(&keys, &mut out);
    assert!(out.is_empty());
    // Something unseen: every key it still remembers, by name.
    assert!(t.read(&args(&["c"])).is_empty());
    t.pushes(&Invalidation::Unseen, &mut out);
    assert_eq!(out, vec![push(Some(args(&["c"])))]);
    out.clear();
    // Nothing read since: nothing to drop, unless a node was flushed,
    // which is a null invalidate, as from Redis.
    t.pushes(&Invalidation::Unseen, &mut out);
    assert!(out.is_empty());
    t.pushes(&Invalidation::Flushed, &mut out);
    assert_eq!(out, vec![push(None)]);
    drop(t);
    assert_eq!(hub.watched.clients(), 0);
}

#[tokio::test]
async fn in_bcast_mode_something_unseen_is_a_null_invalidate() {
    let hub = Hub::new(Metrics::new().unwrap());
    let mut t = Tracker::start(&hub, on(&["on", "bcast"], None).unwrap());
    assert!(t.read(&args(&["a"])).is_empty());
    let mut out = Vec::new();
    t.pushes(&Invalidation::Unseen, &mut out);
    assert_eq!(out, vec![push(None)]);
}

#[test]
fn remembering_too_many_keys_invalidates_them_before_the_reply_that_names_them() {
    let hub = Hub::new(Metrics::new().unwrap());
    let mut t = Tracker::start(&hub, Options::default());
    let big = Bytes::from(vec![b'k'; MAX_KEY_BYTES / 2]);
    assert!(t.read(std::slice::from_ref(&big)).is_empty());
    let mut other = big.to_vec();
    other[0] = b'y';
    let other = Bytes::from(other);
    // One command naming a small key and one past the budget: the
    // earlier keys are invalidated first, and both of its keys stay
    // remembered (its reply carries both).
    let pushes = t.read(&[Bytes::from_static(b"small"), other.clone()]);
    assert_eq!(pushes, vec![push(Some(vec![big.clone()]))]);
    assert!(t.keys.contains(b"small".as_slice()) && t.keys.contains(&other));
    assert!(!t.keys.contains(&big));
    // Each key counts its bookkeeping too.
    assert_eq!(t.key_bytes, b"small".len() + other.len() + 2 * ENTRY_BYTES);
}

#[test]
fn many_remembered_keys_are_invalidated_in_pushes_of_bounded_size() {
    let hub = Hub::new(Metrics::new().unwrap());
    let mut t = Tracker::start(&hub, Options::default());
    let names: Vec<Bytes> = (0..PUSH_KEYS + 1).map(|i| Bytes::from(format!("k{i}"))).collect();
    assert!(t.read(&names).is_empty());
    let mut out = Vec::new();
    t.pushes(&Invalidation::Unseen, &mut out);
    assert_eq!(out.len(), 2);
    assert!(t.keys.is_empty() && t.key_bytes == 0);
}

#[test]
fn caching_lasts_until_a_command_other_than_client_runs() {
    let hub = Hub::new(Metrics::new().unwrap());
    let mut t = Tracker::start(&hub, on(&["on", "optin"], None).unwrap());
    assert!(t.set_caching(false).is_err());
    t.next_command(true);
    t.set_caching(true).unwrap();
    // CLIENT TRACKINGINFO, twice: it stays.
    t.next_command(true);
    t.next_command(true);
    assert!(t.flags().contains(&"caching-yes"));
    // GET runs with it, and ends it.
    t.next_command(false);
    assert!(t.flags().contains(&"caching-yes"));
    t.next_command(true);
    assert_eq!(t.flags(), vec!["on", "optin"]);
}

#[tokio::test]
async fn past_the_hubs_budget_the_clients_above_an_equal_share_are_flushed() {
    let metrics = Metrics::new().unwrap();
    let hub = Hub::with_budget(metrics.clone(), 10_000);
    let mut big = Tracker::start(&hub, Options::default());
    let mut small = Tracker::start(&hub, Options::default());
    let names = |prefix: &str, n: usize| -> Vec<Bytes> {
        (0..n).map(|i| Bytes::from(format!("{prefix}{i:03}"))).collect()
    };
    // 100 keys of 4 bytes: 6 800 bytes, more than half the budget.
    let big_keys = names("b", 100);
    assert!(big.read(&big_keys).is_empty());
    assert!(small.read(&names("s", 30)).is_empty());
    assert_eq!(hub.key_bytes.load(Ordering::Relaxed), 130 * (4 + ENTRY_BYTES));
    // Over the budget: each tracker hears it; the one above its share
    // invalidates every key it read, the other keeps its keys.
    let before_shed = Instant::now();
    assert!(small.read(&names("t", 20)).is_empty());
    let mut out = Vec::new();
    let inv = heard(&mut big).await;
    big.pushes(&inv, &mut out);
    let mut sent: Vec<Bytes> = out.iter().flat_map(invalidated).collect();
    sent.sort();
    assert_eq!(sent, big_keys);
    out.clear();
    let inv = heard(&mut small).await;
    small.pushes(&inv, &mut out);
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(small.keys.len(), 50);
    assert_eq!(hub.key_bytes.load(Ordering::Relaxed), small.key_bytes);
    let shed = metrics.tracking_flushes.with_label_values(&["shed"]).get();
    assert_eq!(shed, 1);
    // An invalidated key is forgotten by the hub too.
    small.pushes(&Invalidation::Keys(names("s", 1).into()), &mut out);
    assert_eq!(small.keys.len(), 49);
    assert_eq!(hub.key_bytes.load(Ordering::Relaxed), small.key_bytes);

    // Over again within SHED_INTERVAL of the last one: the trackers are
    // told once it ends, though nothing else happens meanwhile.
    assert!(big.read(&big_keys).is_empty());
    let deferred = before_shed.elapsed() < SHED_INTERVAL;
    let inv = heard(&mut small).await;
    assert!(matches!(inv, Invalidation::Shed), "{inv:?}");
    if deferred {
        assert!(
            before_shed.elapsed() >= SHED_INTERVAL,
            "{:?}",
            before_shed.elapsed()
        );
    }
    out.clear();
    let inv = heard(&mut big).await;
    big.pushes(&inv, &mut out);
    assert_eq!(out.len(), 1, "big is flushed again");
    // Heard when the total is back under the budget, it flushes no one,
    // not even a tracker above an equal share (here: of two).
    drop(big);
    let _idle = Tracker::start(&hub, Options::default());
    assert!(small.read(&names("u", 30)).is_empty());
    assert!(!hub.over() && small.key_bytes > hub.share());
    out.clear();
    small.pushes(&Invalidation::Shed, &mut out);
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(small.keys.len(), 79);
    drop(small);
    assert_eq!(hub.key_bytes.load(Ordering::Relaxed), 0);
}

/// The keys an `invalidate` push names.
fn invalidated(push: &Bytes) -> Vec<Bytes> {
    match crate::resp::parse(push) {
        Ok(Frame::Push(mut items)) => match items.pop() {
            Some(Frame::Array(keys)) => (keys.into_iter())
                .filter_map(|k| match k {
                    Frame::Bulk(k) => Some(k),
                    _ => None,
                })
                .collect(),
            other => panic!("not a list of keys: {other:?}"),
        },
        other => panic!("not a push: {other:?}"),
    }
}

/// The next message a tracker hears from its hub.
async fn heard(t: &mut Tracker) -> Invalidation {
    let inv = tokio::time::timeout(Duration::from_secs(1), t.recv()).await;
    inv.expect("a message from the hub")
}

/// What a node's feed says of `keys`.
async fn feed(hub: &Arc<Hub>, keys: &[&str]) {
    let frames: Vec<Frame> = keys
        .iter()
        .map(|k| Frame::Bulk(Bytes::from(k.to_string())))
        .collect();
    crate::tracking::Feed::invalidate(&**hub, Some(&frames)).await;
}

/// Whether `t` hears anything within a moment.
async fn hears(t: &mut Tracker) -> Option<Invalidation> {
    tokio::time::timeout(Duration::from_millis(50), t.recv())
        .await
        .ok()
}

#[tokio::test]
async fn a_write_wakes_only_the_clients_that_read_its_key() {
    let hub = Hub::new(Metrics::new().unwrap());
    let mut a = Tracker::start(&hub, Options::default());
    let mut b = Tracker::start(&hub, Options::default());
    assert!(a.read(&args(&["k", "shared"])).is_empty());
    assert!(b.read(&args(&["shared", "mine"])).is_empty());
    assert_eq!(hub.watched.len(), 3);
    feed(&hub, &["nobody", "read", "these"]).await;
    assert!(hears(&mut a).await.is_none() && hears(&mut b).await.is_none());
    // Each is passed on only what it read.
    feed(&hub, &["x", "shared", "mine"]).await;
    let Some(Invalidation::Keys(keys)) = hears(&mut a).await else {
        panic!("a hears the shared key");
    };
    assert_eq!(&*keys, &args(&["shared"])[..]);
    let mut out = Vec::new();
    a.pushes(&Invalidation::Keys(keys), &mut out);
    assert_eq!(out, vec![push(Some(args(&["shared"])))]);
    let Some(Invalidation::Keys(keys)) = hears(&mut b).await else {
        panic!("b hears its keys");
    };
    assert_eq!(&*keys, &args(&["shared", "mine"])[..]);
    // b still remembers them until it is sent the pushes.
    assert_eq!(hub.watched.len(), 3);
    out.clear();
    b.pushes(&Invalidation::Keys(keys), &mut out);
    assert_eq!(out.len(), 2);
    assert_eq!(hub.watched.len(), 1, "only a's k");
    // A key b no longer remembers wakes no one but a.
    feed(&hub, &["mine", "k"]).await;
    assert!(hears(&mut b).await.is_none());
    assert!(matches!(hears(&mut a).await, Some(Invalidation::Keys(k)) if *k == args(&["k"])[..]));
    drop(b);
    // A BCAST client wants every key, read or not; a default-mode client
    // is not woken for them.
    let mut c = Tracker::start(&hub, on(&["on", "bcast"], None).unwrap());
    feed(&hub, &["never-read"]).await;
    assert!(matches!(hears(&mut c).await, Some(Invalidation::Keys(_))));
    assert!(hears(&mut a).await.is_none());
    // What every client is told reaches each, in the feeds' order.
    assert!(a.read(&args(&["k"])).is_empty());
    hub.unseen("topology");
    feed(&hub, &["k"]).await;
    assert!(matches!(hears(&mut a).await, Some(Invalidation::Unseen)));
    assert!(matches!(hears(&mut a).await, Some(Invalidation::Keys(_))));
    assert!(matches!(hears(&mut c).await, Some(Invalidation::Unseen)));
    drop(c);
    // A flush forgets them all.
    a.pushes(&Invalidation::Flushed, &mut out);
    assert_eq!(hub.watched.len(), 0);
}

#[tokio::test]
async fn two_keys_of_one_hash_wake_only_their_clients_each_once() {
    let hub = Hub::new(Metrics::new().unwrap());
    hub.watched.collide.store(true, Ordering::Relaxed);
    let mut a = Tracker::start(&hub, Options::default());
    let mut b = Tracker::start(&hub, Options::default());
    let mut c = Tracker::start(&hub, Options::default());
    let mut d = Tracker::start(&hub, Options::default());
    // Every key shares one hash: entered out of id order, a twice.
    assert!(c.read(&args(&["z"])).is_empty());
    assert!(a.read(&args(&["x", "y"])).is_empty());
    assert!(b.read(&args(&["y"])).is_empty());
    assert_eq!(hub.watched.len(), 1);
    feed(&hub, &["y"]).await;
    let Some(Invalidation::Keys(keys)) = hears(&mut a).await else {
        panic!("a hears y");
    };
    assert_eq!(&*keys, &args(&["y"])[..], "named once");
    assert!(matches!(hears(&mut b).await, Some(Invalidation::Keys(_))));
    let mut out = Vec::new();
    a.pushes(&Invalidation::Keys(keys), &mut out);
    assert_eq!(out, vec![push(Some(args(&["y"])))]);
    // c remembers z, of the same hash: woken, and sends nothing.
    let inv = hears(&mut c).await.expect("c is woken");
    c.pushes(&inv, &mut out);
    assert_eq!(out.len(), 1, "only a's push");
    assert!(hears(&mut d).await.is_none(), "d read nothing");
    // a still remembers x, under the shared hash: still woken for y, and
    // sends nothing for it.
    feed(&hub, &["y"]).await;
    let inv = hears(&mut a).await.expect("a is woken");
    out.clear();
    a.pushes(&inv, &mut out);
    assert!(out.is_empty(), "{out:?}");
    drop(a);
    // b's and c's entries are left.
    assert_eq!(hub.watched.len(), 1);
    drop(b);
    assert_eq!(hub.watched.len(), 1);
    drop(c);
    assert_eq!(hub.watched.len(), 0);
}

#[tokio::test]
async fn a_client_that_does_not_take_its_messages_holds_each_key_once() {
    let hub = Hub::new(Metrics::new().unwrap());
    let mut a = Tracker::start(&hub, Options::default());
    assert!(a.read(&args(&["k", "j"])).is_empty());
    // Ten thousand writes of its two keys while it does not look, and a
    // flush: pending, one flush and each key once.
    for _ in 0..5_000 {
        feed(&hub, &["k"]).await;
        feed(&hub, &["j", "k"]).await;
    }
    hub.unseen("topology");
    assert!(matches!(hears(&mut a).await, Some(Invalidation::Unseen)));
    let Some(Invalidation::Keys(keys)) = hears(&mut a).await else {
        panic!("its keys");
    };
    assert_eq!(&*keys, &args(&["k", "j"])[..]);
    assert!(hears(&mut a).await.is_none());
}

#[tokio::test]
async fn a_client_that_falls_behind_is_sent_one_flush() {
    let metrics = Metrics::new().unwrap();
    let hub = Hub::new(metrics.clone());
    // A BCAST client is passed every key written.
    let mut a = Tracker::start(&hub, on(&["on", "bcast"], None).unwrap());
    for i in 0..=mailbox::BACKLOG {
        feed(&hub, &[&format!("k{i}")]).await;
    }
    assert!(matches!(hears(&mut a).await, Some(Invalidation::Unseen)));
    assert!(hears(&mut a).await.is_none(), "what it fell behind by is dropped");
    let lagged = metrics.tracking_flushes.with_label_values(&["lagged"]).get();
    assert_eq!(lagged, 1);
    feed(&hub, &["k"]).await;
    assert!(matches!(hears(&mut a).await, Some(Invalidation::Keys(_))));
}

#[test]
fn a_parked_client_is_woken_by_a_message_from_another_thread() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let hub = Hub::new(Metrics::new().unwrap());
    let mut a = Tracker::start(&hub, Options::default());
    assert!(a.read(&args(&["k"])).is_empty());
    let feeder = {
        let hub = hub.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            hub.watched.deliver(&args(&["k"]));
        })
    };
    // Parked before the message comes: woken by it.
    let heard = rt.block_on(async { tokio::time::timeout(Duration::from_secs(2), a.recv()).await });
    assert!(matches!(heard, Ok(Invalidation::Keys(_))), "{heard:?}");
    feeder.join().unwrap();
}

#[tokio::test]
async fn a_bcast_client_is_passed_only_keys_under_its_prefixes() {
    let metrics = Metrics::new().unwrap();
    let hub = Hub::new(metrics.clone());
    let mut p = Tracker::start(&hub, on(&["on", "bcast", "prefix", "p:"], None).unwrap());
    // One feed message of more keys than a mailbox holds, none under p:.
    let many: Vec<String> = (0..=mailbox::BACKLOG).map(|i| format!("q:{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    feed(&hub, &many).await;
    assert!(hears(&mut p).await.is_none(), "nothing of its own, no flush");
    feed(&hub, &["q:1", "p:1"]).await;
    let Some(Invalidation::Keys(keys)) = hears(&mut p).await else {
        panic!("p:1");
    };
    assert_eq!(&*keys, &args(&["p:1"])[..]);
    // A prefix added later counts from then on.
    let more = on(&["on", "bcast", "prefix", "r:"], Some(&p.options)).unwrap();
    p.set_options(more);
    feed(&hub, &["r:1", "q:2"]).await;
    let Some(Invalidation::Keys(keys)) = hears(&mut p).await else {
        panic!("r:1");
    };
    assert_eq!(&*keys, &args(&["r:1"])[..]);
    assert_eq!(metrics.tracking_flushes.with_label_values(&["lagged"]).get(), 0);
}
