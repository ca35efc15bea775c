//! The dashboard in a real browser: headless Chromium, driven over the
//! DevTools protocol, against `waymark serve` and a live worker. It checks
//! that the runs table shows the runs and the workflows page a tripped
//! workflow, resets that workflow with a mouse click on the page's reset
//! button, sees the reset happen, and saves screenshots under `target/`
//! (`target/dashboard-*.png`); and, on a fleet of two shards, that the
//! runs of both shards are listed, the header counts the shards' workers,
//! the workflows page shows each shard's breaker, and a reset clicked there
//! closes the tripped one.
//!
//! Skipped, loudly, when no Chromium is installed (`apt-get install
//! chromium`; `WAYMARK_CHROMIUM` names another binary).

mod operator;

use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use base64::Engine;
use operator::{Env, TOKEN, eventually, get, good_order, id_on, submit};
use serde_json::{Value, json};
use tungstenite::{Message, WebSocket};

/// The Chromium binary, if one is installed.
fn chromium() -> Option<PathBuf> {
    let names = match std::env::var("WAYMARK_CHROMIUM") {
        Ok(name) => vec![name],
        Err(_) => vec!["chromium".into(), "chromium-browser".into()],
    };
    names.into_iter().find_map(|name| {
        let path = Path::new(&name);
        if path.is_absolute() {
            return path.exists().then(|| path.to_path_buf());
        }
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(&name))
                .find(|p| p.exists())
        })
    })
}

/// Where the screenshots go: the cargo target directory.
fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("the target directory")
        .to_path_buf()
}

/// A headless Chromium, killed on drop.
struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    port: u16,
}

impl Browser {
    fn start(binary: &Path) -> Self {
        let profile = tempfile::tempdir().unwrap();
        let child = Command::new(binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--hide-scrollbars",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "--window-size=1280,760",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Chromium writes the port it picked into the profile.
        let port_file = profile.path().join("DevToolsActivePort");
        let port = eventually("Chromium's DevTools port", || {
            std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|text| text.lines().next()?.trim().parse().ok())
        });
        Self {
            child,
            _profile: profile,
            port,
        }
    }

    /// A DevTools session on the browser's first page.
    fn page(&self) -> Cdp {
        let addr = format!("127.0.0.1:{}", self.port);
        let targets = eventually("a page target", || {
            let list = get(&addr, "/json/list");
            let targets: Value = serde_json::from_str(&list.body).ok()?;
            let page = targets
                .as_array()?
                .iter()
                .find(|t| t["type"] == "page")?
                .clone();
            Some(page)
        });
        let url = targets["webSocketDebuggerUrl"]
            .as_str()
            .unwrap()
            .to_string();
        let stream = TcpStream::connect(&addr).unwrap();
        stream.set_read_timeout(Some(operator::HANG_GUARD)).unwrap();
        let (ws, _) = tungstenite::client(url.as_str(), stream).unwrap();
        Cdp { ws, next: 0 }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A DevTools protocol session on one page.
struct Cdp {
    ws: WebSocket<TcpStream>,
    next: u64,
}

impl Cdp {
    /// Call `method` and return its result (events in between are skipped).
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let message = json!({ "id": id, "method": method, "params": params });
        self.ws.send(Message::text(message.to_string())).unwrap();
        loop {
            let Message::Text(text) = self.ws.read().unwrap() else {
                continue;
            };
            let answer: Value = serde_json::from_str(&text).unwrap();
            if answer["id"] == id {
                assert!(answer["error"].is_null(), "{method}: {answer}");
                return answer["result"].clone();
            }
        }
    }

    /// Evaluate `expression` in the page; its value.
    fn eval(&mut self, expression: &str) -> Value {
        let result = self.call(
            "Runtime.evaluate",
            json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
        );
        assert!(
            result["exceptionDetails"].is_null(),
            "{expression}: {result}"
        );
        result["result"]["value"].clone()
    }

    /// Poll `expression` until it is truthy; its value.
    fn until(&mut self, what: &str, expression: &str) -> Value {
        eventually(what, || {
            let value = self.eval(expression);
            let truthy = !(value.is_null()
                || value == false
                || value == ""
                || value == 0
                || value.as_array().is_some_and(|a| a.is_empty()));
            truthy.then_some(value)
        })
    }

    /// Click the middle of the element `selector` with the mouse.
    fn click(&mut self, selector: &str) {
        let rect = self.until(
            &format!("{selector} to be on the page"),
            &format!(
                "(() => {{ const e = document.querySelector({selector:?}); if (!e) return null; \
                 const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; }})()"
            ),
        );
        let (x, y) = (rect[0].as_f64().unwrap(), rect[1].as_f64().unwrap());
        for kind in ["mousePressed", "mouseReleased"] {
            self.call(
                "Input.dispatchMouseEvent",
                json!({ "type": kind, "x": x, "y": y, "button": "left", "clickCount": 1 }),
            );
        }
    }

    /// Save a PNG screenshot of the page to `path`.
    fn screenshot(&mut self, path: &Path) {
        let shot = self.call("Page.captureScreenshot", json!({ "format": "png" }));
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap();
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        std::fs::write(path, png).unwrap();
        eprintln!("saved {}", path.display());
    }
}

/// The Chromium binary, or `None` after saying loudly that the test is
/// skipped.
fn chromium_or_skip() -> Option<PathBuf> {
    let found = chromium();
    if found.is_none() {
        // Written to stderr directly: the test harness captures `eprintln!`
        // of a passing test, and this must be seen.
        let _ = writeln!(
            std::io::stderr(),
            "\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
             !! SKIPPED the browser test: no Chromium found (apt-get install chromium,\n\
             !! or set WAYMARK_CHROMIUM to its path)\n\
             !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
        );
    }
    found
}

impl Browser {
    /// A page at `url`, 1280 by 760.
    fn open(&self, url: &str) -> Cdp {
        let mut page = self.page();
        page.call("Page.enable", json!({}));
        page.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": 1280, "height": 760, "deviceScaleFactor": 1, "mobile": false }),
        );
        page.call("Page.navigate", json!({ "url": url }));
        page
    }
}

#[test]
fn the_dashboard_in_headless_chromium_shows_runs_and_resets_a_tripped_workflow() {
    let Some(binary) = chromium_or_skip() else {
        return;
    };
    // The default workflow trips at its first failure.
    let env = Env::start(&["--trip-after", "1"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = rt.block_on(env.client());
    rt.block_on(async {
        for id in ["order-1001", "order-1002", "order-1003"] {
            submit(&client, id, "checkout", good_order()).await;
        }
        submit(&client, "order-1004", "default", operator::empty_order()).await;
        client
            .wait("order-1004", operator::HANG_GUARD)
            .await
            .unwrap();
        // Parked behind the trip until the reset.
        submit(&client, "order-1005", "default", good_order()).await;
    });
    let addr = env.addr.clone();
    eventually("order-1005 to park", || {
        (get(&addr, "/api/runs/order-1005").json()["live"]["state"] == "parked").then_some(())
    });

    let browser = Browser::start(&binary);
    let mut page = browser.open(&format!("http://{addr}/#/runs"));

    // The runs table lists every run with its state, updating live.
    let rows = page.until(
        "the runs table to list five runs",
        "(() => { const rows = [...document.querySelectorAll('#runs tr[data-run]')]; \
         return rows.length === 5 ? rows.map(r => r.dataset.run + ' ' + r.querySelector('.pill').textContent) : null; })()",
    );
    let rows: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    assert_eq!(rows[3], "order-1004 failed", "{rows:?}");
    assert_eq!(rows[4], "order-1005 parked", "{rows:?}");
    page.until(
        "the checkout runs to succeed on the page",
        "[...document.querySelectorAll('#runs tr[data-run] .pill')].filter(p => p.textContent === 'succeeded').length === 3",
    );
    let shots = target_dir();
    page.screenshot(&shots.join("dashboard-runs.png"));

    // The workflows page shows the tripped workflow.
    page.eval("location.hash = '#/workflows'");
    let breaker = page.until(
        "the workflows page to show the default workflow",
        "document.querySelector('#workflows tr[data-workflow=\"default\"] .breaker .pill')?.textContent",
    );
    assert_eq!(breaker, "tripped");
    page.screenshot(&shots.join("dashboard-workflows-tripped.png"));

    // Reset it through the page: the token in its field, a click on reset.
    page.eval(&format!(
        "(() => {{ const t = document.getElementById('token'); t.value = {TOKEN:?}; \
         t.dispatchEvent(new Event('change')); }})()"
    ));
    page.click("#workflows button[data-reset=\"default\"]");
    let said = page.until(
        "the page to report the reset",
        "document.getElementById('message').hidden ? null : document.getElementById('message').textContent",
    );
    assert!(
        said.as_str().unwrap().starts_with("reset default"),
        "{said}"
    );
    page.until(
        "the breaker to show closed",
        "document.querySelector('#workflows tr[data-workflow=\"default\"] .breaker .pill')?.textContent === 'closed'",
    );
    // The reset happened in the store: the breaker is closed and the parked
    // run goes on to succeed.
    let workflows = get(&addr, "/api/workflows").json();
    let default = workflows
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == "default")
        .unwrap();
    assert_eq!(default["breaker"]["state"], "closed");
    let outcome = rt
        .block_on(client.wait("order-1005", operator::HANG_GUARD))
        .unwrap();
    assert_eq!(outcome.status, waymark::TerminalStatus::Succeeded);

    // The run page's step timeline, and the runs table after the reset.
    page.eval("location.hash = '#/run/order-1005'");
    let steps = page.until(
        "the run page to show the run's step timeline to its end",
        "(() => { const items = [...document.querySelectorAll('#timeline li')]\
           .map(li => li.dataset.step + '/' + li.dataset.attempt + ' ' + li.dataset.outcome); \
           return items.length && items[items.length - 1].endsWith('succeeded') ? items : null; })()",
    );
    // Parked behind the trip (no attempt spent), then the five steps, the
    // third waiting for the pick-up window.
    assert_eq!(
        steps,
        json!([
            "0/1 parked",
            "0/1 continued",
            "1/1 continued",
            "2/1 delayed",
            "3/1 continued",
            "4/1 succeeded"
        ])
    );
    page.screenshot(&shots.join("dashboard-run.png"));
    page.eval("location.hash = '#/runs'");
    page.until(
        "order-1005 to show succeeded in the table",
        "document.querySelector('#runs tr[data-run=\"order-1005\"] .pill')?.textContent === 'succeeded'",
    );
    page.screenshot(&shots.join("dashboard-runs-after-reset.png"));
    rt.block_on(client.close()).unwrap();

    // A record broken while no worker runs: the API and the page list the
    // other runs and name the one they cannot read.
    let mut env = env;
    env.worker.signal("TERM");
    env.worker.wait();
    rt.block_on(async {
        let queue = waymark::open_worker_store(&env.location(), Default::default())
            .await
            .unwrap();
        queue
            .kv_put(b"wm/demo-orders/out/order-1002", b"\xc1")
            .await
            .unwrap();
        std::sync::Arc::try_unwrap(queue)
            .ok()
            .unwrap()
            .close()
            .await
            .unwrap();
    });
    let page_json = eventually("/api/runs to name order-1002 unreadable", || {
        let page = get(&addr, "/api/runs").json();
        (page["unreadable"][0]["run_id"] == "order-1002").then_some(page)
    });
    assert_eq!(
        page_json["runs"].as_array().unwrap().len(),
        4,
        "{page_json}"
    );
    let said = page.until(
        "the runs page to name the unreadable run",
        "document.getElementById('unreadable')?.textContent",
    );
    let said = said.as_str().unwrap();
    assert!(
        said.contains("1 run(s) left out")
            && said.contains("order-1002: record `wm/demo-orders/out/order-1002` does not decode"),
        "{said}"
    );
    assert_eq!(
        page.eval("document.querySelectorAll('#runs tr[data-run]').length"),
        json!(4)
    );
    page.screenshot(&shots.join("dashboard-runs-unreadable.png"));
}

#[test]
fn the_dashboard_on_a_fleet_shows_each_shards_breaker_and_resets_them() {
    let Some(binary) = chromium_or_skip() else {
        return;
    };
    // Two shards; `default` trips at its first failure, on shard 1 only.
    let env = Env::start_fleet(2, &["--trip-after", "1"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let fleet = rt.block_on(env.fleet_client());
    let (ok0, ok1) = (id_on("order", 0, 2), id_on("order", 1, 2));
    let (fail, parked) = (id_on("fail", 1, 2), id_on("parked", 1, 2));
    let spec = |id: &str, workflow: &str, input: Vec<u8>| waymark::RunSpec {
        run_id: Some(id.into()),
        workflow: Some(workflow.into()),
        input,
        ..Default::default()
    };
    rt.block_on(async {
        // A success of `default` on shard 0 gives that shard a row too.
        for (id, workflow) in [(&ok0, "default"), (&ok1, "checkout")] {
            fleet
                .submit_and_wait(spec(id, workflow, good_order()), operator::HANG_GUARD)
                .await
                .unwrap();
        }
        fleet
            .submit_and_wait(
                spec(&fail, "default", operator::empty_order()),
                operator::HANG_GUARD,
            )
            .await
            .unwrap();
        fleet.wait(&fail, operator::HANG_GUARD).await.unwrap();
        fleet
            .submit_and_wait(spec(&parked, "default", good_order()), operator::HANG_GUARD)
            .await
            .unwrap();
    });
    let addr = env.addr.clone();
    eventually("the run on shard 1 to park", || {
        (get(&addr, &format!("/api/runs/{parked}")).json()["live"]["state"] == "parked")
            .then_some(())
    });

    let browser = Browser::start(&binary);
    let mut page = browser.open(&format!("http://{addr}/#/runs"));
    // The runs of both shards in one table; the header counts the shards.
    let rows = page.until(
        "the runs table to list the four runs",
        "(() => { const rows = [...document.querySelectorAll('#runs tr[data-run]')]; \
         return rows.length === 4 ? rows.map(r => r.dataset.run) : null; })()",
    );
    let mut want = vec![ok0.clone(), ok1.clone(), fail.clone(), parked.clone()];
    want.sort();
    assert_eq!(rows, json!(want));
    let header = page.until(
        "the header to show the fleet",
        "(() => { const t = document.getElementById('worker').textContent; \
         return t.startsWith('fleet') ? t : null; })()",
    );
    assert!(
        header
            .as_str()
            .unwrap()
            .starts_with("fleet of 2 shards: 2 with a live worker"),
        "{header}"
    );

    // One row per shard, tripped on shard 1 only.
    page.eval("location.hash = '#/workflows'");
    let row = |shard: u32| {
        format!(
            "document.querySelector('#workflows tr[data-workflow=\"default\"][data-shard=\"{shard}\"] .breaker .pill')?.textContent"
        )
    };
    assert_eq!(page.until("shard 1's breaker", &row(1)), "tripped");
    assert_eq!(page.until("shard 0's breaker", &row(0)), "closed");
    let shots = target_dir();
    page.screenshot(&shots.join("dashboard-fleet-workflows-tripped.png"));

    // Reset through the page: it closes the breaker where it was open.
    page.eval(&format!(
        "(() => {{ const t = document.getElementById('token'); t.value = {TOKEN:?}; \
         t.dispatchEvent(new Event('change')); }})()"
    ));
    page.click("#workflows tr[data-shard=\"1\"] button[data-reset=\"default\"]");
    let said = page.until(
        "the page to report the reset",
        "document.getElementById('message').hidden ? null : document.getElementById('message').textContent",
    );
    assert!(
        said.as_str()
            .unwrap()
            .starts_with("reset default on shard 1"),
        "{said}"
    );
    page.until(
        "shard 1's breaker to show closed",
        &format!("{} === 'closed'", row(1)),
    );
    let outcome = rt
        .block_on(fleet.wait(&parked, operator::HANG_GUARD))
        .unwrap();
    assert_eq!(outcome.status, waymark::TerminalStatus::Succeeded);
    page.screenshot(&shots.join("dashboard-fleet-workflows-reset.png"));
    rt.block_on(fleet.close()).unwrap();
}
