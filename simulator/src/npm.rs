//! A Riverbed NPM appliance: system update 2.0 (`npm.system_update`) behind
//! `mgmt.aaa` bearer tokens.
//!
//! Images arrive by fetch (the fleet's release, as if downloaded from the
//! URL) or by upload (the bytes sent, whose real SHA-256 is reported), are
//! `UPLOADING`, then `VALIDATING`, then `VALID` — or `INVALID` /
//! `UPLOAD_ERROR` as the appliance's fault says. The update goes `IDLE` →
//! `INITIALIZING` → `INITIALIZED` → `RUNNING`; then the appliance reboots:
//! its host refuses connections for the reboot window and forgets every
//! token, and comes back `IDLE` on the new version (or `FAILED_*`).

use crate::{
    Expectation, RIVERBED_ERROR, Simulated,
    build::{Builder, Seed},
    faults::Dice,
    host::Host,
    clock::Clock,
    riverbed_auth::{self, Auth},
};
use axum::{
    Json, Router,
    extract::{DefaultBodyLimit, Path, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use flotilla_common::DeviceKind;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::{
    collections::BTreeMap,
    ops::RangeInclusive,
    sync::{Arc, Mutex, MutexGuard, OnceLock},
    time::{Duration, Instant},
};
use tokio_util::sync::CancellationToken;

pub const INVALID_IMAGE: &str = "Image signature verification failed";
pub const UPLOAD_ERROR: &str = "Fetching the image failed: HTTP 404 Not Found";
pub const GRACEFUL_FAILURE: &str = "Pre-update checks failed: not enough free space on /data";
pub const CRITICAL_FAILURE: &str =
    "The new system did not start after the reboot; the appliance is in rescue mode";
/// The version every simulated appliance runs before its update.
pub const PREVIOUS_VERSION: &str = "previous";
/// A checksum that is not the release's (the checksum-mismatch fault).
const WRONG_CHECKSUM: &str = "0000000000000000000000000000000000000000000000000000000000000bad";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NpmFault {
    /// Images end `INVALID`.
    InvalidImage,
    /// Images end `UPLOAD_ERROR`.
    UploadError,
    /// Images end `VALID` with a checksum that is not the release's.
    ChecksumMismatch,
    /// The update ends `FAILED_GRACEFUL` (before any reboot).
    FailGraceful,
    /// The update reboots, then ends `FAILED_CRITICAL`.
    FailCritical,
    /// The update runs forever.
    Stuck,
    /// Its token endpoint refuses the fleet's credentials.
    RefusedCredentials,
    /// The update stays `INITIALIZING` forever (only as an exact fault).
    InitStuck,
}

/// Starts the fleet's NPM appliances, each on its own host.
pub(crate) async fn simulate(fleet: &mut Builder<'_>) -> std::io::Result<()> {
    let kind = DeviceKind::Npm;
    let faults = fleet.faults(
        kind,
        &[
            NpmFault::InvalidImage,
            NpmFault::UploadError,
            NpmFault::ChecksumMismatch,
            NpmFault::FailGraceful,
            NpmFault::FailCritical,
            NpmFault::RefusedCredentials,
        ],
        Some(NpmFault::Stuck),
    )?;
    let spec = fleet.spec;
    for (i, fault) in faults.into_iter().enumerate() {
        // Basic-only appliances take HTTP Basic and have no token login;
        // the others issue tokens only.
        let basic_only = spec.quirks.npm_basic_only;
        let auth = fleet.auth(fault == Some(NpmFault::RefusedCredentials), basic_only);
        let appliance = Npm::new(
            fault,
            auth,
            (&spec.release_version, &spec.release_sha256),
            NpmTiming {
                step_time: spec.operation_time.clone(),
                update_time: spec.upgrade_time.clone(),
                reboot_time: spec.reboot_time.clone(),
            },
            fleet.dice(Seed::new(kind, "device", i)),
            fleet.stop.clone(),
            NpmReadings {
                clock: fleet.clock(),
                basic_only,
                staged: spec.quirks.npm_staged.clone(),
                upload_time: spec.quirks.upload_time,
            },
        );
        let behaviour = fleet.behaviour(Seed::new(kind, "host", i), RIVERBED_ERROR);
        let host = fleet
            .serve(spec.ip, appliance.routes(), behaviour, spec.https)
            .await?;
        let address = Builder::url(host.addr(), spec.https);
        appliance.attach(host);
        let device = crate::build::device(format!("npm-{:04}", i + 1), kind, address);
        fleet.add(device, expectation(fault), Arc::new(appliance));
    }
    Ok(())
}

/// What Flotilla should report for an appliance with `fault`.
fn expectation(fault: Option<NpmFault>) -> Expectation {
    match fault {
        None => Expectation::succeeded(),
        Some(NpmFault::InvalidImage) => Expectation::device(INVALID_IMAGE),
        Some(NpmFault::UploadError) => Expectation::device(UPLOAD_ERROR),
        Some(NpmFault::ChecksumMismatch) => Expectation::device("checksum"),
        Some(NpmFault::FailGraceful) => Expectation::device(GRACEFUL_FAILURE),
        Some(NpmFault::FailCritical) => Expectation::device(CRITICAL_FAILURE).needing_attention(),
        Some(NpmFault::Stuck) => Expectation::timed_out(),
        Some(NpmFault::RefusedCredentials) => Expectation::refused(),
        Some(NpmFault::InitStuck) => Expectation::timed_out(),
    }
}

impl Simulated for Npm {
    /// Updates started.
    fn upgrades(&self) -> u32 {
        self.updates_started()
    }
}

/// How the appliance reads the document where it leaves room.
struct NpmReadings {
    clock: Clock,
    /// HTTP Basic only: no `mgmt.aaa` token login.
    basic_only: bool,
    /// Images report no version, and the update installs this one.
    staged: Option<String>,
    /// An upload takes at least this long to be answered.
    upload_time: Duration,
}

/// What the appliance does, in time.
#[derive(Debug, Clone)]
struct NpmTiming {
    /// Uploading (or fetching), then validating, each; and initializing.
    step_time: RangeInclusive<Duration>,
    update_time: RangeInclusive<Duration>,
    reboot_time: RangeInclusive<Duration>,
}

/// One appliance; cheap to clone.
#[derive(Clone)]
pub struct Npm {
    state: Arc<Shared>,
}

struct Shared {
    inner: Mutex<Inner>,
    auth: Auth,
    release_version: String,
    release_sha256: String,
    timing: NpmTiming,
    dice: Arc<Mutex<Dice>>,
    /// Set once the appliance's host is listening: the update reboots it.
    host: OnceLock<Host>,
    stop: CancellationToken,
    readings: NpmReadings,
}

struct Inner {
    clock: Clock,
    fault: Option<NpmFault>,
    images: BTreeMap<u64, Image>,
    next_id: u64,
    state: &'static str,
    description: String,
    last_state_time: i64,
    /// While `INITIALIZING`: when it becomes `INITIALIZED`.
    initialized_at: Option<Instant>,
    history: Vec<(i64, String)>,
    updates_started: u32,
    updates_done: u32,
    images_deleted: u32,
    uploads: u32,
    fetches: u32,
    /// Images that ended `INVALID`, whatever the fault.
    failed_images: std::collections::BTreeSet<u64>,
}

struct Image {
    /// When it stops uploading, and when it is validated.
    uploaded_at: Instant,
    validated_at: Instant,
    checksum: String,
}

impl Npm {
    fn new(
        fault: Option<NpmFault>,
        auth: Auth,
        (release_version, release_sha256): (&str, &str),
        timing: NpmTiming,
        dice: Arc<Mutex<Dice>>,
        stop: CancellationToken,
        readings: NpmReadings,
    ) -> Self {
        let now = readings.clock.epoch_seconds();
        Npm {
            state: Arc::new(Shared {
                inner: Mutex::new(Inner {
                    clock: readings.clock.clone(),
                    fault,
                    images: BTreeMap::new(),
                    next_id: 1,
                    state: "IDLE",
                    description: String::new(),
                    // Installed a month ago; idle since the day before.
                    last_state_time: now - 86_400,
                    initialized_at: None,
                    history: vec![(now - 30 * 86_400, PREVIOUS_VERSION.to_owned())],
                    updates_started: 0,
                    updates_done: 0,
                    images_deleted: 0,
                    uploads: 0,
                    fetches: 0,
                    failed_images: Default::default(),
                }),
                auth,
                release_version: release_version.to_owned(),
                release_sha256: release_sha256.to_owned(),
                timing,
                dice,
                host: OnceLock::new(),
                stop,
                readings,
            }),
        }
    }

    fn routes(&self) -> Router {
        let routes = Router::new()
            .route("/api/npm.system_update/2.0/images", get(images))
            .route("/api/npm.system_update/2.0/images/fetch", post(fetch))
            .route(
                "/api/npm.system_update/2.0/images/upload",
                post(upload).layer(DefaultBodyLimit::disable()),
            )
            .route(
                "/api/npm.system_update/2.0/images/items/{id}",
                get(image).delete(delete_image),
            )
            .route("/api/npm.system_update/2.0/update", get(update))
            .route("/api/npm.system_update/2.0/update/init", post(init))
            .route("/api/npm.system_update/2.0/update/start", post(start))
            .route("/api/npm.system_update/2.0/update/reset", post(reset));
        let routes = if self.state.readings.basic_only {
            routes
        } else {
            routes.route(
                "/api/mgmt.aaa/1.0/token",
                post(riverbed_auth::npm_token).with_state(self.state.auth.clone()),
            )
        };
        routes.with_state(self.clone())
    }

    /// The version an update installs: the release, or the staged one.
    fn installs(&self) -> &str {
        self.state
            .readings
            .staged
            .as_deref()
            .unwrap_or(&self.state.release_version)
    }

    /// The version images report, if they do.
    fn image_version(&self) -> Option<&str> {
        match self.state.readings.staged {
            Some(_) => None,
            None => Some(&self.state.release_version),
        }
    }

    /// Leaves the update as a reset `ago` would have: `IDLE`, its last
    /// state change then (on the appliance's clock).
    pub fn was_reset(&self, ago: Duration) {
        let mut inner = self.lock();
        inner.state = "IDLE";
        inner.description = String::new();
        inner.initialized_at = None;
        inner.last_state_time = inner.clock.epoch_seconds() - ago.as_secs() as i64;
    }

    fn attach(&self, host: Host) {
        let _ = self.state.host.set(host);
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.state
            .inner
            .lock()
            .expect("the NPM lock is never poisoned: nothing panics while holding it")
    }

    fn duration(&self, range: &RangeInclusive<Duration>) -> Duration {
        self.state
            .dice
            .lock()
            .expect("dice lock is never poisoned")
            .duration(range)
    }

    pub fn fault(&self) -> Option<NpmFault> {
        self.lock().fault
    }

    /// Updates started (a correct rollout never starts two).
    pub fn updates_started(&self) -> u32 {
        self.lock().updates_started
    }

    pub fn updates_done(&self) -> u32 {
        self.lock().updates_done
    }

    /// The newest version of the update history.
    pub fn version(&self) -> String {
        self.lock()
            .history
            .last()
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    }

    /// Images on the appliance now.
    pub fn images(&self) -> usize {
        self.lock().images.len()
    }

    pub fn images_deleted(&self) -> u32 {
        self.lock().images_deleted
    }

    /// The update's state now (`IDLE`, `INITIALIZED`, ...).
    pub fn update_state(&self) -> String {
        let mut inner = self.lock();
        settle(&mut inner);
        inner.state.to_owned()
    }

    /// Images fetched from a URL.
    pub fn fetches(&self) -> u32 {
        self.lock().fetches
    }

    /// Leaves an image of the release that failed validation, as an
    /// earlier job's fetch would have.
    pub fn leave_failed_image(&self) {
        let mut inner = self.lock();
        let id = inner.next_id;
        inner.next_id += 1;
        inner.failed_images.insert(id);
        let now = Instant::now();
        inner.images.insert(
            id,
            Image {
                uploaded_at: now,
                validated_at: now,
                checksum: self.state.release_sha256.clone(),
            },
        );
    }

    /// Images received by upload.
    pub fn uploads(&self) -> u32 {
        self.lock().uploads
    }

    /// Tokens issued (a short token lifetime makes the worker fetch more).
    pub fn tokens_issued(&self) -> u32 {
        self.state.auth.issued()
    }

    fn add_image(&self, checksum: String) -> Value {
        let upload = self.duration(&self.state.timing.step_time);
        let validate = self.duration(&self.state.timing.step_time);
        let now = Instant::now();
        let mut inner = self.lock();
        let id = inner.next_id;
        inner.next_id += 1;
        inner.images.insert(
            id,
            Image {
                uploaded_at: now + upload,
                validated_at: now + upload + validate,
                checksum,
            },
        );
        image_json(&inner, id, self.image_version(), now)
    }

    fn transition(inner: &mut Inner, state: &'static str, description: &str) {
        inner.state = state;
        inner.description = description.to_owned();
        inner.last_state_time = inner.clock.epoch_seconds();
    }

    /// The update, from `RUNNING` to its end: a reboot (refused
    /// connections, tokens forgotten), then the new version or a failure.
    async fn run_update(self) {
        let update_time = self.duration(&self.state.timing.update_time);
        let reboot_time = self.duration(&self.state.timing.reboot_time);
        let stop = self.state.stop.clone();
        let fault = self.lock().fault;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(update_time) => {}
        }
        match fault {
            Some(NpmFault::Stuck) => return,
            Some(NpmFault::FailGraceful) => {
                Npm::transition(&mut self.lock(), "FAILED_GRACEFUL", GRACEFUL_FAILURE);
                return;
            }
            _ => {}
        }
        let host = self.state.host.get();
        if let Some(host) = host {
            host.take_down();
        }
        self.state.auth.forget_tokens();
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(reboot_time) => {}
        }
        {
            let mut inner = self.lock();
            if fault == Some(NpmFault::FailCritical) {
                Npm::transition(&mut inner, "FAILED_CRITICAL", CRITICAL_FAILURE);
            } else {
                Npm::transition(&mut inner, "IDLE", "");
                let version = self.installs().to_owned();
                let now = inner.clock.epoch_seconds();
                inner.history.push((now, version));
                inner.updates_done += 1;
            }
        }
        if let Some(host) = host {
            let _ = host.bring_up().await;
        }
    }
}

fn image_json(inner: &Inner, id: u64, version: Option<&str>, now: Instant) -> Value {
    let Some(image) = inner.images.get(&id) else {
        return Value::Null;
    };
    let (state, description) = if now < image.uploaded_at {
        ("UPLOADING", "")
    } else if now < image.validated_at {
        ("VALIDATING", "Checking the image signature")
    } else if inner.failed_images.contains(&id) {
        ("INVALID", INVALID_IMAGE)
    } else {
        match inner.fault {
            Some(NpmFault::InvalidImage) => ("INVALID", INVALID_IMAGE),
            Some(NpmFault::UploadError) => ("UPLOAD_ERROR", UPLOAD_ERROR),
            _ => ("VALID", "The image is valid"),
        }
    };
    let mut value = json!({
        "id": id,
        "state": state,
        "state_description": description,
        "progress": if state == "UPLOADING" { 50 } else { 100 },
    });
    if state == "VALID" {
        value["checksum"] = json!(image.checksum);
        if let Some(version) = version {
            value["version"] = json!(version);
        }
    }
    value
}

fn refusal(npm: &Npm, headers: &HeaderMap) -> Option<Response> {
    npm.state.auth.refusal(headers)
}

fn bad(text: &str) -> Response {
    riverbed_auth::error(StatusCode::BAD_REQUEST, "BAD_REQUEST", text)
}

async fn images(State(npm): State<Npm>, headers: HeaderMap) -> Response {
    if let Some(refused) = refusal(&npm, &headers) {
        return refused;
    }
    let inner = npm.lock();
    let now = Instant::now();
    let items: Vec<Value> = inner
        .images
        .keys()
        .map(|id| image_json(&inner, *id, npm.image_version(), now))
        .collect();
    Json(json!({ "items": items })).into_response()
}

async fn fetch(State(npm): State<Npm>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    if let Some(refused) = refusal(&npm, &headers) {
        return refused;
    }
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    match request.get("url").and_then(Value::as_str) {
        Some(url) if url.starts_with("http://") || url.starts_with("https://") => {}
        _ => return bad("url is required (http or https)"),
    }
    let checksum = if npm.fault() == Some(NpmFault::ChecksumMismatch) {
        WRONG_CHECKSUM.to_owned()
    } else {
        npm.state.release_sha256.clone()
    };
    npm.lock().fetches += 1;
    Json(npm.add_image(checksum)).into_response()
}

async fn upload(State(npm): State<Npm>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    if let Some(refused) = refusal(&npm, &headers) {
        return refused;
    }
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if content_type != "application/octet-stream" {
        return (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Json(json!({"error_id": "BAD_REQUEST", "error_text": "the accepted content-type is application/octet-stream"})),
        )
            .into_response();
    }
    let checksum = if npm.fault() == Some(NpmFault::ChecksumMismatch) {
        WRONG_CHECKSUM.to_owned()
    } else {
        format!("{:x}", Sha256::digest(&body))
    };
    npm.lock().uploads += 1;
    // A large image takes a while to arrive and be taken in.
    tokio::time::sleep(npm.state.readings.upload_time).await;
    Json(npm.add_image(checksum)).into_response()
}

async fn image(State(npm): State<Npm>, headers: HeaderMap, Path(id): Path<u64>) -> Response {
    if let Some(refused) = refusal(&npm, &headers) {
        return refused;
    }
    let inner = npm.lock();
    match image_json(&inner, id, npm.image_version(), Instant::now()) {
        Value::Null => riverbed_auth::error(StatusCode::NOT_FOUND, "NOT_FOUND", "no such image"),
        image => Json(image).into_response(),
    }
}

async fn delete_image(State(npm): State<Npm>, headers: HeaderMap, Path(id): Path<u64>) -> Response {
    if let Some(refused) = refusal(&npm, &headers) {
        return refused;
    }
    let mut inner = npm.lock();
    if inner.images.remove(&id).is_none() {
        return riverbed_auth::error(StatusCode::NOT_FOUND, "NOT_FOUND", "no such image");
    }
    inner.images_deleted += 1;
    StatusCode::NO_CONTENT.into_response()
}

fn settle(inner: &mut Inner) {
    if inner.fault == Some(NpmFault::InitStuck) {
        return;
    }
    if inner.state == "INITIALIZING" && inner.initialized_at.is_some_and(|t| Instant::now() >= t) {
        inner.initialized_at = None;
        Npm::transition(inner, "INITIALIZED", "Ready to update");
    }
}

async fn update(State(npm): State<Npm>, headers: HeaderMap) -> Response {
    if let Some(refused) = refusal(&npm, &headers) {
        return refused;
    }
    let mut inner = npm.lock();
    settle(&mut inner);
    let history: Vec<Value> = inner
        .history
        .iter()
        .map(|(time, version)| json!({ "time": time, "version": version }))
        .collect();
    let mut body = json!({
        "last_state_time": inner.last_state_time,
        "state": inner.state,
        "state_description": inner.description,
        "update_history": history,
    });
    if inner.state != "IDLE" {
        body["target_version"] = json!(npm.installs());
    }
    Json(body).into_response()
}

async fn init(State(npm): State<Npm>, headers: HeaderMap) -> Response {
    if let Some(refused) = refusal(&npm, &headers) {
        return refused;
    }
    let init_time = npm.duration(&npm.state.timing.step_time);
    let now = Instant::now();
    let mut inner = npm.lock();
    settle(&mut inner);
    if inner.state != "IDLE" {
        return bad(&format!("cannot initialize while {}", inner.state));
    }
    let valid = inner
        .images
        .keys()
        .any(|id| image_json(&inner, *id, npm.image_version(), now)["state"] == "VALID");
    if !valid {
        return bad("no valid update image");
    }
    inner.initialized_at = Some(now + init_time);
    Npm::transition(&mut inner, "INITIALIZING", "Preparing the update");
    StatusCode::NO_CONTENT.into_response()
}

async fn start(State(npm): State<Npm>, headers: HeaderMap) -> Response {
    if let Some(refused) = refusal(&npm, &headers) {
        return refused;
    }
    {
        let mut inner = npm.lock();
        settle(&mut inner);
        if inner.state != "INITIALIZED" {
            return bad(&format!("cannot start while {}", inner.state));
        }
        inner.updates_started += 1;
        Npm::transition(&mut inner, "RUNNING", "Installing the update");
    }
    tokio::spawn(npm.clone().run_update());
    StatusCode::NO_CONTENT.into_response()
}

async fn reset(State(npm): State<Npm>, headers: HeaderMap) -> Response {
    if let Some(refused) = refusal(&npm, &headers) {
        return refused;
    }
    let mut inner = npm.lock();
    settle(&mut inner);
    if !matches!(
        inner.state,
        "FAILED_GRACEFUL" | "INITIALIZED" | "INITIALIZING"
    ) {
        return bad(&format!("nothing to reset while {}", inner.state));
    }
    inner.initialized_at = None;
    Npm::transition(&mut inner, "IDLE", "");
    StatusCode::NO_CONTENT.into_response()
}
