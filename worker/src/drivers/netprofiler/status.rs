//! `GET update`: every connected Flow Gateway's update state, keyed by its
//! IP, read leniently (the documented example spells "description" two
//! ways in one object).

use crate::support::lenient;
use serde::Serialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum State {
    Neutral,
    Initializing,
    Initialized,
    Running,
    FailedGraceful,
    FailedCritical,
}

impl State {
    fn parse(text: &str) -> Option<State> {
        Some(match text.trim().to_ascii_lowercase().as_str() {
            "neutral" => State::Neutral,
            "initializing" => State::Initializing,
            "initialized" => State::Initialized,
            "running" => State::Running,
            "failed_graceful" => State::FailedGraceful,
            "failed_critical" => State::FailedCritical,
            _ => return None,
        })
    }

    pub(super) fn name(self) -> &'static str {
        match self {
            State::Neutral => "neutral",
            State::Initializing => "initializing",
            State::Initialized => "initialized",
            State::Running => "running",
            State::FailedGraceful => "failed_graceful",
            State::FailedCritical => "failed_critical",
        }
    }

    pub(super) fn failed(self) -> bool {
        matches!(self, State::FailedGraceful | State::FailedCritical)
    }

    pub(super) fn is_under_way(self) -> bool {
        matches!(
            self,
            State::Initializing | State::Initialized | State::Running
        )
    }
}

/// One gateway's entry of `GET update`.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Gateway {
    pub(super) state: State,
    pub(super) current: Option<String>,
    pub(super) update_to: Option<String>,
    pub(super) description: Option<String>,
    pub(super) internal_description: Option<String>,
}

impl Gateway {
    pub(super) fn is_updated(&self, target: &str) -> bool {
        self.state == State::Neutral && self.current.as_deref() == Some(target)
    }
}

/// The gateways' states in a few words, for step events.
pub(super) fn states(gateways: &BTreeMap<String, Gateway>) -> String {
    gateways
        .iter()
        .map(|(ip, g)| {
            format!(
                "{ip} {} {}",
                g.state.name(),
                g.current.as_deref().unwrap_or("?")
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Reads `GET update`. Documented as an array of objects keyed by gateway
/// IP; a bare object keyed by IP is read too. Fields that are not a
/// gateway's status (not an object with a `State`) are passed over: the
/// document does not rule them out.
pub(super) fn parse_status(body: &Value) -> Result<BTreeMap<String, Gateway>, String> {
    let maps: Vec<&Map<String, Value>> = match body {
        Value::Array(items) => items
            .iter()
            .map(|item| item.as_object().ok_or("an entry is not an object"))
            .collect::<Result<_, _>>()?,
        Value::Object(map) => vec![map],
        _ => return Err("not an array or object of gateway statuses".to_owned()),
    };
    let mut gateways = BTreeMap::new();
    for map in maps {
        for (ip, status) in map {
            let Some(status) = status.as_object() else {
                continue;
            };
            let Some(state_text) = lenient::text(status, "State") else {
                continue;
            };
            let state = State::parse(&state_text)
                .ok_or_else(|| format!("gateway {ip}: unknown State {state_text:?}"))?;
            let non_empty = |name: &str| lenient::text(status, name).filter(|t| !t.is_empty());
            gateways.insert(
                ip.trim().to_owned(),
                Gateway {
                    state,
                    current: non_empty("Current Version"),
                    update_to: non_empty("Update To Version"),
                    description: non_empty("State Description"),
                    internal_description: non_empty("Internal State Description"),
                },
            );
        }
    }
    Ok(gateways)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn status_reads_the_documented_shape_with_its_quirks() {
        // The documented example, made valid JSON: an array of objects keyed
        // by gateway IP, with "description" spelt two ways.
        let body = json!([{
            "1.2.3.4": {
                "State": "failed_graceful",
                "Internal State description": "disk full",
                "State description": "Update failed",
                "Current Version": "10.22",
                "Update To Version": "10.23"
            },
            "1.2.3.5": {
                "State": "initialized",
                "Internal State Description": "",
                "State Description": "",
                "Current Version": "10.22",
                "Update To Version": "10.23"
            }
        }]);
        let gateways = parse_status(&body).unwrap();
        let failed = &gateways["1.2.3.4"];
        assert_eq!(failed.state, State::FailedGraceful);
        assert_eq!(failed.internal_description.as_deref(), Some("disk full"));
        assert_eq!(failed.description.as_deref(), Some("Update failed"));
        assert_eq!(gateways["1.2.3.5"].description, None);
        assert_eq!(gateways["1.2.3.5"].update_to.as_deref(), Some("10.23"));

        let bare = json!({"1.2.3.6": {"state": "NEUTRAL", "current_version": "10.23"}});
        assert!(parse_status(&bare).unwrap()["1.2.3.6"].is_updated("10.23"));
        let unknown = json!([{"1.2.3.7": {"State": "exploded"}}]);
        assert!(parse_status(&unknown).unwrap_err().contains("1.2.3.7"));

        let extra = json!([{
            "1.2.3.8": {"State": "neutral", "Current Version": "10.23"},
            "Last Checked": 1700000000,
            "NetProfiler": {"Version": "10.23"}
        }]);
        let gateways = parse_status(&extra).unwrap();
        assert_eq!(gateways.len(), 1, "{gateways:?}");
    }
}
