//! A One Identity SPS appliance: firmware fetches, uploads, slots and
//! upgrades through the SPS REST API, behind `session_id` cookies.
//!
//! `GET /api/authentication` with HTTP Basic opens a session; a session
//! ends after [`SpsTiming::session_idle`] without a call, and every session
//! ends when the appliance restarts. A fetch is `queued`, then
//! `in-progress` (with growing `bytes_downloaded`), then `finished` into a
//! free slot, or `failed` / `canceled` as the appliance's fault says; a
//! `DELETE` cancels a running fetch and removes a stopped one's status. An
//! accepted upgrade selects the slot, and a moment later the appliance
//! restarts: its host refuses connections for the reboot window, then
//! answers again running the new slot.
//!
//! Answers follow the documented examples, quirks included: `slot_id` a
//! number and `key` a string, a queued fetch's `start_time` `null`, and an
//! empty slot's `resource` a string. [`Sps::upgrades`] counts accepted
//! upgrades, so tests can check no appliance is upgraded twice.

mod multipart;

use crate::{
    Expectation, Simulated,
    build::{Builder, Seed},
    clock::Clock,
    faults::Dice,
    host::{Host, basic_auth_matches},
};
use axum::{
    Json, Router,
    extract::{DefaultBodyLimit, Path, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use flotilla_common::DeviceKind;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::{
    collections::{BTreeMap, HashMap},
    ops::RangeInclusive,
    sync::{Arc, Mutex, MutexGuard, OnceLock},
    time::{Duration, Instant},
};
use tokio_util::sync::CancellationToken;

/// The `error` of a fetch that could not download.
pub const FETCH_ERROR: &str = "<class 'requests.exceptions.ConnectionError'>: \
    HTTPConnectionPool(host='files.example.net', port=80): Max retries exceeded with url: \
    /sps.iso (Caused by NewConnectionError('Failed to establish a new connection: \
    [Errno -2] Name or service not known'))";
/// The start of a fetch's `error` when the download does not match its
/// checksum.
pub const CHECKSUM_MISMATCH: &str = "Checksum mismatch";
/// The `test_summary` of a failed firmware test.
pub const TEST_FAILED_SUMMARY: &str =
    "HA check started\nHA check failed: the peer node is not in sync";
const TEST_PASSED_SUMMARY: &str = "HA check started\nHA check finished";
/// What a corrupted download hashes to (the checksum-mismatch fault).
const CORRUPTED_SHA256: &str = "0000000000000000000000000000000000000000000000000000000000000bad";
/// The version every simulated appliance runs before its upgrade.
pub const PREVIOUS_VERSION: &str = "previous";
/// Firmware slots of an appliance; the first holds [`PREVIOUS_VERSION`].
const SLOTS: u32 = 3;
/// The size of a fetched image, reported as `bytes_total`.
const IMAGE_BYTES: u64 = 1_521_614_848;
/// Between an accepted upgrade and the restart: long enough for the
/// answer to get out.
const RESTART_DELAY: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SpsFault {
    /// Fetches end `failed` with [`FETCH_ERROR`].
    FetchFailed,
    /// Fetched images do not match their checksum: `failed`, with an error
    /// starting [`CHECKSUM_MISMATCH`].
    ChecksumMismatch,
    /// Fetches end `canceled` (an administrator cancelled them).
    FetchCanceled,
    /// A fetch reports its slot, but the slot is emptied before the
    /// upgrade: `ResourceNotFound`.
    EmptySlot,
    /// The upgrade's firmware test fails: `FirmwareTestFailed` with
    /// [`TEST_FAILED_SUMMARY`].
    FirmwareTestFailed,
    /// The appliance requires a commit log and answers an upgrade without
    /// a message `UpgradeMessageMissing` (expected to fail when the
    /// campaign gives no `commit_message`).
    UpgradeMessageMissing,
    /// The appliance requires a commit log and, as older firmware does,
    /// reports a `null` message as a missing path:
    /// `IncompleteRequestBodyError` (likewise).
    IncompleteRequestBody,
    /// Its authentication refuses the fleet's credentials.
    RefusedCredentials,
    /// Fetches stay `in-progress` forever.
    Stuck,
}

impl SpsFault {
    fn requires_commit_log(self) -> bool {
        matches!(
            self,
            SpsFault::UpgradeMessageMissing | SpsFault::IncompleteRequestBody
        )
    }
}

const SPS_ERROR: &str = r#"{"error":{"details":{},"message":"simulated transient failure","type":"InternalServerError"}}"#;

/// Starts the fleet's SPS appliances, each on its own host.
pub(crate) async fn simulate(fleet: &mut Builder<'_>) -> std::io::Result<()> {
    let kind = DeviceKind::Sps;
    let faults = fleet.faults(
        kind,
        &[
            SpsFault::FetchFailed,
            SpsFault::ChecksumMismatch,
            SpsFault::FetchCanceled,
            SpsFault::EmptySlot,
            SpsFault::FirmwareTestFailed,
            SpsFault::UpgradeMessageMissing,
            SpsFault::IncompleteRequestBody,
            SpsFault::RefusedCredentials,
        ],
        Some(SpsFault::Stuck),
    )?;
    let spec = fleet.spec;
    for (i, fault) in faults.into_iter().enumerate() {
        let appliance = Sps::new(
            fault,
            (&spec.username, &spec.password),
            (&spec.release_version, &spec.release_sha256),
            SpsTiming {
                fetch_step: spec.operation_time.clone(),
                reboot_time: spec.reboot_time.clone(),
                session_idle: spec.sps_session_idle,
                upload_time: spec.quirks.upload_time,
                restarts_itself: !spec.quirks.sps_no_self_restart
                    && !spec.quirks.sps_upgrade_not_selected,
                selects_slot: !spec.quirks.sps_upgrade_not_selected,
                clock: fleet.clock(),
            },
            fleet.dice(Seed::new(kind, "device", i)),
            fleet.stop.clone(),
        );
        let behaviour = fleet.behaviour(Seed::new(kind, "host", i), SPS_ERROR);
        let host = fleet
            .serve(spec.ip, appliance.routes(), behaviour, spec.https)
            .await?;
        let address = Builder::url(host.addr(), spec.https);
        appliance.attach(host);
        let device = crate::build::device(format!("sps-{:04}", i + 1), kind, address);
        fleet.add(device, expectation(fault), Arc::new(appliance));
    }
    Ok(())
}

/// What Flotilla should report for an appliance with `fault`.
fn expectation(fault: Option<SpsFault>) -> Expectation {
    match fault {
        None => Expectation::succeeded(),
        Some(SpsFault::FetchFailed) => Expectation::device("Max retries exceeded"),
        Some(SpsFault::ChecksumMismatch) => Expectation::device(CHECKSUM_MISMATCH),
        Some(SpsFault::FetchCanceled) => Expectation::device("canceled"),
        Some(SpsFault::EmptySlot) => Expectation::device("ResourceNotFound"),
        Some(SpsFault::FirmwareTestFailed) => Expectation::device("HA check failed"),
        // Campaigns against the fleet give no commit message.
        Some(SpsFault::UpgradeMessageMissing) => Expectation::device("UpgradeMessageMissing"),
        Some(SpsFault::IncompleteRequestBody) => Expectation::device("IncompleteRequestBodyError"),
        Some(SpsFault::RefusedCredentials) => Expectation::refused(),
        Some(SpsFault::Stuck) => Expectation::timed_out(),
    }
}

impl Simulated for Sps {
    /// Upgrades accepted.
    fn upgrades(&self) -> u32 {
        Sps::upgrades(self)
    }
}

/// What the appliance does, in time.
#[derive(Debug, Clone)]
struct SpsTiming {
    /// A fetch is queued this long, then downloads this long.
    fetch_step: RangeInclusive<Duration>,
    reboot_time: RangeInclusive<Duration>,
    /// A session without a call for this long ends.
    session_idle: Duration,
    /// An upload takes at least this long to be answered.
    upload_time: Duration,
    /// The appliance restarts by itself after an accepted upgrade.
    restarts_itself: bool,
    /// An accepted upgrade selects its slot for the restart.
    selects_slot: bool,
    clock: Clock,
}

/// One appliance; cheap to clone.
#[derive(Clone)]
pub struct Sps {
    state: Arc<Shared>,
}

struct Shared {
    inner: Mutex<Inner>,
    user: String,
    password: String,
    release_version: String,
    release_sha256: String,
    timing: SpsTiming,
    dice: Arc<Mutex<Dice>>,
    /// Set once the appliance's host is listening: an upgrade restarts it.
    host: OnceLock<Host>,
    stop: CancellationToken,
}

struct Inner {
    fault: Option<SpsFault>,
    /// Slot number to the version it holds (`None`: empty).
    slots: BTreeMap<u32, Option<String>>,
    current: u32,
    after_reboot: u32,
    fetches: BTreeMap<String, FetchJob>,
    /// Session id to its last call.
    sessions: HashMap<String, Instant>,
    logins: u32,
    upgrades: u32,
    uploads: u32,
    fetches_started: u32,
    fetches_cancelled: u32,
    commit_messages: Vec<Option<String>>,
}

struct FetchJob {
    url: String,
    sha256: String,
    /// Epoch seconds of the start (the request).
    requested: i64,
    queued_until: Instant,
    done_at: Instant,
    state: FetchState,
}

enum FetchState {
    Running,
    Finished { slot: u32 },
    Failed { error: String },
    Canceled,
}

impl Sps {
    fn new(
        fault: Option<SpsFault>,
        (user, password): (&str, &str),
        (release_version, release_sha256): (&str, &str),
        timing: SpsTiming,
        dice: Arc<Mutex<Dice>>,
        stop: CancellationToken,
    ) -> Self {
        let mut slots: BTreeMap<u32, Option<String>> = (1..=SLOTS).map(|n| (n, None)).collect();
        slots.insert(1, Some(PREVIOUS_VERSION.to_owned()));
        let password = if fault == Some(SpsFault::RefusedCredentials) {
            // Its password was changed behind the fleet's back.
            "rotated-elsewhere"
        } else {
            password
        };
        Sps {
            state: Arc::new(Shared {
                inner: Mutex::new(Inner {
                    fault,
                    slots,
                    current: 1,
                    after_reboot: 1,
                    fetches: BTreeMap::new(),
                    sessions: HashMap::new(),
                    logins: 0,
                    upgrades: 0,
                    uploads: 0,
                    fetches_started: 0,
                    fetches_cancelled: 0,
                    commit_messages: Vec::new(),
                }),
                user: user.to_owned(),
                password: password.to_owned(),
                release_version: release_version.to_owned(),
                release_sha256: release_sha256.to_owned(),
                timing,
                dice,
                host: OnceLock::new(),
                stop,
            }),
        }
    }

    fn routes(&self) -> Router {
        Router::new()
            .route("/api/authentication", get(authenticate))
            .route("/api/firmware/slots", get(slots))
            .route("/api/firmware/fetch", get(fetches).post(start_fetch))
            .route("/api/firmware/fetch/{key}", get(fetch).delete(delete_fetch))
            .route("/api/firmware/upgrade", axum::routing::post(upgrade))
            .route(
                "/api/upload/firmware",
                axum::routing::post(upload).layer(DefaultBodyLimit::disable()),
            )
            .with_state(self.clone())
    }

    fn attach(&self, host: Host) {
        let _ = self.state.host.set(host);
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.state
            .inner
            .lock()
            .expect("the SPS lock is never poisoned: nothing panics while holding it")
    }

    fn duration(&self, range: &RangeInclusive<Duration>) -> Duration {
        self.state
            .dice
            .lock()
            .expect("dice lock is never poisoned")
            .duration(range)
    }

    pub fn fault(&self) -> Option<SpsFault> {
        self.lock().fault
    }

    /// Upgrades accepted (a correct rollout never makes two).
    pub fn upgrades(&self) -> u32 {
        self.lock().upgrades
    }

    /// The version of the slot running now.
    pub fn version(&self) -> String {
        let inner = self.lock();
        inner.slots[&inner.current].clone().unwrap_or_default()
    }

    /// Sessions opened (a restart or an idle timeout makes the worker open
    /// more).
    pub fn logins(&self) -> u32 {
        self.lock().logins
    }

    pub fn uploads(&self) -> u32 {
        self.lock().uploads
    }

    pub fn fetches_started(&self) -> u32 {
        self.lock().fetches_started
    }

    /// Fetches cancelled while queued or in progress.
    pub fn fetches_cancelled(&self) -> u32 {
        self.lock().fetches_cancelled
    }

    /// Fetch status entries the appliance keeps.
    pub fn fetch_entries(&self) -> usize {
        self.lock().fetches.len()
    }

    /// Fetches queued or downloading now.
    pub fn running_fetches(&self) -> usize {
        let now = Instant::now();
        let mut inner = self.lock();
        settle(&mut inner, &self.state, now);
        inner
            .fetches
            .values()
            .filter(|f| matches!(f.state, FetchState::Running))
            .count()
    }

    /// The commit message of each accepted upgrade.
    pub fn commit_messages(&self) -> Vec<Option<String>> {
        self.lock().commit_messages.clone()
    }

    /// Puts the release into a free slot, as an earlier upload would have,
    /// and returns the slot's key.
    pub fn stage_release(&self) -> String {
        let mut inner = self.lock();
        let slot = free_slot(&inner);
        inner
            .slots
            .insert(slot, Some(self.state.release_version.clone()));
        slot.to_string()
    }

    /// The session id of a request's `Cookie` header, if it is open; a
    /// call keeps it open.
    fn refusal(&self, headers: &HeaderMap) -> Option<Response> {
        let session = headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|pair| {
                let (name, value) = pair.split_once('=')?;
                (name.trim() == "session_id").then(|| value.trim().to_owned())
            });
        let idle = self.state.timing.session_idle;
        let mut inner = self.lock();
        let Some(id) = session else {
            return Some(unauthenticated("Authentication required"));
        };
        match inner.sessions.get_mut(&id) {
            Some(used) if used.elapsed() < idle => {
                *used = Instant::now();
                None
            }
            Some(_) => {
                inner.sessions.remove(&id);
                Some(unauthenticated("The session has expired"))
            }
            None => Some(unauthenticated("Unknown session")),
        }
    }

    /// The restart after an accepted upgrade: connections refused and
    /// every session ended, then the selected slot runs.
    async fn restart(self) {
        let reboot_time = self.duration(&self.state.timing.reboot_time);
        let stop = self.state.stop.clone();
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(RESTART_DELAY) => {}
        }
        let host = self.state.host.get();
        if let Some(host) = host {
            host.take_down();
        }
        self.lock().sessions.clear();
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(reboot_time) => {}
        }
        {
            let mut inner = self.lock();
            inner.current = inner.after_reboot;
            inner.sessions.clear();
        }
        if let Some(host) = host {
            let _ = host.bring_up().await;
        }
    }
}

/// An empty slot other than the current one, or else the oldest one that
/// is neither current nor selected.
fn free_slot(inner: &Inner) -> u32 {
    let spare = |n: &&u32| **n != inner.current && **n != inner.after_reboot;
    inner
        .slots
        .iter()
        .find(|(n, v)| spare(n) && v.is_none())
        .or_else(|| inner.slots.iter().find(|(n, _)| spare(n)))
        .map_or(SLOTS, |(n, _)| *n)
}

/// Ends the fetches whose download time is over, as the fault says.
fn settle(inner: &mut Inner, shared: &Shared, now: Instant) {
    let fault = inner.fault;
    if fault == Some(SpsFault::Stuck) {
        return;
    }
    let due: Vec<String> = inner
        .fetches
        .iter()
        .filter(|(_, f)| matches!(f.state, FetchState::Running) && now >= f.done_at)
        .map(|(key, _)| key.clone())
        .collect();
    for key in due {
        let requested_sha = inner.fetches[&key].sha256.clone();
        let state = match fault {
            Some(SpsFault::FetchFailed) => FetchState::Failed {
                error: FETCH_ERROR.to_owned(),
            },
            Some(SpsFault::FetchCanceled) => FetchState::Canceled,
            Some(SpsFault::ChecksumMismatch) => FetchState::Failed {
                error: format!(
                    "{CHECKSUM_MISMATCH}: the downloaded file has SHA-256 {CORRUPTED_SHA256}, not {requested_sha}"
                ),
            },
            _ if !requested_sha.eq_ignore_ascii_case(&shared.release_sha256) => {
                FetchState::Failed {
                    error: format!(
                        "{CHECKSUM_MISMATCH}: the downloaded file has SHA-256 {}, not {requested_sha}",
                        shared.release_sha256
                    ),
                }
            }
            _ => {
                let slot = free_slot(inner);
                // With the empty-slot fault, the slot is emptied again
                // (as by an administrator) before anyone upgrades it.
                let image =
                    (fault != Some(SpsFault::EmptySlot)).then(|| shared.release_version.clone());
                inner.slots.insert(slot, image);
                FetchState::Finished { slot }
            }
        };
        if let Some(fetch) = inner.fetches.get_mut(&key) {
            fetch.state = state;
        }
    }
}

fn fetch_json(key: &str, fetch: &FetchJob, now: Instant) -> Value {
    let queued = now < fetch.queued_until;
    let (status, info, downloaded, total, slot, error) = match &fetch.state {
        FetchState::Running if queued => ("queued", Value::Null, 0, 0, None, None),
        FetchState::Running => {
            let span = fetch.done_at.saturating_duration_since(fetch.queued_until);
            let done = now.saturating_duration_since(fetch.queued_until);
            let ratio = if span.is_zero() {
                1.0
            } else {
                (done.as_secs_f64() / span.as_secs_f64()).min(0.99)
            };
            let downloaded = (IMAGE_BYTES as f64 * ratio) as u64;
            (
                "in-progress",
                json!("Downloading"),
                downloaded,
                IMAGE_BYTES,
                None,
                None,
            )
        }
        FetchState::Finished { slot } => (
            "finished",
            Value::Null,
            IMAGE_BYTES,
            IMAGE_BYTES,
            Some(*slot),
            None,
        ),
        FetchState::Failed { error } => (
            "failed",
            json!("Firmware fetching failed"),
            0,
            0,
            None,
            Some(error.clone()),
        ),
        FetchState::Canceled => ("canceled", Value::Null, 0, 0, None, None),
    };
    let start_time = (!queued).then(|| {
        chrono::DateTime::from_timestamp(fetch.requested, 0)
            .unwrap_or_default()
            .format("%Y-%m-%dT%H:%M:%S+00:00")
            .to_string()
    });
    let mut meta = json!({ "href": format!("/api/firmware/fetch/{key}") });
    if let Some(slot) = slot {
        meta["slot"] = json!(format!("/api/firmware/slots/{slot}"));
    }
    json!({
        "body": {
            "bytes_downloaded": downloaded,
            "bytes_total": total,
            "error": error,
            "info": info,
            "slot_id": slot,
            "start_time": start_time,
            "status": status,
            "url": fetch.url,
        },
        "key": key,
        "meta": meta,
    })
}

fn slot_json(inner: &Inner, slot: u32) -> Value {
    json!({
        "body": {
            "after_reboot": slot == inner.after_reboot,
            "current": slot == inner.current,
            "upgrade_news": null,
            "upgrade_notes": "some notes",
            "version": inner.slots.get(&slot).cloned().flatten(),
        },
        "key": slot.to_string(),
        "meta": { "href": format!("/api/firmware/slots/{slot}") },
    })
}

fn error(status: StatusCode, kind: &str, message: &str, details: Value, href: &str) -> Response {
    (
        status,
        Json(json!({
            "error": { "details": details, "message": message, "type": kind },
            "meta": { "href": href, "parent": "/api/firmware" },
        })),
    )
        .into_response()
}

fn unauthenticated(message: &str) -> Response {
    error(
        StatusCode::UNAUTHORIZED,
        "AuthenticationFailure",
        message,
        json!({}),
        "/api/authentication",
    )
}

fn missing_paths(paths: &[&str], href: &str) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        "IncompleteRequestBodyError",
        "Some paths were missing from the request body",
        json!({ "missing_paths": paths }),
        href,
    )
}

async fn authenticate(State(sps): State<Sps>, headers: HeaderMap) -> Response {
    if !basic_auth_matches(&headers, &sps.state.user, &sps.state.password) {
        return unauthenticated("Authentication failed: check the user name and password");
    }
    let id = uuid::Uuid::new_v4().simple().to_string();
    {
        let mut inner = sps.lock();
        inner.sessions.insert(id.clone(), Instant::now());
        inner.logins += 1;
    }
    (
        [(
            header::SET_COOKIE,
            format!("session_id={id}; Path=/api; Secure; HttpOnly"),
        )],
        Json(json!({
            "meta": { "href": "/api/authentication", "next": "/api/configuration" },
        })),
    )
        .into_response()
}

async fn slots(State(sps): State<Sps>, headers: HeaderMap) -> Response {
    if let Some(refused) = sps.refusal(&headers) {
        return refused;
    }
    let mut inner = sps.lock();
    settle(&mut inner, &sps.state, Instant::now());
    let items: Vec<Value> = inner
        .slots
        .iter()
        .filter(|(_, version)| version.is_some())
        .map(|(slot, _)| slot_json(&inner, *slot))
        .collect();
    Json(json!({ "items": items, "meta": { "href": "/api/firmware/slots" } })).into_response()
}

async fn start_fetch(
    State(sps): State<Sps>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Some(refused) = sps.refusal(&headers) {
        return refused;
    }
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let url = request.get("url").and_then(Value::as_str);
    let sha256 = request.pointer("/checksum/sha256").and_then(Value::as_str);
    let (Some(url), Some(sha256)) = (url, sha256) else {
        let mut missing = Vec::new();
        if url.is_none() {
            missing.push("url");
        }
        if sha256.is_none() {
            missing.push("checksum");
        }
        return missing_paths(&missing, "/api/firmware/fetch");
    };
    let queue = sps.duration(&sps.state.timing.fetch_step);
    let download = sps.duration(&sps.state.timing.fetch_step);
    let now = Instant::now();
    let key = uuid::Uuid::new_v4().to_string();
    let mut inner = sps.lock();
    inner.fetches_started += 1;
    inner.fetches.insert(
        key.clone(),
        FetchJob {
            url: url.to_owned(),
            sha256: sha256.to_owned(),
            requested: sps.state.timing.clock.epoch_seconds(),
            queued_until: now + queue,
            done_at: now + queue + download,
            state: FetchState::Running,
        },
    );
    (
        StatusCode::ACCEPTED,
        Json(json!({
            "key": key,
            "meta": {
                "href": format!("/api/firmware/fetch/{key}"),
                "parent": "/api/firmware",
                "slots": "/api/firmware/slots",
                "test": "/api/firmware/test",
                "upgrade": "/api/firmware/upgrade",
            },
        })),
    )
        .into_response()
}

async fn fetches(State(sps): State<Sps>, headers: HeaderMap) -> Response {
    if let Some(refused) = sps.refusal(&headers) {
        return refused;
    }
    let now = Instant::now();
    let mut inner = sps.lock();
    settle(&mut inner, &sps.state, now);
    let items: Vec<Value> = inner
        .fetches
        .iter()
        .map(|(key, fetch)| fetch_json(key, fetch, now))
        .collect();
    Json(json!({ "items": items, "meta": { "href": "/api/firmware/fetch" } })).into_response()
}

fn no_such_fetch(key: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "ResourceNotFound",
        "Resource was not found",
        json!({ "mount_point": "/firmware/fetch", "resource": key }),
        "/api/firmware/fetch",
    )
}

async fn fetch(State(sps): State<Sps>, headers: HeaderMap, Path(key): Path<String>) -> Response {
    if let Some(refused) = sps.refusal(&headers) {
        return refused;
    }
    let now = Instant::now();
    let mut inner = sps.lock();
    settle(&mut inner, &sps.state, now);
    match inner.fetches.get(&key) {
        Some(fetch) => Json(fetch_json(&key, fetch, now)).into_response(),
        None => no_such_fetch(&key),
    }
}

/// Cancels a running fetch (its status stays), or removes a stopped one's
/// status.
async fn delete_fetch(
    State(sps): State<Sps>,
    headers: HeaderMap,
    Path(key): Path<String>,
) -> Response {
    if let Some(refused) = sps.refusal(&headers) {
        return refused;
    }
    let mut inner = sps.lock();
    settle(&mut inner, &sps.state, Instant::now());
    let Some(fetch) = inner.fetches.get_mut(&key) else {
        return no_such_fetch(&key);
    };
    if matches!(fetch.state, FetchState::Running) {
        fetch.state = FetchState::Canceled;
        inner.fetches_cancelled += 1;
    } else {
        inner.fetches.remove(&key);
    }
    Json(json!({ "meta": { "href": "/api/firmware/fetch", "parent": "/api/firmware" } }))
        .into_response()
}

async fn upload(State(sps): State<Sps>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    if let Some(refused) = sps.refusal(&headers) {
        return refused;
    }
    // A large image takes a while to arrive and be taken in.
    tokio::time::sleep(sps.state.timing.upload_time).await;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let Some(image) = multipart::field(content_type, &body, "firmware") else {
        return missing_paths(&["firmware"], "/api/upload/firmware");
    };
    // The version is read from the image: the release's bytes hold it.
    let version = if format!("{:x}", Sha256::digest(image)) == sps.state.release_sha256 {
        sps.state.release_version.clone()
    } else {
        "0.0.0-unknown".to_owned()
    };
    let mut inner = sps.lock();
    let slot = free_slot(&inner);
    inner.slots.insert(slot, Some(version));
    inner.uploads += 1;
    let mut answer = slot_json(&inner, slot);
    answer["meta"] = json!({
        "href": "/api/upload/firmware",
        "slot": format!("/api/firmware/slots/{slot}"),
        "test": "/api/firmware/test",
        "upgrade": "/api/firmware/upgrade",
        "number_of_empty_slots": inner.slots.values().filter(|v| v.is_none()).count(),
    });
    Json(answer).into_response()
}

async fn upgrade(State(sps): State<Sps>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    const HREF: &str = "/api/firmware/upgrade";
    if let Some(refused) = sps.refusal(&headers) {
        return refused;
    }
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let slot = match request.get("slot_id") {
        Some(Value::Number(n)) => n.as_u64().map(|n| n as u32),
        Some(Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    };
    let Some(slot) = slot else {
        return missing_paths(&["slot_id"], HREF);
    };
    let message = request
        .get("message")
        .and_then(Value::as_str)
        .filter(|m| !m.trim().is_empty())
        .map(str::to_owned);
    let mut inner = sps.lock();
    settle(&mut inner, &sps.state, Instant::now());
    match inner.fault {
        Some(fault) if fault.requires_commit_log() && message.is_none() => {
            return if fault == SpsFault::IncompleteRequestBody {
                missing_paths(&["message"], HREF)
            } else {
                error(
                    StatusCode::BAD_REQUEST,
                    "UpgradeMessageMissing",
                    "The upgrade request did not contain a message. Adding a message is required.",
                    json!({}),
                    HREF,
                )
            };
        }
        _ => {}
    }
    if inner.slots.get(&slot).cloned().flatten().is_none() {
        return error(
            StatusCode::NOT_FOUND,
            "ResourceNotFound",
            "Resource was not found",
            json!({ "mount_point": "/firmware/upgrade", "resource": slot.to_string() }),
            HREF,
        );
    }
    if inner.fault == Some(SpsFault::FirmwareTestFailed) {
        return error(
            StatusCode::BAD_REQUEST,
            "FirmwareTestFailed",
            "The firmware test failed",
            json!({ "exit_code": 1, "test_summary": TEST_FAILED_SUMMARY }),
            HREF,
        );
    }
    inner.upgrades += 1;
    if sps.state.timing.selects_slot {
        inner.after_reboot = slot;
    }
    inner.commit_messages.push(message);
    drop(inner);
    if sps.state.timing.restarts_itself {
        tokio::spawn(sps.clone().restart());
    }
    Json(json!({
        "body": { "test_summary": TEST_PASSED_SUMMARY },
        "key": slot.to_string(),
        "meta": {
            "href": HREF,
            "parent": "/api/firmware",
            "slot": format!("/api/firmware/slots/{slot}"),
        },
    }))
    .into_response()
}
