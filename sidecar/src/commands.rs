//! The command table: for every command the sidecar will route, where its keys
//! are and whether it reads or writes.
//!
//! The table is shipped, not discovered: the routing decision must be known
//! before the first upstream connection exists, and a command missing here is
//! answered with a clear error rather than a guessed route. Arity is checked
//! first (`arity.rs`) and Redis checks same-slot rules itself, so a key
//! position this table does not list (for example `GEORADIUS ... STORE dst`)
//! can only produce a Redis error, never a write to the wrong node. The
//! table's entries are in `commands/table.rs`.

use std::sync::LazyLock;
use std::time::Duration;

use bytes::Bytes;

use crate::resp::ArgList;

mod table;
pub(crate) use table::ADMIN;
use table::TABLE;

/// How a command is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Keyed and idempotent: may go to a replica and may be retried once.
    Read,
    /// Keyed and mutating (or unsafe to repeat): always the slot's primary, never retried.
    Write,
    /// Answered by the sidecar itself or fanned out to every primary.
    Server,
    /// Runs on any one primary (no keys, cluster-wide effect).
    AnyPrimary,
    /// Refused with the given reason.
    Unsupported(&'static str),
}

/// Where the keys are in the argument list (index 0 is the command name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySpec {
    None,
    /// Keys from `first` to `last` (negative counts from the end, -1 = last
    /// argument) every `step` arguments.
    Range {
        first: usize,
        last: isize,
        step: usize,
    },
    /// `numkeys` at index `at`, keys right after it (EVAL, ZUNION, LMPOP...).
    Numkeys {
        at: usize,
    },
    /// A destination key at 1, then `numkeys` at 2 and the keys (ZUNIONSTORE...).
    DestNumkeys,
    /// Keys follow the `STREAMS` token and fill the first half of the rest (XREAD).
    Streams,
}

/// Cross-slot handling for the multi-key commands the sidecar splits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Reply arrays are merged back into argument order (MGET).
    Array,
    /// Every part must answer `+OK` (MSET).
    AllOk,
    /// Integer replies are summed (DEL, UNLINK, EXISTS, TOUCH).
    Sum,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandInfo {
    /// Lower-case name, also used as a metric label.
    pub name: &'static str,
    pub kind: Kind,
    pub keys: KeySpec,
    pub split: Option<Split>,
    /// Dense index (0..count()) for per-command metric handles.
    pub id: usize,
    /// Redis 7.0's arity (`arity.rs`), if it has the command.
    pub arity: Option<i32>,
}

/// Reads that run on their key's primary, never a replica: a scan cursor
/// is only meaningful on the node that issued it (each process seeds its
/// hash tables differently), and `TOUCH` exists to refresh the access time
/// that the primary's eviction reads.
pub fn reads_on_primary(name: &str) -> bool {
    matches!(name, "hscan" | "sscan" | "zscan" | "touch")
}

/// Commands known to keep a node busy for long (scripts and functions run
/// as long as they like; `KEYS`, `FLUSHALL`/`FLUSHDB` and `SCRIPT` walk or
/// drop everything): they run on a connection of their own with the slow
/// bound, so they neither trip the watchdog nor fail other clients'
/// requests on the shared connection.
pub fn is_slow(name: &str) -> bool {
    matches!(
        name,
        "eval"
            | "evalsha"
            | "eval_ro"
            | "evalsha_ro"
            | "fcall"
            | "fcall_ro"
            | "keys"
            | "flushall"
            | "flushdb"
            | "script"
    )
}

/// Look a command up by its (case-insensitive) name.
pub fn lookup(name: &[u8]) -> Option<&'static CommandInfo> {
    if name.len() > 32 {
        return None;
    }
    let mut buf = [0u8; 32];
    let lower = &mut buf[..name.len()];
    lower.copy_from_slice(name);
    lower.make_ascii_lowercase();
    let s = std::str::from_utf8(lower).ok()?;
    TABLE.get(s)
}

/// The command a client looked up last, by its exact spelling: a client's
/// pipeline mostly repeats one command, and comparing a few bytes costs
/// much less than hashing the name again.
#[derive(Debug, Default, Clone, Copy)]
pub struct Recent {
    name: [u8; 16],
    len: usize,
    info: Option<&'static CommandInfo>,
}

impl Recent {
    /// [`lookup`], answered from the last hit when the name is spelt alike.
    pub fn lookup(&mut self, name: &[u8]) -> Option<&'static CommandInfo> {
        if let Some(info) = self.info
            && self.len == name.len()
            && self.name[..self.len] == *name
        {
            return Some(info);
        }
        let info = lookup(name)?;
        if let Some(slot) = self.name.get_mut(..name.len()) {
            slot.copy_from_slice(name);
            self.len = name.len();
            self.info = Some(info);
        }
        Some(info)
    }
}

/// Every command in the table.
pub fn all() -> impl Iterator<Item = &'static CommandInfo> {
    TABLE.values()
}

/// The error for a command the sidecar does not know, as redis-server 7.0
/// words it: the name and the first arguments, each cut at a NUL (Redis
/// prints them as C strings), the name at 128 bytes and the arguments once
/// they take 128; CR and LF become spaces. `args` with the name first.
pub fn unknown_command(args: &[impl AsRef<[u8]>]) -> Bytes {
    let c_str = |b: &[u8], max: usize| {
        let b = b.split(|&c| c == 0).next().unwrap_or_default();
        b[..b.len().min(max)].to_vec()
    };
    let name = args.first().map_or_else(Vec::new, |n| c_str(n.as_ref(), 128));
    let mut shown: Vec<u8> = Vec::new();
    for a in args.iter().skip(1) {
        let Some(room) = 128usize.checked_sub(shown.len()).filter(|r| *r > 0) else {
            break;
        };
        shown.push(b'\'');
        shown.extend(c_str(a.as_ref(), room));
        shown.extend_from_slice(b"' ");
    }
    let mut msg = b"ERR unknown command '".to_vec();
    msg.extend(name);
    msg.extend_from_slice(b"', with args beginning with: ");
    msg.extend(shown);
    for b in &mut msg {
        if matches!(*b, b'\r' | b'\n') {
            *b = b' ';
        }
    }
    Bytes::from(msg)
}

/// The error for `argc` arguments (with the name) that do not fit the
/// command's arity, if they do not.
pub fn wrong_arity(info: &CommandInfo, argc: usize) -> Option<String> {
    let arity = info.arity?;
    (!crate::arity::fits(arity, argc))
        .then(|| format!("ERR wrong number of arguments for '{}' command", info.name))
}

/// What Redis checks of any command before its context: that it exists and
/// fits its arity. `args` with the name first.
pub fn refusal(args: &[impl AsRef<[u8]>]) -> Option<Bytes> {
    let name = args.first()?.as_ref();
    match lookup(name) {
        None => Some(unknown_command(args)),
        Some(info) => wrong_arity(info, args.len()).map(Bytes::from),
    }
}

/// Command names by table id.
static NAMES: LazyLock<Vec<&'static str>> = LazyLock::new(|| {
    let mut names = vec![""; count()];
    for c in all() {
        if let Some(n) = names.get_mut(c.id) {
            *n = c.name;
        }
    }
    names
});

/// The name of the command with table id `id`.
pub fn name_of(id: usize) -> Option<&'static str> {
    NAMES.get(id).copied()
}

/// Number of commands the sidecar knows.
pub fn count() -> usize {
    TABLE.len()
}

/// Why key positions could not be extracted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    WrongArity,
}

/// For a command in its blocking form, how long it may block by its own
/// arguments: `Some(None)` for ever (timeout 0), `Some(Some(d))` for `d`;
/// `None` when it does not block. A timeout that does not parse counts as
/// zero seconds bounded: Redis will refuse it at once.
pub fn block_timeout<A: ArgList + ?Sized>(name: &str, args: &A) -> Option<Option<Duration>> {
    let secs = |a: Option<&[u8]>| read_seconds(a.and_then(|a| std::str::from_utf8(a).ok())?);
    let n = args.argc();
    let seconds = match name {
        "blpop" | "brpop" | "bzpopmin" | "bzpopmax" | "brpoplpush" | "blmove" => {
            secs(n.checked_sub(1).and_then(|i| args.arg(i)))
        }
        "blmpop" | "bzmpop" => secs(args.arg(1)),
        "xread" | "xreadgroup" => {
            let at = stream_options(args)?.block?;
            secs(args.arg(at)).map(|ms| ms / 1000.0)
        }
        _ => return None,
    };
    // As Redis reads it: whole milliseconds rounded up, 0 for ever (so a
    // tiny negative one too: Redis's long double makes -0.001 s 0 ms);
    // one it refuses (negative) answers at once. One the sidecar cannot
    // read is not bounded here: Redis answers it at once or, if it reads
    // it, waits as long as it says.
    match seconds.map(|s| (s * 1000.0).ceil()) {
        Some(ms) if (-1.0..=0.0).contains(&ms) => Some(None),
        Some(ms) if ms > 0.0 => Some(Duration::try_from_secs_f64(ms / 1000.0).ok()),
        Some(_) => Some(Some(Duration::ZERO)),
        None => Some(None),
    }
}

/// Where an `XREAD`/`XREADGROUP`'s options end and which `BLOCK` counts,
/// read word by word as Redis reads them (a group or consumer named
/// `block` or `streams` is a name).
#[derive(Debug, PartialEq, Eq)]
struct StreamOptions {
    /// The index of `STREAMS`.
    streams: usize,
    /// The index of the last `BLOCK`'s value.
    block: Option<usize>,
}

fn stream_options<A: ArgList + ?Sized>(args: &A) -> Option<StreamOptions> {
    let word = |i: usize, w: &[u8]| args.arg(i).is_some_and(|a| a.eq_ignore_ascii_case(w));
    let (mut i, mut block) = (1, None);
    while i < args.argc() {
        if word(i, b"streams") {
            return Some(StreamOptions { streams: i, block });
        }
        i += if word(i, b"group") {
            3
        } else if word(i, b"block") {
            block = Some(i + 1);
            2
        } else if word(i, b"count") {
            2
        } else {
            1
        };
    }
    None
}

/// A timeout's seconds as `strtold` reads them: decimal or hexadecimal
/// (`0x10`, `0x1p-3`), with an optional sign; `None` for what it refuses
/// or what is not read here.
fn read_seconds(text: &str) -> Option<f64> {
    let (sign, digits) = match text.strip_prefix('-') {
        Some(rest) => (-1.0, rest),
        None => (1.0, text.strip_prefix('+').unwrap_or(text)),
    };
    let Some(hex) = digits.strip_prefix("0x").or_else(|| digits.strip_prefix("0X")) else {
        let value: f64 = text.parse().ok()?;
        // Below f64's range but above zero for Redis's long double: 1 ms.
        let tiny = value == 0.0
            && text
                .bytes()
                .take_while(|b| !matches!(b, b'e' | b'E'))
                .any(|b| (b'1'..=b'9').contains(&b));
        return Some(if tiny { sign * 1e-6 } else { value });
    };
    let (mantissa, exponent) = match hex.split_once(['p', 'P']) {
        Some((m, e)) => (m, e.parse::<i32>().ok()?),
        None => (hex, 0),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if whole.is_empty() && fraction.is_empty() {
        return None;
    }
    let mut value = 0.0_f64;
    for (i, c) in whole.chars().chain(fraction.chars()).enumerate() {
        let d = c.to_digit(16)?;
        value += f64::from(d) * 16f64.powi(i32::try_from(whole.len()).ok()? - 1 - i32::try_from(i).ok()?);
    }
    Some(sign * value * 2f64.powi(exponent))
}

/// The key indices of a command whose keys are a plain range (GET, SET,
/// HSET, MGET…), as [`key_indices`] finds them, without allocating; `None`
/// for any other key layout or a wrong arity (the general path handles
/// those).
pub fn range_keys<A: ArgList + ?Sized>(
    info: &CommandInfo,
    args: &A,
) -> Option<std::iter::StepBy<std::ops::RangeInclusive<usize>>> {
    let KeySpec::Range { first, last, step } = info.keys else {
        return None;
    };
    let n = args.argc();
    let last = if last < 0 { n as isize + last } else { last };
    if n <= first || last < first as isize || (step > 1 && !(n - first).is_multiple_of(step)) {
        return None;
    }
    Some((first..=(last as usize).min(n - 1)).step_by(step))
}

/// Indices of the key arguments of `args` under `spec`.
pub fn key_indices(info: &CommandInfo, args: &[Bytes]) -> Result<Vec<usize>, KeyError> {
    let n = args.len();
    match info.keys {
        KeySpec::None => Ok(Vec::new()),
        // A key after a subcommand (`MEMORY USAGE k`, `OBJECT ENCODING k`,
        // `XINFO STREAM k`): the subcommand alone names none (`MEMORY
        // STATS`, `OBJECT HELP`), or Redis words what is missing.
        KeySpec::Range { first, .. } if first >= 2 && n <= first => Ok(Vec::new()),
        KeySpec::Range { .. } => range_keys(info, args)
            .map(Iterator::collect)
            .ok_or(KeyError::WrongArity),
        KeySpec::Numkeys { at } => {
            let numkeys = numeric(args.get(at))?;
            if numkeys == 0 {
                // EVAL with no keys: route to any primary.
                return Ok(Vec::new());
            }
            // Client input: compare without arithmetic that could overflow.
            if n.saturating_sub(at + 1) < numkeys {
                return Err(KeyError::WrongArity);
            }
            Ok((at + 1..at + 1 + numkeys).collect())
        }
        KeySpec::DestNumkeys => {
            let numkeys = numeric(args.get(2))?;
            if n.saturating_sub(3) < numkeys {
                return Err(KeyError::WrongArity);
            }
            let mut keys = vec![1];
            keys.extend(3..3 + numkeys);
            Ok(keys)
        }
        KeySpec::Streams => {
            let at = stream_options(args).ok_or(KeyError::WrongArity)?.streams;
            let rest = n - at - 1;
            if rest == 0 || !rest.is_multiple_of(2) {
                return Err(KeyError::WrongArity);
            }
            Ok((at + 1..at + 1 + rest / 2).collect())
        }
    }
}

fn numeric(arg: Option<&Bytes>) -> Result<usize, KeyError> {
    arg.and_then(|a| std::str::from_utf8(a).ok())
        .and_then(|s| s.parse::<usize>().ok())
        .ok_or(KeyError::WrongArity)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<Bytes> {
        s.split(' ')
            .map(|p| Bytes::copy_from_slice(p.as_bytes()))
            .collect()
    }

    #[test]
    fn command_ids_are_dense_and_unique() {
        let mut ids: Vec<usize> = all().map(|c| c.id).collect();
        ids.sort_unstable();
        assert_eq!(ids, (0..count()).collect::<Vec<_>>());
    }

    #[test]
    fn the_recent_lookup_answers_like_the_table_for_every_spelling() {
        let mut recent = Recent::default();
        for name in [
            "GET",
            "GET",
            "get",
            "SET",
            "GET",
            "frobnicate",
            "GET",
            "xautoclaim",
            "XAUTOCLAIM",
        ] {
            let want = lookup(name.as_bytes()).map(|c| c.name);
            assert_eq!(recent.lookup(name.as_bytes()).map(|c| c.name), want, "{name}");
        }
        let long = "x".repeat(20);
        assert!(recent.lookup(long.as_bytes()).is_none());
        assert_eq!(recent.lookup(b"GET").map(|c| c.name), Some("get"));
    }

    #[test]
    fn lookup_is_case_insensitive_and_unknown_names_are_none() {
        assert_eq!(lookup(b"GeT").map(|c| c.kind), Some(Kind::Read));
        assert!(lookup(b"frobnicate").is_none());
        assert!(lookup(&[b'x'; 100]).is_none());
    }

    #[test]
    fn blocking_forms_know_their_own_timeout_and_a_stream_may_be_named_block() {
        assert_eq!(
            block_timeout("blpop", &args("BLPOP a 1.5")),
            Some(Some(Duration::from_millis(1500)))
        );
        assert_eq!(block_timeout("brpop", &args("BRPOP a 0")), Some(None));
        assert_eq!(
            block_timeout("blmpop", &args("BLMPOP 2 1 a LEFT")),
            Some(Some(Duration::from_secs(2)))
        );
        assert_eq!(
            block_timeout("xread", &args("XREAD BLOCK 250 STREAMS a $")),
            Some(Some(Duration::from_millis(250)))
        );
        assert_eq!(block_timeout("xread", &args("XREAD STREAMS block 0")), None);
        assert_eq!(block_timeout("get", &args("GET a")), None);
        assert_eq!(block_timeout("blpop", &args("BLPOP a soon")), Some(None));
        // Redis rounds up to whole milliseconds, and 0 ms is for ever.
        assert_eq!(block_timeout("blpop", &args("BLPOP a -0.0001")), Some(None));
        assert_eq!(
            block_timeout("blpop", &args("BLPOP a 0.0001")),
            Some(Some(Duration::from_millis(1)))
        );
        assert_eq!(
            block_timeout("blpop", &args("BLPOP a -1")),
            Some(Some(Duration::ZERO))
        );
        assert_eq!(block_timeout("blpop", &args("BLPOP a -0.001")), Some(None));
        assert_eq!(
            block_timeout("blpop", &args("BLPOP a 0x10")),
            Some(Some(Duration::from_secs(16)))
        );
        // Past what a Duration holds, or unreadable here: Redis's to judge.
        assert_eq!(block_timeout("blpop", &args("BLPOP a 1e300")), Some(None));
        assert_eq!(
            block_timeout("blpop", &args("BLPOP a 0x1p-3")),
            Some(Some(Duration::from_millis(125)))
        );
        assert_eq!(
            block_timeout("blpop", &args("BLPOP a 0x1.8")),
            Some(Some(Duration::from_millis(1500)))
        );
        assert_eq!(
            block_timeout("blpop", &args("BLPOP a 1e-400")),
            Some(Some(Duration::from_millis(1)))
        );
        assert_eq!(block_timeout("blpop", &args("BLPOP a 0x+5")), Some(None));
        assert_eq!(block_timeout("blpop", &args("BLPOP a 0x")), Some(None));
        // A group named `block` is a group; the last BLOCK counts.
        assert_eq!(
            block_timeout("xreadgroup", &args("XREADGROUP GROUP block c STREAMS s >")),
            None
        );
        assert_eq!(
            block_timeout("xread", &args("XREAD BLOCK 100 BLOCK 0 STREAMS s $")),
            Some(None)
        );
    }

    #[test]
    fn the_allocation_free_key_range_serves_range_commands_only() {
        let get = lookup(b"get").unwrap();
        let keys: Option<Vec<usize>> = range_keys(get, &args("GET k")).map(Iterator::collect);
        assert_eq!(keys, Some(vec![1]));
        assert!(range_keys(get, &args("GET")).is_none(), "wrong arity");
        assert!(range_keys(lookup(b"eval").unwrap(), &args("EVAL s 1 k")).is_none());
    }

    #[test]
    fn key_positions_follow_each_command_shape() {
        let get = lookup(b"get").unwrap();
        assert_eq!(key_indices(get, &args("GET k")).unwrap(), vec![1]);
        assert_eq!(key_indices(get, &args("GET")).unwrap_err(), KeyError::WrongArity);
        let mset = lookup(b"mset").unwrap();
        assert_eq!(key_indices(mset, &args("MSET a 1 b 2")).unwrap(), vec![1, 3]);
        assert_eq!(
            key_indices(mset, &args("MSET a 1 b")).unwrap_err(),
            KeyError::WrongArity
        );
        let eval = lookup(b"eval").unwrap();
        assert_eq!(key_indices(eval, &args("EVAL s 2 a b x")).unwrap(), vec![3, 4]);
        let zus = lookup(b"zunionstore").unwrap();
        assert_eq!(
            key_indices(zus, &args("ZUNIONSTORE d 2 a b")).unwrap(),
            vec![1, 3, 4]
        );
        let xread = lookup(b"xread").unwrap();
        assert_eq!(
            key_indices(xread, &args("XREAD COUNT 2 STREAMS a b 0 0")).unwrap(),
            vec![4, 5]
        );
        assert_eq!(
            key_indices(xread, &args("XREAD BLOCK 0 STREAMS a 0")).unwrap(),
            vec![4]
        );
        // A group or consumer named `streams` is a name.
        let xreadgroup = lookup(b"xreadgroup").unwrap();
        assert_eq!(
            key_indices(xreadgroup, &args("XREADGROUP GROUP streams c STREAMS a b > >")).unwrap(),
            vec![5, 6]
        );
        let blpop = lookup(b"blpop").unwrap();
        assert_eq!(key_indices(blpop, &args("BLPOP a b 5")).unwrap(), vec![1, 2]);
        let blmpop = lookup(b"blmpop").unwrap();
        assert_eq!(
            key_indices(blmpop, &args("BLMPOP 0 2 a b LEFT")).unwrap(),
            vec![3, 4]
        );
        let memory = lookup(b"memory").unwrap();
        assert_eq!(key_indices(memory, &args("MEMORY USAGE k")).unwrap(), vec![2]);
        assert!(key_indices(memory, &args("MEMORY STATS")).unwrap().is_empty());
        let bitop = lookup(b"bitop").unwrap();
        assert_eq!(
            key_indices(bitop, &args("BITOP AND d a b")).unwrap(),
            vec![2, 3, 4]
        );
    }
}
