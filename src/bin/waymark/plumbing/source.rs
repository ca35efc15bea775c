//! What a command reads and sends through: one store's [`Client`], or a
//! fleet's [`FleetClient`] (a client on every shard). `serve` and the
//! commands that concern the whole store (`runs`, `workflows`,
//! `schedules`, `reset`, `dead`, `requeue`) take one from
//! `Store::open_source`, so a fleet and a single store go through the same
//! code.
//!
//! Everything about one run (its status, outcome, history, children, a
//! cancel) goes to the run's shard, as every other command routes it; a
//! schedule's record and requests live on its home shard; the run listing
//! and the schedules are merged across shards. What each shard keeps for
//! itself is shown per shard: a workflow's breaker and tally, the dead
//! jobs, the writer's heartbeat. What needs every shard walks
//! [`Source::shards`], which on a single store is that store with no shard
//! number; a request every shard must get is sent by
//! [`Source::send_to_every_shard`].

use std::future::Future;

use waymark::fleet::FleetClient;
use waymark::{Client, Error, RunFilter, RunPage, ScheduleInfo};

/// One store, or a fleet of them.
pub enum Source {
    /// A single store.
    Store(Client),
    /// A fleet: one client per shard.
    Fleet(FleetClient),
}

impl Source {
    /// Whether this is a fleet.
    pub fn is_fleet(&self) -> bool {
        matches!(self, Self::Fleet(_))
    }

    /// Every store with its shard number (`None` on a single store), in
    /// shard order.
    pub fn shards(&self) -> Vec<(Option<u32>, &Client)> {
        match self {
            Self::Store(client) => vec![(None, client)],
            Self::Fleet(fleet) => (0..)
                .zip(fleet.shards())
                .map(|(s, c)| (Some(s), c))
                .collect(),
        }
    }

    /// The client of the store holding run `run_id` (its shard on a
    /// fleet), where its reads and its cancel go.
    pub fn run_client(&self, run_id: &str) -> &Client {
        match self {
            Self::Store(client) => client,
            Self::Fleet(fleet) => fleet.shard_client(run_id),
        }
    }

    /// The client of schedule `id`'s home (its shard on a fleet).
    pub fn schedule_client(&self, id: &str) -> &Client {
        match self {
            Self::Store(client) => client,
            Self::Fleet(fleet) => fleet.schedule_client(id),
        }
    }

    /// A page of runs (merged across shards, in run id order, on a fleet).
    pub async fn runs(&self, filter: &RunFilter) -> Result<RunPage, Error> {
        match self {
            Self::Store(client) => client.runs(filter).await,
            Self::Fleet(fleet) => fleet.runs(filter).await,
        }
    }

    /// Every schedule, sorted by id (each from its home shard on a fleet).
    pub async fn schedules(&self) -> Result<Vec<ScheduleInfo>, Error> {
        match self {
            Self::Store(client) => client.schedules().await,
            Self::Fleet(fleet) => fleet.schedules().await,
        }
    }

    /// The store holding dead job `job_id`; `None` when no shard of a
    /// fleet has it. A single store is answered unread: its worker says
    /// whether the job exists.
    pub async fn dead_job_client(&self, job_id: &str) -> Result<Option<&Client>, Error> {
        match self {
            Self::Store(client) => Ok(Some(client)),
            Self::Fleet(fleet) => fleet.dead_job_client(job_id).await,
        }
    }

    /// Close every reader.
    pub async fn close(&self) -> Result<(), Error> {
        match self {
            Self::Store(client) => client.close().await,
            Self::Fleet(fleet) => fleet.close().await,
        }
    }

    /// Send a request to every shard in turn (the one store on a single
    /// store) with `send`, storing each before any answer is awaited, so
    /// the shards' workers apply theirs together. Each shard's number and
    /// client with the request's id; if a send fails after others were
    /// stored, [`CutShort`] says which shards have it.
    pub async fn send_to_every_shard<'a, E, F, Fut>(
        &'a self,
        mut send: F,
    ) -> Result<Vec<(Option<u32>, &'a Client, String)>, CutShort<E>>
    where
        F: FnMut(&'a Client) -> Fut,
        Fut: Future<Output = Result<String, E>>,
    {
        let mut sent = Vec::new();
        for (shard, client) in self.shards() {
            match send(client).await {
                Ok(request_id) => sent.push((shard, client, request_id)),
                Err(error) => {
                    return Err(CutShort {
                        error,
                        sent_to: sent.iter().filter_map(|(s, _, _)| *s).collect(),
                        failed_at: shard,
                    });
                }
            }
        }
        Ok(sent)
    }
}

/// A request [`Source::send_to_every_shard`] could not send to every
/// shard.
pub struct CutShort<E> {
    /// Why the send to shard `failed_at` failed.
    pub error: E,
    /// The shards that have the request (their workers apply it); empty
    /// when none has.
    pub sent_to: Vec<u32>,
    /// The shard it failed on (`None` on a single store).
    pub failed_at: Option<u32>,
}

impl<E> CutShort<E> {
    /// What to add to the error, if some shards have the request: which,
    /// and that it should be sent again. `None` when no shard has it.
    pub fn partly_sent(&self, what: &str) -> Option<String> {
        if self.sent_to.is_empty() {
            return None;
        }
        let done: Vec<String> = self.sent_to.iter().map(u32::to_string).collect();
        Some(format!(
            "the {what} was sent to shard(s) {} (their workers apply it) but not to shard {} or \
             after: send it again once the store answers",
            done.join(", "),
            self.failed_at.unwrap_or_default()
        ))
    }
}
