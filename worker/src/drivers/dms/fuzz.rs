//! DMS answers under hostile input (see `support::hostile`).

use super::{
    CnrReply, DmsBaseline, ResultKey, ResultReply, UpgradeResult, check_storage_reply, storage_code,
};
use crate::support::hostile::{self, answer, body, reply, status};
use proptest::prelude::*;

const KEYS: &[&str] = &[
    "code", "message", "details", "result", "id", "cpeid", "campaignid", "ts",
];
const WORDS: &[&str] = &["UPGRADE_X", "00D09E-CPE-17", "ok", "9010"];

proptest! {
    #![proptest_config(hostile::config())]

    #[test]
    fn storage_answers_are_accepted_or_refused_naming_the_call(
        status in status(),
        body in body(KEYS, WORDS),
        also in prop::collection::vec(100u16..600, 0..2),
    ) {
        let reply = reply("PUT /v1/dyn/FirmwareStorage/.*", status, body);
        storage_code(&reply);
        let what = reply.what.clone();
        if let Err(error) = check_storage_reply(reply, &also) {
            prop_assert!(error.message().contains(&what), "{error}");
        }
    }

    #[test]
    fn result_answers_never_panic(
        status in status(),
        body in body(KEYS, WORDS),
        ts in any::<i64>(),
        held in any::<usize>(),
    ) {
        let reply = reply("GET /v1/dyn/FirmwareResultStorage/.*", status, body);
        if let Err(error) = reply.json::<CnrReply>() {
            prop_assert!(error.message().contains(&reply.what), "{error}");
        }
        match reply.json::<ResultReply>() {
            Ok(answer) => {
                if let Ok(results) = serde_json::from_value::<Vec<UpgradeResult>>(answer.details) {
                    // The job's result is the newest record the baseline
                    // does not hold.
                    let held = held % (results.len() + 1);
                    let baseline = DmsBaseline {
                        results: results[..held].iter().map(ResultKey::of).collect(),
                    };
                    for result in &results {
                        result.summary();
                    }
                    baseline.describe(Some(ts), results.len());
                    let newest = results
                        .iter()
                        .filter(|r| !baseline.holds(r))
                        .map(|r| r.ts)
                        .max();
                    let found = baseline.job_result(results.clone());
                    prop_assert_eq!(found.as_ref().map(|r| r.ts), newest);
                    prop_assert!(found.is_none_or(|r| !baseline.holds(&r)));
                }
            }
            Err(error) => prop_assert!(error.message().contains(&reply.what), "{error}"),
        }
    }

    #[test]
    fn results_of_any_shape_decode_or_fail(value in answer(KEYS, WORDS)) {
        if let Ok(results) = serde_json::from_value::<Vec<UpgradeResult>>(value) {
            for result in &results {
                result.summary();
            }
        }
    }
}
