//! The `waymark` CLI, tested as a process: the real binary against
//! temporary directories.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Stdio};
use std::time::Duration;

use assert_cmd::Command;
use predicates::prelude::*;

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_waymark");

/// A guard against a hung command: far above any honest run.
const HANG_GUARD: Duration = Duration::from_secs(60);

/// `waymark` with plain output, in `cwd`.
fn waymark(cwd: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.current_dir(cwd).env("TERM", "dumb").timeout(HANG_GUARD);
    cmd
}

/// Every file under `root` with its contents (symlinks as their target).
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            let kind = entry.file_type().unwrap();
            if kind.is_symlink() {
                let target = std::fs::read_link(&path).unwrap();
                out.insert(path, target.into_os_string().into_encoded_bytes());
            } else if kind.is_dir() {
                out.insert(path.clone(), b"<dir>".to_vec());
                dirs.push(path);
            } else {
                out.insert(path.clone(), std::fs::read(&path).unwrap());
            }
        }
    }
    out
}

/// Write `contents` at `root/rel`, creating directories.
fn put(root: &Path, rel: &str, contents: &str) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, contents).unwrap();
}

/// A directory that looks like a demo store (marker and storage-layer
/// file names), without running the demo.
fn fake_demo_store(dir: &Path) {
    put(dir, ".waymark-demo", "demo\n");
    put(dir, "waymark/manifest/00000000000000000001.manifest", "m");
    put(dir, "waymark/wal/00000000000000000001.sst", "w");
}

/// A running `waymark demo` with its stdout read line by line.
struct Demo {
    child: Child,
    lines: std::io::Lines<BufReader<ChildStdout>>,
    seen: Vec<String>,
}

impl Demo {
    /// Start `waymark demo` with `args` in `cwd`.
    fn start(cwd: &Path, args: &[&str]) -> Self {
        let mut child = std::process::Command::new(BIN)
            .current_dir(cwd)
            .env("TERM", "dumb")
            .arg("demo")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Demo {
            child,
            lines,
            seen: vec![],
        }
    }

    /// Read lines until one contains `needle`; that line.
    fn until(&mut self, needle: &str) -> String {
        for line in self.lines.by_ref() {
            let line = line.unwrap();
            self.seen.push(line.clone());
            if line.contains(needle) {
                return line;
            }
        }
        panic!(
            "the demo ended without printing `{needle}`:\n{}",
            self.seen.join("\n")
        );
    }

    /// Send a signal to the demo.
    fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Wait for the exit; the exit code and the rest of stdout.
    fn finish(mut self) -> (Option<i32>, String) {
        for line in self.lines.by_ref() {
            self.seen.push(line.unwrap());
        }
        let status = self.child.wait().unwrap();
        (status.code(), self.seen.join("\n"))
    }
}

// ---------------------------------------------------------------------------
// Finding 1: --reset deletes only a demo store, and only its own files
// ---------------------------------------------------------------------------

#[test]
fn reset_refuses_a_directory_with_a_nested_git_repository() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    put(&src, "main.rs", "fn main() {}\n");
    put(&src, "waymark/.git/HEAD", "ref: refs/heads/main\n");
    put(&src, "waymark/.git/config", "[core]\n");
    put(&src, "waymark/lib.rs", "// mine\n");
    let before = snapshot(tmp.path());
    waymark(tmp.path())
        .args(["demo", "--reset", "--dir", "src"])
        .assert()
        .code(5)
        .stderr(predicate::str::contains("refusing to reset src"));
    assert_eq!(snapshot(tmp.path()), before);
    // Even with a marker copied in, the repository is not a store's file.
    put(&src, ".waymark-demo", "demo\n");
    std::fs::remove_file(src.join("main.rs")).unwrap();
    let before_marked = snapshot(tmp.path());
    waymark(tmp.path())
        .args(["demo", "--reset", "--dir", "src"])
        .assert()
        .code(5)
        .stderr(predicate::str::contains(
            "not a file the demo's store writes",
        ));
    assert_eq!(snapshot(tmp.path()), before_marked);
}

#[test]
fn reset_refuses_a_user_file_inside_the_store() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("waymark-data");
    fake_demo_store(&data);
    put(&data, "waymark/thesis.tex", "\\documentclass{article}\n");
    let before = snapshot(tmp.path());
    waymark(tmp.path())
        .args(["demo", "--reset"])
        .assert()
        .code(5)
        .stderr(predicate::str::contains("thesis.tex"));
    assert_eq!(snapshot(tmp.path()), before);
}

#[test]
fn reset_refuses_the_current_directory() {
    let tmp = tempfile::tempdir().unwrap();
    fake_demo_store(tmp.path());
    let before = snapshot(tmp.path());
    waymark(tmp.path())
        .args(["demo", "--reset", "--dir", "."])
        .assert()
        .code(5)
        .stderr(predicate::str::contains("current directory"));
    assert_eq!(snapshot(tmp.path()), before);
}

#[test]
fn reset_refuses_a_symlink_and_a_directory_without_marker() {
    let tmp = tempfile::tempdir().unwrap();
    let real = tmp.path().join("real");
    fake_demo_store(&real);
    std::os::unix::fs::symlink(&real, tmp.path().join("waymark-data")).unwrap();
    let before = snapshot(tmp.path());
    waymark(tmp.path())
        .args(["demo", "--reset"])
        .assert()
        .code(5)
        .stderr(predicate::str::contains("symbolic link"));
    assert_eq!(snapshot(tmp.path()), before);

    std::fs::remove_file(real.join(".waymark-demo")).unwrap();
    let before = snapshot(tmp.path());
    waymark(tmp.path())
        .args(["demo", "--reset", "--dir", "real"])
        .assert()
        .code(5)
        .stderr(predicate::str::contains("no .waymark-demo marker"));
    assert_eq!(snapshot(tmp.path()), before);
}

#[test]
fn the_demo_refuses_to_create_its_store_among_other_files() {
    let tmp = tempfile::tempdir().unwrap();
    put(tmp.path(), "notes/todo.txt", "mine\n");
    let before = snapshot(tmp.path());
    waymark(tmp.path())
        .args(["demo", "--dir", "notes"])
        .assert()
        .code(5)
        .stderr(predicate::str::contains("not empty"));
    assert_eq!(snapshot(tmp.path()), before);
}

// ---------------------------------------------------------------------------
// Finding 2: an unusable store is a fast, clear error
// ---------------------------------------------------------------------------

#[test]
fn a_plain_file_where_the_store_should_be_is_a_one_line_error() {
    let tmp = tempfile::tempdir().unwrap();
    put(tmp.path(), "d/waymark", "not a store\n");
    for args in [&["demo", "--dir", "d"][..]] {
        waymark(tmp.path())
            .args(args)
            .assert()
            .code(1)
            .stderr(predicate::str::contains("d/waymark is a plain file"))
            .stderr(predicate::function(|s: &str| s.lines().count() == 1));
    }
    put(tmp.path(), "f", "a file\n");
    waymark(tmp.path())
        .args(["demo", "--dir", "f"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("f is not a directory"));
}

/// Whether the tests run as root (who may read and write anything, so
/// permission tests drop to `nobody`).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
        .unwrap_or(false)
}

/// `waymark` as a user bound by file permissions.
fn unprivileged(cwd: &Path) -> Command {
    let mut cmd = waymark(cwd);
    if is_root() {
        use std::os::unix::process::CommandExt as _;
        let mut std_cmd = std::process::Command::new(BIN);
        std_cmd
            .uid(65534)
            .gid(65534)
            .current_dir(cwd)
            .env("TERM", "dumb");
        cmd = Command::from_std(std_cmd);
        cmd.timeout(HANG_GUARD);
    }
    cmd
}

#[test]
fn an_unwritable_store_is_a_one_line_error_naming_the_path() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let data = tmp.path().join("data");
    fake_demo_store(&data);
    for dir in [
        "data",
        "data/waymark",
        "data/waymark/wal",
        "data/waymark/manifest",
    ] {
        std::fs::set_permissions(tmp.path().join(dir), std::fs::Permissions::from_mode(0o555))
            .unwrap();
    }
    unprivileged(tmp.path())
        .args(["demo", "--dir", "data"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("cannot write the store"))
        .stderr(predicate::str::contains("permission denied"))
        .stderr(predicate::function(|s: &str| s.lines().count() == 1));
    for dir in [
        "data",
        "data/waymark",
        "data/waymark/wal",
        "data/waymark/manifest",
    ] {
        std::fs::set_permissions(tmp.path().join(dir), std::fs::Permissions::from_mode(0o777))
            .unwrap();
    }
    std::fs::set_permissions(
        data.join("waymark/wal"),
        std::fs::Permissions::from_mode(0o000),
    )
    .unwrap();
    unprivileged(tmp.path())
        .args(["demo", "--dir", "data"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains(
            "data/waymark/wal: permission denied",
        ));
    for dir in [
        "data",
        "data/waymark",
        "data/waymark/wal",
        "data/waymark/manifest",
    ] {
        std::fs::set_permissions(tmp.path().join(dir), std::fs::Permissions::from_mode(0o755))
            .unwrap();
    }
}

// ---------------------------------------------------------------------------
// Finding 7: exit codes, errors
// ---------------------------------------------------------------------------

#[test]
fn help_documents_the_exit_codes() {
    let tmp = tempfile::tempdir().unwrap();
    waymark(tmp.path())
        .arg("--help")
        .assert()
        .success()
        .stdout(predicate::str::contains("Exit codes:"))
        .stdout(predicate::str::contains("4  unfinished"));
    waymark(tmp.path()).arg("--no-such-flag").assert().code(2);
}

// ---------------------------------------------------------------------------
// Findings 5, 6, 7: what the demo says, stopping it, killing it
// ---------------------------------------------------------------------------

#[test]
fn the_demo_says_failed_and_cancelled_not_done_and_resets_its_own_store() {
    let tmp = tempfile::tempdir().unwrap();
    let out = waymark(tmp.path()).arg("demo").assert().success();
    let out = String::from_utf8(out.get_output().stdout.clone()).unwrap();
    let lines = |run: &str| -> Vec<&str> { out.lines().filter(|l| l.contains(run)).collect() };
    // demo-order-05's card is declined at step 3, demo-order-08 cancels at 2.
    assert!(
        lines("demo-order-05")
            .iter()
            .any(|l| l.contains("Failed at step 3/5 charge card: card declined")),
        "{out}"
    );
    assert!(
        !lines("demo-order-05")
            .iter()
            .any(|l| l.contains("charge card done")),
        "{out}"
    );
    assert!(
        lines("demo-order-08")
            .iter()
            .any(|l| l.contains("Cancelled at step 2/5 reserve stock")),
        "{out}"
    );
    assert!(
        !lines("demo-order-08")
            .iter()
            .any(|l| l.contains("reserve stock done")),
        "{out}"
    );
    // demo-order-03's first charge times out and is retried.
    assert!(
        out.contains("demo-order-03  step 3/5 charge card failed on attempt 1"),
        "{out}"
    );
    // No 0-based step number reaches the user.
    assert!(!out.contains("step 0"), "{out}");
    assert!(!out.contains(": step "), "{out}");

    // The demo's own store resets; the directory stays.
    waymark(tmp.path())
        .args(["demo", "--reset"])
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "--reset: deleted the demo store in waymark-data",
        ))
        .stdout(predicate::str::contains("No earlier progress found"));
}

#[test]
fn sigterm_drains_and_the_hint_resumes_the_same_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let mut demo = Demo::start(tmp.path(), &["--dir", "my store"]);
    // Plain lines arrive while the demo runs, not at its end.
    demo.until("step 1/5 validate done");
    demo.signal("TERM");
    let (code, out) = demo.finish();
    assert_eq!(code, Some(4), "{out}");
    assert!(out.contains("SIGTERM: stopping"), "{out}");
    assert!(
        out.contains(&format!("{BIN} demo --dir 'my store'")),
        "{out}"
    );
    // The resumed demo finishes every run.
    waymark(tmp.path())
        .args(["demo", "--dir", "my store"])
        .assert()
        .success()
        .stdout(predicate::str::contains("resuming"))
        .stdout(predicate::str::contains("All 8 runs finished"));
}

#[test]
fn repeated_kills_do_not_exhaust_a_run() {
    let tmp = tempfile::tempdir().unwrap();
    for _ in 0..6 {
        let mut demo = Demo::start(tmp.path(), &[]);
        demo.until(" done");
        demo.signal("KILL");
        let (code, _) = demo.finish();
        assert_eq!(code, None);
    }
    let out = waymark(tmp.path()).arg("demo").assert().success();
    let out = String::from_utf8(out.get_output().stdout.clone()).unwrap();
    assert!(!out.contains("gave up"), "{out}");
    for run in ["01", "02", "03", "04", "06"] {
        assert!(
            out.lines()
                .any(|l| l.starts_with(&format!("demo-order-{run}")) && l.contains("Succeeded")),
            "{out}"
        );
    }
}
