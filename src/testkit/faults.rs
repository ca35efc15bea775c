//! Store faults: [`FaultStore`], an object store that wraps another and
//! injects seeded failures, latency and outages, holds or fails chosen
//! operations, and can be cut off as a killed process is (see
//! [`FaultStore::incarnation`]); and [`Rng`], the seeded generator the kit
//! draws every decision from, so a seed replays a run of faults.

use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use taquba::object_store::path::Path;
use taquba::object_store::{
    self, CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions,
};

use crate::error::Error;
use crate::sync::lock;

/// A small, fast, seedable RNG (xorshift64*), so a seed reproduces a schedule
/// without depending on any RNG crate's stream stability.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// The generator of `seed`.
    pub fn new(seed: u64) -> Self {
        // splitmix64 of the seed, so nearby seeds give unrelated streams and
        // the state is never zero.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Self(z | 1)
    }

    /// An RNG derived from a seed and a list of coordinates: the same inputs
    /// always give the same stream.
    pub fn derive(seed: u64, parts: &[u64]) -> Self {
        let mut h = seed ^ 0xA076_1D64_78BD_642F;
        for &p in parts {
            h = Rng::new(h ^ p.wrapping_mul(0xE703_7ED1_A0B4_28DB)).next_u64();
        }
        Self::new(h)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `range` (`range.start` for an empty range).
    pub fn range(&mut self, range: Range<u64>) -> u64 {
        let span = range.end.saturating_sub(range.start);
        if span == 0 {
            return range.start;
        }
        range.start + self.next_u64() % span
    }

    /// True with probability `per_mille / 1000`.
    pub fn chance(&mut self, per_mille: u64) -> bool {
        self.next_u64() % 1000 < per_mille
    }
}

/// The seed to use: `var` from the environment when set (decimal or `0x`
/// hex), otherwise one from the clock. Printed to stderr either way, so a
/// failing test's output says how to replay it. [`Error::InvalidConfig`]
/// when `var` is set but is not a `u64`.
pub fn seed_from_env(var: &str) -> Result<u64, Error> {
    let seed = match std::env::var(var) {
        Ok(s) => {
            let s = s.trim();
            let parsed = match s.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => s.parse(),
            };
            parsed.map_err(|_| Error::InvalidConfig(format!("{var}={s:?} is not a u64")))?
        }
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    };
    eprintln!("seed: {var}={seed}");
    Ok(seed)
}

/// Which operations a [`FaultStore`] disturbs, and how often. The first
/// operation of each kind with a non-zero rate always fails (and the first
/// one with spikes planned always spikes), so every planned fault fires.
#[derive(Debug, Clone, Copy, Default)]
pub struct FaultPlan {
    /// Per-mille of puts that fail without writing anything.
    pub put_fail: u64,
    /// Per-mille of gets that fail.
    pub get_fail: u64,
    /// Per-mille of lists that fail (the listing yields one error).
    pub list_fail: u64,
    /// Per-mille of deletes that fail without deleting.
    pub delete_fail: u64,
    /// Per-mille of operations that are delayed by a latency spike.
    pub spike: u64,
    /// The longest latency spike, in milliseconds.
    pub spike_max_ms: u64,
    /// Latency added to every operation, in milliseconds: a slow store.
    pub latency_ms: u64,
    /// Accept conditional puts and overwrite anyway, as some
    /// S3-compatible servers do (Garage 2.5, measured): a store on which
    /// neither SlateDB's fencing nor the fleet's leases are safe.
    pub ignore_conditional_writes: bool,
}

/// Counts of what a [`FaultStore`] did.
#[derive(Debug, Default)]
pub struct FaultCounts {
    /// Puts (and put-like operations) seen.
    pub puts: AtomicU64,
    /// Gets seen.
    pub gets: AtomicU64,
    /// Lists seen.
    pub lists: AtomicU64,
    /// Deletes seen.
    pub deletes: AtomicU64,
    /// Puts failed.
    pub failed_puts: AtomicU64,
    /// Gets failed.
    pub failed_gets: AtomicU64,
    /// Lists failed.
    pub failed_lists: AtomicU64,
    /// Deletes failed.
    pub failed_deletes: AtomicU64,
    /// Operations delayed by a latency spike.
    pub spikes: AtomicU64,
}

impl FaultCounts {
    /// Operations failed, of every kind.
    pub fn failures(&self) -> u64 {
        self.failed_puts.load(Ordering::SeqCst)
            + self.failed_gets.load(Ordering::SeqCst)
            + self.failed_lists.load(Ordering::SeqCst)
            + self.failed_deletes.load(Ordering::SeqCst)
    }
}

impl fmt::Display for FaultCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let l = |a: &AtomicU64| a.load(Ordering::SeqCst);
        write!(
            f,
            "puts {} (failed {}), gets {} (failed {}), lists {} (failed {}), deletes {} (failed {}), latency spikes {}",
            l(&self.puts),
            l(&self.failed_puts),
            l(&self.gets),
            l(&self.failed_gets),
            l(&self.lists),
            l(&self.failed_lists),
            l(&self.deletes),
            l(&self.failed_deletes),
            l(&self.spikes),
        )
    }
}

/// How a [`FaultStore`] fails an operation when it is told to fail all of
/// them ([`Faults::fail_everything`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outage {
    /// No outage: only the seeded faults of the plan.
    None,
    /// Every operation fails with a generic (retryable) error, as an
    /// unreachable endpoint would.
    Unavailable,
    /// Every operation fails with a permission error, as revoked credentials
    /// would.
    PermissionDenied,
    /// Every operation fails with "not found", as a deleted bucket would.
    Gone,
}

/// The shared state of a [`FaultStore`]: its plan, seeded decisions and
/// counters.
pub struct Faults {
    plan: Mutex<FaultPlan>,
    rng: Mutex<Rng>,
    outage: Mutex<Outage>,
    /// While false, the plan is suspended (no faults, no spikes).
    active: AtomicBool,
    /// What the store did.
    pub counts: FaultCounts,
    /// Operations refused because of an outage.
    pub outage_refusals: AtomicU32,
    /// Operations matching this are held until [`Faults::release`].
    hold: Mutex<Option<(StoreOp, String)>>,
    /// The next this many operations matching this fail.
    fail_next: Mutex<Option<(StoreOp, String, u32)>>,
    /// Bumped by each release; held operations wait for a change.
    released: tokio::sync::watch::Sender<u64>,
    /// Operations waiting in a hold right now.
    held: AtomicU64,
    /// The seeded decisions taken so far, in order (the first
    /// [`MAX_TRACE`] of them).
    trace: Mutex<Vec<Decision>>,
}

/// The most decisions a [`Faults`] keeps in its trace.
pub const MAX_TRACE: usize = 100_000;

/// One seeded decision of a [`FaultStore`]: the operation's kind, whether it
/// failed, and the latency spike it suffered (ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// The operation's kind.
    pub op: StoreOp,
    /// Whether it failed.
    pub failed: bool,
    /// Its latency spike, in milliseconds.
    pub spike_ms: Option<u64>,
}

/// A kind of store operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreOp {
    /// A put, multipart upload, copy or rename.
    Put,
    /// A get.
    Get,
    /// A listing.
    List,
    /// A delete.
    Delete,
}

use StoreOp as Op;

impl Faults {
    /// Turn the seeded faults on or off.
    pub fn set_active(&self, active: bool) {
        self.active.store(active, Ordering::SeqCst);
    }

    /// Change the fault rates.
    pub fn set_plan(&self, plan: FaultPlan) {
        *lock(&self.plan) = plan;
    }

    /// Fail every operation from now on (or stop, with [`Outage::None`]).
    pub fn fail_everything(&self, outage: Outage) {
        *lock(&self.outage) = outage;
    }

    fn outage_error(&self) -> Option<object_store::Error> {
        let outage = *lock(&self.outage);
        let source: Box<dyn std::error::Error + Send + Sync> = match outage {
            Outage::None => return None,
            Outage::Unavailable => "injected outage: 503 Service Unavailable".into(),
            Outage::PermissionDenied => "injected outage: 403 credentials revoked".into(),
            Outage::Gone => "injected outage: 404 NoSuchBucket".into(),
        };
        self.outage_refusals.fetch_add(1, Ordering::SeqCst);
        Some(match outage {
            Outage::PermissionDenied => object_store::Error::PermissionDenied {
                path: "(any)".into(),
                source,
            },
            Outage::Gone => object_store::Error::NotFound {
                path: "(any)".into(),
                source,
            },
            _ => object_store::Error::Generic {
                store: "FaultStore",
                source,
            },
        })
    }

    /// Hold every `op` on a path containing `path_contains` (every path for
    /// "") until [`Self::release`]: a stalled request, which neither fails
    /// nor completes.
    pub fn hold(&self, op: StoreOp, path_contains: &str) {
        *lock(&self.hold) = Some((op, path_contains.to_string()));
    }

    /// Fail the next `count` `op`s on a path containing `path_contains`
    /// (every path for ""), whatever the plan says.
    pub fn fail_next(&self, op: StoreOp, path_contains: &str, count: u32) {
        *lock(&self.fail_next) = Some((op, path_contains.to_string(), count));
    }

    /// Whether a [`Self::fail_next`] takes this operation.
    fn take_fail_next(&self, op: Op, path: &str) -> bool {
        let mut next = lock(&self.fail_next);
        match &mut *next {
            Some((o, p, n)) if *o == op && *n > 0 && path.contains(p.as_str()) => {
                *n -= 1;
                true
            }
            _ => false,
        }
    }

    /// The seeded decisions taken so far, in order: the same seed and the
    /// same sequence of operations give the same trace.
    pub fn trace(&self) -> Vec<Decision> {
        lock(&self.trace).clone()
    }

    /// Stop holding, and let every held operation proceed.
    pub fn release(&self) {
        *lock(&self.hold) = None;
        self.released.send_modify(|g| *g += 1);
    }

    /// How many operations are held right now.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::SeqCst)
    }

    async fn maybe_hold(&self, op: Op, path: &str) {
        let mut rx = self.released.subscribe();
        let holds = match &*lock(&self.hold) {
            Some((o, p)) => *o == op && path.contains(p.as_str()),
            None => false,
        };
        if !holds {
            return;
        }
        self.held.fetch_add(1, Ordering::SeqCst);
        let _ = rx.changed().await;
        self.held.fetch_sub(1, Ordering::SeqCst);
    }

    /// Decide the fate of one operation (`forced` to fail): whether it
    /// fails, and the latency spike (ms) it suffers first, if any.
    fn decide(&self, op: Op, forced: bool) -> (Result<(), object_store::Error>, Option<u64>) {
        let c = &self.counts;
        let (total, failed) = match op {
            Op::Put => (&c.puts, &c.failed_puts),
            Op::Get => (&c.gets, &c.failed_gets),
            Op::List => (&c.lists, &c.failed_lists),
            Op::Delete => (&c.deletes, &c.failed_deletes),
        };
        total.fetch_add(1, Ordering::SeqCst);
        if let Some(e) = self.outage_error() {
            return (Err(e), None);
        }
        if forced {
            failed.fetch_add(1, Ordering::SeqCst);
            let e = object_store::Error::Generic {
                store: "FaultStore",
                source: format!("injected failure of {op:?}: 503 Slow Down").into(),
            };
            return (Err(e), None);
        }
        if !self.active.load(Ordering::SeqCst) {
            return (Ok(()), None);
        }
        let plan = *lock(&self.plan);
        let rate = match op {
            Op::Put => plan.put_fail,
            Op::Get => plan.get_fail,
            Op::List => plan.list_fail,
            Op::Delete => plan.delete_fail,
        };
        let (fail, spike) = {
            let mut rng = lock(&self.rng);
            let fail = rng.chance(rate);
            let spike = (plan.spike_max_ms > 0 && rng.chance(plan.spike))
                .then(|| rng.range(1..plan.spike_max_ms.saturating_add(1)));
            // The first operation of each kind with a rate fails, and the
            // first with spikes planned spikes: the plan's faults certainly
            // fire, whatever the seed and however few operations there are.
            let fail = fail || (rate > 0 && failed.load(Ordering::SeqCst) == 0);
            let spike = spike.or_else(|| {
                (plan.spike_max_ms > 0 && plan.spike > 0 && c.spikes.load(Ordering::SeqCst) == 0)
                    .then_some(plan.spike_max_ms)
            });
            (fail, spike)
        };
        if spike.is_some() {
            c.spikes.fetch_add(1, Ordering::SeqCst);
        }
        {
            let mut trace = lock(&self.trace);
            if trace.len() < MAX_TRACE {
                trace.push(Decision {
                    op,
                    failed: fail,
                    spike_ms: spike,
                });
            }
        }
        if !fail {
            return (Ok(()), spike);
        }
        failed.fetch_add(1, Ordering::SeqCst);
        let e = object_store::Error::Generic {
            store: "FaultStore",
            source: format!("injected fault on {op:?}: 503 Slow Down").into(),
        };
        (Err(e), spike)
    }

    /// Hold if told to, decide, and sleep through the latency spike.
    async fn disturb(&self, op: Op, path: &Path) -> Result<(), object_store::Error> {
        self.maybe_hold(op, path.as_ref()).await;
        let forced = self.take_fail_next(op, path.as_ref());
        let (result, spike) = self.decide(op, forced);
        let latency = lock(&self.plan).latency_ms;
        let delay = spike.unwrap_or(0).saturating_add(latency);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        result
    }
}

/// An object store that wraps another and injects seeded failures and
/// latency spikes into put, get, list and delete (multipart uploads, copies
/// and renames are put-like and share the put rate).
///
/// A failed put writes nothing; a failed delete deletes nothing. The seed
/// fixes the *sequence* of decisions; which operation meets which decision is
/// up to the scheduler.
pub struct FaultStore {
    inner: Arc<dyn ObjectStore>,
    faults: Arc<Faults>,
    /// Once set, this handle's operations never complete: its process is
    /// dead (see [`FaultStore::sever`]).
    cut: Arc<AtomicBool>,
}

/// Disturb one operation through a store handle: never complete it once
/// the handle is cut (before or after its delay), else as the faults say.
async fn disturb(
    faults: &Faults,
    cut: &AtomicBool,
    op: Op,
    path: &Path,
) -> Result<(), object_store::Error> {
    if cut.load(Ordering::SeqCst) {
        std::future::pending::<()>().await;
    }
    let result = faults.disturb(op, path).await;
    if cut.load(Ordering::SeqCst) {
        std::future::pending::<()>().await;
    }
    result
}

impl FaultStore {
    /// A store over `inner` whose seeded decisions come from `seed`, with
    /// the faults of `plan` (the default plan injects none).
    pub fn new(inner: Arc<dyn ObjectStore>, seed: u64, plan: FaultPlan) -> Arc<Self> {
        Arc::new(Self {
            inner,
            cut: Arc::new(AtomicBool::new(false)),
            faults: Arc::new(Faults {
                plan: Mutex::new(plan),
                rng: Mutex::new(Rng::new(seed)),
                outage: Mutex::new(Outage::None),
                active: AtomicBool::new(true),
                counts: FaultCounts::default(),
                outage_refusals: AtomicU32::new(0),
                hold: Mutex::new(None),
                fail_next: Mutex::new(None),
                released: tokio::sync::watch::Sender::new(0),
                held: AtomicU64::new(0),
                trace: Mutex::new(Vec::new()),
            }),
        })
    }

    /// A new handle on the same store and faults, for one process: a
    /// process restarted after a crash opens its queue on a new handle,
    /// and the dead one's handle is [severed](Self::sever).
    pub fn incarnation(&self) -> Arc<Self> {
        Arc::new(Self {
            inner: self.inner.clone(),
            faults: self.faults.clone(),
            cut: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Kill this handle's process as far as the store can tell: from now
    /// on none of its operations reaches the store or completes (one
    /// already past the check completes, as a request in the network when a
    /// process dies may still land). What it wrote before stays; what it
    /// had not written yet (SlateDB's WAL not yet flushed) is lost, exactly
    /// what a SIGKILL loses.
    pub fn sever(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }

    /// Whether [`Self::sever`] was called on this handle.
    pub fn is_severed(&self) -> bool {
        self.cut.load(Ordering::SeqCst)
    }

    /// The store's fault controls and counters.
    pub fn faults(&self) -> Arc<Faults> {
        self.faults.clone()
    }

    /// `listing`, or a single error if the plan fails this list.
    fn disturbed_listing(
        &self,
        prefix: Option<&Path>,
        listing: BoxStream<'static, object_store::Result<ObjectMeta>>,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let (faults, cut) = (self.faults.clone(), self.cut.clone());
        let at = prefix.cloned().unwrap_or_default();
        futures_util::stream::once(async move {
            match disturb(&faults, &cut, Op::List, &at).await {
                Ok(()) => listing,
                Err(e) => futures_util::stream::once(std::future::ready(Err(e))).boxed(),
            }
        })
        .flatten()
        .boxed()
    }
}

impl fmt::Debug for FaultStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultStore({})", self.inner)
    }
}

impl fmt::Display for FaultStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultStore({})", self.inner)
    }
}

#[async_trait::async_trait]
impl ObjectStore for FaultStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        disturb(&self.faults, &self.cut, Op::Put, location).await?;
        let mut opts = opts;
        if lock(&self.faults.plan).ignore_conditional_writes {
            opts.mode = PutMode::Overwrite;
        }
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        disturb(&self.faults, &self.cut, Op::Put, location).await?;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        disturb(&self.faults, &self.cut, Op::Get, location).await?;
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        // One location at a time, so a failed one is not deleted.
        let inner = self.inner.clone();
        let (faults, cut) = (self.faults.clone(), self.cut.clone());
        locations
            .then(move |location| {
                let inner = inner.clone();
                let (faults, cut) = (faults.clone(), cut.clone());
                async move {
                    let path = location?;
                    disturb(&faults, &cut, Op::Delete, &path).await?;
                    let one = futures_util::stream::once(std::future::ready(Ok(path.clone())));
                    inner
                        .delete_stream(one.boxed())
                        .next()
                        .await
                        .unwrap_or(Ok(path))
                }
            })
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.disturbed_listing(prefix, self.inner.list(prefix))
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.disturbed_listing(prefix, self.inner.list_with_offset(prefix, offset))
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        let at = prefix.cloned().unwrap_or_default();
        disturb(&self.faults, &self.cut, Op::List, &at).await?;
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        disturb(&self.faults, &self.cut, Op::Put, to).await?;
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(
        &self,
        from: &Path,
        to: &Path,
        options: RenameOptions,
    ) -> object_store::Result<()> {
        disturb(&self.faults, &self.cut, Op::Put, to).await?;
        self.inner.rename_opts(from, to, options).await
    }
}
