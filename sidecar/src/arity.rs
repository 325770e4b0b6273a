//! Every command's arity as Redis 7.0 declares it (`COMMAND INFO`): `n > 0`
//! exactly `n` arguments counting the name, `n < 0` at least `-n`. Redis
//! checks it before anything else, and so does the sidecar, with Redis's
//! words, so a malformed command gets Redis's error on every path
//! (queued in `MULTI` too, where Redis refuses it at once and aborts the
//! transaction). A test checks this list against a real server. A leaf:
//! the command table (`commands.rs`) takes its arities from here.

/// By name, sorted.
#[rustfmt::skip]
static ARITY: &[(&str, i32)] = &[
    ("acl", -2), ("append", 3), ("asking", 1), ("auth", -2), ("bgrewriteaof", 1),
    ("bgsave", -1), ("bitcount", -2), ("bitfield", -2), ("bitfield_ro", -2), ("bitop", -4),
    ("bitpos", -3), ("blmove", 6), ("blmpop", -5), ("blpop", -3), ("brpop", -3),
    ("brpoplpush", 4), ("bzmpop", -5), ("bzpopmax", -3), ("bzpopmin", -3), ("client", -2),
    ("cluster", -2), ("command", -1), ("config", -2), ("copy", -3), ("dbsize", 1),
    ("debug", -2), ("decr", 2), ("decrby", 3), ("del", -2), ("discard", 1), ("dump", 2),
    ("echo", 2), ("eval", -3), ("eval_ro", -3), ("evalsha", -3), ("evalsha_ro", -3),
    ("exec", 1), ("exists", -2), ("expire", -3), ("expireat", -3), ("expiretime", 2),
    ("failover", -1), ("fcall", -3), ("fcall_ro", -3), ("flushall", -1), ("flushdb", -1),
    ("function", -2), ("geoadd", -5), ("geodist", -4), ("geohash", -2), ("geopos", -2),
    ("georadius", -6), ("georadius_ro", -6), ("georadiusbymember", -5),
    ("georadiusbymember_ro", -5), ("geosearch", -7), ("geosearchstore", -8), ("get", 2),
    ("getbit", 3), ("getdel", 2), ("getex", -2), ("getrange", 4), ("getset", 3), ("hdel", -3),
    ("hello", -1), ("hexists", 3), ("hget", 3), ("hgetall", 2), ("hincrby", 4),
    ("hincrbyfloat", 4), ("hkeys", 2), ("hlen", 2), ("hmget", -3), ("hmset", -4),
    ("hrandfield", -2), ("hscan", -3), ("hset", -4), ("hsetnx", 4), ("hstrlen", 3),
    ("hvals", 2), ("incr", 2), ("incrby", 3), ("incrbyfloat", 3), ("info", -1), ("keys", 2),
    ("lastsave", 1), ("latency", -2), ("lcs", -3), ("lindex", 3), ("linsert", 5), ("llen", 2),
    ("lmove", 5), ("lmpop", -4), ("lolwut", -1), ("lpop", -2), ("lpos", -3), ("lpush", -3), ("lpushx", -3),
    ("lrange", 4), ("lrem", 4), ("lset", 4), ("ltrim", 4), ("memory", -2), ("mget", -2),
    ("migrate", -6), ("module", -2), ("monitor", 1), ("move", 3), ("mset", -3), ("msetnx", -3),
    ("multi", 1), ("object", -2), ("persist", 2), ("pexpire", -3), ("pexpireat", -3),
    ("pexpiretime", 2), ("pfadd", -2), ("pfcount", -2), ("pfmerge", -2), ("ping", -1),
    ("psetex", 4), ("psubscribe", -2), ("psync", -3), ("pttl", 2), ("publish", 3),
    ("pubsub", -2), ("punsubscribe", -1), ("quit", -1), ("randomkey", 1), ("readonly", 1),
    ("readwrite", 1), ("rename", 3), ("renamenx", 3), ("replicaof", 3), ("reset", 1),
    ("restore", -4), ("role", 1), ("rpop", -2), ("rpoplpush", 3), ("rpush", -3), ("rpushx", -3),
    ("sadd", -3), ("save", 1), ("scan", -2), ("scard", 2), ("script", -2), ("sdiff", -2),
    ("sdiffstore", -3), ("select", 2), ("set", -3), ("setbit", 4), ("setex", 4), ("setnx", 3),
    ("setrange", 4), ("shutdown", -1), ("sinter", -2), ("sintercard", -3), ("sinterstore", -3),
    ("sismember", 3), ("slaveof", 3), ("slowlog", -2), ("smembers", 2), ("smismember", -3),
    ("smove", 4), ("sort", -2), ("sort_ro", -2), ("spop", -2), ("spublish", 3),
    ("srandmember", -2), ("srem", -3), ("sscan", -3), ("ssubscribe", -2), ("strlen", 2),
    ("subscribe", -2), ("substr", 4), ("sunion", -2), ("sunionstore", -3), ("sunsubscribe", -1),
    ("swapdb", 3), ("sync", 1), ("time", 1), ("touch", -2), ("ttl", 2), ("type", 2),
    ("unlink", -2), ("unsubscribe", -1), ("unwatch", 1), ("wait", 3), ("watch", -2),
    ("xack", -4), ("xadd", -5), ("xautoclaim", -6), ("xclaim", -6), ("xdel", -3),
    ("xgroup", -2), ("xinfo", -2), ("xlen", 2), ("xpending", -3), ("xrange", -4), ("xread", -4),
    ("xreadgroup", -7), ("xrevrange", -4), ("xsetid", -3), ("xtrim", -4), ("zadd", -4),
    ("zcard", 2), ("zcount", 4), ("zdiff", -3), ("zdiffstore", -4), ("zincrby", 4),
    ("zinter", -3), ("zintercard", -3), ("zinterstore", -4), ("zlexcount", 4), ("zmpop", -4),
    ("zmscore", -3), ("zpopmax", -2), ("zpopmin", -2), ("zrandmember", -2), ("zrange", -4),
    ("zrangebylex", -4), ("zrangebyscore", -4), ("zrangestore", -5), ("zrank", 3), ("zrem", -3),
    ("zremrangebylex", 4), ("zremrangebyrank", 4), ("zremrangebyscore", 4), ("zrevrange", -4),
    ("zrevrangebylex", -4), ("zrevrangebyscore", -4), ("zrevrank", 3), ("zscan", -3),
    ("zscore", 3), ("zunion", -3), ("zunionstore", -4),
];

/// The subcommands of the container commands the sidecar answers or fans
/// out itself, by container and name, sorted; `client setinfo` is Redis
/// 7.2's (client libraries send it on connect).
#[rustfmt::skip]
static SUBCOMMANDS: &[(&str, &str, i32)] = &[
    ("client", "caching", 3), ("client", "getname", 2), ("client", "getredir", 2),
    ("client", "help", 2), ("client", "id", 2), ("client", "info", 2), ("client", "kill", -3),
    ("client", "list", -2), ("client", "no-evict", 3), ("client", "pause", -3),
    ("client", "reply", 3), ("client", "setinfo", 4), ("client", "setname", 3),
    ("client", "tracking", -3), ("client", "trackinginfo", 2), ("client", "unblock", -3),
    ("client", "unpause", 2), ("cluster", "addslots", -3), ("cluster", "addslotsrange", -4),
    ("cluster", "bumpepoch", 2), ("cluster", "count-failure-reports", 3),
    ("cluster", "countkeysinslot", 3), ("cluster", "delslots", -3),
    ("cluster", "delslotsrange", -4), ("cluster", "failover", -2), ("cluster", "flushslots", 2),
    ("cluster", "forget", 3), ("cluster", "getkeysinslot", 4), ("cluster", "help", 2),
    ("cluster", "info", 2), ("cluster", "keyslot", 3), ("cluster", "links", 2),
    ("cluster", "meet", -4), ("cluster", "myid", 2), ("cluster", "nodes", 2),
    ("cluster", "replicas", 3), ("cluster", "replicate", 3), ("cluster", "reset", -2),
    ("cluster", "saveconfig", 2), ("cluster", "set-config-epoch", 3), ("cluster", "setslot", -4),
    ("cluster", "shards", 2), ("cluster", "slaves", 3), ("cluster", "slots", 2),
    ("command", "count", 2), ("command", "docs", -2),
    ("command", "getkeys", -4), ("command", "getkeysandflags", -4), ("command", "help", 2),
    ("command", "info", -2), ("command", "list", -2), ("config", "get", -3),
    ("config", "help", 2), ("config", "resetstat", 2), ("config", "rewrite", 2),
    ("config", "set", -4), ("function", "delete", 3), ("function", "dump", 2),
    ("function", "flush", -2), ("function", "help", 2), ("function", "kill", 2),
    ("function", "list", -2), ("function", "load", -3), ("function", "restore", -3),
    ("function", "stats", 2), ("pubsub", "channels", -2), ("pubsub", "help", 2),
    ("pubsub", "numpat", 2), ("pubsub", "numsub", -2), ("pubsub", "shardchannels", -2),
    ("pubsub", "shardnumsub", -2), ("script", "debug", 3), ("script", "exists", -3),
    ("script", "flush", -2), ("script", "help", 2), ("script", "kill", 2),
    ("script", "load", 3),
];

/// The arity of command `name` (lower case), if Redis 7.0 has it.
pub fn of(name: &str) -> Option<i32> {
    ARITY
        .binary_search_by(|(n, _)| n.cmp(&name))
        .ok()
        .and_then(|i| ARITY.get(i))
        .map(|(_, a)| *a)
}

/// `argc` arguments (with the name) fit `arity`.
#[inline]
pub fn fits(arity: i32, argc: usize) -> bool {
    // Checked on every request: no conversion that can fail.
    let n = arity.unsigned_abs() as usize;
    if arity >= 0 { argc == n } else { argc >= n }
}

/// Subcommand `sub` (any case) of container command `name` (lower case):
/// its lower-case name and arity.
fn subcommand(name: &str, sub: &[u8]) -> Option<(&'static str, i32)> {
    SUBCOMMANDS
        .iter()
        .find(|(c, s, _)| *c == name && s.as_bytes().eq_ignore_ascii_case(sub))
        .map(|&(_, s, a)| (s, a))
}

/// Check `args[1]` of container command `name` (lower case) as Redis does:
/// a subcommand it has, with an argument count that fits. Containers not
/// listed pass.
pub fn check_subcommand(name: &str, args: &[impl AsRef<[u8]>]) -> Result<(), String> {
    let Some(sub) = args.get(1).map(AsRef::as_ref) else {
        return Ok(());
    };
    if !SUBCOMMANDS.iter().any(|(c, _, _)| *c == name) {
        return Ok(());
    }
    match subcommand(name, sub) {
        None => Err(format!(
            "ERR unknown subcommand '{}'. Try {} HELP.",
            String::from_utf8_lossy(sub).chars().take(128).collect::<String>(),
            name.to_ascii_uppercase()
        )),
        Some((s, arity)) if !fits(arity, args.len()) => {
            Err(format!("ERR wrong number of arguments for '{name}|{s}' command"))
        }
        Some(_) => Ok(()),
    }
}

/// Redis's name for a command as sent: `pubsub|numsub` for a subcommand of
/// a container listed here, else the command's own (lower case) name.
pub fn full_name(name: &str, sub: Option<&[u8]>) -> String {
    match sub.and_then(|sub| subcommand(name, sub)) {
        Some((s, _)) => format!("{name}|{s}"),
        None => name.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_is_sorted_and_arities_read_as_redis_reads_them() {
        assert!(ARITY.windows(2).all(|w| w[0].0 < w[1].0), "sorted, no duplicates");
        assert_eq!(of("get"), Some(2));
        assert_eq!(of("set"), Some(-3));
        assert_eq!(of("nosuch"), None);
        assert!(fits(2, 2) && !fits(2, 3) && !fits(2, 1));
        assert!(fits(-3, 3) && fits(-3, 9) && !fits(-3, 2));
        assert!(
            SUBCOMMANDS
                .windows(2)
                .all(|w| (w[0].0, w[0].1) < (w[1].0, w[1].1))
        );
    }

    #[test]
    fn subcommands_are_checked_with_redis_words() {
        let check =
            |a: &[&str]| check_subcommand(a[0], &a[1..].iter().map(|s| s.as_bytes()).collect::<Vec<_>>());
        // args as the client sent them: the name, then the subcommand.
        assert_eq!(check(&["client", "CLIENT", "SetName", "a"]), Ok(()));
        assert_eq!(
            check(&["client", "CLIENT", "SETNAME"]),
            Err("ERR wrong number of arguments for 'client|setname' command".into())
        );
        assert_eq!(
            check(&["config", "CONFIG", "NoSuch"]),
            Err("ERR unknown subcommand 'NoSuch'. Try CONFIG HELP.".into())
        );
        assert_eq!(check(&["get", "GET", "k"]), Ok(()), "not a container");
        assert_eq!(full_name("pubsub", Some(b"NumSub")), "pubsub|numsub");
        assert_eq!(full_name("pubsub", Some(b"nosuch")), "pubsub");
        assert_eq!(full_name("get", Some(b"k")), "get");
    }
}
