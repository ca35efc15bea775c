//! Helpers shared by the reliability tests: the test kit's seeded RNG and
//! fault-injecting object store (`waymark::testkit`, one copy), and a
//! small polling utility.
//!
//! Each integration test file compiles this module on its own and uses only
//! part of it.
#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

#[allow(unused_imports)]
pub use waymark::testkit::{FaultPlan, FaultStore, Faults, Outage, Rng, StoreOp};

/// The seed to use: `var` from the environment when set, otherwise one from
/// the clock (see `waymark::testkit::seed_from_env`).
pub fn seed_from_env(var: &str) -> u64 {
    waymark::testkit::seed_from_env(var).unwrap_or_else(|e| panic!("{e}"))
}

/// Poll `cond` every few milliseconds until it holds, failing after `limit`
/// with `what`. A bounded wait for a condition, never a timing assertion.
pub async fn wait_until<F, Fut>(limit: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if cond().await {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
