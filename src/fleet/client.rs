//! A client of a fleet: one [`Client`] per shard, every request routed to
//! its run's shard ([`super::shard_of_run`]) or its schedule's home
//! ([`super::shard_of_schedule`]), listings merged across shards.

use std::time::Duration;

use crate::client::{Client, ClientOptions, Sent};
use crate::error::Error;
use crate::hook::RunOutcome;
use crate::read::{DEFAULT_RUN_PAGE, RunFilter, RunPage, RunStatus};
use crate::runtime::{RunSpec, SubmitOutcome};
use crate::store::StoreLocation;

use super::manifest::FleetManifest;
use crate::route::{shard_of_run, shard_of_schedule};
use crate::schedule::ScheduleInfo;

/// Submits, cancels and observes runs of a fleet from any process.
#[derive(Clone)]
pub struct FleetClient {
    manifest: FleetManifest,
    shards: Vec<Client>,
}

impl FleetClient {
    /// A client of the fleet at `location`, which must exist (a worker
    /// creates it): [`Error::NotAWaymarkStore`] when there is none.
    pub async fn open(location: &StoreLocation, options: ClientOptions) -> Result<Self, Error> {
        let Some(manifest) = FleetManifest::read(location).await? else {
            return Err(Error::NotAWaymarkStore {
                location: location.to_string(),
                reason: "no fleet manifest (start a fleet worker first)".into(),
            });
        };
        let mut shards = Vec::with_capacity(manifest.shards as usize);
        for shard in 0..manifest.shards {
            let at = manifest.shard_location(location, shard);
            match Client::open(&at, options.clone()).await {
                Ok(client) => shards.push(client),
                Err(e) => {
                    // Not half open: the readers already opened are closed.
                    for client in &shards {
                        let _ = client.close().await;
                    }
                    return Err(e);
                }
            }
        }
        Ok(Self { manifest, shards })
    }

    /// The fleet's manifest.
    pub fn manifest(&self) -> FleetManifest {
        self.manifest
    }

    /// The client of `run_id`'s shard.
    pub fn shard_client(&self, run_id: &str) -> &Client {
        let shard = shard_of_run(run_id, self.manifest.shards) as usize;
        &self.shards[shard.min(self.shards.len().saturating_sub(1))]
    }

    /// [`Client::submit`] on the run's shard (a spec without a run id gets
    /// a ULID here, so it can be routed).
    pub async fn submit(&self, mut spec: RunSpec) -> Result<Sent, Error> {
        let run_id = spec
            .run_id
            .get_or_insert_with(|| ulid::Ulid::generate().to_string())
            .clone();
        self.shard_client(&run_id).submit(spec).await
    }

    /// [`Client::submit_and_wait`] on the run's shard (a spec without a
    /// run id gets a ULID here).
    pub async fn submit_and_wait(
        &self,
        mut spec: RunSpec,
        timeout: Duration,
    ) -> Result<SubmitOutcome, Error> {
        let run_id = spec
            .run_id
            .get_or_insert_with(|| ulid::Ulid::generate().to_string())
            .clone();
        self.shard_client(&run_id)
            .submit_and_wait(spec, timeout)
            .await
    }

    /// [`Client::cancel`] on the run's shard.
    pub async fn cancel(&self, run_id: &str) -> Result<Sent, Error> {
        self.shard_client(run_id).cancel(run_id).await
    }

    /// [`Client::status`] on the run's shard.
    pub async fn status(&self, run_id: &str) -> Result<Option<RunStatus>, Error> {
        self.shard_client(run_id).status(run_id).await
    }

    /// [`Client::outcome`] on the run's shard.
    pub async fn outcome(&self, run_id: &str) -> Result<Option<RunOutcome>, Error> {
        self.shard_client(run_id).outcome(run_id).await
    }

    /// [`Client::wait`] on the run's shard.
    pub async fn wait(&self, run_id: &str, timeout: Duration) -> Result<RunOutcome, Error> {
        self.shard_client(run_id).wait(run_id, timeout).await
    }

    /// A page of runs across every shard, in run id order (each shard's
    /// page after the same cursor, merged).
    pub async fn runs(&self, filter: &RunFilter) -> Result<RunPage, Error> {
        let limit = match filter.limit {
            0 => DEFAULT_RUN_PAGE,
            n => n,
        };
        let mut runs = Vec::new();
        let mut unreadable = Vec::new();
        let mut more = false;
        for client in &self.shards {
            let page = client.runs(filter).await?;
            more |= page.next.is_some();
            runs.extend(page.runs);
            unreadable.extend(page.unreadable);
        }
        runs.sort_by(|a, b| a.run_id.cmp(&b.run_id));
        unreadable.sort_by(|a, b| a.run_id.cmp(&b.run_id));
        if runs.len() > limit {
            runs.truncate(limit);
            more = true;
        }
        let next = if more {
            runs.last().map(|r| r.run_id.clone())
        } else {
            None
        };
        // Past the cut, a run is the next page's to name.
        if let Some(last) = &next {
            unreadable.retain(|u| u.run_id <= *last);
        }
        Ok(RunPage {
            runs,
            next,
            unreadable,
        })
    }

    /// Every shard's client, by shard number: for what concerns each shard
    /// on its own (a workflow's breaker is per shard: its health is read,
    /// and it is reset, on each).
    pub fn shards(&self) -> &[Client] {
        &self.shards
    }

    /// The client of the shard holding dead job `job_id` (job ids are not
    /// routed: each shard is asked), where `Client::requeue` is sent;
    /// `None` when no shard has such a dead job.
    pub async fn dead_job_client(&self, job_id: &str) -> Result<Option<&Client>, Error> {
        for client in &self.shards {
            if client.dead_job(job_id).await?.is_some() {
                return Ok(Some(client));
            }
        }
        Ok(None)
    }

    /// The client of schedule `id`'s home shard, where its record lives and
    /// its requests go: `fleet.schedule_client(id).trigger_and_wait(id, t)`
    /// fires it now (likewise `pause`, `resume`).
    pub fn schedule_client(&self, id: &str) -> &Client {
        let shard = shard_of_schedule(id, self.manifest.shards) as usize;
        &self.shards[shard.min(self.shards.len().saturating_sub(1))]
    }

    /// [`Client::schedule`] on the schedule's home shard.
    pub async fn schedule(&self, id: &str) -> Result<Option<ScheduleInfo>, Error> {
        self.schedule_client(id).schedule(id).await
    }

    /// Every recorded schedule across the shards, sorted by id (each lives
    /// on its home shard only).
    pub async fn schedules(&self) -> Result<Vec<ScheduleInfo>, Error> {
        let mut all = Vec::new();
        for client in &self.shards {
            all.extend(client.schedules().await?);
        }
        all.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(all)
    }

    /// Close every shard's reader.
    pub async fn close(&self) -> Result<(), Error> {
        for client in &self.shards {
            client.close().await?;
        }
        Ok(())
    }
}
