//! Steps that follow each other at once run within one delivery: a job
//! goes back to the broker only across a delay (a poll, a retry's
//! backoff) or when it ends, not between two steps with nothing to wait
//! for. A DMS CPE takes two deliveries instead of five.
//!
//! Each step still observes before it acts, emits its own event and
//! counts in the metrics; the delivery hands off once, after the last
//! step of its chain, with every step's event. A worker that dies
//! mid-chain leaves the delivery unacked: it is redelivered and its chain
//! runs again from its first step, each step finding what the earlier run
//! did on the device, as any redelivered step does.
//!
//! A chain stops early (handing the next step off to the jobs queue, to
//! be taken by whichever slot is free) when the campaign's mode changed
//! (a pause or a cancel the next delivery must see), when the next step
//! could outlast the broker's consumer timeout, after [`MAX_STEPS`], or
//! when a later step is refused: its delivery is then the one that
//! dead-letters it, with that step in its body.

use crate::{
    delivery::{Shared, run_step},
    driver::Rejection,
    registry::Prepared,
    step::{Executed, FollowUp},
};
use flotilla_common::{DeviceKind, Job, control::Mode, telemetry};
use lapin::types::FieldTable;
use tokio::time::Instant;
use tracing::{Instrument, Span, info_span, warn};

/// Steps one delivery runs at most: a driver that keeps asking for the
/// next step at once still goes round the queue now and then, so other
/// jobs are not starved of this slot.
pub(crate) const MAX_STEPS: usize = 16;

/// Runs `first` (the delivery's own step, in `span`) and the steps that
/// follow it at once. A rejection of the first step is the delivery's;
/// one of a later step stops the chain before it.
pub(crate) async fn run(
    first: Box<dyn Prepared<'_> + '_>,
    span: Span,
    mode: Mode,
    incoming: Option<&FieldTable>,
    shared: &Shared,
) -> Result<Executed, Rejection> {
    let started = Instant::now();
    let cancelled = mode == Mode::Cancelled;
    let mut executed = run_step(first, cancelled, shared).instrument(span).await?;
    let mut events = std::mem::take(&mut executed.events);
    for _ in 1..MAX_STEPS {
        let Some(FollowUp { job, delay: None }) = &executed.follow_up else {
            break;
        };
        if shared.mode(&job.campaign) != mode
            || started.elapsed() + job.policy.step_timeout > shared.step_limit
        {
            break;
        }
        // Kept to be handed off as it is if its step is refused.
        let next = job.clone();
        let labels = StepLabels::of(&next);
        let prepared = match shared.registry.get(next.device.kind).prepare(next.clone()) {
            Ok(prepared) => prepared,
            Err(rejection) => {
                refused(&rejection);
                break;
            }
        };
        let span = labels.span(prepared.step_name(), incoming);
        match run_step(prepared, cancelled, shared).instrument(span).await {
            Ok(mut then) => {
                events.append(&mut then.events);
                executed = then;
            }
            Err(rejection) => {
                refused(&rejection);
                executed.follow_up = Some(FollowUp {
                    job: next,
                    delay: None,
                });
                break;
            }
        }
    }
    executed.events = events;
    Ok(executed)
}

fn refused(rejection: &Rejection) {
    warn!(
        reason = rejection.reason,
        detail = %rejection.detail,
        "a chained step was refused; its own delivery will dead-letter it"
    );
}

/// What names a step's span: its job's campaign, device and attempt.
pub(crate) struct StepLabels {
    campaign: String,
    device: String,
    kind: DeviceKind,
    attempt: u32,
}

impl StepLabels {
    pub(crate) fn of(job: &Job) -> Self {
        StepLabels {
            campaign: job.campaign.clone(),
            device: job.device.id.clone(),
            kind: job.device.kind,
            attempt: job.attempt,
        }
    }

    pub(crate) fn device(&self) -> &str {
        &self.device
    }

    /// One span per step, in the device's trace (the job's context,
    /// carried in `incoming`); its fields also label the step's log lines.
    pub(crate) fn span(&self, step: &str, incoming: Option<&FieldTable>) -> Span {
        let span = info_span!(
            "step",
            otel.name = %format!("{} {step}", self.kind),
            campaign = %self.campaign,
            device = %self.device,
            kind = %self.kind,
            attempt = self.attempt,
        );
        telemetry::continue_trace(&span, incoming);
        span
    }
}
