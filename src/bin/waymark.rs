//! `waymark`: the command-line face of the Waymark workflow runtime.
//!
//! `waymark demo` needs no setup. It opens a local-disk store in
//! `./waymark-data` (or `--dir`), submits eight example orders through a
//! five-step pipeline (validate, reserve stock, charge card, ship, notify) and
//! shows every step live: one progress bar per run on a terminal, one line
//! per step otherwise (`waymark demo | cat`). The orders are chosen so that
//! every outcome shows up: most succeed, one succeeds after a transient
//! payment-gateway error is retried, one card is declined, one parcel is
//! refused by the carrier for good, and one order cancels itself.
//!
//! Every step commits to the store before the next one starts, so the demo
//! can be killed at any moment (Ctrl-C, or `kill -9`). Running the same
//! command again finds the earlier progress: runs that had finished print
//! their stored outcome, and unfinished runs resume at the step where they
//! stopped, which the demo says before it resumes them. The run ids are fixed
//! (`demo-order-01` .. `demo-order-08`) and the inputs deterministic, so the
//! second submit of a run attaches to the existing run instead of starting a
//! new one. `waymark demo --reset` deletes the data directory and starts over.
//!
//! `waymark status <run-id>` and `waymark outcome <run-id>` open the same
//! store and print a run's durable status or terminal outcome. taquba is
//! single-writer: opening a store fences any other process that has it open,
//! so run them while no demo is running on that directory.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use clap::{Args, Parser, Subcommand};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use waymark::taquba::object_store::local::LocalFileSystem;
use waymark::taquba::{OpenOptions, Queue};
use waymark::{
    NoopTerminalHook, RetryPolicy, RunOutcome, RunSpec, RunState, RunStatus, Step, StepError,
    StepOutcome, StepRunner, TerminalStatus, WorkflowRuntime,
};

// ---------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------

/// `println!` that ignores a closed stdout (`waymark demo | head`) instead of
/// panicking: the demo keeps its state consistent either way.
macro_rules! say {
    () => {
        say!("")
    };
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// `eprintln!` that ignores a closed stderr instead of panicking.
macro_rules! say_err {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

// ---------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------

/// Waymark: durable workflows on object storage.
///
/// Start with `waymark demo`: it runs example order pipelines on a local
/// directory and shows each step live. Kill it half-way and run it again: the
/// unfinished runs resume where they stopped.
#[derive(Debug, Parser)]
#[command(name = "waymark", version)]
struct Cli {
    /// What to do.
    #[command(subcommand)]
    command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Run eight example orders through a five-step pipeline, live.
    ///
    /// The runs have fixed ids (demo-order-01 .. demo-order-08) and their
    /// state lives in the data directory. Stop the demo at any moment
    /// (Ctrl-C, or even kill -9) and run the same command again: finished
    /// runs print their stored outcome and unfinished runs resume at the
    /// step where they stopped. Use --reset to start over.
    Demo {
        /// Where the store lives.
        #[command(flatten)]
        store: StoreArgs,
        /// Delete the data directory first and start over.
        #[arg(long)]
        reset: bool,
    },
    /// Print the durable status of a run (where a live run is, or how it ended).
    ///
    /// Opens the store in the data directory. taquba is single-writer:
    /// opening the store while a demo runs on it fences that demo (its worker
    /// stops with an error). Run this while no demo is running on the
    /// directory; a stopped demo resumes when started again.
    Status {
        /// The run, e.g. demo-order-03.
        run_id: String,
        /// Where the store lives.
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Print the terminal outcome of a run: status, final step, result or error.
    ///
    /// Opens the store in the data directory. taquba is single-writer:
    /// opening the store while a demo runs on it fences that demo (its worker
    /// stops with an error). Run this while no demo is running on the
    /// directory; a stopped demo resumes when started again.
    Outcome {
        /// The run, e.g. demo-order-05.
        run_id: String,
        /// Where the store lives.
        #[command(flatten)]
        store: StoreArgs,
    },
}

/// Where the store lives.
#[derive(Debug, Args)]
struct StoreArgs {
    /// The data directory holding the store.
    #[arg(long, value_name = "PATH", default_value = "waymark-data")]
    dir: PathBuf,
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// An error the CLI reports (with `{}`) before exiting with a failure code.
#[derive(Debug)]
struct CliError(String);

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CliError {}

/// Wrap an error with what the CLI was doing: `what: error`.
fn context<E: fmt::Display>(what: impl fmt::Display) -> impl Fn(E) -> CliError {
    move |e| CliError(format!("{what}: {e}"))
}

/// The result type of the CLI's fallible functions.
type CliResult<T> = Result<T, CliError>;

// ---------------------------------------------------------------------------
// Entry point
// ---------------------------------------------------------------------------

/// Exit code after a Ctrl-C (128 + SIGINT), as shells report it.
const EXIT_INTERRUPTED: u8 = 130;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            say_err!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Demo { store, reset } => demo(&store.dir, reset).await,
            Command::Status { run_id, store } => status(&store.dir, &run_id).await,
            Command::Outcome { run_id, store } => outcome(&store.dir, &run_id).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            say_err!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------
// The store and the runtime
// ---------------------------------------------------------------------------

/// The store's path inside the data directory.
const STORE_PATH: &str = "waymark";
/// The step queue the demo's runs use.
const STEP_QUEUE: &str = "demo-orders";

/// The runtime type every subcommand builds.
type Runtime = WorkflowRuntime<OrderPipeline, NoopTerminalHook>;

/// Open the taquba queue on the local directory `dir` (which must exist),
/// tuned to feel interactive: 10 ms WAL flushes, 20 ms scheduler passes.
async fn open_queue(dir: &Path) -> CliResult<Arc<Queue>> {
    let store = LocalFileSystem::new_with_prefix(dir)
        .map_err(context(format!("cannot use {} as a store", dir.display())))?;
    let options = OpenOptions::default()
        .flush_interval(Duration::from_millis(10))
        .scheduler_interval(Duration::from_millis(20));
    let queue = Queue::open_with_options(Arc::new(store), STORE_PATH, options)
        .await
        .map_err(context(format!(
            "cannot open the store in {}",
            dir.display()
        )))?;
    Ok(Arc::new(queue))
}

/// Build the demo's runtime over `queue`, reporting step progress to
/// `progress`.
fn build_runtime(queue: Arc<Queue>, progress: mpsc::UnboundedSender<Event>) -> CliResult<Runtime> {
    WorkflowRuntime::builder(queue, OrderPipeline { progress }, NoopTerminalHook)
        .queue_name(STEP_QUEUE)
        .max_concurrent_steps(4)
        .poll_interval(Duration::from_millis(50))
        .default_retry_policy(RetryPolicy {
            initial: Duration::from_millis(400),
            multiplier: 2.0,
            max_delay: Duration::from_secs(2),
            jitter: 0.2,
            max_attempts: 4,
        })
        .build()
        .map_err(context("cannot build the workflow runtime"))
}

/// Close the queue cleanly once nothing else holds it. Best effort: every
/// step already committed, so a queue that cannot be closed is just dropped.
async fn close_queue(queue: Arc<Queue>) -> CliResult<()> {
    match Arc::try_unwrap(queue) {
        Ok(queue) => queue
            .close()
            .await
            .map_err(context("closing the store failed")),
        Err(_) => Ok(()),
    }
}

// ---------------------------------------------------------------------------
// The example workflow: an order pipeline
// ---------------------------------------------------------------------------

/// The pipeline's steps, by step number.
const STEPS: [&str; 5] = ["validate", "reserve stock", "charge card", "ship", "notify"];

/// How long the "charge card" step waits before shipping (`ContinueAfter`):
/// the warehouse's next pick-up window.
const PICKUP_WAIT: Duration = Duration::from_millis(1200);

/// Simulated work of each step before jitter, in milliseconds.
const STEP_WORK_MS: [u64; 5] = [250, 400, 550, 450, 200];

/// A card number the payment gateway declines.
const DECLINED_CARD: &str = "4000-0000-0000-0002";
/// A card number whose first charge attempt times out at the gateway.
const FLAKY_CARD: &str = "4000-0000-0000-0119";
/// A product that turns out to be discontinued.
const DISCONTINUED_SKU: &str = "LAMP-07";

/// One example order, the input of one run.
struct Order {
    /// Who ordered.
    customer: &'static str,
    /// Where the receipt goes.
    email: &'static str,
    /// What was ordered.
    sku: &'static str,
    /// How many.
    qty: u32,
    /// The total, in cents.
    total_cents: u32,
    /// The card to charge.
    card: &'static str,
    /// Where to ship.
    ship_to: &'static str,
}

/// The demo's orders; order `i` is run `demo-order-{i+1:02}`.
const ORDERS: [Order; 8] = [
    Order {
        customer: "Ada Lovelace",
        email: "ada@example.com",
        sku: "BOOK-01",
        qty: 2,
        total_cents: 5990,
        card: "4242-4242-4242-4242",
        ship_to: "12 St James's Square, London",
    },
    Order {
        customer: "Grace Hopper",
        email: "grace@example.com",
        sku: "CABLE-3M",
        qty: 1,
        total_cents: 1250,
        card: "5555-5555-5555-4444",
        ship_to: "1 Navy Yard, Arlington VA",
    },
    Order {
        customer: "Alan Turing",
        email: "alan@example.com",
        sku: "CHESS-SET",
        qty: 1,
        total_cents: 8900,
        card: FLAKY_CARD,
        ship_to: "Hollymeade, Wilmslow",
    },
    Order {
        customer: "Katherine Johnson",
        email: "katherine@example.com",
        sku: "SLIDE-RULE",
        qty: 3,
        total_cents: 14700,
        card: "4242-4242-4242-4242",
        ship_to: "Langley Research Center, Hampton VA",
    },
    Order {
        customer: "Edsger Dijkstra",
        email: "edsger@example.com",
        sku: "FOUNTAIN-PEN",
        qty: 1,
        total_cents: 21000,
        card: DECLINED_CARD,
        ship_to: "Plataanstraat 5, Nuenen",
    },
    Order {
        customer: "Barbara Liskov",
        email: "barbara@example.com",
        sku: "KEYBOARD",
        qty: 1,
        total_cents: 11900,
        card: "5555-5555-5555-4444",
        ship_to: "32 Vassar St, Cambridge MA",
    },
    Order {
        customer: "Claude Shannon",
        email: "claude@example.com",
        sku: "UNICYCLE",
        qty: 1,
        total_cents: 32500,
        card: "4242-4242-4242-4242",
        ship_to: "PO Box 17, Winchester MA",
    },
    Order {
        customer: "Margaret Hamilton",
        email: "margaret@example.com",
        sku: DISCONTINUED_SKU,
        qty: 1,
        total_cents: 4500,
        card: "4242-4242-4242-4242",
        ship_to: "1 Draper Way, Cambridge MA",
    },
];

impl Order {
    /// The run's input: `key=value` pairs separated by `;`, deterministic so
    /// that submitting it again is idempotent.
    fn input(&self) -> Vec<u8> {
        format!(
            "customer={};email={};sku={};qty={};total_cents={};card={};ship_to={}",
            self.customer,
            self.email,
            self.sku,
            self.qty,
            self.total_cents,
            self.card,
            self.ship_to
        )
        .into_bytes()
    }

    /// One line describing the order.
    fn summary(&self) -> String {
        format!(
            "{}, {} x {}, {}",
            self.customer,
            self.qty,
            self.sku,
            money(self.total_cents)
        )
    }
}

/// The run id of order `index` (0-based).
fn run_id(index: usize) -> String {
    format!("demo-order-{:02}", index + 1)
}

/// Cents as dollars: `$59.90`.
fn money(cents: u32) -> String {
    format!("${}.{:02}", cents / 100, cents % 100)
}

/// A stable 32-bit hash (FNV-1a), for deterministic ids and step durations.
fn fnv1a(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// A reference like `RSV-1A2B3C`, the same for the same run every time.
fn reference(prefix: &str, run_id: &str) -> String {
    format!(
        "{prefix}-{:06X}",
        fnv1a(&format!("{prefix}{run_id}")) & 0xFF_FFFF
    )
}

/// The name of step `step`, or `step N` past the pipeline's end.
fn step_name(step: u32) -> String {
    usize::try_from(step)
        .ok()
        .and_then(|i| STEPS.get(i))
        .map_or_else(|| format!("step {step}"), |name| (*name).to_string())
}

/// `3/5 charge card` for step number 2.
fn step_label(step: u32) -> String {
    format!(
        "{}/{} {}",
        step.saturating_add(1),
        STEPS.len(),
        step_name(step)
    )
}

/// A step payload: the order's fields plus what earlier steps added.
struct Fields(Vec<(String, String)>);

impl Fields {
    /// Parse `key=value;key=value`.
    fn parse(payload: &[u8]) -> Result<Self, StepError> {
        let text = std::str::from_utf8(payload)
            .map_err(|_| StepError::permanent("the order is not UTF-8 text"))?;
        text.split(';')
            .map(|pair| {
                pair.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .ok_or_else(|| StepError::permanent(format!("malformed order field `{pair}`")))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Fields)
    }

    /// The value of `key`, or a permanent error naming it.
    fn get(&self, key: &str) -> Result<&str, StepError> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .ok_or_else(|| StepError::permanent(format!("the order has no `{key}`")))
    }

    /// The payload with `key=value` added.
    fn with(mut self, key: &str, value: String) -> Vec<u8> {
        self.0.push((key.to_string(), value));
        self.0
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(";")
            .into_bytes()
    }
}

/// What the pipeline tells the UI while it works.
#[derive(Debug)]
enum Event {
    /// A step attempt began.
    Started {
        /// The run.
        run_id: String,
        /// The step.
        step: u32,
        /// Which attempt (1-based).
        attempt: u32,
    },
    /// A step's work finished and its outcome is being committed.
    Finished {
        /// The run.
        run_id: String,
        /// The step.
        step: u32,
        /// How long the work took.
        took: Duration,
        /// When the next step runs (`None`: the run ends with this step).
        next: Option<Duration>,
    },
    /// A step attempt failed.
    Errored {
        /// The run.
        run_id: String,
        /// The step.
        step: u32,
        /// Which attempt failed.
        attempt: u32,
        /// Whether another attempt follows.
        will_retry: bool,
        /// What went wrong.
        error: String,
    },
    /// The run ended (from [`WorkflowRuntime::wait`]).
    Ended {
        /// The run.
        run_id: String,
        /// Its terminal outcome, or why waiting failed.
        outcome: Result<RunOutcome, String>,
    },
}

/// The example [`StepRunner`]: a five-step order pipeline whose steps sleep
/// a realistic while and report their progress to the UI.
struct OrderPipeline {
    /// Where progress goes (the UI; sends fail silently once it is gone).
    progress: mpsc::UnboundedSender<Event>,
}

impl OrderPipeline {
    /// Tell the UI something; the UI may have stopped listening.
    fn report(&self, event: Event) {
        let _ = self.progress.send(event);
    }

    /// The business logic of one step, after its simulated work.
    fn decide(step: &Step, order: Fields) -> Result<StepOutcome, StepError> {
        let run_id = step.run_id.as_str();
        Ok(match step.step_number {
            0 => {
                let qty: u32 = order
                    .get("qty")?
                    .parse()
                    .map_err(|_| StepError::permanent("quantity is not a number"))?;
                if qty == 0 {
                    return Ok(StepOutcome::Fail {
                        reason: "the order has no items".into(),
                    });
                }
                StepOutcome::Continue {
                    payload: order.with("validated", "yes".into()),
                }
            }
            1 => {
                let sku = order.get("sku")?;
                if sku == DISCONTINUED_SKU {
                    return Ok(StepOutcome::Cancel {
                        reason: format!("{sku} was discontinued; order withdrawn, nothing charged"),
                    });
                }
                StepOutcome::Continue {
                    payload: order.with("reservation", reference("RSV", run_id)),
                }
            }
            2 => {
                let card = order.get("card")?;
                if card == DECLINED_CARD {
                    return Ok(StepOutcome::Fail {
                        reason: "card declined by the issuer (insufficient funds)".into(),
                    });
                }
                if card == FLAKY_CARD && step.attempts == 1 {
                    return Err(StepError::transient("payment gateway timed out (HTTP 504)"));
                }
                StepOutcome::ContinueAfter {
                    payload: order.with("charge", reference("CH", run_id)),
                    delay: PICKUP_WAIT,
                }
            }
            3 => {
                if order.get("ship_to")?.starts_with("PO Box") {
                    return Err(StepError::permanent(
                        "carrier refuses parcels over 2 kg to a PO Box",
                    ));
                }
                StepOutcome::Continue {
                    payload: order.with("tracking", reference("1WM", run_id)),
                }
            }
            4 => {
                let total: u32 = order
                    .get("total_cents")?
                    .parse()
                    .map_err(|_| StepError::permanent("total is not a number"))?;
                StepOutcome::Succeed {
                    result: format!(
                        "charged {} ({}), tracking {}, receipt sent to {}",
                        money(total),
                        order.get("charge")?,
                        order.get("tracking")?,
                        order.get("email")?
                    )
                    .into_bytes(),
                }
            }
            n => {
                return Err(StepError::permanent(format!(
                    "the pipeline has no step {n}"
                )));
            }
        })
    }
}

impl StepRunner for OrderPipeline {
    async fn run_step(&self, step: &Step) -> Result<StepOutcome, StepError> {
        self.report(Event::Started {
            run_id: step.run_id.clone(),
            step: step.step_number,
            attempt: step.attempts,
        });
        let began = Instant::now();
        let order = Fields::parse(&step.payload)?;
        // Simulated work: the step's base time plus up to 150 ms, fixed per run.
        let base = usize::try_from(step.step_number)
            .ok()
            .and_then(|i| STEP_WORK_MS.get(i))
            .copied()
            .unwrap_or(200);
        let spread = u64::from(fnv1a(&format!("{}#{}", step.run_id, step.step_number)) % 150);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(base + spread)) => {}
            // The run was cancelled: whatever we return is discarded.
            _ = step.cancel_token.cancelled() => {
                return Err(StepError::transient("cancelled while running"));
            }
        }
        let decided = Self::decide(step, order);
        match &decided {
            Ok(outcome) => self.report(Event::Finished {
                run_id: step.run_id.clone(),
                step: step.step_number,
                took: began.elapsed(),
                next: match outcome {
                    StepOutcome::Continue { .. } => Some(Duration::ZERO),
                    StepOutcome::ContinueAfter { delay, .. } => Some(*delay),
                    _ => None,
                },
            }),
            Err(e) => self.report(Event::Errored {
                run_id: step.run_id.clone(),
                step: step.step_number,
                attempt: step.attempts,
                will_retry: !e.is_permanent() && step.attempts < step.max_attempts,
                error: e.message.clone(),
            }),
        }
        decided
    }
}

// ---------------------------------------------------------------------------
// `waymark demo`
// ---------------------------------------------------------------------------

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

/// Read where run `run_id` stands, from durable state.
async fn classify(runtime: &Runtime, run_id: &str) -> CliResult<Prior> {
    let read = context(format!("cannot read the state of {run_id}"));
    if let Some(outcome) = runtime.outcome(run_id).await.map_err(&read)? {
        return Ok(Prior::Finished(outcome));
    }
    Ok(match runtime.status(run_id).await.map_err(read)? {
        Some(status) => Prior::Resuming(status),
        None => Prior::New,
    })
}

/// Run the demo on `dir`, deleting it first with `reset`.
async fn demo(dir: &Path, reset: bool) -> CliResult<ExitCode> {
    if reset && dir.exists() {
        check_resettable(dir)?;
        std::fs::remove_dir_all(dir)
            .map_err(context(format!("cannot delete {}", dir.display())))?;
        say!("--reset: deleted {}, starting over.", dir.display());
    }
    std::fs::create_dir_all(dir).map_err(context(format!("cannot create {}", dir.display())))?;

    let queue = open_queue(dir).await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let runtime = build_runtime(queue.clone(), tx.clone())?;

    say!(
        "Waymark demo: {} orders, each a durable run of {} steps ({}).",
        ORDERS.len(),
        STEPS.len(),
        STEPS.join(" -> ")
    );
    say!(
        "State lives in {}; every step commits there before the next one starts.",
        dir.display()
    );
    say!();

    // Where each run stands, then submit all of them (idempotent).
    let mut priors = Vec::with_capacity(ORDERS.len());
    for (i, order) in ORDERS.iter().enumerate() {
        let id = run_id(i);
        let prior = classify(&runtime, &id).await?;
        let submitted = runtime
            .submit(RunSpec {
                run_id: Some(id.clone()),
                input: order.input(),
                ..Default::default()
            })
            .await
            .map_err(|e| match e {
                waymark::Error::InputMismatch(_) => CliError(format!(
                    "{e}. {} holds runs from a different demo; start over with `waymark demo --reset`",
                    dir.display()
                )),
                e => CliError(format!("cannot submit {id}: {e}")),
            })?;
        let prior = match prior {
            Prior::New if !submitted.newly_submitted => Prior::Settling,
            p => p,
        };
        priors.push((id, prior));
    }

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
             resume (`waymark demo --reset` starts over).",
            dir.display()
        );
    } else {
        say!(
            "Found earlier progress in {}: {resuming} unfinished run(s) resume where they \
             stopped, {finished} already finished.",
            dir.display()
        );
    }
    for ((id, prior), order) in priors.iter().zip(&ORDERS) {
        match prior {
            Prior::New => say!("  new        {id}  {}", order.summary()),
            Prior::Resuming(status) => say!(
                "  resuming   {id} at step {} (interrupted earlier; {})",
                step_label(status.current_step),
                describe_state(status)
            ),
            Prior::Finished(outcome) => say!(
                "  finished   {id}  {} at step {} (stored outcome)",
                status_word(outcome.status),
                step_label(outcome.final_step)
            ),
            Prior::Settling => say!(
                "  resuming   {id} (its last step gave up while the demo was stopped; \
                 recording its failure)"
            ),
        }
    }
    say!();

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
        close_queue(queue).await?;
        return Ok(ExitCode::SUCCESS);
    }

    // The worker pool, stopped by `stop`.
    let stop = CancellationToken::new();
    let mut worker = tokio::spawn({
        let runtime = runtime.clone();
        let stop = stop.clone();
        async move { runtime.run(stop.cancelled_owned()).await }
    });
    // One waiter per unfinished run, reporting its end to the UI.
    let mut waiters = JoinSet::new();
    for id in &unfinished {
        let runtime = runtime.clone();
        let tx = tx.clone();
        let id = id.clone();
        waiters.spawn(async move {
            let outcome = runtime.wait(&id).await.map_err(|e| e.to_string());
            let _ = tx.send(Event::Ended {
                run_id: id,
                outcome,
            });
        });
    }
    drop(tx);

    let ui = Ui::new(&priors);
    let started = Instant::now();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut ctrl_c_armed = true;
    let mut worker_done = false;
    let mut failure: Option<String> = None;
    let mut interrupted = false;

    while !unfinished.is_empty() {
        tokio::select! {
            event = rx.recv() => {
                let Some(event) = event else { break };
                if let Event::Ended { run_id, outcome } = &event {
                    match outcome {
                        Ok(o) => {
                            unfinished.remove(run_id);
                            outcomes.insert(run_id.clone(), o.clone());
                        }
                        Err(e) => {
                            failure = Some(format!("waiting for {run_id} failed: {e}"));
                            break;
                        }
                    }
                }
                ui.show(&event, started.elapsed());
            }
            signal = &mut ctrl_c, if ctrl_c_armed => {
                ctrl_c_armed = false;
                if signal.is_ok() {
                    interrupted = true;
                    break;
                }
            }
            joined = &mut worker => {
                let why = match joined {
                    Ok(Ok(())) => "the worker pool stopped unexpectedly".to_string(),
                    Ok(Err(e)) => e.to_string(),
                    Err(e) => format!("the worker pool's task failed: {e}"),
                };
                worker_done = true;
                failure = Some(format!(
                    "{why}. Another process may have opened {} \
                     (taquba is single-writer, the newer process fences the older one). \
                     Run the demo again to resume.",
                    dir.display()
                ));
                break;
            }
        }
    }

    if interrupted {
        ui.log("Ctrl-C: stopping the worker; the steps in flight finish and commit first (Ctrl-C again quits at once).");
        tokio::spawn(async {
            if tokio::signal::ctrl_c().await.is_ok() {
                say_err!(
                    "Quitting at once. Nothing is lost: the runs resume from their last committed step."
                );
                std::process::exit(i32::from(EXIT_INTERRUPTED));
            }
        });
    }

    // Stop the worker and let in-flight steps settle.
    stop.cancel();
    if !worker_done
        && let Ok(Err(e)) = (&mut worker).await
        && failure.is_none()
        && !interrupted
    {
        failure = Some(format!("the worker pool stopped with an error: {e}"));
    }
    waiters.shutdown().await;
    // Events that arrived while the worker drained.
    while let Ok(event) = rx.try_recv() {
        if let Event::Ended {
            run_id,
            outcome: Ok(o),
        } = &event
        {
            unfinished.remove(run_id);
            outcomes.insert(run_id.clone(), o.clone());
        }
        ui.show(&event, started.elapsed());
    }
    // Runs whose last step committed during the drain, after their waiter
    // stopped listening: read their outcome from the store.
    if failure.is_none() {
        let mut left: Vec<String> = unfinished.iter().cloned().collect();
        left.sort();
        for id in left {
            if let Ok(Some(outcome)) = runtime.outcome(&id).await {
                unfinished.remove(&id);
                outcomes.insert(id.clone(), outcome.clone());
                let event = Event::Ended {
                    run_id: id,
                    outcome: Ok(outcome),
                };
                ui.show(&event, started.elapsed());
            }
        }
    }
    ui.stop_remaining();
    drop(runtime);
    let closed = close_queue(queue).await;

    if let Some(failure) = failure {
        return Err(CliError(failure));
    }
    closed?;
    say!();
    if unfinished.is_empty() {
        say!(
            "All {} runs finished in {:.1}s.",
            ORDERS.len(),
            started.elapsed().as_secs_f64()
        );
        print_summary(&priors, &outcomes);
        return Ok(ExitCode::SUCCESS);
    }
    let mut left: Vec<_> = unfinished.into_iter().collect();
    left.sort();
    say!(
        "Stopped. {} run(s) unfinished ({}); their progress is saved in {}.",
        left.len(),
        left.join(", "),
        dir.display()
    );
    say!(
        "To resume them, run the same command again without --reset, e.g.: {}",
        resume_command(dir)
    );
    Ok(ExitCode::from(EXIT_INTERRUPTED))
}

/// Refuse `--reset` on a directory holding anything but a Waymark store, so
/// a mistyped `--dir` cannot delete unrelated files.
fn check_resettable(dir: &Path) -> CliResult<()> {
    let entries =
        std::fs::read_dir(dir).map_err(context(format!("cannot read {}", dir.display())))?;
    let payloads = format!("{STORE_PATH}-payloads");
    for entry in entries {
        let entry = entry.map_err(context(format!("cannot read {}", dir.display())))?;
        let name = entry.file_name();
        if name != STORE_PATH && name != payloads.as_str() {
            return Err(CliError(format!(
                "refusing to delete {} for --reset: it holds `{}`, which is not part of a \
                 Waymark store; delete the directory yourself or choose another --dir",
                dir.display(),
                name.to_string_lossy()
            )));
        }
    }
    Ok(())
}

/// The command that resumes the demo on `dir`.
fn resume_command(dir: &Path) -> String {
    let dir_arg = if dir == Path::new("waymark-data") {
        String::new()
    } else {
        format!(" --dir {}", dir.display())
    };
    format!("cargo run --release -- demo{dir_arg}")
}

/// A live run's state in words.
fn describe_state(status: &RunStatus) -> String {
    match status.state {
        RunState::Pending => "waiting for a worker".into(),
        RunState::Running => "running".into(),
        RunState::Scheduled => match status.scheduled_for {
            Some(at) => match at.duration_since(SystemTime::now()) {
                Ok(left) if left >= Duration::from_millis(100) => {
                    format!("scheduled, due in {:.1}s", left.as_secs_f64())
                }
                _ => "scheduled, due now".into(),
            },
            None => "scheduled".into(),
        },
        RunState::Cancelling => "cancelling".into(),
        RunState::Parked => "parked by its workflow's circuit breaker".into(),
        _ => format!("{:?}", status.state),
    }
}

/// A terminal status in words.
fn status_word(status: TerminalStatus) -> &'static str {
    match status {
        TerminalStatus::Succeeded => "Succeeded",
        TerminalStatus::Failed => "Failed",
        TerminalStatus::Cancelled => "Cancelled",
        _ => "Ended",
    }
}

/// The result of a succeeded run, or the error of another.
fn outcome_detail(outcome: &RunOutcome) -> String {
    match (&outcome.result, &outcome.error) {
        (Some(result), _) => String::from_utf8_lossy(result).into_owned(),
        (None, Some(error)) => error.clone(),
        (None, None) => "-".into(),
    }
}

/// A terminal outcome in one line.
fn describe_outcome(outcome: &RunOutcome) -> String {
    format!(
        "{} at step {}: {}",
        status_word(outcome.status),
        step_label(outcome.final_step),
        outcome_detail(outcome)
    )
}

/// Print the table of every run's outcome.
fn print_summary(priors: &[(String, Prior)], outcomes: &HashMap<String, RunOutcome>) {
    let header = ["RUN", "STATUS", "FINAL STEP", "RESULT / ERROR"];
    let rows: Vec<[String; 4]> = priors
        .iter()
        .map(|(id, _)| match outcomes.get(id) {
            Some(o) => [
                id.clone(),
                status_word(o.status).to_string(),
                step_label(o.final_step),
                outcome_detail(o),
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

// ---------------------------------------------------------------------------
// Live progress
// ---------------------------------------------------------------------------

/// How progress is shown: bars on a terminal, lines otherwise.
enum Ui {
    /// One bar per unfinished run (stdout is a terminal).
    Bars {
        /// The bars' container.
        multi: MultiProgress,
        /// The bar of each run.
        bars: HashMap<String, ProgressBar>,
    },
    /// One line per step (stdout is a pipe or a file).
    Lines,
}

impl Ui {
    /// Bars for the unfinished runs of `priors` if stdout is a terminal,
    /// else plain lines.
    fn new(priors: &[(String, Prior)]) -> Self {
        if !std::io::stdout().is_terminal() {
            return Ui::Lines;
        }
        let style = ProgressStyle::with_template(
            "{spinner:.green} {prefix:.bold} [{bar:20.cyan/blue}] {pos}/{len} {wide_msg}",
        )
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stdout());
        let mut bars = HashMap::new();
        for (id, prior) in priors {
            let (pos, msg) = match prior {
                Prior::New => (0, "queued".to_string()),
                Prior::Resuming(status) => (
                    u64::from(status.current_step),
                    format!("resuming at {}", step_name(status.current_step)),
                ),
                Prior::Settling => (0, "recording its failure".to_string()),
                Prior::Finished(_) => continue,
            };
            let bar = multi.add(ProgressBar::new(STEPS.len() as u64));
            bar.set_style(style.clone());
            bar.set_prefix(id.clone());
            bar.set_position(pos);
            bar.set_message(msg);
            bar.enable_steady_tick(Duration::from_millis(120));
            bars.insert(id.clone(), bar);
        }
        Ui::Bars { multi, bars }
    }

    /// Print a line (above the bars, if any).
    fn log(&self, line: &str) {
        match self {
            Ui::Bars { multi, .. } => multi.suspend(|| say!("{line}")),
            Ui::Lines => say!("{line}"),
        }
    }

    /// Show one event.
    fn show(&self, event: &Event, at: Duration) {
        let stamp = format!("[{:>5.1}s]", at.as_secs_f64());
        match self {
            Ui::Bars { bars, .. } => {
                let bar = |id: &str| bars.get(id);
                match event {
                    Event::Started {
                        run_id,
                        step,
                        attempt,
                    } => {
                        if let Some(bar) = bar(run_id) {
                            bar.set_position(u64::from(*step));
                            let retry = if *attempt > 1 {
                                format!(" (attempt {attempt})")
                            } else {
                                String::new()
                            };
                            bar.set_message(format!("{}...{retry}", step_name(*step)));
                        }
                    }
                    Event::Finished {
                        run_id, step, next, ..
                    } => {
                        if let Some(bar) = bar(run_id)
                            && let Some(delay) = next
                        {
                            bar.set_position(u64::from(*step) + 1);
                            if delay.is_zero() {
                                bar.set_message(format!("{} done", step_name(*step)));
                            } else {
                                bar.set_message(format!(
                                    "{} done; next step in {:.1}s (pick-up window)",
                                    step_name(*step),
                                    delay.as_secs_f64()
                                ));
                            }
                        }
                    }
                    Event::Errored {
                        run_id,
                        step,
                        attempt,
                        will_retry,
                        error,
                    } => {
                        let then = if *will_retry { "retrying" } else { "giving up" };
                        self.log(&format!(
                            "{stamp} {run_id}  {} failed on attempt {attempt}: {error}; {then}",
                            step_name(*step)
                        ));
                        if let Some(bar) = bar(run_id) {
                            bar.set_message(format!("{}: {error}; {then}", step_name(*step)));
                        }
                    }
                    Event::Ended {
                        run_id,
                        outcome: Ok(outcome),
                    } => {
                        if let Some(bar) = bar(run_id) {
                            let text = match outcome.status {
                                TerminalStatus::Succeeded => "Succeeded".to_string(),
                                status => format!(
                                    "{} at {}: {}",
                                    status_word(status),
                                    step_name(outcome.final_step),
                                    outcome_detail(outcome)
                                ),
                            };
                            if outcome.status == TerminalStatus::Succeeded {
                                bar.set_position(STEPS.len() as u64);
                                bar.finish_with_message(text);
                            } else {
                                bar.set_position(u64::from(outcome.final_step));
                                bar.abandon_with_message(text);
                            }
                        }
                    }
                    Event::Ended { .. } => {}
                }
            }
            Ui::Lines => match event {
                Event::Started { .. } => {}
                Event::Finished {
                    run_id,
                    step,
                    took,
                    next,
                } => {
                    let then = match next {
                        Some(d) if d.is_zero() => String::new(),
                        Some(d) => {
                            format!("; next step in {:.1}s (pick-up window)", d.as_secs_f64())
                        }
                        None => String::new(),
                    };
                    say!(
                        "{stamp} {run_id}  step {} done in {} ms{then}",
                        step_label(*step),
                        took.as_millis()
                    );
                }
                Event::Errored {
                    run_id,
                    step,
                    attempt,
                    will_retry,
                    error,
                } => {
                    let then = if *will_retry { "retrying" } else { "giving up" };
                    say!(
                        "{stamp} {run_id}  step {} failed on attempt {attempt}: {error}; {then}",
                        step_label(*step)
                    );
                }
                Event::Ended {
                    run_id,
                    outcome: Ok(outcome),
                } => say!("{stamp} {run_id}  {}", describe_outcome(outcome)),
                Event::Ended { .. } => {}
            },
        }
    }

    /// Mark the bars of runs that did not finish as stopped.
    fn stop_remaining(&self) {
        if let Ui::Bars { bars, .. } = self {
            for bar in bars.values().filter(|b| !b.is_finished()) {
                bar.abandon_with_message(format!(
                    "stopped; resumes at {} next time",
                    step_name(u32::try_from(bar.position()).unwrap_or(0))
                ));
            }
        }
    }
}

// ---------------------------------------------------------------------------
// `waymark status` and `waymark outcome`
// ---------------------------------------------------------------------------

/// Open the existing store in `dir` for a read, with a runtime over it.
async fn open_existing(dir: &Path) -> CliResult<(Arc<Queue>, Runtime)> {
    if !dir.is_dir() {
        return Err(CliError(format!(
            "no Waymark store at {}; run `waymark demo` first, or pass --dir",
            dir.display()
        )));
    }
    let queue = open_queue(dir).await?;
    // No worker runs, so no step runs and nothing reports progress.
    let (tx, _rx) = mpsc::unbounded_channel();
    let runtime = build_runtime(queue.clone(), tx)?;
    Ok((queue, runtime))
}

/// `waymark status`: where a live run is, or how it ended.
async fn status(dir: &Path, run_id: &str) -> CliResult<ExitCode> {
    let (live, ended) = read_run(dir, run_id).await?;
    match (live, ended) {
        (Some(status), _) => {
            say!("{run_id}: live");
            say!("  step:     {}", step_label(status.current_step));
            say!("  state:    {}", describe_state(&status));
            say!("  workflow: {}", status.workflow);
        }
        (None, Some(outcome)) => {
            say!("{run_id}: ended");
            print_outcome(&outcome);
        }
        (None, None) => return Err(not_found(run_id, dir)),
    }
    Ok(ExitCode::SUCCESS)
}

/// `waymark outcome`: how a run ended.
async fn outcome(dir: &Path, run_id: &str) -> CliResult<ExitCode> {
    let (live, ended) = read_run(dir, run_id).await?;
    match (ended, live) {
        (Some(outcome), _) => {
            say!("{run_id}: ended");
            print_outcome(&outcome);
        }
        (None, Some(status)) => say!(
            "{run_id} has not ended yet: it is at step {} ({}). Run `waymark demo` to finish it.",
            step_label(status.current_step),
            describe_state(&status)
        ),
        (None, None) => return Err(not_found(run_id, dir)),
    }
    Ok(ExitCode::SUCCESS)
}

/// A run's live status, or else its outcome, read from the store in `dir`.
async fn read_run(dir: &Path, run_id: &str) -> CliResult<(Option<RunStatus>, Option<RunOutcome>)> {
    let (queue, runtime) = open_existing(dir).await?;
    let read = context(format!("cannot read the state of {run_id}"));
    let live = runtime.status(run_id).await.map_err(&read)?;
    let ended = match live {
        Some(_) => None,
        None => runtime.outcome(run_id).await.map_err(read)?,
    };
    drop(runtime);
    close_queue(queue).await?;
    Ok((live, ended))
}

/// Print a terminal outcome, one field a line.
fn print_outcome(outcome: &RunOutcome) {
    say!("  status:     {}", status_word(outcome.status));
    say!("  final step: {}", step_label(outcome.final_step));
    match (&outcome.result, &outcome.error) {
        (Some(result), _) => say!("  result:     {}", String::from_utf8_lossy(result)),
        (None, Some(error)) => say!("  error:      {error}"),
        (None, None) => {}
    }
    say!("  workflow:   {}", outcome.workflow);
}

/// The error for a run the store does not know.
fn not_found(run_id: &str, dir: &Path) -> CliError {
    CliError(format!(
        "no run `{run_id}` in {} (never submitted there, or its outcome passed the retention window)",
        dir.display()
    ))
}
