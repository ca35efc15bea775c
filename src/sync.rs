//! Small synchronisation and timer helpers every module may use (it imports
//! no other module of the crate).

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// Lock a mutex whose data stays consistent even if a holder panicked (all
/// critical sections here are single assignments or map operations).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A tokio interval whose first tick is one `period` from now (tokio's
/// `interval` ticks at once) and which, after a late tick, keeps its period
/// from that tick instead of firing the missed ones in a burst. A zero
/// `period` is taken as 1 ms, since tokio refuses it.
pub(crate) fn ticks_after(period: Duration) -> tokio::time::Interval {
    let period = period.max(Duration::from_millis(1));
    let now = tokio::time::Instant::now();
    let first = now.checked_add(period).unwrap_or(now);
    let mut tick = tokio::time::interval_at(first, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}
