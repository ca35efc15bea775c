//! Delivering hook notifications: one job on `{queue}-hooks` per ended run.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures_util::FutureExt;
use taquba::Claim;
use tracing::Instrument;

use super::metrics;
use super::step::Lease;
use crate::hook::{RunOutcome, TerminalHook};
use crate::record::decode;
use crate::runner::StepError;
use crate::runtime::Inner;

/// Deliver one hook notification job, its lease renewed (as a step's is)
/// from the claim to the settlement, however long the hook takes.
pub(super) async fn deliver_hook<R, H: TerminalHook>(inner: Arc<Inner<R, H>>, claim: Claim) {
    let lease = Lease::of(&inner.queue, &claim);
    let work = std::pin::pin!(deliver(&inner, claim));
    lease.keep(work, |_| {}).await
}

async fn deliver<R, H: TerminalHook>(inner: &Inner<R, H>, claim: Claim) {
    let queue = &inner.queue;
    let outcome: RunOutcome = match decode(claim.id.as_bytes(), &claim.payload) {
        Ok(outcome) => outcome,
        Err(e) => {
            tracing::warn!(job_id = %claim.id, "dead-lettering undecodable hook notification: {e}");
            let _ = queue.dead_letter(&claim, &e.to_string()).await;
            return;
        }
    };
    let span = tracing::info_span!("hook", run_id = %outcome.run_id, attempt = claim.attempts);
    async {
        // The terminal commit that enqueued this may still wait for its flush.
        inner.pending.settled(&outcome.run_id).await;
        // The call inside the guard too: a hook may panic before returning
        // its future.
        let delivered = AssertUnwindSafe(async { inner.hook.on_termination(&outcome).await })
            .catch_unwind()
            .await
            .unwrap_or_else(|_| Err(StepError::transient("the hook panicked")));
        // Counted for the store watchdog.
        let _pending = inner.pending.begin(&outcome.run_id);
        let (settled, outcome) = match delivered {
            Ok(()) => (queue.ack(&claim).await, "delivered"),
            Err(e) if e.is_permanent() => {
                tracing::warn!("hook gave up: {}", e.message);
                (queue.dead_letter(&claim, &e.message).await, "dead_lettered")
            }
            Err(e) => {
                tracing::info!("hook failed, retrying: {}", e.message);
                (queue.nack(&claim, &e.message).await, "retried")
            }
        };
        match settled {
            Ok(()) => metrics::hook_settled(outcome),
            Err(e) => tracing::warn!("settling the hook notification failed: {e}"),
        }
    }
    .instrument(span)
    .await
}
