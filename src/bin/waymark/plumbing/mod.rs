//! The plumbing every command shares: exit codes and errors, output, the
//! store's location and checks, one store or a fleet to read and send
//! through, becoming a writer, stop signals, logs and metrics.

pub mod exit;
#[macro_use]
pub mod output;
pub mod signals;
pub mod source;
pub mod store;
pub mod telemetry;
pub mod writer;
