//! Device drivers: one module per device API, each a small explicit state
//! machine (its `Step` enum) behind the [`Driver`] trait.
//!
//! A driver knows HTTP and its device's semantics, nothing of AMQP: it runs
//! one step and says what comes next ([`Next`]) or what went wrong
//! ([`StepError`]). Deadlines, retries, timeouts and cleanup ordering are the
//! pipeline's business (`crate::step`).
//!
//! Every step observes the device before it acts, because a step can run
//! twice: a worker that dies before acking hands the same message to another.
//!
//! To add a device kind: write `drivers/<kind>.rs` with a type implementing
//! [`Driver`], and register it in [`Registry::standard`].

pub mod dms;
pub mod flowgateway;
pub mod netprofiler;
pub mod npm;
mod riverbed;
pub mod sps;

use crate::{credentials::Credentials, device_http::DeviceClient};
use flotilla_common::{DeviceKind, Ending, ErrorClass, Job};
use futures::future::BoxFuture;
use serde::{Serialize, de::DeserializeOwned};
use std::{collections::HashMap, fmt, future::Future, sync::Arc, time::Duration};

/// What a step has to work with.
pub struct StepContext<'a> {
    pub job: &'a Job,
    pub http: DeviceClient<'a>,
    pub credentials: &'a Credentials,
}

pub trait Driver: Send + Sync + 'static {
    /// The driver's steps. Serialized into the job between deliveries, so a
    /// step carries whatever the next one must know (a fetch key, a slot).
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

/// What a step decided.
#[derive(Debug)]
pub struct Next<S> {
    pub action: Action<S>,
    /// What the device reported, for the step's event (progress, a status).
    pub note: Option<String>,
}

#[derive(Debug)]
pub enum Action<S> {
    /// Run this step at once.
    Run(S),
    /// Run this step after a wait: the device is busy. `None` waits the
    /// campaign's poll interval.
    Poll(S, Option<Duration>),
    /// The outcome is decided: run this step's cleanup, then end with it.
    End(Ending),
    /// Cleanup is finished: end with the outcome decided before.
    Done,
}

impl<S> Next<S> {
    pub fn run(step: S) -> Self {
        Next::from(Action::Run(step))
    }

    pub fn poll(step: S) -> Self {
        Next::from(Action::Poll(step, None))
    }

    pub fn poll_in(step: S, delay: Duration) -> Self {
        Next::from(Action::Poll(step, Some(delay)))
    }

    pub fn end(ending: Ending) -> Self {
        Next::from(Action::End(ending))
    }

    pub fn done() -> Self {
        Next::from(Action::Done)
    }

    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.note = Some(note.into());
        self
    }

    fn map<T>(self, f: impl FnOnce(S) -> T) -> Next<T> {
        let action = match self.action {
            Action::Run(s) => Action::Run(f(s)),
            Action::Poll(s, delay) => Action::Poll(f(s), delay),
            Action::End(ending) => Action::End(ending),
            Action::Done => Action::Done,
        };
        Next {
            action,
            note: self.note,
        }
    }
}

impl<S> From<Action<S>> for Next<S> {
    fn from(action: Action<S>) -> Self {
        Next { action, note: None }
    }
}

/// A step that could not do its work, and whether trying again may help.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct StepError {
    pub class: ErrorClass,
    pub message: String,
    /// Retried with backoff up to the campaign's limit; otherwise the job
    /// ends failed at once.
    pub retryable: bool,
}

impl StepError {
    /// A timeout, a refused connection, a 5xx: try again later.
    pub fn transient(message: impl Into<String>) -> Self {
        StepError {
            class: ErrorClass::Transient,
            message: message.into(),
            retryable: true,
        }
    }

    /// The device answered something we cannot understand. Retried, since a
    /// proxy or a restarting service can answer garbage once.
    pub fn garbage(message: impl Into<String>) -> Self {
        StepError {
            class: ErrorClass::Protocol,
            message: message.into(),
            retryable: true,
        }
    }

    /// The device said no, in its own words.
    pub fn device(message: impl Into<String>) -> Self {
        StepError {
            class: ErrorClass::Device,
            message: message.into(),
            retryable: false,
        }
    }

    /// The device refused our credentials.
    pub fn auth(message: impl Into<String>) -> Self {
        StepError {
            class: ErrorClass::Auth,
            message: message.into(),
            retryable: false,
        }
    }

    /// This worker lacks something the job needs (a secret, a file).
    /// Retried: another worker, or this one after a fix, may have it.
    pub fn config(message: impl Into<String>) -> Self {
        StepError {
            class: ErrorClass::Config,
            message: message.into(),
            retryable: true,
        }
    }
}

/// A job's `step` field that its driver does not know: a message from an
/// incompatible build, or a corrupted one.
#[derive(Debug, thiserror::Error)]
#[error("the {kind} driver has no step {step}: {reason}")]
pub struct UnknownStep {
    pub kind: DeviceKind,
    pub step: String,
    pub reason: String,
}

/// A [`Driver`] with its steps as JSON, so drivers of every kind fit in one
/// registry. Implemented for every driver; not meant to be implemented.
pub(crate) trait AnyDriver: Send + Sync {
    fn first_step(&self) -> serde_json::Value;

    fn step_name(&self, step: &serde_json::Value) -> Result<&'static str, UnknownStep>;

    fn run<'a>(
        &'a self,
        step: &serde_json::Value,
        cx: &'a StepContext<'a>,
    ) -> Result<BoxFuture<'a, Result<Next<serde_json::Value>, StepError>>, UnknownStep>;

    fn cleanup(&self, step: &serde_json::Value) -> Result<Option<serde_json::Value>, UnknownStep>;
}

impl<D: Driver> AnyDriver for D {
    fn first_step(&self) -> serde_json::Value {
        encode(Driver::first_step(self))
    }

    fn step_name(&self, step: &serde_json::Value) -> Result<&'static str, UnknownStep> {
        Ok(D::step_name(&decode::<D>(self, step)?))
    }

    fn run<'a>(
        &'a self,
        step: &serde_json::Value,
        cx: &'a StepContext<'a>,
    ) -> Result<BoxFuture<'a, Result<Next<serde_json::Value>, StepError>>, UnknownStep> {
        let step = decode::<D>(self, step)?;
        Ok(Box::pin(async move {
            let next = Driver::run(self, step, cx).await?;
            Ok(next.map(encode))
        }))
    }

    fn cleanup(&self, step: &serde_json::Value) -> Result<Option<serde_json::Value>, UnknownStep> {
        let step = decode::<D>(self, step)?;
        Ok(Driver::cleanup(self, &step).map(encode))
    }
}

/// `null` is the driver's first step.
fn decode<D: Driver>(driver: &D, step: &serde_json::Value) -> Result<D::Step, UnknownStep> {
    if step.is_null() {
        return Ok(driver.first_step());
    }
    serde_json::from_value(step.clone()).map_err(|e| UnknownStep {
        kind: D::KIND,
        step: step.to_string(),
        reason: e.to_string(),
    })
}

fn encode<S: Serialize>(step: S) -> serde_json::Value {
    // Steps are plain enums of strings and numbers; serializing them to a
    // JSON value cannot fail.
    serde_json::to_value(step).expect("driver steps serialize to JSON")
}

/// The drivers a worker runs, by device kind.
#[derive(Clone, Default)]
pub struct Registry {
    drivers: HashMap<DeviceKind, Arc<dyn AnyDriver>>,
}

impl Registry {
    /// Every driver Flotilla ships, one line each.
    pub fn standard() -> Self {
        let mut registry = Registry::default();
        registry.register(dms::Dms);
        registry.register(netprofiler::Netprofiler::default());
        registry.register(flowgateway::Flowgateway::default());
        registry.register(npm::Npm::default());
        registry.register(sps::Sps::default());
        registry
    }

    pub fn register<D: Driver>(&mut self, driver: D) {
        self.drivers.insert(D::KIND, Arc::new(driver));
    }

    pub fn kinds(&self) -> impl Iterator<Item = DeviceKind> + '_ {
        self.drivers.keys().copied()
    }

    pub(crate) fn get(&self, kind: DeviceKind) -> Option<&dyn AnyDriver> {
        self.drivers.get(&kind).map(|d| d.as_ref())
    }
}
