//! Shared by `tests/serve.rs` and `tests/browser.rs`: a `waymark worker`
//! and a `waymark serve` as processes on a temporary store, a minimal HTTP
//! client, the demo's order inputs, and a library client for submitting.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use waymark::{Client, ClientOptions, RunSpec, StoreLocation};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_waymark");
/// The bearer token `serve` is started with.
pub const TOKEN: &str = "s3cret-token";
/// A guard against a hung process or condition: far above any honest run.
pub const HANG_GUARD: Duration = Duration::from_secs(90);

/// A child process whose stdout lines are read on a thread (and its
/// stderr, passed on and kept); killed on drop.
pub struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
    pub seen: Vec<String>,
    /// Its stderr so far.
    errors: Arc<Mutex<String>>,
    /// The thread reading its stderr.
    stderr_reader: Option<std::thread::JoinHandle<()>>,
    name: &'static str,
}

impl Proc {
    /// Start `waymark ARGS`.
    pub fn start(name: &'static str, args: &[&str], envs: &[(&str, &str)]) -> Self {
        let mut child = Command::new(BIN)
            .env("TERM", "dumb")
            .env_remove("WAYMARK_TOKEN")
            .envs(envs.iter().copied())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let errors = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let stderr_reader = std::thread::spawn({
            let errors = errors.clone();
            move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { return };
                    eprintln!("{line}");
                    let mut errors = errors.lock().unwrap();
                    errors.push_str(&line);
                    errors.push('\n');
                }
            }
        });
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Self {
            child,
            lines,
            seen: vec![],
            errors,
            stderr_reader: Some(stderr_reader),
            name,
        }
    }

    /// Its stderr: all of it once [`Self::wait`] returned.
    pub fn stderr(&self) -> String {
        self.errors.lock().unwrap().clone()
    }

    /// Wait for a fleet worker asked to stop: it exits 0, or 1 when it
    /// dropped a shard instead of handing it back (a lease renewal too late
    /// on a loaded machine), which it printed.
    pub fn wait_fleet_stopped(&mut self) {
        let code = self.wait();
        let dropped = self.seen.iter().any(|l| l.contains("dropped shard"));
        assert_eq!(
            code,
            Some(if dropped { 1 } else { 0 }),
            "{}\n{}",
            self.seen.join("\n"),
            self.stderr()
        );
    }

    /// Read lines until one contains `needle`; that line.
    pub fn until(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + HANG_GUARD;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "{} did not print `{needle}`; it printed:\n{}",
                    self.name,
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// The address in the line containing `needle`: the text after
    /// `http://` up to the next `/`.
    pub fn address(&mut self, needle: &str) -> String {
        let line = self.until(needle);
        let start = line.find("http://").expect("an address") + "http://".len();
        let rest = &line[start..];
        rest[..rest.find('/').unwrap_or(rest.len())].to_string()
    }
}

impl Proc {
    /// Send the signal `name` (`TERM`, `INT`, `KILL`) to the process.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Wait for the process to end (up to [`HANG_GUARD`]), reading the rest
    /// of its output into `seen`; its exit code.
    pub fn wait(&mut self) -> Option<i32> {
        let deadline = Instant::now() + HANG_GUARD;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                    "{} did not end; it printed:\n{}",
                    self.name,
                    self.seen.join("\n")
                ),
            }
        }
        let code = self.child.wait().unwrap().code();
        // Its stderr is closed too: read to the end.
        if let Some(reader) = self.stderr_reader.take() {
            let _ = reader.join();
        }
        code
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A worker and `serve` on one temporary store.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub worker: Proc,
    pub serve: Proc,
    /// `serve`'s address.
    pub addr: String,
    /// The worker's metrics address.
    pub metrics: String,
}

impl Env {
    /// Start a worker (with `worker_args` after the store's, and a metrics
    /// endpoint) and then `serve` with the token.
    pub fn start(worker_args: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let data = data.to_str().unwrap();
        let mut args = vec!["worker", "--dir", data, "--metrics", "127.0.0.1:0"];
        args.extend_from_slice(worker_args);
        let mut worker = Proc::start("the worker", &args, &[]);
        let metrics = worker.address("metrics at");
        worker.until("worker on");
        let (serve, addr) = start_serve(&["--dir", data]);
        Self {
            dir,
            worker,
            serve,
            addr,
            metrics,
        }
    }

    /// Start a fleet worker on `shards` shards (with `worker_args` after
    /// the store's, short leases, no metrics endpoint), wait until it holds
    /// every shard, and then start `serve` on the fleet with the token.
    /// The fleet's URL is [`Self::fleet_url`].
    pub fn start_fleet(shards: u32, worker_args: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().join("fleet").display());
        let shards_arg = shards.to_string();
        let mut args = vec![
            "worker",
            "--store",
            &url,
            "--shards",
            &shards_arg,
            "--lease-ms",
            "3000",
            "--guard-ms",
            "600",
        ];
        args.extend_from_slice(worker_args);
        let mut worker = Proc::start("the fleet worker", &args, &[]);
        for _ in 0..shards {
            worker.until("took shard");
        }
        let (serve, addr) = start_serve(&["--store", &url]);
        Self {
            dir,
            worker,
            serve,
            addr,
            metrics: String::new(),
        }
    }

    /// The fleet's URL, for an env made by [`Self::start_fleet`].
    pub fn fleet_url(&self) -> String {
        format!("file://{}", self.dir.path().join("fleet").display())
    }

    /// A library client on every shard of the fleet of
    /// [`Self::start_fleet`] (the demo's step queue).
    pub async fn fleet_client(&self) -> waymark::fleet::FleetClient {
        let options = ClientOptions::default()
            .queue_name("demo-orders")
            .refresh_interval(Duration::from_millis(50));
        let location = StoreLocation::from_url(&self.fleet_url()).unwrap();
        waymark::fleet::FleetClient::open(&location, options)
            .await
            .unwrap()
    }

    /// The store's location (what `--dir` names).
    pub fn location(&self) -> StoreLocation {
        let path: PathBuf = self.dir.path().join("data").join("waymark");
        StoreLocation::from_url(&format!("file://{}", path.display())).unwrap()
    }

    /// A library client on the store (the demo's step queue).
    pub async fn client(&self) -> Client {
        let options = ClientOptions::default()
            .queue_name("demo-orders")
            .refresh_interval(Duration::from_millis(50));
        Client::open(&self.location(), options).await.unwrap()
    }
}

/// Start `waymark serve` on the store `store_args` name, on a free
/// loopback port, with the token; the process and its address.
fn start_serve(store_args: &[&str]) -> (Proc, String) {
    let mut args = vec!["serve"];
    args.extend_from_slice(store_args);
    args.extend(["--listen", "127.0.0.1:0"]);
    let mut serve = Proc::start("serve", &args, &[("WAYMARK_TOKEN", TOKEN)]);
    let addr = serve.address("serving");
    (serve, addr)
}

/// The first id `{prefix}-{k}` whose run lives on `shard` of a fleet of
/// `shards`.
pub fn id_on(prefix: &str, shard: u32, shards: u32) -> String {
    (0..)
        .map(|k| format!("{prefix}-{k}"))
        .find(|id| waymark::fleet::shard_of_run(id, shards) == shard)
        .unwrap()
}

/// An order the demo pipeline completes (five steps).
pub fn good_order() -> Vec<u8> {
    b"customer=Ada;email=ada@example.com;sku=BOOK-01;qty=1;total_cents=100;card=4242-4242-4242-4242;ship_to=London".to_vec()
}

/// An order the demo pipeline fails at step 0 (no items).
pub fn empty_order() -> Vec<u8> {
    b"customer=Ada;email=ada@example.com;sku=BOOK-01;qty=0;total_cents=0;card=4242-4242-4242-4242;ship_to=London".to_vec()
}

/// Submit run `id` of `workflow` with `input` and wait for the worker's
/// answer.
pub async fn submit(client: &Client, id: &str, workflow: &str, input: Vec<u8>) {
    client
        .submit_and_wait(
            RunSpec {
                run_id: Some(id.into()),
                workflow: Some(workflow.into()),
                input,
                ..Default::default()
            },
            HANG_GUARD,
        )
        .await
        .unwrap();
}

/// An HTTP answer: its status, head (status line and headers) and body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl Answer {
    /// The value of header `name` (the first, trimmed), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// One HTTP/1.1 request to `addr` (the connection closes after it).
pub fn http(method: &str, addr: &str, path: &str, token: Option<&str>) -> Answer {
    http_for(addr, method, addr, path, token)
}

/// [`http`] with `host` as its `Host` header.
pub fn http_for(host: &str, method: &str, addr: &str, path: &str, token: Option<&str>) -> Answer {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(HANG_GUARD)).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    // Read to the end, or to the length the headers give (some servers
    // keep the connection open).
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = stream.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        if complete(&raw) {
            break;
        }
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status");
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        unchunk(body)
    } else {
        body.to_string()
    };
    Answer {
        status,
        head: head.to_string(),
        body,
    }
}

/// Whether `raw` holds a whole response with a `Content-Length`.
fn complete(raw: &[u8]) -> bool {
    let text = String::from_utf8_lossy(raw);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .is_some_and(|len| body.len() >= len)
}

/// A chunked body, joined.
fn unchunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// `GET path` on `addr` without a token.
pub fn get(addr: &str, path: &str) -> Answer {
    http("GET", addr, path, None)
}

/// Poll `check` until it returns `Some`, up to [`HANG_GUARD`].
pub fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
