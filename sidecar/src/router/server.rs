//! Commands a single Redis server answers about itself: connection state
//! (`HELLO`, `AUTH`, `CLIENT`, `RESET`…), `INFO`, and the server-wide
//! commands fanned out to every primary and merged (`DBSIZE`, `KEYS`,
//! `FLUSHALL`, `SCAN`, `SCRIPT`, `FUNCTION`, `CONFIG GET`).

use super::*;

impl Router {
    pub(super) fn server_command(
        self: &Arc<Self>,
        st: &mut ClientState,
        info: &'static CommandInfo,
        args: Vec<Bytes>,
    ) -> Action {
        let proto = st.session.proto;
        let up = st.upstream_proto();
        let sub = args.get(1).map(|a| upper(a)).unwrap_or_default();
        let this = self.clone();
        let reply = |b: Bytes| {
            this.count(info.name, if b.starts_with(b"-") { "error" } else { "ok" });
            Action::Reply(b)
        };
        match info.name {
            "ping" => match args.len() {
                1 => reply(Bytes::from_static(b"+PONG\r\n")),
                2 => reply(encode(&Frame::Bulk(args[1].clone()))),
                _ => reply(err("ERR wrong number of arguments for 'ping' command")),
            },
            "echo" if args.len() == 2 => reply(encode(&Frame::Bulk(args[1].clone()))),
            "echo" => reply(err("ERR wrong number of arguments for 'echo' command")),
            "quit" => {
                self.count(info.name, "ok");
                Action::Close(ok())
            }
            // Arity is checked already.
            "select" => match args.get(1).and_then(|a| resp::int_arg(a)) {
                Some(0) => reply(ok()),
                Some(_) => reply(err("ERR cachetier: Redis Cluster has only database 0 (SELECT 0)")),
                None => reply(err("ERR value is not an integer or out of range")),
            },
            // As from the one standalone server the sidecar presents itself
            // as (HELLO's `mode`): a client that probes for a cluster this
            // way (rueidis does, with CLUSTER SLOTS) falls back to
            // standalone. Arguments are checked before this.
            "readonly" | "readwrite" | "asking" | "cluster" => {
                reply(err("ERR This instance has cluster support disabled"))
            }
            // As HELLO and INFO say: one primary, no replicas of its own
            // (arguments are refused by the arity check before this).
            "role" => reply(encode(&Frame::Array(vec![
                bulk("master"),
                Frame::Integer(0),
                Frame::Array(Vec::new()),
            ]))),
            "auth" => reply(self.check_auth(&args[1..])),
            "hello" => reply(self.hello(st, &args)),
            "reset" => {
                st.session.reset();
                // Unwatches: dropping the WATCH connection does that.
                st.watch.clear();
                st.set_tracker(None);
                reply(Bytes::from_static(b"+RESET\r\n"))
            }
            "client" => match self.client(st, &sub, &args) {
                ClientReply::Reply(b) => reply(b),
                ClientReply::Later(fut) => self.timed(info, fut),
                ClientReply::Close(b) => {
                    self.count(info.name, "ok");
                    Action::Close(b)
                }
            },
            // The nodes' own command table (key positions, flags, docs):
            // what a client asks COMMAND for is the server's, and every
            // node of a tier runs the same version.
            "command" => self.timed(info, async move {
                this.on_primary(None, resp::command_bytes(&args), up, false).await
            }),
            "info" => self.info(info, &args[1..], up, proto),
            "unwatch" => reply(ok()),
            "watch" => self.watch_command(st, info, &args),
            "multi" => reply(match st.session.multi() {
                Ok(()) => ok(),
                Err(e) => err(e),
            }),
            "exec" => reply(err("ERR EXEC without MULTI")),
            "discard" => reply(err("ERR DISCARD without MULTI")),
            "config" => match sub.as_str() {
                // Every node of a tier runs the same configuration.
                "GET" => self.timed(info, async move {
                    this.on_primary(None, resp::command_bytes(&args), up, false).await
                }),
                "SET" => reply(err(
                    "ERR cachetier: CONFIG SET is not proxied: set Redis parameters in the CacheTier's spec.redisConfig, which the operator applies to every node",
                )),
                _ => reply(err(format!(
                    "ERR cachetier: CONFIG {sub} is administrative and not proxied; run it against a Redis node directly"
                ))),
            },
            "acl" => match sub.as_str() {
                // Changes are the operator's, and a node's log is its own.
                "SETUSER" | "DELUSER" | "LOAD" | "SAVE" | "LOG" => {
                    reply(err(format!("ERR {}", crate::commands::ADMIN)))
                }
                // They show every user's password hashes, asked on the
                // sidecar's authenticated connections, and the sidecar's
                // listener does not require AUTH.
                "LIST" | "GETUSER" => reply(err(format!(
                    "ERR cachetier: ACL {sub} is not proxied: it would show the users' password hashes to clients that need not authenticate; run it against a Redis node directly"
                ))),
                // Who the client's commands run as (the sidecar's own
                // user), what users and categories there are (every node
                // of a tier has the same users), HELP, Redis's errors.
                _ => self.timed(info, async move {
                    this.on_primary(None, resp::command_bytes(&args), up, false).await
                }),
            },
            "wait" => self.wait_command(st, info, &args),
            "pubsub" => self.timed(info, async move { this.pubsub_query(args, up).await }),
            "dbsize" | "flushall" | "flushdb" | "keys" | "scan" | "randomkey" | "script" | "function" => {
                self.timed(info, async move { this.fanned(info.name, args, up, proto).await })
            }
            _ => reply(err(format!("ERR cachetier: '{}' is not supported", info.name))),
        }
    }

    pub(super) fn hello(&self, st: &mut ClientState, args: &[Bytes]) -> Bytes {
        // Check everything first: a failed HELLO changes nothing, as in Redis.
        let hello = match session::parse_hello(&args[1..]) {
            Ok(h) => h,
            Err(e) => return err(e),
        };
        if let Some((user, pass)) = &hello.auth {
            let r = self.check_auth(&[user.clone(), pass.clone()]);
            if r.starts_with(b"-") {
                return r;
            }
        }
        // The name after AUTH, as Redis checks them.
        if let Err(e) = st.session.hello(hello) {
            return err(e);
        }
        let p = st.session.proto;
        encode(&map(
            p,
            vec![
                (bulk("server"), bulk("redis")),
                // The upstream's version; a guess only before any node answered.
                (
                    bulk("version"),
                    bulk(&self.registry.redis_version().unwrap_or_else(|| "7.0.0".into())),
                ),
                (bulk("proto"), Frame::Integer(i64::from(p))),
                (bulk("id"), Frame::Integer(st.id as i64)),
                (bulk("mode"), bulk("standalone")),
                (bulk("role"), bulk("master")),
                (bulk("modules"), Frame::Array(Vec::new())),
            ],
        ))
    }

    /// `AUTH [user] password` from a client: accepted when it matches the
    /// sidecar's own upstream credentials (apps keep their configuration),
    /// refused otherwise, like Redis would.
    pub(super) fn check_auth(&self, args: &[Bytes]) -> Bytes {
        let (user, pass) = match args {
            [p] => (None, p),
            [u, p] => (Some(u), p),
            _ => return err("ERR syntax error"),
        };
        let Some(creds) = &self.config.auth else {
            // As a Redis whose default user has no password: it takes any
            // password for that user by name, and none without a name.
            return match user {
                None => err(
                    "ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?",
                ),
                Some(u) if u.as_ref() == b"default" => ok(),
                Some(_) => err("WRONGPASS invalid username-password pair or user is disabled."),
            };
        };
        let user_ok = match (user, &creds.username) {
            (None, None) => true,
            (None, Some(_)) => false,
            (Some(u), None) => u.as_ref() == b"default",
            (Some(u), Some(c)) => u.as_ref() == c.as_bytes(),
        };
        if user_ok && pass.as_ref() == creds.password.as_bytes() {
            ok()
        } else {
            err("WRONGPASS invalid username-password pair or user is disabled.")
        }
    }

    pub(super) async fn fanned(
        self: Arc<Self>,
        name: &'static str,
        args: Vec<Bytes>,
        up: Proto,
        proto: u8,
    ) -> Bytes {
        let cmd = resp::command_bytes(&args);
        match name {
            "dbsize" => match self.fan_out(cmd, up, false).await {
                Ok(rs) => {
                    let mut total = 0i64;
                    for r in rs {
                        if let Ok(Frame::Integer(i)) = resp::parse(&r) {
                            total += i;
                        }
                    }
                    encode(&Frame::Integer(total))
                }
                Err(e) => e,
            },
            "flushall" | "flushdb" => {
                if let Some(c) = &self.cache {
                    c.flush(None, "flush");
                }
                match self.fan_out(cmd, up, true).await {
                    Ok(_) => ok(),
                    Err(e) => e,
                }
            }
            "keys" => match self.fan_out(cmd, up, true).await {
                Ok(rs) => {
                    let mut all = Vec::new();
                    for r in rs {
                        if let Ok(Frame::Array(items)) | Ok(Frame::Set(items)) = resp::parse(&r) {
                            all.extend(items);
                        }
                    }
                    encode(&Frame::Array(all))
                }
                Err(e) => e,
            },
            "randomkey" => {
                let mut primaries = self.primaries();
                primaries.shuffle(&mut rand::rng());
                for n in primaries {
                    match n.request(up, cmd.clone(), 1).await {
                        Ok(mut r) => {
                            let reply = r.pop().unwrap_or_default();
                            if reply.starts_with(b"$") && !reply.starts_with(b"$-1") {
                                return reply;
                            }
                        }
                        Err(e) => return upstream_error(&n.addr, Kind::Read, &e),
                    }
                }
                encode(&null(proto))
            }
            "scan" => self.scan(args, up).await,
            "script" => self.script(args, cmd, up).await,
            "function" => self.function(args, cmd, up).await,
            _ => err("ERR cachetier: unsupported"),
        }
    }

    /// SCAN over every shard. The cursor packs the shard index into the low
    /// 14 bits and the node's own cursor above it; a node cursor of 0 moves
    /// to the next shard's primary. Shards are ordered by first slot, so the
    /// walk is stable while the topology is; a reshard mid-walk may repeat or
    /// skip keys (Redis' own SCAN guarantees hold per node only).
    pub(super) async fn scan(self: Arc<Self>, args: Vec<Bytes>, up: Proto) -> Bytes {
        let Some(cursor) = args
            .get(1)
            .and_then(|c| std::str::from_utf8(c).ok())
            .and_then(|c| c.parse::<u64>().ok())
        else {
            return err("ERR invalid cursor");
        };
        let primaries = self.primaries();
        if primaries.is_empty() {
            return err("CLUSTERDOWN cachetier: topology not known yet");
        }
        let mut shard = (cursor & 0x3FFF) as usize;
        let mut node_cursor = cursor >> 14;
        if shard >= primaries.len() {
            // Not a cursor of this walk (another topology's, or made up):
            // like a Redis table cursor past its end, the scan is over.
            return encode(&Frame::Array(vec![
                Frame::Bulk(Bytes::from_static(b"0")),
                Frame::Array(Vec::new()),
            ]));
        }
        loop {
            let mut sub: Vec<Bytes> = vec![Bytes::from_static(b"SCAN"), Bytes::from(node_cursor.to_string())];
            sub.extend(args[2..].iter().cloned());
            let node = &primaries[shard];
            let reply = match node.request(up, resp::command_bytes(&sub), 1).await {
                Ok(mut r) => r.pop().unwrap_or_default(),
                Err(e) => return upstream_error(&node.addr, Kind::Read, &e),
            };
            let Ok(Frame::Array(mut parts)) = resp::parse(&reply) else {
                return reply;
            };
            if parts.len() != 2 {
                return err("ERR cachetier: unexpected SCAN reply");
            }
            let keys = parts.pop().unwrap_or(Frame::Array(Vec::new()));
            let next = match parts.pop() {
                Some(Frame::Bulk(b)) => std::str::from_utf8(&b)
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok())
                    .unwrap_or(0),
                _ => 0,
            };
            let out_cursor = if next != 0 {
                if next >= (1 << 50) {
                    return err("ERR cachetier: node cursor too large to combine");
                }
                (next << 14) | shard as u64
            } else if shard + 1 < primaries.len() {
                shard += 1;
                node_cursor = 0;
                // An empty page from a finished shard: keep going so the
                // client does not see many empty pages.
                if matches!(&keys, Frame::Array(k) if k.is_empty()) {
                    continue;
                }
                shard as u64
            } else {
                0
            };
            return encode(&Frame::Array(vec![
                Frame::Bulk(Bytes::from(out_cursor.to_string())),
                keys,
            ]));
        }
    }

    /// `FUNCTION`: changes go to every primary (so `FCALL` works on any
    /// key); reads of the library set come from one primary.
    pub(super) async fn function(self: Arc<Self>, args: Vec<Bytes>, cmd: Bytes, up: Proto) -> Bytes {
        let sub = args.get(1).map(|a| upper(a)).unwrap_or_default();
        match sub.as_str() {
            "LOAD" | "DELETE" | "FLUSH" | "RESTORE" => match self.fan_out(cmd, up, true).await {
                Ok(mut rs) => rs.pop().unwrap_or_else(ok),
                Err(e) => e,
            },
            "KILL" => self.kill_running("FUNCTION").await,
            _ => self.on_primary(None, cmd, up, false).await,
        }
    }

    /// `SCRIPT KILL` / `FUNCTION KILL` (`container`): a script runs on one
    /// node, so the kill goes to every primary, each on a fresh connection
    /// (a busy node refuses `READONLY`, which the pooled connections open
    /// with, and its shared connection waits behind the script); one `+OK`
    /// means it was killed, else the nodes' own answer (`NOTBUSY`, or
    /// `UNKILLABLE` from one that could not).
    async fn kill_running(&self, container: &str) -> Bytes {
        let timeout = self.config.response_timeout;
        let auth = self.config.auth.as_ref();
        let futs = self.primaries().into_iter().map(|n| async move {
            crate::connect::oneshot_command(&n.addr, &[container, "KILL"], timeout, auth).await
        });
        let replies: Vec<Frame> = join_all(futs).await.into_iter().filter_map(Result::ok).collect();
        let killed = replies.iter().find(|r| matches!(r, Frame::Simple(_)));
        let refused = replies.iter().find(|r| match r {
            Frame::Error(e) => !e.starts_with(b"NOTBUSY"),
            _ => false,
        });
        match killed.or(refused).or(replies.first()) {
            Some(r) => encode(r),
            None => err("CLUSTERDOWN cachetier: no primary answered"),
        }
    }

    pub(super) async fn script(self: Arc<Self>, args: Vec<Bytes>, cmd: Bytes, up: Proto) -> Bytes {
        let sub = args.get(1).map(|a| upper(a)).unwrap_or_default();
        match sub.as_str() {
            "LOAD" | "FLUSH" => match self.fan_out(cmd, up, true).await {
                Ok(mut rs) => rs.pop().unwrap_or_else(ok),
                Err(e) => e,
            },
            "EXISTS" => match self.fan_out(cmd, up, false).await {
                Ok(rs) => {
                    let mut acc: Option<Vec<i64>> = None;
                    for r in rs {
                        let Ok(Frame::Array(items)) = resp::parse(&r) else {
                            return r;
                        };
                        let v: Vec<i64> = items
                            .iter()
                            .map(|f| matches!(f, Frame::Integer(1)) as i64)
                            .collect();
                        acc = Some(match acc {
                            None => v,
                            Some(a) => a.iter().zip(&v).map(|(x, y)| x & y).collect(),
                        });
                    }
                    encode(&Frame::Array(
                        acc.unwrap_or_default().into_iter().map(Frame::Integer).collect(),
                    ))
                }
                Err(e) => e,
            },
            "KILL" => self.kill_running("SCRIPT").await,
            _ => err(format!("ERR cachetier: SCRIPT {sub} is not supported")),
        }
    }
}
