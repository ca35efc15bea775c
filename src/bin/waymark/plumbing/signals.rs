//! Stop requests: Ctrl-C (SIGINT) and SIGTERM are the same request, so a
//! process manager's stop drains the worker like a Ctrl-C does. A wait a
//! stop request must end (closing the store, opening readers) runs under
//! [`unless_stopped`].

use std::future::Future;

use tokio::signal::unix::{Signal, SignalKind, signal};

use super::exit::{CliError, CliResult};

/// The process's stop signals.
pub struct Signals {
    /// SIGINT (Ctrl-C).
    interrupt: Signal,
    /// SIGTERM.
    terminate: Signal,
}

impl Signals {
    /// Start listening (from now on the signals no longer kill the process).
    pub fn listen() -> CliResult<Self> {
        let hook = |kind, name| {
            signal(kind).map_err(|e| CliError::failure(format!("cannot listen for {name}: {e}")))
        };
        Ok(Self {
            interrupt: hook(SignalKind::interrupt(), "Ctrl-C")?,
            terminate: hook(SignalKind::terminate(), "SIGTERM")?,
        })
    }

    /// The next stop request; its name for messages.
    pub async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "Ctrl-C",
            _ = self.terminate.recv() => "SIGTERM",
        }
    }
}

/// Run `work` unless a stop request (`stop`, e.g. [`Signals::next`]) comes
/// first: then `work` is dropped unfinished and `Err` names the request.
/// A request already waiting wins over work already done.
pub async fn unless_stopped<T>(
    work: impl Future<Output = T>,
    stop: impl Future<Output = &'static str>,
) -> Result<T, &'static str> {
    tokio::select! {
        biased;
        by = stop => Err(by),
        done = work => Ok(done),
    }
}

#[cfg(test)]
mod tests {
    use std::future::pending;
    use std::task::Poll;
    use std::time::Duration;

    use futures_util::poll;
    use tokio::sync::oneshot;

    use super::*;

    /// Work that never ends ends at the stop request, which it names.
    #[tokio::test(start_paused = true)]
    async fn a_stop_request_ends_work_that_never_ends() {
        let (press, pressed) = oneshot::channel::<()>();
        let stop = async move {
            let _ = pressed.await;
            "SIGTERM"
        };
        let mut waiting = Box::pin(unless_stopped(pending::<()>(), stop));
        assert!(matches!(poll!(waiting.as_mut()), Poll::Pending));
        press.send(()).unwrap();
        // On a paused clock this bound is reached at once if the stop
        // request is not answered: a hang fails instead of hanging.
        let stopped = tokio::time::timeout(Duration::from_secs(3600), waiting)
            .await
            .expect("the stop request did not end the work");
        assert_eq!(stopped, Err("SIGTERM"));
    }

    /// Without a stop request, the work's own result.
    #[tokio::test]
    async fn work_ends_with_its_result_without_a_stop_request() {
        assert_eq!(unless_stopped(async { 7 }, pending()).await, Ok(7));
    }
}
