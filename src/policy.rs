//! Retry and breaker policies: how long to wait after a failure.

use std::time::Duration;

use crate::error::Error;

/// How a step that failed with a transient error is retried.
///
/// Attempt `n` (1-based) that fails waits
/// `min(initial × multiplier^(n-1), max_delay)`, less a random part of up to
/// `jitter` of it (so the wait lies in `[d × (1 − jitter), d]`), then runs
/// again, until `max_attempts` attempts have run.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// The wait after the first failed attempt.
    pub initial: Duration,
    /// How much each further wait grows (at least 1).
    pub multiplier: f64,
    /// The longest wait.
    pub max_delay: Duration,
    /// The fraction (0..=1) of each wait that is drawn at random.
    pub jitter: f64,
    /// Attempts a step gets, the first included (at least 1).
    /// `RunSpec::max_attempts_per_step` overrides it for one run.
    pub max_attempts: u32,
}

impl Default for RetryPolicy {
    /// 1 s, doubling, at most 5 minutes, 20% jitter, 3 attempts.
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(1),
            multiplier: 2.0,
            max_delay: Duration::from_secs(300),
            jitter: 0.2,
            max_attempts: 3,
        }
    }
}

impl RetryPolicy {
    /// The wait after failed attempt `attempt` (1-based), with `draw` in
    /// `0..1` choosing the jittered part (`draw = 0` gives the full wait).
    pub fn delay(&self, attempt: u32, draw: f64) -> Duration {
        grown(
            self.initial,
            self.multiplier,
            self.max_delay,
            self.jitter,
            attempt,
            draw,
        )
    }

    pub(crate) fn validate(&self, workflow: &str) -> Result<(), Error> {
        check(workflow, "retry", self.multiplier, self.jitter)?;
        if self.max_attempts == 0 {
            return Err(Error::InvalidConfig(format!(
                "retry policy of `{workflow}`: max_attempts must be at least 1"
            )));
        }
        Ok(())
    }
}

/// How a workflow whose steps keep failing is backed off and tripped.
///
/// After a failed step attempt with a failure streak of `s`, the workflow's
/// steps wait `min(initial × multiplier^(s-1), max_delay)` (jittered as in
/// [`RetryPolicy`]) before any of them runs again. At `streak_limit`
/// consecutive failures the breaker trips: the workflow's steps are parked
/// until [`WorkflowRuntime::reset_workflow`](crate::WorkflowRuntime::reset_workflow),
/// or, with `probe_after`, until a probe step succeeds.
#[derive(Debug, Clone, PartialEq)]
pub struct BackoffPolicy {
    /// The backoff after the first failure.
    pub initial: Duration,
    /// How much each further backoff grows (at least 1).
    pub multiplier: f64,
    /// The longest backoff.
    pub max_delay: Duration,
    /// The fraction (0..=1) of each backoff that is drawn at random.
    pub jitter: f64,
    /// Consecutive failed attempts that trip the breaker; `None` never trips.
    pub streak_limit: Option<u32>,
    /// After a trip, let one step through (half-open) once this long has
    /// passed; `None` waits for a reset.
    pub probe_after: Option<Duration>,
}

impl Default for BackoffPolicy {
    /// 1 s, doubling, at most 1 minute, 20% jitter, trip at 10, no probe.
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(1),
            multiplier: 2.0,
            max_delay: Duration::from_secs(60),
            jitter: 0.2,
            streak_limit: Some(10),
            probe_after: None,
        }
    }
}

impl BackoffPolicy {
    /// The backoff after a failure that made the streak `streak`, with
    /// `draw` in `0..1` choosing the jittered part.
    pub fn delay(&self, streak: u32, draw: f64) -> Duration {
        grown(
            self.initial,
            self.multiplier,
            self.max_delay,
            self.jitter,
            streak,
            draw,
        )
    }

    pub(crate) fn validate(&self, workflow: &str) -> Result<(), Error> {
        check(workflow, "breaker", self.multiplier, self.jitter)?;
        if self.streak_limit == Some(0) {
            return Err(Error::InvalidConfig(format!(
                "breaker policy of `{workflow}`: streak_limit must be at least 1 (or None)"
            )));
        }
        if self.probe_after.is_some_and(|d| d.is_zero()) {
            return Err(Error::InvalidConfig(format!(
                "breaker policy of `{workflow}`: probe_after must be above zero (or None)"
            )));
        }
        Ok(())
    }
}

fn check(workflow: &str, what: &str, multiplier: f64, jitter: f64) -> Result<(), Error> {
    if !(multiplier >= 1.0 && multiplier.is_finite()) {
        return Err(Error::InvalidConfig(format!(
            "{what} policy of `{workflow}`: multiplier is {multiplier}, it must be a finite number of at least 1"
        )));
    }
    if !(0.0..=1.0).contains(&jitter) {
        return Err(Error::InvalidConfig(format!(
            "{what} policy of `{workflow}`: jitter is {jitter}, it must be within 0..=1"
        )));
    }
    Ok(())
}

/// `min(initial × multiplier^(n-1), max)`, less `jitter × draw` of it.
/// Saturates: no policy `build()` accepts (say `max: Duration::MAX` meant
/// as "no cap") and no streak makes it overflow or panic.
fn grown(
    initial: Duration,
    multiplier: f64,
    max: Duration,
    jitter: f64,
    n: u32,
    draw: f64,
) -> Duration {
    let exponent = i32::try_from(n.saturating_sub(1)).unwrap_or(i32::MAX);
    let full = initial.as_secs_f64() * multiplier.powi(exponent);
    let full = if full.is_finite() {
        full.min(max.as_secs_f64())
    } else {
        max.as_secs_f64()
    };
    let draw = draw.clamp(0.0, 1.0);
    let jitter = jitter.clamp(0.0, 1.0);
    let secs = (full * (1.0 - jitter * draw)).max(0.0);
    // `max` as f64 may round up past `max` (Duration::MAX does): cap again.
    Duration::try_from_secs_f64(secs)
        .unwrap_or(Duration::MAX)
        .min(max)
}

/// `d` in whole milliseconds, saturating at `u64::MAX` (a bare
/// `as_millis() as u64` wraps a huge delay around to a short one).
pub(crate) fn saturating_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A uniform draw in `0..1` for jitter.
pub(crate) fn draw() -> f64 {
    rand::random::<f64>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_then_cap_and_jitter_stays_in_bounds() {
        let p = RetryPolicy {
            initial: Duration::from_millis(100),
            multiplier: 3.0,
            max_delay: Duration::from_secs(2),
            jitter: 0.5,
            max_attempts: 10,
        };
        assert_eq!(p.delay(1, 0.0), Duration::from_millis(100));
        assert_eq!(p.delay(2, 0.0), Duration::from_millis(300));
        assert_eq!(p.delay(3, 0.0), Duration::from_millis(900));
        assert_eq!(p.delay(4, 0.0), Duration::from_secs(2));
        assert_eq!(p.delay(400, 0.0), Duration::from_secs(2));
        for attempt in 1..8 {
            let full = p.delay(attempt, 0.0);
            for _ in 0..200 {
                let d = p.delay(attempt, draw());
                assert!(d <= full && d >= full.mul_f64(0.5) - Duration::from_nanos(1));
            }
        }
    }

    #[test]
    fn extreme_policies_saturate_instead_of_panicking() {
        // `Duration::MAX` meant as "no cap", no jitter: the full wait once
        // the growth passes every bound.
        let uncapped = BackoffPolicy {
            max_delay: Duration::MAX,
            jitter: 0.0,
            ..Default::default()
        };
        assert_eq!(uncapped.delay(1, 0.0), Duration::from_secs(1));
        for streak in [65, 66, 1_000, u32::MAX] {
            assert_eq!(
                uncapped.delay(streak, 0.0),
                Duration::MAX,
                "streak {streak}"
            );
        }
        let huge_start = RetryPolicy {
            initial: Duration::MAX,
            max_delay: Duration::MAX,
            multiplier: f64::MAX,
            jitter: 0.0,
            ..Default::default()
        };
        assert_eq!(huge_start.delay(1, 0.0), Duration::MAX);
        assert_eq!(huge_start.delay(u32::MAX, 0.5), Duration::MAX);
        assert_eq!(saturating_ms(Duration::MAX), u64::MAX);
        assert_eq!(saturating_ms(Duration::from_millis(7)), 7);
    }

    proptest::proptest! {
        /// Whatever policy `build()` accepts and whatever the streak, the
        /// delay is computed (no panic) and lies within `0..=max_delay`.
        #[test]
        fn every_accepted_policy_gives_a_bounded_delay(
            initial_s in proptest::prop_oneof![proptest::num::u64::ANY, 0u64..100],
            initial_ns in 0u32..1_000_000_000,
            max_s in proptest::prop_oneof![proptest::num::u64::ANY, 0u64..100],
            multiplier in proptest::prop_oneof![1.0f64..1e6, proptest::num::f64::POSITIVE],
            jitter in 0.0f64..=1.0,
            n in proptest::num::u32::ANY,
            draw in proptest::prop_oneof![0.0f64..1.0, proptest::num::f64::ANY],
        ) {
            let policy = BackoffPolicy {
                initial: Duration::new(initial_s, initial_ns),
                multiplier: multiplier.max(1.0),
                max_delay: Duration::new(max_s, 999_999_999),
                jitter,
                ..Default::default()
            };
            proptest::prop_assume!(policy.validate("w").is_ok());
            let d = policy.delay(n, draw);
            proptest::prop_assert!(d <= policy.max_delay);
            let _ = saturating_ms(d);
        }
    }

    #[test]
    fn invalid_policies_are_rejected() {
        let bad_mult = RetryPolicy {
            multiplier: 0.5,
            ..Default::default()
        };
        assert!(bad_mult.validate("w").is_err());
        let bad_jitter = BackoffPolicy {
            jitter: 1.5,
            ..Default::default()
        };
        assert!(bad_jitter.validate("w").is_err());
        let zero_limit = BackoffPolicy {
            streak_limit: Some(0),
            ..Default::default()
        };
        assert!(zero_limit.validate("w").is_err());
        let nan = BackoffPolicy {
            multiplier: f64::NAN,
            ..Default::default()
        };
        assert!(nan.validate("w").is_err());
        assert!(RetryPolicy::default().validate("w").is_ok());
        assert!(BackoffPolicy::default().validate("w").is_ok());
    }
}
