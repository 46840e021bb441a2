//! `start_backups` / `await_backups`: a verified backup of every Flow
//! Gateway the inventory row lists, through each gateway's own backup API,
//! before anything is updated (`[drivers.netprofiler] backup_first`). A
//! backup is this job's when it is another than the one the gateway showed
//! at the job's baseline.

use super::{GATEWAY_FIELDS, Netprofiler, NetprofilerStep, host_of};
use crate::{
    driver::{Failure, Next, StepContext, StepError},
    drivers::riverbed::{
        auth::Login,
        backup::{BackupApi, Progress, RunBaseline, RunRequest, Secrets},
    },
};
use flotilla_common::settings::{GatewayOperation, NetprofilerSettings};
use serde_json::json;
use std::collections::BTreeMap;

impl Netprofiler {
    /// Each listed gateway's latest backup, by host, for the baseline; and
    /// the gateways whose clock could not be read (no `Date` header).
    pub(super) async fn backup_baselines(
        &self,
        cx: &StepContext<'_>,
    ) -> Result<(BTreeMap<String, RunBaseline>, Vec<String>), StepError> {
        let login = Login::common(cx.credentials, GATEWAY_FIELDS)?;
        let mut baselines = BTreeMap::new();
        let mut undated = Vec::new();
        for url in &cx.job.device.gateways {
            let host = host_of(url);
            let label = format!("gateway {host}");
            let api = BackupApi {
                logins: &self.logins,
                http: cx.http.at(url, &label),
                login: &login,
                job: cx.job,
            };
            let observed = api.read(GatewayOperation::Backup).await?;
            if !observed.dated() {
                undated.push(host.clone());
            }
            baselines.insert(host, observed.baseline());
        }
        Ok((baselines, undated))
    }

    /// Starts (`start_backups`) or follows (`await_backups`) a backup of
    /// every listed gateway; the update goes on once all are `COMPLETED`,
    /// and an `ERROR` ends the job before anything is updated.
    pub(super) async fn backups(
        &self,
        step: NetprofilerStep,
        settings: &NetprofilerSettings,
        baselines: &BTreeMap<String, RunBaseline>,
        cx: &StepContext<'_>,
    ) -> Result<Next<NetprofilerStep>, StepError> {
        if !settings.backup_first {
            return Ok(Next::run(NetprofilerStep::Upload));
        }
        let gateways = &cx.job.device.gateways;
        if gateways.is_empty() {
            return Err(StepError::misconfigured(
                "the campaign requires backups first, but the inventory row lists no gateways \
                 to back up; nothing was updated",
            ));
        }
        let login = Login::common(cx.credentials, GATEWAY_FIELDS)?;
        let mut pending = Vec::new();
        let mut done = Vec::new();
        for url in gateways {
            let host = host_of(url);
            let label = format!("gateway {host}");
            let api = BackupApi {
                logins: &self.logins,
                http: cx.http.at(url, &label),
                login: &login,
                job: cx.job,
            };
            // The baseline lists every gateway of the job's row (it was
            // recorded from the same row), unless the job was recorded
            // without `backup_first`, which its settings rule out.
            let baseline = baselines.get(&host).cloned().unwrap_or_default();
            match api.read(GatewayOperation::Backup).await?.progress(&baseline) {
                Progress::Completed(run) => done.push(format!("{host}: {}", run.summary())),
                Progress::Failed(message) => {
                    return Err(Failure::device(format!(
                        "backup of gateway {host} failed: {message}; the update was not started"
                    ))
                    .with_detail(json!({ "backup_failed": host }))
                    .into());
                }
                Progress::Executing(message) => {
                    pending.push(format!("{host}: executing {message}"))
                }
                // A poll never starts a backup: only `start_backups` does,
                // once, so a redelivered poll cannot start a second one.
                Progress::NotStarted if step == NetprofilerStep::AwaitBackups => {
                    pending.push(format!("{host}: not started yet"))
                }
                Progress::NotStarted => {
                    api.start(&RunRequest {
                        operation: GatewayOperation::Backup,
                        destination: &settings.backup,
                        secrets: Secrets::from(cx.credentials, &settings.backup)?,
                        no_cert: false,
                    })
                    .await?;
                    pending.push(format!("{host}: started"));
                }
            }
        }
        if pending.is_empty() {
            return Ok(Next::run(NetprofilerStep::Upload)
                .note(format!("every backup completed: {}", done.join("; "))));
        }
        let note = format!(
            "backups: {} of {} completed; {}",
            done.len(),
            gateways.len(),
            pending.join("; ")
        );
        Ok(Next::poll(NetprofilerStep::AwaitBackups).note(note))
    }
}
