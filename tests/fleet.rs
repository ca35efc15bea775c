//! A fleet in one process: two workers share four shards on a local
//! directory; a worker that joins takes a fair share, one that dies has its
//! shards taken over once its leases lapse, and every run submitted through
//! the fleet client ends once. Schedules defined on every shard's runtime
//! fire on their home shard only. (Multi-process and S3 tests are in
//! `fleet_process.rs` and `fleet_s3.rs`.)

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use waymark::fleet::{FleetClient, FleetWorker, LeaseTiming, Leases};
use waymark::*;

/// Steps that always succeed, after one `Continue`.
#[derive(Clone)]
struct TwoSteps;

impl StepRunner for TwoSteps {
    async fn run_step(&self, step: &Step) -> Result<StepOutcome, StepError> {
        Ok(match step.step_number {
            0 => StepOutcome::Continue { payload: vec![] },
            _ => StepOutcome::Succeed {
                result: step.run_id.as_bytes().to_vec(),
            },
        })
    }
}

const TIMING: LeaseTiming = LeaseTiming {
    duration: Duration::from_millis(900),
    guard: Duration::from_millis(150),
};

fn worker(at: &StoreLocation) -> FleetWorker<TwoSteps, NoopTerminalHook> {
    scheduling_worker(at, Vec::new())
}

/// A worker whose every shard's runtime is built with `schedules`.
fn scheduling_worker(
    at: &StoreLocation,
    schedules: Vec<Schedule>,
) -> FleetWorker<TwoSteps, NoopTerminalHook> {
    FleetWorker::new(at.clone(), 4, move |_, queue| {
        schedules
            .iter()
            .fold(
                WorkflowRuntime::builder(queue, TwoSteps, NoopTerminalHook)
                    .poll_interval(Duration::from_millis(20)),
                |b, s| b.schedule(s.clone()),
            )
            .build()
    })
    .lease_timing(TIMING)
    .store_options(|_| {
        StoreOptions::default()
            .flush_interval(Duration::from_millis(2))
            .inbox_touch_poll(Duration::from_millis(20))
    })
}

/// Who holds each shard now (`None`: free or released).
async fn owners(at: &StoreLocation) -> BTreeMap<u32, Option<String>> {
    let leases = Leases::new(at.clone(), "observer".into(), TIMING).unwrap();
    let mut out = BTreeMap::new();
    for shard in 0..4 {
        let view = leases.view(shard).await.unwrap();
        out.insert(shard, view.filter(|v| !v.released).map(|v| v.owner));
    }
    out
}

/// Wait (bounded: a hang fails) until `pred` holds for the owners.
async fn until_owners(at: &StoreLocation, pred: impl Fn(&BTreeMap<u32, Option<String>>) -> bool) {
    for _ in 0..600 {
        if pred(&owners(at).await) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("owners never matched: {:?}", owners(at).await);
}

/// A client, once every shard's store exists (a worker opens a shard just
/// after taking its lease; bounded: a hang fails).
async fn open_client(at: &StoreLocation) -> FleetClient {
    for _ in 0..600 {
        if let Ok(client) = FleetClient::open(at, ClientOptions::default()).await {
            return client;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    FleetClient::open(at, ClientOptions::default())
        .await
        .unwrap()
}

/// The ids of the fleet's membership objects, sorted.
async fn members(at: &StoreLocation) -> Vec<String> {
    use futures_util::TryStreamExt;
    use waymark::taquba::object_store::ObjectStore;
    use waymark::taquba::object_store::path::Path;
    let dir = Path::from(format!("{}/members", at.path().trim_end_matches('/')));
    let mut ids: Vec<String> = at
        .object_store()
        .list(Some(&dir))
        .map_ok(|meta| meta.location.filename().unwrap_or_default().to_string())
        .try_collect()
        .await
        .unwrap();
    ids.sort();
    ids
}

fn held_by(owners: &BTreeMap<u32, Option<String>>, id: &str) -> usize {
    owners.values().filter(|o| o.as_deref() == Some(id)).count()
}

async fn submit_and_wait(client: &FleetClient, ids: impl Iterator<Item = String>) {
    let ids: Vec<String> = ids.collect();
    let submits = ids.iter().map(|id| {
        let spec = RunSpec {
            run_id: Some(id.clone()),
            ..Default::default()
        };
        client.submit_and_wait(spec, Duration::from_secs(60))
    });
    for submitted in futures_util::future::join_all(submits).await {
        submitted.unwrap();
    }
    let waits = ids
        .iter()
        .map(|id| client.wait(id, Duration::from_secs(60)));
    for (id, out) in ids.iter().zip(futures_util::future::join_all(waits).await) {
        let out = out.unwrap();
        assert_eq!(out.status, TerminalStatus::Succeeded, "{out:?}");
        assert_eq!(out.result.as_deref(), Some(id.as_bytes()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_share_shards_join_and_take_over() {
    let dir = tempfile::tempdir().unwrap();
    let at = StoreLocation::from_url(&format!("file://{}", dir.path().display())).unwrap();
    let a = worker(&at);
    let a_id = a.id().to_string();
    let a_stop = Arc::new(tokio::sync::Notify::new());
    let a_task = tokio::spawn({
        let stop = a_stop.clone();
        a.run(async move { stop.notified().await })
    });
    // Alone, a takes every shard.
    until_owners(&at, |o| held_by(o, &a_id) == 4).await;
    let client = open_client(&at).await;
    submit_and_wait(&client, (0..40).map(|i| format!("first-{i}"))).await;

    // b joins: each ends with two shards.
    let b = worker(&at);
    let b_id = b.id().to_string();
    let b_stop = Arc::new(tokio::sync::Notify::new());
    let b_task = tokio::spawn({
        let stop = b_stop.clone();
        b.run(async move { stop.notified().await })
    });
    until_owners(&at, |o| held_by(o, &a_id) == 2 && held_by(o, &b_id) == 2).await;
    submit_and_wait(&client, (0..40).map(|i| format!("second-{i}"))).await;

    // a dies without a word: b takes its shards once their leases lapse.
    a_task.abort();
    let _ = a_task.await;
    until_owners(&at, |o| held_by(o, &b_id) == 4).await;
    submit_and_wait(&client, (0..40).map(|i| format!("third-{i}"))).await;
    // a's membership object, left behind, is removed once it has stood
    // still for five lease windows (it would stay in the bucket for good,
    // listed by every tick of every worker).
    assert!(members(&at).await.contains(&a_id));
    for _ in 0..600 {
        if !members(&at).await.contains(&a_id) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        members(&at).await,
        vec![b_id.clone()],
        "a's membership stayed"
    );

    // b leaves gracefully: every shard is released.
    b_stop.notify_one();
    b_task.await.unwrap().unwrap();
    until_owners(&at, |o| o.values().all(Option::is_none)).await;
    let _ = a_stop;
}

/// Every shard's runtime is given the same schedules; each is recorded,
/// fired and triggered on its home shard only, under run ids that route
/// there. Without the shard assignment every shard would record and fire
/// every schedule (the merged listing would hold each id four times), and
/// without the routed run ids a fired run would be on a shard the client
/// does not look at.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_fire_on_their_home_shard_only() {
    let dir = tempfile::tempdir().unwrap();
    let at = StoreLocation::from_url(&format!("file://{}", dir.path().display())).unwrap();
    let timed: Vec<String> = (0..6).map(|i| format!("tick-{i}")).collect();
    let manual: Vec<String> = (0..6).map(|i| format!("by-hand-{i}")).collect();
    let homes: std::collections::BTreeSet<u32> = timed
        .iter()
        .chain(&manual)
        .map(|id| waymark::fleet::shard_of_schedule(id, 4))
        .collect();
    assert!(homes.len() >= 3, "the ids should spread over the shards");
    let defs: Vec<Schedule> = timed
        .iter()
        .map(|id| Schedule::every(id.clone(), Duration::from_millis(200)))
        .chain(manual.iter().map(|id| Schedule::manual(id.clone())))
        .collect();
    let w = scheduling_worker(&at, defs);
    let stop = Arc::new(tokio::sync::Notify::new());
    let task = tokio::spawn({
        let stop = stop.clone();
        w.run(async move { stop.notified().await })
    });
    let client = open_client(&at).await;

    // Triggered by hand through the home shard's inbox.
    for id in &manual {
        let home = client.schedule_client(id);
        let run_id = home
            .trigger_and_wait(id, Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(
            waymark::fleet::shard_of_run(&run_id, 4),
            waymark::fleet::shard_of_schedule(id, 4),
            "{run_id} routes away from {id}'s home"
        );
        let out = client.wait(&run_id, Duration::from_secs(60)).await.unwrap();
        assert_eq!(out.status, TerminalStatus::Succeeded, "{out:?}");
    }

    // Timer fires: each schedule fires a few times, every run on its home.
    for _ in 0..1200 {
        let all = client.schedules().await.unwrap();
        if timed.iter().all(|id| {
            all.iter()
                .any(|s| &s.id == id && s.run_count >= 3 && s.last_run_id.is_some())
        }) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let all = client.schedules().await.unwrap();
    let listed: Vec<&str> = all.iter().map(|s| s.id.as_str()).collect();
    let mut want: Vec<&str> = timed.iter().chain(&manual).map(String::as_str).collect();
    want.sort();
    assert_eq!(listed, want, "each schedule is recorded once, on its home");
    for info in &all {
        assert!(info.run_count >= 1, "{info:?}");
        let last = info.last_run_id.as_deref().expect("a run");
        assert_eq!(
            waymark::fleet::shard_of_run(last, 4),
            waymark::fleet::shard_of_schedule(&info.id, 4),
            "{last}"
        );
        let out = client.wait(last, Duration::from_secs(60)).await.unwrap();
        assert_eq!(out.status, TerminalStatus::Succeeded, "{out:?}");
        assert_eq!(
            client.schedule(&info.id).await.unwrap().map(|s| s.id),
            Some(info.id.clone())
        );
    }
    // A trigger sent to a shard that is not the schedule's home is refused.
    let id = &manual[0];
    let home = waymark::fleet::shard_of_schedule(id, 4);
    let other = (0..4u32).find(|s| *s != home).unwrap();
    let stranger = (0..)
        .map(|i| format!("probe-{i}"))
        .find(|run| waymark::fleet::shard_of_run(run, 4) == other)
        .unwrap();
    let e = client
        .shard_client(&stranger)
        .trigger_and_wait(id, Duration::from_secs(60))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::ScheduleNotFound(_)), "{e}");
    stop.notify_one();
    task.await.unwrap().unwrap();
}

/// A fleet worker before schedules had homes recorded every schedule on
/// every shard. A worker now deletes, on each shard it runs, the records of
/// schedules homed elsewhere: each schedule is left recorded once, on its
/// home, with its own record untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedule_records_left_on_other_shards_are_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let at = StoreLocation::from_url(&format!("file://{}", dir.path().display())).unwrap();
    let ids: Vec<String> = (0..8).map(|i| format!("nightly-{i}")).collect();
    let defs: Vec<Schedule> = ids.iter().map(|id| Schedule::manual(id.clone())).collect();
    let manifest = waymark::fleet::FleetManifest::open_or_create(&at, 4)
        .await
        .unwrap();
    // The old way: each shard's runtime recorded every schedule.
    for shard in 0..4 {
        let location = manifest.shard_location(&at, shard);
        let queue = open_worker_store(&location, StoreOptions::default())
            .await
            .unwrap();
        let runtime = defs
            .iter()
            .fold(
                WorkflowRuntime::builder(queue.clone(), TwoSteps, NoopTerminalHook),
                |b, s| b.schedule(s.clone()),
            )
            .build()
            .unwrap();
        runtime.run(async {}).await.unwrap();
        drop(runtime);
        // Not closed: the fleet worker's open fences it, as after a crash.
        drop(queue);
    }
    let before = open_client(&at).await;
    for shard in before.shards() {
        assert_eq!(shard.schedules().await.unwrap().len(), ids.len());
    }
    before.close().await.unwrap();

    let w = scheduling_worker(&at, defs);
    let stop = Arc::new(tokio::sync::Notify::new());
    let task = tokio::spawn({
        let stop = stop.clone();
        w.run(async move { stop.notified().await })
    });
    let client = open_client(&at).await;
    let home_only = |shard: u32, listed: &[ScheduleInfo]| {
        let mut want: Vec<&str> = ids
            .iter()
            .filter(|id| waymark::fleet::shard_of_schedule(id, 4) == shard)
            .map(String::as_str)
            .collect();
        want.sort();
        listed.iter().map(|s| s.id.as_str()).collect::<Vec<_>>() == want
    };
    let mut done = false;
    for _ in 0..1200 {
        let mut all_home = true;
        for (shard, c) in (0..).zip(client.shards()) {
            all_home &= home_only(shard, &c.schedules().await.unwrap());
        }
        if all_home {
            done = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(done, "every shard should keep only its home schedules");
    let all = client.schedules().await.unwrap();
    assert_eq!(all.iter().map(|s| s.id.clone()).collect::<Vec<_>>(), ids);
    assert!(all.iter().all(|s| s.active), "{all:?}");
    stop.notify_one();
    task.await.unwrap().unwrap();
}

/// A user's function that panics when a shard starts (here the store
/// options, the first time shard 2 opens) ends that shard's task only: the
/// worker goes on with the others, takes shard 2 again once its lease
/// lapses, and every run ends.
#[tokio::test]
async fn a_panic_in_the_store_options_function_costs_one_shard_one_lease() {
    let dir = tempfile::tempdir().unwrap();
    let at = StoreLocation::from_url(&format!("file://{}", dir.path().display())).unwrap();
    let panicked = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let w = worker(&at).store_options({
        let panicked = panicked.clone();
        move |shard| {
            if shard == 2 && !panicked.swap(true, std::sync::atomic::Ordering::SeqCst) {
                panic!("the options function failed for shard 2");
            }
            StoreOptions::default().flush_interval(Duration::from_millis(2))
        }
    });
    let id = w.id().to_string();
    let stop = Arc::new(tokio::sync::Notify::new());
    let task = tokio::spawn({
        let stop = stop.clone();
        w.run(async move { stop.notified().await })
    });
    until_owners(&at, |o| held_by(o, &id) == 4).await;
    let client = open_client(&at).await;
    submit_and_wait(&client, (0..40).map(|i| format!("run-{i}"))).await;
    assert!(panicked.load(std::sync::atomic::Ordering::SeqCst));
    stop.notify_one();
    task.await.unwrap().unwrap();
}

/// A shard whose store is still in use elsewhere when its runtime stops
/// (the function that builds the runtime kept a clone of its queue) cannot
/// be closed. It was handed back all the same, its store left open beside
/// the next owner's; its lease is now left to lapse, and the others are
/// handed back.
#[tokio::test]
async fn a_shard_whose_store_is_kept_elsewhere_is_not_handed_back() {
    let dir = tempfile::tempdir().unwrap();
    let at = StoreLocation::from_url(&format!("file://{}", dir.path().display())).unwrap();
    let kept = Arc::new(std::sync::Mutex::new(Vec::new()));
    let w = FleetWorker::new(at.clone(), 4, {
        let kept = kept.clone();
        move |shard, queue| {
            if shard == 1 {
                kept.lock().unwrap().push(queue.clone());
            }
            WorkflowRuntime::builder(queue, TwoSteps, NoopTerminalHook)
                .poll_interval(Duration::from_millis(20))
                .build()
        }
    })
    .lease_timing(TIMING)
    .store_options(|_| StoreOptions::default().flush_interval(Duration::from_millis(2)));
    let id = w.id().to_string();
    let stop = Arc::new(tokio::sync::Notify::new());
    let task = tokio::spawn({
        let stop = stop.clone();
        w.run(async move { stop.notified().await })
    });
    until_owners(&at, |o| held_by(o, &id) == 4).await;
    stop.notify_one();
    let _ = task.await.unwrap();
    let after = owners(&at).await;
    assert_eq!(after[&1], Some(id), "shard 1's lease is left to lapse");
    for shard in [0, 2, 3] {
        assert_eq!(after[&shard], None, "shard {shard} was handed back");
    }
}

/// A fleet listing merges each shard's page, and with it each shard's
/// runs whose records do not decode: a page names those in its own range
/// only, so each is named once as the pages are walked.
#[tokio::test]
async fn a_fleet_listing_names_each_shards_unreadable_runs_in_the_page_they_fall_in() {
    let dir = tempfile::tempdir().unwrap();
    let at = StoreLocation::from_url(&format!("file://{}", dir.path().display())).unwrap();
    let manifest = waymark::fleet::FleetManifest::open_or_create(&at, 2)
        .await
        .unwrap();
    // Listing scans every shard, so where each run is does not matter
    // here: these are written straight to a shard, as its worker would.
    for (shard, runs) in [(0, ["a", "b", "c", "e"]), (1, ["d", "f", "g", "h"])] {
        let location = manifest.shard_location(&at, shard);
        let queue = open_worker_store(&location, StoreOptions::default())
            .await
            .unwrap();
        let runtime = WorkflowRuntime::builder(queue.clone(), TwoSteps, NoopTerminalHook)
            .build()
            .unwrap();
        for id in runs {
            runtime
                .submit(RunSpec {
                    run_id: Some(id.into()),
                    ..Default::default()
                })
                .await
                .unwrap();
        }
        let garbled = ["b", "d"][shard as usize];
        queue
            .kv_put(
                format!("wm/workflow-steps/run/{garbled}").as_bytes(),
                b"\xc1",
            )
            .await
            .unwrap();
        drop(runtime);
        Arc::try_unwrap(queue).ok().unwrap().close().await.unwrap();
    }
    let client = open_client(&at).await;
    let mut filter = RunFilter {
        limit: 2,
        ..Default::default()
    };
    let mut pages = Vec::new();
    loop {
        let page = client.runs(&filter).await.unwrap();
        let names = |ids: Vec<&str>| ids.join(",");
        pages.push(format!(
            "{} / {}",
            names(page.runs.iter().map(|r| r.run_id.as_str()).collect()),
            names(page.unreadable.iter().map(|r| r.run_id.as_str()).collect())
        ));
        match page.next {
            Some(next) => filter.after = Some(next),
            None => break,
        }
    }
    // Shard 1's first page reaches `g` and names `d`, but the merged page
    // ends at `c`: `d` is named by the page that covers it. (A full page
    // always offers a next one, which here is empty.)
    assert_eq!(pages, ["a,c / b", "e,f / d", "g,h / ", " / "]);
    client.close().await.unwrap();
}

/// A store that accepts conditional writes and overwrites anyway (as Garage
/// 2.5 does) is refused when a worker starts, before it writes anything.
#[tokio::test]
async fn a_store_that_ignores_conditional_writes_is_refused_at_fleet_start() {
    use waymark::taquba::object_store::memory::InMemory;
    use waymark::testkit::{FaultPlan, FaultStore};
    let inner = Arc::new(InMemory::new());
    let store = FaultStore::new(
        inner.clone(),
        1,
        FaultPlan {
            ignore_conditional_writes: true,
            ..FaultPlan::default()
        },
    );
    let at = StoreLocation::new(store, "fleet");
    let e = worker(&at).run(std::future::pending()).await.unwrap_err();
    assert!(matches!(e, Error::ConditionalWritesIgnored { .. }), "{e}");
    assert!(
        e.to_string().contains("create over an existing object"),
        "{e}"
    );
    use futures_util::StreamExt;
    use waymark::taquba::object_store::ObjectStore;
    assert_eq!(inner.list(None).count().await, 0, "it wrote something");
}

/// Lease timing for the tests on paused time: a lease of 900 ms renewed
/// every 300 ms, valid 750 ms after each renewal's send.
const PAUSED: LeaseTiming = TIMING;

/// A worker of `shards` shards at `at` on paused time, reporting its events
/// on the returned receiver.
fn paused_worker(
    at: &StoreLocation,
    shards: u32,
) -> (
    FleetWorker<TwoSteps, NoopTerminalHook>,
    tokio::sync::mpsc::UnboundedReceiver<waymark::fleet::ShardEvent>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let w = FleetWorker::new(at.clone(), shards, |_, queue| {
        WorkflowRuntime::builder(queue, TwoSteps, NoopTerminalHook)
            .poll_interval(Duration::from_millis(20))
            .build()
    })
    .lease_timing(PAUSED)
    .store_options(|_| StoreOptions::default().flush_interval(Duration::from_millis(2)))
    .events(tx);
    (w, rx)
}

/// The epoch of `shard`'s newest lease object, and its owner.
async fn top(at: &StoreLocation, shard: u32) -> (u64, String) {
    let view = waymark::fleet::peek_lease(at, shard)
        .await
        .unwrap()
        .expect("a lease");
    (view.epoch, view.owner)
}

/// Receive events until `n` shards were taken (bounded in paused time: a
/// worker that never takes them fails).
async fn took(rx: &mut tokio::sync::mpsc::UnboundedReceiver<waymark::fleet::ShardEvent>, n: usize) {
    use waymark::fleet::ShardEvent;
    let mut taken = 0;
    while taken < n {
        let event = tokio::time::timeout(PAUSED.duration * 20, rx.recv())
            .await
            .expect("the shards were taken in time")
            .expect("an event");
        match event {
            ShardEvent::Took { .. } => taken += 1,
            other => panic!("before taking its shards, the worker reported {other:?}"),
        }
    }
}

/// A worker's tick stuck in a listing that never answers (here its
/// membership listing; a stalled LIST on S3 does the same) does not stop
/// its renewals: every shard's lease is renewed all along, no fence fires
/// and no shard is dropped. Renewals used to run in the tick, before the
/// listings of the same tick, so the next renewal waited for them: every
/// shard's fence fired and the worker dropped them all.
#[tokio::test(start_paused = true)]
async fn renewals_go_on_while_the_tick_is_stuck_in_a_listing() {
    use waymark::taquba::object_store::memory::InMemory;
    use waymark::testkit::{FaultPlan, FaultStore, StoreOp};
    let store = FaultStore::new(Arc::new(InMemory::new()), 1, FaultPlan::default());
    let faults = store.faults();
    let at = StoreLocation::new(store, "fleet");
    let (w, mut rx) = paused_worker(&at, 4);
    let id = w.id().to_string();
    let stop = Arc::new(tokio::sync::Notify::new());
    let task = tokio::spawn({
        let stop = stop.clone();
        w.run(async move { stop.notified().await })
    });
    took(&mut rx, 4).await;
    faults.hold(StoreOp::List, "members");
    for _ in 0..100 {
        if faults.held() > 0 {
            break;
        }
        tokio::time::sleep(PAUSED.renew_every() / 10).await;
    }
    assert!(faults.held() > 0, "the tick's listing was never held");
    let mut before = Vec::new();
    for shard in 0..4 {
        before.push(top(&at, shard).await.0);
    }
    // Ten leases long: about thirty renewals of each shard are due.
    tokio::time::sleep(PAUSED.duration * 10).await;
    assert!(faults.held() > 0, "the tick went on");
    for shard in 0..4u32 {
        let (epoch, owner) = top(&at, shard).await;
        assert_eq!(owner, id);
        let renewed = epoch.saturating_sub(before[shard as usize]);
        assert!(renewed >= 20, "shard {shard} was renewed {renewed} times");
    }
    if let Ok(event) = rx.try_recv() {
        panic!("the worker reported {event:?}");
    }
    faults.release();
    stop.notify_one();
    task.await.unwrap().unwrap();
    let mut handed = 0;
    while let Ok(event) = rx.try_recv() {
        assert!(
            matches!(event, waymark::fleet::ShardEvent::HandedBack { .. }),
            "{event:?}"
        );
        handed += 1;
    }
    assert_eq!(handed, 4);
}

/// A worker one shard short of its share reads no lease of a shard
/// another worker renews: the listing of all the leases shows each such
/// lease's epoch advancing, so taking it is not worth a try. (Every tick
/// used to read every such lease, one LIST and one GET each, in the tick
/// that renewed: here a read of one of them never answers, so the worker
/// used to stop renewing and drop its own shard.) Once the other worker
/// stops renewing and its membership lapses, its shards are taken.
#[tokio::test(start_paused = true)]
async fn a_worker_short_of_its_share_reads_no_lease_another_renews() {
    use waymark::fleet::{FleetManifest, Watch};
    use waymark::taquba::object_store::memory::InMemory;
    use waymark::taquba::object_store::path::Path;
    use waymark::taquba::object_store::{ObjectStoreExt, PutPayload};
    use waymark::testkit::{FaultPlan, FaultStore, StoreOp};
    let store = FaultStore::new(Arc::new(InMemory::new()), 1, FaultPlan::default());
    let faults = store.faults();
    let at = StoreLocation::new(store, "fleet");
    FleetManifest::open_or_create(&at, 3).await.unwrap();
    // Another worker, b, holds shards 1 and 2 and beats its membership:
    // two workers are live, each's share is two.
    let b = Leases::new(at.clone(), "b".into(), PAUSED).unwrap();
    let mut held = Vec::new();
    for shard in [1, 2] {
        held.push(
            b.try_take(shard, &mut Watch::default())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    let b_member = Path::from("fleet/members/b");
    let b_alive = Arc::new(tokio::sync::Notify::new());
    let b_task = tokio::spawn({
        let (at, b_alive) = (at.clone(), b_alive.clone());
        async move {
            let mut beats = 0u64;
            loop {
                for lease in &mut held {
                    b.renew(lease).await.unwrap();
                }
                beats += 1;
                at.object_store()
                    .put(&b_member, PutPayload::from(beats.to_string().into_bytes()))
                    .await
                    .unwrap();
                tokio::select! {
                    () = b_alive.notified() => return,
                    () = tokio::time::sleep(PAUSED.renew_every()) => {}
                }
            }
        }
    });
    faults.hold(StoreOp::Get, "leases/shard-0001");
    let (w, mut rx) = paused_worker(&at, 3);
    let id = w.id().to_string();
    let stop = Arc::new(tokio::sync::Notify::new());
    let task = tokio::spawn({
        let stop = stop.clone();
        w.run(async move { stop.notified().await })
    });
    took(&mut rx, 1).await;
    let before = top(&at, 0).await;
    assert_eq!(before.1, id);
    tokio::time::sleep(PAUSED.duration * 10).await;
    assert_eq!(faults.held(), 0, "the worker read a lease b renews");
    let after = top(&at, 0).await;
    assert_eq!(after.1, id);
    assert!(after.0 >= before.0 + 20, "{before:?} then {after:?}");
    if let Ok(event) = rx.try_recv() {
        panic!("the worker reported {event:?}");
    }

    // b dies: its leases lapse, and the worker takes both.
    faults.release();
    b_alive.notify_one();
    b_task.await.unwrap();
    took(&mut rx, 2).await;
    for shard in 0..3 {
        assert_eq!(top(&at, shard).await.1, id);
    }
    stop.notify_one();
    task.await.unwrap().unwrap();
}

/// A store whose first conditional create of a renewal of shard 0's lease
/// writes the object and then fails, as a connection reset after the send
/// does (or a server error that object_store retries into "already
/// exists").
#[derive(Debug)]
struct LostReply {
    inner: Arc<dyn waymark::taquba::object_store::ObjectStore>,
    armed: std::sync::atomic::AtomicBool,
}

impl std::fmt::Display for LostReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LostReply({})", self.inner)
    }
}

#[async_trait::async_trait]
impl waymark::taquba::object_store::ObjectStore for LostReply {
    async fn put_opts(
        &self,
        location: &waymark::taquba::object_store::path::Path,
        payload: waymark::taquba::object_store::PutPayload,
        opts: waymark::taquba::object_store::PutOptions,
    ) -> waymark::taquba::object_store::Result<waymark::taquba::object_store::PutResult> {
        let create = matches!(opts.mode, waymark::taquba::object_store::PutMode::Create);
        let put = self.inner.put_opts(location, payload, opts).await?;
        if create
            && location.as_ref().contains("leases/shard-0000/")
            && self.armed.swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            return Err(waymark::taquba::object_store::Error::Generic {
                store: "LostReply",
                source: "connection reset by peer after the request was sent".into(),
            });
        }
        Ok(put)
    }

    async fn put_multipart_opts(
        &self,
        location: &waymark::taquba::object_store::path::Path,
        opts: waymark::taquba::object_store::PutMultipartOptions,
    ) -> waymark::taquba::object_store::Result<
        Box<dyn waymark::taquba::object_store::MultipartUpload>,
    > {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &waymark::taquba::object_store::path::Path,
        options: waymark::taquba::object_store::GetOptions,
    ) -> waymark::taquba::object_store::Result<waymark::taquba::object_store::GetResult> {
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: futures_util::stream::BoxStream<
            'static,
            waymark::taquba::object_store::Result<waymark::taquba::object_store::path::Path>,
        >,
    ) -> futures_util::stream::BoxStream<
        'static,
        waymark::taquba::object_store::Result<waymark::taquba::object_store::path::Path>,
    > {
        self.inner.delete_stream(locations)
    }

    fn list(
        &self,
        prefix: Option<&waymark::taquba::object_store::path::Path>,
    ) -> futures_util::stream::BoxStream<
        'static,
        waymark::taquba::object_store::Result<waymark::taquba::object_store::ObjectMeta>,
    > {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(
        &self,
        prefix: Option<&waymark::taquba::object_store::path::Path>,
    ) -> waymark::taquba::object_store::Result<waymark::taquba::object_store::ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &waymark::taquba::object_store::path::Path,
        to: &waymark::taquba::object_store::path::Path,
        options: waymark::taquba::object_store::CopyOptions,
    ) -> waymark::taquba::object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

/// A renewal whose create reached the store though its reply was lost is
/// adopted at the next renewal: the object it wrote names this worker. The
/// worker keeps the shard and reports nothing; it used to take the
/// existing object for another worker's, stop the shard and report it
/// "taken by another worker".
#[tokio::test(start_paused = true)]
async fn a_renewal_written_though_its_reply_was_lost_keeps_the_shard() {
    use waymark::taquba::object_store::memory::InMemory;
    let store = Arc::new(LostReply {
        inner: Arc::new(InMemory::new()),
        armed: std::sync::atomic::AtomicBool::new(false),
    });
    let at = StoreLocation::new(store.clone(), "fleet");
    let (w, mut rx) = paused_worker(&at, 4);
    let id = w.id().to_string();
    let stop = Arc::new(tokio::sync::Notify::new());
    let task = tokio::spawn({
        let stop = stop.clone();
        w.run(async move { stop.notified().await })
    });
    took(&mut rx, 4).await;
    let before = top(&at, 0).await;
    store.armed.store(true, std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(PAUSED.duration * 10).await;
    assert!(
        !store.armed.load(std::sync::atomic::Ordering::SeqCst),
        "no renewal's reply was lost"
    );
    if let Ok(event) = rx.try_recv() {
        panic!("the worker reported {event:?}");
    }
    let after = top(&at, 0).await;
    assert_eq!(after.1, id);
    assert!(after.0 >= before.0 + 20, "{before:?} then {after:?}");
    stop.notify_one();
    task.await.unwrap().unwrap();
}

/// A renewal moves the lease's validity before its last step, the delete
/// of an old epoch's object. A delete that hangs until the renewal is cut
/// off at the old validity still leaves the lease renewed: the shard's
/// fence moves with it, and the shard is kept. (The fence used to move
/// only when the whole renewal returned `Ok`, so the runtime was stopped
/// at the old validity and the shard dropped, its lease valid.)
#[tokio::test(start_paused = true)]
async fn a_renewal_whose_old_object_delete_hangs_keeps_the_shard() {
    use waymark::taquba::object_store::memory::InMemory;
    use waymark::testkit::{FaultPlan, FaultStore, StoreOp};
    let store = FaultStore::new(Arc::new(InMemory::new()), 1, FaultPlan::default());
    let faults = store.faults();
    let at = StoreLocation::new(store, "fleet");
    let (w, mut rx) = paused_worker(&at, 2);
    let id = w.id().to_string();
    let stop = Arc::new(tokio::sync::Notify::new());
    let task = tokio::spawn({
        let stop = stop.clone();
        w.run(async move { stop.notified().await })
    });
    took(&mut rx, 2).await;
    let before = top(&at, 0).await.0;
    faults.hold(StoreOp::Delete, "leases/shard-0000/");
    tokio::time::sleep(PAUSED.duration * 10).await;
    assert!(
        faults.held() > 0,
        "no delete of an old lease object was held"
    );
    if let Ok(event) = rx.try_recv() {
        panic!("the worker reported {event:?}");
    }
    let (epoch, owner) = top(&at, 0).await;
    assert_eq!(owner, id);
    assert!(epoch >= before + 5, "renewed from {before} to {epoch} only");
    faults.release();
    stop.notify_one();
    task.await.unwrap().unwrap();
}
