//! The local cache: fills, epochs, invalidation, bounds.

use super::*;
use std::sync::atomic::AtomicUsize;

fn cache(ttl: Duration, max_bytes: u64) -> Arc<LocalCache> {
    let cfg = CacheConfig {
        prefixes: vec!["hot:".into()],
        ttl,
        max_bytes,
    };
    LocalCache::new(&cfg, Metrics::new().unwrap())
}

fn key(k: &str) -> CacheKey {
    CacheKey {
        variant: Variant::Get,
        proto: 2,
        key: Bytes::copy_from_slice(k.as_bytes()),
        field: Bytes::new(),
    }
}

fn counting_fetch(
    calls: &Arc<AtomicUsize>,
    value: &'static str,
    delay: Duration,
) -> impl Future<Output = Filled> + Send + 'static {
    let calls = calls.clone();
    async move {
        calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(delay).await;
        (Bytes::from_static(value.as_bytes()), None)
    }
}

#[test]
fn a_pttl_reply_bounds_the_entry_by_the_keys_remaining_life() {
    assert_eq!(life_from_pttl(b":1500\r\n"), Some(Duration::from_millis(1500)));
    assert_eq!(life_from_pttl(b":0\r\n"), Some(Duration::ZERO));
    assert_eq!(life_from_pttl(b":-1\r\n"), None, "no TTL of its own");
    assert_eq!(life_from_pttl(b":-2\r\n"), None, "no key: a nil reply");
    assert_eq!(life_from_pttl(b"-ERR x\r\n"), Some(Duration::ZERO), "not kept");
}

#[tokio::test(start_paused = true)]
async fn an_entry_lives_no_longer_than_the_life_its_fill_brought() {
    let c = cache(Duration::from_secs(60), 1 << 20);
    let calls = Arc::new(AtomicUsize::new(0));
    let read = |c: &Arc<LocalCache>| {
        let calls = calls.clone();
        let c = c.clone();
        async move {
            c.get_or_fetch(key("hot:px"), true, async move {
                calls.fetch_add(1, Ordering::SeqCst);
                (Bytes::from_static(b"+v\r\n"), Some(Duration::from_millis(300)))
            })
            .await
        }
    };
    read(&c).await;
    tokio::time::advance(Duration::from_millis(299)).await;
    read(&c).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1, "still within the key's life");
    tokio::time::advance(Duration::from_millis(2)).await;
    read(&c).await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "refetched once the key's life is over"
    );
}

#[tokio::test]
async fn invalidating_a_key_leaves_every_other_key_servable() {
    let c = cache(Duration::from_secs(60), 1 << 20);
    let calls = Arc::new(AtomicUsize::new(0));
    for i in 0..100 {
        let f = counting_fetch(&calls, "+v\r\n", Duration::ZERO);
        c.get_or_fetch(key(&format!("hot:{i}")), true, f).await;
    }
    for i in 100..10_100 {
        c.bump(format!("hot:{i}").as_bytes());
    }
    c.bump(b"hot:0");
    let servable = (0..100)
        .filter(|i| c.try_hit(&key(&format!("hot:{i}"))).is_some())
        .count();
    assert_eq!(servable, 99, "only the invalidated key is gone");
}

#[tokio::test]
async fn concurrent_identical_misses_share_one_fetch() {
    let c = cache(Duration::from_secs(60), 1 << 20);
    let calls = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..1000 {
        let c = c.clone();
        let f = counting_fetch(&calls, "$1\r\nv\r\n", Duration::from_millis(50));
        tasks.push(tokio::spawn(async move {
            c.get_or_fetch(key("hot:a"), true, f).await
        }));
    }
    for t in tasks {
        assert_eq!(&t.await.unwrap()[..], b"$1\r\nv\r\n");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(c.metrics.coalesced.get() >= 900, "{}", c.metrics.coalesced.get());
}

#[tokio::test(start_paused = true)]
async fn an_entry_is_served_for_exactly_its_ttl() {
    let c = cache(Duration::from_secs(60), 1 << 20);
    let calls = Arc::new(AtomicUsize::new(0));
    let read = |c: &Arc<LocalCache>| {
        let f = counting_fetch(&calls, "+v\r\n", Duration::ZERO);
        let c = c.clone();
        async move { c.get_or_fetch(key("hot:ttl"), true, f).await }
    };
    read(&c).await;
    tokio::time::advance(Duration::from_secs(59)).await;
    read(&c).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1, "still fresh at 59 s");
    tokio::time::advance(Duration::from_secs(2)).await;
    read(&c).await;
    assert_eq!(calls.load(Ordering::SeqCst), 2, "refetched after 60 s");
}

// moka's own expiry runs on its clock, not tokio's: a short real TTL
// shows that memory is reclaimed too.
#[tokio::test]
async fn entries_expire_after_the_ttl() {
    let c = cache(Duration::from_millis(200), 1 << 20);
    let calls = Arc::new(AtomicUsize::new(0));
    c.get_or_fetch(
        key("hot:t"),
        true,
        counting_fetch(&calls, "+a\r\n", Duration::ZERO),
    )
    .await;
    c.get_or_fetch(
        key("hot:t"),
        true,
        counting_fetch(&calls, "+a\r\n", Duration::ZERO),
    )
    .await;
    assert_eq!(calls.load(Ordering::SeqCst), 1, "second read is a hit");
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.get_or_fetch(
        key("hot:t"),
        true,
        counting_fetch(&calls, "+a\r\n", Duration::ZERO),
    )
    .await;
    assert_eq!(calls.load(Ordering::SeqCst), 2, "expired entry is fetched again");
}

#[tokio::test]
async fn a_fetch_that_races_an_invalidation_is_not_kept() {
    let c = cache(Duration::from_secs(60), 1 << 20);
    let calls = Arc::new(AtomicUsize::new(0));
    let c2 = c.clone();
    let slow = tokio::spawn({
        let f = counting_fetch(&calls, "+old\r\n", Duration::from_millis(100));
        async move { c2.get_or_fetch(key("hot:r"), true, f).await }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    c.invalidate(b"hot:r", "own_write").await;
    slow.await.unwrap();
    let v = c
        .get_or_fetch(
            key("hot:r"),
            true,
            counting_fetch(&calls, "+new\r\n", Duration::ZERO),
        )
        .await;
    assert_eq!(&v[..], b"+new\r\n");
}

#[tokio::test]
async fn a_bump_makes_the_entry_unservable_at_once() {
    let c = cache(Duration::from_secs(60), 1 << 20);
    let calls = Arc::new(AtomicUsize::new(0));
    c.get_or_fetch(
        key("hot:b"),
        true,
        counting_fetch(&calls, "+old\r\n", Duration::ZERO),
    )
    .await;
    c.bump(b"hot:b");
    let v = c
        .get_or_fetch(
            key("hot:b"),
            true,
            counting_fetch(&calls, "+new\r\n", Duration::ZERO),
        )
        .await;
    assert_eq!(&v[..], b"+new\r\n");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn error_replies_and_untracked_keys_are_not_cached() {
    let c = cache(Duration::from_secs(60), 1 << 20);
    let calls = Arc::new(AtomicUsize::new(0));
    for _ in 0..2 {
        c.get_or_fetch(
            key("hot:e"),
            true,
            counting_fetch(&calls, "-ERR x\r\n", Duration::ZERO),
        )
        .await;
        c.get_or_fetch(
            key("hot:u"),
            false,
            counting_fetch(&calls, "+v\r\n", Duration::ZERO),
        )
        .await;
    }
    assert_eq!(calls.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn the_byte_budget_bounds_the_cache() {
    let c = cache(Duration::from_secs(60), 64 * 1024);
    let value: &'static str = Box::leak(format!("${}\r\n{}\r\n", 1000, "x".repeat(1000)).into_boxed_str());
    let calls = Arc::new(AtomicUsize::new(0));
    for i in 0..500 {
        c.get_or_fetch(
            key(&format!("hot:{i}")),
            true,
            counting_fetch(&calls, value, Duration::ZERO),
        )
        .await;
    }
    c.run_pending_tasks().await;
    assert!(c.weighted_size() <= 64 * 1024, "{}", c.weighted_size());
    assert!(
        c.weighted_size() > 32 * 1024,
        "the budget is used: {}",
        c.weighted_size()
    );
}

#[tokio::test(start_paused = true)]
async fn a_hit_from_the_front_obeys_invalidation_flushes_and_the_keys_life() {
    let c = cache(Duration::from_secs(60), 1 << 20);
    let fill = |c: &Arc<LocalCache>, k: &'static str, life: Option<Duration>| {
        let c = c.clone();
        async move {
            c.get_or_fetch(key(k), true, async move { (Bytes::from_static(b"+v\r\n"), life) })
                .await
        }
    };
    for k in ["hot:a", "hot:b", "hot:c"] {
        fill(&c, k, None).await;
        // The first hit comes from moka and puts the entry in the front.
        assert!(c.try_hit(&key(k)).is_some());
    }
    assert_eq!(c.front.len(), 3, "hits are kept in the front");
    c.bump(b"hot:a");
    assert!(
        c.try_hit(&key("hot:a")).is_none(),
        "a bumped key is not served from the front"
    );
    assert!(c.try_hit(&key("hot:b")).is_some(), "other keys still are");
    c.flush(None, "test");
    assert!(c.try_hit(&key("hot:b")).is_none(), "a flush reaches the front");
    assert_eq!(c.front.len(), 0);
    fill(&c, "hot:px", Some(Duration::from_millis(300))).await;
    assert!(c.try_hit(&key("hot:px")).is_some());
    tokio::time::advance(Duration::from_millis(301)).await;
    assert!(c.try_hit(&key("hot:px")).is_none(), "past the key's own life");
}

#[tokio::test]
async fn the_front_stays_within_its_bounds() {
    let c = cache(Duration::from_secs(60), 64 << 20);
    let value: &'static [u8] = Box::leak(
        format!("${}\r\n{}\r\n", 3000, "x".repeat(3000))
            .into_bytes()
            .into_boxed_slice(),
    );
    for i in 0..(2 * front::FRONT_ENTRIES) {
        let k = key(&format!("hot:{i}"));
        c.get_or_fetch(k.clone(), true, async move { (Bytes::from_static(value), None) })
            .await;
        assert!(c.try_hit(&k).is_some());
        assert!(c.front.len() <= front::FRONT_ENTRIES);
        assert!(c.front.len() * value.len() <= front::FRONT_BYTES + value.len());
    }
}
