//! HTTPS to Riverbed devices whose certificates come from a custom CA given
//! in the campaign, and a device group whose checks the operator turned
//! off, through a real broker.

use flotilla_common::{DeviceKind, ErrorClass, Outcome, TlsProfile};
use flotilla_sim::{Fleet, FleetSpec};
use flotilla_sim::{flowgateway, netprofiler};
use flotilla_tests::{Harness, fleet_credentials};
use std::{collections::BTreeMap, time::Duration};

fn https_fleet() -> FleetSpec {
    FleetSpec {
        https: true,
        gateways_per_netprofiler: 2,
        backups_first: true,
        ..FleetSpec::default()
    }
    .with(DeviceKind::Netprofiler, 1)
    .with(DeviceKind::Flowgateway, 2)
    .with(DeviceKind::Npm, 2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_are_reached_over_https_checked_against_the_campaigns_ca() {
    let harness = Harness::new("tls-ca").await;
    let fleet = Fleet::start(https_fleet()).await.unwrap();
    assert!(
        fleet
            .devices()
            .iter()
            .all(|d| d.address.scheme() == "https")
    );
    let worker = harness.start_worker("w1", fleet_credentials(&fleet));
    let mut campaign = harness.campaign("tls-ca");
    campaign.tls.default = TlsProfile {
        ca_pem: Some(fleet.ca_pem()),
        verify: true,
    };
    campaign.drivers.insert(
        DeviceKind::Netprofiler,
        serde_json::json!({ "backup_first": true }),
    );
    harness.publish(&campaign, fleet.devices()).await;
    let events = harness
        .wait_finished(&campaign.id, 5, Duration::from_secs(60))
        .await;
    worker.stop().await;
    for device in fleet.devices() {
        let finished = events.outcome_of(&device.id).unwrap();
        assert_eq!(finished.ending.outcome, Outcome::Succeeded, "{finished:?}");
    }
    // The gateways' backups went over HTTPS too, checked the same way.
    let np = fleet.get::<netprofiler::Netprofiler>("np-0001").unwrap();
    assert!(np.gateways().iter().all(|g| g.backups_started() == 1));
    let steps = harness.step_events(&campaign.id).await;
    assert!(!steps.is_empty());
    assert!(steps.iter().all(|s| !s.tls_unverified));
    harness.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_ca_is_refused_unless_the_devices_group_turned_checks_off() {
    let harness = Harness::new("tls-groups").await;
    let fleet = Fleet::start(https_fleet()).await.unwrap();
    // A CA that signed none of this fleet's certificates.
    let stranger = Fleet::start(FleetSpec {
        https: true,
        seed: 99,
        ..FleetSpec::default()
    })
    .await
    .unwrap();
    let mut devices = fleet.devices().to_vec();
    for device in devices
        .iter_mut()
        .filter(|d| d.kind != DeviceKind::Flowgateway)
    {
        device.group = Some("lab".to_owned());
    }
    let worker = harness.start_worker("w1", fleet_credentials(&fleet));
    let mut campaign = harness.campaign("tls-groups");
    campaign.policy.retry.max_attempts = 2;
    campaign.tls.default = TlsProfile {
        ca_pem: Some(stranger.ca_pem()),
        verify: true,
    };
    campaign.tls.groups = BTreeMap::from([(
        "lab".to_owned(),
        TlsProfile {
            ca_pem: None,
            verify: false,
        },
    )]);
    campaign.drivers.insert(
        DeviceKind::Netprofiler,
        serde_json::json!({ "backup_first": true }),
    );
    harness.publish(&campaign, &devices).await;
    let events = harness
        .wait_finished(&campaign.id, 5, Duration::from_secs(60))
        .await;
    worker.stop().await;
    let steps = harness.step_events(&campaign.id).await;
    for device in &devices {
        let finished = events.outcome_of(&device.id).unwrap();
        let own: Vec<_> = steps.iter().filter(|s| s.device == device.id).collect();
        if device.group.is_some() {
            assert_eq!(finished.ending.outcome, Outcome::Succeeded, "{finished:?}");
            assert!(
                own.iter().all(|s| s.tls_unverified),
                "{}: a step event hides that certificates were not checked",
                device.id
            );
        } else {
            assert_eq!(finished.ending.outcome, Outcome::Failed, "{finished:?}");
            assert_eq!(finished.ending.error_class, Some(ErrorClass::Transient));
            let error = finished.ending.error.as_deref().unwrap();
            assert!(error.contains("certificate"), "{error}");
            assert!(own.iter().all(|s| !s.tls_unverified));
            let gateway = fleet.get::<flowgateway::FlowGateway>(&device.id).unwrap();
            assert_eq!(gateway.backups_started(), 0);
        }
    }
    harness.teardown().await;
}
