//! Flow Gateway backups and restores through a real broker and real HTTP to
//! simulated gateways, with Basic and OAuth logins.

use flotilla_common::{DeviceKind, ErrorClass, Outcome};
use flotilla_sim::flowgateway;
use flotilla_sim::{Fleet, FleetSpec, GatewayFault, flowgateway::RUN_ERROR};
use flotilla_tests::{Harness, eventually, fleet_credentials};
use flotilla_worker::{CredentialStore, Credentials};
use serde_json::json;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_complete_or_fail_with_the_gateways_message() {
    let harness = Harness::new("fg-backup").await;
    let fleet = Fleet::start(
        FleetSpec {
            ..FleetSpec::default()
        }
        .with(DeviceKind::Flowgateway, 5)
        .with_faults(
            DeviceKind::Flowgateway,
            vec![GatewayFault::RunError, GatewayFault::RefusedCredentials],
        ),
    )
    .await
    .unwrap();
    let worker = harness.start_worker("w1", fleet_credentials(&fleet));
    let mut campaign = harness.campaign("fg-backup");
    campaign.drivers.insert(
        DeviceKind::Flowgateway,
        json!({ "destination": { "host": "backup.example.net", "username": "mazu", "path": "/srv/fg" } }),
    );
    harness.publish(&campaign, fleet.devices()).await;
    let events = harness
        .wait_finished(&campaign.id, 5, Duration::from_secs(60))
        .await;
    worker.stop().await;
    let steps = harness.step_events(&campaign.id).await;
    for device in fleet.devices() {
        let finished = events.outcome_of(&device.id).unwrap();
        fleet
            .expectation(&device.id)
            .unwrap()
            .check(&finished.ending)
            .unwrap_or_else(|e| panic!("{}: {e}", device.id));
        let gateway = fleet.get::<flowgateway::FlowGateway>(&device.id).unwrap();
        match gateway.fault() {
            Some(GatewayFault::RefusedCredentials) => {
                assert_eq!(gateway.backups_started(), 0);
                assert_eq!(finished.ending.error_class, Some(ErrorClass::Auth));
                // Refused once, not retried until the attempts ran out.
                let tries = steps.iter().filter(|s| s.device == device.id).count();
                assert_eq!(tries, 1, "{steps:?}");
            }
            Some(_) => assert_eq!(
                finished.ending.error.as_deref(),
                Some(format!("backup failed: {RUN_ERROR}").as_str())
            ),
            None => {
                assert_eq!(gateway.backups_started(), 1);
                let detail = finished.ending.detail.as_ref().unwrap();
                assert_eq!(detail["host"], "backup.example.net");
            }
        }
    }
    // The SSH and encryption passwords went to the gateways, never into an event.
    assert!(!format!("{steps:?}").contains(fleet.backup_password()));
    harness.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restores_run_once_with_an_oauth_login_even_when_delivered_twice() {
    let harness = Harness::new("fg-restore").await;
    let fleet = Fleet::start(
        FleetSpec {
            ..FleetSpec::default()
        }
        .with(DeviceKind::Flowgateway, 4),
    )
    .await
    .unwrap();
    // An access code instead of a password: OAuth bearer tokens.
    let oauth = Credentials::new(flotilla_sim::CREDENTIALS_REFERENCE)
        .with("access_code", fleet.access_code())
        .with("security_password", "sim-backup-encryption-key")
        .with("allowed_hosts", flotilla_tests::FLEET_ALLOWED_HOSTS);
    let worker = harness.start_worker("w1", CredentialStore::with_given([oauth]));
    let mut campaign = harness.campaign("fg-restore");
    campaign
        .drivers
        .insert(DeviceKind::Flowgateway, json!({ "operation": "restore" }));
    harness.publish(&campaign, fleet.devices()).await;
    harness.publish(&campaign, fleet.devices()).await;
    let total = |t: &flotilla_producer::CampaignState| t.finished() + t.repeated_outcomes().len();
    eventually(Duration::from_secs(60), "both copies finished", || async {
        total(&harness.all_events(&campaign.id).await) >= 8
    })
    .await;
    worker.stop().await;
    let events = harness.all_events(&campaign.id).await;
    for device in fleet.devices() {
        let finished = events.outcome_of(&device.id).unwrap();
        assert_eq!(finished.ending.outcome, Outcome::Succeeded, "{finished:?}");
        let gateway = fleet.get::<flowgateway::FlowGateway>(&device.id).unwrap();
        assert_eq!(
            gateway.restores_started(),
            1,
            "{} restored twice",
            device.id
        );
        assert_eq!(gateway.backups_started(), 0);
    }
    for repeated in events.repeated_outcomes() {
        assert_eq!(repeated.ending.outcome, Outcome::Succeeded, "{repeated:?}");
    }
    harness.teardown().await;
}
