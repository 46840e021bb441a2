//! Riverbed NPM appliances: system update 2.0 (`npm.system_update`).
//!
//! Steps, each reading the appliance before acting:
//!
//! 1. `stage`: an appliance already on the target version succeeds at once.
//!    Otherwise find the target's image among `GET images` (by checksum, or
//!    by version when no checksum is reported), or get one: `POST
//!    images/fetch` with the campaign's URL, or, for a `file:` URL, `POST
//!    images/upload` of the file as `application/octet-stream` (after
//!    checking its SHA-256);
//! 2. `await_image`: poll the image until `VALID` (its `checksum`, when
//!    reported, must be the campaign's SHA-256); `INVALID` and
//!    `UPLOAD_ERROR` fail with the appliance's description;
//! 3. `init`: `POST update/init` while the update is `IDLE`, then wait for
//!    `INITIALIZED`;
//! 4. `start`: `POST update/start` only from `INITIALIZED`, so a
//!    redelivered step never starts a second update;
//! 5. `await_update`: poll `update` through the reboot (refused
//!    connections, timeouts and 5xx are waits, until the job's deadline)
//!    until `IDLE` with the target version newest in `update_history`;
//! 6. on `FAILED_GRACEFUL`, `reset` the update and fail with its
//!    description; `FAILED_CRITICAL` fails the job and marks it for
//!    attention;
//! 7. `delete_image` (the cleanup of every step that knows the image):
//!    deletes it when `[drivers.npm] delete_image` asks, unless an update
//!    is under way or failed critically (left for inspection).
//!
//! Authentication: a bearer token from `POST /api/mgmt.aaa/1.0/token`,
//! cached per appliance and fetched anew when it expires or the appliance
//! (rebooted) refuses it.

use super::{
    Driver, Next, StepContext, StepError,
    riverbed::{
        self,
        auth::{Login, Tokens},
        lenient,
    },
};
use flotilla_common::{
    DeviceKind, Ending, ErrorClass,
    settings::{self, NpmSettings},
};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

const IMAGES: &str = "/api/npm.system_update/2.0/images";
const FETCH: &str = "/api/npm.system_update/2.0/images/fetch";
const UPLOAD: &str = "/api/npm.system_update/2.0/images/upload";
const UPDATE: &str = "/api/npm.system_update/2.0/update";
const INIT: &str = "/api/npm.system_update/2.0/update/init";
const START: &str = "/api/npm.system_update/2.0/update/start";
const RESET: &str = "/api/npm.system_update/2.0/update/reset";

fn image_path(id: u64) -> String {
    format!("{IMAGES}/items/{id}")
}

#[derive(Default)]
pub struct Npm {
    tokens: Tokens,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NpmStep {
    Stage,
    AwaitImage {
        image: u64,
    },
    /// `image`: the update image, once known, for the cleanup to delete.
    Init {
        image: Option<u64>,
    },
    Start {
        image: Option<u64>,
    },
    AwaitUpdate {
        image: Option<u64>,
    },
    Reset {
        image: Option<u64>,
        description: String,
    },
    DeleteImage {
        image: u64,
    },
}

impl NpmStep {
    fn image(&self) -> Option<u64> {
        match self {
            NpmStep::Stage => None,
            NpmStep::AwaitImage { image } | NpmStep::DeleteImage { image } => Some(*image),
            NpmStep::Init { image }
            | NpmStep::Start { image }
            | NpmStep::AwaitUpdate { image }
            | NpmStep::Reset { image, .. } => *image,
        }
    }
}

impl Driver for Npm {
    type Step = NpmStep;
    const KIND: DeviceKind = DeviceKind::Npm;

    fn first_step(&self) -> NpmStep {
        NpmStep::Stage
    }

    fn step_name(step: &NpmStep) -> &'static str {
        match step {
            NpmStep::Stage => "stage",
            NpmStep::AwaitImage { .. } => "await_image",
            NpmStep::Init { .. } => "init",
            NpmStep::Start { .. } => "start",
            NpmStep::AwaitUpdate { .. } => "await_update",
            NpmStep::Reset { .. } => "reset",
            NpmStep::DeleteImage { .. } => "delete_image",
        }
    }

    async fn run(&self, step: NpmStep, cx: &StepContext<'_>) -> Result<Next<NpmStep>, StepError> {
        let login = Login::npm(cx.credentials)?;
        let api = Api {
            tokens: &self.tokens,
            cx,
            login: &login,
        };
        match step {
            NpmStep::Stage => api.stage().await,
            NpmStep::AwaitImage { image } => api.await_image(image).await,
            NpmStep::Init { image } => api.init(image).await,
            NpmStep::Start { image } => api.start(image).await,
            NpmStep::AwaitUpdate { image } => api.await_update(image).await,
            NpmStep::Reset { description, .. } => api.reset(description).await,
            NpmStep::DeleteImage { image } => api.delete_image(image).await,
        }
    }

    fn cleanup(&self, step: &NpmStep) -> Option<NpmStep> {
        match step {
            NpmStep::DeleteImage { .. } => None,
            step => step.image().map(|image| NpmStep::DeleteImage { image }),
        }
    }
}

/// One step's view of the appliance.
struct Api<'s, 'c> {
    tokens: &'s Tokens,
    cx: &'s StepContext<'c>,
    login: &'s Login,
}

impl<'c> Api<'_, 'c> {
    fn target(&self) -> &str {
        &self.cx.job.target.version
    }

    async fn stage(&self) -> Result<Next<NpmStep>, StepError> {
        let update = self.update().await?;
        if update.state == UpdateState::Idle && update.installed.as_deref() == Some(self.target()) {
            return Ok(Next::end(Ending::succeeded())
                .note(format!("the appliance already runs {}", self.target())));
        }
        let image = self.find_image().await?;
        match (update.state, image) {
            (UpdateState::Idle, Some(image)) => Ok(Next::run(NpmStep::AwaitImage { image })
                .note(format!("image {image} is already on the appliance"))),
            (UpdateState::Idle, None) => self.get_image().await,
            // An update is under way or failed (this job's, redelivered, or
            // an earlier one): follow it rather than stage another image.
            (_, image) => Ok(Next::run(NpmStep::Init { image })
                .note(format!("the update is {}", update.state.name()))),
        }
    }

    /// Fetches the campaign's image, or uploads it from a `file:` URL.
    async fn get_image(&self) -> Result<Next<NpmStep>, StepError> {
        let url = &self.cx.job.target.image_url;
        let reply = if url.scheme() == "file" {
            self.upload(url).await?
        } else {
            let body = json!({ "url": url.as_str() });
            riverbed::success(
                self.send(|| Ok(self.cx.http.post(FETCH).json(&body)))
                    .await?,
            )?
        };
        let image = read_image(&reply.json()?).map_err(|problem| garbage(&reply, &problem))?;
        let id = image
            .id
            .ok_or_else(|| garbage(&reply, "the new image has no id"))?;
        let how = if url.scheme() == "file" {
            "uploaded"
        } else {
            "fetching"
        };
        Ok(Next::poll(NpmStep::AwaitImage { image: id })
            .note(format!("image {id} {how}: {}", image.describe())))
    }

    async fn upload(&self, url: &url::Url) -> Result<crate::device_http::Reply, StepError> {
        let path = url
            .to_file_path()
            .map_err(|()| StepError::config(format!("image URL {url} is not a local file path")))?;
        let (sha256, size) = file_sha256(&path).await?;
        if sha256 != self.cx.job.target.sha256 {
            return Err(StepError {
                retryable: false,
                ..StepError::config(format!(
                    "image file {} has SHA-256 {sha256}, not the campaign's {}",
                    path.display(),
                    self.cx.job.target.sha256
                ))
            });
        }
        let reply = self
            .send(|| {
                let file = std::fs::File::open(&path).map_err(|e| {
                    StepError::config(format!("cannot open image file {}: {e}", path.display()))
                })?;
                Ok(self
                    .cx
                    .http
                    .post(UPLOAD)
                    .header("content-type", "application/octet-stream")
                    .header("content-length", &size.to_string())
                    .body(tokio::fs::File::from_std(file)))
            })
            .await?;
        riverbed::success(reply)
    }

    async fn await_image(&self, id: u64) -> Result<Next<NpmStep>, StepError> {
        let reply = self.send(|| Ok(self.cx.http.get(&image_path(id)))).await?;
        if reply.status == StatusCode::NOT_FOUND {
            return Err(StepError::device(format!(
                "{}: image {id} is gone from the appliance",
                reply.what
            )));
        }
        let reply = riverbed::success(reply)?;
        let image = read_image(&reply.json()?).map_err(|problem| garbage(&reply, &problem))?;
        match image.state {
            ImageState::Uploading | ImageState::Validating => {
                Ok(Next::poll(NpmStep::AwaitImage { image: id }).note(image.describe()))
            }
            ImageState::Invalid | ImageState::UploadError => Ok(Next::end(Ending::failed(
                ErrorClass::Device,
                format!(
                    "image {id} is {}: {}",
                    image.state.name(),
                    image.description
                ),
            ))),
            ImageState::Valid => {
                let wanted = &self.cx.job.target.sha256;
                if let Some(checksum) = &image.checksum
                    && !checksum.eq_ignore_ascii_case(wanted)
                {
                    return Ok(Next::end(Ending::failed(
                        ErrorClass::Device,
                        format!(
                            "image {id} has checksum {checksum}, not the campaign's SHA-256 {wanted}"
                        ),
                    )));
                }
                if let Some(version) = &image.version
                    && version != self.target()
                {
                    return Ok(Next::end(Ending::failed(
                        ErrorClass::Device,
                        format!(
                            "image {id} holds version {version}, not the campaign's {}",
                            self.target()
                        ),
                    )));
                }
                Ok(Next::run(NpmStep::Init { image: Some(id) }).note(image.describe()))
            }
        }
    }

    async fn init(&self, image: Option<u64>) -> Result<Next<NpmStep>, StepError> {
        let update = self.update().await?;
        match update.state {
            UpdateState::Idle => {
                if let Some(done) = self.idle_ending(&update) {
                    return Ok(done);
                }
                self.post(INIT, &[UpdateState::Initializing, UpdateState::Initialized])
                    .await?;
                Ok(Next::poll(NpmStep::Init { image }).note("initializing the update"))
            }
            UpdateState::Initializing => {
                Ok(Next::poll(NpmStep::Init { image }).note(update.description))
            }
            UpdateState::Initialized => Ok(Next::run(NpmStep::Start { image })),
            UpdateState::Running => Ok(Next::poll(NpmStep::AwaitUpdate { image })),
            UpdateState::FailedGraceful | UpdateState::FailedCritical => Ok(failure(image, update)),
        }
    }

    async fn start(&self, image: Option<u64>) -> Result<Next<NpmStep>, StepError> {
        let update = self.update().await?;
        match update.state {
            UpdateState::Initialized => {
                self.post(START, &[UpdateState::Running]).await?;
                Ok(Next::poll(NpmStep::AwaitUpdate { image }).note("update started"))
            }
            UpdateState::Running => Ok(
                Next::poll(NpmStep::AwaitUpdate { image }).note("the update is already running")
            ),
            UpdateState::Idle | UpdateState::Initializing => Ok(Next::run(NpmStep::Init { image })),
            UpdateState::FailedGraceful | UpdateState::FailedCritical => Ok(failure(image, update)),
        }
    }

    async fn await_update(&self, image: Option<u64>) -> Result<Next<NpmStep>, StepError> {
        let update = match self.update().await {
            Ok(update) => update,
            // The appliance reboots into the new version: not answering is
            // part of the update, and the job's deadline bounds the wait.
            Err(error) if error.class == ErrorClass::Transient => {
                return Ok(Next::poll(NpmStep::AwaitUpdate { image }).note(format!(
                    "waiting for the appliance to come back: {}",
                    error.message
                )));
            }
            Err(error) => return Err(error),
        };
        match update.state {
            UpdateState::Running | UpdateState::Initializing => {
                Ok(Next::poll(NpmStep::AwaitUpdate { image }).note(update.description))
            }
            UpdateState::Initialized => Ok(Next::run(NpmStep::Start { image })),
            UpdateState::Idle => match self.idle_ending(&update) {
                Some(done) => Ok(done),
                None => Ok(Next::end(Ending::failed(
                    ErrorClass::Device,
                    format!(
                        "the update ended IDLE on version {}, not {}: {}",
                        update.installed.as_deref().unwrap_or("unknown"),
                        self.target(),
                        update.description
                    ),
                ))),
            },
            UpdateState::FailedGraceful | UpdateState::FailedCritical => Ok(failure(image, update)),
        }
    }

    /// An `IDLE` appliance's verdict: succeeded on the target version;
    /// failed if the update went back to `IDLE` during this job without it
    /// (a reset after a failure: never initialize and start again); `None`
    /// when nothing of this job has happened yet.
    fn idle_ending(&self, update: &Update) -> Option<Next<NpmStep>> {
        if update.installed.as_deref() == Some(self.target()) {
            return Some(
                Next::end(Ending::succeeded().with_detail(json!({
                    "version": self.target(),
                    "update_history": update.history,
                })))
                .note(format!("the appliance runs {}", self.target())),
            );
        }
        if update
            .last_state_time
            .is_some_and(|t| t >= riverbed::since(self.cx.job))
        {
            return Some(Next::end(Ending::failed(
                ErrorClass::Device,
                format!(
                    "the update went back to IDLE during this job without installing {}: {}",
                    self.target(),
                    update.description
                ),
            )));
        }
        None
    }

    async fn reset(&self, description: String) -> Result<Next<NpmStep>, StepError> {
        let update = self.update().await?;
        let note = if update.state == UpdateState::FailedGraceful {
            self.post(RESET, &[UpdateState::Idle]).await?;
            "update reset"
        } else {
            "the update was already reset"
        };
        Ok(Next::end(Ending::failed(
            ErrorClass::Device,
            format!("the update failed gracefully: {description}"),
        ))
        .note(note))
    }

    async fn delete_image(&self, id: u64) -> Result<Next<NpmStep>, StepError> {
        let settings: NpmSettings = settings::read(&self.cx.job.settings)
            .map_err(|e| StepError::device(format!("the job's [drivers.npm] settings: {e}")))?;
        if !settings.delete_image {
            return Ok(Next::done());
        }
        let update = self.update().await?;
        if !matches!(
            update.state,
            UpdateState::Idle | UpdateState::FailedGraceful
        ) {
            return Ok(Next::done().note(format!(
                "image {id} left on the appliance: the update is {}",
                update.state.name()
            )));
        }
        let reply = self
            .send(|| Ok(self.cx.http.delete(&image_path(id))))
            .await?;
        if reply.status == StatusCode::NOT_FOUND {
            return Ok(Next::done().note(format!("image {id} was already deleted")));
        }
        riverbed::success(reply)?;
        Ok(Next::done().note(format!("image {id} deleted")))
    }

    async fn send(
        &self,
        build: impl Fn() -> Result<crate::device_http::Call<'c>, StepError>,
    ) -> Result<crate::device_http::Reply, StepError> {
        self.tokens.send(&self.cx.http, self.login, build).await
    }

    /// Posts an update action. Refused while the update already is in one
    /// of the `reached` states, it is as good as done: another copy of
    /// this step (a redelivery) got there first.
    async fn post(&self, path: &str, reached: &[UpdateState]) -> Result<(), StepError> {
        match riverbed::success(self.send(|| Ok(self.cx.http.post(path))).await?) {
            Ok(_) => Ok(()),
            Err(refusal) if refusal.class == ErrorClass::Device => {
                if reached.contains(&self.update().await?.state) {
                    Ok(())
                } else {
                    Err(refusal)
                }
            }
            Err(error) => Err(error),
        }
    }

    async fn update(&self) -> Result<Update, StepError> {
        let reply = riverbed::success(self.send(|| Ok(self.cx.http.get(UPDATE))).await?)?;
        read_update(&reply.json()?).map_err(|problem| garbage(&reply, &problem))
    }

    /// The image of the campaign's target on the appliance, if any: a
    /// usable one first, else one that failed (whose description then ends
    /// the job).
    async fn find_image(&self) -> Result<Option<u64>, StepError> {
        let reply = riverbed::success(self.send(|| Ok(self.cx.http.get(IMAGES))).await?)?;
        let body: Value = reply.json()?;
        let items = match lenient_items(&body) {
            Some(items) => items,
            None => return Err(garbage(&reply, "no list of images")),
        };
        let wanted = &self.cx.job.target.sha256;
        let mut candidates = Vec::new();
        for item in items {
            let image = read_image(item).map_err(|problem| garbage(&reply, &problem))?;
            let matches = match &image.checksum {
                Some(checksum) => checksum.eq_ignore_ascii_case(wanted),
                None => image.version.as_deref() == Some(self.target()),
            };
            if let (true, Some(id)) = (matches, image.id) {
                candidates.push((image.state.failed(), id));
            }
        }
        candidates.sort();
        Ok(candidates.first().map(|(_, id)| *id))
    }
}

/// `{"items": [...]}` as documented (`items` is optional), or a bare list.
fn lenient_items(body: &Value) -> Option<&[Value]> {
    match body {
        Value::Array(items) => Some(items),
        Value::Object(object) => match lenient::field(object, "items") {
            Some(Value::Array(items)) => Some(items),
            None | Some(Value::Null) => Some(&[]),
            Some(_) => None,
        },
        _ => None,
    }
}

/// What a failed update leads to: a reset for a graceful failure; for a
/// critical one, the end, marked for a person's attention.
fn failure(image: Option<u64>, update: Update) -> Next<NpmStep> {
    match update.state {
        UpdateState::FailedCritical => Next::end(
            Ending::failed(
                ErrorClass::Device,
                format!(
                    "the update failed critically: {}; the appliance needs attention",
                    update.description
                ),
            )
            .needing_attention(),
        ),
        _ => Next::run(NpmStep::Reset {
            image,
            description: update.description,
        }),
    }
}

fn garbage(reply: &crate::device_http::Reply, problem: &str) -> StepError {
    StepError::garbage(format!("{}: {problem}: {}", reply.what, reply.quote()))
}

/// The SHA-256 (lowercase hex) and size of a file, read in chunks.
pub(super) async fn file_sha256(path: &std::path::Path) -> Result<(String, u64), StepError> {
    let unreadable = |e: std::io::Error| {
        StepError::config(format!("cannot read image file {}: {e}", path.display()))
    };
    let mut file = tokio::fs::File::open(path).await.map_err(unreadable)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buffer).await.map_err(unreadable)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buffer[..n]);
    }
    Ok((format!("{:x}", hasher.finalize()), size))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UpdateState {
    Idle,
    Initializing,
    Initialized,
    Running,
    FailedGraceful,
    FailedCritical,
}

impl UpdateState {
    fn parse(text: &str) -> Option<UpdateState> {
        Some(match text.trim().to_ascii_uppercase().as_str() {
            "IDLE" => UpdateState::Idle,
            "INITIALIZING" => UpdateState::Initializing,
            "INITIALIZED" => UpdateState::Initialized,
            "RUNNING" => UpdateState::Running,
            "FAILED_GRACEFUL" => UpdateState::FailedGraceful,
            "FAILED_CRITICAL" => UpdateState::FailedCritical,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            UpdateState::Idle => "IDLE",
            UpdateState::Initializing => "INITIALIZING",
            UpdateState::Initialized => "INITIALIZED",
            UpdateState::Running => "RUNNING",
            UpdateState::FailedGraceful => "FAILED_GRACEFUL",
            UpdateState::FailedCritical => "FAILED_CRITICAL",
        }
    }
}

/// The `update` resource.
#[derive(Debug, Clone)]
struct Update {
    state: UpdateState,
    description: String,
    last_state_time: Option<i64>,
    /// The newest version of `update_history`.
    installed: Option<String>,
    history: Value,
}

fn read_update(body: &Value) -> Result<Update, String> {
    let object = body.as_object().ok_or("not an update object")?;
    let state_text = lenient::text(object, "state").ok_or("no state")?;
    let state =
        UpdateState::parse(&state_text).ok_or_else(|| format!("unknown state {state_text:?}"))?;
    let history = lenient::field(object, "update_history")
        .cloned()
        .unwrap_or(Value::Array(Vec::new()));
    let entries = history.as_array().ok_or("update_history is not a list")?;
    // The newest entry by time; among equal or missing times, the last.
    let installed = entries
        .iter()
        .enumerate()
        .filter_map(|(i, entry)| {
            let entry = entry.as_object()?;
            let version = lenient::text(entry, "version")?;
            Some((
                (lenient::epoch_seconds(entry, "time").unwrap_or(i64::MIN), i),
                version,
            ))
        })
        .max_by_key(|(key, _)| *key)
        .map(|(_, version)| version);
    Ok(Update {
        state,
        description: lenient::text(object, "state_description").unwrap_or_default(),
        last_state_time: lenient::epoch_seconds(object, "last_state_time"),
        installed,
        history,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ImageState {
    Uploading,
    Validating,
    UploadError,
    Valid,
    Invalid,
}

impl ImageState {
    fn name(self) -> &'static str {
        match self {
            ImageState::Uploading => "UPLOADING",
            ImageState::Validating => "VALIDATING",
            ImageState::UploadError => "UPLOAD_ERROR",
            ImageState::Valid => "VALID",
            ImageState::Invalid => "INVALID",
        }
    }

    fn failed(self) -> bool {
        matches!(self, ImageState::UploadError | ImageState::Invalid)
    }
}

#[derive(Debug, Clone)]
struct Image {
    id: Option<u64>,
    state: ImageState,
    description: String,
    checksum: Option<String>,
    version: Option<String>,
    progress: Option<f64>,
}

impl Image {
    fn describe(&self) -> String {
        let mut text = self.state.name().to_owned();
        if let Some(progress) = self.progress {
            text.push_str(&format!(" {progress}%"));
        }
        if !self.description.is_empty() {
            text.push_str(": ");
            text.push_str(&self.description);
        }
        text
    }
}

fn read_image(body: &Value) -> Result<Image, String> {
    let object: &Map<String, Value> = body.as_object().ok_or("an image is not an object")?;
    let state_text = lenient::text(object, "state").ok_or("an image has no state")?;
    let state = match state_text.trim().to_ascii_uppercase().as_str() {
        "UPLOADING" => ImageState::Uploading,
        "VALIDATING" => ImageState::Validating,
        "UPLOAD_ERROR" => ImageState::UploadError,
        "VALID" => ImageState::Valid,
        "INVALID" => ImageState::Invalid,
        _ => return Err(format!("unknown image state {state_text:?}")),
    };
    let id = match lenient::text(object, "id") {
        None => None,
        Some(text) => Some(
            text.parse::<u64>()
                .map_err(|_| format!("image id {text:?} is not a number"))?,
        ),
    };
    Ok(Image {
        id,
        state,
        description: lenient::text(object, "state_description").unwrap_or_default(),
        checksum: lenient::text(object, "checksum")
            .map(|c| c.trim().to_owned())
            .filter(|c| !c.is_empty()),
        version: lenient::text(object, "version").filter(|v| !v.is_empty()),
        progress: lenient::field(object, "progress").and_then(Value::as_f64),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_history_entry_is_the_installed_version() {
        let update = read_update(&json!({
            "last_state_time": 1700000000,
            "state": "IDLE",
            "state_description": "",
            "update_history": [
                {"time": 1600000000, "version": "11.4.0"},
                {"time": 1700000000, "version": "11.5.0"},
                {"version": "11.5.1"}
            ]
        }))
        .unwrap();
        assert_eq!(update.installed.as_deref(), Some("11.5.0"));
        assert!(read_update(&json!({"state": "DANCING", "update_history": []})).is_err());
    }

    #[test]
    fn images_accept_ids_as_numbers_or_text() {
        let image = read_image(&json!({
            "id": "7", "state": "VALID", "state_description": "ok",
            "checksum": "AB", "progress": 100
        }))
        .unwrap();
        assert_eq!(image.id, Some(7));
        assert_eq!(image.describe(), "VALID 100%: ok");
        assert!(read_image(&json!({"id": 1, "state": "MAYBE"})).is_err());
    }
}
