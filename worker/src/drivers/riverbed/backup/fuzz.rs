//! Riverbed backup runs and error bodies under hostile input (see
//! `support::hostile`).

use super::parse_run;
use crate::support::hostile::{self, answer, body, reply, status};
use proptest::prelude::*;

const KEYS: &[&str] = &[
    "status",
    "message",
    "timeStamp",
    "host",
    "subdir",
    "path",
    "running",
    "error_id",
    "error_text",
];
const WORDS: &[&str] = &[
    "NONE",
    "EXECUTING",
    "ERROR",
    "COMPLETED",
    "1659006593",
    "BAD_REQUEST",
];

proptest! {
    #![proptest_config(hostile::config())]

    #[test]
    fn runs_are_read_or_refused_with_a_reason(value in answer(KEYS, WORDS)) {
        let Some(run) = value.as_object() else {
            return Ok(());
        };
        match parse_run(run) {
            Ok(run) => {
                run.summary();
                let observed = super::Observed { run: Some(run), published: None };
                let baseline = observed.baseline();
                baseline.describe();
                // A run is never new against a baseline taken of itself.
                prop_assert!(!observed.is_ours(&baseline));
                super::Progress::of(observed.run.as_ref(), &baseline);
            }
            Err(error) => prop_assert!(error.contains("status"), "{error}"),
        }
    }

    #[test]
    fn refusals_name_the_call(status in status(), body in body(KEYS, WORDS)) {
        let reply = reply("POST /api/mgmt.gateway_backup/1.0/backup", status, body);
        let what = reply.what.clone();
        if let Err(error) = super::super::success(reply) {
            prop_assert!(error.message().contains(&what), "{error}");
        }
    }
}
