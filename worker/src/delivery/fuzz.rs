//! The worker's job decoder under hostile input (see `support::hostile`):
//! whatever arrives on the jobs queue is either a job or dead-lettered
//! with a reason and a detail, never a panic that would requeue it for
//! ever.

use super::decode;
use crate::support::hostile::{self, answer};
use flotilla_common::{Device, DeviceKind, Job, JobPolicy, Target};
use proptest::prelude::*;
use serde_json::Value;

const REASONS: [&str; 3] = ["undecodable", "unsupported_version", "unknown_kind"];

const KEYS: &[&str] = &[
    "v",
    "campaign",
    "device",
    "target",
    "policy",
    "id",
    "kind",
    "address",
    "credentials",
    "version",
    "image_url",
    "sha256",
    "deadline",
    "step_timeout",
    "poll_interval",
    "retry",
    "max_attempts",
    "step",
    "attempt",
    "seq",
    "ending",
    "tls",
];
const WORDS: &[&str] = &[
    "dms",
    "npm",
    "toaster",
    "1h",
    "http://127.0.0.1:9000",
    "file:///fw.bin",
];

fn job(kind: DeviceKind, seq: u32) -> Job {
    let mut job = Job::new(
        "fw-7.2",
        Device {
            id: "dev-1".into(),
            kind,
            address: "http://127.0.0.1:9000/d/1".parse().expect("a URL"),
            credentials: "lab".into(),
            cpe_id: Some("CPE-1".into()),
            group: None,
            gateways: Vec::new(),
        },
        Target {
            version: "7.2.1".into(),
            image_url: "http://files.local/fw.bin".parse().expect("a URL"),
            sha256: "ab".repeat(32),
        },
        JobPolicy::default(),
    );
    job.seq = seq;
    job
}

fn assert_rejection_or_job(bytes: &[u8]) -> Result<(), TestCaseError> {
    match decode(bytes) {
        Ok(job) => {
            let again = serde_json::to_vec(&job).expect("JSON");
            prop_assert_eq!(decode(&again).expect("reads what it wrote"), job);
        }
        Err(rejection) => {
            prop_assert!(REASONS.contains(&rejection.reason), "{}", rejection.reason);
            prop_assert!(!rejection.detail.is_empty());
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(hostile::config())]

    #[test]
    fn any_bytes_are_a_job_or_a_named_rejection(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        assert_rejection_or_job(&bytes)?;
    }

    #[test]
    fn any_json_is_a_job_or_a_named_rejection(value in answer(KEYS, WORDS)) {
        assert_rejection_or_job(&serde_json::to_vec(&value).expect("JSON"))?;
    }

    #[test]
    fn a_job_with_one_field_swapped_is_a_job_or_a_named_rejection(
        kind in prop::sample::select(DeviceKind::ALL.to_vec()),
        seq in any::<u32>(),
        field in prop::sample::select(KEYS),
        replacement in answer(KEYS, WORDS),
        nested in any::<bool>(),
    ) {
        let original = job(kind, seq);
        let bytes = serde_json::to_vec(&original).expect("JSON");
        prop_assert_eq!(decode(&bytes).expect("a valid job"), original.clone());
        let mut value = serde_json::to_value(&original).expect("JSON");
        let object = if nested { &mut value["device"] } else { &mut value };
        if let Value::Object(map) = object {
            map.insert(field.to_owned(), replacement);
        }
        assert_rejection_or_job(&serde_json::to_vec(&value).expect("JSON"))?;
    }
}
