//! `waymark history RUN`: a run's step history (each step's settled
//! attempts: when, how long, how it ended, its error), read through a
//! [`waymark::Client`] (never writing). `--json` prints the library's
//! [`waymark::RunHistory`] as JSON.

use clap::Args;
use waymark::{AttemptOutcome, RunHistory, StepAttempt};

use super::check_run_id;
use super::read::{not_found, print_json, table};
use crate::demo::domain::step_label;
use crate::describe;
use crate::plumbing::exit::{CliResult, Exit, one_line};
use crate::plumbing::output::say;
use crate::plumbing::store::{Store, StoreArgs};

/// `waymark history`'s arguments.
#[derive(Debug, Args)]
pub struct HistoryArgs {
    /// The run, e.g. demo-order-03.
    pub run_id: String,
    /// Print JSON (the library's `RunHistory`) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Where the store lives.
    #[command(flatten)]
    pub store: StoreArgs,
}

/// `waymark history`: the run's step history, oldest first.
pub async fn history(args: HistoryArgs) -> CliResult<Exit> {
    check_run_id(&args.run_id)?;
    let store = Store::locate(&args.store)?;
    let client = store.open_run_client(&args.run_id).await?;
    let run_id = args.run_id.as_str();
    let read = store
        .bounded("reading the run's history", client.history(run_id))
        .await?;
    store.close_reader(client.close()).await;
    let Some(history) = read else {
        return Err(not_found(run_id, &store));
    };
    if args.json {
        print_json(&history)?;
    } else {
        print_history(&history);
    }
    Ok(Exit::Ok)
}

/// The history as a table, one attempt a line.
fn print_history(history: &RunHistory) {
    say!("{}: step history", history.run_id);
    if history.dropped > 0 {
        say!(
            "  ({} older entries dropped: the history keeps the newest)",
            history.dropped
        );
    }
    let rows: Vec<[String; 6]> = history
        .steps
        .iter()
        .flat_map(|s| s.attempts.iter())
        .map(|a| {
            [
                step_label(a.step),
                a.attempt.to_string(),
                describe::utc_ms(a.started_ms),
                format!("{}ms", a.ended_ms.saturating_sub(a.started_ms)),
                outcome_words(a),
                a.error.as_deref().map_or_else(|| "-".into(), one_line),
            ]
        })
        .collect();
    if rows.is_empty() {
        say!("  (no entries: no step has settled, or the worker keeps no history)");
        return;
    }
    table(
        &["STEP", "ATTEMPT", "STARTED", "TOOK", "THEN", "ERROR"],
        &rows,
    );
}

/// How an attempt ended, in words.
fn outcome_words(attempt: &StepAttempt) -> String {
    let woken = if attempt.signalled { "signalled; " } else { "" };
    let then = match &attempt.outcome {
        AttemptOutcome::Continued => "next step".to_string(),
        AttemptOutcome::Delayed { until_ms } => {
            format!("next step at {}", describe::utc_ms(*until_ms))
        }
        AttemptOutcome::WaitingForSignal { until_ms } => {
            format!("wait for a signal until {}", describe::utc_ms(*until_ms))
        }
        AttemptOutcome::SpawnedChildren { children } => format!("wait for {children} children"),
        AttemptOutcome::ContinuedAsNew { segment } => {
            format!("continued as new (segment {segment})")
        }
        AttemptOutcome::Retrying { at_ms } => format!("retry at {}", describe::utc_ms(*at_ms)),
        AttemptOutcome::Deferred { until_ms } => {
            format!(
                "deferred by the breaker until {}",
                describe::utc_ms(*until_ms)
            )
        }
        AttemptOutcome::Parked => "parked by the breaker".to_string(),
        AttemptOutcome::Ended { status } => format!("run {}", describe::status_word(*status)),
        other => format!("{other:?}"),
    };
    format!("{woken}{then}")
}
