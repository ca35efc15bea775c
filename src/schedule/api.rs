//! The schedule calls on the runtime: read state, trigger, pause, resume.

use taquba::{EnqueueResult, SettlementEffects};

use super::def::Overlap;
use super::fire::{Gate, fire, gate, last_live, merge, tick};
use super::state::{self, ScheduleInfo, ScheduleRecord};
use crate::error::Error;
use crate::hook::TerminalHook;
use crate::record::{encode, validate_name};
use crate::runner::StepRunner;
use crate::runtime::{Inner, WorkflowRuntime};

impl<R: StepRunner, H: TerminalHook> WorkflowRuntime<R, H> {
    /// One schedule's state, from durable state (also for a schedule no
    /// longer defined, which shows `active: false`). `None` for an id that
    /// was never recorded (a schedule is recorded when a worker pool first
    /// starts with it, or at its first trigger or pause).
    pub async fn schedule(&self, id: &str) -> Result<Option<ScheduleInfo>, Error> {
        validate_name("schedule id", id)?;
        let inner = &self.inner;
        let info = super::read_schedule(inner.queue.view(), &inner.cfg.queue_name, id).await?;
        if let Some(info) = &info {
            durable(inner, info).await;
        }
        Ok(info)
    }

    /// Every recorded schedule's state, sorted by id.
    pub async fn schedules(&self) -> Result<Vec<ScheduleInfo>, Error> {
        let inner = &self.inner;
        let infos = super::read_schedules(inner.queue.view(), &inner.cfg.queue_name).await?;
        for info in &infos {
            durable(inner, info).await;
        }
        Ok(infos)
    }

    /// Fire a schedule now, by hand, and return the run id it submitted
    /// (`{id}:t{ms}`; on a fleet perhaps with a suffix `-{k}` that routes
    /// it to the schedule's home shard). Overrides the workflow's backoff
    /// window (the operator asked), never a trip.
    ///
    /// Errors: [`Error::ScheduleNotFound`] for an id this runtime does not
    /// define; [`Error::WorkflowTripped`]; [`Error::ScheduleOverlap`] when the
    /// schedule's overlap policy is `Skip` and its last run is live;
    /// [`Error::ShuttingDown`] once the worker pool is stopping.
    pub async fn trigger(&self, id: &str) -> Result<String, Error> {
        self.trigger_with(id, |_| Ok(SettlementEffects::default()))
            .await
    }

    /// [`Self::trigger`], with the effects `extra` makes of the run id
    /// committed in the trigger's own transaction. Returns the run id.
    ///
    /// The fire's time is now, or a millisecond after the schedule's last
    /// fire if that is later, so each trigger names a run of its own. A run
    /// id taken already (a run submitted under it by hand) is
    /// [`Error::TriggerRunIdTaken`]: that run is not this call's.
    pub(crate) async fn trigger_with(
        &self,
        id: &str,
        extra: impl FnOnce(&str) -> Result<SettlementEffects, Error>,
    ) -> Result<String, Error> {
        validate_name("schedule id", id)?;
        let inner = &self.inner;
        if inner.schedules.shutting_down() {
            return Err(Error::ShuttingDown);
        }
        let Some(def) = inner.schedules.get(id) else {
            return Err(Error::ScheduleNotFound(id.to_string()));
        };
        let _writer = inner.schedules.lock(id).await;
        let (mut rec, old) = current(inner, id).await?;
        if gate(inner, &def.workflow).await? == Gate::Tripped {
            return Err(Error::WorkflowTripped {
                schedule: id.to_string(),
                workflow: def.workflow.clone(),
            });
        }
        if def.overlap == Overlap::Skip && last_live(inner, &rec).await? {
            return Err(Error::ScheduleOverlap {
                schedule: id.to_string(),
                run_id: rec.last_run_id.clone().unwrap_or_default(),
            });
        }
        // After the last fire: a second trigger within a millisecond gets
        // a run id of its own (`{id}:t{ms}` names the fire's time).
        let at = inner
            .now_ms()
            .max(rec.last_fire_ms.map_or(0, |last| last.saturating_add(1)));
        let Some((run_id, effects)) = fire(inner, id, def, &mut rec, at, true)? else {
            return Err(Error::InvalidConfig(format!(
                "schedule `{id}`: {}",
                rec.last_error
                    .as_deref()
                    .unwrap_or("its input could not be computed")
            )));
        };
        let key = state::key(&inner.cfg.queue_name, id);
        let sub_key = inner.keys.sub(&run_id);
        let effects = merge(
            merge(
                effects,
                SettlementEffects::default().kv_put(key.clone(), encode(&key, &rec)?),
            ),
            extra(&run_id)?,
        );
        let committed = {
            let _creating = inner.creating.lock(&run_id).await;
            let _pending = inner.pending.begin(&run_id);
            let _record = inner.pending.begin(state::pending_name(id));
            inner
                .queue
                .kv_compare_commit(&[(&key, old.as_deref()), (&sub_key, None)], effects)
                .await?
        };
        match committed {
            Some(results) => {
                if let Some(EnqueueResult::New(job)) = results.first() {
                    inner.pending.enqueued([job.as_str()]);
                }
                tracing::info!(schedule = id, run_id, "schedule triggered");
                Ok(run_id)
            }
            // A run submitted by hand under the id: not this call's.
            None if inner.queue.view().kv_get(&sub_key).await?.is_some() => {
                Err(Error::TriggerRunIdTaken {
                    schedule: id.to_string(),
                    run_id,
                })
            }
            None => Err(Error::ScheduleConflict(id.to_string())),
        }
    }

    /// Pause a schedule: it fires nothing until [`Self::resume_schedule`],
    /// across restarts (a manual trigger still fires). Returns whether it
    /// was running.
    pub async fn pause_schedule(&self, id: &str) -> Result<bool, Error> {
        self.set_paused_with(id, true, || Ok(SettlementEffects::default()))
            .await
    }

    /// Resume a paused schedule at its first fire time after now (times
    /// missed while paused are not caught up). Returns whether it was paused.
    pub async fn resume_schedule(&self, id: &str) -> Result<bool, Error> {
        self.set_paused_with(id, false, || Ok(SettlementEffects::default()))
            .await
    }

    /// Pause or resume; `extra`'s effects commit with the change (not
    /// called when there is none: the result is then `false`).
    pub(crate) async fn set_paused_with(
        &self,
        id: &str,
        paused: bool,
        extra: impl FnOnce() -> Result<SettlementEffects, Error>,
    ) -> Result<bool, Error> {
        validate_name("schedule id", id)?;
        let inner = &self.inner;
        let Some(def) = inner.schedules.get(id) else {
            return Err(Error::ScheduleNotFound(id.to_string()));
        };
        let _writer = inner.schedules.lock(id).await;
        let (mut rec, old) = current(inner, id).await?;
        if rec.paused == paused {
            return Ok(false);
        }
        rec.paused = paused;
        let key = state::key(&inner.cfg.queue_name, id);
        let mut effects = SettlementEffects::default();
        if paused {
            rec.next_fire_ms = None;
            rec.armed_ms = None;
            rec.buffered_ms = None;
        } else {
            let now = inner.now_ms();
            rec.next_fire_ms = def.times.next_after(now, rec.anchor_ms);
            rec.armed_ms = rec.next_fire_ms;
            if let Some(at) = rec.armed_ms {
                effects = effects.enqueue(tick(&inner.schedules.queue, id, at));
            }
        }
        effects = merge(effects.kv_put(key.clone(), encode(&key, &rec)?), extra()?);
        let committed = {
            let _record = inner.pending.begin(state::pending_name(id));
            inner
                .queue
                .kv_compare_commit(&[(&key, old.as_deref())], effects)
                .await?
        };
        if committed.is_none() {
            return Err(Error::ScheduleConflict(id.to_string()));
        }
        tracing::info!(schedule = id, paused, "schedule paused or resumed");
        Ok(true)
    }
}

/// Wait until what `info` was read from is durable: a commit is visible
/// before it is, both a tick's (the schedule's record) and the last run's
/// (its ending, which `last_outcome` reports).
async fn durable<R, H>(inner: &Inner<R, H>, info: &ScheduleInfo) {
    inner.pending.settled(&state::pending_name(&info.id)).await;
    if let Some(run_id) = &info.last_run_id {
        inner.pending.settled(run_id).await;
    }
}

/// A defined schedule's record and its stored bytes (`None` when it was
/// never recorded: a fresh record, not armed until the pool starts).
async fn current<R, H>(
    inner: &Inner<R, H>,
    id: &str,
) -> Result<(ScheduleRecord, Option<Vec<u8>>), Error> {
    match state::read_record(inner.queue.view(), &inner.cfg.queue_name, id).await? {
        Some((rec, bytes)) => Ok((rec, Some(bytes))),
        None => {
            let def = inner
                .schedules
                .get(id)
                .ok_or_else(|| Error::ScheduleNotFound(id.to_string()))?;
            let rec = ScheduleRecord::new(def.kind.clone(), def.workflow.clone(), inner.now_ms());
            Ok((rec, None))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use taquba::Queue;

    use crate::breaker::{HealthRecord, Stored};
    use crate::error::Error;
    use crate::hook::NoopTerminalHook;
    use crate::record::encode;
    use crate::runner::Done;
    use crate::runtime::WorkflowRuntime;
    use crate::schedule::Schedule;

    /// `schedule` reports the last run's outcome, which a commit makes
    /// visible before it is durable: it answered from the run's ending
    /// while the ending still waited for its flush. It now waits for the
    /// run's commits in flight, as `status` and `outcome` do.
    #[tokio::test]
    async fn a_schedules_state_waits_for_its_last_runs_commits_in_flight() {
        let store = Arc::new(taquba::object_store::memory::InMemory::new());
        let queue = Arc::new(Queue::open(store, "t").await.unwrap());
        let rt = WorkflowRuntime::builder(queue, Done, NoopTerminalHook)
            .schedule(Schedule::manual("m"))
            .build()
            .unwrap();
        let run_id = rt.trigger("m").await.unwrap();
        let in_flight = rt.inner.pending.begin(&run_id);
        let early = tokio::time::timeout(Duration::from_millis(100), rt.schedule("m")).await;
        assert!(
            early.is_err(),
            "answered while the run's commit was in flight"
        );
        let early = tokio::time::timeout(Duration::from_millis(100), rt.schedules()).await;
        assert!(
            early.is_err(),
            "listed while the run's commit was in flight"
        );
        drop(in_flight);
        let info = rt.schedule("m").await.unwrap().unwrap();
        assert_eq!(info.last_run_id, Some(run_id));
        assert_eq!(rt.schedules().await.unwrap().len(), 1);
    }

    /// `trigger` refused with `WorkflowTripped` from a health record a
    /// commit had made visible but not yet durable: a crash could undo the
    /// trip the refusal reported. It now waits, after reading, for the
    /// record's commits in flight (each holds the workflow's lock across its
    /// commit), as does `workflow_health`.
    #[tokio::test]
    async fn a_trigger_is_not_refused_by_a_trip_still_in_flight() {
        let store = Arc::new(taquba::object_store::memory::InMemory::new());
        let queue = Arc::new(Queue::open(store, "t").await.unwrap());
        let rt = WorkflowRuntime::builder(queue, Done, NoopTerminalHook)
            .schedule(Schedule::manual("m").workflow("w"))
            .build()
            .unwrap();
        let inner = &rt.inner;
        // A trip's commit, visible and not yet returned.
        let in_flight = inner.breakers.hold("w").await;
        let key = inner.breakers.health_key("w");
        let tripped = HealthRecord {
            state: Stored::Tripped {
                since: 1,
                probe_at: None,
            },
            ..Default::default()
        };
        inner
            .queue
            .kv_put(&key, &encode(&key, &tripped).unwrap())
            .await
            .unwrap();
        let early = tokio::time::timeout(Duration::from_millis(100), rt.trigger("m")).await;
        assert!(
            early.is_err(),
            "refused on a trip still in flight: {early:?}"
        );
        let early = tokio::time::timeout(Duration::from_millis(100), rt.workflow_health("w")).await;
        assert!(early.is_err(), "reported a trip still in flight: {early:?}");
        drop(in_flight);
        assert!(matches!(
            rt.trigger("m").await,
            Err(Error::WorkflowTripped { .. })
        ));
        assert!(rt.workflow_health("w").await.unwrap().is_some());
    }
}
