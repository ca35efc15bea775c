//! Garbage collection of a worker's store, on Waymark's schedule.
//!
//! SlateDB leaves files behind that nothing reads any more: WAL objects
//! once their writes are in a compacted SST, SSTs that a compaction
//! replaced, old manifest versions. Its own collector, which runs in the
//! writer by default, makes a pass every 10 minutes and deletes only files
//! older than 5 minutes, so a store under steady load carries up to a
//! quarter of an hour of its write volume as garbage, and each pass then
//! deletes thousands of objects at once. The soak (`benches/soak.rs`) writes
//! about 5 MiB/s of WAL at ~650 runs/s: several GiB on disk that are not
//! data. taquba 0.16 does not expose the collector's settings, but it can
//! open a store without it, so [`open_worker_store`](crate::open_worker_store)
//! does that and runs SlateDB's collector itself, a pass every
//! [`StoreOptions::gc_interval`](crate::StoreOptions::gc_interval) (1 minute
//! by default):
//!
//! | files | deleted once unreferenced and older than |
//! |---|---|
//! | WAL objects | [`WAL_MIN_AGE`] (1 minute) |
//! | compacted SSTs, manifests, compaction state | [`SST_MIN_AGE`] (5 minutes, SlateDB's default) |
//!
//! A WAL object that a reader (a [`Client`](crate::Client) in another
//! process) may still replay is referenced by the reader's checkpoint and is
//! kept whatever its age, so the shorter age costs readers nothing. SSTs keep
//! SlateDB's age: it protects a compaction's output before the manifest
//! names it.
//!
//! What the store still keeps beyond its data: SlateDB's compactor, when it
//! publishes a compaction, checkpoints the manifest it replaces for 15
//! minutes (its `checkpoint_lifetime`, which taquba 0.16 does not expose),
//! so that a read begun before the compaction can finish; the inputs of
//! every compaction of the last 15 minutes stay referenced until then. The
//! store therefore grows fast for about 15 minutes of steady load and then
//! holds its data plus 15 minutes of compaction inputs plus a minute or two
//! of WAL (the 65-minute soak in BENCHMARKS.md: 2.7–3.3 GiB at ~665 runs/s
//! from 15 minutes to the end, with no upward trend).
//!
//! The collector stops once the store is closed (a clean close, or a fence
//! by another writer, which runs a collector of its own) or the queue
//! dropped.

use std::sync::{Arc, Weak};
use std::time::Duration;

use slatedb::ErrorKind;
use slatedb::GarbageCollectorBuilder;
use slatedb::config::{GarbageCollectorDirectoryOptions, GarbageCollectorOptions};
use slatedb::object_store::ObjectStore;
use taquba::Queue;
use tokio::task::JoinHandle;

/// How old an unreferenced WAL object must be before the collector deletes
/// it.
pub const WAL_MIN_AGE: Duration = Duration::from_secs(60);

/// How old an unreferenced SST, manifest or compaction-state file must be
/// before the collector deletes it (SlateDB's default).
pub const SST_MIN_AGE: Duration = Duration::from_secs(300);

/// Where the store lives, for the collector.
#[derive(Clone)]
pub(crate) struct GcTarget {
    pub object_store: Arc<dyn ObjectStore>,
    pub path: String,
    /// A separate WAL object store, when the store has one.
    pub wal_object_store: Option<Arc<dyn ObjectStore>>,
}

/// The collector's settings: every kind of file it collects by default,
/// WAL objects from `wal_min_age` and the rest from [`SST_MIN_AGE`]. Passes
/// are driven by [`spawn`], not by SlateDB's own timer.
fn options(wal_min_age: Duration) -> GarbageCollectorOptions {
    let aged = |min_age| {
        Some(GarbageCollectorDirectoryOptions {
            interval: None,
            min_age,
            dry_run: false,
        })
    };
    GarbageCollectorOptions {
        manifest_options: aged(SST_MIN_AGE),
        wal_options: aged(wal_min_age),
        compacted_options: aged(SST_MIN_AGE),
        compactions_options: aged(SST_MIN_AGE),
        // A pass against a failing store gives up (and the next tick tries
        // again) instead of retrying without end in a task nobody awaits.
        object_store_max_retries: Some(5),
        // The rest as SlateDB sets them; WAL fences in particular are never
        // deleted (only listed), since deleting one can lose a write.
        ..GarbageCollectorOptions::default()
    }
}

/// SlateDB's collector for `target` (its type is not nameable outside
/// SlateDB: build it where it is used).
fn collector(target: GcTarget, wal_min_age: Duration) -> GarbageCollectorBuilder<String> {
    let builder = GarbageCollectorBuilder::new(target.path, target.object_store)
        .with_options(options(wal_min_age));
    match target.wal_object_store {
        Some(wal) => builder.with_wal_object_store(wal),
        None => builder,
    }
}

/// Run SlateDB's garbage collector on `target` every `every`, until
/// `queue` is closed or dropped.
pub(crate) fn spawn(target: GcTarget, queue: &Arc<Queue>, every: Duration) -> JoinHandle<()> {
    let collector = collector(target, WAL_MIN_AGE).build();
    let queue = Arc::downgrade(queue);
    tokio::spawn(async move {
        let mut tick = crate::sync::ticks_after(every);
        loop {
            tick.tick().await;
            if !open(&queue).await {
                tracing::debug!("the store closed; its garbage collector stops");
                return;
            }
            // Failures are logged by SlateDB and the pass is tried again at
            // the next tick.
            collector.run_gc_once().await;
        }
    })
}

/// Whether the queue is still alive and its store open: a closed store
/// refuses every read with [`ErrorKind::Closed`].
async fn open(queue: &Weak<Queue>) -> bool {
    let Some(queue) = queue.upgrade() else {
        return false;
    };
    match queue.view().kv_get(crate::store::MARKER_KEY).await {
        Err(taquba::Error::Storage(e)) => !matches!(e.kind(), ErrorKind::Closed(_)),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;
    use taquba::object_store::local::LocalFileSystem;
    use taquba::object_store::path::Path;

    use super::*;
    use crate::store::{StoreLocation, StoreOptions, open_worker_store};

    async fn files(store: &Arc<dyn ObjectStore>, dir: &str) -> usize {
        store.list(Some(&Path::from(dir))).count().await
    }

    /// Writes past one memtable (64 MiB) so that SlateDB flushes it to an
    /// L0 SST and the WAL objects before it are garbage; a pass of our
    /// collector deletes them (with no minimum age, so the test need not
    /// wait a minute), and the data is all still there.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pass_deletes_the_wal_objects_an_l0_flush_superseded() {
        let dir = tempfile::tempdir().unwrap();
        let fs: Arc<dyn ObjectStore> =
            Arc::new(LocalFileSystem::new_with_prefix(dir.path()).unwrap());
        let location = StoreLocation::new(fs.clone(), "gc");
        let options = StoreOptions::default().gc_interval(Duration::from_secs(3600));
        let queue = open_worker_store(&location, options).await.unwrap();
        // 80 batches of 4 puts of 240 KiB: 75 MiB.
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let writes = (0..80).map(|batch| {
            let mut effects = taquba::SettlementEffects::default();
            for i in 0..4 {
                let value: Vec<u8> = (0..240 * 1024)
                    .map(|_| {
                        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                        (seed >> 56) as u8
                    })
                    .collect();
                effects = effects.kv_put(format!("k/{batch}/{i}").into_bytes(), value);
            }
            let queue = queue.clone();
            async move { queue.commit_effects(effects).await.map(|_| ()) }
        });
        for done in futures_util::future::join_all(writes).await {
            done.unwrap();
        }
        // The memtable flush runs in the background.
        let flushed = async {
            while files(&fs, "gc/compacted").await == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(120), flushed)
            .await
            .expect("SlateDB flushed no L0 SST after 75 MiB of writes");
        let before = files(&fs, "gc/wal").await;
        let target = GcTarget {
            object_store: fs.clone(),
            path: "gc".into(),
            wal_object_store: None,
        };
        // The SST's file lands before the manifest names it, and only then
        // are the WAL objects before it garbage: pass until one is deleted.
        let collected = async {
            loop {
                collector(target.clone(), Duration::ZERO)
                    .build()
                    .run_gc_once()
                    .await;
                if files(&fs, "gc/wal").await < before {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(120), collected)
            .await
            .expect("no pass deleted a WAL object the L0 flush superseded");
        for batch in [0, 79] {
            let key = format!("k/{batch}/3").into_bytes();
            let value = queue.view().kv_get(&key).await.unwrap();
            assert_eq!(value.map(|v| v.len()), Some(240 * 1024));
        }
    }

    /// The collector stops once its store is closed.
    #[tokio::test]
    async fn the_collector_stops_when_the_store_closes() {
        let location = StoreLocation::from_url("memory:///gc").unwrap();
        let queue = open_worker_store(&location, StoreOptions::default())
            .await
            .unwrap();
        let target = GcTarget {
            object_store: location.object_store().clone(),
            path: location.path().to_string(),
            wal_object_store: None,
        };
        let task = spawn(target, &queue, Duration::from_millis(5));
        let queue = Arc::try_unwrap(queue).ok().expect("the only handle");
        queue.close().await.unwrap();
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("the collector still runs a minute after the store closed")
            .unwrap();
    }
}
