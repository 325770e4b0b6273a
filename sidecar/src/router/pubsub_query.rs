//! `PUBSUB` over the cluster. A node answers for its own subscribers only,
//! and the sidecar's subscribers are spread over the primaries, so the
//! question goes to every primary and the answers are merged: channel lists
//! united (`CHANNELS`, `SHARDCHANNELS`), counts added (`NUMSUB`,
//! `SHARDNUMSUB`, `NUMPAT`), less the keyspace mirror links' own
//! subscriptions (`pubsub::keyspace`). The ordinary channel and pattern
//! questions go to the replicas in rotation too: a subscriber's connection
//! stays on its node when a failover makes it a replica (`PUBLISH` reaches
//! replicas as well), and one server counts every subscriber. A replica
//! that does not answer is left out.

use std::collections::HashSet;

use super::*;

impl Router {
    pub(super) async fn pubsub_query(self: Arc<Self>, args: Vec<Bytes>, up: Proto) -> Bytes {
        let sub = args.get(1).map(|a| upper(a)).unwrap_or_default();
        let cmd = resp::command_bytes(&args);
        // Shard channels are held on primaries only.
        let everywhere = matches!(sub.as_str(), "CHANNELS" | "NUMSUB" | "NUMPAT");
        let asked = async {
            let (_, replicas) = self.in_rotation(everywhere);
            let (primaries, replicas) = futures_util::join!(
                self.fan_out(cmd.clone(), up, false),
                Router::ask_each(replicas, &cmd, up)
            );
            primaries.map(|mut rs| {
                rs.extend(replicas);
                rs
            })
        };
        match sub.as_str() {
            "CHANNELS" | "SHARDCHANNELS" => match asked.await {
                Ok(rs) => encode(&Frame::Array(union(&rs))),
                Err(e) => e,
            },
            "NUMSUB" | "SHARDNUMSUB" => match asked.await {
                Ok(rs) => {
                    let mut pairs = sum_pairs(&rs);
                    if sub == "NUMSUB" {
                        // The keyspace mirrors are the sidecar's, not clients.
                        for pair in pairs.chunks_mut(2) {
                            if let [Frame::Bulk(channel), Frame::Integer(n)] = pair {
                                *n = n.saturating_sub(self.mirrors.channel(channel)).max(0);
                            }
                        }
                    }
                    encode(&Frame::Array(pairs))
                }
                Err(e) => e,
            },
            "NUMPAT" => match asked.await {
                Ok(rs) => {
                    let total = rs
                        .iter()
                        .filter_map(|r| match resp::parse(r) {
                            Ok(Frame::Integer(n)) => Some(n),
                            _ => None,
                        })
                        .fold(0i64, i64::saturating_add);
                    // Each node counts its own unique patterns; a pattern
                    // held there only by a mirror is the sidecar's.
                    encode(&Frame::Integer(
                        total.saturating_sub(self.mirrors.patterns()).max(0),
                    ))
                }
                Err(e) => e,
            },
            // HELP, wrong arity…: Redis's own answer.
            _ => self.on_primary(None, cmd.clone(), up, false).await,
        }
    }
}

/// Every channel named in any of the array replies, once, in first-seen order.
fn union(replies: &[Bytes]) -> Vec<Frame> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for r in replies {
        if let Ok(Frame::Array(items) | Frame::Set(items)) = resp::parse(r) {
            for item in items {
                if let Frame::Bulk(b) = &item
                    && seen.insert(b.clone())
                {
                    out.push(item);
                }
            }
        }
    }
    out
}

/// `[channel, count, …]` replies (same channels, same order on every node)
/// added up position by position.
fn sum_pairs(replies: &[Bytes]) -> Vec<Frame> {
    let mut out: Vec<Frame> = Vec::new();
    for r in replies {
        let Ok(Frame::Array(items)) = resp::parse(r) else {
            continue;
        };
        if out.is_empty() {
            out = items;
            continue;
        }
        for (acc, item) in out.iter_mut().zip(items) {
            if let (Frame::Integer(a), Frame::Integer(b)) = (acc, item) {
                *a = a.saturating_add(b);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arr(items: Vec<Frame>) -> Bytes {
        encode(&Frame::Array(items))
    }

    fn bulk(s: &'static str) -> Frame {
        Frame::Bulk(Bytes::from_static(s.as_bytes()))
    }

    #[test]
    fn channel_lists_are_united_and_counts_added() {
        let a = arr(vec![bulk("x"), bulk("y")]);
        let b = arr(vec![bulk("y"), bulk("z")]);
        assert_eq!(union(&[a, b]), vec![bulk("x"), bulk("y"), bulk("z")]);
        let a = arr(vec![bulk("x"), Frame::Integer(1), bulk("y"), Frame::Integer(0)]);
        let b = arr(vec![bulk("x"), Frame::Integer(2), bulk("y"), Frame::Integer(3)]);
        assert_eq!(
            sum_pairs(&[a, b]),
            vec![bulk("x"), Frame::Integer(3), bulk("y"), Frame::Integer(3)]
        );
    }
}
