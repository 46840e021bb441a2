//! The Flow Gateway backup API (`mgmt.gateway_backup` 1.0), as a small
//! client: read the latest backup or restore, start one. The Flow Gateway
//! driver runs one per job; the NetProfiler driver backs up every gateway
//! it updates with it first.
//!
//! A run's `timeStamp` (epoch seconds, sent as an integer although
//! documented as a string) says when it started, on the gateway's clock;
//! [`Progress::of`] judges a run against the job's publication read on
//! that same clock ([`crate::support::clock`]), so a run a late copy of
//! this job's first step finds is still this job's.

use super::auth::Login;
use crate::{
    credentials::{Credentials, Secret},
    device_http::DeviceClient,
    driver::StepError,
    support::{clock, lenient, login::Logins},
};
use flotilla_common::{
    Job,
    settings::{BackupDestination, GatewayOperation},
};
use serde_json::{Map, Value, json};

const BACKUP: &str = "/api/mgmt.gateway_backup/1.0/backup";
const RESTORE: &str = "/api/mgmt.gateway_backup/1.0/restore";

/// One gateway's backup API, under one login, for one job.
pub(crate) struct BackupApi<'a> {
    pub(crate) logins: &'a Logins,
    pub(crate) http: DeviceClient<'a>,
    pub(crate) login: &'a Login,
    pub(crate) job: &'a Job,
}

/// The gateway's latest run, and when the job was published on the
/// gateway's clock (epoch seconds): runs started earlier are not this
/// job's.
pub(crate) struct Observed {
    pub(crate) run: Option<Run>,
    pub(crate) since: i64,
}

impl Observed {
    pub(crate) fn progress(&self) -> Progress {
        Progress::of(self.run.as_ref(), self.since)
    }

    /// Whether the latest run started with (or after) this job.
    pub(crate) fn is_ours(&self) -> bool {
        self.run.as_ref().is_some_and(|r| r.is_since(self.since))
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

/// The secrets a backup or restore sends to the gateway.
pub(crate) struct Secrets {
    ssh_password: Option<Secret>,
    security_password: Secret,
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

/// What a new run is asked to do.
pub(crate) struct RunRequest<'a> {
    pub(crate) operation: GatewayOperation,
    pub(crate) destination: &'a BackupDestination,
    pub(crate) secrets: Secrets,
    /// Restore only: the API's `no_cert`.
    pub(crate) no_cert: bool,
}

fn path(operation: GatewayOperation) -> &'static str {
    match operation {
        GatewayOperation::Backup => BACKUP,
        GatewayOperation::Restore => RESTORE,
    }
}

impl BackupApi<'_> {
    /// The gateway's latest backup (`running` of `GET backup`) or restore.
    pub(crate) async fn read(&self, operation: GatewayOperation) -> Result<Observed, StepError> {
        let http = &self.http;
        let reply = super::success(
            self.login
                .send(self.logins, http, || Ok(http.get(path(operation))))
                .await?,
        )?;
        let body: Value = reply.json()?;
        let since = clock::published_on_device(self.job, &reply);
        let observed = |run| Ok(Observed { run, since });
        let unreadable = || reply.unreadable("not a backup status");
        // A backup status is documented as an array of one object holding
        // `running`; a restore status is the run itself. Accept either
        // shape for both.
        let object = match &body {
            Value::Array(items) => match items.first() {
                None => return observed(None),
                Some(Value::Object(object)) => object,
                Some(_) => return Err(unreadable()),
            },
            Value::Object(object) => object,
            _ => return Err(unreadable()),
        };
        let run = match lenient::field(object, "running") {
            Some(Value::Object(running)) => running,
            Some(Value::Null) => return observed(None),
            Some(_) => return Err(unreadable()),
            None if lenient::field(object, "status").is_some() => object,
            None => return observed(None),
        };
        let run = parse_run(run).map_err(|problem| reply.unreadable(&problem))?;
        observed(Some(run))
    }

    /// Starts a backup or restore with `POST`.
    pub(crate) async fn start(&self, request: &RunRequest<'_>) -> Result<(), StepError> {
        let destination = request.destination;
        let mut body = Map::new();
        body.insert("hostname".into(), json!(destination.host));
        if let Some(user) = &destination.username {
            body.insert("username".into(), json!(user));
        }
        if let Some(password) = &request.secrets.ssh_password {
            body.insert("password".into(), json!(password.expose()));
        }
        if let Some(path) = &destination.path {
            body.insert("path".into(), json!(path));
        }
        body.insert(
            "security_pwd".into(),
            json!(request.secrets.security_password.expose()),
        );
        if request.operation == GatewayOperation::Restore {
            body.insert("no_cert".into(), json!(request.no_cert.to_string()));
        }
        let body = Value::Object(body);
        let http = &self.http;
        let reply = self
            .login
            .send(self.logins, http, || {
                Ok(http.post(path(request.operation)).json(&body))
            })
            .await?;
        match super::success(reply) {
            Ok(_) => Ok(()),
            // Refused because one is executing: another copy of this step (a
            // redelivery) started it a moment ago. Anything else stands.
            Err(refusal) if refusal.is_refusal() => match self.read(request.operation).await?.run {
                Some(run) if run.status == RunStatus::Executing => Ok(()),
                _ => Err(refusal),
            },
            Err(error) => Err(error),
        }
    }
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
