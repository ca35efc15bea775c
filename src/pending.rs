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
//! The same map is the worker's store watchdog: SlateDB retries a failing
//! store without end, so a commit that has waited longer than the runtime's
//! `store_timeout` means the store is down, and the pool stops with
//! [`Error::StoreUnavailable`](crate::Error::StoreUnavailable) instead of
//! hanging.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use tokio::sync::watch;
use tokio::time::{Duration, Instant};

use crate::sync::lock;

/// The runs with commits in flight.
#[derive(Default)]
pub(crate) struct PendingCommits {
    runs: Mutex<HashMap<String, Pending>>,
    /// Step jobs this process enqueued that no one has claimed yet.
    own_jobs: Mutex<HashSet<String>>,
}

/// The most own jobs remembered; beyond it, jobs are admitted by a read.
const MAX_OWN_JOBS: usize = 1 << 18;

/// One run's commits in flight.
struct Pending {
    /// How many.
    count: usize,
    /// When the run last had none in flight.
    since: Instant,
    /// Closes when the last of them returns.
    done: watch::Sender<()>,
}

/// Held while a commit for one run is in flight.
pub(crate) struct PendingCommit<'a> {
    commits: &'a PendingCommits,
    run_id: String,
}

impl PendingCommits {
    /// Note a commit for `run_id` that is about to start; it counts until the
    /// returned guard drops.
    pub(crate) fn begin(&self, run_id: &str) -> PendingCommit<'_> {
        lock(&self.runs)
            .entry(run_id.to_string())
            .or_insert_with(|| Pending {
                count: 0,
                since: Instant::now(),
                done: watch::Sender::new(()),
            })
            .count += 1;
        PendingCommit {
            commits: self,
            run_id: run_id.to_string(),
        }
    }

    /// Wait until the commits for `run_id` in flight now have returned (and
    /// so are durable, or failed).
    pub(crate) async fn settled(&self, run_id: &str) {
        let mut closed = match lock(&self.runs).get(run_id) {
            Some(pending) => pending.done.subscribe(),
            None => return,
        };
        // Nothing is ever sent: `changed` returns when the sender drops.
        while closed.changed().await.is_ok() {}
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

    /// Whether this process enqueued the job (forgetting it: a job is
    /// claimed, or removed, once).
    pub(crate) fn take_own(&self, job_id: &str) -> bool {
        lock(&self.own_jobs).remove(job_id)
    }

    /// How long the longest-waiting run has had commits in flight.
    pub(crate) fn longest_wait(&self) -> Option<Duration> {
        lock(&self.runs)
            .values()
            .map(|pending| pending.since.elapsed())
            .max()
    }
}

impl Drop for PendingCommit<'_> {
    fn drop(&mut self) {
        let mut runs = lock(&self.commits.runs);
        if let Some(entry) = runs.get_mut(&self.run_id) {
            entry.count -= 1;
            if entry.count == 0 {
                runs.remove(&self.run_id);
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
        assert!(lock(&commits.runs).is_empty());
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
        assert_eq!(commits.longest_wait(), Some(Duration::from_secs(6)));
        drop(old);
        assert_eq!(commits.longest_wait(), Some(Duration::from_secs(1)));
        drop(new);
        assert_eq!(commits.longest_wait(), None);
    }
}
