//! `waymark submit | cancel`: requests sent through the store's inbox with a
//! [`waymark::Client`]; the worker (the demo, or `waymark worker`) applies
//! them through its own submit/cancel. Neither command opens the store as
//! its writer. By default each waits (up to `--timeout`) for the worker's
//! answer; without a worker the request stays in the inbox until one runs,
//! and the command exits 4 (unfinished) saying so. On a fleet, each goes to
//! the run's shard (`submit` without a run id makes one, to route it).

use std::time::Duration;

use clap::{ArgGroup, Args};
use waymark::{Error, Reply, RunOutcome, RunSpec, Sent};

use super::check_run_id;
use crate::demo::domain::ORDERS;
use crate::describe;
use crate::plumbing::exit::{CliError, CliResult, Exit, shown};
use crate::plumbing::output::{say, suggest};
use crate::plumbing::store::{Store, StoreArgs};

/// `waymark submit`'s arguments.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("what").required(true).args(["input", "example"])))]
pub struct SubmitArgs {
    /// The run's id (1-128 of A-Z a-z 0-9 . _ : -); generated if omitted.
    pub run_id: Option<String>,
    /// The run's input: an order as key=value pairs separated by `;`
    /// (customer, email, sku, qty, total_cents, card, ship_to).
    #[arg(long)]
    pub input: Option<String>,
    /// Use the input of the demo's order N (1-8).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(1..=8))]
    pub example: Option<u8>,
    /// Return once the request is stored, without waiting for the worker.
    #[arg(long)]
    pub no_wait: bool,
    /// Where the store lives.
    #[command(flatten)]
    pub store: StoreArgs,
}

/// `waymark cancel`'s arguments.
#[derive(Debug, Args)]
pub struct CancelArgs {
    /// The run to cancel.
    pub run_id: String,
    /// Return once the request is stored, without waiting for the worker.
    #[arg(long)]
    pub no_wait: bool,
    /// Where the store lives.
    #[command(flatten)]
    pub store: StoreArgs,
}

/// `waymark submit`.
pub async fn submit(args: SubmitArgs) -> CliResult<Exit> {
    if let Some(id) = &args.run_id {
        check_run_id(id)?;
    }
    let input = match (&args.input, args.example) {
        (Some(text), _) => text.clone().into_bytes(),
        (None, Some(n)) => ORDERS[usize::from(n) - 1].input(),
        (None, None) => return Err(CliError::usage("pass --input TEXT or --example N")),
    };
    let mut spec = RunSpec {
        run_id: args.run_id.clone(),
        input,
        ..Default::default()
    };
    // Refused here, before anything is opened (the client checks the rest
    // before it writes anything).
    if spec.input.len() > waymark::MAX_PAYLOAD_BYTES {
        return Err(CliError::usage(format!(
            "cannot submit: the input is {} bytes, over the limit of {} bytes",
            spec.input.len(),
            waymark::MAX_PAYLOAD_BYTES
        )));
    }
    let store = Store::locate(&args.store)?;
    let client = match store.fleet().await? {
        // On a fleet the run's id picks its shard: one is made here.
        Some(manifest) => {
            let run_id = spec
                .run_id
                .get_or_insert_with(|| ulid::Ulid::generate().to_string());
            store.open_shard_client(&manifest, run_id).await?
        }
        None => store.open_single_client().await?,
    };
    let sent = send(&store, client.submit(spec)).await?;
    if args.no_wait {
        say!(
            "sent: submit {} (request {}); a worker on the store applies it",
            sent.run_id,
            sent.request_id
        );
        return Ok(Exit::Ok);
    }
    let code = match await_reply(&store, &client, &sent).await? {
        Some(Reply::Submitted(outcome)) if outcome.newly_submitted => {
            say!("submitted {}", outcome.run_id);
            Exit::Ok
        }
        Some(Reply::Submitted(outcome)) => {
            say!(
                "{} already exists with this input; nothing changed",
                outcome.run_id
            );
            Exit::Ok
        }
        Some(other) => return Err(CliError::failure(format!("unexpected reply: {other:?}"))),
        None => Exit::Unfinished,
    };
    store.close_reader(client.close()).await;
    Ok(code)
}

/// `waymark cancel`.
pub async fn cancel(args: CancelArgs) -> CliResult<Exit> {
    check_run_id(&args.run_id)?;
    let store = Store::locate(&args.store)?;
    let client = store.open_run_client(&args.run_id).await?;
    let run_id = args.run_id.as_str();
    let sent = send(&store, client.cancel(run_id)).await?;
    if args.no_wait {
        say!(
            "sent: cancel {run_id} (request {}); a worker on the store applies it",
            sent.request_id
        );
        return Ok(Exit::Ok);
    }
    let code = match await_reply(&store, &client, &sent).await? {
        Some(Reply::Cancelled {
            cancelled: true, ..
        }) => {
            say!(
                "cancelled {run_id} (a waiting step is removed; a running step's result is \
                 discarded and the run ends Cancelled)"
            );
            Exit::Ok
        }
        Some(Reply::Cancelled { .. }) => {
            let ended = || async {
                store
                    .bounded("reading the run's outcome", client.outcome(run_id))
                    .await
            };
            let said_ended = |outcome: &RunOutcome| {
                say!(
                    "{run_id} had already ended: {}",
                    describe::outcome_line(outcome)
                );
                Exit::Ok
            };
            match ended().await? {
                Some(outcome) => said_ended(&outcome),
                None => match store
                    .bounded("reading the run's status", client.status(run_id))
                    .await?
                {
                    Some(_) => {
                        say!("{run_id}: a cancel was already accepted; it ends Cancelled");
                        Exit::Ok
                    }
                    // It may have ended between the two reads (the reader
                    // refreshes in between): its outcome once more.
                    None => match ended().await? {
                        Some(outcome) => said_ended(&outcome),
                        None => {
                            return Err(CliError::not_found(format!(
                                "no run `{}` in {}",
                                shown(run_id),
                                store.shown()
                            )));
                        }
                    },
                },
            }
        }
        Some(other) => return Err(CliError::failure(format!("unexpected reply: {other:?}"))),
        None => Exit::Unfinished,
    };
    store.close_reader(client.close()).await;
    Ok(code)
}

/// Send a request, bounded.
pub(super) async fn send<T>(
    store: &Store,
    sending: impl Future<Output = Result<T, Error>>,
) -> CliResult<T> {
    match tokio::time::timeout(store.timeout, sending).await {
        Ok(Ok(sent)) => Ok(sent),
        Ok(Err(e)) if e.is_permanent() => Err(CliError::usage(format!("cannot send: {e}"))),
        Ok(Err(e)) => Err(CliError::failure(format!(
            "cannot send the request to {}: {e}",
            store.shown()
        ))),
        Err(_) => Err(store.timed_out("sending the request")),
    }
}

/// Wait up to the timeout for the worker's reply: `None` (said in words)
/// when no worker answered; a refusal is an error.
pub(super) async fn await_reply(
    store: &Store,
    client: &waymark::Client,
    sent: &Sent,
) -> CliResult<Option<Reply>> {
    await_reply_to(store, client, &sent.request_id).await
}

/// [`await_reply`] for the request `request_id`. A schedule's refusal is
/// exit 3 (the worker does not define it) or 5 (tripped, overlap, stopping).
pub async fn await_reply_to(
    store: &Store,
    client: &waymark::Client,
    request_id: &str,
) -> CliResult<Option<Reply>> {
    // The wait gives up at the timeout when no worker answers; a store
    // that stops answering the wait's reads is given a little more, then
    // reported as such (the request is stored either way).
    let grace = store.timeout.saturating_add(Duration::from_secs(2));
    let waited =
        match tokio::time::timeout(grace, client.wait_reply(request_id, store.timeout)).await {
            Ok(waited) => waited,
            Err(_) => {
                return Err(CliError::failure(format!(
                    "{}; the request is stored and a worker applies it",
                    store.timed_out("reading the worker's answer")
                )));
            }
        };
    match waited {
        Ok(reply) => Ok(Some(reply)),
        Err(Error::TimedOut { .. }) => {
            let mut worker = vec!["worker"];
            let args = store.args();
            worker.extend(args.iter().map(String::as_str));
            say!(
                "sent, but no worker answered within {:.1}s: the request waits in the store's \
                 inbox and is applied when a worker runs ({})",
                store.timeout.as_secs_f64(),
                suggest(&worker)
            );
            Ok(None)
        }
        Err(Error::InputMismatch(run_id)) => Err(CliError::refused(format!(
            "run `{}` already exists with a different input; use another run id",
            shown(&run_id)
        ))),
        Err(Error::NotWaiting(run_id)) => Err(CliError::refused(format!(
            "run `{}` is not waiting for a signal (its waiting step has not committed yet, \
             its wait already ended, or the run has ended); signals are not kept for later",
            shown(&run_id)
        ))),
        Err(Error::RequestRefused { reason, .. }) => Err(CliError::refused(format!(
            "the worker refused the request: {reason}"
        ))),
        Err(Error::ScheduleNotFound(id)) => {
            let args = store.args();
            let mut list = vec!["schedules"];
            list.extend(args.iter().map(String::as_str));
            Err(CliError::not_found(format!(
                "the worker on {} defines no schedule `{}` (see {})",
                store.shown(),
                shown(&id),
                suggest(&list)
            )))
        }
        Err(
            e @ (Error::WorkflowTripped { .. }
            | Error::ScheduleOverlap { .. }
            | Error::ShuttingDown),
        ) => Err(CliError::refused(format!("the worker refused: {e}"))),
        Err(Error::JobNotFound(id)) => Err(CliError::not_found(format!(
            "no dead job `{}` in {} (never dead-lettered, already requeued, or past the queue's \
             retention; `waymark dead` lists them)",
            shown(&id),
            store.shown()
        ))),
        Err(Error::RunNotFound(run_id)) => Err(CliError::not_found(format!(
            "no run `{}` in {} (never submitted, or its outcome passed the retention window)",
            shown(&run_id),
            store.shown()
        ))),
        Err(
            e @ (Error::RunLive(_)
            | Error::RunSucceeded(_)
            | Error::StepNotReached { .. }
            | Error::StepInputNotKept { .. }),
        ) => Err(CliError::refused(format!(
            "the worker refused the request: {e}"
        ))),
        Err(e) => Err(CliError::failure(format!(
            "cannot read the worker's reply: {e}"
        ))),
    }
}
