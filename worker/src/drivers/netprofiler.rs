//! Riverbed NetProfilers updating their connected Flow Gateways
//! (`mgmt.common_update` 1.0): one job per NetProfiler, one outcome per
//! gateway.
//!
//! Steps, each reading the device before acting:
//!
//! 1. `start_backups` / `await_backups` (when `[drivers.netprofiler]` has
//!    `backup_first`): back up every Flow Gateway listed in the inventory
//!    row through its own `mgmt.gateway_backup` API, and go on only once
//!    every backup of this job is `COMPLETED`; an `ERROR` ends the job
//!    before anything is updated;
//! 2. `upload`: `PUT images/upload` sends the ISO staged on the NetProfiler
//!    to the gateways, unless they already show it as `Update To Version`;
//! 3. `init` / `await_init`: `POST update/init`, whose answer is one string
//!    per gateway (`"10.1.x.x - Operation Failed"`); any failure ends the
//!    job before `start`. Then wait for every gateway to be `initialized`;
//! 4. `start`: `POST update/start`, only when no gateway is already
//!    `running` or updated, so a redelivered step never starts a second
//!    update;
//! 5. `await_update`: poll `GET update` until every gateway is back at
//!    `neutral` on the target version, or one reaches `failed_graceful` /
//!    `failed_critical` (the job then ends at once, failed; critical marks
//!    it for attention).
//!
//! The terminal event's detail has one entry per gateway: IP, versions,
//! state, descriptions and outcome (`succeeded`, `failed`, `unfinished` for
//! one still updating when a sibling failed, `not_started`).

use super::{
    Driver, Next, StepContext, StepError, flowgateway,
    riverbed::{
        self,
        auth::{Login, Tokens},
        lenient,
    },
};
use flotilla_common::{
    DeviceKind, Ending, ErrorClass,
    settings::{self, GatewayOperation, NetprofilerSettings},
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, BTreeSet};

const UPDATE: &str = "/api/mgmt.common_update/1.0/update";
const UPLOAD: &str = "/api/mgmt.common_update/1.0/images/upload";
const INIT: &str = "/api/mgmt.common_update/1.0/update/init";
const START: &str = "/api/mgmt.common_update/1.0/update/start";

/// The Flow Gateways' API credentials: fields with this prefix in the
/// NetProfiler's reference, or its own fields when it has none.
const GATEWAY_FIELDS: &str = "gateway_";

#[derive(Default)]
pub struct Netprofiler {
    tokens: Tokens,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetprofilerStep {
    StartBackups,
    AwaitBackups,
    Upload,
    Init,
    AwaitInit,
    Start,
    /// `refused`: gateways whose start answer was a failure, by IP, with
    /// the answer.
    AwaitUpdate {
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        refused: BTreeMap<String, String>,
    },
}

impl Driver for Netprofiler {
    type Step = NetprofilerStep;
    const KIND: DeviceKind = DeviceKind::Netprofiler;

    fn first_step(&self) -> NetprofilerStep {
        NetprofilerStep::StartBackups
    }

    fn step_name(step: &NetprofilerStep) -> &'static str {
        match step {
            NetprofilerStep::StartBackups => "start_backups",
            NetprofilerStep::AwaitBackups => "await_backups",
            NetprofilerStep::Upload => "upload",
            NetprofilerStep::Init => "init",
            NetprofilerStep::AwaitInit => "await_init",
            NetprofilerStep::Start => "start",
            NetprofilerStep::AwaitUpdate { .. } => "await_update",
        }
    }

    async fn run(
        &self,
        step: NetprofilerStep,
        cx: &StepContext<'_>,
    ) -> Result<Next<NetprofilerStep>, StepError> {
        let settings: NetprofilerSettings = settings::read(&cx.job.settings).map_err(|e| {
            StepError::device(format!("the job's [drivers.netprofiler] settings: {e}"))
        })?;
        match step {
            NetprofilerStep::StartBackups | NetprofilerStep::AwaitBackups => {
                self.backups(step, &settings, cx).await
            }
            NetprofilerStep::Upload => self.upload(&settings, cx).await,
            NetprofilerStep::Init => self.init(cx).await,
            NetprofilerStep::AwaitInit => self.await_init(cx).await,
            NetprofilerStep::Start => self.start(cx).await,
            NetprofilerStep::AwaitUpdate { refused } => self.await_update(refused, cx).await,
        }
    }

    fn cleanup(&self, _step: &NetprofilerStep) -> Option<NetprofilerStep> {
        // The API has no way to stop or undo an update or a backup.
        None
    }
}

impl Netprofiler {
    /// Starts (`start_backups`) or follows (`await_backups`) a backup of
    /// every listed gateway.
    async fn backups(
        &self,
        step: NetprofilerStep,
        settings: &NetprofilerSettings,
        cx: &StepContext<'_>,
    ) -> Result<Next<NetprofilerStep>, StepError> {
        if !settings.backup_first {
            return Ok(Next::run(NetprofilerStep::Upload));
        }
        let gateways = &cx.job.device.gateways;
        if gateways.is_empty() {
            return Ok(Next::end(Ending::failed(
                ErrorClass::Config,
                "the campaign requires backups first, but the inventory row lists no gateways \
                 to back up; nothing was updated",
            )));
        }
        let login = Login::common(cx.credentials, GATEWAY_FIELDS)?;
        let since = riverbed::since(cx.job);
        let mut pending = Vec::new();
        let mut done = Vec::new();
        let mut started = Vec::new();
        for url in gateways {
            let label = format!("gateway {}", host_of(url));
            let http = cx.http.at(url, &label);
            let run = flowgateway::read_run(&self.tokens, &http, &login, GatewayOperation::Backup)
                .await?;
            match flowgateway::Progress::of(run.as_ref(), since) {
                flowgateway::Progress::Completed(run) => {
                    done.push(format!("{}: {}", host_of(url), run.summary()))
                }
                flowgateway::Progress::Failed(message) => {
                    return Ok(Next::end(
                        Ending::failed(
                            ErrorClass::Device,
                            format!(
                                "backup of gateway {} failed: {message}; the update was not started",
                                host_of(url)
                            ),
                        )
                        .with_detail(json!({ "backup_failed": host_of(url) })),
                    ));
                }
                flowgateway::Progress::Executing(message) => {
                    pending.push(format!("{}: executing {message}", host_of(url)))
                }
                // A poll never starts a backup: only `start_backups` does,
                // once, so a redelivered poll cannot start a second one.
                flowgateway::Progress::NotStarted if step == NetprofilerStep::AwaitBackups => {
                    pending.push(format!("{}: not started yet", host_of(url)))
                }
                flowgateway::Progress::NotStarted => {
                    let secrets = flowgateway::Secrets::from(cx.credentials, &settings.backup)?;
                    flowgateway::start_run(
                        &self.tokens,
                        &http,
                        &login,
                        GatewayOperation::Backup,
                        &settings.backup,
                        &secrets,
                        false,
                    )
                    .await?;
                    started.push(host_of(url));
                    pending.push(format!("{}: started", host_of(url)));
                }
            }
        }
        if pending.is_empty() {
            return Ok(Next::run(NetprofilerStep::Upload)
                .note(format!("every backup completed: {}", done.join("; "))));
        }
        let note = format!(
            "backups: {} of {} completed; {}",
            done.len(),
            gateways.len(),
            pending.join("; ")
        );
        Ok(Next::poll(NetprofilerStep::AwaitBackups).note(note))
    }

    async fn upload(
        &self,
        settings: &NetprofilerSettings,
        cx: &StepContext<'_>,
    ) -> Result<Next<NetprofilerStep>, StepError> {
        let login = Login::common(cx.credentials, "")?;
        let gateways = self.status(cx, &login).await?;
        let target = &cx.job.target.version;
        if gateways.values().all(|g| g.is_updated(target)) {
            return Ok(Next::end(outcome(&gateways, target, &BTreeMap::new()))
                .note("every gateway already runs the target version"));
        }
        if settings.backup_first {
            let listed: BTreeSet<String> = cx.job.device.gateways.iter().map(host_of).collect();
            let unlisted: Vec<&str> = gateways
                .keys()
                .filter(|ip| !listed.contains(ip.as_str()))
                .map(String::as_str)
                .collect();
            // Gateways listed by name cannot be matched to the IPs the
            // NetProfiler reports; only listings by IP are checked.
            let by_ip = cx.job.device.gateways.iter().all(|u| {
                matches!(
                    u.host(),
                    Some(url::Host::Ipv4(_)) | Some(url::Host::Ipv6(_))
                )
            });
            if by_ip && !unlisted.is_empty() {
                return Ok(Next::end(Ending::failed(
                    ErrorClass::Config,
                    format!(
                        "gateway(s) {} are connected to the NetProfiler but not listed for \
                         backup; nothing was updated",
                        unlisted.join(", ")
                    ),
                )));
            }
        }
        if gateways
            .values()
            .any(|g| g.state.is_under_way() || g.update_to.as_deref() == Some(target.as_str()))
        {
            return Ok(Next::run(NetprofilerStep::Init).note("the gateways already have the image"));
        }
        riverbed::success(
            self.tokens
                .send(&cx.http, &login, || Ok(cx.http.put(UPLOAD)))
                .await?,
        )?;
        Ok(Next::run(NetprofilerStep::Init)
            .note(format!("image sent to {} gateway(s)", gateways.len())))
    }

    async fn init(&self, cx: &StepContext<'_>) -> Result<Next<NetprofilerStep>, StepError> {
        let login = Login::common(cx.credentials, "")?;
        let gateways = self.status(cx, &login).await?;
        if gateways.values().any(|g| g.state == State::Running) {
            return Ok(Next::run(NetprofilerStep::AwaitUpdate {
                refused: BTreeMap::new(),
            })
            .note("the update is already running"));
        }
        if gateways.values().any(|g| g.state == State::Initializing)
            || gateways.values().all(|g| g.state == State::Initialized)
        {
            return Ok(Next::run(NetprofilerStep::AwaitInit).note("already initializing"));
        }
        let reply = riverbed::success(
            self.tokens
                .send(&cx.http, &login, || Ok(cx.http.post(INIT)))
                .await?,
        )?;
        let answers = parse_answers(&reply)?;
        let refused = self
            .refusals(cx, &login, &answers, |state| state.is_under_way())
            .await?;
        if !refused.is_empty() {
            let mut detail = report(&gateways, &cx.job.target.version, &BTreeMap::new());
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
            return Ok(Next::end(
                Ending::failed(
                    ErrorClass::Device,
                    format!(
                        "initialization failed on gateway(s) {}; the update was not started",
                        names.join(", ")
                    ),
                )
                .with_detail(json!({ "gateways": detail })),
            ));
        }
        Ok(Next::poll(NetprofilerStep::AwaitInit).note(format!(
            "initialization accepted by {} gateway(s)",
            answers.len()
        )))
    }

    async fn await_init(&self, cx: &StepContext<'_>) -> Result<Next<NetprofilerStep>, StepError> {
        let login = Login::common(cx.credentials, "")?;
        let gateways = self.status(cx, &login).await?;
        if gateways.values().any(|g| g.state.failed()) {
            return Ok(Next::end(outcome(
                &gateways,
                &cx.job.target.version,
                &BTreeMap::new(),
            )));
        }
        if gateways.values().any(|g| g.state == State::Running) {
            return Ok(Next::run(NetprofilerStep::AwaitUpdate {
                refused: BTreeMap::new(),
            }));
        }
        if gateways.values().all(|g| g.state == State::Initialized) {
            return Ok(Next::run(NetprofilerStep::Start).note("every gateway initialized"));
        }
        if gateways.values().any(|g| g.state == State::Initializing) {
            return Ok(Next::poll(NetprofilerStep::AwaitInit).note(states(&gateways)));
        }
        // Nothing initializing, yet some gateway is not initialized: its
        // init failed (its answer may have been lost to a retry).
        let stuck: BTreeMap<String, String> = gateways
            .iter()
            .filter(|(_, g)| g.state != State::Initialized)
            .map(|(ip, g)| {
                (
                    ip.clone(),
                    format!("still {} after init", state_name(g.state)),
                )
            })
            .collect();
        Ok(Next::end(init_failed(
            &gateways,
            &cx.job.target.version,
            &stuck,
        )))
    }

    async fn start(&self, cx: &StepContext<'_>) -> Result<Next<NetprofilerStep>, StepError> {
        let login = Login::common(cx.credentials, "")?;
        let gateways = self.status(cx, &login).await?;
        let target = &cx.job.target.version;
        // Observe before acting: an update already running or done must not
        // be started again.
        if gateways
            .values()
            .any(|g| g.state == State::Running || g.state.failed() || g.is_updated(target))
        {
            return Ok(Next::run(NetprofilerStep::AwaitUpdate {
                refused: BTreeMap::new(),
            })
            .note("the update was already started"));
        }
        if !gateways.values().all(|g| g.state == State::Initialized) {
            return Ok(Next::poll(NetprofilerStep::AwaitInit).note(states(&gateways)));
        }
        let reply = riverbed::success(
            self.tokens
                .send(&cx.http, &login, || Ok(cx.http.post(START)))
                .await?,
        )?;
        let answers = parse_answers(&reply)?;
        let refused = self
            .refusals(cx, &login, &answers, |state| {
                state == State::Running || state.failed()
            })
            .await?;
        let note = format!(
            "update started on {} of {} gateway(s)",
            answers.len() - refused.len(),
            answers.len()
        );
        Ok(Next::poll(NetprofilerStep::AwaitUpdate { refused }).note(note))
    }

    async fn await_update(
        &self,
        refused: BTreeMap<String, String>,
        cx: &StepContext<'_>,
    ) -> Result<Next<NetprofilerStep>, StepError> {
        let login = Login::common(cx.credentials, "")?;
        let gateways = self.status(cx, &login).await?;
        let target = &cx.job.target.version;
        // A gateway still `initialized` once none is running never started
        // (its start answer may have been lost to a retry).
        let mut refused = refused;
        if !gateways.values().any(|g| g.state == State::Running) {
            for (ip, g) in &gateways {
                if g.state == State::Initialized {
                    refused
                        .entry(ip.clone())
                        .or_insert_with(|| "initialized, but the update never started".to_owned());
                }
            }
        }
        let settled = gateways
            .iter()
            .all(|(ip, g)| g.is_updated(target) || g.state.failed() || refused.contains_key(ip));
        let failed = gateways
            .iter()
            .any(|(ip, g)| g.state.failed() || refused.contains_key(ip));
        if settled || failed {
            return Ok(Next::end(outcome(&gateways, target, &refused)).note(states(&gateways)));
        }
        Ok(Next::poll(NetprofilerStep::AwaitUpdate { refused }).note(states(&gateways)))
    }

    /// The gateways whose answer was a failure, with the answer; a
    /// gateway refused because it is already where the operation leads
    /// (`done`: another copy of this step got there first) is not one.
    async fn refusals(
        &self,
        cx: &StepContext<'_>,
        login: &Login,
        answers: &[Answer],
        done: impl Fn(State) -> bool,
    ) -> Result<BTreeMap<String, String>, StepError> {
        let mut refused: BTreeMap<String, String> = answers
            .iter()
            .filter(|a| !a.succeeded)
            .map(|a| (a.ip.clone(), a.text.clone()))
            .collect();
        if !refused.is_empty() {
            let gateways = self.status(cx, login).await?;
            refused.retain(|ip, _| !gateways.get(ip).is_some_and(|g| done(g.state)));
        }
        Ok(refused)
    }

    /// `GET update`: every connected gateway's status, by IP.
    async fn status(
        &self,
        cx: &StepContext<'_>,
        login: &Login,
    ) -> Result<BTreeMap<String, Gateway>, StepError> {
        let reply = riverbed::success(
            self.tokens
                .send(&cx.http, login, || Ok(cx.http.get(UPDATE)))
                .await?,
        )?;
        let gateways = parse_status(&reply.json()?).map_err(|problem| {
            StepError::garbage(format!("{}: {problem}: {}", reply.what, reply.quote()))
        })?;
        if gateways.is_empty() {
            return Err(StepError::device(format!(
                "{} lists no connected Flow Gateway: nothing to update",
                reply.what
            )));
        }
        Ok(gateways)
    }
}

fn host_of(url: &url::Url) -> String {
    match url.host() {
        Some(url::Host::Ipv6(ip)) => ip.to_string(),
        Some(host) => host.to_string(),
        None => url.to_string(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum State {
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

    fn failed(self) -> bool {
        matches!(self, State::FailedGraceful | State::FailedCritical)
    }

    fn is_under_way(self) -> bool {
        matches!(
            self,
            State::Initializing | State::Initialized | State::Running
        )
    }
}

/// One gateway's entry of `GET update`.
#[derive(Debug, Clone, PartialEq)]
struct Gateway {
    state: State,
    current: Option<String>,
    update_to: Option<String>,
    description: Option<String>,
    internal_description: Option<String>,
}

impl Gateway {
    fn is_updated(&self, target: &str) -> bool {
        self.state == State::Neutral && self.current.as_deref() == Some(target)
    }
}

/// Reads `GET update`. Documented as an array of objects keyed by gateway
/// IP; a bare object keyed by IP is read too.
fn parse_status(body: &Value) -> Result<BTreeMap<String, Gateway>, String> {
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
            let status = status
                .as_object()
                .ok_or_else(|| format!("gateway {ip:?}: its status is not an object"))?;
            let state_text =
                lenient::text(status, "State").ok_or_else(|| format!("gateway {ip}: no State"))?;
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

/// One line of an init or start answer.
#[derive(Debug, Clone, PartialEq)]
struct Answer {
    ip: String,
    succeeded: bool,
    /// The answer as given, after the IP (`Operation Failed`).
    text: String,
}

/// Reads an init or start answer: `["10.1.x.x - Operation Failed",
/// "10.2.x.x - Operation Successfull"]` (sic).
fn parse_answers(reply: &crate::device_http::Reply) -> Result<Vec<Answer>, StepError> {
    let lines: Vec<String> = match reply.json::<Value>()? {
        Value::Array(items) => items
            .into_iter()
            .map(|item| match item {
                Value::String(line) => Ok(line),
                other => Err(other),
            })
            .collect::<Result<_, _>>()
            .map_err(|other| {
                StepError::garbage(format!(
                    "{} answered {other} where a gateway's result was expected",
                    reply.what
                ))
            })?,
        Value::String(line) => vec![line],
        _ => {
            return Err(StepError::garbage(format!(
                "{} answered something that is not a list of gateway results: {}",
                reply.what,
                reply.quote()
            )));
        }
    };
    lines
        .iter()
        .map(|line| {
            parse_answer(line).ok_or_else(|| {
                StepError::garbage(format!(
                    "{} answered {line:?}, not \"<gateway IP> - Operation Successful|Failed\"",
                    reply.what
                ))
            })
        })
        .collect()
}

fn parse_answer(line: &str) -> Option<Answer> {
    let (ip, text) = line.split_once(" - ")?;
    let lower = text.trim().to_ascii_lowercase();
    let succeeded = if lower.contains("fail") {
        false
    } else if lower.contains("success") {
        true
    } else {
        return None;
    };
    Some(Answer {
        ip: ip.trim().to_owned(),
        succeeded,
        text: text.trim().to_owned(),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum GatewayOutcome {
    Succeeded,
    Failed,
    /// Still updating when a sibling's failure ended the job.
    Unfinished,
    NotStarted,
}

/// A gateway's line of the terminal event's detail.
#[derive(Debug, Clone, Serialize)]
struct GatewayReport {
    ip: String,
    outcome: GatewayOutcome,
    state: State,
    #[serde(skip_serializing_if = "Option::is_none")]
    current_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    update_to_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    state_description: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    internal_state_description: Option<String>,
    /// The init or start answer, when it was a failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    answer: Option<String>,
}

fn report(
    gateways: &BTreeMap<String, Gateway>,
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
            update_to_version: g.update_to.clone(),
            state_description: g.description.clone(),
            internal_state_description: g.internal_description.clone(),
            answer: refused.get(ip).cloned(),
        })
        .collect()
}

/// The ending of a job whose init failed on the `refused` gateways: they
/// failed, the others were not started.
fn init_failed(
    gateways: &BTreeMap<String, Gateway>,
    target: &str,
    refused: &BTreeMap<String, String>,
) -> Ending {
    let mut detail = report(gateways, target, &BTreeMap::new());
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
    Ending::failed(
        ErrorClass::Device,
        format!(
            "initialization failed on gateway(s) {}; the update was not started",
            names.join(", ")
        ),
    )
    .with_detail(json!({ "gateways": detail }))
}

/// The job's ending from the gateways' states: failed if any gateway
/// failed (for attention if one failed critically), succeeded if all run
/// the target version.
fn outcome(
    gateways: &BTreeMap<String, Gateway>,
    target: &str,
    refused: &BTreeMap<String, String>,
) -> Ending {
    let detail = report(gateways, target, refused);
    let failures: Vec<String> = detail
        .iter()
        .filter(|g| g.outcome == GatewayOutcome::Failed)
        .map(|g| {
            let mut words = format!("{} {}", g.ip, state_name(g.state));
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
        return Ending::succeeded().with_detail(detail);
    }
    let ending = Ending::failed(
        ErrorClass::Device,
        format!("gateway update failed: {}", failures.join("; ")),
    )
    .with_detail(detail);
    if critical {
        ending.needing_attention()
    } else {
        ending
    }
}

fn state_name(state: State) -> &'static str {
    match state {
        State::Neutral => "neutral",
        State::Initializing => "initializing",
        State::Initialized => "initialized",
        State::Running => "running",
        State::FailedGraceful => "failed_graceful",
        State::FailedCritical => "failed_critical",
    }
}

/// The gateways' states in a few words, for step events.
fn states(gateways: &BTreeMap<String, Gateway>) -> String {
    gateways
        .iter()
        .map(|(ip, g)| {
            format!(
                "{ip} {} {}",
                state_name(g.state),
                g.current.as_deref().unwrap_or("?")
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }

    #[test]
    fn answers_are_read_per_gateway_whatever_the_spelling() {
        let failed = parse_answer("10.1.0.1 - Operation Failed").unwrap();
        assert_eq!(failed.ip, "10.1.0.1");
        assert!(!failed.succeeded);
        assert!(
            parse_answer("10.2.0.1 - Operation Successfull")
                .unwrap()
                .succeeded
        );
        assert!(
            parse_answer("10.2.0.1 - Operation Successful")
                .unwrap()
                .succeeded
        );
        assert_eq!(parse_answer("10.2.0.1 Operation Successful"), None);
        assert_eq!(parse_answer("10.2.0.1 - maybe"), None);
    }

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
        let ending = outcome(&gateways, "10.23", &BTreeMap::new());
        assert_eq!(ending.outcome, flotilla_common::Outcome::Failed);
        assert!(ending.needs_attention);
        assert!(ending.error.unwrap().contains("10.0.0.3 failed_critical"));
        let detail = ending.detail.unwrap();
        assert_eq!(detail["gateways"][1]["outcome"], "unfinished");
        assert_eq!(detail["gateways"][0]["outcome"], "succeeded");
    }
}
