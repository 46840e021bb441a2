//! What an NPM appliance's update showed before the job acted, and the
//! judgements later steps make against it: the update's state changed
//! (`last_state_time` is another), and what the job installed (the
//! entries of `update_history` the baseline does not hold). Times are only
//! ever compared for equality, so an appliance whose clock steps mid-job
//! changes nothing.

use super::answers::{HistoryEntry, Update, newest};
use crate::support::clock;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct NpmBaseline {
    /// The update's last state change before the job; `None` when the
    /// appliance reported none, or when the state had already changed
    /// with this job (a late copy of its first step), so that any state
    /// time seen later counts as changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_state_time: Option<i64>,
    /// `update_history` before the job.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    history: Vec<HistoryEntry>,
}

impl NpmBaseline {
    /// The baseline of `update`, as read before the job acted. With
    /// `published` (the job's publication on the appliance's clock, `None`
    /// without a `Date` header), a state change or a history entry
    /// stamped at or after it is this job's own, found by a late copy of
    /// the first step, and left out.
    pub(super) fn of(update: &Update, published: Option<i64>) -> Self {
        NpmBaseline {
            last_state_time: update
                .last_state_time
                .filter(|t| clock::before_job(Some(*t), published)),
            history: update
                .entries
                .iter()
                .filter(|e| clock::before_job(e.time, published))
                .cloned()
                .collect(),
        }
    }

    /// Whether the update changed state since the baseline.
    pub(super) fn state_changed(&self, update: &Update) -> bool {
        update.last_state_time != self.last_state_time
    }

    /// The version the appliance runs now: the newest of the history
    /// entries added since the baseline, or, with none added, the newest
    /// of all (nothing was installed since).
    pub(super) fn installed(&self, update: &Update) -> Option<String> {
        let added: Vec<&HistoryEntry> = update
            .entries
            .iter()
            .filter(|e| !self.history.contains(e))
            .collect();
        if added.is_empty() {
            update.installed.clone()
        } else {
            newest(added)
        }
    }

    /// The baseline in a few words, for the step's event.
    pub(super) fn describe(&self, update: &Update, published: Option<i64>) -> String {
        let mut note = format!(
            "baseline: update {} since {}, {} history entr{}",
            update.state.name(),
            self.last_state_time
                .map_or_else(|| "an unstated time".to_owned(), |t| t.to_string()),
            self.history.len(),
            if self.history.len() == 1 { "y" } else { "ies" }
        );
        if published.is_none() {
            note.push_str(" (the appliance sends no Date header: all counted as earlier)");
        } else if self.last_state_time != update.last_state_time
            || self.history.len() != update.entries.len()
        {
            note.push_str("; the update already changed with this job");
        }
        note
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drivers::npm::answers::read_update;
    use serde_json::json;

    fn update(last_state_time: i64, history: serde_json::Value) -> Update {
        read_update(&json!({
            "state": "IDLE", "state_description": "",
            "last_state_time": last_state_time, "update_history": history,
        }))
        .unwrap()
    }

    #[test]
    fn a_state_time_that_changed_is_a_change_whatever_the_clock_did() {
        let before = update(1_000, json!([{"time": 10, "version": "7.1.0"}]));
        let baseline = NpmBaseline::of(&before, Some(2_000));
        assert!(!baseline.state_changed(&before));
        // Reset seconds before the job: still the baseline's state.
        let reset = update(1_995, json!([]));
        assert!(!NpmBaseline::of(&reset, Some(2_000)).state_changed(&reset));
        // The clock stepped back minutes, then the state changed.
        assert!(baseline.state_changed(&update(700, json!([{"time": 10, "version": "7.1.0"}]))));
    }

    #[test]
    fn what_was_installed_is_read_from_the_entries_the_history_gained() {
        let before = update(1_000, json!([{"time": 500, "version": "7.1.0"}]));
        let baseline = NpmBaseline::of(&before, Some(2_000));
        assert_eq!(baseline.installed(&before).as_deref(), Some("7.1.0"));
        // The appliance's clock stepped back: the new entry is stamped
        // before the old one, and is still what runs now.
        let after = update(
            400,
            json!([{"time": 500, "version": "7.1.0"}, {"time": 300, "version": "7.2.1"}]),
        );
        assert_eq!(baseline.installed(&after).as_deref(), Some("7.2.1"));
    }

    #[test]
    fn a_late_first_step_leaves_this_jobs_own_changes_out_of_the_baseline() {
        let after = update(
            2_100,
            json!([{"time": 500, "version": "7.1.0"}, {"time": 2_050, "version": "7.2.1"}]),
        );
        let baseline = NpmBaseline::of(&after, Some(2_000));
        assert!(baseline.state_changed(&after));
        assert_eq!(baseline.installed(&after).as_deref(), Some("7.2.1"));
        assert!(baseline.describe(&after, Some(2_000)).contains("already changed"));
        // Without a Date header everything counts as earlier.
        let undated = NpmBaseline::of(&after, None);
        assert!(!undated.state_changed(&after));
        assert!(undated.describe(&after, None).contains("no Date header"));
    }
}
