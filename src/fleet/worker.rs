//! A fleet worker: one process of a fleet. It takes a fair share of the
//! fleet's shards through their leases, runs a [`WorkflowRuntime`] on each
//! shard it holds, renews the leases, and stops writing to a shard before
//! its lease can lapse (see [`super::lease`] for the protocol).
//!
//! Each tick (a third of the lease): beat this worker's membership object,
//! count the live workers, renew every held lease, take free or lapsed
//! shards up to `ceil(N / live)`, and hand one shard back when holding more
//! than that (a worker joined). A shard's runtime runs under a fence: when
//! its lease's validity ends without a renewal, the runtime is dropped at
//! once, commits in flight included; SlateDB's fencing (the taker's open)
//! is the last line. A graceful hand-off stops claiming, lets in-flight
//! steps settle, closes the store, then releases the lease.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;

use futures_util::StreamExt;
use taquba::Queue;
use taquba::object_store::path::Path;
use taquba::object_store::{ObjectStoreExt, PutPayload};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::lease::{HeldLease, LeaseTiming, Leases, Watch};
use super::manifest::{FleetManifest, store_error};
use super::probe::check_conditional_writes;
use super::route::fnv1a64;
use crate::error::Error;
use crate::hook::TerminalHook;
use crate::runner::StepRunner;
use crate::runtime::WorkflowRuntime;
use crate::store::{StoreLocation, StoreOptions, open_worker_store};

/// Builds the runtime of one shard from its opened store.
pub type MakeRuntime<R, H> =
    dyn Fn(u32, Arc<Queue>) -> Result<WorkflowRuntime<R, H>, Error> + Send + Sync;

/// Builds the store options of one shard.
pub type MakeStoreOptions = dyn Fn(u32) -> StoreOptions + Send + Sync;

/// One worker process of a fleet.
pub struct FleetWorker<R, H> {
    location: StoreLocation,
    shards: u32,
    timing: LeaseTiming,
    id: String,
    store_options: Arc<MakeStoreOptions>,
    make: Arc<MakeRuntime<R, H>>,
}

/// A shard this worker runs.
struct Running {
    lease: HeldLease,
    /// Moves the fence when the lease is renewed.
    valid_until: tokio::sync::watch::Sender<Instant>,
    /// Asks the runtime to stop gracefully.
    stop: CancellationToken,
    task: JoinHandle<Result<(), Error>>,
}

impl<R: StepRunner + 'static, H: TerminalHook + 'static> FleetWorker<R, H> {
    /// A worker of the fleet at `location` with `shards` shards (created
    /// if there is no fleet yet), whose shard runtimes `make` builds.
    pub fn new(
        location: StoreLocation,
        shards: u32,
        make: impl Fn(u32, Arc<Queue>) -> Result<WorkflowRuntime<R, H>, Error> + Send + Sync + 'static,
    ) -> Self {
        Self {
            location,
            shards,
            timing: LeaseTiming::default(),
            id: ulid::Ulid::generate().to_string(),
            store_options: Arc::new(|_| StoreOptions::default()),
            make: Arc::new(make),
        }
    }

    /// The lease timing (default: 10 s, guard 2 s).
    pub fn lease_timing(mut self, timing: LeaseTiming) -> Self {
        self.timing = timing;
        self
    }

    /// The store options of each shard (default: [`StoreOptions::default`]).
    pub fn store_options(
        mut self,
        f: impl Fn(u32) -> StoreOptions + Send + Sync + 'static,
    ) -> Self {
        self.store_options = Arc::new(f);
        self
    }

    /// This worker's id (a fresh ULID by default; unique per process).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Run until `shutdown` resolves, then hand every shard back.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let manifest = FleetManifest::open_or_create(&self.location, self.shards).await?;
        check_conditional_writes(&self.location).await?;
        let leases = Leases::new(self.location.clone(), self.id.clone(), self.timing)?;
        let members = Members::new(&self.location, &self.id);
        let mut running: BTreeMap<u32, Running> = BTreeMap::new();
        let mut watches: HashMap<u32, Watch> = HashMap::new();
        let mut last_live = None;
        let mut tick = tokio::time::interval(self.timing.renew_every());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shutdown = std::pin::pin!(shutdown);
        // Shards are tried from a point of this worker's own, so workers
        // starting together do not all race for shard 0.
        let start =
            u32::try_from(fnv1a64(self.id.as_bytes()) % u64::from(manifest.shards)).unwrap_or(0);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                _ = tick.tick() => {}
            }
            // A shard whose runtime stopped by itself (fenced, store gone).
            let ended: Vec<u32> = running
                .iter()
                .filter(|(_, r)| r.task.is_finished())
                .map(|(s, _)| *s)
                .collect();
            for shard in ended {
                if let Some(r) = running.remove(&shard) {
                    match r.task.await {
                        Ok(Ok(())) => tracing::warn!(shard, "a shard's runtime stopped"),
                        Ok(Err(e)) => tracing::warn!(shard, "a shard's runtime stopped: {e}"),
                        Err(e) => tracing::warn!(shard, "a shard's runtime panicked: {e}"),
                    }
                }
            }
            if let Err(e) = members.beat().await {
                tracing::warn!("beating this worker's membership failed: {e}");
            }
            let live = members.live(self.timing).await.unwrap_or(1).max(1);
            let share = manifest.shards.div_ceil(live);
            if last_live.replace(live) != Some(live) {
                tracing::info!(live, share, "the fleet's live workers changed");
            }
            // Renew.
            let mut lost = Vec::new();
            for (shard, r) in running.iter_mut() {
                match leases.renew(&mut r.lease).await {
                    Ok(()) => {
                        let _ = r.valid_until.send(r.lease.valid_until);
                    }
                    Err(Error::LeaseLost { .. }) => lost.push(*shard),
                    Err(e) => tracing::warn!(
                        shard,
                        "renewing a shard's lease failed (its fence stands): {e}"
                    ),
                }
            }
            for shard in lost {
                if let Some(r) = running.remove(&shard) {
                    tracing::error!(shard, "the shard's lease was taken: stopping it now");
                    r.task.abort();
                }
            }
            // Take up to the fair share.
            for offset in 0..manifest.shards {
                if running.len() >= share as usize {
                    break;
                }
                let shard = (start + offset) % manifest.shards;
                if running.contains_key(&shard) {
                    continue;
                }
                let watch = watches.entry(shard).or_default();
                match leases.try_take(shard, watch).await {
                    Ok(Some(lease)) => match self.start(&manifest, lease).await {
                        Ok(r) => {
                            tracing::info!(shard, "took the shard");
                            running.insert(shard, r);
                        }
                        Err(e) => tracing::warn!(shard, "opening a taken shard failed: {e}"),
                    },
                    Ok(None) => {}
                    Err(e) => tracing::warn!(shard, "taking a shard failed: {e}"),
                }
            }
            // Hand one back above the fair share.
            if running.len() > share as usize
                && let Some(shard) = running.keys().next_back().copied()
                && let Some(r) = running.remove(&shard)
            {
                hand_back(&leases, shard, r).await;
            }
        }
        for (shard, r) in std::mem::take(&mut running) {
            hand_back(&leases, shard, r).await;
        }
        members.leave().await;
        Ok(())
    }

    /// Open a taken shard's store and start its runtime under its fence.
    async fn start(&self, manifest: &FleetManifest, lease: HeldLease) -> Result<Running, Error> {
        let at = manifest.shard_location(&self.location, lease.shard);
        let queue = open_worker_store(&at, (self.store_options)(lease.shard)).await?;
        let rt = (self.make)(lease.shard, queue)?;
        let stop = CancellationToken::new();
        let (valid_until, mut fence) = tokio::sync::watch::channel(lease.valid_until);
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let fenced = async {
                    loop {
                        let until = *fence.borrow_and_update();
                        tokio::select! {
                            () = tokio::time::sleep_until(until) => return,
                            changed = fence.changed() => if changed.is_err() { return },
                        }
                    }
                };
                tokio::select! {
                    ran = rt.run(stop.cancelled_owned()) => ran,
                    () = fenced => Err(Error::WorkerStopped("the shard's lease lapsed before a renewal: stopped writing to it".into())),
                }
            }
        });
        Ok(Running {
            lease,
            valid_until,
            stop,
            task,
        })
    }
}

/// Stop a shard gracefully (in-flight steps settle, the store closes),
/// then release its lease.
async fn hand_back(leases: &Leases, shard: u32, r: Running) {
    r.stop.cancel();
    match r.task.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(
                shard,
                "the shard stopped with an error; its lease is left to lapse: {e}"
            );
            return;
        }
        Err(e) => {
            tracing::warn!(
                shard,
                "the shard's runtime panicked; its lease is left to lapse: {e}"
            );
            return;
        }
    }
    match leases.release(r.lease).await {
        Ok(()) => tracing::info!(shard, "handed the shard back"),
        Err(e) => tracing::warn!(shard, "releasing the shard's lease failed (it lapses): {e}"),
    }
}

/// The fleet's membership: one object per worker, rewritten each tick;
/// a worker is live while its object changes within a lease.
struct Members {
    location: StoreLocation,
    dir: Path,
    me: Path,
    beats: std::sync::atomic::AtomicU64,
    /// Per member: its last object version seen, and when it changed.
    seen: std::sync::Mutex<HashMap<String, (String, Instant)>>,
}

impl Members {
    fn new(location: &StoreLocation, id: &str) -> Self {
        let dir = Path::from(format!("{}/members", location.path().trim_end_matches('/')));
        let me = Path::from(format!("{dir}/{id}"));
        Self {
            location: location.clone(),
            dir,
            me,
            beats: Default::default(),
            seen: Default::default(),
        }
    }

    async fn beat(&self) -> Result<(), Error> {
        let n = self
            .beats
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.location
            .object_store()
            .put(&self.me, PutPayload::from(n.to_string().into_bytes()))
            .await
            .map_err(|e| store_error(&self.location, "beat its membership", e))?;
        Ok(())
    }

    /// How many workers are live (this one included).
    async fn live(&self, timing: LeaseTiming) -> Result<u32, Error> {
        let mut listing = self.location.object_store().list(Some(&self.dir));
        let now = Instant::now();
        let window = timing.duration.saturating_add(timing.guard);
        let mut live = 0u32;
        let mut present = Vec::new();
        while let Some(meta) = listing.next().await {
            let meta =
                meta.map_err(|e| store_error(&self.location, "list the fleet's members", e))?;
            let Some(name) = meta.location.filename().map(str::to_string) else {
                continue;
            };
            let version = format!("{:?}{}", meta.e_tag, meta.last_modified);
            let mut seen = crate::sync::lock(&self.seen);
            let since = match seen.get(&name) {
                Some((v, at)) if *v == version => *at,
                _ => {
                    seen.insert(name.clone(), (version, now));
                    now
                }
            };
            if meta.location == self.me || now.duration_since(since) < window {
                live = live.saturating_add(1);
            }
            present.push(name);
        }
        crate::sync::lock(&self.seen).retain(|name, _| present.contains(name));
        Ok(live.max(1))
    }

    async fn leave(&self) {
        if let Err(e) = self.location.object_store().delete(&self.me).await {
            tracing::warn!("removing this worker's membership failed (it lapses): {e}");
        }
    }
}
