//! What `run` and `status --watch` print while a campaign moves.
//!
//! On a terminal: a progress bar, with each decision printed above it.
//! Anywhere else (CI, `tee`, systemd, a file), an indicatif bar prints
//! nothing at all, decisions included, so the campaign is told in plain
//! lines on standard output: each decision as it is made, and a progress
//! line when the phase or the wave changes, when the counts have changed
//! and `every` has passed since the last one, and at the end.

use crate::{
    report,
    state::{CampaignState, Phase, Tally},
    status_view::Pace,
};
use chrono::Utc;
use indicatif::{ProgressBar, ProgressStyle};
use std::{
    io::{IsTerminal, Write},
    time::{Duration, Instant},
};

/// How often the bar's rate and ETA are worked out again: each takes a
/// pass over every device.
const BAR_PACE_EVERY: Duration = Duration::from_secs(2);

pub struct Progress {
    /// Decisions already printed.
    shown: usize,
    view: View,
}

enum View {
    Bar {
        bar: ProgressBar,
        paced_at: Option<Instant>,
        pace: String,
    },
    Lines {
        out: Box<dyn Write>,
        every: Duration,
        printed_at: Option<Instant>,
        /// What the last progress line said, to print only news.
        printed: Option<Snapshot>,
    },
}

/// What a progress line reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Snapshot {
    phase: Phase,
    wave: Option<u32>,
    totals: Tally,
}

impl Snapshot {
    fn of(state: &CampaignState) -> Snapshot {
        Snapshot {
            phase: state.phase(),
            wave: state.current_wave(),
            totals: state.totals(),
        }
    }
}

impl Progress {
    /// A bar when standard output and standard error are both terminals,
    /// lines on standard output otherwise (a bar on a terminal's standard
    /// error would keep decisions out of a `tee` of standard output).
    pub fn for_output(devices: u64, every: Duration) -> Progress {
        if std::io::stdout().is_terminal() && std::io::stderr().is_terminal() {
            Progress::bar(devices)
        } else {
            Progress::lines(std::io::stdout(), every)
        }
    }

    pub fn bar(devices: u64) -> Progress {
        let bar = ProgressBar::new(devices).with_style(
            ProgressStyle::with_template("{msg:40} [{bar:40}] {pos}/{len} finished ({elapsed})")
                .expect("the progress template is valid")
                .progress_chars("=> "),
        );
        Progress {
            shown: 0,
            view: View::Bar {
                bar,
                paced_at: None,
                pace: String::new(),
            },
        }
    }

    pub fn lines(out: impl Write + 'static, every: Duration) -> Progress {
        Progress {
            shown: 0,
            view: View::Lines {
                out: Box::new(out),
                every,
                printed_at: None,
                printed: None,
            },
        }
    }

    /// Counts the state's decisions so far as printed (a status printed
    /// just before showed them), and its counts as reported.
    pub fn shown_up_to(&mut self, state: &CampaignState) {
        self.shown = state.decisions().len();
        if let View::Lines {
            printed,
            printed_at,
            ..
        } = &mut self.view
        {
            *printed = Some(Snapshot::of(state));
            *printed_at = Some(Instant::now());
        }
    }

    /// Shows what changed since the last call.
    pub fn update(&mut self, state: &CampaignState) {
        let new = &state.decisions()[self.shown.min(state.decisions().len())..];
        self.shown = state.decisions().len();
        match &mut self.view {
            View::Bar {
                bar,
                paced_at,
                pace,
            } => {
                for decision in new {
                    bar.println(format!(
                        "[{}] {}",
                        report::decision_name(&decision.decision),
                        decision.reason
                    ));
                }
                if paced_at.is_none_or(|at| at.elapsed() >= BAR_PACE_EVERY) {
                    *paced_at = Some(Instant::now());
                    *pace = bar_pace(state);
                }
                bar.set_position(state.totals().finished);
                let totals = state.totals();
                bar.set_message(format!(
                    "{} ok {} failed {}{pace}",
                    phase_label(state),
                    totals.succeeded,
                    totals.failed
                ));
            }
            View::Lines {
                out,
                every,
                printed_at,
                printed,
            } => {
                let now = Utc::now().format("%Y-%m-%dT%H:%M:%SZ");
                for decision in new {
                    let _ = writeln!(
                        out,
                        "{now} [{}] {}",
                        report::decision_name(&decision.decision),
                        decision.reason
                    );
                }
                let snapshot = Snapshot::of(state);
                let due = match printed {
                    None => true,
                    Some(last) if last.phase != snapshot.phase || last.wave != snapshot.wave => {
                        true
                    }
                    Some(last) => {
                        last.totals != snapshot.totals
                            && printed_at.is_none_or(|at| at.elapsed() >= *every)
                    }
                };
                if due && state.phase() != Phase::New {
                    let _ = writeln!(out, "{now} {}", progress_line(state));
                    *printed = Some(snapshot);
                    *printed_at = Some(Instant::now());
                }
                let _ = out.flush();
            }
        }
    }

    /// The campaign has ended, or will no longer be followed: a last
    /// progress line if it has news, and the bar cleared.
    pub fn finish(&mut self, state: &CampaignState) {
        if let View::Lines { every, .. } = &mut self.view {
            *every = Duration::ZERO;
        }
        self.update(state);
        if let View::Bar { bar, .. } = &self.view {
            bar.finish_and_clear();
        }
    }
}

fn phase_label(state: &CampaignState) -> String {
    match state.phase() {
        Phase::Paused(_) => "PAUSED".to_owned(),
        Phase::Cancelled => "cancelling".to_owned(),
        Phase::Completed => "completed".to_owned(),
        _ => match state.current_wave() {
            Some(wave) => format!("wave {}/{}", wave + 1, state.wave_count()),
            None => "starting".to_owned(),
        },
    }
}

/// "wave 1/3: 120/2000 finished, 118 succeeded, 2 failed, 0 cancelled;
/// rate: 45.0 devices/min over the last 5m, ETA ..."
fn progress_line(state: &CampaignState) -> String {
    let totals = state.totals();
    let now = Utc::now();
    format!(
        "{}: {}/{} finished, {} succeeded, {} failed, {} cancelled; {}",
        phase_label(state),
        totals.finished,
        state.device_count(),
        totals.succeeded,
        totals.failed,
        totals.cancelled,
        Pace::of(state, now).describe(state, now)
    )
}

/// The bar's short rate and ETA.
fn bar_pace(state: &CampaignState) -> String {
    let pace = Pace::of(state, Utc::now());
    match (pace.per_minute, pace.eta) {
        (Some(rate), Some(eta)) => format!(" {rate:.0}/min ETA {}", eta.format("%H:%M")),
        (Some(rate), None) => format!(" {rate:.0}/min"),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_common::{
        Decision, DecisionCounts, DecisionEvent, DeviceKind, Ending, Event, EventBody,
        FinishedEvent, PauseCause, PublishedEvent, Thresholds,
    };
    use std::{cell::RefCell, rc::Rc};

    #[derive(Clone, Default)]
    struct Buffer(Rc<RefCell<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            self.0.borrow_mut().extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Buffer {
        /// The lines written since the last call, without their times.
        fn take(&self) -> Vec<String> {
            let text = String::from_utf8(std::mem::take(&mut *self.0.borrow_mut())).unwrap();
            text.lines()
                .map(|l| l.split_once(' ').expect("a time first").1.to_owned())
                .collect()
        }
    }

    fn decide(state: &mut CampaignState, decision: Decision, reason: &str) {
        let seq = state.next_decision_seq();
        state.apply(&Event::new(
            "c",
            EventBody::Decision(DecisionEvent {
                seq,
                decision,
                reason: reason.into(),
                counts: DecisionCounts::default(),
                thresholds: Thresholds::default(),
                control_offset: None,
            }),
        ));
    }

    fn finish(state: &mut CampaignState, device: &str) {
        state.apply(&Event::new(
            "c",
            EventBody::Finished(FinishedEvent {
                device: device.into(),
                kind: DeviceKind::Dms,
                seq: 2,
                last_step: "poll_result".into(),
                ending: Ending::succeeded(),
                started_at: None,
            }),
        ));
    }

    #[test]
    fn lines_tell_each_decision_once_and_progress_when_it_is_news() {
        let out = Buffer::default();
        let mut progress = Progress::lines(out.clone(), Duration::from_secs(3600));
        let mut state = CampaignState::new("c");
        decide(
            &mut state,
            Decision::Started {
                devices: 3,
                waves: vec![3],
                fingerprint: String::new(),
                target_version: "1".into(),
            },
            "3 devices in 1 wave(s): [3]",
        );
        decide(&mut state, Decision::WaveStarted { wave: 0 }, "canary");
        for device in ["a", "b", "c"] {
            state.apply(&Event::new(
                "c",
                EventBody::Published(PublishedEvent {
                    device: device.into(),
                    kind: DeviceKind::Dms,
                    wave: Some(0),
                }),
            ));
        }
        progress.update(&state);
        let lines = out.take();
        assert_eq!(
            lines[..2],
            [
                "[started] 3 devices in 1 wave(s): [3]",
                "[wave 1 start] canary"
            ]
        );
        assert_eq!(
            lines[2],
            "wave 1/1: 0/3 finished, 0 succeeded, 0 failed, 0 cancelled; rate: not known yet"
        );
        assert_eq!(lines.len(), 3);

        // New counts within `every`: nothing; a pause: at once.
        finish(&mut state, "a");
        progress.update(&state);
        assert_eq!(out.take(), Vec::<String>::new());
        decide(
            &mut state,
            Decision::Paused {
                cause: PauseCause::Operator,
            },
            "paused by ops",
        );
        progress.update(&state);
        let lines = out.take();
        assert_eq!(lines[0], "[paused] paused by ops");
        assert!(
            lines[1].starts_with("PAUSED: 1/3 finished, 1 succeeded"),
            "{lines:?}"
        );
        assert!(lines[1].ends_with("no ETA while paused"), "{lines:?}");

        // The end always says where it ended.
        finish(&mut state, "b");
        progress.finish(&state);
        let lines = out.take();
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].starts_with("PAUSED: 2/3 finished"), "{lines:?}");
        progress.finish(&state);
        assert_eq!(out.take(), Vec::<String>::new(), "nothing new");
    }
}
