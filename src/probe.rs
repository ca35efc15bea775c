//! The test kit's seam in the worker (feature `testkit`): a probe the
//! worker calls where a crash test needs to stop it. Zero cost without the
//! feature (the field and the calls are compiled out) and when unset.
//!
//! One point is reached only inside the worker: a step's settlement has
//! committed durably and its aftermath (waking `wait` callers, remembering
//! the next step's job, breaker events, the hook's delivery) has not run.
//! The kit's own wrappers of the runner and the hook see the other points.

use futures_util::future::BoxFuture;

/// Called by the worker at the points a crash test names.
pub(crate) trait Probe: Send + Sync + 'static {
    /// A step's settlement committed durably: the claim of `job_id`, the
    /// `attempt`-th (1-based) attempt of step `step` of `run_id`. The
    /// aftermath waits for the returned future; one that never resolves
    /// holds the worker at this point (as a killed process stops).
    fn settled(
        &self,
        job_id: &str,
        run_id: &str,
        step: u32,
        attempt: u32,
    ) -> BoxFuture<'static, ()>;
}
