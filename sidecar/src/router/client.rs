//! `CLIENT` subcommands: the connection's own name and id, and `LIST`,
//! `INFO` and `KILL` over the sidecar's client connections (`clients.rs`),
//! with Redis's arguments and errors.

use std::time::Instant;

use super::*;
use crate::client_cache::{self, Change, Tracker};
use crate::clients::Client;
use crate::session::ReplyMode;

/// What a `CLIENT` subcommand does to the connection.
pub(super) enum ClientReply {
    Reply(Bytes),
    /// Replied once the future resolves (`CLIENT TRACKING ON`).
    Later(ReplyFuture),
    /// Reply, then close (the client killed itself).
    Close(Bytes),
}

/// `CLIENT LIST TYPE` / `CLIENT KILL TYPE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientType {
    Normal,
    PubSub,
    /// `master`, `replica`, `slave`: the sidecar has none of these clients.
    Replication,
}

fn client_type(t: &[u8]) -> Result<ClientType, String> {
    match upper(t).as_str() {
        "NORMAL" => Ok(ClientType::Normal),
        "PUBSUB" => Ok(ClientType::PubSub),
        "MASTER" | "REPLICA" | "SLAVE" => Ok(ClientType::Replication),
        _ => Err(format!(
            "ERR Unknown client type '{}'",
            String::from_utf8_lossy(t)
        )),
    }
}

fn is_type(c: &Client, t: ClientType) -> bool {
    match t {
        ClientType::Normal => !c.subscribed(),
        ClientType::PubSub => c.subscribed(),
        ClientType::Replication => false,
    }
}

/// What `CLIENT KILL` kills.
#[derive(Debug, Default, PartialEq, Eq)]
struct KillFilter {
    id: Option<u64>,
    kind: Option<ClientType>,
    addr: Option<Bytes>,
    laddr: Option<Bytes>,
    skip_me: bool,
    /// The old form, `CLIENT KILL addr`: `+OK` or an error, not a count.
    old_form: bool,
}

fn parse_kill(args: &[Bytes]) -> Result<KillFilter, String> {
    // args: CLIENT KILL …
    match args.get(2..).unwrap_or_default() {
        [] => return Err("ERR wrong number of arguments for 'client|kill' command".into()),
        [addr] => {
            return Ok(KillFilter {
                addr: Some(addr.clone()),
                old_form: true,
                ..KillFilter::default()
            });
        }
        _ => {}
    }
    let mut f = KillFilter {
        skip_me: true,
        ..KillFilter::default()
    };
    for pair in args.get(2..).unwrap_or_default().chunks(2) {
        let [name, value] = pair else {
            return Err("ERR syntax error".into());
        };
        match upper(name).as_str() {
            "ID" => match resp::int_arg(value).and_then(|id| u64::try_from(id).ok()) {
                Some(id) if id > 0 => f.id = Some(id),
                _ => return Err("ERR client-id should be greater than 0".into()),
            },
            "TYPE" => f.kind = Some(client_type(value)?),
            "ADDR" => f.addr = Some(value.clone()),
            "LADDR" => f.laddr = Some(value.clone()),
            "USER" if value.as_ref() == b"default" => {}
            "USER" => return Err(format!("ERR No such user '{}'", String::from_utf8_lossy(value))),
            "SKIPME" => match upper(value).as_str() {
                "YES" => f.skip_me = true,
                "NO" => f.skip_me = false,
                _ => return Err("ERR syntax error".into()),
            },
            _ => return Err("ERR syntax error".into()),
        }
    }
    Ok(f)
}

impl KillFilter {
    fn matches(&self, c: &Client, me: u64) -> bool {
        !(self.skip_me && c.id == me)
            && self.id.is_none_or(|id| id == c.id)
            && self.kind.is_none_or(|t| is_type(c, t))
            && self
                .addr
                .as_ref()
                .is_none_or(|a| a.as_ref() == c.addr().as_bytes())
            && self
                .laddr
                .as_ref()
                .is_none_or(|a| a.as_ref() == c.laddr().as_bytes())
    }
}

/// `CLIENT LIST [TYPE type] [ID id …]`: which clients.
fn parse_list(args: &[Bytes]) -> Result<(Option<ClientType>, Option<Vec<i64>>), String> {
    match args.get(2..).unwrap_or_default() {
        [] => Ok((None, None)),
        [t, kind] if upper(t) == "TYPE" => Ok((Some(client_type(kind)?), None)),
        [id, ids @ ..] if upper(id) == "ID" && !ids.is_empty() => {
            // As Redis reads them (an ID no client has, -1 say, matches none).
            let ids: Option<Vec<i64>> = ids.iter().map(|i| resp::int_arg(i)).collect();
            ids.map(|ids| (None, Some(ids)))
                .ok_or_else(|| "ERR Invalid client ID".into())
        }
        _ => Err("ERR syntax error".into()),
    }
}

/// A text reply as Redis sends one: verbatim in RESP3, bulk in RESP2.
pub(super) fn text(proto: u8, s: String) -> Frame {
    if proto == 3 {
        Frame::Verbatim(Bytes::from(format!("txt:{s}")))
    } else {
        Frame::Bulk(Bytes::from(s))
    }
}

impl Router {
    pub(super) fn client(&self, st: &mut ClientState, sub: &str, args: &[Bytes]) -> ClientReply {
        let proto = st.session.proto;
        let reply = match sub {
            "SETNAME" if args.len() == 3 => match st.session.set_name(&args[2]) {
                Ok(()) => ok(),
                Err(e) => err(e),
            },
            "GETNAME" => match &st.session.name {
                Some(n) => encode(&Frame::Bulk(n.clone())),
                None => encode(&null(proto)),
            },
            "ID" => encode(&Frame::Integer(st.id as i64)),
            // Arity is checked already; OFF and SKIP have no reply of their own.
            "REPLY" => match args.get(2).map(|a| upper(a)).as_deref() {
                Some("ON") => {
                    st.session.set_replies(ReplyMode::On);
                    ok()
                }
                Some("OFF") => {
                    st.session.set_replies(ReplyMode::Off);
                    Bytes::new()
                }
                Some("SKIP") => {
                    st.session.set_replies(ReplyMode::Skip);
                    Bytes::new()
                }
                _ => err("ERR syntax error"),
            },
            // Client libraries announce themselves; nothing to do with it.
            "SETINFO" => ok(),
            // Redis's client eviction (`maxmemory-clients`) acts on the
            // sidecar's upstream connections, never on its clients.
            "NO-EVICT" => match args.get(2).map(|a| upper(a)).as_deref() {
                Some(on @ ("ON" | "OFF")) => {
                    st.no_evict = on == "ON";
                    ok()
                }
                _ => err("ERR syntax error"),
            },
            "INFO" => match &st.view {
                Some(me) => encode(&text(proto, format!("{}\n", self.line_of(st, me, "client|info")))),
                None => err("ERR cachetier: this connection is not registered"),
            },
            "LIST" => match parse_list(args) {
                Ok((kind, ids)) => {
                    let mut out = String::new();
                    for c in self.clients.all() {
                        let wanted = kind.is_none_or(|t| is_type(&c, t))
                            && ids
                                .as_ref()
                                .is_none_or(|ids| i64::try_from(c.id).is_ok_and(|id| ids.contains(&id)));
                        if wanted {
                            out.push_str(&self.line_of(st, &c, "client|list"));
                            out.push('\n');
                        }
                    }
                    encode(&text(proto, out))
                }
                Err(e) => err(e),
            },
            "KILL" => return self.kill(st, args),
            // Client-side caching (`client_cache.rs`).
            "TRACKING" => return self.tracking(st, args),
            "TRACKINGINFO" => encode(&tracking_info(proto, st.tracker.as_deref())),
            "GETREDIR" => encode(&Frame::Integer(if st.tracker.is_some() { 0 } else { -1 })),
            "CACHING" => match (st.tracker.as_mut(), args.get(2).map(|a| upper(a)).as_deref()) {
                (None, _) => err(
                    "ERR CLIENT CACHING can be called only when the client is in tracking mode with OPTIN or OPTOUT mode enabled",
                ),
                (Some(t), Some(yes @ ("YES" | "NO"))) => match t.set_caching(yes == "YES") {
                    // An OPTIN client's first tracked read: the feeds start
                    // now, and are up before the read is sent.
                    Ok(()) if t.feed() => return self.covered(t),
                    Ok(()) => ok(),
                    Err(e) => err(e),
                },
                _ => err("ERR syntax error"),
            },
            _ => err(format!(
                "ERR cachetier: CLIENT {sub} is not supported by the sidecar"
            )),
        };
        ClientReply::Reply(reply)
    }

    /// `CLIENT TRACKING ON|OFF [option …]`.
    fn tracking(&self, st: &mut ClientState, args: &[Bytes]) -> ClientReply {
        let current = st.tracker.as_ref().map(|t| &t.options);
        let exists = |id: i64| self.clients.all().iter().any(|c| i64::try_from(c.id) == Ok(id));
        let options = match client_cache::parse(&args[2..], current, exists) {
            Ok(Change::On(options)) => options,
            Ok(Change::Off) => {
                st.set_tracker(None);
                return ClientReply::Reply(ok());
            }
            Ok(Change::Redirect) => {
                return ClientReply::Reply(err(
                    "ERR cachetier: CLIENT TRACKING REDIRECT is not supported through the sidecar; \
                     turn tracking on from a RESP3 connection (HELLO 3), which is sent its own invalidations",
                ));
            }
            Err(e) => return ClientReply::Reply(err(e)),
        };
        if let Some(t) = st.tracker.as_mut() {
            t.set_options(options);
            if !t.options.optin && t.feed() {
                return self.covered(t);
            }
            return ClientReply::Reply(ok());
        }
        let tracker = Box::new(client_cache::Tracker::start(&self.tracking, options));
        let optin = tracker.options.optin;
        st.set_tracker(Some(tracker));
        match st.tracker.as_deref() {
            // OPTIN: nothing is tracked before `CLIENT CACHING yes`, which
            // starts the feeds.
            Some(t) if !optin => self.covered(t),
            _ => ClientReply::Reply(ok()),
        }
    }

    /// `+OK`, once every primary's feed is up (or a response timeout has
    /// passed: a feed that comes later sends a flush), so the tracked
    /// reads that follow miss no invalidation.
    fn covered(&self, t: &client_cache::Tracker) -> ClientReply {
        let (hub, registry, timeout, alive) = (
            self.tracking.clone(),
            self.registry.clone(),
            self.config.response_timeout,
            t.alive(),
        );
        ClientReply::Later(Box::pin(async move {
            hub.covering(&registry, timeout, alive).await;
            ok()
        }))
    }

    /// A tracking client's command is about to run: remember the keys a
    /// read names (for `EXEC`, those of the reads it runs; a queued
    /// command's are remembered when it runs). Returns the pushes to send
    /// before its reply, if remembering them started over
    /// (`client_cache::MAX_KEY_BYTES`), and whether it named any key.
    pub fn tracked_read(&self, st: &mut ClientState, req: &resp::Request) -> (Vec<Bytes>, bool) {
        let proto = st.session.proto;
        let in_multi = st.session.in_multi();
        let Some(t) = st.tracker.as_mut() else {
            return (Vec::new(), false);
        };
        let Some(info) = req.arg(0).and_then(|name| st.recent.lookup(name)) else {
            t.next_command(false);
            return (Vec::new(), false);
        };
        let queued = in_multi && !matches!(info.name, "exec" | "discard");
        t.next_command(info.name == "client" || info.name == "multi" || queued);
        // Set for this command's turn (`order::Turn::primary_reads`).
        let tracked = t.tracks_now();
        st.order.set_primary_reads(tracked);
        if queued || !tracked {
            return (Vec::new(), false);
        }
        let mut keys: Vec<Bytes> = Vec::new();
        if info.name == "exec" {
            for cmd in st.session.queued_commands() {
                if let Some(queued) = cmd.first().and_then(|name| commands::lookup(name)) {
                    keys_read(queued, cmd, &mut keys);
                }
            }
        } else {
            let args: Vec<Bytes> = (0..req.argc()).filter_map(|i| req.arg_bytes(i)).collect();
            keys_read(info, &args, &mut keys);
        }
        let pushes = t.read(&keys);
        // A RESP2 client is sent no pushes.
        (if proto == 3 { pushes } else { Vec::new() }, !keys.is_empty())
    }

    /// `c`'s `CLIENT LIST` line; the asking client's own shows this command.
    fn line_of(&self, st: &ClientState, c: &Client, this_cmd: &'static str) -> String {
        if c.id == st.id {
            st.show(c);
            c.line(Instant::now(), |_| Some(this_cmd))
        } else {
            c.line(Instant::now(), commands::name_of)
        }
    }

    fn kill(&self, st: &ClientState, args: &[Bytes]) -> ClientReply {
        let filter = match parse_kill(args) {
            Ok(f) => f,
            Err(e) => return ClientReply::Reply(err(e)),
        };
        let mut killed = 0i64;
        let mut me = false;
        for c in self.clients.all() {
            if filter.matches(&c, st.id) {
                killed += 1;
                if c.id == st.id {
                    me = true;
                } else {
                    c.kill.trigger();
                }
            }
        }
        let reply = match (filter.old_form, killed) {
            (true, 0) => err("ERR No such client"),
            (true, _) => ok(),
            (false, n) => encode(&Frame::Integer(n)),
        };
        if me {
            ClientReply::Close(reply)
        } else {
            ClientReply::Reply(reply)
        }
    }
}

/// `CLIENT TRACKINGINFO`, as Redis answers it.
fn tracking_info(proto: u8, t: Option<&Tracker>) -> Frame {
    let flags: Vec<Frame> = match t {
        Some(t) => t.flags().into_iter().map(bulk).collect(),
        None => vec![bulk("off")],
    };
    let prefixes = t.map(|t| t.options.prefixes.iter().cloned().map(Frame::Bulk).collect());
    let fields = vec![
        (
            bulk("flags"),
            if proto == 3 {
                Frame::Set(flags)
            } else {
                Frame::Array(flags)
            },
        ),
        (bulk("redirect"), Frame::Integer(if t.is_some() { 0 } else { -1 })),
        (bulk("prefixes"), Frame::Array(prefixes.unwrap_or_default())),
    ];
    map(proto, fields)
}

/// The keys a command reads, as Redis tracks them: those of read-only
/// commands and of scripts and functions.
fn keys_read(info: &CommandInfo, args: &[Bytes], out: &mut Vec<Bytes>) {
    let scripted = matches!(info.name, "eval" | "evalsha" | "fcall");
    if info.kind != Kind::Read && !scripted {
        return;
    }
    if let Ok(keys) = commands::key_indices(info, args) {
        out.extend(keys.into_iter().filter_map(|i| args.get(i).cloned()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &str) -> Vec<Bytes> {
        a.split(' ')
            .map(|s| Bytes::copy_from_slice(s.as_bytes()))
            .collect()
    }

    #[test]
    fn kill_and_list_arguments_are_checked_as_redis_checks_them() {
        let kill = |a: &str| parse_kill(&args(a));
        assert_eq!(
            kill("CLIENT KILL 1.2.3.4:5"),
            Ok(KillFilter {
                addr: Some(Bytes::from_static(b"1.2.3.4:5")),
                old_form: true,
                ..KillFilter::default()
            })
        );
        let f = kill("CLIENT KILL ID 9 SKIPME no").unwrap_or_default();
        assert_eq!((f.id, f.skip_me, f.old_form), (Some(9), false, false));
        assert!(
            kill("CLIENT KILL TYPE pubsub").is_ok_and(|f| f.skip_me && f.kind == Some(ClientType::PubSub))
        );
        for (a, e) in [
            ("CLIENT KILL ID 0", "ERR client-id should be greater than 0"),
            ("CLIENT KILL ID abc", "ERR client-id should be greater than 0"),
            ("CLIENT KILL ID +5", "ERR client-id should be greater than 0"),
            ("CLIENT KILL ID 05", "ERR client-id should be greater than 0"),
            ("CLIENT KILL TYPE foo", "ERR Unknown client type 'foo'"),
            ("CLIENT KILL USER bob", "ERR No such user 'bob'"),
            ("CLIENT KILL SKIPME maybe", "ERR syntax error"),
            ("CLIENT KILL MAXAGE 5", "ERR syntax error"),
            ("CLIENT KILL ID 1 TYPE", "ERR syntax error"),
        ] {
            assert_eq!(kill(a), Err(e.to_string()), "{a}");
        }
        let list = |a: &str| parse_list(&args(a));
        assert_eq!(list("CLIENT LIST"), Ok((None, None)));
        assert_eq!(list("CLIENT LIST ID 1 2"), Ok((None, Some(vec![1, 2]))));
        assert_eq!(
            list("CLIENT LIST TYPE normal"),
            Ok((Some(ClientType::Normal), None))
        );
        assert_eq!(
            list("CLIENT LIST ID abc"),
            Err("ERR Invalid client ID".to_string())
        );
        // As redis-server 7.0.15 reads them.
        assert_eq!(
            list("CLIENT LIST ID +5"),
            Err("ERR Invalid client ID".to_string())
        );
        assert_eq!(list("CLIENT LIST ID -1"), Ok((None, Some(vec![-1]))));
        assert_eq!(
            list("CLIENT LIST TYPE foo"),
            Err("ERR Unknown client type 'foo'".to_string())
        );
        assert_eq!(list("CLIENT LIST foo"), Err("ERR syntax error".to_string()));
    }
}
