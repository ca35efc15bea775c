//! What a benchmark step does, shared by Waymark's runner and the raw taquba
//! handler so both sides run the same code: echo the payload forward, and
//! time the gap between one step's return and the next step's call.
//!
//! A payload is `PAYLOAD_LEN` bytes: the instant the previous step returned
//! (ns since the process's epoch, little endian), then filler. Step 0's
//! input carries 0 and records no gap.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

pub const PAYLOAD_LEN: usize = 32;
const FILLER: u8 = b'w';

/// Steps per run that means "until told to finish".
pub const UNTIL_FINISH: u32 = u32::MAX;

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ns() -> u64 {
    epoch().elapsed().as_nanos() as u64
}

/// Step 0's input.
pub fn input() -> Vec<u8> {
    let mut p = vec![FILLER; PAYLOAD_LEN];
    p[..8].copy_from_slice(&0u64.to_le_bytes());
    p
}

/// What the run does after a step.
pub enum Next {
    Continue(Vec<u8>),
    Finish,
}

/// One measurement's step logic and its observations.
pub struct Plan {
    steps_per_run: u32,
    /// Gaps are recorded only for runs whose id starts with this (all runs
    /// when empty).
    record_prefix: &'static str,
    finish: AtomicBool,
    started: AtomicU64,
    finished_runs: AtomicU64,
    bad_payloads: AtomicU64,
    gaps_ns: Mutex<Vec<u64>>,
}

impl Plan {
    pub fn new(steps_per_run: u32, record_prefix: &'static str) -> Self {
        epoch();
        Self {
            steps_per_run,
            record_prefix,
            finish: AtomicBool::new(false),
            started: AtomicU64::new(0),
            finished_runs: AtomicU64::new(0),
            bad_payloads: AtomicU64::new(0),
            gaps_ns: Mutex::new(Vec::new()),
        }
    }

    /// The step body. `run_id` and `step` come from the job; `payload` is
    /// what the previous step returned.
    pub fn on_step(&self, run_id: &str, step: u32, payload: &[u8]) -> Next {
        let called = now_ns();
        self.started.fetch_add(1, Ordering::Relaxed);
        if payload.len() != PAYLOAD_LEN || payload[8..].iter().any(|&b| b != FILLER) {
            self.bad_payloads.fetch_add(1, Ordering::Relaxed);
        }
        if step > 0 && run_id.starts_with(self.record_prefix) && payload.len() >= 8 {
            let returned = u64::from_le_bytes(payload[..8].try_into().unwrap());
            self.gaps_ns
                .lock()
                .unwrap()
                .push(called.saturating_sub(returned));
        }
        let last = self.steps_per_run != UNTIL_FINISH && step + 1 >= self.steps_per_run;
        if last || self.finish.load(Ordering::Relaxed) {
            self.finished_runs.fetch_add(1, Ordering::Relaxed);
            return Next::Finish;
        }
        let mut next = payload.to_vec();
        next.resize(PAYLOAD_LEN, FILLER);
        next[..8].copy_from_slice(&now_ns().to_le_bytes());
        Next::Continue(next)
    }

    /// Every run's next step finishes it.
    pub fn finish_all(&self) {
        self.finish.store(true, Ordering::Relaxed);
    }

    pub fn started(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
    }

    pub fn finished_runs(&self) -> u64 {
        self.finished_runs.load(Ordering::Relaxed)
    }

    pub fn bad_payloads(&self) -> u64 {
        self.bad_payloads.load(Ordering::Relaxed)
    }

    /// Take (and clear) the gaps recorded so far, in seconds.
    pub fn take_gaps(&self) -> Vec<f64> {
        std::mem::take(&mut *self.gaps_ns.lock().unwrap())
            .into_iter()
            .map(|ns| ns as f64 / 1e9)
            .collect()
    }
}

/// p50 and p99 (nearest rank) of `samples`, in the samples' unit; `None`
/// when there are none.
pub fn percentiles(mut samples: Vec<f64>) -> Option<(f64, f64)> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| {
        let rank = (q * samples.len() as f64).ceil() as usize;
        samples[rank.clamp(1, samples.len()) - 1]
    };
    Some((at(0.50), at(0.99)))
}
