//! A fleet on a real S3-protocol server: the conditional-write probe
//! passes, two workers share the shards, and runs submitted through the
//! fleet client end. Ignored by plain `cargo test`; `.ci/run` starts moto:
//!
//! ```text
//! eval "$(scripts/moto-server start)"   # a venv with moto[server], a free port, a bucket
//! cargo test --test fleet_s3 -- --ignored
//! scripts/moto-server stop
//! ```

use std::time::Duration;

use waymark::fleet::{FleetClient, FleetWorker, LeaseTiming, check_conditional_writes};
use waymark::*;

const GUARD: Duration = Duration::from_secs(120);

struct Echo;

impl StepRunner for Echo {
    async fn run_step(&self, step: &Step) -> Result<StepOutcome, StepError> {
        Ok(StepOutcome::Succeed {
            result: step.payload.clone(),
        })
    }
}

fn worker(at: &StoreLocation) -> FleetWorker<Echo, NoopTerminalHook> {
    FleetWorker::new(at.clone(), 2, |_, queue| {
        WorkflowRuntime::builder(queue, Echo, NoopTerminalHook).build()
    })
    .lease_timing(LeaseTiming {
        duration: Duration::from_secs(3),
        guard: Duration::from_millis(500),
    })
    .store_options(|_| StoreOptions::default().inbox_touch_poll(Duration::from_millis(50)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs an S3-compatible server: see the module docs"]
async fn a_fleet_runs_on_s3() {
    let url = std::env::var("WAYMARK_S3_URL").expect("WAYMARK_S3_URL=s3://bucket/prefix");
    let at = StoreLocation::from_url(&format!("{url}-fleet")).unwrap();
    check_conditional_writes(&at)
        .await
        .expect("moto enforces conditional writes");
    let (a, b) = (worker(&at), worker(&at));
    let stop = tokio_util::sync::CancellationToken::new();
    let tasks = [a, b].map(|w| tokio::spawn(w.run(stop.clone().cancelled_owned())));
    // The client opens once the workers have created the fleet and every
    // shard's store. Until then the open fails: no manifest yet, or (a
    // shard caught while its first open writes it) a store whose manifest
    // is not complete, which SlateDB reports as a data error. Bounded.
    let started = std::time::Instant::now();
    let client = loop {
        match FleetClient::open(
            &at,
            ClientOptions::default().refresh_interval(Duration::from_millis(100)),
        )
        .await
        {
            Ok(client) => break client,
            Err(e) if started.elapsed() < GUARD => {
                eprintln!("the fleet client does not open yet: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("no fleet client within {GUARD:?}: {e}"),
        }
    };
    let ids: Vec<String> = (0..8).map(|i| format!("s3-fleet-{i}")).collect();
    for id in &ids {
        let spec = RunSpec {
            run_id: Some(id.clone()),
            input: id.as_bytes().to_vec(),
            ..Default::default()
        };
        client.submit_and_wait(spec, GUARD).await.unwrap();
    }
    for id in &ids {
        let out = client.wait(id, GUARD).await.unwrap();
        assert_eq!(out.result.as_deref(), Some(id.as_bytes()));
    }
    stop.cancel();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
}
