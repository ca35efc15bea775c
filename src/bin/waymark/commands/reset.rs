//! `waymark reset WORKFLOW`: reset a workflow's circuit breaker (close it,
//! zero its failure streak, release its parked steps), sent through the
//! store's inbox like `cancel` (see [`super::control`]); the worker applies
//! it with its runtime's `reset_workflow`. No worker answering within
//! `--timeout` exits 4, the request waiting in the inbox. On a fleet each
//! shard has its own breaker: the request goes to every shard.

use clap::Args;
use waymark::Reply;

use super::control::{await_reply_to, send};
use crate::plumbing::exit::{CliError, CliResult, Exit, shown};
use crate::plumbing::output::say;
use crate::plumbing::source::Source;
use crate::plumbing::store::{Store, StoreArgs};

/// `waymark reset`'s arguments.
#[derive(Debug, Args)]
pub struct ResetArgs {
    /// The workflow whose breaker to reset.
    pub workflow: String,
    /// Return once the request is stored, without waiting for the worker.
    #[arg(long)]
    pub no_wait: bool,
    /// Where the store lives.
    #[command(flatten)]
    pub store: StoreArgs,
}

/// `waymark reset`.
pub async fn reset(args: ResetArgs) -> CliResult<Exit> {
    let workflow = args.workflow.as_str();
    waymark::validate_name("workflow name", workflow).map_err(|_| {
        CliError::usage(format!(
            "invalid workflow name `{}`: only 1-128 ASCII letters, digits and `.` `_` `:` `-`",
            shown(workflow)
        ))
    })?;
    let store = Store::locate(&args.store)?;
    let source = store.open_source().await?;
    let code = reset_on(&store, &source, workflow, args.no_wait).await;
    store.close_reader(source.close()).await;
    code
}

/// Send the reset to the store, or on a fleet to every shard (each has its
/// own breaker for the workflow), and report each answer.
async fn reset_on(
    store: &Store,
    source: &Source,
    workflow: &str,
    no_wait: bool,
) -> CliResult<Exit> {
    let sent = source
        .send_to_every_shard(|client| send(store, client.reset(workflow)))
        .await
        .map_err(|cut| match cut.partly_sent("reset") {
            Some(partly) => CliError::new(cut.error.exit, format!("{}; {partly}", cut.error)),
            None => cut.error,
        })?;
    if no_wait {
        match sent.as_slice() {
            [(None, _, request_id)] => say!(
                "sent: reset {workflow} (request {request_id}); a worker on the store applies it"
            ),
            _ => say!(
                "sent: reset {workflow} to each of the {} shards; the workers on the fleet apply \
                 them",
                sent.len()
            ),
        }
        return Ok(Exit::Ok);
    }
    let (mut opened, mut unanswered) = (Vec::new(), 0);
    for (shard, client, request_id) in &sent {
        match await_reply_to(store, client, request_id).await? {
            Some(Reply::Reset { was_open: true, .. }) => opened.push(*shard),
            Some(Reply::Reset { .. }) => {}
            Some(other) => return Err(CliError::failure(format!("unexpected reply: {other:?}"))),
            None => unanswered += 1,
        }
    }
    let shards: Vec<String> = opened.iter().flatten().map(u32::to_string).collect();
    match (source.is_fleet(), opened.is_empty()) {
        _ if unanswered == sent.len() => {}
        (false, false) => {
            say!("reset {workflow}: its breaker is closed and its parked steps run again")
        }
        (false, true) => {
            say!("{workflow}'s breaker was closed with no failure streak; nothing changed")
        }
        (true, false) => say!(
            "reset {workflow} on shard(s) {}: its breaker there is closed and its parked steps \
             run again (each shard has its own breaker)",
            shards.join(", ")
        ),
        (true, true) => say!(
            "{workflow}'s breaker was closed with no failure streak on every shard that \
             answered; nothing changed"
        ),
    }
    Ok(if unanswered > 0 {
        Exit::Unfinished
    } else {
        Exit::Ok
    })
}
