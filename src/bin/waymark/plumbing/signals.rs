//! Stop requests: Ctrl-C (SIGINT) and SIGTERM are the same request, so a
//! process manager's stop drains the worker like a Ctrl-C does.

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
