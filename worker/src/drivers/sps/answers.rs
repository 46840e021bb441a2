//! Reading the SPS REST API's answers as appliances send them, not as the
//! tables say: identifiers documented as numbers arrive as strings and the
//! other way round (`"key": "1"` beside `"slot_id": 2`, a `resource` of
//! `"3"`), versions documented as numbers are `"6.6.0"`, a queued fetch
//! has a `null` `start_time` and a `bytes_total` of 0, and an upgrade's
//! `body` is an object or a bare string.
//!
//! Every resource is wrapped: `{"body": {...}, "key": "...", "meta": {...}}`,
//! lists as `{"items": [...]}`; errors as `{"error": {"type": ...,
//! "message": ..., "details": {...}}}`.

use crate::support::lenient::{self, count, flag, items, time};
use serde_json::{Map, Value};

/// The state of a firmware fetch (`status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FetchStatus {
    Queued,
    InProgress,
    Finished,
    Failed,
    Canceled,
}

impl FetchStatus {
    fn parse(text: &str) -> Option<FetchStatus> {
        Some(
            match text.trim().to_ascii_lowercase().replace('_', "-").as_str() {
                "queued" => FetchStatus::Queued,
                "in-progress" => FetchStatus::InProgress,
                "finished" => FetchStatus::Finished,
                "failed" => FetchStatus::Failed,
                // The API spells it `canceled`; accept the other spelling too.
                "canceled" | "cancelled" => FetchStatus::Canceled,
                _ => return None,
            },
        )
    }

    pub(super) fn name(self) -> &'static str {
        match self {
            FetchStatus::Queued => "queued",
            FetchStatus::InProgress => "in-progress",
            FetchStatus::Finished => "finished",
            FetchStatus::Failed => "failed",
            FetchStatus::Canceled => "canceled",
        }
    }

    /// Queued or downloading: the only states a `DELETE` cancels.
    pub(super) fn running(self) -> bool {
        matches!(self, FetchStatus::Queued | FetchStatus::InProgress)
    }
}

/// One firmware fetch's status.
#[derive(Debug, Clone)]
pub(super) struct Fetch {
    pub(super) key: String,
    pub(super) status: FetchStatus,
    pub(super) url: Option<String>,
    /// The SHA-256 the fetch was started with, when the appliance reports
    /// it (the documented status does not).
    pub(super) sha256: Option<String>,
    /// Where the image went, once `finished`.
    pub(super) slot: Option<String>,
    pub(super) error: Option<String>,
    pub(super) info: Option<String>,
    pub(super) bytes_downloaded: Option<u64>,
    pub(super) bytes_total: Option<u64>,
    /// Epoch seconds; `None` while queued.
    pub(super) started: Option<i64>,
}

impl Fetch {
    /// The fetch's state and progress, for step events.
    pub(super) fn describe(&self) -> String {
        let mut text = self.status.name().to_owned();
        match (self.bytes_downloaded, self.bytes_total) {
            (Some(done), Some(total)) if total > 0 => {
                let percent = done.saturating_mul(100) / total;
                text.push_str(&format!(" {done} of {total} bytes ({percent}%)"));
            }
            (Some(done), _) if done > 0 => text.push_str(&format!(" {done} bytes")),
            _ => {}
        }
        if let Some(info) = &self.info {
            text.push_str(": ");
            text.push_str(info);
        }
        text
    }
}

/// One fetch: `{"body": {...}, "key": "..."}`.
pub(super) fn read_fetch(value: &Value) -> Result<Fetch, String> {
    let (key, body) = wrapped(value, "a fetch")?;
    let key = key.ok_or("a fetch has no key")?;
    let status_text = lenient::text(body, "status").ok_or("a fetch has no status")?;
    let status = FetchStatus::parse(&status_text)
        .ok_or_else(|| format!("fetch {key} has an unknown status {status_text:?}"))?;
    Ok(Fetch {
        key,
        status,
        url: lenient::text(body, "url"),
        sha256: match lenient::field(body, "checksum") {
            Some(Value::Object(checksum)) => lenient::text(checksum, "sha256"),
            Some(Value::String(sha256)) => Some(sha256.clone()),
            _ => lenient::text(body, "sha256"),
        },
        slot: lenient::text(body, "slot_id").filter(|s| !s.is_empty()),
        error: lenient::text(body, "error").filter(|e| !e.is_empty()),
        info: lenient::text(body, "info").filter(|i| !i.is_empty()),
        bytes_downloaded: count(body, "bytes_downloaded"),
        bytes_total: count(body, "bytes_total"),
        started: time(body, "start_time"),
    })
}

/// `{"items": [...]}` of fetches.
pub(super) fn read_fetches(value: &Value) -> Result<Vec<Fetch>, String> {
    items(value)?.iter().map(read_fetch).collect()
}

/// A firmware slot.
#[derive(Debug, Clone)]
pub(super) struct Slot {
    pub(super) key: String,
    /// `None` for an empty slot.
    pub(super) version: Option<String>,
    /// Running now.
    pub(super) current: bool,
    /// Selected to run after the next restart.
    pub(super) after_reboot: bool,
}

impl Slot {
    pub(super) fn holds(&self, version: &str) -> bool {
        self.version.as_deref() == Some(version)
    }

    pub(super) fn version_text(&self) -> &str {
        self.version.as_deref().unwrap_or("nothing")
    }
}

/// One slot: `{"body": {"version": ..., "current": ...}, "key": "2"}` (the
/// answer of an upload, and an item of `GET /api/firmware/slots`).
pub(super) fn read_slot(value: &Value) -> Result<Slot, String> {
    let (key, body) = wrapped(value, "a slot")?;
    let key = key.ok_or("a slot has no key")?;
    Ok(Slot {
        version: lenient::text(body, "version")
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty()),
        current: flag(body, "current"),
        after_reboot: flag(body, "after_reboot"),
        key,
    })
}

/// `{"items": [...]}` of slots.
pub(super) fn read_slots(value: &Value) -> Result<Vec<Slot>, String> {
    items(value)?.iter().map(read_slot).collect()
}

/// The `key` of a created resource (a fetch).
pub(super) fn read_key(value: &Value) -> Result<String, String> {
    let object = value.as_object().ok_or("the answer is not an object")?;
    lenient::text(object, "key")
        .filter(|k| !k.is_empty())
        .ok_or_else(|| "the answer has no key".to_owned())
}

/// What an accepted upgrade reports of its firmware test, if anything.
pub(super) fn test_summary(value: &Value) -> Option<String> {
    match value.as_object().and_then(|o| lenient::field(o, "body"))? {
        Value::Object(body) => lenient::text(body, "test_summary").map(|s| one_line(&s)),
        Value::String(text) if !text.trim().is_empty() && text.trim() != "..." => {
            Some(one_line(text))
        }
        _ => None,
    }
}

/// An API error: `{"error": {"type": "ResourceNotFound", "message": ...,
/// "details": {...}}}`.
#[derive(Debug, Clone)]
pub(super) struct ApiError {
    pub(super) kind: String,
    pub(super) message: String,
    pub(super) details: Map<String, Value>,
}

impl ApiError {
    pub(super) fn detail(&self, name: &str) -> Option<String> {
        lenient::text(&self.details, name)
    }

    /// `details.missing_paths`, a list (or, leniently, one path).
    pub(super) fn missing_paths(&self) -> Vec<String> {
        match lenient::field(&self.details, "missing_paths") {
            Some(Value::Array(paths)) => paths
                .iter()
                .filter_map(|p| match p {
                    Value::String(s) => Some(s.clone()),
                    Value::Null => None,
                    other => Some(other.to_string()),
                })
                .collect(),
            Some(Value::String(path)) => vec![path.clone()],
            _ => Vec::new(),
        }
    }
}

/// The error in an answer's body, if it is one. Also accepts a bare
/// `{"error": "UpgradeMessageMissing"}` and `{"type": ...}` at the top.
pub(super) fn read_error(body: &[u8]) -> Option<ApiError> {
    let value: Value = serde_json::from_slice(body).ok()?;
    let object = value.as_object()?;
    let error = match lenient::field(object, "error") {
        Some(Value::Object(error)) => error,
        Some(Value::String(kind)) => {
            return Some(ApiError {
                kind: kind.clone(),
                message: lenient::text(object, "message").unwrap_or_default(),
                details: Map::new(),
            });
        }
        _ => object,
    };
    Some(ApiError {
        kind: lenient::text(error, "type")?,
        message: lenient::text(error, "message").unwrap_or_default(),
        details: match lenient::field(error, "details") {
            Some(Value::Object(details)) => details.clone(),
            _ => Map::new(),
        },
    })
}

/// A multi-line text (a test summary) on one line.
pub(super) fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// The `key` and `body` of a wrapped resource; a bare body is accepted with
/// its own `key` (or `id`).
fn wrapped<'v>(
    value: &'v Value,
    what: &str,
) -> Result<(Option<String>, &'v Map<String, Value>), String> {
    let object = value
        .as_object()
        .ok_or_else(|| format!("{what} is not an object"))?;
    let key = lenient::text(object, "key").filter(|k| !k.is_empty());
    match lenient::field(object, "body") {
        Some(Value::Object(body)) => Ok((key, body)),
        _ => Ok((key.or_else(|| lenient::text(object, "id")), object)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fetches_read_as_documented_and_as_sent() {
        let list = json!({"items": [
            {"body": {"bytes_downloaded": 1234, "bytes_total": 1521614848, "error": null,
                      "info": "Downloading", "slot_id": null,
                      "start_time": "2022-03-30T12:00:01+00:00", "status": "in-progress",
                      "url": "https://example.com/sps.iso"},
             "key": "42dee328-9a26-4337-a1fd-3ee6cea3e815", "meta": {}},
            {"body": {"bytes_downloaded": 0, "bytes_total": 0, "error": null, "info": null,
                      "slot_id": null, "status": "queued", "start_time": null,
                      "url": "https://example.com/sps.iso"},
             "key": "6bf3113c"},
            {"body": {"bytes_downloaded": "10", "bytes_total": "10", "slot_id": 2,
                      "status": "FINISHED", "url": "https://example.com/sps_old.iso"},
             "key": "8f6f7b0f"},
            {"body": {"status": "cancelled", "url": "u"}, "key": 7}
        ]});
        let fetches = read_fetches(&list).unwrap();
        assert_eq!(fetches[0].status, FetchStatus::InProgress);
        assert_eq!(fetches[0].started, Some(1648641601));
        assert_eq!(
            fetches[0].describe(),
            "in-progress 1234 of 1521614848 bytes (0%): Downloading"
        );
        assert_eq!(fetches[1].describe(), "queued");
        assert_eq!(fetches[1].started, None);
        assert_eq!(fetches[2].slot.as_deref(), Some("2"));
        assert_eq!(fetches[2].describe(), "finished 10 of 10 bytes (100%)");
        assert_eq!(fetches[3].status, FetchStatus::Canceled);
        assert_eq!(fetches[3].key, "7");
        assert!(read_fetch(&json!({"body": {"status": "dancing"}, "key": "k"})).is_err());
        assert!(read_fetch(&json!({"body": {"status": "queued"}})).is_err());
    }

    #[test]
    fn slots_upgrade_answers_and_errors_tolerate_the_documented_quirks() {
        let slot = read_slot(&json!({
            "body": {"after_reboot": true, "current": false, "upgrade_news": null,
                     "upgrade_notes": "some notes", "version": "6.6.0"},
            "key": "2",
            "meta": {"number_of_empty_slots": 2}
        }))
        .unwrap();
        assert_eq!(slot.key, "2");
        assert!(slot.holds("6.6.0") && slot.after_reboot && !slot.current);
        let numeric =
            read_slot(&json!({"body": {"version": 7, "current": "true"}, "key": 1})).unwrap();
        assert!(numeric.holds("7") && numeric.current);

        let accepted = json!({"body": {"test_summary": "HA check started\nHA check finished"},
                              "key": "1"});
        assert_eq!(
            test_summary(&accepted).as_deref(),
            Some("HA check started; HA check finished")
        );
        assert_eq!(test_summary(&json!({"body": "...", "key": 1})), None);

        let missing = read_error(
            br#"{"error": {"details": {"missing_paths": ["message"]},
                 "message": "Some paths were missing from the request body",
                 "type": "IncompleteRequestBodyError"}, "meta": {}}"#,
        )
        .unwrap();
        assert_eq!(missing.kind, "IncompleteRequestBodyError");
        assert_eq!(missing.missing_paths(), vec!["message".to_owned()]);
        let empty = read_error(
            br#"{"error": {"details": {"mount_point": "/firmware/upgrade", "resource": "3"},
                 "message": "Resource was not found", "type": "ResourceNotFound"}}"#,
        )
        .unwrap();
        assert_eq!(empty.detail("resource").as_deref(), Some("3"));
        assert_eq!(
            read_error(br#"{"error": "UpgradeMessageMissing"}"#)
                .unwrap()
                .kind,
            "UpgradeMessageMissing"
        );
        assert!(read_error(b"<html>Bad gateway</html>").is_none());
    }
}
