//! `CLIENT TRACKING ON|OFF`'s options, checked as Redis checks them.

use bytes::Bytes;

/// `CLIENT TRACKING ON`'s options, as Redis keeps them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    pub bcast: bool,
    pub optin: bool,
    pub optout: bool,
    pub noloop: bool,
    /// `BCAST` prefixes, sorted as Redis lists them; `BCAST` alone is the
    /// empty prefix.
    pub prefixes: Vec<Bytes>,
}

/// What a `CLIENT TRACKING` asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    Off,
    On(Options),
    /// `REDIRECT` to a client that exists: refused (see the module doc).
    Redirect,
}

fn upper(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_ascii_uppercase()
}

/// One prefix is a prefix of the other.
fn overlap(a: &[u8], b: &[u8]) -> bool {
    let n = a.len().min(b.len());
    a[..n] == b[..n]
}

/// Parse `CLIENT TRACKING ON|OFF [options]` (`args` from `ON|OFF`) against
/// the client's current options, with Redis's checks in Redis's order;
/// `exists` says whether a client id exists (for `REDIRECT`).
pub fn parse(
    args: &[Bytes],
    current: Option<&Options>,
    exists: impl Fn(i64) -> bool,
) -> Result<Change, String> {
    let syntax = || "ERR syntax error".to_string();
    let mut new = Options::default();
    let mut prefixes: Vec<Bytes> = Vec::new();
    let mut redirect = None;
    let mut i = 1;
    while i < args.len() {
        let more = i + 1 < args.len();
        match upper(&args[i]).as_str() {
            "REDIRECT" if more => {
                i += 1;
                if redirect.is_some() {
                    return Err("ERR A client can only redirect to a single other client".into());
                }
                let id = crate::resp::int_arg(&args[i])
                    .ok_or_else(|| "ERR value is not an integer or out of range".to_string())?;
                if !exists(id) {
                    return Err("ERR The client ID you want redirect to does not exist".into());
                }
                redirect = Some(id);
            }
            "BCAST" => new.bcast = true,
            "OPTIN" => new.optin = true,
            "OPTOUT" => new.optout = true,
            "NOLOOP" => new.noloop = true,
            "PREFIX" if more => {
                i += 1;
                prefixes.push(args[i].clone());
            }
            _ => return Err(syntax()),
        }
        i += 1;
    }
    match args.first().map(|a| upper(a)).as_deref() {
        Some("OFF") => return Ok(Change::Off),
        Some("ON") => {}
        _ => return Err(syntax()),
    }
    if !new.bcast && !prefixes.is_empty() {
        return Err("ERR PREFIX option requires BCAST mode to be enabled".into());
    }
    if current.is_some_and(|c| c.bcast != new.bcast) {
        return Err(
            "ERR You can't switch BCAST mode on/off before disabling tracking for this client, \
                    and then re-enabling it with a different mode."
                .into(),
        );
    }
    if new.bcast && (new.optin || new.optout) {
        return Err("ERR OPTIN and OPTOUT are not compatible with BCAST".into());
    }
    if new.optin && new.optout {
        return Err("ERR You can't specify both OPTIN mode and OPTOUT mode".into());
    }
    if current.is_some_and(|c| (new.optin && c.optout) || (new.optout && c.optin)) {
        return Err(
            "ERR You can't switch OPTIN/OPTOUT mode before disabling tracking for this client, \
                    and then re-enabling it with a different mode."
                .into(),
        );
    }
    let existing = current.map(|c| c.prefixes.as_slice()).unwrap_or_default();
    for (i, p) in prefixes.iter().enumerate() {
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        if let Some(e) = existing.iter().find(|e| overlap(e, p)) {
            return Err(format!(
                "ERR Prefix '{}' overlaps with an existing prefix '{}'. Prefixes for a single client must not overlap.",
                text(p),
                text(e)
            ));
        }
        if let Some(q) = prefixes[i + 1..].iter().find(|q| overlap(p, q)) {
            return Err(format!(
                "ERR Prefix '{}' overlaps with another provided prefix '{}'. Prefixes for a single client must not overlap.",
                text(p),
                text(q)
            ));
        }
    }
    if redirect.is_some() {
        return Ok(Change::Redirect);
    }
    // Prefixes add to those already registered; flags are replaced.
    let mut all: Vec<Bytes> = existing.to_vec();
    if new.bcast && prefixes.is_empty() {
        prefixes.push(Bytes::new());
    }
    for p in prefixes {
        if !all.contains(&p) {
            all.push(p);
        }
    }
    all.sort();
    new.prefixes = all;
    Ok(Change::On(new))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Test arguments as a client sends them (also used by the module's
    /// parent's tests).
    pub(in crate::client_cache) fn args(a: &[&str]) -> Vec<Bytes> {
        a.iter().map(|s| Bytes::copy_from_slice(s.as_bytes())).collect()
    }

    pub(in crate::client_cache) fn on(a: &[&str], current: Option<&Options>) -> Result<Options, String> {
        match parse(&args(a), current, |id| id == 7)? {
            Change::On(o) => Ok(o),
            other => Err(format!("{other:?}")),
        }
    }

    #[test]
    fn options_are_checked_in_redis_order_and_prefixes_add_up() {
        let bcast = on(&["on", "bcast", "prefix", "b", "prefix", "a"], None).unwrap();
        assert_eq!(bcast.prefixes, args(&["a", "b"]));
        let more = on(&["on", "bcast", "prefix", "c"], Some(&bcast)).unwrap();
        assert_eq!(more.prefixes, args(&["a", "b", "c"]));
        assert!(
            on(&["on", "bcast", "prefix", "ab"], Some(&bcast))
                .unwrap_err()
                .contains("existing prefix 'a'")
        );
        assert!(
            on(&["on", "bcast", "prefix", "x", "prefix", "xy"], None)
                .unwrap_err()
                .contains("another provided prefix 'xy'")
        );
        assert!(on(&["on"], Some(&bcast)).unwrap_err().contains("switch BCAST"));
        assert!(
            on(&["on", "prefix", "a"], None)
                .unwrap_err()
                .contains("requires BCAST")
        );
        assert!(
            on(&["on", "optin", "optout"], None)
                .unwrap_err()
                .contains("both OPTIN")
        );
        let optin = on(&["on", "optin"], None).unwrap();
        assert!(
            on(&["on", "optout"], Some(&optin))
                .unwrap_err()
                .contains("switch OPTIN/OPTOUT")
        );
        assert_eq!(on(&["on", "bcast"], None).unwrap().prefixes, vec![Bytes::new()]);
        assert_eq!(parse(&args(&["off", "bcast"]), None, |_| false), Ok(Change::Off));
        assert_eq!(
            parse(&args(&["on", "redirect", "7"]), None, |id| id == 7),
            Ok(Change::Redirect)
        );
        assert!(
            parse(&args(&["on", "redirect", "8"]), None, |id| id == 7)
                .unwrap_err()
                .contains("does not exist")
        );
        assert_eq!(
            parse(&args(&["maybe"]), None, |_| false),
            Err("ERR syntax error".into())
        );
        assert_eq!(
            parse(&args(&["on", "prefix"]), None, |_| false),
            Err("ERR syntax error".into())
        );
    }
}
