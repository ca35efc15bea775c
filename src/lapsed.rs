//! Step claims this process let go of without a settlement: the claims whose
//! job the queue may dead-letter by itself.
//!
//! taquba dead-letters a job by itself only when a claim's lease runs out on
//! the job's last attempt: its reaper does so for the claims this process
//! took, and its open does so for the claims a dead process left. Waymark
//! settles every claim it runs in the transaction that ends it, so a job
//! dead-lettered by the queue is a run nobody ended: the pool reconciles it
//! (ends its run `Failed`, `TimedOut` or `Cancelled`).
//!
//! Finding those jobs by listing the dead letters costs a read of every dead
//! job, and dead jobs stay listed for the queue's dead retention (7 days by
//! default): a soak listed thousands a second, more every hour. The pool
//! lists them once when it starts (a dead process's claims, dead-lettered at
//! open) and otherwise only rarely; the claims this process lets go are
//! watched here instead. A claim is watched when
//!
//! - its lease could not be renewed (the claim was lost to the reaper, or a
//!   cancel was requested, after which the lease is not extended), or
//! - the work on it ended without a settlement that committed (a store
//!   failure, a settlement the queue refused, a step left claimed on
//!   purpose).
//!
//! Each watched claim costs one read of its job once its lease can have run
//! out ([`SLACK`] past its duration), and one more every [`RECHECK`] while
//! the same claim still holds it. The set is bounded: past [`MAX_WATCHED`]
//! claims a new one is not kept and the set reports an overflow, on which
//! the pool lists the dead letters in full again, at once and once more
//! when the claim left out can have been dead-lettered.
//!
//! An entry leaves the set only once its read is done ([`LapsedClaims::due`]
//! then [`LapsedClaims::looked`]): a read abandoned at shutdown leaves it.
//!
//! This module imports no other module of the crate.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use crate::sync::lock;

/// The most claims watched at once.
pub(crate) const MAX_WATCHED: usize = 4096;

/// How long after its lease's duration a claim let go of is first read:
/// taquba renews a lease to its duration plus a settlement margin (5 s), and
/// its reaper looks for lapsed leases every `reaper_interval` (5 s by
/// default). A reaper set slower only costs a [`RECHECK`] or more.
pub(crate) const SLACK: Duration = Duration::from_secs(10);

/// How soon a claim found still held (its lease not yet reaped) is read
/// again.
pub(crate) const RECHECK: Duration = Duration::from_secs(5);

/// The claims watched, by job id.
#[derive(Default)]
pub(crate) struct LapsedClaims {
    watched: Mutex<Watched>,
}

#[derive(Default)]
struct Watched {
    claims: HashMap<String, Watch>,
    /// A claim was not kept because the set was full.
    overflowed: bool,
}

/// One watched claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Watch {
    /// The job's attempt count under the claim: a job record with more
    /// attempts was claimed again, and that claim is watched on its own.
    pub attempts: u32,
    /// When to read the job (ms, the queue's clock).
    pub due_ms: u64,
}

impl LapsedClaims {
    /// Watch the claim of `job_id` at attempt `attempts`, to be read at
    /// `due_ms`. A claim already watched keeps the later attempt and the
    /// earlier time.
    pub(crate) fn watch(&self, job_id: &str, attempts: u32, due_ms: u64) {
        let mut watched = lock(&self.watched);
        if let Some(w) = watched.claims.get_mut(job_id) {
            w.attempts = w.attempts.max(attempts);
            w.due_ms = w.due_ms.min(due_ms);
            return;
        }
        if watched.claims.len() >= MAX_WATCHED {
            watched.overflowed = true;
            return;
        }
        watched
            .claims
            .insert(job_id.to_string(), Watch { attempts, due_ms });
    }

    /// Up to `max` claims due at `now_ms`, earliest first. They stay
    /// watched until [`Self::looked`] says what their read found.
    pub(crate) fn due(&self, now_ms: u64, max: usize) -> Vec<(String, Watch)> {
        let watched = lock(&self.watched);
        let mut due: Vec<(String, Watch)> = watched
            .claims
            .iter()
            .filter(|(_, w)| w.due_ms <= now_ms)
            .map(|(id, w)| (id.clone(), *w))
            .collect();
        due.sort_by_key(|(_, w)| w.due_ms);
        due.truncate(max);
        due
    }

    /// The read of `job_id`, watched as `seen`, is done: forget it (`None`),
    /// or read it again at `again` (ms). A watch that changed since `seen`
    /// (the claim was watched again meanwhile) is left as it is.
    pub(crate) fn looked(&self, job_id: &str, seen: Watch, again: Option<u64>) {
        let mut watched = lock(&self.watched);
        if watched.claims.get(job_id) != Some(&seen) {
            return;
        }
        match again {
            None => {
                watched.claims.remove(job_id);
            }
            Some(due_ms) => {
                if let Some(w) = watched.claims.get_mut(job_id) {
                    w.due_ms = due_ms;
                }
            }
        }
    }

    /// Whether a claim went unwatched since the last call (the set was
    /// full); clears the mark.
    pub(crate) fn take_overflow(&self) -> bool {
        std::mem::take(&mut lock(&self.watched).overflowed)
    }

    /// How many claims are watched.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        lock(&self.watched).claims.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_is_due_earliest_first_and_stays_until_it_was_looked_at() {
        let lapsed = LapsedClaims::default();
        lapsed.watch("b", 1, 20);
        lapsed.watch("a", 1, 10);
        lapsed.watch("c", 1, 30);
        assert!(lapsed.due(5, 10).is_empty());
        let due = lapsed.due(25, 10);
        let ids: Vec<&str> = due.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(lapsed.due(25, 1).len(), 1, "at most `max`");
        assert_eq!(lapsed.len(), 3, "a read not done keeps its claim");
        lapsed.looked("a", due[0].1, None);
        lapsed.looked("b", due[1].1, Some(40));
        assert_eq!(lapsed.len(), 2);
        assert!(lapsed.due(39, 10).iter().all(|(id, _)| id == "c"));
        assert_eq!(lapsed.due(40, 10).len(), 2, "b again, with c");
    }

    #[test]
    fn a_claim_watched_again_during_its_read_is_kept() {
        let lapsed = LapsedClaims::default();
        lapsed.watch("a", 1, 10);
        let due = lapsed.due(10, 10);
        lapsed.watch("a", 2, 50);
        lapsed.looked("a", due[0].1, None);
        assert_eq!(lapsed.len(), 1, "its new claim is watched");
    }

    #[test]
    fn a_claim_watched_twice_keeps_the_later_attempt_and_the_earlier_time() {
        let lapsed = LapsedClaims::default();
        lapsed.watch("a", 1, 50);
        lapsed.watch("a", 2, 70);
        lapsed.watch("a", 1, 40);
        let due = lapsed.due(40, 10);
        assert_eq!(
            due,
            [(
                "a".to_string(),
                Watch {
                    attempts: 2,
                    due_ms: 40
                }
            )]
        );
    }

    #[test]
    fn a_full_set_reports_the_claims_it_did_not_keep() {
        let lapsed = LapsedClaims::default();
        for i in 0..MAX_WATCHED {
            lapsed.watch(&format!("j{i}"), 1, 0);
        }
        assert!(!lapsed.take_overflow());
        lapsed.watch("j0", 1, 0);
        assert!(!lapsed.take_overflow(), "one already watched is not new");
        lapsed.watch("one-more", 1, 0);
        assert!(lapsed.take_overflow());
        assert!(!lapsed.take_overflow(), "the mark is cleared");
        assert_eq!(lapsed.len(), MAX_WATCHED);
    }
}
