//! What `serve` reads and sends through: one store's [`Client`], or a
//! fleet's [`FleetClient`] (a client on every shard).
//!
//! Everything about one run (its status, outcome, history, children, a
//! cancel) goes to the run's shard, as every other command routes it; a
//! schedule's record and requests live on its home shard; the run listing
//! and the schedules are merged across shards. What each shard keeps for
//! itself is shown per shard: a workflow's breaker and tally, the dead
//! jobs, the writer's heartbeat. A handler that needs every shard walks
//! [`Source::shards`], which on a single store is that store with no shard
//! number.

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
}
