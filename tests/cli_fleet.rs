//! The `waymark` CLI on a fleet, tested as processes: `waymark worker
//! --shards N` workers on a temporary directory, the other commands routed
//! to each run's shard, `waymark fleet` showing who holds what, and the
//! refusals that keep a fleet and a single store from being misread as
//! each other. Every wait is a bounded poll for a condition.

mod operator;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use assert_cmd::Command;
use operator::{BIN, HANG_GUARD, Proc, eventually};
use predicates::prelude::*;
use serde_json::Value;
use waymark::fleet::FleetClient;
use waymark::{ClientOptions, StoreLocation};

/// Short leases, so hand-offs and takeovers happen within a test.
const LEASE: [&str; 4] = ["--lease-ms", "3000", "--guard-ms", "600"];

/// `waymark` with plain output.
fn waymark() -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env("TERM", "dumb").timeout(HANG_GUARD);
    cmd
}

/// `file://` URL of `dir`.
fn url_of(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

/// Start `waymark worker --store URL --shards N` with short leases; the
/// process and its worker id (from its first line).
fn fleet_worker(name: &'static str, url: &str, shards: &str) -> (Proc, String) {
    let mut args = vec!["worker", "--store", url, "--shards", shards];
    args.extend(LEASE);
    let mut worker = Proc::start(name, &args, &[]);
    let first = worker.until("fleet worker ");
    let id = first.split_whitespace().nth(2).unwrap().to_string();
    (worker, id)
}

/// `waymark fleet --json` of `url`.
fn fleet(url: &str) -> Value {
    let out = waymark()
        .args(["fleet", "--json", "--store", url])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The owner of each shard of the fleet at `url` (`None`: not held).
fn owners(url: &str) -> Vec<Option<String>> {
    fleet(url)["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["owner"].as_str().map(str::to_string))
        .collect()
}

/// Wait (bounded) until `waymark outcome RUN` finds run `run_id` ended;
/// its output.
fn ended(url: &str, run_id: &str) -> String {
    eventually(&format!("{run_id} to end"), || {
        let out = waymark()
            .args(["outcome", run_id, "--store", url])
            .output()
            .unwrap();
        match out.status.code() {
            Some(0) => Some(String::from_utf8_lossy(&out.stdout).to_string()),
            Some(4) => None,
            _ => panic!("{out:?}"),
        }
    })
}

/// How many shards each worker holds.
fn held(owners: &[Option<String>]) -> BTreeMap<String, usize> {
    let mut held = BTreeMap::new();
    for owner in owners.iter().flatten() {
        *held.entry(owner.clone()).or_default() += 1;
    }
    held
}

#[test]
fn two_fleet_workers_share_the_shards_and_the_commands_route_to_each_run() {
    let tmp = tempfile::tempdir().unwrap();
    let url = url_of(&tmp.path().join("fleet"));
    let (mut a, a_id) = fleet_worker("worker a", &url, "4");
    let (mut b, b_id) = fleet_worker("worker b", &url, "4");
    // The two split the four shards evenly.
    let want: BTreeMap<String, usize> = [(a_id.clone(), 2), (b_id.clone(), 2)].into();
    eventually("each worker holding two shards", || {
        (held(&owners(&url)) == want).then_some(())
    });
    a.until("took shard");
    b.until("took shard");
    let shown = waymark().args(["fleet", "--store", &url]).output().unwrap();
    assert!(shown.status.success());
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(text.contains("4 shards, 4 held by 2 worker(s)"), "{text}");
    assert!(text.contains(&a_id) && text.contains(&b_id), "{text}");

    // Runs go to their shards; one without an id gets one to route by.
    let mut ids: Vec<String> = (1..=6).map(|i| format!("fleet-order-{i}")).collect();
    for id in &ids {
        waymark()
            .args(["submit", id, "--example", "1", "--store", &url])
            .assert()
            .success()
            .stdout(predicate::str::contains(format!("submitted {id}")));
    }
    let out = waymark()
        .args(["submit", "--example", "1", "--store", &url])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let line = String::from_utf8_lossy(&out.stdout).to_string();
    let generated = line
        .trim()
        .strip_prefix("submitted ")
        .unwrap_or_else(|| panic!("{line}"))
        .to_string();
    ids.push(generated);
    // The ids spread over more than one shard, so routing is exercised.
    let shards: BTreeSet<u32> = ids
        .iter()
        .map(|id| waymark::fleet::shard_of_run(id, 4))
        .collect();
    assert!(shards.len() > 1, "{shards:?}");

    for id in &ids {
        ended(&url, id);
        waymark()
            .args(["outcome", id, "--store", &url])
            .assert()
            .success()
            .stdout(predicate::str::contains("Succeeded"));
        waymark()
            .args(["status", id, "--store", &url])
            .assert()
            .success()
            .stdout(predicate::str::contains(format!("{id}: ended")));
        waymark()
            .args(["history", id, "--store", &url])
            .assert()
            .success();
    }
    // Each run is where the library's routing (every other process of the
    // fleet) looks for it.
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let at = StoreLocation::from_url(&url).unwrap();
        let options = ClientOptions::default().queue_name("demo-orders");
        let fleet = FleetClient::open(&at, options).await.unwrap();
        for id in &ids {
            let outcome = fleet.outcome(id).await.unwrap();
            assert!(outcome.is_some(), "{id} is not on its shard");
        }
    });
    // `runs` lists every run of every shard.
    let out = waymark()
        .args(["runs", "--json", "--store", &url])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let listed: BTreeSet<String> = listed["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["run_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(listed, ids.iter().cloned().collect());
    // A cancel reaches the run's shard (it had ended: said so).
    waymark()
        .args(["cancel", &ids[0], "--store", &url])
        .assert()
        .success()
        .stdout(predicate::str::contains("had already ended"));
    // A signal and a rerun reach the run's shard, whose worker answers for
    // the run (on another shard it would be unknown: exit 3).
    for id in &ids[1..3] {
        waymark()
            .args(["signal", id, "approved", "--store", &url])
            .assert()
            .code(5)
            .stderr(predicate::str::contains("not waiting for a signal"));
        waymark()
            .args(["rerun", id, "0", "--store", &url])
            .assert()
            .code(5)
            .stderr(predicate::str::contains("refused"));
    }
    // An unknown run is not found on its shard.
    waymark()
        .args(["outcome", "no-such-run", "--store", &url])
        .assert()
        .code(3);
    // Every shard has been opened: each shows a backlog, all worked off.
    let status = fleet(&url);
    assert_eq!(status["shard_count"], 4);
    for shard in status["shards"].as_array().unwrap() {
        assert_eq!(
            shard["backlog"],
            serde_json::json!({"ready": 0, "claimed": 0, "scheduled": 0}),
            "{status}"
        );
    }
    // Each shard that ran runs has the workflow's tallies; nothing died.
    let out = waymark()
        .args(["workflows", "--json", "--store", &url])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let health: Value = serde_json::from_slice(&out.stdout).unwrap();
    let on: BTreeSet<u64> = health
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["shard"].as_u64().unwrap())
        .collect();
    assert_eq!(on.len(), shards.len(), "{health}");
    waymark()
        .args(["dead", "--store", &url])
        .assert()
        .success()
        .stdout(predicate::str::contains("no dead jobs"));

    // b leaves gracefully: it hands its shards back and a takes them.
    b.signal("TERM");
    b.wait_fleet_stopped();
    // (It may have handed one back while the two were splitting.)
    let stopping = b
        .seen
        .iter()
        .position(|l| l.contains("SIGTERM: stopping"))
        .unwrap_or_else(|| panic!("{}", b.seen.join("\n")));
    // Every shard it held at the stop is handed back, or (only when a
    // renewal came too late under load) dropped to lapse.
    let count = |lines: &[String], what: &str| lines.iter().filter(|l| l.contains(what)).count();
    let before = &b.seen[..stopping];
    let holding = count(before, "took shard")
        - count(before, "handed shard")
        - count(before, "dropped shard");
    let after = &b.seen[stopping..];
    let handed = count(after, "handed shard");
    assert!(handed >= 1, "{}", b.seen.join("\n"));
    assert_eq!(
        handed + count(after, "dropped shard"),
        holding,
        "{}",
        b.seen.join("\n")
    );
    assert!(
        b.seen
            .iter()
            .any(|l| l.contains("its shards are handed back")),
        "{}",
        b.seen.join("\n")
    );
    let all_a: BTreeMap<String, usize> = [(a_id.clone(), 4)].into();
    eventually("worker a holding every shard", || {
        (held(&owners(&url)) == all_a).then_some(())
    });
    // The runs are still there, through a's shards.
    waymark()
        .args(["outcome", &ids[3], "--store", &url])
        .assert()
        .success()
        .stdout(predicate::str::contains("Succeeded"));
    a.signal("TERM");
    a.wait_fleet_stopped();
    // Every shard was handed back: released, none held.
    assert_eq!(owners(&url), vec![None; 4]);
}

/// Every file under `root` with its contents.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                out.insert(path.clone(), b"<dir>".to_vec());
                dirs.push(path);
            } else {
                out.insert(path.clone(), std::fs::read(&path).unwrap());
            }
        }
    }
    out
}

#[test]
fn another_shard_count_and_the_other_kind_of_store_are_refused_and_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let fleet_dir = tmp.path().join("fleet");
    let url = url_of(&fleet_dir);
    let (mut worker, _) = fleet_worker("the fleet worker", &url, "2");
    worker.until("took shard");
    worker.signal("TERM");
    worker.wait_fleet_stopped();
    let before = snapshot(&fleet_dir);

    // Another shard count: the library's mismatch, nothing written.
    waymark()
        .args(["worker", "--store", &url, "--shards", "3"])
        .assert()
        .code(5)
        .stderr(predicate::str::contains("2 shards"));
    // A single worker on a fleet, and a command that needs a single store.
    waymark()
        .args(["worker", "--store", &url])
        .assert()
        .code(5)
        .stderr(predicate::str::contains("is a fleet of 2 shards"))
        .stderr(predicate::str::contains("--shards 2"));
    assert_eq!(snapshot(&fleet_dir), before);

    // A single store: --shards refuses it, `fleet` finds no fleet there.
    let single_dir = tmp.path().join("single");
    let single = url_of(&single_dir);
    let mut plain = Proc::start("the single worker", &["worker", "--store", &single], &[]);
    plain.until("worker on");
    plain.signal("TERM");
    assert_eq!(plain.wait(), Some(0), "{}", plain.seen.join("\n"));
    let before = snapshot(&single_dir);
    waymark()
        .args(["worker", "--store", &single, "--shards", "4"])
        .assert()
        .code(5)
        .stderr(predicate::str::contains("holds a single store"));
    waymark()
        .args(["fleet", "--store", &single])
        .assert()
        .code(3)
        .stderr(predicate::str::contains("no fleet at"))
        .stderr(predicate::str::contains("holds a single store"));
    assert_eq!(snapshot(&single_dir), before);

    // Nothing at all: no fleet, and nothing created.
    let nothing = tmp.path().join("nothing");
    waymark()
        .args(["fleet", "--store", &url_of(&nothing)])
        .assert()
        .code(3)
        .stderr(predicate::str::contains("no fleet at"));
    assert!(!nothing.exists());
    // A lease timing the protocol cannot keep is a usage error.
    waymark()
        .args([
            "worker",
            "--store",
            &url,
            "--shards",
            "2",
            "--lease-ms",
            "1000",
            "--guard-ms",
            "500",
        ])
        .assert()
        .code(2);
}

/// `--schedule` on a fleet: every shard's runtime is given the schedules,
/// each is recorded and fired on its home shard only, `schedules` lists
/// each once (merged over the shards), and `trigger`, `pause` and `resume`
/// reach it there; the runs it fires are found by `outcome`.
#[test]
fn schedules_on_a_fleet_fire_on_their_home_shard() {
    let tmp = tempfile::tempdir().unwrap();
    let url = url_of(&tmp.path().join("fleet"));
    let manual = ["by-hand-a", "by-hand-b", "by-hand-c", "by-hand-d"];
    let homes: BTreeSet<u32> = manual
        .iter()
        .map(|id| waymark::fleet::shard_of_schedule(id, 3))
        .collect();
    assert!(homes.len() > 1, "the ids should spread over the shards");
    let mut args = vec!["worker", "--store", &url, "--shards", "3"];
    args.extend(LEASE);
    let specs: Vec<String> = manual
        .iter()
        .map(|id| format!("{id}=manual"))
        .chain(["often=every:300ms".to_string()])
        .collect();
    for spec in &specs {
        args.extend(["--schedule", spec.as_str()]);
    }
    let mut worker = Proc::start("scheduling worker", &args, &[]);
    worker.until("fleet worker ");
    // Alone, it takes (and opens) all three shards.
    for _ in 0..3 {
        worker.until("took shard");
    }
    let listed = |url: &str| -> Vec<Value> {
        let out = waymark()
            .args(["schedules", "--json", "--store", url])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice::<Value>(&out.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    };
    // Each schedule once, and the timer one fires a few times.
    let all = eventually("every schedule recorded, `often` fired thrice", || {
        let all = listed(&url);
        let often = all.iter().find(|s| s["schedule"] == "often")?;
        (all.len() == 5 && often["run_count"].as_u64()? >= 3).then_some(all)
    });
    let ids: Vec<&str> = all
        .iter()
        .map(|s| s["schedule"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        ["by-hand-a", "by-hand-b", "by-hand-c", "by-hand-d", "often"]
    );
    let last = all[4]["last_run_id"].as_str().unwrap().to_string();
    assert_eq!(
        waymark::fleet::shard_of_run(&last, 3),
        waymark::fleet::shard_of_schedule("often", 3),
        "{last}"
    );
    ended(&url, &last);

    // Triggered by hand, each through its home shard.
    for id in manual {
        let out = waymark()
            .args(["trigger", id, "--store", &url])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let run_id = text
            .split_whitespace()
            .find(|w| w.starts_with(&format!("{id}:t")))
            .unwrap_or_else(|| panic!("{text}"))
            .to_string();
        ended(&url, &run_id);
    }
    // Pause and resume reach the home shard too.
    waymark()
        .args(["pause", "often", "--store", &url])
        .assert()
        .success()
        .stdout(predicate::str::contains("paused often"));
    let often = listed(&url)
        .into_iter()
        .find(|s| s["schedule"] == "often")
        .unwrap();
    assert_eq!(often["paused"], true, "{often}");
    waymark()
        .args(["resume", "often", "--store", &url])
        .assert()
        .success()
        .stdout(predicate::str::contains("resumed often"));
    // An unknown id is refused by its home shard's worker.
    waymark()
        .args(["trigger", "nope", "--store", &url])
        .assert()
        .code(3)
        .stderr(predicate::str::contains("no schedule `nope`"));
    worker.signal("TERM");
    worker.wait_fleet_stopped();
}

/// The operator's commands on a fleet: `dead` lists each shard's dead jobs
/// with the shard, `requeue` finds the job's shard and re-runs its run
/// there, `workflows` shows each shard's breaker, and `reset` resets the
/// workflow's breaker on every shard, saying where it was open.
#[test]
fn dead_jobs_breakers_and_resets_on_a_fleet() {
    let tmp = tempfile::tempdir().unwrap();
    let url = url_of(&tmp.path().join("fleet"));
    let mut args = vec![
        "worker",
        "--store",
        &url,
        "--shards",
        "2",
        "--trip-after",
        "1",
    ];
    args.extend(LEASE);
    let mut worker = Proc::start("fleet worker", &args, &[]);
    worker.until("fleet worker ");
    for _ in 0..2 {
        worker.until("took shard");
    }
    let home = waymark::fleet::shard_of_run("pobox", 2);
    // Example 7 ships to a PO Box: the carrier refuses it for good, the
    // step job is dead-lettered, and the breaker (trip after 1) trips on
    // the run's shard.
    waymark()
        .args(["submit", "pobox", "--example", "7", "--store", &url])
        .assert()
        .success();
    let json = |args: &[&str]| -> Value {
        let out = waymark()
            .args(args)
            .args(["--json", "--store", &url])
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let dead = eventually("the dead step job", || {
        let dead = json(&["dead"])["jobs"].clone();
        (dead.as_array()?.len() == 1).then_some(dead)
    });
    assert_eq!(dead[0]["shard"], home, "{dead}");
    assert_eq!(dead[0]["run_id"], "pobox", "{dead}");
    assert_eq!(dead[0]["step"], 3, "{dead}");
    let job = dead[0]["job_id"].as_str().unwrap().to_string();
    let shown = waymark().args(["dead", "--store", &url]).output().unwrap();
    let text = String::from_utf8_lossy(&shown.stdout).to_string();
    assert!(text.starts_with("SHARD"), "{text}");
    assert!(text.contains(&job) && text.contains("PO Box"), "{text}");

    let tripped = eventually("the breaker to trip on the run's shard", || {
        let health = json(&["workflows"]);
        health
            .as_array()?
            .iter()
            .find(|h| h["shard"] == home && h["breaker"]["state"] == "tripped")
            .cloned()
    });
    assert_eq!(tripped["workflow"], "default", "{tripped}");
    waymark()
        .args(["reset", "default", "--store", &url])
        .assert()
        .success()
        .stdout(predicate::str::contains(format!(
            "reset default on shard(s) {home}:"
        )));
    waymark()
        .args(["reset", "default", "--store", &url])
        .assert()
        .success()
        .stdout(predicate::str::contains("nothing changed"));

    // Requeue: routed to the shard that holds the job; the run re-runs
    // from that step (and fails there again).
    waymark()
        .args(["requeue", &job, "--store", &url])
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "run pobox runs again from that step (re-run 1)",
        ));
    eventually("the re-run to end", || {
        let out = waymark()
            .args(["outcome", "pobox", "--json", "--store", &url])
            .output()
            .unwrap();
        if !out.status.success() {
            return None;
        }
        let outcome: Value = serde_json::from_slice(&out.stdout).ok()?;
        (outcome["reruns"] == 1).then_some(())
    });
    // No longer dead on any shard: not found, and nothing sent.
    waymark()
        .args(["requeue", &job, "--store", &url])
        .assert()
        .code(3)
        .stderr(predicate::str::contains("no dead job"));
    worker.signal("TERM");
    worker.wait_fleet_stopped();

    // A reset that reaches shard 0 but cannot be stored on shard 1 (its
    // inbox made a plain file) says where it was sent.
    let inbox = tmp.path().join("fleet").join("shard-0001-inbox");
    std::fs::remove_dir_all(&inbox).unwrap();
    std::fs::write(&inbox, b"not a directory").unwrap();
    waymark()
        .args(["reset", "default", "--no-wait", "--store", &url])
        .assert()
        .code(1)
        .stderr(predicate::str::contains(
            "the reset was sent to shard(s) 0 (their workers apply it) but not to shard 1",
        ));
}

/// `waymark fleet` shows every shard it can read and names what it could
/// not (here a lease object that does not decode), exiting 1.
#[test]
fn fleet_status_shows_the_other_shards_past_an_unreadable_lease() {
    let dir = tempfile::tempdir().unwrap();
    let url = url_of(&dir.path().join("fleet"));
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let at = StoreLocation::from_url(&url).unwrap();
        waymark::fleet::FleetManifest::open_or_create(&at, 2)
            .await
            .unwrap();
    });
    let lease_dir = dir.path().join("fleet/leases/shard-0001");
    std::fs::create_dir_all(&lease_dir).unwrap();
    std::fs::write(lease_dir.join(format!("{:020}", 1)), b"\xc1").unwrap();
    let out = waymark().args(["fleet", "--store", &url]).output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stdout.contains("2 shards, 0 held"), "{stdout}");
    assert!(
        stderr.contains("shard 1: cannot read its lease: record")
            && stderr.contains("1 shard(s) could not be read in full"),
        "{stderr}"
    );
    let out = waymark()
        .args(["fleet", "--json", "--store", &url])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["shards"][0]["problems"], serde_json::json!([]));
    assert_eq!(status["shards"][1]["problems"].as_array().unwrap().len(), 1);
}

/// `--dir` names a directory a fleet worker creates, as a single worker
/// does (it failed on a directory that did not exist yet); `waymark fleet`
/// on a directory that does not exist is "not found" (exit 3).
#[test]
fn a_fleet_worker_creates_its_dir_and_a_missing_one_is_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let fresh = dir.path().join("fresh");
    let fresh_arg = fresh.to_str().unwrap();
    let mut args = vec!["worker", "--dir", fresh_arg, "--shards", "2"];
    args.extend(LEASE);
    let mut worker = Proc::start("the fleet worker", &args, &[]);
    worker.until("took shard");
    worker.until("took shard");
    worker.signal("TERM");
    worker.wait_fleet_stopped();
    waymark()
        .args(["fleet", "--dir", fresh_arg])
        .assert()
        .success()
        .stdout(predicate::str::contains("2 shards"));
    waymark()
        .args(["fleet", "--dir"])
        .arg(dir.path().join("missing"))
        .assert()
        .code(3)
        .stderr(predicate::str::contains("no Waymark store at"));
}

/// A fleet worker that dropped a shard instead of handing it back exits 1
/// and names the shard and why (it exited 0, as after a clean stop). Here
/// every shard's runtime fails to build: the cron expression, checked only
/// when a shard's runtime is built, is not one.
#[test]
fn a_fleet_worker_that_dropped_a_shard_exits_1_saying_which_and_why() {
    let dir = tempfile::tempdir().unwrap();
    let url = url_of(&dir.path().join("fleet"));
    let mut args = vec![
        "worker",
        "--store",
        &url,
        "--shards",
        "2",
        "--schedule",
        "bad=cron:nonsense",
    ];
    args.extend(LEASE);
    let mut worker = Proc::start("the fleet worker", &args, &[]);
    let line = worker.until("dropped shard");
    assert!(
        line.contains("cron expression `nonsense` is invalid"),
        "{line}"
    );
    worker.signal("TERM");
    assert_eq!(worker.wait(), Some(1), "{}", worker.seen.join("\n"));
    let stderr = worker.stderr();
    assert!(
        stderr.contains("the fleet worker dropped")
            && stderr.contains("instead of handing them back: shard ")
            && stderr.contains("cron expression `nonsense` is invalid"),
        "{stderr}"
    );
}
