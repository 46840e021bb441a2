//! NetProfilers updating their Flow Gateways, with verified backups first,
//! through a real broker and real HTTP to simulated appliances: every
//! documented failure, per-gateway outcomes, and redelivered steps.

use flotilla_common::{DeviceKind, Outcome};
use flotilla_sim::netprofiler;
use flotilla_sim::{Fleet, FleetSpec, GatewayFault};
use flotilla_tests::{Harness, eventually, fleet_credentials};
use serde_json::json;
use std::time::Duration;

fn backups_to_a_remote_host() -> serde_json::Value {
    json!({
        "backup_first": true,
        "backup": { "host": "backup.example.net", "username": "mazu", "path": "/srv/backups" },
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netprofilers_update_every_gateway_after_its_backup_and_report_each() {
    let harness = Harness::new("np-states").await;
    let fleet = Fleet::start(
        FleetSpec {
            gateways_per_netprofiler: 3,
            backups_first: true,
            upgrade_time: Duration::from_millis(500)..=Duration::from_millis(1500),
            ..FleetSpec::default()
        }
        .with(DeviceKind::Netprofiler, 9)
        .with_faults(
            DeviceKind::Netprofiler,
            vec![
                GatewayFault::FailGraceful,
                GatewayFault::FailCritical,
                GatewayFault::InitFails,
                GatewayFault::StartFails,
                GatewayFault::RunError,
                GatewayFault::RefusedCredentials,
                GatewayFault::Stuck,
            ],
        ),
    )
    .await
    .unwrap();
    let worker = harness.start_worker("w1", fleet_credentials(&fleet));
    let mut campaign = harness.campaign("np-states");
    campaign.policy.deadline = Duration::from_secs(12);
    campaign
        .drivers
        .insert(DeviceKind::Netprofiler, backups_to_a_remote_host());
    harness.publish(&campaign, fleet.devices()).await;
    let events = harness
        .wait_finished(&campaign.id, 9, Duration::from_secs(90))
        .await;
    worker.stop().await;

    for device in fleet.devices() {
        let finished = events.outcome_of(&device.id).unwrap();
        let expected = fleet.expectation(&device.id).unwrap();
        expected
            .check(&finished.ending)
            .unwrap_or_else(|e| panic!("{}: {e}", device.id));
        fleet
            .check_detail(&device.id, &finished.ending)
            .unwrap_or_else(|e| panic!("{}: {e}", device.id));
        let np = fleet.get::<netprofiler::Netprofiler>(&device.id).unwrap();
        // Backups go first, through each gateway's own API: exactly one
        // each, even where the NetProfiler then refused the login.
        for gateway in np.gateways() {
            assert_eq!(
                gateway.backups_started(),
                1,
                "{} of {}",
                gateway.ip(),
                device.id
            );
        }
        if finished.ending.outcome == Outcome::Succeeded {
            assert!(np.gateways().iter().all(|g| g.version() == "7.2.1"));
            let detail = finished.ending.detail.as_ref().unwrap();
            assert_eq!(detail["gateways"].as_array().unwrap().len(), 3);
        }
    }
    // The backup that failed kept every gateway of its NetProfiler from
    // being updated (checked by check_gateways); its error says why.
    let backup_failed = events.outcome_of("np-0005").unwrap();
    assert!(
        backup_failed
            .ending
            .error
            .as_deref()
            .unwrap()
            .contains("the update was not started")
    );
    let critical = events.outcome_of("np-0002").unwrap();
    let failed_gateway = &critical.ending.detail.as_ref().unwrap()["gateways"][0];
    assert_eq!(failed_gateway["state"], "failed_critical");
    assert_eq!(
        failed_gateway["internal_state_description"],
        flotilla_sim::flowgateway::CRITICAL_INTERNAL
    );
    harness.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netprofiler_jobs_delivered_twice_back_up_and_update_each_gateway_once() {
    let harness = Harness::new("np-twice").await;
    let fleet = Fleet::start(
        FleetSpec {
            gateways_per_netprofiler: 2,
            backups_first: true,
            ..FleetSpec::default()
        }
        .with(DeviceKind::Netprofiler, 4),
    )
    .await
    .unwrap();
    let worker = harness.start_worker("w1", fleet_credentials(&fleet));
    let mut campaign = harness.campaign("np-twice");
    campaign
        .drivers
        .insert(DeviceKind::Netprofiler, json!({ "backup_first": true }));
    harness.publish(&campaign, fleet.devices()).await;
    harness.publish(&campaign, fleet.devices()).await;
    let total = |t: &flotilla_producer::CampaignState| t.finished() + t.repeated_outcomes().len();
    eventually(Duration::from_secs(60), "both copies finished", || async {
        total(&harness.all_events(&campaign.id).await) >= 8
    })
    .await;
    harness.publish(&campaign, fleet.devices()).await;
    eventually(Duration::from_secs(60), "third copies finished", || async {
        total(&harness.all_events(&campaign.id).await) >= 12
    })
    .await;
    worker.stop().await;
    let events = harness.all_events(&campaign.id).await;
    for device in fleet.devices() {
        let finished = events.outcome_of(&device.id).unwrap();
        assert_eq!(finished.ending.outcome, Outcome::Succeeded, "{finished:?}");
        for gateway in fleet
            .get::<netprofiler::Netprofiler>(&device.id)
            .unwrap()
            .gateways()
        {
            assert_eq!(
                gateway.updates_started(),
                1,
                "{} updated twice",
                gateway.ip()
            );
            assert_eq!(
                gateway.backups_started(),
                1,
                "{} backed up twice",
                gateway.ip()
            );
        }
    }
    for repeated in events.repeated_outcomes() {
        assert_eq!(repeated.ending.outcome, Outcome::Succeeded, "{repeated:?}");
    }
    harness.teardown().await;
}
