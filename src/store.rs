//! Opening a store for Waymark: where it lives ([`StoreLocation`], from a
//! URL or an `ObjectStore`), how a worker opens it ([`open_worker_store`],
//! with the inbox, heartbeat and flush interval that other processes rely
//! on), and the marker that says "this is a Waymark store".
//!
//! The marker is the KV key `wm/store`, written when a worker opens the
//! store: `{ format, written_by }` in MessagePack. A client refuses a store
//! without it ([`Error::NotAWaymarkStore`]) or with another format
//! ([`Error::IncompatibleStore`]); a worker refuses a non-empty store that
//! has neither the marker nor any Waymark key.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use taquba::object_store::ObjectStore;
use taquba::{InboxOptions, KvOrder, OpenOptions, Queue, QueueReader, QueueView, ReaderMode};

use crate::error::Error;

/// The store format this build reads and writes. It changes when the layout
/// of Waymark's keys, records or control requests changes incompatibly.
pub const STORE_FORMAT: u32 = 1;

/// The KV key of the store marker.
pub(crate) const MARKER_KEY: &[u8] = b"wm/store";

/// The prefix of every Waymark key.
const WAYMARK_PREFIX: &[u8] = b"wm/";

/// The step queue name of a runtime built with the builder's default.
pub const DEFAULT_QUEUE_NAME: &str = "workflow-steps";

/// The queue the requests of clients go on, for the step queue `queue_name`.
pub fn control_queue_name(queue_name: &str) -> String {
    format!("{queue_name}-control")
}

/// The durable marker of a Waymark store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct StoreMarker {
    /// [`STORE_FORMAT`] of the build that wrote it.
    format: u32,
    /// The Waymark version that wrote it (for messages only).
    written_by: String,
}

/// Where a Waymark store lives: an object store and a path (prefix) in it.
/// Cheap to clone; clones share the object store.
///
/// Every process on one store — the worker and any [`Client`](crate::Client)
/// — must use the same location. A `memory://` URL makes a new, empty
/// in-memory store on every parse: to share one in a test, clone the
/// location rather than parsing the URL twice.
#[derive(Clone)]
pub struct StoreLocation {
    object_store: Arc<dyn ObjectStore>,
    path: String,
    display: String,
}

impl StoreLocation {
    /// The store at `url`, configured from the environment:
    ///
    /// - `file:///var/lib/waymark/main`: a local directory (absolute path);
    /// - `s3://bucket/prefix`: S3 or an S3-compatible server, with the
    ///   region, endpoint and credentials from the usual `AWS_*` variables
    ///   (`AWS_REGION`, `AWS_ENDPOINT`, `AWS_ACCESS_KEY_ID`,
    ///   `AWS_SECRET_ACCESS_KEY`, ...). With `AWS_ENDPOINT` set, requests use
    ///   path-style addressing; a plain-`http` endpoint (a local test server)
    ///   also needs `AWS_ALLOW_HTTP=true`;
    /// - `memory:///name`: an in-memory store, for tests (see above).
    ///
    /// A string without `://` is taken as a local directory path (relative
    /// paths are resolved against the current directory).
    pub fn from_url(url: &str) -> Result<Self, Error> {
        Self::from_url_with_env(url, std::env::vars())
    }

    /// [`Self::from_url`] with the `AWS_*` (and `GOOGLE_*`, `AZURE_*`)
    /// options taken from `env` instead of the process environment.
    pub fn from_url_with_env<I, K, V>(url: &str, env: I) -> Result<Self, Error>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: Into<String>,
    {
        let url = if url.contains("://") {
            url.to_string()
        } else {
            let path = std::path::absolute(url).map_err(|e| {
                Error::InvalidConfig(format!("store path `{url}` cannot be resolved: {e}"))
            })?;
            format!("file://{}", path.display())
        };
        let (object_store, path) = taquba::open_url(&url, env)?;
        if path.as_ref().is_empty() {
            return Err(Error::InvalidConfig(format!(
                "store URL `{url}` names no path inside its store; add one (e.g. `{}/waymark`)",
                url.trim_end_matches('/')
            )));
        }
        Ok(Self {
            object_store,
            path: path.as_ref().to_string(),
            display: url,
        })
    }

    /// The store at `path` inside `object_store`.
    pub fn new(object_store: Arc<dyn ObjectStore>, path: impl Into<String>) -> Self {
        let path = path.into();
        Self {
            display: format!("path `{path}`"),
            object_store,
            path,
        }
    }

    /// The object store.
    pub fn object_store(&self) -> &Arc<dyn ObjectStore> {
        &self.object_store
    }

    /// The queue's path inside the object store.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The path of the inbox clients write requests to: a sibling of
    /// [`Self::path`] (`{path}-inbox`).
    pub fn inbox_path(&self) -> String {
        taquba::default_inbox_path(&self.path)
    }
}

impl fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.display)
    }
}

impl fmt::Debug for StoreLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreLocation")
            .field("location", &self.display)
            .finish()
    }
}

/// How a worker opens its store ([`open_worker_store`]). The defaults suit
/// a worker with clients in other processes; see each setting for what it
/// costs.
pub struct StoreOptions {
    queue_name: String,
    flush_interval: Duration,
    liveness_heartbeat: Duration,
    inbox_touch_poll: Duration,
    inbox_interval: Duration,
    request_retention: Duration,
    gc_interval: Duration,
    dead_retention: Option<Duration>,
    base: OpenOptions,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            queue_name: DEFAULT_QUEUE_NAME.to_string(),
            flush_interval: Duration::from_millis(10),
            liveness_heartbeat: Duration::from_secs(5),
            inbox_touch_poll: Duration::from_millis(250),
            inbox_interval: Duration::from_secs(30),
            request_retention: Duration::from_secs(7 * 24 * 3600),
            gc_interval: Duration::from_secs(60),
            dead_retention: None,
            base: OpenOptions::default(),
        }
    }
}

impl StoreOptions {
    /// The step queue name of the runtime that will work this store (default
    /// `"workflow-steps"`, the builder's default). The store's inbox accepts
    /// client requests for this runtime's control queue only.
    pub fn queue_name(mut self, name: impl Into<String>) -> Self {
        self.queue_name = name.into();
        self
    }

    /// The WAL flush interval (default 10 ms): every awaited commit (a
    /// step's settlement, a submit) waits for the next flush, and each flush
    /// with data is one object write.
    pub fn flush_interval(mut self, d: Duration) -> Self {
        self.flush_interval = d;
        self
    }

    /// How often the worker commits a liveness beat that clients read
    /// ([`Client::worker_heartbeat`](crate::Client::worker_heartbeat))
    /// (default 5 s).
    pub fn liveness_heartbeat(mut self, d: Duration) -> Self {
        self.liveness_heartbeat = d;
        self
    }

    /// How often the worker checks the inbox's touch object for new client
    /// requests (default 250 ms; one HEAD request each). This bounds how long
    /// a sent request waits before the worker picks it up.
    pub fn inbox_touch_poll(mut self, d: Duration) -> Self {
        self.inbox_touch_poll = d;
        self
    }

    /// How often the worker lists the inbox even without a touch (default
    /// 30 s; one LIST request each): the bound for a request whose sender
    /// failed to touch.
    pub fn inbox_interval(mut self, d: Duration) -> Self {
        self.inbox_interval = d;
        self
    }

    /// How long a request id is remembered, so a request sent again with
    /// the same id is applied once (default 7 days). Replies are kept for
    /// the runtime's `terminal_retention`; keep the two equal.
    pub fn request_retention(mut self, d: Duration) -> Self {
        self.request_retention = d;
        self
    }

    /// How often the worker deletes the store's obsolete files (default
    /// 1 minute): WAL objects a minute after a compacted SST holds their
    /// writes, replaced SSTs and old manifests after 5 minutes. Waymark runs
    /// SlateDB's garbage collector on this schedule instead of SlateDB's own
    /// (a pass every 10 minutes), so the store's size levels off at its data
    /// plus a few minutes of writes. Each pass lists the store's directories
    /// (a few LIST requests) and deletes what it found. See the `gc` module
    /// in ARCHITECTURE.md.
    pub fn gc_interval(mut self, d: Duration) -> Self {
        self.gc_interval = d;
        self
    }

    /// How long a dead-lettered job (a step whose run failed for good, a
    /// hook notification that exhausted its attempts) is kept for `waymark
    /// dead` and `requeue` before it is deleted. Without this setting, the
    /// queue's own: 7 days unless [`Self::taquba_options`] says otherwise.
    ///
    /// What it costs: every dead job stays in the store until then, and the
    /// queue's retention sweep reads the whole dead-letter set on each of its
    /// ticks (every 5 s), so under a steady failure rate the store and the
    /// sweep grow for the whole retention: at 30 failed runs a second, 7 days
    /// is 18 million dead jobs. Set it to the time within which an operator
    /// would requeue. It applies to every queue of the store. A duration
    /// past `u64::MAX` milliseconds is held at it (taquba counts retention
    /// in `u64` milliseconds, and a longer one would wrap round to a short
    /// one).
    pub fn dead_retention(mut self, d: Duration) -> Self {
        self.dead_retention = Some(d.min(Duration::from_millis(u64::MAX)));
        self
    }

    /// taquba's options for everything else (queue configs, the clock, the
    /// payload store, ...). Its inbox, heartbeat and flush interval are
    /// replaced by this builder's, SlateDB's in-process garbage collector
    /// is off (the worker runs it, see [`Self::gc_interval`]), and
    /// [`Self::dead_retention`], when set, replaces every queue's.
    pub fn taquba_options(mut self, options: OpenOptions) -> Self {
        self.base = options;
        self
    }
}

/// Open `location` as its worker: the store's single writer, with
/// everything clients need switched on — the inbox that accepts their
/// requests on the control queue, the liveness heartbeat they read, and the
/// flush interval. Creates the store when the location is empty, and marks
/// it as a Waymark store.
///
/// Opening fences any other writer of the store (an older worker stops at
/// its next commit). Clients never fence a worker.
///
/// Fails with [`Error::NotAWaymarkStore`] when the location holds data that
/// Waymark did not write, and [`Error::IncompatibleStore`] when its marker
/// has another format — both checked through a reader before anything is
/// opened for writing.
pub async fn open_worker_store(
    location: &StoreLocation,
    options: StoreOptions,
) -> Result<Arc<Queue>, Error> {
    let control = control_queue_name(&options.queue_name);
    taquba::QueueName::new(control.as_str()).map_err(|e| {
        Error::InvalidConfig(format!(
            "queue name `{}` is not usable with clients ({e}); use at most {} bytes of [A-Za-z0-9._-]",
            options.queue_name,
            taquba::MAX_QUEUE_NAME_LEN - 8
        ))
    })?;
    for (what, d) in [
        ("flush_interval", options.flush_interval),
        ("liveness_heartbeat", options.liveness_heartbeat),
        ("inbox_touch_poll", options.inbox_touch_poll),
        ("inbox_interval", options.inbox_interval),
        ("request_retention", options.request_retention),
        ("gc_interval", options.gc_interval),
        (
            "dead_retention",
            options.dead_retention.unwrap_or(Duration::MAX),
        ),
    ] {
        if d.is_zero() {
            return Err(Error::InvalidConfig(format!("{what} must be above zero")));
        }
    }
    let marked = check_before_open(location).await?;
    let inbox = InboxOptions::new([control])
        .touch_poll_interval(options.inbox_touch_poll)
        .interval(options.inbox_interval)
        .record_retention(options.request_retention);
    let wal_object_store = options.base.wal_object_store.clone();
    let mut base = options.base;
    if let Some(d) = options.dead_retention {
        base.default_queue_config.dead_retention = Some(d);
        for config in base.queue_configs.values_mut() {
            config.dead_retention = Some(d);
        }
    }
    let open = base
        .in_process_garbage_collector(false)
        .inbox(inbox)
        .liveness_heartbeat(options.liveness_heartbeat)
        .flush_interval(options.flush_interval);
    let queue =
        Queue::open_with_options(location.object_store.clone(), &location.path, open).await?;
    if !marked {
        let marker = StoreMarker {
            format: STORE_FORMAT,
            written_by: env!("CARGO_PKG_VERSION").to_string(),
        };
        let bytes = rmp_serde::to_vec_named(&marker).map_err(|e| Error::CorruptRecord {
            key: "wm/store".into(),
            reason: e.to_string(),
        })?;
        queue.kv_put(MARKER_KEY, &bytes).await?;
    }
    let queue = Arc::new(queue);
    crate::gc::spawn(
        crate::gc::GcTarget {
            object_store: location.object_store.clone(),
            path: location.path.clone(),
            wal_object_store,
        },
        &queue,
        options.gc_interval,
    );
    Ok(queue)
}

/// Check the store at `location` through a reader (which never fences):
/// `Ok(true)` when it carries a compatible marker, `Ok(false)` when it is
/// empty or holds Waymark keys written before the marker existed.
async fn check_before_open(location: &StoreLocation) -> Result<bool, Error> {
    let options = taquba::ReaderOptions::default().mode(ReaderMode::FollowLatest);
    let reader = match QueueReader::open_with_options(
        location.object_store.clone(),
        &location.path,
        options,
    )
    .await
    {
        Ok(reader) => reader,
        Err(taquba::Error::StoreNotInitialized { .. }) => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    let view = reader.view();
    let checked = match check_marker(view, location).await {
        Ok(()) => Ok(true),
        Err(Error::NotAWaymarkStore { .. }) => match holds_foreign_data(view).await {
            Ok(false) => Ok(false),
            Ok(true) => Err(Error::NotAWaymarkStore {
                location: location.to_string(),
                reason: "it holds jobs or keys that Waymark did not write; \
                         use an empty location for Waymark"
                    .into(),
            }),
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    let _ = reader.close().await;
    checked
}

/// Whether the store holds jobs or KV entries and no Waymark key.
async fn holds_foreign_data(view: &QueueView) -> Result<bool, Error> {
    let ours = view
        .kv_scan(WAYMARK_PREFIX, .., KvOrder::Ascending, 1)
        .await?;
    if !ours.entries.is_empty() {
        return Ok(false);
    }
    let any_kv = view.kv_scan(b"", .., KvOrder::Ascending, 1).await?;
    Ok(!any_kv.entries.is_empty() || !view.list_queues().await?.is_empty())
}

/// Check the marker of the store `view` reads.
pub(crate) async fn check_marker(view: &QueueView, location: &StoreLocation) -> Result<(), Error> {
    let not_ours = |reason: String| Error::NotAWaymarkStore {
        location: location.to_string(),
        reason,
    };
    let Some(bytes) = view.kv_get(MARKER_KEY).await? else {
        return Err(not_ours(
            "the store has no Waymark marker (no Waymark worker has opened it)".into(),
        ));
    };
    let marker: StoreMarker = rmp_serde::from_slice(&bytes)
        .map_err(|e| not_ours(format!("its marker `wm/store` does not decode ({e})")))?;
    if marker.format != STORE_FORMAT {
        return Err(Error::IncompatibleStore {
            location: location.to_string(),
            found: marker.format,
            supported: STORE_FORMAT,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_a_store_and_a_path() {
        let loc = StoreLocation::from_url_with_env("memory:///wm/main", [("X", "y")]).unwrap();
        assert_eq!(loc.path(), "wm/main");
        assert_eq!(loc.inbox_path(), "wm/main-inbox");
        assert!(matches!(
            StoreLocation::from_url_with_env("memory:///", [("X", "y")]),
            Err(Error::InvalidConfig(_))
        ));
        assert!(StoreLocation::from_url_with_env("nope://x/y", [("X", "y")]).is_err());
        let dir = StoreLocation::from_url_with_env("some/dir", [("X", "y")]).unwrap();
        assert!(dir.path().ends_with("some/dir"), "{}", dir.path());
    }

    #[tokio::test]
    async fn dead_retention_applies_to_every_queue_of_the_store() {
        let location = StoreLocation::new(
            Arc::new(taquba::object_store::memory::InMemory::new()),
            "dead",
        );
        let day = Duration::from_secs(24 * 3600);
        let base = OpenOptions::default()
            .queue_config("mine", taquba::QueueConfig::default().dead_retention(day));
        let options = StoreOptions::default()
            .dead_retention(Duration::from_secs(90))
            .taquba_options(base);
        let queue = open_worker_store(&location, options).await.unwrap();
        for name in ["mine", DEFAULT_QUEUE_NAME, "workflow-steps-hooks"] {
            assert_eq!(
                queue.queue_config(name).dead_retention,
                Some(Duration::from_secs(90)),
                "{name}"
            );
        }
        drop(queue);

        // taquba counts it in u64 milliseconds: longer would wrap.
        let forever = StoreOptions::default().dead_retention(Duration::MAX);
        assert_eq!(
            forever.dead_retention,
            Some(Duration::from_millis(u64::MAX))
        );

        let refused = open_worker_store(
            &location,
            StoreOptions::default().dead_retention(Duration::ZERO),
        )
        .await;
        assert!(
            matches!(&refused, Err(Error::InvalidConfig(m)) if m.contains("dead_retention")),
            "{:?}",
            refused.err()
        );
    }
}
