//! A fleet of real worker processes sharing one directory (and, in the
//! ignored `*_on_s3` test, one moto S3 bucket), driven from this process
//! as its client.
//!
//! Each worker is this test binary re-executed (`fleet_worker`, an ignored
//! test that acts only when the test kit's worker variable is set): a
//! `FleetWorker` over the shared location whose runner appends (and
//! fsyncs) a line to its own log before a step starts (`S run step
//! attempt`) and before it returns (`D …`), and whose hook logs each ending
//! (`E run`). A step's outcome carries its tag (`step:pid:attempt;`) on to
//! the next step, so a run's result is the chain of the attempts that
//! committed. The checks, on every run:
//!
//! - it ended once, `Succeeded`, and its chain names each step once, in
//!   order (no lost run, no step committed twice);
//! - each committed attempt ran in exactly one process, which logged its
//!   `S` and `D`, and no attempt of that step started after it (each
//!   committed step ran to commit once);
//! - only a killed process left a step started and not finished.
//!
//! The tests: a SIGKILL of one of three workers mid-way (its shards are
//! taken over; `fleet_kill_on_s3` does the same on moto); a worker frozen
//! (SIGSTOP) past its lease, woken after a takeover, which commits nothing
//! more; a fourth worker joining and one leaving gracefully, which
//! interrupts no step. Ownership is read from the lease objects, and the
//! workers' logs (stderr) show each take and hand-back. Lapses of time are
//! printed, never asserted: bounded waits only guard against hangs.
//!
//! ```text
//! eval "$(scripts/moto-server start)"   # for the S3 test
//! cargo test --test fleet_process -- --include-ignored
//! scripts/moto-server stop
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions as FileOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use waymark::fleet::{FleetClient, FleetWorker, LeaseTiming, Leases};
use waymark::testkit::process::{self, READY, Signal, TestDir, WorkerProcess};
use waymark::*;

/// Steps per run.
const STEPS: u32 = 5;
/// A bound on every wait: a hang fails the test instead of stalling CI.
const HANG: Duration = Duration::from_secs(240);

// ---------------------------------------------------------------------------
// The worker process.

/// What a worker process is told, as one `|`-separated argument.
#[derive(Debug, Clone)]
struct WorkerCfg {
    /// The fleet's location, as a URL.
    url: String,
    shards: u32,
    lease_ms: u64,
    guard_ms: u64,
    /// Where each process writes its log (`{pid}.log`).
    logs: PathBuf,
    /// How long each step works.
    step_ms: u64,
    /// How many schedules every shard's runtime defines (`tick-{i}`, every
    /// [`TICK_MS`], one-step runs of workflow [`TICK_WORKFLOW`]).
    schedules: u32,
}

/// The interval of the test schedules.
const TICK_MS: u64 = 200;
/// The workflow of the runs the test schedules fire: one step, not logged.
const TICK_WORKFLOW: &str = "tick";

impl WorkerCfg {
    fn arg(&self) -> String {
        format!(
            "{}|{}|{}|{}|{}|{}|{}",
            self.url,
            self.shards,
            self.lease_ms,
            self.guard_ms,
            self.logs.display(),
            self.step_ms,
            self.schedules
        )
    }

    fn parse(arg: &str) -> Self {
        let p: Vec<&str> = arg.split('|').collect();
        Self {
            url: p[0].to_string(),
            shards: p[1].parse().unwrap(),
            lease_ms: p[2].parse().unwrap(),
            guard_ms: p[3].parse().unwrap(),
            logs: PathBuf::from(p[4]),
            step_ms: p[5].parse().unwrap(),
            schedules: p[6].parse().unwrap(),
        }
    }

    fn timing(&self) -> LeaseTiming {
        LeaseTiming {
            duration: Duration::from_millis(self.lease_ms),
            guard: Duration::from_millis(self.guard_ms),
        }
    }
}

/// A process's log: one fsynced line per fact, so a line is on disk
/// before the commit it precedes.
struct Log(Mutex<File>);

impl Log {
    fn open(dir: &Path) -> Self {
        let file = FileOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("{}.log", std::process::id())))
            .unwrap();
        Self(Mutex::new(file))
    }

    fn line(&self, line: String) {
        let mut f = self.0.lock().unwrap();
        writeln!(f, "{line}").unwrap();
        f.sync_data().unwrap();
    }
}

#[derive(Clone)]
struct ChainRunner {
    log: Arc<Log>,
    step: Duration,
}

impl StepRunner for ChainRunner {
    async fn run_step(&self, step: &Step) -> Result<StepOutcome, StepError> {
        if step.workflow == TICK_WORKFLOW {
            return Ok(StepOutcome::Succeed { result: vec![] });
        }
        let (run, n, attempt) = (&step.run_id, step.step_number, step.attempts);
        self.log.line(format!("S {run} {n} {attempt}"));
        tokio::time::sleep(self.step).await;
        let mut chain = step.payload.clone();
        chain.extend(format!("{n}:{}:{attempt};", std::process::id()).bytes());
        self.log.line(format!("D {run} {n} {attempt}"));
        Ok(if n + 1 < STEPS {
            StepOutcome::Continue { payload: chain }
        } else {
            StepOutcome::Succeed { result: chain }
        })
    }
}

#[derive(Clone)]
struct EndHook(Arc<Log>);

impl TerminalHook for EndHook {
    async fn on_termination(&self, outcome: &RunOutcome) -> Result<(), StepError> {
        if outcome.workflow == TICK_WORKFLOW {
            return Ok(());
        }
        self.0.line(format!("E {}", outcome.run_id));
        Ok(())
    }
}

#[test]
#[ignore = "a worker process of the tests in this file: it acts only when they start it"]
fn fleet_worker() {
    let Some(arg) = process::worker_arg() else {
        return;
    };
    let cfg = WorkerCfg::parse(&arg);
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter("waymark=info")
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let log = Arc::new(Log::open(&cfg.logs));
        let runner = ChainRunner {
            log: log.clone(),
            step: Duration::from_millis(cfg.step_ms),
        };
        let hook = EndHook(log);
        let location = StoreLocation::from_url(&cfg.url).unwrap();
        let (schedules, shards) = (cfg.schedules, cfg.shards);
        let worker = FleetWorker::new(location, cfg.shards, move |_, queue| {
            // Every shard gets every schedule; each fires on its home only.
            (0..schedules)
                .fold(
                    WorkflowRuntime::builder(queue, runner.clone(), hook.clone())
                        .poll_interval(Duration::from_millis(20))
                        .max_concurrent_steps(16),
                    |b, i| b.schedule(tick_schedule(i, shards)),
                )
                .build()
        })
        .lease_timing(cfg.timing())
        .store_options(|_| {
            StoreOptions::default()
                .flush_interval(Duration::from_millis(10))
                .inbox_touch_poll(Duration::from_millis(20))
        });
        println!("WORKER-ID {}", worker.id());
        process::announce_ready();
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
        worker
            .run(async move {
                term.recv().await;
            })
            .await
            .unwrap();
        println!("WORKER-DONE");
    });
}

/// Test schedule `i`'s id: `tick-{i}`, with the first suffix that homes it
/// on shard `i % shards`, so the schedules cover every shard, the killed
/// worker's included.
fn tick_id(i: u32, shards: u32) -> String {
    (0..)
        .map(|k| format!("tick-{i}-{k}"))
        .find(|id| waymark::fleet::shard_of_schedule(id, shards) == i % shards)
        .unwrap()
}

/// Test schedule `i`: every [`TICK_MS`], every time fired (late ones
/// after a takeover too), overlapping runs allowed.
fn tick_schedule(i: u32, shards: u32) -> Schedule {
    Schedule::every(tick_id(i, shards), Duration::from_millis(TICK_MS))
        .workflow(TICK_WORKFLOW)
        .overlap(Overlap::Allow)
        .downtime(Downtime::FireAll { max: 100_000 })
        .misfire_grace(Duration::from_secs(3600))
}

// ---------------------------------------------------------------------------
// The driver.

/// One worker process and what the driver knows of it.
struct Member {
    process: WorkerProcess,
    /// Its fleet id (the owner named in its leases).
    id: String,
    pid: u32,
    stderr: PathBuf,
}

impl Member {
    /// Its pid and stderr file, for [`Excused::of`].
    fn trace(&self) -> (u32, PathBuf) {
        (self.pid, self.stderr.clone())
    }

    fn start(cfg: &WorkerCfg, dir: &Path, name: &str) -> Self {
        let stderr = dir.join(format!("{name}.stderr"));
        let mut process = WorkerProcess::spawn("fleet_worker", &cfg.arg(), &stderr).unwrap();
        let line = process.wait_line("WORKER-ID", HANG).unwrap();
        // (The test harness may print `test fleet_worker ... ` first.)
        let id = line
            .split("WORKER-ID ")
            .nth(1)
            .unwrap_or_default()
            .trim()
            .to_string();
        process.wait_line(READY, HANG).unwrap();
        let pid = process.pid();
        Self {
            process,
            id,
            pid,
            stderr,
        }
    }

    /// Its log on stderr.
    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Ask it to stop (SIGTERM: it hands its shards back) and wait for a
    /// clean exit.
    fn leave(mut self) {
        self.process.signal(Signal::TERM).unwrap();
        self.process.wait_line("WORKER-DONE", HANG).unwrap();
        let status = self.process.wait().unwrap();
        assert!(status.success(), "{status}");
    }
}

/// The shards named in `log`'s lines containing `what` (`shard=N`).
fn shards_in(log: &str, what: &str) -> BTreeSet<u32> {
    log.lines()
        .filter(|l| l.contains(what))
        .filter_map(|l| {
            let at = l.find("shard=")?;
            l[at + 6..]
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// Who holds each shard now (`None`: never taken, or released).
async fn owners(at: &StoreLocation, cfg: &WorkerCfg) -> BTreeMap<u32, Option<String>> {
    let leases = Leases::new(at.clone(), "observer".into(), cfg.timing()).unwrap();
    let mut out = BTreeMap::new();
    for shard in 0..cfg.shards {
        let view = leases.view(shard).await.unwrap();
        out.insert(shard, view.filter(|v| !v.released).map(|v| v.owner));
    }
    out
}

fn held_by(owners: &BTreeMap<u32, Option<String>>, id: &str) -> BTreeSet<u32> {
    owners
        .iter()
        .filter(|(_, o)| o.as_deref() == Some(id))
        .map(|(s, _)| *s)
        .collect()
}

/// Wait (bounded) until the owners satisfy `pred`; returns them.
async fn until_owners(
    at: &StoreLocation,
    cfg: &WorkerCfg,
    what: &str,
    pred: impl Fn(&BTreeMap<u32, Option<String>>) -> bool,
) -> BTreeMap<u32, Option<String>> {
    let start = Instant::now();
    loop {
        let now = owners(at, cfg).await;
        if pred(&now) {
            return now;
        }
        assert!(start.elapsed() < HANG, "{what}: owners stuck at {now:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Each worker holds `ceil(N / live)` or `floor(N / live)` shards.
fn fair(owners: &BTreeMap<u32, Option<String>>, ids: &[&str]) -> bool {
    let n = owners.len();
    let (lo, hi) = (n / ids.len(), n.div_ceil(ids.len()));
    owners
        .values()
        .all(|o| o.as_deref().is_some_and(|o| ids.contains(&o)))
        && ids.iter().all(|id| {
            let k = held_by(owners, id).len();
            (lo..=hi).contains(&k)
        })
}

/// A client, once every shard's store exists (a worker opens a shard just
/// after taking its lease).
async fn open_client(at: &StoreLocation) -> FleetClient {
    let start = Instant::now();
    loop {
        match FleetClient::open(at, ClientOptions::default()).await {
            Ok(client) => return client,
            Err(e) => assert!(start.elapsed() < HANG, "no fleet client: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn run_id(i: u32) -> String {
    format!("r{i:04}")
}

async fn submit_all(client: &FleetClient, runs: u32) {
    let ids: Vec<String> = (0..runs).map(run_id).collect();
    for chunk in ids.chunks(50) {
        let sends = chunk.iter().map(|id| {
            client.submit(RunSpec {
                run_id: Some(id.clone()),
                max_attempts_per_step: Some(20),
                ..Default::default()
            })
        });
        for sent in futures_util::future::join_all(sends).await {
            sent.unwrap();
        }
    }
}

/// Wait (bounded) until every run has ended; returns the outcomes.
async fn outcomes(client: &FleetClient, runs: u32) -> BTreeMap<String, RunOutcome> {
    let start = Instant::now();
    let mut done = BTreeMap::new();
    loop {
        for id in (0..runs).map(run_id) {
            if !done.contains_key(&id)
                && let Some(out) = client.outcome(&id).await.unwrap()
            {
                done.insert(id, out);
            }
        }
        if done.len() == runs as usize {
            return done;
        }
        assert!(
            start.elapsed() < HANG,
            "only {} of {runs} runs ended",
            done.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One line of a process log.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Line {
    pid: u32,
    kind: char,
    run: String,
    step: u32,
    attempt: u32,
}

/// Every process's log lines.
fn read_logs(dir: &Path) -> Vec<Line> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let pid: u32 = path.file_stem().unwrap().to_str().unwrap().parse().unwrap();
        out.extend(parse_log(pid, &std::fs::read_to_string(&path).unwrap()));
    }
    out
}

fn parse_log(pid: u32, text: &str) -> Vec<Line> {
    text.lines()
        .filter_map(|l| {
            let p: Vec<&str> = l.split(' ').collect();
            let kind = p.first()?.chars().next()?;
            Some(Line {
                pid,
                kind,
                run: p.get(1)?.to_string(),
                step: p.get(2).and_then(|s| s.parse().ok()).unwrap_or(0),
                attempt: p.get(3).and_then(|s| s.parse().ok()).unwrap_or(0),
            })
        })
        .collect()
}

/// A committed step, from a run's result: (step, pid, attempt).
fn chain(result: &[u8]) -> Vec<(u32, u32, u32)> {
    std::str::from_utf8(result)
        .unwrap()
        .split(';')
        .filter(|t| !t.is_empty())
        .map(|t| {
            let p: Vec<u32> = t.split(':').map(|x| x.parse().unwrap()).collect();
            (p[0], p[1], p[2])
        })
        .collect()
}

/// Where a step may have been cut short: a process SIGKILLed (any shard),
/// or a shard a process stopped because its lease lapsed or was taken (its
/// log says so: under heavy load a renewal can come too late, and the
/// worker fences itself, as it must).
#[derive(Debug, Default)]
struct Excused {
    killed: BTreeSet<u32>,
    /// (pid, shard)
    fenced: BTreeSet<(u32, u32)>,
}

impl Excused {
    /// From each process's (pid, stderr file).
    fn of(members: &[(u32, PathBuf)], killed: &[u32]) -> Self {
        let mut fenced = BTreeSet::new();
        for (pid, stderr) in members {
            let log = std::fs::read_to_string(stderr).unwrap_or_default();
            for shard in shards_in(&log, "lease lapsed")
                .into_iter()
                .chain(shards_in(&log, "lease was taken"))
            {
                fenced.insert((*pid, shard));
            }
        }
        if !fenced.is_empty() {
            println!("shards whose worker fenced itself (pid, shard): {fenced:?}");
        }
        Self {
            killed: killed.iter().copied().collect(),
            fenced,
        }
    }

    fn covers(&self, l: &Line, shards: u32) -> bool {
        self.killed.contains(&l.pid)
            || self
                .fenced
                .contains(&(l.pid, waymark::fleet::shard_of_run(&l.run, shards)))
    }
}

/// The checks of the module docs: a step may be cut short (started and
/// not finished, or finished and not committed) only where `excused`.
/// Returns how many committed steps were retried attempts.
fn check_runs(
    outcomes: &BTreeMap<String, RunOutcome>,
    log: &[Line],
    runs: u32,
    shards: u32,
    excused: &Excused,
) -> usize {
    let mut v = Vec::new();
    let count = |kind: char, run: &str, step: u32, attempt: u32| -> Vec<u32> {
        log.iter()
            .filter(|l| l.kind == kind && l.run == run && l.step == step && l.attempt == attempt)
            .map(|l| l.pid)
            .collect()
    };
    let mut retried = 0;
    for id in (0..runs).map(run_id) {
        let Some(out) = outcomes.get(&id) else {
            v.push(format!("{id}: no outcome"));
            continue;
        };
        if out.status != TerminalStatus::Succeeded {
            v.push(format!("{id}: ended {:?}: {:?}", out.status, out.error));
            continue;
        }
        let links = chain(out.result.as_deref().unwrap_or_default());
        let steps: Vec<u32> = links.iter().map(|l| l.0).collect();
        if steps != (0..STEPS).collect::<Vec<_>>() {
            v.push(format!("{id}: committed steps {steps:?}"));
            continue;
        }
        for (step, pid, attempt) in links {
            // A process killed (or fenced) mid-step may have started the
            // same attempt: a claim not yet durable at the kill is claimed
            // again under the same attempt number. Anyone else may not.
            let others = |pids: Vec<u32>| -> Vec<u32> {
                pids.into_iter()
                    .filter(|p| {
                        *p == pid
                            || !excused.covers(
                                &Line {
                                    pid: *p,
                                    kind: 'S',
                                    run: id.clone(),
                                    step,
                                    attempt,
                                },
                                shards,
                            )
                    })
                    .collect()
            };
            let started = others(count('S', &id, step, attempt));
            let finished = others(count('D', &id, step, attempt));
            if started != [pid] || finished != [pid] {
                v.push(format!(
                    "{id} step {step} attempt {attempt} (committed by {pid}): started in {started:?}, finished in {finished:?}"
                ));
            }
            let later: Vec<&Line> = log
                .iter()
                .filter(|l| l.run == id && l.step == step && l.attempt > attempt)
                .collect();
            if !later.is_empty() {
                v.push(format!(
                    "{id} step {step}: ran again after its commit: {later:?}"
                ));
            }
            if attempt > 1 {
                retried += 1;
            }
        }
        if !log.iter().any(|l| l.kind == 'E' && l.run == id) {
            v.push(format!("{id}: its ending never reached the hook"));
        }
    }
    // Only a kill or a self-fenced shard leaves a step unfinished or
    // finished and not committed.
    let committed: BTreeSet<(String, u32, u32)> = outcomes
        .iter()
        .flat_map(|(id, out)| {
            chain(out.result.as_deref().unwrap_or_default())
                .into_iter()
                .map(move |(step, _, attempt)| (id.clone(), step, attempt))
        })
        .collect();
    for s in log.iter().filter(|l| l.kind == 'S') {
        let finished = log.iter().any(|d| {
            d.kind == 'D'
                && d.pid == s.pid
                && d.run == s.run
                && d.step == s.step
                && d.attempt == s.attempt
        });
        if !finished && !excused.covers(s, shards) {
            v.push(format!(
                "a step was cut short without a kill or a fence: {s:?}"
            ));
        }
    }
    for d in log.iter().filter(|l| l.kind == 'D') {
        if !committed.contains(&(d.run.clone(), d.step, d.attempt)) && !excused.covers(d, shards) {
            v.push(format!(
                "a finished step was not committed, without a kill or a fence: {d:?}"
            ));
        }
    }
    let known: BTreeSet<String> = (0..runs).map(run_id).collect();
    for l in log {
        if !known.contains(&l.run) {
            v.push(format!("a run nobody submitted: {l:?}"));
        }
    }
    assert!(v.is_empty(), "{} violation(s):\n{}", v.len(), v.join("\n"));
    retried
}

/// One test of this file at a time: each runs several worker processes,
/// and on two cores their lease renewals would otherwise compete.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A test directory with an empty fleet directory in it, and its URL.
fn local_fleet(name: &str) -> (TestDir, String) {
    let dir = TestDir::new(name).unwrap();
    let fleet = dir.path().join("fleet");
    std::fs::create_dir_all(&fleet).unwrap();
    (dir, format!("file://{}", fleet.display()))
}

/// The directory (created) where the workers write their logs.
fn logs_in(dir: &TestDir) -> PathBuf {
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    logs
}

fn driver() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn count_lines(dir: &Path, kind: char) -> usize {
    read_logs(dir).iter().filter(|l| l.kind == kind).count()
}

/// The kill test on `url`: three workers on six shards, `runs` runs of
/// five steps through the fleet client, and `schedules` schedules defined
/// on every shard; one worker SIGKILLed once a third of the steps have run.
fn kill_one_of_three(
    dir: &TestDir,
    url: String,
    runs: u32,
    schedules: u32,
    (lease_ms, guard_ms): (u64, u64),
) {
    let logs = logs_in(dir);
    let cfg = WorkerCfg {
        url: url.clone(),
        shards: 6,
        lease_ms,
        guard_ms,
        logs: logs.clone(),
        step_ms: 2,
        schedules,
    };
    let at = StoreLocation::from_url(&url).unwrap();
    let rt = driver();
    let mut members: Vec<Member> = (0..3)
        .map(|i| Member::start(&cfg, &dir.path(), &format!("w{i}")))
        .collect();
    let ids: Vec<String> = members.iter().map(|m| m.id.clone()).collect();
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    rt.block_on(until_owners(
        &at,
        &cfg,
        "three workers share six shards",
        |o| fair(o, &id_refs),
    ));
    let client = rt.block_on(open_client(&at));
    rt.block_on(submit_all(&client, runs));

    // Mid-way, SIGKILL the first worker.
    let third = (runs * STEPS / 3) as usize;
    let start = Instant::now();
    while count_lines(&logs, 'D') < third {
        assert!(start.elapsed() < HANG, "the fleet made no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    let victim = members.remove(0);
    let before = rt.block_on(owners(&at, &cfg));
    let victim_shards = held_by(&before, &victim.id);
    let survivors_log_len: Vec<usize> = members.iter().map(|m| m.stderr().len()).collect();
    let victim_pid = victim.pid;
    let killed_at = Instant::now();
    victim.process.kill().unwrap();
    println!(
        "killed worker {} (pid {victim_pid}) holding shards {victim_shards:?}",
        victim.id
    );

    // Its shards are owned again by the survivors.
    let survivors: Vec<&str> = members.iter().map(|m| m.id.as_str()).collect();
    let mut pending = victim_shards.clone();
    while !pending.is_empty() {
        let now = rt.block_on(owners(&at, &cfg));
        pending.retain(|s| {
            let back = now[s].as_deref().is_some_and(|o| survivors.contains(&o));
            if back {
                println!(
                    "shard {s} owned again {:?} after the kill (lease {} ms + guard {} ms)",
                    killed_at.elapsed(),
                    cfg.lease_ms,
                    cfg.guard_ms
                );
            }
            !back
        });
        assert!(
            killed_at.elapsed() < HANG,
            "shards {pending:?} never taken over"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The survivors' logs show the takeovers (once the shard is open),
    // after the kill.
    loop {
        let mut taken = BTreeSet::new();
        for (m, from) in members.iter().zip(&survivors_log_len) {
            taken.extend(shards_in(&m.stderr()[*from..], "took the shard"));
        }
        if victim_shards.is_subset(&taken) {
            println!(
                "shards {victim_shards:?} open again {:?} after the kill",
                killed_at.elapsed()
            );
            break;
        }
        assert!(
            killed_at.elapsed() < HANG,
            "the survivors' logs show {taken:?} taken after the kill, not all of {victim_shards:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let outs = rt.block_on(outcomes(&client, runs));
    println!(
        "all {runs} runs ended {:?} after the start",
        start.elapsed()
    );
    rt.block_on(client.close()).unwrap();
    let excused = Excused::of(
        &members.iter().map(Member::trace).collect::<Vec<_>>(),
        &[victim_pid],
    );
    for m in members {
        m.leave();
    }
    let log = read_logs(&logs);
    let retried = check_runs(&outs, &log, runs, cfg.shards, &excused);
    println!("{retried} committed steps were retried attempts after the kill");
    rt.block_on(check_schedules(
        &at,
        cfg.shards,
        schedules,
        killed_at - start,
    ));
}

/// The schedules' fires, read once every worker has left: each schedule
/// fired on its home shard only (each fire time under one run id, routed
/// home, listed once across the shards), every [`TICK_MS`] from its first
/// fire to its last with no time missed or repeated (the kill included:
/// the taker fires the dead owner's missed times), each run that ran
/// succeeded (the last fires may wait: the workers stop claiming as they
/// leave), and the record's count agrees. `ran_before_kill` bounds how many fires each
/// must at least have.
async fn check_schedules(
    at: &StoreLocation,
    shards: u32,
    schedules: u32,
    ran_before_kill: Duration,
) {
    if schedules == 0 {
        return;
    }
    let client = open_client(at).await;
    let mut fired: BTreeMap<String, Vec<(u64, String)>> = BTreeMap::new();
    let mut live = 0;
    let mut filter = RunFilter {
        workflow: Some(TICK_WORKFLOW.into()),
        limit: 500,
        ..Default::default()
    };
    loop {
        let page = client.runs(&filter).await.unwrap();
        for run in &page.runs {
            // A fire committed as the workers left may not have run yet.
            match run.phase {
                RunPhase::Ended(TerminalStatus::Succeeded) => {}
                RunPhase::Live(_) => live += 1,
                _ => panic!("a fired run ended otherwise: {run:?}"),
            }
            let (id, rest) = run.run_id.rsplit_once(':').unwrap();
            let ms: u64 = rest.split('-').next().unwrap().parse().unwrap();
            fired
                .entry(id.to_string())
                .or_default()
                .push((ms, run.run_id.clone()));
        }
        match page.next {
            Some(next) => filter.after = Some(next),
            None => break,
        }
    }
    let infos = client.schedules().await.unwrap();
    let ids: Vec<&str> = infos.iter().map(|s| s.id.as_str()).collect();
    let want: Vec<String> = (0..schedules).map(|i| tick_id(i, shards)).collect();
    assert_eq!(ids, want, "each schedule recorded once, on its home");
    let mut v = Vec::new();
    for info in &infos {
        let mut times = fired.remove(&info.id).unwrap_or_default();
        times.sort();
        let home = waymark::fleet::shard_of_schedule(&info.id, shards);
        for (_, run) in &times {
            if waymark::fleet::shard_of_run(run, shards) != home {
                v.push(format!("{run} routes away from {}'s home {home}", info.id));
            }
        }
        for pair in times.windows(2) {
            if pair[1].0 != pair[0].0 + TICK_MS {
                v.push(format!(
                    "{}: fired {:?} then {:?}",
                    info.id, pair[0], pair[1]
                ));
            }
        }
        if times.len() as u64 != info.run_count {
            v.push(format!(
                "{}: {} runs listed, the record counts {}",
                info.id,
                times.len(),
                info.run_count
            ));
        }
        let least = (ran_before_kill.as_millis() as u64 / TICK_MS).saturating_sub(2);
        if (times.len() as u64) < least {
            v.push(format!("{}: only {} fires", info.id, times.len()));
        }
        println!(
            "{}: {} fires every {TICK_MS} ms on shard {home}, none missed or repeated",
            info.id,
            times.len()
        );
    }
    println!("{live} fired runs were still waiting when the workers left");
    assert!(fired.is_empty(), "runs of unknown schedules: {fired:?}");
    assert!(v.is_empty(), "{} violation(s):\n{}", v.len(), v.join("\n"));
    client.close().await.unwrap();
}

#[test]
fn a_sigkilled_worker_loses_nothing_and_its_shards_are_taken_over() {
    let _serial = serial();
    let (dir, url) = local_fleet("fleet-kill");
    kill_one_of_three(&dir, url, 600, 6, (1500, 300));
}

#[test]
#[ignore = "needs an S3-compatible server (WAYMARK_S3_URL): see the module docs"]
fn fleet_kill_on_s3() {
    let _serial = serial();
    let base = std::env::var("WAYMARK_S3_URL").expect("WAYMARK_S3_URL=s3://bucket/prefix");
    let dir = TestDir::new("fleet-kill-s3").unwrap();
    let url = format!(
        "{}/fleet-kill-{}",
        base.trim_end_matches('/'),
        std::process::id()
    );
    // A longer lease than on local disk: moto is one Python process that
    // eighteen shard writers (and this load) keep busy, and renewals there
    // can take a second.
    kill_one_of_three(&dir, url, 150, 6, (6000, 1000));
}

#[test]
fn a_worker_frozen_past_its_lease_commits_nothing_after_the_takeover() {
    let _serial = serial();
    let (dir, url) = local_fleet("fleet-stop");
    let logs = logs_in(&dir);
    let cfg = WorkerCfg {
        url: url.clone(),
        shards: 4,
        lease_ms: 1500,
        guard_ms: 300,
        logs: logs.clone(),
        // Long steps, so some are in flight when the worker freezes.
        step_ms: 300,
        schedules: 0,
    };
    let at = StoreLocation::from_url(&url).unwrap();
    let rt = driver();
    let frozen = Member::start(&cfg, &dir.path(), "frozen");
    let other = Member::start(&cfg, &dir.path(), "other");
    rt.block_on(until_owners(
        &at,
        &cfg,
        "two workers share four shards",
        |o| fair(o, &[&frozen.id, &other.id]),
    ));
    let client = rt.block_on(open_client(&at));
    let runs = 40;
    rt.block_on(submit_all(&client, runs));

    // Freeze it while it has steps in flight.
    let its_log = logs.join(format!("{}.log", frozen.pid));
    let start = Instant::now();
    loop {
        let lines = parse_log(
            frozen.pid,
            &std::fs::read_to_string(&its_log).unwrap_or_default(),
        );
        let started = lines.iter().filter(|l| l.kind == 'S').count();
        let finished = lines.iter().filter(|l| l.kind == 'D').count();
        if started > finished && finished > 0 {
            break;
        }
        assert!(start.elapsed() < HANG, "the frozen worker never ran a step");
        std::thread::sleep(Duration::from_millis(5));
    }
    let held = held_by(&rt.block_on(owners(&at, &cfg)), &frozen.id);
    frozen.process.signal(Signal::STOP).unwrap();
    let stopped_at = Instant::now();
    println!("froze {} holding shards {held:?}", frozen.id);

    // The other worker takes every shard and ends every run.
    rt.block_on(until_owners(&at, &cfg, "the other takes over", |o| {
        held_by(o, &other.id).len() == 4
    }));
    println!(
        "the other worker held every shard {:?} after the freeze",
        stopped_at.elapsed()
    );
    let outs = rt.block_on(outcomes(&client, runs));

    // Wake it: it must stop the shards it lost and commit nothing.
    let woke_from = std::fs::metadata(&its_log).unwrap().len() as usize;
    let stderr_from = frozen.stderr().len();
    frozen.process.signal(Signal::CONT).unwrap();
    let start = Instant::now();
    loop {
        let log = frozen.stderr();
        let after = &log[stderr_from..];
        let mut stopped = shards_in(after, "lease was taken");
        stopped.extend(shards_in(after, "lease lapsed"));
        if held.is_subset(&stopped) {
            break;
        }
        assert!(
            start.elapsed() < HANG,
            "the woken worker did not stop its lost shards {held:?}; its log since:\n{after}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Let it settle, then stop both.
    rt.block_on(until_owners(&at, &cfg, "shared again", |o| {
        fair(o, &[&frozen.id, &other.id])
    }));
    let frozen_pid = frozen.pid;
    let excused = Excused::of(&[other.trace()], &[frozen_pid]);
    frozen.leave();
    other.leave();

    // Nothing it did after waking reached the store: every outcome is as
    // it was, and no step it finished after waking is in a chain.
    let again = rt.block_on(outcomes(&client, runs));
    assert_eq!(again, outs, "an outcome changed after the wake");
    let text = std::fs::read_to_string(&its_log).unwrap();
    let after_wake = parse_log(frozen_pid, &text[woke_from..]);
    for l in after_wake.iter().filter(|l| l.kind == 'D') {
        let committed = chain(outs[&l.run].result.as_deref().unwrap_or_default());
        assert!(
            !committed.contains(&(l.step, frozen_pid, l.attempt)),
            "a step finished after the wake was committed: {l:?}"
        );
    }
    // In the instant between the wake and its fence, the woken runtime may
    // still start a step: its own uncommitted writes are visible to it
    // (SlateDB applies a write in memory before the WAL write, which the
    // fencing refuses). None of that reaches the store, as checked above.
    println!(
        "after the wake it started {} and finished {} step(s), none committed",
        after_wake.iter().filter(|l| l.kind == 'S').count(),
        after_wake.iter().filter(|l| l.kind == 'D').count()
    );
    rt.block_on(client.close()).unwrap();
    // Its steps frozen mid-way count as interrupted (it was, in effect,
    // killed for those shards).
    let log = read_logs(&logs);
    check_runs(&outs, &log, runs, cfg.shards, &excused);
}

#[test]
fn a_worker_joins_for_a_fair_share_and_one_leaves_without_interrupting_a_step() {
    let _serial = serial();
    let (dir, url) = local_fleet("fleet-join");
    let logs = logs_in(&dir);
    let cfg = WorkerCfg {
        url: url.clone(),
        shards: 8,
        lease_ms: 1500,
        guard_ms: 300,
        logs: logs.clone(),
        step_ms: 20,
        schedules: 0,
    };
    let at = StoreLocation::from_url(&url).unwrap();
    let rt = driver();
    let mut members: Vec<Member> = (0..3)
        .map(|i| Member::start(&cfg, &dir.path(), &format!("w{i}")))
        .collect();
    let ids = |ms: &[Member]| ms.iter().map(|m| m.id.clone()).collect::<Vec<_>>();
    let three = ids(&members);
    rt.block_on(until_owners(&at, &cfg, "three share eight", |o| {
        fair(o, &three.iter().map(String::as_str).collect::<Vec<_>>())
    }));
    let client = rt.block_on(open_client(&at));
    let runs = 300;
    rt.block_on(submit_all(&client, runs));
    let start = Instant::now();
    while count_lines(&logs, 'D') < (runs * STEPS / 5) as usize {
        assert!(start.elapsed() < HANG, "the fleet made no progress");
        std::thread::sleep(Duration::from_millis(20));
    }

    // A fourth joins: each ends with two.
    members.push(Member::start(&cfg, &dir.path(), "w3"));
    let four = ids(&members);
    let joined = rt.block_on(until_owners(&at, &cfg, "four share eight", |o| {
        fair(o, &four.iter().map(String::as_str).collect::<Vec<_>>())
    }));
    println!("after the join: {joined:?}");
    let handed: BTreeSet<u32> = members[..3]
        .iter()
        .flat_map(|m| shards_in(&m.stderr(), "handed the shard back"))
        .collect();
    assert!(
        !handed.is_empty(),
        "no worker handed a shard back for the newcomer"
    );

    // The first leaves gracefully, with runs still going.
    let leaver = members.remove(0);
    let leaver_id = leaver.id.clone();
    let left = leaver.trace();
    leaver.leave();
    let three = ids(&members);
    rt.block_on(until_owners(&at, &cfg, "three share eight again", |o| {
        fair(o, &three.iter().map(String::as_str).collect::<Vec<_>>())
            && held_by(o, &leaver_id).is_empty()
    }));
    let outs = rt.block_on(outcomes(&client, runs));
    rt.block_on(client.close()).unwrap();
    let mut traces: Vec<(u32, PathBuf)> = members.iter().map(Member::trace).collect();
    traces.push(left);
    let excused = Excused::of(&traces, &[]);
    for m in members {
        m.leave();
    }
    // No kill: a step may be cut short only where a worker fenced itself
    // (a late renewal under load), never by a hand-off.
    let log = read_logs(&logs);
    let retried = check_runs(&outs, &log, runs, cfg.shards, &excused);
    println!("{retried} committed steps were retried attempts");
}
