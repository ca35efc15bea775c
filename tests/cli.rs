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
fn a_reset_cut_short_keeps_its_marker_and_the_next_one_finishes() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    waymark(tmp.path())
        .args(["demo", "--dir", "data"])
        .assert()
        .success();
    let data = tmp.path().join("data");
    let mode = |rel: &str, mode: u32| {
        std::fs::set_permissions(data.join(rel), std::fs::Permissions::from_mode(mode)).unwrap();
    };
    // Every directory open to all, but one that nobody may delete from:
    // the reset run as nobody is cut short there.
    for (path, kind) in snapshot(&data) {
        if kind == b"<dir>" {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
        }
    }
    mode("", 0o777);
    let manifests = |data: &Path| file_count(&data.join("waymark/manifest"));
    assert!(manifests(&data) > 0);

    // Cut short among the files: the WAL's cannot go. The manifests went
    // first, so no store is left for a writer to work.
    mode("waymark/wal", 0o555);
    let cut = unprivileged(tmp.path())
        .args(["demo", "--reset", "--dir", "data"])
        .assert();
    mode("waymark/wal", 0o777);
    assert!(
        data.join(".waymark-demo").is_file(),
        "a reset cut short keeps the marker beside what is left"
    );
    assert_eq!(manifests(&data), 0, "the manifests go first");
    assert!(file_count(&data.join("waymark/wal")) > 0);
    cut.code(1)
        .stderr(predicate::str::contains("--reset stopped: cannot delete"))
        .stderr(predicate::str::contains("marker are kept"));

    // Cut short among the directories: the store's own cannot go. The next
    // --reset deletes what the first left, and is cut short in turn.
    mode("waymark", 0o555);
    let cut = unprivileged(tmp.path())
        .args(["demo", "--reset", "--dir", "data"])
        .assert();
    mode("waymark", 0o755);
    assert_eq!(file_count(&data.join("waymark")), 0, "every file went");
    assert!(
        data.join(".waymark-demo").is_file(),
        "a reset cut short keeps the marker beside what is left"
    );
    cut.code(1)
        .stderr(predicate::str::contains("--reset stopped: cannot delete"))
        .stderr(predicate::str::contains("marker are kept"));

    // The next --reset knows what is left for the demo's and deletes it
    // (the demo then starts over; it is not needed past that line).
    let mut demo = Demo::start(tmp.path(), &["--reset", "--dir", "data"]);
    demo.until("--reset: deleted the demo store in data");
    demo.signal("KILL");
    demo.finish();
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
    for args in [
        &["demo", "--dir", "d"][..],
        &["status", "demo-order-01", "--dir", "d"],
        &["outcome", "demo-order-01", "--dir", "d"],
        &["runs", "--dir", "d"],
        &["worker", "--dir", "d"],
    ] {
        waymark(tmp.path())
            .args(args)
            .assert()
            .code(1)
            .stderr(predicate::str::contains("d/waymark is a plain file"))
            .stderr(predicate::function(|s: &str| s.lines().count() == 1));
    }
    put(tmp.path(), "f", "a file\n");
    waymark(tmp.path())
        .args(["status", "x", "--dir", "f"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("f is not a directory"));
}

#[test]
fn reads_of_a_directory_without_a_store_say_so_and_create_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir(tmp.path().join("empty")).unwrap();
    put(tmp.path(), "other/waymark/notes.txt", "mine\n");
    let before = snapshot(tmp.path());
    for dir in ["empty", "missing", "other"] {
        for args in [
            &["status", "x", "--dir", dir][..],
            &["outcome", "x", "--dir", dir],
            &["runs", "--dir", dir],
            &["workflows", "--dir", dir],
            &["cancel", "x", "--dir", dir],
            &["rerun", "x", "0", "--dir", dir],
            &["submit", "x", "--example", "1", "--dir", dir],
        ] {
            waymark(tmp.path())
                .args(args)
                .assert()
                .code(3)
                .stderr(predicate::str::contains(format!(
                    "no Waymark store at {dir}"
                )));
        }
    }
    assert_eq!(snapshot(tmp.path()), before);
}

#[test]
fn an_unreadable_store_is_a_one_line_error() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let data = tmp.path().join("data");
    fake_demo_store(&data);
    std::fs::set_permissions(
        data.join("waymark/wal"),
        std::fs::Permissions::from_mode(0o000),
    )
    .unwrap();
    unprivileged(tmp.path())
        .args(["status", "demo-order-01", "--dir", "data"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("cannot read the store"))
        .stderr(predicate::str::contains(
            "data/waymark/wal: permission denied",
        ));
    std::fs::set_permissions(
        data.join("waymark/wal"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
}

#[test]
fn a_store_that_does_not_answer_times_out_with_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    // Nothing listens on port 9 of localhost: every request is refused and
    // the storage layer retries.
    waymark(tmp.path())
        .args([
            "status",
            "x",
            "--store",
            "s3://bucket/waymark",
            "--timeout",
            "1",
        ])
        .env("AWS_ENDPOINT", "http://127.0.0.1:9")
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_ACCESS_KEY_ID", "k")
        .env("AWS_SECRET_ACCESS_KEY", "s")
        .env("AWS_REGION", "us-east-1")
        .assert()
        .code(1)
        .stderr(predicate::str::contains("s3://bucket/waymark"))
        .stderr(predicate::str::contains("timed out after 1.0s"));
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
        let mut std_cmd = std::process::Command::new(nobody_bin());
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

/// A copy of the binary that `nobody` may run, whatever the permissions of
/// the directories above the build's target directory.
fn nobody_bin() -> PathBuf {
    static COPY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    COPY.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let copy = dir.join("waymark");
        std::fs::copy(BIN, &copy).unwrap();
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
        copy
    })
    .clone()
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

#[test]
fn invalid_ids_are_refused_before_anything_is_opened_and_echoed_safely() {
    let tmp = tempfile::tempdir().unwrap();
    let huge = "x".repeat(100_000);
    let before = snapshot(tmp.path());
    for command in ["status", "outcome", "cancel"] {
        waymark(tmp.path())
            .args([command, &huge])
            .assert()
            .code(2)
            .stderr(predicate::str::contains("invalid run id"))
            .stderr(predicate::str::contains("100000 bytes in all"))
            .stderr(predicate::function(|s: &str| s.len() < 400));
        waymark(tmp.path())
            .args([command, "bad\u{1b}[31mid\n"])
            .assert()
            .code(2)
            .stderr(predicate::str::contains("bad\\u{1b}[31mid\\n"))
            .stderr(predicate::function(|s: &str| {
                !s.contains('\u{1b}') && s.lines().count() == 1
            }));
    }
    // Nothing was created: no store in the default directory.
    assert_eq!(snapshot(tmp.path()), before);
}

/// An argument clap or a value parser refuses is echoed escaped: a newline
/// in it cannot forge a line of the error, a terminal escape is shown, not
/// sent (both were echoed as they were).
#[test]
fn bad_arguments_are_echoed_escaped() {
    let tmp = tempfile::tempdir().unwrap();
    for (args, echoed) in [
        // clap's own echo of a value its parser refuses.
        (
            vec!["runs", "--limit", "1\u{1b}[31m\nforged: line"],
            "1\\u{1b}[31m\\nforged: line",
        ),
        // A value parser of ours: clap's echo and the parser's message.
        (
            vec!["runs", "--since", "soon\u{1b}[31m\nforged: line"],
            "`soon\\u{1b}[31m\\nforged: line` is neither",
        ),
        (
            vec!["worker", "--schedule", "a\nforged: line=manual"],
            "invalid schedule id `a\\nforged: line`",
        ),
        // An unknown option.
        (
            vec!["status", "--no\u{1b}[31m\nforged: line"],
            "--no\\u{1b}[31m\\nforged: line",
        ),
    ] {
        let out = waymark(tmp.path()).args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(echoed), "{args:?}: {stderr}");
        assert!(
            !stderr.contains('\u{1b}') && !stderr.lines().any(|l| l.starts_with("forged")),
            "{args:?}: {stderr}"
        );
    }
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
    // Kill the demo six times shortly after its worker starts, while the
    // first steps run: each kill interrupts their attempts, as a crash loop
    // would. (The pause only aims the kill; nothing is asserted on time.)
    for _ in 0..6 {
        let mut demo = Demo::start(tmp.path(), &[]);
        demo.until("demo-order-08");
        std::thread::sleep(Duration::from_millis(150));
        demo.signal("KILL");
        assert_eq!(demo.finish().0, None);
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

// ---------------------------------------------------------------------------
// Findings 3 and 4: reads never write; a live writer is never taken over
// ---------------------------------------------------------------------------

/// How many files are under `root`.
fn file_count(root: &Path) -> usize {
    snapshot(root)
        .values()
        .filter(|v| v.as_slice() != b"<dir>")
        .count()
}

#[test]
fn reads_do_not_write_and_do_not_disturb_a_running_demo() {
    let tmp = tempfile::tempdir().unwrap();
    // A finished store: reads change no file.
    waymark(tmp.path()).arg("demo").assert().success();
    let data = tmp.path().join("waymark-data");
    let before = snapshot(&data);
    for _ in 0..5 {
        for args in [
            &["status", "demo-order-03"][..],
            &["outcome", "demo-order-03"],
            &["runs"],
            &["workflows"],
        ] {
            waymark(tmp.path()).args(args).assert().success();
        }
    }
    assert_eq!(snapshot(&data).len(), before.len());
    assert_eq!(
        file_count(&data),
        before.values().filter(|v| v.as_slice() != b"<dir>").count()
    );

    // A running demo: reads while it runs do not fence it, so it still
    // finishes every run.
    let mut demo = Demo::start(tmp.path(), &["--reset"]);
    demo.until("step 1/5 validate done");
    for _ in 0..20 {
        waymark(tmp.path())
            .args(["status", "demo-order-04"])
            .assert()
            .success()
            .stdout(predicate::str::contains("demo-order-04: "));
    }
    let (code, out) = demo.finish();
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("All 8 runs finished"), "{out}");
    waymark(tmp.path())
        .args(["outcome", "demo-order-05"])
        .assert()
        .success()
        .stdout(predicate::str::contains("card declined"));
}

#[test]
fn a_second_writer_refuses_while_one_runs() {
    let tmp = tempfile::tempdir().unwrap();
    waymark(tmp.path()).arg("demo").assert().success();
    // A worker keeps the demo's store open until it is stopped.
    let mut worker = std::process::Command::new(BIN)
        .current_dir(tmp.path())
        .args(["worker", "--dir", "waymark-data"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(worker.stdout.take().unwrap()).lines();
    assert!(lines.next().unwrap().unwrap().starts_with("worker on"));
    let before = snapshot(&tmp.path().join("waymark-data"));
    for args in [
        &["demo"][..],
        &["demo", "--reset"],
        &["worker", "--dir", "waymark-data"],
    ] {
        waymark(tmp.path())
            .args(args)
            .assert()
            .code(5)
            .stderr(predicate::str::contains(
                "another process is writing the store",
            ))
            .stderr(predicate::str::contains("--force"));
    }
    // Nothing was deleted (the worker's heartbeats add files; none go).
    let after = snapshot(&tmp.path().join("waymark-data"));
    assert!(before.keys().all(|k| after.contains_key(k)));
    std::process::Command::new("kill")
        .args(["-TERM", &worker.id().to_string()])
        .status()
        .unwrap();
    assert_eq!(worker.wait().unwrap().code(), Some(0));
    // Once it stopped cleanly, the demo starts at once.
    waymark(tmp.path())
        .arg("demo")
        .assert()
        .success()
        .stdout(predicate::str::contains("all 8 runs already finished"));
}

/// A child process killed when dropped (a failed assertion leaves no
/// process behind).
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn reset_refuses_a_store_another_process_writes_even_with_force() {
    let tmp = tempfile::tempdir().unwrap();
    waymark(tmp.path()).arg("demo").assert().success();
    let data = tmp.path().join("waymark-data");
    let mut worker = KillOnDrop(
        std::process::Command::new(BIN)
            .current_dir(tmp.path())
            .args(["worker", "--dir", "waymark-data"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(worker.0.stdout.take().unwrap()).lines();
    assert!(lines.next().unwrap().unwrap().starts_with("worker on"));
    let before = snapshot(&data);
    // --force takes a store over; it never deletes one in use.
    waymark(tmp.path())
        .args(["demo", "--reset", "--force"])
        .assert()
        .code(5)
        .stderr(predicate::str::contains(
            "another process is writing the store at waymark-data",
        ))
        .stderr(predicate::str::contains(
            "`waymark worker` or `waymark demo`",
        ))
        .stderr(predicate::str::contains("--force does not override this"))
        .stderr(predicate::function(|s: &str| s.lines().count() == 1));
    // Nothing was deleted (the worker's heartbeats add files; none go), and
    // the worker was not disturbed: it stops cleanly.
    let after = snapshot(&data);
    assert!(before.keys().all(|k| after.contains_key(k)));
    std::process::Command::new("kill")
        .args(["-TERM", &worker.0.id().to_string()])
        .status()
        .unwrap();
    assert_eq!(worker.0.wait().unwrap().code(), Some(0));
}

// ---------------------------------------------------------------------------
// Issue 12: a worker process, and clients beside it
// ---------------------------------------------------------------------------

#[test]
fn submit_and_status_work_beside_a_running_worker_without_fencing_it() {
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("file://{}/store", tmp.path().display());
    let mut worker = std::process::Command::new(BIN)
        .current_dir(tmp.path())
        .args(["worker", "--store", &url])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(worker.stdout.take().unwrap()).lines();
    let mut next_line = || lines.next().unwrap().unwrap();
    assert!(next_line().starts_with("worker on"));
    waymark(tmp.path())
        .args(["submit", "order-a", "--example", "1", "--store", &url])
        .assert()
        .success()
        .stdout(predicate::str::contains("submitted order-a"));
    // The same input again attaches; another input is refused.
    waymark(tmp.path())
        .args(["submit", "order-a", "--example", "1", "--store", &url])
        .assert()
        .success()
        .stdout(predicate::str::contains("already exists with this input"));
    waymark(tmp.path())
        .args(["submit", "order-a", "--example", "2", "--store", &url])
        .assert()
        .code(5);
    // status shows progress while the worker runs, and the worker goes on
    // committing steps after each read.
    let first = next_line();
    assert!(first.contains("order-a  step 1/5 validate done"), "{first}");
    waymark(tmp.path())
        .args(["status", "order-a", "--store", &url])
        .assert()
        .success()
        .stdout(
            predicate::str::contains("order-a: live")
                .or(predicate::str::contains("order-a: ended")),
        );
    let second = next_line();
    assert!(
        second.contains("order-a  step 2/5 reserve stock done"),
        "{second}"
    );
    waymark(tmp.path())
        .args(["runs", "--store", &url])
        .assert()
        .success()
        .stdout(predicate::str::contains("order-a"));
    let mut seen = vec![first, second];
    loop {
        let line = next_line();
        seen.push(line.clone());
        if line.contains("Succeeded") {
            break;
        }
    }
    waymark(tmp.path())
        .args(["outcome", "order-a", "--store", &url])
        .assert()
        .success()
        .stdout(predicate::str::contains("Succeeded"));
    // A signal to a run that waits for none is refused; an unknown run is
    // not found (both answered by the worker, through the inbox).
    waymark(tmp.path())
        .args(["signal", "order-a", "approved", "--store", &url])
        .assert()
        .code(5)
        .stderr(predicate::str::contains("not waiting for a signal"));
    waymark(tmp.path())
        .args(["signal", "order-z", "approved", "--store", &url])
        .assert()
        .code(3);
    // SIGTERM drains and the worker exits cleanly.
    std::process::Command::new("kill")
        .args(["-TERM", &worker.id().to_string()])
        .status()
        .unwrap();
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let status = worker.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{seen:?} {rest:?}");
    assert!(
        rest.iter().any(|l| l.contains("worker stopped")),
        "{rest:?}"
    );
}

// ---------------------------------------------------------------------------
// Issue 14: schedules listed and driven beside a running worker
// ---------------------------------------------------------------------------

#[test]
fn schedules_are_listed_and_driven_beside_a_running_worker() {
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("file://{}/store", tmp.path().display());
    let run = |args: &[&str]| {
        let mut cmd = waymark(tmp.path());
        cmd.args(args).args(["--store", &url]);
        cmd.assert()
    };
    // Bad specs are usage errors, before anything is opened.
    run(&["worker", "--schedule", "nightly=sometimes"])
        .code(2)
        .stderr(predicate::str::contains("every:N"));
    let mut worker = std::process::Command::new(BIN)
        .current_dir(tmp.path())
        .env("TERM", "dumb")
        .args(["worker", "--store", &url])
        .args([
            "--schedule",
            "by-hand=manual",
            "--schedule",
            "hourly=every:1h",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(worker.stdout.take().unwrap()).lines();
    assert!(lines.next().unwrap().unwrap().starts_with("worker on"));

    // The worker records its schedules as it starts: wait (bounded by the
    // hang guard of each command, and a count) until they are listed.
    let mut listed = String::new();
    for _ in 0..600 {
        let out = run(&["schedules"]).success().get_output().stdout.clone();
        listed = String::from_utf8(out).unwrap();
        if listed.contains("hourly") {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let rows: Vec<&str> = listed.lines().collect();
    assert!(rows[0].starts_with("SCHEDULE"), "{listed}");
    assert!(
        rows[1].starts_with("by-hand") && rows[1].contains("manual"),
        "{listed}"
    );
    assert!(
        rows[2].starts_with("hourly") && rows[2].contains("every 1h"),
        "{listed}"
    );
    assert!(rows[2].contains("active"), "{listed}");

    // A trigger submits a run, which the worker runs to its end.
    let out = run(&["trigger", "by-hand"])
        .success()
        .stdout(predicate::str::contains("triggered by-hand: run by-hand:t"))
        .get_output()
        .stdout
        .clone();
    let out = String::from_utf8(out).unwrap();
    let run_id = out
        .split_whitespace()
        .find(|w| w.starts_with("by-hand:t"))
        .unwrap()
        .to_string();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if line.contains(&run_id) && line.contains("Succeeded") {
            break;
        }
    }
    run(&["outcome", &run_id])
        .success()
        .stdout(predicate::str::contains("Succeeded"));
    run(&["schedules"])
        .success()
        .stdout(predicate::str::contains(format!("{run_id} (Succeeded)")));

    // Pause and resume, answered as the runtime answers; durable state shows
    // the pause.
    run(&["pause", "hourly"])
        .success()
        .stdout(predicate::str::contains("paused hourly"));
    run(&["pause", "hourly"])
        .success()
        .stdout(predicate::str::contains("already paused"));
    let out = run(&["schedules"]).success().get_output().stdout.clone();
    let out = String::from_utf8(out).unwrap();
    let hourly = out.lines().find(|l| l.starts_with("hourly")).unwrap();
    assert!(hourly.contains("paused"), "{out}");
    run(&["resume", "hourly"])
        .success()
        .stdout(predicate::str::contains("resumed hourly"));
    run(&["resume", "hourly"])
        .success()
        .stdout(predicate::str::contains("was not paused"));

    // An id the worker does not define: exit 3; an invalid one: exit 2.
    run(&["trigger", "nope"])
        .code(3)
        .stderr(predicate::str::contains("no schedule `nope`"));
    run(&["pause", "nope"]).code(3);
    run(&["resume", "bad/id"])
        .code(2)
        .stderr(predicate::str::contains("invalid schedule id"));

    std::process::Command::new("kill")
        .args(["-TERM", &worker.id().to_string()])
        .status()
        .unwrap();
    let _rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    assert_eq!(worker.wait().unwrap().code(), Some(0));
}

#[test]
fn schedule_requests_without_a_worker_wait_in_the_inbox() {
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("file://{}/store", tmp.path().display());
    // A worker creates the store, then stops.
    let mut worker = std::process::Command::new(BIN)
        .current_dir(tmp.path())
        .args(["worker", "--store", &url, "--schedule", "s=manual"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(worker.stdout.take().unwrap()).lines();
    assert!(lines.next().unwrap().unwrap().starts_with("worker on"));
    std::process::Command::new("kill")
        .args(["-TERM", &worker.id().to_string()])
        .status()
        .unwrap();
    assert_eq!(worker.wait().unwrap().code(), Some(0));
    waymark(tmp.path())
        .args(["trigger", "s", "--store", &url, "--timeout", "0.5"])
        .assert()
        .code(4)
        .stdout(predicate::str::contains("no worker answered"));
    waymark(tmp.path())
        .args(["pause", "s", "--no-wait", "--store", &url])
        .assert()
        .success()
        .stdout(predicate::str::contains("sent: pause s"));
}

// ---------------------------------------------------------------------------
// Finding 7: TERM=dumb on a terminal prints plain lines at once
// ---------------------------------------------------------------------------

#[test]
fn term_dumb_on_a_terminal_prints_plain_lines() {
    let tmp = tempfile::tempdir().unwrap();
    // `script` runs the demo on a pseudo-terminal.
    let out = Command::new("script")
        .current_dir(tmp.path())
        .args(["-qec", &format!("TERM=dumb {BIN} demo"), "/dev/null"])
        .timeout(HANG_GUARD)
        .assert()
        .success();
    let out = String::from_utf8_lossy(&out.get_output().stdout).into_owned();
    assert!(
        out.contains("demo-order-01  step 1/5 validate done"),
        "{out}"
    );
    assert!(
        !out.contains('\u{1b}'),
        "escape sequences on a dumb terminal: {out}"
    );
}

// ---------------------------------------------------------------------------
// Finding 5: a step shown done is durable
// ---------------------------------------------------------------------------

#[test]
fn a_step_shown_done_survives_a_kill_at_that_moment() {
    let tmp = tempfile::tempdir().unwrap();
    let mut demo = Demo::start(tmp.path(), &[]);
    let line = demo.until("step 1/5 validate done");
    demo.signal("KILL");
    demo.finish();
    let run = line
        .split_whitespace()
        .find(|w| w.starts_with("demo-order-"))
        .unwrap()
        .to_string();
    let status = waymark(tmp.path())
        .args(["status", &run])
        .assert()
        .success();
    let status = String::from_utf8(status.get_output().stdout.clone()).unwrap();
    assert!(!status.contains("step:     1/5"), "{line}\n{status}");
}

// ---------------------------------------------------------------------------
// Issue 18: the operator's commands, human and --json, beside a worker
// ---------------------------------------------------------------------------

/// Run `waymark ARGS --store URL --json` and parse its stdout.
fn json_of(cwd: &Path, args: &[&str], url: &str) -> serde_json::Value {
    let out = waymark(cwd)
        .args(args)
        .args(["--json", "--store", url])
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?}: {out:?}");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{args:?} printed no JSON ({e}): {out:?}"))
}

#[test]
fn operator_commands_read_in_text_and_json_and_reset_through_the_inbox() {
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("file://{}/store", tmp.path().display());
    let mut worker = std::process::Command::new(BIN)
        .current_dir(tmp.path())
        .args(["worker", "--store", &url])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(worker.stdout.take().unwrap()).lines();
    assert!(lines.next().unwrap().unwrap().starts_with("worker on"));
    // Example 3's card fails its first attempt (retried); then example 5's
    // card is declined (the run fails at step 3): the workflow's last
    // attempt failed.
    for (run, example) in [("flaky", "3"), ("declined", "5")] {
        waymark(tmp.path())
            .args(["submit", run, "--example", example, "--store", &url])
            .assert()
            .success();
        for line in lines.by_ref() {
            let line = line.unwrap();
            if line.contains("Succeeded") || line.contains("Failed") {
                break;
            }
        }
    }

    // history: the retry, then the pickup delay, in order.
    let history = json_of(tmp.path(), &["history", "flaky"], &url);
    assert_eq!(history["run_id"], "flaky");
    let entries: Vec<(u64, u64, String)> = history["steps"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["attempts"].as_array().unwrap().clone())
        .map(|a| {
            (
                a["step"].as_u64().unwrap(),
                a["attempt"].as_u64().unwrap(),
                a["outcome"]["kind"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let step2: Vec<_> = entries.iter().filter(|e| e.0 == 2).cloned().collect();
    assert_eq!(
        step2,
        vec![
            (2, 1, "retrying".to_string()),
            (2, 2, "delayed".to_string())
        ],
        "{history}"
    );
    assert_eq!(entries.last().unwrap().2, "ended", "{history}");
    waymark(tmp.path())
        .args(["history", "flaky", "--store", &url])
        .assert()
        .success()
        .stdout(
            predicate::str::contains("retry at")
                .and(predicate::str::contains("payment gateway timed out"))
                .and(predicate::str::contains("run Succeeded")),
        );

    // status and outcome.
    let status = json_of(tmp.path(), &["status", "declined"], &url);
    assert_eq!(status["live"], false);
    assert_eq!(status["status"], "Failed");
    let outcome = json_of(tmp.path(), &["outcome", "flaky"], &url);
    assert_eq!(outcome["status"], "Succeeded");
    assert_eq!(outcome["final_step"], 4);

    // runs, with filters.
    let runs = json_of(tmp.path(), &["runs"], &url);
    let ids: Vec<&str> = runs["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["run_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["declined", "flaky"]);
    let recent = json_of(tmp.path(), &["runs", "--since", "1h"], &url);
    assert_eq!(recent["runs"].as_array().unwrap().len(), 2);
    let old = json_of(
        tmp.path(),
        &["runs", "--until", "2001-01-01T00:00:00Z"],
        &url,
    );
    assert_eq!(old["runs"], serde_json::json!([]));
    let tagged = json_of(tmp.path(), &["runs", "--header", "team=red"], &url);
    assert_eq!(tagged["runs"], serde_json::json!([]));
    let failed = json_of(tmp.path(), &["runs", "--state", "failed"], &url);
    assert_eq!(failed["runs"].as_array().unwrap().len(), 1);
    assert_eq!(failed["runs"][0]["run_id"], "declined");
    waymark(tmp.path())
        .args(["runs", "--state", "succeeded", "--store", &url])
        .assert()
        .success()
        .stdout(predicate::str::contains("flaky").and(predicate::str::contains("declined").not()));

    // workflows: the declined card's failure is the streak; a reset through
    // the inbox zeroes it.
    let mut streak = 0;
    for _ in 0..200 {
        let all = json_of(tmp.path(), &["workflows"], &url);
        streak = all[0]["failure_streak"].as_u64().unwrap_or(0);
        if streak > 0 {
            assert_eq!(all[0]["workflow"], "default");
            assert_eq!(all[0]["breaker"]["state"], "closed");
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(streak > 0, "the failure was never folded into the health");
    waymark(tmp.path())
        .args(["workflows", "--store", &url])
        .assert()
        .success()
        .stdout(predicate::str::contains("WORKFLOW").and(predicate::str::contains("default")));
    waymark(tmp.path())
        .args(["reset", "default", "--store", &url])
        .assert()
        .success();
    let mut after = u64::MAX;
    for _ in 0..200 {
        let all = json_of(tmp.path(), &["workflows"], &url);
        after = all[0]["failure_streak"].as_u64().unwrap();
        if after == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(after, 0, "the reset did not zero the streak");

    // schedules: none defined, an empty list.
    let schedules = json_of(tmp.path(), &["schedules"], &url);
    assert_eq!(schedules, serde_json::json!([]));

    // Bad input: an unknown run, a malformed id, a bad filter, a bad name.
    waymark(tmp.path())
        .args(["history", "nobody", "--store", &url])
        .assert()
        .code(3)
        .stderr(predicate::str::contains("no run `nobody`"));
    waymark(tmp.path())
        .args(["history", "bad id", "--json", "--store", &url])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("invalid run id"));
    waymark(tmp.path())
        .args(["runs", "--state", "sleeping", "--store", &url])
        .assert()
        .code(2);
    waymark(tmp.path())
        .args(["runs", "--since", "yesterday", "--store", &url])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("RFC 3339"));
    waymark(tmp.path())
        .args(["runs", "--header", "novalue", "--store", &url])
        .assert()
        .code(2);
    waymark(tmp.path())
        .args(["reset", "no/such", "--store", &url])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("invalid workflow name"));

    std::process::Command::new("kill")
        .args(["-TERM", &worker.id().to_string()])
        .status()
        .unwrap();
    let status = worker.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}

#[test]
fn dead_jobs_are_listed_and_requeued_through_the_inbox() {
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("file://{}/store", tmp.path().display());
    let mut worker = std::process::Command::new(BIN)
        .current_dir(tmp.path())
        .args(["worker", "--store", &url])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(worker.stdout.take().unwrap()).lines();
    assert!(lines.next().unwrap().unwrap().starts_with("worker on"));
    // Example 7 ships to a PO Box: the carrier refuses it for good, and
    // the step job is dead-lettered.
    waymark(tmp.path())
        .args(["submit", "pobox", "--example", "7", "--store", &url])
        .assert()
        .success();
    for line in lines.by_ref() {
        if line.unwrap().contains("Failed") {
            break;
        }
    }
    waymark(tmp.path())
        .args(["dead", "--store", &url])
        .assert()
        .success()
        .stdout(predicate::str::contains("pobox").and(predicate::str::contains("PO Box")));
    let dead = json_of(tmp.path(), &["dead"], &url);
    assert_eq!(dead["more"], false, "{dead}");
    let dead = dead["jobs"].as_array().unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["kind"], "step");
    assert_eq!(dead[0]["run_id"], "pobox");
    assert_eq!(dead[0]["step"], 3);
    assert!(
        dead[0]["reason"].as_str().unwrap().contains("PO Box"),
        "{dead:?}"
    );
    let hooks = json_of(tmp.path(), &["dead", "--kind", "hook"], &url);
    assert_eq!(hooks, serde_json::json!({ "jobs": [], "more": false }));
    let job = dead[0]["job_id"].as_str().unwrap().to_string();

    // Requeue: the run re-runs from that step (and fails there again).
    waymark(tmp.path())
        .args(["requeue", &job, "--store", &url])
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "run pobox runs again from that step (re-run 1)",
        ));
    let mut reruns = 0;
    for _ in 0..200 {
        let out = waymark(tmp.path())
            .args(["outcome", "pobox", "--json", "--store", &url])
            .output()
            .unwrap();
        if out.status.success() {
            let outcome: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            reruns = outcome["reruns"].as_u64().unwrap();
            if reruns == 1 {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(reruns, 1, "the requeue did not re-run the run");
    // The same job again is no longer dead: not found. A malformed id is a
    // usage error, before anything is sent.
    waymark(tmp.path())
        .args(["requeue", &job, "--store", &url])
        .assert()
        .code(3)
        .stderr(predicate::str::contains("no dead job"));
    waymark(tmp.path())
        .args(["requeue", "01NOTAJOB", "--store", &url])
        .assert()
        .code(3);
    waymark(tmp.path())
        .args(["requeue", "bad/id", "--store", &url])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("invalid job id"));
    // Several at once: each is answered, a refusal of the first included,
    // and the exit code is the refusal's.
    let dead = json_of(tmp.path(), &["dead", "--kind", "step"], &url);
    // The re-run failed at step 3 again: a new dead job.
    let again = dead["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["job_id"].as_str().unwrap().to_string())
        .find(|id| *id != job)
        .expect("the re-run's dead job");
    waymark(tmp.path())
        .args(["requeue", "01NOTAJOB", &again, "--store", &url])
        .assert()
        .code(3)
        .stdout(
            predicate::str::contains("not requeued 01NOTAJOB: no dead job").and(
                predicate::str::contains(format!(
                    "requeued {again}: run pobox runs again from that step (re-run 2)"
                )),
            ),
        );

    std::process::Command::new("kill")
        .args(["-TERM", &worker.id().to_string()])
        .status()
        .unwrap();
    assert_eq!(worker.wait().unwrap().code(), Some(0));
}

/// `dead --limit N` with more than N dead jobs says the list is cut: a
/// note on stderr and `more` in the JSON (it printed the first N as if
/// they were all). At the limit exactly, nothing is said.
#[test]
fn a_dead_listing_cut_by_its_limit_says_so() {
    use waymark::{NoopTerminalHook, RunSpec, Step, StepError, StepOutcome, StepRunner};
    use waymark::{StoreLocation, StoreOptions};
    /// Every step fails for good: its job is dead-lettered.
    struct Refuses;
    impl StepRunner for Refuses {
        async fn run_step(&self, _: &Step) -> Result<StepOutcome, StepError> {
            Err(StepError::permanent("refused"))
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("file://{}/store", tmp.path().display());
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let at = StoreLocation::from_url(&url).unwrap();
        let queue = waymark::open_worker_store(&at, StoreOptions::default())
            .await
            .unwrap();
        // The queue the CLI reads.
        let runtime = waymark::WorkflowRuntime::builder(queue.clone(), Refuses, NoopTerminalHook)
            .queue_name("demo-orders")
            .build()
            .unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let pool = tokio::spawn({
            let (runtime, stop) = (runtime.clone(), stop.clone());
            async move { runtime.run(stop.cancelled_owned()).await }
        });
        for id in ["dead-1", "dead-2", "dead-3"] {
            let spec = RunSpec {
                run_id: Some(id.into()),
                ..Default::default()
            };
            runtime.submit(spec).await.unwrap();
        }
        for id in ["dead-1", "dead-2", "dead-3"] {
            tokio::time::timeout(HANG_GUARD, runtime.wait(id))
                .await
                .unwrap()
                .unwrap();
        }
        stop.cancel();
        pool.await.unwrap().unwrap();
        drop(runtime);
        std::sync::Arc::try_unwrap(queue)
            .ok()
            .unwrap()
            .close()
            .await
            .unwrap();
    });
    let dead = |args: &[&str]| {
        let out = waymark(tmp.path())
            .args(["dead", "--kind", "step", "--store", &url])
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        (
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (stdout, stderr) = dead(&["--limit", "2"]);
    assert!(
        stdout.contains("dead-1") && stdout.contains("dead-2") && !stdout.contains("dead-3"),
        "{stdout}"
    );
    assert!(
        stderr.contains("showing the first 2 dead step jobs; more exist: raise --limit"),
        "{stderr}"
    );
    let (stdout, stderr) = dead(&["--limit", "2", "--json"]);
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["jobs"].as_array().unwrap().len(), 2, "{json}");
    assert_eq!(json["more"], true, "{json}");
    assert!(stderr.contains("more exist"), "{stderr}");
    // Exactly at the limit: the whole list, and nothing said.
    let (stdout, stderr) = dead(&["--limit", "3", "--json"]);
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["jobs"].as_array().unwrap().len(), 3, "{json}");
    assert_eq!(json["more"], false, "{json}");
    assert!(!stderr.contains("more exist"), "{stderr}");
    let (stdout, stderr) = dead(&["--limit", "3"]);
    assert!(stdout.contains("dead-3"), "{stdout}");
    assert!(!stderr.contains("more exist"), "{stderr}");
}

#[test]
fn listings_go_on_past_records_they_cannot_read_and_name_them() {
    use waymark::{NoopTerminalHook, RunSpec, Step, StepError, StepOutcome, StepRunner};
    use waymark::{StoreLocation, StoreOptions};
    /// Never called: the store is written and closed before any worker.
    struct Unused;
    impl StepRunner for Unused {
        async fn run_step(&self, _: &Step) -> Result<StepOutcome, StepError> {
            Ok(StepOutcome::Succeed { result: vec![] })
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("file://{}/store", tmp.path().display());
    // A store a worker wrote, with one run record broken.
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let at = StoreLocation::from_url(&url).unwrap();
        let queue = waymark::open_worker_store(&at, StoreOptions::default())
            .await
            .unwrap();
        // The queue the CLI's worker serves.
        let runtime = waymark::WorkflowRuntime::builder(queue.clone(), Unused, NoopTerminalHook)
            .queue_name("demo-orders")
            .build()
            .unwrap();
        for id in ["alpha", "broken", "gamma"] {
            let spec = RunSpec {
                run_id: Some(id.into()),
                ..Default::default()
            };
            runtime.submit(spec).await.unwrap();
        }
        for key in [
            "wm/demo-orders/run/broken",
            "wm/demo-orders/sched/nightly",
            "wm/demo-orders/wf/billing",
        ] {
            queue.kv_put(key.as_bytes(), b"\xc1").await.unwrap();
        }
        drop(runtime);
        std::sync::Arc::try_unwrap(queue)
            .ok()
            .unwrap()
            .close()
            .await
            .unwrap();
    });
    let out = waymark(tmp.path())
        .args(["runs", "--store", &url])
        .timeout(HANG_GUARD)
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stdout.contains("alpha") && stdout.contains("gamma") && !stdout.contains("broken"),
        "{stdout}"
    );
    assert!(
        stderr
            .contains("left out: run `broken`: record `wm/demo-orders/run/broken` does not decode")
            && stderr.contains("1 run(s) in this page were left out"),
        "{stderr}"
    );
    let out = waymark(tmp.path())
        .args(["runs", "--json", "--store", &url])
        .timeout(HANG_GUARD)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let page: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(page["runs"].as_array().unwrap().len(), 2, "{page}");
    assert_eq!(page["unreadable"][0]["run_id"], "broken", "{page}");
    // (While the store is here: a re-run's STEP is 0-based, and the
    // answer shows it as every other output does, 1-based and named.)
    waymark(tmp.path())
        .args(["rerun", "alpha", "3", "--no-wait", "--store", &url])
        .assert()
        .success()
        .stdout(predicate::str::contains("sent: rerun alpha from step 4/5"));
    // Schedules and workflows: the rest listed, the record named in a
    // logged error.
    for (command, key) in [
        ("schedules", "wm/demo-orders/sched/nightly"),
        ("workflows", "wm/demo-orders/wf/billing"),
    ] {
        let out = waymark(tmp.path())
            .args([command, "--store", &url])
            .timeout(HANG_GUARD)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{command}: {out:?}");
        assert!(
            stderr.contains("leaving out an unreadable") && stderr.contains(key),
            "{command}: {stderr}"
        );
    }
}

#[test]
fn a_worker_says_so_while_it_watches_an_unclosed_writers_heartbeat() {
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("file://{}/store", tmp.path().display());
    // A service that beats every 2 s left the store without closing it.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let at = waymark::StoreLocation::from_url(&url).unwrap();
        let options = waymark::StoreOptions::default().liveness_heartbeat(Duration::from_secs(2));
        let queue = waymark::open_worker_store(&at, options).await.unwrap();
        // Its first beat is durable before it "dies".
        queue.kv_put(b"test/barrier", b"").await.unwrap();
        std::mem::forget(queue);
    });
    drop(rt);
    let mut worker = std::process::Command::new(BIN)
        .current_dir(tmp.path())
        .args(["worker", "--store", &url])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(worker.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    worker.kill().unwrap();
    let out = worker.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(first.starts_with("worker on"), "{first} / {stderr}");
    assert!(
        stderr.contains("did not close cleanly and beats every 2s: watching for its next beat"),
        "{stderr}"
    );
}
