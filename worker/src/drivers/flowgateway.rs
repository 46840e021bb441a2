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
//! A run belongs to this job when its `timeStamp` (epoch seconds, sent as
//! an integer although documented as a string) is not older than the job's
//! first step. The remote host, user and path come from the campaign; the
//! SSH password (`backup_password`) and the backup's encryption password
//! (`security_password`) from the credentials reference, never from the
//! message.
//!
//! The NetProfiler driver backs up its gateways with the same calls
//! ([`read_run`], [`start_run`], [`Progress`]).

use super::{
    Driver, Next, StepContext, StepError,
    riverbed::{
        self,
        auth::{Login, Tokens},
        lenient,
    },
};
use crate::{credentials::Credentials, device_http::DeviceClient};
use flotilla_common::{
    DeviceKind, Ending, ErrorClass,
    settings::{self, BackupDestination, FlowgatewaySettings, GatewayOperation},
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

const BACKUP: &str = "/api/mgmt.gateway_backup/1.0/backup";
const RESTORE: &str = "/api/mgmt.gateway_backup/1.0/restore";

#[derive(Default)]
pub struct Flowgateway {
    tokens: Tokens,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowgatewayStep {
    Start,
    Poll,
}

impl Driver for Flowgateway {
    type Step = FlowgatewayStep;
    const KIND: DeviceKind = DeviceKind::Flowgateway;

    fn first_step(&self) -> FlowgatewayStep {
        FlowgatewayStep::Start
    }

    fn step_name(step: &FlowgatewayStep) -> &'static str {
        match step {
            FlowgatewayStep::Start => "start",
            FlowgatewayStep::Poll => "poll",
        }
    }

    async fn run(
        &self,
        step: FlowgatewayStep,
        cx: &StepContext<'_>,
    ) -> Result<Next<FlowgatewayStep>, StepError> {
        let settings: FlowgatewaySettings = settings::read(&cx.job.settings).map_err(|e| {
            StepError::device(format!("the job's [drivers.flowgateway] settings: {e}"))
        })?;
        let operation = settings.operation;
        let login = Login::common(cx.credentials, "")?;
        let run = read_run(&self.tokens, &cx.http, &login, operation).await?;
        let progress = Progress::of(run.as_ref(), riverbed::since(cx.job));
        let name = operation_name(operation);
        match (step, progress) {
            (FlowgatewayStep::Start, Progress::NotStarted) => {
                let secrets = Secrets::from(cx.credentials, &settings.destination)?;
                start_run(
                    &self.tokens,
                    &cx.http,
                    &login,
                    operation,
                    &settings.destination,
                    &secrets,
                    settings.no_cert,
                )
                .await?;
                Ok(Next::poll(FlowgatewayStep::Poll)
                    .note(format!("{name} started ({})", settings.destination.host)))
            }
            (FlowgatewayStep::Start, Progress::Executing(message))
                if !run
                    .as_ref()
                    .is_some_and(|r| r.is_since(riverbed::since(cx.job))) =>
            {
                // Someone else's run: wait for it to end, then start ours.
                Ok(Next::poll(FlowgatewayStep::Start).note(format!(
                    "waiting for a {name} started before this job: {message}"
                )))
            }
            (_, Progress::Executing(message)) => {
                Ok(Next::poll(FlowgatewayStep::Poll).note(format!("{name} executing: {message}")))
            }
            // The gateway shows no run of this job yet: never start a second
            // one from a poll; the deadline bounds the wait.
            (FlowgatewayStep::Poll, Progress::NotStarted) => Ok(Next::poll(FlowgatewayStep::Poll)
                .note(format!("the gateway reports no {name} of this job yet"))),
            (_, Progress::Completed(run)) => {
                let summary = run.summary();
                Ok(Next::end(Ending::succeeded().with_detail(json!({
                    "operation": name,
                    "host": run.host,
                    "path": run.path,
                    "message": run.message,
                    "started": run.started,
                })))
                .note(format!("{name} completed: {summary}")))
            }
            (_, Progress::Failed(message)) => Ok(Next::end(Ending::failed(
                ErrorClass::Device,
                format!("{name} failed: {message}"),
            ))),
        }
    }

    fn cleanup(&self, _step: &FlowgatewayStep) -> Option<FlowgatewayStep> {
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

/// A backup or restore as the gateway reports it (`running` for a backup).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Run {
    pub(crate) status: RunStatus,
    pub(crate) message: String,
    /// Epoch seconds when it started.
    pub(crate) started: Option<i64>,
    pub(crate) host: Option<String>,
    /// The backup's own directory (`subdir`), or the path given.
    pub(crate) path: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RunStatus {
    None,
    Executing,
    Error,
    Completed,
}

impl Run {
    fn is_since(&self, since: i64) -> bool {
        self.started.is_some_and(|t| t >= since)
    }

    pub(crate) fn summary(&self) -> String {
        let place = self.path.as_deref().unwrap_or("");
        match self.message.as_str() {
            "" => place.to_owned(),
            message => format!("{place} ({message})"),
        }
    }
}

/// Where this job's run stands, judged from the gateway's latest run.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Progress {
    /// No run of this job, and none executing.
    NotStarted,
    /// A run is executing (maybe started before this job), with its message.
    Executing(String),
    Completed(Run),
    /// This job's run ended in `ERROR`, with its message.
    Failed(String),
}

impl Progress {
    /// `since`: epoch seconds before which a finished run is not this job's.
    pub(crate) fn of(run: Option<&Run>, since: i64) -> Progress {
        let Some(run) = run else {
            return Progress::NotStarted;
        };
        match run.status {
            RunStatus::Executing => Progress::Executing(run.message.clone()),
            RunStatus::Completed if run.is_since(since) => Progress::Completed(run.clone()),
            RunStatus::Error if run.is_since(since) => {
                Progress::Failed(if run.message.is_empty() {
                    "the gateway reported ERROR without a message".to_owned()
                } else {
                    run.message.clone()
                })
            }
            _ => Progress::NotStarted,
        }
    }
}

/// The gateway's latest backup (`running` of `GET backup`) or restore.
pub(crate) async fn read_run(
    tokens: &Tokens,
    http: &DeviceClient<'_>,
    login: &Login,
    operation: GatewayOperation,
) -> Result<Option<Run>, StepError> {
    let path = match operation {
        GatewayOperation::Backup => BACKUP,
        GatewayOperation::Restore => RESTORE,
    };
    let reply = riverbed::success(tokens.send(http, login, || Ok(http.get(path))).await?)?;
    let body: Value = reply.json()?;
    let what = &reply.what;
    // A backup status is documented as an array of one object holding
    // `running`; a restore status is the run itself. Accept either shape
    // for both.
    let object = match &body {
        Value::Array(items) => match items.first() {
            None => return Ok(None),
            Some(Value::Object(object)) => object,
            Some(_) => return Err(unreadable(what, &reply.quote())),
        },
        Value::Object(object) => object,
        _ => return Err(unreadable(what, &reply.quote())),
    };
    let run = match lenient::field(object, "running") {
        Some(Value::Object(running)) => running,
        Some(Value::Null) => return Ok(None),
        Some(_) => return Err(unreadable(what, &reply.quote())),
        None if lenient::field(object, "status").is_some() => object,
        None => return Ok(None),
    };
    parse_run(run)
        .map(Some)
        .map_err(|problem| StepError::garbage(format!("{what}: {problem}: {}", reply.quote())))
}

fn unreadable(what: &str, quote: &str) -> StepError {
    StepError::garbage(format!(
        "{what} answered something that is not a backup status: {quote}"
    ))
}

fn parse_run(run: &Map<String, Value>) -> Result<Run, String> {
    let status = match lenient::text(run, "status").as_deref().map(str::trim) {
        None | Some("") => RunStatus::None,
        Some(s) if s.eq_ignore_ascii_case("NONE") => RunStatus::None,
        Some(s) if s.eq_ignore_ascii_case("EXECUTING") => RunStatus::Executing,
        Some(s) if s.eq_ignore_ascii_case("ERROR") => RunStatus::Error,
        Some(s) if s.eq_ignore_ascii_case("COMPLETED") => RunStatus::Completed,
        Some(other) => return Err(format!("unknown status {other:?}")),
    };
    Ok(Run {
        status,
        message: lenient::text(run, "message").unwrap_or_default(),
        started: lenient::epoch_seconds(run, "timeStamp"),
        host: lenient::text(run, "host"),
        path: lenient::text(run, "subdir").or_else(|| lenient::text(run, "path")),
    })
}

/// The secrets a backup or restore sends to the gateway.
pub(crate) struct Secrets {
    ssh_password: Option<crate::credentials::Secret>,
    security_password: crate::credentials::Secret,
}

impl Secrets {
    /// `security_password`, and `backup_password` for a remote host.
    pub(crate) fn from(
        credentials: &Credentials,
        destination: &BackupDestination,
    ) -> Result<Secrets, StepError> {
        Ok(Secrets {
            ssh_password: if destination.is_local() {
                None
            } else {
                Some(credentials.require("backup_password")?.clone())
            },
            security_password: credentials.require("security_password")?.clone(),
        })
    }
}

/// Starts a backup or restore with `POST`.
pub(crate) async fn start_run(
    tokens: &Tokens,
    http: &DeviceClient<'_>,
    login: &Login,
    operation: GatewayOperation,
    destination: &BackupDestination,
    secrets: &Secrets,
    no_cert: bool,
) -> Result<(), StepError> {
    let mut body = Map::new();
    body.insert("hostname".into(), json!(destination.host));
    if let Some(user) = &destination.username {
        body.insert("username".into(), json!(user));
    }
    if let Some(password) = &secrets.ssh_password {
        body.insert("password".into(), json!(password.expose()));
    }
    if let Some(path) = &destination.path {
        body.insert("path".into(), json!(path));
    }
    body.insert(
        "security_pwd".into(),
        json!(secrets.security_password.expose()),
    );
    let path = match operation {
        GatewayOperation::Backup => BACKUP,
        GatewayOperation::Restore => {
            body.insert("no_cert".into(), json!(no_cert.to_string()));
            RESTORE
        }
    };
    let body = Value::Object(body);
    let reply = tokens
        .send(http, login, || Ok(http.post(path).json(&body)))
        .await?;
    match riverbed::success(reply) {
        Ok(_) => Ok(()),
        // Refused because one is executing: another copy of this step (a
        // redelivery) started it a moment ago. Anything else stands.
        Err(refusal) if refusal.class == ErrorClass::Device => {
            match read_run(tokens, http, login, operation).await? {
                Some(run) if run.status == RunStatus::Executing => Ok(()),
                _ => Err(refusal),
            }
        }
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(value: Value) -> Run {
        parse_run(value.as_object().unwrap()).unwrap()
    }

    #[test]
    fn runs_read_as_the_gateway_writes_them() {
        let documented = run(json!({
            "host": "dummyHost", "message": "", "path": "path/to/store/backup/directory",
            "status": "COMPLETED", "timeStamp": 1659006593, "username": "mazu"
        }));
        assert_eq!(documented.status, RunStatus::Completed);
        assert_eq!(documented.started, Some(1659006593));
        let as_string =
            run(json!({"status": "EXECUTING", "timeStamp": "1659006600", "message": "copying"}));
        assert_eq!(as_string.started, Some(1659006600));
        assert!(parse_run(json!({"status": "EXPLODED"}).as_object().unwrap()).is_err());
    }

    #[test]
    fn only_runs_of_this_job_count_but_any_executing_one_blocks_a_start() {
        let old = run(json!({"status": "COMPLETED", "timeStamp": 100}));
        let ours = run(json!({"status": "ERROR", "timeStamp": 200, "message": "disk full"}));
        let busy = run(json!({"status": "EXECUTING", "timeStamp": 50, "message": "tar"}));
        assert_eq!(Progress::of(Some(&old), 150), Progress::NotStarted);
        assert_eq!(
            Progress::of(Some(&ours), 150),
            Progress::Failed("disk full".into())
        );
        assert_eq!(
            Progress::of(Some(&busy), 150),
            Progress::Executing("tar".into())
        );
        assert_eq!(Progress::of(None, 150), Progress::NotStarted);
    }
}
