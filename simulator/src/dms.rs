//! A DMS (TR-069 ACS) northbound API with the CPEs it manages.
//!
//! Each CPE is a small state machine: it upgrades only when an enabled rule
//! with executions left names it *and* it receives a connection request;
//! the upgrade then takes a while, and ends as the CPE's fate says
//! (success, FaultCode 9010, or never reporting). Answers mimic the
//! documented examples, quirks included: the status sits in the body's
//! `code` while HTTP says 200, and `.*` is part of the paths.

use crate::{
    Expectation, Quirks, Simulated,
    build::{Builder, Seed},
    clock::Clock,
    faults::Fate,
    host::{Behaviour, Host, basic_auth_matches},
};
use axum::{
    Json, Router,
    extract::{Query, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use flotilla_common::{DeviceKind, ErrorClass};
use serde::Deserialize;
use serde_json::{Value, json};
use std::{
    collections::HashMap,
    net::SocketAddr,
    ops::RangeInclusive,
    sync::{Arc, Mutex, MutexGuard, OnceLock},
    time::{Duration, Instant},
};

const DMS_ERROR: &str =
    r#"{"code":500,"message":"Internal error","details":"simulated transient failure"}"#;

/// Starts the fleet's CPEs, `cpes_per_dms` behind each DMS host (plain
/// HTTP, as the DMS's northbound API usually is on its own network).
pub(crate) async fn simulate(fleet: &mut Builder<'_>) -> std::io::Result<()> {
    let spec = fleet.spec;
    let per_host = spec.cpes_per_dms.max(1);
    let fates = fleet.fates(DeviceKind::Dms);
    for (host_index, chunk) in fates.chunks(per_host).enumerate() {
        let first = host_index * per_host;
        let cpes: Vec<(String, Fate)> = chunk
            .iter()
            .enumerate()
            .map(|(i, fate)| (format!("00D09E-{:06}", first + i + 1), *fate))
            .collect();
        let behaviour = fleet.behaviour(Seed::new(DeviceKind::Dms, "host", host_index), DMS_ERROR);
        let dms = Dms::new(
            cpes.clone(),
            &spec.username,
            &spec.password,
            spec.upgrade_time.clone(),
            behaviour.clone(),
            &spec.quirks,
        );
        let slowdown = behaviour.slowdown.clone();
        let host = Host::start(
            SocketAddr::new(spec.ip, 0),
            dms.routes(),
            behaviour,
            None,
            fleet.stop.clone(),
        )
        .await?;
        fleet.can_slow_down(&host, slowdown);
        let address = Builder::url(host.addr(), false);
        let _ = dms.state.host.set(host);
        for (cpe_id, fate) in cpes {
            let mut device = crate::build::device(
                format!("cpe-{}", &cpe_id[7..]),
                DeviceKind::Dms,
                address.clone(),
            );
            device.cpe_id = Some(cpe_id.clone());
            let cpe = Cpe {
                dms: dms.clone(),
                cpe_id,
            };
            fleet.add(device, expectation(fate), Arc::new(cpe));
        }
    }
    Ok(())
}

/// What Flotilla should report for a CPE of this fate.
fn expectation(fate: Fate) -> Expectation {
    match fate {
        Fate::Upgrade => Expectation::succeeded(),
        Fate::Fail => Expectation::failed(ErrorClass::Device, "FaultCode 9010"),
        Fate::Silent => Expectation::timed_out(),
    }
}

/// One CPE of the fleet: its DMS and its id there.
pub struct Cpe {
    dms: Dms,
    cpe_id: String,
}

impl Cpe {
    /// The DMS the CPE is behind.
    pub fn dms(&self) -> &Dms {
        &self.dms
    }

    /// The CPE's id at its DMS.
    pub fn id(&self) -> &str {
        &self.cpe_id
    }

    /// The firmware file the CPE runs.
    pub fn firmware(&self) -> String {
        let mut inner = self.dms.lock();
        let clock = &self.dms.state.behaviour.clock;
        inner.cpes.get_mut(&self.cpe_id).map_or_else(String::new, |cpe| {
            settle(cpe, Instant::now(), clock);
            cpe.firmware.clone()
        })
    }

    /// Leaves the CPE's rule as an earlier campaign would have: for
    /// `file`, disabled, its execution spent.
    pub fn leave_rule(&self, file: &str) {
        self.dms.lock().rules.insert(
            format!("UPGRADE_{}", self.cpe_id),
            Rule {
                cpeid: self.cpe_id.clone(),
                file: file.to_owned(),
                enabled: false,
                automatic: false,
                executions_left: 0,
            },
        );
    }

    /// Moves the CPE's records `seconds` into the past, as if what made
    /// them happened that much earlier.
    pub fn age(&self, seconds: i64) {
        let mut inner = self.dms.lock();
        if let Some(cpe) = inner.cpes.get_mut(&self.cpe_id) {
            for result in &mut cpe.results {
                if let Some(ts) = result["ts"].as_i64() {
                    result["ts"] = json!(ts - seconds);
                }
            }
        }
    }
}

impl Simulated for Cpe {
    fn upgrades(&self) -> u32 {
        self.dms.upgrades_of(&self.cpe_id)
    }

    fn enabled_rules(&self) -> Vec<String> {
        let rule = format!("UPGRADE_{}", self.cpe_id);
        let enabled = self.dms.lock().rules.get(&rule).is_some_and(|r| r.enabled);
        if enabled { vec![rule] } else { Vec::new() }
    }
}

/// The fault text of a failed download, as a real ACS reports it.
pub const DOWNLOAD_FAILURE: &str =
    "Upgrade has failed with FaultCode 9010. FaultString: Download failure. File not found.";

/// One DMS and its CPEs; cheap to clone.
#[derive(Clone)]
pub struct Dms {
    state: Arc<DmsState>,
}

struct DmsState {
    inner: Mutex<Inner>,
    /// Set once the DMS is listening: it can be taken down.
    host: OnceLock<Host>,
    user: String,
    password: String,
    /// How long a CPE takes from connection request to result.
    upgrade_time: RangeInclusive<Duration>,
    behaviour: Behaviour,
    /// No interim result while an upgrade runs.
    no_interim_result: bool,
    /// Results answered whatever the query.
    unfiltered_results: bool,
    /// Creating a rule that exists answers 409.
    conflict_on_existing_rule: bool,
}

#[derive(Default)]
struct Inner {
    cpes: HashMap<String, CpeState>,
    /// By rule id (`UPGRADE_<cpeid>`).
    rules: HashMap<String, Rule>,
    /// When each upgrade under way ends, to count them.
    upgrading_until: Vec<Instant>,
    max_concurrent_upgrades: usize,
    requests: u64,
}

struct CpeState {
    fate: Fate,
    firmware: String,
    upgrade: Option<Upgrade>,
    results: Vec<Value>,
    upgrades_done: u32,
    connection_requests: u32,
    /// Rule creations naming this CPE (`POST FirmwareStorage`).
    rule_posts: u32,
}

struct Upgrade {
    rule: String,
    file: String,
    result_id: String,
    done_at: Instant,
}

struct Rule {
    cpeid: String,
    file: String,
    enabled: bool,
    automatic: bool,
    executions_left: u32,
}

impl Dms {
    pub(crate) fn new(
        cpes: impl IntoIterator<Item = (String, Fate)>,
        user: &str,
        password: &str,
        upgrade_time: RangeInclusive<Duration>,
        behaviour: Behaviour,
        quirks: &Quirks,
    ) -> Self {
        let cpes = cpes
            .into_iter()
            .map(|(id, fate)| {
                let cpe = CpeState {
                    fate,
                    firmware: "factory".to_owned(),
                    upgrade: None,
                    results: Vec::new(),
                    upgrades_done: 0,
                    connection_requests: 0,
                    rule_posts: 0,
                };
                (id, cpe)
            })
            .collect();
        Dms {
            state: Arc::new(DmsState {
                inner: Mutex::new(Inner {
                    cpes,
                    ..Inner::default()
                }),
                host: OnceLock::new(),
                user: user.to_owned(),
                password: password.to_owned(),
                upgrade_time,
                behaviour,
                no_interim_result: quirks.dms_no_interim_result,
                unfiltered_results: quirks.dms_unfiltered_results,
                conflict_on_existing_rule: quirks.dms_conflict_on_existing_rule,
            }),
        }
    }

    pub(crate) fn routes(&self) -> Router {
        Router::new()
            .route(
                "/v1/dyn/FirmwareStorage/.*",
                post(create_rule).put(update_rule),
            )
            .route("/v1/dyn/FirmwareResultStorage/.*", get(results))
            .route("/v1/method/SendCNR", post(send_cnr))
            .with_state(self.clone())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.state
            .inner
            .lock()
            .expect("the DMS lock is never poisoned: nothing panics while holding it")
    }

    /// Takes the DMS down (connections refused), as a restarting ACS
    /// would; its CPEs keep their state.
    pub fn take_down(&self) {
        if let Some(host) = self.state.host.get() {
            host.take_down();
        }
    }

    /// Brings the DMS back on its address.
    pub async fn bring_up(&self) -> std::io::Result<()> {
        match self.state.host.get() {
            Some(host) => host.bring_up().await,
            None => Ok(()),
        }
    }

    /// Rules that are still enabled (a finished campaign leaves none).
    pub fn enabled_rules(&self) -> Vec<String> {
        let inner = self.lock();
        let mut ids: Vec<String> = inner
            .rules
            .iter()
            .filter(|(_, rule)| rule.enabled)
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort();
        ids
    }

    /// How many times the CPE really upgraded (never more than once per
    /// campaign when the worker behaves).
    pub fn upgrades_of(&self, cpe_id: &str) -> u32 {
        let mut inner = self.lock();
        let now = Instant::now();
        let clock = &self.state.behaviour.clock;
        inner.cpes.get_mut(cpe_id).map_or(0, |cpe| {
            settle(cpe, now, clock);
            cpe.upgrades_done
        })
    }

    /// The acting calls the DMS received for a CPE: rule creations naming
    /// it, and connection requests to it (each once per job when nothing
    /// runs twice).
    pub fn acting_calls(&self, cpe_id: &str) -> ActingCalls {
        self.lock()
            .cpes
            .get(cpe_id)
            .map_or_else(ActingCalls::default, |cpe| ActingCalls {
                rule_posts: cpe.rule_posts,
                connection_requests: cpe.connection_requests,
            })
    }

    /// The most CPEs this DMS ever had upgrading at once.
    pub fn max_concurrent_upgrades(&self) -> usize {
        self.lock().max_concurrent_upgrades
    }

    /// Requests this DMS has answered (injected errors excluded).
    pub fn requests(&self) -> u64 {
        self.lock().requests
    }
}

/// What a DMS was asked to do for one CPE.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ActingCalls {
    pub rule_posts: u32,
    pub connection_requests: u32,
}

/// Completes an upgrade whose time has come, as the CPE's fate says.
fn settle(cpe: &mut CpeState, now: Instant, clock: &Clock) {
    let Some(upgrade) = &cpe.upgrade else { return };
    if now < upgrade.done_at || cpe.fate == Fate::Silent {
        return;
    }
    let (code, message) = match cpe.fate {
        Fate::Upgrade => {
            cpe.firmware = upgrade.file.clone();
            cpe.upgrades_done += 1;
            (200, "Upgrade successful".to_owned())
        }
        _ => (500, DOWNLOAD_FAILURE.to_owned()),
    };
    let id = upgrade.result_id.clone();
    let rule = upgrade.rule.clone();
    cpe.upgrade = None;
    if let Some(entry) = cpe.results.iter_mut().find(|r| r["id"] == id.as_str()) {
        entry["result"] = json!({ "code": code, "message": message });
        entry["ts"] = json!(clock.epoch_seconds());
    } else {
        cpe.results
            .push(result_entry(&id, &rule, code, &message, clock));
    }
}

fn result_entry(id: &str, rule: &str, code: u16, message: &str, clock: &Clock) -> Value {
    let cpeid = rule.strip_prefix("UPGRADE_").unwrap_or(rule);
    json!({
        "id": id,
        "status": true,
        "ts": clock.epoch_seconds(),
        "cpeid": cpeid,
        "rule_description": "string",
        "campaignid": rule,
        "result": { "code": code, "message": message },
    })
}

/// The DMS's answers put their status in the body, with HTTP 200.
fn storage(code: u16, details: Value) -> Response {
    Json(json!({
        "code": code,
        "message": "response from FirmwareStorage",
        "details": details,
    }))
    .into_response()
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [("www-authenticate", "Basic realm=\"DMS\"")],
        Json(json!({ "code": 401, "message": "Unauthorized", "details": "" })),
    )
        .into_response()
}

fn bad_request(details: impl Into<String>) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({ "code": 400, "message": "Bad request", "details": details.into() })),
    )
        .into_response()
}

fn authorized(dms: &Dms, headers: &HeaderMap) -> bool {
    dms.lock().requests += 1;
    basic_auth_matches(headers, &dms.state.user, &dms.state.password)
}

#[derive(Deserialize)]
struct RuleBody {
    id: String,
    enabled: bool,
    #[serde(default)]
    automatic: bool,
    #[serde(default)]
    file: Option<String>,
    #[serde(default)]
    condition: Option<Condition>,
    #[serde(default = "one")]
    executions: u32,
}

fn one() -> u32 {
    1
}

#[derive(Deserialize)]
struct Condition {
    cpeid: String,
}

async fn create_rule(
    State(dms): State<Dms>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if !authorized(&dms, &headers) {
        return unauthorized();
    }
    let rule: RuleBody = match serde_json::from_slice(&body) {
        Ok(rule) => rule,
        Err(e) => return bad_request(format!("invalid rule: {e}")),
    };
    let (Some(file), Some(condition)) = (rule.file, rule.condition) else {
        return bad_request("a rule needs a file and a condition");
    };
    if rule.id != format!("UPGRADE_{}", condition.cpeid) {
        return bad_request("the rule id must be UPGRADE_<cpeid>");
    }
    let mut inner = dms.lock();
    match inner.cpes.get_mut(&condition.cpeid) {
        Some(cpe) => cpe.rule_posts += 1,
        None => return storage(404, json!(format!("no CPE {}", condition.cpeid))),
    }
    match inner.rules.get_mut(&rule.id) {
        Some(_) if dms.state.conflict_on_existing_rule => {
            return (
                StatusCode::CONFLICT,
                Json(json!({ "code": 409, "message": "response from FirmwareStorage", "details": "rule exists" })),
            )
                .into_response();
        }
        // Re-posting an armed rule changes nothing: its executions are
        // already counted.
        Some(existing) if existing.enabled => {
            existing.file = file;
            existing.automatic = rule.automatic;
        }
        _ => {
            inner.rules.insert(
                rule.id.clone(),
                Rule {
                    cpeid: condition.cpeid,
                    file,
                    enabled: rule.enabled,
                    automatic: rule.automatic,
                    executions_left: rule.executions,
                },
            );
        }
    }
    storage(204, json!(""))
}

async fn update_rule(
    State(dms): State<Dms>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
    body: axum::body::Bytes,
) -> Response {
    if !authorized(&dms, &headers) {
        return unauthorized();
    }
    let Some(campaign) = query.get("campaignid") else {
        return bad_request("campaignid is required");
    };
    let update: Value = match serde_json::from_slice(&body) {
        Ok(update) => update,
        Err(e) => return bad_request(format!("invalid rule update: {e}")),
    };
    let mut inner = dms.lock();
    let Some(rule) = inner.rules.get_mut(campaign) else {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({ "code": 404, "message": "response from FirmwareStorage", "details": "no such rule" })),
        )
            .into_response();
    };
    if let Some(enabled) = update["enabled"].as_bool() {
        rule.enabled = enabled;
    }
    if let Some(automatic) = update["automatic"].as_bool() {
        rule.automatic = automatic;
    }
    if let Some(file) = update["file"].as_str() {
        rule.file = file.to_owned();
    }
    if let Some(executions) = update["executions"].as_u64() {
        rule.executions_left = executions as u32;
    }
    storage(204, json!(""))
}

async fn results(
    State(dms): State<Dms>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if !authorized(&dms, &headers) {
        return unauthorized();
    }
    let Some(rule) = query.get("id") else {
        return bad_request("id is required");
    };
    let mut inner = dms.lock();
    let cpe_id = rule.strip_prefix("UPGRADE_").unwrap_or(rule).to_owned();
    let now = Instant::now();
    let clock = &dms.state.behaviour.clock;
    let found: Vec<Value> = if dms.state.unfiltered_results {
        // Every record of every CPE, whatever the query asked for.
        inner
            .cpes
            .values_mut()
            .flat_map(|cpe| {
                settle(cpe, now, clock);
                cpe.results.clone()
            })
            .collect()
    } else {
        match inner.cpes.get_mut(&cpe_id) {
            Some(cpe) => {
                settle(cpe, now, clock);
                cpe.results
                    .iter()
                    .filter(|r| r["campaignid"] == rule.as_str())
                    .cloned()
                    .collect()
            }
            None => Vec::new(),
        }
    };
    let body = if found.is_empty() {
        json!({ "code": 404, "message": "response from FirmwareResultStorage", "details": "" })
    } else {
        json!({ "code": 200, "message": "response from FirmwareResultStorage", "details": found })
    };
    Json(body).into_response()
}

async fn send_cnr(State(dms): State<Dms>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    if !authorized(&dms, &headers) {
        return unauthorized();
    }
    let request: Value = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => return bad_request(format!("invalid request: {e}")),
    };
    let Some(cpe_id) = request
        .pointer("/search_options/cpe_id")
        .and_then(Value::as_str)
    else {
        return bad_request("search_options.cpe_id is required");
    };
    let upgrade_time = {
        let mut dice = dms
            .state
            .behaviour
            .dice
            .lock()
            .expect("dice lock is never poisoned");
        dice.duration(&dms.state.upgrade_time)
    };
    let now = Instant::now();
    let mut guard = dms.lock();
    let inner = &mut *guard;
    let Some(cpe) = inner.cpes.get_mut(cpe_id) else {
        return Json(json!({ "result": { "code": 404, "message": "Device not found" } }))
            .into_response();
    };
    cpe.connection_requests += 1;
    settle(cpe, now, &dms.state.behaviour.clock);
    let rule_id = format!("UPGRADE_{cpe_id}");
    if cpe.upgrade.is_none()
        && let Some(rule) = inner.rules.get_mut(&rule_id)
        && rule.enabled
        && rule.cpeid == cpe_id
        && rule.executions_left > 0
    {
        rule.executions_left -= 1;
        let done_at = now + upgrade_time;
        inner.upgrading_until.retain(|until| *until > now);
        inner.upgrading_until.push(done_at);
        inner.max_concurrent_upgrades = inner
            .max_concurrent_upgrades
            .max(inner.upgrading_until.len());
        let result_id = uuid::Uuid::new_v4().to_string();
        // The CPE reports the download as under way until it finishes
        // (unless this DMS reports only the end).
        if cpe.fate != Fate::Silent && !dms.state.no_interim_result {
            cpe.results.push(result_entry(
                &result_id,
                &rule_id,
                202,
                "Download in progress",
                &dms.state.behaviour.clock,
            ));
        }
        cpe.upgrade = Some(Upgrade {
            rule: rule_id,
            file: rule.file.clone(),
            result_id,
            done_at,
        });
    }
    Json(json!({ "result": { "code": 200, "message": "OK" } })).into_response()
}
