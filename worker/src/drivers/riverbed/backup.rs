//! The Flow Gateway backup API (`mgmt.gateway_backup` 1.0), as a small
//! client: read the latest backup or restore, start one. The Flow Gateway
//! driver runs one per job; the NetProfiler driver backs up every gateway
//! it updates with it first.
//!
//! The gateway reports only its latest run. The job records it before
//! acting ([`RunBaseline`]: its `timeStamp`, host and path); a later run
//! is one whose identity differs, never one stamped later, so a gateway
//! whose clock steps mid-job changes nothing. [`Progress::of`] judges the
//! latest run against that baseline.
//!
//! The step that records the baseline may be a late copy, after the job
//! started its run: a run started at or after the job's publication, read
//! on the gateway's clock ([`crate::support::clock`]), is then the job's
//! own, and the baseline holds no earlier run. A gateway without a `Date`
//! header gives no such reading: its latest run counts as earlier, so a
//! copy of the first step redelivered after this job's run would start a
//! second one.

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
use serde::{Deserialize, Serialize};
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
/// gateway's clock (epoch seconds; `None` without a `Date` header), for
/// recording the baseline.
pub(crate) struct Observed {
    pub(crate) run: Option<Run>,
    published: Option<i64>,
}

impl Observed {
    /// What the gateway shows before the job acts: its latest run, unless
    /// that run started with the job (a late copy of the first step finds
    /// it).
    pub(crate) fn baseline(&self) -> RunBaseline {
        RunBaseline {
            latest: self
                .run
                .as_ref()
                .filter(|run| clock::before_job(run.started, self.published))
                .map(Run::key),
        }
    }

    pub(crate) fn progress(&self, baseline: &RunBaseline) -> Progress {
        Progress::of(self.run.as_ref(), baseline)
    }

    /// Whether the latest run is not the one the baseline holds: this
    /// job's.
    pub(crate) fn is_ours(&self, baseline: &RunBaseline) -> bool {
        self.run.as_ref().is_some_and(|run| baseline.is_new(run))
    }

    /// Whether the gateway's clock could be read (its `Date` header).
    pub(crate) fn dated(&self) -> bool {
        self.published.is_some()
    }
}

/// The latest run a gateway showed before the job acted; `latest: None`
/// when it showed none, or only one of this job.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RunBaseline {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    latest: Option<RunKey>,
}

/// What tells one run from another: when it started (on the gateway's
/// clock, compared only for equality) and where it went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct RunKey {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    started: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    path: Option<String>,
}

impl RunBaseline {
    /// Whether `run` is another run than the one the baseline holds.
    fn is_new(&self, run: &Run) -> bool {
        self.latest.as_ref() != Some(&run.key())
    }

    /// The baseline in a few words, for step events.
    pub(crate) fn describe(&self) -> String {
        match &self.latest {
            None => "no earlier run".to_owned(),
            Some(key) => format!(
                "earlier run started at {}",
                key.started
                    .map_or_else(|| "an unstated time".to_owned(), |t| t.to_string())
            ),
        }
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
    fn key(&self) -> RunKey {
        RunKey {
            started: self.started,
            host: self.host.clone(),
            path: self.path.clone(),
        }
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
    /// Where this job's run stands: a finished run is this job's when the
    /// baseline does not hold it.
    pub(crate) fn of(run: Option<&Run>, baseline: &RunBaseline) -> Progress {
        let Some(run) = run else {
            return Progress::NotStarted;
        };
        let ours = baseline.is_new(run);
        match run.status {
            RunStatus::Executing => Progress::Executing(run.message.clone()),
            RunStatus::Completed if ours => Progress::Completed(run.clone()),
            RunStatus::Error if ours => Progress::Failed(if run.message.is_empty() {
                "the gateway reported ERROR without a message".to_owned()
            } else {
                run.message.clone()
            }),
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
        let published = clock::published_on_device(self.job, &reply);
        let observed = |run| Ok(Observed { run, published });
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
mod fuzz;

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
    fn only_runs_the_baseline_does_not_hold_count_but_any_executing_one_blocks_a_start() {
        let old = run(json!({"status": "COMPLETED", "timeStamp": 100, "path": "/b"}));
        let baseline = RunBaseline {
            latest: Some(old.key()),
        };
        let ours = run(json!({"status": "ERROR", "timeStamp": 200, "message": "disk full"}));
        let busy = run(json!({"status": "EXECUTING", "timeStamp": 50, "message": "tar"}));
        assert_eq!(Progress::of(Some(&old), &baseline), Progress::NotStarted);
        assert_eq!(
            Progress::of(Some(&ours), &baseline),
            Progress::Failed("disk full".into())
        );
        assert_eq!(
            Progress::of(Some(&busy), &baseline),
            Progress::Executing("tar".into())
        );
        assert_eq!(Progress::of(None, &baseline), Progress::NotStarted);
        // The gateway's clock stepped back: this job's run is stamped
        // before the earlier one, and is still this job's.
        let stepped = run(json!({"status": "COMPLETED", "timeStamp": 40, "path": "/b"}));
        assert!(matches!(
            Progress::of(Some(&stepped), &baseline),
            Progress::Completed(_)
        ));
        // The earlier run, later reported finished: still the earlier one.
        let executing_then = run(json!({"status": "EXECUTING", "timeStamp": 100, "path": "/b"}));
        let baseline = RunBaseline {
            latest: Some(executing_then.key()),
        };
        assert_eq!(Progress::of(Some(&old), &baseline), Progress::NotStarted);
    }

    #[test]
    fn the_baseline_leaves_out_a_run_of_this_job_and_counts_every_run_without_a_date() {
        let at = |started: i64, published: Option<i64>| Observed {
            run: Some(run(json!({"status": "COMPLETED", "timeStamp": started}))),
            published,
        };
        assert_eq!(at(150, Some(100)).baseline(), RunBaseline::default());
        assert!(at(150, Some(100)).is_ours(&at(150, Some(100)).baseline()));
        assert!(at(50, Some(100)).baseline().latest.is_some());
        // No Date header: the run counts as earlier, whatever its time.
        let undated = at(150, None);
        assert!(!undated.dated());
        assert!(!undated.is_ours(&undated.baseline()));
    }
}
