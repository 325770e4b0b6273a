//! `WAIT numreplicas timeout`: block until the client's earlier writes are
//! on at least `numreplicas` replicas, or the timeout passes; reply with
//! how many replicas have them.
//!
//! Redis's own `WAIT` counts the writes of the connection it arrives on,
//! and a client's writes reach Redis on connections it shares with other
//! clients, so the sidecar answers `WAIT` itself, from replication offsets.
//! It runs after every earlier command of the client has its reply. For
//! every shard where one of the client's writes may not be on every replica
//! yet (read-your-writes keeps that record, `written.rs`; without it, or
//! once the record was folded, every shard), the primary's
//! `master_repl_offset` is read once: at least the offset just past the
//! client's last write there. Then the shard's replicas are polled (`INFO
//! replication`, on their data connections) until `numreplicas` of them
//! have a link to the primary and a `slave_repl_offset` that reached it.
//! The reply is the smallest such count among those shards. A client that
//! wrote nothing, or whose writes are known to be on every replica, gets
//! the number of connected replicas (the smallest among all shards), as
//! from Redis. Polls back off from 1 ms to 100 ms, and waiting clients
//! share the blocking commands' bound (`blocking.rs`).
//!
//! Stricter than Redis in one way: the offset read after the client's last
//! write also covers other clients' writes that reached the primary before
//! it, so a replica far behind on someone else's large write makes this
//! `WAIT` wait for it too.

use std::time::{Duration, Instant};

use super::*;
use crate::gate;
use crate::order::Unreplicated;
use crate::replica::ReplicaInfo;
use crate::topology::Shard;

/// Pause between polls: short first (a replica is usually a round trip
/// behind), then doubling up to the longest, so a `WAIT` left waiting for
/// its timeout costs each replica ten `INFO`s a second, and at most
/// `blocking::MAX_BLOCKING` clients wait at once.
const FIRST_PAUSE: Duration = Duration::from_millis(1);
const LONGEST_PAUSE: Duration = Duration::from_millis(100);

/// `WAIT`'s arguments as Redis checks them: how many replicas, and for how
/// long (`None`: for ever).
fn parse_args(args: &[Bytes]) -> Result<(i64, Option<Duration>), &'static str> {
    let [_, want, ms] = args else {
        return Err("ERR wrong number of arguments for 'wait' command");
    };
    let want = resp::int_arg(want).ok_or("ERR value is not an integer or out of range")?;
    let ms = resp::int_arg(ms).ok_or("ERR timeout is not an integer or out of range")?;
    let ms = u64::try_from(ms).map_err(|_| "ERR timeout is negative")?;
    Ok((want, (ms > 0).then(|| Duration::from_millis(ms))))
}

/// `INFO replication` of `node` if it is in rotation and answers `within`.
async fn poll_within(node: &Arc<Node>, within: Option<Duration>) -> Option<ReplicaInfo> {
    let poll = gate::poll_or_skip(node.clone());
    match within {
        Some(t) => tokio::time::timeout(t, poll).await.ok().flatten(),
        None => poll.await,
    }
}

/// Poll those of `shard`'s replicas not yet known to hold everything up to
/// `offset` (`reached`, one flag per replica); one linked to its primary at
/// that offset or past it is marked. Once marked, a replica stays counted:
/// it has received the writes, as a replica's acknowledgement stays in
/// Redis. One that does not answer `within` is not marked this time (a
/// stopped replica must not hold `WAIT` past its timeout).
async fn observe(shard: &Shard, offset: u64, within: Option<Duration>, reached: &mut [bool]) {
    let polls = shard
        .replicas
        .iter()
        .zip(reached.iter())
        .map(|(r, &done)| async move { if done { None } else { poll_within(r, within).await } });
    let polls = join_all(polls).await;
    for (done, info) in reached.iter_mut().zip(polls) {
        if info.is_some_and(|i| i.is_replica && i.link_up && i.offset.is_some_and(|o| o >= offset)) {
            *done = true;
        }
    }
}

/// The primary's `master_repl_offset` (answered `within`), or an error
/// saying why not.
async fn primary_offset(shard: &Shard, within: Option<Duration>) -> Result<u64, Bytes> {
    let p = &shard.primary;
    match poll_within(p, within).await {
        Some(info) if !info.is_replica => info.master_offset.ok_or_else(|| {
            err(format!(
                "ERR cachetier: WAIT could not read the replication offset of primary {}",
                p.addr
            ))
        }),
        _ => Err(err(format!(
            "ERR cachetier: WAIT cannot count replicas: primary {} is out of rotation or not answering as a primary",
            p.addr
        ))),
    }
}

impl Router {
    pub(super) fn wait_command(
        self: &Arc<Self>,
        st: &ClientState,
        info: &'static CommandInfo,
        args: &[Bytes],
    ) -> Action {
        let (want, timeout) = match parse_args(args) {
            Ok(a) => a,
            Err(e) => {
                self.count(info.name, "error");
                return Action::Reply(err(e));
            }
        };
        let order = self.config.read_your_writes.then(|| st.order.clone());
        let this = self.clone();
        let m = self.handles(info);
        Action::Blocking(Box::pin(async move {
            let start = Instant::now();
            let Ok(_waiting) = this.blocking_permits.clone().try_acquire_owned() else {
                return crate::blocking::over_limit();
            };
            // Read here, when every earlier command has its reply.
            let unreplicated = order.map_or(Unreplicated::Any, |o| o.unreplicated());
            let reply = this.wait_replicas(unreplicated, want, timeout).await;
            CommandMetrics::record(m.as_deref(), &reply, start);
            reply
        }))
    }

    async fn wait_replicas(&self, unreplicated: Unreplicated, want: i64, timeout: Option<Duration>) -> Bytes {
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let topo = self.registry.current();
        let shards: Vec<&Shard> = match &unreplicated {
            Unreplicated::Slots(slots) if !slots.is_empty() => {
                let mut at: Vec<usize> = slots.iter().filter_map(|&s| topo.shard_index(s)).collect();
                at.sort_unstable();
                at.dedup();
                at.iter().filter_map(|&i| topo.shards.get(i)).collect()
            }
            _ => topo.shards.iter().collect(),
        };
        let offsets: Vec<u64> = if unreplicated == Unreplicated::Slots(Vec::new()) {
            // Nothing to wait for: count the connected replicas.
            vec![0; shards.len()]
        } else {
            let within = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            match join_all(shards.iter().map(|s| primary_offset(s, within)))
                .await
                .into_iter()
                .collect()
            {
                Ok(o) => o,
                Err(e) => return e,
            }
        };
        let mut reached: Vec<Vec<bool>> = shards.iter().map(|s| vec![false; s.replicas.len()]).collect();
        let mut pause = FIRST_PAUSE;
        loop {
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            let rounds = shards.iter().zip(&offsets).zip(reached.iter_mut());
            join_all(rounds.map(|((s, &o), r)| observe(s, o, left, r))).await;
            let counts = reached.iter().map(|r| r.iter().filter(|&&d| d).count());
            let count = i64::try_from(counts.min().unwrap_or(0)).unwrap_or(i64::MAX);
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if count >= want || left == Some(Duration::ZERO) {
                return encode(&Frame::Integer(count));
            }
            tokio::time::sleep(left.map_or(pause, |l| l.min(pause))).await;
            pause = (pause * 2).min(LONGEST_PAUSE);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<Bytes> {
        a.iter().map(|s| Bytes::copy_from_slice(s.as_bytes())).collect()
    }

    #[test]
    fn arguments_are_checked_as_redis_checks_them() {
        let ok = |a: &[&str]| parse_args(&args(a));
        assert_eq!(ok(&["WAIT", "1", "0"]), Ok((1, None)));
        assert_eq!(
            ok(&["WAIT", "-1", "250"]),
            Ok((-1, Some(Duration::from_millis(250))))
        );
        assert_eq!(
            ok(&["WAIT", "0", "9223372036854775807"]),
            Ok((0, Some(Duration::from_millis(i64::MAX as u64))))
        );
        let arity = Err("ERR wrong number of arguments for 'wait' command");
        assert_eq!(ok(&["WAIT"]), arity);
        assert_eq!(ok(&["WAIT", "1"]), arity);
        assert_eq!(ok(&["WAIT", "1", "2", "3"]), arity);
        let value = Err("ERR value is not an integer or out of range");
        for bad in ["a", "1.5", "+1", "01", "-0", " 1", "", "99999999999999999999"] {
            assert_eq!(ok(&["WAIT", bad, "0"]), value, "numreplicas {bad:?}");
        }
        let timeout = Err("ERR timeout is not an integer or out of range");
        for bad in ["a", "1.5", "99999999999999999999"] {
            assert_eq!(ok(&["WAIT", "0", bad]), timeout, "timeout {bad:?}");
        }
        assert_eq!(ok(&["WAIT", "0", "-1"]), Err("ERR timeout is negative"));
    }
}
