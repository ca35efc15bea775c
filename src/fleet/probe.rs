//! The check a fleet makes before it trusts a store: that the store
//! *enforces* conditional writes. Leases and SlateDB's writer fencing both
//! rest on them; some S3-compatible servers accept the headers and ignore
//! them (Garage 2.5, measured), which would let two writers interleave and
//! lose acknowledged commits. Such a store is refused at fleet start.

use taquba::object_store::path::Path;
use taquba::object_store::{
    Error as StoreError, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion,
};

use super::manifest::store_error;
use crate::error::Error;
use crate::store::StoreLocation;

/// Check that the store at `location` refuses a create over an existing
/// object and an update with a stale version. A store that cannot do
/// conditional updates at all (a local directory: `NotImplemented`) passes
/// on its refusals: the fleet's leases use creates only, and SlateDB
/// fences through creates there. Writes one probe object under
/// `{prefix}/fleet-probe/` and deletes it.
pub async fn check_conditional_writes(location: &StoreLocation) -> Result<(), Error> {
    let store = location.object_store();
    let path = Path::from(format!(
        "{}/fleet-probe/{}",
        location.path().trim_end_matches('/'),
        ulid::Ulid::generate()
    ));
    let create = || PutOptions::from(PutMode::Create);
    store
        .put_opts(&path, PutPayload::from_static(b"1"), create())
        .await
        .map_err(|e| store_error(location, "write the conditional-write probe", e))?;
    let ignored = |what: &str| Error::ConditionalWritesIgnored {
        location: location.to_string(),
        what: what.to_string(),
    };
    let verdict = async {
        match store
            .put_opts(&path, PutPayload::from_static(b"2"), create())
            .await
        {
            Err(StoreError::AlreadyExists { .. }) => {}
            Ok(_) => return Err(ignored("a create over an existing object was accepted")),
            Err(e) => return Err(store_error(location, "probe a conditional create", e)),
        }
        let stale = UpdateVersion {
            e_tag: Some("\"waymark-stale-etag\"".into()),
            version: Some("waymark-stale-version".into()),
        };
        match store
            .put_opts(
                &path,
                PutPayload::from_static(b"3"),
                PutOptions::from(PutMode::Update(stale)),
            )
            .await
        {
            Err(StoreError::Precondition { .. } | StoreError::NotImplemented { .. }) => Ok(()),
            Ok(_) => Err(ignored("an update with a stale version was accepted")),
            Err(e) => Err(store_error(location, "probe a conditional update", e)),
        }
    }
    .await;
    if let Err(e) = store.delete(&path).await {
        tracing::warn!(%path, "removing the conditional-write probe failed: {e}");
    }
    verdict
}

#[cfg(test)]
mod tests {
    use std::fmt;
    use std::sync::Arc;

    use futures_util::stream::BoxStream;
    use taquba::object_store::memory::InMemory;
    use taquba::object_store::{
        CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
        PutMultipartOptions, PutResult, RenameOptions, Result,
    };

    use super::*;

    /// A store that takes every put as an overwrite, as a server that
    /// ignores `If-None-Match` / `If-Match` does.
    #[derive(Debug)]
    struct Unconditional(InMemory);

    impl fmt::Display for Unconditional {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "Unconditional")
        }
    }

    #[async_trait::async_trait]
    impl ObjectStore for Unconditional {
        async fn put_opts(
            &self,
            location: &Path,
            payload: PutPayload,
            mut opts: PutOptions,
        ) -> Result<PutResult> {
            opts.mode = PutMode::Overwrite;
            self.0.put_opts(location, payload, opts).await
        }

        async fn put_multipart_opts(
            &self,
            location: &Path,
            opts: PutMultipartOptions,
        ) -> Result<Box<dyn MultipartUpload>> {
            self.0.put_multipart_opts(location, opts).await
        }

        async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
            self.0.get_opts(location, options).await
        }

        fn delete_stream(
            &self,
            locations: BoxStream<'static, Result<Path>>,
        ) -> BoxStream<'static, Result<Path>> {
            self.0.delete_stream(locations)
        }

        fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
            self.0.list(prefix)
        }

        async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
            self.0.list_with_delimiter(prefix).await
        }

        async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
            self.0.copy_opts(from, to, options).await
        }

        async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
            self.0.rename_opts(from, to, options).await
        }
    }

    async fn leftovers(location: &StoreLocation) -> usize {
        use futures_util::StreamExt;
        location.object_store().list(None).count().await
    }

    #[tokio::test]
    async fn a_store_that_enforces_them_passes_and_keeps_nothing() {
        let at = StoreLocation::new(Arc::new(InMemory::new()), "f");
        check_conditional_writes(&at).await.unwrap();
        assert_eq!(leftovers(&at).await, 0);
    }

    #[tokio::test]
    async fn a_local_directory_passes() {
        let dir = tempfile::tempdir().unwrap();
        let fs = taquba::object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap();
        let at = StoreLocation::new(Arc::new(fs), "f");
        check_conditional_writes(&at).await.unwrap();
    }

    #[tokio::test]
    async fn a_store_that_ignores_them_is_refused_with_the_cause() {
        let at = StoreLocation::new(Arc::new(Unconditional(InMemory::new())), "f");
        let e = check_conditional_writes(&at).await.unwrap_err();
        assert!(matches!(e, Error::ConditionalWritesIgnored { .. }), "{e}");
        assert!(
            e.to_string().contains("create over an existing object"),
            "{e}"
        );
        assert_eq!(leftovers(&at).await, 0);
    }
}
