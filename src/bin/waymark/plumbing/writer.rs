//! Becoming a store's writer, safely: refuse while another process writes
//! it, and bound the open.
//!
//! taquba has one writer per store, and opening a store as its writer fences
//! the previous writer. Before the demo or `waymark worker` opens a store,
//! [`live_writer`] asks a reader (which never fences) whether a writer is
//! alive: the writer's liveness heartbeat (every writer this CLI opens beats
//! every [`HEARTBEAT`]) advancing, or the store's durable sequence number
//! advancing (a writer without a heartbeat). A beat marked closed means the
//! last writer shut down cleanly, and nothing has to be waited for.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use waymark::taquba::{OpenOptions, Queue};
use waymark::{StoreOptions, open_worker_store};

use super::exit::{CliError, CliResult, Exit};
use super::output::suggest;
use super::signals::unless_stopped;
use super::store::{DEFAULT_STEP_QUEUE, READER_POLL, Store, Use};

/// How often a writer the CLI opens commits its liveness beat.
pub const HEARTBEAT: Duration = Duration::from_millis(250);

/// The longest [`live_writer`] watches for a heartbeat: a writer that beats
/// less often and commits nothing meanwhile is taken for dead (taking the
/// store over fences it; nothing it acknowledged is lost).
const MAX_LIVENESS_WAIT: Duration = Duration::from_secs(600);

/// Whether another process is writing `store` now: `Some(evidence)` if so.
/// Waits up to a few heartbeat intervals when the last writer did not close
/// cleanly (it may have been killed, or may be alive); a long wait is said
/// on stderr, with `skip` (how to skip it, if the command can) appended.
pub async fn live_writer(store: &Store, skip: Option<&str>) -> CliResult<Option<String>> {
    if store.local.as_ref().is_some_and(|local| !local.exists()) {
        return Ok(None);
    }
    let reader = match store.open_reader().await {
        Ok(reader) => reader,
        // No store yet: nobody writes it.
        Err(e) if e.exit == Exit::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let first = store
        .bounded("reading the writer's heartbeat", reader.writer_heartbeat())
        .await?;
    if first.as_ref().is_some_and(|beat| beat.closed) {
        store.close_reader(reader.close()).await;
        return Ok(None);
    }
    let seq = reader.last_store_activity().durable_seq;
    let interval = first.as_ref().map_or(HEARTBEAT, |beat| beat.interval);
    // Two beats' time, plus the reader's poll and a commit's flush; the
    // interval is the last writer's own setting (an embedding service may
    // beat once an hour), so the wait is said and bounded.
    let wait = interval
        .saturating_mul(2)
        .saturating_add(READER_POLL.saturating_mul(2))
        .clamp(Duration::from_millis(600), MAX_LIVENESS_WAIT);
    if wait > Duration::from_secs(2) {
        let skip = skip.map(|how| format!(" ({how})")).unwrap_or_default();
        say_err!(
            "the store's last writer did not close cleanly and beats every {:.0?}: watching for \
             its next beat for {:.0?} to see whether it is alive{skip}",
            interval,
            wait
        );
    }
    tokio::time::sleep(wait).await;
    let second = store
        .bounded("reading the writer's heartbeat", reader.writer_heartbeat())
        .await?;
    let seq_after = reader.last_store_activity().durable_seq;
    store.close_reader(reader.close()).await;
    let beat_advanced = match (&first, &second) {
        (Some(a), Some(b)) => b.counter > a.counter && !b.closed,
        (None, Some(b)) => !b.closed,
        _ => false,
    };
    Ok(if beat_advanced {
        Some("its liveness heartbeat is advancing".to_string())
    } else if seq_after > seq && !second.as_ref().is_some_and(|beat| beat.closed) {
        Some("it is committing".to_string())
    } else {
        None
    })
}

/// Refuse to open a fleet's prefix as a single store: it holds shards, and
/// opening it as one would misread it.
pub async fn refuse_fleet(store: &Store) -> CliResult<()> {
    let Some(manifest) = store.fleet().await? else {
        return Ok(());
    };
    let shards = manifest.shards.to_string();
    let mut worker = vec!["worker"];
    let args = store.args();
    worker.extend(args.iter().map(String::as_str));
    worker.extend(["--shards", shards.as_str()]);
    Err(CliError::refused(format!(
        "{} is a fleet of {shards} shards, not a single store; opening it as one would misread \
         it. Run a fleet worker on it: {}",
        store.shown(),
        suggest(&worker)
    )))
}

/// Refuse to become the writer of `store` while another process writes it,
/// unless `force`; a fleet's prefix always ([`refuse_fleet`]).
pub async fn refuse_if_live(store: &Store, force: bool, action: &str) -> CliResult<()> {
    refuse_fleet(store).await?;
    if force {
        return Ok(());
    }
    if let Some(evidence) = live_writer(store, Some("--force skips this")).await? {
        let mut args = vec![];
        let store_args = store.args();
        args.extend(store_args.iter().map(String::as_str));
        return Err(CliError::refused(format!(
            "another process is writing the store at {} ({evidence}); {action} would fence it. \
             Stop that process first, watch it with `{}`, or pass --force to take the store over",
            store.shown(),
            suggest(&[&["runs"][..], &args[..]].concat())
        )));
    }
    Ok(())
}

/// Refuse to delete `store` (`action` says how) while another process
/// writes it, whatever `--force` says: taking a store over fences its
/// writer, which stops, but deleting the files under a live writer destroys
/// what it is working on while it goes on writing. A fleet's prefix is
/// refused too ([`refuse_fleet`]).
pub async fn refuse_delete_if_live(store: &Store, action: &str) -> CliResult<()> {
    refuse_fleet(store).await?;
    if store.local.as_deref().is_some_and(lacks_manifest) {
        return Ok(());
    }
    if let Some(evidence) = live_writer(store, None).await? {
        let store_args = store.args();
        let mut runs = vec!["runs"];
        runs.extend(store_args.iter().map(String::as_str));
        return Err(CliError::refused(format!(
            "another process is writing the store at {} ({evidence}): a `waymark worker` or \
             `waymark demo` on it, or a service using it; {action} would delete its files under \
             it. Stop that process first, then run this again (--force does not override this: \
             it takes a store over, it never deletes one in use); `{}` shows the store's runs",
            store.shown(),
            suggest(&runs)
        )));
    }
    Ok(())
}

/// Whether the local store at `local` holds no manifest (its `manifest`
/// directory is missing or holds no file): no writer can be working it (a
/// writer's store always holds its manifest), and no reader can open it.
/// This is what a reset cut short after deleting the manifests leaves. An
/// error reading the directory (other than its absence) is not taken for
/// an absent manifest.
fn lacks_manifest(local: &Path) -> bool {
    let entries = match std::fs::read_dir(local.join("manifest")) {
        Ok(entries) => entries,
        Err(e) => return e.kind() == std::io::ErrorKind::NotFound,
    };
    for entry in entries {
        match entry.and_then(|entry| entry.file_type()) {
            Ok(kind) if kind.is_dir() => {}
            _ => return false,
        }
    }
    true
}

/// Open `store` as its worker (the library's `open_worker_store`: the
/// inbox for clients' requests, a liveness heartbeat every [`HEARTBEAT`],
/// 10 ms WAL flushes), bounded by the store's timeout.
/// A fleet's prefix is refused ([`refuse_fleet`]).
pub async fn open_writer(store: &Store) -> CliResult<Arc<Queue>> {
    refuse_fleet(store).await?;
    store.preflight(Use::Write)?;
    store.create_local()?;
    let location = store.location()?;
    store
        .bounded(
            "opening the store",
            open_worker_store(&location, worker_store_options()),
        )
        .await
}

/// How the CLI's workers open a store (a single store, or each shard of a
/// fleet): the demo's step queue, 10 ms WAL flushes, a liveness beat every
/// [`HEARTBEAT`].
pub fn worker_store_options() -> StoreOptions {
    StoreOptions::default()
        .queue_name(DEFAULT_STEP_QUEUE)
        .flush_interval(Duration::from_millis(10))
        .liveness_heartbeat(HEARTBEAT)
        .taquba_options(OpenOptions::default().scheduler_interval(Duration::from_millis(20)))
}

/// Close the queue cleanly once nothing else holds it (a clean close commits
/// a closed heartbeat, so the next writer need not wait). Bounded by the
/// store's timeout, and ended at once by a stop request (`stop`, e.g.
/// `Signals::next`; `pending()` where the process does not listen for
/// one): the error then says the store was not closed cleanly, with exit 4
/// (unfinished), as the demo and the worker exit when they quit at once.
/// Every step already committed either way.
pub async fn close_writer(
    store: &Store,
    queue: Arc<Queue>,
    stop: impl Future<Output = &'static str>,
) -> CliResult<()> {
    let Ok(queue) = Arc::try_unwrap(queue) else {
        return Ok(());
    };
    match unless_stopped(store.bounded("closing the store", queue.close()), stop).await {
        Ok(closed) => closed,
        Err(by) => Err(CliError::new(
            Exit::Unfinished,
            format!(
                "{by}: quitting at once: the store at {} was not closed cleanly. Everything it \
                 ran is committed; the next worker or demo on it first watches for this one's \
                 heartbeat for a moment, to see that it is gone",
                store.shown()
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::task::Poll;

    use futures_util::poll;
    use tokio::sync::oneshot;
    use waymark::StoreLocation;
    use waymark::taquba::object_store::memory::InMemory;
    use waymark::testkit::{FaultPlan, FaultStore, StoreOp};

    use super::*;

    /// A bound that only turns a hang into a failure.
    const HANG_GUARD: Duration = Duration::from_secs(30);

    /// A stop request while the store's close cannot finish (its writes are
    /// held) ends `close_writer` at once, not after the store's timeout:
    /// exit 4, saying the store was not closed cleanly.
    #[tokio::test]
    async fn a_stop_request_ends_a_held_close_at_once() {
        let object_store = FaultStore::new(Arc::new(InMemory::new()), 0, FaultPlan::default());
        let faults = object_store.faults();
        let location = StoreLocation::new(object_store, "store");
        let queue = open_worker_store(&location, worker_store_options())
            .await
            .unwrap();
        // A timeout far past the hang guard: a close that waits for it
        // fails the test.
        let store = Store {
            name: "the test store".into(),
            dir: None,
            local: None,
            url: "memory://".into(),
            timeout: HANG_GUARD * 10,
        };
        // Every write is held: the close (its closed beat, its flush)
        // cannot land.
        faults.hold(StoreOp::Put, "");
        let (press, pressed) = oneshot::channel::<()>();
        let stop = async move {
            let _ = pressed.await;
            "SIGTERM"
        };
        let mut closing = Box::pin(close_writer(&store, queue, stop));
        assert!(matches!(poll!(closing.as_mut()), Poll::Pending));
        let waited = tokio::time::timeout(HANG_GUARD, async {
            while faults.held() == 0 {
                assert!(matches!(poll!(closing.as_mut()), Poll::Pending));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(waited.is_ok(), "no write of the close was held");
        press.send(()).unwrap();
        let closed = tokio::time::timeout(HANG_GUARD, closing)
            .await
            .expect("close_writer went on waiting after the stop request");
        let e = closed.expect_err("a close cut short is not a clean close");
        assert_eq!(e.exit, Exit::Unfinished);
        let message = e.to_string();
        assert!(
            message.starts_with("SIGTERM: quitting at once"),
            "{message}"
        );
        assert!(
            message.contains("the test store was not closed cleanly"),
            "{message}"
        );
        faults.release();
    }
}
