//! A client session's own state machine, without I/O: its protocol and
//! name (`HELLO`, `CLIENT SETNAME`, `RESET`) and its `MULTI` block. The
//! router asks it what a command means in the current state and tells it
//! what happened; everything that talks to Redis (the WATCH connection,
//! subscriptions, blocking commands) lives elsewhere.

use bytes::Bytes;

/// What a queued argument costs beyond its bytes (its `Bytes`, its slot).
const ARG_BYTES: usize = 40;

/// What a client's connection remembers between commands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// 2 or 3 (`HELLO`).
    pub proto: u8,
    /// `CLIENT SETNAME` / `HELLO … SETNAME`.
    pub name: Option<Bytes>,
    /// Commands queued since `MULTI`.
    multi: Option<Vec<Vec<Bytes>>>,
    /// A command queued inside `MULTI` was refused: `EXEC` must abort.
    multi_failed: bool,
    /// What the queued commands hold, about (bounded by `queue`'s limit).
    multi_bytes: usize,
    /// Commands queued before any refusal (`CLIENT LIST`'s `multi=`, as
    /// Redis counts them), kept or let go.
    multi_len: usize,
    /// `CLIENT REPLY OFF`: no replies until `CLIENT REPLY ON`.
    replies_off: bool,
    /// `CLIENT REPLY SKIP`: the reply to the command after it is dropped
    /// (`skip_next` while the `SKIP` itself is handled, then `skip`).
    skip: bool,
    skip_next: bool,
}

impl Default for Session {
    fn default() -> Self {
        Self {
            proto: 2,
            name: None,
            multi: None,
            multi_failed: false,
            multi_bytes: 0,
            multi_len: 0,
            replies_off: false,
            skip: false,
            skip_next: false,
        }
    }
}

/// A `CLIENT REPLY` mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyMode {
    On,
    Off,
    Skip,
}

/// What `EXEC` does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exec {
    /// No `MULTI` before it.
    NotInMulti,
    /// A queued command was refused: Redis's `EXECABORT`.
    Aborted,
    /// Run these commands as one transaction.
    Run(Vec<Vec<Bytes>>),
}

/// A parsed `HELLO [protover [AUTH user pass] [SETNAME name]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The protocol asked for, if any.
    pub proto: Option<u8>,
    /// `AUTH user password`, checked before anything changes.
    pub auth: Option<(Bytes, Bytes)>,
    /// `SETNAME name`.
    pub name: Option<Bytes>,
}

impl Session {
    /// Inside a `MULTI` block.
    pub fn in_multi(&self) -> bool {
        self.multi.is_some()
    }

    /// How many commands are queued, inside a `MULTI` block.
    pub fn queued(&self) -> Option<usize> {
        self.multi.as_ref().map(|_| self.multi_len)
    }

    /// The commands queued so far (none outside a block).
    pub fn queued_commands(&self) -> &[Vec<Bytes>] {
        self.multi.as_deref().unwrap_or_default()
    }

    /// `MULTI`: starts a block, or Redis's error for a nested one.
    pub fn multi(&mut self) -> Result<(), &'static str> {
        if self.in_multi() {
            return Err("ERR MULTI calls can not be nested");
        }
        self.multi = Some(Vec::new());
        self.multi_failed = false;
        self.multi_bytes = 0;
        self.multi_len = 0;
        Ok(())
    }

    /// A command accepted into the block (`+QUEUED`), unless the block
    /// would hold more than `limit` bytes: then (false) it is refused, the
    /// commands queued so far are let go, and `EXEC` will abort. A block
    /// that will abort keeps nothing more.
    pub fn queue(&mut self, args: Vec<Bytes>, limit: usize) -> bool {
        let size: usize = args.iter().map(|a| a.len() + ARG_BYTES).sum();
        let failed = self.multi_failed;
        let Some(q) = self.multi.as_mut() else {
            return true;
        };
        if failed {
            return true;
        }
        self.multi_bytes = self.multi_bytes.saturating_add(size);
        if self.multi_bytes > limit {
            *q = Vec::new();
            self.multi_failed = true;
            return false;
        }
        q.push(args);
        self.multi_len += 1;
        true
    }

    /// A command refused inside the block: the block will abort.
    pub fn refuse_queued(&mut self) {
        if self.in_multi() {
            self.multi_failed = true;
        }
    }

    /// `EXEC`: ends the block.
    pub fn exec(&mut self) -> Exec {
        let failed = std::mem::take(&mut self.multi_failed);
        match self.multi.take() {
            None => Exec::NotInMulti,
            Some(_) if failed => Exec::Aborted,
            Some(cmds) => Exec::Run(cmds),
        }
    }

    /// `DISCARD`: ends the block; false when there was none.
    pub fn discard(&mut self) -> bool {
        self.multi_failed = false;
        self.multi.take().is_some()
    }

    /// `CLIENT REPLY` (its own reply is `+OK` for `ON`, none otherwise).
    pub fn set_replies(&mut self, mode: ReplyMode) {
        match mode {
            ReplyMode::On => {
                self.replies_off = false;
                self.skip = false;
            }
            ReplyMode::Off => self.replies_off = true,
            // As in Redis, SKIP does nothing while replies are off.
            ReplyMode::Skip => self.skip_next |= !self.replies_off,
        }
    }

    /// Called once per command handled, after it was: whether its reply is
    /// dropped (`CLIENT REPLY OFF`, or the command after a `SKIP`).
    #[inline]
    pub fn silenced(&mut self) -> bool {
        let silent = self.replies_off || self.skip;
        self.skip = std::mem::take(&mut self.skip_next);
        silent
    }

    /// Whether replies are dropped now (`CLIENT REPLY OFF`, or a `SKIP`
    /// in force), without using the `SKIP` up.
    pub fn quiet(&self) -> bool {
        self.replies_off || self.skip
    }

    /// `RESET`: back to a new connection's state; as in Redis, a `SKIP` in
    /// force still drops `RESET`'s own reply.
    pub fn reset(&mut self) {
        *self = Self {
            skip: self.skip,
            ..Self::default()
        };
    }

    /// Applies a `HELLO` whose `AUTH` (if any) succeeded; a name Redis
    /// would refuse changes nothing.
    pub fn hello(&mut self, hello: Hello) -> Result<(), &'static str> {
        if let Some(name) = &hello.name {
            check_name(name)?;
        }
        if let Some(p) = hello.proto {
            self.proto = p;
        }
        if let Some(name) = &hello.name {
            self.store_name(name);
        }
        Ok(())
    }

    /// `CLIENT SETNAME`.
    pub fn set_name(&mut self, name: &[u8]) -> Result<(), &'static str> {
        check_name(name)?;
        self.store_name(name);
        Ok(())
    }

    /// An empty name clears it. Copied, not a slice of the client's read
    /// buffer, which it would keep alive for the connection's life.
    fn store_name(&mut self, name: &[u8]) {
        self.name = (!name.is_empty()).then(|| Bytes::copy_from_slice(name));
    }
}

/// Redis's rule for a client name (`CLIENT SETNAME`, `HELLO … SETNAME`):
/// printable ASCII without spaces (`!` to `~`); an empty name clears it.
fn check_name(name: &[u8]) -> Result<(), &'static str> {
    if name.iter().all(|b| (b'!'..=b'~').contains(b)) {
        Ok(())
    } else {
        Err("ERR Client names cannot contain spaces, newlines or special characters.")
    }
}

/// Parses `HELLO`'s arguments (after the command name) with Redis's errors;
/// nothing changes until the caller has checked `auth` and applied it.
pub fn parse_hello(args: &[Bytes]) -> Result<Hello, String> {
    let mut hello = Hello {
        proto: None,
        auth: None,
        name: None,
    };
    let mut rest = args;
    if let Some((v, tail)) = rest.split_first() {
        hello.proto = Some(match crate::resp::int_arg(v) {
            Some(2) => 2,
            Some(3) => 3,
            Some(_) => return Err("NOPROTO unsupported protocol version".into()),
            None => return Err("ERR Protocol version is not an integer or out of range".into()),
        });
        rest = tail;
    }
    while let Some((option, tail)) = rest.split_first() {
        match (option.to_ascii_uppercase().as_slice(), tail) {
            (b"SETNAME", [name, more @ ..]) => {
                hello.name = Some(name.clone());
                rest = more;
            }
            (b"AUTH", [user, pass, more @ ..]) => {
                hello.auth = Some((user.clone(), pass.clone()));
                rest = more;
            }
            _ => {
                return Err(format!(
                    "ERR Syntax error in HELLO option '{}'",
                    String::from_utf8_lossy(option)
                        .chars()
                        .take(128)
                        .collect::<String>()
                ));
            }
        }
    }
    Ok(hello)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transaction_past_the_limit_lets_its_commands_go_and_aborts() {
        let mut s = Session::default();
        s.multi().unwrap();
        let cmd = || vec![Bytes::from_static(b"SET"), Bytes::from(vec![b'v'; 100])];
        assert!(s.queue(cmd(), 1000));
        assert_eq!(s.queued(), Some(1));
        let mut refused = 0;
        for _ in 0..20 {
            refused += usize::from(!s.queue(cmd(), 1000));
        }
        assert_eq!(refused, 1, "refused once, then nothing more is kept");
        assert_eq!(s.queued_commands().len(), 0);
        assert_eq!(
            s.queued(),
            Some(5),
            "those queued before the refusal, as Redis counts"
        );
        assert_eq!(s.exec(), Exec::Aborted);
        // The next block starts from nothing.
        s.multi().unwrap();
        assert!(s.queue(cmd(), 1000));
    }

    #[test]
    fn client_reply_drops_replies_as_redis_does() {
        let mut s = Session::default();
        // Each step: the mode a command sets (None: any other command),
        // and whether that command's reply is dropped.
        let steps = [
            (None, false),
            (Some(ReplyMode::Skip), false),
            (None, true),
            (None, false),
            (Some(ReplyMode::Skip), false),
            (Some(ReplyMode::Skip), true),
            (None, true),
            (None, false),
            (Some(ReplyMode::Off), true),
            (Some(ReplyMode::Skip), true),
            (None, true),
            (Some(ReplyMode::On), false),
            (None, false),
            (Some(ReplyMode::Off), true),
        ];
        for (i, (mode, dropped)) in steps.into_iter().enumerate() {
            if let Some(m) = mode {
                s.set_replies(m);
            }
            assert_eq!(s.silenced(), dropped, "step {i}");
        }
        s.reset();
        assert!(!s.silenced(), "RESET turns replies on");
        s.set_replies(ReplyMode::Skip);
        assert!(!s.silenced());
        s.reset();
        assert!(s.silenced(), "a SKIP in force drops RESET's reply");
        assert!(!s.silenced());
    }

    fn args(a: &[&str]) -> Vec<Bytes> {
        a.iter().map(|s| Bytes::copy_from_slice(s.as_bytes())).collect()
    }

    #[test]
    fn multi_queues_then_exec_runs_the_block_once() {
        let mut s = Session::default();
        assert_eq!(s.exec(), Exec::NotInMulti);
        s.multi().unwrap();
        assert_eq!(s.multi(), Err("ERR MULTI calls can not be nested"));
        assert!(s.queue(args(&["SET", "k", "v"]), usize::MAX));
        assert!(s.queue(args(&["GET", "k"]), usize::MAX));
        assert_eq!(
            s.exec(),
            Exec::Run(vec![args(&["SET", "k", "v"]), args(&["GET", "k"])])
        );
        assert!(!s.in_multi());
        assert_eq!(s.exec(), Exec::NotInMulti);
    }

    #[test]
    fn a_refused_command_aborts_the_block_and_the_next_block_starts_clean() {
        let mut s = Session::default();
        s.multi().unwrap();
        assert!(s.queue(args(&["SET", "k", "v"]), usize::MAX));
        s.refuse_queued();
        assert_eq!(s.exec(), Exec::Aborted);
        s.multi().unwrap();
        assert!(s.queue(args(&["GET", "k"]), usize::MAX));
        assert_eq!(s.exec(), Exec::Run(vec![args(&["GET", "k"])]));
        // Outside a block a refusal marks nothing.
        s.refuse_queued();
        s.multi().unwrap();
        assert_eq!(s.exec(), Exec::Run(Vec::new()));
    }

    #[test]
    fn discard_ends_a_block_and_says_whether_there_was_one() {
        let mut s = Session::default();
        assert!(!s.discard());
        s.multi().unwrap();
        s.refuse_queued();
        assert!(s.discard());
        s.multi().unwrap();
        assert_eq!(s.exec(), Exec::Run(Vec::new()));
    }

    #[test]
    fn reset_forgets_protocol_name_and_block() {
        let mut s = Session::default();
        s.hello(parse_hello(&args(&["3", "SETNAME", "app"])).unwrap())
            .unwrap();
        s.multi().unwrap();
        s.reset();
        assert_eq!(s, Session::default());
    }

    #[test]
    fn hello_parses_like_redis_and_changes_nothing_by_itself() {
        let h = parse_hello(&args(&["3", "auth", "u", "p", "SETNAME", "n"])).unwrap();
        assert_eq!(h.proto, Some(3));
        assert_eq!(h.auth, Some((Bytes::from("u"), Bytes::from("p"))));
        assert_eq!(h.name, Some(Bytes::from("n")));
        assert_eq!(parse_hello(&[]).unwrap().proto, None);
        // As redis-server 7.0.15 words them.
        let refused = |a: &[&str]| parse_hello(&args(a)).unwrap_err();
        assert_eq!(refused(&["4"]), "NOPROTO unsupported protocol version");
        assert_eq!(
            refused(&["x"]),
            "ERR Protocol version is not an integer or out of range"
        );
        assert_eq!(
            refused(&["03"]),
            "ERR Protocol version is not an integer or out of range"
        );
        assert_eq!(
            refused(&["3", "AUTH", "u"]),
            "ERR Syntax error in HELLO option 'AUTH'"
        );
        assert_eq!(
            refused(&["3", "SETNAME"]),
            "ERR Syntax error in HELLO option 'SETNAME'"
        );
        assert_eq!(refused(&["3", "Foo"]), "ERR Syntax error in HELLO option 'Foo'");
        let mut s = Session::default();
        s.hello(parse_hello(&args(&["3"])).unwrap()).unwrap();
        assert_eq!((s.proto, s.name.clone()), (3, None));
        s.hello(parse_hello(&[]).unwrap()).unwrap();
        assert_eq!(s.proto, 3, "HELLO without a version keeps the protocol");
    }

    #[test]
    fn a_name_redis_refuses_changes_nothing_and_an_empty_one_clears() {
        let mut s = Session::default();
        s.set_name(b"app").unwrap();
        for bad in [&b"a b"[..], b"a\nb", "\u{e9}".as_bytes(), b"x\x7f"] {
            assert!(s.set_name(bad).is_err(), "{bad:?}");
            assert!(
                s.hello(parse_hello(&args(&["3", "SETNAME", "a b"])).unwrap())
                    .is_err()
            );
        }
        assert_eq!((s.proto, s.name.clone()), (2, Some(Bytes::from("app"))));
        s.hello(parse_hello(&args(&["3", "SETNAME", ""])).unwrap())
            .unwrap();
        assert_eq!((s.proto, s.name.clone()), (3, None));
    }
}
