//! What a worker refuses to be made to do, and work that must neither stick
//! nor fork: bounded device answers, redirects, failed hand-offs, poison
//! loops, parked deadlines, and a step redelivered after its hand-off.

use flotilla_common::{DeviceKind, ErrorClass, Outcome, control::Command};
use flotilla_producer::send_command;
use flotilla_sim::{Fleet, FleetSpec, Quirks};
use flotilla_tests::{Harness, fleet_credentials};
use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

fn cpes(count: usize, quirks: Quirks) -> FleetSpec {
    FleetSpec {
        cpes_per_dms: 100,
        quirks,
        ..FleetSpec::default()
    }
    .with(DeviceKind::Dms, count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_longer_than_the_cap_fails_its_job_and_a_larger_cap_reads_it() {
    let harness = Harness::new("answercap").await;
    // Every answer is 2 MiB of valid JSON (its body, then whitespace).
    let fleet = Fleet::start(cpes(
        1,
        Quirks {
            answer_padding: 2 << 20,
            ..Quirks::default()
        },
    ))
    .await
    .unwrap();
    let device = fleet.devices()[0].id.clone();

    let worker = harness.start_worker("capped", fleet_credentials(&fleet));
    let capped = harness.campaign("capped");
    harness.publish(&capped, fleet.devices()).await;
    let state = harness
        .wait_finished(&capped.id, 1, Duration::from_secs(30))
        .await;
    worker.stop().await;
    let ending = &state.outcome_of(&device).unwrap().ending;
    assert_eq!(ending.outcome, Outcome::Failed);
    assert_eq!(ending.error_class, Some(ErrorClass::Protocol));
    let error = ending.error.as_deref().unwrap();
    assert!(
        error.contains("1048576 bytes") && error.contains("FLOTILLA_MAX_ANSWER_SIZE"),
        "{error}"
    );

    // The same answers under a cap they fit in: the CPE upgrades.
    let mut config = harness.worker_config("roomy");
    config.max_answer_size = 8 << 20;
    let worker = harness.start_worker_with(config, fleet_credentials(&fleet));
    let roomy = harness.campaign("roomy");
    harness.publish(&roomy, fleet.devices()).await;
    let state = harness
        .wait_finished(&roomy.id, 1, Duration::from_secs(60))
        .await;
    worker.stop().await;
    let ending = &state.outcome_of(&device).unwrap().ending;
    assert_eq!(ending.outcome, Outcome::Succeeded, "{ending:?}");
    harness.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_is_not_followed_and_names_where_it_pointed() {
    let harness = Harness::new("redirect").await;
    // Where the device points: it must never be called.
    let elsewhere = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let location = format!("http://{}/collect", elsewhere.local_addr().unwrap());
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = connections.clone();
    let listener = tokio::spawn(async move {
        while elsewhere.accept().await.is_ok() {
            counted.fetch_add(1, Ordering::SeqCst);
        }
    });
    let fleet = Fleet::start(cpes(
        1,
        Quirks {
            redirect_to: Some(location.clone()),
            ..Quirks::default()
        },
    ))
    .await
    .unwrap();
    let device = fleet.devices()[0].id.clone();

    let worker = harness.start_worker("w1", fleet_credentials(&fleet));
    let campaign = harness.campaign("redirect");
    harness.publish(&campaign, fleet.devices()).await;
    let state = harness
        .wait_finished(&campaign.id, 1, Duration::from_secs(30))
        .await;
    worker.stop().await;
    let ending = &state.outcome_of(&device).unwrap().ending;
    assert_eq!(ending.outcome, Outcome::Failed);
    assert_eq!(ending.error_class, Some(ErrorClass::Config));
    let error = ending.error.as_deref().unwrap();
    assert!(
        error.contains("307") && error.contains(&location),
        "{error}"
    );
    assert_eq!(
        connections.load(Ordering::SeqCst),
        0,
        "the redirect was followed"
    );
    listener.abort();
    harness.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_paused_does_not_count_against_the_deadline() {
    let harness = Harness::new("parkdeadline").await;
    let fleet = Fleet::start(FleetSpec {
        upgrade_time: Duration::from_millis(1000)..=Duration::from_millis(1500),
        ..cpes(10, Quirks::default())
    })
    .await
    .unwrap();
    let worker = harness.start_worker("w1", fleet_credentials(&fleet));
    let mut campaign = harness.campaign("parkdeadline");
    campaign.policy.deadline = Duration::from_secs(5);
    harness.publish(&campaign, fleet.devices()).await;
    // Every job under way (its deadline set by its first step), then a
    // pause longer than the whole deadline.
    harness
        .wait_until(
            &campaign.id,
            Duration::from_secs(30),
            "every device's first step",
            |s| s.devices().filter(|(_, d)| d.steps > 0).count() == 10,
        )
        .await;
    let command = |command| {
        send_command(
            &harness.broker,
            &harness.topology,
            &campaign.id,
            command,
            None,
        )
    };
    command(Command::Pause).await.unwrap();
    tokio::time::sleep(Duration::from_secs(7)).await;
    command(Command::Resume).await.unwrap();

    let state = harness
        .wait_finished(&campaign.id, 10, Duration::from_secs(60))
        .await;
    worker.stop().await;
    for device in fleet.devices() {
        let ending = &state.outcome_of(&device.id).unwrap().ending;
        assert_eq!(
            ending.outcome,
            Outcome::Succeeded,
            "{}: {ending:?}",
            device.id
        );
    }
    harness.teardown().await;
}
