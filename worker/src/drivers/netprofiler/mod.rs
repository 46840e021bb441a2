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
//! Baselines ([`NetprofilerBaseline`]): with `backup_first`, the job's
//! first delivery records each listed gateway's latest backup (through the
//! gateways' own APIs, so a NetProfiler that refuses its login still has
//! its gateways backed up) and runs that step again at once; a backup is
//! this job's when it is another than the one recorded (see
//! [`riverbed::backup`](super::riverbed::backup), which also says what a
//! late copy of that first delivery does with and without a `Date`
//! header). The first step that reads the NetProfiler records each
//! gateway's `Current Version` before it acts. A gateway back at `neutral`
//! on a version that is neither the one it ran before nor the target
//! installed something else: it fails at once rather than at the deadline.
//! Each gateway's line of the report names the version it ran before.
//!
//! The terminal event's detail has one entry per gateway: IP, versions,
//! state, descriptions and outcome (`succeeded`, `failed`, `unfinished` for
//! one still updating when a sibling failed, `not_started`).
//!
//! Layout: this file holds the step machine; `backups` the backups first,
//! `status` the reading of `GET update`, `answers` the init and start
//! answers, `report` the verdict and its per-gateway report.

mod answers;
#[cfg(test)]
mod fuzz;
mod backups;
mod report;
mod status;

use super::riverbed::{self, auth::Login, backup::RunBaseline};
use crate::{
    driver::{Driver, Next, StepContext, StepError},
    support::{
        baseline::{self, BASELINE_STEP, Baselined},
        login::Logins,
    },
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

/// Each gateway's `Current Version` before the job, by IP.
pub(super) type Versions = BTreeMap<String, Option<String>>;

/// What the NetProfiler's gateways showed before the job acted on them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct NetprofilerBaseline {
    /// With `backup_first`: each listed gateway's latest backup, by host,
    /// recorded by the job's first delivery through the gateways' own
    /// APIs.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    backups: BTreeMap<String, RunBaseline>,
    /// Each connected gateway's version, recorded by the first step that
    /// reads the NetProfiler (after the backups), before it acts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    versions: Option<Versions>,
}

type Step = Baselined<NetprofilerStep, NetprofilerBaseline>;

impl NetprofilerStep {
    fn backs_up(&self) -> bool {
        matches!(
            self,
            NetprofilerStep::StartBackups | NetprofilerStep::AwaitBackups
        )
    }
}

impl Driver for Netprofiler {
    type Step = Step;
    const KIND: DeviceKind = DeviceKind::Netprofiler;

    fn first_step(&self) -> Step {
        Baselined::first(NetprofilerStep::StartBackups)
    }

    fn step_name(step: &Step) -> &'static str {
        if step.baseline.is_none() && step.step.backs_up() {
            return BASELINE_STEP;
        }
        match step.step {
            NetprofilerStep::StartBackups => "start_backups",
            NetprofilerStep::AwaitBackups => "await_backups",
            NetprofilerStep::Upload => "upload",
            NetprofilerStep::Init => "init",
            NetprofilerStep::AwaitInit => "await_init",
            NetprofilerStep::Start => "start",
            NetprofilerStep::AwaitUpdate { .. } => "await_update",
        }
    }

    async fn run(&self, step: Step, cx: &StepContext<'_>) -> Result<Next<Step>, StepError> {
        let settings: NetprofilerSettings = settings::read(&cx.job.settings).map_err(|e| {
            StepError::misconfigured(format!("the job's [drivers.netprofiler] settings: {e}"))
        })?;
        let Baselined { step, baseline } = step;
        let mut baseline = match baseline {
            Some(baseline) => baseline,
            None if step.backs_up() && settings.backup_first => {
                let (backups, undated) = self.backup_baselines(cx).await?;
                let mut note = format!(
                    "baseline: {}",
                    backups
                        .iter()
                        .map(|(host, b)| format!("{host}: {}", b.describe()))
                        .collect::<Vec<_>>()
                        .join("; ")
                );
                if !undated.is_empty() {
                    note.push_str(&format!(
                        " (gateway(s) {} send no Date header: their latest backup counted as \
                         earlier)",
                        undated.join(", ")
                    ));
                }
                let recorded = NetprofilerBaseline {
                    backups,
                    versions: None,
                };
                return Ok(baseline::recorded(step, recorded, note));
            }
            None if step.backs_up() => {
                return Ok(baseline::recorded(
                    NetprofilerStep::Upload,
                    NetprofilerBaseline::default(),
                    "baseline: no backups first".to_owned(),
                ));
            }
            // A step of a job written before baselines: its versions are
            // recorded below.
            None => NetprofilerBaseline::default(),
        };
        let versions = &mut baseline.versions;
        let next = match step {
            NetprofilerStep::StartBackups | NetprofilerStep::AwaitBackups => {
                self.backups(step, &settings, &baseline.backups, cx).await
            }
            NetprofilerStep::Upload => self.upload(&settings, versions, cx).await,
            NetprofilerStep::Init => self.init(versions, cx).await,
            NetprofilerStep::AwaitInit => self.await_init(versions, cx).await,
            NetprofilerStep::Start => self.start(versions, cx).await,
            NetprofilerStep::AwaitUpdate { refused, started } => {
                self.await_update(refused, started, versions, cx).await
            }
        }?;
        Ok(baseline::carry(next, Some(&baseline)))
    }

    fn cleanup(&self, _step: &Step) -> Option<Step> {
        // The API has no way to stop or undo an update or a backup.
        None
    }
}

impl Netprofiler {
    async fn upload(
        &self,
        settings: &NetprofilerSettings,
        versions: &mut Option<Versions>,
        cx: &StepContext<'_>,
    ) -> Result<Next<NetprofilerStep>, StepError> {
        let login = Login::common(cx.credentials, "")?;
        let gateways = self.status(cx, &login).await?;
        let before = &*versions.get_or_insert_with(|| versions_of(&gateways));
        let target = &cx.job.target.version;
        if gateways.values().all(|g| g.is_updated(target)) {
            return Ok(verdict(&gateways, before, target, &BTreeMap::new())?
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

    async fn init(
        &self,
        versions: &mut Option<Versions>,
        cx: &StepContext<'_>,
    ) -> Result<Next<NetprofilerStep>, StepError> {
        let login = Login::common(cx.credentials, "")?;
        let gateways = self.status(cx, &login).await?;
        let before = &*versions.get_or_insert_with(|| versions_of(&gateways));
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
        not_another_version(&gateways, before, target)?;
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
            return Err(init_failed(&gateways, before, target, &refused));
        }
        Ok(Next::poll(NetprofilerStep::AwaitInit).note(format!(
            "initialization accepted by {} gateway(s)",
            answers.len()
        )))
    }

    async fn await_init(
        &self,
        versions: &mut Option<Versions>,
        cx: &StepContext<'_>,
    ) -> Result<Next<NetprofilerStep>, StepError> {
        let login = Login::common(cx.credentials, "")?;
        let gateways = self.status(cx, &login).await?;
        let before = &*versions.get_or_insert_with(|| versions_of(&gateways));
        let target = &cx.job.target.version;
        if gateways.values().any(|g| g.state.failed()) {
            return verdict(&gateways, before, target, &BTreeMap::new());
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
        Err(init_failed(&gateways, before, target, &stuck))
    }

    async fn start(
        &self,
        versions: &mut Option<Versions>,
        cx: &StepContext<'_>,
    ) -> Result<Next<NetprofilerStep>, StepError> {
        let login = Login::common(cx.credentials, "")?;
        let gateways = self.status(cx, &login).await?;
        let before = &*versions.get_or_insert_with(|| versions_of(&gateways));
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
        not_another_version(&gateways, before, target)?;
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
        versions: &mut Option<Versions>,
        cx: &StepContext<'_>,
    ) -> Result<Next<NetprofilerStep>, StepError> {
        let login = Login::common(cx.credentials, "")?;
        let gateways = self.status(cx, &login).await?;
        let before = &*versions.get_or_insert_with(|| versions_of(&gateways));
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
        for (ip, g) in pending(&gateways, target) {
            if let Some(other) = installed_another(g, before.get(ip)) {
                refused.entry(ip.clone()).or_insert(other);
            }
        }
        let settled = gateways
            .iter()
            .all(|(ip, g)| g.is_updated(target) || g.state.failed() || refused.contains_key(ip));
        let failed = gateways
            .iter()
            .any(|(ip, g)| g.state.failed() || refused.contains_key(ip));
        if settled || failed {
            return Ok(verdict(&gateways, before, target, &refused)?.note(states(&gateways)));
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

/// Each gateway's version now, for the baseline.
fn versions_of(gateways: &BTreeMap<String, Gateway>) -> Versions {
    gateways
        .iter()
        .map(|(ip, g)| (ip.clone(), g.current.clone()))
        .collect()
}

/// The gateways this job still updates: those not already running the
/// target (a retry campaign after a partial failure finds some that are).
fn pending<'g>(
    gateways: &'g BTreeMap<String, Gateway>,
    target: &'g str,
) -> impl Iterator<Item = (&'g String, &'g Gateway)> {
    gateways.iter().filter(move |(_, g)| !g.is_updated(target))
}

/// What a gateway still to update installed instead of the target, when
/// it is back at `neutral` on a version it did not run before the job
/// (`before`, its baseline); `None` while it has not moved.
fn installed_another(gateway: &Gateway, before: Option<&Option<String>>) -> Option<String> {
    let before = before?;
    if gateway.state != State::Neutral || gateway.current == *before {
        return None;
    }
    Some(format!(
        "back at neutral on {}, not the target (ran {} before this job)",
        gateway.current.as_deref().unwrap_or("an unstated version"),
        before.as_deref().unwrap_or("an unstated version")
    ))
}

/// Never install what the campaign did not ask for: every gateway still to
/// update must show the target as its `Update To Version` before it is
/// initialized or started.
fn not_another_version(
    gateways: &BTreeMap<String, Gateway>,
    before: &Versions,
    target: &str,
) -> Result<(), StepError> {
    let other: Vec<String> = pending(gateways, target)
        .filter(|(_, g)| g.update_to.as_deref() != Some(target))
        .map(|(ip, g)| format!("{ip} ({})", g.update_to.as_deref().unwrap_or("none")))
        .collect();
    if other.is_empty() {
        return Ok(());
    }
    Err(not_started(
        gateways,
        before,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn gateway(state: State, current: &str) -> Gateway {
        Gateway {
            state,
            current: Some(current.to_owned()),
            update_to: Some("10.23".to_owned()),
            description: None,
            internal_description: None,
        }
    }

    #[test]
    fn a_gateway_back_at_neutral_on_a_version_it_did_not_run_before_installed_another() {
        let before = Some("10.22".to_owned());
        let other = installed_another(&gateway(State::Neutral, "10.24"), Some(&before)).unwrap();
        assert!(other.contains("10.24") && other.contains("10.22"), "{other}");
        // Not moved yet, or still under way: nothing to say.
        assert_eq!(
            installed_another(&gateway(State::Neutral, "10.22"), Some(&before)),
            None
        );
        assert_eq!(
            installed_another(&gateway(State::Running, "10.24"), Some(&before)),
            None
        );
        // A gateway the baseline does not know (connected since): no
        // judgement.
        assert_eq!(installed_another(&gateway(State::Neutral, "10.24"), None), None);
    }

    #[test]
    fn steps_written_before_baselines_record_the_backups_first() {
        let old: Step = serde_json::from_value(serde_json::json!("await_backups")).unwrap();
        assert_eq!(Netprofiler::step_name(&old), BASELINE_STEP);
        // An update step records the versions as it reads them.
        let old: Step = serde_json::from_value(serde_json::json!({
            "await_update": { "refused": {} }
        }))
        .unwrap();
        assert_eq!(Netprofiler::step_name(&old), "await_update");
    }
}
