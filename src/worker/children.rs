//! The spawn contributor: the effects a `SpawnChildren` settlement commits
//! (see [`crate::children`] for the path of a child's outcome back).
//!
//! In the parent's settlement, in one transaction: the parent's next step
//! as a placeholder job scheduled far ahead (header `workflow.join`, no
//! dedup key, as no step job has one: see `step_job_effects`; a key without
//! the run's segment once hid a placeholder behind one a crash left from an
//! earlier segment), its run record pointing
//! at it, the join record, and per child everything a submit commits (step
//! 0 with header `workflow.parent`, the run and submit records, the kept
//! input, the deadline entry).

use std::collections::HashSet;
use std::time::Duration;

use taquba::SettlementEffects;

use super::settle::next_step_effects;
use super::step::StepJob;
use crate::effects;
use crate::error::Error;
use crate::record::{self, HEADER_JOIN, JoinRecord, MAX_CHILDREN, MAX_RESULT_BYTES, encode};
use crate::runner::ChildSpec;
use crate::runtime::{Inner, RunSpec};

/// How far ahead a placeholder is scheduled: it never runs (the last
/// child's terminal transaction enqueues the real step job).
const PLACEHOLDER_DELAY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// The effects of spawning `children` from `job`'s step, and the children's
/// run ids (commits in flight for them).
pub(super) fn spawn_effects<R, H>(
    inner: &Inner<R, H>,
    job: &StepJob,
    children: Vec<ChildSpec>,
    payload: Vec<u8>,
    fail_fast: bool,
) -> Result<(SettlementEffects, Vec<String>), Error> {
    if children.len() > MAX_CHILDREN {
        return Err(Error::InvalidConfig(format!(
            "a step may spawn at most {MAX_CHILDREN} children, not {}",
            children.len()
        )));
    }
    let ids = child_ids(job, &children)?;
    let wait = job.step.saturating_add(1);
    let mut effects = next_step_effects(inner, job, Vec::new(), Some(PLACEHOLDER_DELAY), false)?;
    let Some(placeholder) = effects.enqueues.first_mut() else {
        return Err(Error::InvalidConfig("no placeholder job was built".into()));
    };
    placeholder
        .options
        .headers
        .insert(HEADER_JOIN.to_string(), "1".to_string());
    let join = JoinRecord {
        placeholder: placeholder.options.id_override.clone().unwrap_or_default(),
        children: ids.clone(),
        arrived: vec![false; ids.len()],
        fail_fast,
        failed: false,
        payload,
        headers: placeholder.options.headers.clone(),
        priority: job.claim.priority,
        max_attempts: placeholder.options.max_attempts.unwrap_or(1),
    };
    let join_key = inner.keys.join_record(&job.run_id, wait);
    let value = encode(&join_key, &join)?;
    if value.len() > MAX_RESULT_BYTES {
        return Err(Error::PayloadTooLarge {
            what: "spawn (next payload and child ids)",
            size: value.len(),
            max: MAX_RESULT_BYTES,
        });
    }
    effects = effects
        .kv_put(join_key, value)
        .kv_put(inner.keys.data_extent(&job.run_id), record::EXTENT_SCAN);
    for (index, (spec, id)) in children.into_iter().zip(&ids).enumerate() {
        let mut prepared = inner.prepare_submit(RunSpec {
            run_id: Some(id.clone()),
            input: spec.input,
            headers: spec.headers,
            priority: Some(job.claim.priority),
            max_attempts_per_step: None,
            workflow: spec.workflow,
            deadline: spec.deadline,
        })?;
        prepared.link_parent(&job.run_id, wait, index);
        effects = effects::merge(effects, inner.submit_effects(&prepared)?);
    }
    Ok((effects, ids))
}

/// The children's run ids: `{parent}.{step}.{suffix or index}`, with
/// `s{k}` after the step in the run's segment `k` (continue-as-new starts
/// the step counter again) and `r{n}` in re-run `n`; distinct and valid.
fn child_ids(job: &StepJob, children: &[ChildSpec]) -> Result<Vec<String>, Error> {
    let rerun = record::rerun_of(&job.claim.headers);
    let segment = record::segment_of(&job.claim.headers);
    let mut step = job.step.to_string();
    if segment > 0 {
        step.push_str(&format!("s{segment}"));
    }
    if rerun > 0 {
        step.push_str(&format!("r{rerun}"));
    }
    let mut seen = HashSet::new();
    let mut ids = Vec::with_capacity(children.len());
    for (index, child) in children.iter().enumerate() {
        let suffix = child.id_suffix.clone().unwrap_or_else(|| index.to_string());
        let id = format!("{}.{step}.{suffix}", job.run_id);
        record::validate_name("child run id", &id)?;
        if !seen.insert(id.clone()) {
            return Err(Error::InvalidConfig(format!(
                "two children would have the run id `{id}`"
            )));
        }
        ids.push(id);
    }
    Ok(ids)
}
