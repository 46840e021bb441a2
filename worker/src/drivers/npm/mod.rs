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
//! 4. `start`: `POST update/start` only from `INITIALIZED`, and only when
//!    the update's `target_version` (when the appliance reports one) is
//!    the campaign's, so a redelivered step never starts a second update
//!    and no update installs what the campaign did not ask for;
//! 5. `await_update`: poll `update` through the reboot (refused
//!    connections, timeouts and 5xx are waits, until the job's deadline)
//!    until `IDLE` with the target version newest in `update_history`;
//! 6. on `FAILED_GRACEFUL`, `reset` the update and fail with its
//!    description; `FAILED_CRITICAL` fails the job and marks it for
//!    attention;
//! 7. `reset_init` (the cleanup of an update this job initialized, when
//!    the job fails, is cancelled or passes its deadline before it
//!    started): `reset` it while it is `INITIALIZING` or `INITIALIZED`;
//! 8. `delete_image` (the cleanup of every step that knows the image):
//!    deletes it when `[drivers.npm] delete_image` asks, unless an update
//!    is under way or failed critically (left for inspection).
//!
//! An image found on the appliance is followed rather than fetched again:
//! one of the campaign's (by checksum, or by version), or one still
//! `UPLOADING` or `VALIDATING` that cannot be told apart yet (a fetch of
//! this job whose answer was lost); if the latter turns out not to be the
//! campaign's, `stage` runs again. A failed image is never followed: an
//! earlier job's does not doom this one.
//!
//! The job's first delivery records the update's baseline
//! ([`NpmBaseline`]: `last_state_time` and `update_history`) and runs the
//! step again at once; `stage`, `init` and `await_update` judge against
//! it. "Went back to `IDLE` during this job" is a `last_state_time` other
//! than the baseline's; what the update installed is the newest entry the
//! history gained. Times are compared for equality only, so an appliance
//! reset seconds before the job, one whose clock is off, or one whose
//! clock steps mid-job upgrades normally.
//!
//! The recording step may be a late copy, after the job acted: a state
//! change or history entry stamped at or after the job's publication, read
//! on the appliance's clock ([`crate::support::clock`]), is the job's own.
//! An appliance without a `Date` header gives no such reading, and
//! everything counts as earlier: a copy of the first step redelivered
//! after this job's update failed and was reset would update again.
//!
//! Authentication (`[drivers.npm] auth`): a bearer token from `POST
//! /api/mgmt.aaa/1.0/token` (`token`, the default), cached per appliance
//! and fetched anew when it expires or the appliance (rebooted) refuses
//! it; or HTTP Basic on every call (`basic`).
//!
//! Layout: this file holds the update's steps; `images` the staging of
//! the image (find, fetch, upload, validate); `answers` the reading of the
//! appliance's resources; `baseline` what the update showed before the
//! job, and the judgements against it.

mod answers;
mod baseline;
#[cfg(test)]
mod fuzz;
mod images;

use super::riverbed::{self, auth::Login};
use crate::{
    device_http::{Call, Reply},
    driver::{Driver, Failure, Next, StepContext, StepError},
    support::{
        baseline::{self as baselines, BASELINE_STEP, Baselined},
        clock,
        login::Logins,
        restart::{Seen, through_restart},
    },
};
use answers::{Update, UpdateState, read_update};
pub(crate) use baseline::NpmBaseline;
use flotilla_common::{
    DeviceKind,
    settings::{self, NpmSettings},
};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::json;

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
pub(crate) struct Npm {
    logins: Logins,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum NpmStep {
    Stage,
    AwaitImage {
        image: u64,
        /// Found on the appliance rather than fetched by this job: if it
        /// turns out not to be the campaign's, stage again.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        adopted: bool,
    },
    /// `image`: the update image, once known, for the cleanup to delete.
    /// `ours`: this job initialized the update (its cleanup resets it).
    Init {
        image: Option<u64>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        ours: bool,
    },
    Start {
        image: Option<u64>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        ours: bool,
    },
    AwaitUpdate {
        image: Option<u64>,
    },
    Reset {
        image: Option<u64>,
        description: String,
    },
    ResetInit {
        image: Option<u64>,
    },
    DeleteImage {
        image: u64,
    },
}

impl NpmStep {
    fn image(&self) -> Option<u64> {
        match self {
            NpmStep::Stage => None,
            NpmStep::AwaitImage { image, .. } | NpmStep::DeleteImage { image } => Some(*image),
            NpmStep::Init { image, .. }
            | NpmStep::Start { image, .. }
            | NpmStep::AwaitUpdate { image }
            | NpmStep::Reset { image, .. }
            | NpmStep::ResetInit { image } => *image,
        }
    }

    /// Whether the step judges the update against the baseline.
    fn judges(&self) -> bool {
        matches!(
            self,
            NpmStep::Stage | NpmStep::Init { .. } | NpmStep::AwaitUpdate { .. }
        )
    }

    fn name(&self) -> &'static str {
        match self {
            NpmStep::Stage => "stage",
            NpmStep::AwaitImage { .. } => "await_image",
            NpmStep::Init { .. } => "init",
            NpmStep::Start { .. } => "start",
            NpmStep::AwaitUpdate { .. } => "await_update",
            NpmStep::Reset { .. } => "reset",
            NpmStep::ResetInit { .. } => "reset_init",
            NpmStep::DeleteImage { .. } => "delete_image",
        }
    }

    fn cleanup(&self) -> Option<NpmStep> {
        match self {
            NpmStep::DeleteImage { .. } => None,
            NpmStep::Init { image, ours: true } | NpmStep::Start { image, ours: true } => {
                Some(NpmStep::ResetInit { image: *image })
            }
            NpmStep::ResetInit { image } => image.map(|image| NpmStep::DeleteImage { image }),
            step => step.image().map(|image| NpmStep::DeleteImage { image }),
        }
    }
}

type Step = Baselined<NpmStep, NpmBaseline>;

impl Driver for Npm {
    type Step = Step;
    const KIND: DeviceKind = DeviceKind::Npm;

    fn first_step(&self) -> Step {
        Baselined::first(NpmStep::Stage)
    }

    fn step_name(step: &Step) -> &'static str {
        if step.baseline.is_none() && step.step.judges() {
            return BASELINE_STEP;
        }
        step.step.name()
    }

    async fn run(&self, step: Step, cx: &StepContext<'_>) -> Result<Next<Step>, StepError> {
        let settings: NpmSettings = settings::read(&cx.job.settings).map_err(|e| {
            StepError::misconfigured(format!("the job's [drivers.npm] settings: {e}"))
        })?;
        let login = Login::npm(cx.credentials, settings.auth)?;
        let api = Api {
            logins: &self.logins,
            cx,
            login: &login,
            settings: &settings,
        };
        let Baselined { step, baseline } = step;
        let next = match (step, &baseline) {
            (
                step @ (NpmStep::Stage | NpmStep::Init { .. } | NpmStep::AwaitUpdate { .. }),
                None,
            ) => return api.record_baseline(step).await,
            (NpmStep::Stage, Some(b)) => api.stage(b).await,
            (NpmStep::Init { image, ours }, Some(b)) => api.init(image, ours, b).await,
            (NpmStep::AwaitUpdate { image }, Some(b)) => api.await_update(image, b).await,
            (NpmStep::AwaitImage { image, adopted }, _) => api.await_image(image, adopted).await,
            (NpmStep::Start { image, ours }, _) => api.start(image, ours).await,
            (NpmStep::Reset { description, .. }, _) => api.reset(description).await,
            (NpmStep::ResetInit { image }, _) => api.reset_init(image).await,
            (NpmStep::DeleteImage { image }, _) => api.delete_image(image).await,
        }?;
        Ok(baselines::carry(next, baseline.as_ref()))
    }

    fn cleanup(&self, step: &Step) -> Option<Step> {
        step.step
            .cleanup()
            .map(|cleanup| Baselined::with(cleanup, step.baseline.clone()))
    }
}

/// One step's view of the appliance.
struct Api<'s, 'c> {
    logins: &'s Logins,
    cx: &'s StepContext<'c>,
    login: &'s Login,
    settings: &'s NpmSettings,
}

impl<'c> Api<'_, 'c> {
    fn target(&self) -> &str {
        &self.cx.job.target.version
    }

    /// Records the update's baseline, then runs `step` with it.
    async fn record_baseline(&self, step: NpmStep) -> Result<Next<Step>, StepError> {
        let (update, reply) = self.update_and_reply().await?;
        let published = clock::published_on_device(self.cx.job, &reply);
        let baseline = NpmBaseline::of(&update, published);
        let note = baseline.describe(&update, published);
        Ok(baselines::recorded(step, baseline, note))
    }

    async fn stage(&self, baseline: &NpmBaseline) -> Result<Next<NpmStep>, StepError> {
        let update = self.update().await?;
        if update.state == UpdateState::Idle
            && baseline.installed(&update).as_deref() == Some(self.target())
        {
            return Ok(
                Next::succeeded().note(format!("the appliance already runs {}", self.target()))
            );
        }
        let image = self.find_image().await?;
        match (update.state, image) {
            (UpdateState::Idle, Some(image)) => Ok(Next::run(NpmStep::AwaitImage {
                image,
                adopted: true,
            })
            .note(format!("image {image} is already on the appliance"))),
            (UpdateState::Idle, None) => self.get_image().await,
            // An update is under way or failed (this job's, redelivered, or
            // an earlier one): follow it rather than stage another image.
            (_, image) => Ok(Next::run(NpmStep::Init { image, ours: false })
                .note(format!("the update is {}", update.state.name()))),
        }
    }

    async fn init(
        &self,
        image: Option<u64>,
        ours: bool,
        baseline: &NpmBaseline,
    ) -> Result<Next<NpmStep>, StepError> {
        let update = self.update().await?;
        match update.state {
            UpdateState::Idle => {
                if let Some(done) = self.idle_ending(&update, baseline) {
                    return done;
                }
                self.post(INIT, &[UpdateState::Initializing, UpdateState::Initialized])
                    .await?;
                Ok(Next::poll(NpmStep::Init { image, ours: true }).note("initializing the update"))
            }
            UpdateState::Initializing => {
                Ok(Next::poll(NpmStep::Init { image, ours }).note(update.description))
            }
            UpdateState::Initialized => Ok(Next::run(NpmStep::Start { image, ours })),
            UpdateState::Running => Ok(Next::poll(NpmStep::AwaitUpdate { image })),
            UpdateState::FailedGraceful | UpdateState::FailedCritical => failure(image, update),
        }
    }

    async fn start(&self, image: Option<u64>, ours: bool) -> Result<Next<NpmStep>, StepError> {
        let update = self.update().await?;
        match update.state {
            UpdateState::Initialized => {
                // Never install what the campaign did not ask for.
                if let Some(found) = &update.target_version
                    && found != self.target()
                {
                    let note = if ours {
                        "the update this job initialized is reset"
                    } else {
                        "the update was initialized before this job; left as it is"
                    };
                    return Err(Failure::device(format!(
                        "the initialized update installs version {found}, not the campaign's {}; \
                         not started",
                        self.target()
                    ))
                    .note(note)
                    .into());
                }
                self.post(START, &[UpdateState::Running]).await?;
                Ok(Next::poll(NpmStep::AwaitUpdate { image }).note("update started"))
            }
            UpdateState::Running => Ok(
                Next::poll(NpmStep::AwaitUpdate { image }).note("the update is already running")
            ),
            UpdateState::Idle | UpdateState::Initializing => {
                Ok(Next::run(NpmStep::Init { image, ours }))
            }
            UpdateState::FailedGraceful | UpdateState::FailedCritical => failure(image, update),
        }
    }

    async fn await_update(
        &self,
        image: Option<u64>,
        baseline: &NpmBaseline,
    ) -> Result<Next<NpmStep>, StepError> {
        // The appliance reboots into the new version.
        let update = match through_restart(self.update().await)? {
            Seen::Up(update) => update,
            Seen::Restarting(note) => {
                return Ok(Next::poll(NpmStep::AwaitUpdate { image }).note(note));
            }
        };
        match update.state {
            UpdateState::Running | UpdateState::Initializing => {
                Ok(Next::poll(NpmStep::AwaitUpdate { image }).note(update.description))
            }
            UpdateState::Initialized => Ok(Next::run(NpmStep::Start { image, ours: false })),
            UpdateState::Idle => match self.idle_ending(&update, baseline) {
                Some(done) => done,
                None => Err(Failure::device(format!(
                    "the update ended IDLE on version {}, not {}: {}",
                    baseline.installed(&update).as_deref().unwrap_or("unknown"),
                    self.target(),
                    update.description
                ))
                .into()),
            },
            UpdateState::FailedGraceful | UpdateState::FailedCritical => failure(image, update),
        }
    }

    /// An `IDLE` appliance's verdict: succeeded on the target version;
    /// failed if the update went back to `IDLE` during this job without it
    /// (its state changed since the baseline: a reset after a failure;
    /// never initialize and start again); `None` when nothing of this job
    /// has happened yet.
    fn idle_ending(
        &self,
        update: &Update,
        baseline: &NpmBaseline,
    ) -> Option<Result<Next<NpmStep>, StepError>> {
        if baseline.installed(update).as_deref() == Some(self.target()) {
            return Some(Ok(Next::succeeded_with(json!({
                "version": self.target(),
                "update_history": update.history,
            }))
            .note(format!("the appliance runs {}", self.target()))));
        }
        if baseline.state_changed(update) {
            return Some(Err(Failure::device(format!(
                "the update went back to IDLE during this job without installing {}: {}",
                self.target(),
                update.description
            ))
            .into()));
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
        Err(
            Failure::device(format!("the update failed gracefully: {description}"))
                .note(note)
                .into(),
        )
    }

    /// Resets an update this job initialized but did not start.
    async fn reset_init(&self, image: Option<u64>) -> Result<Next<NpmStep>, StepError> {
        let then = |note: String| match image {
            Some(image) => Next::run(NpmStep::DeleteImage { image }).note(note),
            None => Next::done().note(note),
        };
        let update = self.update().await?;
        if !matches!(
            update.state,
            UpdateState::Initializing | UpdateState::Initialized
        ) {
            return Ok(then(format!(
                "nothing to reset: the update is {}",
                update.state.name()
            )));
        }
        self.post(RESET, &[UpdateState::Idle]).await?;
        Ok(then("the update this job initialized is reset".to_owned()))
    }

    async fn delete_image(&self, id: u64) -> Result<Next<NpmStep>, StepError> {
        if !self.settings.delete_image {
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
        build: impl Fn() -> Result<Call<'c>, StepError>,
    ) -> Result<Reply, StepError> {
        self.login.send(self.logins, &self.cx.http, build).await
    }

    /// Posts an update action. Refused while the update already is in one
    /// of the `reached` states, it is as good as done: another copy of
    /// this step (a redelivery) got there first.
    async fn post(&self, path: &str, reached: &[UpdateState]) -> Result<(), StepError> {
        match riverbed::success(self.send(|| Ok(self.cx.http.post(path))).await?) {
            Ok(_) => Ok(()),
            Err(refusal) if refusal.is_refusal() => {
                if reached.contains(&self.update().await?.state) {
                    Ok(())
                } else {
                    Err(refusal)
                }
            }
            Err(error) => Err(error),
        }
    }

    /// The `update` resource.
    async fn update(&self) -> Result<Update, StepError> {
        self.update_and_reply().await.map(|(update, _)| update)
    }

    /// The `update` resource, and the answer it came in.
    async fn update_and_reply(&self) -> Result<(Update, Reply), StepError> {
        let reply = riverbed::success(self.send(|| Ok(self.cx.http.get(UPDATE))).await?)?;
        let update = read_update(&reply.json()?).map_err(|problem| reply.unreadable(&problem))?;
        Ok((update, reply))
    }
}

/// What a failed update leads to: a reset for a graceful failure; for a
/// critical one, the end, marked for a person's attention.
fn failure(image: Option<u64>, update: Update) -> Result<Next<NpmStep>, StepError> {
    match update.state {
        UpdateState::FailedCritical => Err(Failure::device(format!(
            "the update failed critically: {}; the appliance needs attention",
            update.description
        ))
        .needing_attention()
        .into()),
        _ => Ok(Next::run(NpmStep::Reset {
            image,
            description: update.description,
        })),
    }
}
