//! A worker and a client on a real S3-protocol server, through `s3://`
//! URLs configured from the `AWS_*` variables. It needs a server, so it is
//! ignored by plain `cargo test`; `.ci/run` starts moto and runs it:
//!
//! ```text
//! eval "$(scripts/moto-server start)"   # a venv with moto[server], a free port, a bucket
//! cargo test --test client_s3 -- --ignored
//! scripts/moto-server stop
//! ```

use std::time::Duration;

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

#[tokio::test]
#[ignore = "needs an S3-compatible server: see the module docs"]
async fn a_client_submits_through_s3() {
    let url = std::env::var("WAYMARK_S3_URL").expect("WAYMARK_S3_URL=s3://bucket/prefix");
    let location = StoreLocation::from_url(&url).unwrap();
    let options = StoreOptions::default().inbox_touch_poll(Duration::from_millis(50));
    let queue = open_worker_store(&location, options).await.unwrap();
    let rt = WorkflowRuntime::builder(queue, Echo, NoopTerminalHook)
        .build()
        .unwrap();
    let worker = tokio::spawn({
        let rt = rt.clone();
        async move { rt.run(std::future::pending()).await }
    });
    // The client parses the URL itself, as another process would.
    let client_location = StoreLocation::from_url(&url).unwrap();
    let client = Client::open(
        &client_location,
        ClientOptions::default().refresh_interval(Duration::from_millis(100)),
    )
    .await
    .unwrap();
    let spec = RunSpec {
        run_id: Some("s3-run".into()),
        input: b"hello".to_vec(),
        ..Default::default()
    };
    let started = std::time::Instant::now();
    let submitted = client.submit_and_wait(spec, GUARD).await.unwrap();
    let out = client.wait(&submitted.run_id, GUARD).await.unwrap();
    println!("submit to outcome over S3: {:?}", started.elapsed());
    assert_eq!(out.result.as_deref(), Some(&b"hello"[..]));
    assert!(!worker.is_finished(), "the client did not fence the worker");
    client.close().await.unwrap();
    worker.abort();
}
