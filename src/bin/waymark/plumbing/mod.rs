//! The plumbing every command shares: exit codes and errors, output, the
//! store's location and checks, becoming a writer, stop signals, logs and
//! metrics.

pub mod exit;
#[macro_use]
pub mod output;
pub mod signals;
pub mod store;
pub mod telemetry;
pub mod writer;
