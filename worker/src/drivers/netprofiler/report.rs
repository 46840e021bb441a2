//! A NetProfiler job's verdict and its report: one entry per gateway (IP,
//! versions, state, descriptions, outcome) in the terminal event's detail.

use super::{
    Versions,
    status::{Gateway, State},
};
use crate::driver::{Failure, Next, StepError};
use serde::Serialize;
use serde_json::json;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum GatewayOutcome {
    Succeeded,
    Failed,
    /// Still updating when a sibling's failure ended the job.
    Unfinished,
    NotStarted,
}

/// A gateway's line of the terminal event's detail.
#[derive(Debug, Clone, Serialize)]
pub(super) struct GatewayReport {
    pub(super) ip: String,
    pub(super) outcome: GatewayOutcome,
    pub(super) state: State,
    #[serde(skip_serializing_if = "Option::is_none")]
    current_version: Option<String>,
    /// What the gateway ran before this job (its baseline).
    #[serde(skip_serializing_if = "Option::is_none")]
    version_before: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    update_to_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) state_description: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) internal_state_description: Option<String>,
    /// The init or start answer, when it was a failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) answer: Option<String>,
}

pub(super) fn report(
    gateways: &BTreeMap<String, Gateway>,
    before: &Versions,
    target: &str,
    refused: &BTreeMap<String, String>,
) -> Vec<GatewayReport> {
    gateways
        .iter()
        .map(|(ip, g)| GatewayReport {
            ip: ip.clone(),
            outcome: if g.state.failed() || refused.contains_key(ip) {
                GatewayOutcome::Failed
            } else if g.is_updated(target) {
                GatewayOutcome::Succeeded
            } else {
                GatewayOutcome::Unfinished
            },
            state: g.state,
            current_version: g.current.clone(),
            version_before: before.get(ip).cloned().flatten(),
            update_to_version: g.update_to.clone(),
            state_description: g.description.clone(),
            internal_state_description: g.internal_description.clone(),
            answer: refused.get(ip).cloned(),
        })
        .collect()
}

/// The failure of a job whose init failed on the `refused` gateways: they
/// failed, the others were not started.
pub(super) fn init_failed(
    gateways: &BTreeMap<String, Gateway>,
    before: &Versions,
    target: &str,
    refused: &BTreeMap<String, String>,
) -> StepError {
    let mut detail = report(gateways, before, target, &BTreeMap::new());
    for entry in &mut detail {
        if let Some(text) = refused.get(&entry.ip) {
            entry.outcome = GatewayOutcome::Failed;
            entry.answer = Some(text.clone());
        } else {
            entry.outcome = GatewayOutcome::NotStarted;
        }
    }
    let names: Vec<String> = refused
        .iter()
        .map(|(ip, t)| format!("{ip} ({t})"))
        .collect();
    Failure::device(format!(
        "initialization failed on gateway(s) {}; the update was not started",
        names.join(", ")
    ))
    .with_detail(json!({ "gateways": detail }))
    .into()
}

/// The failure of a job that started no gateway, for `reason`.
pub(super) fn not_started(
    gateways: &BTreeMap<String, Gateway>,
    before: &Versions,
    target: &str,
    reason: String,
) -> StepError {
    let mut detail = report(gateways, before, target, &BTreeMap::new());
    for entry in &mut detail {
        if entry.outcome != GatewayOutcome::Succeeded {
            entry.outcome = GatewayOutcome::NotStarted;
        }
    }
    Failure::device(reason)
        .with_detail(json!({ "gateways": detail }))
        .into()
}

/// The job's verdict from the gateways' states: failed if any gateway
/// failed (for attention if one failed critically), succeeded if all run
/// the target version.
pub(super) fn verdict<S>(
    gateways: &BTreeMap<String, Gateway>,
    before: &Versions,
    target: &str,
    refused: &BTreeMap<String, String>,
) -> Result<Next<S>, StepError> {
    let detail = report(gateways, before, target, refused);
    let failures: Vec<String> = detail
        .iter()
        .filter(|g| g.outcome == GatewayOutcome::Failed)
        .map(|g| {
            let mut words = format!("{} {}", g.ip, g.state.name());
            for text in [
                &g.answer,
                &g.state_description,
                &g.internal_state_description,
            ]
            .into_iter()
            .flatten()
            {
                words.push_str(": ");
                words.push_str(text);
            }
            words
        })
        .collect();
    let critical = gateways.values().any(|g| g.state == State::FailedCritical);
    let detail = json!({ "gateways": detail });
    if failures.is_empty() {
        return Ok(Next::succeeded_with(detail));
    }
    let failure = Failure::device(format!("gateway update failed: {}", failures.join("; ")))
        .with_detail(detail);
    Err(if critical {
        failure.needing_attention()
    } else {
        failure
    }
    .into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_failed_gateway_fails_the_job_and_critical_needs_attention() {
        let gateway = |state, current: &str| Gateway {
            state,
            current: Some(current.to_owned()),
            update_to: Some("10.23".to_owned()),
            description: None,
            internal_description: None,
        };
        let mut gateways = BTreeMap::from([
            ("10.0.0.1".to_owned(), gateway(State::Neutral, "10.23")),
            ("10.0.0.2".to_owned(), gateway(State::Running, "10.22")),
        ]);
        gateways.insert("10.0.0.3".into(), gateway(State::FailedCritical, "10.22"));
        let before = Versions::from([("10.0.0.1".to_owned(), Some("10.22".to_owned()))]);
        let Err(StepError::Fail(failure)) =
            verdict::<()>(&gateways, &before, "10.23", &BTreeMap::new())
        else {
            panic!("a failed gateway fails the job");
        };
        let ending = failure.ending();
        assert_eq!(ending.outcome, flotilla_common::Outcome::Failed);
        assert!(ending.needs_attention);
        assert!(ending.error.unwrap().contains("10.0.0.3 failed_critical"));
        let detail = ending.detail.unwrap();
        assert_eq!(detail["gateways"][1]["outcome"], "unfinished");
        assert_eq!(detail["gateways"][0]["outcome"], "succeeded");
        assert_eq!(detail["gateways"][0]["version_before"], "10.22");
        assert!(detail["gateways"][1].get("version_before").is_none());
    }
}
