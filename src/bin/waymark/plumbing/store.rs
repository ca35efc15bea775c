//! Where the store is, checking it before use, and bounding every store
//! operation a command makes.
//!
//! A store is named by `--store URL` (`file:///abs/path`, `s3://bucket/prefix`,
//! `memory://`) or by `--dir PATH`, shorthand for `file://PATH/waymark` (the
//! layout the demo has always used). Before anything is opened, a local store
//! is checked on disk ([`Store::preflight`]): a missing store, a plain file
//! where the store should be, and an unreadable or read-only store each give
//! a one-line error naming the path and the cause, instead of the storage
//! layer retrying without end. Every store operation after that runs under
//! [`Store::bounded`], which gives up after `--timeout` and says so.
//!
//! A location may also be a fleet's prefix ([`Store::fleet`]): commands that
//! work on one run open a client on the run's shard
//! ([`Store::open_run_client`]), those that list or reach every shard open
//! them all ([`Store::open_fleet_client`]), and the ones that must write a
//! single store (a plain worker, the demo) refuse a fleet rather than
//! misread it (`plumbing::writer::refuse_fleet`).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use futures_util::StreamExt;
use rustix::fs::Access;
use waymark::fleet::{FleetClient, FleetManifest, shard_of_run, shard_of_schedule};
use waymark::taquba::object_store::local::LocalFileSystem;
use waymark::taquba::object_store::path::Path as ObjectPath;
use waymark::taquba::{QueueReader, ReaderMode, ReaderOptions};
use waymark::{Client, ClientOptions, StoreLocation};

use super::exit::{CliError, CliResult, shown_path};
use super::source::Source;

/// The store's path inside a `--dir` data directory.
pub const STORE_PATH: &str = "waymark";
/// The step queue the CLI's runs use (the demo's, and `waymark worker`'s).
pub const DEFAULT_STEP_QUEUE: &str = "demo-orders";
/// The object that makes a prefix a fleet's (see `waymark::fleet`).
const FLEET_MANIFEST: &str = "fleet-manifest";
/// How often a reader polls the store's manifest. Reads of a just-opened
/// reader do not wait for a poll; this bounds how stale a long-lived reader
/// (the demo's progress, `waymark watch`-like loops) gets.
pub const READER_POLL: Duration = Duration::from_millis(100);

/// Where the store lives, and how long to wait for it.
#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// The data directory holding the store (shorthand for
    /// --store file://PATH/waymark).
    #[arg(
        long,
        value_name = "PATH",
        default_value = "waymark-data",
        conflicts_with = "store"
    )]
    pub dir: PathBuf,
    /// The store's URL: file:///abs/path, s3://bucket/prefix (endpoint,
    /// region and credentials from the AWS_* variables) or memory://.
    #[arg(long, value_name = "URL")]
    pub store: Option<String>,
    /// Give up on a store operation that has not answered after this many
    /// seconds.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub timeout: f64,
}

/// Whether a command reads the store or writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// Observation only: the store must exist and be readable.
    Read,
    /// The writer: the store is created if missing, and must be writable.
    Write,
}

/// A located store: what to call it in messages, where it is on disk (if
/// local), and the operation timeout.
#[derive(Debug, Clone)]
pub struct Store {
    /// How the user named it (`--dir` path or URL), for messages.
    pub name: String,
    /// The `--dir` data directory, when the store was named that way.
    pub dir: Option<PathBuf>,
    /// The store's own directory on local disk (`file://` and `--dir`).
    pub local: Option<PathBuf>,
    /// The store's URL.
    pub url: String,
    /// The bound on each store operation.
    pub timeout: Duration,
}

impl Store {
    /// Locate the store the arguments name. No I/O.
    pub fn locate(args: &StoreArgs) -> CliResult<Self> {
        let timeout = Duration::try_from_secs_f64(args.timeout)
            .ok()
            .filter(|t| !t.is_zero())
            .ok_or_else(|| CliError::usage("--timeout must be a positive number of seconds"))?;
        match &args.store {
            Some(url) => {
                let local = match url.strip_prefix("file://") {
                    Some(path) if path.starts_with('/') => Some(PathBuf::from(path)),
                    Some(_) => {
                        return Err(CliError::usage(format!(
                            "--store {}: a file:// URL needs an absolute path (file:///abs/path)",
                            shown_path(url)
                        )));
                    }
                    None => None,
                };
                Ok(Self {
                    name: url.clone(),
                    dir: None,
                    local,
                    url: url.clone(),
                    timeout,
                })
            }
            None => {
                let dir = &args.dir;
                let abs = std::path::absolute(dir).map_err(|e| {
                    CliError::usage(format!("--dir {}: {e}", shown_path(&dir.to_string_lossy())))
                })?;
                let local = abs.join(STORE_PATH);
                Ok(Self {
                    name: dir.display().to_string(),
                    dir: Some(dir.clone()),
                    url: format!("file://{}", local.display()),
                    local: Some(local),
                    timeout,
                })
            }
        }
    }

    /// The store's name for messages: control characters escaped.
    pub fn shown(&self) -> String {
        shown_path(&self.name)
    }

    /// The arguments that name this store on a command line.
    pub fn args(&self) -> Vec<String> {
        match &self.dir {
            Some(dir) => vec!["--dir".into(), dir.to_string_lossy().into_owned()],
            None => vec!["--store".into(), self.url.clone()],
        }
    }

    /// The error for a location holding no store.
    pub fn no_store(&self) -> CliError {
        CliError::not_found(format!("no Waymark store at {}", self.shown()))
    }

    /// Check a local store on disk before opening it, so that a missing,
    /// misplaced, unreadable or read-only store is a fast one-line error
    /// instead of a storage layer that retries without end. Remote stores
    /// are checked by the bounded open instead.
    pub fn preflight(&self, usage: Use) -> CliResult<()> {
        let Some(local) = &self.local else {
            return Ok(());
        };
        if let Some(dir) = &self.dir {
            match std::fs::metadata(dir) {
                Ok(meta) if !meta.is_dir() => {
                    return Err(CliError::failure(format!(
                        "{} is not a directory; --dir names the directory that holds the store",
                        self.shown()
                    )));
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && usage == Use::Read => {
                    return Err(self.no_store());
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error(dir, &e)),
            }
        }
        match std::fs::metadata(local) {
            Ok(meta) if !meta.is_dir() => Err(CliError::failure(format!(
                "{} is a plain file where the Waymark store's directory should be; move it away \
                 or choose another location",
                shown_path(&local.display().to_string())
            ))),
            Ok(_) => {
                if usage == Use::Read && !local.join("manifest").is_dir() {
                    return Err(self.no_store());
                }
                check_tree(local, usage)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match usage {
                Use::Read => Err(self.no_store()),
                Use::Write => check_creatable(local),
            },
            Err(e) => Err(io_error(local, &e)),
        }
    }

    /// Run one store operation, giving up after the timeout with an error
    /// that says what was waited for.
    pub async fn bounded<T, E: std::fmt::Display>(
        &self,
        what: &str,
        operation: impl Future<Output = Result<T, E>>,
    ) -> CliResult<T> {
        match tokio::time::timeout(self.timeout, operation).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(CliError::failure(format!(
                "{what} at {} failed: {e}",
                self.shown()
            ))),
            Err(_) => Err(self.timed_out(what)),
        }
    }

    /// Close a reader (a client, a fleet's clients, a bare reader), bounded
    /// by the timeout. Closing a reader loses nothing (it only reads; every
    /// request was stored when it was sent), so a close that fails or times
    /// out is a warning on stderr, not the command's failure: its result
    /// and exit code stand. Whether it closed cleanly.
    pub async fn close_reader<E: std::fmt::Display>(
        &self,
        closing: impl Future<Output = Result<(), E>>,
    ) -> bool {
        match self.bounded("closing the reader", closing).await {
            Ok(()) => true,
            Err(e) => {
                say_err!(
                    "waymark: warning: {e}; nothing is lost (a reader only reads): the command's \
                     result stands"
                );
                false
            }
        }
    }

    /// The error for an operation that outlived the timeout.
    pub fn timed_out(&self, what: &str) -> CliError {
        CliError::failure(format!(
            "timed out after {:.1}s {what} at {}: the store did not answer (the storage layer \
             retries a failing store without end); check that it is reachable and writable, or \
             pass a longer --timeout",
            self.timeout.as_secs_f64(),
            self.shown()
        ))
    }

    /// The library's location of the store. A `--dir` store is the
    /// directory's `waymark` path, as the demo has always laid it out.
    pub fn location(&self) -> CliResult<StoreLocation> {
        if let Some(dir) = &self.dir {
            let abs = std::path::absolute(dir).map_err(|e| io_error(dir, &e))?;
            // A writer creates it first (`create_local`): a reader finds
            // nothing there.
            if !abs.exists() {
                return Err(self.no_store());
            }
            let store = LocalFileSystem::new_with_prefix(&abs).map_err(|e| {
                CliError::failure(format!("cannot use {} as a store: {e}", self.shown()))
            })?;
            return Ok(StoreLocation::new(Arc::new(store), STORE_PATH));
        }
        StoreLocation::from_url(&self.url)
            .map_err(|e| CliError::usage(format!("--store {}: {e}", self.shown())))
    }

    /// Create a local store's directory (with `--dir`, the directory too),
    /// for a writer about to open it; nothing for a remote store.
    pub fn create_local(&self) -> CliResult<()> {
        if let Some(local) = &self.local {
            std::fs::create_dir_all(local).map_err(|e| {
                CliError::failure(format!("cannot create the store at {}: {e}", self.shown()))
            })?;
        }
        Ok(())
    }

    /// The fleet at this location, if it is a fleet's prefix (its
    /// manifest); `None` for a single store or nothing.
    pub async fn fleet(&self) -> CliResult<Option<FleetManifest>> {
        if let Some(local) = &self.local
            && !local.join(FLEET_MANIFEST).is_file()
        {
            return Ok(None);
        }
        let location = self.location()?;
        self.bounded("reading the fleet manifest", FleetManifest::read(&location))
            .await
    }

    /// Whether a single (non-fleet) store lives at this location: its
    /// storage layer's manifest is there.
    pub async fn has_single_store(&self) -> CliResult<bool> {
        let location = self.location()?;
        let prefix = ObjectPath::from(format!(
            "{}/manifest",
            location.path().trim_end_matches('/')
        ));
        let first = async {
            let mut listing = location.object_store().list(Some(&prefix));
            listing.next().await.transpose()
        };
        Ok(self.bounded("looking for a store", first).await?.is_some())
    }

    /// The client options every command uses.
    fn client_options() -> ClientOptions {
        ClientOptions::default()
            .queue_name(DEFAULT_STEP_QUEUE)
            .refresh_interval(READER_POLL)
    }

    /// Open a client on a single store, once the location is known not to
    /// be a fleet: reads through a reader (never writes to the store, never
    /// fences its writer), requests through the inbox.
    pub async fn open_single_client(&self) -> CliResult<Client> {
        self.preflight(Use::Read)?;
        let location = self.location()?;
        match tokio::time::timeout(
            self.timeout,
            Client::open(&location, Self::client_options()),
        )
        .await
        {
            Ok(Ok(client)) => Ok(client),
            Ok(Err(waymark::Error::NotAWaymarkStore { reason, .. })) => Err(CliError::not_found(
                format!("no Waymark store at {}: {reason}", self.shown()),
            )),
            Ok(Err(e)) => Err(CliError::failure(format!(
                "cannot read the store at {}: {e}",
                self.shown()
            ))),
            Err(_) => Err(self.timed_out("opening the store for reading")),
        }
    }

    /// Open what the store is read and sent through: a client on it, or on
    /// a fleet a client on every shard.
    pub async fn open_source(&self) -> CliResult<Source> {
        Ok(match self.fleet().await? {
            Some(manifest) => Source::Fleet(self.open_fleet_client(&manifest).await?),
            None => Source::Store(self.open_single_client().await?),
        })
    }

    /// Open a client on the store that holds run `run_id`: the store
    /// itself, or on a fleet the run's shard (by the fleet's routing).
    pub async fn open_run_client(&self, run_id: &str) -> CliResult<Client> {
        match self.fleet().await? {
            Some(manifest) => self.open_shard_client(&manifest, run_id).await,
            None => self.open_single_client().await,
        }
    }

    /// Open a client on the shard of the fleet `manifest` that holds run
    /// `run_id`.
    pub async fn open_shard_client(
        &self,
        manifest: &FleetManifest,
        run_id: &str,
    ) -> CliResult<Client> {
        self.open_shard(manifest, shard_of_run(run_id, manifest.shards))
            .await
    }

    /// Open a client on schedule `id`'s home: its shard on a fleet (where
    /// its record lives and its requests are applied), else the store.
    pub async fn open_schedule_client(&self, id: &str) -> CliResult<Client> {
        match self.fleet().await? {
            Some(manifest) => {
                self.open_shard(&manifest, shard_of_schedule(id, manifest.shards))
                    .await
            }
            None => self.open_single_client().await,
        }
    }

    /// Open a client on shard `shard` of the fleet `manifest`.
    async fn open_shard(&self, manifest: &FleetManifest, shard: u32) -> CliResult<Client> {
        let at = manifest.shard_location(&self.location()?, shard);
        match tokio::time::timeout(self.timeout, Client::open(&at, Self::client_options())).await {
            Ok(Ok(client)) => Ok(client),
            Ok(Err(waymark::Error::NotAWaymarkStore { .. })) => {
                Err(self.shard_not_opened(manifest))
            }
            Ok(Err(e)) => Err(CliError::failure(format!(
                "cannot read shard {shard} of the fleet at {}: {e}",
                self.shown()
            ))),
            Err(_) => Err(self.timed_out(&format!("opening shard {shard} for reading"))),
        }
    }

    /// Open a client on every shard of the fleet `manifest`.
    pub async fn open_fleet_client(&self, manifest: &FleetManifest) -> CliResult<FleetClient> {
        let location = self.location()?;
        match tokio::time::timeout(
            self.timeout,
            FleetClient::open(&location, Self::client_options()),
        )
        .await
        {
            Ok(Ok(client)) => Ok(client),
            Ok(Err(waymark::Error::NotAWaymarkStore { .. })) => {
                Err(self.shard_not_opened(manifest))
            }
            Ok(Err(e)) => Err(CliError::failure(format!(
                "cannot read the fleet at {}: {e}",
                self.shown()
            ))),
            Err(_) => Err(self.timed_out("opening the fleet's shards for reading")),
        }
    }

    /// The error for a shard no worker has opened yet.
    fn shard_not_opened(&self, manifest: &FleetManifest) -> CliError {
        let shards = manifest.shards.to_string();
        let mut worker = vec!["worker"];
        let args = self.args();
        worker.extend(args.iter().map(String::as_str));
        worker.extend(["--shards", shards.as_str()]);
        CliError::not_found(format!(
            "a shard of the fleet at {} has not been opened by a worker yet: start one ({})",
            self.shown(),
            super::output::suggest(&worker)
        ))
    }

    /// Open a bare reader (for the writer's liveness): never writes to the
    /// store and never fences its writer (`FollowLatest` takes no
    /// checkpoint).
    pub async fn open_reader(&self) -> CliResult<QueueReader> {
        let location = self.location()?;
        let options = ReaderOptions::default()
            .mode(ReaderMode::FollowLatest)
            .manifest_poll_interval(READER_POLL);
        match tokio::time::timeout(
            self.timeout,
            QueueReader::open_with_options(
                location.object_store().clone(),
                location.path(),
                options,
            ),
        )
        .await
        {
            Ok(Ok(reader)) => Ok(reader),
            Ok(Err(waymark::taquba::Error::StoreNotInitialized { .. })) => Err(self.no_store()),
            Ok(Err(e)) => Err(CliError::failure(format!(
                "cannot read the store at {}: {e}",
                self.shown()
            ))),
            Err(_) => Err(self.timed_out("opening the store for reading")),
        }
    }
}

/// An I/O error on `path`, in one line.
fn io_error(path: &Path, e: &std::io::Error) -> CliError {
    CliError::failure(format!(
        "cannot use {}: {}",
        shown_path(&path.display().to_string()),
        io_cause(e)
    ))
}

/// An I/O error's cause in words, without the OS error number.
fn io_cause(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::PermissionDenied => "permission denied".into(),
        std::io::ErrorKind::ReadOnlyFilesystem => "read-only file system".into(),
        std::io::ErrorKind::NotADirectory => "not a directory".into(),
        _ => e.to_string(),
    }
}

/// Check that the process can read every directory and file of the store at
/// `root` (and, for [`Use::Write`], write every directory).
///
/// A live writer renames its staged uploads and its collector deletes
/// objects while the walk runs, so an entry that is gone by the time it is
/// checked is skipped: it is no longer part of the store.
fn check_tree(root: &Path, usage: Use) -> CliResult<()> {
    let mode = match usage {
        Use::Read => Access::READ_OK | Access::EXEC_OK,
        Use::Write => Access::READ_OK | Access::WRITE_OK | Access::EXEC_OK,
    };
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let checked = rustix::fs::access(&dir, mode)
            .map_err(std::io::Error::from)
            .and_then(|()| std::fs::read_dir(&dir));
        let entries = match present(checked).map_err(|e| denied(&dir, usage, e))? {
            Some(entries) => entries,
            None => continue,
        };
        for entry in entries {
            let entry = entry.map_err(|e| denied(&dir, usage, e))?;
            let path = entry.path();
            let Some(kind) = present(entry.file_type()).map_err(|e| denied(&path, usage, e))?
            else {
                continue;
            };
            if kind.is_dir() {
                dirs.push(path);
            } else {
                present(rustix::fs::access(&path, Access::READ_OK).map_err(Into::into))
                    .map_err(|e| denied(&path, usage, e))?;
            }
        }
    }
    Ok(())
}

/// `result`, with "not found" read as "no longer there" (`None`).
fn present<T>(result: std::io::Result<T>) -> std::io::Result<Option<T>> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Check that the store directory `store` can be created: its nearest
/// existing ancestor is a writable directory.
fn check_creatable(store: &Path) -> CliResult<()> {
    let mut ancestor = store.parent();
    while let Some(dir) = ancestor {
        match std::fs::metadata(dir) {
            Ok(meta) if meta.is_dir() => {
                return rustix::fs::access(dir, Access::WRITE_OK | Access::EXEC_OK)
                    .map_err(|e| denied(dir, Use::Write, e.into()));
            }
            Ok(_) => {
                return Err(CliError::failure(format!(
                    "cannot create the store at {}: {} is a plain file",
                    shown_path(&store.display().to_string()),
                    shown_path(&dir.display().to_string())
                )));
            }
            Err(_) => ancestor = dir.parent(),
        }
    }
    Ok(())
}

/// The error for a store path the process may not use.
fn denied(path: &Path, usage: Use, e: std::io::Error) -> CliError {
    let verb = match usage {
        Use::Read => "read",
        Use::Write => "write",
    };
    CliError::failure(format!(
        "cannot {verb} the store: {}: {}",
        shown_path(&path.display().to_string()),
        io_cause(&e)
    ))
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::future::pending;

    use super::*;

    /// A store in memory that gives up on an operation after `timeout`.
    fn memory_store(timeout: Duration) -> Store {
        Store {
            name: "memory://".into(),
            dir: None,
            local: None,
            url: "memory://".into(),
            timeout,
        }
    }

    /// A reader's close that never ends is given up after the store's
    /// timeout (on a paused clock: nothing is waited for) and reported as
    /// not clean, instead of holding the command for ever.
    #[tokio::test(start_paused = true)]
    async fn a_close_that_never_ends_is_given_up_after_the_timeout() {
        let store = memory_store(Duration::from_secs(10));
        let closing = store.close_reader(pending::<Result<(), Infallible>>());
        // Far past the store's timeout: reached only by a close it does
        // not bound.
        let closed = tokio::time::timeout(Duration::from_secs(3600), closing)
            .await
            .expect("closing a reader was not bounded by the store's timeout");
        assert!(!closed);
    }

    /// A close that ends is waited for: clean when it succeeds, not when it
    /// fails.
    #[tokio::test]
    async fn a_close_that_ends_says_whether_it_was_clean() {
        let store = memory_store(Duration::from_secs(10));
        assert!(store.close_reader(async { Ok::<(), Infallible>(()) }).await);
        assert!(!store.close_reader(async { Err::<(), _>("refused") }).await);
    }

    /// A file listed and then removed by a live writer (a staged upload
    /// renamed, an object collected) is skipped, not an error; a dangling
    /// link stands in for it, since checking it fails the same way.
    #[test]
    fn an_entry_gone_between_listing_and_checking_is_skipped() {
        let root = tempfile::tempdir().unwrap();
        let wal = root.path().join("wal");
        std::fs::create_dir(&wal).unwrap();
        std::fs::write(wal.join("00000000000000000001.sst"), b"x").unwrap();
        std::os::unix::fs::symlink(wal.join("gone"), wal.join("00000000000000000030.sst#1"))
            .unwrap();
        assert!(check_tree(root.path(), Use::Read).is_ok());
        assert!(check_tree(root.path(), Use::Write).is_ok());
    }
}
