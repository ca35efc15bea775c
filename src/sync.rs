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

/// One async lock per key, for callers that must not overlap on the same
/// key (a run's cancels). A key's entry exists only while someone holds or
/// waits for it, so the map is as large as the calls in progress.
#[derive(Default)]
pub(crate) struct KeyedLocks {
    map: Mutex<std::collections::HashMap<String, std::sync::Arc<tokio::sync::Mutex<()>>>>,
}

/// Held while a caller holds a key's lock (or waits for it): dropping it
/// releases the lock and removes the key's entry once no one else uses it.
pub(crate) struct KeyedGuard<'a> {
    // Dropped first: the lock is released before the entry is checked.
    _held: Option<tokio::sync::OwnedMutexGuard<()>>,
    _entry: KeyedEntry<'a>,
}

/// A caller's use of a key's entry; its drop removes an entry left unused,
/// a wait dropped before it got the lock included.
struct KeyedEntry<'a> {
    locks: &'a KeyedLocks,
    key: String,
    mutex: Option<std::sync::Arc<tokio::sync::Mutex<()>>>,
}

impl KeyedLocks {
    /// Wait for `key`'s lock.
    pub(crate) async fn lock(&self, key: &str) -> KeyedGuard<'_> {
        let mutex = lock(&self.map).entry(key.to_string()).or_default().clone();
        let entry = KeyedEntry {
            locks: self,
            key: key.to_string(),
            mutex: Some(mutex.clone()),
        };
        let held = mutex.lock_owned().await;
        KeyedGuard {
            _held: Some(held),
            _entry: entry,
        }
    }

    /// How many keys are held or waited for.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        lock(&self.map).len()
    }

    /// How many references the callers holding or waiting for `key` have
    /// to its lock: 2 for a holder alone, more once another waits.
    #[cfg(test)]
    pub(crate) fn users(&self, key: &str) -> usize {
        lock(&self.map)
            .get(key)
            .map_or(0, |m| std::sync::Arc::strong_count(m) - 1)
    }
}

impl Drop for KeyedEntry<'_> {
    fn drop(&mut self) {
        let mut map = lock(&self.locks.map);
        drop(self.mutex.take());
        if map
            .get(&self.key)
            .is_some_and(|m| std::sync::Arc::strong_count(m) == 1)
        {
            map.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_keyed_lock_serialises_one_key_and_leaves_no_entry_behind() {
        let locks = KeyedLocks::default();
        let a = locks.lock("a").await;
        // Another key is free.
        let b = locks.lock("b").await;
        drop(b);
        // The same key waits until the holder lets go.
        {
            let second = locks.lock("a");
            tokio::pin!(second);
            assert!(futures_util::poll!(second.as_mut()).is_pending());
            assert_eq!(locks.len(), 1, "a waiter keeps the entry");
            drop(a);
            let _second = second.await;
        }
        assert_eq!(locks.len(), 0, "after every holder");
        // A wait dropped before it got the lock removes nothing it should not
        // and leaves nothing behind.
        let held = locks.lock("c").await;
        {
            let dropped = locks.lock("c");
            tokio::pin!(dropped);
            assert!(futures_util::poll!(dropped.as_mut()).is_pending());
        }
        assert_eq!(locks.len(), 1, "the holder's entry stays");
        drop(held);
        assert_eq!(locks.len(), 0, "after a dropped wait");
    }
}
