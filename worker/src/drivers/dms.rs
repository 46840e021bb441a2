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
//! Observe before acting: the job's first delivery only records what the
//! DMS already holds for this CPE's rule (the ids of its result records:
//! [`DmsBaseline`]), and every later step takes a record the baseline does
//! not hold for this job's. So `create_rule` and `send_connection_request`
//! look for a result of this job first, and a redelivered step after the
//! CPE upgraded goes straight to the result instead of arming the rule
//! again. A record counts only when it names this CPE and its rule
//! (`cpeid`, `campaignid`: a DMS may answer more than the query asks for).
//! No timestamp is compared: a DMS whose clock steps mid-job changes
//! nothing.
//!
//! The recording step may itself be a late copy, after the job acted: it
//! counts records stamped at or after the job's publication, read on the
//! DMS's clock ([`crate::support::clock`]), as the job's own. From a DMS
//! that sends no `Date` header it counts every record as older: a copy of
//! the first step redelivered after the CPE reported this job's result
//! would then arm the rule and send the connection request again.
//!
//! A rule that already exists (409, in the HTTP status or the body's
//! `code`) may be an earlier campaign's: it is updated to this campaign's
//! file and armed, never kept as it is. A body `code` 404 on creation is
//! the DMS not knowing the CPE: a failure.

use crate::{
    device_http::{Call, Reply},
    driver::{Driver, Failure, Next, StepContext, StepError},
    support::{
        baseline::{self, BASELINE_STEP, Baselined},
        clock,
    },
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

impl DmsStep {
    /// Whether the step judges the DMS's results, and so needs the
    /// baseline to tell this job's from older ones.
    fn judges(self) -> bool {
        !matches!(self, DmsStep::DeactivateRule)
    }
}

/// What the DMS held for this CPE's rule before the job acted: its result
/// records, by id (by `ts` for a record without one). One record per
/// upgrade of the CPE, so the list stays short.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DmsBaseline {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    results: Vec<ResultKey>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ResultKey {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    id: String,
    #[serde(default)]
    ts: i64,
}

impl ResultKey {
    fn of(result: &UpgradeResult) -> Self {
        ResultKey {
            id: result.id.clone(),
            ts: result.ts,
        }
    }
}

impl DmsBaseline {
    /// Whether `result` was on the DMS before the job acted. A record is
    /// known by its id, which an interim record keeps when the DMS
    /// updates it to the final result (and its `ts` with it).
    fn holds(&self, result: &UpgradeResult) -> bool {
        let key = ResultKey::of(result);
        self.results.iter().any(|seen| {
            if key.id.is_empty() {
                seen.id.is_empty() && seen.ts == key.ts
            } else {
                seen.id == key.id
            }
        })
    }

    /// This job's result among `results` (of this CPE's rule): the newest
    /// record the baseline does not hold.
    fn job_result(&self, results: Vec<UpgradeResult>) -> Option<UpgradeResult> {
        results
            .into_iter()
            .filter(|r| !self.holds(r))
            .max_by_key(|r| r.ts)
    }

    fn describe(&self, published: Option<i64>, own: usize) -> String {
        let mut note = match self.results.len() {
            0 => "baseline: no earlier result for this CPE".to_owned(),
            n => format!("baseline: {n} earlier result(s) for this CPE"),
        };
        if own > 0 {
            note.push_str(&format!("; {own} of this job already"));
        }
        if published.is_none() {
            note.push_str(" (the DMS sends no Date header: every result counted as earlier)");
        }
        note
    }
}

type Step = Baselined<DmsStep, DmsBaseline>;

impl Driver for Dms {
    type Step = Step;
    const KIND: DeviceKind = DeviceKind::Dms;

    fn first_step(&self) -> Step {
        Baselined::first(DmsStep::CreateRule)
    }

    fn step_name(step: &Step) -> &'static str {
        if step.baseline.is_none() && step.step.judges() {
            return BASELINE_STEP;
        }
        match step.step {
            DmsStep::CreateRule => "create_rule",
            DmsStep::SendConnectionRequest => "send_connection_request",
            DmsStep::PollResult => "poll_result",
            DmsStep::DeactivateRule => "deactivate_rule",
        }
    }

    async fn run(&self, step: Step, cx: &StepContext<'_>) -> Result<Next<Step>, StepError> {
        let cpe = cpe_id(cx)?;
        let rule = format!("UPGRADE_{cpe}");
        let Baselined { step, baseline } = step;
        let baseline = match baseline {
            Some(baseline) => baseline,
            None if step.judges() => return record_baseline(cx, &rule, step).await,
            None => DmsBaseline::default(),
        };
        let next = run_step(step, cx, cpe, &rule, &baseline).await?;
        Ok(baseline::carry(next, Some(&baseline)))
    }

    fn cleanup(&self, step: &Step) -> Option<Step> {
        match step.step {
            DmsStep::DeactivateRule => None,
            _ => Some(Baselined::with(
                DmsStep::DeactivateRule,
                step.baseline.clone(),
            )),
        }
    }
}

/// Records which results of the CPE's rule the DMS already holds, then
/// runs `step` with them.
async fn record_baseline(
    cx: &StepContext<'_>,
    rule: &str,
    step: DmsStep,
) -> Result<Next<Step>, StepError> {
    let (results, reply) = results_of(cx, rule).await?;
    let published = clock::published_on_device(cx.job, &reply);
    let (earlier, own): (Vec<_>, Vec<_>) = results
        .iter()
        .partition(|r| clock::before_job(Some(r.ts), published));
    let baseline = DmsBaseline {
        results: earlier.into_iter().map(ResultKey::of).collect(),
    };
    let note = baseline.describe(published, own.len());
    Ok(baseline::recorded(step, baseline, note))
}

async fn run_step(
    step: DmsStep,
    cx: &StepContext<'_>,
    cpe: &str,
    rule: &str,
    baseline: &DmsBaseline,
) -> Result<Next<DmsStep>, StepError> {
    match step {
        DmsStep::CreateRule => {
            if let Some(result) = job_result(cx, rule, baseline).await? {
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
            if let Some(result) = job_result(cx, rule, baseline).await? {
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
        DmsStep::PollResult => match job_result(cx, rule, baseline).await? {
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

/// This job's upgrade result, if the DMS has one: the newest record of
/// this CPE's rule that the baseline does not hold.
async fn job_result(
    cx: &StepContext<'_>,
    rule: &str,
    baseline: &DmsBaseline,
) -> Result<Option<UpgradeResult>, StepError> {
    let (results, _) = results_of(cx, rule).await?;
    Ok(baseline.job_result(results))
}

/// The result records of this CPE's rule (those naming another CPE or
/// rule left out), and the answer they came in.
async fn results_of(
    cx: &StepContext<'_>,
    rule: &str,
) -> Result<(Vec<UpgradeResult>, Reply), StepError> {
    let reply = basic(
        cx,
        cx.http
            .get(&format!("/v1/dyn/FirmwareResultStorage/.*?id={rule}")),
    )?
    .send()
    .await?;
    if reply.status == StatusCode::NOT_FOUND {
        return Ok((Vec::new(), reply));
    }
    let reply = reply.success()?;
    let answer: ResultReply = reply.json()?;
    if answer.code == 404 {
        return Ok((Vec::new(), reply));
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
    let cpe = cx.job.device.cpe_id.as_deref();
    let results = results
        .into_iter()
        .filter(|r| r.cpeid.as_deref().is_none_or(|c| Some(c) == cpe))
        .filter(|r| r.campaignid.as_deref().is_none_or(|c| c == rule))
        .collect();
    Ok((results, reply))
}

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;

    fn result(id: &str, ts: i64, code: u16) -> UpgradeResult {
        serde_json::from_value(json!({
            "id": id, "ts": ts, "cpeid": "C", "campaignid": "UPGRADE_C",
            "result": { "code": code, "message": "m" }
        }))
        .unwrap()
    }

    #[test]
    fn a_result_is_the_jobs_when_the_baseline_does_not_hold_it_whatever_its_time() {
        let baseline = DmsBaseline {
            results: vec![ResultKey::of(&result("old", 1_000, 200))],
        };
        // The DMS's clock stepped back: this job's record is stamped
        // before the earlier one, and is still this job's.
        let ours = baseline
            .job_result(vec![result("old", 1_000, 200), result("new", 400, 202)])
            .unwrap();
        assert_eq!(ours.id, "new");
        // An earlier record updated in place (same id, new time and code)
        // is still the earlier one.
        assert!(baseline.job_result(vec![result("old", 5_000, 500)]).is_none());
        // Of several of this job's records, the newest.
        let newest = baseline
            .job_result(vec![result("a", 10, 202), result("b", 20, 200)])
            .unwrap();
        assert_eq!(newest.id, "b");
    }

    #[test]
    fn records_without_ids_are_known_by_their_time() {
        let baseline = DmsBaseline {
            results: vec![ResultKey::of(&result("", 1_000, 200))],
        };
        assert!(baseline.job_result(vec![result("", 1_000, 200)]).is_none());
        assert_eq!(
            baseline.job_result(vec![result("", 999, 200)]).unwrap().ts,
            999
        );
    }

    #[test]
    fn steps_written_before_baselines_still_decode() {
        let old: Step = serde_json::from_value(json!("poll_result")).unwrap();
        assert_eq!(old, Baselined::first(DmsStep::PollResult));
        assert_eq!(Dms::step_name(&old), BASELINE_STEP);
        let cleanup = Baselined::first(DmsStep::DeactivateRule);
        assert_eq!(Dms::step_name(&cleanup), "deactivate_rule");
    }
}
