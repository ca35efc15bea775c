//! Staged effects: application KV writes and enqueues a step stages while it
//! runs, committed in the settlement of the outcome it returns.
//!
//! A runner reaches them through [`Step::effects`](crate::Step::effects).
//! Every staging call is checked at once, so a runner learns of a mistake
//! where it made it:
//!
//! - a key under Waymark's reserved prefix `wm/` ([`RESERVED_KEY_PREFIX`]),
//!   and an enqueue to the runtime's own queues (`Q` and every `Q-…`:
//!   `Q-hooks`, `Q-control`, `Q-sched`, …) are [`Error::ReservedName`];
//! - an empty key, a key over [`MAX_EFFECT_KEY_BYTES`], a value over taquba's
//!   [`MAX_KV_VALUE_SIZE`](taquba::MAX_KV_VALUE_SIZE) and an enqueue payload
//!   over [`MAX_PAYLOAD_BYTES`] are [`Error::PayloadTooLarge`] (or
//!   [`Error::InvalidConfig`] for the empty key);
//! - a put and a delete of the same key are [`Error::ConflictingEffect`]
//!   (a second put of a key replaces the first; a second delete is one);
//! - staging after `run_step` returned is [`Error::EffectsClosed`].
//!
//! An enqueue's taquba options are checked by taquba when the settlement
//! commits: options it refuses (an invalid `id_override`, `signal_wait`
//! without `run_at`) fail the run with taquba's reason, as any settlement
//! the queue refuses for good does.
//!
//! The worker takes the staged effects when the runner returns and adds them
//! to the step's settlement when it commits the outcome the runner returned
//! (`Continue`, `ContinueAfter`, `WaitForSignal`, `Succeed`, `Fail`,
//! `Cancel`). They are discarded when the runner returns a [`StepError`]
//! (or panics), when the run was cancelled from outside while the step ran
//! (unless the runner then returned `Cancel` itself: a runner that answers
//! the cancel token with its own `Cancel` commits what it staged, a
//! compensation say, with it), and when the runtime fails the run instead of committing the outcome (an
//! oversize result or payload). [`StagedEffects::get`] reads committed state
//! only: never what this step staged, and never another step's write before
//! it is durable.
//!
//! [`StepError`]: crate::StepError

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};

use taquba::{EnqueueOptions, EnqueueRequest, Queue, QueueName, SettlementEffects};

use crate::error::Error;
use crate::pending::{PendingCommits, app_key};
use crate::record::MAX_PAYLOAD_BYTES;
use crate::sync::lock;

/// Keys with this prefix are Waymark's; a step may not stage them.
pub const RESERVED_KEY_PREFIX: &[u8] = b"wm/";

/// The longest key a step may stage, in bytes.
pub const MAX_EFFECT_KEY_BYTES: usize = 4 * 1024;

/// The effects one step stages, shared by the clones of its [`Step`](crate::Step).
#[derive(Clone)]
pub struct StagedEffects {
    inner: Arc<Shared>,
}

struct Shared {
    queue: Arc<Queue>,
    /// The store's application-key commits in flight, which `get` waits
    /// for.
    app_keys: Arc<PendingCommits>,
    /// The runtime's step queue `Q`: `Q` and `Q-…` are reserved.
    step_queue: String,
    staged: Mutex<Option<Staged>>,
}

/// What has been staged so far.
#[derive(Default)]
struct Staged {
    puts: HashMap<Vec<u8>, Vec<u8>>,
    deletes: HashSet<Vec<u8>>,
    enqueues: Vec<EnqueueRequest>,
}

impl fmt::Debug for StagedEffects {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let staged = lock(&self.inner.staged);
        let mut d = f.debug_struct("StagedEffects");
        match staged.as_ref() {
            Some(s) => d
                .field("puts", &s.puts.len())
                .field("deletes", &s.deletes.len())
                .field("enqueues", &s.enqueues.len()),
            None => d.field("closed", &true),
        };
        d.finish()
    }
}

impl StagedEffects {
    /// An empty, open handle for a step of the runtime whose step queue is
    /// `step_queue`.
    pub(crate) fn new(queue: Arc<Queue>, app_keys: Arc<PendingCommits>, step_queue: &str) -> Self {
        Self {
            inner: Arc::new(Shared {
                queue,
                app_keys,
                step_queue: step_queue.to_string(),
                staged: Mutex::new(Some(Staged::default())),
            }),
        }
    }

    /// Stage a write of `value` at `key` in the application KV namespace.
    pub fn put(&self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Result<(), Error> {
        let (key, value) = (key.into(), value.into());
        check_key(&key)?;
        if value.len() > taquba::MAX_KV_VALUE_SIZE {
            return Err(Error::PayloadTooLarge {
                what: "staged KV value",
                size: value.len(),
                max: taquba::MAX_KV_VALUE_SIZE,
            });
        }
        self.with_open(|staged| {
            if staged.deletes.contains(&key) {
                return Err(conflict(&key));
            }
            staged.puts.insert(key, value);
            Ok(())
        })
    }

    /// Stage a delete of `key` in the application KV namespace.
    pub fn delete(&self, key: impl Into<Vec<u8>>) -> Result<(), Error> {
        let key = key.into();
        check_key(&key)?;
        self.with_open(|staged| {
            if staged.puts.contains_key(&key) {
                return Err(conflict(&key));
            }
            staged.deletes.insert(key);
            Ok(())
        })
    }

    /// Stage an enqueue of `payload` on `queue` (any queue but the runtime's
    /// own), with taquba's `options` (`run_at`, `dedup_key`, `id_override`,
    /// headers, ...), honoured as by `Queue::enqueue_with`.
    pub fn enqueue(
        &self,
        queue: &str,
        payload: impl Into<Vec<u8>>,
        options: EnqueueOptions,
    ) -> Result<(), Error> {
        let payload = payload.into();
        if let Err(e) = QueueName::new(queue) {
            return Err(Error::InvalidConfig(format!(
                "cannot stage an enqueue to `{}`: {e}",
                queue.chars().take(160).collect::<String>()
            )));
        }
        let own = &self.inner.step_queue;
        if queue == own
            || queue
                .strip_prefix(own.as_str())
                .is_some_and(|r| r.starts_with('-'))
        {
            return Err(Error::ReservedName {
                what: "queue",
                name: queue.to_string(),
                reserved: format!("`{own}` and every `{own}-…` queue are the runtime's"),
            });
        }
        if payload.len() > MAX_PAYLOAD_BYTES {
            return Err(Error::PayloadTooLarge {
                what: "staged enqueue payload",
                size: payload.len(),
                max: MAX_PAYLOAD_BYTES,
            });
        }
        self.with_open(|staged| {
            staged.enqueues.push(EnqueueRequest {
                queue: queue.to_string(),
                payload,
                options,
            });
            Ok(())
        })
    }

    /// Read `key` from the application KV namespace as committed and
    /// durable: this step's staged effects are not visible until its
    /// settlement commits.
    ///
    /// Another step's settlement that wrote the key (in any runtime of this
    /// process on the same store) may be visible before its WAL flush
    /// returns, and a crash then would undo it. So after reading, `get`
    /// waits for the settlements writing `key` that are in flight (at most
    /// one flush interval, unless the store is slow): the value it returns
    /// is one no crash can take back. Writes the application makes through
    /// the queue itself (`Queue::kv_put` and the like) are not tracked.
    pub async fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Vec<u8>>, Error> {
        let key = key.as_ref();
        check_key(key)?;
        let value = self.inner.queue.view().kv_get(key).await?;
        self.inner.app_keys.settled(&app_key(key)).await;
        Ok(value.map(|v| v.to_vec()))
    }

    /// Close the handle and take what was staged: the worker's, when the
    /// runner returns. Staging afterwards fails with [`Error::EffectsClosed`].
    pub(crate) fn take(&self) -> SettlementEffects {
        let staged = lock(&self.inner.staged).take().unwrap_or_default();
        SettlementEffects {
            enqueues: staged.enqueues,
            kv_writes: staged.puts,
            kv_deletes: staged.deletes.into_iter().collect(),
            expiry_entries: Vec::new(),
        }
    }

    fn with_open(&self, f: impl FnOnce(&mut Staged) -> Result<(), Error>) -> Result<(), Error> {
        match lock(&self.inner.staged).as_mut() {
            Some(staged) => f(staged),
            None => Err(Error::EffectsClosed),
        }
    }
}

/// Add `staged` to `effects`: they name disjoint keys and queues (the
/// staged ones are checked against Waymark's reservations).
pub(crate) fn merge(
    mut effects: SettlementEffects,
    staged: SettlementEffects,
) -> SettlementEffects {
    effects.enqueues.extend(staged.enqueues);
    effects.kv_writes.extend(staged.kv_writes);
    effects.kv_deletes.extend(staged.kv_deletes);
    effects.expiry_entries.extend(staged.expiry_entries);
    effects
}

fn check_key(key: &[u8]) -> Result<(), Error> {
    if key.is_empty() {
        return Err(Error::InvalidConfig("a staged KV key is empty".into()));
    }
    if key.starts_with(RESERVED_KEY_PREFIX) {
        return Err(Error::ReservedName {
            what: "KV key",
            name: String::from_utf8_lossy(key).chars().take(160).collect(),
            reserved: "keys under `wm/` are the runtime's".into(),
        });
    }
    if key.len() > MAX_EFFECT_KEY_BYTES {
        return Err(Error::PayloadTooLarge {
            what: "staged KV key",
            size: key.len(),
            max: MAX_EFFECT_KEY_BYTES,
        });
    }
    Ok(())
}

fn conflict(key: &[u8]) -> Error {
    Error::ConflictingEffect(String::from_utf8_lossy(key).chars().take(160).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn handle() -> StagedEffects {
        let store = Arc::new(taquba::object_store::memory::InMemory::new());
        let queue = Arc::new(Queue::open(store, "t").await.unwrap());
        StagedEffects::new(queue, Default::default(), "steps")
    }

    #[tokio::test]
    async fn staging_checks_reservations_sizes_and_conflicts() {
        let fx = handle().await;
        assert!(matches!(
            fx.put("wm/steps/run/x", "v"),
            Err(Error::ReservedName { what: "KV key", .. })
        ));
        assert!(matches!(
            fx.delete("wm/store"),
            Err(Error::ReservedName { .. })
        ));
        for queue in ["steps", "steps-hooks", "steps-control", "steps-sched"] {
            assert!(
                matches!(
                    fx.enqueue(queue, "p", EnqueueOptions::default()),
                    Err(Error::ReservedName { what: "queue", .. })
                ),
                "{queue}"
            );
        }
        // A queue that only starts like the step queue is the user's.
        fx.enqueue("stepsister", "p", EnqueueOptions::default())
            .unwrap();
        assert!(matches!(
            fx.enqueue("bad/name", "p", EnqueueOptions::default()),
            Err(Error::InvalidConfig(_))
        ));
        assert!(matches!(
            fx.put("big", vec![0u8; taquba::MAX_KV_VALUE_SIZE + 1]),
            Err(Error::PayloadTooLarge {
                what: "staged KV value",
                ..
            })
        ));
        fx.put("max", vec![0u8; taquba::MAX_KV_VALUE_SIZE]).unwrap();
        assert!(matches!(
            fx.put(vec![b'k'; MAX_EFFECT_KEY_BYTES + 1], "v"),
            Err(Error::PayloadTooLarge { .. })
        ));
        assert!(matches!(fx.put("", "v"), Err(Error::InvalidConfig(_))));
        fx.put("a", "1").unwrap();
        fx.put("a", "2").unwrap();
        assert!(matches!(fx.delete("a"), Err(Error::ConflictingEffect(k)) if k == "a"));
        fx.delete("b").unwrap();
        fx.delete("b").unwrap();
        assert!(matches!(fx.put("b", "1"), Err(Error::ConflictingEffect(_))));
        let taken = fx.take();
        assert_eq!(taken.kv_writes.get(b"a".as_slice()), Some(&b"2".to_vec()));
        assert_eq!(taken.kv_deletes, vec![b"b".to_vec()]);
        assert_eq!(taken.enqueues.len(), 1);
        assert!(matches!(fx.put("c", "1"), Err(Error::EffectsClosed)));
        assert!(fx.take().kv_writes.is_empty());
    }
}
