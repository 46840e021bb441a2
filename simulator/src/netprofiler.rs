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
    flowgateway::FlowGateway,
    riverbed_auth::{self, Auth},
};
use axum::{
    Json, Router,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post, put},
};
use serde_json::{Map, Value, json};
use std::sync::Arc;

/// One NetProfiler; cheap to clone.
#[derive(Clone)]
pub struct Netprofiler {
    state: Arc<Shared>,
}

struct Shared {
    auth: Auth,
    /// The ISO staged on the NetProfiler: the fleet's release version.
    staged: String,
    gateways: Vec<FlowGateway>,
}

impl Netprofiler {
    pub(crate) fn new(auth: Auth, staged: &str, gateways: Vec<FlowGateway>) -> Self {
        Netprofiler {
            state: Arc::new(Shared {
                auth,
                staged: staged.to_owned(),
                gateways,
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

async fn status(State(np): State<Netprofiler>, headers: HeaderMap) -> Response {
    if let Some(refused) = np.state.auth.refusal(&headers) {
        return refused;
    }
    let statuses: Map<String, Value> = np
        .state
        .gateways
        .iter()
        .map(|g| (g.ip().to_string(), g.update_status()))
        .collect();
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
