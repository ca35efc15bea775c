//! `waymark rerun RUN STEP`: a request, sent through the store's inbox with
//! a [`waymark::Client`], to re-run a run that ended `Failed` or `Cancelled`
//! from one of its steps; the worker applies it with `WorkflowRuntime::rerun`.
//! Like `submit` and `cancel`, it waits (up to `--timeout`) for the answer.

use clap::Args;
use waymark::Reply;

use super::check_run_id;
use super::control::{await_reply, send};
use crate::demo::domain::step_label;
use crate::plumbing::exit::{CliError, CliResult, Exit};
use crate::plumbing::output::say;
use crate::plumbing::store::{Store, StoreArgs};

/// `waymark rerun`'s arguments.
#[derive(Debug, Args)]
pub struct RerunArgs {
    /// The run to re-run (it ended Failed or Cancelled).
    pub run_id: String,
    /// The step to start from, 0-based (0 for the first: the step other
    /// output shows as 1/5); the run must have reached it.
    pub step: u32,
    /// Return once the request is stored, without waiting for the worker.
    #[arg(long)]
    pub no_wait: bool,
    /// Where the store lives.
    #[command(flatten)]
    pub store: StoreArgs,
}

/// `waymark rerun`.
pub async fn rerun(args: RerunArgs) -> CliResult<Exit> {
    check_run_id(&args.run_id)?;
    let store = Store::locate(&args.store)?;
    let client = store.open_run_client(&args.run_id).await?;
    let (run_id, step) = (args.run_id.as_str(), args.step);
    let sent = send(&store, client.rerun(run_id, step)).await?;
    // The step as the other commands show it (1-based, named).
    let shown = step_label(step);
    if args.no_wait {
        say!(
            "sent: rerun {run_id} from step {shown} (request {}); a worker on the store applies it",
            sent.request_id
        );
        return Ok(Exit::Ok);
    }
    let code = match await_reply(&store, &client, &sent).await? {
        Some(Reply::Rerun { rerun, .. }) => {
            say!("{run_id} re-runs from step {shown} (re-run {rerun}); it is live again");
            Exit::Ok
        }
        Some(other) => return Err(CliError::failure(format!("unexpected reply: {other:?}"))),
        None => Exit::Unfinished,
    };
    store.close_reader(client.close()).await;
    Ok(code)
}
