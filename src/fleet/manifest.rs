//! The fleet manifest: the object that says "this prefix is a fleet of N
//! shards", created once with a conditional put so two workers starting a
//! fleet at the same moment cannot create it with different shard counts.

use serde::{Deserialize, Serialize};
use taquba::object_store::path::Path;
use taquba::object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};

use crate::error::Error;
use crate::record::{decode, encode};
use crate::store::StoreLocation;

/// The most shards a fleet may have.
pub const MAX_SHARDS: u32 = 1024;

/// What a fleet is: fixed when it is created. Resharding (changing
/// `shards` of an existing fleet) is not supported: every run's shard is
/// derived from its id and the shard count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetManifest {
    /// How many shards (taquba stores) the fleet has.
    pub shards: u32,
}

impl FleetManifest {
    /// The manifest of the fleet at `location`, created with `shards`
    /// shards if there is none yet. An existing fleet with another shard
    /// count is refused ([`Error::FleetMismatch`]); nothing is written then.
    pub async fn open_or_create(location: &StoreLocation, shards: u32) -> Result<Self, Error> {
        if shards == 0 || shards > MAX_SHARDS {
            return Err(Error::InvalidConfig(format!(
                "a fleet has 1 to {MAX_SHARDS} shards, not {shards}"
            )));
        }
        let wanted = Self { shards };
        let path = manifest_path(location);
        let body = encode(path.as_ref().as_bytes(), &wanted)?;
        let created = location
            .object_store()
            .put_opts(
                &path,
                PutPayload::from(body),
                PutOptions::from(PutMode::Create),
            )
            .await;
        let found =
            match created {
                Ok(_) => return Ok(wanted),
                Err(taquba::object_store::Error::AlreadyExists { .. }) => Self::read(location)
                    .await?
                    .ok_or_else(|| Error::NotAWaymarkStore {
                        location: location.to_string(),
                        reason: "the fleet manifest was there, then gone".into(),
                    })?,
                Err(e) => return Err(store_error(location, "create the fleet manifest", e)),
            };
        if found != wanted {
            return Err(Error::FleetMismatch {
                location: location.to_string(),
                found: found.shards,
                asked: shards,
            });
        }
        Ok(found)
    }

    /// The manifest of the fleet at `location`, if there is one.
    pub async fn read(location: &StoreLocation) -> Result<Option<Self>, Error> {
        let path = manifest_path(location);
        match location.object_store().get(&path).await {
            Ok(got) => {
                let bytes = got
                    .bytes()
                    .await
                    .map_err(|e| store_error(location, "read the fleet manifest", e))?;
                let manifest: Self = decode(path.as_ref().as_bytes(), &bytes)?;
                if manifest.shards == 0 || manifest.shards > MAX_SHARDS {
                    return Err(Error::CorruptRecord {
                        key: path.to_string(),
                        reason: format!("a fleet of {} shards", manifest.shards),
                    });
                }
                Ok(Some(manifest))
            }
            Err(taquba::object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(store_error(location, "read the fleet manifest", e)),
        }
    }

    /// The store of shard `shard` (`0..shards`): a taquba store at
    /// `{prefix}/shard-{shard:04}` in the fleet's object store.
    pub fn shard_location(&self, location: &StoreLocation, shard: u32) -> StoreLocation {
        StoreLocation::new(
            location.object_store().clone(),
            format!("{}/shard-{shard:04}", location.path().trim_end_matches('/')),
        )
    }
}

/// Where the manifest of the fleet at `location` is.
fn manifest_path(location: &StoreLocation) -> Path {
    Path::from(format!(
        "{}/fleet-manifest",
        location.path().trim_end_matches('/')
    ))
}

/// A failed object store call of the fleet, as an error that says what was
/// being done.
pub(crate) fn store_error(
    location: &StoreLocation,
    doing: &str,
    e: taquba::object_store::Error,
) -> Error {
    Error::FleetStore {
        location: location.to_string(),
        doing: doing.to_string(),
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use taquba::object_store::memory::InMemory;

    use super::*;

    fn location() -> StoreLocation {
        StoreLocation::new(Arc::new(InMemory::new()), "fleets/main")
    }

    #[tokio::test]
    async fn the_first_worker_creates_it_and_the_others_agree() {
        let at = location();
        assert_eq!(FleetManifest::read(&at).await.unwrap(), None);
        let made = FleetManifest::open_or_create(&at, 4).await.unwrap();
        assert_eq!(made.shards, 4);
        let again = FleetManifest::open_or_create(&at, 4).await.unwrap();
        assert_eq!(again, made);
        assert_eq!(FleetManifest::read(&at).await.unwrap(), Some(made));
        assert_eq!(made.shard_location(&at, 3).path(), "fleets/main/shard-0003");
    }

    #[tokio::test]
    async fn another_shard_count_is_refused_and_changes_nothing() {
        let at = location();
        FleetManifest::open_or_create(&at, 4).await.unwrap();
        let e = FleetManifest::open_or_create(&at, 8).await.unwrap_err();
        assert!(
            matches!(
                e,
                Error::FleetMismatch {
                    found: 4,
                    asked: 8,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("4 shards"), "{e}");
        assert_eq!(FleetManifest::read(&at).await.unwrap().unwrap().shards, 4);
    }

    #[tokio::test]
    async fn a_shard_count_out_of_range_is_refused_before_writing() {
        let at = location();
        for n in [0, MAX_SHARDS + 1] {
            let e = FleetManifest::open_or_create(&at, n).await.unwrap_err();
            assert!(matches!(e, Error::InvalidConfig(_)), "{e}");
        }
        assert_eq!(FleetManifest::read(&at).await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_corrupt_manifest_is_an_error_not_a_fleet() {
        let at = location();
        at.object_store()
            .put(&manifest_path(&at), PutPayload::from_static(b"junk"))
            .await
            .unwrap();
        let e = FleetManifest::read(&at).await.unwrap_err();
        assert!(matches!(e, Error::CorruptRecord { .. }), "{e}");
        let e = FleetManifest::open_or_create(&at, 2).await.unwrap_err();
        assert!(matches!(e, Error::CorruptRecord { .. }), "{e}");
    }
}
