//! `waymark serve`'s JSON API and the Prometheus endpoints, against a live
//! `waymark worker` process: status codes, filters, paging, the bearer
//! token on changes, and the counters after a few runs; and the same API on
//! a fleet of two shards, routed, merged and showing the shards.

mod operator;

use operator::{Env, Proc, TOKEN, eventually, get, good_order, http, http_for, id_on, submit};

/// The run ids of a `/api/runs` answer.
fn ids(page: &serde_json::Value) -> Vec<String> {
    page["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["run_id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn every_endpoint_against_a_live_worker() {
    // The default workflow trips after two failures in a row; `nightly` is
    // a manual schedule (of the default workflow).
    let env = Env::start(&["--trip-after", "2", "--schedule", "nightly=manual"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = rt.block_on(env.client());
    rt.block_on(async {
        for id in ["shop-1", "shop-2", "shop-3"] {
            submit(&client, id, "shop", good_order()).await;
        }
        // Not an order: the step fails permanently and is dead-lettered.
        submit(&client, "shop-bad", "shop", b"garbage".to_vec()).await;
        for id in ["fail-1", "fail-2"] {
            submit(&client, id, "default", operator::empty_order()).await;
        }
        for id in ["shop-1", "shop-2", "shop-3", "shop-bad", "fail-1", "fail-2"] {
            client.wait(id, operator::HANG_GUARD).await.unwrap();
        }
        // The default workflow is tripped: this run parks.
        submit(&client, "parked-1", "default", good_order()).await;
    });
    let addr = env.addr.as_str();
    eventually("parked-1 to park", || {
        let run = get(addr, "/api/runs/parked-1").json();
        (run["live"]["state"] == "parked").then_some(())
    });

    // Listing: everything, then filtered, then paged.
    let all = get(addr, "/api/runs");
    assert_eq!(all.status, 200, "{}", all.body);
    let all = all.json();
    let expected: Vec<String> = [
        "fail-1", "fail-2", "parked-1", "shop-1", "shop-2", "shop-3", "shop-bad",
    ]
    .map(String::from)
    .to_vec();
    assert_eq!(ids(&all), expected);
    assert!(all["next"].is_null());

    let failed = get(addr, "/api/runs?state=failed").json();
    assert_eq!(ids(&failed), ["fail-1", "fail-2", "shop-bad"]);
    let shop = get(addr, "/api/runs?workflow=shop&state=succeeded").json();
    assert_eq!(ids(&shop), ["shop-1", "shop-2", "shop-3"]);
    let live = get(addr, "/api/runs?state=live").json();
    assert_eq!(ids(&live), ["parked-1"]);
    assert_eq!(live["runs"][0]["state"], "parked");
    assert_eq!(live["runs"][0]["live"], true);

    // Submit-time and header filters.
    let far = 4_102_444_800_000u64; // 2100-01-01
    assert_eq!(
        ids(&get(addr, &format!("/api/runs?until_ms={far}")).json()),
        expected
    );
    assert!(ids(&get(addr, &format!("/api/runs?since_ms={far}")).json()).is_empty());
    assert!(ids(&get(addr, "/api/runs?header=team%3Dnobody").json()).is_empty());

    let mut paged = Vec::new();
    let mut path = "/api/runs?limit=3".to_string();
    loop {
        let page = get(addr, &path);
        assert_eq!(page.status, 200, "{}", page.body);
        let page = page.json();
        let got = ids(&page);
        assert!(got.len() <= 3);
        paged.extend(got);
        match page["next"].as_str() {
            Some(next) => path = format!("/api/runs?limit=3&after={next}"),
            None => break,
        }
    }
    assert_eq!(paged, expected, "pages cover every run once, in order");

    // Malformed filters: 400 with a reason.
    for bad in [
        "/api/runs?state=bogus",
        "/api/runs?limit=0",
        "/api/runs?limit=100000",
        "/api/runs?limit=ten",
        "/api/runs?workflow=a%20b",
        "/api/runs?after=%00",
        "/api/runs?header=no-equals-sign",
        "/api/runs?since_ms=yesterday",
    ] {
        let answer = get(addr, bad);
        assert_eq!(answer.status, 400, "{bad}: {}", answer.body);
    }
    assert!(
        get(addr, "/api/runs?state=bogus").json()["error"]
            .as_str()
            .unwrap()
            .contains("parked")
    );

    // One run.
    let run = get(addr, "/api/runs/fail-1");
    assert_eq!(run.status, 200);
    let run = run.json();
    assert_eq!(run["workflow"], "default");
    assert_eq!(run["outcome"]["status"], "failed");
    assert_eq!(run["outcome"]["error"], "the order has no items");
    assert!(run["live"].is_null());
    let ok = get(addr, "/api/runs/shop-1").json();
    assert_eq!(ok["outcome"]["status"], "succeeded");
    assert_eq!(ok["outcome"]["final_step"], 4);
    // Its step history: five steps, one attempt each; the third delayed.
    let kinds: Vec<(u64, u64, String)> = ok["history"]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["attempts"].as_array().unwrap().clone())
        .map(|a| {
            (
                a["step"].as_u64().unwrap(),
                a["attempt"].as_u64().unwrap(),
                a["outcome"]["kind"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want: Vec<(u64, u64, String)> = [
        (0, 1, "continued"),
        (1, 1, "continued"),
        (2, 1, "delayed"),
        (3, 1, "continued"),
        (4, 1, "ended"),
    ]
    .map(|(s, a, k)| (s, a, k.to_string()))
    .to_vec();
    assert_eq!(kinds, want, "{}", ok["history"]);
    assert_eq!(
        ok["history"]["steps"][4]["attempts"][0]["outcome"]["status"],
        "Succeeded"
    );
    assert_eq!(get(addr, "/api/runs/no-such-run").status, 404);
    assert_eq!(get(addr, "/api/runs/bad%20id").status, 400);
    assert_eq!(get(addr, "/api/runs/%00").status, 400);

    // Workflows and breakers.
    let workflows = get(addr, "/api/workflows");
    assert_eq!(workflows.status, 200);
    let workflows = workflows.json();
    let default = workflows
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == "default")
        .expect("the default workflow");
    assert_eq!(default["breaker"]["state"], "tripped");
    assert!(default["failure_streak"].as_u64().unwrap() >= 2);

    // serve's own metrics: a gauge per workflow's breaker, read at scrape.
    let metrics = get(addr, "/metrics");
    assert_eq!(metrics.status, 200);
    assert!(
        metrics
            .body
            .contains("waymark_workflow_tripped{workflow=\"default\"} 1"),
        "{}",
        metrics.body
    );

    // Schedules.
    let schedules = get(addr, "/api/schedules");
    assert_eq!(schedules.status, 200);
    let schedules = schedules.json();
    assert_eq!(schedules[0]["id"], "nightly");
    assert_eq!(schedules[0]["fires"], "manual");
    assert_eq!(schedules[0]["active"], true);

    // The worker's heartbeat.
    let worker = get(addr, "/api/worker").json();
    assert!(worker["last_beat_ms"].as_u64().unwrap() > 0);
    assert_eq!(worker["closed"], false);

    // Changes need the token.
    for path in [
        "/api/runs/parked-1/cancel",
        "/api/schedules/nightly/trigger",
    ] {
        assert_eq!(http("POST", addr, path, None).status, 401, "{path}");
        assert_eq!(
            http("POST", addr, path, Some("wrong")).status,
            401,
            "{path}"
        );
    }
    assert_eq!(
        http("POST", addr, "/api/runs/bad%20id/cancel", Some(TOKEN)).status,
        400
    );
    // A trigger of a tripped workflow is refused by the worker: 409.
    let refused = http("POST", addr, "/api/schedules/nightly/trigger", Some(TOKEN));
    assert_eq!(refused.status, 409, "{}", refused.body);
    let unknown = http("POST", addr, "/api/schedules/nope/trigger", Some(TOKEN));
    assert_eq!(unknown.status, 404, "{}", unknown.body);
    let cancelled = http("POST", addr, "/api/runs/parked-1/cancel", Some(TOKEN));
    assert_eq!(cancelled.status, 200, "{}", cancelled.body);
    assert_eq!(cancelled.json()["cancelled"], true);
    eventually("parked-1 to end cancelled", || {
        let run = get(addr, "/api/runs/parked-1").json();
        (run["outcome"]["status"] == "cancelled").then_some(())
    });

    // Dead letters: the step that could not read its order, with its reason.
    let dead = get(addr, "/api/dead");
    assert_eq!(dead.status, 200, "{}", dead.body);
    let dead = dead.json();
    let jobs = dead["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 1, "{dead}");
    assert_eq!(jobs[0]["run_id"], "shop-bad");
    assert_eq!(jobs[0]["kind"], "step");
    assert_eq!(jobs[0]["step"], 0);
    assert_eq!(jobs[0]["reason"], "malformed order field `garbage`");
    let job = jobs[0]["job_id"].as_str().unwrap().to_string();
    assert_eq!(
        get(addr, "/api/dead?kind=hook").json()["jobs"],
        serde_json::json!([])
    );
    assert_eq!(get(addr, "/api/dead?kind=bogus").status, 400);
    assert_eq!(get(addr, "/api/dead?limit=0").status, 400);
    assert_eq!(get(addr, "/api/dead?shard=0").status, 400, "not a fleet");
    let requeue = format!("/api/dead/{job}/requeue");
    assert_eq!(http("POST", addr, &requeue, None).status, 401);
    assert_eq!(
        http("POST", addr, "/api/dead/no-such-job/requeue", Some(TOKEN)).status,
        404
    );
    assert_eq!(
        http("POST", addr, "/api/dead/bad%20id/requeue", Some(TOKEN)).status,
        400
    );
    let requeued = http("POST", addr, &requeue, Some(TOKEN));
    assert_eq!(requeued.status, 200, "{}", requeued.body);
    let requeued = requeued.json();
    assert_eq!(requeued["requeued"], "rerun");
    assert_eq!(requeued["run_id"], "shop-bad");
    assert_eq!(requeued["rerun"], 1);
    // It fails the same way again: re-run 1 ended.
    eventually("shop-bad's re-run to end", || {
        let run = get(addr, "/api/runs/shop-bad").json();
        (run["outcome"]["reruns"] == 1).then_some(())
    });

    // Reset the tripped workflow: the breaker closes and a trigger fires.
    let reset = "/api/workflows/default/reset";
    assert_eq!(http("POST", addr, reset, None).status, 401);
    assert_eq!(http("POST", addr, reset, Some("wrong")).status, 401);
    assert_eq!(
        http("POST", addr, "/api/workflows/bad%20name/reset", Some(TOKEN)).status,
        400
    );
    let answer = http("POST", addr, reset, Some(TOKEN));
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.json()["was_open"], true);
    let default = get(addr, "/api/workflows").json();
    let default = default
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == "default")
        .unwrap();
    assert_eq!(default["breaker"]["state"], "closed");
    let fired = http("POST", addr, "/api/schedules/nightly/trigger", Some(TOKEN));
    assert_eq!(fired.status, 200, "{}", fired.body);
    assert!(!fired.json()["run_id"].as_str().unwrap().is_empty());

    // Unknown pages; the breaker's gauge after the reset.
    assert_eq!(get(addr, "/api/nope").status, 404);
    let metrics = get(addr, "/metrics");
    assert_eq!(metrics.status, 200);
    assert!(
        metrics
            .body
            .contains("waymark_workflow_tripped{workflow=\"default\"} 0"),
        "{}",
        metrics.body
    );
    rt.block_on(client.close()).unwrap();
}

/// A cancel of a run nobody submitted is 404 with a JSON error (it was
/// 200 `{"cancelled": false}`, as for a run that had already ended); a
/// cancel of an ended run still answers 200, not cancelled.
#[test]
fn a_cancel_of_an_unknown_run_is_not_found() {
    let env = Env::start(&[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = rt.block_on(env.client());
    rt.block_on(async {
        submit(&client, "done-1", "shop", good_order()).await;
        client.wait("done-1", operator::HANG_GUARD).await.unwrap();
    });
    let addr = env.addr.as_str();
    let unknown = http("POST", addr, "/api/runs/no-such-run/cancel", Some(TOKEN));
    assert_eq!(unknown.status, 404, "{}", unknown.body);
    let error = unknown.json()["error"].as_str().unwrap().to_string();
    assert!(error.contains("no run `no-such-run` is known"), "{error}");
    let ended = http("POST", addr, "/api/runs/done-1/cancel", Some(TOKEN));
    assert_eq!(ended.status, 200, "{}", ended.body);
    assert_eq!(
        ended.json(),
        serde_json::json!({ "run_id": "done-1", "cancelled": false })
    );
    rt.block_on(client.close()).unwrap();
}

/// Files under `dir`, recursively (none if it does not exist).
fn files_under(dir: &std::path::Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            let path = e.path();
            if path.is_dir() { files_under(&path) } else { 1 }
        })
        .sum()
}

/// A second Ctrl-C quits `serve` at once (exit 130, saying so), while the
/// first one's graceful stop waits for a request in flight: here a cancel
/// that no worker answers, with an hour's timeout (the second Ctrl-C was
/// ignored, so it waited out the request).
#[test]
fn a_second_ctrl_c_quits_serve_at_once() {
    use std::io::Write;
    let mut env = Env::start(&[]);
    // No worker: a request waits for its answer up to the timeout.
    env.worker.signal("TERM");
    assert_eq!(env.worker.wait(), Some(0));
    let data = env.dir.path().join("data");
    let mut serve = Proc::start(
        "serve with an hour's timeout",
        &[
            "serve",
            "--dir",
            data.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--timeout",
            "3600",
        ],
        &[("WAYMARK_TOKEN", TOKEN)],
    );
    let addr = serve.address("serving");
    let inbox = data.join("waymark-inbox");
    let before = files_under(&inbox);
    // The cancel is in flight once its request is stored in the inbox.
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        stream,
        "POST /api/runs/someone/cancel HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer \
         {TOKEN}\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    eventually("the cancel to be stored", || {
        (files_under(&inbox) > before).then_some(())
    });
    serve.signal("INT");
    serve.until("Ctrl-C: stopping");
    serve.signal("INT");
    assert_eq!(serve.wait(), Some(130), "{}", serve.seen.join("\n"));
    assert!(
        serve
            .stderr()
            .contains("Ctrl-C again: quitting at once; the requests in flight are cut off"),
        "{}",
        serve.stderr()
    );
    drop(stream);
}

/// No answer may be framed by another site's page (clickjacking: a
/// framed dashboard takes the operator's clicks, with the token it keeps):
/// pages, assets, the API, errors and refusals all say so.
#[test]
fn no_answer_may_be_framed() {
    let env = Env::start(&[]);
    let addr = env.addr.as_str();
    let answers = [
        http("GET", addr, "/", None),
        http("GET", addr, "/app.js", None),
        http("GET", addr, "/api/runs", None),
        http("GET", addr, "/no-such-page", None),
        http("POST", addr, "/api/runs/x/cancel", None),
        http_for("evil.example", "GET", addr, "/", None),
    ];
    for answer in &answers {
        assert_eq!(
            answer.header("x-frame-options"),
            Some("DENY"),
            "{}",
            answer.head
        );
        assert_eq!(
            answer.header("content-security-policy"),
            Some("frame-ancestors 'none'"),
            "{}",
            answer.head
        );
        assert_eq!(answer.header("x-content-type-options"), Some("nosniff"));
    }
}

/// On a loopback address, a request for another host is refused (421,
/// with a JSON error), so a page of another site rebound to 127.0.0.1 (DNS
/// rebinding) cannot read the API or the dashboard; loopback names, with
/// any port, are served (all were, whatever the host).
#[test]
fn a_request_for_another_host_is_refused_on_loopback() {
    let env = Env::start(&[]);
    let addr = env.addr.as_str();
    for path in ["/api/runs", "/api/worker", "/", "/metrics"] {
        let refused = http_for("evil.example", "GET", addr, path, None);
        assert_eq!(refused.status, 421, "{path}: {}", refused.body);
        let error = refused.json()["error"].as_str().unwrap().to_string();
        assert!(
            error.contains("not for host `evil.example`") && error.contains("DNS rebinding"),
            "{error}"
        );
    }
    let port = addr.rsplit(':').next().unwrap();
    assert_eq!(
        http_for(
            &format!("evil.example:{port}"),
            "GET",
            addr,
            "/api/runs",
            None
        )
        .status,
        421
    );
    // Even with the token, a change for another host is refused.
    assert_eq!(
        http_for(
            "evil.example",
            "POST",
            addr,
            "/api/runs/x/cancel",
            Some(TOKEN)
        )
        .status,
        421
    );
    for host in [
        addr.to_string(),
        format!("localhost:{port}"),
        "localhost".to_string(),
        format!("[::1]:{port}"),
    ] {
        let served = http_for(&host, "GET", addr, "/api/runs", None);
        assert_eq!(served.status, 200, "{host}: {}", served.body);
    }
}

/// A metric's value in a Prometheus text body: the line starting with
/// `name{` whose labels include every one of `labels`.
fn metric(body: &str, name: &str, labels: &[&str]) -> Option<f64> {
    body.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn the_worker_metrics_endpoint_counts_steps_after_a_few_runs() {
    let env = Env::start(&["--trip-after", "1"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = rt.block_on(env.client());
    rt.block_on(async {
        submit(&client, "ok-1", "shop", good_order()).await;
        submit(&client, "ok-2", "shop", good_order()).await;
        client.wait("ok-1", operator::HANG_GUARD).await.unwrap();
        client.wait("ok-2", operator::HANG_GUARD).await.unwrap();
        // Trips the default workflow (at one failure); the next run parks.
        submit(&client, "bad-1", "default", operator::empty_order()).await;
        client.wait("bad-1", operator::HANG_GUARD).await.unwrap();
        submit(&client, "parks", "default", good_order()).await;
    });
    let metrics = env.metrics.as_str();
    let body = eventually("the park and the hooks to be counted", || {
        let body = get(metrics, "/metrics").body;
        let parked = metric(&body, "waymark_step_parks_total", &["workflow=\"default\""]);
        let hooks = metric(
            &body,
            "waymark_hook_deliveries_total",
            &["outcome=\"delivered\""],
        );
        (parked.is_some() && hooks == Some(3.0)).then_some(body)
    });
    let shop = "workflow=\"shop\"";
    assert_eq!(
        metric(
            &body,
            "waymark_steps_total",
            &[shop, "outcome=\"succeeded\""]
        ),
        Some(2.0),
        "{body}"
    );
    // Steps 0, 1, 3 continue; step 2 continues after a delay: 4 a run.
    assert_eq!(
        metric(
            &body,
            "waymark_steps_total",
            &[shop, "outcome=\"continued\""]
        ),
        Some(8.0),
        "{body}"
    );
    assert_eq!(
        metric(
            &body,
            "waymark_steps_total",
            &["workflow=\"default\"", "outcome=\"failed\""]
        ),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        metric(
            &body,
            "waymark_breaker_trips_total",
            &["workflow=\"default\""]
        ),
        Some(1.0),
        "{body}"
    );
    // Hooks: the worker's hook reports each ended run.
    assert_eq!(
        metric(
            &body,
            "waymark_hook_deliveries_total",
            &["outcome=\"delivered\""]
        ),
        Some(3.0),
        "{body}"
    );
    for histogram in [
        "waymark_settle_seconds_count",
        "waymark_step_duration_seconds_count",
        "waymark_step_to_step_seconds_count",
    ] {
        let count =
            metric(&body, histogram, &[shop]).unwrap_or_else(|| panic!("{histogram}: {body}"));
        assert!(count >= 10.0, "{histogram} = {count}");
    }
    assert!(body.contains("waymark_steps_in_flight"), "{body}");
    let pending = metric(&body, "waymark_backlog", &["state=\"scheduled\""]);
    assert!(pending.is_some(), "{body}");
    rt.block_on(client.close()).unwrap();
}

#[test]
fn every_endpoint_on_a_fleet_routes_merges_and_shows_the_shards() {
    // Two shards; the default workflow trips after one failure (on the
    // shard where it failed); `nightly` is a manual schedule.
    let mut env = Env::start_fleet(2, &["--trip-after", "1", "--schedule", "nightly=manual"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let fleet = rt.block_on(env.fleet_client());
    let serve_addr = env.addr.clone();
    let addr = serve_addr.as_str();
    // Runs on both shards: good orders, a malformed one on each shard
    // (dead-lettered), and a failure that trips `default` on shard 1.
    let good = [id_on("shop", 0, 2), id_on("shop", 1, 2)];
    let bad = [id_on("bad", 0, 2), id_on("bad", 1, 2)];
    let fail = id_on("fail", 1, 2);
    let parked = id_on("parked", 1, 2);
    let elsewhere = id_on("fine", 0, 2);
    rt.block_on(async {
        let submit = |id: &str, workflow: &str, input: Vec<u8>| {
            fleet.submit_and_wait(
                waymark::RunSpec {
                    run_id: Some(id.into()),
                    workflow: Some(workflow.into()),
                    input,
                    ..Default::default()
                },
                operator::HANG_GUARD,
            )
        };
        for id in &good {
            submit(id, "shop", good_order()).await.unwrap();
        }
        for id in &bad {
            submit(id, "shop", b"garbage".to_vec()).await.unwrap();
        }
        submit(&fail, "default", operator::empty_order())
            .await
            .unwrap();
        for id in good.iter().chain(&bad).chain([&fail]) {
            fleet.wait(id, operator::HANG_GUARD).await.unwrap();
        }
        // `default` is tripped on shard 1 only: a run there parks, a run
        // on shard 0 succeeds.
        submit(&parked, "default", good_order()).await.unwrap();
        submit(&elsewhere, "default", good_order()).await.unwrap();
        fleet.wait(&elsewhere, operator::HANG_GUARD).await.unwrap();
    });
    // serve reads each shard through its own reader, each following its
    // store at its own pace: wait until both show the last thing done
    // there (everything before it is then visible too).
    eventually("the run on the tripped shard to park", || {
        let run = get(addr, &format!("/api/runs/{parked}")).json();
        (run["live"]["state"] == "parked").then_some(())
    });
    eventually("the run on shard 0 to end", || {
        let run = get(addr, &format!("/api/runs/{elsewhere}")).json();
        (run["outcome"]["status"] == "succeeded").then_some(())
    });

    // The listing merges the shards in id order, and pages across them.
    let mut expected: Vec<String> = good
        .iter()
        .chain(&bad)
        .chain([&fail, &parked, &elsewhere])
        .cloned()
        .collect();
    expected.sort();
    assert_eq!(ids(&get(addr, "/api/runs").json()), expected);
    let mut paged = Vec::new();
    let mut path = "/api/runs?limit=2".to_string();
    loop {
        let page = get(addr, &path).json();
        paged.extend(ids(&page));
        match page["next"].as_str() {
            Some(next) => path = format!("/api/runs?limit=2&after={next}"),
            None => break,
        }
    }
    assert_eq!(paged, expected);
    let live = get(addr, "/api/runs?state=live").json();
    assert_eq!(ids(&live), vec![parked.clone()]);

    // One run, read on its shard, whichever it is.
    for id in &good {
        let run = get(addr, &format!("/api/runs/{id}")).json();
        assert_eq!(run["outcome"]["status"], "succeeded", "{run}");
        assert_eq!(run["history"]["steps"].as_array().unwrap().len(), 5);
    }
    assert_eq!(get(addr, "/api/runs/no-such-run").status, 404);

    // Workflows: one row per shard, the breaker tripped on shard 1 only.
    let workflows = get(addr, "/api/workflows").json();
    let default: Vec<(u64, String)> = workflows
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["name"] == "default")
        .map(|w| {
            let state = w["breaker"]["state"].as_str().unwrap().to_string();
            (w["shard"].as_u64().unwrap(), state)
        })
        .collect();
    assert_eq!(
        default,
        [(0, "closed".to_string()), (1, "tripped".to_string())],
        "{workflows}"
    );
    let metrics = get(addr, "/metrics").body;
    assert!(
        metric(
            &metrics,
            "waymark_workflow_tripped",
            &["workflow=\"default\"", "shard=\"1\""]
        ) == Some(1.0)
            && metric(
                &metrics,
                "waymark_workflow_tripped",
                &["workflow=\"default\"", "shard=\"0\""]
            ) == Some(0.0),
        "{metrics}"
    );

    // Each shard's heartbeat, and the newest.
    let worker = get(addr, "/api/worker").json();
    let shards = worker["shards"].as_array().unwrap();
    assert_eq!(shards.len(), 2, "{worker}");
    for (i, beat) in shards.iter().enumerate() {
        assert_eq!(beat["shard"], i as u64, "{worker}");
        assert!(beat["last_beat_ms"].as_u64().unwrap() > 0, "{worker}");
        assert_eq!(beat["closed"], false, "{worker}");
    }
    assert_eq!(worker["closed"], false);
    let newest = shards
        .iter()
        .map(|b| b["last_beat_ms"].as_u64().unwrap())
        .max();
    assert_eq!(worker["last_beat_ms"].as_u64(), newest);

    // Dead letters, shard by shard, each with its shard; paged one job at
    // a time across the shards.
    let all = get(addr, "/api/dead").json();
    let jobs = all["jobs"].as_array().unwrap();
    let found: Vec<(u64, String)> = jobs
        .iter()
        .map(|j| {
            (
                j["shard"].as_u64().unwrap(),
                j["run_id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(found, [(0, bad[0].clone()), (1, bad[1].clone())], "{all}");
    assert!(
        all["next"].is_null() && all.get("next_shard").is_none(),
        "{all}"
    );
    let mut paged = Vec::new();
    let mut path = "/api/dead?limit=1".to_string();
    loop {
        let page = get(addr, &path);
        assert_eq!(page.status, 200, "{}", page.body);
        let page = page.json();
        paged.extend(
            page["jobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|j| j["job_id"].clone()),
        );
        match (page["next"].as_str(), page["next_shard"].as_u64()) {
            (Some(next), Some(shard)) => {
                path = format!("/api/dead?limit=1&after={next}&shard={shard}")
            }
            (None, None) => break,
            other => panic!("a next without its shard: {other:?}"),
        }
    }
    let every: Vec<_> = jobs.iter().map(|j| j["job_id"].clone()).collect();
    assert_eq!(paged, every);
    assert_eq!(
        get(addr, "/api/dead?shard=1").json()["jobs"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(get(addr, "/api/dead?shard=2").status, 400);
    // Requeue: found on its shard, re-run there.
    let job = jobs[1]["job_id"].as_str().unwrap();
    let requeued = http(
        "POST",
        addr,
        &format!("/api/dead/{job}/requeue"),
        Some(TOKEN),
    );
    assert_eq!(requeued.status, 200, "{}", requeued.body);
    assert_eq!(requeued.json()["run_id"], bad[1].as_str());
    let unknown = http("POST", addr, "/api/dead/no-such-job/requeue", Some(TOKEN));
    assert_eq!(unknown.status, 404, "{}", unknown.body);
    eventually("the re-run to end", || {
        let run = get(addr, &format!("/api/runs/{}", bad[1])).json();
        (run["outcome"]["reruns"] == 1).then_some(())
    });

    // Cancel the parked run on its shard; reset the breaker on every shard.
    let cancelled = http(
        "POST",
        addr,
        &format!("/api/runs/{parked}/cancel"),
        Some(TOKEN),
    );
    assert_eq!(cancelled.status, 200, "{}", cancelled.body);
    assert_eq!(cancelled.json()["cancelled"], true);
    let reset = http("POST", addr, "/api/workflows/default/reset", Some(TOKEN));
    assert_eq!(reset.status, 200, "{}", reset.body);
    let reset = reset.json();
    assert_eq!(reset["was_open"], true, "{reset}");
    assert_eq!(reset["shards_open"], serde_json::json!([1]), "{reset}");
    let again = http("POST", addr, "/api/workflows/default/reset", Some(TOKEN)).json();
    assert_eq!(again["was_open"], false, "{again}");
    assert_eq!(again["shards_open"], serde_json::json!([]), "{again}");

    // The schedule, from its home shard; a trigger fires it there and its
    // run is found by id.
    let schedules = get(addr, "/api/schedules").json();
    assert_eq!(schedules.as_array().unwrap().len(), 1, "{schedules}");
    assert_eq!(schedules[0]["id"], "nightly");
    let fired = http("POST", addr, "/api/schedules/nightly/trigger", Some(TOKEN));
    assert_eq!(fired.status, 200, "{}", fired.body);
    let run_id = fired.json()["run_id"].as_str().unwrap().to_string();
    eventually("the triggered run to end", || {
        let run = get(addr, &format!("/api/runs/{run_id}")).json();
        (run["outcome"]["status"] == "succeeded").then_some(())
    });

    // With the worker stopped, nothing answers a reset: a serve with a
    // short timeout says which shard did not answer (the requests wait in
    // the inboxes).
    env.worker.signal("TERM");
    env.worker.wait_fleet_stopped();
    let url = env.fleet_url();
    let mut short = Proc::start(
        "serve with a short timeout",
        &[
            "serve",
            "--store",
            &url,
            "--listen",
            "127.0.0.1:0",
            "--timeout",
            "1",
        ],
        &[("WAYMARK_TOKEN", TOKEN)],
    );
    let short_addr = short.address("serving");
    let unanswered = http(
        "POST",
        &short_addr,
        "/api/workflows/default/reset",
        Some(TOKEN),
    );
    assert_eq!(unanswered.status, 504, "{}", unanswered.body);
    assert!(
        unanswered.body.contains("shard 0 did not answer the reset"),
        "{}",
        unanswered.body
    );
    // A request no worker answers is stored: the 504 says so, lest it be
    // sent again (a second trigger would fire twice).
    let unanswered = http(
        "POST",
        &short_addr,
        "/api/schedules/nightly/trigger",
        Some(TOKEN),
    );
    assert_eq!(unanswered.status, 504, "{}", unanswered.body);
    assert!(
        unanswered
            .body
            .contains("the request waits in the store's inbox and is applied when a worker runs"),
        "{}",
        unanswered.body
    );

    // A reset that is stored on shard 0 but not on shard 1 (its inbox made
    // a plain file) says where it was sent.
    let inbox = env.dir.path().join("fleet").join("shard-0001-inbox");
    std::fs::remove_dir_all(&inbox).unwrap();
    std::fs::write(&inbox, b"not a directory").unwrap();
    let half = http("POST", addr, "/api/workflows/default/reset", Some(TOKEN));
    assert_eq!(half.status, 500, "{}", half.body);
    assert!(
        half.body.contains(
            "the reset was sent to shard(s) 0 (their workers apply it) but not to shard 1"
        ),
        "{}",
        half.body
    );
    rt.block_on(fleet.close()).unwrap();
}
