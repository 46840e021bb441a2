//! SPS answers under hostile input (see `support::hostile`).

use super::answers::{read_error, read_fetch, read_fetches, read_key, read_slots, test_summary};
use crate::support::hostile::{self, answer, body};
use proptest::prelude::*;
use serde_json::json;

const KEYS: &[&str] = &[
    "body",
    "key",
    "id",
    "meta",
    "items",
    "status",
    "url",
    "checksum",
    "sha256",
    "slot_id",
    "error",
    "info",
    "bytes_downloaded",
    "bytes_total",
    "start_time",
    "version",
    "current",
    "after_reboot",
    "test_summary",
    "type",
    "message",
    "details",
    "missing_paths",
];
const WORDS: &[&str] = &[
    "queued",
    "in-progress",
    "in_progress",
    "finished",
    "failed",
    "canceled",
    "cancelled",
    "6.6.0",
    "2022-03-30T12:00:01+00:00",
    "ResourceNotFound",
    "...",
    "1",
];

proptest! {
    #![proptest_config(hostile::config())]

    #[test]
    fn resources_are_read_or_refused_with_a_reason(value in answer(KEYS, WORDS)) {
        for result in [
            read_fetch(&value).map(|f| f.describe()),
            read_fetches(&value).map(|f| f.len().to_string()),
            read_slots(&value).map(|s| s.iter().map(|s| s.version_text().to_owned()).collect()),
            read_key(&value),
        ] {
            if let Err(error) = result {
                prop_assert!(!error.is_empty());
            }
        }
        test_summary(&value);
    }

    #[test]
    fn error_bodies_never_panic(body in body(KEYS, WORDS)) {
        if let Some(error) = read_error(&body) {
            error.missing_paths();
            error.detail("path");
        }
    }

    #[test]
    fn fetches_round_trip(
        key in "[0-9a-f-]{1,12}",
        status in prop::sample::select(vec!["queued", "in-progress", "finished", "failed", "canceled"]),
        done in any::<u64>(),
        total in any::<u64>(),
        wrapped in any::<bool>(),
    ) {
        let body = json!({"status": status, "bytes_downloaded": done, "bytes_total": total.to_string()});
        let value = if wrapped {
            json!({"body": body, "key": key})
        } else {
            let mut bare = body;
            bare["key"] = json!(key);
            bare
        };
        let fetch = read_fetch(&value).expect("a well-formed fetch");
        prop_assert_eq!(&fetch.key, &key);
        prop_assert_eq!(fetch.status.name().replace('_', "-"), status.replace('_', "-"));
        prop_assert_eq!((fetch.bytes_downloaded, fetch.bytes_total), (Some(done), Some(total)));
        fetch.describe();
    }
}
