//! NetProfiler answers under hostile input (see `support::hostile`).

use super::{answers::parse_answers, status::parse_status};
use crate::support::hostile::{self, answer, body, reply, status};
use proptest::prelude::*;

const KEYS: &[&str] = &[
    "State",
    "Current Version",
    "Update To Version",
    "State Description",
    "Internal State Description",
    "10.1.0.1",
    "1.2.3.4",
];
const WORDS: &[&str] = &[
    "neutral",
    "initializing",
    "initialized",
    "running",
    "failed_graceful",
    "FAILED_CRITICAL",
    "10.1.0.1 - Operation Failed",
    "10.2.0.1 - Operation Successfull",
    " - ",
    "10.23",
];

proptest! {
    #![proptest_config(hostile::config())]

    #[test]
    fn init_and_start_answers_are_read_or_refused_naming_the_call(
        status in status(),
        body in body(KEYS, WORDS),
    ) {
        let reply = reply("POST /api/gateways/update/init", status, body);
        if let Err(error) = parse_answers(&reply) {
            prop_assert!(error.message().contains(&reply.what), "{error}");
        }
    }

    #[test]
    fn gateway_lines_round_trip(
        lines in prop::collection::vec(("[0-9]{1,3}(\\.[0-9]{1,3}){3}", any::<bool>()), 0..6),
    ) {
        let text: Vec<String> = lines
            .iter()
            .map(|(ip, ok)| format!("{ip} - Operation {}", if *ok { "Successfull" } else { "Failed" }))
            .collect();
        let body = serde_json::to_vec(&text).expect("JSON");
        let answers = parse_answers(&reply("POST update/start", reqwest::StatusCode::OK, body))
            .expect("well-formed lines");
        let read: Vec<(String, bool)> = answers.into_iter().map(|a| (a.ip, a.succeeded)).collect();
        prop_assert_eq!(read, lines);
    }

    #[test]
    fn update_statuses_are_read_or_refused_naming_the_gateway(value in answer(KEYS, WORDS)) {
        match parse_status(&value) {
            Ok(gateways) => {
                super::status::states(&gateways);
                for gateway in gateways.values() {
                    gateway.is_updated("10.23");
                }
            }
            Err(error) => prop_assert!(!error.is_empty()),
        }
    }
}
