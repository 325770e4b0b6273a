//! The tier's conditions: `Ready`, `Progressing`, `Degraded`, `SyncLoop`,
//! each with a reason a user can act on. A condition keeps its transition
//! time while its status does not change.

use cachetier_crds::{
    CONDITION_DEGRADED, CONDITION_PROGRESSING, CONDITION_READY, CacheTierStatus, NodeHealth,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use super::{CONDITION_SYNC_LOOP, SYNC_LOOP_WINDOW, StatusInput};
use crate::cluster::health::AUTH_ERROR;
use crate::cluster::plan::Action;
use crate::cluster::view::SLOTS;

fn condition(
    previous: Option<&CacheTierStatus>,
    generation: Option<i64>,
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_string();
    let since = previous
        .and_then(|p| p.conditions.iter().find(|c| c.type_ == type_))
        .filter(|c| c.status == status)
        .map_or_else(|| Time(Timestamp::now()), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.to_string(),
        status,
        reason: reason.to_string(),
        message,
        last_transition_time: since,
        observed_generation: generation,
    }
}

/// Whether every slot is served.
pub(super) fn ready(
    input: &StatusInput<'_>,
    covered: bool,
    all_ok: bool,
    any_owned: bool,
    slots_covered: usize,
) -> Condition {
    let (prev, generation, view) = (input.previous, input.tier.generation, input.index.view());
    if covered && all_ok {
        condition(
            prev,
            generation,
            CONDITION_READY,
            true,
            "AllSlotsServed",
            "every slot is served".into(),
        )
    } else if covered {
        let failing: Vec<&str> = view
            .nodes
            .iter()
            .filter(|v| v.reported().is_some_and(|r| !r.state_ok))
            .map(|v| v.pool.name.as_str())
            .collect();
        condition(
            prev,
            generation,
            CONDITION_READY,
            false,
            "ClusterStateNotOk",
            format!("cluster_state is not ok on {}", failing.join(", ")),
        )
    } else if !any_owned {
        condition(
            prev,
            generation,
            CONDITION_READY,
            false,
            "Bootstrapping",
            "the cluster is being formed".into(),
        )
    } else {
        condition(
            prev,
            generation,
            CONDITION_READY,
            false,
            "SlotsNotServed",
            format!("{slots_covered} of {SLOTS} slots are served by a reachable primary"),
        )
    }
}

/// What the operator is doing now, or waiting for.
pub(super) fn progressing(input: &StatusInput<'_>) -> Condition {
    let (prev, generation) = (input.previous, input.tier.generation);
    let stuck = input.events.stuck_keys.first();
    match (input.plan.actions.first(), input.plan.waiting.first()) {
        _ if stuck.is_some() => {
            let k = stuck.map_or_else(String::new, |k| {
                format!("slot {}: key {:?} cannot be moved: {}", k.slot, k.key, k.error)
            });
            let more = input.events.stuck_keys.len() - 1;
            let message = if more > 0 {
                format!("{k} (+{more} more)")
            } else {
                k
            };
            condition(
                prev,
                generation,
                CONDITION_PROGRESSING,
                true,
                "KeyCannotMove",
                message,
            )
        }
        (Some(a), _) => {
            let reason = match a {
                Action::CreateNode { .. } => "CreatingNodes",
                Action::DestroyNode { .. } | Action::Forget { .. } => "RemovingNodes",
                Action::Meet { .. } => "JoiningNodes",
                Action::Replicate { .. } | Action::Flush { .. } => "AttachingReplicas",
                Action::AddSlots { .. } => "AssigningSlots",
                Action::MigrateSlots { .. }
                | Action::FinishMigration { .. }
                | Action::AbortMigration { .. } => "Resharding",
                Action::Failover { .. } => "FailingOver",
                Action::SetConfig { .. } => "Reconfiguring",
            };
            let more = input.plan.actions.len() - 1;
            let message = if more > 0 {
                format!("{a} (+{more} more)")
            } else {
                a.to_string()
            };
            condition(prev, generation, CONDITION_PROGRESSING, true, reason, message)
        }
        (None, Some(w)) => condition(
            prev,
            generation,
            CONDITION_PROGRESSING,
            true,
            "Waiting",
            w.clone(),
        ),
        (None, None) => condition(
            prev,
            generation,
            CONDITION_PROGRESSING,
            false,
            "Converged",
            "the cluster matches the spec".into(),
        ),
    }
}

/// Whether some node is not ready, and why.
pub(super) fn degraded(input: &StatusInput<'_>, not_ready: &[String]) -> Condition {
    let (prev, generation, view) = (input.previous, input.tier.generation, input.index.view());
    if not_ready.is_empty() {
        condition(
            prev,
            generation,
            CONDITION_DEGRADED,
            false,
            "AllNodesReady",
            "every node is ready".into(),
        )
    } else {
        let failed = view.nodes.iter().any(|v| input.index.is_failed(v));
        let auth = input.index.records().values().any(|h| {
            h.state == NodeHealth::Failed
                && h.last_error.as_deref().is_some_and(|e| e.starts_with(AUTH_ERROR))
        });
        let reason = if auth {
            "AuthenticationFailed"
        } else if failed {
            "NodeFailed"
        } else {
            "NodesNotReady"
        };
        condition(
            prev,
            generation,
            CONDITION_DEGRADED,
            true,
            reason,
            not_ready.join("; "),
        )
    }
}

/// Whether a replica keeps restarting its full sync.
pub(super) fn sync_loop(input: &StatusInput<'_>) -> Condition {
    let (prev, generation) = (input.previous, input.tier.generation);
    if input.sync_loops.is_empty() {
        condition(
            prev,
            generation,
            CONDITION_SYNC_LOOP,
            false,
            "NoSyncLoop",
            "no replica is stuck in full syncs".into(),
        )
    } else {
        let who: Vec<String> = input
            .sync_loops
            .iter()
            .map(|(n, c)| format!("{n} restarted its full sync {c} times"))
            .collect();
        condition(
            prev,
            generation,
            CONDITION_SYNC_LOOP,
            true,
            "FullSyncRestarting",
            format!(
                "{} within {:?}: raise repl-backlog-size / client-output-buffer-limit replica",
                who.join("; "),
                SYNC_LOOP_WINDOW
            ),
        )
    }
}
