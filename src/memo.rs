//! The durable memo a step's runner keeps: values it computed (a charge's
//! receipt, a remote id) that a later attempt of the step — after a crash,
//! a lost lease or a transient error — reads back instead of calling the
//! service again.
//!
//! A [`Memo`] is a scope of keys: [`Step::memo`](crate::Step::memo) is
//! scoped to the (run, step), [`Step::run_memo`](crate::Step::run_memo) to
//! the run. Entries live in taquba's KV namespace beside the run's records,
//! under `wm/Q/data/{run_id}/memo/{step}/{key}` and
//! `wm/Q/data/{run_id}/memo/run/{key}`; each value is MessagePack
//! (`rmp-serde`) of `(version, value)`. A write is a commit of its own,
//! durable before the call returns, so a result the step goes on to use is
//! never lost by a crash before the step's settlement.
//!
//! Writes are fenced ([`Error::MemoStale`]):
//! - a put commits only while the run's live record still points at the
//!   step job that made the memo, so an attempt whose step has settled (the
//!   run moved on) or whose run has ended cannot write;
//! - and only while the attempt's own claim is held in this process, so an
//!   attempt that outlived its lease cannot write once the queue has taken
//!   the lease back, even while a later claim of the same job runs.
//!
//! The second check is made just before the commit, not inside it (taquba
//! keeps leases in memory): a put that passed it as its lease lapsed can
//! still land. For a value every attempt must agree on, use
//! [`Memo::memoized`]: it writes only a key that is absent, so when two
//! attempts race, the first write wins and both return it.
//!
//! The entries are deleted with the run's terminal record, at
//! `terminal_retention` after the run ends (see `worker::maintenance`).
//!
//! Limits: keys are 1–[`MAX_MEMO_KEY_LEN`] bytes; an encoded value is at
//! most [`MAX_MEMO_VALUE_BYTES`] (KV values are capped at 256 KiB; store a
//! reference to anything larger). The number of entries is not capped, but
//! every entry is a KV row deleted by the retention pass in the batch of
//! its run, so keep it to what a step needs (tens, not thousands).

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use taquba::{LeaseHandle, Queue, SettlementEffects};

use crate::error::Error;
use crate::record::{EXTENT_SCAN, RunRecord, data_extent, decode, encode};

/// The longest memo key, in bytes.
pub const MAX_MEMO_KEY_LEN: usize = 256;
/// The largest encoded memo value, in bytes.
pub const MAX_MEMO_VALUE_BYTES: usize = 192 * 1024;

/// One scope of a run's durable memo: a step's, or the run's (see the
/// [module docs](crate::memo)). Cheap to clone.
#[derive(Clone)]
pub struct Memo {
    attempt: Arc<Attempt>,
    /// The step whose scope this is; `None` for the run's.
    step: Option<u32>,
}

/// What a step attempt's two memo scopes share (one allocation per step).
struct Attempt {
    queue: Arc<Queue>,
    run_id: String,
    /// The run's data prefix (`wm/Q/data/{run_id}/`).
    data: Vec<u8>,
    /// The run's live record, and the step job a write requires it to name.
    run_key: Vec<u8>,
    job_id: String,
    /// The attempt's claim, which a write requires to be held.
    lease: LeaseHandle,
}

impl fmt::Debug for Memo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Memo")
            .field("prefix", &String::from_utf8_lossy(&self.full_key("")))
            .finish()
    }
}

impl Memo {
    /// The step's scope (`Some(step)`) and the run's scope of one attempt.
    pub(crate) fn scopes(
        queue: Arc<Queue>,
        run_id: &str,
        data: Vec<u8>,
        run_key: Vec<u8>,
        job_id: &str,
        step: u32,
        lease: LeaseHandle,
    ) -> (Self, Self) {
        let attempt = Arc::new(Attempt {
            queue,
            run_id: run_id.to_string(),
            data,
            run_key,
            job_id: job_id.to_string(),
            lease,
        });
        let step = Self {
            attempt: attempt.clone(),
            step: Some(step),
        };
        let run = Self {
            attempt,
            step: None,
        };
        (step, run)
    }

    /// `key`'s full key in this scope: `{data}memo/{step}/{key}` or
    /// `{data}memo/run/{key}`.
    fn full_key(&self, key: &str) -> Vec<u8> {
        use std::io::Write;
        let data = &self.attempt.data;
        let mut full = Vec::with_capacity(data.len() + 16 + key.len());
        full.extend_from_slice(data);
        // Writing to a Vec cannot fail.
        let _ = match self.step {
            Some(step) => write!(full, "memo/{step}/"),
            None => write!(full, "memo/run/"),
        };
        full.extend_from_slice(key.as_bytes());
        full
    }

    fn key(&self, key: &str) -> Result<Vec<u8>, Error> {
        let reason = if key.is_empty() {
            Some("it is empty")
        } else if key.len() > MAX_MEMO_KEY_LEN {
            Some("it is longer than 256 bytes")
        } else {
            None
        };
        if let Some(reason) = reason {
            return Err(Error::InvalidMemoKey {
                key: key.chars().take(160).collect(),
                reason,
            });
        }
        Ok(self.full_key(key))
    }

    /// The value memoized under `key`, if any (committed state only).
    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, Error> {
        let full = self.key(key)?;
        match self.attempt.queue.view().kv_get(&full).await? {
            Some(bytes) => Ok(Some(decode(&full, &bytes)?)),
            None => Ok(None),
        }
    }

    /// Memoize `value` under `key`, replacing what was there. Durable when
    /// this returns.
    pub async fn put<T: Serialize>(&self, key: &str, value: &T) -> Result<(), Error> {
        let full = self.key(key)?;
        let bytes = self.encode(&full, value)?;
        self.commit(&full, bytes, false).await.map(|_| ())
    }

    /// The value memoized under `key`; if there is none, run `compute`,
    /// memoize what it returns (durably) and return it. An error of
    /// `compute` is returned as is and nothing is memoized, so the next
    /// attempt computes again. If another attempt memoized the key first,
    /// its value is returned and `compute`'s is dropped.
    ///
    /// A value that is computed but cannot be memoized (too large, or the
    /// step is no longer the run's current one) is an error: the service was
    /// called, so make sure its call is idempotent or its value small.
    pub async fn memoized<T, E, F, Fut>(&self, key: &str, compute: F) -> Result<T, E>
    where
        T: Serialize + DeserializeOwned,
        E: From<Error>,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        if let Some(value) = self.get(key).await? {
            return Ok(value);
        }
        let value = compute().await?;
        let full = self.key(key)?;
        let bytes = self.encode(&full, &value)?;
        if self.commit(&full, bytes, true).await? {
            return Ok(value);
        }
        // Another attempt wrote it between our read and our commit.
        match self.get(key).await? {
            Some(theirs) => Ok(theirs),
            None => Ok(value),
        }
    }

    fn encode<T: Serialize>(&self, full: &[u8], value: &T) -> Result<Vec<u8>, Error> {
        let bytes = encode(full, value)?;
        if bytes.len() > MAX_MEMO_VALUE_BYTES {
            return Err(Error::PayloadTooLarge {
                what: "memo value",
                size: bytes.len(),
                max: MAX_MEMO_VALUE_BYTES,
            });
        }
        Ok(bytes)
    }

    /// Commit one entry while the run's record names this step's job (and,
    /// if `if_absent`, the key is absent). Returns `false` only when
    /// `if_absent` and the key was present.
    async fn commit(&self, full: &[u8], bytes: Vec<u8>, if_absent: bool) -> Result<bool, Error> {
        let scope = &*self.attempt;
        let stale = || Error::MemoStale {
            run_id: scope.run_id.clone(),
            job_id: scope.job_id.clone(),
        };
        loop {
            // A cancel requested of the step leaves its claim held: what it
            // computed may still serve a re-run.
            if let Err(taquba::Error::ClaimLost) = scope.lease.ensure_at_least(Duration::ZERO) {
                return Err(stale());
            }
            let view = scope.queue.view();
            let Some(run) = view.kv_get(&scope.run_key).await? else {
                return Err(stale());
            };
            let record: RunRecord = decode(&scope.run_key, &run)?;
            if record.job_id != scope.job_id {
                return Err(stale());
            }
            let mut compares: Vec<(&[u8], Option<&[u8]>)> = vec![(&scope.run_key, Some(&run))];
            if if_absent {
                compares.push((full, None));
            }
            // Retention finds memo entries by a scan of the run's data.
            let effects = SettlementEffects::default()
                .kv_put(full.to_vec(), bytes.clone())
                .kv_put(data_extent(&scope.data), EXTENT_SCAN);
            if scope
                .queue
                .kv_compare_commit(&compares, effects)
                .await?
                .is_some()
            {
                return Ok(true);
            }
            // Either compare failed: the key exists, or the run moved on.
            if if_absent && view_has(&scope.queue, full).await? {
                return Ok(false);
            }
        }
    }
}

async fn view_has(queue: &Queue, key: &[u8]) -> Result<bool, Error> {
    Ok(queue.view().kv_get(key).await?.is_some())
}
