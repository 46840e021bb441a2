//! A Riverbed Flow Gateway: its backup/restore API (`mgmt.gateway_backup`
//! 1.0), and the update state a NetProfiler drives through
//! `mgmt.common_update` (see [`crate::netprofiler`]).
//!
//! Backups and restores take a while (`EXECUTING`), then end `COMPLETED`, or
//! `ERROR` for a gateway given [`GatewayFault::RunError`]. Answers follow the
//! documented examples, quirks included: the backup status is an array of
//! one object, and `timeStamp` is an integer.

use crate::{
    Expectation, RIVERBED_ERROR, Simulated,
    build::{Builder, Seed},
    clock::Clock,
    faults::Dice,
    riverbed_auth::{self, Auth},
};
use axum::{
    Json, Router,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use flotilla_common::DeviceKind;
use serde_json::{Map, Value, json};
use std::{
    net::IpAddr,
    ops::RangeInclusive,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

/// What a failed backup or restore reports.
pub const RUN_ERROR: &str = "ssh: connect to host backup-host port 22: Connection timed out";
/// The failed_graceful descriptions.
pub const GRACEFUL_DESCRIPTION: &str = "Software update failed; the previous version was kept";
pub const GRACEFUL_INTERNAL: &str = "Pre-install check failed: not enough space on /mnt/data";
/// The failed_critical descriptions.
pub const CRITICAL_DESCRIPTION: &str = "Software update failed; the system may be unusable";
pub const CRITICAL_INTERNAL: &str = "Installing package flowgateway-core failed: exit status 1";

/// The version every simulated gateway runs before its update.
pub const PREVIOUS_VERSION: &str = "previous";

/// What goes wrong on a gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GatewayFault {
    /// Backups and restores end in `ERROR`.
    RunError,
    /// Its init answer is `"<ip> - Operation Failed"`.
    InitFails,
    /// Its start answer is `"<ip> - Operation Failed"`.
    StartFails,
    /// The update ends `failed_graceful`.
    FailGraceful,
    /// The update ends `failed_critical`.
    FailCritical,
    /// The update runs forever.
    Stuck,
    /// Its API refuses the fleet's credentials.
    RefusedCredentials,
}

/// Starts the fleet's standalone Flow Gateways (backup or restore jobs).
pub(crate) async fn simulate(fleet: &mut Builder<'_>) -> std::io::Result<()> {
    let kind = DeviceKind::Flowgateway;
    let faults = fleet.faults(
        kind,
        &[GatewayFault::RunError, GatewayFault::RefusedCredentials],
        None,
    )?;
    let spec = fleet.spec;
    for (i, fault) in faults.into_iter().enumerate() {
        let refused = fault == Some(GatewayFault::RefusedCredentials);
        let gateway = gateway(fleet, spec.ip, fault, refused, Seed::new(kind, "device", i));
        let behaviour = fleet.behaviour(Seed::new(kind, "host", i), RIVERBED_ERROR);
        let host = fleet
            .serve(spec.ip, gateway.routes(), behaviour, spec.https)
            .await?;
        let device = crate::build::device(
            format!("fg-{:04}", i + 1),
            kind,
            Builder::url(host.addr(), spec.https),
        );
        fleet.add(device, expectation(fault), Arc::new(gateway));
    }
    Ok(())
}

/// What Flotilla should report for a standalone gateway with `fault`.
fn expectation(fault: Option<GatewayFault>) -> Expectation {
    match fault {
        Some(GatewayFault::RunError) => Expectation::device(RUN_ERROR),
        Some(GatewayFault::RefusedCredentials) => Expectation::refused(),
        Some(GatewayFault::Stuck) => Expectation::timed_out(),
        // Update faults do not touch backups and restores.
        _ => Expectation::succeeded(),
    }
}

/// A gateway of the fleet at `ip`; `refuses`: its API refuses the fleet's
/// credentials.
pub(crate) fn gateway(
    fleet: &Builder<'_>,
    ip: IpAddr,
    fault: Option<GatewayFault>,
    refuses: bool,
    seed: Seed,
) -> FlowGateway {
    let spec = fleet.spec;
    FlowGateway::new(GatewaySpec {
        ip,
        fault,
        auth: fleet.auth(refuses, true),
        run_time: spec.operation_time.clone(),
        update_time: spec.upgrade_time.clone(),
        dice: fleet.dice(seed),
        backup_password: &spec.backup_password,
        clock: fleet.clock(),
        async_start: spec.quirks.netprofiler_async_start,
    })
}

impl Simulated for FlowGateway {
    /// The backups and restores it started.
    fn upgrades(&self) -> u32 {
        self.backups_started() + self.restores_started()
    }
}

/// One gateway; cheap to clone.
#[derive(Clone)]
pub struct FlowGateway {
    state: Arc<Shared>,
}

struct Shared {
    ip: IpAddr,
    inner: Mutex<Inner>,
    pub(crate) auth: Auth,
    /// How long a backup, restore or init takes.
    run_time: RangeInclusive<Duration>,
    update_time: RangeInclusive<Duration>,
    dice: Arc<Mutex<Dice>>,
    /// The SSH password of remote backup hosts.
    backup_password: String,
    clock: Clock,
    /// `start` answers at once; the update begins a while later.
    async_start: bool,
}

struct Inner {
    fault: Option<GatewayFault>,
    version: String,
    staged: Option<String>,
    update: Phase,
    backup: Option<RunRecord>,
    last_successful: Option<RunRecord>,
    restore: Option<RunRecord>,
    backups_started: u32,
    restores_started: u32,
    updates_started: u32,
    updates_done: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Neutral,
    Initializing(Instant),
    Initialized,
    /// Started, but (asynchronously) not running yet: shows `initialized`.
    Starting { runs_at: Instant, until: Instant },
    Running(Instant),
    FailedGraceful,
    FailedCritical,
}

#[derive(Clone)]
struct RunRecord {
    host: String,
    username: String,
    path: String,
    started: i64,
    done_at: Instant,
    status: &'static str,
    message: String,
}

struct GatewaySpec<'a> {
    ip: IpAddr,
    fault: Option<GatewayFault>,
    auth: Auth,
    run_time: RangeInclusive<Duration>,
    update_time: RangeInclusive<Duration>,
    dice: Arc<Mutex<Dice>>,
    backup_password: &'a str,
    clock: Clock,
    async_start: bool,
}

impl FlowGateway {
    fn new(spec: GatewaySpec<'_>) -> Self {
        FlowGateway {
            state: Arc::new(Shared {
                ip: spec.ip,
                inner: Mutex::new(Inner {
                    fault: spec.fault,
                    version: PREVIOUS_VERSION.to_owned(),
                    staged: None,
                    update: Phase::Neutral,
                    backup: None,
                    last_successful: None,
                    restore: None,
                    backups_started: 0,
                    restores_started: 0,
                    updates_started: 0,
                    updates_done: 0,
                }),
                auth: spec.auth,
                run_time: spec.run_time,
                update_time: spec.update_time,
                dice: spec.dice,
                backup_password: spec.backup_password.to_owned(),
                clock: spec.clock,
                async_start: spec.async_start,
            }),
        }
    }

    pub(crate) fn routes(&self) -> Router {
        Router::new()
            .route(
                "/api/mgmt.gateway_backup/1.0/backup",
                get(backup_status).post(start_backup),
            )
            .route(
                "/api/mgmt.gateway_backup/1.0/restore",
                get(restore_status).post(start_restore),
            )
            .route(
                "/api/common/1.0/oauth/token",
                post(riverbed_auth::oauth_token).with_state(self.state.auth.clone()),
            )
            .with_state(self.clone())
    }

    pub fn ip(&self) -> IpAddr {
        self.state.ip
    }

    pub fn fault(&self) -> Option<GatewayFault> {
        self.lock().fault
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.state
            .inner
            .lock()
            .expect("the gateway lock is never poisoned: nothing panics while holding it")
    }

    fn duration(&self, range: &RangeInclusive<Duration>) -> Duration {
        self.state
            .dice
            .lock()
            .expect("dice lock is never poisoned")
            .duration(range)
    }

    /// Backups started on this gateway.
    pub fn backups_started(&self) -> u32 {
        self.lock().backups_started
    }

    pub fn restores_started(&self) -> u32 {
        self.lock().restores_started
    }

    /// Updates started (a correct rollout never starts two).
    pub fn updates_started(&self) -> u32 {
        self.lock().updates_started
    }

    /// Installs `version` as if an earlier update had (a gateway already on
    /// the target when a retry campaign starts).
    pub fn preinstall(&self, version: &str) {
        let mut inner = self.lock();
        inner.version = version.to_owned();
        inner.staged = Some(version.to_owned());
    }

    /// Moves the gateway's backups and restores `seconds` into the past, as
    /// if they had started that much earlier.
    pub fn age(&self, seconds: i64) {
        let mut guard = self.lock();
        let inner = &mut *guard;
        for run in [&mut inner.backup, &mut inner.restore, &mut inner.last_successful]
            .into_iter()
            .flatten()
        {
            run.started -= seconds;
        }
    }

    /// The version the gateway runs.
    pub fn version(&self) -> String {
        let mut inner = self.lock();
        settle(&mut inner, Instant::now());
        inner.version.clone()
    }

    // The NetProfiler's side: mgmt.common_update on this gateway.

    pub(crate) fn stage(&self, version: &str) {
        self.lock().staged = Some(version.to_owned());
    }

    /// `POST update/init` for this gateway: whether it succeeded.
    pub(crate) fn init(&self) -> bool {
        let run_time = self.duration(&self.state.run_time);
        let mut inner = self.lock();
        settle(&mut inner, Instant::now());
        // A gateway already running the staged version has nothing to
        // update to.
        let ready = matches!(inner.update, Phase::Neutral | Phase::FailedGraceful)
            && inner.staged.as_ref().is_some_and(|v| *v != inner.version);
        if !ready || inner.fault == Some(GatewayFault::InitFails) {
            return false;
        }
        inner.update = Phase::Initializing(Instant::now() + run_time);
        true
    }

    /// `POST update/start` for this gateway: whether it started.
    pub(crate) fn start(&self) -> bool {
        let update_time = self.duration(&self.state.update_time);
        let mut inner = self.lock();
        settle(&mut inner, Instant::now());
        if matches!(inner.update, Phase::Starting { .. }) {
            // Asked again while it has not begun: it is starting already.
            return true;
        }
        if inner.update != Phase::Initialized || inner.fault == Some(GatewayFault::StartFails) {
            return false;
        }
        inner.updates_started += 1;
        let now = Instant::now();
        inner.update = if self.state.async_start {
            let delay = self.duration(&self.state.run_time);
            Phase::Starting {
                runs_at: now + delay,
                until: now + delay + update_time,
            }
        } else {
            Phase::Running(now + update_time)
        };
        true
    }

    /// The gateway's entry of `GET update`, spelt as the documented example
    /// spells it (`"Internal State description"` beside `"State
    /// Description"`); descriptions only when it failed.
    pub(crate) fn update_status(&self) -> Value {
        let mut inner = self.lock();
        settle(&mut inner, Instant::now());
        let (state, descriptions) = match inner.update {
            Phase::Neutral => ("neutral", None),
            Phase::Initializing(_) => ("initializing", None),
            Phase::Initialized | Phase::Starting { .. } => ("initialized", None),
            Phase::Running(_) => ("running", None),
            Phase::FailedGraceful => (
                "failed_graceful",
                Some((GRACEFUL_DESCRIPTION, GRACEFUL_INTERNAL)),
            ),
            Phase::FailedCritical => (
                "failed_critical",
                Some((CRITICAL_DESCRIPTION, CRITICAL_INTERNAL)),
            ),
        };
        let mut status = Map::new();
        status.insert("State".into(), json!(state));
        if let Some((description, internal)) = descriptions {
            status.insert("Internal State description".into(), json!(internal));
            status.insert("State Description".into(), json!(description));
        }
        status.insert("Current Version".into(), json!(inner.version));
        status.insert(
            "Update To Version".into(),
            json!(inner.staged.clone().unwrap_or_default()),
        );
        Value::Object(status)
    }
}

/// Moves timed phases and runs on to where the time says they are.
fn settle(inner: &mut Inner, now: Instant) {
    match inner.update {
        Phase::Initializing(until) if now >= until => inner.update = Phase::Initialized,
        Phase::Starting { runs_at, until } if now >= runs_at => {
            inner.update = Phase::Running(until);
            settle(inner, now);
            return;
        }
        Phase::Running(until) if now >= until => match inner.fault {
            Some(GatewayFault::Stuck) => {}
            Some(GatewayFault::FailGraceful) => inner.update = Phase::FailedGraceful,
            Some(GatewayFault::FailCritical) => inner.update = Phase::FailedCritical,
            _ => {
                inner.update = Phase::Neutral;
                inner.version = inner.staged.clone().unwrap_or_default();
                inner.updates_done += 1;
            }
        },
        _ => {}
    }
    let fails = inner.fault == Some(GatewayFault::RunError);
    for run in [&mut inner.backup, &mut inner.restore]
        .into_iter()
        .flatten()
    {
        if run.status == "EXECUTING" && now >= run.done_at {
            if fails {
                run.status = "ERROR";
                run.message = RUN_ERROR.to_owned();
            } else {
                run.status = "COMPLETED";
            }
        }
    }
    if let Some(backup) = &inner.backup
        && backup.status == "COMPLETED"
    {
        inner.last_successful = Some(backup.clone());
    }
}

fn run_json(run: &RunRecord, with_status: bool) -> Value {
    let mut value = json!({
        "host": run.host,
        "message": run.message,
        "path": run.path,
        "timeStamp": run.started,
        "username": run.username,
    });
    if with_status {
        value["status"] = json!(run.status);
    } else {
        value["subdir"] = json!(format!("{}/backup_{}", run.path, run.started));
    }
    value
}

async fn backup_status(State(gateway): State<FlowGateway>, headers: HeaderMap) -> Response {
    if let Some(refused) = gateway.state.auth.refusal(&headers) {
        return refused;
    }
    let mut inner = gateway.lock();
    settle(&mut inner, Instant::now());
    let mut status = Map::new();
    if let Some(last) = &inner.last_successful {
        status.insert("last_successful".into(), run_json(last, false));
    }
    if let Some(running) = &inner.backup {
        status.insert("running".into(), run_json(running, true));
    }
    Json(json!([status])).into_response()
}

async fn restore_status(State(gateway): State<FlowGateway>, headers: HeaderMap) -> Response {
    if let Some(refused) = gateway.state.auth.refusal(&headers) {
        return refused;
    }
    let mut inner = gateway.lock();
    settle(&mut inner, Instant::now());
    match &inner.restore {
        Some(run) => {
            let mut value = run_json(run, true);
            value["subdir"] = json!(run.path);
            Json(value).into_response()
        }
        None => Json(json!({ "status": "NONE" })).into_response(),
    }
}

async fn start_backup(
    State(gateway): State<FlowGateway>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    start_run(gateway, headers, body, false)
}

async fn start_restore(
    State(gateway): State<FlowGateway>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    start_run(gateway, headers, body, true)
}

fn start_run(
    gateway: FlowGateway,
    headers: HeaderMap,
    body: axum::body::Bytes,
    restore: bool,
) -> Response {
    if let Some(refused) = gateway.state.auth.refusal(&headers) {
        return refused;
    }
    let bad = |text: &str| riverbed_auth::error(StatusCode::BAD_REQUEST, "BAD_REQUEST", text);
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return bad("the body is not JSON");
    };
    let text = |key: &str| request.get(key).and_then(Value::as_str).unwrap_or("");
    if text("hostname").is_empty() || text("security_pwd").is_empty() {
        return bad("hostname and security_pwd are required");
    }
    let local = text("hostname") == "localhost";
    if !local
        && (text("username").is_empty() || text("path").is_empty() || text("password").is_empty())
    {
        return bad("username, password and path are required for a remote host");
    }
    let run_time = gateway.duration(&gateway.state.run_time);
    let mut inner = gateway.lock();
    settle(&mut inner, Instant::now());
    let slot = if restore {
        &mut inner.restore
    } else {
        &mut inner.backup
    };
    if slot.as_ref().is_some_and(|run| run.status == "EXECUTING") {
        return bad("a backup or restore is already executing");
    }
    // A wrong SSH password fails the run as a real host would refuse it.
    let refused = !local && text("password") != gateway.state.backup_password;
    *slot = Some(RunRecord {
        host: text("hostname").to_owned(),
        username: if local { "mazu" } else { text("username") }.to_owned(),
        path: if local {
            "/mnt/data/flowgateway-backup"
        } else {
            text("path")
        }
        .to_owned(),
        started: gateway.state.clock.epoch_seconds(),
        done_at: Instant::now() + run_time,
        status: if refused { "ERROR" } else { "EXECUTING" },
        message: if refused {
            "Permission denied (publickey,password)".to_owned()
        } else {
            String::new()
        },
    });
    if restore {
        inner.restores_started += 1;
    } else {
        inner.backups_started += 1;
    }
    StatusCode::NO_CONTENT.into_response()
}
