//! The pool's background work: reconciling dead-lettered steps at start,
//! retention, tally folding and probe wake-ups.

use taquba::{Expired, SettlementEffects};
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::runtime::Inner;

/// Dead-lettered jobs read per page when reconciling at start.
const DEAD_PAGE: usize = 256;

/// The most run tallies one tick folds into health records.
const TALLIES_PER_TICK: usize = 10_000;

/// The pool's periodic work, every `poll_interval` until `stop` fires: drop
/// outcomes past their retention, fold run tallies into health records, and
/// tend the breakers (release parked steps of workflows that are not
/// tripped, wake the probes that are due).
pub(super) async fn maintain<R, H>(
    inner: &Inner<R, H>,
    stop: &CancellationToken,
) -> Result<(), Error> {
    let mut tick = tokio::time::interval(inner.cfg.poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        if let Err(e) = expire_outcomes(inner).await {
            tracing::warn!("retention pass failed (retried next tick): {e}");
        }
        if let Err(e) = inner
            .breakers
            .fold_tallies(&inner.queue, TALLIES_PER_TICK)
            .await
        {
            tracing::warn!("folding run tallies failed (retried next tick): {e}");
        }
        if let Err(e) = inner.breakers.tend(&inner.queue, inner.now_ms()).await {
            tracing::warn!("breaker upkeep failed (retried next tick): {e}");
        }
    }
}

/// Reconcile every step the queue dead-lettered by itself into its run.
pub(super) async fn reconcile_all_dead<R, H>(inner: &Inner<R, H>) -> Result<(), Error> {
    let mut after: Option<String> = None;
    loop {
        let page = inner
            .queue
            .view()
            .dead_jobs(&inner.cfg.queue_name, after.as_deref(), DEAD_PAGE)
            .await?;
        for job in &page {
            inner.reconcile_dead(job).await?;
        }
        match page.last() {
            Some(last) if page.len() == DEAD_PAGE => after = Some(last.id.clone()),
            _ => return Ok(()),
        }
    }
}

/// Drop outcome and submit records past their retention.
async fn expire_outcomes<R, H>(inner: &Inner<R, H>) -> Result<usize, Error> {
    let now = inner.now_ms();
    let removed = inner
        .expiry
        .pass(
            &inner.queue,
            now,
            inner.cfg.terminal_retention,
            |_, suffix| {
                let effects = match std::str::from_utf8(&suffix) {
                    Ok(run_id) => SettlementEffects::default()
                        .kv_delete(inner.keys.sub(run_id))
                        .kv_delete(inner.keys.out(run_id)),
                    Err(_) => SettlementEffects::default(),
                };
                std::future::ready(Expired::Delete(effects))
            },
        )
        .await?;
    Ok(removed)
}
