//! Riverbed Flow Gateways: backup and restore (`mgmt.gateway_backup` 1.0).
//!
//! Two steps, for the operation the campaign's `[drivers.flowgateway]`
//! names (`backup` by default, or `restore`):
//!
//! 1. `start`: reads `GET backup` (or `GET restore`); starts one with
//!    `POST` only if none of this job is known and none is executing;
//! 2. `poll`: reads the status until `COMPLETED` or `ERROR`; `EXECUTING`
//!    is a wait, its `message` kept in the step's event.
//!
//! Before either, the job's first delivery records the gateway's latest
//! run (`baseline`, [`RunBaseline`]); a run belongs to this job when it is
//! another than that one (see [`riverbed::backup`](super::riverbed::backup)
//! for what a late copy of that first delivery does, with and without the
//! gateway's `Date` header). The remote host, user and path come
//! from the campaign; the SSH password (`backup_password`) and the backup's
//! encryption password (`security_password`) from the credentials
//! reference, never from the message. The calls are
//! [`riverbed::backup`](super::riverbed::backup)'s.

use super::riverbed::{
    auth::Login,
    backup::{BackupApi, Progress, RunBaseline, RunRequest, Secrets},
};
use crate::{
    driver::{Driver, Failure, Next, StepContext, StepError},
    support::{
        baseline::{self, BASELINE_STEP, Baselined},
        login::Logins,
    },
};
use flotilla_common::{
    DeviceKind,
    settings::{self, FlowgatewaySettings, GatewayOperation},
};
use serde::{Deserialize, Serialize};
use serde_json::json;

#[derive(Default)]
pub(crate) struct Flowgateway {
    logins: Logins,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum FlowgatewayStep {
    Start,
    Poll,
}

type Step = Baselined<FlowgatewayStep, RunBaseline>;

impl Driver for Flowgateway {
    type Step = Step;
    const KIND: DeviceKind = DeviceKind::Flowgateway;

    fn first_step(&self) -> Step {
        Baselined::first(FlowgatewayStep::Start)
    }

    fn step_name(step: &Step) -> &'static str {
        match (&step.baseline, step.step) {
            (None, _) => BASELINE_STEP,
            (_, FlowgatewayStep::Start) => "start",
            (_, FlowgatewayStep::Poll) => "poll",
        }
    }

    async fn run(&self, step: Step, cx: &StepContext<'_>) -> Result<Next<Step>, StepError> {
        let settings: FlowgatewaySettings = settings::read(&cx.job.settings).map_err(|e| {
            StepError::misconfigured(format!("the job's [drivers.flowgateway] settings: {e}"))
        })?;
        let operation = settings.operation;
        let login = Login::common(cx.credentials, "")?;
        let api = BackupApi {
            logins: &self.logins,
            http: cx.http,
            login: &login,
            job: cx.job,
        };
        let observed = api.read(operation).await?;
        let name = operation_name(operation);
        let Baselined { step, baseline } = step;
        let Some(baseline) = baseline else {
            let recorded = observed.baseline();
            let mut note = format!("baseline: {}", recorded.describe());
            if !observed.dated() {
                note.push_str(" (the gateway sends no Date header: its latest run counted as earlier)");
            }
            return Ok(baseline::recorded(step, recorded, note));
        };
        let next = match (step, observed.progress(&baseline)) {
            (FlowgatewayStep::Start, Progress::NotStarted) => {
                api.start(&RunRequest {
                    operation,
                    destination: &settings.destination,
                    secrets: Secrets::from(cx.credentials, &settings.destination)?,
                    no_cert: settings.no_cert,
                })
                .await?;
                Next::poll(FlowgatewayStep::Poll)
                    .note(format!("{name} started ({})", settings.destination.host))
            }
            (FlowgatewayStep::Start, Progress::Executing(message))
                if !observed.is_ours(&baseline) =>
            {
                // Someone else's run: wait for it to end, then start ours.
                Next::poll(FlowgatewayStep::Start).note(format!(
                    "waiting for a {name} started before this job: {message}"
                ))
            }
            (_, Progress::Executing(message)) => {
                Next::poll(FlowgatewayStep::Poll).note(format!("{name} executing: {message}"))
            }
            // The gateway shows no run of this job yet: never start a second
            // one from a poll; the deadline bounds the wait.
            (FlowgatewayStep::Poll, Progress::NotStarted) => Next::poll(FlowgatewayStep::Poll)
                .note(format!("the gateway reports no {name} of this job yet")),
            (_, Progress::Completed(run)) => {
                let summary = run.summary();
                Next::succeeded_with(json!({
                    "operation": name,
                    "host": run.host,
                    "path": run.path,
                    "message": run.message,
                    "started": run.started,
                }))
                .note(format!("{name} completed: {summary}"))
            }
            (_, Progress::Failed(message)) => {
                return Err(Failure::device(format!("{name} failed: {message}")).into());
            }
        };
        Ok(baseline::carry(next, Some(&baseline)))
    }

    fn cleanup(&self, _step: &Step) -> Option<Step> {
        // The API cannot stop a backup or a restore; nothing to undo.
        None
    }
}

fn operation_name(operation: GatewayOperation) -> &'static str {
    match operation {
        GatewayOperation::Backup => "backup",
        GatewayOperation::Restore => "restore",
    }
}
