//! Whole campaigns of TR-069 CPEs through a real broker and real HTTP to the
//! simulated DMS.

use flotilla_common::DeviceKind;
use flotilla_common::{ErrorClass, Outcome};
use flotilla_sim::dms;
use flotilla_sim::{Fleet, FleetSpec, dms::DOWNLOAD_FAILURE, faults::FaultSpec};
use flotilla_tests::{Harness, fleet_credentials};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_cpes_each_end_with_exactly_one_outcome() {
    let harness = Harness::new("thousand").await;
    let fleet = Fleet::start(
        FleetSpec {
            cpes_per_dms: 250,
            faults: FaultSpec {
                failure_ratio: 0.05,
                silent_ratio: 0.0,
                transient_ratio: 0.03,
                only_first: None,
            },
            request_latency: Duration::ZERO..=Duration::from_millis(3),
            upgrade_time: Duration::from_millis(200)..=Duration::from_millis(1200),
            seed: 42,
            ..FleetSpec::default()
        }
        .with(DeviceKind::Dms, 1000),
    )
    .await
    .unwrap();
    let workers = [
        harness.start_worker("w1", fleet_credentials(&fleet)),
        harness.start_worker("w2", fleet_credentials(&fleet)),
    ];
    let campaign = harness.campaign("thousand");
    let controller = harness.start_campaign(&campaign, fleet.devices());
    let state = tokio::time::timeout(Duration::from_secs(240), controller.finished())
        .await
        .expect("the campaign completes");
    assert_eq!(state.finished(), 1000);
    for worker in workers {
        worker.stop().await;
    }
    assert_eq!(
        harness.circulating_jobs().await,
        0,
        "jobs still circulating"
    );
    assert_eq!(harness.ready_messages(&harness.topology.dead()).await, 0);

    let events = harness.all_events(&campaign.id).await;
    assert_eq!(events.published(), 1000);
    assert_eq!(events.finished(), 1000);
    assert!(
        events.repeated_outcomes().is_empty(),
        "devices with more than one outcome: {:?}",
        events.repeated_outcomes()
    );
    let mut failed = 0;
    for device in fleet.devices() {
        let finished = events.outcome_of(&device.id).unwrap();
        assert_eq!(
            Some(finished.ending.outcome),
            fleet.expected_outcome(&device.id),
            "{}: {finished:?}",
            device.id
        );
        match finished.ending.outcome {
            Outcome::Failed => {
                failed += 1;
                assert_eq!(finished.ending.error_class, Some(ErrorClass::Device));
                assert_eq!(finished.ending.error.as_deref(), Some(DOWNLOAD_FAILURE));
                assert_eq!(fleet.upgrades_of(&device.id), 0);
            }
            _ => assert_eq!(fleet.upgrades_of(&device.id), 1, "{}", device.id),
        }
        assert_eq!(finished.last_step, "deactivate_rule");
    }
    assert_eq!(failed, 50);
    assert_eq!(fleet.enabled_rules(), Vec::<String>::new());
    harness.teardown().await;
}

#[tokio::test]
async fn cpes_that_never_report_time_out_and_their_rules_are_deactivated() {
    let harness = Harness::new("silent").await;
    let fleet = Fleet::start(
        FleetSpec {
            faults: FaultSpec {
                failure_ratio: 0.0,
                silent_ratio: 0.5,
                transient_ratio: 0.0,
                only_first: None,
            },
            upgrade_time: Duration::from_millis(100)..=Duration::from_millis(300),
            ..FleetSpec::default()
        }
        .with(DeviceKind::Dms, 20),
    )
    .await
    .unwrap();
    let worker = harness.start_worker("w1", fleet_credentials(&fleet));
    let mut campaign = harness.campaign("silent");
    campaign.policy.deadline = Duration::from_secs(3);
    let controller = harness.start_campaign(&campaign, fleet.devices());

    let events = harness
        .wait_finished(&campaign.id, 20, Duration::from_secs(60))
        .await;
    controller.finished().await;
    worker.stop().await;
    let mut timed_out = 0;
    for device in fleet.devices() {
        let finished = events.outcome_of(&device.id).unwrap();
        assert_eq!(
            Some(finished.ending.outcome),
            fleet.expected_outcome(&device.id)
        );
        if finished.ending.outcome == Outcome::TimedOut {
            timed_out += 1;
            let error = finished.ending.error.as_deref().unwrap();
            assert!(error.contains("deadline of 3s"), "{error}");
            // The cleanup ran after the deadline.
            assert_eq!(finished.last_step, "deactivate_rule");
        }
    }
    assert_eq!(timed_out, 10);
    assert_eq!(fleet.enabled_rules(), Vec::<String>::new());
    harness.teardown().await;
}

#[tokio::test]
async fn a_job_delivered_twice_never_upgrades_a_cpe_twice() {
    let harness = Harness::new("twice").await;
    let fleet = Fleet::start(
        FleetSpec {
            upgrade_time: Duration::from_millis(300)..=Duration::from_millis(600),
            ..FleetSpec::default()
        }
        .with(DeviceKind::Dms, 30),
    )
    .await
    .unwrap();
    let worker = harness.start_worker("w1", fleet_credentials(&fleet));
    // Two copies of every job at once, as after a redelivery: both run every
    // step against the same CPE.
    let campaign = harness.campaign("twice");
    harness.publish(&campaign, fleet.devices()).await;
    harness.publish(&campaign, fleet.devices()).await;
    let events = harness
        .wait_finished(&campaign.id, 30, Duration::from_secs(60))
        .await;
    // And a third copy once the upgrades are over: it must find the result
    // instead of arming the rule again.
    harness.publish(&campaign, fleet.devices()).await;
    harness.all_events(&campaign.id).await;
    worker.stop().await;

    let events_after = harness.all_events(&campaign.id).await;
    assert_eq!(events.finished(), 30);
    assert_eq!(events_after.repeated_outcomes().len(), 60);
    for device in fleet.devices() {
        assert_eq!(
            fleet.upgrades_of(&device.id),
            1,
            "{} upgraded twice",
            device.id
        );
        let cpe = fleet.get::<dms::Cpe>(&device.id).unwrap();
        assert_eq!(cpe.dms().upgrades_of(cpe.id()), 1);
    }
    assert!(
        events_after
            .repeated_outcomes()
            .iter()
            .all(|f| f.ending.outcome == Outcome::Succeeded)
    );
    assert_eq!(fleet.enabled_rules(), Vec::<String>::new());
    harness.teardown().await;
}
