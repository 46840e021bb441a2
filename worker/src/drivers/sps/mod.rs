//! One Identity Safeguard for Privileged Sessions (SPS) appliances: firmware
//! upgrades through the SPS REST API.
//!
//! Steps, each reading the appliance before acting:
//!
//! 1. `stage`: an appliance whose current slot holds the target version
//!    succeeds at once; a slot already holding it goes straight to the
//!    upgrade. Otherwise follow a running fetch of the campaign's URL (and
//!    SHA-256, when reported), or one this job started, or start one:
//!    `POST /api/firmware/fetch` with the URL and its SHA-256; for a `file:`
//!    URL, `POST /api/upload/firmware` of the file as multipart (after
//!    checking its SHA-256);
//! 2. `await_fetch`: poll `GET /api/firmware/fetch/<key>` through `queued`
//!    and `in-progress` (progress in the step events) to `finished`, whose
//!    `slot_id` is what gets upgraded; `failed` ends the job with the
//!    appliance's `error`, `canceled` ends it too;
//! 3. `upgrade`: unless the slots show the upgrade already done (current,
//!    or selected for the restart), `POST /api/firmware/upgrade` with the
//!    slot and `[drivers.sps] commit_message`; each documented refusal ends
//!    the job in the appliance's words;
//!    Right after an accepted upgrade, the slot must show `after_reboot:
//!    true` (or the restart must have begun);
//! 4. `await_reboot`: the appliance restarts into the new slot: refused
//!    connections, timeouts and 5xx are waits (until the job's deadline);
//!    the job succeeds once `GET /api/firmware/slots`, in a new session,
//!    shows the target version's slot as `current`. An appliance that has
//!    not restarted by itself `[drivers.sps] restart_wait` (10 minutes)
//!    after the upgrade ends the device failed with "upgrade staged,
//!    restart pending", for a person to restart it (needs attention);
//! 5. `cancel_fetch` (the cleanup of `await_fetch`, when the job fails, is
//!    cancelled or passes its deadline): `DELETE` a fetch still queued or
//!    in progress, then `DELETE` its status entry once it no longer runs.
//!    A finished fetch's entry stays: it records where the image went.
//!
//! Before `stage` acts, the job's first delivery records which fetches of
//! the campaign's image the appliance already lists (their keys:
//! [`SpsBaseline`]), then runs `stage` again at once. A fetch of the
//! campaign's image the baseline does not list is this job's (a retried
//! or redelivered `stage` finds its own, even one that failed); one it
//! lists is followed only while it runs. Later steps carry the fetch key
//! or the slot they work on. The recording step may be a late copy, after
//! the job fetched: a fetch started at or after the job's publication, read
//! on the appliance's clock ([`crate::support::clock`]), is then the job's
//! own. An appliance without a `Date` header gives no such reading: its
//! fetches all count as earlier, and a copy of the first step redelivered
//! after this job's fetch failed would fetch again.
//!
//! Authentication: a `session_id` cookie from `GET /api/authentication`
//! (HTTP Basic), cached per appliance (`session`).
//!
//! Layout: this file holds the steps; `answers` reads the API's answers,
//! `session` logs in.
//!
//! Two copies of one job can run at once (a redelivery while the first
//! still runs): both would observe the slot unselected and both upgrade.
//! Within a worker, the steps that start something (`stage`, `upgrade`)
//! therefore run one at a time per appliance. The API has no conditional
//! upgrade, so between workers the few milliseconds from the observation
//! to the `POST` remain open.

mod answers;
#[cfg(test)]
mod fuzz;
mod session;

use crate::{
    device_http::{Call, Reply},
    driver::{Driver, Failure, Next, StepContext, StepError},
    support::{
        baseline::{self, BASELINE_STEP, Baselined},
        clock,
        image::LocalImage,
        login::Logins,
        restart::{Seen, through_restart},
    },
};
use answers::{ApiError, Fetch, FetchStatus, Slot};
use chrono::{DateTime, Utc};
use flotilla_common::{
    DeviceKind,
    settings::{self, SpsSettings},
};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use session::Login;
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

const FETCH: &str = "/api/firmware/fetch";
const SLOTS: &str = "/api/firmware/slots";
const UPGRADE: &str = "/api/firmware/upgrade";
const UPLOAD: &str = "/api/upload/firmware";

fn fetch_path(key: &str) -> String {
    format!("{FETCH}/{key}")
}

#[derive(Default)]
pub(crate) struct Sps {
    logins: Logins,
    acting: ActingLocks,
}

/// One lock per appliance, held by a step that starts something.
#[derive(Default)]
struct ActingLocks {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl ActingLocks {
    fn of(&self, appliance: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self
            .locks
            .lock()
            .expect("the lock map is never poisoned: nothing panics while holding it");
        // Locks no step holds or awaits are dropped, so the map stays as
        // small as the steps in flight.
        locks.retain(|_, lock| Arc::strong_count(lock) > 1);
        locks.entry(appliance.to_owned()).or_default().clone()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum SpsStep {
    Stage,
    /// `key`: the fetch on the appliance.
    AwaitFetch {
        key: String,
    },
    /// `slot`: the firmware slot holding the target version.
    Upgrade {
        slot: String,
    },
    /// `since`: when the upgrade was accepted (or first awaited), on the
    /// worker's clock, to bound the wait for the restart.
    AwaitReboot {
        slot: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since: Option<DateTime<Utc>>,
    },
    CancelFetch {
        key: String,
    },
}

/// The fetches of the campaign's image the appliance listed before the
/// job acted, by key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SpsBaseline {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    fetches: Vec<String>,
}

impl SpsBaseline {
    /// Of the fetches of the campaign's image, the one to follow rather
    /// than start another: one running, else the newest this job started
    /// (one the baseline does not list). Older finished, failed or
    /// canceled fetches are history: their slot may have been reused
    /// since.
    fn to_follow(&self, fetches: Vec<Fetch>) -> Option<Fetch> {
        fetches
            .into_iter()
            .filter(|fetch| fetch.status.running() || !self.fetches.contains(&fetch.key))
            .max_by_key(|fetch| (fetch.status.running(), fetch.started))
    }
}

type Step = Baselined<SpsStep, SpsBaseline>;

impl Driver for Sps {
    type Step = Step;
    const KIND: DeviceKind = DeviceKind::Sps;

    fn first_step(&self) -> Step {
        Baselined::first(SpsStep::Stage)
    }

    fn step_name(step: &Step) -> &'static str {
        match (&step.baseline, &step.step) {
            (None, SpsStep::Stage) => BASELINE_STEP,
            (_, SpsStep::Stage) => "stage",
            (_, SpsStep::AwaitFetch { .. }) => "await_fetch",
            (_, SpsStep::Upgrade { .. }) => "upgrade",
            (_, SpsStep::AwaitReboot { .. }) => "await_reboot",
            (_, SpsStep::CancelFetch { .. }) => "cancel_fetch",
        }
    }

    async fn run(&self, step: Step, cx: &StepContext<'_>) -> Result<Next<Step>, StepError> {
        let settings: SpsSettings = settings::read(&cx.job.settings).map_err(|e| {
            StepError::misconfigured(format!("the job's [drivers.sps] settings: {e}"))
        })?;
        let login = Login::new(cx.credentials)?;
        let api = Api {
            logins: &self.logins,
            cx,
            login: &login,
            settings: &settings,
        };
        let Baselined { step, baseline } = step;
        let acting = match (&step, &baseline) {
            (SpsStep::Stage, Some(_)) | (SpsStep::Upgrade { .. }, _) => {
                Some(self.acting.of(cx.http.base().as_str()))
            }
            _ => None,
        };
        let _acting = match &acting {
            Some(lock) => Some(lock.lock().await),
            None => None,
        };
        let next = match (step, &baseline) {
            (SpsStep::Stage, None) => return api.record_baseline().await,
            (SpsStep::Stage, Some(b)) => api.stage(b).await,
            (SpsStep::AwaitFetch { key }, _) => api.await_fetch(key).await,
            (SpsStep::Upgrade { slot }, _) => api.upgrade(slot).await,
            (SpsStep::AwaitReboot { slot, since }, _) => api.await_reboot(slot, since).await,
            (SpsStep::CancelFetch { key }, _) => api.cancel_fetch(key).await,
        }?;
        Ok(baseline::carry(next, baseline.as_ref()))
    }

    fn cleanup(&self, step: &Step) -> Option<Step> {
        match &step.step {
            SpsStep::AwaitFetch { key } => Some(Baselined::with(
                SpsStep::CancelFetch { key: key.clone() },
                step.baseline.clone(),
            )),
            // Once the image is in a slot there is nothing to undo: an
            // upgrade cannot be taken back, and the slot is the appliance's.
            _ => None,
        }
    }
}

/// One step's view of the appliance.
struct Api<'s, 'c> {
    logins: &'s Logins,
    cx: &'s StepContext<'c>,
    login: &'s Login,
    settings: &'s SpsSettings,
}

/// The step that awaits the restart into `slot`, its wait counted from now.
fn await_reboot(slot: String) -> SpsStep {
    SpsStep::AwaitReboot {
        slot,
        since: Some(Utc::now()),
    }
}

impl<'c> Api<'_, 'c> {
    fn target(&self) -> &str {
        &self.cx.job.target.version
    }

    /// Records the fetches of the campaign's image already listed, then
    /// runs `stage` with them.
    async fn record_baseline(&self) -> Result<Next<Step>, StepError> {
        let (fetches, reply) = self.campaign_fetches().await?;
        let published = clock::published_on_device(self.cx.job, &reply);
        let (earlier, own): (Vec<Fetch>, Vec<Fetch>) = fetches
            .into_iter()
            .partition(|fetch| clock::before_job(fetch.started, published));
        let mut note = format!(
            "baseline: {} earlier fetch(es) of the campaign's image",
            earlier.len()
        );
        if !own.is_empty() {
            note.push_str(&format!("; {} of this job already", own.len()));
        }
        if published.is_none() {
            note.push_str(" (the appliance sends no Date header: every fetch counted as earlier)");
        }
        let baseline = SpsBaseline {
            fetches: earlier.into_iter().map(|fetch| fetch.key).collect(),
        };
        Ok(baseline::recorded(SpsStep::Stage, baseline, note))
    }

    async fn stage(&self, baseline: &SpsBaseline) -> Result<Next<SpsStep>, StepError> {
        let slots = self.slots().await?;
        if let Some(slot) = slots.iter().find(|s| s.holds(self.target())) {
            if slot.current {
                return Ok(self.succeeded(slot).note(format!(
                    "the appliance already runs {} (slot {})",
                    self.target(),
                    slot.key
                )));
            }
            return Ok(Next::run(SpsStep::Upgrade {
                slot: slot.key.clone(),
            })
            .note(format!("slot {} already holds {}", slot.key, self.target())));
        }
        let url = &self.cx.job.target.image_url;
        if let Some(image) = LocalImage::of(&self.cx.job.target, self.cx.image_dir).await? {
            return self.upload(&image).await;
        }
        let (fetches, _) = self.campaign_fetches().await?;
        if let Some(fetch) = baseline.to_follow(fetches) {
            return Ok(Next::run(SpsStep::AwaitFetch {
                key: fetch.key.clone(),
            })
            .note(format!(
                "following fetch {} already on the appliance: {}",
                fetch.key,
                fetch.describe()
            )));
        }
        let body = json!({
            "url": url.as_str(),
            "checksum": { "sha256": self.cx.job.target.sha256 },
        });
        let reply = success(
            self.send(|| Ok(self.cx.http.post(FETCH).json(&body)))
                .await?,
        )?;
        let key = answers::read_key(&reply.json()?).map_err(|p| reply.unreadable(&p))?;
        Ok(Next::poll(SpsStep::AwaitFetch { key: key.clone() })
            .note(format!("fetch {key} of {url} started")))
    }

    /// The fetches of the campaign's image (its URL, and its SHA-256 when
    /// the appliance reports one), and the answer they came in.
    async fn campaign_fetches(&self) -> Result<(Vec<Fetch>, Reply), StepError> {
        let reply = success(self.send(|| Ok(self.cx.http.get(FETCH))).await?)?;
        let fetches = answers::read_fetches(&reply.json()?).map_err(|p| reply.unreadable(&p))?;
        let target = &self.cx.job.target;
        let campaign = fetches
            .into_iter()
            .filter(|fetch| {
                fetch.url.as_deref() == Some(target.image_url.as_str())
                    && fetch
                        .sha256
                        .as_deref()
                        .is_none_or(|sha| sha.trim().eq_ignore_ascii_case(&target.sha256))
            })
            .collect();
        Ok((campaign, reply))
    }

    /// Uploads the campaign's `file:` image into a free slot.
    async fn upload(&self, image: &LocalImage) -> Result<Next<SpsStep>, StepError> {
        let reply = self
            .send(|| {
                let part =
                    reqwest::multipart::Part::stream_with_length(image.stream()?, image.size())
                        .file_name(image.file_name());
                let form = reqwest::multipart::Form::new().part("firmware", part);
                Ok(self
                    .cx
                    .http
                    .post(UPLOAD)
                    .timeout(self.cx.upload_timeout())
                    .multipart(form))
            })
            .await?;
        let reply = success(reply)?;
        let slot = answers::read_slot(&reply.json()?).map_err(|p| reply.unreadable(&p))?;
        if !slot.holds(self.target()) {
            return Err(Failure::device(format!(
                "the uploaded image in slot {} holds version {}, not the campaign's {}",
                slot.key,
                slot.version_text(),
                self.target()
            ))
            .into());
        }
        Ok(Next::run(SpsStep::Upgrade {
            slot: slot.key.clone(),
        })
        .note(format!("image uploaded into slot {}", slot.key)))
    }

    async fn await_fetch(&self, key: String) -> Result<Next<SpsStep>, StepError> {
        let Some(fetch) = self.fetch(&key).await? else {
            return Err(StepError::refused(format!(
                "fetch {key} is gone from the appliance (its status was removed)"
            )));
        };
        match fetch.status {
            FetchStatus::Queued | FetchStatus::InProgress => {
                Ok(Next::poll(SpsStep::AwaitFetch { key }).note(fetch.describe()))
            }
            FetchStatus::Finished => match fetch.slot.clone() {
                Some(slot) => Ok(Next::run(SpsStep::Upgrade { slot: slot.clone() })
                    .note(format!("{} into slot {slot}", fetch.describe()))),
                None => Err(StepError::garbage(format!(
                    "GET {FETCH}/{key}: the fetch finished without a slot_id"
                ))),
            },
            FetchStatus::Failed => Err(Failure::device(format!(
                "fetch {key} of {} failed ({}): {}",
                fetch.url.as_deref().unwrap_or("the image"),
                fetch.info.as_deref().unwrap_or("no info"),
                fetch.error.as_deref().unwrap_or("no error given")
            ))
            .into()),
            FetchStatus::Canceled => {
                Err(Failure::device(format!("fetch {key} was canceled on the appliance")).into())
            }
        }
    }

    async fn upgrade(&self, slot: String) -> Result<Next<SpsStep>, StepError> {
        let slots = self.slots().await?;
        if let Some(running) = slots.iter().find(|s| s.holds(self.target()) && s.current) {
            return Ok(self
                .succeeded(running)
                .note(format!("the appliance already runs {}", self.target())));
        }
        if let Some(known) = slots.iter().find(|s| s.key == slot) {
            if known.version.is_some() && !known.holds(self.target()) {
                return Err(Failure::device(format!(
                    "slot {slot} holds version {}, not the campaign's {}: not upgrading",
                    known.version_text(),
                    self.target()
                ))
                .into());
            }
            if known.after_reboot {
                // A copy of this step got there first: never upgrade twice.
                return Ok(Next::poll(await_reboot(slot))
                    .note("the slot is already selected for the restart"));
            }
        }
        // An empty or unknown slot is left for the appliance to refuse, in
        // its own words (ResourceNotFound).
        let body = json!({
            "slot_id": slot.parse::<u64>().map_or_else(|_| json!(slot), |n| json!(n)),
            "message": self.settings.commit_message,
        });
        let reply = self
            .send(|| Ok(self.cx.http.post(UPGRADE).json(&body)))
            .await?;
        if !reply.status.is_success()
            && let Some(error) = answers::read_error(&reply.body)
            && let Some(refusal) = refused_upgrade(&slot, &error)
        {
            return Err(refusal.into());
        }
        let reply = success(reply)?;
        let summary = serde_json::from_slice::<Value>(&reply.body)
            .ok()
            .and_then(|body| answers::test_summary(&body));
        let mut note = format!("upgrade to slot {slot} accepted; the appliance restarts");
        if let Some(summary) = summary {
            note.push_str(&format!(" (test: {summary})"));
        }
        // Confirm the appliance took it: the slot is selected for the
        // restart (or the restart has begun, and it no longer answers).
        if let Seen::Up(slots) = through_restart(self.slots().await)? {
            let selected = slots.iter().find(|s| s.key == slot);
            if !selected.is_some_and(|s| s.after_reboot || s.current) {
                return Err(Failure::device(format!(
                    "the appliance accepted the upgrade to slot {slot} but does not show the slot \
                     selected for the restart (after_reboot is not true); not waiting for it"
                ))
                .note(note)
                .into());
            }
        }
        Ok(Next::poll(await_reboot(slot)).note(note))
    }

    async fn await_reboot(
        &self,
        slot: String,
        since: Option<DateTime<Utc>>,
    ) -> Result<Next<SpsStep>, StepError> {
        let since = since.unwrap_or_else(Utc::now);
        let poll = |note: String| {
            Ok(Next::poll(SpsStep::AwaitReboot {
                slot: slot.clone(),
                since: Some(since),
            })
            .note(note))
        };
        // The appliance restarts into the new slot.
        let slots = match through_restart(self.slots().await)? {
            Seen::Up(slots) => slots,
            Seen::Restarting(note) => return poll(note),
        };
        match slots.iter().find(|s| s.holds(self.target())) {
            Some(running) if running.current => Ok(self.succeeded(running).note(format!(
                "the appliance runs {} from slot {}",
                self.target(),
                running.key
            ))),
            Some(selected) if selected.after_reboot => {
                let wait = self.settings.restart_wait();
                if (Utc::now() - since).to_std().unwrap_or_default() < wait {
                    return poll(format!(
                        "slot {} is selected; waiting for the restart",
                        selected.key
                    ));
                }
                Err(Failure::device(format!(
                    "upgrade staged, restart pending: slot {} holds {} and is selected for the \
                     next restart, but the appliance did not restart by itself within {}; \
                     restart it to finish the upgrade",
                    selected.key,
                    self.target(),
                    humantime::format_duration(wait)
                ))
                .needing_attention()
                .into())
            }
            _ => {
                let current = slots.iter().find(|s| s.current);
                Err(Failure::device(format!(
                    "after the upgrade the appliance runs {} (slot {}), not {} (slot {slot})",
                    current.map_or("an unknown version", Slot::version_text),
                    current.map_or("unknown", |s| s.key.as_str()),
                    self.target()
                ))
                .into())
            }
        }
    }

    async fn cancel_fetch(&self, key: String) -> Result<Next<SpsStep>, StepError> {
        let Some(fetch) = self.fetch(&key).await? else {
            return Ok(Next::done().note(format!("fetch {key} is already removed")));
        };
        let reply = self
            .send(|| Ok(self.cx.http.delete(&fetch_path(&key))))
            .await?;
        if reply.status != StatusCode::NOT_FOUND {
            success(reply)?;
        }
        if fetch.status.running() {
            // Its status entry stays until a second DELETE, once the
            // cancellation has taken.
            return Ok(Next::poll(SpsStep::CancelFetch { key: key.clone() })
                .note(format!("fetch {key} cancelled at {}", fetch.describe())));
        }
        Ok(Next::done().note(format!(
            "status of fetch {key} ({}) removed",
            fetch.status.name()
        )))
    }

    fn succeeded(&self, slot: &Slot) -> Next<SpsStep> {
        Next::succeeded_with(json!({
            "version": self.target(),
            "slot": slot.key,
        }))
    }

    /// The fetch `key`, or `None` if the appliance does not know it.
    async fn fetch(&self, key: &str) -> Result<Option<Fetch>, StepError> {
        let reply = self.send(|| Ok(self.cx.http.get(&fetch_path(key)))).await?;
        if reply.status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let reply = success(reply)?;
        answers::read_fetch(&reply.json()?)
            .map(Some)
            .map_err(|p| reply.unreadable(&p))
    }

    async fn slots(&self) -> Result<Vec<Slot>, StepError> {
        let reply = success(self.send(|| Ok(self.cx.http.get(SLOTS))).await?)?;
        answers::read_slots(&reply.json()?).map_err(|p| reply.unreadable(&p))
    }

    async fn send(
        &self,
        build: impl Fn() -> Result<Call<'c>, StepError>,
    ) -> Result<Reply, StepError> {
        self.logins.send(&self.cx.http, self.login, build).await
    }
}

/// The failure of an upgrade the appliance refused with a documented
/// error; `None` for any other error.
fn refused_upgrade(slot: &str, error: &ApiError) -> Option<Failure> {
    let text = match error.kind.as_str() {
        "IncompleteRequestBodyError" => {
            let paths = error.missing_paths();
            let mut text = format!(
                "the appliance refused the upgrade: the request misses {} (IncompleteRequestBodyError)",
                if paths.is_empty() {
                    "paths it does not name".to_owned()
                } else {
                    paths.join(", ")
                }
            );
            if paths.iter().any(|p| p == "message") {
                text.push_str(COMMIT_LOG_HINT);
            }
            text
        }
        "ResourceNotFound" => format!(
            "firmware slot {} is empty (ResourceNotFound)",
            error.detail("resource").unwrap_or_else(|| slot.to_owned())
        ),
        "FirmwareTestFailed" => {
            let summary = error
                .detail("test_summary")
                .map(|s| answers::one_line(&s))
                .unwrap_or_else(|| error.message.clone());
            let exit = error
                .detail("exit_code")
                .map(|code| format!(", exit code {code}"))
                .unwrap_or_default();
            format!("the firmware test failed (FirmwareTestFailed{exit}): {summary}")
        }
        "UpgradeMessageMissing" => {
            format!(
                "the appliance requires a commit message (UpgradeMessageMissing){COMMIT_LOG_HINT}"
            )
        }
        _ => return None,
    };
    Some(Failure::device(text))
}

const COMMIT_LOG_HINT: &str =
    ": the appliance requires a commit log; set [drivers.sps] commit_message in the campaign";

/// Fails unless the reply is a 2xx: a 401/403 as an auth failure, another
/// status as the appliance's refusal in its own words (its error `type`
/// and `message` when the body has them).
fn success(reply: Reply) -> Result<Reply, StepError> {
    reply.success_in_words(|body| {
        let error = answers::read_error(body)?;
        Some(format!("{}: {}", error.kind, error.message))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_refusal_ends_in_its_own_words() {
        let read = |body: &str| answers::read_error(body.as_bytes()).unwrap();
        let missing = refused_upgrade(
            "2",
            &read(r#"{"error": {"details": {"missing_paths": ["message"]}, "type": "IncompleteRequestBodyError"}}"#),
        )
        .unwrap();
        let text = missing.message;
        assert!(text.contains("misses message"), "{text}");
        assert!(text.contains("commit_message"), "{text}");

        let empty = refused_upgrade(
            "3",
            &read(r#"{"error": {"details": {"resource": "3"}, "type": "ResourceNotFound"}}"#),
        )
        .unwrap();
        assert_eq!(empty.message, "firmware slot 3 is empty (ResourceNotFound)");

        let test = refused_upgrade(
            "2",
            &read(
                r#"{"error": {"details": {"exit_code": 1, "test_summary": "HA check started\nHA check failed"}, "type": "FirmwareTestFailed"}}"#,
            ),
        )
        .unwrap();
        assert_eq!(
            test.message,
            "the firmware test failed (FirmwareTestFailed, exit code 1): HA check started; HA check failed"
        );
        assert_eq!(test.class, flotilla_common::ErrorClass::Device);

        let message = refused_upgrade(
            "2",
            &read(r#"{"error": {"type": "UpgradeMessageMissing"}}"#),
        )
        .unwrap();
        assert!(message.message.contains("UpgradeMessageMissing"));
        assert!(refused_upgrade("2", &read(r#"{"error": {"type": "Other"}}"#)).is_none());
    }

    fn fetch(key: &str, status: &str, started: Option<&str>) -> Fetch {
        answers::read_fetch(&json!({
            "key": key,
            "body": {
                "status": status, "url": "https://files/sps.iso", "slot_id": null,
                "start_time": started, "bytes_downloaded": 0, "bytes_total": 0,
                "error": null, "info": null,
            }
        }))
        .unwrap()
    }

    #[test]
    fn a_fetch_is_followed_when_it_runs_or_the_baseline_does_not_list_it() {
        let baseline = SpsBaseline {
            fetches: vec!["old-failed".into(), "old-running".into()],
        };
        let old_failed = || fetch("old-failed", "failed", Some("2022-03-30T12:00:01+00:00"));
        assert!(baseline.to_follow(vec![old_failed()]).is_none());
        let running = fetch("old-running", "in-progress", Some("2022-03-30T12:00:01+00:00"));
        assert_eq!(
            baseline.to_follow(vec![old_failed(), running]).unwrap().key,
            "old-running"
        );
        // This job's own (a retried stage), failed and stamped before the
        // earlier ones by a clock that stepped back: still followed.
        let ours = fetch("ours", "failed", Some("2020-01-01T00:00:00+00:00"));
        assert_eq!(baseline.to_follow(vec![old_failed(), ours]).unwrap().key, "ours");
    }
}
