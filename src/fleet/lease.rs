//! Shard leases: at most one writer per shard, through objects in the
//! bucket and nothing else.
//!
//! # The protocol
//!
//! A shard's lease is a sequence of objects
//! `{prefix}/leases/shard-{shard:04}/{epoch:020}`, each created with a
//! conditional create (`If-None-Match: *` on S3, a hard link on a local
//! directory), never updated: the object with the highest epoch is the
//! lease, and its body names the owner (or says it was released). Creates
//! only, because a local directory cannot do a conditional update.
//!
//! - **Take** a free shard (no object, or the highest one released): create
//!   the next epoch. Of two workers racing, the create lets exactly one win.
//! - **Renew**: the owner creates the next epoch, every `duration / 3`. It
//!   may write to the shard until `sent + duration - guard`, where `sent` is
//!   when it *sent* its last successful renewal (on its own monotonic
//!   clock). A renewal that finds the next epoch taken by another worker
//!   means the lease was lost: stop at once. One that finds it its own (an
//!   earlier renewal's create reached the store, its reply did not) adopts
//!   it without extending the validity, and renews onward.
//! - **Take over** a held shard: a taker watches the highest epoch; only
//!   when the same epoch has stayed the highest for `duration + guard` since
//!   the taker *first saw it* (its own monotonic clock) does it create the
//!   next epoch.
//! - **Release** (graceful hand-off): after the owner stopped writing, it
//!   creates the next epoch marked released; a taker may take it at once.
//!
//! Why it is safe: the owner's last renewal object was created after the
//! owner sent it and before any taker could see it, so the owner stops
//! writing `2 × guard` before the earliest moment a taker creates the next
//! epoch. That holds while the two monotonic clocks run at rates within
//! `guard / duration` of each other and a taker's listing shows every
//! object created before it (S3 and local directories list consistently).
//! The wall clocks of the machines never enter. SlateDB's writer fencing is
//! the last line should the assumptions break: the taker's open of the
//! shard fences the old writer, whose next commit fails.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use taquba::object_store::path::Path;
use taquba::object_store::{Error as StoreError, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use tokio::time::Instant;

use super::manifest::store_error;
use crate::error::Error;
use crate::record::{decode, encode};
use crate::store::StoreLocation;

/// The timing of the lease protocol (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTiming {
    /// How long a renewal keeps a lease.
    pub duration: Duration,
    /// The margin on either side: an owner stops `guard` before its lease
    /// ends; a taker waits `guard` past it.
    pub guard: Duration,
}

impl Default for LeaseTiming {
    /// A 10 s lease with a 2 s guard, renewed every 3.3 s.
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(10),
            guard: Duration::from_secs(2),
        }
    }
}

/// The shortest lease [`LeaseTiming::validate`] accepts.
pub const MIN_LEASE: Duration = Duration::from_millis(30);
/// The longest lease [`LeaseTiming::validate`] accepts (a day).
pub const MAX_LEASE: Duration = Duration::from_secs(86_400);

impl LeaseTiming {
    /// Check the timing makes sense: a guard shorter than half the lease.
    pub fn validate(&self) -> Result<(), Error> {
        // Bounds that keep the timers' arithmetic sane: a renewal every
        // third of the lease must be at least a few milliseconds, and an
        // instant plus the lease must not overflow.
        if self.duration < MIN_LEASE || self.duration > MAX_LEASE {
            return Err(Error::InvalidConfig(format!(
                "a lease of {:?} is outside {MIN_LEASE:?}..={MAX_LEASE:?}",
                self.duration
            )));
        }
        if self.guard.saturating_mul(2) >= self.duration {
            return Err(Error::InvalidConfig(format!(
                "a lease of {:?} needs a guard under half of it, not {:?}",
                self.duration, self.guard
            )));
        }
        Ok(())
    }

    /// How often an owner renews.
    pub fn renew_every(&self) -> Duration {
        self.duration / 3
    }
}

/// The body of one lease object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct LeaseBody {
    /// The worker that wrote it.
    owner: String,
    /// Whether the owner gave the shard up with it.
    released: bool,
}

/// A shard's lease as a listing shows it: its highest epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseView {
    /// The highest epoch.
    pub epoch: u64,
    /// Its owner (the last writer, when released).
    pub owner: String,
    /// Whether it was released.
    pub released: bool,
    /// When the store wrote it (its last-modified time, on the store's
    /// clock: for display, never for the protocol).
    pub written: SystemTime,
}

/// A lease this worker holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldLease {
    /// The shard.
    pub shard: u32,
    /// The epoch of this worker's last lease object.
    pub epoch: u64,
    /// Until when this worker may write to the shard.
    pub valid_until: Instant,
}

impl HeldLease {
    /// Whether this worker may still write to the shard.
    pub fn is_valid(&self) -> bool {
        Instant::now() < self.valid_until
    }
}

/// What a taker remembers of a shard held by another worker.
#[derive(Debug, Clone, Default)]
pub struct Watch {
    /// The highest epoch seen, and when this worker first saw it.
    seen: Option<(u64, Instant)>,
    /// Whether a read of that epoch found it held (not released): it is
    /// then worth another read only once it may have lapsed.
    held: bool,
}

impl Watch {
    /// Whether a [`Leases::try_take`] of the shard could take it now, as
    /// far as [`Leases::observe`]'s listings show (they cost nothing per
    /// shard; a take reads the shard's lease, a LIST and a GET): the shard
    /// has no lease object, or its highest epoch has stood still for a
    /// renewal period and the guard (its owner released it, or is late or
    /// gone). Once a take found that epoch held, not released, it is worth
    /// another try only after `duration + guard`, when it may have lapsed.
    /// A shard whose owner renews is never worth a try.
    pub fn worth_a_try(&self, timing: LeaseTiming) -> bool {
        let Some((_, since)) = self.seen else {
            return true;
        };
        let stood = if self.held {
            timing.duration
        } else {
            timing.renew_every()
        };
        since.elapsed() >= stood.saturating_add(timing.guard)
    }
}

/// The leases of one fleet, as one worker (`owner`) takes and keeps them.
#[derive(Debug, Clone)]
pub struct Leases {
    location: StoreLocation,
    owner: String,
    timing: LeaseTiming,
}

impl Leases {
    /// The leases of the fleet at `location`, for the worker `owner` (an id
    /// unique to this process: two processes must never share one).
    pub fn new(location: StoreLocation, owner: String, timing: LeaseTiming) -> Result<Self, Error> {
        timing.validate()?;
        Ok(Self {
            location,
            owner,
            timing,
        })
    }

    /// This worker's id.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// The protocol's timing.
    pub fn timing(&self) -> LeaseTiming {
        self.timing
    }

    fn object(&self, shard: u32, epoch: u64) -> Path {
        lease_object(&self.location, shard, epoch)
    }

    /// The epochs of `shard`'s lease objects, lowest first.
    async fn epochs(&self, shard: u32) -> Result<Vec<u64>, Error> {
        epochs(&self.location, shard).await
    }

    /// `shard`'s lease as it stands: `None` when it was never taken.
    pub async fn view(&self, shard: u32) -> Result<Option<LeaseView>, Error> {
        let epochs = self.epochs(shard).await?;
        let Some(&epoch) = epochs.last() else {
            return Ok(None);
        };
        // Objects two or more epochs below the top are junk a failed
        // delete left behind.
        for old in epochs.iter().rev().skip(2) {
            self.forget(shard, *old).await;
        }
        match read_lease(&self.location, shard, epoch).await? {
            Some(view) => Ok(Some(view)),
            // Gone between the listing and the read: never "free".
            None => Err(Error::FleetStore {
                location: self.location.to_string(),
                doing: format!("read shard {shard}'s lease"),
                reason: format!("its lease object {epoch} was gone"),
            }),
        }
    }

    /// Create `shard`'s lease object `epoch`. `Ok(false)` when it exists.
    async fn create(&self, shard: u32, epoch: u64, released: bool) -> Result<bool, Error> {
        let path = self.object(shard, epoch);
        let body = LeaseBody {
            owner: self.owner.clone(),
            released,
        };
        let bytes = encode(path.as_ref().as_bytes(), &body)?;
        match self
            .location
            .object_store()
            .put_opts(
                &path,
                PutPayload::from(bytes),
                PutOptions::from(PutMode::Create),
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(StoreError::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(store_error(&self.location, "write a shard's lease", e)),
        }
    }

    /// Whether `epoch` is still `shard`'s highest. A create alone does not
    /// say so: old epochs are deleted, so a create of one long superseded
    /// (a frozen owner renewing, a taker that listed before two renewals)
    /// succeeds. The highest object is never deleted.
    async fn is_top(&self, shard: u32, epoch: u64) -> Result<bool, Error> {
        Ok(self
            .epochs(shard)
            .await?
            .last()
            .is_none_or(|top| *top <= epoch))
    }

    /// Whether `shard`'s lease object `epoch` is this worker's, not
    /// released, and the highest: a renewal of this worker's wrote it.
    async fn is_mine(&self, shard: u32, epoch: u64) -> Result<bool, Error> {
        let mine = match read_lease(&self.location, shard, epoch).await {
            Ok(Some(view)) => view.owner == self.owner && !view.released,
            // Deleted since: higher epochs exist, none of them this
            // worker's renewals.
            Ok(None) => false,
            // Not this build's format: not written by this worker.
            Err(e) if e.is_unreadable_record() => false,
            Err(e) => return Err(e),
        };
        Ok(mine && self.is_top(shard, epoch).await?)
    }

    /// Delete an old lease object (best effort: a later view retries).
    async fn forget(&self, shard: u32, epoch: u64) {
        let path = self.object(shard, epoch);
        match self.location.object_store().delete(&path).await {
            Ok(()) | Err(StoreError::NotFound { .. }) => {}
            Err(e) => tracing::debug!(%path, "deleting an old lease object failed: {e}"),
        }
    }

    /// Note in `watches`, for every shard, the highest epoch one listing of
    /// all the leases shows (one LIST); a shard it does not show has no
    /// lease object (its watch forgets what it saw). Called every tick, it
    /// starts a taker's wait when the owner stops renewing, not when the
    /// taker first wants the shard (e.g. once the owner's membership
    /// lapsed): a takeover then takes `duration + guard` plus a tick or
    /// two, not twice that. Safe for the same reason as a first sighting in
    /// [`Self::try_take`]: it is after the epoch's object was created. It
    /// also tells which shards are [worth a take](Watch::worth_a_try).
    pub async fn observe(&self, watches: &mut HashMap<u32, Watch>) -> Result<(), Error> {
        let dir = Path::from(format!(
            "{}/leases",
            self.location.path().trim_end_matches('/')
        ));
        let mut listing = self.location.object_store().list(Some(&dir));
        let mut top: HashMap<u32, u64> = HashMap::new();
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(|e| store_error(&self.location, "list the leases", e))?;
            let path = meta.location.as_ref();
            let mut parts = path.rsplit('/');
            let epoch = parts.next().and_then(|e| e.parse::<u64>().ok());
            let shard = parts
                .next()
                .and_then(|d| d.strip_prefix("shard-"))
                .and_then(|s| s.parse::<u32>().ok());
            if let (Some(shard), Some(epoch)) = (shard, epoch) {
                let highest = top.entry(shard).or_default();
                *highest = (*highest).max(epoch);
            }
        }
        let now = Instant::now();
        for (shard, watch) in watches.iter_mut() {
            if !top.contains_key(shard) {
                *watch = Watch::default();
            }
        }
        for (shard, epoch) in top {
            let watch = watches.entry(shard).or_default();
            if watch.seen.map(|(seen, _)| seen) != Some(epoch) {
                *watch = Watch {
                    seen: Some((epoch, now)),
                    held: false,
                };
            }
        }
        Ok(())
    }

    /// Take `shard` if the protocol allows it now: it is free, released, or
    /// its owner has not renewed for `duration + guard` of this worker's
    /// watch (kept in `watch` between calls). `None`: not (yet).
    pub async fn try_take(
        &self,
        shard: u32,
        watch: &mut Watch,
    ) -> Result<Option<HeldLease>, Error> {
        let view = match self.view(shard).await {
            Ok(view) => view,
            // A newest lease object that does not decode (garbage, or a
            // newer build's format) is held by an owner this build cannot
            // name. It is watched like any other: a live owner of any build
            // writes newer epochs, so one that stands still for the lease
            // and its guard has lapsed.
            Err(e) if e.is_unreadable_record() => {
                let Some(&epoch) = self.epochs(shard).await?.last() else {
                    return Ok(None);
                };
                tracing::warn!(shard, epoch, "a shard's lease object does not decode: {e}");
                Some(LeaseView {
                    epoch,
                    owner: String::new(),
                    released: false,
                    written: SystemTime::UNIX_EPOCH,
                })
            }
            Err(e) => return Err(e),
        };
        let next = match &view {
            None => 1,
            Some(v) if v.released => v.epoch.saturating_add(1),
            Some(v) => match watch.seen {
                Some((epoch, since))
                    if epoch == v.epoch
                        && since.elapsed()
                            >= self.timing.duration.saturating_add(self.timing.guard) =>
                {
                    v.epoch.saturating_add(1)
                }
                Some((epoch, _)) if epoch == v.epoch => {
                    watch.held = true;
                    return Ok(None);
                }
                _ => {
                    *watch = Watch {
                        seen: Some((v.epoch, Instant::now())),
                        held: true,
                    };
                    return Ok(None);
                }
            },
        };
        let sent = Instant::now();
        if !self.create(shard, next, false).await? || !self.is_top(shard, next).await? {
            // Renewed, or another taker won: watch afresh.
            *watch = Watch::default();
            return Ok(None);
        }
        *watch = Watch::default();
        if let Some(old) = next.checked_sub(2) {
            self.forget(shard, old).await;
        }
        Ok(Some(HeldLease {
            shard,
            epoch: next,
            valid_until: self.valid_from(sent),
        }))
    }

    fn valid_from(&self, sent: Instant) -> Instant {
        // An instant beyond the clock's range (never, for a validated
        // timing) leaves no validity rather than panicking.
        sent.checked_add(self.timing.duration.saturating_sub(self.timing.guard))
            .unwrap_or(sent)
    }

    /// Renew `lease`. [`Error::LeaseLost`] when another worker took the
    /// shard: stop writing to it at once. Another error leaves the lease
    /// valid until [`HeldLease::valid_until`]; retry before then.
    ///
    /// A next epoch that already exists and is this worker's own (not
    /// released, and still the highest) was written by an earlier renewal
    /// whose create reached the store though the reply did not (a
    /// connection reset after the send, or a server error retried into
    /// "already exists"). It is adopted, its validity left as it was (the
    /// send that wrote it is not known, so no validity may run from it),
    /// and the lease is renewed onward from it.
    pub async fn renew(&self, lease: &mut HeldLease) -> Result<(), Error> {
        let mut next = lease.epoch.saturating_add(1);
        let mut sent = Instant::now();
        let lost = |lease: &mut HeldLease, sent: Instant| {
            lease.valid_until = lease.valid_until.min(sent);
            Err(Error::LeaseLost {
                shard: lease.shard,
                epoch: lease.epoch,
            })
        };
        while !self.create(lease.shard, next, false).await? {
            if !self.is_mine(lease.shard, next).await? {
                return lost(lease, sent);
            }
            tracing::info!(
                shard = lease.shard,
                epoch = next,
                "an earlier renewal wrote the shard's lease though it failed: adopted"
            );
            lease.epoch = next;
            next = next.saturating_add(1);
            sent = Instant::now();
        }
        // The object is this worker's now, whatever follows; an error in
        // the check leaves the validity as it was (the fence stands).
        lease.epoch = next;
        if !self.is_top(lease.shard, next).await? {
            return lost(lease, sent);
        }
        lease.valid_until = self.valid_from(sent);
        Ok(())
    }

    /// Delete the object two epochs behind `lease` (its renewal's junk;
    /// one behind stays, for the check of a renewal in flight). Best
    /// effort, and apart from [`Self::renew`]: a delete that hangs must not
    /// hold up the move of the shard's fence the renewal allows.
    pub async fn forget_behind(&self, lease: &HeldLease) {
        if let Some(old) = lease.epoch.checked_sub(2) {
            self.forget(lease.shard, old).await;
        }
    }

    /// Give `lease` up, once this worker has stopped writing to the shard:
    /// another worker may take it at once.
    pub async fn release(&self, lease: HeldLease) -> Result<(), Error> {
        let mut next = lease.epoch.saturating_add(1);
        while !self.create(lease.shard, next, true).await? {
            // A renewal's create that reached the store though its reply
            // did not: this worker's own epoch, released past (as a
            // renewal adopts it, see `renew`).
            if !self.is_mine(lease.shard, next).await? {
                return Err(Error::LeaseLost {
                    shard: lease.shard,
                    epoch: lease.epoch,
                });
            }
            next = next.saturating_add(1);
        }
        Ok(())
    }
}

fn lease_dir(location: &StoreLocation, shard: u32) -> Path {
    Path::from(format!(
        "{}/leases/shard-{shard:04}",
        location.path().trim_end_matches('/')
    ))
}

fn lease_object(location: &StoreLocation, shard: u32, epoch: u64) -> Path {
    Path::from(format!("{}/{epoch:020}", lease_dir(location, shard)))
}

/// The epochs of `shard`'s lease objects, lowest first.
async fn epochs(location: &StoreLocation, shard: u32) -> Result<Vec<u64>, Error> {
    let dir = lease_dir(location, shard);
    let mut listing = location.object_store().list(Some(&dir));
    let mut epochs = Vec::new();
    while let Some(meta) = listing.next().await {
        let meta = meta.map_err(|e| store_error(location, "list a shard's lease", e))?;
        if let Some(epoch) = meta.location.filename().and_then(|n| n.parse().ok()) {
            epochs.push(epoch);
        }
    }
    epochs.sort_unstable();
    Ok(epochs)
}

/// Read `shard`'s lease object `epoch`: `None` when it is gone.
async fn read_lease(
    location: &StoreLocation,
    shard: u32,
    epoch: u64,
) -> Result<Option<LeaseView>, Error> {
    let path = lease_object(location, shard, epoch);
    let got = match location.object_store().get(&path).await {
        Ok(got) => got,
        Err(StoreError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(store_error(location, "read a shard's lease", e)),
    };
    let written = SystemTime::from(got.meta.last_modified);
    let bytes = got
        .bytes()
        .await
        .map_err(|e| store_error(location, "read a shard's lease", e))?;
    let body: LeaseBody = decode(path.as_ref().as_bytes(), &bytes)?;
    Ok(Some(LeaseView {
        epoch,
        owner: body.owner,
        released: body.released,
        written,
    }))
}

/// `shard`'s lease in the fleet at `location` as it stands, for an
/// observer (`waymark fleet`, a dashboard): it only reads, never writes or
/// deletes. `None` when the shard was never taken.
pub async fn peek_lease(location: &StoreLocation, shard: u32) -> Result<Option<LeaseView>, Error> {
    // The top object may be deleted between the listing and the read (two
    // renewals later): list again, a few times.
    for _ in 0..3 {
        let Some(&epoch) = epochs(location, shard).await?.last() else {
            return Ok(None);
        };
        if let Some(view) = read_lease(location, shard, epoch).await? {
            return Ok(Some(view));
        }
    }
    Err(Error::FleetStore {
        location: location.to_string(),
        doing: format!("read shard {shard}'s lease"),
        reason: "its newest lease object kept changing under the read".into(),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use taquba::object_store::ObjectStore;
    use taquba::object_store::memory::InMemory;

    use super::*;

    const TIMING: LeaseTiming = LeaseTiming {
        duration: Duration::from_secs(10),
        guard: Duration::from_secs(2),
    };

    fn fleet(store: Arc<dyn ObjectStore>) -> (Leases, Leases) {
        let at = StoreLocation::new(store, "fleet");
        (
            Leases::new(at.clone(), "a".into(), TIMING).unwrap(),
            Leases::new(at, "b".into(), TIMING).unwrap(),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_lease_is_taken_over_only_after_lease_and_guard() {
        let (a, b) = fleet(Arc::new(InMemory::new()));
        let mut lease = a.try_take(0, &mut Watch::default()).await.unwrap().unwrap();
        assert_eq!(lease.epoch, 1);
        let mut watch = Watch::default();
        // While a renews, b never gets it.
        for _ in 0..10 {
            assert_eq!(b.try_take(0, &mut watch).await.unwrap(), None);
            tokio::time::advance(TIMING.renew_every()).await;
            a.renew(&mut lease).await.unwrap();
        }
        // a stops renewing (a crash): b takes over only once the epoch it
        // watched has stood for lease + guard.
        assert_eq!(b.try_take(0, &mut watch).await.unwrap(), None);
        let watched_from = Instant::now();
        tokio::time::advance(TIMING.duration + TIMING.guard - Duration::from_millis(1)).await;
        assert_eq!(b.try_take(0, &mut watch).await.unwrap(), None);
        tokio::time::advance(Duration::from_millis(1)).await;
        let taken = b.try_take(0, &mut watch).await.unwrap().unwrap();
        assert_eq!(taken.epoch, lease.epoch + 1);
        // a had stopped writing 2 x guard before.
        assert!(lease.valid_until + TIMING.guard * 2 <= Instant::now());
        assert!(watched_from < lease.valid_until + TIMING.guard * 2);
        // a, back, learns it lost the shard.
        let e = a.renew(&mut lease).await.unwrap_err();
        assert!(matches!(e, Error::LeaseLost { shard: 0, .. }), "{e}");
        assert!(!lease.is_valid());
        let view = a.view(0).await.unwrap().unwrap();
        assert_eq!((view.owner.as_str(), view.epoch), ("b", taken.epoch));
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_object_that_does_not_decode_is_taken_once_it_stands_still() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let (a, _) = fleet(store.clone());
        let garbled = Path::from(format!("fleet/leases/shard-0000/{:020}", 1));
        store
            .put(&garbled, PutPayload::from_static(b"\xc1"))
            .await
            .unwrap();
        let mut watch = Watch::default();
        assert_eq!(a.try_take(0, &mut watch).await.unwrap(), None);
        tokio::time::advance(TIMING.duration + TIMING.guard - Duration::from_millis(1)).await;
        assert_eq!(a.try_take(0, &mut watch).await.unwrap(), None);
        tokio::time::advance(Duration::from_millis(1)).await;
        let taken = a.try_take(0, &mut watch).await.unwrap().unwrap();
        assert_eq!(taken.epoch, 2);
        let view = a.view(0).await.unwrap().unwrap();
        assert_eq!((view.owner.as_str(), view.epoch), ("a", 2));
    }

    #[tokio::test(start_paused = true)]
    async fn an_owner_frozen_past_the_takers_renewals_learns_it_lost() {
        let (a, b) = fleet(Arc::new(InMemory::new()));
        let mut lease = a.try_take(0, &mut Watch::default()).await.unwrap().unwrap();
        let mut watch = Watch::default();
        assert_eq!(b.try_take(0, &mut watch).await.unwrap(), None);
        tokio::time::advance(TIMING.duration + TIMING.guard).await;
        let mut taken = b.try_take(0, &mut watch).await.unwrap().unwrap();
        // b renews twice: the epochs a would create next are deleted.
        for _ in 0..3 {
            b.renew(&mut taken).await.unwrap();
        }
        // a wakes: its create of a deleted epoch succeeds, yet it must
        // learn the shard is b's, and stay fenced.
        let e = a.renew(&mut lease).await.unwrap_err();
        assert!(matches!(e, Error::LeaseLost { shard: 0, .. }), "{e}");
        assert!(!lease.is_valid());
        let view = b.view(0).await.unwrap().unwrap();
        assert_eq!((view.owner.as_str(), view.epoch), ("b", taken.epoch));
        b.renew(&mut taken).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewal_written_though_its_reply_was_lost_is_adopted() {
        let (a, b) = fleet(Arc::new(InMemory::new()));
        let mut lease = a.try_take(0, &mut Watch::default()).await.unwrap().unwrap();
        let valid_until = lease.valid_until;
        // a's renewal to epoch 2 reached the store, its reply did not.
        assert!(a.create(0, 2, false).await.unwrap());
        tokio::time::advance(TIMING.renew_every()).await;
        // The next renewal adopts epoch 2 and renews onward; its validity
        // runs from its own send, never from before it.
        let sent = Instant::now();
        a.renew(&mut lease).await.unwrap();
        assert_eq!(lease.epoch, 3);
        assert_eq!(lease.valid_until, sent + TIMING.duration - TIMING.guard);
        assert!(lease.valid_until > valid_until);
        let view = b.view(0).await.unwrap().unwrap();
        assert_eq!((view.owner.as_str(), view.epoch), ("a", 3));
        // An epoch of another worker's is never adopted.
        assert!(b.create(0, 4, false).await.unwrap());
        let e = a.renew(&mut lease).await.unwrap_err();
        assert!(matches!(e, Error::LeaseLost { shard: 0, epoch: 3 }), "{e}");
        assert!(!lease.is_valid());
    }

    /// A release after a renewal whose create landed though its reply was
    /// lost releases past that epoch: it used to find the next epoch taken,
    /// answer `LeaseLost`, and leave the shard to lapse (no taker for
    /// `duration + guard`). Another worker's epoch is still never adopted.
    #[tokio::test(start_paused = true)]
    async fn a_release_after_a_lost_renewal_reply_releases_past_it() {
        let (a, b) = fleet(Arc::new(InMemory::new()));
        let lease = a.try_take(0, &mut Watch::default()).await.unwrap().unwrap();
        assert!(a.create(0, 2, false).await.unwrap());
        a.release(lease).await.unwrap();
        let view = b.view(0).await.unwrap().unwrap();
        assert_eq!(
            (view.owner.as_str(), view.epoch, view.released),
            ("a", 3, true)
        );
        let mut watch = Watch::default();
        assert!(
            b.try_take(0, &mut watch).await.unwrap().is_some(),
            "free at once"
        );
        let lease = a.try_take(1, &mut Watch::default()).await.unwrap().unwrap();
        assert!(b.create(1, 2, false).await.unwrap());
        let e = a.release(lease).await.unwrap_err();
        assert!(matches!(e, Error::LeaseLost { shard: 1, epoch: 1 }), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn only_shards_free_released_or_standing_still_are_worth_a_take() {
        let (a, b) = fleet(Arc::new(InMemory::new()));
        let mut renewed = a.try_take(0, &mut Watch::default()).await.unwrap().unwrap();
        let released = a.try_take(1, &mut Watch::default()).await.unwrap().unwrap();
        let mut stopped = a.try_take(2, &mut Watch::default()).await.unwrap().unwrap();
        let mut watches = HashMap::new();
        b.observe(&mut watches).await.unwrap();
        let worth = |watches: &HashMap<u32, Watch>, shard| {
            watches
                .get(&shard)
                .cloned()
                .unwrap_or_default()
                .worth_a_try(TIMING)
        };
        // Never taken: worth a try at once.
        assert!(worth(&watches, 3));
        a.release(released).await.unwrap();
        for _ in 0..10 {
            assert!(!worth(&watches, 0));
            assert!(!worth(&watches, 2));
            tokio::time::advance(TIMING.renew_every()).await;
            a.renew(&mut renewed).await.unwrap();
            a.renew(&mut stopped).await.unwrap();
            b.observe(&mut watches).await.unwrap();
        }
        // Shard 2's owner stops renewing.
        tokio::time::advance(TIMING.renew_every() + TIMING.guard).await;
        a.renew(&mut renewed).await.unwrap();
        b.observe(&mut watches).await.unwrap();
        // Renewed all along: never worth a try. Released, or not renewed
        // (2): worth one once a renewal and the guard are overdue.
        assert!(!worth(&watches, 0));
        assert!(worth(&watches, 1));
        assert!(worth(&watches, 2));
        let w1 = watches.entry(1).or_default();
        assert_eq!(b.try_take(1, w1).await.unwrap().map(|l| l.epoch), Some(3));
        // Shard 2 was read and found held: no more reads until it may have
        // lapsed, then it is taken.
        let w2 = watches.entry(2).or_default();
        assert_eq!(b.try_take(2, w2).await.unwrap(), None);
        assert!(!worth(&watches, 2));
        tokio::time::advance(TIMING.duration - TIMING.renew_every()).await;
        assert!(worth(&watches, 2));
        let w2 = watches.entry(2).or_default();
        assert!(b.try_take(2, w2).await.unwrap().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_released_lease_is_taken_at_once() {
        let (a, b) = fleet(Arc::new(InMemory::new()));
        let lease = a.try_take(3, &mut Watch::default()).await.unwrap().unwrap();
        a.release(lease).await.unwrap();
        let taken = b.try_take(3, &mut Watch::default()).await.unwrap().unwrap();
        assert_eq!(taken.epoch, 3);
        assert!(taken.is_valid());
    }

    #[tokio::test(start_paused = true)]
    async fn of_two_takers_of_a_free_shard_one_wins() {
        let (a, b) = fleet(Arc::new(InMemory::new()));
        let (mut wa, mut wb) = (Watch::default(), Watch::default());
        let (x, y) = tokio::join!(a.try_take(1, &mut wa), b.try_take(1, &mut wb));
        let (x, y) = (x.unwrap(), y.unwrap());
        assert!(x.is_some() != y.is_some(), "{x:?} {y:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn renewals_leave_a_bounded_trail_on_a_local_directory() {
        let dir = tempfile::tempdir().unwrap();
        let fs = taquba::object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap();
        let (a, b) = fleet(Arc::new(fs));
        let mut lease = a.try_take(2, &mut Watch::default()).await.unwrap().unwrap();
        for _ in 0..20 {
            a.renew(&mut lease).await.unwrap();
            a.forget_behind(&lease).await;
        }
        assert_eq!(lease.epoch, 21);
        assert!(a.epochs(2).await.unwrap().len() <= 2);
        // The create-only protocol works where updates do not exist.
        let mut watch = Watch::default();
        assert_eq!(b.try_take(2, &mut watch).await.unwrap(), None);
        tokio::time::advance(TIMING.duration + TIMING.guard).await;
        assert!(b.try_take(2, &mut watch).await.unwrap().is_some());
        assert!(a.renew(&mut lease).await.is_err());
    }

    #[test]
    fn a_guard_of_half_the_lease_or_more_is_refused() {
        let at = StoreLocation::new(Arc::new(InMemory::new()), "f");
        let bad = LeaseTiming {
            duration: Duration::from_secs(4),
            guard: Duration::from_secs(2),
        };
        assert!(matches!(
            Leases::new(at.clone(), "a".into(), bad),
            Err(Error::InvalidConfig(_))
        ));
        // Durations that would make a zero renewal period or overflow an
        // instant are refused, not panicked on.
        for duration in [
            Duration::ZERO,
            Duration::from_nanos(2),
            Duration::from_secs(u64::MAX),
        ] {
            let bad = LeaseTiming {
                duration,
                guard: Duration::ZERO,
            };
            let e = Leases::new(at.clone(), "a".into(), bad).unwrap_err();
            assert!(e.to_string().contains("outside"), "{e}");
        }
    }
}
