//! One step of a job: run the current step through its driver and decide what
//! follows. The pipeline's rules live here, the same around every driver:
//!
//! - a job's deadline counts from its first step; once passed, the job stops
//!   upgrading, runs its driver's cleanup and ends `timed_out`;
//! - a job of a cancelled campaign likewise runs its cleanup and ends
//!   `cancelled`;
//! - a step runs under the campaign's step timeout;
//! - [`StepError::Retry`] retries the same step with exponential backoff
//!   and jitter, up to the campaign's attempt limit, then fails the job
//!   with its class;
//! - [`StepError::Fail`] and a success decide the outcome: it is stored in
//!   the job, the driver's cleanup for the current step runs, and the job
//!   ends with that outcome whatever the cleanup meets;
//! - [`StepError::Reject`] sends the message to the dead letters.
//!
//! The pipeline is generic over the driver: a delivery's step is decoded
//! once, into the driver's own `Step`, and encoded once, into the job it
//! publishes next.

use crate::{
    credentials::CredentialStore,
    device_http::{CallLog, DeviceClient, HttpClients},
    driver::{Action, Driver, Rejection, StepContext, StepError},
    metrics::WorkerMetrics,
};
use chrono::Utc;
use flotilla_common::{
    CallSample, DeviceKind, Ending, ErrorClass, Event, EventBody, FinishedEvent, Job, RetryPolicy,
    StepEvent, job::host_key,
};
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// How long cleanup may run past a job's deadline before the job ends
/// anyway: a device that never answers must not keep its job circulating.
pub(crate) const CLEANUP_GRACE: Duration = Duration::from_secs(15 * 60);

/// What a worker needs to run any step, shared by all its tasks.
pub(crate) struct StepEnv<'a> {
    pub http: &'a HttpClients,
    pub credentials: &'a CredentialStore,
    /// Where `file:` images may be (canonical), if anywhere.
    pub image_dir: Option<&'a std::path::Path>,
    pub metrics: &'a WorkerMetrics,
    pub worker: &'a str,
    /// The longest a step may run before the broker's consumer timeout
    /// would take its delivery back.
    pub step_limit: Duration,
}

/// The result of one delivery's step.
#[derive(Debug)]
pub(crate) struct Executed {
    /// The job as it continues, or `None` when it has finished.
    pub follow_up: Option<FollowUp>,
    /// The step's event, then the terminal event if the job finished.
    pub events: Vec<Event>,
}

#[derive(Debug)]
pub(crate) struct FollowUp {
    pub job: Job,
    /// Wait this long (through a delay queue) before the next step.
    pub delay: Option<Duration>,
}

/// Reads a job's `step` as the driver's own (`null` is its first step).
pub(crate) fn decode_step<D: Driver>(
    driver: &D,
    step: &serde_json::Value,
) -> Result<D::Step, Rejection> {
    if step.is_null() {
        return Ok(driver.first_step());
    }
    D::Step::deserialize(step).map_err(|e| Rejection {
        reason: "unknown_step",
        detail: format!("the {} driver has no step {step}: {e}", D::KIND),
    })
}

fn encode_step<S: Serialize>(step: &S) -> serde_json::Value {
    // Steps are plain enums of strings and numbers; serializing them to a
    // JSON value cannot fail.
    serde_json::to_value(step).expect("driver steps serialize to JSON")
}

/// Runs `step`, the job's current step, and decides what follows.
pub(crate) async fn execute<D: Driver>(
    driver: &D,
    mut job: Job,
    step: D::Step,
    cancelled: bool,
    env: &StepEnv<'_>,
) -> Result<Executed, Rejection> {
    let now = Utc::now();
    let step_name = D::step_name(&step);
    let deadline = *job
        .deadline
        .get_or_insert_with(|| now + job.policy.deadline);
    job.started_at.get_or_insert(now);
    if job.seq == 0 {
        env.metrics.campaign_seen(&job.campaign, job.device.kind);
    }

    if job.ending.is_none() && cancelled {
        let record =
            StepRecord::new(&job, step_name, env.worker).note("campaign cancelled; cleaning up");
        return Ok(begin_ending(
            job,
            driver,
            &step,
            Ending::cancelled(),
            record,
        ));
    }
    if job.ending.is_none() && now >= deadline {
        let ending = Ending::timed_out(format!(
            "no outcome within the deadline of {} (next step was {step_name})",
            humantime::format_duration(job.policy.deadline)
        ));
        let record =
            StepRecord::new(&job, step_name, env.worker).note("deadline passed; cleaning up");
        return Ok(begin_ending(job, driver, &step, ending, record));
    }
    if job.ending.is_none() && job.policy.step_timeout > env.step_limit {
        let ending = Ending::failed(
            ErrorClass::Config,
            format!(
                "timing.step_timeout {} can outlast RabbitMQ's consumer timeout \
                 (FLOTILLA_CONSUMER_TIMEOUT, less a minute for the hand-off: {}): shorten \
                 the step timeout, or raise consumer_timeout in rabbitmq.conf and \
                 FLOTILLA_CONSUMER_TIMEOUT with it",
                humantime::format_duration(job.policy.step_timeout),
                humantime::format_duration(env.step_limit)
            ),
        );
        let record = StepRecord::new(&job, step_name, env.worker)
            .note("step timeout too long for the broker; cleaning up");
        return Ok(begin_ending(job, driver, &step, ending, record));
    }
    if job.ending.is_some() && now >= deadline + CLEANUP_GRACE {
        let record = StepRecord::new(&job, step_name, env.worker)
            .note("cleanup did not finish in time; giving up on it");
        return Ok(finish(job, record, Some("cleanup did not finish in time")));
    }

    let credentials = env.credentials.resolve(&job.device.credentials);
    if let Err(error) = crate::allowed_hosts::check(&credentials, &job.device) {
        return Ok(refuse_hosts(job, step_name, error, env));
    }
    // A cleanup still runs for a job failed for its step timeout, within
    // what the broker allows.
    let step_timeout = job.policy.step_timeout.min(env.step_limit);
    let started = Instant::now();
    let cleanup = driver.cleanup(&step);
    let calls = CallLog::default();
    let result = match env.http.get(&job.tls) {
        Err(error) => Err(error),
        Ok(http) => {
            let cx = StepContext {
                job: &job,
                http: DeviceClient::new(&http, &job.device, env.metrics, &calls),
                credentials: &credentials,
                image_dir: env.image_dir,
                step_deadline: tokio::time::Instant::now() + step_timeout,
            };
            match tokio::time::timeout(step_timeout, driver.run(step, &cx)).await {
                Ok(result) => result,
                Err(_) => {
                    calls.timed_out(started.elapsed());
                    Err(StepError::transient(format!(
                        "step {step_name} did not finish within {}",
                        humantime::format_duration(step_timeout)
                    )))
                }
            }
        }
    };
    let took = started.elapsed();
    let mut record = StepRecord::new(&job, step_name, env.worker);
    record.duration = took;
    record.calls = calls.sample(host_key(&job.device.address));
    let kind = job.device.kind;

    match result {
        Ok(next) => {
            env.metrics.step(kind, step_name, "ok", took);
            record.note = next.note;
            Ok(match next.action {
                Action::Run(next) => advance::<D>(job, &next, None, record),
                Action::Poll(next) => {
                    let delay = job.policy.poll_interval;
                    advance::<D>(job, &next, Some(delay), record)
                }
                Action::Succeed(detail) => {
                    let mut ending = Ending::succeeded();
                    ending.detail = detail;
                    end_with::<D>(job, cleanup, ending, record)
                }
                Action::Done => finish(job, record, None),
            })
        }
        Err(StepError::Reject(rejection)) => {
            env.metrics.step(kind, step_name, "error", took);
            Err(rejection)
        }
        Err(StepError::Retry { message, .. })
            if job.attempt + 1 < job.policy.retry.max_attempts =>
        {
            env.metrics.step(kind, step_name, "retry", took);
            let delay = backoff(&job.policy.retry, job.attempt);
            record.error = Some(message);
            record.next = Some(step_name.to_owned());
            record.delay = Some(delay);
            job.attempt += 1;
            job.seq += 1;
            Ok(continue_with(job, Some(delay), record))
        }
        Err(error) => {
            env.metrics.step(kind, step_name, "error", took);
            let attempts = job.attempt + 1;
            let ending = match error {
                StepError::Retry { class, message } => Ending::failed(
                    class,
                    format!("{message} (gave up after {attempts} attempts)"),
                ),
                StepError::Fail(failure) => {
                    record.note = failure.note.clone();
                    failure.ending()
                }
                StepError::Reject(_) => unreachable!("rejections are handled above"),
            };
            record.error = ending.error.clone();
            if job.ending.is_some() {
                let problem = format!(
                    "cleanup step {step_name} failed: {}",
                    ending.error.as_deref().unwrap_or_default()
                );
                Ok(finish(job, record, Some(&problem)))
            } else {
                Ok(end_with::<D>(job, cleanup, ending, record))
            }
        }
    }
}

/// A job whose hosts its credentials may not go to: no step of it may
/// call the device, its cleanup's neither, so a host outside the list ends
/// it at once (a cleanup with the outcome decided before) and a worker
/// without the list retries it, as for a missing secret.
fn refuse_hosts(mut job: Job, step_name: &str, error: StepError, env: &StepEnv<'_>) -> Executed {
    env.metrics
        .step(job.device.kind, step_name, "error", Duration::ZERO);
    let mut record = StepRecord::new(&job, step_name, env.worker);
    record.error = Some(error.message().to_owned());
    match error {
        StepError::Retry { .. } if job.attempt + 1 < job.policy.retry.max_attempts => {
            let delay = backoff(&job.policy.retry, job.attempt);
            record.next = Some(step_name.to_owned());
            record.delay = Some(delay);
            job.attempt += 1;
            job.seq += 1;
            continue_with(job, Some(delay), record)
        }
        error => {
            let ending = match error {
                StepError::Retry { class, message } => Ending::failed(
                    class,
                    format!("{message} (gave up after {} attempts)", job.attempt + 1),
                ),
                StepError::Fail(failure) => failure.ending(),
                StepError::Reject(rejection) => Ending::failed(ErrorClass::Auth, rejection.detail),
            };
            if job.ending.is_some() {
                let problem = format!(
                    "cleanup step {step_name} not run: {}",
                    ending.error.as_deref().unwrap_or_default()
                );
                return finish(job, record, Some(&problem));
            }
            job.ending = Some(ending);
            finish(job, record, None)
        }
    }
}

/// Moves the job to its next step, now or after `delay`.
fn advance<D: Driver>(
    mut job: Job,
    step: &D::Step,
    delay: Option<Duration>,
    mut record: StepRecord,
) -> Executed {
    record.next = Some(D::step_name(step).to_owned());
    record.delay = delay;
    job.step = encode_step(step);
    job.attempt = 0;
    job.seq += 1;
    continue_with(job, delay, record)
}

/// Records the outcome (the first one decided wins) and moves to the
/// current step's cleanup, or finishes if there is nothing to clean up.
fn begin_ending<D: Driver>(
    job: Job,
    driver: &D,
    step: &D::Step,
    ending: Ending,
    record: StepRecord,
) -> Executed {
    end_with::<D>(job, driver.cleanup(step), ending, record)
}

fn end_with<D: Driver>(
    mut job: Job,
    cleanup: Option<D::Step>,
    ending: Ending,
    record: StepRecord,
) -> Executed {
    job.ending.get_or_insert(ending);
    match cleanup {
        Some(cleanup) => advance::<D>(job, &cleanup, None, record),
        None => finish(job, record, None),
    }
}

fn continue_with(job: Job, delay: Option<Duration>, record: StepRecord) -> Executed {
    let event = record.into_event(&job.campaign);
    Executed {
        follow_up: Some(FollowUp { job, delay }),
        events: vec![event],
    }
}

/// Ends the job with its decided outcome. `problem` (a cleanup that could
/// not finish) is added to the outcome's error text.
fn finish(job: Job, record: StepRecord, problem: Option<&str>) -> Executed {
    let mut ending = job.ending.clone().unwrap_or_else(|| {
        Ending::failed(
            ErrorClass::Protocol,
            format!("driver finished at step {} without an outcome", record.step),
        )
    });
    if let Some(problem) = problem {
        ending.error = Some(match ending.error.take() {
            Some(error) => format!("{error}; {problem}"),
            None => problem.to_owned(),
        });
    }
    let last_step = record.step.clone();
    let step_event = record.into_event(&job.campaign);
    let finished = Event::new(
        job.campaign.clone(),
        EventBody::Finished(FinishedEvent {
            device: job.device.id.clone(),
            kind: job.device.kind,
            seq: job.seq,
            last_step,
            ending,
            started_at: job.started_at,
        }),
    );
    Executed {
        follow_up: None,
        events: vec![step_event, finished],
    }
}

/// Exponential backoff with "equal jitter": half the delay is fixed, half
/// random, so retries of many devices spread out without any retrying at
/// once.
pub(crate) fn backoff(policy: &RetryPolicy, failed_attempts: u32) -> Duration {
    let exponential = policy
        .initial_backoff
        .saturating_mul(2u32.saturating_pow(failed_attempts.min(20)));
    let capped = exponential.min(policy.max_backoff);
    let half = capped / 2;
    half + rand::rng().random_range(Duration::ZERO..=half)
}

/// The step event being assembled.
struct StepRecord {
    device: String,
    kind: DeviceKind,
    seq: u32,
    step: String,
    attempt: u32,
    duration: Duration,
    next: Option<String>,
    delay: Option<Duration>,
    error: Option<String>,
    note: Option<String>,
    worker: String,
    tls_unverified: bool,
    calls: Option<CallSample>,
}

impl StepRecord {
    fn new(job: &Job, step: &str, worker: &str) -> Self {
        StepRecord {
            device: job.device.id.clone(),
            kind: job.device.kind,
            seq: job.seq,
            step: step.to_owned(),
            attempt: job.attempt + 1,
            duration: Duration::ZERO,
            next: None,
            delay: None,
            error: None,
            note: None,
            worker: worker.to_owned(),
            tls_unverified: !job.tls.verify,
            calls: None,
        }
    }

    fn note(mut self, note: &str) -> Self {
        self.note = Some(note.to_owned());
        self
    }

    fn into_event(self, campaign: &str) -> Event {
        Event::new(
            campaign,
            EventBody::Step(StepEvent {
                device: self.device,
                kind: self.kind,
                seq: self.seq,
                step: self.step,
                attempt: self.attempt,
                duration_ms: self.duration.as_millis() as u64,
                next: self.next,
                delay_ms: self.delay.map(|d| d.as_millis() as u64),
                error: self.error,
                note: self.note,
                worker: Some(self.worker),
                tls_unverified: self.tls_unverified,
                calls: self.calls,
            }),
        )
    }
}
