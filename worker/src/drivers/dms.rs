//! TR-069 CPEs, upgraded through their DMS (ACS) northbound API.
//!
//! The documented sequence, one step each:
//!
//! 1. `create_rule`: `POST /v1/dyn/FirmwareStorage/.*` an enabled, automatic
//!    rule `UPGRADE_<cpeid>` for one execution of the target file;
//! 2. `send_connection_request`: `POST /v1/method/SendCNR`, so the CPE calls
//!    its ACS and the rule runs;
//! 3. `poll_result`: `GET /v1/dyn/FirmwareResultStorage/.*?id=UPGRADE_<cpeid>`
//!    until a result appears (a `404`, in the HTTP status or in the body's
//!    `code`, means not yet);
//! 4. `deactivate_rule`: `PUT /v1/dyn/FirmwareStorage/.*?campaignid=...`
//!    with `enabled: false`. This is the cleanup of every other step, so it
//!    runs whatever the outcome: success, failure, timeout or cancel.
//!
//! The API wraps its own status in the body (`{"code": 204, ...}` with HTTP
//! 200, `{"result": {"code": 200}}`), and `.*` in the paths is literal.
//!
//! Observe before acting: the first two steps look for a result of this job
//! first, so a redelivered step after the CPE upgraded goes straight to the
//! result instead of arming the rule again. A result is this job's when it
//! names this CPE and its rule (`cpeid`, `campaignid`: a DMS may answer
//! more than the query asks for) and is stamped after the job was
//! published, on the DMS's own clock ([`crate::support::clock`]): a late
//! copy of the first step still finds its job's result.
//!
//! A rule that already exists (409, in the HTTP status or the body's
//! `code`) may be an earlier campaign's: it is updated to this campaign's
//! file and armed, never kept as it is. A body `code` 404 on creation is
//! the DMS not knowing the CPE: a failure.

use crate::{
    device_http::{Call, Reply},
    driver::{Driver, Failure, Next, StepContext, StepError},
    support::clock,
};
use flotilla_common::DeviceKind;
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::json;

pub(crate) struct Dms;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum DmsStep {
    CreateRule,
    SendConnectionRequest,
    PollResult,
    DeactivateRule,
}

impl Driver for Dms {
    type Step = DmsStep;
    const KIND: DeviceKind = DeviceKind::Dms;

    fn first_step(&self) -> DmsStep {
        DmsStep::CreateRule
    }

    fn step_name(step: &DmsStep) -> &'static str {
        match step {
            DmsStep::CreateRule => "create_rule",
            DmsStep::SendConnectionRequest => "send_connection_request",
            DmsStep::PollResult => "poll_result",
            DmsStep::DeactivateRule => "deactivate_rule",
        }
    }

    async fn run(&self, step: DmsStep, cx: &StepContext<'_>) -> Result<Next<DmsStep>, StepError> {
        let cpe = cpe_id(cx)?;
        let rule = format!("UPGRADE_{cpe}");
        match step {
            DmsStep::CreateRule => {
                if let Some(result) = latest_result(cx, &rule).await? {
                    return Ok(Next::run(DmsStep::PollResult)
                        .note(format!("result already reported ({})", result.summary())));
                }
                let body = json!({
                    "id": rule,
                    "enabled": true,
                    "automatic": true,
                    "file": cx.job.target.image_url.as_str(),
                    "condition": { "cpeid": cpe },
                    "executions": 1,
                    "priority": 1,
                    "author": "api",
                });
                let reply = basic(cx, cx.http.post("/v1/dyn/FirmwareStorage/.*"))?
                    .json(&body)
                    .send()
                    .await?;
                if storage_code(&reply) != 409 {
                    check_storage_reply(reply, &[])?;
                    return Ok(Next::run(DmsStep::SendConnectionRequest));
                }
                // The rule exists: a redelivered step's, or an earlier
                // campaign's for another file. Make it this campaign's.
                let update = json!({
                    "id": rule,
                    "enabled": true,
                    "automatic": true,
                    "file": cx.job.target.image_url.as_str(),
                    "executions": 1,
                    "priority": 1,
                });
                let reply = basic(
                    cx,
                    cx.http
                        .put(&format!("/v1/dyn/FirmwareStorage/.*?campaignid={rule}")),
                )?
                .json(&update)
                .send()
                .await?;
                check_storage_reply(reply, &[])?;
                Ok(Next::run(DmsStep::SendConnectionRequest)
                    .note("the rule existed; updated to this campaign's file"))
            }
            DmsStep::SendConnectionRequest => {
                if let Some(result) = latest_result(cx, &rule).await? {
                    return Ok(Next::run(DmsStep::PollResult)
                        .note(format!("result already reported ({})", result.summary())));
                }
                let reply = basic(cx, cx.http.post("/v1/method/SendCNR"))?
                    .json(&json!({ "search_options": { "cpe_id": cpe } }))
                    .send()
                    .await?
                    .success()?;
                let answer: CnrReply = reply.json()?;
                match answer.result.code {
                    200..=299 => Ok(Next::poll(DmsStep::PollResult)),
                    404 => Err(StepError::refused(format!(
                        "the DMS does not know CPE {cpe}: {}",
                        answer.result.message
                    ))),
                    // The CPE may be offline for a moment; ask again later.
                    code => Err(StepError::transient(format!(
                        "connection request to CPE {cpe} failed with code {code}: {}",
                        answer.result.message
                    ))),
                }
            }
            DmsStep::PollResult => match latest_result(cx, &rule).await? {
                None => Ok(Next::poll(DmsStep::PollResult).note("no result yet")),
                Some(result) => match result.result.code {
                    200 => Ok(Next::succeeded().note(result.summary())),
                    // 1xx and 202: the DMS reports the upgrade as under way.
                    100..=199 | 202 => Ok(Next::poll(DmsStep::PollResult).note(result.summary())),
                    _ => Err(Failure::device(result.result.message.clone())
                        .note(result.summary())
                        .into()),
                },
            },
            DmsStep::DeactivateRule => {
                let reply = basic(
                    cx,
                    cx.http
                        .put(&format!("/v1/dyn/FirmwareStorage/.*?campaignid={rule}")),
                )?
                .json(&json!({ "id": rule, "enabled": false, "automatic": false }))
                .send()
                .await?;
                // No rule (404) is as good as a deactivated one: the job
                // ended before its rule was created.
                if reply.status != StatusCode::NOT_FOUND {
                    check_storage_reply(reply, &[404])?;
                }
                Ok(Next::done())
            }
        }
    }

    fn cleanup(&self, step: &DmsStep) -> Option<DmsStep> {
        match step {
            DmsStep::DeactivateRule => None,
            _ => Some(DmsStep::DeactivateRule),
        }
    }
}

/// The job's CPE. A `dms` job without one is a message the producer never
/// sends (its inventory check requires the column): dead-lettered.
fn cpe_id<'a>(cx: &'a StepContext<'_>) -> Result<&'a str, StepError> {
    cx.job.device.cpe_id.as_deref().ok_or_else(|| {
        StepError::reject(
            "undecodable",
            format!(
                "device {} has no cpe_id; a dms inventory row must name its CPE",
                cx.job.device.id
            ),
        )
    })
}

/// `call` with the reference's `username` and `password` (HTTP Basic).
fn basic<'a>(cx: &StepContext<'a>, call: Call<'a>) -> Result<Call<'a>, StepError> {
    let user = cx.credentials.require("username")?;
    let password = cx.credentials.require("password")?;
    Ok(call.basic(user, password))
}

/// The DMS's own status, as `code` in the body: `{"code": 204, ...}`.
#[derive(Debug, Deserialize)]
struct StorageReply {
    code: u16,
    #[serde(default)]
    message: String,
    #[serde(default)]
    details: serde_json::Value,
}

/// The status of a storage answer: the body's own `code` when it has one,
/// else the HTTP status.
fn storage_code(reply: &Reply) -> u16 {
    serde_json::from_slice::<StorageReply>(&reply.body).map_or(reply.status.as_u16(), |b| b.code)
}

/// Accepts an empty 2xx or a body whose own `code` is 2xx or one of
/// `also` (404 for `deactivate`: no rule is as good as a disabled one).
fn check_storage_reply(reply: Reply, also: &[u16]) -> Result<(), StepError> {
    let reply = reply.success()?;
    if reply.body.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    let answer: StorageReply = reply.json()?;
    match answer.code {
        200..=299 => Ok(()),
        code if also.contains(&code) => Ok(()),
        404 => Err(StepError::refused(format!(
            "{} reported code 404: the DMS does not know this CPE: {} {}",
            reply.what, answer.message, answer.details
        ))),
        code => Err(StepError::refused(format!(
            "{} reported code {code}: {} {}",
            reply.what, answer.message, answer.details
        ))),
    }
}

#[derive(Debug, Deserialize)]
struct CnrReply {
    result: CodeMessage,
}

#[derive(Debug, Clone, Deserialize)]
struct CodeMessage {
    code: u16,
    #[serde(default)]
    message: String,
}

/// `FirmwareResultStorage`'s answer: `details` is a list of results when
/// `code` is 200, and a string otherwise.
#[derive(Debug, Deserialize)]
struct ResultReply {
    code: u16,
    #[serde(default)]
    details: serde_json::Value,
}

#[derive(Debug, Clone, Deserialize)]
struct UpgradeResult {
    #[serde(default)]
    id: String,
    /// The CPE and the rule the result is of, when the DMS says.
    #[serde(default)]
    cpeid: Option<String>,
    #[serde(default)]
    campaignid: Option<String>,
    /// Epoch seconds.
    #[serde(default)]
    ts: i64,
    result: CodeMessage,
}

impl UpgradeResult {
    fn summary(&self) -> String {
        format!(
            "result {} code {}: {}",
            self.id, self.result.code, self.result.message
        )
    }
}

/// This job's upgrade result, if the DMS has one: the newest entry for
/// this CPE's rule stamped since the job was published (on the DMS's
/// clock).
async fn latest_result(
    cx: &StepContext<'_>,
    rule: &str,
) -> Result<Option<UpgradeResult>, StepError> {
    let reply = basic(
        cx,
        cx.http
            .get(&format!("/v1/dyn/FirmwareResultStorage/.*?id={rule}")),
    )?
    .send()
    .await?;
    if reply.status == StatusCode::NOT_FOUND {
        return Ok(None);
    }
    let reply = reply.success()?;
    let answer: ResultReply = reply.json()?;
    if answer.code == 404 {
        return Ok(None);
    }
    if answer.code != 200 {
        return Err(StepError::garbage(format!(
            "{} reported code {} and no results: {}",
            reply.what, answer.code, answer.details
        )));
    }
    let results: Vec<UpgradeResult> = serde_json::from_value(answer.details).map_err(|e| {
        StepError::garbage(format!(
            "{} gave results we cannot read ({e}): {}",
            reply.what,
            reply.quote()
        ))
    })?;
    let since = clock::published_on_device(cx.job, &reply);
    let cpe = cx.job.device.cpe_id.as_deref();
    Ok(results
        .into_iter()
        .filter(|r| r.cpeid.as_deref().is_none_or(|c| Some(c) == cpe))
        .filter(|r| r.campaignid.as_deref().is_none_or(|c| c == rule))
        .filter(|r| r.ts >= since)
        .max_by_key(|r| r.ts))
}
