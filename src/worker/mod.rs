//! The worker pool: claims step jobs, runs them, and commits each step's
//! result in the transaction that settles its job.
//!
//! | runner says             | settlement (one transaction)                                  |
//! |-------------------------|---------------------------------------------------------------|
//! | `Continue`/`ContinueAfter` | `ack_with`: enqueue step n+1, rewrite the run record       |
//! | `Succeed`/`Fail`/`Cancel`  | `ack_with`: terminal effects (outcome, hook job)           |
//! | transient error         | `nack_with`: retry, or on the last attempt terminal effects  |
//! | permanent error         | `dead_letter_with`: terminal effects                          |
//!
//! "Terminal effects" delete the run record and write the outcome record,
//! its retention entry and the hook notification job.

mod control;
mod hooks;
mod maintenance;
mod settle;
mod step;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use taquba::{Claim, Queue};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::hook::TerminalHook;
use crate::runner::StepRunner;
use crate::runtime::{Inner, WorkflowRuntime};

impl<R: StepRunner, H: TerminalHook> WorkflowRuntime<R, H> {
    /// Run the worker pool until `shutdown` resolves, then stop claiming and
    /// wait for the steps in flight to settle.
    ///
    /// At start it reconciles steps the queue dead-lettered by itself while
    /// no pool ran (a crash during a last attempt) into `Failed` runs. While
    /// running it also delivers hook notifications and drops outcomes past
    /// their retention. Returns an error when the store fails or closes (for
    /// example when another process opens it and fences this one).
    pub async fn run(&self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let inner = &self.inner;
        maintenance::reconcile_all_dead(inner).await?;
        inner.breakers.load_all(&inner.queue).await?;
        let stop = CancellationToken::new();
        let steps = claim_loop(
            inner.queue.clone(),
            inner.cfg.queue_name.clone(),
            inner.cfg.max_concurrent_steps,
            inner.cfg.poll_interval,
            stop.clone(),
            {
                let inner = inner.clone();
                move |claim| step::run_step_job(inner.clone(), claim)
            },
        );
        let hooks = async {
            if !inner.hooks_enabled {
                stop.cancelled().await;
                return Ok(());
            }
            claim_loop(
                inner.queue.clone(),
                inner.cfg.hook_queue.clone(),
                inner.cfg.max_concurrent_steps,
                inner.cfg.poll_interval,
                stop.clone(),
                {
                    let inner = inner.clone();
                    move |claim| hooks::deliver_hook(inner.clone(), claim)
                },
            )
            .await
        };
        let maintenance = maintenance::maintain(inner, &stop);
        let requests = control::serve(self, &stop);
        let work = async {
            let result = tokio::try_join!(steps, hooks, maintenance, requests);
            stop.cancel();
            result
        };
        let watchdog = store_watchdog(inner);
        tokio::pin!(work);
        tokio::pin!(shutdown);
        tokio::pin!(watchdog);
        // The watchdog also guards the drain: a step cannot settle while the
        // store is down. Returning drops the pool's tasks, which is no worse
        // than a crash.
        let result = tokio::select! {
            r = &mut work => r,
            e = &mut watchdog => Err(e),
            _ = &mut shutdown => {
                stop.cancel();
                tokio::select! {
                    r = &mut work => r,
                    e = &mut watchdog => Err(e),
                }
            }
        };
        result.map(|_| ())
    }
}

/// Resolve with [`Error::StoreUnavailable`] once a commit has waited longer
/// than `store_timeout` for the store.
async fn store_watchdog<R, H>(inner: &Inner<R, H>) -> Error {
    let timeout = inner.cfg.store_timeout;
    let period = (timeout / 4)
        .min(inner.cfg.poll_interval)
        .max(Duration::from_millis(1));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Some(waited) = inner.pending.longest_wait()
            && waited > timeout
        {
            tracing::error!(
                ?waited,
                "the store has not confirmed a commit; stopping the worker pool"
            );
            return Error::StoreUnavailable { waited };
        }
    }
}

/// Claim jobs from `queue_name` in batches sized to the free slots, run each
/// on its own task, and drain in-flight work once `stop` fires. Ends with an
/// error when claiming fails (the store failed or closed).
async fn claim_loop<F, Fut>(
    queue: Arc<Queue>,
    queue_name: String,
    concurrency: usize,
    poll: Duration,
    stop: CancellationToken,
    handle: F,
) -> Result<(), Error>
where
    F: Fn(Claim) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let lease = queue.queue_config(&queue_name).lease_duration;
    let mut set = JoinSet::new();
    let result = loop {
        while let Some(done) = set.try_join_next() {
            note_panic(&queue_name, done);
        }
        if stop.is_cancelled() {
            break Ok(());
        }
        if set.len() >= concurrency {
            tokio::select! {
                _ = stop.cancelled() => break Ok(()),
                Some(done) = set.join_next() => note_panic(&queue_name, done),
            }
            continue;
        }
        let claims = match queue
            .claim_batch(&queue_name, concurrency - set.len(), lease)
            .await
        {
            Ok(claims) => claims,
            Err(e) => {
                break Err(Error::WorkerStopped(format!(
                    "claiming from `{queue_name}` failed: {e}"
                )));
            }
        };
        if claims.is_empty() {
            tokio::select! {
                _ = stop.cancelled() => break Ok(()),
                _ = queue.wait_for_jobs_on(&queue_name, poll) => {}
            }
            continue;
        }
        for claim in claims {
            set.spawn(handle(claim));
        }
    };
    while let Some(done) = set.join_next().await {
        note_panic(&queue_name, done);
    }
    result
}

fn note_panic(queue: &str, done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        tracing::error!(queue, "worker task failed: {e}");
    }
}
