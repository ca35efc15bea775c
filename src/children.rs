//! Child runs: what a child's terminal transaction records into its parent,
//! and what an ending parent leaves for the cascade that cancels its
//! children.
//!
//! A parent's step that returned `SpawnChildren` leaves the parent at its
//! next step on a *placeholder*: a job scheduled far ahead (it holds no
//! worker and spends no attempt), which the run record points at, with a
//! [`JoinRecord`] beside it. Each child's terminal transaction, under the
//! parent's join lock, reads the join record and the parent's run record:
//! if the parent still waits on this placeholder and the child has not
//! arrived, it records the child's [`ChildOutcome`] and marks it arrived;
//! the last child (or, with `fail_fast`, the first failure) also enqueues
//! the parent's step as a real job and points the parent's run record at
//! it. A parent that ended (or moved on) records nothing. A parent's
//! terminal transaction at its join (its job carries `workflow.join`) takes
//! its own join lock too, so its ending and its children's arrivals never
//! interleave; a run that is neither a child nor at a join takes no lock.
//! The locks are held across the commit, so one parent's children record
//! their endings one flush after another.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use taquba::{CancelOutcome, EnqueueOptions, EnqueueRequest, Queue, SettlementEffects};
use tokio::sync::{Mutex, MutexGuard};

use crate::error::Error;
use crate::hook::{ChildOutcome, RunOutcome, TerminalStatus};
use crate::pending::PendingCommit;
use crate::record::{self, JoinRecord, RunRecord, decode, encode};
use crate::runtime::Inner;

/// Lock stripes for joins (a run's lock is `hash(run id) % STRIPES`).
const STRIPES: usize = 64;

/// The join locks: striped, so memory stays bounded.
pub(crate) struct JoinLocks {
    stripes: Vec<Mutex<()>>,
}

impl Default for JoinLocks {
    fn default() -> Self {
        Self {
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        }
    }
}

impl JoinLocks {
    fn stripe(run_id: &str) -> usize {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        run_id.hash(&mut h);
        (h.finish() % STRIPES as u64) as usize
    }

    /// Lock the stripes of `runs`, in stripe order (no two callers wait on
    /// each other in a cycle).
    pub(crate) async fn lock(&self, runs: &[&str]) -> Vec<MutexGuard<'_, ()>> {
        let mut ids: Vec<usize> = runs.iter().map(|r| Self::stripe(r)).collect();
        ids.sort_unstable();
        ids.dedup();
        let mut held = Vec::with_capacity(ids.len());
        for i in ids {
            held.push(self.stripes[i].lock().await);
        }
        held
    }
}

/// What a child's ending adds to its terminal transaction.
pub(crate) struct Arrival<'a> {
    pub effects: SettlementEffects,
    /// The parent's step became a real job: a commit in flight for it.
    pub pending: Option<PendingCommit<'a>>,
    /// The parent's placeholder the commit replaced, to remove once the
    /// commit has returned.
    pub replaced: Option<Replaced>,
}

/// A joined parent's placeholder job, replaced by the real step job, and
/// the marker written in the same transaction. The marker lists the job for
/// removal until it is gone, so a crash right after the join's commit leaves
/// nothing behind: [`Replaced::remove`] runs after that commit, and the
/// maintenance pass runs it for every marker it finds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Replaced {
    /// The placeholder's job id.
    pub job: String,
    /// Its marker's key.
    pub marker: Vec<u8>,
}

impl Replaced {
    /// Remove the placeholder job and its marker in one commit (the marker
    /// alone when the job is gone already). A placeholder is never due, so
    /// it is never claimed.
    pub(crate) async fn remove(&self, queue: &Queue) -> Result<(), Error> {
        let effects = SettlementEffects::default().kv_delete(self.marker.clone());
        let (removed, _) = queue.cancel_with(&self.job, effects).await?;
        if removed != CancelOutcome::Removed {
            queue.kv_delete(&self.marker).await?;
        }
        Ok(())
    }
}

impl<R, H> Inner<R, H> {
    /// Record `outcome` of the child whose step job carries `headers` into
    /// its parent (the caller holds the parent's join lock). `None` when
    /// there is nothing to record: no parent link, the parent no longer
    /// waits on this join, or the child arrived already.
    pub(crate) async fn child_arrival(
        &self,
        outcome: &RunOutcome,
        headers: &HashMap<String, String>,
    ) -> Result<Option<Arrival<'_>>, Error> {
        let Some((parent, step, index)) = record::parent_of(headers) else {
            return Ok(None);
        };
        let view = self.queue.view();
        let join_key = self.keys.join_record(parent, step);
        let Some(bytes) = view.kv_get(&join_key).await? else {
            return Ok(None);
        };
        let mut join: JoinRecord = decode(&join_key, &bytes)?;
        // A child of an earlier spawn at this step (the parent re-run from
        // it, or a new segment spawning at the same step, while that child
        // lived) is not one of this join's: its slot holds another id.
        if join.children.get(index) != Some(&outcome.run_id) {
            return Ok(None);
        }
        let run_key = self.keys.run(parent);
        let waiting = match view.kv_get(&run_key).await? {
            Some(bytes) => {
                let run: RunRecord = decode(&run_key, &bytes)?;
                run.step == step && run.job_id == join.placeholder
            }
            None => false,
        };
        // The terminal guard: a parent that ended or moved on records
        // nothing; a child records once.
        if !waiting || join.arrived.get(index) != Some(&false) {
            return Ok(None);
        }
        join.arrived[index] = true;
        let seen = ChildOutcome::of(outcome, record::deadline_of(headers));
        if join.fail_fast && seen.status != TerminalStatus::Succeeded {
            join.failed = true;
        }
        let out_key = self.keys.child_outcome(parent, step, index);
        let mut effects =
            SettlementEffects::default().kv_put(out_key.clone(), encode(&out_key, &seen)?);
        let mut arrival = Arrival {
            effects: SettlementEffects::default(),
            pending: None,
            replaced: None,
        };
        if join.failed || join.live() == 0 {
            let job_id = self.queue.next_job_id();
            let options = EnqueueOptions::default()
                .id_override(job_id.clone())
                .headers(join.headers.clone())
                .priority(Some(join.priority))
                .max_attempts(join.max_attempts);
            effects = effects.enqueue(EnqueueRequest {
                queue: self.cfg.queue_name.clone(),
                payload: join.payload.clone(),
                options,
            });
            let run = RunRecord { step, job_id };
            effects = effects.kv_put(run_key.clone(), encode(&run_key, &run)?);
            let replaced = Replaced {
                job: join.placeholder.clone(),
                marker: self.keys.replaced(&join.placeholder),
            };
            effects = effects.kv_put(replaced.marker.clone(), parent.as_bytes().to_vec());
            arrival.pending = Some(self.pending.begin(parent.to_string()));
            arrival.replaced = Some(replaced);
        }
        arrival.effects = effects.kv_put(join_key.clone(), encode(&join_key, &join)?);
        Ok(Some(arrival))
    }

    /// The cascade marker an ending run leaves when it still has live
    /// children at `step` (its final step): they are cancelled by the
    /// cascade pass, durably. A marker an earlier ending left (a re-run
    /// that ended again before the pass came to it) keeps its children:
    /// the new one lists them too.
    pub(crate) async fn cascade_entry(
        &self,
        run_id: &str,
        step: u32,
    ) -> Result<Option<(Vec<u8>, Vec<u8>)>, Error> {
        let join_key = self.keys.join_record(run_id, step);
        let Some(bytes) = self.queue.view().kv_get(&join_key).await? else {
            return Ok(None);
        };
        let join: JoinRecord = decode(&join_key, &bytes)?;
        let mut live: Vec<String> = join
            .children
            .iter()
            .zip(&join.arrived)
            .filter(|(_, arrived)| !**arrived)
            .map(|(id, _)| id.clone())
            .collect();
        if live.is_empty() {
            return Ok(None);
        }
        let key = self.keys.cascade(run_id);
        if let Some(earlier) = self.queue.view().kv_get(&key).await? {
            // One that does not decode is dropped by the pass anyway.
            if let Ok(earlier) = decode::<Vec<String>>(&key, &earlier) {
                let mut listed = earlier;
                listed.retain(|child| !live.contains(child));
                listed.append(&mut live);
                live = listed;
            }
        }
        let value = encode(&key, &live)?;
        Ok(Some((key, value)))
    }

    /// The outcomes recorded for the join at `step` of `run_id`, in spawn
    /// order, and whether a child failed under `fail_fast`.
    ///
    /// Only the join's own children count: a run re-run from before the
    /// join keeps the outcomes of its earlier spawn's children at the same
    /// step (its data is kept), at indices the new spawn may not reach or
    /// (under `fail_fast`) may not have filled yet.
    pub(crate) async fn joined(
        &self,
        run_id: &str,
        step: u32,
    ) -> Result<(Vec<ChildOutcome>, Option<String>), Error> {
        let view = self.queue.view();
        let join_key = self.keys.join_record(run_id, step);
        let join = match view.kv_get(&join_key).await? {
            Some(bytes) => Some(decode::<JoinRecord>(&join_key, &bytes)?),
            None => None,
        };
        let failed = join.as_ref().is_some_and(|j| j.failed);
        let prefix = self.keys.child_outcomes(run_id, step);
        let mut outcomes = Vec::new();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = match &after {
                None => {
                    view.kv_scan(&prefix, .., taquba::KvOrder::Ascending, 256)
                        .await?
                }
                Some(last) => {
                    let range = (
                        std::ops::Bound::Excluded(last.clone()),
                        std::ops::Bound::Unbounded,
                    );
                    view.kv_scan(&prefix, range, taquba::KvOrder::Ascending, 256)
                        .await?
                }
            };
            for (key, value) in &page.entries {
                let outcome = decode::<ChildOutcome>(key, value)?;
                if join
                    .as_ref()
                    .is_none_or(|j| j.children.contains(&outcome.run_id))
                {
                    outcomes.push(outcome);
                }
            }
            after = page.entries.last().map(|(k, _)| k.to_vec());
            if !page.more {
                break;
            }
        }
        let failure = if failed {
            outcomes
                .iter()
                .find(|o| o.status != TerminalStatus::Succeeded)
                .map(|o| {
                    format!(
                        "child `{}` failed: {}",
                        o.run_id,
                        o.error.as_deref().unwrap_or_default()
                    )
                })
        } else {
            None
        };
        Ok((outcomes, failure))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use taquba::{JobStatus, Queue};

    use super::*;
    use crate::hook::NoopTerminalHook;
    use crate::runner::Done;
    use crate::runtime::WorkflowRuntime;

    fn ended(run_id: &str) -> RunOutcome {
        RunOutcome {
            run_id: run_id.into(),
            workflow: "child".into(),
            status: TerminalStatus::Succeeded,
            result: Some(run_id.as_bytes().to_vec()),
            error: None,
            headers: HashMap::new(),
            final_step: 0,
            reruns: 0,
        }
    }

    /// A runtime on a fresh in-memory queue whose run `p` waits at step 1
    /// (job `placeholder`) on `children`, of which `arrived` have arrived;
    /// and the join record's key.
    async fn waiting_parent(
        children: [&str; 2],
        arrived: [bool; 2],
        fail_fast: bool,
    ) -> (Arc<Queue>, WorkflowRuntime<Done, NoopTerminalHook>, Vec<u8>) {
        let store = Arc::new(taquba::object_store::memory::InMemory::new());
        let queue = Arc::new(Queue::open(store, "t").await.unwrap());
        let rt = WorkflowRuntime::builder(queue.clone(), Done, NoopTerminalHook)
            .build()
            .unwrap();
        let run_key = rt.inner.keys.run("p");
        let waiting = RunRecord {
            step: 1,
            job_id: "placeholder".into(),
        };
        queue
            .kv_put(&run_key, &encode(&run_key, &waiting).unwrap())
            .await
            .unwrap();
        let join = JoinRecord {
            placeholder: "placeholder".into(),
            children: children.map(String::from).to_vec(),
            arrived: arrived.to_vec(),
            fail_fast,
            failed: false,
            payload: b"next".to_vec(),
            headers: HashMap::new(),
            priority: 0,
            max_attempts: 3,
        };
        let join_key = rt.inner.keys.join_record("p", 1);
        queue
            .kv_put(&join_key, &encode(&join_key, &join).unwrap())
            .await
            .unwrap();
        (queue, rt, join_key)
    }

    /// Commit the terminal effects of child `outcome`, whose link to its
    /// parent is `parent` (`{parent}/{step}/{index}`).
    async fn child_ends(
        queue: &Queue,
        rt: &WorkflowRuntime<Done, NoopTerminalHook>,
        outcome: &RunOutcome,
        parent: &str,
    ) {
        let headers = HashMap::from([(record::HEADER_PARENT.to_string(), parent.to_string())]);
        let terminal = rt
            .inner
            .terminal_effects(outcome, &headers, None)
            .await
            .unwrap()
            .unwrap();
        queue.commit_effects(terminal.effects).await.unwrap();
        terminal.hold.done(queue, true).await;
    }

    /// A child's terminal effects applied twice (a retried commit) record
    /// it once: the second finds the parent no longer waiting, and neither
    /// writes the outcome again nor moves the parent's run record to a job
    /// its enqueue did not create.
    #[tokio::test]
    async fn a_child_ending_applied_twice_is_recorded_once() {
        let (queue, rt, _) = waiting_parent(["p.0.0", "p.0.1"], [true, false], false).await;
        let inner = &rt.inner;
        let run_key = inner.keys.run("p");
        for _ in 0..2 {
            child_ends(&queue, &rt, &ended("p.0.1"), "p/1/1").await;
        }
        let bytes = queue.view().kv_get(&run_key).await.unwrap().unwrap();
        let run: RunRecord = decode(&run_key, &bytes).unwrap();
        assert_eq!(run.step, 1);
        let job = queue.view().job_record(&run.job_id).await.unwrap();
        assert!(
            job.is_some_and(|j| j.status == JobStatus::Pending && j.payload == b"next"),
            "the parent's step is the job its one arrival enqueued"
        );
        let (outcomes, failed) = inner.joined("p", 1).await.unwrap();
        assert_eq!(failed, None);
        assert_eq!(outcomes.len(), 1, "only this child's outcome is recorded");
        assert_eq!(outcomes[0].run_id, "p.0.1");
    }

    /// A child of an earlier spawn at the same step, ending after the
    /// parent re-ran from that step and spawned again, is not recorded in
    /// the new join under its index: the slot belongs to the new child.
    #[tokio::test]
    async fn a_child_of_an_earlier_spawn_is_not_recorded_in_the_new_join() {
        // Re-run 1's spawn at step 0 waits at step 1 on two new children.
        let (queue, rt, join_key) =
            waiting_parent(["p.0r1.0", "p.0r1.1"], [false, false], true).await;
        let inner = &rt.inner;
        // The first spawn's child 0 fails now.
        let mut old = ended("p.0.0");
        old.status = TerminalStatus::Failed;
        child_ends(&queue, &rt, &old, "p/1/0").await;
        let bytes = queue.view().kv_get(&join_key).await.unwrap().unwrap();
        let after: JoinRecord = decode(&join_key, &bytes).unwrap();
        assert_eq!(after.arrived, [false, false], "the slot is still open");
        assert!(!after.failed, "the old child did not fail the new join");
        let (outcomes, _) = inner.joined("p", 1).await.unwrap();
        assert!(outcomes.is_empty(), "nothing recorded: {outcomes:?}");
        // The new child 0 is recorded.
        child_ends(&queue, &rt, &ended("p.0r1.0"), "p/1/0").await;
        let (outcomes, _) = inner.joined("p", 1).await.unwrap();
        assert_eq!(outcomes.len(), 1);
        assert_eq!(outcomes[0].run_id, "p.0r1.0");
    }

    /// A re-run parent that ends again with live children before the
    /// cascade pass came to its earlier marker wrote its new marker over
    /// it: the earlier ending's children were never cancelled. The new
    /// marker now lists them too.
    #[tokio::test]
    async fn a_second_ending_keeps_the_children_of_the_first_in_its_marker() {
        let (queue, rt, _) = waiting_parent(["p.0r1.0", "p.0r1.1"], [true, false], false).await;
        let inner = &rt.inner;
        let key = inner.keys.cascade("p");
        let earlier = vec!["p.0.0".to_string(), "p.0r1.1".to_string()];
        queue
            .kv_put(&key, &encode(&key, &earlier).unwrap())
            .await
            .unwrap();
        let (at, value) = inner.cascade_entry("p", 1).await.unwrap().unwrap();
        assert_eq!(at, key);
        let listed: Vec<String> = decode(&key, &value).unwrap();
        assert_eq!(listed, ["p.0.0", "p.0r1.1"], "each child once");
    }

    /// A run re-run from before its join keeps its earlier spawn's child
    /// outcomes (its data is kept). The join step saw them: outcomes at
    /// indices the new spawn did not reach, and, when a new child failed
    /// under `fail_fast`, an old child's failure named as the cause.
    #[tokio::test]
    async fn a_join_sees_only_its_own_childrens_outcomes() {
        let (queue, rt, join_key) =
            waiting_parent(["p.0r1.0", "p.0r1.1"], [false, false], true).await;
        let inner = &rt.inner;
        // The earlier spawn's three children, all failed, under indices
        // 0, 1 and 2 (as they arrived before the re-run).
        for i in 0..3 {
            let key = inner.keys.child_outcome("p", 1, i);
            let mut old = ChildOutcome::of(&ended(&format!("p.0.{i}")), None);
            old.status = TerminalStatus::Failed;
            queue
                .kv_put(&key, &encode(&key, &old).unwrap())
                .await
                .unwrap();
        }
        // The new child 1 fails: the join fails fast.
        let mut new = ended("p.0r1.1");
        new.status = TerminalStatus::Failed;
        new.error = Some("new".into());
        child_ends(&queue, &rt, &new, "p/1/1").await;
        let bytes = queue.view().kv_get(&join_key).await.unwrap().unwrap();
        assert!(decode::<JoinRecord>(&join_key, &bytes).unwrap().failed);
        let (outcomes, failed) = inner.joined("p", 1).await.unwrap();
        let ids: Vec<&str> = outcomes.iter().map(|o| o.run_id.as_str()).collect();
        assert_eq!(ids, ["p.0r1.1"]);
        assert_eq!(failed.as_deref(), Some("child `p.0r1.1` failed: new"));
    }
}
