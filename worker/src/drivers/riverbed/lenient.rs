//! Reading JSON the way real appliances write it, not the way their tables
//! say: keys whose case and spacing drift between fields of one answer
//! (`"Internal State description"` beside `"State Description"`), and epoch
//! times documented as strings but sent as integers (`"timeStamp":
//! 1659006593`).
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
}
