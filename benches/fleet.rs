//! A worker fleet on one bucket (issue 13): step throughput with 1, 2 and
//! 4 shards and as many worker processes, against one single-process
//! runtime (no fleet) in the same run, on local disk and on moto S3; and
//! the takeover time after a SIGKILL.
//!
//! ```text
//! cargo bench --bench fleet                 # full (about 5 minutes)
//! cargo bench --bench fleet -- --quick      # smoke run, well under a minute
//! cargo bench --bench fleet -- --only takeover --store moto   # a subset
//! eval "$(scripts/moto-server start)"       # first, for the moto S3 parts
//! ```
//!
//! The moto S3 parts need the environment `scripts/moto-server start`
//! prints (`WAYMARK_S3_URL` and the `AWS_*` variables); without it they are
//! skipped with a loud message (this bench never starts moto itself).
//!
//! The worker processes are this binary again (`FLEET_BENCH_ROLE` set):
//! each runs a `FleetWorker` (or, for the baseline, one `WorkflowRuntime`
//! on one store) with a trivial runner, and reports on stdout: `id` (its
//! worker id), `opened S` (its runtime for shard S was built, right after
//! the shard's store opened), `first-step S` (the first step that runtime
//! ran), `committed S` (the first step of that runtime proven durably
//! committed: the next step of the same run was admitted, which waits for
//! the previous commit's flush) and `ended N` (runs whose last step ran).
//!
//! - **throughput**: runs of 5 steps submitted through `FleetClient` (the
//!   baseline: `Client`) by 16 concurrent senders in this process, once
//!   every shard is held by a distinct worker. The clock runs from the
//!   first send until every run's last step has been called (its commit
//!   follows within a flush); every run's outcome is then checked through
//!   the client. CPU is each worker process's user + system time from
//!   `/proc/PID/stat` over that window (and the client's, and moto's when
//!   its pid file is found).
//!   Lease 10 s / guard 2 s (the default).
//! - **takeover**: 2 shards, 2 workers; 2 endless runs on shard 0; once
//!   both workers count each other live, SIGKILL the worker holding shard
//!   0, then time the survivor's count of live workers dropping to 1 (its
//!   info log), its lease object (polled from here), its open, its first
//!   step and its first durable commit on the shard. Full mode: 5 samples
//!   at 2 s / 0.5 s and one at the default on local disk, one at the
//!   default on moto (a short lease thrashed there); quick mode: one at
//!   1 s / 0.25 s on local disk.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use waymark::fleet::{FleetClient, FleetWorker, LeaseTiming, Leases, shard_of_run};
use waymark::{
    Client, ClientOptions, Error, NoopTerminalHook, RunSpec, Step, StepError, StepOutcome,
    StepRunner, StoreLocation, StoreOptions, TerminalStatus, WorkflowRuntime, open_worker_store,
};

/// No single wait may take longer than this; a hang fails the bench.
const GUARD: Duration = Duration::from_secs(180);
const STEPS_PER_RUN: u32 = 5;
const SENDERS: usize = 16;
const FLUSH: Duration = Duration::from_millis(10);
const TOUCH_POLL: Duration = Duration::from_millis(50);
const SLOTS: usize = 64;

// ---------------------------------------------------------------- worker

/// The trivial runner of one shard's runtime: 5 steps carrying the input
/// through, or endless steps for a run with the header `loop`.
struct Runner {
    shard: u32,
    ended: Arc<AtomicU64>,
    first: AtomicBool,
    committed: AtomicBool,
    /// Per run, the last step this runtime ran (until a commit is proven).
    seen: Mutex<HashMap<String, u32>>,
}

impl Runner {
    fn new(shard: u32, ended: Arc<AtomicU64>) -> Self {
        Self {
            shard,
            ended,
            first: AtomicBool::new(false),
            committed: AtomicBool::new(false),
            seen: Mutex::new(HashMap::new()),
        }
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

impl StepRunner for Runner {
    async fn run_step(&self, step: &Step) -> Result<StepOutcome, StepError> {
        if !self.first.swap(true, Ordering::SeqCst) {
            say(&format!("first-step {}", self.shard));
        }
        if !self.committed.load(Ordering::SeqCst) {
            let mut seen = self.seen.lock().unwrap();
            let before = seen.insert(step.run_id.clone(), step.step_number);
            if step.step_number > 0
                && before == Some(step.step_number - 1)
                && !self.committed.swap(true, Ordering::SeqCst)
            {
                say(&format!("committed {}", self.shard));
                seen.clear();
            }
        }
        let payload = step.payload.clone();
        if step.headers.contains_key("loop") || step.step_number + 1 < STEPS_PER_RUN {
            return Ok(StepOutcome::Continue { payload });
        }
        self.ended.fetch_add(1, Ordering::Relaxed);
        Ok(StepOutcome::Succeed { result: payload })
    }
}

fn store_options() -> StoreOptions {
    StoreOptions::default()
        .flush_interval(FLUSH)
        .inbox_touch_poll(TOUCH_POLL)
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set"))
}

fn env_ms(name: &str) -> Duration {
    Duration::from_millis(env(name).parse().expect("a number of ms"))
}

/// A worker process: `FLEET_BENCH_ROLE` = `fleet` or `single`. Runs until
/// killed (or its stdin closes).
fn worker_main(role: &str) {
    // The fleet's info lines (membership changes) are events for the
    // parent, read from stderr.
    let filter =
        std::env::var("FLEET_BENCH_LOG").unwrap_or_else(|_| "warn,waymark::fleet=info".into());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Runtime::new().expect("a tokio runtime");
    rt.block_on(async {
        let location = StoreLocation::from_url(&env("FLEET_BENCH_URL")).expect("the store URL");
        let ended = Arc::new(AtomicU64::new(0));
        tokio::spawn({
            let ended = ended.clone();
            async move {
                let mut last = 0;
                loop {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    let now = ended.load(Ordering::Relaxed);
                    if now != last {
                        say(&format!("ended {now}"));
                        last = now;
                    }
                }
            }
        });
        // Stops when the parent closes stdin (or exits).
        let stdin_closed = async {
            let _ = tokio::task::spawn_blocking(|| {
                let mut sink = String::new();
                while std::io::stdin().read_line(&mut sink).is_ok_and(|n| n > 0) {}
            })
            .await;
        };
        let ran = if role == "single" {
            let queue = open_worker_store(&location, store_options())
                .await
                .expect("open the store");
            let runtime = WorkflowRuntime::builder(queue, Runner::new(0, ended), NoopTerminalHook)
                .max_concurrent_steps(SLOTS)
                .build()
                .expect("build the runtime");
            say("opened 0");
            runtime.run(stdin_closed).await
        } else {
            let shards: u32 = env("FLEET_BENCH_SHARDS").parse().expect("a shard count");
            let timing = LeaseTiming {
                duration: env_ms("FLEET_BENCH_LEASE_MS"),
                guard: env_ms("FLEET_BENCH_GUARD_MS"),
            };
            let worker = FleetWorker::new(location, shards, move |shard, queue| {
                let rt = WorkflowRuntime::builder(
                    queue,
                    Runner::new(shard, ended.clone()),
                    NoopTerminalHook,
                )
                .max_concurrent_steps(SLOTS)
                .build();
                say(&format!("opened {shard}"));
                rt
            })
            .lease_timing(timing)
            .store_options(|_| store_options());
            say(&format!("id {}", worker.id()));
            worker.run(stdin_closed).await
        };
        if let Err(e) = ran {
            eprintln!("fleet bench worker: {e}");
            std::process::exit(1);
        }
    });
}

// ---------------------------------------------------------------- parent

/// What the worker processes reported, with when each line arrived.
#[derive(Default)]
struct Reports {
    /// Per worker: its id and its `ended` count.
    ids: HashMap<usize, String>,
    ended: HashMap<usize, u64>,
    events: Vec<(Instant, usize, String)>,
}

struct Workers {
    /// When the processes were started.
    born: Instant,
    children: Vec<Child>,
    reports: Arc<Mutex<Reports>>,
}

struct Store {
    name: &'static str,
    /// Makes a fresh store URL for one case.
    fresh: Box<dyn Fn(&str) -> String>,
}

impl Workers {
    fn spawn(n: usize, role: &str, url: &str, shards: u32, timing: LeaseTiming) -> Self {
        let exe = std::env::current_exe().expect("this binary's path");
        let born = Instant::now();
        let reports = Arc::new(Mutex::new(Reports::default()));
        let mut children = Vec::new();
        for w in 0..n {
            let mut child = Command::new(&exe)
                .env("FLEET_BENCH_ROLE", role)
                .env("FLEET_BENCH_URL", url)
                .env("FLEET_BENCH_SHARDS", shards.to_string())
                .env(
                    "FLEET_BENCH_LEASE_MS",
                    timing.duration.as_millis().to_string(),
                )
                .env("FLEET_BENCH_GUARD_MS", timing.guard.as_millis().to_string())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn a worker process");
            let stderr = child.stderr.take().expect("its stderr");
            let events = reports.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    let at = Instant::now();
                    if line.contains("the fleet's live workers changed") {
                        let live = line
                            .split_whitespace()
                            .find_map(|f| f.strip_prefix("live="))
                            .unwrap_or("?");
                        let event = format!("live {live}");
                        events.lock().unwrap().events.push((at, w, event));
                    } else if !line.contains("took the shard")
                        && !line.contains("handed the shard back")
                    {
                        eprintln!("worker {w}: {line}");
                    }
                }
            });
            let stdout = child.stdout.take().expect("its stdout");
            let reports = reports.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let at = Instant::now();
                    let mut r = reports.lock().unwrap();
                    if let Some(id) = line.strip_prefix("id ") {
                        r.ids.insert(w, id.to_string());
                    } else if let Some(n) = line.strip_prefix("ended ") {
                        r.ended.insert(w, n.parse().unwrap_or(0));
                    } else {
                        r.events.push((at, w, line));
                    }
                }
            });
            children.push(child);
        }
        Self {
            born,
            children,
            reports,
        }
    }

    fn ended(&self) -> u64 {
        self.reports.lock().unwrap().ended.values().sum()
    }

    /// When worker `w` (any, if `None`) reported `line` after `after`.
    fn event(&self, w: Option<usize>, line: &str, after: Instant) -> Option<Instant> {
        let r = self.reports.lock().unwrap();
        r.events
            .iter()
            .find(|(at, who, l)| *at >= after && w.is_none_or(|w| w == *who) && l == line)
            .map(|(at, _, _)| *at)
    }

    /// The last live count worker `w` reported before `before`.
    fn last_live(&self, w: usize, before: Instant) -> Option<String> {
        let r = self.reports.lock().unwrap();
        r.events
            .iter()
            .rev()
            .filter(|(at, who, _)| *at < before && *who == w)
            .find_map(|(_, _, l)| l.strip_prefix("live "))
            .map(str::to_string)
    }

    fn worker_of(&self, id: &str) -> Option<usize> {
        let r = self.reports.lock().unwrap();
        r.ids.iter().find(|(_, i)| *i == id).map(|(w, _)| *w)
    }

    /// User + system CPU seconds of each worker process so far.
    fn cpu(&self) -> Vec<f64> {
        self.children.iter().map(|c| cpu_secs(c.id())).collect()
    }

    fn kill(&mut self, w: usize) {
        let _ = self.children[w].kill();
        let _ = self.children[w].wait();
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for w in 0..self.children.len() {
            self.kill(w);
        }
    }
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime of a process, in seconds, from `/proc/PID/stat` (0 when
/// it cannot be read).
fn cpu_secs(pid: u32) -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    let ticks = *TICKS.get_or_init(clock_ticks);
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces): state is
    // field 3, utime field 14, stime field 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| fields.get(i - 3).and_then(|f| f.parse::<f64>().ok());
    (field(14).unwrap_or(0.0) + field(15).unwrap_or(0.0)) / ticks
}

/// moto's pid, from the pid file `scripts/moto-server` writes.
fn moto_pid() -> Option<u32> {
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/target/moto.pid");
    std::fs::read_to_string(file).ok()?.trim().parse().ok()
}

async fn until<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + GUARD;
    while !f().await {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The owners of each shard's lease (`None`: free or released).
async fn owners(leases: &Leases, shards: u32) -> Vec<Option<String>> {
    let mut out = Vec::new();
    for shard in 0..shards {
        out.push(match leases.view(shard).await {
            Ok(Some(v)) if !v.released => Some(v.owner),
            _ => None,
        });
    }
    out
}

/// Wait until each shard is held by a distinct worker and every shard's
/// runtime is built.
async fn balanced(location: &StoreLocation, workers: &Workers, shards: u32, timing: LeaseTiming) {
    let leases = Leases::new(location.clone(), "fleet-bench-observer".into(), timing)
        .expect("the lease timing");
    let since = workers.born;
    until("every shard held by a distinct worker", || async {
        let o = owners(&leases, shards).await;
        let mut distinct: Vec<&String> = o.iter().flatten().collect();
        distinct.sort();
        distinct.dedup();
        distinct.len() == shards as usize
            && o.iter().enumerate().all(|(s, owner)| {
                owner
                    .as_deref()
                    .and_then(|id| workers.worker_of(id))
                    .is_some_and(|w| {
                        workers
                            .event(Some(w), &format!("opened {s}"), since)
                            .is_some()
                    })
            })
    })
    .await;
}

/// Submits, then reads outcomes, through a fleet client or a plain one.
enum AnyClient {
    Fleet(FleetClient),
    Single(Client),
}

impl AnyClient {
    async fn submit(&self, spec: RunSpec) -> Result<(), Error> {
        match self {
            Self::Fleet(c) => c.submit(spec).await.map(drop),
            Self::Single(c) => c.submit(spec).await.map(drop),
        }
    }

    /// The run's outcome, once this client's reader (which lags by its
    /// refresh) sees the run.
    async fn wait(&self, run_id: &str) -> Result<waymark::RunOutcome, Error> {
        let deadline = Instant::now() + GUARD;
        loop {
            let waited = match self {
                Self::Fleet(c) => c.wait(run_id, GUARD).await,
                Self::Single(c) => c.wait(run_id, GUARD).await,
            };
            match waited {
                Err(Error::RunNotFound(_)) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                other => return other,
            }
        }
    }
}

fn client_options() -> ClientOptions {
    ClientOptions::default().refresh_interval(Duration::from_millis(100))
}

/// One throughput case: `shards` = 0 is the single-process baseline.
async fn throughput(store: &Store, shards: u32, runs: usize, timing: LeaseTiming) -> String {
    let case = if shards == 0 {
        "single".to_string()
    } else {
        format!("fleet{shards}")
    };
    let url = (store.fresh)(&case);
    let location = StoreLocation::from_url(&url).expect("the store URL");
    let set_up = Instant::now();
    let (workers, client) = if shards == 0 {
        let workers = Workers::spawn(1, "single", &url, 1, timing);
        until("the runtime is built", || async {
            workers.event(None, "opened 0", set_up).is_some()
        })
        .await;
        let client = Client::open(&location, client_options())
            .await
            .expect("open the client");
        (workers, AnyClient::Single(client))
    } else {
        let workers = Workers::spawn(shards as usize, "fleet", &url, shards, timing);
        balanced(&location, &workers, shards, timing).await;
        let client = FleetClient::open(&location, client_options())
            .await
            .expect("open the fleet client");
        (workers, AnyClient::Fleet(client))
    };
    let set_up = set_up.elapsed();
    let client = Arc::new(client);
    let ids: Arc<Vec<String>> = Arc::new(
        (0..runs)
            .map(|i| format!("{}-{case}-{i:06}", store.name))
            .collect(),
    );

    let moto = moto_pid().filter(|_| store.name == "moto");
    let cpu0 = workers.cpu();
    let me0 = cpu_secs(std::process::id());
    let moto0 = moto.map(cpu_secs);
    let start = Instant::now();
    let mut senders = tokio::task::JoinSet::new();
    for s in 0..SENDERS {
        let (client, ids) = (client.clone(), ids.clone());
        senders.spawn(async move {
            for id in ids.iter().skip(s).step_by(SENDERS) {
                let spec = RunSpec {
                    run_id: Some(id.clone()),
                    input: id.as_bytes().to_vec(),
                    ..Default::default()
                };
                client.submit(spec).await.expect("submit");
            }
        });
    }
    while let Some(done) = senders.join_next().await {
        done.expect("a sender");
    }
    let sent = start.elapsed();
    until("every run's last step ran", || async {
        workers.ended() >= runs as u64
    })
    .await;
    let elapsed = start.elapsed();
    let cpu: f64 = workers
        .cpu()
        .iter()
        .zip(&cpu0)
        .map(|(after, before)| after - before)
        .sum();
    let me = cpu_secs(std::process::id()) - me0;
    let moto_cpu = moto.zip(moto0).map(|(pid, before)| cpu_secs(pid) - before);
    for id in ids.iter() {
        let out = client.wait(id).await.expect("the run's outcome");
        assert_eq!(out.status, TerminalStatus::Succeeded, "run {id}");
        assert_eq!(out.result.as_deref(), Some(id.as_bytes()), "run {id}");
    }
    drop(workers);

    let steps = runs as f64 * f64::from(STEPS_PER_RUN);
    let secs = elapsed.as_secs_f64();
    let label = if shards == 0 {
        "1 runtime, no fleet (baseline)".to_string()
    } else {
        format!("{shards} shards × {shards} workers")
    };
    format!(
        "| {} | {label} | {runs} | {:.1} s ({:.1} s sending) | {:.0} | {:.2} | {:.0} | {:.2} | {} | {:.1} s |",
        store.name,
        secs,
        sent.as_secs_f64(),
        steps / secs,
        cpu,
        steps / cpu.max(1e-9),
        me,
        moto_cpu.map_or("–".into(), |c| format!("{c:.2}")),
        set_up.as_secs_f64(),
    )
}

/// One takeover sample.
async fn takeover(store: &Store, timing: LeaseTiming, sample: usize) -> String {
    let case = format!("takeover{}-{sample}", timing.duration.as_millis());
    let url = (store.fresh)(&case);
    let location = StoreLocation::from_url(&url).expect("the store URL");
    let mut workers = Workers::spawn(2, "fleet", &url, 2, timing);
    balanced(&location, &workers, 2, timing).await;
    let leases = Leases::new(location.clone(), "fleet-bench-observer".into(), timing)
        .expect("the lease timing");
    let holder = owners(&leases, 2).await[0]
        .clone()
        .expect("shard 0's owner");
    let victim = workers.worker_of(&holder).expect("the holder's process");
    let survivor = 1 - victim;
    let client = FleetClient::open(&location, client_options())
        .await
        .expect("open the fleet client");
    // Two endless runs on shard 0.
    let loops: Vec<String> = (0..)
        .map(|i| format!("loop-{i}"))
        .filter(|id| shard_of_run(id, 2) == 0)
        .take(2)
        .collect();
    let began = workers.born;
    for id in &loops {
        let spec = RunSpec {
            run_id: Some(id.clone()),
            headers: [("loop".to_string(), "1".to_string())].into(),
            ..Default::default()
        };
        client.submit(spec).await.expect("submit");
    }
    until("the holder commits on shard 0", || async {
        workers.event(Some(victim), "committed 0", began).is_some()
    })
    .await;

    // Steady state: both workers count each other live (a worker that
    // still counts 1 live watches the other's shards already), then one
    // more renewal.
    until("both workers count 2 live", || async {
        [victim, survivor]
            .iter()
            .all(|w| workers.last_live(*w, Instant::now()).as_deref() == Some("2"))
    })
    .await;
    tokio::time::sleep(timing.renew_every()).await;
    let killed = Instant::now();
    workers.kill(victim);
    let counted_before = workers.last_live(survivor, killed);
    let mut lease_at = None;
    let deadline = killed + GUARD;
    while lease_at.is_none() {
        assert!(Instant::now() < deadline, "never: shard 0 taken over");
        if let Ok(Some(v)) = leases.view(0).await
            && v.owner != holder
            && !v.released
        {
            lease_at = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let lease_at = lease_at.unwrap_or(killed);
    let mut at = [killed; 3];
    for (i, line) in ["opened 0", "first-step 0", "committed 0"]
        .iter()
        .enumerate()
    {
        until(line, || async {
            workers.event(Some(survivor), line, killed).is_some()
        })
        .await;
        at[i] = workers
            .event(Some(survivor), line, killed)
            .unwrap_or(killed);
    }
    let lapsed = workers.event(Some(survivor), "live 1", killed);
    {
        let r = workers.reports.lock().unwrap();
        let counts: Vec<String> = r
            .events
            .iter()
            .filter(|(_, w, l)| *w == survivor && l.starts_with("live "))
            .map(|(at, _, l)| {
                let t = at.saturating_duration_since(killed).as_secs_f64()
                    - killed.saturating_duration_since(*at).as_secs_f64();
                format!("{l} at {t:+.2} s")
            })
            .collect();
        eprintln!("takeover sample {sample}: the survivor's counts: {counts:?}");
    }
    drop(workers);
    let s = |a: Instant, b: Instant| b.saturating_duration_since(a).as_secs_f64();
    let membership = match (lapsed, counted_before.as_deref()) {
        (Some(at), _) => format!("{:.2}", s(killed, at)),
        (None, Some("1")) => "– (it counted 1 live already)".into(),
        (None, counted) => format!("– (still counts {})", counted.unwrap_or("?")),
    };
    let window = timing.duration + timing.guard;
    format!(
        "| {} | {:?} / {:?} | {sample} | {membership} | {:.2} | {:.2} | {:.3} | {:.3} | **{:.2}** | {:.1} / {:.1} |",
        store.name,
        timing.duration,
        timing.guard,
        s(killed, lease_at),
        s(lease_at, at[0]),
        s(at[0], at[1]),
        s(at[1], at[2]),
        s(killed, at[2]),
        window.as_secs_f64(),
        2.0 * window.as_secs_f64(),
    )
}

fn main() {
    if let Ok(role) = std::env::var("FLEET_BENCH_ROLE") {
        worker_main(&role);
        return;
    }
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    // `--only throughput|takeover`, `--store local|moto`: a subset.
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let (only, only_store) = (arg("--only"), arg("--store"));
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let base = dir.path().to_path_buf();
    let mut stores = vec![Store {
        name: "local",
        fresh: Box::new(move |case| format!("file://{}/{case}", base.display())),
    }];
    match std::env::var("WAYMARK_S3_URL") {
        Ok(url) if std::env::var("AWS_ENDPOINT").is_ok() => {
            let tag = ulid::Ulid::generate().to_string().to_lowercase();
            stores.push(Store {
                name: "moto",
                fresh: Box::new(move |case| format!("{url}-fleetbench-{tag}-{case}")),
            });
        }
        _ => eprintln!(
            "\n!!!!!!!! fleet bench: SKIPPING the moto S3 parts: WAYMARK_S3_URL / AWS_ENDPOINT are not set.\n\
             !!!!!!!! Run `eval \"$(scripts/moto-server start)\"` first (and `scripts/moto-server stop` after).\n"
        ),
    }
    // Throughput at the default lease (10 s / 2 s): at 2 s / 0.5 s, four
    // workers on a saturated moto missed renewals and thrashed (see
    // BENCHMARKS.md). Takeovers at a short lease, and the default.
    let throughput_timing = LeaseTiming::default();
    let short = if quick {
        LeaseTiming {
            duration: Duration::from_secs(1),
            guard: Duration::from_millis(250),
        }
    } else {
        LeaseTiming {
            duration: Duration::from_secs(2),
            guard: Duration::from_millis(500),
        }
    };
    // (timing, samples) per store.
    let takeovers: Vec<(LeaseTiming, usize)> = if quick {
        vec![(short, 1)]
    } else {
        vec![(short, 5), (LeaseTiming::default(), 1)]
    };
    let rt = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let mut rows = Vec::new();
    let mut takeover_rows = Vec::new();
    stores.retain(|s| only_store.as_deref().is_none_or(|o| o == s.name));
    for store in &stores {
        for shards in [0, 1, 2, 4] {
            if only.as_deref().is_some_and(|o| o != "throughput") {
                continue;
            }
            if quick && store.name == "moto" && shards != 2 && shards != 0 {
                continue;
            }
            // moto takes ~10 ms of a core per request: fewer runs there.
            let runs = match (quick, store.name) {
                (true, _) => 100,
                (false, "moto") => 1_000,
                (false, _) => 2_000,
            };
            let row = rt.block_on(throughput(store, shards, runs, throughput_timing));
            eprintln!("{row}");
            rows.push(row);
        }
        for (timing, samples) in &takeovers {
            if only.as_deref().is_some_and(|o| o != "takeover") {
                continue;
            }
            // On moto the short lease thrashed (renewals slower than its
            // margin on a saturated 2-core machine; see BENCHMARKS.md).
            if store.name == "moto" && (quick || *timing != LeaseTiming::default()) {
                continue;
            }
            for sample in 1..=*samples {
                let row = rt.block_on(takeover(store, *timing, sample));
                eprintln!("{row}");
                takeover_rows.push(row);
            }
        }
    }
    println!(
        "\n#### fleet: step throughput ({} mode, {:.0} s; runs of {STEPS_PER_RUN} steps; flush {FLUSH:?}, \
         inbox touch poll {TOUCH_POLL:?}, {SLOTS} slots per runtime, {SENDERS} senders; lease {:?} / guard {:?}; \
         CPU = user + sys from /proc/PID/stat over the timed window)\n",
        if quick { "quick" } else { "full" },
        started.elapsed().as_secs_f64(),
        throughput_timing.duration,
        throughput_timing.guard,
    );
    println!(
        "| store | processes | runs | wall (of it sending) | steps/s | worker CPU s | steps per worker CPU-s | client CPU s | moto CPU s | set-up |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in rows {
        println!("{row}");
    }
    println!(
        "\n#### fleet: takeover after SIGKILL (2 shards, 2 workers; seconds from the kill of shard 0's holder)\n"
    );
    println!(
        "| store | lease / guard | sample | kill → survivor counts 1 live | kill → survivor's lease | lease → opened | opened → first step | first step → committed | kill → committed | d+g / 2(d+g) |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in takeover_rows {
        println!("{row}");
    }
}
