//! `waymark dead` lists the store's dead-lettered jobs (step jobs and hook
//! notifications, with the reason each died), read through a
//! [`waymark::Client`] (never writing); `waymark requeue JOB...` sends one
//! request per job through the store's inbox: the worker delivers a dead
//! hook notification again, and re-runs a dead step job's run from that
//! step (a step runs again only through a re-run: its run ended with it).
//! Long listings and many requeues show progress, on a terminal only. On a
//! fleet, `dead` lists every shard's (with the shard) and `requeue` sends
//! each request to the shard that holds the job.

use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use waymark::{Client, DeadJob, DeadKind, Reply};

use super::control::{await_reply_to, send};
use super::read::{print_json, table_with_shards};
use crate::demo::domain::step_label;
use crate::plumbing::exit::{CliError, CliResult, Exit, one_line, shown};
use crate::plumbing::output::{live_output, say, say_err};
use crate::plumbing::source::Source;
use crate::plumbing::store::{Store, StoreArgs};

/// Dead jobs read per call.
const PAGE: usize = 256;

/// Which dead jobs `waymark dead` lists.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum KindArg {
    /// Step jobs (their runs ended Failed).
    Step,
    /// Hook notifications.
    Hook,
}

/// `waymark dead`'s arguments.
#[derive(Debug, Args)]
pub struct DeadArgs {
    /// Only dead jobs of this kind (default: both).
    #[arg(long, value_enum)]
    pub kind: Option<KindArg>,
    /// At most this many jobs of each kind (on a fleet, of each shard);
    /// a listing this cut says so (on stderr; `more` in JSON).
    #[arg(long, default_value_t = 1000)]
    pub limit: usize,
    /// Print JSON instead of a table, for scripts.
    #[arg(long)]
    pub json: bool,
    /// Where the store lives.
    #[command(flatten)]
    pub store: StoreArgs,
}

/// `waymark requeue`'s arguments.
#[derive(Debug, Args)]
pub struct RequeueArgs {
    /// The dead jobs (ids as `waymark dead` lists them).
    #[arg(required = true)]
    pub job_ids: Vec<String>,
    /// Return once the requests are stored, without waiting for the worker.
    #[arg(long)]
    pub no_wait: bool,
    /// Where the store lives.
    #[command(flatten)]
    pub store: StoreArgs,
}

/// A spinner or bar on a terminal; hidden otherwise (and under `--json`).
fn progress(len: Option<u64>, message: &str, shown: bool) -> ProgressBar {
    if !shown || !live_output() {
        return ProgressBar::hidden();
    }
    let bar = match len {
        Some(len) => ProgressBar::new(len).with_style(
            ProgressStyle::with_template("{msg} {bar:30} {pos}/{len}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        ),
        None => ProgressBar::new_spinner(),
    };
    bar.set_message(message.to_string());
    bar
}

/// `waymark dead`.
///
/// On a fleet each shard's dead jobs are listed in turn (`--limit` per
/// shard and kind), under a `SHARD` column (a `shard` field in JSON).
pub async fn dead(args: DeadArgs) -> CliResult<Exit> {
    let store = Store::locate(&args.store)?;
    let kinds = match args.kind {
        Some(KindArg::Step) => vec![DeadKind::Step],
        Some(KindArg::Hook) => vec![DeadKind::Hook],
        None => vec![DeadKind::Step, DeadKind::Hook],
    };
    let limit = args.limit.max(1);
    let bar = progress(None, "reading dead jobs", !args.json);
    // (shard, job): the shard is `None` on a single store.
    let mut all: Vec<(Option<u32>, DeadJob)> = Vec::new();
    // The listings `--limit` cut: (shard, kind).
    let mut cut: Vec<(Option<u32>, DeadKind)> = Vec::new();
    let source = store.open_source().await?;
    for (shard, client) in source.shards() {
        for kind in &kinds {
            let (jobs, more) = list(&store, client, *kind, limit, &bar).await?;
            all.extend(jobs.into_iter().map(|job| (shard, job)));
            if more {
                cut.push((shard, *kind));
            }
        }
    }
    store.close_reader(source.close()).await;
    bar.finish_and_clear();
    // On stderr, so a script reading stdout (the JSON too) is not misled,
    // and a reader of the table is told.
    for (shard, kind) in &cut {
        let on = shard.map_or_else(String::new, |shard| format!(" of shard {shard}"));
        say_err!(
            "showing the first {limit} dead {} jobs{on}; more exist: raise --limit",
            kind_word(*kind)
        );
    }
    if args.json {
        let (shards, jobs): (Vec<_>, Vec<_>) = all.into_iter().unzip();
        let jobs = serde_json::to_value(&jobs)
            .map_err(|e| CliError::failure(format!("cannot print JSON: {e}")))?;
        print_json(&serde_json::json!({
            "jobs": super::json::with_shards(jobs, shards),
            "more": !cut.is_empty(),
        }))?;
        return Ok(Exit::Ok);
    }
    if all.is_empty() {
        say!("no dead jobs in {}", store.shown());
        return Ok(Exit::Ok);
    }
    let rows: Vec<_> = all
        .iter()
        .map(|(shard, job)| {
            let row = [
                job.job_id.clone(),
                kind_word(job.kind).to_string(),
                job.run_id.clone().unwrap_or_else(|| "-".into()),
                job.step.map_or_else(|| "-".into(), step_label),
                job.attempts.to_string(),
                job.reason.as_deref().map_or_else(|| "-".into(), one_line),
            ];
            (*shard, row)
        })
        .collect();
    table_with_shards(
        source.is_fleet(),
        0,
        &["JOB", "KIND", "RUN", "STEP", "ATTEMPTS", "REASON"],
        &rows,
    );
    say!("requeue one: waymark requeue JOB (a step job re-runs its run from that step)");
    Ok(Exit::Ok)
}

/// A dead job's kind in words.
fn kind_word(kind: DeadKind) -> &'static str {
    match kind {
        DeadKind::Hook => "hook",
        _ => "step",
    }
}

/// Up to `limit` dead jobs of `kind`, page by page, and whether there are
/// more (one more is read to know).
async fn list(
    store: &Store,
    client: &Client,
    kind: DeadKind,
    limit: usize,
    bar: &ProgressBar,
) -> CliResult<(Vec<DeadJob>, bool)> {
    let fetch = limit.saturating_add(1);
    let mut out: Vec<DeadJob> = Vec::new();
    while out.len() < fetch {
        let after = out.last().map(|j| j.job_id.clone());
        let want = PAGE.min(fetch - out.len());
        let page = store
            .bounded(
                "listing dead jobs",
                client.dead_jobs(kind, after.as_deref(), want),
            )
            .await?;
        let full = page.len() == want;
        out.extend(page);
        bar.set_message(format!("reading dead jobs: {}", out.len()));
        bar.tick();
        if !full {
            break;
        }
    }
    let more = out.len() > limit;
    out.truncate(limit);
    Ok((out, more))
}

/// Check a job id before anything is opened.
fn check_job_id(id: &str) -> CliResult<()> {
    waymark::validate_request_id(id).map_err(|_| {
        CliError::usage(format!(
            "invalid job id `{}`: job ids are 1-64 ASCII letters and digits (as `waymark dead` \
             lists them)",
            shown(id)
        ))
    })
}

/// `waymark requeue`: one request per job, answered in order.
pub async fn requeue(args: RequeueArgs) -> CliResult<Exit> {
    for id in &args.job_ids {
        check_job_id(id)?;
    }
    let store = Store::locate(&args.store)?;
    // On a fleet each job is requeued through the shard that holds it.
    let source = store.open_source().await?;
    let sent = send_requeues(&store, &source, &args.job_ids).await;
    let code = match sent {
        Ok(sent) if args.no_wait => {
            for (id, _, request_id) in &sent {
                say!("sent: requeue {id} (request {request_id}); a worker on the store applies it");
            }
            Ok(Exit::Ok)
        }
        Ok(sent) => await_requeues(&store, &sent).await,
        Err(e) => Err(e),
    };
    store.close_reader(source.close()).await;
    code
}

/// Send a requeue for each job, through the store or the fleet shard that
/// holds it: each job with its client and request id.
async fn send_requeues<'a>(
    store: &Store,
    source: &'a Source,
    job_ids: &'a [String],
) -> CliResult<Vec<(&'a str, &'a Client, String)>> {
    let bar = progress(Some(job_ids.len() as u64), "requeueing", job_ids.len() > 1);
    let mut sent = Vec::new();
    for id in job_ids {
        let found = store
            .bounded("finding the dead job's shard", source.dead_job_client(id))
            .await
            .and_then(|client| {
                client.ok_or_else(|| {
                    CliError::not_found(format!(
                        "no dead job `{}` on any shard of the fleet at {}",
                        shown(id),
                        store.shown()
                    ))
                })
            });
        let request = match found {
            Ok(client) => send(store, client.requeue(id)).await.map(|r| (client, r)),
            Err(e) => Err(e),
        };
        match request {
            Ok((client, request_id)) => sent.push((id.as_str(), client, request_id)),
            // The ones before it are stored: a worker applies them.
            Err(e) if !sent.is_empty() => {
                bar.finish_and_clear();
                let done: Vec<&str> = sent.iter().map(|(id, _, _)| *id).collect();
                return Err(CliError::new(
                    e.exit,
                    format!(
                        "{e}; the requeue of {} was sent (a worker applies it), not of `{}` or \
                         the jobs after it",
                        done.join(", "),
                        shown(id)
                    ),
                ));
            }
            Err(e) => return Err(e),
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(sent)
}

/// Wait for each requeue's answer and report it.
async fn await_requeues(store: &Store, sent: &[(&str, &Client, String)]) -> CliResult<Exit> {
    // Every request is stored: each answer is reported, a refusal of one
    // included, before the first refusal sets the exit code.
    let (mut code, mut refused) = (Exit::Ok, None);
    for (id, client, request_id) in sent {
        match await_reply_to(store, client, request_id).await {
            Ok(Some(Reply::Requeued { .. })) => {
                say!("requeued {id}: the hook notification is delivered again")
            }
            Ok(Some(Reply::Rerun { run_id, rerun })) => {
                say!("requeued {id}: run {run_id} runs again from that step (re-run {rerun})")
            }
            Ok(Some(other)) => {
                return Err(CliError::failure(format!("unexpected reply: {other:?}")));
            }
            Ok(None) => code = Exit::Unfinished,
            Err(e) if sent.len() > 1 => {
                say!("not requeued {id}: {e}");
                refused.get_or_insert(e);
            }
            Err(e) => return Err(e),
        }
    }
    match refused {
        Some(e) => Err(e),
        None => Ok(code),
    }
}
