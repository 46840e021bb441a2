//! Reading NPM's `update` and `image` resources as appliances write them.

use crate::support::lenient;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum UpdateState {
    Idle,
    Initializing,
    Initialized,
    Running,
    FailedGraceful,
    FailedCritical,
}

impl UpdateState {
    fn parse(text: &str) -> Option<UpdateState> {
        Some(match text.trim().to_ascii_uppercase().as_str() {
            "IDLE" => UpdateState::Idle,
            "INITIALIZING" => UpdateState::Initializing,
            "INITIALIZED" => UpdateState::Initialized,
            "RUNNING" => UpdateState::Running,
            "FAILED_GRACEFUL" => UpdateState::FailedGraceful,
            "FAILED_CRITICAL" => UpdateState::FailedCritical,
            _ => return None,
        })
    }

    pub(super) fn name(self) -> &'static str {
        match self {
            UpdateState::Idle => "IDLE",
            UpdateState::Initializing => "INITIALIZING",
            UpdateState::Initialized => "INITIALIZED",
            UpdateState::Running => "RUNNING",
            UpdateState::FailedGraceful => "FAILED_GRACEFUL",
            UpdateState::FailedCritical => "FAILED_CRITICAL",
        }
    }
}

/// The `update` resource.
#[derive(Debug, Clone)]
pub(super) struct Update {
    pub(super) state: UpdateState,
    pub(super) description: String,
    pub(super) last_state_time: Option<i64>,
    /// The version the update installs, when the appliance says.
    pub(super) target_version: Option<String>,
    /// The newest version of `update_history`.
    pub(super) installed: Option<String>,
    /// `update_history`'s entries, in the appliance's order.
    pub(super) entries: Vec<HistoryEntry>,
    pub(super) history: Value,
}

/// One entry of `update_history`: both fields are optional.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct HistoryEntry {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) time: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) version: Option<String>,
}

/// The version of the newest of `entries` (by time; among equal or
/// missing times, the last).
pub(super) fn newest<'e>(entries: impl IntoIterator<Item = &'e HistoryEntry>) -> Option<String> {
    entries
        .into_iter()
        .enumerate()
        .filter_map(|(i, entry)| {
            let version = entry.version.clone()?;
            Some(((entry.time.unwrap_or(i64::MIN), i), version))
        })
        .max_by_key(|(key, _)| *key)
        .map(|(_, version)| version)
}

pub(super) fn read_update(body: &Value) -> Result<Update, String> {
    let object = body.as_object().ok_or("not an update object")?;
    let state_text = lenient::text(object, "state").ok_or("no state")?;
    let state =
        UpdateState::parse(&state_text).ok_or_else(|| format!("unknown state {state_text:?}"))?;
    let history = lenient::field(object, "update_history")
        .cloned()
        .unwrap_or(Value::Array(Vec::new()));
    let entries: Vec<HistoryEntry> = history
        .as_array()
        .ok_or("update_history is not a list")?
        .iter()
        .filter_map(Value::as_object)
        .map(|entry| HistoryEntry {
            time: lenient::epoch_seconds(entry, "time"),
            version: lenient::text(entry, "version"),
        })
        .collect();
    Ok(Update {
        state,
        description: lenient::text(object, "state_description").unwrap_or_default(),
        last_state_time: lenient::epoch_seconds(object, "last_state_time"),
        target_version: lenient::text(object, "target_version").filter(|v| !v.trim().is_empty()),
        installed: newest(&entries),
        entries,
        history,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ImageState {
    Uploading,
    Validating,
    UploadError,
    Valid,
    Invalid,
}

impl ImageState {
    pub(super) fn name(self) -> &'static str {
        match self {
            ImageState::Uploading => "UPLOADING",
            ImageState::Validating => "VALIDATING",
            ImageState::UploadError => "UPLOAD_ERROR",
            ImageState::Valid => "VALID",
            ImageState::Invalid => "INVALID",
        }
    }

    pub(super) fn failed(self) -> bool {
        matches!(self, ImageState::UploadError | ImageState::Invalid)
    }
}

#[derive(Debug, Clone)]
pub(super) struct Image {
    pub(super) id: Option<u64>,
    pub(super) state: ImageState,
    pub(super) description: String,
    pub(super) checksum: Option<String>,
    pub(super) version: Option<String>,
    pub(super) progress: Option<f64>,
}

impl Image {
    pub(super) fn describe(&self) -> String {
        let mut text = self.state.name().to_owned();
        if let Some(progress) = self.progress {
            text.push_str(&format!(" {progress}%"));
        }
        if !self.description.is_empty() {
            text.push_str(": ");
            text.push_str(&self.description);
        }
        text
    }
}

pub(super) fn read_image(body: &Value) -> Result<Image, String> {
    let object: &Map<String, Value> = body.as_object().ok_or("an image is not an object")?;
    let state_text = lenient::text(object, "state").ok_or("an image has no state")?;
    let state = match state_text.trim().to_ascii_uppercase().as_str() {
        "UPLOADING" => ImageState::Uploading,
        "VALIDATING" => ImageState::Validating,
        "UPLOAD_ERROR" => ImageState::UploadError,
        "VALID" => ImageState::Valid,
        "INVALID" => ImageState::Invalid,
        _ => return Err(format!("unknown image state {state_text:?}")),
    };
    let id = match lenient::text(object, "id") {
        None => None,
        Some(text) => Some(
            text.parse::<u64>()
                .map_err(|_| format!("image id {text:?} is not a number"))?,
        ),
    };
    Ok(Image {
        id,
        state,
        description: lenient::text(object, "state_description").unwrap_or_default(),
        checksum: lenient::text(object, "checksum")
            .map(|c| c.trim().to_owned())
            .filter(|c| !c.is_empty()),
        version: lenient::text(object, "version").filter(|v| !v.is_empty()),
        progress: lenient::field(object, "progress").and_then(Value::as_f64),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_newest_history_entry_is_the_installed_version() {
        let update = read_update(&json!({
            "last_state_time": 1700000000,
            "state": "IDLE",
            "state_description": "",
            "update_history": [
                {"time": 1600000000, "version": "11.4.0"},
                {"time": 1700000000, "version": "11.5.0"},
                {"version": "11.5.1"}
            ]
        }))
        .unwrap();
        assert_eq!(update.installed.as_deref(), Some("11.5.0"));
        assert!(read_update(&json!({"state": "DANCING", "update_history": []})).is_err());
    }

    #[test]
    fn images_accept_ids_as_numbers_or_text() {
        let image = read_image(&json!({
            "id": "7", "state": "VALID", "state_description": "ok",
            "checksum": "AB", "progress": 100
        }))
        .unwrap();
        assert_eq!(image.id, Some(7));
        assert_eq!(image.describe(), "VALID 100%: ok");
        assert!(read_image(&json!({"id": 1, "state": "MAYBE"})).is_err());
    }
}
