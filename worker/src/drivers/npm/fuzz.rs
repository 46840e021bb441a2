//! NPM answers under hostile input (see `support::hostile`).

use super::answers::{read_image, read_update};
use crate::support::hostile::{self, answer};
use proptest::prelude::*;
use serde_json::json;

const KEYS: &[&str] = &[
    "state",
    "state_description",
    "last_state_time",
    "target_version",
    "update_history",
    "time",
    "version",
    "id",
    "checksum",
    "progress",
];
const WORDS: &[&str] = &[
    "IDLE",
    "INITIALIZING",
    "INITIALIZED",
    "RUNNING",
    "FAILED_GRACEFUL",
    "FAILED_CRITICAL",
    "UPLOADING",
    "VALIDATING",
    "UPLOAD_ERROR",
    "VALID",
    "INVALID",
    "11.5.0",
    "1700000000",
];

proptest! {
    #![proptest_config(hostile::config())]

    #[test]
    fn update_resources_are_read_or_refused_with_a_reason(value in answer(KEYS, WORDS)) {
        match read_update(&value) {
            Ok(update) => {
                prop_assert!(!update.state.name().is_empty());
            }
            Err(error) => prop_assert!(!error.is_empty()),
        }
    }

    #[test]
    fn image_resources_are_read_or_refused_with_a_reason(value in answer(KEYS, WORDS)) {
        match read_image(&value) {
            Ok(image) => {
                image.describe();
            }
            Err(error) => prop_assert!(!error.is_empty()),
        }
    }

    #[test]
    fn the_newest_dated_history_entry_is_installed(
        entries in prop::collection::vec((proptest::option::of(0i64..4_000_000_000), "[0-9]{1,2}\\.[0-9]{1,2}\\.[0-9]"), 1..6),
    ) {
        let history: Vec<_> = entries
            .iter()
            .map(|(time, version)| match time {
                Some(t) => json!({"time": t, "version": version}),
                None => json!({"version": version}),
            })
            .collect();
        let update = read_update(&json!({"state": "IDLE", "update_history": history}))
            .expect("a well-formed update");
        // By time; among equal or missing times, the last.
        let newest = entries
            .iter()
            .enumerate()
            .max_by_key(|(i, (t, _))| (t.unwrap_or(i64::MIN), *i))
            .map(|(_, (_, v))| v.clone());
        prop_assert_eq!(update.installed.clone(), newest);
        prop_assert_eq!(update.entries.len(), entries.len());
    }
}
