//! A worker process and a client process on one local-disk store.
//!
//! The worker is this test binary re-executed as a child (`client_worker`,
//! an ignored test that acts only when `WAYMARK_CLIENT_WORKER` is set); the
//! test itself is the client. The client submits runs and cancels through
//! the inbox while the worker is SIGKILLed and restarted, and then checks
//! that every acknowledged request was applied exactly once.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use waymark::*;

const CHILD_ENV: &str = "WAYMARK_CLIENT_WORKER";
/// Only a hang guard.
const GUARD: Duration = Duration::from_secs(180);
const RUNS: usize = 200;
const SLEEPERS: usize = 20;

fn store_url(dir: &Path) -> String {
    format!("file://{}/store", dir.display())
}

fn store_options() -> StoreOptions {
    StoreOptions::default()
        .flush_interval(Duration::from_millis(5))
        .inbox_touch_poll(Duration::from_millis(20))
}

fn client_options() -> ClientOptions {
    ClientOptions::default().refresh_interval(Duration::from_millis(20))
}

/// Two steps: step 0 continues, step 1 succeeds with the input reversed.
/// Input `sleep` waits an hour after step 0 (the client cancels it).
struct TwoSteps;

impl StepRunner for TwoSteps {
    async fn run_step(&self, step: &Step) -> Result<StepOutcome, StepError> {
        Ok(match (step.step_number, &step.payload[..]) {
            (0, b"sleep") => StepOutcome::ContinueAfter {
                payload: b"slept".to_vec(),
                delay: Duration::from_secs(3600),
            },
            (0, _) => StepOutcome::Continue {
                payload: step.payload.clone(),
            },
            _ => StepOutcome::Succeed {
                result: step.payload.iter().rev().copied().collect(),
            },
        })
    }
}

#[test]
#[ignore = "the worker process of the client process tests; runs only when they spawn it"]
fn client_worker() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let location = StoreLocation::from_url(&store_url(Path::new(&dir))).unwrap();
        let queue = open_worker_store(&location, store_options()).await.unwrap();
        let runtime = WorkflowRuntime::builder(queue, TwoSteps, NoopTerminalHook)
            .poll_interval(Duration::from_millis(20))
            .build()
            .unwrap();
        println!("WORKER-READY");
        let result = runtime.run(std::future::pending()).await;
        eprintln!("worker stopped: {result:?}");
    });
}

struct Worker {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: PathBuf,
}

impl Worker {
    fn spawn(dir: &Path, incarnation: u32) -> Self {
        let stderr = dir.join(format!("stderr-{incarnation}"));
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "client_worker",
                "--nocapture",
                "--ignored",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&stderr).unwrap())
            .spawn()
            .expect("spawn the worker process");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut worker = Self {
            child,
            lines,
            stderr,
        };
        worker.wait_ready();
        worker
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + GUARD;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains("WORKER-READY") => return,
                Ok(_) => continue,
                Err(e) => panic!(
                    "the worker never got ready ({e:?}):\n{}",
                    std::fs::read_to_string(&self.stderr).unwrap_or_default()
                ),
            }
        }
    }

    /// SIGKILL it; it must still be running.
    fn kill(mut self) {
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "the worker exited by itself:\n{}",
            std::fs::read_to_string(&self.stderr).unwrap_or_default()
        );
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run_id(i: usize) -> String {
    format!("run-{i:04}")
}

fn sleeper_id(i: usize) -> String {
    format!("sleep-{i:03}")
}

fn input(i: usize) -> Vec<u8> {
    format!("input-{i}").into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_request_applies_once_across_a_worker_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let worker = Worker::spawn(dir.path(), 0);
    let location = StoreLocation::from_url(&store_url(dir.path())).unwrap();
    let client = Client::open(&location, client_options()).await.unwrap();

    // Sleepers first: runs the client will cancel while the worker dies.
    for i in 0..SLEEPERS {
        let spec = RunSpec {
            run_id: Some(sleeper_id(i)),
            input: b"sleep".to_vec(),
            ..Default::default()
        };
        let reply = client.submit_and_wait(spec, GUARD).await.unwrap();
        assert!(reply.newly_submitted);
    }

    // 200 submits from 16 concurrent tasks; each waits for its reply.
    let acknowledged = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for lane in 0..16 {
        let client = client.clone();
        let acknowledged = acknowledged.clone();
        tasks.spawn(async move {
            let mut replies = Vec::new();
            for i in (lane..RUNS).step_by(16) {
                let spec = RunSpec {
                    run_id: Some(run_id(i)),
                    input: input(i),
                    ..Default::default()
                };
                let sent = client.submit(spec).await.unwrap();
                let reply = client.wait_reply(&sent.request_id, GUARD).await.unwrap();
                acknowledged.fetch_add(1, Ordering::SeqCst);
                replies.push((i, reply));
            }
            replies
        });
    }
    // Kill the worker with requests in flight: some answered, most not.
    while acknowledged.load(Ordering::SeqCst) < RUNS / 4 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut cancels = Vec::new();
    for i in 0..SLEEPERS {
        cancels.push(client.cancel(&sleeper_id(i)).await.unwrap());
    }
    worker.kill();
    let at_kill = acknowledged.load(Ordering::SeqCst);
    assert!(at_kill < RUNS, "every request was answered before the kill");
    let worker = Worker::spawn(dir.path(), 1);

    let mut replies = Vec::new();
    while let Some(lane) = tasks.join_next().await {
        replies.extend(lane.unwrap());
    }
    assert_eq!(replies.len(), RUNS);
    for (i, reply) in &replies {
        // Each run was submitted once: applied once means "new", never a
        // second application that found the run already there.
        assert_eq!(
            *reply,
            Reply::Submitted(SubmitOutcome {
                run_id: run_id(*i),
                newly_submitted: true
            }),
            "run {i}"
        );
    }
    for sent in &cancels {
        client.wait_reply(&sent.request_id, GUARD).await.unwrap();
    }
    for i in 0..RUNS {
        let out = client.wait(&run_id(i), GUARD).await.unwrap();
        assert_eq!(out.status, TerminalStatus::Succeeded, "run {i}");
        let expected: Vec<u8> = input(i).into_iter().rev().collect();
        assert_eq!(out.result, Some(expected), "run {i}");
        assert_eq!(out.final_step, 1);
    }
    for i in 0..SLEEPERS {
        let out = client.wait(&sleeper_id(i), GUARD).await.unwrap();
        assert_eq!(out.status, TerminalStatus::Cancelled, "sleeper {i}");
    }
    // No run beyond the requested ones, none live.
    let page = client
        .runs(&RunFilter {
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap();
    let listed: BTreeSet<String> = page.runs.iter().map(|r| r.run_id.clone()).collect();
    let expected: BTreeSet<String> = (0..RUNS)
        .map(run_id)
        .chain((0..SLEEPERS).map(sleeper_id))
        .collect();
    assert_eq!(listed, expected);
    assert!(
        page.runs
            .iter()
            .all(|r| matches!(r.phase, RunPhase::Ended(_)))
    );
    // Each run ended once: the health counts fold one tally per ending.
    let deadline = Instant::now() + GUARD;
    loop {
        let health = client.workflow_health(DEFAULT_WORKFLOW).await.unwrap();
        let done = health.as_ref().map_or(0, |h| h.runs_succeeded);
        assert!(done <= RUNS as u64, "{done} successes for {RUNS} runs");
        if done == RUNS as u64 {
            break;
        }
        assert!(Instant::now() < deadline, "health counts {done} of {RUNS}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("acknowledged at the kill: {at_kill} of {RUNS}");
    client.close().await.unwrap();
    worker.kill();
}

#[tokio::test]
async fn a_client_on_a_location_without_a_store_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let location = StoreLocation::from_url(&store_url(dir.path())).unwrap();
    let err = Client::open(&location, client_options())
        .await
        .err()
        .unwrap();
    assert!(matches!(&err, Error::NotAWaymarkStore { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.starts_with("no Waymark store at file://"),
        "{message}"
    );
    assert!(!message.contains('\n'));
}
