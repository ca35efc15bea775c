// The README's "Testing your workflows" test, verbatim (compiled and checked by tests/testkit.rs).
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use waymark::testkit::{CrashPoint, Drive, TestKit};
use waymark::{
    NoopTerminalHook, RunSpec, Step, StepError, StepOutcome, StepRunner, TerminalStatus,
};

/// Step 0 charges the card (through the memo), step 1 ships.
struct Checkout {
    charges: Arc<AtomicU32>,
}

impl StepRunner for Checkout {
    async fn run_step(&self, step: &Step) -> Result<StepOutcome, StepError> {
        match step.step_number {
            0 => {
                let receipt: String = step
                    .memo
                    .memoized("charge", || async {
                        let n = self.charges.fetch_add(1, Ordering::SeqCst);
                        Ok::<_, StepError>(format!("receipt-{n}"))
                    })
                    .await?;
                Ok(StepOutcome::Continue {
                    payload: receipt.into_bytes(),
                })
            }
            _ => Ok(StepOutcome::Succeed {
                result: step.payload.clone(),
            }),
        }
    }
}

#[tokio::test]
async fn an_order_is_charged_once_across_crashes() {
    // A crash while the charge is in flight (`CrashPoint::WhileRunning`,
    // before its memo entry is durable) can repeat it: give the payment
    // provider an idempotency key (the run id) for that window.
    use CrashPoint::*;
    for point in [BeforeRunner, AfterRunner, AfterSettlement] {
        let charges = Arc::new(AtomicU32::new(0));
        let runner = Checkout {
            charges: charges.clone(),
        };
        let mut kit = TestKit::builder(runner, NoopTerminalHook)
            .start()
            .await
            .unwrap();
        // Kill the process at this point of the charging step, then restart.
        kit.crash_at(point, "order-1", 0);
        let spec = RunSpec {
            run_id: Some("order-1".into()),
            ..Default::default()
        };
        kit.submit(spec).await.unwrap();
        assert!(matches!(
            kit.run_until_idle().await.unwrap(),
            Drive::Crashed(_)
        ));
        kit.restart().await.unwrap();

        let outcome = kit.wait("order-1").await.unwrap();
        assert_eq!(outcome.status, TerminalStatus::Succeeded);
        assert_eq!(
            charges.load(Ordering::SeqCst),
            1,
            "charged once (crash at {point:?})"
        );
        kit.ran_to_commit_once().unwrap();
        kit.shutdown().await.unwrap();
    }
}
