//! The demo's terminal output: one progress bar per unfinished run when
//! stdout is a live terminal, else one plain line per confirmed fact,
//! printed at once (`waymark demo | cat`, `TERM=dumb`).
//!
//! It shows only what [`super::progress`] confirmed durable; the word shown
//! for a run's end comes from the stored outcome.

use std::collections::HashMap;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use waymark::TerminalStatus;

use super::domain::{STEPS, step_label, step_name};
use super::progress::Shown;
use crate::describe;
use crate::plumbing::output::{live_output, say, say_err};

/// How progress is shown.
pub enum Ui {
    /// One bar per unfinished run (stdout is a live terminal).
    Bars {
        /// The bars' container.
        multi: MultiProgress,
        /// The bar of each run.
        bars: HashMap<String, ProgressBar>,
    },
    /// One line per fact.
    Lines,
}

impl Ui {
    /// Bars for `runs` (id, step it is at, what it is doing) on a live
    /// terminal, else plain lines.
    pub fn new(runs: &[(String, u32, String)]) -> Self {
        if !live_output() {
            return Ui::Lines;
        }
        let style = ProgressStyle::with_template(
            "{spinner:.green} {prefix:.bold} [{bar:20.cyan/blue}] {wide_msg}",
        )
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stdout());
        let mut bars = HashMap::new();
        for (id, step, message) in runs {
            let bar = multi.add(ProgressBar::new(STEPS.len() as u64));
            bar.set_style(style.clone());
            bar.set_prefix(id.clone());
            bar.set_position(u64::from(*step));
            bar.set_message(message.clone());
            bar.enable_steady_tick(Duration::from_millis(120));
            bars.insert(id.clone(), bar);
        }
        Ui::Bars { multi, bars }
    }

    /// Print a line (above the bars, if any).
    pub fn log(&self, line: &str) {
        match self {
            Ui::Bars { multi, .. } => multi.suspend(|| say!("{line}")),
            Ui::Lines => say!("{line}"),
        }
    }

    /// Print a line on stderr (above the bars, if any).
    pub fn warn(&self, line: &str) {
        match self {
            Ui::Bars { multi, .. } => multi.suspend(|| say_err!("{line}")),
            Ui::Lines => say_err!("{line}"),
        }
    }

    /// Show one confirmed fact, `at` into the demo.
    pub fn show(&self, fact: &Shown, at: Duration) {
        let stamp = format!("[{:>5.1}s]", at.as_secs_f64());
        let line = match fact {
            Shown::Started { .. } => None,
            Shown::Done {
                run_id,
                step,
                took,
                delay,
            } => {
                let then = if delay.is_zero() {
                    String::new()
                } else {
                    format!(
                        "; step {} in {:.1}s (pick-up window)",
                        step_label(step.saturating_add(1)),
                        delay.as_secs_f64()
                    )
                };
                Some(format!(
                    "{stamp} {run_id}  step {} done in {} ms{then}",
                    step_label(*step),
                    took.as_millis()
                ))
            }
            Shown::Retrying {
                run_id,
                step,
                attempt,
                message,
            } => Some(format!(
                "{stamp} {run_id}  step {} failed on attempt {attempt}: {message}; retrying",
                step_label(*step)
            )),
            Shown::Ended { outcome, took } => {
                let work = match (outcome.status, took) {
                    (TerminalStatus::Succeeded, Some(took)) => format!(
                        "step {} done in {} ms; ",
                        step_label(outcome.final_step),
                        took.as_millis()
                    ),
                    _ => String::new(),
                };
                Some(format!(
                    "{stamp} {}  {work}{}",
                    outcome.run_id,
                    describe::outcome_line(outcome)
                ))
            }
        };
        match self {
            Ui::Lines => {
                if let Some(line) = line {
                    say!("{line}");
                }
            }
            Ui::Bars { bars, .. } => self.update_bar(bars, fact, line.as_deref()),
        }
    }

    /// Move a run's bar for `fact`; retries are also logged above the bars.
    fn update_bar(&self, bars: &HashMap<String, ProgressBar>, fact: &Shown, line: Option<&str>) {
        match fact {
            Shown::Started {
                run_id,
                step,
                attempt,
            } => {
                if let Some(bar) = bars.get(run_id) {
                    bar.set_position(u64::from(*step));
                    let retry = if *attempt > 1 {
                        format!(" (attempt {attempt})")
                    } else {
                        String::new()
                    };
                    bar.set_message(format!("{}...{retry}", step_label(*step)));
                }
            }
            Shown::Done {
                run_id,
                step,
                delay,
                ..
            } => {
                if let Some(bar) = bars.get(run_id) {
                    bar.set_position(u64::from(*step) + 1);
                    if delay.is_zero() {
                        bar.set_message(format!("{} done", step_label(*step)));
                    } else {
                        bar.set_message(format!(
                            "{} done; {} in {:.1}s (pick-up window)",
                            step_label(*step),
                            step_name(step.saturating_add(1)),
                            delay.as_secs_f64()
                        ));
                    }
                }
            }
            Shown::Retrying {
                run_id,
                step,
                message,
                ..
            } => {
                if let Some(line) = line {
                    self.log(line);
                }
                if let Some(bar) = bars.get(run_id) {
                    bar.set_message(format!("{}: {message}; retrying", step_label(*step)));
                }
            }
            Shown::Ended { outcome, .. } => {
                if let Some(bar) = bars.get(&outcome.run_id) {
                    if outcome.status == TerminalStatus::Succeeded {
                        bar.set_position(STEPS.len() as u64);
                        bar.finish_with_message(format!(
                            "Succeeded at step {}",
                            step_label(outcome.final_step)
                        ));
                    } else {
                        bar.set_position(u64::from(outcome.final_step));
                        bar.abandon_with_message(describe::outcome_line(outcome));
                    }
                }
            }
        }
    }

    /// Mark the bars of runs that did not finish as stopped.
    pub fn stop_remaining(&self) {
        if let Ui::Bars { bars, .. } = self {
            for bar in bars.values().filter(|b| !b.is_finished()) {
                bar.abandon_with_message(format!(
                    "stopped; resumes at step {} next time",
                    step_label(u32::try_from(bar.position()).unwrap_or(0))
                ));
            }
        }
    }
}
