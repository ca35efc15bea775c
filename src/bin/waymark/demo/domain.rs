//! The demo's domain: an order pipeline of five steps (validate, reserve
//! stock, charge card, ship, notify), the eight example orders, and the
//! [`StepRunner`] that works them. Nothing here draws on the terminal: the
//! runner reports what its steps did as [`Work`] events, and the UI decides
//! what to show once the store has confirmed it (see `demo/progress.rs`).
//!
//! The orders are chosen so that every outcome shows up: most succeed, one
//! succeeds after a transient payment-gateway error is retried, one card is
//! declined, one parcel is refused by the carrier for good, and one order
//! cancels itself.

use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use waymark::{BackoffPolicy, RetryPolicy, Step, StepError, StepOutcome, StepRunner};

use crate::plumbing::output;

/// The demo's retry policy. A step gets 20 attempts: a process killed while
/// a step runs re-runs that step on restart and the interrupted attempt
/// counts (Waymark's crash guarantee), so a demo killed over and over must
/// not exhaust the attempts of runs that did nothing wrong. Only the flaky
/// card's first attempt fails on its own.
pub fn retry_policy() -> RetryPolicy {
    RetryPolicy {
        initial: Duration::from_millis(400),
        multiplier: 2.0,
        max_delay: Duration::from_secs(2),
        jitter: 0.2,
        max_attempts: 20,
    }
}

/// The circuit breaker `waymark worker --trip-after N` gives the default
/// workflow: a short backoff (50 ms) after each failure, tripped at `n`
/// failures in a row, until a reset (no probe).
pub fn breaker(n: u32) -> BackoffPolicy {
    BackoffPolicy {
        initial: Duration::from_millis(50),
        multiplier: 1.0,
        max_delay: Duration::from_millis(50),
        jitter: 0.0,
        streak_limit: Some(n),
        probe_after: None,
    }
}

/// The pipeline's steps, by step number.
pub const STEPS: [&str; 5] = ["validate", "reserve stock", "charge card", "ship", "notify"];

/// How long the "charge card" step waits before shipping (`ContinueAfter`):
/// the warehouse's next pick-up window.
pub const PICKUP_WAIT: Duration = Duration::from_millis(1200);

/// Simulated work of each step before jitter, in milliseconds.
const STEP_WORK_MS: [u64; 5] = [250, 400, 550, 450, 200];

/// A card number the payment gateway declines.
const DECLINED_CARD: &str = "4000-0000-0000-0002";
/// A card number whose first charge attempt times out at the gateway.
const FLAKY_CARD: &str = "4000-0000-0000-0119";
/// A product that turns out to be discontinued.
const DISCONTINUED_SKU: &str = "LAMP-07";

/// One example order, the input of one run.
pub struct Order {
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
pub const ORDERS: [Order; 8] = [
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
    pub fn input(&self) -> Vec<u8> {
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
    pub fn summary(&self) -> String {
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
pub fn run_id(index: usize) -> String {
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
pub fn step_name(step: u32) -> String {
    usize::try_from(step)
        .ok()
        .and_then(|i| STEPS.get(i))
        .map_or_else(|| format!("step {step}"), |name| (*name).to_string())
}

/// `3/5 charge card` for the 0-based step number 2 (human output is
/// 1-based).
pub fn step_label(step: u32) -> String {
    output::step_label(step, &STEPS)
}

/// A step payload: the order's fields plus what earlier steps added.
pub struct Fields(Vec<(String, String)>);

impl Fields {
    /// Parse `key=value;key=value`.
    pub fn parse(payload: &[u8]) -> Result<Self, StepError> {
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

/// What the runner reports. None of it is durable yet when it is sent: the
/// step's settlement commits after the runner returns.
#[derive(Debug, Clone)]
pub enum Work {
    /// A step attempt began. The worker admits a run's step only after the
    /// run's earlier commits are durable, so this also confirms that every
    /// earlier step of the run (and an earlier attempt's retry) committed.
    Started {
        /// The run.
        run_id: String,
        /// The step (0-based).
        step: u32,
        /// Which attempt (1-based).
        attempt: u32,
    },
    /// A step attempt's work finished; its settlement commits next.
    Finished {
        /// The run.
        run_id: String,
        /// The step (0-based).
        step: u32,
        /// Which attempt (1-based).
        attempt: u32,
        /// How long the work took.
        took: Duration,
        /// What the step asked for.
        verdict: Verdict,
    },
}

/// What a finished step asked the runtime to do.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// Go on to the next step after `delay`.
    Continue {
        /// The wait before the next step (zero: at once).
        delay: Duration,
    },
    /// End the run (succeed, fail or cancel: the outcome says which).
    Ends,
    /// The attempt failed.
    Error {
        /// Whether the policy allows another attempt.
        will_retry: bool,
        /// What went wrong.
        message: String,
    },
}

/// The example [`StepRunner`]: a five-step order pipeline whose steps sleep
/// a realistic while and report what they did.
pub struct OrderPipeline {
    /// Where reports go (the UI; sends fail silently once it is gone).
    progress: mpsc::UnboundedSender<Work>,
    /// Fired to skip the rest of the simulated work: the steps in flight
    /// then decide at once and commit, so a hurried stop spends no attempt.
    hurry: CancellationToken,
}

impl OrderPipeline {
    /// A pipeline reporting to `progress`, whose simulated work ends early
    /// once `hurry` fires.
    pub fn new(progress: mpsc::UnboundedSender<Work>, hurry: CancellationToken) -> Self {
        Self { progress, hurry }
    }

    /// Report something; the listener may be gone.
    fn report(&self, work: Work) {
        let _ = self.progress.send(work);
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
        self.report(Work::Started {
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
            // Stopping in a hurry: the rest of the simulated work is skipped.
            _ = self.hurry.cancelled() => {}
            // The run was cancelled: whatever we return is discarded.
            _ = step.cancel_token.cancelled() => {
                return Err(StepError::transient("cancelled while running"));
            }
        }
        let decided = Self::decide(step, order);
        let verdict = match &decided {
            Ok(StepOutcome::Continue { .. }) => Verdict::Continue {
                delay: Duration::ZERO,
            },
            Ok(StepOutcome::ContinueAfter { delay, .. }) => Verdict::Continue { delay: *delay },
            Ok(_) => Verdict::Ends,
            Err(e) => Verdict::Error {
                will_retry: !e.is_permanent() && step.attempts < step.max_attempts,
                message: e.message.clone(),
            },
        };
        self.report(Work::Finished {
            run_id: step.run_id.clone(),
            step: step.step_number,
            attempt: step.attempts,
            took: began.elapsed(),
            verdict,
        });
        decided
    }
}
