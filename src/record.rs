//! Durable records, their key layout in taquba's KV namespace, and the
//! validation of the names and headers that go into them.
//!
//! Keys of a runtime whose step queue is `Q` (so runtimes on distinct queue
//! names never share a key):
//!
//! | key                    | record             | lifetime                                     |
//! |------------------------|--------------------|----------------------------------------------|
//! | `wm/Q/run/{run_id}`    | [`RunRecord`]      | submit → termination; rewritten every step   |
//! | `wm/Q/sub/{run_id}`    | [`SubmitRecord`]   | submit → end of the retention window         |
//! | `wm/Q/out/{run_id}`    | [`OutcomeRecord`]  | termination → end of the retention window    |
//! | `wm/Q/exp/{t}{run_id}` | expiry index entry, its value a [`DataSummary`] (empty for a long run, or one written before summaries) | termination → end of the retention window    |
//! | `wm/Q/data/{run_id}/join/{step}`, `…/child/{step}/{i}` | [`JoinRecord`], each child's [`ChildOutcome`](crate::ChildOutcome) | a spawn → end of the retention window |
//! | `wm/Q/cascade/{run_id}` | the children an ended parent must cancel | the parent's terminal transaction → the cascade's pass |
//! | `wm/Q/dl/{t}{run_id}`  | deadline index entry (`t`: the deadline) | submit → termination, or the deadline's pass |
//! | `wm/Q/data/{run_id}/…` | the run's data: memo entries (`memo/{step}/{key}`, `memo/run/{key}`, see [`crate::memo`]), each step's input payload (`input/{step}`, for a re-run), history entries (`hist/{seq}`), and `extent`, which says whether the run's expiry entry names all of it ([`data_extent`]) | first write → end of the retention window |
//!
//! Elsewhere: workflow health under `wm/Q/wf/`, `wm/Q/tally/`, `wm/Q/park/`
//! (`breaker`); client replies under `wm/Q/reply/` and `wm/Q/rexp/`
//! (`control`); the store marker `wm/store` (`store`).
//!
//! Every record is MessagePack of `(version, body)`; a version this build
//! does not know is [`Error::UnsupportedRecordVersion`], never a guess.

use std::collections::HashMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::hook::{RunOutcome, TerminalStatus};

/// The record format version this build reads and writes.
pub(crate) const RECORD_VERSION: u8 = 1;

/// The header carrying a step job's run id.
pub const HEADER_RUN_ID: &str = "workflow.run_id";
/// The header carrying a step job's step number.
pub const HEADER_STEP: &str = "workflow.step";
/// The header carrying a step job's workflow name.
pub const HEADER_WORKFLOW: &str = "workflow.name";
/// The header carrying the attempts a step spent on earlier jobs (a retry,
/// deferral or parking moves a step to a new job).
pub const HEADER_ATTEMPTS_BEFORE: &str = "workflow.attempts_before";
/// The header marking a step job parked by a tripped breaker.
pub const HEADER_PARKED: &str = "workflow.parked";
/// The header marking a step job whose payload carries, beside the step's
/// payload, the signal its wait received: set when a woken step moves to a
/// new job (a retry, a breaker deferral or a parking), so the signal stays
/// with the step. The payload is then a `SignalledPayload` record (the
/// step's payload and the signal, in MessagePack).
pub const HEADER_SIGNAL: &str = "workflow.signal";
/// The header marking a step job that waits for a signal and takes it as a
/// `SentSignal` record (the payload and who sent it) on its
/// `JobRecord::signal`, so the signal's own commit says which request
/// delivered it. A wait without it (from an earlier Waymark) takes the bare
/// payload.
pub const HEADER_SIGNAL_SENDER: &str = "workflow.signal_sender";
/// The header carrying how many times the run was re-run from a step
/// (absent on the first segment).
pub const HEADER_RERUN: &str = "workflow.rerun";
/// The header carrying a run's deadline, ms since the Unix epoch on the
/// queue clock (absent: no deadline). Every step job of the run carries it.
pub const HEADER_DEADLINE: &str = "workflow.deadline";
/// The header linking a child run's step jobs to its parent:
/// `{parent run id}/{the parent's waiting step}/{the child's index}` (run ids
/// hold no `/`).
pub const HEADER_PARENT: &str = "workflow.parent";
/// The header marking the parent's step that joins its children: on the
/// placeholder job that waits for them, and on the step job that runs once
/// they are all in.
pub const HEADER_JOIN: &str = "workflow.join";
/// The header counting a run's segments started by
/// [`StepOutcome::ContinueAsNew`](crate::StepOutcome::ContinueAsNew) (absent
/// on the first).
pub const HEADER_SEGMENT: &str = "workflow.segment";
/// The most children one step may spawn.
pub const MAX_CHILDREN: usize = 1000;
/// Headers with this prefix are the runtime's; a submit may not set them.
pub const RESERVED_HEADER_PREFIX: &str = "workflow.";

/// The name of the workflow of a run submitted without one.
pub const DEFAULT_WORKFLOW: &str = "default";

/// The longest run id accepted, in bytes.
pub const MAX_RUN_ID_LEN: usize = 128;
/// The most bytes of headers (keys plus values) a submit may carry.
pub const MAX_HEADERS_BYTES: usize = 16 * 1024;
/// The largest run input or step payload accepted, in bytes. Larger ones are
/// offloaded to their own object by taquba, so this bounds memory, not KV.
pub const MAX_PAYLOAD_BYTES: usize = 8 * 1024 * 1024;
/// The largest step input payload kept for a re-run (see
/// `WorkflowRuntimeBuilder::keep_step_inputs`), in bytes: it lives in KV,
/// whose values taquba caps at 256 KiB. A step whose input is larger cannot
/// be re-run from.
pub const MAX_KEPT_INPUT_BYTES: usize = 192 * 1024;
/// The largest run result or failure reason kept in a terminal record, in
/// bytes (the record lives in KV, whose values taquba caps at 256 KiB).
pub const MAX_RESULT_BYTES: usize = 192 * 1024;

/// The largest signal payload accepted, in bytes. It is kept on the waiting
/// step job's record: pass a reference for larger data.
pub const MAX_SIGNAL_BYTES: usize = 64 * 1024;

/// The live record of a run: where it is. Written at submit and by every
/// step transition, in the transaction that settles the step; deleted in the
/// transaction that terminates the run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RunRecord {
    /// The step the run is at.
    pub step: u32,
    /// The queue job that carries that step.
    pub job_id: String,
}

/// The payload of a step job with [`HEADER_SIGNAL`]: the step's payload and
/// the signal its wait received.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SignalledPayload {
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub signal: Vec<u8>,
}

/// A signal as a wait with [`HEADER_SIGNAL_SENDER`] takes it: the payload
/// and the client request that sent it (`None`: a direct
/// `WorkflowRuntime::signal`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SentSignal {
    pub sender: Option<String>,
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

impl SentSignal {
    /// The signal on the record of job `job` (with its `headers`): its
    /// payload and sender (`None` for a bare payload).
    pub(crate) fn of(
        job: &str,
        headers: &HashMap<String, String>,
        signal: &[u8],
    ) -> Result<Self, Error> {
        if headers.contains_key(HEADER_SIGNAL_SENDER) {
            decode(job.as_bytes(), signal)
        } else {
            Ok(Self {
                sender: None,
                payload: signal.to_vec(),
            })
        }
    }
}

/// A parent's wait for the children one of its steps spawned, at
/// `wm/Q/data/{parent}/join/{step}` (`step`: the waiting step). Rewritten
/// in each child's terminal transaction (under the parent's join lock).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct JoinRecord {
    /// The scheduled job the parent's run record points at while it waits.
    pub placeholder: String,
    /// The children's run ids, in spawn order.
    pub children: Vec<String>,
    /// Whose terminal outcome is recorded (same order).
    pub arrived: Vec<bool>,
    /// End the parent at the first failed child.
    pub fail_fast: bool,
    /// A child failed under `fail_fast`: the parent's step ends it.
    pub failed: bool,
    /// The waiting step's payload, headers, priority and attempts, for its
    /// job once the children are in.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    pub headers: HashMap<String, String>,
    pub priority: u32,
    pub max_attempts: u32,
}

impl JoinRecord {
    /// How many children have not ended.
    pub(crate) fn live(&self) -> usize {
        self.arrived.iter().filter(|a| !**a).count()
    }
}

/// The parent link of a child's step job: its parent, the parent's waiting
/// step and the child's index.
pub(crate) fn parent_of(headers: &HashMap<String, String>) -> Option<(&str, u32, usize)> {
    let mut parts = headers.get(HEADER_PARENT)?.splitn(3, '/');
    let parent = parts.next()?;
    let step = parts.next()?.parse().ok()?;
    let index = parts.next()?.parse().ok()?;
    Some((parent, step, index))
}

/// What a submit fixed: kept from submit until the terminal record expires,
/// so a repeated submit is recognised while the run lives and after it ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SubmitRecord {
    /// SHA-256 of the input.
    pub input_sha256: [u8; 32],
    /// Submission time, ms since the Unix epoch (queue clock).
    pub submitted_at_ms: u64,
    /// The submitter's headers.
    pub headers: HashMap<String, String>,
}

/// The terminal record of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct OutcomeRecord {
    #[serde(default)]
    pub workflow: String,
    pub status: TerminalStatus,
    #[serde(with = "serde_bytes")]
    pub result: Option<Vec<u8>>,
    pub error: Option<String>,
    pub headers: HashMap<String, String>,
    pub final_step: u32,
    /// Termination time, ms since the Unix epoch (queue clock).
    pub finished_at_ms: u64,
    /// The re-run this ending belongs to (0: the first segment).
    #[serde(default)]
    pub reruns: u32,
}

impl OutcomeRecord {
    pub(crate) fn into_outcome(self, run_id: &str) -> RunOutcome {
        RunOutcome {
            run_id: run_id.to_string(),
            workflow: self.workflow,
            status: self.status,
            result: self.result,
            error: self.error,
            headers: self.headers,
            final_step: self.final_step,
            reruns: self.reruns,
        }
    }
}

/// Encode a record body with the format version in front.
pub(crate) fn encode<T: Serialize>(key: &[u8], body: &T) -> Result<Vec<u8>, Error> {
    rmp_serde::to_vec_named(&(RECORD_VERSION, body)).map_err(|e| Error::CorruptRecord {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    })
}

/// Decode a record written by [`encode`]; `name` says where it came from.
pub(crate) fn decode<T: DeserializeOwned>(name: &[u8], bytes: &[u8]) -> Result<T, Error> {
    let key = || String::from_utf8_lossy(name).into_owned();
    let (version, _): (u8, serde::de::IgnoredAny) =
        rmp_serde::from_slice(bytes).map_err(|e| Error::CorruptRecord {
            key: key(),
            reason: e.to_string(),
        })?;
    if version != RECORD_VERSION {
        return Err(Error::UnsupportedRecordVersion {
            key: key(),
            found: version,
            supported: RECORD_VERSION,
        });
    }
    let (_, body): (u8, T) = rmp_serde::from_slice(bytes).map_err(|e| Error::CorruptRecord {
        key: key(),
        reason: e.to_string(),
    })?;
    Ok(body)
}

/// The key layout of one runtime (one step queue name).
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    run: Vec<u8>,
    sub: Vec<u8>,
    out: Vec<u8>,
    exp: Vec<u8>,
    data: Vec<u8>,
    deadline: Vec<u8>,
    cascade: Vec<u8>,
    replaced: Vec<u8>,
}

impl Keys {
    pub(crate) fn new(queue_name: &str) -> Self {
        let base = format!("wm/{queue_name}/");
        let with = |kind: &str| format!("{base}{kind}/").into_bytes();
        Self {
            run: with("run"),
            sub: with("sub"),
            out: with("out"),
            exp: with("exp"),
            data: with("data"),
            deadline: with("dl"),
            cascade: with("cascade"),
            replaced: with("replaced"),
        }
    }

    fn join(prefix: &[u8], run_id: &str) -> Vec<u8> {
        let mut key = Vec::with_capacity(prefix.len() + run_id.len());
        key.extend_from_slice(prefix);
        key.extend_from_slice(run_id.as_bytes());
        key
    }

    pub(crate) fn run(&self, run_id: &str) -> Vec<u8> {
        Self::join(&self.run, run_id)
    }

    pub(crate) fn sub(&self, run_id: &str) -> Vec<u8> {
        Self::join(&self.sub, run_id)
    }

    pub(crate) fn out(&self, run_id: &str) -> Vec<u8> {
        Self::join(&self.out, run_id)
    }

    /// The prefix of every key of the run's data (memo entries), deleted
    /// with its terminal record. Run ids hold no `/`, so no run's prefix is
    /// another's.
    pub(crate) fn data(&self, run_id: &str) -> Vec<u8> {
        let mut key = Self::join(&self.data, run_id);
        key.push(b'/');
        key
    }

    /// The kept input payload of step `step` (for a re-run).
    pub(crate) fn input(&self, run_id: &str, step: u32) -> Vec<u8> {
        let mut key = self.data(run_id);
        key.extend_from_slice(format!("input/{step}").as_bytes());
        key
    }

    /// The prefix of a run's history entries.
    pub(crate) fn history_prefix(&self, run_id: &str) -> Vec<u8> {
        let mut key = self.data(run_id);
        key.extend_from_slice(b"hist/");
        key
    }

    /// The key of entry `seq` of a run's history.
    pub(crate) fn history_entry(&self, run_id: &str, seq: u64) -> Vec<u8> {
        let mut key = self.history_prefix(run_id);
        key.extend_from_slice(format!("{seq:020}").as_bytes());
        key
    }

    /// The key that says how retention finds the run's data (see
    /// [`data_extent`]).
    pub(crate) fn data_extent(&self, run_id: &str) -> Vec<u8> {
        data_extent(&self.data(run_id))
    }

    /// The join record of the parent's waiting step `step`.
    pub(crate) fn join_record(&self, run_id: &str, step: u32) -> Vec<u8> {
        let mut key = self.data(run_id);
        key.extend_from_slice(format!("join/{step}").as_bytes());
        key
    }

    /// The prefix of the children's outcomes recorded for waiting step
    /// `step` (each under its spawn index, zero-padded: key order is spawn
    /// order).
    pub(crate) fn child_outcomes(&self, run_id: &str, step: u32) -> Vec<u8> {
        let mut key = self.data(run_id);
        key.extend_from_slice(format!("child/{step}/").as_bytes());
        key
    }

    /// The outcome of child `index` recorded for waiting step `step`.
    pub(crate) fn child_outcome(&self, run_id: &str, step: u32, index: usize) -> Vec<u8> {
        let mut key = self.child_outcomes(run_id, step);
        key.extend_from_slice(format!("{index:05}").as_bytes());
        key
    }

    /// The cascade marker of an ended parent whose children must be
    /// cancelled.
    pub(crate) fn cascade(&self, run_id: &str) -> Vec<u8> {
        Self::join(&self.cascade, run_id)
    }

    /// The prefix of every cascade marker.
    pub(crate) fn cascade_prefix(&self) -> &[u8] {
        &self.cascade
    }

    /// The marker of a joined parent's placeholder job `job_id`, written in
    /// the transaction that replaced it with the real step job: the job is
    /// removed (and the marker with it) after that commit, or by the
    /// maintenance pass after a crash.
    pub(crate) fn replaced(&self, job_id: &str) -> Vec<u8> {
        Self::join(&self.replaced, job_id)
    }

    /// The prefix of every replaced-placeholder marker.
    pub(crate) fn replaced_prefix(&self) -> &[u8] {
        &self.replaced
    }

    /// The prefix of every live run record.
    pub(crate) fn run_prefix(&self) -> &[u8] {
        &self.run
    }

    /// The prefix of every terminal record.
    pub(crate) fn out_prefix(&self) -> &[u8] {
        &self.out
    }

    pub(crate) fn expiry_prefix(&self) -> &[u8] {
        &self.exp
    }

    /// The prefix of the deadline index: `{prefix}{deadline ms}{run_id}`.
    pub(crate) fn deadline_prefix(&self) -> &[u8] {
        &self.deadline
    }
}

/// The key under a run's data prefix `data` that says how retention finds
/// the run's data: [`EXTENT_NAMED`] when its [`DataSummary`] names all of
/// it, [`EXTENT_SCAN`] when a commit wrote keys no summary names (a memo
/// entry, a join's records, a re-run over the run's earlier steps). Submit
/// writes it `named`, and only submit: the run has no data yet. A memo
/// put, a spawn and a re-run write it `scan` in their own transactions; a
/// child's arrival writes under a join whose spawn did. A new segment
/// deletes it with the rest of the run's data. A run without it (a new
/// segment, or a run created before this key existed) is scanned.
pub(crate) fn data_extent(data: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(data.len() + 6);
    key.extend_from_slice(data);
    key.extend_from_slice(b"extent");
    key
}

/// [`data_extent`]: the summary names all of the run's data.
pub(crate) const EXTENT_NAMED: &[u8] = b"named";
/// [`data_extent`]: the run's data holds keys no summary names.
pub(crate) const EXTENT_SCAN: &[u8] = b"scan";

/// What an ended run's data holds when its [`data_extent`] is
/// [`EXTENT_NAMED`]: its kept step inputs (`input/0` to `input/{inputs_to}`),
/// its history entries (`hist/0` up to `history_to`, excluded) and the
/// extent key itself. It is the value of the
/// run's expiry entry, so retention deletes those keys by name, without a
/// scan of the run's prefix. A scan opens every recent table of the store;
/// a delete by name reads nothing.
///
/// The ranges start at 0, not at the bounded history's window: a run whose
/// history limit was lowered while it ran keeps entries below the window
/// for good, and they are deleted all the same. A name that holds nothing
/// costs one tombstone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DataSummary {
    /// The last step whose input may be kept: the run's final step.
    pub inputs_to: u32,
    /// One past the last history entry the run may have.
    pub history_to: u64,
}

/// The most inputs and history entries a [`DataSummary`] names (with the
/// extent key, one more key); the data of a run with more is found by a
/// scan.
pub(crate) const MAX_SUMMARY_KEYS: u64 = 512;

impl DataSummary {
    /// The summary of a run ending at step `final_step` whose next history
    /// entry would be `next_history` (one more is counted: the ending's own
    /// entry). `None` when it names more than [`MAX_SUMMARY_KEYS`] keys.
    pub(crate) fn of(final_step: u32, next_history: u64) -> Option<Self> {
        let summary = Self {
            inputs_to: final_step,
            history_to: next_history.saturating_add(1),
        };
        let named = u64::from(final_step)
            .saturating_add(1)
            .saturating_add(summary.history_to);
        (named <= MAX_SUMMARY_KEYS).then_some(summary)
    }

    /// Every key the summary names for run `run_id` (the extent key last),
    /// or `None` when it
    /// names more than [`MAX_SUMMARY_KEYS`] (a summary that does not come
    /// from [`Self::of`]: read from the store).
    pub(crate) fn keys(&self, keys: &Keys, run_id: &str) -> Option<Vec<Vec<u8>>> {
        let inputs = u64::from(self.inputs_to).saturating_add(1);
        if inputs.saturating_add(self.history_to) > MAX_SUMMARY_KEYS {
            return None;
        }
        let mut named = Vec::with_capacity(usize::try_from(inputs + self.history_to + 1).ok()?);
        named.extend((0..=self.inputs_to).map(|step| keys.input(run_id, step)));
        named.extend((0..self.history_to).map(|seq| keys.history_entry(run_id, seq)));
        named.push(keys.data_extent(run_id));
        Some(named)
    }
}

/// Check a run id or workflow name: 1–128 bytes of `[A-Za-z0-9._:-]`.
pub fn validate_name(what: &'static str, value: &str) -> Result<(), Error> {
    let reason = if value.is_empty() {
        Some("it is empty")
    } else if value.len() > MAX_RUN_ID_LEN {
        Some("it is longer than 128 bytes")
    } else if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
    {
        Some("only ASCII letters, digits and `.` `_` `:` `-` are allowed")
    } else {
        None
    };
    match reason {
        None => Ok(()),
        Some(reason) => Err(Error::InvalidRunId {
            what,
            value: value.chars().take(160).collect(),
            reason,
        }),
    }
}

/// Check submitted headers: no reserved key, bounded total size.
pub fn validate_headers(headers: &HashMap<String, String>) -> Result<(), Error> {
    if let Some(key) = headers
        .keys()
        .find(|k| k.starts_with(RESERVED_HEADER_PREFIX))
    {
        return Err(Error::ReservedHeaderInSubmit(key.clone()));
    }
    let size: usize = headers.iter().map(|(k, v)| k.len() + v.len()).sum();
    if size > MAX_HEADERS_BYTES {
        return Err(Error::PayloadTooLarge {
            what: "headers",
            size,
            max: MAX_HEADERS_BYTES,
        });
    }
    Ok(())
}

/// The run id and step number a step job's headers name, or why they don't.
pub(crate) fn parse_step_headers(headers: &HashMap<String, String>) -> Result<(&str, u32), String> {
    let run_id = headers
        .get(HEADER_RUN_ID)
        .ok_or_else(|| format!("step job has no `{HEADER_RUN_ID}` header"))?;
    validate_name("run id", run_id)
        .map_err(|e| format!("step job header `{HEADER_RUN_ID}`: {e}"))?;
    let step = headers
        .get(HEADER_STEP)
        .ok_or_else(|| format!("step job has no `{HEADER_STEP}` header"))?;
    let step = step
        .parse::<u32>()
        .map_err(|_| format!("step job header `{HEADER_STEP}` is `{step}`, not a step number"))?;
    Ok((run_id, step))
}

/// The workflow and the attempts spent on earlier jobs that a step job's
/// headers name (`default` and 0 when absent), or why they are malformed.
pub(crate) fn parse_step_extras(headers: &HashMap<String, String>) -> Result<(&str, u32), String> {
    let workflow = match headers.get(HEADER_WORKFLOW) {
        Some(name) => {
            validate_name("workflow name", name)
                .map_err(|e| format!("step job header `{HEADER_WORKFLOW}`: {e}"))?;
            name.as_str()
        }
        None => DEFAULT_WORKFLOW,
    };
    let before = match headers.get(HEADER_ATTEMPTS_BEFORE) {
        Some(n) => n.parse::<u32>().map_err(|_| {
            format!("step job header `{HEADER_ATTEMPTS_BEFORE}` is `{n}`, not a count")
        })?,
        None => 0,
    };
    Ok((workflow, before))
}

/// The re-run a step job belongs to (its `workflow.rerun` header; 0 when
/// absent or malformed).
pub(crate) fn rerun_of(headers: &HashMap<String, String>) -> u32 {
    headers
        .get(HEADER_RERUN)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The deadline a step job's headers carry (ms, queue clock), if any.
pub(crate) fn deadline_of(headers: &HashMap<String, String>) -> Option<u64> {
    headers.get(HEADER_DEADLINE).and_then(|n| n.parse().ok())
}

/// The error of a run that timed out at deadline `at_ms`.
pub(crate) fn timed_out_reason(at_ms: u64) -> String {
    format!("the run's deadline passed ({at_ms} ms since the Unix epoch, queue clock)")
}

/// The segment a step job belongs to (its `workflow.segment` header; 0
/// when absent or malformed).
pub(crate) fn segment_of(headers: &HashMap<String, String>) -> u32 {
    headers
        .get(HEADER_SEGMENT)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Set header `key` to `value`, keeping the key's allocation when the header
/// is there already (a step's next job rewrites the headers it carries).
pub(crate) fn set_header(headers: &mut HashMap<String, String>, key: &str, value: String) {
    match headers.get_mut(key) {
        Some(slot) => *slot = value,
        None => {
            headers.insert(key.to_string(), value);
        }
    }
}

/// The submitter's headers of a step job: all but the reserved keys.
pub(crate) fn user_headers(headers: &HashMap<String, String>) -> HashMap<String, String> {
    headers
        .iter()
        .filter(|(k, _)| !k.starts_with(RESERVED_HEADER_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Bound a terminal error message so the terminal record always fits in KV.
pub(crate) fn bounded_reason(reason: String) -> String {
    bounded(reason, MAX_RESULT_BYTES)
}

/// Cut `text` to at most `max` bytes (on a char boundary), marking the cut.
pub(crate) fn bounded(text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let mut cut = max;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}… (truncated)", &text[..cut])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A summary names every input up to the final step and every history
    /// entry from 0 (entries below a lowered history window included), and
    /// its run's extent key; past [`MAX_SUMMARY_KEYS`] there is none.
    #[test]
    fn a_summary_names_inputs_and_history_from_zero_up_to_a_bound() {
        let keys = Keys::new("Q");
        let summary = DataSummary::of(2, 3).unwrap();
        assert_eq!(
            summary,
            DataSummary {
                inputs_to: 2,
                history_to: 4
            }
        );
        let named: Vec<String> = summary
            .keys(&keys, "r")
            .unwrap()
            .iter()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect();
        let hist = |n: u32| format!("wm/Q/data/r/hist/{n:020}");
        assert_eq!(
            named,
            [
                "wm/Q/data/r/input/0".to_string(),
                "wm/Q/data/r/input/1".into(),
                "wm/Q/data/r/input/2".into(),
                hist(0),
                hist(1),
                hist(2),
                hist(3),
                "wm/Q/data/r/extent".into(),
            ]
        );
        // 200 inputs and 312 entries are the most; one more is a scan.
        assert!(DataSummary::of(199, 311).is_some());
        assert!(DataSummary::of(199, 312).is_none());
        assert!(DataSummary::of(u32::MAX, u64::MAX).is_none());
        let read = DataSummary {
            inputs_to: 0,
            history_to: u64::MAX,
        };
        assert_eq!(read.keys(&keys, "r"), None, "a summary read from the store");
    }

    #[test]
    fn names_are_validated() {
        assert!(validate_name("run id", "order-42:retry_1.a").is_ok());
        for bad in ["", "has space", "slash/", "é", &"x".repeat(129)] {
            assert!(matches!(
                validate_name("run id", bad),
                Err(Error::InvalidRunId { .. })
            ));
        }
        assert!(validate_name("run id", &"x".repeat(128)).is_ok());
    }

    #[test]
    fn records_round_trip_and_reject_other_versions() {
        let rec = RunRecord {
            step: 7,
            job_id: "01J".into(),
        };
        let bytes = encode(b"k", &rec).unwrap();
        assert_eq!(decode::<RunRecord>(b"k", &bytes).unwrap(), rec);

        let future = rmp_serde::to_vec_named(&(2u8, &rec)).unwrap();
        assert!(matches!(
            decode::<RunRecord>(b"k", &future),
            Err(Error::UnsupportedRecordVersion { found: 2, .. })
        ));
        assert!(matches!(
            decode::<RunRecord>(b"k", b"\xc1garbage"),
            Err(Error::CorruptRecord { .. })
        ));
        // A record of another kind does not pass for this one.
        let sub = SubmitRecord {
            input_sha256: [0; 32],
            submitted_at_ms: 1,
            headers: HashMap::new(),
        };
        let bytes = encode(b"k", &sub).unwrap();
        assert!(decode::<RunRecord>(b"k", &bytes).is_err());
    }

    #[test]
    fn step_headers_parse() {
        let mut h = HashMap::new();
        assert!(parse_step_headers(&h).is_err());
        h.insert(HEADER_RUN_ID.to_string(), "r1".to_string());
        assert!(parse_step_headers(&h).is_err());
        h.insert(HEADER_STEP.to_string(), "x".to_string());
        assert!(
            parse_step_headers(&h)
                .unwrap_err()
                .contains("not a step number")
        );
        h.insert(HEADER_STEP.to_string(), "3".to_string());
        assert_eq!(parse_step_headers(&h).unwrap(), ("r1", 3));
        h.insert(HEADER_RUN_ID.to_string(), "bad id".to_string());
        assert!(parse_step_headers(&h).is_err());
    }

    #[test]
    fn headers_are_checked() {
        let mut h = HashMap::new();
        h.insert("tenant".to_string(), "a".to_string());
        assert!(validate_headers(&h).is_ok());
        h.insert("workflow.x".to_string(), "a".to_string());
        assert!(matches!(
            validate_headers(&h),
            Err(Error::ReservedHeaderInSubmit(k)) if k == "workflow.x"
        ));
        let mut big = HashMap::new();
        big.insert("k".to_string(), "v".repeat(MAX_HEADERS_BYTES));
        assert!(matches!(
            validate_headers(&big),
            Err(Error::PayloadTooLarge { .. })
        ));
    }

    #[test]
    fn long_reasons_are_cut_on_a_char_boundary() {
        let r = bounded_reason("é".repeat(MAX_RESULT_BYTES));
        assert!(r.len() <= MAX_RESULT_BYTES + 32);
        assert!(r.ends_with("(truncated)"));
    }
}

#[cfg(test)]
mod proptests;
