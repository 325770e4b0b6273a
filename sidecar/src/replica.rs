//! What a replica's `INFO` says about it, and what it may serve: the read
//! gate's decisions (lesson 2 of PRODUCT.md) as pure functions, with no I/O,
//! so `upstream.rs` (which stores a node's [`ReadState`]) and `gate.rs`
//! (which polls) both depend on this leaf instead of on each other.

/// What a replica's `INFO` says about it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplicaInfo {
    pub is_replica: bool,
    pub link_up: bool,
    pub sync_in_progress: bool,
    pub loading: bool,
    pub offset: Option<u64>,
    /// `master_repl_offset` (meaningful on primaries).
    pub master_offset: Option<u64>,
}

pub fn parse_info(text: &str) -> ReplicaInfo {
    let mut r = ReplicaInfo::default();
    for line in text.lines() {
        let Some((k, v)) = line.trim_end().split_once(':') else {
            continue;
        };
        match k {
            "role" => r.is_replica = v == "slave",
            "master_link_status" => r.link_up = v == "up",
            "master_sync_in_progress" => r.sync_in_progress = v != "0",
            "loading" | "async_loading" => r.loading |= v != "0",
            "slave_repl_offset" => r.offset = v.parse().ok(),
            "master_repl_offset" => r.master_offset = v.parse().ok(),
            _ => {}
        }
    }
    r
}

/// What a replica may serve, from its last poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ReadState {
    /// No reads: loading, syncing, lagging, unknown, or not polled yet.
    Closed = 0,
    /// In stable sync (or promoted, see [`replica_state`]): takes reads.
    Serving = 1,
    /// Complete but cut off from its primary ([`replica_is_orphaned`]): reads
    /// only while the primary itself is out of rotation (see `balance.rs`).
    LastResort = 2,
}

/// The read state of a node in a shard's replica list, from its `INFO`.
pub fn replica_state(info: &ReplicaInfo, primary_offset: Option<u64>, max_lag: u64) -> ReadState {
    // A "replica" that reports role:master was promoted by a failover the
    // topology has not caught up with: it holds the shard's freshest data.
    if !info.is_replica || replica_may_serve(info, primary_offset, max_lag) {
        ReadState::Serving
    } else if replica_is_orphaned(info) {
        ReadState::LastResort
    } else {
        ReadState::Closed
    }
}

/// A replica that is complete but cut off from its primary: not loading, not
/// syncing, link down. It gets no reads while its primary serves; when the
/// primary is itself down it is the freshest copy there is, and serving it
/// beats failing every read of the shard until a failover.
pub fn replica_is_orphaned(info: &ReplicaInfo) -> bool {
    info.is_replica && !info.link_up && !info.sync_in_progress && !info.loading && info.offset.is_some()
}

/// The gate decision for one replica given its primary's offset.
pub fn replica_may_serve(info: &ReplicaInfo, primary_offset: Option<u64>, max_lag: u64) -> bool {
    if !info.is_replica || !info.link_up || info.sync_in_progress || info.loading {
        return false;
    }
    match (primary_offset, info.offset) {
        (Some(p), Some(r)) => p.saturating_sub(r) <= max_lag,
        // Without the primary's offset, trust a healthy link.
        (None, Some(_)) => true,
        (_, None) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SYNCING: &str = "# Replication\r\nrole:slave\r\nmaster_link_status:down\r\nmaster_sync_in_progress:1\r\nslave_repl_offset:0\r\n# Persistence\r\nloading:0\r\n";
    const GOOD: &str = "# Replication\r\nrole:slave\r\nmaster_link_status:up\r\nmaster_sync_in_progress:0\r\nslave_repl_offset:1000\r\n# Persistence\r\nloading:0\r\n";

    #[test]
    fn a_syncing_replica_may_not_serve() {
        let info = parse_info(SYNCING);
        assert!(info.sync_in_progress && !info.link_up);
        assert!(!replica_may_serve(&info, Some(0), 1024));
    }

    #[test]
    fn an_in_sync_replica_serves_until_it_lags_too_far() {
        let info = parse_info(GOOD);
        assert!(replica_may_serve(&info, Some(1500), 1024));
        assert!(!replica_may_serve(&info, Some(1000 + 1025), 1024));
        let loading = parse_info(&GOOD.replace("loading:0", "loading:1"));
        assert!(!replica_may_serve(&loading, Some(1000), 1024));
    }

    #[test]
    fn only_a_complete_replica_cut_off_from_its_primary_is_orphaned() {
        let cut_off = parse_info(&GOOD.replace("master_link_status:up", "master_link_status:down"));
        assert!(!replica_may_serve(&cut_off, Some(1000), 1024));
        assert!(replica_is_orphaned(&cut_off));
        assert!(
            !replica_is_orphaned(&parse_info(SYNCING)),
            "a syncing replica has no complete copy"
        );
        assert!(
            !replica_is_orphaned(&parse_info(GOOD)),
            "a linked replica is simply serving"
        );
        let loading = parse_info(&cut_off_text().replace("loading:0", "loading:1"));
        assert!(!replica_is_orphaned(&loading));
    }

    #[test]
    fn the_read_state_combines_gate_orphan_and_promotion() {
        let cut_off = parse_info(&cut_off_text());
        assert_eq!(
            replica_state(&parse_info(GOOD), Some(1000), 1024),
            ReadState::Serving
        );
        assert_eq!(replica_state(&cut_off, Some(1000), 1024), ReadState::LastResort);
        assert_eq!(
            replica_state(&parse_info(SYNCING), Some(0), 1024),
            ReadState::Closed
        );
        let promoted = parse_info("# Replication\r\nrole:master\r\nmaster_repl_offset:5\r\n");
        assert_eq!(replica_state(&promoted, None, 1024), ReadState::Serving);
    }

    fn cut_off_text() -> String {
        GOOD.replace("master_link_status:up", "master_link_status:down")
    }
}
