//! Routing: which shard of a fleet a run, or a schedule, lives on (below
//! both the fleet and the schedules, which use it; it imports nothing).
//!
//! Every process of a fleet (workers, clients, the CLI) must agree on a
//! run's shard without asking anyone, across builds, platforms and
//! versions, so the hash is fixed here and documented, not std's
//! `DefaultHasher` (whose output may change between Rust releases): the
//! 64-bit FNV-1a hash of the run id's UTF-8 bytes, modulo the fleet's shard
//! count. A run is routed by its *root*: its id up to the first `.`, so a
//! child (`{parent}.{step}.{suffix}`) lives on its parent's shard and its
//! ending reaches the parent in one writer's transaction, as in a single
//! store. Anything else that must happen once per fleet gets a home shard
//! by the same rule, from a name of its own (a schedule's id).

/// The 64-bit FNV-1a offset basis.
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
/// The 64-bit FNV-1a prime.
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// The 64-bit FNV-1a hash of `bytes`.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(FNV_OFFSET, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(FNV_PRIME)
    })
}

/// The shard (`0..shards`) that `name` (a run id, a schedule id) lives on
/// in a fleet of `shards` shards. A fleet of zero shards does not exist
/// (see [`FleetManifest`](crate::fleet::FleetManifest)); it maps everything to 0.
pub fn shard_of(name: &str, shards: u32) -> u32 {
    match u64::from(shards) {
        0 => 0,
        n => u32::try_from(fnv1a64(name.as_bytes()) % n).unwrap_or(0),
    }
}

/// The shard of run `run_id`: that of its root (its id up to the first
/// `.`), so a run and its children, and theirs, share a shard.
pub fn shard_of_run(run_id: &str, shards: u32) -> u32 {
    let root = run_id.split('.').next().unwrap_or(run_id);
    shard_of(root, shards)
}

/// The home shard of schedule `id`: the shard a run named `id` would have
/// ([`shard_of_run`]). The schedule's record and ticks live there, only
/// that shard's runtime fires it, and the runs it fires are named to route
/// there (see [`WorkflowRuntime::trigger`](crate::WorkflowRuntime::trigger)).
pub fn shard_of_schedule(id: &str, shards: u32) -> u32 {
    shard_of_run(id, shards)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The published FNV-1a test vectors: the hash is the documented one.
    #[test]
    fn the_hash_is_fnv1a_64() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    /// Fixed answers (computed independently): a change to routing would
    /// move every stored run.
    #[test]
    fn routing_is_stable() {
        let ids = ["order-1", "order-2", "order-3", "nightly"];
        let on = |n| ids.iter().map(|id| shard_of(id, n)).collect::<Vec<_>>();
        assert_eq!(on(4), [1, 0, 3, 2]);
        assert_eq!(on(7), [5, 3, 6, 3]);
        assert_eq!(shard_of("anything", 1), 0);
        assert_eq!(shard_of("anything", 0), 0);
    }

    #[test]
    fn children_live_on_their_roots_shard() {
        for n in [2, 3, 7, 16] {
            let root = shard_of_run("order-9", n);
            assert_eq!(root, shard_of("order-9", n));
            assert_eq!(shard_of_run("order-9.0.3", n), root);
            assert_eq!(shard_of_run("order-9.0.3.2r1.x", n), root);
        }
    }

    /// Ids spread over the shards (a skewed hash would load one shard).
    #[test]
    fn ids_spread_evenly() {
        let mut counts = [0u32; 8];
        for i in 0..8000 {
            counts[shard_of(&format!("run-{i}"), 8) as usize] += 1;
        }
        assert!(counts.iter().all(|c| (800..1200).contains(c)), "{counts:?}");
    }
}
