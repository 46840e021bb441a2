//! Reading JSON the way real appliances write it, not the way their tables
//! say: keys whose case and spacing drift between fields of one answer
//! (`"Internal State description"` beside `"State Description"`), epoch
//! times documented as strings but sent as integers (`"timeStamp":
//! 1659006593`), numbers and flags sent as strings, and lists sent bare or
//! wrapped in `{"items": [...]}`.
//!
//! Keys are matched after dropping case, spaces, `_` and `-`, so
//! `"Current Version"`, `"current_version"` and `"currentVersion"` are one.

use serde_json::{Map, Value};

/// The value of `name` in `object`, matching keys loosely.
pub(crate) fn field<'v>(object: &'v Map<String, Value>, name: &str) -> Option<&'v Value> {
    if let Some(value) = object.get(name) {
        return Some(value);
    }
    let wanted = squash(name);
    object
        .iter()
        .find(|(key, _)| squash(key) == wanted)
        .map(|(_, value)| value)
}

/// A field as text: strings as they are, numbers and booleans written out;
/// `None` when absent, `null` or a structure.
pub(crate) fn text(object: &Map<String, Value>, name: &str) -> Option<String> {
    match field(object, name)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A field holding epoch seconds, as an integer, a float or a numeric
/// string; `None` when absent or not a time.
pub(crate) fn epoch_seconds(object: &Map<String, Value>, name: &str) -> Option<i64> {
    match field(object, name)? {
        Value::Number(n) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)),
        Value::String(s) => {
            let s = s.trim();
            s.parse::<i64>()
                .ok()
                .or_else(|| s.parse::<f64>().ok().map(|f| f as i64))
        }
        _ => None,
    }
}

/// A count as a number or a numeric string.
pub(crate) fn count(object: &Map<String, Value>, name: &str) -> Option<u64> {
    match field(object, name)? {
        Value::Number(n) => n.as_u64().or_else(|| n.as_f64().map(|f| f as u64)),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A flag: `true`, `"true"` or `1`; anything else is `false`.
pub(crate) fn flag(object: &Map<String, Value>, name: &str) -> bool {
    match field(object, name) {
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_i64() == Some(1),
        Some(Value::String(s)) => matches!(s.trim().to_ascii_lowercase().as_str(), "true" | "1"),
        _ => false,
    }
}

/// An ISO 8601 time (or epoch seconds) as epoch seconds.
pub(crate) fn time(object: &Map<String, Value>, name: &str) -> Option<i64> {
    if let Some(Value::String(text)) = field(object, name)
        && let Ok(time) = chrono::DateTime::parse_from_rfc3339(text.trim())
    {
        return Some(time.timestamp());
    }
    epoch_seconds(object, name)
}

/// A list: `{"items": [...]}` (`items` missing or `null`: none), or bare.
pub(crate) fn items(value: &Value) -> Result<&[Value], String> {
    match value {
        Value::Array(items) => Ok(items),
        Value::Object(object) => match field(object, "items") {
            Some(Value::Array(items)) => Ok(items),
            None | Some(Value::Null) => Ok(&[]),
            Some(_) => Err("items is not a list".to_owned()),
        },
        _ => Err("not a list of items".to_owned()),
    }
}

fn squash(key: &str) -> String {
    key.chars()
        .filter(|c| !matches!(c, ' ' | '_' | '-'))
        .flat_map(char::to_lowercase)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_match_whatever_their_case_and_spacing() {
        let value = json!({
            "State": "failed_graceful",
            "Internal State description": "disk full",
            "State Description": "Update failed",
            "Current Version": "10.22",
            "timeStamp": 1659006593,
            "started": "1659006594",
        });
        let object = value.as_object().unwrap();
        assert_eq!(text(object, "state").as_deref(), Some("failed_graceful"));
        assert_eq!(
            text(object, "Internal State Description").as_deref(),
            Some("disk full")
        );
        assert_eq!(
            text(object, "state_description").as_deref(),
            Some("Update failed")
        );
        assert_eq!(text(object, "current_version").as_deref(), Some("10.22"));
        assert_eq!(epoch_seconds(object, "timestamp"), Some(1659006593));
        assert_eq!(epoch_seconds(object, "started"), Some(1659006594));
        assert_eq!(text(object, "missing"), None);
    }

    #[test]
    fn lists_counts_flags_and_times_come_in_several_shapes() {
        assert_eq!(items(&json!({"items": [1, 2]})).unwrap().len(), 2);
        assert_eq!(items(&json!([1])).unwrap().len(), 1);
        assert!(items(&json!({})).unwrap().is_empty());
        assert!(items(&json!({"items": 3})).is_err());
        let value = json!({"n": "12", "f": "TRUE", "one": 1, "at": "2022-03-30T12:00:01+00:00"});
        let object = value.as_object().unwrap();
        assert_eq!(count(object, "n"), Some(12));
        assert!(flag(object, "f") && flag(object, "one") && !flag(object, "n"));
        assert_eq!(time(object, "at"), Some(1648641601));
    }
}
