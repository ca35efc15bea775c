//! `waymark reset WORKFLOW`: reset a workflow's circuit breaker (close it,
//! zero its failure streak, release its parked steps), sent through the
//! store's inbox like `cancel` (see [`super::control`]); the worker applies
//! it with its runtime's `reset_workflow`. No worker answering within
//! `--timeout` exits 4, the request waiting in the inbox. On a fleet each
//! shard has its own breaker: the request goes to every shard.

use clap::Args;
use waymark::Reply;
use waymark::fleet::FleetManifest;

use super::control::{await_reply_to, send};
use crate::plumbing::exit::{CliError, CliResult, Exit, shown};
use crate::plumbing::output::say;
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
    if let Some(manifest) = store.fleet().await? {
        return reset_fleet(&store, &manifest, workflow, args.no_wait).await;
    }
    let client = store.open_single_client().await?;
    let request_id = send(&store, client.reset(workflow)).await?;
    if args.no_wait {
        say!("sent: reset {workflow} (request {request_id}); a worker on the store applies it");
        return Ok(Exit::Ok);
    }
    let code = match await_reply_to(&store, &client, &request_id).await? {
        Some(Reply::Reset { was_open: true, .. }) => {
            say!("reset {workflow}: its breaker is closed and its parked steps run again");
            Exit::Ok
        }
        Some(Reply::Reset { .. }) => {
            say!("{workflow}'s breaker was closed with no failure streak; nothing changed");
            Exit::Ok
        }
        Some(other) => return Err(CliError::failure(format!("unexpected reply: {other:?}"))),
        None => Exit::Unfinished,
    };
    let _ = client.close().await;
    Ok(code)
}

/// `waymark reset` on a fleet: each shard has its own breaker for the
/// workflow, so the request goes to every shard, and each answers.
async fn reset_fleet(
    store: &Store,
    manifest: &FleetManifest,
    workflow: &str,
    no_wait: bool,
) -> CliResult<Exit> {
    let fleet = store.open_fleet_client(manifest).await?;
    let mut sent = Vec::new();
    for (shard, client) in (0..).zip(fleet.shards()) {
        match send(store, client.reset(workflow)).await {
            Ok(request_id) => sent.push((shard, client, request_id)),
            // Some shards have the request and will apply it: say which.
            Err(e) if !sent.is_empty() => {
                let _ = fleet.close().await;
                let done: Vec<String> = sent.iter().map(|(s, _, _)| s.to_string()).collect();
                return Err(CliError::new(
                    e.exit,
                    format!(
                        "{e}; the reset was sent to shard(s) {} (their workers apply it) but not \
                         to shard {shard} or after: run `reset` again once the store answers",
                        done.join(", ")
                    ),
                ));
            }
            Err(e) => return Err(e),
        }
    }
    if no_wait {
        say!(
            "sent: reset {workflow} to each of the {} shards; the workers on the fleet apply them",
            sent.len()
        );
        let _ = fleet.close().await;
        return Ok(Exit::Ok);
    }
    let (mut opened, mut unanswered) = (Vec::new(), 0);
    for (shard, client, request_id) in &sent {
        match await_reply_to(store, client, request_id).await? {
            Some(Reply::Reset { was_open: true, .. }) => opened.push(shard.to_string()),
            Some(Reply::Reset { .. }) => {}
            Some(other) => return Err(CliError::failure(format!("unexpected reply: {other:?}"))),
            None => unanswered += 1,
        }
    }
    let _ = fleet.close().await;
    if opened.is_empty() {
        say!(
            "{workflow}'s breaker was closed with no failure streak on every shard that answered; \
             nothing changed"
        );
    } else {
        say!(
            "reset {workflow} on shard(s) {}: its breaker there is closed and its parked steps run \
             again (each shard has its own breaker)",
            opened.join(", ")
        );
    }
    Ok(if unanswered > 0 {
        Exit::Unfinished
    } else {
        Exit::Ok
    })
}
