//! Hostile input for the drivers' property tests (stand-ins for fuzz
//! targets): JSON shaped like an appliance's answer — its own key names,
//! spelt as appliances drift, holding values of any type — and raw bytes.
//! Each driver's `fuzz` module feeds these to its answer parsing, which
//! must never panic and must say what it could not read.

use crate::device_http::Reply;
use proptest::prelude::*;
use reqwest::{StatusCode, header::HeaderMap};
use serde_json::{Map, Value};

/// Cases per property unless `PROPTEST_CASES` says otherwise (README,
/// Fuzzing): few, so the unit tests stay quick.
pub(crate) fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(64);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A key: one of `keys` as given or respelt (case, `_`, spaces), or any
/// text.
fn key(keys: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (proptest::sample::select(keys), 0u8..4).prop_map(|(key, spelling)| match spelling {
            0 => key.to_owned(),
            1 => key.to_ascii_uppercase(),
            2 => key.replace('_', " "),
            _ => key.replace(' ', "_").to_ascii_lowercase(),
        }),
        1 => "[a-zA-Z _-]{0,12}",
    ]
}

/// A leaf value appliances send, or something no appliance should.
fn leaf(words: &'static [&'static str]) -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        proptest::sample::select(words).prop_map(|w| Value::String(w.to_owned())),
        "[0-9. -]{0,12}".prop_map(Value::String),
        any::<String>().prop_map(Value::String),
    ]
}

/// JSON made of `keys` and `words` (states, versions, statuses), nested.
pub(crate) fn answer(
    keys: &'static [&'static str],
    words: &'static [&'static str],
) -> impl Strategy<Value = Value> {
    leaf(words).prop_recursive(4, 48, 8, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec((key(keys), inner), 0..8)
                .prop_map(|pairs| Value::Object(pairs.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// An answer's body: JSON as above, or bytes that are not JSON at all.
pub(crate) fn body(
    keys: &'static [&'static str],
    words: &'static [&'static str],
) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => answer(keys, words).prop_map(|v| serde_json::to_vec(&v).expect("JSON")),
        1 => prop::collection::vec(any::<u8>(), 0..256),
    ]
}

/// A status a device may answer with (5xx never reach a parser).
pub(crate) fn status() -> impl Strategy<Value = StatusCode> {
    prop_oneof![
        3 => Just(StatusCode::OK),
        1 => (100u16..500).prop_map(|s| StatusCode::from_u16(s).expect("a valid status")),
    ]
}

/// What the HTTP client hands a driver.
pub(crate) fn reply(what: &str, status: StatusCode, body: Vec<u8>) -> Reply {
    Reply {
        what: what.to_owned(),
        status,
        headers: HeaderMap::new(),
        body,
        received_at: chrono::Utc::now(),
    }
}
