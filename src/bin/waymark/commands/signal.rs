//! `waymark signal RUN PAYLOAD`: a signal sent through the store's inbox
//! with a [`waymark::Client`]; the worker applies it through its own
//! `WorkflowRuntime::signal`, which wakes the run's wait (a step that
//! returned `WaitForSignal`). Like `submit` and `cancel`, it waits (up to
//! `--timeout`) for the worker's answer: delivered, or refused because the
//! run is not waiting (exit 5, refused) or unknown (exit 3).

use clap::Args;
use waymark::Reply;

use super::check_run_id;
use super::control::{await_reply, send};
use crate::plumbing::exit::{CliError, CliResult, Exit};
use crate::plumbing::output::say;
use crate::plumbing::store::{Store, StoreArgs};

/// `waymark signal`'s arguments.
#[derive(Debug, Args)]
pub struct SignalArgs {
    /// The run waiting for a signal.
    pub run_id: String,
    /// The signal's payload (the woken step sees these bytes).
    pub payload: String,
    /// Return once the request is stored, without waiting for the worker.
    #[arg(long)]
    pub no_wait: bool,
    /// Where the store lives.
    #[command(flatten)]
    pub store: StoreArgs,
}

/// `waymark signal`.
pub async fn signal(args: SignalArgs) -> CliResult<Exit> {
    check_run_id(&args.run_id)?;
    let payload = args.payload.into_bytes();
    if payload.len() > waymark::MAX_SIGNAL_BYTES {
        return Err(CliError::usage(format!(
            "cannot signal: the payload is {} bytes, over the limit of {} bytes",
            payload.len(),
            waymark::MAX_SIGNAL_BYTES
        )));
    }
    let store = Store::locate(&args.store)?;
    let client = store.open_run_client(&args.run_id).await?;
    let run_id = args.run_id.as_str();
    let sent = send(&store, client.signal(run_id, payload)).await?;
    if args.no_wait {
        say!(
            "sent: signal {run_id} (request {}); a worker on the store applies it",
            sent.request_id
        );
        return Ok(Exit::Ok);
    }
    let code = match await_reply(&store, &client, &sent).await? {
        Some(Reply::Signalled { .. }) => {
            say!("signalled {run_id}: its next step runs now");
            Exit::Ok
        }
        Some(other) => return Err(CliError::failure(format!("unexpected reply: {other:?}"))),
        None => Exit::Unfinished,
    };
    store.close_reader(client.close()).await;
    Ok(code)
}
