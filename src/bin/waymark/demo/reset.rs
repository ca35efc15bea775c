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
//! its contents are deleted.

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

/// Check that `dir` is a demo store that `--reset` may delete; the files to
/// delete, deepest first, then the directories.
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
    doomed.push(dir.join(MARKER));
    // Deepest directories first.
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    doomed.extend(dirs);
    Ok(doomed)
}

/// Delete what [`check_resettable`] listed: files, then directories (each
/// must be empty by then, so nothing unlisted is ever deleted).
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
                    "--reset stopped: cannot delete {}: {e}",
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
    use super::is_object_name;

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
