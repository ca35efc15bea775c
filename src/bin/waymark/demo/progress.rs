//! Turning what the runner did into what the store has confirmed.
//!
//! The runner's reports ([`Work`]) come before the step's settlement
//! commits, so they are held back until something proves the commit
//! durable:
//! - the run's next step (or the next attempt of a retried step) starts:
//!   the worker admits a run's step only after the run's earlier commits are
//!   durable;
//! - the terminal hook delivers the run's outcome: hook notifications are
//!   delivered only after the terminal commit is durable, and the outcome's
//!   status (not the runner's return) decides the word shown;
//! - a durable read of the run shows it past the step (a step that waits
//!   before the next one, a retry waiting for its time);
//! - the worker pool has stopped: every commit it made has returned.

use std::collections::HashMap;
use std::time::Duration;

use waymark::{RunOutcome, RunState, RunStatus};

use super::domain::{Verdict, Work};

/// A fact confirmed durable, for the UI to show.
#[derive(Debug, Clone)]
pub enum Shown {
    /// A step attempt began (shown live; says nothing about durability).
    Started {
        /// The run.
        run_id: String,
        /// The step (0-based).
        step: u32,
        /// Which attempt.
        attempt: u32,
    },
    /// A step's result committed and the run goes on.
    Done {
        /// The run.
        run_id: String,
        /// The step (0-based).
        step: u32,
        /// How long its work took.
        took: Duration,
        /// The wait before the next step.
        delay: Duration,
    },
    /// A step attempt failed and its retry committed.
    Retrying {
        /// The run.
        run_id: String,
        /// The step (0-based).
        step: u32,
        /// The attempt that failed.
        attempt: u32,
        /// Why.
        message: String,
    },
    /// The run's end committed.
    Ended {
        /// The stored outcome.
        outcome: RunOutcome,
        /// How long the final step's work took, if this process ran it.
        took: Option<Duration>,
    },
}

/// A step whose work finished and whose settlement is not confirmed yet.
#[derive(Debug, Clone)]
struct Unconfirmed {
    /// The step (0-based).
    step: u32,
    /// Which attempt.
    attempt: u32,
    /// How long the work took.
    took: Duration,
    /// What it asked for.
    verdict: Verdict,
}

/// The runs' unconfirmed steps.
#[derive(Debug, Default)]
pub struct Tracker {
    /// By run id.
    unconfirmed: HashMap<String, Unconfirmed>,
}

impl Tracker {
    /// Take in a runner report.
    pub fn work(&mut self, work: Work) -> Vec<Shown> {
        match work {
            Work::Finished {
                run_id,
                step,
                attempt,
                took,
                verdict,
            } => {
                self.unconfirmed.insert(
                    run_id,
                    Unconfirmed {
                        step,
                        attempt,
                        took,
                        verdict,
                    },
                );
                vec![]
            }
            Work::Started {
                run_id,
                step,
                attempt,
            } => {
                let mut shown = vec![];
                if let Some(earlier) = self.unconfirmed.remove(&run_id) {
                    shown.extend(confirm(&run_id, earlier, step, attempt));
                }
                shown.push(Shown::Started {
                    run_id,
                    step,
                    attempt,
                });
                shown
            }
        }
    }

    /// Take in a run's durable end.
    pub fn ended(&mut self, outcome: RunOutcome) -> Shown {
        let took = self
            .unconfirmed
            .remove(&outcome.run_id)
            .filter(|u| u.step == outcome.final_step)
            .map(|u| u.took);
        Shown::Ended { outcome, took }
    }

    /// Take in a durable read of a run's live status.
    pub fn durable(&mut self, status: &RunStatus) -> Vec<Shown> {
        let Some(earlier) = self.unconfirmed.get(&status.run_id) else {
            return vec![];
        };
        let past = status.current_step > earlier.step;
        let retry_scheduled = status.current_step == earlier.step
            && matches!(status.state, RunState::Scheduled | RunState::Pending)
            && matches!(
                earlier.verdict,
                Verdict::Error {
                    will_retry: true,
                    ..
                }
            );
        if !(past || retry_scheduled) {
            return vec![];
        }
        match self.unconfirmed.remove(&status.run_id) {
            Some(earlier) => confirm(
                &status.run_id,
                earlier,
                status.current_step,
                u32::MAX, // a scheduled retry is a later attempt
            )
            .into_iter()
            .collect(),
            None => vec![],
        }
    }

    /// The runs with a step awaiting confirmation that no step start will
    /// bring soon (a wait before the next step, a retry's backoff).
    pub fn awaiting(&self) -> Vec<String> {
        let mut runs: Vec<String> = self
            .unconfirmed
            .iter()
            .filter(|(_, u)| !matches!(u.verdict, Verdict::Ends))
            .map(|(id, _)| id.clone())
            .collect();
        runs.sort();
        runs
    }
}

/// What `earlier` turned out to be, now that the run is at `step`, attempt
/// `attempt`, durably.
fn confirm(run_id: &str, earlier: Unconfirmed, step: u32, attempt: u32) -> Option<Shown> {
    match earlier.verdict {
        Verdict::Continue { delay } if step > earlier.step => Some(Shown::Done {
            run_id: run_id.to_string(),
            step: earlier.step,
            took: earlier.took,
            delay,
        }),
        Verdict::Error {
            will_retry: true,
            message,
        } if step == earlier.step && attempt > earlier.attempt => Some(Shown::Retrying {
            run_id: run_id.to_string(),
            step: earlier.step,
            attempt: earlier.attempt,
            message,
        }),
        // Anything else did not commit as reported (the step runs again).
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finished(step: u32, attempt: u32, verdict: Verdict) -> Work {
        Work::Finished {
            run_id: "r".into(),
            step,
            attempt,
            took: Duration::from_millis(5),
            verdict,
        }
    }

    fn started(step: u32, attempt: u32) -> Work {
        Work::Started {
            run_id: "r".into(),
            step,
            attempt,
        }
    }

    #[test]
    fn a_step_is_done_only_once_the_next_one_starts() {
        let mut t = Tracker::default();
        let delay = Duration::ZERO;
        assert!(
            t.work(finished(0, 1, Verdict::Continue { delay }))
                .is_empty()
        );
        let shown = t.work(started(1, 1));
        assert!(matches!(shown[0], Shown::Done { step: 0, .. }), "{shown:?}");
    }

    #[test]
    fn a_rerun_of_the_same_step_confirms_nothing() {
        let mut t = Tracker::default();
        let delay = Duration::ZERO;
        t.work(finished(2, 1, Verdict::Continue { delay }));
        // The worker restarted and runs step 2 again: it never committed.
        let shown = t.work(started(2, 2));
        assert_eq!(shown.len(), 1);
        assert!(matches!(shown[0], Shown::Started { .. }));
    }

    #[test]
    fn a_retry_is_shown_once_the_next_attempt_starts() {
        let mut t = Tracker::default();
        let error = Verdict::Error {
            will_retry: true,
            message: "504".into(),
        };
        t.work(finished(2, 1, error));
        let shown = t.work(started(2, 2));
        assert!(matches!(shown[0], Shown::Retrying { attempt: 1, .. }));
    }
}
