//! `CLIENT` subcommands: the connection's own name and id, and `LIST`,
//! `INFO` and `KILL` over the sidecar's client connections (`clients.rs`),
//! with Redis's arguments and errors.

use std::time::Instant;

use super::*;
use crate::clients::Client;
use crate::session::ReplyMode;

/// What a `CLIENT` subcommand does to the connection.
pub(super) enum ClientReply {
    Reply(Bytes),
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
                Some("ON" | "OFF") => ok(),
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
            // Client-side caching (node-redis's clientSideCache, redis-py's
            // cache_config…) cannot be turned on: the nodes track the
            // sidecar's shared connections, not this client. Otherwise
            // answered as by a server whose client has tracking off.
            "TRACKING" => match tracking_off(&args[2..]) {
                Ok(true) => ok(),
                Ok(false) => err(
                    "ERR cachetier: CLIENT TRACKING (client-side caching) is not supported through the sidecar; \
                     its local cache (the CacheTier's spec.sidecar.localCache) keeps hot keys next to the application instead",
                ),
                Err(e) => err(e),
            },
            "TRACKINGINFO" => {
                let flags = vec![bulk("off")];
                let fields = [
                    (
                        bulk("flags"),
                        if proto == 3 {
                            Frame::Set(flags)
                        } else {
                            Frame::Array(flags)
                        },
                    ),
                    (bulk("redirect"), Frame::Integer(-1)),
                    (bulk("prefixes"), Frame::Array(Vec::new())),
                ];
                encode(&if proto == 3 {
                    Frame::Map(fields.into())
                } else {
                    Frame::Array(fields.into_iter().flat_map(|(k, v)| [k, v]).collect())
                })
            }
            "GETREDIR" => encode(&Frame::Integer(-1)),
            "CACHING" => err(
                "ERR CLIENT CACHING can be called only when the client is in tracking mode with OPTIN or OPTOUT mode enabled",
            ),
            _ => err(format!(
                "ERR cachetier: CLIENT {sub} is not supported by the sidecar"
            )),
        };
        ClientReply::Reply(reply)
    }

    /// `c`'s `CLIENT LIST` line; the asking client's own shows this command.
    fn line_of(&self, st: &ClientState, c: &Client, this_cmd: &'static str) -> String {
        if c.id == st.id {
            c.session(st.session.name.as_ref(), st.session.proto, st.session.queued());
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

/// `CLIENT TRACKING ON|OFF [option …]`'s words checked as Redis checks
/// them: `Ok(true)` for `OFF`, `Ok(false)` for `ON`.
fn tracking_off(args: &[Bytes]) -> Result<bool, &'static str> {
    let syntax = "ERR syntax error";
    let off = match args.first().map(|a| upper(a)).as_deref() {
        Some("ON") => false,
        Some("OFF") => true,
        _ => return Err(syntax),
    };
    let mut rest = args[1..].iter();
    while let Some(option) = rest.next() {
        match upper(option).as_str() {
            "BCAST" | "OPTIN" | "OPTOUT" | "NOLOOP" => {}
            "REDIRECT" | "PREFIX" if rest.next().is_some() => {}
            _ => return Err(syntax),
        }
    }
    Ok(off)
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
