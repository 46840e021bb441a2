//! One Identity SPS firmware upgrades through a real broker and real HTTP
//! to simulated appliances: every documented refusal, failed and canceled
//! fetches, checksums, sessions that end mid-job, the reboot window,
//! uploads from a local file, redelivered steps, and the cleanup of a
//! running fetch on cancel and on the deadline.

use flotilla_common::{
    Device, DeviceKind, ErrorClass, Outcome, Publisher, StepEvent, control::Command,
};
use flotilla_producer::Campaign;
use flotilla_sim::{Fleet, FleetSpec, SpsFault, sps};
use flotilla_tests::{Harness, eventually, fleet_credentials};
use std::time::Duration;

fn sps_fleet(appliances: usize, faults: Vec<SpsFault>) -> FleetSpec {
    FleetSpec {
        // Queued, then downloading, this long each: a few polls each.
        operation_time: Duration::from_millis(300)..=Duration::from_millis(500),
        // Long enough that several polls land while the appliance is down.
        reboot_time: Duration::from_millis(1500)..=Duration::from_millis(2000),
        ..FleetSpec::default()
    }
    .with(DeviceKind::Sps, appliances)
    .with_faults(DeviceKind::Sps, faults)
}

fn notes<'s>(steps: &'s [StepEvent], device: &str, step: &str) -> Vec<&'s str> {
    steps
        .iter()
        .filter(|s| s.device == device && s.step == step)
        .filter_map(|s| s.note.as_deref())
        .collect()
}

/// Publishes one job per device that starts at `step` (as a job
/// redelivered there would), without its `published` event.
async fn publish_at_step(
    harness: &Harness,
    campaign: &Campaign,
    devices: &[Device],
    step: serde_json::Value,
) {
    let connection = harness.broker.connection().await.unwrap();
    let publisher = Publisher::open(&connection).await.unwrap();
    for device in devices {
        let mut job = harness.job(campaign, device);
        job.settings = campaign.settings_for(device.kind);
        job.step = step.clone();
        let body = serde_json::to_vec(&job).unwrap();
        publisher
            .publish(&harness.topology.jobs(), &body, harness.job_message(&body))
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sps_upgrades_go_through_the_reboot_and_each_failure_ends_as_documented() {
    let harness = Harness::new("sps-states").await;
    let faults = vec![
        SpsFault::FetchFailed,
        SpsFault::ChecksumMismatch,
        SpsFault::FetchCanceled,
        SpsFault::EmptySlot,
        SpsFault::FirmwareTestFailed,
        SpsFault::UpgradeMessageMissing,
        SpsFault::IncompleteRequestBody,
        SpsFault::RefusedCredentials,
    ];
    let fleet = Fleet::start(sps_fleet(11, faults)).await.unwrap();
    let worker = harness.start_worker("w1", fleet_credentials(&fleet));
    let mut campaign = harness.campaign("sps-states");
    campaign.policy.deadline = Duration::from_secs(30);
    harness.publish(&campaign, fleet.devices()).await;
    let events = harness
        .wait_finished(&campaign.id, 11, Duration::from_secs(60))
        .await;
    worker.stop().await;
    let steps = harness.step_events(&campaign.id).await;

    for device in fleet.devices() {
        let id = device.id.as_str();
        let finished = events.outcome_of(id).unwrap();
        fleet
            .expectation(id)
            .unwrap()
            .check(&finished.ending)
            .unwrap_or_else(|e| panic!("{id}: {e}"));
        let appliance = fleet.get::<sps::Sps>(id).unwrap();
        let error = finished.ending.error.as_deref().unwrap_or("");
        match appliance.fault() {
            None => {
                assert_eq!(appliance.upgrades(), 1, "{id}");
                assert_eq!(appliance.version(), "7.2.1", "{id}");
                assert_eq!(finished.ending.detail.as_ref().unwrap()["version"], "7.2.1");
                // The restart ended the first session: a second was opened.
                assert!(appliance.logins() >= 2, "{id}: {}", appliance.logins());
                let progress = notes(&steps, id, "await_fetch");
                assert!(
                    progress
                        .iter()
                        .any(|n| n.contains(" of 1521614848 bytes (")),
                    "{id}: no download progress reported: {progress:?}"
                );
                let waits = notes(&steps, id, "await_reboot");
                assert!(
                    waits
                        .iter()
                        .any(|n| n.contains("waiting for the appliance to come back")),
                    "{id}: no poll saw the reboot window: {waits:?}"
                );
                assert_eq!(finished.last_step, "await_reboot");
            }
            Some(fault) => {
                assert_eq!(appliance.upgrades(), 0, "{id} ({fault:?}) was upgraded");
                match fault {
                    SpsFault::FetchFailed => assert!(error.contains(sps::FETCH_ERROR), "{error}"),
                    SpsFault::ChecksumMismatch => {
                        assert!(error.contains("Checksum mismatch"), "{error}")
                    }
                    SpsFault::EmptySlot => assert!(
                        error.contains("firmware slot 2 is empty (ResourceNotFound)"),
                        "{error}"
                    ),
                    SpsFault::FirmwareTestFailed => assert!(
                        error.contains("HA check started; HA check failed"),
                        "{error}"
                    ),
                    SpsFault::IncompleteRequestBody => {
                        assert!(error.contains("misses message"), "{error}");
                        assert!(error.contains("commit_message"), "{error}");
                    }
                    SpsFault::UpgradeMessageMissing => {
                        assert!(error.contains("commit_message"), "{error}")
                    }
                    SpsFault::RefusedCredentials => {
                        assert_eq!(appliance.logins(), 0);
                        assert_eq!(appliance.fetches_started(), 0);
                    }
                    _ => {}
                }
                // A failed or canceled fetch's status entry is removed.
                if matches!(
                    fault,
                    SpsFault::FetchFailed | SpsFault::ChecksumMismatch | SpsFault::FetchCanceled
                ) {
                    assert_eq!(appliance.fetch_entries(), 0, "{id}: status left behind");
                    assert_eq!(finished.last_step, "cancel_fetch");
                }
            }
        }
        assert!(appliance.fetches_started() <= 1, "{id} fetched twice");
    }
    assert!(events.repeated_outcomes().is_empty());
    // No secret in any event: neither the password nor a session.
    let printed = format!("{steps:?} {:?}", events.outcomes().collect::<Vec<_>>());
    let (_, password) = fleet.login();
    assert!(!printed.contains(password));
    assert!(!printed.contains("session_id"));
    harness.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sps_commit_messages_reach_appliances_that_require_a_commit_log() {
    let harness = Harness::new("sps-commit").await;
    let fleet = Fleet::start(sps_fleet(
        3,
        vec![
            SpsFault::UpgradeMessageMissing,
            SpsFault::IncompleteRequestBody,
        ],
    ))
    .await
    .unwrap();
    let worker = harness.start_worker("w1", fleet_credentials(&fleet));
    let mut campaign = harness.campaign("sps-commit");
    campaign.drivers.insert(
        DeviceKind::Sps,
        serde_json::json!({ "commit_message": "CHG-42: SPS 7.2.1" }),
    );
    harness.publish(&campaign, fleet.devices()).await;
    let events = harness
        .wait_finished(&campaign.id, 3, Duration::from_secs(60))
        .await;
    worker.stop().await;
    for device in fleet.devices() {
        let finished = events.outcome_of(&device.id).unwrap();
        assert_eq!(finished.ending.outcome, Outcome::Succeeded, "{finished:?}");
        let appliance = fleet.get::<sps::Sps>(&device.id).unwrap();
        assert_eq!(
            appliance.commit_messages(),
            vec![Some("CHG-42: SPS 7.2.1".to_owned())]
        );
        assert_eq!(appliance.version(), "7.2.1");
    }
    harness.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sps_sessions_that_end_mid_job_are_opened_again() {
    let harness = Harness::new("sps-session").await;
    let fleet = Fleet::start(FleetSpec {
        // Every poll comes after the session has ended.
        sps_session_idle: Duration::from_millis(300),
        operation_time: Duration::from_millis(1000)..=Duration::from_millis(1200),
        ..sps_fleet(2, Vec::new())
    })
    .await
    .unwrap();
    let worker = harness.start_worker("w1", fleet_credentials(&fleet));
    let mut campaign = harness.campaign("sps-session");
    campaign.policy.poll_interval = Duration::from_millis(700);
    harness.publish(&campaign, fleet.devices()).await;
    let events = harness
        .wait_finished(&campaign.id, 2, Duration::from_secs(60))
        .await;
    worker.stop().await;
    let steps = harness.step_events(&campaign.id).await;
    for device in fleet.devices() {
        let finished = events.outcome_of(&device.id).unwrap();
        assert_eq!(finished.ending.outcome, Outcome::Succeeded, "{finished:?}");
        let appliance = fleet.get::<sps::Sps>(&device.id).unwrap();
        let polls = notes(&steps, &device.id, "await_fetch").len();
        assert!(polls >= 2, "{}: {polls} fetch polls", device.id);
        // A session for the first step, one per fetch poll (each after
        // the session ended), and at least one after the restart.
        assert!(
            appliance.logins() as usize > polls + 1,
            "{}: {} logins for {polls} fetch polls",
            device.id,
            appliance.logins()
        );
        assert_eq!(appliance.upgrades(), 1);
    }
    // Ended sessions were opened again within the step, never retried.
    let errors: Vec<_> = steps.iter().filter_map(|s| s.error.as_deref()).collect();
    assert!(errors.is_empty(), "steps failed: {errors:?}");
    harness.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sps_restart_is_waited_for_not_retried() {
    let harness = Harness::new("sps-reboot").await;
    let fleet = Fleet::start(FleetSpec {
        reboot_time: Duration::from_millis(2000)..=Duration::from_millis(2500),
        ..sps_fleet(2, Vec::new())
    })
    .await
    .unwrap();
    let worker = harness.start_worker("w1", fleet_credentials(&fleet));
    let mut campaign = harness.campaign("sps-reboot");
    // A single try per step: a refused connection counted as a failure
    // would end the job.
    campaign.policy.retry.max_attempts = 1;
    harness.publish(&campaign, fleet.devices()).await;
    let events = harness
        .wait_finished(&campaign.id, 2, Duration::from_secs(60))
        .await;
    worker.stop().await;
    let steps = harness.step_events(&campaign.id).await;
    for device in fleet.devices() {
        let finished = events.outcome_of(&device.id).unwrap();
        assert_eq!(finished.ending.outcome, Outcome::Succeeded, "{finished:?}");
        let waits = notes(&steps, &device.id, "await_reboot");
        let refused = waits
            .iter()
            .filter(|n| n.contains("waiting for the appliance to come back"))
            .count();
        assert!(refused >= 3, "{}: {waits:?}", device.id);
        assert!(
            waits.last().unwrap().contains("the appliance runs 7.2.1"),
            "{waits:?}"
        );
        let appliance = fleet.get::<sps::Sps>(&device.id).unwrap();
        assert_eq!(appliance.version(), "7.2.1");
        assert!(
            appliance.logins() >= 2,
            "no fresh session after the restart"
        );
    }
    harness.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sps_steps_delivered_twice_never_fetch_or_upgrade_twice() {
    let harness = Harness::new("sps-twice").await;
    let fleet = Fleet::start(FleetSpec {
        operation_time: Duration::from_millis(800)..=Duration::from_millis(1000),
        ..sps_fleet(4, Vec::new())
    })
    .await
    .unwrap();
    let worker = harness.start_worker("w1", fleet_credentials(&fleet));
    let (staged, fetched) = fleet.devices().split_at(2);

    // Two copies of an upgrade step at once, on appliances whose slot
    // already holds the release: one upgrade each.
    let upgrade = harness.campaign("sps-twice-upgrade");
    let slot = fleet
        .get::<sps::Sps>(&staged[0].id)
        .unwrap()
        .stage_release();
    fleet
        .get::<sps::Sps>(&staged[1].id)
        .unwrap()
        .stage_release();
    let step = serde_json::json!({ "upgrade": { "slot": slot } });
    publish_at_step(&harness, &upgrade, staged, step.clone()).await;
    publish_at_step(&harness, &upgrade, staged, step.clone()).await;

    // A fetch step delivered again while its fetch runs follows it.
    let fetch = harness.campaign("sps-twice-fetch");
    harness.publish(&fetch, fetched).await;
    harness
        .wait_until(&fetch.id, Duration::from_secs(30), "fetches started", |s| {
            fetched.iter().all(|d| {
                s.device(&d.id)
                    .is_some_and(|r| r.last_step() == Some("await_fetch"))
            })
        })
        .await;
    harness.publish(&fetch, fetched).await;

    let total = |t: &flotilla_producer::CampaignState| t.finished() + t.repeated_outcomes().len();
    for campaign in [&upgrade.id, &fetch.id] {
        eventually(Duration::from_secs(60), "both copies finished", || async {
            total(&harness.all_events(campaign).await) >= 4
        })
        .await;
    }
    // A third copy of the upgrade step, once all is over.
    publish_at_step(&harness, &upgrade, staged, step).await;
    eventually(Duration::from_secs(30), "third copies finished", || async {
        total(&harness.all_events(&upgrade.id).await) >= 6
    })
    .await;
    worker.stop().await;

    for campaign in [&upgrade.id, &fetch.id] {
        let events = harness.all_events(campaign).await;
        for finished in events
            .outcomes()
            .chain(events.repeated_outcomes().iter().cloned())
        {
            assert_eq!(
                finished.ending.outcome,
                Outcome::Succeeded,
                "{}: {:?}",
                finished.device,
                finished.ending
            );
        }
    }
    for device in fleet.devices() {
        let appliance = fleet.get::<sps::Sps>(&device.id).unwrap();
        assert_eq!(appliance.upgrades(), 1, "{} upgraded twice", device.id);
        assert_eq!(appliance.version(), "7.2.1");
    }
    for device in staged {
        assert_eq!(
            fleet.get::<sps::Sps>(&device.id).unwrap().fetches_started(),
            0
        );
    }
    for device in fetched {
        let started = fleet.get::<sps::Sps>(&device.id).unwrap().fetches_started();
        assert_eq!(started, 1, "{} fetched {started} times", device.id);
    }
    harness.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sps_cleanup_cancels_a_running_fetch_on_cancel_and_on_the_deadline() {
    let harness = Harness::new("sps-cleanup").await;
    let fleet = Fleet::start(sps_fleet(2, vec![SpsFault::Stuck, SpsFault::Stuck]))
        .await
        .unwrap();
    let worker = harness.start_worker("w1", fleet_credentials(&fleet));
    let (deadline_device, cancel_device) = fleet.devices().split_at(1);

    let mut deadline = harness.campaign("sps-deadline");
    deadline.policy.deadline = Duration::from_secs(3);
    harness.publish(&deadline, deadline_device).await;

    let cancelled = harness.campaign("sps-cancel");
    harness.publish(&cancelled, cancel_device).await;
    harness
        .wait_until(
            &cancelled.id,
            Duration::from_secs(30),
            "a download under way",
            |s| {
                s.device(&cancel_device[0].id)
                    .is_some_and(|r| r.last_step() == Some("await_fetch"))
            },
        )
        .await;
    eventually(Duration::from_secs(10), "the fetch running", || async {
        fleet
            .get::<sps::Sps>(&cancel_device[0].id)
            .unwrap()
            .running_fetches()
            == 1
    })
    .await;
    harness.command(&cancelled.id, Command::Cancel).await;

    let cancel_events = harness
        .wait_finished(&cancelled.id, 1, Duration::from_secs(30))
        .await;
    let deadline_events = harness
        .wait_finished(&deadline.id, 1, Duration::from_secs(30))
        .await;
    worker.stop().await;
    for (events, device, outcome) in [
        (&cancel_events, &cancel_device[0], Outcome::Cancelled),
        (&deadline_events, &deadline_device[0], Outcome::TimedOut),
    ] {
        let finished = events.outcome_of(&device.id).unwrap();
        assert_eq!(finished.ending.outcome, outcome, "{finished:?}");
        assert_eq!(finished.last_step, "cancel_fetch");
        let appliance = fleet.get::<sps::Sps>(&device.id).unwrap();
        assert_eq!(appliance.fetches_started(), 1);
        assert_eq!(appliance.fetches_cancelled(), 1, "{}", device.id);
        assert_eq!(appliance.running_fetches(), 0, "{}", device.id);
        assert_eq!(appliance.fetch_entries(), 0, "{}: status left", device.id);
        assert_eq!(appliance.upgrades(), 0);
    }
    assert_eq!(harness.circulating_jobs().await, 0);
    harness.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sps_uploads_a_local_image_and_checksums_are_enforced() {
    let harness = Harness::new("sps-upload").await;
    let fleet = Fleet::start(sps_fleet(1, Vec::new())).await.unwrap();
    // The harness campaign's SHA-256 is that of "test".
    let image = harness.image_dir().join("sps-7.2.1.iso");
    std::fs::write(&image, "test").unwrap();
    let worker = harness.start_worker("w1", fleet_credentials(&fleet));
    let mut campaign = harness.campaign("sps-upload");
    campaign.target.image_url = url::Url::from_file_path(&image).unwrap();
    harness.publish(&campaign, fleet.devices()).await;
    let events = harness
        .wait_finished(&campaign.id, 1, Duration::from_secs(60))
        .await;
    let id = &fleet.devices()[0].id;
    let finished = events.outcome_of(id).unwrap();
    assert_eq!(finished.ending.outcome, Outcome::Succeeded, "{finished:?}");
    let appliance = fleet.get::<sps::Sps>(id).unwrap();
    assert_eq!(appliance.uploads(), 1);
    assert_eq!(appliance.fetches_started(), 0);
    assert_eq!(appliance.version(), "7.2.1");

    // A local file whose checksum is not the campaign's is never uploaded.
    std::fs::write(&image, "tampered").unwrap();
    let fleet = Fleet::start(sps_fleet(2, Vec::new())).await.unwrap();
    let mut tampered = harness.campaign("sps-tampered");
    tampered.target.image_url = url::Url::from_file_path(&image).unwrap();
    harness.publish(&tampered, &fleet.devices()[..1]).await;
    // A campaign whose SHA-256 is not the image's: the appliance's check
    // fails the fetch.
    let mut wrong = harness.campaign("sps-wrong-checksum");
    wrong.target.sha256 = "ab".repeat(32);
    harness.publish(&wrong, &fleet.devices()[1..]).await;
    let tampered_events = harness
        .wait_finished(&tampered.id, 1, Duration::from_secs(30))
        .await;
    let wrong_events = harness
        .wait_finished(&wrong.id, 1, Duration::from_secs(30))
        .await;
    worker.stop().await;

    let first = &fleet.devices()[0].id;
    let finished = tampered_events.outcome_of(first).unwrap();
    assert_eq!(finished.ending.error_class, Some(ErrorClass::Config));
    assert!(
        finished
            .ending
            .error
            .as_deref()
            .unwrap()
            .contains("SHA-256"),
        "{finished:?}"
    );
    assert_eq!(fleet.get::<sps::Sps>(first).unwrap().uploads(), 0);

    let second = &fleet.devices()[1].id;
    let finished = wrong_events.outcome_of(second).unwrap();
    assert_eq!(finished.ending.error_class, Some(ErrorClass::Device));
    let error = finished.ending.error.as_deref().unwrap();
    assert!(error.contains("Checksum mismatch"), "{error}");
    assert!(error.contains(&"ab".repeat(32)), "{error}");
    let appliance = fleet.get::<sps::Sps>(second).unwrap();
    assert_eq!(appliance.upgrades(), 0);
    assert_eq!(appliance.fetch_entries(), 0);
    harness.teardown().await;
}
