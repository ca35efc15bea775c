//! Back-pressure from retention onto the step claims.
//!
//! Retention shares the process with the steps. When the process is short
//! of CPU (other processes on the machine, a burst of load), every task
//! slows, and the steps, dozens in flight against one retention task, take
//! most of what is left. Runs then end faster than their outcomes expire:
//! a soak with three compilers beside it saw the oldest outcome 150 s past
//! its expiry and rising, with four times the records retained, and nothing
//! made it stop.
//!
//! So retention reports after each pass how far it is behind (its **lag**:
//! how long the outcomes it has not yet deleted are past their expiry) and
//! how many it has deleted, this process counts the runs that end in it,
//! and the step pool adjusts how many steps it runs at once:
//!
//! - up to its **bound** behind, a tenth of `terminal_retention` and at
//!   least [`MIN_BOUND`], nothing changes (a lag is extra records kept: a
//!   tenth of the retention is a tenth more);
//! - past it, once per [`WINDOW`], the runs that ended in the window are
//!   compared with the outcomes retention deleted in it. More ended than
//!   were deleted: retention is falling further behind, and the limit
//!   halves (from the steps in flight, if fewer; down to one step). At
//!   least a tenth more deleted than ended: it is catching up, and the
//!   limit rises by a quarter of the pool's concurrency (up to all of it).
//!   In between, the limit holds;
//! - back under half the bound, the whole concurrency is restored. Between
//!   half the bound and the bound, a limit already cut keeps following the
//!   windows (restoring it at the bound itself would let the steps surge
//!   and push the lag straight back over it), and a full one stays full.
//!
//! Both counts are of the same window, so a change of the limit shows in
//! the next one. (The lag itself would answer late: it says when the runs
//! retention is deleting now ended, a whole retention and lag ago.)
//!
//! The steps already running finish; the pool claims no more until it is
//! under the limit. A retention that is far behind but catching up (a
//! store opened after a long stop, or a shorter `terminal_retention`)
//! slows nothing. The steps are slowed, never stopped, so a retention that
//! cannot make progress (a failing store) does not halt the pool; a pass
//! that fails reports nothing, and the limit stays where it was.
//!
//! Each change of the limit is logged; the lag itself is the
//! `waymark_retention_lag_seconds` gauge (`worker/metrics.rs`).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::sync::futures::Notified;

use crate::sync::lock;

/// The least lag that lets the pool's concurrency follow retention.
pub(crate) const MIN_BOUND: Duration = Duration::from_secs(60);

/// How often, past the bound, the counts are compared and the limit moved.
pub(crate) const WINDOW: Duration = Duration::from_secs(10);

/// Retention's progress and the claim limit it sets, shared by the
/// retention pass (which reports), the runs that end (which are counted)
/// and the step claim loop (which reads the limit).
pub(crate) struct Backpressure {
    concurrency: usize,
    /// The lag (ms) up to which nothing changes.
    bound: u64,
    /// The claim limit, read by the claim loop on every turn; written under
    /// `state`'s lock (and by the test hook `pin`).
    limit: AtomicUsize,
    state: std::sync::Mutex<State>,
    changed: Notify,
    /// Runs ended in this process.
    ended: AtomicU64,
    /// The steps the claim loop last saw in flight.
    in_flight: AtomicUsize,
    /// The most steps it saw in flight since the last window ended: a
    /// falling-behind window halves from this, not from a snapshot taken
    /// at a pause between bursts.
    peak_in_flight: AtomicUsize,
    /// Test hook: the limit stays where a test set it.
    #[cfg(test)]
    pinned: std::sync::atomic::AtomicBool,
}

struct State {
    /// Where the current window started.
    window: Option<Mark>,
}

/// The counts at the start of a window.
#[derive(Clone, Copy)]
struct Mark {
    at: u64,
    ended: u64,
    deleted: u64,
}

/// What one window says of retention.
#[derive(Debug, PartialEq, Eq)]
enum Progress {
    FallingBehind,
    Holding,
    CatchingUp,
}

impl Backpressure {
    /// Back-pressure on a pool that runs `concurrency` steps at once and
    /// keeps outcomes for `retention`; when `on` is false, the limit is
    /// always `concurrency`.
    pub(crate) fn new(concurrency: usize, retention: Duration, on: bool) -> Self {
        let bound = if on {
            (retention / 10).max(MIN_BOUND)
        } else {
            Duration::MAX
        };
        Self {
            concurrency,
            bound: u64::try_from(bound.as_millis()).unwrap_or(u64::MAX),
            limit: AtomicUsize::new(concurrency),
            state: std::sync::Mutex::new(State { window: None }),
            changed: Notify::new(),
            ended: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            peak_in_flight: AtomicUsize::new(0),
            #[cfg(test)]
            pinned: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Count a run that ended in this process.
    pub(crate) fn run_ended(&self) {
        self.ended.fetch_add(1, Ordering::Relaxed);
    }

    /// Record a retention pass that ended at `now` (ms): its lag (ms: how
    /// far the outcomes it left are past their expiry, 0 when it left none
    /// due) and the outcomes deleted by this process's retention so far.
    pub(crate) fn report(&self, lag_ms: u64, deleted: u64, now: u64) {
        #[cfg(test)]
        if self.pinned.load(Ordering::Relaxed) {
            return;
        }
        let mark = Mark {
            at: now,
            ended: self.ended.load(Ordering::Relaxed),
            deleted,
        };
        let (before, after) = {
            let mut state = lock(&self.state);
            let before = self.limit.load(Ordering::Relaxed);
            let mut limit = before;
            let restore =
                lag_ms <= self.bound / 2 || (lag_ms <= self.bound && before >= self.concurrency);
            match state.window {
                _ if restore => {
                    limit = self.concurrency;
                    state.window = None;
                }
                None => state.window = Some(mark),
                Some(start) if now.saturating_sub(start.at) < WINDOW.as_millis() as u64 => {}
                Some(start) => {
                    let ended = mark.ended.saturating_sub(start.ended);
                    let deleted = mark.deleted.saturating_sub(start.deleted);
                    limit = match progress(ended, deleted) {
                        Progress::FallingBehind => {
                            // Halving a limit the pool does not reach would
                            // hold nothing back.
                            let running = self
                                .peak_in_flight
                                .load(Ordering::Relaxed)
                                .max(self.in_flight.load(Ordering::Relaxed))
                                .max(1);
                            (limit.min(running) / 2).max(1)
                        }
                        Progress::Holding => limit,
                        Progress::CatchingUp => limit
                            .saturating_add(self.concurrency.div_ceil(4))
                            .min(self.concurrency),
                    };
                    state.window = Some(mark);
                    self.peak_in_flight.store(0, Ordering::Relaxed);
                }
            }
            self.limit.store(limit, Ordering::Release);
            (before, limit)
        };
        if before == after {
            return;
        }
        if after < before {
            tracing::warn!(
                lag_s = lag_ms / 1000,
                steps_at_once = after,
                "retention is falling behind the runs that end; the pool runs fewer steps at once"
            );
        } else {
            tracing::info!(
                lag_s = lag_ms / 1000,
                steps_at_once = after,
                "retention is catching up; the pool runs more steps at once"
            );
        }
        self.changed.notify_waiters();
    }

    /// How many steps the pool may run at once now.
    pub(crate) fn claim_limit(&self) -> usize {
        self.limit.load(Ordering::Acquire)
    }

    /// Resolves at the next change of the limit after this call (taken
    /// before the limit is read, a change between the two is not missed).
    pub(crate) fn changed(&self) -> Notified<'_> {
        self.changed.notified()
    }

    /// The claim loop's count of the steps in flight.
    pub(crate) fn note_in_flight(&self, steps: usize) {
        self.in_flight.store(steps, Ordering::Relaxed);
        self.peak_in_flight.fetch_max(steps, Ordering::Relaxed);
    }

    /// Test hook: set the limit and ignore retention's reports.
    #[cfg(test)]
    pub(crate) fn pin(&self, limit: usize) {
        self.pinned.store(true, Ordering::Relaxed);
        self.limit.store(limit, Ordering::Release);
        self.changed.notify_waiters();
    }
}

/// What a window in which `ended` runs ended and retention deleted
/// `deleted` outcomes says.
fn progress(ended: u64, deleted: u64) -> Progress {
    if ended > deleted {
        Progress::FallingBehind
    } else if deleted.saturating_mul(10) >= ended.saturating_mul(11) {
        Progress::CatchingUp
    } else {
        Progress::Holding
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1000;
    const MINUTE: Duration = Duration::from_secs(60);

    /// A pool of `concurrency`, all in flight, a minute's retention, with
    /// `ended` runs ended so far.
    fn pool(concurrency: usize) -> Backpressure {
        let bp = Backpressure::new(concurrency, MINUTE, true);
        bp.note_in_flight(concurrency);
        bp
    }

    fn end(bp: &Backpressure, runs: u64) {
        for _ in 0..runs {
            bp.run_ended();
        }
    }

    #[test]
    fn a_window_compares_the_runs_ended_with_the_outcomes_deleted() {
        assert_eq!(progress(100, 99), Progress::FallingBehind);
        assert_eq!(progress(100, 100), Progress::Holding);
        assert_eq!(progress(100, 109), Progress::Holding);
        assert_eq!(progress(100, 110), Progress::CatchingUp);
        assert_eq!(progress(0, 0), Progress::CatchingUp, "nothing ends");
        assert_eq!(progress(u64::MAX, u64::MAX), Progress::CatchingUp);
    }

    #[test]
    fn the_bound_is_a_tenth_of_the_retention_and_at_least_a_minute() {
        assert_eq!(Backpressure::new(8, MINUTE, true).bound, 60 * S);
        let week = Duration::from_secs(7 * 86_400);
        assert_eq!(Backpressure::new(8, week, true).bound, 7 * 8_640 * S);
        assert_eq!(Backpressure::new(8, Duration::MAX, true).bound, u64::MAX);
        // A week's retention: an hour behind, falling behind, is under it.
        let bp = Backpressure::new(8, week, true);
        bp.note_in_flight(8);
        bp.report(3_600 * S, 0, 0);
        end(&bp, 100);
        bp.report(3_610 * S, 10, 10 * S);
        assert_eq!(bp.claim_limit(), 8);
    }

    #[test]
    fn turned_off_it_never_lowers_the_limit() {
        let bp = Backpressure::new(8, MINUTE, false);
        bp.note_in_flight(8);
        for i in 0..5 {
            end(&bp, 100);
            bp.report((90 + i * 100) * S, 0, i * 10 * S);
            assert_eq!(bp.claim_limit(), 8);
        }
    }

    #[test]
    fn past_the_bound_the_limit_moves_once_a_window() {
        let bp = pool(8);
        let t0 = 1_000_000;
        bp.report(90 * S, 0, t0);
        assert_eq!(bp.claim_limit(), 8, "a window starts");
        end(&bp, 100);
        bp.report(95 * S, 10, t0 + 5 * S);
        assert_eq!(bp.claim_limit(), 8, "within the window");
        bp.report(100 * S, 50, t0 + 10 * S);
        assert_eq!(bp.claim_limit(), 4, "100 ended, 50 deleted: halved");
        end(&bp, 100);
        bp.report(110 * S, 100, t0 + 20 * S);
        assert_eq!(bp.claim_limit(), 2, "100 ended, 50 deleted");
        end(&bp, 1);
        bp.report(110 * S, 100, t0 + 30 * S);
        assert_eq!(bp.claim_limit(), 1, "never below one step");
        end(&bp, 100);
        bp.report(115 * S, 205, t0 + 40 * S);
        assert_eq!(bp.claim_limit(), 1, "100 ended, 105 deleted: holds");
        end(&bp, 100);
        bp.report(105 * S, 320, t0 + 50 * S);
        assert_eq!(
            bp.claim_limit(),
            3,
            "100 ended, 115 deleted: up a quarter of 8"
        );
        bp.report(30 * S, 400, t0 + 51 * S);
        assert_eq!(bp.claim_limit(), 8, "under the bound: all of it at once");
    }

    #[test]
    fn a_cut_limit_comes_back_whole_only_under_half_the_bound() {
        let bp = pool(8);
        bp.report(90 * S, 0, 0);
        end(&bp, 100);
        bp.report(100 * S, 0, 10 * S);
        assert_eq!(bp.claim_limit(), 4);
        end(&bp, 100);
        bp.report(45 * S, 100, 20 * S);
        assert_eq!(bp.claim_limit(), 4, "under the bound, over half: holds");
        end(&bp, 100);
        bp.report(40 * S, 300, 30 * S);
        assert_eq!(bp.claim_limit(), 6, "catching up: up a quarter");
        bp.report(30 * S, 300, 31 * S);
        assert_eq!(bp.claim_limit(), 8, "half the bound: all of it");
        // A full limit between half the bound and the bound stays full.
        end(&bp, 100);
        bp.report(50 * S, 300, 41 * S);
        end(&bp, 100);
        bp.report(55 * S, 300, 51 * S);
        assert_eq!(bp.claim_limit(), 8);
    }

    #[test]
    fn halving_starts_from_the_most_steps_in_flight_in_the_window() {
        let bp = Backpressure::new(100, MINUTE, true);
        bp.note_in_flight(40);
        bp.note_in_flight(0);
        bp.report(90 * S, 0, 0);
        end(&bp, 100);
        bp.report(100 * S, 0, 10 * S);
        assert_eq!(bp.claim_limit(), 20, "40 at the peak, none at the end");
        bp.note_in_flight(6);
        end(&bp, 100);
        bp.report(110 * S, 0, 20 * S);
        assert_eq!(bp.claim_limit(), 3, "the peak is the window's own");
    }

    #[test]
    fn halving_starts_from_the_steps_in_flight_when_they_are_fewer() {
        let bp = Backpressure::new(1000, MINUTE, true);
        bp.note_in_flight(40);
        bp.report(90 * S, 0, 0);
        end(&bp, 100);
        bp.report(100 * S, 0, 10 * S);
        assert_eq!(bp.claim_limit(), 20);
    }

    #[test]
    fn a_lag_far_past_the_bound_that_retention_works_off_slows_nothing() {
        let bp = pool(8);
        for i in 0..10 {
            // Six days behind, deleting a thousand outcomes a window while
            // a hundred runs end.
            end(&bp, 100);
            bp.report((6 * 86_400 - i * 50) * S, i * 1000, i * 10 * S);
            assert_eq!(bp.claim_limit(), 8);
        }
    }

    #[tokio::test]
    async fn a_change_of_the_limit_after_changed_was_taken_is_seen() {
        let bp = pool(8);
        // Taken, not yet polled, as the claim loop takes it before it reads
        // the limit.
        let changed = bp.changed();
        bp.report(90 * S, 0, 0);
        end(&bp, 10);
        bp.report(100 * S, 0, 10 * S);
        tokio::time::timeout(Duration::from_secs(10), changed)
            .await
            .expect("the change was seen");
        assert_eq!(bp.claim_limit(), 4);
    }
}
