//! Commits in flight, per run: a guard against acting on state that is
//! visible but not yet durable.
//!
//! taquba applies a commit to its in-memory state before the WAL flush makes
//! it durable, and its claims read that state. So a job enqueued by a commit
//! that is still waiting for its flush can already be claimed by this
//! process. Running it then would act on a transition a crash could still
//! undo: step n+1 would run although step n's settlement is lost and step n
//! runs again, and a hook would be told of a termination that never happened.
//!
//! Every commit that makes a run's next job claimable (submit, a step's
//! settlement, cancel, reconciliation) holds a [`PendingCommit`] for the run
//! until the commit returns, and the worker waits for the run's pending
//! commits before it acts on a claimed step or hook job. The service calls
//! (`submit`, `status`, `outcome`, `wait`, `cancel`) answer by the same rule:
//! each read waits, after reading, for the run's commits in flight, so no
//! answer rests on a commit a crash could still undo. Another process
//! cannot see the state early (it reads only what is durable), so this
//! process-local map is enough. Its cost is a map insert and remove per
//! commit; the waiting itself costs latency only when a claim races a flush.
//!
//! It also remembers the step jobs this process's commits enqueued, until
//! they are claimed: such a job is known to be the one its run record points
//! at, so admitting it needs no read of the record. Jobs from before a
//! restart, or from other writers, are checked against the record.
//!
//! Application KV keys (what a step stages, see [`crate::effects`]) are
//! tracked the same way, in a map of their own keyed by [`app_key`]: a
//! settlement that writes or deletes one holds a guard for it, and
//! [`StagedEffects::get`](crate::StagedEffects::get) waits, after reading,
//! for the key's commits in flight. That namespace is the store's, not one
//! runtime's: runtimes on one [`Queue`] (a second `queue_name` for priority
//! runs) share the map ([`app_keys_of`]).
//!
//! The same map is the worker's store watchdog: SlateDB retries a failing
//! store without end, so a commit that has waited longer than the runtime's
//! `store_timeout` means the store is down, and the pool stops with
//! [`Error::StoreUnavailable`](crate::Error::StoreUnavailable) instead of
//! hanging.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};

use taquba::Queue;
use tokio::sync::watch;
use tokio::time::{Duration, Instant};

use crate::sync::lock;

/// The name commits that write or delete the application KV key `key` are
/// tracked under in the store's app-key map. A key that is not UTF-8 is
/// named lossily, so two such keys may share a name, which only makes a
/// read wait for the other's commit too.
pub(crate) fn app_key(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}

/// The app-key map of every store open in this process, by its queue.
static APP_KEYS: Mutex<Vec<(Weak<Queue>, Arc<PendingCommits>)>> = Mutex::new(Vec::new());

/// The map of application-key commits in flight on `queue`'s store, shared
/// by every runtime built on that queue (maps of dropped queues are
/// forgotten here).
pub(crate) fn app_keys_of(queue: &Arc<Queue>) -> Arc<PendingCommits> {
    let mut stores = lock(&APP_KEYS);
    stores.retain(|(q, _)| q.strong_count() > 0);
    let found = stores
        .iter()
        .find(|(q, _)| std::ptr::eq(q.as_ptr(), Arc::as_ptr(queue)));
    match found {
        Some((_, keys)) => keys.clone(),
        None => {
            let keys = Arc::new(PendingCommits::default());
            stores.push((Arc::downgrade(queue), keys.clone()));
            keys
        }
    }
}

/// The runs (or, in a store's app-key map, the application keys) with
/// commits in flight.
#[derive(Default)]
pub(crate) struct PendingCommits {
    runs: Mutex<Runs>,
    /// Step jobs this process enqueued that no one has claimed yet.
    own_jobs: Mutex<HashSet<String>>,
}

/// The commits in flight, by run, and the next commit's sequence number.
#[derive(Default)]
struct Runs {
    by_run: HashMap<String, Pending>,
    next: u64,
}

/// The most own jobs remembered; beyond it, jobs are admitted by a read.
const MAX_OWN_JOBS: usize = 1 << 18;

/// One run's commits in flight.
///
/// Each commit is tracked on its own, by a sequence number given under the
/// lock (so the first entry is also the oldest): a run (or a name the
/// watchdog watches) whose commits overlap without pause is not one long
/// wait, and a caller waits only for the commits in flight when it asked.
struct Pending {
    /// Sequence number → when that commit began.
    started: BTreeMap<u64, Instant>,
    /// Ticks when one of them returns; dropped when the last one does.
    returned: watch::Sender<()>,
}

/// Held while a commit for one run is in flight.
pub(crate) struct PendingCommit<'a> {
    commits: &'a PendingCommits,
    /// Borrowed on the step path; owned where the guard outlives the name.
    run_id: Cow<'a, str>,
    seq: u64,
}

impl PendingCommits {
    /// Note a commit for `run_id` that is about to start; it counts until the
    /// returned guard drops.
    pub(crate) fn begin<'a>(&'a self, run_id: impl Into<Cow<'a, str>>) -> PendingCommit<'a> {
        let run_id = run_id.into();
        let mut runs = lock(&self.runs);
        let seq = runs.next;
        runs.next = runs.next.wrapping_add(1);
        let now = Instant::now();
        match runs.by_run.get_mut(run_id.as_ref()) {
            Some(pending) => {
                pending.started.insert(seq, now);
            }
            None => {
                let pending = Pending {
                    started: BTreeMap::from([(seq, now)]),
                    returned: watch::Sender::new(()),
                };
                runs.by_run.insert(run_id.to_string(), pending);
            }
        }
        PendingCommit {
            commits: self,
            run_id,
            seq,
        }
    }

    /// Wait until the commits for `run_id` in flight now have returned (and
    /// so are durable, or failed). Commits that begin meanwhile are not
    /// waited for.
    pub(crate) async fn settled(&self, run_id: &str) {
        let (mut returned, last) = {
            let runs = lock(&self.runs);
            match runs.by_run.get(run_id) {
                Some(pending) => (
                    pending.returned.subscribe(),
                    pending.started.keys().next_back().copied(),
                ),
                None => return,
            }
        };
        let Some(last) = last else { return };
        // An error means the sender dropped: every commit then in flight
        // has returned.
        while returned.changed().await.is_ok() {
            let runs = lock(&self.runs);
            let oldest = runs
                .by_run
                .get(run_id)
                .and_then(|pending| pending.started.keys().next().copied());
            if oldest.is_none_or(|oldest| oldest > last) {
                return;
            }
        }
    }

    /// Remember step jobs a commit of this process enqueued.
    pub(crate) fn enqueued<'a>(&self, job_ids: impl IntoIterator<Item = &'a str>) {
        let mut own = lock(&self.own_jobs);
        for id in job_ids {
            if own.len() < MAX_OWN_JOBS {
                own.insert(id.to_string());
            }
        }
    }

    /// How many enqueued jobs are remembered.
    #[cfg(test)]
    pub(crate) fn own_len(&self) -> usize {
        lock(&self.own_jobs).len()
    }

    /// Whether this process enqueued the job (forgetting it: a job is
    /// claimed, or removed, once).
    pub(crate) fn take_own(&self, job_id: &str) -> bool {
        lock(&self.own_jobs).remove(job_id)
    }

    /// The commit in flight the longest: its run (or watched name) and how
    /// long it has waited.
    pub(crate) fn longest_wait(&self) -> Option<(String, Duration)> {
        lock(&self.runs)
            .by_run
            .iter()
            .filter_map(|(run, pending)| {
                let began = pending.started.values().next()?;
                Some((run.clone(), began.elapsed()))
            })
            .max_by_key(|(_, waited)| *waited)
    }
}

impl Drop for PendingCommit<'_> {
    fn drop(&mut self) {
        let mut runs = lock(&self.commits.runs);
        if let Some(entry) = runs.by_run.get_mut(self.run_id.as_ref()) {
            entry.started.remove(&self.seq);
            if entry.started.is_empty() {
                runs.by_run.remove(self.run_id.as_ref());
            } else {
                entry.returned.send_replace(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn settled_waits_for_every_commit_in_flight() {
        let commits = PendingCommits::default();
        // Nothing in flight: returns at once.
        commits.settled("r").await;

        let first = commits.begin("r");
        let second = commits.begin("r");
        let other = commits.begin("other");
        let wait = commits.settled("r");
        tokio::pin!(wait);
        assert!(
            tokio::time::timeout(Duration::from_millis(10), &mut wait)
                .await
                .is_err(),
            "two commits in flight"
        );
        drop(first);
        assert!(
            tokio::time::timeout(Duration::from_millis(10), &mut wait)
                .await
                .is_err(),
            "one commit still in flight"
        );
        drop(second);
        // Another run's commit does not hold this one up.
        tokio::time::timeout(Duration::from_millis(10), &mut wait)
            .await
            .expect("all of r's commits returned");
        drop(other);
        assert!(lock(&commits.runs).by_run.is_empty());
    }

    /// Runtimes on one queue share the app-key map (a read through one
    /// waits for a commit in flight through the other); another store's is
    /// another map.
    #[tokio::test]
    async fn runtimes_on_one_store_share_its_app_key_map() {
        let open = || async {
            let store = Arc::new(taquba::object_store::memory::InMemory::new());
            Arc::new(Queue::open(store, "s").await.expect("open"))
        };
        let (a, b) = (open().await, open().await);
        let (writer, reader, other) = (app_keys_of(&a), app_keys_of(&a.clone()), app_keys_of(&b));
        assert!(Arc::ptr_eq(&writer, &reader));
        assert!(!Arc::ptr_eq(&writer, &other));
        let in_flight = writer.begin(app_key(b"app/k"));
        let name = app_key(b"app/k");
        let read = reader.settled(&name);
        tokio::pin!(read);
        assert!(
            tokio::time::timeout(Duration::from_millis(10), &mut read)
                .await
                .is_err(),
            "a commit of the key is in flight on the store"
        );
        other.settled(&name).await;
        drop(in_flight);
        read.await;
    }

    #[test]
    fn own_jobs_are_taken_once() {
        let commits = PendingCommits::default();
        commits.enqueued(["a", "b"]);
        assert!(commits.take_own("a"));
        assert!(!commits.take_own("a"));
        assert!(!commits.take_own("c"));
        assert!(commits.take_own("b"));
    }

    #[tokio::test(start_paused = true)]
    async fn longest_wait_is_the_oldest_run_in_flight() {
        let commits = PendingCommits::default();
        assert_eq!(commits.longest_wait(), None);
        let old = commits.begin("old");
        tokio::time::advance(Duration::from_secs(5)).await;
        let new = commits.begin("new");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            commits.longest_wait(),
            Some(("old".to_string(), Duration::from_secs(6)))
        );
        drop(old);
        assert_eq!(
            commits.longest_wait(),
            Some(("new".to_string(), Duration::from_secs(1)))
        );
        drop(new);
        assert_eq!(commits.longest_wait(), None);
    }

    /// Regression: a name whose commits overlap without pause (the
    /// watchdog's maintenance or release calls under load, a busy run) was
    /// one wait growing from the first commit, so the watchdog stopped a
    /// healthy pool after `store_timeout`, and `settled` waited for commits
    /// that began after it was called.
    #[tokio::test(start_paused = true)]
    async fn overlapping_commits_are_waits_of_their_own() {
        let commits = PendingCommits::default();
        let mut held = commits.begin("busy");
        for _ in 0..100 {
            tokio::time::advance(Duration::from_millis(500)).await;
            let next = commits.begin("busy");
            tokio::time::advance(Duration::from_millis(500)).await;
            // Each commit takes 1 s; there is always one in flight.
            drop(std::mem::replace(&mut held, next));
            let (_, waited) = commits.longest_wait().expect("one in flight");
            assert!(waited <= Duration::from_millis(500), "{waited:?}");
        }
        // A caller waits for what is in flight when it asks, not for later.
        let wait = commits.settled("busy");
        tokio::pin!(wait);
        assert!(
            tokio::time::timeout(Duration::from_millis(10), &mut wait)
                .await
                .is_err(),
            "the held commit is in flight"
        );
        let later = commits.begin("busy");
        drop(held);
        tokio::time::timeout(Duration::from_millis(10), &mut wait)
            .await
            .expect("the commit in flight at the call returned; a later one does not count");
        drop(later);
    }
}
