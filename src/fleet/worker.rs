//! A fleet worker: one process of a fleet. It takes a fair share of the
//! fleet's shards through their leases, runs a [`WorkflowRuntime`] on each
//! shard it holds, renews the leases, and stops writing to a shard before
//! its lease can lapse (see [`super::lease`] for the protocol).
//!
//! Each shard held has a keeper task of its own: it renews the lease every
//! third of the lease on its own timer, so nothing else the worker does
//! (listings, takes, other shards' opens and releases) ever delays a
//! renewal, and when the shard's runtime ends it releases the lease (after
//! a hand-back) or leaves it to lapse. A shard's runtime runs under a
//! fence: when its lease's validity ends without a renewal, the runtime is
//! dropped at once, commits in flight included; SlateDB's fencing (the
//! taker's open) is the last line.
//!
//! Each tick (a third of the lease): beat this worker's membership object,
//! count the live workers, note every shard's highest lease epoch (one
//! listing), take shards up to `ceil(N / live)` (only those the listings
//! show free or standing still, [`Watch::worth_a_try`], and starting no
//! take after a tick's time), and hand one shard back when holding more
//! than that (a worker joined). A graceful hand-off stops claiming, lets
//! in-flight steps settle, closes the store, then releases the lease. Each
//! shard's runtime is told its shard before it runs, so it fires only the
//! schedules homed there.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use taquba::Queue;
use taquba::object_store::path::Path;
use taquba::object_store::{ObjectStoreExt, PutPayload};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::lease::{HeldLease, LeaseTiming, Leases, Watch};
use super::manifest::{FleetManifest, store_error};
use super::probe::check_conditional_writes;
use crate::error::Error;
use crate::hook::TerminalHook;
use crate::route::fnv1a64;
use crate::runner::StepRunner;
use crate::runtime::WorkflowRuntime;
use crate::store::{StoreLocation, StoreOptions, open_worker_store};

/// Builds the runtime of one shard from its opened store.
pub type MakeRuntime<R, H> =
    dyn Fn(u32, Arc<Queue>) -> Result<WorkflowRuntime<R, H>, Error> + Send + Sync;

/// Builds the store options of one shard.
pub type MakeStoreOptions = dyn Fn(u32) -> StoreOptions + Send + Sync;

/// What a fleet worker did with one of its shards, for a process that
/// reports it ([`FleetWorker::events`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ShardEvent {
    /// It took the shard's lease (at `epoch`), opened it and started its
    /// runtime.
    Took {
        /// The shard.
        shard: u32,
        /// The lease epoch it created.
        epoch: u64,
    },
    /// It handed the shard back gracefully: its runtime stopped, its
    /// store closed, its lease released.
    HandedBack {
        /// The shard.
        shard: u32,
    },
    /// It stopped working the shard without a clean hand-back (its lease
    /// was taken or lapsed, its runtime stopped, the release failed); the
    /// lease is left to lapse or is another worker's already.
    Dropped {
        /// The shard.
        shard: u32,
        /// Why, in words.
        reason: String,
    },
}

type Events = Option<tokio::sync::mpsc::UnboundedSender<ShardEvent>>;

fn report(events: &Events, event: ShardEvent) {
    if let Some(events) = events {
        let _ = events.send(event);
    }
}

/// One worker process of a fleet.
pub struct FleetWorker<R, H> {
    location: StoreLocation,
    shards: u32,
    timing: LeaseTiming,
    id: String,
    store_options: Arc<MakeStoreOptions>,
    make: Arc<MakeRuntime<R, H>>,
    events: Events,
}

/// A shard this worker runs. Its keeper (a task of the worker's
/// [`JoinSet`], see [`keep`]) holds the lease and renews it.
struct Running {
    /// Asks the runtime to stop gracefully: a hand-back.
    stop: CancellationToken,
    /// The keeper's task.
    keeper: tokio::task::Id,
}

impl Running {
    /// Stop claiming; the steps in flight settle, then the store closes
    /// and the keeper releases the lease. Renewals go on meanwhile.
    fn hand_back(&self) {
        self.stop.cancel();
    }

    /// Whether the shard is being handed back.
    fn leaving(&self) -> bool {
        self.stop.is_cancelled()
    }
}

/// A keeper's end: its shard, or why the task failed.
type KeeperEnd = Result<(tokio::task::Id, u32), tokio::task::JoinError>;

/// What the worker's ticks work with.
struct Tending {
    manifest: FleetManifest,
    leases: Leases,
    members: Members,
    /// The shards this worker runs (handed-back ones until their keeper
    /// ends).
    running: BTreeMap<u32, Running>,
    /// The keepers of the running shards; each ends with its shard.
    keepers: JoinSet<u32>,
    /// What the listings showed of every shard's lease.
    watches: HashMap<u32, Watch>,
    last_live: Option<u32>,
    /// Where takes start: a point of this worker's own, so workers
    /// starting together do not all race for shard 0.
    start: u32,
}

impl Tending {
    /// Forget the shards whose keeper ended (it reported how).
    fn reap(&mut self, events: &Events) {
        while let Some(done) = self.keepers.try_join_next_with_id() {
            self.reaped(done, events);
        }
    }

    fn reaped(&mut self, done: KeeperEnd, events: &Events) {
        match done {
            Ok((_, shard)) => {
                self.running.remove(&shard);
            }
            Err(e) => {
                let id = e.id();
                let shard = self
                    .running
                    .iter()
                    .find(|(_, r)| r.keeper == id)
                    .map(|(shard, _)| *shard);
                if let Some(shard) = shard {
                    self.running.remove(&shard);
                    let reason =
                        format!("its lease's keeper failed; the lease is left to lapse: {e}");
                    tracing::error!(shard, "{reason}");
                    report(events, ShardEvent::Dropped { shard, reason });
                }
            }
        }
    }

    /// How many shards stay (are not being handed back).
    fn staying(&self) -> usize {
        self.running.values().filter(|r| !r.leaving()).count()
    }
}

impl<R: StepRunner + 'static, H: TerminalHook + 'static> FleetWorker<R, H> {
    /// A worker of the fleet at `location` with `shards` shards (created
    /// if there is no fleet yet), whose shard runtimes `make` builds.
    ///
    /// `make` may give every shard's runtime the same schedules: the worker
    /// assigns each runtime its shard before running it, and the runtime
    /// then fires only the schedules homed there
    /// ([`shard_of_schedule`](super::shard_of_schedule)), so each fires once
    /// for the fleet.
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
            events: None,
        }
    }

    /// Report each shard taken, handed back or dropped on `events` (a
    /// closed receiver is ignored).
    pub fn events(mut self, events: tokio::sync::mpsc::UnboundedSender<ShardEvent>) -> Self {
        self.events = Some(events);
        self
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
        // Probe first: on a store that ignores conditional writes, not
        // even the manifest is written.
        check_conditional_writes(&self.location).await?;
        let manifest = FleetManifest::open_or_create(&self.location, self.shards).await?;
        let start =
            u32::try_from(fnv1a64(self.id.as_bytes()) % u64::from(manifest.shards)).unwrap_or(0);
        let mut t = Tending {
            leases: Leases::new(self.location.clone(), self.id.clone(), self.timing)?,
            members: Members::new(&self.location, &self.id),
            manifest,
            running: BTreeMap::new(),
            keepers: JoinSet::new(),
            watches: HashMap::new(),
            last_live: None,
            start,
        };
        let mut tick = tokio::time::interval(self.timing.renew_every());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shutdown = std::pin::pin!(shutdown);
        // Renewals are not the tick's: each shard's keeper renews on a
        // timer of its own, so nothing a tick waits on (a listing, a take)
        // ever delays one.
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                _ = tick.tick() => {}
            }
            t.reap(&self.events);
            tokio::select! {
                () = &mut shutdown => break,
                () = self.tend(&mut t) => {}
            }
        }
        for r in t.running.values() {
            r.hand_back();
        }
        while let Some(done) = t.keepers.join_next_with_id().await {
            t.reaped(done, &self.events);
        }
        t.members.leave().await;
        Ok(())
    }

    /// One tick: beat this worker's membership, count the live workers,
    /// list the leases, take the shards worth a try up to the fair share
    /// (starting no take after a tick's time), and hand one shard back
    /// above it.
    async fn tend(&self, t: &mut Tending) {
        let now = Instant::now();
        let takes_until = now.checked_add(self.timing.renew_every()).unwrap_or(now);
        if let Err(e) = t.members.beat().await {
            tracing::warn!("beating this worker's membership failed: {e}");
        }
        let live = t.members.live(self.timing).await.unwrap_or(1).max(1);
        let share = t.manifest.shards.div_ceil(live) as usize;
        if t.last_live.replace(live) != Some(live) {
            tracing::info!(live, share, "the fleet's live workers changed");
        }
        // Watch every shard's lease, so a dead owner's wait runs from its
        // last renewal, and a take reads only the shards worth it.
        match t.leases.observe(&mut t.watches).await {
            Ok(()) => {
                for offset in 0..t.manifest.shards {
                    if t.staying() >= share || Instant::now() >= takes_until {
                        break;
                    }
                    let shard = (t.start + offset) % t.manifest.shards;
                    if t.running.contains_key(&shard) {
                        continue;
                    }
                    let watch = t.watches.entry(shard).or_default();
                    if !watch.worth_a_try(self.timing) {
                        continue;
                    }
                    match t.leases.try_take(shard, watch).await {
                        Ok(Some(lease)) => {
                            tracing::info!(shard, "leased the shard; opening it");
                            self.start(t, lease);
                        }
                        Ok(None) => {}
                        Err(e) => tracing::warn!(shard, "taking a shard failed: {e}"),
                    }
                }
            }
            Err(e) => tracing::warn!("listing the leases failed (no take this tick): {e}"),
        }
        // Hand one back above the fair share.
        if t.staying() > share
            && let Some(r) = t.running.values().rev().find(|r| !r.leaving())
        {
            r.hand_back();
        }
    }

    /// Start a taken shard: open its store and run its runtime, all under
    /// its fence (a lease that lapses stops it, open included), with a
    /// keeper that renews the lease.
    fn start(&self, t: &mut Tending, lease: HeldLease) {
        let shard = lease.shard;
        let shards = t.manifest.shards;
        let at = t.manifest.shard_location(&self.location, shard);
        // The user's functions are called in the shard's task: a panic in
        // one ends that task (its lease lapses), not the fleet worker.
        let store_options = self.store_options.clone();
        let make = self.make.clone();
        let events = self.events.clone();
        let epoch = lease.epoch;
        let stop = CancellationToken::new();
        let (valid_until, mut fence) = tokio::sync::watch::channel(lease.valid_until);
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let fenced = async {
                    loop {
                        let until = *fence.borrow_and_update();
                        tokio::select! {
                            // A renewal that lands after the validity
                            // ended comes too late.
                            biased;
                            () = tokio::time::sleep_until(until) => return,
                            changed = fence.changed() => if changed.is_err() { return },
                        }
                    }
                };
                let work = async {
                    let queue = open_worker_store(&at, store_options(shard)).await?;
                    let rt = make(shard, queue.clone())?;
                    // Each schedule fires on its home shard only.
                    rt.inner.schedules.assign_shard(shard, shards)?;
                    tracing::info!(shard, "took the shard");
                    report(&events, ShardEvent::Took { shard, epoch });
                    rt.run(stop.cancelled_owned()).await?;
                    // Close the store cleanly, so the next owner's open
                    // starts from a closed database.
                    drop(rt);
                    close_when_unshared(shard, queue).await
                };
                tokio::select! {
                    // The fence first: once the validity has ended the
                    // work is not polled again.
                    biased;
                    () = fenced => Err(Error::WorkerStopped(
                        "the shard's lease lapsed before a renewal: stopped writing to it".into(),
                    )),
                    ran = work => ran,
                }
            }
        });
        let keeper = t.keepers.spawn(keep(
            t.leases.clone(),
            lease,
            valid_until,
            AbortOnDrop(task),
            stop.clone(),
            self.events.clone(),
        ));
        t.running.insert(
            shard,
            Running {
                stop,
                keeper: keeper.id(),
            },
        );
    }
}

/// A task aborted when its handle is dropped: a shard's runtime never
/// outlives its keeper (a worker dropped mid-run included), so it never
/// runs on without renewals.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Keep a taken shard until its runtime ends: renew its lease every third
/// of the lease on a timer of its own, so nothing else the worker does
/// (listings, takes, other shards' opens and releases) ever delays a
/// renewal; move the runtime's fence with each renewal; stop the runtime
/// at once when the lease was taken. When the runtime ends, release the
/// lease after a hand-back that went well, else leave it to lapse.
/// Reports what became of the shard, and returns it.
async fn keep(
    leases: Leases,
    mut lease: HeldLease,
    fence: tokio::sync::watch::Sender<Instant>,
    mut runtime: AbortOnDrop<Result<(), Error>>,
    stop: CancellationToken,
    events: Events,
) -> u32 {
    let shard = lease.shard;
    let every = leases.timing().renew_every();
    let now = Instant::now();
    let mut renewals = tokio::time::interval_at(now.checked_add(every).unwrap_or(now), every);
    renewals.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let ran = loop {
        tokio::select! {
            ran = &mut runtime.0 => break ran,
            _ = renewals.tick() => {}
        }
        // Past its validity the fence stops the runtime: a renewal sent
        // then (or still in flight then) comes too late.
        if !lease.is_valid() {
            continue;
        }
        match tokio::time::timeout_at(lease.valid_until, leases.renew(&mut lease)).await {
            Ok(Ok(())) => {
                let _ = fence.send(lease.valid_until);
                // The old epoch's object goes on a task of its own, bounded
                // by a renewal's interval: a delete that hangs holds up
                // neither the fence's move nor the next renewal.
                let (leases, renewed) = (leases.clone(), lease.clone());
                tokio::spawn(async move {
                    let every = leases.timing().renew_every();
                    let _ = tokio::time::timeout(every, leases.forget_behind(&renewed)).await;
                });
            }
            Ok(Err(Error::LeaseLost { .. })) => {
                tracing::error!(shard, "the shard's lease was taken: stopping it now");
                runtime.0.abort();
                let _ = (&mut runtime.0).await;
                report(
                    &events,
                    ShardEvent::Dropped {
                        shard,
                        reason: "its lease was taken by another worker".into(),
                    },
                );
                return shard;
            }
            Ok(Err(e)) => tracing::warn!(
                shard,
                "renewing a shard's lease failed (its fence stands): {e}"
            ),
            Err(_) => tracing::warn!(
                shard,
                "a renewal of a shard's lease outlasted its validity: the fence stops the shard"
            ),
        }
    };
    report(
        &events,
        ended(ran, stop.is_cancelled(), &leases, lease).await,
    );
    shard
}

/// How long a shard's store may stay shared after its runtime ended (a
/// task of the user's finishing) before the hand-back gives up on it.
const UNSHARED_WITHIN: Duration = Duration::from_secs(5);

/// Close a shard's store once this is its last handle. A handle kept
/// elsewhere (the user's `make` function stored a clone) would keep the
/// store open after the lease is released, beside the next owner's: the
/// shard is then not handed back, and its lease is left to lapse.
async fn close_when_unshared(shard: u32, mut queue: Arc<Queue>) -> Result<(), Error> {
    let now = Instant::now();
    let deadline = now.checked_add(UNSHARED_WITHIN).unwrap_or(now);
    loop {
        match Arc::try_unwrap(queue) {
            Ok(queue) => return queue.close().await.map_err(Error::from),
            Err(shared) if Instant::now() >= deadline => {
                let others = Arc::strong_count(&shared).saturating_sub(1);
                tracing::warn!(shard, others, "the shard's store is still in use elsewhere");
                return Err(Error::WorkerStopped(format!(
                    "shard {shard}'s store was still in use elsewhere ({others} other handle(s), \
                     kept by the function that builds its runtime?) {}s after its runtime \
                     stopped, so it could not be closed; its lease is left to lapse",
                    UNSHARED_WITHIN.as_secs()
                )));
            }
            Err(shared) => {
                queue = shared;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// A shard's runtime ended (`leaving`: after a hand-back): release the
/// lease after a hand-back that went well, otherwise leave it to lapse.
/// What became of the shard.
async fn ended(
    ran: Result<Result<(), Error>, tokio::task::JoinError>,
    leaving: bool,
    leases: &Leases,
    lease: HeldLease,
) -> ShardEvent {
    let shard = lease.shard;
    let dropped = |reason: String| {
        tracing::warn!(shard, "a shard's runtime stopped: {reason}");
        ShardEvent::Dropped { shard, reason }
    };
    match ran {
        Err(e) => dropped(format!(
            "its runtime panicked; its lease is left to lapse: {e}"
        )),
        Ok(Err(e)) => dropped(format!("{e}")),
        Ok(Ok(())) if !leaving => dropped("its runtime stopped; its lease is left to lapse".into()),
        Ok(Ok(())) => match leases.release(lease).await {
            Ok(()) => {
                tracing::info!(shard, "handed the shard back");
                ShardEvent::HandedBack { shard }
            }
            Err(e) => dropped(format!("releasing its lease failed (it lapses): {e}")),
        },
    }
}

/// How many lease windows (lease + guard) a member's object may stand
/// unchanged before another worker deletes it: a worker killed without
/// leaving (its `leave` deletes its own) would otherwise leave it in the
/// bucket for good, and every tick of every worker lists them all. A
/// worker frozen that long and woken beats again: its object comes back.
const STALE_MEMBER_WINDOWS: u32 = 5;

/// The fleet's membership: one object per worker, rewritten each tick;
/// a worker is live while its object changes within a lease, and its
/// object is deleted once it has stood still for [`STALE_MEMBER_WINDOWS`].
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
        let stale = window.saturating_mul(STALE_MEMBER_WINDOWS);
        let mut live = 0u32;
        let mut present = Vec::new();
        let mut dead = Vec::new();
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
            let still = now.duration_since(since);
            if meta.location == self.me || still < window {
                live = live.saturating_add(1);
            } else if still >= stale {
                dead.push(meta.location.clone());
            }
            present.push(name);
        }
        drop(listing);
        let present: std::collections::HashSet<String> = present.into_iter().collect();
        crate::sync::lock(&self.seen).retain(|name, _| present.contains(name));
        for gone in dead {
            match self.location.object_store().delete(&gone).await {
                Ok(()) => tracing::info!(member = %gone, "removed a dead worker's membership"),
                Err(e) => tracing::debug!(member = %gone, "removing a dead member failed: {e}"),
            }
        }
        Ok(live.max(1))
    }

    async fn leave(&self) {
        if let Err(e) = self.location.object_store().delete(&self.me).await {
            tracing::warn!("removing this worker's membership failed (it lapses): {e}");
        }
    }
}
