//! Riverbed NetProfilers updating their connected Flow Gateways
//! (`mgmt.common_update` 1.0): one job per NetProfiler, one outcome per
//! gateway.
//!
//! Steps, each reading the device before acting:
//!
//! 1. `start_backups` / `await_backups` (when `[drivers.netprofiler]` has
//!    `backup_first`): back up every Flow Gateway listed in the inventory
//!    row through its own `mgmt.gateway_backup` API, and go on only once
//!    every backup of this job is `COMPLETED`; an `ERROR` ends the job
//!    before anything is updated;
//! 2. `upload`: `PUT images/upload` sends the ISO staged on the NetProfiler
//!    to the gateways, unless they already show it as `Update To Version`;
//! 3. `init` / `await_init`: once every gateway still to update shows the
//!    campaign's target as its `Update To Version` (another version ends
//!    the job failed, naming both, with no gateway started), `POST
//!    update/init`, whose answer is one string per gateway (`"10.1.x.x -
//!    Operation Failed"`); any failure ends the job before `start`. Then
//!    wait for every gateway to be `initialized`;
//! 4. `start`: `POST update/start` (the target checked again), only when no
//!    gateway is already `running` or failed, so a redelivered step never
//!    starts a second update;
//! 5. `await_update`: poll `GET update` until every gateway is back at
//!    `neutral` on the target version, or one reaches `failed_graceful` /
//!    `failed_critical` (the job then ends at once, failed; critical marks
//!    it for attention). `start` is asynchronous: a gateway still
//!    `initialized` counts as never started only a while after it.
//!
//! Gateways already on the target (a retry campaign after a partial
//! failure) count as updated and are left out of every check.
//!
//! The terminal event's detail has one entry per gateway: IP, versions,
//! state, descriptions and outcome (`succeeded`, `failed`, `unfinished` for
//! one still updating when a sibling failed, `not_started`).
//!
//! Layout: this file holds the step machine; `backups` the backups first,
//! `status` the reading of `GET update`, `answers` the init and start
//! answers, `report` the verdict and its per-gateway report.

mod answers;
mod backups;
mod report;
mod status;

use super::riverbed::{self, auth::Login};
use crate::{
    driver::{Driver, Next, StepContext, StepError},
    support::login::Logins,
};
use answers::{Answer, parse_answers};
use flotilla_common::{
    DeviceKind,
    settings::{self, NetprofilerSettings},
};
use chrono::{DateTime, Utc};
use report::{init_failed, not_started, verdict};
use serde::{Deserialize, Serialize};
use status::{Gateway, State, parse_status, states};
use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

const UPDATE: &str = "/api/mgmt.common_update/1.0/update";
const UPLOAD: &str = "/api/mgmt.common_update/1.0/images/upload";
const INIT: &str = "/api/mgmt.common_update/1.0/update/init";
const START: &str = "/api/mgmt.common_update/1.0/update/start";

/// The Flow Gateways' API credentials: fields with this prefix in the
/// NetProfiler's reference, or its own fields when it has none.
pub(super) const GATEWAY_FIELDS: &str = "gateway_";

#[derive(Default)]
pub(crate) struct Netprofiler {
    logins: Logins,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum NetprofilerStep {
    StartBackups,
    AwaitBackups,
    Upload,
    Init,
    AwaitInit,
    Start,
    /// `refused`: gateways whose start answer was a failure, by IP, with
    /// the answer; `started`: when the update was started (or first
    /// awaited), on the worker's clock, to bound the wait for gateways
    /// that have not begun yet.
    AwaitUpdate {
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        refused: BTreeMap<String, String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        started: Option<DateTime<Utc>>,
    },
}

impl Driver for Netprofiler {
    type Step = NetprofilerStep;
    const KIND: DeviceKind = DeviceKind::Netprofiler;

    fn first_step(&self) -> NetprofilerStep {
        NetprofilerStep::StartBackups
    }

    fn step_name(step: &NetprofilerStep) -> &'static str {
        match step {
            NetprofilerStep::StartBackups => "start_backups",
            NetprofilerStep::AwaitBackups => "await_backups",
            NetprofilerStep::Upload => "upload",
            NetprofilerStep::Init => "init",
            NetprofilerStep::AwaitInit => "await_init",
            NetprofilerStep::Start => "start",
            NetprofilerStep::AwaitUpdate { .. } => "await_update",
        }
    }

    async fn run(
        &self,
        step: NetprofilerStep,
        cx: &StepContext<'_>,
    ) -> Result<Next<NetprofilerStep>, StepError> {
        let settings: NetprofilerSettings = settings::read(&cx.job.settings).map_err(|e| {
            StepError::misconfigured(format!("the job's [drivers.netprofiler] settings: {e}"))
        })?;
        match step {
            NetprofilerStep::StartBackups | NetprofilerStep::AwaitBackups => {
                self.backups(step, &settings, cx).await
            }
            NetprofilerStep::Upload => self.upload(&settings, cx).await,
            NetprofilerStep::Init => self.init(cx).await,
            NetprofilerStep::AwaitInit => self.await_init(cx).await,
            NetprofilerStep::Start => self.start(cx).await,
            NetprofilerStep::AwaitUpdate { refused, started } => {
                self.await_update(refused, started, cx).await
            }
        }
    }

    fn cleanup(&self, _step: &NetprofilerStep) -> Option<NetprofilerStep> {
        // The API has no way to stop or undo an update or a backup.
        None
    }
}

impl Netprofiler {
    async fn upload(
        &self,
        settings: &NetprofilerSettings,
        cx: &StepContext<'_>,
    ) -> Result<Next<NetprofilerStep>, StepError> {
        let login = Login::common(cx.credentials, "")?;
        let gateways = self.status(cx, &login).await?;
        let target = &cx.job.target.version;
        if gateways.values().all(|g| g.is_updated(target)) {
            return Ok(verdict(&gateways, target, &BTreeMap::new())?
                .note("every gateway already runs the target version"));
        }
        if settings.backup_first {
            let listed: BTreeSet<String> = cx.job.device.gateways.iter().map(host_of).collect();
            let unlisted: Vec<&str> = gateways
                .keys()
                .filter(|ip| !listed.contains(ip.as_str()))
                .map(String::as_str)
                .collect();
            // Gateways listed by name cannot be matched to the IPs the
            // NetProfiler reports; only listings by IP are checked.
            let by_ip = cx.job.device.gateways.iter().all(|u| {
                matches!(
                    u.host(),
                    Some(url::Host::Ipv4(_)) | Some(url::Host::Ipv6(_))
                )
            });
            if by_ip && !unlisted.is_empty() {
                return Err(StepError::misconfigured(format!(
                    "gateway(s) {} are connected to the NetProfiler but not listed for \
                     backup; nothing was updated",
                    unlisted.join(", ")
                )));
            }
        }
        if pending(&gateways, target)
            .all(|(_, g)| g.state.is_under_way() || g.update_to.as_deref() == Some(target.as_str()))
        {
            return Ok(Next::run(NetprofilerStep::Init).note("the gateways already have the image"));
        }
        riverbed::success(
            login
                .send(&self.logins, &cx.http, || Ok(cx.http.put(UPLOAD)))
                .await?,
        )?;
        Ok(Next::run(NetprofilerStep::Init)
            .note(format!("image sent to {} gateway(s)", gateways.len())))
    }

    async fn init(&self, cx: &StepContext<'_>) -> Result<Next<NetprofilerStep>, StepError> {
        let login = Login::common(cx.credentials, "")?;
        let gateways = self.status(cx, &login).await?;
        let target = &cx.job.target.version;
        if pending(&gateways, target).any(|(_, g)| g.state == State::Running) {
            return Ok(Next::run(await_update(BTreeMap::new()))
                .note("the update is already running"));
        }
        if pending(&gateways, target).any(|(_, g)| g.state == State::Initializing)
            || pending(&gateways, target).all(|(_, g)| g.state == State::Initialized)
        {
            return Ok(Next::run(NetprofilerStep::AwaitInit).note("already initializing"));
        }
        let waiting: Vec<&str> = pending(&gateways, target)
            .filter(|(_, g)| g.update_to.is_none())
            .map(|(ip, _)| ip.as_str())
            .collect();
        if !waiting.is_empty() {
            // The image is still on its way from the NetProfiler; the
            // deadline bounds the wait.
            return Ok(Next::poll(NetprofilerStep::Init).note(format!(
                "waiting for the image to reach gateway(s) {}",
                waiting.join(", ")
            )));
        }
        not_another_version(&gateways, target)?;
        let reply = riverbed::success(
            login
                .send(&self.logins, &cx.http, || Ok(cx.http.post(INIT)))
                .await?,
        )?;
        let answers = parse_answers(&reply)?;
        let refused = self
            .refusals(cx, &login, &answers, |g| {
                g.state.is_under_way() || g.is_updated(target)
            })
            .await?;
        if !refused.is_empty() {
            return Err(init_failed(&gateways, target, &refused));
        }
        Ok(Next::poll(NetprofilerStep::AwaitInit).note(format!(
            "initialization accepted by {} gateway(s)",
            answers.len()
        )))
    }

    async fn await_init(&self, cx: &StepContext<'_>) -> Result<Next<NetprofilerStep>, StepError> {
        let login = Login::common(cx.credentials, "")?;
        let gateways = self.status(cx, &login).await?;
        let target = &cx.job.target.version;
        if gateways.values().any(|g| g.state.failed()) {
            return verdict(&gateways, target, &BTreeMap::new());
        }
        if pending(&gateways, target).any(|(_, g)| g.state == State::Running) {
            return Ok(Next::run(await_update(BTreeMap::new())));
        }
        if pending(&gateways, target).all(|(_, g)| g.state == State::Initialized) {
            return Ok(Next::run(NetprofilerStep::Start).note("every gateway initialized"));
        }
        if pending(&gateways, target).any(|(_, g)| g.state == State::Initializing) {
            return Ok(Next::poll(NetprofilerStep::AwaitInit).note(states(&gateways)));
        }
        // Nothing initializing, yet some gateway is not initialized: its
        // init failed (its answer may have been lost to a retry).
        let stuck: BTreeMap<String, String> = pending(&gateways, target)
            .filter(|(_, g)| g.state != State::Initialized)
            .map(|(ip, g)| (ip.clone(), format!("still {} after init", g.state.name())))
            .collect();
        Err(init_failed(&gateways, target, &stuck))
    }

    async fn start(&self, cx: &StepContext<'_>) -> Result<Next<NetprofilerStep>, StepError> {
        let login = Login::common(cx.credentials, "")?;
        let gateways = self.status(cx, &login).await?;
        let target = &cx.job.target.version;
        // Observe before acting: an update already running or ended must
        // not be started again.
        if pending(&gateways, target).any(|(_, g)| g.state == State::Running || g.state.failed()) {
            return Ok(
                Next::run(await_update(BTreeMap::new())).note("the update was already started")
            );
        }
        if !pending(&gateways, target).all(|(_, g)| g.state == State::Initialized) {
            return Ok(Next::poll(NetprofilerStep::AwaitInit).note(states(&gateways)));
        }
        not_another_version(&gateways, target)?;
        let reply = riverbed::success(
            login
                .send(&self.logins, &cx.http, || Ok(cx.http.post(START)))
                .await?,
        )?;
        let answers = parse_answers(&reply)?;
        let refused = self
            .refusals(cx, &login, &answers, |g| {
                g.state == State::Running || g.state.failed() || g.is_updated(target)
            })
            .await?;
        let note = format!(
            "update started on {} of {} gateway(s)",
            answers.len() - refused.len(),
            answers.len()
        );
        Ok(Next::poll(await_update(refused)).note(note))
    }

    async fn await_update(
        &self,
        refused: BTreeMap<String, String>,
        started: Option<DateTime<Utc>>,
        cx: &StepContext<'_>,
    ) -> Result<Next<NetprofilerStep>, StepError> {
        let login = Login::common(cx.credentials, "")?;
        let gateways = self.status(cx, &login).await?;
        let target = &cx.job.target.version;
        // `start` is asynchronous: a gateway may show `initialized` for a
        // while after it. Still `initialized` START_WAIT after the start
        // (or after this step first looked), it never started (its start
        // answer may have been lost to a retry).
        let started = started.unwrap_or_else(Utc::now);
        let waited = (Utc::now() - started).to_std().unwrap_or_default();
        let mut refused = refused;
        if waited >= START_WAIT {
            for (ip, _) in pending(&gateways, target).filter(|(_, g)| g.state == State::Initialized)
            {
                refused
                    .entry(ip.clone())
                    .or_insert_with(|| "initialized, but the update never started".to_owned());
            }
        }
        let settled = gateways
            .iter()
            .all(|(ip, g)| g.is_updated(target) || g.state.failed() || refused.contains_key(ip));
        let failed = gateways
            .iter()
            .any(|(ip, g)| g.state.failed() || refused.contains_key(ip));
        if settled || failed {
            return Ok(verdict(&gateways, target, &refused)?.note(states(&gateways)));
        }
        Ok(Next::poll(NetprofilerStep::AwaitUpdate {
            refused,
            started: Some(started),
        })
        .note(states(&gateways)))
    }

    /// The gateways whose answer was a failure, with the answer; a
    /// gateway refused because it is already where the operation leads
    /// (`done`: another copy of this step got there first) is not one.
    async fn refusals(
        &self,
        cx: &StepContext<'_>,
        login: &Login,
        answers: &[Answer],
        done: impl Fn(&Gateway) -> bool,
    ) -> Result<BTreeMap<String, String>, StepError> {
        let mut refused: BTreeMap<String, String> = answers
            .iter()
            .filter(|a| !a.succeeded)
            .map(|a| (a.ip.clone(), a.text.clone()))
            .collect();
        if !refused.is_empty() {
            let gateways = self.status(cx, login).await?;
            refused.retain(|ip, _| !gateways.get(ip).is_some_and(&done));
        }
        Ok(refused)
    }

    /// `GET update`: every connected gateway's status, by IP.
    async fn status(
        &self,
        cx: &StepContext<'_>,
        login: &Login,
    ) -> Result<BTreeMap<String, Gateway>, StepError> {
        let reply = riverbed::success(
            login
                .send(&self.logins, &cx.http, || Ok(cx.http.get(UPDATE)))
                .await?,
        )?;
        let gateways =
            parse_status(&reply.json()?).map_err(|problem| reply.unreadable(&problem))?;
        if gateways.is_empty() {
            return Err(StepError::refused(format!(
                "{} lists no connected Flow Gateway: nothing to update",
                reply.what
            )));
        }
        Ok(gateways)
    }
}

/// How long a gateway may stay `initialized` after the update was started
/// before it counts as never started (`start` is asynchronous).
const START_WAIT: Duration = Duration::from_secs(60);

/// The step that follows a started update, its wait counted from now.
fn await_update(refused: BTreeMap<String, String>) -> NetprofilerStep {
    NetprofilerStep::AwaitUpdate {
        refused,
        started: Some(Utc::now()),
    }
}

/// The gateways this job still updates: those not already running the
/// target (a retry campaign after a partial failure finds some that are).
fn pending<'g>(
    gateways: &'g BTreeMap<String, Gateway>,
    target: &'g str,
) -> impl Iterator<Item = (&'g String, &'g Gateway)> {
    gateways.iter().filter(move |(_, g)| !g.is_updated(target))
}

/// Never install what the campaign did not ask for: every gateway still to
/// update must show the target as its `Update To Version` before it is
/// initialized or started.
fn not_another_version(gateways: &BTreeMap<String, Gateway>, target: &str) -> Result<(), StepError> {
    let other: Vec<String> = pending(gateways, target)
        .filter(|(_, g)| g.update_to.as_deref() != Some(target))
        .map(|(ip, g)| format!("{ip} ({})", g.update_to.as_deref().unwrap_or("none")))
        .collect();
    if other.is_empty() {
        return Ok(());
    }
    Err(not_started(
        gateways,
        target,
        format!(
            "the NetProfiler's staged image is not the campaign's: gateway(s) {} would update \
             to another version than {target}; no gateway was started",
            other.join(", ")
        ),
    ))
}

pub(super) fn host_of(url: &url::Url) -> String {
    match url.host() {
        Some(url::Host::Ipv6(ip)) => ip.to_string(),
        Some(host) => host.to_string(),
        None => url.to_string(),
    }
}
