//! Dead letters end their device: a job no worker can process finishes
//! `dead_lettered` with its reason, its campaign completes, and operators
//! list and redrive it. A step that panics is returned by republishing,
//! counted by the workers (the path RabbitMQ 4.3, whose `nack` does not
//! count toward the delivery limit, needs), and dead-lettered past
//! FLOTILLA_RETURN_LIMIT.

use flotilla_common::{DeviceKind, JOB_MESSAGE_TYPE, Message, Outcome, Publisher, headers};
use flotilla_producer::state::Phase;
use flotilla_sim::{Fleet, FleetSpec};
use flotilla_tests::{Harness, binary, fleet_credentials};
use lapin::options::{BasicAckOptions, BasicGetOptions};
use std::{process::Output, time::Duration};

fn cpes(count: usize) -> FleetSpec {
    FleetSpec {
        cpes_per_dms: 100,
        ..FleetSpec::default()
    }
    .with(DeviceKind::Dms, count)
}

/// `flotilla-producer` with this test's broker settings.
async fn producer(harness: &Harness, args: &[&str]) -> Output {
    tokio::process::Command::new(binary("flotilla-producer").await)
        .args(args)
        .env("AMQP_URL", &harness.args.amqp_url)
        .envs(harness.key_env())
        .env("FLOTILLA_PREFIX", &harness.args.prefix)
        .env("FLOTILLA_DELAY_TIERS", flotilla_tests::TEST_DELAY_TIERS)
        .kill_on_drop(true)
        .output()
        .await
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_step_is_returned_counted_dead_lettered_listed_and_redriven() {
    let harness = Harness::new("deadpanic").await;
    let fleet = Fleet::start(cpes(3)).await.unwrap();
    let doomed = fleet.devices()[0].id.clone();
    let mut config = harness.worker_config("buggy");
    config.return_limit = 2;
    config.panic_for_device = Some(doomed.clone());
    let buggy = harness.start_worker_with(config, fleet_credentials(&fleet));
    let campaign = harness.campaign("deadpanic");
    let state = harness
        .start_campaign(&campaign, fleet.devices())
        .finished()
        .await;
    buggy.stop().await;

    assert_eq!(state.phase(), Phase::Completed);
    let ending = &state.outcome_of(&doomed).unwrap().ending;
    assert_eq!(ending.outcome, Outcome::DeadLettered);
    let error = ending.error.as_deref().unwrap();
    assert!(
        error.starts_with("return_limit: ") && error.contains("panicked 3 times"),
        "{error}"
    );
    for device in &fleet.devices()[1..] {
        let outcome = state.outcome_of(&device.id).unwrap().ending.outcome;
        assert_eq!(outcome, Outcome::Succeeded, "{}", device.id);
    }
    assert_eq!(fleet.upgrades_of(&doomed), 0);

    // Returned twice by republishing, counted in our header: the broker
    // never redelivered it, so its own count (and limit) played no part.
    let connection = harness.broker.connection().await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let dead = channel
        .basic_get(
            harness.topology.dead().as_str().into(),
            BasicGetOptions { no_ack: false },
        )
        .await
        .unwrap()
        .expect("the job is in the dead-letter queue");
    let table = dead.delivery.properties.headers().as_ref();
    assert_eq!(headers::get_int(table, headers::RETURNS), Some(2));
    assert_eq!(
        headers::get_int(table, headers::DELIVERY_COUNT).unwrap_or(0),
        0
    );
    assert_eq!(
        headers::get_text(table, headers::DEAD_REASON).as_deref(),
        Some("return_limit")
    );
    // Unacked: closing puts it back.
    channel.close(200, "looked".into()).await.unwrap();

    let listed = producer(&harness, &["dead", "list", "--campaign", "deadpanic"]).await;
    assert!(listed.status.success(), "{}", text(&listed.stderr));
    let lines: Vec<String> = text(&listed.stdout).lines().map(String::from).collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with(&format!("deadpanic\t{doomed}\treturn_limit: "))
            && lines[0].ends_with("(returned 2 times)"),
        "{}",
        lines[0]
    );
    let elsewhere = producer(&harness, &["dead", "list", "--campaign", "other"]).await;
    assert_eq!(text(&elsewhere.stdout), "");
    assert!(text(&elsewhere.stderr).contains("0 dead letter(s)"));

    // Redriven to a fixed worker, the job runs afresh and its outcome
    // replaces the dead letter.
    let fixed = harness.start_worker("fixed", fleet_credentials(&fleet));
    let redriven = producer(&harness, &["dead", "redrive", "--campaign", "deadpanic"]).await;
    assert!(redriven.status.success(), "{}", text(&redriven.stderr));
    assert!(
        text(&redriven.stderr).contains("1 dead letter(s) re-queued"),
        "{}",
        text(&redriven.stderr)
    );
    let state = harness
        .wait_until(
            "deadpanic",
            Duration::from_secs(60),
            "the redriven job's outcome",
            |s| {
                s.outcome_of(&doomed)
                    .is_some_and(|f| f.ending.outcome == Outcome::Succeeded)
            },
        )
        .await;
    fixed.stop().await;
    assert_eq!(state.totals().succeeded, 3);
    assert_eq!(fleet.upgrades_of(&doomed), 1);
    assert_eq!(harness.ready_messages(&harness.topology.dead()).await, 0);
    harness.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_of_an_unknown_step_or_kind_end_their_devices_and_the_campaign_completes() {
    let harness = Harness::new("deadunknown").await;
    let fleet = Fleet::start(cpes(3)).await.unwrap();
    let ids: Vec<String> = fleet.devices().iter().map(|d| d.id.clone()).collect();
    let campaign = harness.campaign("deadunknown");
    let controller = harness.start_campaign(&campaign, fleet.devices());
    harness
        .wait_until("deadunknown", Duration::from_secs(30), "3 jobs", |s| {
            s.published() == 3
        })
        .await;

    // No worker yet: rewrite two jobs as a newer producer would write
    // them for an older worker (a rolling upgrade).
    let connection = harness.broker.connection().await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let publisher = Publisher::open(&connection).await.unwrap();
    for _ in 0..3 {
        let message = channel
            .basic_get(
                harness.topology.jobs().as_str().into(),
                BasicGetOptions { no_ack: false },
            )
            .await
            .unwrap()
            .expect("the controller published every job");
        let mut job: serde_json::Value = serde_json::from_slice(&message.delivery.data).unwrap();
        let device = job["device"]["id"].as_str().unwrap().to_owned();
        if device == ids[0] {
            job["step"] = "flash_the_bios".into();
        } else if device == ids[1] {
            job["device"]["kind"] = "toaster".into();
        }
        let body = serde_json::to_vec(&job).unwrap();
        publisher
            .publish(&harness.topology.jobs(), &body, harness.job_message(&body))
            .await
            .unwrap();
        message
            .delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .unwrap();
    }

    let worker = harness.start_worker("old", fleet_credentials(&fleet));
    let state = controller.finished().await;
    worker.stop().await;
    assert_eq!(state.phase(), Phase::Completed);
    let error = |id: &str| {
        let ending = &state.outcome_of(id).unwrap().ending;
        assert_eq!(ending.outcome, Outcome::DeadLettered, "{id}");
        ending.error.clone().unwrap()
    };
    assert!(error(&ids[0]).starts_with("unknown_step: "));
    assert!(error(&ids[1]).starts_with("unknown_kind: "));
    // The worker did not know the kind; the campaign did.
    assert_eq!(state.outcome_of(&ids[1]).unwrap().kind, DeviceKind::Dms);
    assert_eq!(
        state.outcome_of(&ids[2]).unwrap().ending.outcome,
        Outcome::Succeeded
    );
    assert_eq!(harness.ready_messages(&harness.topology.dead()).await, 2);
    harness.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_delivery_the_broker_allows_is_dead_lettered_by_the_worker() {
    let harness = Harness::new("deadlimit").await;
    let fleet = Fleet::start(cpes(1)).await.unwrap();
    let campaign = harness.campaign("deadlimit");
    let device = &fleet.devices()[0];
    // As the broker marks a message it has delivered as often as the
    // queue's limit allows.
    let job = serde_json::to_vec(&harness.job(&campaign, device)).unwrap();
    let connection = harness.broker.connection().await.unwrap();
    let publisher = Publisher::open(&connection).await.unwrap();
    publish_event(&harness, &publisher, "deadlimit", device).await;
    let limit = i64::from(harness.topology.delivery_limit());
    publisher
        .publish(
            &harness.topology.jobs(),
            &job,
            Message::new(JOB_MESSAGE_TYPE)
                .header(headers::DELIVERY_COUNT, limit)
                .signed(harness.keyring(), &job),
        )
        .await
        .unwrap();

    let worker = harness.start_worker("w", fleet_credentials(&fleet));
    let state = harness
        .wait_finished("deadlimit", 1, Duration::from_secs(30))
        .await;
    worker.stop().await;
    let ending = &state.outcome_of(&device.id).unwrap().ending;
    assert_eq!(ending.outcome, Outcome::DeadLettered);
    assert!(
        ending
            .error
            .as_deref()
            .unwrap()
            .starts_with("delivery_limit: "),
        "{ending:?}"
    );
    assert_eq!(fleet.upgrades_of(&device.id), 0);
    harness.teardown().await;
}

async fn publish_event(
    harness: &Harness,
    publisher: &Publisher,
    campaign: &str,
    device: &flotilla_common::Device,
) {
    let event = flotilla_common::Event::new(
        campaign,
        flotilla_common::EventBody::Published(flotilla_common::PublishedEvent {
            device: device.id.clone(),
            kind: device.kind,
            wave: None,
        }),
    );
    publisher
        .publish(
            &harness.topology.events(),
            &serde_json::to_vec(&event).unwrap(),
            Message::new(flotilla_common::EVENT_MESSAGE_TYPE),
        )
        .await
        .unwrap();
}
