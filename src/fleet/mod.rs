//! The building blocks of a worker fleet on one bucket: a fleet is a
//! prefix holding `N` shards, each its own taquba store (taquba is
//! single-writer), with a manifest fixing `N`, a stable routing of run ids
//! to shards, and shard leases that give each shard at most one writer.
//!
//! What is here: [`FleetManifest`] (created once with a conditional put;
//! another `N` is refused), [`shard_of`] (FNV-1a 64 of the id, modulo `N`; a run's shard is its
//! root's, [`shard_of_run`], and a schedule's home [`shard_of_schedule`]),
//! [`check_conditional_writes`] (a store that ignores conditional writes
//! is refused), and [`Leases`] (the create-only lease protocol, with its
//! timing assumptions in its docs); [`FleetWorker`] (one process of a
//! fleet: takes a fair share of the shards, runs a runtime on each, hands
//! them over; [`ShardEvent`]s report what it did) and [`FleetClient`]
//! (routes each request to its run's shard); [`FleetStatus`] (what an
//! observer sees: each shard's lease and backlog, read without writing).
//! The CLI's `waymark worker --shards N` and `waymark fleet` use them.

mod client;
mod lease;
mod manifest;
mod probe;
mod status;
mod worker;

pub use crate::route::{fnv1a64, shard_of, shard_of_run, shard_of_schedule};
pub use client::FleetClient;
pub use lease::{
    HeldLease, LeaseTiming, LeaseView, Leases, MAX_LEASE, MIN_LEASE, Watch, peek_lease,
};
pub use manifest::{FleetManifest, MAX_SHARDS};
pub use probe::check_conditional_writes;
pub use status::{Backlog, FleetStatus, ShardStatus};
pub use worker::{FleetWorker, ShardEvent};
