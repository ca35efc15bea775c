//! The commands that work on a store from outside its worker: reads
//! ([`read`]: `status`, `outcome`, `runs`, `workflows`; [`history`]:
//! `history`), requests
//! ([`control`]: `submit`, `cancel`; [`signal`]: `signal`; [`rerun`]:
//! `rerun`; [`reset`]: `reset`; [`dead`]: `dead`, `requeue`), schedules ([`schedules`]: `schedules`, `trigger`, `pause`,
//! `resume`), the worker itself ([`worker`]), and fleets ([`fleet`]:
//! `worker --shards N`, `fleet`).

pub mod control;
pub mod dead;
pub mod fleet;
pub mod history;
pub mod json;
pub mod read;
pub mod rerun;
pub mod reset;
pub mod schedules;
pub mod signal;
pub mod worker;

use waymark::Error;

use crate::plumbing::exit::{CliError, CliResult, shown};

/// Check a run id before anything is opened: an invalid id is a usage
/// error that echoes the id safely (cut, control characters escaped).
pub fn check_run_id(run_id: &str) -> CliResult<()> {
    match waymark::validate_name("run id", run_id) {
        Ok(()) => Ok(()),
        Err(Error::InvalidRunId { reason, .. }) => Err(CliError::usage(format!(
            "invalid run id `{}`: {reason}",
            shown(run_id)
        ))),
        Err(e) => Err(CliError::usage(e.to_string())),
    }
}
