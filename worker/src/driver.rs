//! The driver contract: what a device driver is ([`Driver`]), what a step
//! gets ([`StepContext`]), what it decides ([`Next`]) and how it fails
//! ([`StepError`], in [`error`]).
//!
//! A driver knows HTTP and its device's semantics, nothing of AMQP: it runs
//! one step and says what comes next, or what its failure means for the
//! job. Deadlines, retries, timeouts and cleanup ordering are the
//! pipeline's business (`crate::step`).
//!
//! Every step observes the device before it acts, because a step can run
//! twice: a worker that dies before acking hands the same message to
//! another.
//!
//! Dependencies run one way: this contract; then the helpers built on it
//! (`device_http`, `credentials`, `support`); then the drivers
//! (`drivers`); then the table of drivers by kind (`registry`).

pub(crate) mod error;

pub(crate) use error::{Failure, Rejection, StepError};

use crate::{credentials::Credentials, device_http::DeviceClient};
use flotilla_common::{DeviceKind, Job};
use serde::{Serialize, de::DeserializeOwned};
use std::{fmt, future::Future, time::Duration};
use tokio::time::Instant;

/// What an upload leaves the rest of its step, within the step's timeout.
const AFTER_UPLOAD: Duration = Duration::from_secs(5);

/// What a step has to work with.
pub(crate) struct StepContext<'a> {
    pub(crate) job: &'a Job,
    pub(crate) http: DeviceClient<'a>,
    pub(crate) credentials: &'a Credentials,
    /// The worker's `FLOTILLA_IMAGE_DIR`, canonical: `file:` images must lie
    /// under it.
    pub(crate) image_dir: Option<&'a std::path::Path>,
    /// When the campaign's step timeout ends this step.
    pub(crate) step_deadline: Instant,
}

impl StepContext<'_> {
    /// How long an upload may take: the rest of the step's timeout, less a
    /// moment for what follows it, instead of the per-request limit meant
    /// for small calls.
    pub(crate) fn upload_timeout(&self) -> Duration {
        let left = self.step_deadline.saturating_duration_since(Instant::now());
        left.saturating_sub(AFTER_UPLOAD.min(left / 4))
            .max(Duration::from_secs(1))
    }
}

pub(crate) trait Driver: Send + Sync + 'static {
    /// The driver's steps. Serialized into the job between deliveries, so a
    /// step carries whatever the next one must know (a fetch key, a slot,
    /// the job's baseline: `crate::support::baseline`).
    type Step: Serialize + DeserializeOwned + fmt::Debug + Send + Sync;

    const KIND: DeviceKind;

    fn first_step(&self) -> Self::Step;

    /// A short, stable name for events and metric labels.
    fn step_name(step: &Self::Step) -> &'static str;

    /// Runs one step against the device.
    fn run(
        &self,
        step: Self::Step,
        cx: &StepContext<'_>,
    ) -> impl Future<Output = Result<Next<Self::Step>, StepError>> + Send;

    /// The step that undoes what `step` may have left on the device (an
    /// enabled rule, a running download) when the job ends early or
    /// fails, or `None` if nothing can be left behind. A cleanup step
    /// returns [`Next::done`] when it is finished.
    fn cleanup(&self, step: &Self::Step) -> Option<Self::Step>;
}

/// What a step decided, when it did not fail.
#[derive(Debug)]
pub(crate) struct Next<S> {
    pub(crate) action: Action<S>,
    /// What the device reported, for the step's event (progress, a status).
    pub(crate) note: Option<String>,
}

#[derive(Debug)]
pub(crate) enum Action<S> {
    /// Run this step at once.
    Run(S),
    /// Run this step after the campaign's poll interval: the device is busy.
    Poll(S),
    /// The job succeeded (with detail for the report, if any): run this
    /// step's cleanup, then end.
    Succeed(Option<serde_json::Value>),
    /// Cleanup is finished: end with the outcome decided before.
    Done,
}

impl<S> Next<S> {
    pub(crate) fn run(step: S) -> Self {
        Next::from(Action::Run(step))
    }

    pub(crate) fn poll(step: S) -> Self {
        Next::from(Action::Poll(step))
    }

    pub(crate) fn succeeded() -> Self {
        Next::from(Action::Succeed(None))
    }

    pub(crate) fn succeeded_with(detail: serde_json::Value) -> Self {
        Next::from(Action::Succeed(Some(detail)))
    }

    pub(crate) fn done() -> Self {
        Next::from(Action::Done)
    }

    pub(crate) fn note(mut self, note: impl Into<String>) -> Self {
        self.note = Some(note.into());
        self
    }
}

impl<S> From<Action<S>> for Next<S> {
    fn from(action: Action<S>) -> Self {
        Next { action, note: None }
    }
}
