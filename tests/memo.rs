//! The durable memo of `Step`: what an attempt memoized is found by the
//! next one (after a transient error, after a crash), the run's scope is
//! shared by its steps, writes are fenced to the run's current step, and
//! the entries go with the run's terminal record at retention. In-memory
//! store, `MockClock`, gates (no sleeps as checks).

mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::*;
use taquba::KvOrder;
use tokio::sync::Notify;
use waymark::*;

/// Every key of the runs' data (memo entries) in the store.
async fn data_keys(env: &Env<NoopTerminalHook>) -> Vec<String> {
    let page = env
        .queue()
        .view()
        .kv_scan(b"wm/workflow-steps/data/", .., KvOrder::Ascending, 1000)
        .await
        .unwrap();
    page.entries
        .iter()
        .map(|(k, _)| String::from_utf8_lossy(k).into_owned())
        .collect()
}

/// A runner whose step 0 memoizes a "charge" (counting the closure's
/// calls) and fails transiently on its first attempt; step 1 reads the
/// run-scoped memo step 0 wrote.
fn charging(charges: Arc<AtomicU32>) -> FnRunner {
    FnRunner::new(move |s: Step| {
        let charges = charges.clone();
        async move {
            if s.step_number == 0 {
                let receipt: String = s
                    .memo
                    .memoized("charge", || async {
                        let n = charges.fetch_add(1, Ordering::SeqCst);
                        Ok::<_, StepError>(format!("receipt-{n}"))
                    })
                    .await?;
                s.run_memo.put("receipt", &receipt).await?;
                if s.attempts == 1 {
                    return Err(StepError::transient("the network blinked"));
                }
                Ok(StepOutcome::Continue {
                    payload: receipt.into_bytes(),
                })
            } else {
                let seen: Option<String> = s.run_memo.get("receipt").await?;
                let absent: Option<String> = s.memo.get("charge").await?;
                assert!(absent.is_none(), "step 1's scope is its own");
                Ok(StepOutcome::Succeed {
                    result: seen.unwrap_or_default().into_bytes(),
                })
            }
        }
    })
}

#[tokio::test]
async fn a_retry_after_a_transient_error_reuses_the_memo() {
    let charges = Arc::new(AtomicU32::new(0));
    let runner = charging(charges.clone());
    let mut env = Env::new(runner.clone(), NoopTerminalHook).await;
    env.start();
    env.submit("pay", b"").await;
    let out = env.rt.wait("pay").await.unwrap();
    assert_eq!(out.status, TerminalStatus::Succeeded);
    assert_eq!(runner.calls("pay", 0), 2, "step 0 ran twice");
    assert_eq!(charges.load(Ordering::SeqCst), 1, "the charge ran once");
    assert_eq!(out.result.as_deref(), Some(&b"receipt-0"[..]));
    env.stop().await;
}

/// A crash after the runner memoized its charge and returned, before its
/// result was durable (the test kit's `AfterRunner`): the step runs again
/// and finds the memo.
#[tokio::test]
async fn a_step_rerun_after_a_crash_finds_its_memo() {
    use waymark::testkit::{CrashPoint, Drive, TestKit};
    let charges = Arc::new(AtomicU32::new(0));
    let runner = {
        let charges = charges.clone();
        FnRunner::new(move |s: Step| {
            let charges = charges.clone();
            async move {
                let receipt: u32 = s
                    .memo
                    .memoized("charge", || async {
                        Ok::<_, StepError>(charges.fetch_add(1, Ordering::SeqCst) + 100)
                    })
                    .await?;
                Ok(StepOutcome::Succeed {
                    result: receipt.to_string().into_bytes(),
                })
            }
        })
    };
    let mut kit = TestKit::builder(runner, NoopTerminalHook)
        .start()
        .await
        .unwrap();
    kit.crash_at(CrashPoint::AfterRunner, "crashy", 0);
    kit.submit(RunSpec {
        run_id: Some("crashy".into()),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(matches!(
        kit.run_until_idle().await.unwrap(),
        Drive::Crashed(_)
    ));
    kit.restart().await.unwrap();
    let out = kit.wait("crashy").await.unwrap();
    assert_eq!(out.status, TerminalStatus::Succeeded);
    assert_eq!(out.result.as_deref(), Some(&b"100"[..]));
    assert_eq!(kit.runner_calls("crashy", 0), 2, "the step ran again");
    assert_eq!(charges.load(Ordering::SeqCst), 1, "no second charge");
    kit.shutdown().await.unwrap();
}

#[tokio::test]
async fn memo_entries_go_with_the_outcome_at_retention() {
    let charges = Arc::new(AtomicU32::new(0));
    let mut env = Env::configured(charging(charges), NoopTerminalHook, |b| {
        b.terminal_retention(Duration::from_secs(60))
            .poll_interval(Duration::from_millis(5))
    })
    .await;
    env.start();
    env.submit("kept", b"").await;
    env.rt.wait("kept").await.unwrap();
    assert_eq!(
        data_keys(&env).await,
        [
            // How retention finds the run's data (a memo entry: by a scan),
            // the step history (one entry a settlement), the kept inputs of
            // steps 0 and 1 (for a re-run), then the memo.
            "wm/workflow-steps/data/kept/extent",
            "wm/workflow-steps/data/kept/hist/00000000000000000000",
            "wm/workflow-steps/data/kept/hist/00000000000000000001",
            "wm/workflow-steps/data/kept/hist/00000000000000000002",
            "wm/workflow-steps/data/kept/input/0",
            "wm/workflow-steps/data/kept/input/1",
            "wm/workflow-steps/data/kept/memo/0/charge",
            "wm/workflow-steps/data/kept/memo/run/receipt",
        ]
    );
    env.clock.advance(Duration::from_secs(61));
    for _ in 0..10_000 {
        if env.rt.outcome("kept").await.unwrap().is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(env.rt.outcome("kept").await.unwrap(), None);
    assert_eq!(data_keys(&env).await, Vec::<String>::new());
    env.stop().await;
}

#[tokio::test]
async fn writes_are_fenced_and_checked() {
    let kept: Arc<Mutex<Option<Memo>>> = Arc::default();
    let runner = FnRunner::new({
        let kept = kept.clone();
        move |s: Step| {
            let kept = kept.clone();
            async move {
                let long = "k".repeat(257);
                assert!(matches!(
                    s.memo.put(&long, &1u8).await,
                    Err(Error::InvalidMemoKey { .. })
                ));
                assert!(matches!(
                    s.memo.get::<u8>("").await,
                    Err(Error::InvalidMemoKey { .. })
                ));
                let big = serde_bytes::ByteBuf::from(vec![0u8; 200 * 1024]);
                assert!(matches!(
                    s.memo.put("big", &big).await,
                    Err(Error::PayloadTooLarge { .. })
                ));
                s.memo.put("v", &1u32).await?;
                s.memo.put("v", &2u32).await?;
                assert_eq!(s.memo.get::<u32>("v").await?, Some(2));
                // A value of another type does not pass for this one.
                assert!(matches!(
                    s.memo.get::<String>("v").await,
                    Err(Error::CorruptRecord { .. })
                ));
                *kept.lock().unwrap() = Some(s.memo.clone());
                Ok(StepOutcome::Succeed { result: vec![] })
            }
        }
    });
    let mut env = Env::new(runner, NoopTerminalHook).await;
    env.start();
    env.submit("fenced", b"").await;
    env.rt.wait("fenced").await.unwrap();
    let memo = kept.lock().unwrap().take().unwrap();
    // The run has ended: its step's memo takes no more writes.
    assert!(matches!(
        memo.put("late", &3u32).await,
        Err(Error::MemoStale { .. })
    ));
    assert_eq!(memo.get::<u32>("late").await.unwrap(), None);
    assert_eq!(memo.get::<u32>("v").await.unwrap(), Some(2));
    env.stop().await;
}

/// An attempt that outlived its lease, while a second claim of the same
/// step job runs: the run record still names the job, so the fence on it
/// let the stale attempt overwrite the live one's value. Its claim is gone,
/// and that refuses the write now.
#[tokio::test]
async fn an_attempt_that_outlived_its_lease_cannot_write() {
    let (first, second) = (Gate::default(), Gate::default());
    let (started1, started2) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let stale_put: Arc<Mutex<Option<String>>> = Arc::default();
    let seen_by_live: Arc<Mutex<Option<Option<u32>>>> = Arc::default();
    let runner = FnRunner::new({
        let (first, second) = (first.clone(), second.clone());
        let (started1, started2) = (started1.clone(), started2.clone());
        let (stale_put, seen_by_live) = (stale_put.clone(), seen_by_live.clone());
        move |s: Step| {
            let (first, second) = (first.clone(), second.clone());
            let (started1, started2) = (started1.clone(), started2.clone());
            let (stale_put, seen_by_live) = (stale_put.clone(), seen_by_live.clone());
            async move {
                if s.attempts == 1 {
                    started1.notify_one();
                    first.wait().await;
                    let put = s.memo.put("v", &1u32).await;
                    *stale_put.lock().unwrap() = Some(format!("{put:?}"));
                } else {
                    s.memo.put("v", &2u32).await?;
                    started2.notify_one();
                    second.wait().await;
                    *seen_by_live.lock().unwrap() = Some(s.memo.get::<u32>("v").await?);
                }
                Ok(StepOutcome::Succeed { result: vec![] })
            }
        }
    });
    let mut env = Env::new(runner, NoopTerminalHook).await;
    env.start();
    env.submit("lapse", b"").await;
    started1.notified().await;
    // The process stalls past the lease: the reaper takes the job back and
    // the pool runs the step again under a second claim.
    env.clock.advance(Duration::from_secs(31));
    env.queue().reap_now().await.unwrap();
    started2.notified().await;
    first.open();
    let stale = async {
        loop {
            if let Some(put) = stale_put.lock().unwrap().clone() {
                return put;
            }
            tokio::task::yield_now().await;
        }
    };
    let put = tokio::time::timeout(Duration::from_secs(10), stale)
        .await
        .expect("the stale attempt tried its write");
    assert!(put.contains("MemoStale"), "the stale attempt's put: {put}");
    second.open();
    let out = env.rt.wait("lapse").await.unwrap();
    assert_eq!(out.status, TerminalStatus::Succeeded, "{out:?}");
    assert_eq!(*seen_by_live.lock().unwrap(), Some(Some(2)));
    env.stop().await;
}
