//! Small synchronisation helpers every module may use (it imports none).

use std::sync::{Mutex, MutexGuard};

/// Lock a mutex whose data stays consistent even if a holder panicked (all
/// critical sections here are single assignments or map operations).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
