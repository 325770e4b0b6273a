//! A blocking pop whose keys span slots (`BLPOP`, `BRPOP`, `BLMPOP`,
//! `BZPOPMIN`, `BZPOPMAX`, `BZMPOP`), which one Redis server runs and Redis
//! Cluster refuses with `CROSSSLOT`. Job queues wait on several lists at
//! once and their names hash to different slots: a Celery worker's
//! `BRPOP celery celery\x06\x163 …` (its priority steps), an RQ worker's
//! `BLPOP rq:queue:high rq:queue:default`.
//!
//! One server tries the keys in order and pops from the first that holds
//! elements (or answers `WRONGTYPE` for the first one of another type);
//! when none holds any, it blocks until one gets some or the timeout
//! passes. Here:
//!
//! 1. Each key, in order, is tried on its primary with the command itself
//!    for that key alone, inside `MULTI`/`EXEC`: a blocking command in a
//!    transaction does not block, it pops or answers nil in the command's
//!    own reply form, and Redis checks the arguments and the key's type. The
//!    first pop or error is the reply.
//! 2. None held an element: the command for the first key alone blocks on
//!    the client's blocking connection for at most [`ROUND`] (an element
//!    pushed to that key wakes it at once, as on one server), then the other
//!    keys are tried again as in 1; and so on until the client's timeout.
//!
//! Each try pops at most one key of one node, so nothing is taken that the
//! client is not given. An element pushed to a key other than the first is
//! found within [`ROUND`]; queue readers list their default or highest
//! priority queue first. What one server gives and this does not: the
//! wait is not one atomic step over all keys (an element pushed to a later
//! key between two tries may be served after one pushed to an earlier key
//! later), and clients blocked on several nodes are not served strictly in
//! the order they blocked.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::Router;
use crate::blocking::BlockingCell;
use crate::slot;
use crate::upstream::Proto;

/// The longest the first key is waited on before the other keys are tried
/// again.
pub const ROUND: Duration = Duration::from_millis(100);

/// The shortest wait worth sending: Redis reads a timeout of `0` as "for
/// ever", so a shorter remainder ends the wait instead.
const MIN_WAIT: Duration = Duration::from_millis(1);

/// A client's timeout taken in waits of at most [`ROUND`].
pub(super) struct Rounds {
    /// `None`: for ever (a timeout past what an Instant holds too).
    deadline: Option<Instant>,
}

impl Rounds {
    /// `block`: the client's timeout (`None`: for ever).
    pub(super) fn new(block: Option<Duration>) -> Rounds {
        Rounds {
            deadline: block.and_then(|b| Instant::now().checked_add(b)),
        }
    }

    /// The next wait; `None` once the timeout has passed.
    pub(super) fn next(&self) -> Option<Duration> {
        let wait = match self.deadline {
            Some(d) => d.saturating_duration_since(Instant::now()).min(ROUND),
            None => ROUND,
        };
        (wait >= MIN_WAIT).then_some(wait)
    }
}

/// The command with one key of a blocking pop, and the key's place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PopForm {
    name: Bytes,
    /// The arguments before the keys (the timeout and a numkeys, for
    /// `BLMPOP`/`BZMPOP`), without the command name.
    before: Vec<Bytes>,
    /// The arguments after the keys (the timeout of `BLPOP`; the direction
    /// and `COUNT` of `BLMPOP`).
    after: Vec<Bytes>,
    /// Where the timeout is: in `before` (true) or `after` (false).
    timeout_first: bool,
}

impl PopForm {
    /// The form of a blocking pop with keys at `keys` (contiguous, as
    /// [`crate::commands::key_indices`] finds them); `None` for a command that
    /// is not a pop (`BLMOVE`, `XREAD`: they stay refused across slots).
    pub(super) fn of(name: &str, args: &[Bytes], keys: &[usize]) -> Option<PopForm> {
        let (&first, &last) = (keys.first()?, keys.last()?);
        if last + 1 - first != keys.len() || last >= args.len() {
            return None;
        }
        let timeout_first = match name {
            "blpop" | "brpop" | "bzpopmin" | "bzpopmax" => false,
            "blmpop" | "bzmpop" => true,
            _ => return None,
        };
        let mut before = args[1..first].to_vec();
        if timeout_first {
            // TIMEOUT NUMKEYS: one key now. A numkeys Redis would refuse
            // (`02`, `+2`) or a missing direction is left to
            // [`PopForm::refusal`].
            let numkeys = before.get_mut(1)?;
            *numkeys = Bytes::from_static(b"1");
        }
        Some(PopForm {
            name: args[0].clone(),
            before,
            after: args[last + 1..].to_vec(),
            timeout_first,
        })
    }

    /// What one server answers a pop whose arguments the single-key form
    /// would change the meaning of: a numkeys Redis does not read as a
    /// number (`02`, `+2`: the form names `1`), or no direction after the
    /// keys (the form would fail on its arity instead).
    pub(super) fn refusal(args: &[Bytes], form: &PopForm) -> Option<Bytes> {
        if !form.timeout_first {
            return None;
        }
        let numkeys = args.get(2)?;
        let canonical = numkeys.first().is_some_and(|&d| (b'1'..=b'9').contains(&d))
            && numkeys.iter().all(u8::is_ascii_digit);
        if !canonical {
            return Some(super::err("ERR numkeys should be greater than 0"));
        }
        form.after.is_empty().then(|| super::err("ERR syntax error"))
    }

    /// The command for `key` alone; `timeout` replaces the client's when
    /// given.
    fn for_key(&self, key: &Bytes, timeout: Option<Bytes>) -> Vec<Bytes> {
        let mut cmd = Vec::with_capacity(self.before.len() + self.after.len() + 2);
        cmd.push(self.name.clone());
        cmd.extend(self.before.iter().cloned());
        cmd.push(key.clone());
        cmd.extend(self.after.iter().cloned());
        if let Some(t) = timeout {
            let at = if self.timeout_first { 1 } else { cmd.len() - 1 };
            cmd[at] = t;
        }
        cmd
    }
}

/// A wait in seconds as Redis reads a timeout (`0.1`).
fn seconds(wait: Duration) -> Bytes {
    Bytes::from(format!("{:.3}", wait.as_secs_f64()))
}

/// Whether a pop's reply is its nil ("nothing to pop"), in RESP2 or 3.
fn is_nil(reply: &[u8]) -> bool {
    matches!(reply, b"*-1\r\n" | b"$-1\r\n" | b"_\r\n")
}

/// The one reply in an `EXEC` of one command (`*1\r\n<reply>`); for a
/// command refused when queued, its own error (not the `EXECABORT`).
fn only_reply(exec: Bytes) -> Bytes {
    if let Some(rest) = exec.strip_prefix(b"*1\r\n") {
        return exec.slice(exec.len() - rest.len()..);
    }
    queued_error(exec)
}

/// For an `EXEC` refused because a command was refused when queued, that
/// command's own error; any other reply as it is.
pub(super) fn queued_error(exec: Bytes) -> Bytes {
    const ABORT: &[u8] = b"-EXECABORT Transaction discarded because of previous errors: ";
    match exec.strip_prefix(ABORT) {
        Some(why) if !why.is_empty() && why != b"\r\n" => {
            let mut out = Vec::with_capacity(why.len() + 1);
            out.push(b'-');
            out.extend_from_slice(why);
            Bytes::from(out)
        }
        _ => exec,
    }
}

/// Whether a reply is `WRONGTYPE`.
fn is_wrong_type(reply: &[u8]) -> bool {
    reply.starts_with(b"-WRONGTYPE")
}

impl Router {
    /// Run a blocking pop whose `keys` (indices into `args`) span slots;
    /// `block` is the client's timeout (`None`: for ever).
    pub(super) async fn pop_across_slots(
        self: &Arc<Self>,
        form: PopForm,
        args: &[Bytes],
        keys: &[usize],
        block: Option<Duration>,
        cell: &BlockingCell,
        up: Proto,
    ) -> Bytes {
        if let Some(refusal) = PopForm::refusal(args, &form) {
            return refusal;
        }
        self.metrics.pops_across_slots.inc();
        let keys: Vec<&Bytes> = keys.iter().map(|&i| &args[i]).collect();
        let Some((first, rest)) = keys.split_first() else {
            return super::err("ERR wrong number of arguments for a blocking pop");
        };
        // The first try words any argument error (a negative timeout), and
        // answers WRONGTYPE for a key of another type, as one server does
        // before it blocks.
        let mut nil = match self.try_keys(&form, &keys, false, super::nil_array(up), up).await {
            Ok(reply) => return reply,
            Err(nil) => nil,
        };
        let rounds = Rounds::new(block);
        loop {
            let Some(wait) = rounds.next() else {
                return nil;
            };
            let cmd = crate::resp::command_bytes(&form.for_key(first, Some(seconds(wait))));
            let reply = self.blocking(cell, slot::slot(first), cmd, Some(wait), up).await;
            if is_wrong_type(&reply) {
                // A blocked client waits on, whatever type a key took since.
                tokio::time::sleep(wait).await;
            } else if !is_nil(&reply) {
                return reply;
            }
            nil = match self.try_keys(&form, rest, true, nil, up).await {
                Ok(reply) => return reply,
                Err(nil) => nil,
            };
        }
    }

    /// Try `keys` in order without blocking: the first pop or error, or
    /// (`Err`) the nil the last one answered (`nil` if none did).
    /// `waiting`: the client is past its first try, where a key of another
    /// type is not ready rather than an error.
    async fn try_keys(
        self: &Arc<Self>,
        form: &PopForm,
        keys: &[&Bytes],
        waiting: bool,
        mut nil: Bytes,
        up: Proto,
    ) -> Result<Bytes, Bytes> {
        for key in keys {
            let cmd = form.for_key(key, None);
            let reply = only_reply(self.exec_block(&[cmd], Some(slot::slot(key)), up).await);
            if waiting && is_wrong_type(&reply) {
                continue;
            }
            if !is_nil(&reply) {
                return Ok(reply);
            }
            nil = reply;
        }
        Err(nil)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::args;

    fn text(cmd: Vec<Bytes>) -> Vec<String> {
        cmd.iter()
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect()
    }

    #[test]
    fn a_pop_with_its_timeout_last_keeps_it_for_each_key() {
        let a = args(&["BRPOP", "q1", "q2", "5"]);
        let form = PopForm::of("brpop", &a, &[1, 2]).expect("a pop");
        assert_eq!(text(form.for_key(&a[2], None)), ["BRPOP", "q2", "5"]);
        assert_eq!(
            text(form.for_key(&a[1], Some(seconds(ROUND)))),
            ["BRPOP", "q1", "0.100"]
        );
    }

    #[test]
    fn an_mpop_names_one_key_and_keeps_its_direction_and_count() {
        let a = args(&["BLMPOP", "2.5", "2", "q1", "q2", "LEFT", "COUNT", "3"]);
        let form = PopForm::of("blmpop", &a, &[3, 4]).expect("a pop");
        assert_eq!(
            text(form.for_key(&a[4], None)),
            ["BLMPOP", "2.5", "1", "q2", "LEFT", "COUNT", "3"]
        );
        assert_eq!(
            text(form.for_key(&a[3], Some(seconds(Duration::from_millis(7))))),
            ["BLMPOP", "0.007", "1", "q1", "LEFT", "COUNT", "3"]
        );
    }

    #[test]
    fn moves_and_stream_reads_are_not_pops() {
        let a = args(&["BLMOVE", "a", "b", "LEFT", "RIGHT", "0"]);
        assert_eq!(PopForm::of("blmove", &a, &[1, 2]), None);
        let x = args(&["XREAD", "BLOCK", "0", "STREAMS", "a", "b", "$", "$"]);
        assert_eq!(PopForm::of("xread", &x, &[4, 5]), None);
    }

    #[test]
    fn an_mpop_whose_single_key_form_would_change_its_meaning_is_refused_as_redis_does() {
        let refusal = |words: &[&str], keys: &[usize]| {
            let a = args(words);
            let form = PopForm::of(&words[0].to_lowercase(), &a, keys).expect("a pop");
            PopForm::refusal(&a, &form).map(|e| String::from_utf8_lossy(&e).into_owned())
        };
        let numkeys = Some("-ERR numkeys should be greater than 0\r\n".to_string());
        assert_eq!(
            refusal(&["BLMPOP", "1", "02", "a", "b", "LEFT"], &[3, 4]),
            numkeys
        );
        assert_eq!(refusal(&["BZMPOP", "1", "+2", "a", "b", "MIN"], &[3, 4]), numkeys);
        let syntax = Some("-ERR syntax error\r\n".to_string());
        assert_eq!(refusal(&["BLMPOP", "1", "2", "a", "b"], &[3, 4]), syntax);
        assert_eq!(refusal(&["BLMPOP", "1", "2", "a", "b", "LEFT"], &[3, 4]), None);
        assert_eq!(refusal(&["BRPOP", "a", "b", "1"], &[1, 2]), None);
    }

    #[test]
    fn the_reply_in_an_exec_of_one_command_is_its_own() {
        let exec = Bytes::from_static(b"*1\r\n*2\r\n$1\r\nq\r\n$1\r\nv\r\n");
        assert_eq!(&only_reply(exec)[..], b"*2\r\n$1\r\nq\r\n$1\r\nv\r\n");
        assert!(is_nil(&only_reply(Bytes::from_static(b"*1\r\n*-1\r\n"))));
        assert!(is_nil(&only_reply(Bytes::from_static(b"*1\r\n_\r\n"))));
        let abort = Bytes::from_static(b"-EXECABORT Transaction discarded\r\n");
        assert_eq!(only_reply(abort.clone()), abort);
        let queued = Bytes::from_static(
            b"-EXECABORT Transaction discarded because of previous errors: ERR syntax error\r\n",
        );
        assert_eq!(&only_reply(queued)[..], b"-ERR syntax error\r\n");
    }
}
