//! NPM system updates through a real broker and real HTTP to simulated
//! appliances: every documented failure state, the reboot window, token
//! expiry, uploads from a local file, and redelivered steps.

use flotilla_common::{DeviceKind, ErrorClass, Outcome};
use flotilla_sim::npm;
use flotilla_sim::{Fleet, FleetSpec, NpmFault};
use flotilla_tests::{Harness, fleet_credentials};
use std::time::Duration;

fn npm_fleet(appliances: usize, faults: Vec<NpmFault>) -> FleetSpec {
    FleetSpec {
        upgrade_time: Duration::from_millis(300)..=Duration::from_millis(800),
        // Long enough that several polls land while the appliance is down.
        reboot_time: Duration::from_millis(1500)..=Duration::from_millis(2000),
        ..FleetSpec::default()
    }
    .with(DeviceKind::Npm, appliances)
    .with_faults(DeviceKind::Npm, faults)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn npm_updates_go_through_the_reboot_and_each_failure_ends_as_documented() {
    let harness = Harness::new("npm-states").await;
    let fleet = Fleet::start(npm_fleet(
        10,
        vec![
            NpmFault::InvalidImage,
            NpmFault::UploadError,
            NpmFault::ChecksumMismatch,
            NpmFault::FailGraceful,
            NpmFault::FailCritical,
            NpmFault::RefusedCredentials,
            NpmFault::Stuck,
        ],
    ))
    .await
    .unwrap();
    let worker = harness.start_worker("w1", fleet_credentials(&fleet));
    let mut campaign = harness.campaign("npm-states");
    campaign.policy.deadline = Duration::from_secs(15);
    campaign
        .drivers
        .insert(DeviceKind::Npm, serde_json::json!({ "delete_image": true }));
    harness.publish(&campaign, fleet.devices()).await;
    let events = harness
        .wait_finished(&campaign.id, 10, Duration::from_secs(90))
        .await;
    worker.stop().await;
    let steps = harness.step_events(&campaign.id).await;

    for device in fleet.devices() {
        let finished = events.outcome_of(&device.id).unwrap();
        let expected = fleet.expectation(&device.id).unwrap();
        expected
            .check(&finished.ending)
            .unwrap_or_else(|e| panic!("{}: {e}", device.id));
        let appliance = fleet.get::<npm::Npm>(&device.id).unwrap();
        assert!(appliance.updates_started() <= 1, "{}", device.id);
        match appliance.fault() {
            None => {
                assert_eq!(appliance.version(), "7.2.1");
                assert_eq!(appliance.images(), 0, "{}: image not deleted", device.id);
                // The reboot forgot the first token: a second was fetched.
                assert!(appliance.tokens_issued() >= 2, "{}", device.id);
                let waited = steps.iter().any(|s| {
                    s.device == device.id
                        && s.step == "await_update"
                        && s.note
                            .as_deref()
                            .is_some_and(|n| n.contains("waiting for the appliance to come back"))
                });
                assert!(waited, "{}: no poll saw the reboot window", device.id);
            }
            Some(NpmFault::FailCritical) => {
                assert_eq!(appliance.images(), 1, "the image is left for inspection");
                assert!(finished.ending.needs_attention);
            }
            Some(NpmFault::FailGraceful) => {
                assert!(steps.iter().any(|s| s.device == device.id
                    && s.step == "reset"
                    && s.note.as_deref() == Some("update reset")));
                assert_eq!(appliance.images(), 0);
            }
            Some(NpmFault::RefusedCredentials) => {
                assert_eq!(appliance.tokens_issued(), 0);
                assert_eq!(finished.ending.error_class, Some(ErrorClass::Auth));
            }
            Some(NpmFault::InvalidImage | NpmFault::UploadError | NpmFault::ChecksumMismatch) => {
                assert_eq!(appliance.updates_started(), 0, "{}", device.id);
            }
            Some(NpmFault::Stuck | NpmFault::InitStuck) => {
                assert_eq!(finished.ending.outcome, Outcome::TimedOut)
            }
        }
    }
    // No secret in any event.
    let printed = format!("{steps:?}");
    let (_, password) = fleet.login();
    assert!(!printed.contains(password));
    harness.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn npm_jobs_delivered_twice_never_start_a_second_update() {
    let harness = Harness::new("npm-twice").await;
    let fleet = Fleet::start(npm_fleet(6, Vec::new())).await.unwrap();
    let worker = harness.start_worker("w1", fleet_credentials(&fleet));
    let campaign = harness.campaign("npm-twice");
    // Two copies of every job at once, as after a redelivery.
    harness.publish(&campaign, fleet.devices()).await;
    harness.publish(&campaign, fleet.devices()).await;
    let events = harness
        .wait_finished(&campaign.id, 6, Duration::from_secs(90))
        .await;
    // Wait for the second copies too, then send a third once all is over.
    let total = |t: &flotilla_producer::CampaignState| t.finished() + t.repeated_outcomes().len();
    flotilla_tests::eventually(Duration::from_secs(60), "both copies finished", || async {
        total(&harness.all_events(&campaign.id).await) >= 12
    })
    .await;
    harness.publish(&campaign, fleet.devices()).await;
    flotilla_tests::eventually(Duration::from_secs(60), "third copies finished", || async {
        total(&harness.all_events(&campaign.id).await) >= 18
    })
    .await;
    worker.stop().await;
    let after = harness.all_events(&campaign.id).await;
    assert_eq!(events.finished(), 6);
    for device in fleet.devices() {
        let appliance = fleet.get::<npm::Npm>(&device.id).unwrap();
        assert_eq!(
            appliance.updates_started(),
            1,
            "{} updated twice",
            device.id
        );
        assert_eq!(appliance.version(), "7.2.1");
    }
    for repeated in after.repeated_outcomes() {
        assert_eq!(
            repeated.ending.outcome,
            Outcome::Succeeded,
            "{}: {:?}",
            repeated.device,
            repeated.ending
        );
    }
    harness.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn npm_uploads_a_local_image_and_fetches_tokens_anew_when_they_expire() {
    let harness = Harness::new("npm-upload").await;
    let fleet = Fleet::start(FleetSpec {
        token_lifetime: Duration::from_secs(1),
        upgrade_time: Duration::from_millis(2500)..=Duration::from_millis(3000),
        ..npm_fleet(2, Vec::new())
    })
    .await
    .unwrap();
    // The harness campaign's SHA-256 is that of "test".
    let image = harness.image_dir().join("npm-7.2.1.img");
    std::fs::write(&image, "test").unwrap();
    let worker = harness.start_worker("w1", fleet_credentials(&fleet));
    let mut campaign = harness.campaign("npm-upload");
    campaign.target.image_url = url::Url::from_file_path(&image).unwrap();
    harness.publish(&campaign, fleet.devices()).await;
    let events = harness
        .wait_finished(&campaign.id, 2, Duration::from_secs(60))
        .await;
    worker.stop().await;
    for device in fleet.devices() {
        let finished = events.outcome_of(&device.id).unwrap();
        assert_eq!(finished.ending.outcome, Outcome::Succeeded, "{finished:?}");
        let appliance = fleet.get::<npm::Npm>(&device.id).unwrap();
        assert_eq!(appliance.uploads(), 1);
        // A 2.5 s update outlives several one-second tokens.
        assert!(
            appliance.tokens_issued() >= 3,
            "{} tokens issued",
            appliance.tokens_issued()
        );
    }

    // A file whose checksum is not the campaign's is never uploaded.
    std::fs::write(&image, "tampered").unwrap();
    let fleet = Fleet::start(npm_fleet(1, Vec::new())).await.unwrap();
    let worker = harness.start_worker("w2", fleet_credentials(&fleet));
    let mut campaign = harness.campaign("npm-tampered");
    campaign.target.image_url = url::Url::from_file_path(&image).unwrap();
    harness.publish(&campaign, fleet.devices()).await;
    let events = harness
        .wait_finished(&campaign.id, 1, Duration::from_secs(30))
        .await;
    worker.stop().await;
    let finished = events.outcome_of(&fleet.devices()[0].id).unwrap();
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
    assert_eq!(
        fleet
            .get::<npm::Npm>(&fleet.devices()[0].id)
            .unwrap()
            .uploads(),
        0
    );
    harness.teardown().await;
}
