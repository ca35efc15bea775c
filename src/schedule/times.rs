//! A schedule's fire times, in ms since the Unix epoch (queue clock).

use std::str::FromStr;

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds};

use super::def::ScheduleKind;

/// How to compute the fire time after a given instant.
#[derive(Debug)]
pub(crate) enum Times {
    Every { interval_ms: u64 },
    Cron { cron: Box<Cron>, zone: Option<Tz> },
    Manual,
}

impl Times {
    /// Parse a definition's times, or say what is wrong with it.
    pub(crate) fn new(kind: &ScheduleKind) -> Result<Self, String> {
        Ok(match kind {
            ScheduleKind::Every { interval } => {
                let interval_ms = interval.as_millis();
                if interval_ms == 0 {
                    return Err("the interval is zero; use at least 1 ms".into());
                }
                Times::Every {
                    interval_ms: interval_ms.min(u64::MAX as u128) as u64,
                }
            }
            ScheduleKind::Cron { expr, time_zone } => {
                let cron = CronParser::builder()
                    .seconds(Seconds::Required)
                    .build()
                    .parse(expr)
                    .map_err(|e| {
                        format!(
                            "cron expression `{expr}` is invalid ({e}); use `sec min hour day-of-month month day-of-week [year]`"
                        )
                    })?;
                let zone = match time_zone {
                    None => None,
                    Some(name) => Some(Tz::from_str(name).map_err(|_| {
                        format!(
                            "time zone `{name}` is unknown; use an IANA name such as `Europe/Paris`"
                        )
                    })?),
                };
                let times = Times::Cron {
                    cron: Box::new(cron),
                    zone,
                };
                // An expression that matches nothing (30 February) never fires.
                if times.next_after(0, 0).is_none() {
                    return Err(format!("cron expression `{expr}` never matches a time"));
                }
                times
            }
            ScheduleKind::Manual => Times::Manual,
        })
    }

    /// The first fire time strictly after `after_ms`; `anchor_ms` is where
    /// an `every` schedule counts its intervals from. `None` for a manual
    /// schedule and past the end of a cron expression's years.
    pub(crate) fn next_after(&self, after_ms: u64, anchor_ms: u64) -> Option<u64> {
        match self {
            Times::Every { interval_ms } => {
                let k = after_ms.saturating_sub(anchor_ms) / interval_ms;
                anchor_ms.checked_add(k.checked_add(1)?.checked_mul(*interval_ms)?)
            }
            Times::Cron { cron, zone } => {
                let at = DateTime::<Utc>::from_timestamp_millis(i64::try_from(after_ms).ok()?)?;
                match zone {
                    None => next_cron(cron, &at),
                    Some(tz) => next_cron(cron, &at.with_timezone(tz)),
                }
            }
            Times::Manual => None,
        }
    }
}

impl Times {
    /// Where a very long walk of due times can jump to: a fire time after
    /// `after_ms` from which the times up to `now_ms` are about `keep` (an
    /// `every` schedule: the latest `keep`, exactly) or those within
    /// `grace_ms` of `now_ms` (a cron expression), with how many fire times
    /// lie strictly between `after_ms` and it when they can be counted
    /// without walking them (`every` only). `None`: no jump.
    pub(crate) fn skip_to(
        &self,
        after_ms: u64,
        now_ms: u64,
        keep: u64,
        grace_ms: u64,
        anchor_ms: u64,
    ) -> Option<(u64, Option<u64>)> {
        match self {
            Times::Every { interval_ms } => {
                let iv = *interval_ms;
                let last = anchor_ms.checked_add(now_ms.checked_sub(anchor_ms)? / iv * iv)?;
                let to = last.checked_sub(keep.checked_sub(1)?.checked_mul(iv)?)?;
                let skipped = (to.checked_sub(after_ms)? / iv).checked_sub(1)?;
                Some((to, Some(skipped)))
            }
            Times::Cron { .. } => {
                let to = self.next_after(now_ms.saturating_sub(grace_ms), anchor_ms)?;
                (to > after_ms).then_some((to, None))
            }
            Times::Manual => None,
        }
    }
}

fn next_cron<Z: TimeZone>(cron: &Cron, after: &DateTime<Z>) -> Option<u64>
where
    DateTime<Z>: croner::time::CronDateTime,
{
    let next = cron.find_next_occurrence(after, false).ok()?;
    u64::try_from(next.timestamp_millis()).ok()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const T: u64 = 1_800_000_000_000; // 2027-01-15T08:00:00Z

    fn cron(expr: &str, zone: Option<&str>) -> Result<Times, String> {
        Times::new(&ScheduleKind::Cron {
            expr: expr.into(),
            time_zone: zone.map(str::to_string),
        })
    }

    #[test]
    fn every_counts_from_the_anchor() {
        let t = Times::new(&ScheduleKind::Every {
            interval: Duration::from_secs(10),
        })
        .unwrap();
        assert_eq!(t.next_after(T, T), Some(T + 10_000));
        assert_eq!(t.next_after(T + 9_999, T), Some(T + 10_000));
        assert_eq!(t.next_after(T + 10_000, T), Some(T + 20_000));
        assert_eq!(t.next_after(u64::MAX - 1, 0), None);
    }

    #[test]
    fn cron_has_a_seconds_field_and_a_zone() {
        let t = cron("*/15 * * * * *", None).unwrap();
        assert_eq!(t.next_after(T, 0), Some(T + 15_000));
        assert_eq!(t.next_after(T + 1, 0), Some(T + 15_000));
        // 09:30:00 in Paris is 08:30:00 UTC in January (UTC+1).
        let paris = cron("0 30 9 * * *", Some("Europe/Paris")).unwrap();
        assert_eq!(paris.next_after(T, 0), Some(T + 30 * 60_000));
        let utc = cron("0 30 9 * * *", None).unwrap();
        assert_eq!(utc.next_after(T, 0), Some(T + 90 * 60_000));
    }

    #[test]
    fn cron_handles_a_dst_gap() {
        // 2027-03-28: Paris skips 02:00-03:00. A 02:30 job fires at the next
        // valid instant, 03:00 local = 01:00 UTC.
        let t = cron("0 30 2 * * *", Some("Europe/Paris")).unwrap();
        let before = DateTime::parse_from_rfc3339("2027-03-28T00:00:00Z")
            .unwrap()
            .timestamp_millis() as u64;
        let expect = DateTime::parse_from_rfc3339("2027-03-28T01:00:00Z")
            .unwrap()
            .timestamp_millis() as u64;
        assert_eq!(t.next_after(before, 0), Some(expect));
    }

    #[test]
    fn bad_expressions_and_zones_say_what_is_wrong() {
        assert!(cron("* * * * *", None).unwrap_err().contains("invalid"));
        assert!(cron("0 61 * * * *", None).unwrap_err().contains("invalid"));
        assert!(cron("0 0 0 30 2 *", None).unwrap_err().contains("never"));
        assert!(
            cron("0 0 * * * *", Some("Mars/Olympus"))
                .unwrap_err()
                .contains("unknown")
        );
        assert!(
            Times::new(&ScheduleKind::Every {
                interval: Duration::ZERO
            })
            .is_err()
        );
    }
}
