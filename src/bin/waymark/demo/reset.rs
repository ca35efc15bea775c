//! What the demo may delete: only a store it provably created, and only
//! that store's own files.
//!
//! When the demo creates its store it writes a marker file
//! ([`MARKER`]) into the data directory. `--reset` deletes a data directory's
//! contents only if all of this holds, and otherwise refuses with one line
//! naming the reason:
//! - the directory is not a symbolic link, not the current directory and
//!   not one of its ancestors;
//! - the marker is there;
//! - the directory holds nothing but the marker and the store's own
//!   directories ([`STORE_DIRS`]);
//! - those hold only directories and files named the way the storage layer
//!   names its objects (a 20-digit sequence number or a ULID, then an
//!   extension): no symbolic link, no `.git`, no `thesis.tex`.
//!
//! The data directory itself is kept (it may have existed before the demo);
//! its contents are deleted, the store's manifests first (oldest first) and
//! the marker last, so a reset cut short (a kill, a file it cannot delete)
//! leaves the marker beside a store that is either whole but for old
//! manifests or has no manifest at all, and the next `--reset` finishes.
//! `--reset` also refuses, even with `--force`, while another process
//! writes the store (`plumbing::writer::refuse_delete_if_live`).

use std::path::{Path, PathBuf};

use crate::plumbing::exit::{CliError, CliResult, shown, shown_path};

/// The marker file the demo writes into a data directory when it creates its
/// store there.
pub const MARKER: &str = ".waymark-demo";
/// What the marker says.
const MARKER_TEXT: &str =
    "This directory holds a Waymark demo store; `waymark demo --reset` may delete it.\n";
/// The store's directories inside a data directory: the store, its
/// offloaded payloads and its inbox.
const STORE_DIRS: [&str; 3] = ["waymark", "waymark-payloads", "waymark-inbox"];

/// Whether `dir` already holds the store's directory.
pub fn has_store(dir: &Path) -> bool {
    dir.join(STORE_DIRS[0]).exists()
}

/// Check that the demo may create its store in `dir`: it is missing, empty,
/// or already holds a store. A directory with other files is someone else's.
pub fn check_creatable(dir: &Path) -> CliResult<()> {
    if has_store(dir) {
        return Ok(());
    }
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        // The store's own preflight reports what is wrong with it.
        Err(_) => return Ok(()),
    };
    if let Some(entry) = entries.flatten().find(|e| e.file_name() != MARKER) {
        return Err(CliError::refused(format!(
            "refusing to create a demo store in {}: it is not empty (it holds {}) and holds no \
             Waymark store; choose a new or empty --dir",
            show(dir),
            shown(&entry.file_name().to_string_lossy())
        )));
    }
    Ok(())
}

/// Write the marker into `dir` (which exists).
pub fn mark(dir: &Path) -> CliResult<()> {
    std::fs::write(dir.join(MARKER), MARKER_TEXT)
        .map_err(|e| CliError::failure(format!("cannot write {}: {e}", show(&dir.join(MARKER)))))
}

/// Check that `dir` is a demo store that `--reset` may delete; what to
/// delete in order: the store's manifests (oldest first), its other files,
/// its directories deepest first, and the marker last.
pub fn check_resettable(dir: &Path) -> CliResult<Vec<PathBuf>> {
    let refuse = |why: String| CliError::refused(format!("refusing to reset {}: {why}", show(dir)));
    let meta =
        std::fs::symlink_metadata(dir).map_err(|e| refuse(format!("cannot read it: {e}")))?;
    if meta.file_type().is_symlink() {
        return Err(refuse(
            "it is a symbolic link; pass the directory it points to, if it is a demo store".into(),
        ));
    }
    if !meta.is_dir() {
        return Err(refuse("it is not a directory".into()));
    }
    let canonical = dir
        .canonicalize()
        .map_err(|e| refuse(format!("cannot resolve it: {e}")))?;
    if let Ok(cwd) = std::env::current_dir().and_then(|d| d.canonicalize())
        && cwd.starts_with(&canonical)
    {
        return Err(refuse(
            "it is the current directory or one of its parents; pass the demo's data directory"
                .into(),
        ));
    }
    match std::fs::symlink_metadata(dir.join(MARKER)) {
        Ok(m) if m.is_file() => {}
        _ => {
            return Err(refuse(format!(
                "it has no {MARKER} marker, so it was not created by `waymark demo`; delete it \
                 yourself if you mean to"
            )));
        }
    }
    let mut doomed = Vec::new();
    let mut dirs = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| refuse(format!("cannot list it: {e}")))? {
        let entry = entry.map_err(|e| refuse(format!("cannot list it: {e}")))?;
        let name = entry.file_name();
        let path = entry.path();
        if name == MARKER {
            continue;
        }
        let kind = entry
            .file_type()
            .map_err(|e| refuse(format!("cannot read {}: {e}", show(&path))))?;
        if !kind.is_dir() || !STORE_DIRS.iter().any(|d| name == *d) {
            return Err(refuse(format!(
                "it holds {}, which is not part of a Waymark demo store",
                shown(&name.to_string_lossy())
            )));
        }
        collect(&path, &mut doomed, &mut dirs).map_err(refuse)?;
    }
    // The store's manifests first, oldest first: wherever a reset is cut
    // short, either the newest manifest is left with every file it names (a
    // store the next --reset can open to check for a live writer), or no
    // manifest is (no store: no writer to check for).
    let manifests = dir.join(STORE_DIRS[0]).join("manifest");
    doomed.sort_by(|a, b| {
        let rank = |p: &Path| (p.parent() != Some(manifests.as_path()), p.to_path_buf());
        rank(a).cmp(&rank(b))
    });
    // Deepest directories first.
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    doomed.extend(dirs);
    // The marker last: a reset cut short leaves it beside what is left, so
    // the next --reset still knows the store for the demo's and finishes.
    doomed.push(dir.join(MARKER));
    Ok(doomed)
}

/// Delete what [`check_resettable`] listed, in its order: files, then
/// directories (each must be empty by then, so nothing unlisted is ever
/// deleted), then the marker.
pub fn delete(doomed: &[PathBuf]) -> CliResult<usize> {
    let mut files = 0;
    for path in doomed {
        let is_dir = std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir());
        let result = if is_dir {
            std::fs::remove_dir(path)
        } else {
            files += 1;
            std::fs::remove_file(path)
        };
        match result {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(CliError::failure(format!(
                    "--reset stopped: cannot delete {}: {e}; what is left of the store and its \
                     {MARKER} marker are kept, so --reset finishes once that is fixed",
                    show(path)
                )));
            }
        }
    }
    Ok(files)
}

/// Walk a store directory: its files into `files`, itself and its
/// subdirectories into `dirs`; an error names anything that is not the
/// storage layer's.
fn collect(dir: &Path, files: &mut Vec<PathBuf>, dirs: &mut Vec<PathBuf>) -> Result<(), String> {
    dirs.push(dir.to_path_buf());
    let entries = std::fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", show(dir)))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("cannot list {}: {e}", show(dir)))?;
        let path = entry.path();
        let kind = entry
            .file_type()
            .map_err(|e| format!("cannot read {}: {e}", show(&path)))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if kind.is_dir() && name != ".git" {
            collect(&path, files, dirs)?;
        } else if kind.is_file() && is_object_name(&name) {
            files.push(path);
        } else {
            return Err(format!(
                "{} is not a file the demo's store writes",
                show(&path)
            ));
        }
    }
    Ok(())
}

/// Whether `name` is how the storage layer names an object: a sequence
/// number (digits) or a ULID, optionally followed by `.extension` and an
/// in-progress write's `#N` suffix.
fn is_object_name(name: &str) -> bool {
    let stem = name.split(['.', '#']).next().unwrap_or("");
    let digits = stem.len() >= 10 && stem.bytes().all(|b| b.is_ascii_digit());
    let ulid = stem.len() == 26
        && ulid::Ulid::from_string(stem).is_ok()
        && stem
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase());
    digits || ulid
}

/// A path for a message.
fn show(path: &Path) -> String {
    shown_path(&path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::{MARKER, check_resettable, is_object_name};

    #[test]
    fn the_manifests_go_first_oldest_first_and_the_marker_last() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        // Created in an order that neither a directory's creation order nor
        // its reverse (as some file systems list) puts right.
        for rel in [
            MARKER,
            "waymark/wal/00000000000000000001.sst",
            "waymark/manifest/00000000000000000002.manifest",
            "waymark/manifest/00000000000000000003.manifest",
            "waymark/manifest/00000000000000000001.manifest",
            "waymark/compacted/01J79C21YKR31J2BS1EFXJZ7MR.sst",
            "waymark-inbox/v1/01J79C21YKR31J2BS1EFXJZ7MR.submit",
        ] {
            let path = dir.join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, "x").unwrap();
        }
        let doomed: Vec<String> = check_resettable(dir)
            .unwrap()
            .iter()
            .map(|p| p.strip_prefix(dir).unwrap().display().to_string())
            .collect();
        assert_eq!(
            doomed[..3],
            [
                "waymark/manifest/00000000000000000001.manifest",
                "waymark/manifest/00000000000000000002.manifest",
                "waymark/manifest/00000000000000000003.manifest",
            ],
            "{doomed:?}"
        );
        assert_eq!(
            doomed.last().map(String::as_str),
            Some(MARKER),
            "{doomed:?}"
        );
        // Every file before every directory (a directory is deleted empty).
        let first_dir = doomed.iter().position(|p| dir.join(p).is_dir()).unwrap();
        assert!(
            doomed[first_dir..doomed.len() - 1]
                .iter()
                .all(|p| dir.join(p).is_dir()),
            "{doomed:?}"
        );
        assert_eq!(doomed.len(), 7 + 6, "{doomed:?}");
    }

    #[test]
    fn object_names() {
        assert!(is_object_name("00000000000000000046.sst"));
        assert!(is_object_name("00000000000000000001.manifest"));
        assert!(is_object_name("01J79C21YKR31J2BS1EFXJZ7MR.sst"));
        assert!(is_object_name("01J79C21YKR31J2BS1EFXJZ7MR.submit-x#3"));
        assert!(!is_object_name("thesis.tex"));
        assert!(!is_object_name("HEAD"));
        assert!(!is_object_name(".gitignore"));
    }
}
