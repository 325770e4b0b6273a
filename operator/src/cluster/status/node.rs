//! One node's status: role, health, and whether (and why not) it serves.

use cachetier_crds::{NodeHealth, NodeRole, NodeStatus};

use crate::cluster::health::AUTH_ERROR;
use crate::cluster::view::NodeView;

use super::StatusInput;

pub(super) fn node_status(
    input: &StatusInput<'_>,
    v: &NodeView,
    id: Option<&str>,
    owned: usize,
    primary_offset: Option<i64>,
) -> NodeStatus {
    let health = input.index.health(v);
    let state = health.map_or(NodeHealth::Unknown, |h| h.state);
    let hearsay = || {
        id.and_then(|id| {
            input
                .index
                .view()
                .nodes
                .iter()
                .filter_map(NodeView::reported)
                .flat_map(|r| r.others.iter())
                .find(|l| l.id == id)
        })
    };
    let role = match v.reported() {
        Some(r) if r.myself.master => NodeRole::Primary,
        Some(r) if r.myself.replica => NodeRole::Replica,
        Some(_) => NodeRole::Unknown,
        None => match hearsay() {
            Some(l) if l.master && owned > 0 => NodeRole::Primary,
            Some(l) if l.replica => NodeRole::Replica,
            _ => NodeRole::Unknown,
        },
    };
    let mut lag = None;
    // The operator cannot reach it, yet the cluster sees it alive: a
    // partition between the operator and the node, not a dead node.
    let only_operator = id.is_some_and(|id| input.index.view().cluster_sees_alive(id));
    let auth_error = health
        .and_then(|h| h.last_error.clone())
        .filter(|e| state == NodeHealth::Failed && e.starts_with(AUTH_ERROR));
    let not_serving: Option<String> = match (v.reported(), state) {
        _ if auth_error.is_some() => auth_error.map(|e| format!("configuration error: {e}")),
        (None, _) | (_, NodeHealth::Failed) if only_operator => {
            Some("unreachable by the operator only; the cluster still sees it".into())
        }
        (None, _) => Some("unreachable".into()),
        (_, NodeHealth::Failed) => Some("failed health probes".into()),
        (_, NodeHealth::Unknown) => Some("not probed yet".into()),
        (Some(r), _) if r.repl.loading => Some("loading its dataset".into()),
        (Some(_), _) if role == NodeRole::Primary => (owned == 0).then(|| "owns no slots".into()),
        (Some(r), _) if role == NodeRole::Replica => {
            lag = primary_offset.map(|p| (p - r.repl.offset).max(0));
            if r.repl.sync_in_progress {
                Some("sync in progress".into())
            } else if !r.repl.link_up {
                Some("link to primary down".into())
            } else {
                match lag {
                    None => Some("primary unreachable".into()),
                    Some(l) if l > i64::try_from(input.tier.max_lag_bytes).unwrap_or(i64::MAX) => {
                        Some(format!("lag {l} bytes over {}", input.tier.max_lag_bytes))
                    }
                    Some(_) => None,
                }
            }
        }
        _ => Some("not part of the cluster yet".into()),
    };
    NodeStatus {
        name: v.pool.name.clone(),
        address: v.pool.addr.to_string(),
        node_id: id.map(str::to_string),
        role,
        health: state,
        rtt_micros: health
            .and_then(|h| h.rtt)
            .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX)),
        lag_bytes: lag,
        serving: not_serving.is_none(),
        reason: not_serving,
    }
}
