//! Real processes: your own test binary re-executed as a worker process on
//! a directory, and SIGKILLed at seeded moments.
//!
//! The simulated crashes of [`TestKit`](super::TestKit) cut a process at a
//! point of a step. A real kill strikes anywhere — inside SlateDB, between
//! two writes of a file — so a test that means it runs the worker as a
//! separate process and kills it. The technique:
//!
//! 1. The test binary holds an ignored test (say `worker_process`) that
//!    does nothing unless [`worker_arg`] finds the kit's environment
//!    variable; then it is the worker: it opens the store in the directory,
//!    runs your runtime, prints [`READY`] once its pool runs (see
//!    [`announce_ready`]), and works until killed.
//! 2. The driving test starts it with [`WorkerProcess::spawn`] (which
//!    re-executes [`std::env::current_exe`] with `--exact worker_process
//!    --ignored`), waits for [`READY`] or not, sleeps for the next
//!    [`Kill`] of a [`KillSchedule`] drawn from a seed, SIGKILLs it, checks
//!    the durable state, and starts the next one on the same directory.
//!
//! The seed comes from [`seed_from_env`](super::seed_from_env) (printed at
//! the start, so a failure's output says how to replay it), and
//! [`KillSchedule`] is a function of the seed alone: the same seed replays
//! the same kill sequence. A [`TestDir`] is kept (its path printed) when
//! the test fails, for a post-mortem.
//!
//! Only one process may open a store at a time (taquba has one writer): the
//! driver opens it itself only between workers.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub use rustix::process::Signal;
use rustix::process::{Pid, kill_process};

use super::faults::Rng;

/// The environment variable that makes the re-executed binary a worker;
/// its value is the argument the driver gave [`WorkerProcess::spawn`].
pub const WORKER_ENV: &str = "WAYMARK_TESTKIT_WORKER";

/// The line a worker prints once its pool runs.
pub const READY: &str = "WAYMARK-READY";

/// In the re-executed binary: the argument the driver passed, when this
/// process is a worker it started; `None` in an ordinary test run (the
/// worker test then returns at once).
pub fn worker_arg() -> Option<String> {
    std::env::var(WORKER_ENV).ok()
}

/// In a worker: tell the driver the pool runs (prints [`READY`] on stdout).
pub fn announce_ready() {
    println!("{READY}");
}

/// A worker process: the test binary re-executed to run one test.
pub struct WorkerProcess {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: PathBuf,
}

impl WorkerProcess {
    /// Re-execute this test binary to run the (ignored) test `test` alone,
    /// with [`WORKER_ENV`] set to `arg`; its stderr goes to
    /// `stderr_file`, its stdout lines to [`Self::wait_line`].
    pub fn spawn(test: &str, arg: &str, stderr_file: &Path) -> std::io::Result<Self> {
        let stderr = File::create(stderr_file)?;
        let mut child = Command::new(std::env::current_exe()?)
            .args([
                "--exact",
                test,
                "--nocapture",
                "--ignored",
                "--test-threads=1",
            ])
            .env(WORKER_ENV, arg)
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()?;
        let (tx, lines) = mpsc::channel();
        if let Some(out) = child.stdout.take() {
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Ok(Self {
            child,
            lines,
            stderr: stderr_file.to_path_buf(),
        })
    }

    /// Wait for a stdout line containing `marker` and return it; `Err`
    /// with the reason (and the worker's stderr) if it exits first or
    /// `limit` passes.
    pub fn wait_line(&mut self, marker: &str, limit: Duration) -> Result<String, String> {
        // A limit past what an `Instant` can hold waits without end.
        let deadline = Instant::now().checked_add(limit);
        loop {
            let left = deadline.map_or(limit, |d| d.saturating_duration_since(Instant::now()));
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(marker) => return Ok(line),
                Ok(_) => continue,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "no `{marker}` within {limit:?}\n--- worker stderr ---\n{}",
                        self.stderr_tail()
                    ));
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self
                        .child
                        .wait()
                        .map(|s| s.to_string())
                        .unwrap_or_else(|e| e.to_string());
                    return Err(format!(
                        "the worker exited ({status}) before `{marker}`\n--- worker stderr ---\n{}",
                        self.stderr_tail()
                    ));
                }
            }
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Send `signal` (e.g. [`Signal::STOP`] to freeze it, [`Signal::CONT`]
    /// to wake it, [`Signal::TERM`] to ask it to stop).
    pub fn signal(&self, signal: Signal) -> Result<(), String> {
        kill_process(Pid::from_child(&self.child), signal)
            .map_err(|e| format!("sending {signal:?} to the worker failed: {e}"))
    }

    /// SIGKILL the process; `Err` if it had already exited by itself.
    pub fn kill(mut self) -> Result<(), String> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Err(format!(
                "the worker exited by itself: {status}\n--- worker stderr ---\n{}",
                self.stderr_tail()
            ));
        }
        self.child.kill().map_err(|e| e.to_string())?;
        self.child.wait().map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Wait for the process to exit by itself.
    pub fn wait(mut self) -> Result<ExitStatus, String> {
        self.child.wait().map_err(|e| e.to_string())
    }

    /// The last 40 lines of its stderr.
    pub fn stderr_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// When one kill strikes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kill {
    /// Measured from the spawn (often during open and recovery) rather
    /// than from [`READY`].
    pub from_spawn: bool,
    /// How long after that moment.
    pub after: Duration,
}

/// A seeded sequence of kills: a share (`early_per_mille`) timed from the
/// spawn within `early`, the others from [`READY`] within `late`. A
/// function of the seed alone, so a seed replays its kill sequence.
#[derive(Debug, Clone)]
pub struct KillSchedule {
    rng: Rng,
    /// Per-mille of kills timed from the spawn.
    pub early_per_mille: u64,
    /// The range (ms) of a kill timed from the spawn.
    pub early: std::ops::Range<u64>,
    /// The range (ms) of a kill timed from [`READY`].
    pub late: std::ops::Range<u64>,
}

impl KillSchedule {
    /// The schedule of `seed`: 15% of kills within 60 ms of the spawn, the
    /// others 10-400 ms after [`READY`].
    pub fn new(seed: u64) -> Self {
        Self {
            rng: Rng::derive(seed, &[4]),
            early_per_mille: 150,
            early: 0..60,
            late: 10..400,
        }
    }
}

impl Iterator for KillSchedule {
    type Item = Kill;

    fn next(&mut self) -> Option<Kill> {
        let from_spawn = self.rng.chance(self.early_per_mille);
        let range = if from_spawn {
            self.early.clone()
        } else {
            self.late.clone()
        };
        Some(Kill {
            from_spawn,
            after: Duration::from_millis(self.rng.range(range)),
        })
    }
}

/// Spawn a worker with `spawn` and SIGKILL it at `kill`: after the delay
/// from the spawn, or from [`READY`] (waited for up to `ready_limit`).
pub fn kill_at(mut worker: WorkerProcess, kill: Kill, ready_limit: Duration) -> Result<(), String> {
    if !kill.from_spawn {
        worker.wait_line(READY, ready_limit)?;
    }
    std::thread::sleep(kill.after);
    worker.kill()
}

/// A test directory deleted when the test passes and kept (its path
/// printed) when it fails, for a post-mortem of the store.
pub struct TestDir(Option<tempfile::TempDir>);

impl TestDir {
    /// A new directory named after `name`.
    pub fn new(name: &str) -> std::io::Result<Self> {
        Ok(Self(Some(
            tempfile::Builder::new()
                .prefix(&format!("waymark-{name}-"))
                .tempdir()?,
        )))
    }

    /// Its path.
    pub fn path(&self) -> PathBuf {
        self.0
            .as_ref()
            .map(|d| d.path().to_path_buf())
            .unwrap_or_default()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(dir) = self.0.take()
        {
            let kept = dir.keep();
            eprintln!("test directory kept for inspection: {}", kept.display());
        }
    }
}

/// Fail a seeded test: panic with the violations and the environment
/// variable and seed that replay it.
pub fn fail_with_seed(var: &str, seed: u64, what: &str, violations: &[String]) -> ! {
    let shown: Vec<&String> = violations.iter().take(40).collect();
    panic!(
        "{what}: {} violation(s) (reproduce with {var}={seed}):\n{}",
        violations.len(),
        shown
            .iter()
            .map(|s| format!("  - {s}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
