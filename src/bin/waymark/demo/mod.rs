//! `waymark demo`: eight example orders through a five-step pipeline, live.
//!
//! The demo opens a local-disk store in `./waymark-data` (or `--dir`), submits
//! eight runs with fixed ids (`demo-order-01` .. `demo-order-08`) and
//! deterministic inputs, and shows every step once its result is durable.
//! Kill it at any moment (Ctrl-C, SIGTERM, even `kill -9`) and run the same
//! command again: finished runs print their stored outcome and unfinished
//! runs resume at the step where they stopped.
//!
//! - Ctrl-C or SIGTERM stops claiming steps and lets the steps in flight
//!   finish and commit; a second one skips the rest of their simulated work
//!   so they commit at once (no attempt is spent); a third quits at once
//!   (the steps in flight then run again next time, each spending one of
//!   its 20 attempts). Once the steps have committed, the demo reads the
//!   store to confirm what it showed; a stop request then ends those reads
//!   at once, naming on stderr the runs it did not check or confirm.
//!   Closing the store comes last, bounded by `--timeout`; a stop request
//!   then quits at once (exit 4), saying the store was not closed cleanly.
//! - A second demo refuses while another process writes the store, unless
//!   `--force`.
//! - `--reset` deletes only a store the demo created (see [`reset`]), and
//!   never while another process writes it, even with `--force`.
//!
//! The domain (orders, pipeline) is in [`domain`], what counts as confirmed
//! in [`progress`], and the terminal output in [`ui`].

pub mod domain;
pub mod progress;
pub mod reset;
pub mod ui;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use waymark::fleet::FleetClient;
use waymark::taquba::Queue;
use waymark::{
    Client, DEFAULT_WORKFLOW, RunOutcome, RunSpec, RunStatus, Schedule, StepError, TerminalHook,
    WorkflowRuntime,
};

use crate::describe;
use crate::plumbing::exit::{CliError, CliResult, Exit, shown};
use crate::plumbing::output::{say, say_err, suggest};
use crate::plumbing::signals::Signals;
use crate::plumbing::store::{DEFAULT_STEP_QUEUE, Store, StoreArgs, Use};
use crate::plumbing::writer::{close_writer, open_writer, refuse_delete_if_live, refuse_if_live};
use domain::{ORDERS, OrderPipeline, STEPS, run_id, step_label};
use progress::{Shown, Tracker};
use ui::Ui;

/// `waymark demo`'s arguments.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Where the store lives (a local --dir only).
    #[command(flatten)]
    pub store: StoreArgs,
    /// Delete the demo's store first and start over (only a store the demo
    /// created, holding nothing else, and never while another process
    /// writes it, even with --force: exit 5).
    #[arg(long)]
    pub reset: bool,
    /// Take the store over even if another process is writing it (that
    /// process is fenced and stops). With --reset it overrides nothing: a
    /// store another process writes is never deleted.
    #[arg(long)]
    pub force: bool,
}

/// The terminal hook the CLI's workers use: it passes each durable outcome
/// on (hook notifications are delivered only after the terminal commit is
/// durable).
pub struct OutcomeHook {
    /// Where outcomes go; the listener may be gone.
    ended: mpsc::UnboundedSender<RunOutcome>,
}

impl OutcomeHook {
    /// A hook sending outcomes to `ended`.
    pub fn new(ended: mpsc::UnboundedSender<RunOutcome>) -> Self {
        Self { ended }
    }
}

impl TerminalHook for OutcomeHook {
    async fn on_termination(&self, outcome: &RunOutcome) -> Result<(), StepError> {
        let _ = self.ended.send(outcome.clone());
        Ok(())
    }
}

/// The runtime the demo and `waymark worker` build.
pub type Runtime = WorkflowRuntime<OrderPipeline, OutcomeHook>;

/// Build the order pipeline's runtime over `queue`.
pub fn build_runtime(
    queue: Arc<Queue>,
    store: &Store,
    pipeline: OrderPipeline,
    hook: OutcomeHook,
    schedules: Vec<Schedule>,
    trip_after: Option<u32>,
) -> CliResult<Runtime> {
    try_build_runtime(queue, store.timeout, pipeline, hook, schedules, trip_after)
        .map_err(|e| CliError::failure(format!("cannot build the workflow runtime: {e}")))
}

/// [`build_runtime`] with the library's error (a fleet worker builds one
/// per shard), each store operation bounded by `store_timeout`.
pub fn try_build_runtime(
    queue: Arc<Queue>,
    store_timeout: Duration,
    pipeline: OrderPipeline,
    hook: OutcomeHook,
    schedules: Vec<Schedule>,
    trip_after: Option<u32>,
) -> Result<Runtime, waymark::Error> {
    let builder = schedules.into_iter().fold(
        WorkflowRuntime::builder(queue, pipeline, hook),
        |builder, schedule| builder.schedule(schedule),
    );
    let builder = match trip_after {
        Some(n) => builder.breaker(DEFAULT_WORKFLOW, domain::breaker(n)),
        None => builder,
    };
    builder
        .queue_name(DEFAULT_STEP_QUEUE)
        .max_concurrent_steps(4)
        .poll_interval(Duration::from_millis(50))
        .store_timeout(store_timeout)
        .default_retry_policy(domain::retry_policy())
        .build()
}

/// Where a run stood when the demo started.
enum Prior {
    /// Never submitted.
    New,
    /// Submitted earlier and not finished: it resumes.
    Resuming(RunStatus),
    /// Finished earlier: its stored outcome.
    Finished(RunOutcome),
    /// Submitted earlier, with no live step and no outcome yet: its last
    /// step gave up while no worker ran, and the worker records its failure.
    Settling,
}

/// Read where run `run_id` stands (the store was just opened: all of it is
/// durable).
async fn classify(runtime: &Runtime, store: &Store, run_id: &str) -> CliResult<Prior> {
    let what = format!("reading the state of {run_id}");
    if let Some(outcome) = store.bounded(&what, runtime.outcome(run_id)).await? {
        return Ok(Prior::Finished(outcome));
    }
    Ok(match store.bounded(&what, runtime.status(run_id)).await? {
        Some(status) => Prior::Resuming(status),
        None => Prior::New,
    })
}

/// Run the demo.
pub async fn run(args: DemoArgs) -> CliResult<Exit> {
    if args.store.store.is_some() {
        return Err(CliError::usage(
            "the demo runs on a local directory: use --dir PATH, not --store",
        ));
    }
    let store = Store::locate(&args.store)?;
    let dir = store
        .dir
        .clone()
        .ok_or_else(|| CliError::usage("the demo needs --dir"))?;
    let mut checked_live = false;
    if args.reset && std::fs::symlink_metadata(&dir).is_ok() {
        let doomed = reset::check_resettable(&dir)?;
        // Even with --force: a store in use is never deleted.
        refuse_delete_if_live(&store, "--reset").await?;
        checked_live = true;
        let files = reset::delete(&doomed)?;
        say!(
            "--reset: deleted the demo store in {} ({files} files), starting over.",
            store.shown()
        );
    }
    reset::check_creatable(&dir)?;
    store.preflight(Use::Write)?;
    if !checked_live {
        refuse_if_live(&store, args.force, "starting the demo").await?;
    }
    let creating = !reset::has_store(&dir);
    std::fs::create_dir_all(&dir)
        .map_err(|e| CliError::failure(format!("cannot create {}: {e}", store.shown())))?;
    if creating {
        reset::mark(&dir)?;
    }

    let queue = open_writer(&store).await?;
    let (work_tx, mut work_rx) = mpsc::unbounded_channel();
    let (end_tx, mut end_rx) = mpsc::unbounded_channel();
    let hurry = CancellationToken::new();
    let runtime = build_runtime(
        queue.clone(),
        &store,
        OrderPipeline::new(work_tx, hurry.clone()),
        OutcomeHook::new(end_tx),
        Vec::new(),
        None,
    )?;

    say!(
        "Waymark demo: {} orders, each a durable run of {} steps ({}).",
        ORDERS.len(),
        STEPS.len(),
        STEPS.join(" -> ")
    );
    say!(
        "State lives in {}; a step is shown done once its result is committed there.",
        store.shown()
    );
    say!();

    let priors = submit_all(&runtime, &store).await?;
    announce(&priors, &store);

    let mut outcomes: HashMap<String, RunOutcome> = HashMap::new();
    let mut unfinished: HashSet<String> = HashSet::new();
    for (id, prior) in &priors {
        match prior {
            Prior::Finished(outcome) => {
                outcomes.insert(id.clone(), outcome.clone());
            }
            _ => {
                unfinished.insert(id.clone());
            }
        }
    }
    if unfinished.is_empty() {
        print_summary(&priors, &outcomes);
        drop(runtime);
        // No stop request to answer: the process does not listen for one
        // yet, so Ctrl-C ends it.
        close_writer(&store, queue, std::future::pending()).await?;
        return Ok(Exit::Ok);
    }

    // Durable reads for the UI: a reader sees only what is durable.
    let client = store.open_single_client().await?;
    let mut signals = Signals::listen()?;
    let stop = CancellationToken::new();
    let mut worker = tokio::spawn({
        let runtime = runtime.clone();
        let stop = stop.clone();
        async move { runtime.run(stop.cancelled_owned()).await }
    });

    let bars: Vec<(String, u32, String)> = priors
        .iter()
        .filter_map(|(id, prior)| match prior {
            Prior::New => Some((id.clone(), 0, "queued".to_string())),
            Prior::Resuming(status) => Some((
                id.clone(),
                status.current_step,
                format!("resuming at step {}", step_label(status.current_step)),
            )),
            Prior::Settling => Some((id.clone(), 0, "recording its failure".to_string())),
            Prior::Finished(_) => None,
        })
        .collect();
    let ui = Ui::new(&bars);
    let started = Instant::now();
    let mut tracker = Tracker::default();
    let mut failure: Option<String> = None;
    let mut stopped_by: Option<&'static str> = None;
    let mut worker_result = None;
    let mut tick = tokio::time::interval(Duration::from_millis(150));

    while !unfinished.is_empty() {
        tokio::select! {
            Some(work) = work_rx.recv() => {
                for fact in tracker.work(work) {
                    ui.show(&fact, started.elapsed());
                }
            }
            Some(outcome) = end_rx.recv() => {
                if unfinished.remove(&outcome.run_id) {
                    outcomes.insert(outcome.run_id.clone(), outcome.clone());
                    ui.show(&tracker.ended(outcome), started.elapsed());
                }
            }
            _ = tick.tick() => {
                // A stop request during the reads stops them (the runs left
                // are read again once the pool has stopped).
                let confirmed = confirm_waiting(
                    &mut tracker,
                    Reads::Client(&client),
                    &store,
                    signals.next(),
                )
                .await;
                for fact in confirmed.facts {
                    ui.show(&fact, started.elapsed());
                }
                if let Some(cut) = confirmed.interrupted {
                    stopped_by = Some(cut.by);
                    break;
                }
            }
            signal = signals.next() => {
                stopped_by = Some(signal);
                break;
            }
            joined = &mut worker => {
                worker_result = Some(joined);
                break;
            }
        }
    }

    if let Some(signal) = stopped_by {
        ui.log(&format!(
            "{signal}: stopping; the steps in flight finish and commit first ({signal} again \
             skips the rest of their work, a third time quits at once)."
        ));
    }
    stop.cancel();
    let joined = match worker_result {
        Some(joined) => joined,
        None => {
            let mut presses = 0;
            loop {
                tokio::select! {
                    joined = &mut worker => break joined,
                    signal = signals.next() => {
                        presses += 1;
                        if presses == 1 {
                            hurry.cancel();
                            ui.log(&format!(
                                "{signal} again: skipping the rest of the steps' simulated work; \
                                 they commit now."
                            ));
                        } else {
                            say_err!(
                                "Quitting at once. Nothing committed is lost; the steps that \
                                 were in flight run again next time."
                            );
                            std::process::exit(4);
                        }
                    }
                }
            }
        }
    };
    match joined {
        Ok(Ok(())) if stopped_by.is_some() || unfinished.is_empty() => {}
        Ok(Ok(())) => failure = Some("the worker pool stopped unexpectedly".into()),
        Ok(Err(e)) => {
            failure = Some(format!(
                "the worker pool stopped: {e}. If another process opened {} (taquba has one \
                 writer per store; the newer one fences the older), stop it, then run `{}` to \
                 resume",
                store.shown(),
                suggest(&demo_args(&store))
            ));
        }
        Err(e) => failure = Some(format!("the worker pool's task failed: {e}")),
    }

    // The pool has stopped: every commit it made has returned, so what it
    // reported and what the store says now are durable.
    while let Ok(work) = work_rx.try_recv() {
        for fact in tracker.work(work) {
            ui.show(&fact, started.elapsed());
        }
    }
    while let Ok(outcome) = end_rx.try_recv() {
        if unfinished.remove(&outcome.run_id) {
            outcomes.insert(outcome.run_id.clone(), outcome.clone());
            ui.show(&tracker.ended(outcome), started.elapsed());
        }
    }
    // The runs whose end was not read because a stop request cut the reads
    // short: they may have ended.
    let mut unchecked: Vec<String> = Vec::new();
    if failure.is_none() {
        let mut left: Vec<String> = unfinished.iter().cloned().collect();
        left.sort();
        let mut cut_by = None;
        for (i, id) in left.iter().enumerate() {
            let read = store.bounded("reading an outcome", runtime.outcome(id));
            let read = tokio::select! {
                biased;
                by = signals.next() => {
                    cut_by = Some(by);
                    unchecked = left[i..].to_vec();
                    break;
                }
                read = read => read,
            };
            if let Ok(Some(outcome)) = read {
                unfinished.remove(id);
                outcomes.insert(id.clone(), outcome.clone());
                ui.show(&tracker.ended(outcome), started.elapsed());
            }
        }
        for id in &unchecked {
            unfinished.remove(id);
        }
        let cut = match cut_by {
            // Stopped already: read nothing more, but say what is left.
            Some(by) => {
                let ids: Vec<String> = unchecked.iter().map(|id| shown(id)).collect();
                let mut outcome = vec!["outcome", "RUN_ID"];
                let store_args = store.args();
                outcome.extend(store_args.iter().map(String::as_str));
                ui.warn(&format!(
                    "{by}: stopped reading the store; not checked whether {} run(s) ended: {} \
                     (`{}` shows it)",
                    ids.len(),
                    ids.join(", "),
                    suggest(&outcome)
                ));
                Some(Interrupted {
                    by,
                    unconfirmed: tracker.awaiting(),
                })
            }
            None => {
                let confirmed = confirm_waiting(
                    &mut tracker,
                    Reads::Runtime(&runtime),
                    &store,
                    signals.next(),
                )
                .await;
                for fact in confirmed.facts {
                    ui.show(&fact, started.elapsed());
                }
                confirmed.interrupted
            }
        };
        if let Some(cut) = cut
            && !cut.unconfirmed.is_empty()
        {
            ui.warn(&cut.message(&store));
        }
    }
    ui.stop_remaining();
    store.close_reader(client.close()).await;
    drop(runtime);
    let closed = close_writer(&store, queue, signals.next()).await;

    if let Some(failure) = failure {
        return Err(CliError::failure(failure));
    }
    closed?;
    say!();
    if unfinished.is_empty() && unchecked.is_empty() {
        say!(
            "All {} runs finished in {:.1}s.",
            ORDERS.len(),
            started.elapsed().as_secs_f64()
        );
        print_summary(&priors, &outcomes);
        return Ok(Exit::Ok);
    }
    let mut left: Vec<_> = unfinished.into_iter().collect();
    left.sort();
    let mut parts = vec![];
    if !left.is_empty() {
        parts.push(format!(
            "{} run(s) unfinished ({})",
            left.len(),
            left.join(", ")
        ));
    }
    if !unchecked.is_empty() {
        let ids: Vec<String> = unchecked.iter().map(|id| shown(id)).collect();
        parts.push(format!(
            "{} run(s) not checked ({}; they may have ended)",
            ids.len(),
            ids.join(", ")
        ));
    }
    say!(
        "Stopped. {}; their progress is saved in {}.",
        parts.join(", "),
        store.shown()
    );
    say!(
        "To resume them, run the same command again without --reset: {}",
        suggest(&demo_args(&store))
    );
    Ok(Exit::Unfinished)
}

/// `demo --dir PATH` as arguments.
fn demo_args(store: &Store) -> Vec<&str> {
    let mut args = vec!["demo"];
    if let Some(dir) = &store.dir {
        args.push("--dir");
        args.push(dir.to_str().unwrap_or("waymark-data"));
    }
    args
}

/// Where [`confirm_waiting`] reads a run's status.
#[derive(Clone, Copy)]
pub enum Reads<'a> {
    /// A client's reader, which sees only durable commits (while a pool
    /// runs).
    Client(&'a Client),
    /// The runtime, once its pool has stopped (every commit it made has
    /// returned).
    Runtime(&'a Runtime),
    /// A fleet's readers, on each run's shard.
    Fleet(&'a FleetClient),
}

/// What [`confirm_waiting`] confirmed, and what a stop request cut short.
#[derive(Debug)]
pub struct Confirmations {
    /// The facts the reads proved durable, for the UI.
    pub facts: Vec<Shown>,
    /// Set when a stop request arrived before every run was read.
    pub interrupted: Option<Interrupted>,
}

/// Reads a stop request cut short.
#[derive(Debug)]
pub struct Interrupted {
    /// The stop request (`Ctrl-C`, `SIGTERM`).
    pub by: &'static str,
    /// The runs whose status was not read (the read in flight was dropped):
    /// their last step is still unconfirmed, and stays unshown.
    pub unconfirmed: Vec<String>,
}

impl Interrupted {
    /// The line for stderr: which runs were not confirmed, and how to look.
    pub fn message(&self, store: &Store) -> String {
        let ids: Vec<String> = self.unconfirmed.iter().map(|id| shown(id)).collect();
        let store_args = store.args();
        let mut status = vec!["status", "RUN_ID"];
        status.extend(store_args.iter().map(String::as_str));
        format!(
            "{}: stopped reading the store; not confirmed whether the last step of {} run(s) \
             committed: {} (`{}` shows where each stands)",
            self.by,
            ids.len(),
            ids.join(", "),
            suggest(&status)
        )
    }
}

/// Confirm the runs whose last step awaits confirmation (a wait before the
/// next step, a retry's backoff) from durable state, read from `reads`, one
/// run at a time (each read bounded by the store's timeout). Once
/// `interrupt` resolves (a stop request), no further run is read and the
/// read in flight is dropped: the runs left are named in
/// [`Confirmations::interrupted`] and stay in `tracker`, unconfirmed.
pub async fn confirm_waiting(
    tracker: &mut Tracker,
    reads: Reads<'_>,
    store: &Store,
    interrupt: impl Future<Output = &'static str>,
) -> Confirmations {
    let mut facts = vec![];
    let mut interrupt = std::pin::pin!(interrupt);
    let waiting = tracker.awaiting();
    for (i, id) in waiting.iter().enumerate() {
        let what = "reading a run's status";
        let read = async {
            match reads {
                Reads::Client(client) => store.bounded(what, client.status(id)).await,
                Reads::Runtime(runtime) => store.bounded(what, runtime.status(id)).await,
                Reads::Fleet(fleet) => store.bounded(what, fleet.status(id)).await,
            }
        };
        let status = tokio::select! {
            biased;
            by = &mut interrupt => {
                let unconfirmed = waiting[i..].to_vec();
                return Confirmations {
                    facts,
                    interrupted: Some(Interrupted { by, unconfirmed }),
                };
            }
            status = read => status,
        };
        if let Ok(Some(status)) = status {
            facts.extend(tracker.durable(&status));
        }
    }
    Confirmations {
        facts,
        interrupted: None,
    }
}

/// Classify and (idempotently) submit every order.
async fn submit_all(runtime: &Runtime, store: &Store) -> CliResult<Vec<(String, Prior)>> {
    let mut priors = Vec::with_capacity(ORDERS.len());
    for (i, order) in ORDERS.iter().enumerate() {
        let id = run_id(i);
        let prior = classify(runtime, store, &id).await?;
        let spec = RunSpec {
            run_id: Some(id.clone()),
            input: order.input(),
            ..Default::default()
        };
        let submitted = match tokio::time::timeout(store.timeout, runtime.submit(spec)).await {
            Ok(Ok(submitted)) => submitted,
            Ok(Err(waymark::Error::InputMismatch(_))) => {
                return Err(CliError::refused(format!(
                    "{} holds a run {id} with another input, so it is not this demo's store; \
                     choose another --dir",
                    store.shown()
                )));
            }
            Ok(Err(e)) => return Err(CliError::failure(format!("cannot submit {id}: {e}"))),
            Err(_) => return Err(store.timed_out(&format!("submitting {id}"))),
        };
        let prior = match prior {
            Prior::New if !submitted.newly_submitted => Prior::Settling,
            p => p,
        };
        priors.push((id, prior));
    }
    Ok(priors)
}

/// Say where each run stands before the pool starts.
fn announce(priors: &[(String, Prior)], store: &Store) {
    let resuming = priors
        .iter()
        .filter(|(_, p)| matches!(p, Prior::Resuming(_) | Prior::Settling))
        .count();
    let finished = priors
        .iter()
        .filter(|(_, p)| matches!(p, Prior::Finished(_)))
        .count();
    if resuming + finished == 0 {
        say!(
            "No earlier progress found: submitting {} new runs.",
            ORDERS.len()
        );
    } else if resuming == 0 {
        say!(
            "Found earlier progress in {}: all {finished} runs already finished, nothing to \
             resume (`{}` starts over).",
            store.shown(),
            suggest(&[demo_args(store), vec!["--reset"]].concat())
        );
    } else {
        say!(
            "Found earlier progress in {}: {resuming} unfinished run(s) resume where they \
             stopped, {finished} already finished.",
            store.shown()
        );
    }
    for ((id, prior), order) in priors.iter().zip(&ORDERS) {
        match prior {
            Prior::New => say!("  new        {id}  {}", order.summary()),
            Prior::Resuming(status) => say!(
                "  resuming   {id} at step {} (stopped earlier; {})",
                step_label(status.current_step),
                describe::state(status)
            ),
            Prior::Finished(outcome) => say!(
                "  finished   {id}  {} at step {} (stored outcome)",
                describe::status_word(outcome.status),
                step_label(outcome.final_step)
            ),
            Prior::Settling => say!(
                "  resuming   {id} (its last step gave up while the demo was stopped; \
                 recording its failure)"
            ),
        }
    }
    say!();
}

/// Print the table of every run's outcome.
fn print_summary(priors: &[(String, Prior)], outcomes: &HashMap<String, RunOutcome>) {
    let header = ["RUN", "STATUS", "FINAL STEP", "RESULT / ERROR"];
    let rows: Vec<[String; 4]> = priors
        .iter()
        .map(|(id, _)| match outcomes.get(id) {
            Some(o) => [
                id.clone(),
                describe::status_word(o.status).to_string(),
                step_label(o.final_step),
                describe::detail(o),
            ],
            None => [id.clone(), "Unfinished".into(), "-".into(), "-".into()],
        })
        .collect();
    let width = |col: usize| {
        rows.iter()
            .map(|r| r[col].chars().count())
            .chain([header[col].len()])
            .max()
            .unwrap_or(0)
    };
    let (w0, w1, w2) = (width(0), width(1), width(2));
    say!(
        "{:<w0$}  {:<w1$}  {:<w2$}  {}",
        header[0],
        header[1],
        header[2],
        header[3]
    );
    for r in &rows {
        say!("{:<w0$}  {:<w1$}  {:<w2$}  {}", r[0], r[1], r[2], r[3]);
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::task::Poll;

    use futures_util::poll;
    use tokio::sync::oneshot;
    use waymark::taquba::object_store::memory::InMemory;
    use waymark::testkit::{FaultPlan, FaultStore, StoreOp};
    use waymark::{StoreLocation, StoreOptions, open_worker_store};

    use super::domain::{Verdict, Work};
    use super::*;

    /// A bound that only turns a hang into a failure.
    const HANG_GUARD: Duration = Duration::from_secs(30);

    /// Wait, bounded by [`HANG_GUARD`], until `ready` says so.
    async fn wait_until<F: Future<Output = bool>>(what: &str, mut ready: impl FnMut() -> F) {
        let waited = tokio::time::timeout(HANG_GUARD, async {
            while !ready().await {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(waited.is_ok(), "timed out waiting until {what}");
    }

    /// A stop request while a status read is held stops `confirm_waiting`
    /// at once (not after the store's timeout for each run), names every run
    /// it did not confirm, and confirms none of them.
    #[tokio::test]
    async fn a_stop_request_cuts_held_status_reads_short() {
        let object_store = FaultStore::new(Arc::new(InMemory::new()), 0, FaultPlan::default());
        let faults = object_store.faults();
        let location = StoreLocation::new(object_store, "store");
        // No beat during the test: the only write is the submit below.
        let options = StoreOptions::default()
            .queue_name(DEFAULT_STEP_QUEUE)
            .liveness_heartbeat(Duration::from_secs(3600));
        let queue = open_worker_store(&location, options).await.unwrap();
        // A timeout far past the hang guard: a read that waits for it fails
        // the test.
        let store = Store {
            name: "the test store".into(),
            dir: None,
            local: None,
            url: "memory://".into(),
            timeout: HANG_GUARD * 10,
        };
        let (work_tx, _work_rx) = mpsc::unbounded_channel();
        let (end_tx, _end_rx) = mpsc::unbounded_channel();
        let runtime = build_runtime(
            queue,
            &store,
            OrderPipeline::new(work_tx, CancellationToken::new()),
            OutcomeHook::new(end_tx),
            Vec::new(),
            None,
        )
        .unwrap();

        // demo-order-01's submit commits but never becomes durable (its WAL
        // write is held), so reading its status waits for that commit: a
        // store that answers everything else and stalls this read.
        faults.hold(StoreOp::Put, "wal");
        let held_id = run_id(0);
        let submit = tokio::spawn({
            let runtime = runtime.clone();
            let spec = RunSpec {
                run_id: Some(held_id.clone()),
                input: ORDERS[0].input(),
                ..Default::default()
            };
            async move { runtime.submit(spec).await }
        });
        let view_key = format!("wm/{DEFAULT_STEP_QUEUE}/sub/{held_id}").into_bytes();
        wait_until("the submit is visible and its write held", || {
            let (queue, key) = (runtime.queue().clone(), view_key.clone());
            let held = faults.held();
            async move { held > 0 && matches!(queue.view().kv_get(&key).await, Ok(Some(_))) }
        })
        .await;

        // Two runs await confirmation; the first one's read is held.
        let mut tracker = Tracker::default();
        for id in [run_id(0), run_id(1)] {
            tracker.work(Work::Finished {
                run_id: id,
                step: 0,
                attempt: 1,
                took: Duration::from_millis(5),
                verdict: Verdict::Continue {
                    delay: Duration::from_secs(1),
                },
            });
        }
        assert_eq!(tracker.awaiting(), [run_id(0), run_id(1)]);

        let (press, pressed) = oneshot::channel::<()>();
        let interrupt = async move {
            let _ = pressed.await;
            "Ctrl-C"
        };
        let mut confirming = Box::pin(confirm_waiting(
            &mut tracker,
            Reads::Runtime(&runtime),
            &store,
            interrupt,
        ));
        // Its first read is held (the commit it waits for cannot land).
        assert!(matches!(poll!(confirming.as_mut()), Poll::Pending));
        press.send(()).unwrap();
        let confirmed = tokio::time::timeout(HANG_GUARD, confirming)
            .await
            .expect("confirm_waiting went on reading after the stop request");

        assert!(confirmed.facts.is_empty(), "{:?}", confirmed.facts);
        let cut = confirmed
            .interrupted
            .expect("an interrupted confirmation says so");
        assert_eq!(cut.by, "Ctrl-C");
        assert_eq!(cut.unconfirmed, [run_id(0), run_id(1)]);
        let message = cut.message(&store);
        assert!(message.starts_with("Ctrl-C: "), "{message}");
        assert!(
            message.contains("not confirmed whether the last step of 2 run(s) committed"),
            "{message}"
        );
        assert!(
            message.contains("demo-order-01, demo-order-02"),
            "{message}"
        );
        // Nothing was confirmed: both still await confirmation.
        assert_eq!(tracker.awaiting(), [run_id(0), run_id(1)]);

        faults.release();
        let submitted = tokio::time::timeout(HANG_GUARD, submit)
            .await
            .expect("the submit lands once released")
            .unwrap()
            .unwrap();
        assert!(submitted.newly_submitted);
    }
}
