//! Exit codes and the CLI's error type.
//!
//! Every command returns an [`Exit`] or a [`CliError`]; `main` prints the
//! error on one line (`waymark: error: ...`) and exits with its code. The
//! codes are documented in `waymark --help` ([`EXIT_CODES_HELP`]).

use std::fmt;
use std::process::ExitCode;

/// How the process ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// 0: the command did what it was asked.
    Ok,
    /// 1: the store or the runtime failed (I/O, timeout, a fenced worker, a
    /// fleet worker's dropped shard).
    Failure,
    /// 2: bad usage: an unknown option, an invalid run id or input.
    Usage,
    /// 3: not found: no Waymark store at the location, no such run, or a
    /// schedule the worker does not define.
    NotFound,
    /// 4: unfinished: the run has not ended yet, the demo stopped with runs
    /// left to resume, or the demo or a worker quit at once on a stop
    /// request (steps in flight cut off, or the store not closed cleanly).
    Unfinished,
    /// 5: refused: the command would destroy data or disturb a live process
    /// (`--reset` of something that is not a demo store, a second writer),
    /// or misread a fleet as a single store or back.
    Refused,
    /// 130: quit at once by a second stop request (`serve`), cutting off
    /// what was in flight.
    Interrupted,
}

/// The exit codes, as `waymark --help` shows them.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  ok
  1  runtime error (the store failed or timed out, a worker stopped, a fleet worker
     dropped a shard)
  2  usage error (unknown option, invalid run id or input)
  3  not found (no Waymark store at the location, no such run or schedule)
  4  unfinished (the run has not ended yet; the demo stopped with runs left; the
     demo or a worker quit at once on a stop request)
  5  refused (would delete data the demo did not create, disturb another process
     writing the store, or take a fleet for a single store or back; a request the
     worker refused)
  130  serve quit at once on a second Ctrl-C or SIGTERM (requests in flight cut off)";

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> Self {
        ExitCode::from(match exit {
            Exit::Ok => 0,
            Exit::Failure => 1,
            Exit::Usage => 2,
            Exit::NotFound => 3,
            Exit::Unfinished => 4,
            Exit::Refused => 5,
            Exit::Interrupted => 130,
        })
    }
}

/// An error the CLI reports on one line before exiting with its code.
#[derive(Debug)]
pub struct CliError {
    /// The exit code it ends the process with.
    pub exit: Exit,
    /// What went wrong and what to do, already made printable.
    message: String,
}

impl CliError {
    /// A runtime failure (exit 1).
    pub fn failure(message: impl Into<String>) -> Self {
        Self::new(Exit::Failure, message)
    }

    /// A usage error (exit 2).
    pub fn usage(message: impl Into<String>) -> Self {
        Self::new(Exit::Usage, message)
    }

    /// Something that does not exist (exit 3).
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(Exit::NotFound, message)
    }

    /// A refusal to destroy or disturb (exit 5).
    pub fn refused(message: impl Into<String>) -> Self {
        Self::new(Exit::Refused, message)
    }

    /// An error with exit code `exit`.
    pub fn new(exit: Exit, message: impl Into<String>) -> Self {
        Self {
            exit,
            message: one_line(&message.into()),
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CliError {}

/// The result type of the CLI's fallible functions.
pub type CliResult<T> = Result<T, CliError>;

/// The longest user-given value (an id, a name) an error echoes, in
/// characters.
const SHOWN_MAX: usize = 64;
/// The longest path or URL an error echoes, in characters.
const PATH_MAX: usize = 400;

/// A user-given value (a run id, a name) made safe to echo: control
/// characters escaped, and cut to [`SHOWN_MAX`] characters with the total
/// length said.
pub fn shown(value: &str) -> String {
    cut(value, SHOWN_MAX)
}

/// A path or URL made safe to echo, like [`shown`] with a longer limit.
pub fn shown_path(value: &str) -> String {
    cut(value, PATH_MAX)
}

/// `value` with control characters escaped, cut to `max` characters.
fn cut(value: &str, max: usize) -> String {
    let mut out = String::new();
    for (count, c) in value.chars().enumerate() {
        if count == max {
            out.push_str(&format!("... ({} bytes in all)", value.len()));
            return out;
        }
        out.extend(escape_control(c));
    }
    out
}

/// `c`, or its escape if it is a control character.
fn escape_control(c: char) -> impl Iterator<Item = char> {
    let escaped: Vec<char> = if c.is_control() {
        c.escape_default().collect()
    } else {
        vec![c]
    };
    escaped.into_iter()
}

/// Text on one printable line: control characters (newlines too)
/// escaped.
pub fn one_line(message: &str) -> String {
    message.chars().flat_map(escape_control).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_escapes_and_truncates() {
        assert_eq!(shown("a\u{1b}[31mb\n"), "a\\u{1b}[31mb\\n");
        let long = "x".repeat(100_000);
        let s = shown(&long);
        assert!(s.len() < 120, "{s}");
        assert!(s.ends_with("(100000 bytes in all)"), "{s}");
    }

    #[test]
    fn errors_are_one_line() {
        let e = CliError::failure("first\nsecond\r");
        assert_eq!(e.to_string(), "first\\nsecond\\r");
    }
}
