//! The sidecar's client connections as `CLIENT LIST`, `CLIENT INFO` and
//! `CLIENT KILL` see them. To an application the sidecar is its Redis
//! server, so these commands describe the sidecar's clients, not the
//! upstream nodes' (whose clients are the sidecar's own shared
//! connections).
//!
//! A line has every field of Redis 7.0's, in its order. Live: `id`, `addr`,
//! `laddr`, `fd`, `name`, `age`, `idle` (since the client's last read),
//! `flags` (`N`; `P` subscribed, `x` in `MULTI`, `t` tracking, `B` in
//! `BCAST` mode, `e` no-evict, in Redis's order), `sub` (channels and
//! patterns together, as the sidecar's subscription link counts them),
//! `ssub`, `multi`, `cmd` (the last command, without its subcommand),
//! `redir` (0 while tracking: its pushes go to its own connection) and
//! `resp`. The buffer fields Redis keeps per client (`qbuf`, `obl`,
//! `omem`, `tot-mem` …) are 0 here: the sidecar's buffers are not Redis's.
//!
//! This module does no I/O; the connection loop registers a client and
//! watches its kill signal, the router updates what changes.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;

use crate::lock;
use crate::stop::Stop;

const TRACKING_OFF: u8 = 0;
const TRACKING_ON: u8 = 1;
const TRACKING_BCAST: u8 = 2;

/// Every client connection of the sidecar, by id.
#[derive(Debug, Default)]
pub struct Clients {
    by_id: Mutex<BTreeMap<u64, Arc<Client>>>,
}

/// What `CLIENT LIST` shows of one connection.
#[derive(Debug)]
pub struct Client {
    pub id: u64,
    addr: String,
    laddr: String,
    fd: i64,
    connected: Instant,
    /// Seconds from `connected` to the client's last read (`idle` is
    /// shown in seconds; a read costs a subtraction and a store).
    active_s: AtomicU64,
    /// The last command's table id plus one (0: none yet).
    cmd: AtomicUsize,
    name: Mutex<Option<Bytes>>,
    resp: AtomicU8,
    /// Commands queued since `MULTI`, or -1.
    multi: AtomicI64,
    /// Ordinary channels and patterns subscribed, and shard channels.
    sub: AtomicI64,
    ssub: AtomicI64,
    /// `CLIENT TRACKING`: off, on, or on in `BCAST` mode.
    tracking: AtomicU8,
    /// `CLIENT NO-EVICT on`.
    no_evict: AtomicBool,
    /// `CLIENT KILL`: the connection loop stops when it fires.
    pub kill: Arc<Stop>,
}

/// Removes its client from the registry when the connection ends.
#[derive(Debug)]
pub struct Registered {
    clients: Arc<Clients>,
    pub client: Arc<Client>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        lock(&self.clients.by_id).remove(&self.client.id);
    }
}

impl Clients {
    /// Record a new connection (`fd` -1 when unknown).
    pub fn register(
        self: &Arc<Self>,
        id: u64,
        addr: Option<SocketAddr>,
        laddr: Option<SocketAddr>,
        fd: i64,
    ) -> Registered {
        let shown = |a: Option<SocketAddr>| a.map(|a| a.to_string()).unwrap_or_default();
        let client = Arc::new(Client {
            id,
            addr: shown(addr),
            laddr: shown(laddr),
            fd,
            connected: Instant::now(),
            active_s: AtomicU64::new(0),
            cmd: AtomicUsize::new(0),
            name: Mutex::new(None),
            resp: AtomicU8::new(2),
            multi: AtomicI64::new(-1),
            sub: AtomicI64::new(0),
            ssub: AtomicI64::new(0),
            tracking: AtomicU8::new(TRACKING_OFF),
            no_evict: AtomicBool::new(false),
            kill: Stop::new(),
        });
        lock(&self.by_id).insert(id, client.clone());
        Registered {
            clients: self.clone(),
            client,
        }
    }

    /// Every client, by id.
    pub fn all(&self) -> Vec<Arc<Client>> {
        lock(&self.by_id).values().cloned().collect()
    }

    /// How many clients there are.
    pub fn len(&self) -> usize {
        lock(&self.by_id).len()
    }

    pub fn is_empty(&self) -> bool {
        lock(&self.by_id).is_empty()
    }
}

impl Client {
    /// The client read something at `now`.
    pub fn active(&self, now: Instant) {
        let s = now.saturating_duration_since(self.connected).as_secs();
        self.active_s.store(s, Ordering::Relaxed);
    }

    /// The client's latest command (its table id).
    pub fn command(&self, id: usize) {
        self.cmd.store(id + 1, Ordering::Relaxed);
    }

    /// What the client's session says now: name, protocol, `MULTI` queue.
    pub fn session(&self, name: Option<&Bytes>, resp: u8, queued: Option<usize>) {
        *lock(&self.name) = name.cloned();
        self.resp.store(resp, Ordering::Relaxed);
        let multi = queued.map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX));
        self.multi.store(multi, Ordering::Relaxed);
    }

    /// Whether it tracks (`CLIENT TRACKING`), and in `BCAST` mode.
    pub fn tracking(&self, on: bool, bcast: bool) {
        let mode = match (on, bcast) {
            (false, _) => TRACKING_OFF,
            (true, false) => TRACKING_ON,
            (true, true) => TRACKING_BCAST,
        };
        self.tracking.store(mode, Ordering::Relaxed);
    }

    pub fn no_evict(&self, on: bool) {
        self.no_evict.store(on, Ordering::Relaxed);
    }

    /// Its subscription counts, as the last confirmations said.
    pub fn subscriptions(&self, sub: i64, ssub: i64) {
        self.sub.store(sub, Ordering::Relaxed);
        self.ssub.store(ssub, Ordering::Relaxed);
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn laddr(&self) -> &str {
        &self.laddr
    }

    pub fn subscribed(&self) -> bool {
        self.sub.load(Ordering::Relaxed) > 0 || self.ssub.load(Ordering::Relaxed) > 0
    }

    /// Seconds since it connected.
    pub fn age(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.connected).as_secs()
    }

    /// Its `CLIENT LIST` line (without the newline); `cmd` names the last
    /// command from its table id.
    pub fn line(&self, now: Instant, cmd: impl Fn(usize) -> Option<&'static str>) -> String {
        let idle = self
            .age(now)
            .saturating_sub(self.active_s.load(Ordering::Relaxed));
        let multi = self.multi.load(Ordering::Relaxed);
        let (sub, ssub) = (
            self.sub.load(Ordering::Relaxed),
            self.ssub.load(Ordering::Relaxed),
        );
        let tracking = self.tracking.load(Ordering::Relaxed);
        let mut flags = String::new();
        if sub > 0 || ssub > 0 {
            flags.push('P');
        }
        if multi >= 0 {
            flags.push('x');
        }
        if tracking != TRACKING_OFF {
            flags.push('t');
        }
        if tracking == TRACKING_BCAST {
            flags.push('B');
        }
        if self.no_evict.load(Ordering::Relaxed) {
            flags.push('e');
        }
        if flags.is_empty() {
            flags.push('N');
        }
        let name = lock(&self.name)
            .as_ref()
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .unwrap_or_default();
        let cmd = match self.cmd.load(Ordering::Relaxed) {
            0 => "NULL",
            id => cmd(id - 1).unwrap_or("NULL"),
        };
        let redir = if tracking == TRACKING_OFF { -1 } else { 0 };
        let mut s = String::with_capacity(320);
        let _ = write!(
            s,
            "id={} addr={} laddr={} fd={} name={name} age={} idle={idle} flags={flags} db=0 \
             sub={sub} psub=0 ssub={ssub} multi={multi} qbuf=0 qbuf-free=0 argv-mem=0 multi-mem=0 \
             rbs=0 rbp=0 obl=0 oll=0 omem=0 tot-mem=0 events=r cmd={cmd} user=default redir={redir} resp={}",
            self.id,
            self.addr,
            self.laddr,
            self.fd,
            self.age(now),
            self.resp.load(Ordering::Relaxed),
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(line: &str) -> Vec<(&str, &str)> {
        line.split(' ').filter_map(|f| f.split_once('=')).collect()
    }

    #[test]
    fn a_line_has_redis_fields_in_redis_order_and_the_clients_state() {
        let clients = Arc::new(Clients::default());
        let addr: SocketAddr = "127.0.0.1:5000".parse().unwrap_or_else(|_| unreachable!());
        let reg = clients.register(7, Some(addr), None, 12);
        let c = &reg.client;
        c.command(3);
        c.session(Some(&Bytes::from_static(b"worker")), 3, Some(2));
        c.subscriptions(1, 0);
        let line = c.line(Instant::now(), |id| (id == 3).then_some("get"));
        let got = fields(&line);
        let names: Vec<&str> = got.iter().map(|(k, _)| *k).collect();
        // As redis-server 7.0.15 prints them.
        let redis = "id addr laddr fd name age idle flags db sub psub ssub multi qbuf qbuf-free \
                     argv-mem multi-mem rbs rbp obl oll omem tot-mem events cmd user redir resp";
        assert_eq!(names, redis.split(' ').collect::<Vec<_>>());
        let value = |k: &str| got.iter().find(|(n, _)| *n == k).map(|(_, v)| *v);
        assert_eq!(value("id"), Some("7"));
        assert_eq!(value("addr"), Some("127.0.0.1:5000"));
        assert_eq!(value("fd"), Some("12"));
        assert_eq!(value("name"), Some("worker"));
        // Redis's order: redis-server 7.0.15 shows `flags=Px` here.
        assert_eq!(value("flags"), Some("Px"));
        assert_eq!(value("redir"), Some("-1"));
        assert_eq!(value("multi"), Some("2"));
        assert_eq!(value("sub"), Some("1"));
        assert_eq!(value("cmd"), Some("get"));
        assert_eq!(value("resp"), Some("3"));
        // `flags=PxtB redir=0` from redis-server 7.0.15 after `CLIENT
        // TRACKING on bcast`, `SUBSCRIBE a`, `MULTI`.
        c.tracking(true, true);
        let line = c.line(Instant::now(), |_| None);
        assert!(line.contains(" flags=PxtB "), "{line}");
        assert!(line.contains(" redir=0 "), "{line}");
        c.tracking(true, false);
        assert!(c.line(Instant::now(), |_| None).contains(" flags=Pxt "));
        // `flags=xe` from redis-server 7.0.15 after `CLIENT NO-EVICT on`,
        // `MULTI`.
        c.tracking(false, false);
        c.subscriptions(0, 0);
        c.no_evict(true);
        assert!(c.line(Instant::now(), |_| None).contains(" flags=xe "));
        assert_eq!(clients.all().len(), 1);
        drop(reg);
        assert!(clients.all().is_empty(), "a closed connection leaves the list");
    }
}
