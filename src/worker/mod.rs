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

mod children;
mod control;
mod hooks;
mod maintenance;
mod metrics;
mod settle;
mod step;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use taquba::{Claim, JobStatus, Queue};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backpressure::Backpressure;
use crate::error::Error;
use crate::hook::TerminalHook;
use crate::pending::PendingCommit;
use crate::runner::StepRunner;
use crate::runtime::{Inner, WorkflowRuntime};

impl<R: StepRunner, H: TerminalHook> WorkflowRuntime<R, H> {
    /// Run the worker pool until `shutdown` resolves, then stop claiming,
    /// wait for the steps in flight to settle, and write the failure streaks
    /// of workflows without a breaker, which are written behind their
    /// settlements (ARCHITECTURE.md, "the path of one step").
    ///
    /// Claiming starts at once. In the background it reconciles steps the
    /// queue dead-lettered by itself (a crash or an expired lease during a
    /// last attempt) into `Failed` runs, delivers hook notifications and
    /// drops outcomes past their retention; a record it cannot read is logged
    /// and skipped. Returns an error when the store fails, stalls longer than
    /// `store_timeout`, or closes (for example when another process opens it
    /// and fences this one).
    pub async fn run(&self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let inner = &self.inner;
        inner.breakers.start(&inner.queue).await?;
        crate::schedule::arm_all(inner).await?;
        let stop = CancellationToken::new();
        let steps = claim_loop(
            Claiming::of(inner, &inner.cfg.queue_name, inner.cfg.max_concurrent_steps)
                .throttled_by(&inner.backpressure),
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
                Claiming::of(inner, &inner.cfg.hook_queue, inner.cfg.max_concurrent_steps),
                stop.clone(),
                {
                    let inner = inner.clone();
                    move |claim| hooks::deliver_hook(inner.clone(), claim)
                },
            )
            .await
        };
        let ticks = async {
            if inner.schedules.is_empty() {
                stop.cancelled().await;
                return Ok(());
            }
            claim_loop(
                Claiming::of(
                    inner,
                    &inner.schedules.queue,
                    crate::schedule::TICK_CONCURRENCY,
                ),
                stop.clone(),
                {
                    let inner = inner.clone();
                    move |claim| tick(inner.clone(), claim)
                },
            )
            .await
        };
        let maintenance = maintenance::maintain(inner, &stop);
        let requests = control::serve(self, &stop);
        let work = async {
            let result = tokio::try_join!(steps, hooks, ticks, maintenance, requests);
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
                inner.schedules.begin_shutdown();
                stop.cancel();
                tokio::select! {
                    r = &mut work => r,
                    e = &mut watchdog => Err(e),
                }
            }
        };
        result?;
        maintenance::last_fold(inner).await;
        Ok(())
    }
}

/// Count a background store call (`what`: "maintenance", a breaker release)
/// for the store watchdog until the returned guard drops. Its key in
/// `pending` starts with a space, which no run id has, so no claim waits for
/// it; distinct tasks use distinct `what`, so each one's wait is measured on
/// its own.
pub(crate) fn watched<'a, R, H>(inner: &'a Inner<R, H>, what: &str) -> PendingCommit<'a> {
    inner.pending.begin(format!(" {what}"))
}

/// Resolve with [`Error::StoreUnavailable`] once a commit (or a background
/// store call) has waited longer than `store_timeout` for the store.
async fn store_watchdog<R, H>(inner: &Inner<R, H>) -> Error {
    let timeout = inner.cfg.store_timeout;
    let period = (timeout / 4)
        .min(inner.cfg.poll_interval)
        .max(Duration::from_millis(1));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Some((what, waited)) = inner.pending.longest_wait()
            && waited > timeout
        {
            let what = match what.strip_prefix(' ') {
                Some(name) => name.to_string(),
                None => format!("run {what}"),
            };
            tracing::error!(
                ?waited,
                what = what.as_str(),
                "the store has not confirmed a commit; stopping the worker pool"
            );
            return Error::StoreUnavailable { waited, what };
        }
    }
}

/// What a claim loop claims from, and how: a queue of the runtime's store,
/// its slots, and the runtime's poll interval and store timeout.
struct Claiming<'a> {
    queue: Arc<Queue>,
    queue_name: String,
    /// The most jobs in flight at once.
    concurrency: usize,
    /// The step claims' limit while retention is behind.
    backpressure: Option<&'a Backpressure>,
    poll: Duration,
    store_timeout: Duration,
}

impl<'a> Claiming<'a> {
    /// Up to `concurrency` jobs of `queue_name` at once, on `inner`'s store.
    fn of<R, H>(inner: &Inner<R, H>, queue_name: &str, concurrency: usize) -> Self {
        Self {
            queue: inner.queue.clone(),
            queue_name: queue_name.to_string(),
            concurrency,
            backpressure: None,
            poll: inner.cfg.poll_interval,
            store_timeout: inner.cfg.store_timeout,
        }
    }

    /// Fewer slots while `backpressure` says retention is behind.
    fn throttled_by(mut self, backpressure: &'a Backpressure) -> Self {
        self.backpressure = Some(backpressure);
        self
    }
}

/// Claim jobs in batches sized to the free slots, run each on its own task,
/// and drain in-flight work once `stop` fires. Ends with an error when
/// claiming fails for good (the store closed, or kept failing for
/// `store_timeout`).
///
/// Throttled by back-pressure, the slots are fewer while retention is
/// behind (see [`crate::backpressure`]); a change of that limit wakes the
/// loop.
///
/// A job whose offloaded payload object is gone (deleted from the bucket
/// by something else) fails the claim of its whole batch: the batch is
/// claimed, and each of its jobs runs again only when its lease lapses,
/// one attempt spent. That job can never run, but it is not a reason to
/// stop the pool: it is logged, and from then on jobs are claimed one at
/// a time until the queue dead-letters it (its attempts run out, a lease
/// each), so it takes no other job down with it again.
async fn claim_loop<F, Fut>(
    claiming: Claiming<'_>,
    stop: CancellationToken,
    handle: F,
) -> Result<(), Error>
where
    F: Fn(Claim) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Claiming {
        queue,
        queue_name,
        concurrency,
        backpressure,
        poll,
        store_timeout,
    } = claiming;
    let lease = queue.queue_config(&queue_name).lease_duration;
    let mut set = JoinSet::new();
    let mut failing_since: Option<Instant> = None;
    // A job whose payload object is missing, while the queue still holds it.
    let mut unrunnable: Option<String> = None;
    let result = loop {
        while let Some(done) = set.try_join_next() {
            note_panic(&queue_name, done);
        }
        if stop.is_cancelled() {
            break Ok(());
        }
        // Taken before the limit is read: a change in between wakes the wait.
        let limit_changed = backpressure.map(|b| {
            b.note_in_flight(set.len());
            b.changed()
        });
        let slots = backpressure.map_or(concurrency, |b| b.claim_limit().min(concurrency));
        if set.len() >= slots {
            let limit_changed = async {
                match limit_changed {
                    Some(changed) => changed.await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stop.cancelled() => break Ok(()),
                Some(done) = set.join_next() => note_panic(&queue_name, done),
                _ = limit_changed => {}
            }
            continue;
        }
        let mut want = slots - set.len();
        if let Some(id) = &unrunnable {
            match queue.view().job_record(id).await {
                Ok(Some(job)) if !matches!(job.status, JobStatus::Dead | JobStatus::Done) => {
                    want = 1
                }
                Ok(_) => {
                    tracing::info!(queue = %queue_name, job_id = %id, "the job whose payload was missing has left the queue; claiming in batches again");
                    unrunnable = None;
                }
                Err(_) => want = 1,
            }
        }
        let claims = match queue.claim_batch(&queue_name, want, lease).await {
            Ok(claims) => {
                failing_since = None;
                claims
            }
            Err(taquba::Error::PayloadMissing { id }) => {
                tracing::error!(
                    queue = %queue_name,
                    job_id = %id,
                    "the job's offloaded payload object is missing from the store (deleted by \
                     something else): it cannot run, and is dead-lettered once its attempts run \
                     out. Jobs claimed with it run again when their leases lapse; jobs are \
                     claimed one at a time until it has left the queue"
                );
                failing_since = None;
                unrunnable = Some(id);
                continue;
            }
            // A transient failure (a read of the store, or of an offloaded
            // payload) is retried; one that lasts `store_timeout`, or a
            // permanent one, stops the pool (a fenced or closed queue fails
            // every claim).
            Err(e) => {
                let since = *failing_since.get_or_insert_with(Instant::now);
                if e.is_permanent() || since.elapsed() >= store_timeout {
                    break Err(Error::WorkerStopped(format!(
                        "claiming from `{queue_name}` failed: {e}"
                    )));
                }
                tracing::warn!(queue = %queue_name, "claiming failed (retrying): {e}");
                tokio::select! {
                    _ = stop.cancelled() => break Ok(()),
                    _ = tokio::time::sleep(poll) => {}
                }
                continue;
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
        if let Some(b) = backpressure {
            b.note_in_flight(set.len());
        }
    };
    while let Some(done) = set.join_next().await {
        note_panic(&queue_name, done);
    }
    result
}

/// Handle one schedule tick, its lease renewed (as a step's is) until its
/// commit: a tick that catches up many fires builds a large transaction,
/// and a lease that ran out under it would have it rebuilt forever.
async fn tick<R: StepRunner, H: TerminalHook>(inner: Arc<Inner<R, H>>, claim: Claim) {
    let lease = step::Lease::of(&inner.queue, &claim);
    let work = std::pin::pin!(crate::schedule::handle_tick(inner.clone(), claim));
    lease.keep(work, |_| {}).await
}

fn note_panic(queue: &str, done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        tracing::error!(queue, "worker task failed: {e}");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use taquba::{OpenOptions, Queue};
    use tokio::sync::{Semaphore, mpsc};

    use crate::hook::NoopTerminalHook;
    use crate::runner::{Step, StepError, StepOutcome, StepRunner};
    use crate::runtime::{RunSpec, WorkflowRuntime};

    /// Says it started, then waits for a permit.
    struct Gated {
        started: mpsc::UnboundedSender<String>,
        gate: Arc<Semaphore>,
    }

    impl StepRunner for Gated {
        async fn run_step(&self, step: &Step) -> Result<StepOutcome, StepError> {
            let _ = self.started.send(step.run_id.clone());
            if let Ok(permit) = self.gate.acquire().await {
                permit.forget();
            }
            Ok(StepOutcome::Succeed { result: vec![] })
        }
    }

    /// The pool claims only as many steps as the back-pressure allows
    /// (here one of four); when the limit rises, the pool, waiting at the
    /// old one, claims the rest at once.
    #[tokio::test]
    async fn the_pool_claims_fewer_steps_while_retention_is_behind() {
        let opts = OpenOptions {
            flush_interval: Some(Duration::from_millis(1)),
            ..Default::default()
        };
        let store = Arc::new(taquba::object_store::memory::InMemory::new());
        let queue = Arc::new(Queue::open_with_options(store, "t", opts).await.unwrap());
        let (started, mut starts) = mpsc::unbounded_channel();
        let gate = Arc::new(Semaphore::new(0));
        let runner = Gated {
            started,
            gate: gate.clone(),
        };
        let rt = WorkflowRuntime::builder(queue.clone(), runner, NoopTerminalHook)
            .max_concurrent_steps(4)
            .build()
            .unwrap();
        for id in ["a", "b", "c", "d"] {
            rt.submit(RunSpec {
                run_id: Some(id.into()),
                ..Default::default()
            })
            .await
            .unwrap();
        }
        // Held to one step (the pool's own retention, which would report
        // no lag here, is kept out of it; `maintenance` tests the reports).
        rt.inner.backpressure.pin(1);
        let stop = tokio_util::sync::CancellationToken::new();
        let pool = tokio::spawn({
            let rt = rt.clone();
            let stop = stop.clone();
            async move { rt.run(stop.cancelled_owned()).await }
        });
        starts.recv().await.expect("one step started");
        // The pool claims a batch before it starts any of it: without the
        // limit, all four were claimed by now.
        let stats = queue.view().stats(&rt.inner.cfg.queue_name).await.unwrap();
        assert_eq!((stats.claimed, stats.pending), (1, 3));
        rt.inner.backpressure.pin(4);
        let rest = async {
            for _ in 0..3 {
                starts.recv().await.expect("a step started");
            }
        };
        tokio::time::timeout(Duration::from_secs(30), rest)
            .await
            .expect("the other three started while the first still ran");
        gate.add_permits(4);
        for id in ["a", "b", "c", "d"] {
            rt.wait(id).await.unwrap();
        }
        stop.cancel();
        pool.await.unwrap().unwrap();
    }

    /// A pool that stops early (its store failed) aborts its step tasks. A
    /// step aborted on its last attempt leaves its claim to run out, and
    /// the queue then dead-letters the job: the aborted task leaves the
    /// claim watched, to be read once its lease can have run out.
    #[tokio::test]
    async fn a_step_aborted_with_its_pool_leaves_its_claim_watched() {
        let queue = Arc::new(
            Queue::open(Arc::new(taquba::object_store::memory::InMemory::new()), "t")
                .await
                .unwrap(),
        );
        let (started, mut starts) = mpsc::unbounded_channel();
        let runner = Gated {
            started,
            gate: Arc::new(Semaphore::new(0)),
        };
        let rt = WorkflowRuntime::builder(queue.clone(), runner, NoopTerminalHook)
            .build()
            .unwrap();
        rt.submit(RunSpec {
            run_id: Some("a".into()),
            max_attempts_per_step: Some(1),
            ..Default::default()
        })
        .await
        .unwrap();
        let key = rt.inner.keys.run("a");
        let bytes = queue.view().kv_get(&key).await.unwrap().unwrap();
        let run: crate::record::RunRecord = crate::record::decode(&key, &bytes).unwrap();
        let pool = tokio::spawn({
            let rt = rt.clone();
            async move { rt.run(std::future::pending()).await }
        });
        starts.recv().await.expect("the step started");
        assert_eq!(rt.inner.lapsed.len(), 0, "a running step is not watched");
        let aborted = rt.inner.now_ms();
        pool.abort();
        assert!(pool.await.unwrap_err().is_cancelled());
        let watched = rt.inner.lapsed.due(u64::MAX, 10);
        assert_eq!(watched.len(), 1);
        let (job_id, watch) = &watched[0];
        assert_eq!(job_id, &run.job_id);
        assert_eq!(watch.attempts, 1);
        let lease = queue.queue_config(&rt.inner.cfg.queue_name).lease_duration;
        let reaped = crate::policy::saturating_ms(lease + crate::lapsed::SLACK);
        assert!(
            watch.due_ms >= aborted + reaped,
            "read once it can be reaped"
        );
    }
}
