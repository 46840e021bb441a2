//! A Riverbed NetProfiler and its connected Flow Gateways, through the
//! batch update API (`mgmt.common_update` 1.0).
//!
//! The NetProfiler holds a staged ISO (the fleet's release); `PUT
//! images/upload` hands it to every gateway; `init` and `start` answer one
//! string per gateway (`"<ip> - Operation Successfull"`, sic, or `"<ip> -
//! Operation Failed"`); `GET update` reports every gateway keyed by its IP,
//! as an array of one object. Each gateway ([`FlowGateway`]) also serves its
//! own backup API on its own address, whose IP is the key here.

use crate::{
    Expectation, RIVERBED_ERROR, Simulated,
    build::{Builder, Seed},
    flowgateway::{self, FlowGateway, GatewayFault},
    riverbed_auth::{self, Auth},
};
use axum::{
    Json, Router,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post, put},
};
use flotilla_common::{DeviceKind, Ending, Outcome};
use serde_json::{Map, Value, json};
use std::{
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
};

/// Starts the fleet's NetProfilers, each with its own Flow Gateways on
/// addresses of their own (127.10.x.y and up), each on its own host.
pub(crate) async fn simulate(fleet: &mut Builder<'_>) -> std::io::Result<()> {
    let kind = DeviceKind::Netprofiler;
    let spec = fleet.spec;
    let mut failing = vec![
        GatewayFault::FailGraceful,
        GatewayFault::FailCritical,
        GatewayFault::InitFails,
        GatewayFault::StartFails,
        GatewayFault::RefusedCredentials,
    ];
    if spec.backups_first {
        failing.push(GatewayFault::RunError);
    }
    let faults = fleet.faults(kind, &failing, Some(GatewayFault::Stuck))?;
    let mut next_gateway_ip = 0u32;
    for (i, fault) in faults.into_iter().enumerate() {
        let mut gateways = Vec::new();
        let mut urls = Vec::new();
        for g in 0..spec.gateways_per_netprofiler {
            next_gateway_ip += 1;
            let ip = IpAddr::V4(Ipv4Addr::new(
                127,
                10 + (next_gateway_ip / 62_500) as u8,
                ((next_gateway_ip / 250) % 250) as u8,
                (next_gateway_ip % 250 + 1) as u8,
            ));
            // The fault sits on the first gateway; a refused login is the
            // NetProfiler's own.
            let gateway_fault = fault.filter(|f| g == 0 && *f != GatewayFault::RefusedCredentials);
            let seed = Seed::new(kind, "gateway", next_gateway_ip as usize);
            let gateway = flowgateway::gateway(fleet, ip, gateway_fault, false, seed);
            let behaviour = fleet.behaviour(
                Seed::new(kind, "gateway host", next_gateway_ip as usize),
                RIVERBED_ERROR,
            );
            let host = fleet
                .serve(ip, gateway.routes(), behaviour, spec.https)
                .await?;
            urls.push(Builder::url(host.addr(), spec.https));
            gateways.push(gateway);
        }
        let first_ip = gateways
            .first()
            .map(|g| g.ip().to_string())
            .unwrap_or_default();
        let auth = fleet.auth(fault == Some(GatewayFault::RefusedCredentials), true);
        let staged = spec
            .quirks
            .netprofiler_staged
            .as_deref()
            .unwrap_or(&spec.release_version);
        let np = Netprofiler::new(
            auth,
            (staged, &spec.release_version),
            gateways,
            fault,
            spec.backups_first,
            spec.quirks.netprofiler_extra_fields,
        );
        let behaviour = fleet.behaviour(Seed::new(kind, "host", i), RIVERBED_ERROR);
        let host = fleet
            .serve(spec.ip, np.routes(), behaviour, spec.https)
            .await?;
        let mut device = crate::build::device(
            format!("np-{:04}", i + 1),
            kind,
            Builder::url(host.addr(), spec.https),
        );
        device.gateways = urls;
        let expectation = match &spec.quirks.netprofiler_staged {
            // Whatever else would happen, no gateway is started.
            Some(other) if *other != spec.release_version && !backup_fails(fault, spec.backups_first) => {
                match fault {
                    Some(GatewayFault::RefusedCredentials) => Expectation::refused(),
                    _ => Expectation::device(&format!(
                        "would update to another version than {}",
                        spec.release_version
                    )),
                }
            }
            _ => expectation(fault, &first_ip, spec.backups_first),
        };
        fleet.add(device, expectation, Arc::new(np));
    }
    Ok(())
}

/// Whether the NetProfiler's backups fail before anything is updated.
fn backup_fails(fault: Option<GatewayFault>, backups_first: bool) -> bool {
    backups_first && fault == Some(GatewayFault::RunError)
}

/// What Flotilla should report for a NetProfiler whose first gateway (or,
/// for a refused login, itself) has `fault`.
fn expectation(fault: Option<GatewayFault>, first_ip: &str, backups_first: bool) -> Expectation {
    match fault {
        None => Expectation::succeeded(),
        Some(GatewayFault::FailGraceful) => Expectation::device("failed_graceful"),
        Some(GatewayFault::FailCritical) => {
            Expectation::device("failed_critical").needing_attention()
        }
        Some(GatewayFault::InitFails) => Expectation::device("initialization failed"),
        // Reported by its state, as its start answer may be lost to a
        // retry: "<ip> initialized: Operation Failed".
        Some(GatewayFault::StartFails) => Expectation::device(&format!("{first_ip} initialized")),
        Some(GatewayFault::RunError) if backups_first => {
            Expectation::device(flowgateway::RUN_ERROR)
        }
        Some(GatewayFault::RunError) => Expectation::succeeded(),
        Some(GatewayFault::Stuck) => Expectation::timed_out(),
        Some(GatewayFault::RefusedCredentials) => Expectation::refused(),
    }
}

/// One NetProfiler; cheap to clone.
#[derive(Clone)]
pub struct Netprofiler {
    state: Arc<Shared>,
}

struct Shared {
    auth: Auth,
    /// The ISO staged on the NetProfiler: the fleet's release version,
    /// unless a quirk stages another.
    staged: String,
    /// The fleet's release: what a campaign against the fleet installs.
    release: String,
    gateways: Vec<FlowGateway>,
    /// The fault of its first gateway (or its own refused login).
    fault: Option<GatewayFault>,
    /// Campaigns back the gateways up first.
    backups_first: bool,
    /// `GET update` carries fields besides the gateways'.
    extra_fields: bool,
}

impl Netprofiler {
    fn new(
        auth: Auth,
        (staged, release): (&str, &str),
        gateways: Vec<FlowGateway>,
        fault: Option<GatewayFault>,
        backups_first: bool,
        extra_fields: bool,
    ) -> Self {
        Netprofiler {
            state: Arc::new(Shared {
                auth,
                staged: staged.to_owned(),
                release: release.to_owned(),
                gateways,
                fault,
                backups_first,
                extra_fields,
            }),
        }
    }

    pub(crate) fn routes(&self) -> Router {
        Router::new()
            .route("/api/mgmt.common_update/1.0/update", get(status))
            .route("/api/mgmt.common_update/1.0/images/upload", put(upload))
            .route("/api/mgmt.common_update/1.0/update/init", post(init))
            .route("/api/mgmt.common_update/1.0/update/start", post(start))
            .route(
                "/api/common/1.0/oauth/token",
                post(riverbed_auth::oauth_token).with_state(self.state.auth.clone()),
            )
            .with_state(self.clone())
    }

    pub fn gateways(&self) -> &[FlowGateway] {
        &self.state.gateways
    }
}

impl Simulated for Netprofiler {
    /// The most updates any of its gateways started.
    fn upgrades(&self) -> u32 {
        self.gateways()
            .iter()
            .map(FlowGateway::updates_started)
            .max()
            .unwrap_or(0)
    }

    /// Compares the reported per-gateway outcomes (the ending's
    /// `detail.gateways`) with what each gateway really did. A healthy
    /// gateway may be reported `unfinished` when a sibling's failure ended
    /// the job first, and `not_started` when a sibling's init failed.
    fn check_detail(&self, ending: &Ending) -> Result<(), String> {
        let fault = self.state.fault;
        let gateways = self.gateways();
        for gateway in gateways {
            if gateway.updates_started() > 1 {
                return Err(format!(
                    "gateway {} updated {} times",
                    gateway.ip(),
                    gateway.updates_started()
                ));
            }
        }
        let backup_failed = backup_fails(fault, self.state.backups_first);
        let wrong_image = self.state.staged != self.state.release;
        if backup_failed || wrong_image || fault == Some(GatewayFault::RefusedCredentials) {
            return match gateways.iter().find(|g| g.updates_started() > 0) {
                Some(g) => Err(format!(
                    "gateway {} was updated although the job failed before",
                    g.ip()
                )),
                None => Ok(()),
            };
        }
        if ending.outcome == Outcome::TimedOut {
            return Ok(());
        }
        let reported = ending
            .detail
            .as_ref()
            .and_then(|d| d.get("gateways"))
            .and_then(Value::as_array)
            .ok_or("no per-gateway detail reported")?;
        if reported.len() != gateways.len() {
            return Err(format!(
                "{} gateways reported, {} connected",
                reported.len(),
                gateways.len()
            ));
        }
        let sibling_failed = matches!(
            fault,
            Some(
                GatewayFault::FailGraceful | GatewayFault::FailCritical | GatewayFault::StartFails
            )
        );
        for gateway in gateways {
            let ip = gateway.ip().to_string();
            let entry = reported
                .iter()
                .find(|e| e["ip"] == ip.as_str())
                .ok_or_else(|| format!("gateway {ip} missing from the report"))?;
            let outcome = entry["outcome"].as_str().unwrap_or("");
            let own_fault = gateway.fault().filter(|f| *f != GatewayFault::RunError);
            let allowed: &[&str] = match (own_fault, fault) {
                (Some(_), _) => &["failed"],
                (None, Some(GatewayFault::InitFails)) => &["not_started"],
                (None, _) if sibling_failed => &["succeeded", "unfinished"],
                (None, _) => &["succeeded"],
            };
            if !allowed.contains(&outcome) {
                return Err(format!(
                    "gateway {ip}: reported {outcome:?}, expected one of {allowed:?}"
                ));
            }
            if outcome == "succeeded" && gateway.version() != self.state.release {
                return Err(format!(
                    "gateway {ip} reported updated but runs {}",
                    gateway.version()
                ));
            }
        }
        Ok(())
    }
}

async fn status(State(np): State<Netprofiler>, headers: HeaderMap) -> Response {
    if let Some(refused) = np.state.auth.refusal(&headers) {
        return refused;
    }
    let mut statuses: Map<String, Value> = np
        .state
        .gateways
        .iter()
        .map(|g| (g.ip().to_string(), g.update_status()))
        .collect();
    if np.state.extra_fields {
        statuses.insert("Last Checked".into(), json!(1_700_000_000));
        statuses.insert(
            "NetProfiler".into(),
            json!({ "Version": np.state.staged, "Gateways": np.state.gateways.len() }),
        );
    }
    Json(json!([statuses])).into_response()
}

async fn upload(State(np): State<Netprofiler>, headers: HeaderMap) -> Response {
    if let Some(refused) = np.state.auth.refusal(&headers) {
        return refused;
    }
    for gateway in &np.state.gateways {
        gateway.stage(&np.state.staged);
    }
    StatusCode::NO_CONTENT.into_response()
}

async fn init(State(np): State<Netprofiler>, headers: HeaderMap) -> Response {
    if let Some(refused) = np.state.auth.refusal(&headers) {
        return refused;
    }
    answers(&np, FlowGateway::init)
}

async fn start(State(np): State<Netprofiler>, headers: HeaderMap) -> Response {
    if let Some(refused) = np.state.auth.refusal(&headers) {
        return refused;
    }
    answers(&np, FlowGateway::start)
}

fn answers(np: &Netprofiler, operation: fn(&FlowGateway) -> bool) -> Response {
    let lines: Vec<String> = np
        .state
        .gateways
        .iter()
        .map(|gateway| {
            let result = if operation(gateway) {
                "Operation Successfull"
            } else {
                "Operation Failed"
            };
            format!("{} - {result}", gateway.ip())
        })
        .collect();
    Json(lines).into_response()
}
