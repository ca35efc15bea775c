//! What the CLI prints: plain or live output, step labels, commands to
//! suggest.
//!
//! Step numbers in human output are **1-based** everywhere (`step 3/5 charge
//! card`); the library's `step_number` is 0-based and is converted here only.
//! Suggested commands name the binary as the user invoked it and quote every
//! argument that needs it, so they can be pasted into a shell.

use std::io::IsTerminal;

/// `println!` that ignores a closed stdout (`waymark demo | head`) instead of
/// panicking.
macro_rules! say {
    () => {
        say!("")
    };
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// `eprintln!` that ignores a closed stderr instead of panicking.
macro_rules! say_err {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

pub(crate) use {say, say_err};

/// Whether stdout gets live output (progress bars, redrawn lines): only on a
/// terminal whose `TERM` is set and not `dumb`. Otherwise every line is
/// printed once, at once.
pub fn live_output() -> bool {
    std::io::stdout().is_terminal()
        && std::env::var("TERM").is_ok_and(|term| !term.is_empty() && term != "dumb")
}

/// `3/5 charge card` for the 0-based step number 2 of a pipeline of `names`.
pub fn step_label(step: u32, names: &[&str]) -> String {
    let shown = step.saturating_add(1);
    match usize::try_from(step).ok().and_then(|i| names.get(i)) {
        Some(name) => format!("{shown}/{} {name}", names.len()),
        None => format!("{shown}"),
    }
}

/// `arg` quoted for a POSIX shell when it needs quoting.
pub fn shell_quote(arg: &str) -> String {
    match shlex::try_quote(arg) {
        Ok(quoted) => quoted.into_owned(),
        // A NUL byte cannot be passed on a command line at all.
        Err(_) => format!("'{}'", arg.replace('\0', "")),
    }
}

/// The binary as the user invoked it (`waymark`, `./target/release/waymark`).
pub fn invoked_as() -> String {
    std::env::args_os()
        .next()
        .map(|arg0| arg0.to_string_lossy().into_owned())
        .filter(|arg0| !arg0.is_empty())
        .unwrap_or_else(|| "waymark".to_string())
}

/// A command line to suggest: the binary as invoked, then `args`, each
/// quoted as needed.
pub fn suggest(args: &[&str]) -> String {
    std::iter::once(invoked_as())
        .chain(args.iter().map(|a| (*a).to_string()))
        .map(|a| shell_quote(&a))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_labels_are_one_based() {
        let names = ["a", "b"];
        assert_eq!(step_label(0, &names), "1/2 a");
        assert_eq!(step_label(1, &names), "2/2 b");
        assert_eq!(step_label(7, &names), "8");
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("plain"), "plain");
        assert_eq!(shell_quote("my store"), "'my store'");
        assert_eq!(shell_quote("it's"), "\"it's\"");
    }
}
