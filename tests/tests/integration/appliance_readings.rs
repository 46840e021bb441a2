//! Drivers against simulated appliances that read the device documents the
//! other way where the documents leave room (`flotilla_sim::Quirks`): an
//! asynchronous NetProfiler start, a staged ISO of another version, DMS
//! results with UUID ids and no interim record answered whatever the
//! query, a 409 for an existing rule, NPM appliances that take only Basic,
//! appliance clocks minutes off, devices that send no `Date` header,
//! clocks that NTP steps mid-job, an SPS that does not restart by itself,
//! uploads slower than a request's limit. The default readings are the
//! other integration tests'.

use chrono::Duration as Span;
use flotilla_common::{DeviceKind, ErrorClass, Outcome, Publisher, control::Command};
use flotilla_sim::{
    Fleet, FleetSpec, GatewayFault, NpmFault, Quirks, SpsFault, dms, flowgateway,
    netprofiler::Netprofiler, npm::Npm, sps::Sps,
};
use flotilla_tests::{Harness, eventually, fleet_credentials};
use serde_json::json;
use std::time::Duration;

fn quirks(quirks: Quirks) -> FleetSpec {
    FleetSpec {
        quirks,
        ..FleetSpec::default()
    }
}

fn error_of(events: &flotilla_producer::CampaignState, device: &str) -> String {
    let finished = events.outcome_of(device).unwrap();
    finished.ending.error.clone().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_netprofiler_staged_with_another_version_fails_naming_both_and_updates_no_gateway() {
    let harness = Harness::new("np-staged").await;
    let fleet = Fleet::start(
        quirks(Quirks {
            netprofiler_staged: Some("7.3.0".into()),
            ..Quirks::default()
        })
        .with(DeviceKind::Netprofiler, 3),
    )
    .await
    .unwrap();
    let worker = harness.start_worker("w1", fleet_credentials(&fleet));
    let campaign = harness.campaign("np-staged");
    harness.publish(&campaign, fleet.devices()).await;
    let events = harness
        .wait_finished(&campaign.id, 3, Duration::from_secs(60))
        .await;
    worker.stop().await;
    for device in fleet.devices() {
        let finished = events.outcome_of(&device.id).unwrap();
        fleet
            .expectation(&device.id)
            .unwrap()
            .check(&finished.ending)
            .unwrap_or_else(|e| panic!("{}: {e}", device.id));
        fleet
            .check_detail(&device.id, &finished.ending)
            .unwrap_or_else(|e| panic!("{}: {e}", device.id));
        let error = error_of(&events, &device.id);
        assert!(
            error.contains("7.3.0") && error.contains("7.2.1"),
            "{error}"
        );
        assert_eq!(finished.ending.error_class, Some(ErrorClass::Device));
        let np = fleet.get::<Netprofiler>(&device.id).unwrap();
        for gateway in np.gateways() {
            assert_eq!(gateway.updates_started(), 0, "{} started", gateway.ip());
            assert_eq!(gateway.version(), flowgateway::PREVIOUS_VERSION);
        }
        let detail = &finished.ending.detail.as_ref().unwrap()["gateways"];
        assert!(
            detail
                .as_array()
                .unwrap()
                .iter()
                .all(|g| g["outcome"] == "not_started"),
            "{detail}"
        );
    }
    harness.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netprofiler_start_is_asynchronous_and_status_answers_may_carry_more_than_gateways() {
    let harness = Harness::new("np-async").await;
    let fleet = Fleet::start(
        FleetSpec {
            upgrade_time: Duration::from_millis(300)..=Duration::from_millis(800),
            // Each gateway begins up to 1.5 s after the start: several
            // polls see it still `initialized`.
            operation_time: Duration::from_millis(800)..=Duration::from_millis(1500),
            ..quirks(Quirks {
                netprofiler_async_start: true,
                netprofiler_extra_fields: true,
                ..Quirks::default()
            })
        }
        .with(DeviceKind::Netprofiler, 4)
        .with_faults(
            DeviceKind::Netprofiler,
            [GatewayFault::FailGraceful, GatewayFault::StartFails],
        ),
    )
    .await
    .unwrap();
    let worker = harness.start_worker("w1", fleet_credentials(&fleet));
    let mut campaign = harness.campaign("np-async");
    campaign.policy.deadline = Duration::from_secs(40);
    harness.publish(&campaign, fleet.devices()).await;
    let events = harness
        .wait_finished(&campaign.id, 4, Duration::from_secs(90))
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
        fleet
            .check_detail(&device.id, &finished.ending)
            .unwrap_or_else(|e| panic!("{}: {e}", device.id));
    }
    // A healthy NetProfiler's gateways were seen `initialized` after the
    // start, and waited for.
    let waited = steps.iter().any(|s| {
        s.step == "await_update" && s.note.as_deref().is_some_and(|n| n.contains("initialized"))
    });
    assert!(waited, "no poll saw a gateway that had not begun yet");
    harness.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_already_on_the_target_succeed_and_the_others_are_updated_once() {
    let harness = Harness::new("np-retry").await;
    let fleet = Fleet::start(FleetSpec::default().with(DeviceKind::Netprofiler, 2))
        .await
        .unwrap();
    let (release, _) = fleet.release();
    // A retry campaign after a partial failure: one gateway of the first
    // NetProfiler, every gateway of the second, already run the target.
    let first = fleet.get::<Netprofiler>("np-0001").unwrap();
    first.gateways()[0].preinstall(release);
    for gateway in fleet.get::<Netprofiler>("np-0002").unwrap().gateways() {
        gateway.preinstall(release);
    }
    let worker = harness.start_worker("w1", fleet_credentials(&fleet));
    let campaign = harness.campaign("np-retry");
    harness.publish(&campaign, fleet.devices()).await;
    let events = harness
        .wait_finished(&campaign.id, 2, Duration::from_secs(60))
        .await;
    worker.stop().await;
    for device in fleet.devices() {
        let finished = events.outcome_of(&device.id).unwrap();
        assert_eq!(finished.ending.outcome, Outcome::Succeeded, "{finished:?}");
        let detail = &finished.ending.detail.as_ref().unwrap()["gateways"];
        assert!(
            detail
                .as_array()
                .unwrap()
                .iter()
                .all(|g| g["outcome"] == "succeeded"),
            "{detail}"
        );
    }
    let gateways = first.gateways();
    assert_eq!(
        gateways[0].updates_started(),
        0,
        "the updated one was left alone"
    );
    for gateway in &gateways[1..] {
        assert_eq!(gateway.updates_started(), 1);
        assert_eq!(gateway.version(), release);
    }
    for gateway in fleet.get::<Netprofiler>("np-0002").unwrap().gateways() {
        assert_eq!(gateway.updates_started(), 0);
    }
    harness.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_npm_appliance_reset_seconds_before_its_job_upgrades_normally() {
    let harness = Harness::new("npm-reset").await;
    let fleet = Fleet::start(FleetSpec::default().with(DeviceKind::Npm, 3))
        .await
        .unwrap();
    for device in fleet.devices() {
        fleet
            .get::<Npm>(&device.id)
            .unwrap()
            .was_reset(Duration::from_secs(5));
    }
    let worker = harness.start_worker("w1", fleet_credentials(&fleet));
    let campaign = harness.campaign("npm-reset");
    harness.publish(&campaign, fleet.devices()).await;
    let events = harness
        .wait_finished(&campaign.id, 3, Duration::from_secs(60))
        .await;
    worker.stop().await;
    for device in fleet.devices() {
        let finished = events.outcome_of(&device.id).unwrap();
        assert_eq!(finished.ending.outcome, Outcome::Succeeded, "{finished:?}");
        let appliance = fleet.get::<Npm>(&device.id).unwrap();
        assert_eq!(appliance.updates_started(), 1);
        assert_eq!(appliance.version(), "7.2.1");
    }
    harness.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn npm_logins_follow_the_auth_setting_and_a_missing_one_names_it() {
    let harness = Harness::new("npm-auth").await;
    let basic_only = Fleet::start(
        quirks(Quirks {
            npm_basic_only: true,
            ..Quirks::default()
        })
        .with(DeviceKind::Npm, 2),
    )
    .await
    .unwrap();
    let tokens_only = Fleet::start(FleetSpec::default().with(DeviceKind::Npm, 1))
        .await
        .unwrap();
    let worker = harness.start_worker("w1", fleet_credentials(&basic_only));
    let (token_device, basic_device) = basic_only.devices().split_at(1);
    // The default (tokens) against a Basic-only appliance: its error says
    // which setting to change.
    let by_token = harness.campaign("npm-auth-token");
    harness.publish(&by_token, token_device).await;
    let mut by_basic = harness.campaign("npm-auth-basic");
    by_basic
        .drivers
        .insert(DeviceKind::Npm, json!({ "auth": "basic" }));
    harness.publish(&by_basic, basic_device).await;
    harness.publish(&by_basic, tokens_only.devices()).await;

    let token_events = harness
        .wait_finished(&by_token.id, 1, Duration::from_secs(60))
        .await;
    let basic_events = harness
        .wait_finished(&by_basic.id, 2, Duration::from_secs(60))
        .await;
    worker.stop().await;

    let refused = token_events.outcome_of(&token_device[0].id).unwrap();
    assert_eq!(refused.ending.outcome, Outcome::Failed);
    assert_eq!(refused.ending.error_class, Some(ErrorClass::Config));
    let error = refused.ending.error.as_deref().unwrap();
    assert!(error.contains("[drivers.npm] auth = \"basic\""), "{error}");
    let upgraded = basic_events.outcome_of(&basic_device[0].id).unwrap();
    assert_eq!(upgraded.ending.outcome, Outcome::Succeeded, "{upgraded:?}");
    let appliance = basic_only.get::<Npm>(&basic_device[0].id).unwrap();
    assert_eq!(appliance.version(), "7.2.1");
    assert_eq!(appliance.tokens_issued(), 0);
    // Basic against an appliance that only issues tokens: refused, naming
    // the setting too.
    let wrong = basic_events
        .outcome_of(&tokens_only.devices()[0].id)
        .unwrap();
    assert_eq!(wrong.ending.error_class, Some(ErrorClass::Auth));
    assert!(
        wrong
            .ending
            .error
            .as_deref()
            .unwrap()
            .contains("[drivers.npm] auth"),
        "{wrong:?}"
    );
    harness.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn npm_checks_the_target_at_initialized_and_resets_an_update_it_initialized() {
    let harness = Harness::new("npm-target").await;
    // Images that do not say their version, and an update that would
    // install another: caught at INITIALIZED, before the start.
    let staged = Fleet::start(
        quirks(Quirks {
            npm_staged: Some("7.3.0".into()),
            ..Quirks::default()
        })
        .with(DeviceKind::Npm, 1),
    )
    .await
    .unwrap();
    // An initialization that never ends: on the deadline and on a cancel,
    // the update this job initialized is reset.
    let stuck = Fleet::start(
        FleetSpec::default()
            .with(DeviceKind::Npm, 2)
            .with_faults(DeviceKind::Npm, [NpmFault::InitStuck, NpmFault::InitStuck]),
    )
    .await
    .unwrap();
    let worker = harness.start_worker("w1", fleet_credentials(&staged));
    let target = harness.campaign("npm-target");
    harness.publish(&target, staged.devices()).await;
    let mut deadline = harness.campaign("npm-init-deadline");
    deadline.policy.deadline = Duration::from_secs(4);
    harness.publish(&deadline, &stuck.devices()[..1]).await;
    let cancelled = harness.campaign("npm-init-cancel");
    harness.publish(&cancelled, &stuck.devices()[1..]).await;
    let cancel_device = &stuck.devices()[1];
    eventually(
        Duration::from_secs(30),
        "the update initializing",
        || async { stuck.get::<Npm>(&cancel_device.id).unwrap().update_state() == "INITIALIZING" },
    )
    .await;
    harness.command(&cancelled.id, Command::Cancel).await;

    let target_events = harness
        .wait_finished(&target.id, 1, Duration::from_secs(60))
        .await;
    let deadline_events = harness
        .wait_finished(&deadline.id, 1, Duration::from_secs(60))
        .await;
    let cancel_events = harness
        .wait_finished(&cancelled.id, 1, Duration::from_secs(60))
        .await;
    worker.stop().await;

    let id = &staged.devices()[0].id;
    let error = error_of(&target_events, id);
    assert!(
        error.contains("7.3.0") && error.contains("7.2.1"),
        "{error}"
    );
    let appliance = staged.get::<Npm>(id).unwrap();
    assert_eq!(appliance.updates_started(), 0);
    assert_eq!(
        appliance.update_state(),
        "IDLE",
        "the initialized update was reset"
    );
    for (events, device, outcome) in [
        (&deadline_events, &stuck.devices()[0], Outcome::TimedOut),
        (&cancel_events, cancel_device, Outcome::Cancelled),
    ] {
        let finished = events.outcome_of(&device.id).unwrap();
        assert_eq!(finished.ending.outcome, outcome, "{finished:?}");
        let appliance = stuck.get::<Npm>(&device.id).unwrap();
        assert_eq!(appliance.update_state(), "IDLE", "{}: not reset", device.id);
        assert_eq!(appliance.updates_started(), 0);
    }
    harness.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn npm_follows_an_image_still_arriving_and_ignores_an_earlier_failed_one() {
    let harness = Harness::new("npm-images").await;
    let fleet = Fleet::start(
        FleetSpec {
            // Uploading, then validating, this long each.
            operation_time: Duration::from_millis(1500)..=Duration::from_millis(2000),
            ..FleetSpec::default()
        }
        .with(DeviceKind::Npm, 3),
    )
    .await
    .unwrap();
    let (arriving, failed_before) = fleet.devices().split_at(2);
    for device in failed_before {
        fleet.get::<Npm>(&device.id).unwrap().leave_failed_image();
    }
    let worker = harness.start_worker("w1", fleet_credentials(&fleet));
    let campaign = harness.campaign("npm-images");
    harness.publish(&campaign, fleet.devices()).await;
    // A copy of the first step (a retry, a redelivery) while the image
    // fetched by the first is still arriving: it follows that image.
    eventually(Duration::from_secs(20), "images arriving", || async {
        arriving
            .iter()
            .all(|d| fleet.get::<Npm>(&d.id).unwrap().fetches() == 1)
    })
    .await;
    harness.publish(&campaign, arriving).await;
    let total = |t: &flotilla_producer::CampaignState| t.finished() + t.repeated_outcomes().len();
    eventually(Duration::from_secs(60), "every copy finished", || async {
        total(&harness.all_events(&campaign.id).await) >= 5
    })
    .await;
    worker.stop().await;
    let events = harness.all_events(&campaign.id).await;
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
    for device in fleet.devices() {
        let appliance = fleet.get::<Npm>(&device.id).unwrap();
        assert_eq!(appliance.fetches(), 1, "{} fetched again", device.id);
        assert_eq!(appliance.updates_started(), 1);
        assert_eq!(appliance.version(), "7.2.1");
    }
    harness.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dms_results_are_matched_by_cpe_and_rule_with_uuid_records_and_no_interim_result() {
    let harness = Harness::new("dms-uuid").await;
    let fleet = Fleet::start(
        FleetSpec {
            faults: flotilla_sim::faults::FaultSpec {
                failure_ratio: 0.25,
                ..flotilla_sim::faults::FaultSpec::NONE
            },
            cpes_per_dms: 8,
            ..quirks(Quirks {
                dms_no_interim_result: true,
                dms_unfiltered_results: true,
                ..Quirks::default()
            })
        }
        .with(DeviceKind::Dms, 16),
    )
    .await
    .unwrap();
    let worker = harness.start_worker("w1", fleet_credentials(&fleet));
    let campaign = harness.campaign("dms-uuid");
    harness.publish(&campaign, fleet.devices()).await;
    let events = harness
        .wait_finished(&campaign.id, 16, Duration::from_secs(60))
        .await;
    worker.stop().await;
    let mut failed = 0;
    for device in fleet.devices() {
        let finished = events.outcome_of(&device.id).unwrap();
        fleet
            .expectation(&device.id)
            .unwrap()
            .check(&finished.ending)
            .unwrap_or_else(|e| panic!("{}: {e}", device.id));
        if finished.ending.outcome == Outcome::Failed {
            failed += 1;
            assert_eq!(fleet.upgrades_of(&device.id), 0);
        } else {
            assert_eq!(fleet.upgrades_of(&device.id), 1, "{}", device.id);
        }
    }
    assert_eq!(failed, 4, "another CPE's result was taken for one's own");
    assert_eq!(fleet.enabled_rules(), Vec::<String>::new());
    harness.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_dms_rule_is_updated_to_this_campaigns_file_and_an_unknown_cpe_fails() {
    let harness = Harness::new("dms-rules").await;
    let mut devices = Vec::new();
    let mut fleets = Vec::new();
    for conflict in [true, false] {
        let fleet = Fleet::start(
            quirks(Quirks {
                dms_conflict_on_existing_rule: conflict,
                ..Quirks::default()
            })
            .with(DeviceKind::Dms, 2),
        )
        .await
        .unwrap();
        for device in fleet.devices() {
            // An earlier campaign's rule, for another file, spent.
            let cpe = fleet.get::<dms::Cpe>(&device.id).unwrap();
            cpe.leave_rule("http://files.example.net/cpe/7.1.0.bin");
            // Both fleets number their CPEs alike: one campaign needs
            // them apart.
            let mut row = device.clone();
            row.id = format!("{}-{}", device.id, if conflict { "409" } else { "204" });
            devices.push(row);
        }
        fleets.push(fleet);
    }
    // A CPE its DMS does not know: the rule's creation answers code 404.
    let mut unknown = devices[0].clone();
    unknown.id = "cpe-unknown".into();
    unknown.cpe_id = Some("00D09E-999999".into());
    devices.push(unknown);
    let worker = harness.start_worker("w1", fleet_credentials(&fleets[0]));
    let campaign = harness.campaign("dms-rules");
    harness.publish(&campaign, &devices).await;
    let events = harness
        .wait_finished(&campaign.id, 5, Duration::from_secs(60))
        .await;
    worker.stop().await;
    let steps = harness.step_events(&campaign.id).await;
    for (fleet, suffix) in fleets.iter().zip(["409", "204"]) {
        for device in fleet.devices() {
            let finished = events
                .outcome_of(&format!("{}-{suffix}", device.id))
                .unwrap();
            assert_eq!(finished.ending.outcome, Outcome::Succeeded, "{finished:?}");
            let cpe = fleet.get::<dms::Cpe>(&device.id).unwrap();
            assert_eq!(cpe.firmware(), campaign.target.image_url.as_str());
            assert_eq!(fleet.upgrades_of(&device.id), 1);
        }
        assert_eq!(fleet.enabled_rules(), Vec::<String>::new());
    }
    let unknown = events.outcome_of("cpe-unknown").unwrap();
    assert_eq!(unknown.ending.outcome, Outcome::Failed);
    assert_eq!(unknown.ending.error_class, Some(ErrorClass::Device));
    let create = steps
        .iter()
        .find(|s| s.device == "cpe-unknown" && s.step == "create_rule")
        .unwrap();
    let error = create.error.as_deref().unwrap_or_default();
    assert!(error.contains("code 404"), "{create:?}");
    harness.teardown().await;
}

/// Publishes a copy of each device's first step, as the broker would
/// redeliver it `late` after the job was published: the job's stamp and
/// everything the devices recorded since are moved `late` into the past,
/// so that no test waits minutes.
async fn redeliver_first_steps_late(
    harness: &Harness,
    campaign: &flotilla_producer::Campaign,
    devices: &[flotilla_common::Device],
    late: Duration,
) {
    let connection = harness.broker.connection().await.unwrap();
    let publisher = Publisher::open(&connection).await.unwrap();
    for device in devices {
        let mut job = harness.job(campaign, device);
        job.settings = campaign.settings_for(device.kind);
        job.published_at = job
            .published_at
            .map(|at| at - Span::from_std(late).unwrap());
        let body = serde_json::to_vec(&job).unwrap();
        publisher
            .publish(&harness.topology.jobs(), &body, harness.job_message(&body))
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_step_redelivered_two_minutes_late_neither_rearms_a_rule_nor_starts_a_second_backup()
 {
    let harness = Harness::new("late").await;
    let fleet = Fleet::start(
        FleetSpec::default()
            .with(DeviceKind::Dms, 4)
            .with(DeviceKind::Flowgateway, 3),
    )
    .await
    .unwrap();
    let worker = harness.start_worker("w1", fleet_credentials(&fleet));
    let campaign = harness.campaign("late");
    harness.publish(&campaign, fleet.devices()).await;
    harness
        .wait_finished(&campaign.id, 7, Duration::from_secs(60))
        .await;
    // Two minutes pass: what the devices recorded is two minutes old when
    // the first steps come again.
    let late = Duration::from_secs(120);
    for device in fleet.devices() {
        if let Some(cpe) = fleet.get::<dms::Cpe>(&device.id) {
            cpe.age(late.as_secs() as i64);
        }
        if let Some(gateway) = fleet.get::<flowgateway::FlowGateway>(&device.id) {
            gateway.age(late.as_secs() as i64);
        }
    }
    redeliver_first_steps_late(&harness, &campaign, fleet.devices(), late).await;
    let total = |t: &flotilla_producer::CampaignState| t.finished() + t.repeated_outcomes().len();
    eventually(
        Duration::from_secs(60),
        "the late copies finished",
        || async { total(&harness.all_events(&campaign.id).await) >= 14 },
    )
    .await;
    worker.stop().await;
    let events = harness.all_events(&campaign.id).await;
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
    for device in fleet.devices() {
        assert_eq!(
            fleet.upgrades_of(&device.id),
            1,
            "{}: the late copy acted again",
            device.id
        );
    }
    assert_eq!(fleet.enabled_rules(), Vec::<String>::new());
    let steps = harness.step_events(&campaign.id).await;
    let armed = steps
        .iter()
        .filter(|s| s.step == "send_connection_request" && s.error.is_none())
        .count();
    assert_eq!(armed, 4, "a connection request per CPE, not per copy");
    harness.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appliance_clocks_ten_minutes_fast_or_slow_change_no_outcome() {
    let harness = Harness::new("clocks").await;
    for (offset, name) in [(600, "clocks-fast"), (-600, "clocks-slow")] {
        let fleet = Fleet::start(
            FleetSpec {
                // Short tokens: their end is stamped on the skewed clock.
                token_lifetime: Duration::from_secs(20),
                ..quirks(Quirks {
                    clock_offset: offset,
                    ..Quirks::default()
                })
            }
            .with(DeviceKind::Dms, 3)
            .with(DeviceKind::Netprofiler, 2)
            .with(DeviceKind::Flowgateway, 2)
            .with(DeviceKind::Npm, 3)
            .with(DeviceKind::Sps, 2)
            .with_faults(DeviceKind::Netprofiler, [GatewayFault::FailGraceful])
            .with_faults(DeviceKind::Flowgateway, [GatewayFault::RunError])
            .with_faults(DeviceKind::Npm, [NpmFault::FailGraceful])
            .with_faults(DeviceKind::Sps, [SpsFault::FetchFailed]),
        )
        .await
        .unwrap();
        // A previous update of every NPM appliance, a minute before this
        // job on their own clock: not this job's.
        for device in fleet.devices() {
            if let Some(npm) = fleet.get::<Npm>(&device.id) {
                npm.was_reset(Duration::from_secs(60));
            }
        }
        let worker = harness.start_worker(name, fleet_credentials(&fleet));
        let mut campaign = harness.campaign(name);
        campaign.policy.deadline = Duration::from_secs(40);
        harness.publish(&campaign, fleet.devices()).await;
        let n = fleet.devices().len();
        let events = harness
            .wait_finished(&campaign.id, n, Duration::from_secs(90))
            .await;
        worker.stop().await;
        for device in fleet.devices() {
            let finished = events.outcome_of(&device.id).unwrap();
            fleet
                .expectation(&device.id)
                .unwrap()
                .check(&finished.ending)
                .unwrap_or_else(|e| panic!("{name} {}: {e}", device.id));
            fleet
                .check_detail(&device.id, &finished.ending)
                .unwrap_or_else(|e| panic!("{name} {}: {e}", device.id));
            assert!(fleet.upgrades_of(&device.id) <= 1, "{name} {}", device.id);
        }
        assert_eq!(fleet.enabled_rules(), Vec::<String>::new(), "{name}");
    }
    harness.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sps_confirms_the_slot_is_selected_and_reports_a_restart_that_never_comes() {
    let harness = Harness::new("sps-restart").await;
    let no_restart = Fleet::start(
        quirks(Quirks {
            sps_no_self_restart: true,
            ..Quirks::default()
        })
        .with(DeviceKind::Sps, 1),
    )
    .await
    .unwrap();
    let not_selected = Fleet::start(
        quirks(Quirks {
            sps_upgrade_not_selected: true,
            ..Quirks::default()
        })
        .with(DeviceKind::Sps, 1),
    )
    .await
    .unwrap();
    let worker = harness.start_worker("w1", fleet_credentials(&no_restart));
    let mut campaign = harness.campaign("sps-restart");
    campaign
        .drivers
        .insert(DeviceKind::Sps, json!({ "restart_wait": "3s" }));
    let mut devices = no_restart.devices().to_vec();
    let mut other = not_selected.devices()[0].clone();
    other.id = "sps-not-selected".into();
    devices.push(other);
    harness.publish(&campaign, &devices).await;
    let events = harness
        .wait_finished(&campaign.id, 2, Duration::from_secs(60))
        .await;
    worker.stop().await;

    let pending = events.outcome_of("sps-0001").unwrap();
    assert_eq!(pending.ending.outcome, Outcome::Failed, "{pending:?}");
    assert!(pending.ending.needs_attention);
    let error = pending.ending.error.as_deref().unwrap();
    assert!(error.contains("upgrade staged, restart pending"), "{error}");
    assert!(!error.contains("deadline"), "{error}");
    let appliance = no_restart.get::<Sps>("sps-0001").unwrap();
    assert_eq!(appliance.upgrades(), 1);
    assert_eq!(appliance.version(), flotilla_sim::sps::PREVIOUS_VERSION);

    let unselected = events.outcome_of("sps-not-selected").unwrap();
    assert_eq!(unselected.ending.outcome, Outcome::Failed, "{unselected:?}");
    let error = unselected.ending.error.as_deref().unwrap();
    assert!(error.contains("after_reboot"), "{error}");
    assert_eq!(not_selected.get::<Sps>("sps-0001").unwrap().upgrades(), 1);
    harness.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_slower_than_a_requests_limit_finish_within_the_step_and_are_sent_once() {
    let harness = Harness::new("slow-upload").await;
    let fleet = Fleet::start(
        quirks(Quirks {
            upload_time: Duration::from_secs(3),
            ..Quirks::default()
        })
        .with(DeviceKind::Npm, 1)
        .with(DeviceKind::Sps, 1),
    )
    .await
    .unwrap();
    // The harness campaign's SHA-256 is that of "test".
    let image = harness.image_dir().join("fw-7.2.1.img");
    std::fs::write(&image, "test").unwrap();
    // Every other call must answer within a second; an upload takes three.
    let mut config = harness.worker_config("w1");
    config.http_timeout = Duration::from_secs(1);
    let worker = harness.start_worker_with(config, fleet_credentials(&fleet));
    let mut campaign = harness.campaign("slow-upload");
    campaign.target.image_url = url::Url::from_file_path(&image).unwrap();
    campaign.policy.step_timeout = Duration::from_secs(15);
    harness.publish(&campaign, fleet.devices()).await;
    let events = harness
        .wait_finished(&campaign.id, 2, Duration::from_secs(60))
        .await;
    worker.stop().await;
    let steps = harness.step_events(&campaign.id).await;
    for device in fleet.devices() {
        let finished = events.outcome_of(&device.id).unwrap();
        assert_eq!(finished.ending.outcome, Outcome::Succeeded, "{finished:?}");
        let retried: Vec<_> = steps
            .iter()
            .filter(|s| s.device == device.id && s.error.is_some())
            .collect();
        assert!(retried.is_empty(), "{}: {retried:?}", device.id);
    }
    assert_eq!(fleet.get::<Npm>("npm-0001").unwrap().uploads(), 1);
    assert_eq!(fleet.get::<Sps>("sps-0001").unwrap().uploads(), 1);
    harness.teardown().await;
}

/// A fleet of every kind, NetProfilers backing up their gateways first,
/// with `spec`'s timings and readings and one failure of each kind.
fn every_kind(spec: FleetSpec) -> FleetSpec {
    FleetSpec {
        backups_first: true,
        ..spec
    }
    .with(DeviceKind::Dms, 3)
    .with(DeviceKind::Netprofiler, 2)
    .with(DeviceKind::Flowgateway, 2)
    .with(DeviceKind::Npm, 3)
    .with(DeviceKind::Sps, 2)
    .with_faults(DeviceKind::Netprofiler, [GatewayFault::FailGraceful])
    .with_faults(DeviceKind::Flowgateway, [GatewayFault::RunError])
    .with_faults(DeviceKind::Npm, [NpmFault::FailGraceful])
    .with_faults(DeviceKind::Sps, [SpsFault::FetchFailed])
}

/// A campaign against [`every_kind`]: NetProfilers back up to a remote
/// host first.
fn every_kind_campaign(harness: &Harness, name: &str) -> flotilla_producer::Campaign {
    let mut campaign = harness.campaign(name);
    campaign.policy.deadline = Duration::from_secs(40);
    campaign.drivers.insert(
        DeviceKind::Netprofiler,
        json!({
            "backup_first": true,
            "backup": { "host": "backup.example.net", "username": "mazu", "path": "/srv/backups" },
        }),
    );
    campaign
}

/// Every device ended as the fleet says it should, and nothing ran twice:
/// one backup per gateway, one update per NPM appliance, one fetch and at
/// most one upgrade per SPS appliance, at most one upgrade per CPE, no rule
/// left enabled.
fn check_every_kind(fleet: &Fleet, events: &flotilla_producer::CampaignState, name: &str) {
    for device in fleet.devices() {
        let finished = events.outcome_of(&device.id).unwrap();
        fleet
            .expectation(&device.id)
            .unwrap()
            .check(&finished.ending)
            .unwrap_or_else(|e| panic!("{name} {}: {e}", device.id));
        fleet
            .check_detail(&device.id, &finished.ending)
            .unwrap_or_else(|e| panic!("{name} {}: {e}", device.id));
        assert!(fleet.upgrades_of(&device.id) <= 1, "{name} {}", device.id);
        if let Some(gateway) = fleet.get::<flowgateway::FlowGateway>(&device.id) {
            assert_eq!(gateway.backups_started(), 1, "{name} {}", device.id);
        }
        if let Some(np) = fleet.get::<Netprofiler>(&device.id) {
            for gateway in np.gateways() {
                assert_eq!(gateway.backups_started(), 1, "{name} {}", gateway.ip());
            }
        }
        if let Some(npm) = fleet.get::<Npm>(&device.id) {
            assert_eq!(npm.updates_started(), 1, "{name} {}", device.id);
        }
        if let Some(sps) = fleet.get::<Sps>(&device.id) {
            assert_eq!(sps.fetches_started(), 1, "{name} {}", device.id);
        }
    }
    assert_eq!(fleet.enabled_rules(), Vec::<String>::new(), "{name}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_without_a_date_header_are_judged_by_their_baseline_alone() {
    let harness = Harness::new("undated").await;
    // Without a `Date` header the device's clock cannot be read; these
    // clocks are ten minutes fast and slow besides, so that nothing taken
    // from the worker's clock could hold.
    let mut runs = Vec::new();
    for (offset, name) in [(600, "undated-fast"), (-600, "undated-slow")] {
        let fleet = Fleet::start(every_kind(quirks(Quirks {
            clock_offset: offset,
            no_date_header: true,
            ..Quirks::default()
        })))
        .await
        .unwrap();
        // A previous update of every NPM appliance, a minute before this
        // job on its own clock: not this job's.
        for device in fleet.devices() {
            if let Some(npm) = fleet.get::<Npm>(&device.id) {
                npm.was_reset(Duration::from_secs(60));
            }
        }
        runs.push((fleet, every_kind_campaign(&harness, name)));
    }
    // Every fleet takes the same credentials.
    let worker = harness.start_worker("w1", fleet_credentials(&runs[0].0));
    for (fleet, campaign) in &runs {
        harness.publish(campaign, fleet.devices()).await;
    }
    for (fleet, campaign) in &runs {
        let n = fleet.devices().len();
        let events = harness
            .wait_finished(&campaign.id, n, Duration::from_secs(90))
            .await;
        check_every_kind(fleet, &events, &campaign.id);
        // Each job recorded its baseline knowing the device sent no Date.
        let steps = harness.step_events(&campaign.id).await;
        for device in fleet.devices() {
            let noted = steps.iter().any(|s| {
                s.device == device.id
                    && s.step == "baseline"
                    && s.note
                        .as_deref()
                        .is_some_and(|n| n.contains("no Date header"))
            });
            assert!(noted, "{}: no baseline without a Date", device.id);
        }
    }
    worker.stop().await;
    harness.teardown().await;
}

/// Whether the job of `device` has acted on it: armed its rule, started
/// its backups or its fetch.
fn has_begun(fleet: &Fleet, device: &str) -> bool {
    if let Some(cpe) = fleet.get::<dms::Cpe>(device) {
        return fleet
            .enabled_rules()
            .contains(&format!("UPGRADE_{}", cpe.id()));
    }
    if let Some(gateway) = fleet.get::<flowgateway::FlowGateway>(device) {
        return gateway.backups_started() > 0;
    }
    if let Some(np) = fleet.get::<Netprofiler>(device) {
        return np.gateways().iter().all(|g| g.backups_started() > 0);
    }
    if let Some(npm) = fleet.get::<Npm>(device) {
        return npm.fetches() > 0;
    }
    fleet
        .get::<Sps>(device)
        .is_some_and(|sps| sps.fetches_started() > 0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_clock_stepped_minutes_mid_job_changes_no_outcome_and_nothing_runs_twice() {
    let harness = Harness::new("ntp-step").await;
    let mut runs = Vec::new();
    for (step, name) in [(-300, "ntp-back"), (300, "ntp-forward")] {
        let fleet = Fleet::start(every_kind(FleetSpec {
            // Long enough that every job is under way when the clocks step.
            operation_time: Duration::from_millis(1500)..=Duration::from_millis(2000),
            upgrade_time: Duration::from_millis(1500)..=Duration::from_millis(2500),
            ..FleetSpec::default()
        }))
        .await
        .unwrap();
        for device in fleet.devices() {
            if let Some(npm) = fleet.get::<Npm>(&device.id) {
                npm.was_reset(Duration::from_secs(60));
            }
        }
        runs.push((fleet, every_kind_campaign(&harness, name), step));
    }
    let worker = harness.start_worker("w1", fleet_credentials(&runs[0].0));
    for (fleet, campaign, _) in &runs {
        harness.publish(campaign, fleet.devices()).await;
    }
    // Once every job has acted on its device, NTP steps every device's
    // clock by five minutes, back on one fleet and forward on the other.
    for (fleet, _, step) in &runs {
        eventually(Duration::from_secs(30), "every job acting", || async {
            fleet.devices().iter().all(|d| has_begun(fleet, &d.id))
        })
        .await;
        fleet.step_clocks(*step);
    }
    for (fleet, campaign, _) in &runs {
        let n = fleet.devices().len();
        let events = harness
            .wait_finished(&campaign.id, n, Duration::from_secs(90))
            .await;
        check_every_kind(fleet, &events, &campaign.id);
    }
    worker.stop().await;
    harness.teardown().await;
}
