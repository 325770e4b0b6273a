//! Errors as Redis words them: arity, subcommands, `numkeys`, `MULTI`.

use cachetier_sidecar::Sidecar;

use crate::support::{self, Cluster, client, config};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn argument_errors_are_redis_own_and_config_get_is_answered() {
    let cluster = Cluster::start(3, 0);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    let mut c = client(&sidecar).await;
    for (numkeys, wording) in [("0", "numkeys"), ("2", "Number of keys")] {
        let e = redis::cmd("SINTERCARD")
            .arg(numkeys)
            .arg("a")
            .query_async::<i64>(&mut c)
            .await
            .unwrap_err();
        assert!(e.to_string().contains(wording), "Redis's own wording: {e}");
    }
    let got: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory-policy")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(got[0], "maxmemory-policy");
    let e = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("allkeys-lru")
        .query_async::<()>(&mut c)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("redisConfig"), "{e}");
    // ACL changes are the operator's; a node's ACL LOG is its own.
    for sub in [&["SETUSER", "u", "on"][..], &["DELUSER", "u"], &["LOG"]] {
        let e = redis::cmd("ACL")
            .arg(sub)
            .query_async::<()>(&mut c)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("administrative"), "ACL {sub:?}: {e}");
    }
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_commands_get_the_errors_redis_gives_them() {
    let cluster = Cluster::start(3, 0);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    let mut c = client(&sidecar).await;
    let mut node = support::client_of(cluster.nodes[0].addr().parse().unwrap()).await;
    // The sidecar's arity table is the server's own.
    let names: Vec<&str> = cachetier_sidecar::commands::all().map(|i| i.name).collect();
    let infos: Vec<redis::Value> = redis::cmd("COMMAND")
        .arg("INFO")
        .arg(&names)
        .query_async(&mut node)
        .await
        .unwrap();
    for (name, value) in names.iter().zip(&infos) {
        let arity = match value {
            redis::Value::Array(a) => match a.get(1) {
                Some(redis::Value::Int(n)) => Some(*n as i32),
                _ => None,
            },
            _ => None,
        };
        assert_eq!(cachetier_sidecar::arity::of(name), arity, "{name}");
    }
    // Whatever the sidecar answers or routes itself, errors read as Redis's.
    let reply = |r: redis::RedisResult<redis::Value>| match r {
        Ok(v) => format!("{v:?}"),
        Err(e) => e.to_string(),
    };
    for line in [
        "SET k",
        "GET",
        "CLIENT",
        "CLIENT SETNAME",
        "CLIENT NOSUCH",
        "CLIENT ID x",
        "CONFIG NOSUCH",
        "CONFIG RESETSTAT x",
        "COMMAND COUNT x",
        // COMMAND is the nodes' own table (clients read key positions and
        // flags from it).
        "COMMAND COUNT",
        "COMMAND INFO get set nosuch",
        "COMMAND DOCS get",
        "COMMAND GETKEYS MSET a 1 b 2",
        "SCRIPT NOSUCH",
        "PUBSUB NOSUCH",
        "FUNCTION NOSUCH",
        "HELLO x",
        "HELLO 02",
        "HELLO 3 FOO",
        "HELLO 3 AUTH a",
        "AUTH a b c",
        "AUTH x",
        "AUTH default x",
        "AUTH bob x",
        "READONLY x",
        "MULTI x",
        "EXEC x",
        "DISCARD x",
        "UNWATCH x",
        "RANDOMKEY x",
        "DBSIZE x",
        "SELECT x",
        "PING a b",
        "ECHO",
        "WAIT 1",
        "ROLE x",
        // Subcommands with no key of commands whose key follows the
        // subcommand: any node answers them as Redis does.
        "MEMORY HELP",
        "MEMORY DOCTOR",
        "MEMORY NOSUCH",
        "MEMORY",
        "OBJECT HELP",
        "OBJECT ENCODING",
        "XINFO HELP",
        "XINFO STREAM",
        "XGROUP HELP",
        "CLIENT NO-EVICT maybe",
        "CLIENT NO-EVICT on",
        "LOLWUT VERSION x",
    ] {
        let args: Vec<&str> = line.split(' ').collect();
        let mut cmd = redis::cmd(args[0]);
        cmd.arg(&args[1..]);
        let (ours, redis) = (cmd.query_async(&mut c).await, cmd.query_async(&mut node).await);
        assert_eq!(reply(ours), reply(redis), "{line}");
    }
    // COMMAND and COMMAND LIST: the same commands, in each node's own order.
    let names = |v: redis::Value| -> Vec<String> {
        let mut names: Vec<String> = match v {
            redis::Value::Array(items) => items
                .into_iter()
                .map(|i| match i {
                    redis::Value::Array(entry) => format!("{:?}", entry.first()),
                    other => format!("{other:?}"),
                })
                .collect(),
            other => panic!("{other:?}"),
        };
        names.sort();
        names
    };
    for args in [
        &["COMMAND"][..],
        &["COMMAND", "LIST"],
        &["COMMAND", "LIST", "FILTERBY", "ACLCAT", "hash"],
    ] {
        let mut lists = Vec::new();
        for conn in [&mut c, &mut node] {
            let v = redis::cmd(args[0])
                .arg(&args[1..])
                .query_async(conn)
                .await
                .unwrap();
            lists.push(names(v));
        }
        assert!(lists[0].len() > 10, "{args:?}: {:?}", lists[0]);
        assert_eq!(lists[0], lists[1], "{args:?}");
    }
    // A command Redis refuses inside MULTI is refused at once, and EXEC
    // aborts (as it does for one the sidecar does not know).
    for bad in [&["SET", "k"][..], &["NOSUCHCMD"]] {
        let mut replies = Vec::new();
        for conn in [&mut c, &mut node] {
            let () = redis::cmd("MULTI").query_async(conn).await.unwrap();
            let queued = redis::cmd(bad[0])
                .arg(&bad[1..])
                .query_async::<redis::Value>(conn)
                .await;
            let exec = redis::cmd("EXEC").query_async::<redis::Value>(conn).await;
            replies.push((queued.is_err(), reply(exec)));
        }
        assert_eq!(replies[0], replies[1], "{bad:?}");
        assert!(
            replies[0].0 && replies[0].1.contains("Transaction discarded"),
            "{replies:?}"
        );
    }
    // What the sidecar answers or fans out cannot join a transaction (one
    // node's): refused with the reason, and EXEC aborts.
    for bad in [&["DBSIZE"][..], &["CLIENT", "SETNAME", "x"], &["INFO"]] {
        let () = redis::cmd("MULTI").query_async(&mut c).await.unwrap();
        let queued = redis::cmd(bad[0])
            .arg(&bad[1..])
            .query_async::<redis::Value>(&mut c)
            .await;
        let exec = redis::cmd("EXEC").query_async::<redis::Value>(&mut c).await;
        let queued = format!("{queued:?}");
        assert!(
            queued.contains("cannot run inside MULTI") && queued.contains("transaction runs on one node"),
            "{bad:?}: {queued}"
        );
        assert!(reply(exec).contains("Transaction discarded"), "{bad:?}");
    }
    sidecar.shutdown().await;
}

/// Where one Redis server and a cluster node differ (a cluster node refuses
/// keys of other slots first), the sidecar answers as the single server
/// does: byte for byte what a standalone redis-server 7.0 sends back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_cases_answer_as_a_standalone_redis_does() {
    let cluster = Cluster::start(3, 0);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    let standalone = support::RedisNode::start(&["--cluster-enabled", "no"]);
    let resp = |args: &[&str]| cachetier_sidecar::resp::command_bytes(args).to_vec();
    let mut scripts: Vec<(&str, Vec<u8>)> = Vec::new();
    // Client names: printable ASCII without spaces; an empty one clears it.
    let mut names = Vec::new();
    for name in ["ok-name", "a b", "a\nb", "\u{e9}", "x\x7f", ""] {
        names.extend(resp(&["CLIENT", "SETNAME", name]));
        names.extend(resp(&["CLIENT", "GETNAME"]));
    }
    names.extend(resp(&["HELLO", "2", "SETNAME", "bad name"]));
    names.extend(resp(&["HELLO", "2", "SETNAME", "n1"]));
    names.extend(resp(&["CLIENT", "GETNAME"]));
    names.extend(resp(&["HELLO", "2", "SETNAME", ""]));
    names.extend(resp(&["CLIENT", "GETNAME"]));
    scripts.push(("client names", names));
    // An odd MSET is an arity error whatever its keys' slots.
    scripts.push(("odd MSET", resp(&["MSET", "a", "1", "b"])));
    // A cursor the server never issued is still a cursor.
    scripts.push(("foreign SCAN cursor", resp(&["SCAN", "12345"])));
    // Inline commands (telnet, redis-cli's raw mode): sdssplitargs' escapes.
    scripts.push((
        "inline escapes",
        b"SET k \"\\x41\\x4a\\n\\t\\a\\b\\r\\q\\\"\"\r\nGET k\r\nSET k 'it\\'s' \r\nGET k\r\nDEL k\r\n"
            .to_vec(),
    ));
    scripts.push(("inline unbalanced", b"ECHO \"a\"b\r\nPING\r\n".to_vec()));
    scripts.push(("inline open quote", b"ECHO 'a\r\nPING\r\n".to_vec()));
    // Unknown commands, in Redis's words (its first arguments, cut as it
    // cuts them).
    let mut unknown = Vec::new();
    let long = "a".repeat(200);
    let name = "N".repeat(150);
    for args in [
        vec!["FROBNICATE", "x", "y\r\nz"],
        vec!["FOO"],
        vec!["FOO", &long, "b"],
        vec!["FOO", "a", "b", &long],
        vec![&name, "ab"],
        vec!["F\0O", "a\0b", "c"],
    ] {
        unknown.extend(resp(&args));
    }
    scripts.push(("unknown commands", unknown));
    // ACL's questions: the nodes' answers (the same users everywhere).
    let mut acl = Vec::new();
    for args in [
        &["ACL", "WHOAMI"][..],
        &["ACL", "WHOAMI", "x"],
        &["ACL", "CAT"],
        &["ACL", "HELP"],
        &["ACL", "DRYRUN", "default", "GET", "k"],
        &["ACL", "USERS"],
        &["ACL", "NOSUCH"],
    ] {
        acl.extend(resp(args));
    }
    scripts.push(("ACL", acl));
    // How clients probe for a cluster (rueidis sends CLUSTER SLOTS and
    // falls back to standalone on this error; cluster clients send
    // READONLY): the sidecar is one standalone server.
    let mut cluster = Vec::new();
    for args in [
        &["CLUSTER", "SLOTS"][..],
        &["CLUSTER", "SHARDS"],
        &["CLUSTER", "INFO"],
        &["CLUSTER", "KEYSLOT", "k"],
        &["CLUSTER", "KEYSLOT"],
        &["CLUSTER", "NOSUCH"],
        &["CLUSTER"],
        &["ASKING"],
        &["READONLY"],
        &["READWRITE"],
        &["READONLY", "x"],
    ] {
        cluster.extend(resp(args));
    }
    scripts.push(("cluster probes", cluster));
    // A transaction across slots (Django's cache.set_many, Laravel's
    // putMany): one transaction per slot, one EXEC reply in order.
    let mut tx = Vec::new();
    for args in [
        &["MULTI"][..],
        &["MSET", "tx:a", "1", "tx:b", "2", "tx:c", "3"],
        &["EXPIRE", "tx:a", "60"],
        &["EXPIRE", "tx:b", "60"],
        &["PING"],
        &["MGET", "tx:a", "tx:b", "tx:c", "tx:none"],
        &["INCR", "tx:a"],
        &["LPUSH", "tx:b", "x"],
        &["DEL", "tx:a", "tx:c"],
        &["EXISTS", "tx:a", "tx:b", "tx:c"],
        &["EXEC"],
        &["MGET", "tx:a", "tx:b", "tx:c"],
        &["DEL", "tx:b"],
    ] {
        tx.extend(resp(args));
    }
    scripts.push(("transaction across slots", tx));
    // Client-side caching: its options, modes and questions.
    let mut tracking = Vec::new();
    for args in [
        &["CLIENT", "TRACKING"][..],
        &["CLIENT", "TRACKINGINFO", "x"],
        &["CLIENT", "GETREDIR", "x"],
        &["CLIENT", "CACHING"],
        &["CLIENT", "TRACKING", "OFF"],
        &["CLIENT", "TRACKING", "OFF", "BCAST", "PREFIX", "a"],
        &["CLIENT", "TRACKING", "MAYBE"],
        &["CLIENT", "TRACKING", "MAYBE", "NOSUCH"],
        &["CLIENT", "TRACKINGINFO"],
        &["CLIENT", "GETREDIR"],
        &["CLIENT", "CACHING", "yes"],
        &["CLIENT", "TRACKING", "ON"],
        &["CLIENT", "TRACKINGINFO"],
        &["CLIENT", "GETREDIR"],
        &["CLIENT", "TRACKING", "OFF"],
        &["HELLO", "3"],
        &["CLIENT", "TRACKINGINFO"],
        &["CLIENT", "TRACKING", "ON", "PREFIX", "a"],
        &["CLIENT", "TRACKING", "ON", "BCAST", "OPTIN"],
        &["CLIENT", "TRACKING", "ON", "OPTIN", "OPTOUT"],
        &["CLIENT", "TRACKING", "ON", "REDIRECT", "abc"],
        &["CLIENT", "TRACKING", "ON", "REDIRECT", "999999"],
        &["CLIENT", "TRACKING", "ON", "PREFIX"],
        &["CLIENT", "TRACKING", "ON", "BCAST", "PREFIX", "x", "PREFIX", "xy"],
        &[
            "CLIENT", "TRACKING", "ON", "BCAST", "PREFIX", "b", "PREFIX", "a", "NOLOOP",
        ],
        &["CLIENT", "TRACKINGINFO"],
        &["CLIENT", "TRACKING", "ON", "BCAST", "PREFIX", "ab"],
        &["CLIENT", "TRACKING", "ON", "BCAST", "PREFIX", "c"],
        &["CLIENT", "TRACKINGINFO"],
        &["CLIENT", "TRACKING", "ON"],
        &["CLIENT", "CACHING", "yes"],
        &["CLIENT", "TRACKING", "OFF"],
        &["CLIENT", "TRACKING", "ON", "BCAST"],
        &["CLIENT", "TRACKINGINFO"],
        &["CLIENT", "TRACKING", "OFF"],
        &["CLIENT", "TRACKING", "ON", "OPTIN"],
        &["CLIENT", "TRACKING", "ON", "OPTOUT"],
        &["CLIENT", "CACHING", "no"],
        &["CLIENT", "CACHING", "maybe"],
        &["CLIENT", "CACHING", "yes", "extra"],
        &["CLIENT", "CACHING", "yes"],
        &["CLIENT", "TRACKINGINFO"],
        &["CLIENT", "TRACKINGINFO"],
        &["CLIENT", "TRACKING", "OFF"],
        &["CLIENT", "TRACKING", "ON", "OPTOUT"],
        &["CLIENT", "CACHING", "no"],
        &["CLIENT", "TRACKINGINFO"],
        &["RESET"],
        &["CLIENT", "TRACKINGINFO"],
    ] {
        tracking.extend(resp(args));
    }
    scripts.push(("tracking", tracking));
    // Redis takes the two bytes after a bulk string as its CRLF, unread.
    scripts.push((
        "bulk without CRLF",
        b"*1\r\n$4\r\nPINGxx*2\r\n$4\r\nECHO\r\n$2\r\nhiAB*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\n\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"
            .to_vec(),
    ));
    // Bytes that are not UTF-8 come back as sent (compared as bytes: the
    // comparison below reads text).
    let mut raw_name = b"*2\r\n$2\r\n\xff\xfe\r\n$1\r\n\xc3\r\n".to_vec();
    let cut = format!("a{}", "\u{e9}".repeat(70));
    raw_name.extend(resp(&[&cut, "x"]));
    let ours = support::exchange(&sidecar.local_addr().to_string(), &raw_name).await;
    let redis = support::exchange(&standalone.addr(), &raw_name).await;
    assert_eq!(ours, redis, "unknown commands that are not UTF-8");
    for (what, script) in &scripts {
        let ours = support::exchange(&sidecar.local_addr().to_string(), script).await;
        let redis = support::exchange(&standalone.addr(), script).await;
        // HELLO's `id` is each server's own.
        let unid = |b: &[u8]| {
            let text = String::from_utf8_lossy(b).into_owned();
            let mut parts = text.split("$2\r\nid\r\n:");
            let mut out = parts.next().unwrap_or_default().to_string();
            for p in parts {
                out += "$2\r\nid\r\n:<id>\r\n";
                out += p.split_once("\r\n").map_or("", |(_, rest)| rest);
            }
            out
        };
        assert_eq!(unid(&ours), unid(&redis), "{what}: sidecar, then Redis");
    }
    sidecar.shutdown().await;
}
