//! The command table itself: every command the sidecar routes, with its
//! kind and key positions (the types are in `commands.rs`).

use std::collections::HashMap;
use std::sync::LazyLock;

use super::{CommandInfo, KeySpec, Kind, Split};

const WAITAOF: &str = "WAITAOF counts the AOF fsyncs of one connection's writes, and through the cachetier sidecar a client's writes share upstream connections with others' (WAIT is answered, from replication offsets)";
const PUBSUB: &str = "subscribing inside MULTI is not supported by the cachetier sidecar";
pub(crate) const ADMIN: &str = "administrative commands are not proxied by the cachetier sidecar; run them against a Redis node directly";

fn k1() -> KeySpec {
    KeySpec::Range {
        first: 1,
        last: 1,
        step: 1,
    }
}
fn kall() -> KeySpec {
    KeySpec::Range {
        first: 1,
        last: -1,
        step: 1,
    }
}
fn k12() -> KeySpec {
    KeySpec::Range {
        first: 1,
        last: 2,
        step: 1,
    }
}
fn k2() -> KeySpec {
    KeySpec::Range {
        first: 2,
        last: 2,
        step: 1,
    }
}

/// Hashed with aHash: the name is looked up on every request, and SipHash
/// was the largest part of that. The table is fixed, so a client's names
/// cannot flood it.
pub(super) type Table = HashMap<&'static str, CommandInfo, ahash::RandomState>;

pub(super) static TABLE: LazyLock<Table> = LazyLock::new(|| {
    let mut t = Table::default();
    let mut add = |names: &[&'static str], kind: Kind, keys: KeySpec| {
        for &name in names {
            let id = t.len();
            t.insert(
                name,
                CommandInfo {
                    name,
                    kind,
                    keys,
                    split: None,
                    id,
                    arity: crate::arity::of(name),
                },
            );
        }
    };
    use Kind::*;
    add(
        &[
            "get",
            "getrange",
            "substr",
            "strlen",
            "ttl",
            "pttl",
            "expiretime",
            "pexpiretime",
            "type",
            "dump",
            "hget",
            "hmget",
            "hgetall",
            "hkeys",
            "hvals",
            "hlen",
            "hexists",
            "hstrlen",
            "hrandfield",
            "hscan",
            "lrange",
            "llen",
            "lindex",
            "lpos",
            "smembers",
            "sismember",
            "smismember",
            "scard",
            "srandmember",
            "sscan",
            "zrange",
            "zrangebyscore",
            "zrevrangebyscore",
            "zrangebylex",
            "zrevrangebylex",
            "zrevrange",
            "zscore",
            "zmscore",
            "zcard",
            "zcount",
            "zlexcount",
            "zrank",
            "zrevrank",
            "zscan",
            "zrandmember",
            "bitcount",
            "bitpos",
            "getbit",
            "bitfield_ro",
            "georadius_ro",
            "georadiusbymember_ro",
            "geosearch",
            "geopos",
            "geodist",
            "geohash",
            "xrange",
            "xrevrange",
            "xlen",
            "xpending",
            "sort_ro",
        ],
        Read,
        k1(),
    );
    add(
        &["mget", "exists", "touch", "sinter", "sunion", "sdiff", "pfcount"],
        Read,
        kall(),
    );
    add(&["lcs"], Read, k12());
    add(&["xinfo", "memory", "object"], Read, k2());
    add(
        &["sintercard", "zdiff", "zinter", "zunion", "zintercard"],
        Read,
        KeySpec::Numkeys { at: 1 },
    );
    add(
        &["eval_ro", "evalsha_ro", "fcall_ro"],
        Read,
        KeySpec::Numkeys { at: 2 },
    );
    add(&["xread"], Read, KeySpec::Streams);
    add(
        &[
            "set",
            "setnx",
            "setex",
            "psetex",
            "getset",
            "getdel",
            "getex",
            "append",
            "incr",
            "decr",
            "incrby",
            "decrby",
            "incrbyfloat",
            "setrange",
            "expire",
            "pexpire",
            "expireat",
            "pexpireat",
            "persist",
            "restore",
            "setbit",
            "bitfield",
            "pfadd",
            "hset",
            "hsetnx",
            "hmset",
            "hdel",
            "hincrby",
            "hincrbyfloat",
            "lpush",
            "rpush",
            "lpushx",
            "rpushx",
            "lpop",
            "rpop",
            "lset",
            "lrem",
            "ltrim",
            "linsert",
            "sadd",
            "srem",
            "spop",
            "zadd",
            "zincrby",
            "zrem",
            "zremrangebyscore",
            "zremrangebyrank",
            "zremrangebylex",
            "zpopmin",
            "zpopmax",
            "geoadd",
            "georadius",
            "georadiusbymember",
            "xadd",
            "xdel",
            "xtrim",
            "xack",
            "xclaim",
            "xautoclaim",
            "xsetid",
            "sort",
        ],
        Write,
        k1(),
    );
    add(
        &[
            "del",
            "unlink",
            "pfmerge",
            "sinterstore",
            "sunionstore",
            "sdiffstore",
        ],
        Write,
        kall(),
    );
    add(
        &[
            "rename",
            "renamenx",
            "copy",
            "rpoplpush",
            "lmove",
            "smove",
            "zrangestore",
            "geosearchstore",
        ],
        Write,
        k12(),
    );
    add(
        &["bitop"],
        Write,
        KeySpec::Range {
            first: 2,
            last: -1,
            step: 1,
        },
    );
    add(
        &["mset", "msetnx"],
        Write,
        KeySpec::Range {
            first: 1,
            last: -1,
            step: 2,
        },
    );
    add(&["xgroup"], Write, k2());
    add(&["lmpop", "zmpop"], Write, KeySpec::Numkeys { at: 1 });
    add(&["eval", "evalsha", "fcall"], Write, KeySpec::Numkeys { at: 2 });
    add(
        &["zunionstore", "zinterstore", "zdiffstore"],
        Write,
        KeySpec::DestNumkeys,
    );
    add(&["xreadgroup"], Write, KeySpec::Streams);
    add(
        &[
            "ping",
            "echo",
            "select",
            "hello",
            "client",
            "command",
            "info",
            "quit",
            "dbsize",
            "flushall",
            "flushdb",
            "keys",
            "scan",
            "randomkey",
            "multi",
            "exec",
            "discard",
            "unwatch",
            "auth",
            "readonly",
            "readwrite",
            "asking",
            "cluster",
            "script",
            "function",
            "config",
            "reset",
            "pubsub",
            "role",
            "acl",
        ],
        Server,
        KeySpec::None,
    );
    add(
        &["time", "publish", "lastsave", "lolwut"],
        AnyPrimary,
        KeySpec::None,
    );
    // A shard channel lives in its name's slot, like a key.
    add(&["spublish"], Write, k1());
    // Blocking forms run on a connection of the client's own (`block_timeout`).
    add(
        &["blpop", "brpop", "bzpopmin", "bzpopmax"],
        Write,
        KeySpec::Range {
            first: 1,
            last: -2,
            step: 1,
        },
    );
    add(&["brpoplpush", "blmove"], Write, k12());
    add(&["blmpop", "bzmpop"], Write, KeySpec::Numkeys { at: 2 });
    add(&["wait"], Server, KeySpec::None);
    add(&["waitaof"], Unsupported(WAITAOF), KeySpec::None);
    add(
        &[
            "subscribe",
            "psubscribe",
            "ssubscribe",
            "unsubscribe",
            "punsubscribe",
            "sunsubscribe",
        ],
        Unsupported(PUBSUB),
        KeySpec::None,
    );
    add(&["watch"], Server, kall());
    add(
        &[
            "shutdown",
            "debug",
            "monitor",
            "save",
            "bgsave",
            "bgrewriteaof",
            "replicaof",
            "slaveof",
            "failover",
            "migrate",
            "move",
            "swapdb",
            "slowlog",
            "latency",
            "module",
            "sync",
            "psync",
        ],
        Unsupported(ADMIN),
        KeySpec::None,
    );
    for (name, split) in [
        ("mget", Split::Array),
        ("mset", Split::AllOk),
        ("del", Split::Sum),
        ("unlink", Split::Sum),
        ("exists", Split::Sum),
        ("touch", Split::Sum),
    ] {
        if let Some(info) = t.get_mut(name) {
            info.split = Some(split);
        }
    }
    t
});
