//! A fleet as an observer sees it (`waymark fleet`, a dashboard): its
//! shard count, and per shard its lease (owner, epoch, when it was written,
//! released or not) and its step queue's backlog.
//!
//! Everything here only reads: leases through a listing and a read of the
//! newest lease object ([`super::peek_lease`], which deletes nothing), each
//! shard's backlog through a taquba reader that takes no checkpoint, so it
//! never writes to a shard and never fences its writer.

use std::time::{Duration, SystemTime};

use taquba::{QueueReader, ReaderMode, ReaderOptions};

use super::lease::{LeaseView, peek_lease};
use super::manifest::FleetManifest;
use crate::error::Error;
use crate::store::StoreLocation;

/// A fleet's shards as they stand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetStatus {
    /// The fleet's manifest (its shard count).
    pub manifest: FleetManifest,
    /// Every shard, in shard order.
    pub shards: Vec<ShardStatus>,
}

/// One shard as it stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardStatus {
    /// The shard (`0..N`).
    pub shard: u32,
    /// Its lease's newest epoch: `None` when no worker ever took it.
    pub lease: Option<LeaseView>,
    /// Its step queue's backlog: `None` when no worker ever opened it (or
    /// it could not be read: see [`Self::problems`]).
    pub backlog: Option<Backlog>,
    /// What could not be read for this shard, each with its error: its
    /// lease object (it does not decode) or its store (for example one a
    /// worker is creating at this moment). One shard's problem does not
    /// hide the others.
    pub problems: Vec<String>,
}

impl ShardStatus {
    /// Whether a worker holds the shard (its lease taken, not released).
    /// Whether that worker is still alive shows in [`Self::lease_age`]: an
    /// owner renews every third of its lease.
    pub fn owner(&self) -> Option<&str> {
        self.lease
            .as_ref()
            .filter(|lease| !lease.released)
            .map(|lease| lease.owner.as_str())
    }

    /// How long ago, at `now`, the lease's newest object was written (the
    /// store's clock against the caller's: for display only; zero when the
    /// clocks disagree).
    pub fn lease_age(&self, now: SystemTime) -> Option<Duration> {
        self.lease
            .as_ref()
            .map(|lease| now.duration_since(lease.written).unwrap_or_default())
    }
}

/// A shard's step jobs by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backlog {
    /// Ready to be claimed now.
    pub ready: u64,
    /// Claimed by the shard's worker (running).
    pub claimed: u64,
    /// Waiting for their time (a wait before a step, a retry's backoff).
    pub scheduled: u64,
}

impl FleetStatus {
    /// Read the fleet at `location` whose runtimes use the step queue
    /// `queue_name`. [`Error::NotAWaymarkStore`] when there is no fleet
    /// there.
    pub async fn read(location: &StoreLocation, queue_name: &str) -> Result<Self, Error> {
        let Some(manifest) = FleetManifest::read(location).await? else {
            return Err(Error::NotAWaymarkStore {
                location: location.to_string(),
                reason: "no fleet manifest (a fleet worker creates it)".into(),
            });
        };
        let mut shards = Vec::with_capacity(manifest.shards as usize);
        for shard in 0..manifest.shards {
            let mut problems = Vec::new();
            let lease = match peek_lease(location, shard).await {
                Ok(lease) => lease,
                Err(e) if e.is_unreadable_record() => {
                    problems.push(format!("its lease: {e}"));
                    None
                }
                Err(e) => return Err(e),
            };
            let at = manifest.shard_location(location, shard);
            let backlog = match backlog(&at, queue_name).await {
                Ok(backlog) => backlog,
                Err(e @ (Error::Queue(_) | Error::CorruptRecord { .. })) => {
                    problems.push(format!("its store: {e}"));
                    None
                }
                Err(e) => return Err(e),
            };
            shards.push(ShardStatus {
                shard,
                lease,
                backlog,
                problems,
            });
        }
        Ok(Self { manifest, shards })
    }
}

/// The backlog of the step queue `queue_name` in the shard store at `at`,
/// through a reader that takes no checkpoint: `None` when the store was
/// never opened.
async fn backlog(at: &StoreLocation, queue_name: &str) -> Result<Option<Backlog>, Error> {
    let options = ReaderOptions::default().mode(ReaderMode::FollowLatest);
    let reader =
        match QueueReader::open_with_options(at.object_store().clone(), at.path(), options).await {
            Ok(reader) => reader,
            Err(taquba::Error::StoreNotInitialized { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
    let stats = reader.view().stats(queue_name).await;
    let _ = reader.close().await;
    let stats = stats?;
    let count = |n: i64| u64::try_from(n).unwrap_or(0);
    Ok(Some(Backlog {
        ready: count(stats.pending),
        claimed: count(stats.claimed),
        scheduled: count(stats.scheduled),
    }))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use taquba::object_store::ObjectStoreExt;
    use taquba::object_store::memory::InMemory;

    use super::*;
    use crate::fleet::{LeaseTiming, Leases, Watch};

    #[tokio::test]
    async fn a_prefix_without_a_fleet_is_an_error() {
        let at = StoreLocation::new(Arc::new(InMemory::new()), "nothing");
        let e = FleetStatus::read(&at, "q").await.unwrap_err();
        assert!(matches!(e, Error::NotAWaymarkStore { .. }), "{e}");
    }

    #[tokio::test]
    async fn leases_show_owner_epoch_and_release_and_reading_deletes_nothing() {
        let at = StoreLocation::new(Arc::new(InMemory::new()), "fleet");
        FleetManifest::open_or_create(&at, 3).await.unwrap();
        let a = Leases::new(at.clone(), "worker-a".into(), LeaseTiming::default()).unwrap();
        let mut held = a.try_take(0, &mut Watch::default()).await.unwrap().unwrap();
        a.renew(&mut held).await.unwrap();
        let released = a.try_take(2, &mut Watch::default()).await.unwrap().unwrap();
        a.release(released).await.unwrap();
        // Junk a failed delete left behind: a worker's view deletes it, an
        // observer's read must not.
        let junk =
            taquba::object_store::path::Path::from(format!("fleet/leases/shard-0000/{:020}", 0));
        at.object_store()
            .put(&junk, taquba::object_store::PutPayload::from_static(b"x"))
            .await
            .unwrap();
        let objects = || async {
            use futures_util::StreamExt;
            at.object_store().list(None).count().await
        };
        let before = objects().await;
        let status = FleetStatus::read(&at, "q").await.unwrap();
        assert_eq!(objects().await, before);
        assert_eq!(status.manifest.shards, 3);
        let [zero, one, two] = &status.shards[..] else {
            panic!("{status:?}")
        };
        assert_eq!(zero.owner(), Some("worker-a"));
        assert_eq!(zero.lease.as_ref().unwrap().epoch, 2);
        assert!(zero.lease_age(SystemTime::now()).is_some());
        assert_eq!((one.lease.as_ref(), one.owner()), (None, None));
        assert_eq!(two.owner(), None);
        assert!(two.lease.as_ref().unwrap().released);
        // No worker opened any shard.
        assert!(status.shards.iter().all(|s| s.backlog.is_none()));
        assert!(status.shards.iter().all(|s| s.problems.is_empty()));
    }

    #[tokio::test]
    async fn a_shard_whose_lease_does_not_decode_is_shown_with_its_problem() {
        let at = StoreLocation::new(Arc::new(InMemory::new()), "fleet");
        FleetManifest::open_or_create(&at, 2).await.unwrap();
        let a = Leases::new(at.clone(), "worker-a".into(), LeaseTiming::default()).unwrap();
        a.try_take(0, &mut Watch::default()).await.unwrap().unwrap();
        let garbled =
            taquba::object_store::path::Path::from(format!("fleet/leases/shard-0001/{:020}", 1));
        at.object_store()
            .put(
                &garbled,
                taquba::object_store::PutPayload::from_static(b"\xc1"),
            )
            .await
            .unwrap();
        let status = FleetStatus::read(&at, "q").await.unwrap();
        let [zero, one] = &status.shards[..] else {
            panic!("{status:?}")
        };
        assert_eq!(zero.owner(), Some("worker-a"));
        assert!(zero.problems.is_empty(), "{zero:?}");
        assert_eq!(one.lease, None);
        assert_eq!(one.problems.len(), 1, "{one:?}");
        assert!(
            one.problems[0].starts_with("its lease: record `fleet/leases/shard-0001/"),
            "{one:?}"
        );
    }
}
