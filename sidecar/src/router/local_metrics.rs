//! A client's command metrics, counted in its own task and published to
//! the shared series when the task is about to wait. A request then costs
//! a few plain additions instead of the shared counter's and histogram's
//! atomic updates (the sidecar's CPU time per request, at equal
//! instructions, was well above Redis's: atomics are part of why). What a
//! scrape sees lags by at most the client's current batch.

use prometheus::local::{LocalHistogram, LocalIntCounter};

use super::*;

#[derive(Default)]
pub struct ClientMetrics {
    /// The commands this client used, by table id: few per client, so a
    /// short list searched in order.
    per: Vec<(usize, Local)>,
    unflushed: bool,
}

struct Local {
    ok: LocalIntCounter,
    error: LocalIntCounter,
    latency: LocalHistogram,
    /// Counted since the last flush.
    dirty: bool,
}

impl std::fmt::Debug for ClientMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientMetrics")
            .field("commands", &self.per.len())
            .finish()
    }
}

impl ClientMetrics {
    /// Count `reply` (an error reply as an error) and its latency.
    pub(super) fn record(
        &mut self,
        router: &Router,
        info: &'static CommandInfo,
        reply: &[u8],
        latency: std::time::Duration,
    ) {
        let at = match self.per.iter().position(|(id, _)| *id == info.id) {
            Some(at) => at,
            None => {
                let Some(shared) = router.handles(info) else {
                    return;
                };
                let local = Local {
                    ok: shared.ok.local(),
                    error: shared.error.local(),
                    latency: shared.latency.local(),
                    dirty: false,
                };
                self.per.push((info.id, local));
                self.per.len() - 1
            }
        };
        let Some((_, m)) = self.per.get_mut(at) else {
            return;
        };
        if reply.starts_with(b"-") {
            m.error.inc();
        } else {
            m.ok.inc();
        }
        m.latency.observe(latency.as_secs_f64());
        m.dirty = true;
        self.unflushed = true;
    }

    /// Publish what was counted since the last flush.
    pub fn flush(&mut self) {
        if std::mem::take(&mut self.unflushed) {
            for (_, m) in self.per.iter_mut().filter(|(_, m)| m.dirty) {
                m.ok.flush();
                m.error.flush();
                m.latency.flush();
                m.dirty = false;
            }
        }
    }
}

impl Drop for ClientMetrics {
    fn drop(&mut self) {
        self.flush();
    }
}
