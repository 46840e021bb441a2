//! What a rollout survives: poison messages, workers killed or stopped
//! mid-campaign, a broker connection that drops, a topology that disagrees,
//! a message larger than a frame.

use flotilla_common::DeviceKind;
use flotilla_common::{EventBody, Outcome, Publisher, Topology, TopologyError, headers};
use flotilla_producer::CampaignState;
use flotilla_sim::dms;
use flotilla_sim::{Fleet, FleetSpec};
use flotilla_tests::{Harness, eventually, fleet_credentials, proxy::Proxy};
use lapin::{
    options::{BasicGetOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable, LongString},
};
use std::{collections::BTreeMap, time::Duration};

fn cpe_fleet(cpes: usize, upgrade_ms: (u64, u64), latency_ms: (u64, u64)) -> FleetSpec {
    FleetSpec {
        cpes_per_dms: 100,
        request_latency: Duration::from_millis(latency_ms.0)..=Duration::from_millis(latency_ms.1),
        upgrade_time: Duration::from_millis(upgrade_ms.0)..=Duration::from_millis(upgrade_ms.1),
        ..FleetSpec::default()
    }
    .with(DeviceKind::Dms, cpes)
}

/// Every device has an outcome, the one its fate called for; repeated
/// outcomes (a step redelivered after a crash) agree with the first; no CPE
/// upgraded twice; no rule left enabled; nothing left in the queues.
async fn assert_campaign_completed(harness: &Harness, fleet: &Fleet, events: &CampaignState) {
    for device in fleet.devices() {
        let finished = events
            .outcome_of(&device.id)
            .unwrap_or_else(|| panic!("{} has no outcome", device.id));
        assert_eq!(
            Some(finished.ending.outcome),
            fleet.expected_outcome(&device.id),
            "{}",
            device.id
        );
        assert!(
            fleet.upgrades_of(&device.id) <= 1,
            "{} upgraded twice",
            device.id
        );
    }
    for repeated in events.repeated_outcomes() {
        let first = events.outcome_of(&repeated.device).unwrap();
        assert_eq!(
            repeated.ending.outcome, first.ending.outcome,
            "{}",
            repeated.device
        );
    }
    assert_eq!(fleet.enabled_rules(), Vec::<String>::new());
    assert_eq!(harness.circulating_jobs().await, 0);
    assert_eq!(harness.ready_messages(&harness.topology.dead()).await, 0);
}

/// A thousand poison messages, four sorts of 250, before and after the real
/// jobs: every one is dead-lettered with its reason and its body as it was,
/// and every real device ends as its fate says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_go_to_the_dead_letter_queue_and_work_goes_on() {
    const EACH: usize = 250;
    let harness = Harness::new("poison").await;
    let fleet = Fleet::start(cpe_fleet(40, (100, 300), (0, 2)))
        .await
        .unwrap();
    let campaign = harness.campaign("poison");

    // Messages no worker can process. Those that name a campaign name
    // another one, so their dead-letter events leave this one's alone.
    let valid = serde_json::to_value(flotilla_common::Job::new(
        "poison-elsewhere",
        fleet.devices()[0].clone(),
        campaign.target.clone(),
        campaign.policy.clone(),
    ))
    .unwrap();
    let mut unknown_kind = valid.clone();
    unknown_kind["device"]["kind"] = "toaster".into();
    let mut unknown_step = valid.clone();
    unknown_step["step"] = "flash_the_bios".into();
    let poison: [(&str, Vec<u8>); 4] = [
        ("undecodable", b"\x00\x9f not json".to_vec()),
        (
            "unsupported_version",
            br#"{"v": 99, "campaign": "poison-elsewhere"}"#.to_vec(),
        ),
        ("unknown_kind", serde_json::to_vec(&unknown_kind).unwrap()),
        ("unknown_step", serde_json::to_vec(&unknown_step).unwrap()),
    ];
    let connection = harness.broker.connection().await.unwrap();
    let publisher = Publisher::open(&connection).await.unwrap();
    let publish_poison = |copies: usize| {
        let publisher = &publisher;
        let jobs = harness.topology.jobs();
        let poison = &poison;
        let harness = &harness;
        async move {
            for _ in 0..copies {
                for (_, body) in poison {
                    publisher
                        .publish(&jobs, body, harness.job_message(body))
                        .await
                        .unwrap();
                }
            }
        }
    };
    publish_poison(EACH / 2).await;
    harness.publish(&campaign, fleet.devices()).await;
    publish_poison(EACH - EACH / 2).await;

    let worker = harness.start_worker("w1", fleet_credentials(&fleet));
    let events = harness
        .wait_finished(&campaign.id, 40, Duration::from_secs(90))
        .await;
    eventually(
        Duration::from_secs(30),
        "every poison message dead-lettered",
        || async { harness.ready_messages(&harness.topology.dead()).await as usize == 4 * EACH },
    )
    .await;
    worker.stop().await;
    for device in fleet.devices() {
        let finished = events.outcome_of(&device.id).unwrap();
        assert_eq!(
            Some(finished.ending.outcome),
            fleet.expected_outcome(&device.id),
            "{}",
            device.id
        );
        assert!(fleet.upgrades_of(&device.id) <= 1, "{}", device.id);
    }

    let channel = connection.create_channel().await.unwrap();
    let mut reasons = BTreeMap::<String, usize>::new();
    while let Some(message) = channel
        .basic_get(
            harness.topology.dead().into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
    {
        let table = message.delivery.properties.headers().clone();
        let reason = headers::get_text(table.as_ref(), headers::DEAD_REASON).unwrap();
        let detail = headers::get_text(table.as_ref(), headers::DEAD_DETAIL).unwrap();
        assert!(!detail.is_empty());
        let (sort, _) = poison
            .iter()
            .find(|(_, body)| *body == message.delivery.data)
            .expect("the body is kept as it was");
        assert_eq!(*sort, reason, "{detail}");
        if reason == "unknown_step" {
            assert!(detail.contains("flash_the_bios"), "{detail}");
        }
        *reasons.entry(reason).or_default() += 1;
    }
    let expected = poison
        .iter()
        .map(|(sort, _)| (sort.to_string(), EACH))
        .collect();
    assert_eq!(reasons, expected);
    assert_eq!(harness.circulating_jobs().await, 0);
    harness.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_campaign_loses_no_job() {
    let harness = Harness::new("sigkill").await;
    let fleet = Fleet::start(cpe_fleet(300, (500, 2000), (1, 5)))
        .await
        .unwrap();
    let mut doomed = harness.spawn_worker_process(&fleet, "doomed").await;
    let campaign = harness.campaign("sigkill");
    let controller = harness.start_campaign(&campaign, fleet.devices());

    harness
        .wait_finished(&campaign.id, 60, Duration::from_secs(60))
        .await;
    doomed.start_kill().unwrap();
    let status = doomed.wait().await.unwrap();
    assert!(!status.success(), "SIGKILL ends the worker: {status:?}");

    let survivor = harness.start_worker("survivor", fleet_credentials(&fleet));
    harness
        .wait_finished(&campaign.id, 300, Duration::from_secs(120))
        .await;
    controller.finished().await;
    survivor.stop().await;
    let events = harness.all_events(&campaign.id).await;
    assert_campaign_completed(&harness, &fleet, &events).await;
    harness.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_steps_and_exits_zero() {
    let harness = Harness::new("sigterm").await;
    // Slow answers, so steps are in flight when the signal arrives.
    let fleet = Fleet::start(cpe_fleet(100, (500, 1500), (50, 150)))
        .await
        .unwrap();
    let mut worker = harness.spawn_worker_process(&fleet, "leaving").await;
    let campaign = harness.campaign("sigterm");
    let controller = harness.start_campaign(&campaign, fleet.devices());
    harness
        .wait_finished(&campaign.id, 20, Duration::from_secs(60))
        .await;

    let pid = worker.id().unwrap().to_string();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(sent.success());
    let status = tokio::time::timeout(Duration::from_secs(30), worker.wait())
        .await
        .expect("the worker exits within its grace period")
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
    let log = harness.worker_log("leaving");
    assert!(log.contains("SIGTERM received"), "{log}");
    assert!(
        log.contains("drained: every in-flight step finished")
            || log.contains("drained: no steps in flight"),
        "{log}"
    );

    let successor = harness.start_worker("successor", fleet_credentials(&fleet));
    harness
        .wait_finished(&campaign.id, 100, Duration::from_secs(120))
        .await;
    controller.finished().await;
    successor.stop().await;
    let events = harness.all_events(&campaign.id).await;
    assert_campaign_completed(&harness, &fleet, &events).await;
    // A drained worker acked every step it ran: nothing ran twice.
    assert!(events.repeated_outcomes().is_empty());
    harness.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_broker_connection_is_reestablished_and_work_continues() {
    let harness = Harness::new("reconnect").await;
    let fleet = Fleet::start(cpe_fleet(200, (300, 1000), (1, 5)))
        .await
        .unwrap();

    let broker_url: url::Url = harness.args.amqp_url.parse().unwrap();
    let upstream = tokio::net::lookup_host((
        broker_url.host_str().unwrap(),
        broker_url.port().unwrap_or(5672),
    ))
    .await
    .unwrap()
    .next()
    .unwrap();
    let proxy = Proxy::start(upstream).await;
    let mut through_proxy = broker_url.clone();
    through_proxy.set_port(Some(proxy.addr().port())).unwrap();
    through_proxy.set_host(Some("127.0.0.1")).unwrap();

    let metrics_addr = free_port();
    let mut config = harness.worker_config("flaky-network");
    config.broker.amqp_url = through_proxy.to_string();
    config.metrics_addr = flotilla_worker::Listen::On(metrics_addr);
    let stop = tokio_util::sync::CancellationToken::new();
    let trigger = stop.clone();
    let worker = tokio::spawn(flotilla_worker::run(
        config,
        fleet_credentials(&fleet),
        async move { trigger.cancelled().await },
    ));

    let campaign = harness.campaign("reconnect");
    let controller = harness.start_campaign(&campaign, fleet.devices());
    harness
        .wait_finished(&campaign.id, 50, Duration::from_secs(60))
        .await;
    assert!(proxy.sever() > 0, "the worker had a connection to sever");

    let scrape = format!("http://{metrics_addr}/metrics");
    eventually(
        Duration::from_secs(30),
        "the worker to reconnect",
        || async {
            let text = reqwest::get(&scrape).await.unwrap().text().await.unwrap();
            text.contains("flotilla_broker_reconnects_total 1")
        },
    )
    .await;
    harness
        .wait_finished(&campaign.id, 200, Duration::from_secs(120))
        .await;
    controller.finished().await;
    stop.cancel();
    worker.await.unwrap().unwrap();
    let events = harness.all_events(&campaign.id).await;
    assert_campaign_completed(&harness, &fleet, &events).await;
    harness.teardown().await;
}

fn free_port() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

#[tokio::test]
async fn the_topology_declares_twice_and_names_a_queue_that_disagrees() {
    let harness = Harness::new("topology").await;
    let connection = harness.broker.connection().await.unwrap();
    // A second process declaring the same topology is fine.
    harness.topology.declare(&harness.broker).await.unwrap();

    // A delay queue someone declared with another TTL is named, with the
    // argument that differs.
    let other = Topology::new(format!("{}-other", harness.topology.prefix()))
        .with_delay_tiers(vec![Duration::from_secs(1)]);
    let channel = connection.create_channel().await.unwrap();
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    arguments.insert("x-message-ttl".into(), AMQPValue::LongInt(5000));
    let long_string = |s: &str| AMQPValue::LongString(LongString::from(s));
    arguments.insert("x-dead-letter-exchange".into(), long_string(""));
    arguments.insert(
        "x-dead-letter-routing-key".into(),
        long_string(&other.jobs()),
    );
    arguments.insert(
        "x-dead-letter-strategy".into(),
        long_string("at-least-once"),
    );
    arguments.insert("x-overflow".into(), long_string("reject-publish"));
    let delay_queue = other.delay_queue(Duration::from_secs(1));
    channel
        .queue_declare(
            delay_queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await
        .unwrap();
    let error = other.declare(&harness.broker).await.unwrap_err();
    let text = error.to_string();
    assert!(
        matches!(error, TopologyError::Mismatch { ref queue, .. } if *queue == delay_queue),
        "{text}"
    );
    assert!(
        text.contains(&delay_queue) && text.contains("x-message-ttl"),
        "{text}"
    );

    let cleanup = harness.broker.connection().await.unwrap();
    let _ = other.delete(&cleanup).await;
    harness.teardown().await;
}

/// Connections ask for 16 KiB frames, which keeps lapin's buffers small
/// (see `FRAME_MAX` in flotilla-common's broker module); a message of many
/// frames still arrives whole.
#[tokio::test]
async fn connections_take_small_frames_and_a_larger_message_arrives_whole() {
    let harness = Harness::new("frames").await;
    let connection = harness.broker.connection().await.unwrap();
    assert_eq!(connection.configuration().frame_max(), 16 * 1024);

    let body: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let publisher = Publisher::open(&connection).await.unwrap();
    publisher
        .publish(
            &harness.topology.dead(),
            &body,
            flotilla_common::Message::new("large"),
        )
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let message = channel
        .basic_get(
            harness.topology.dead().into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
        .expect("the message is in its queue");
    assert_eq!(message.delivery.data, body);
    harness.teardown().await;
}

#[tokio::test]
async fn events_never_carry_a_secret() {
    let harness = Harness::new("secrets").await;
    let fleet = Fleet::start(cpe_fleet(5, (100, 200), (0, 1)))
        .await
        .unwrap();
    let worker = harness.start_worker("w1", fleet_credentials(&fleet));
    let campaign = harness.campaign("secrets");
    let controller = harness.start_campaign(&campaign, fleet.devices());
    harness
        .wait_finished(&campaign.id, 5, Duration::from_secs(30))
        .await;
    controller.finished().await;
    worker.stop().await;

    let (_, password) = fleet.login();
    let connection = harness.broker.connection().await.unwrap();
    let mut reader = flotilla_common::stream::StreamReader::open(
        &connection,
        &harness.topology.events(),
        flotilla_common::stream::Offset::First,
    )
    .await
    .unwrap();
    let mut seen = 0;
    while let Ok(Some(record)) = tokio::time::timeout(Duration::from_secs(1), reader.next()).await {
        let record = record.unwrap();
        let text = String::from_utf8(record.body.clone()).unwrap();
        assert!(!text.contains(password), "a secret in an event: {text}");
        for event in record.events().unwrap() {
            if let EventBody::Finished(finished) = &event.body {
                assert_eq!(finished.ending.outcome, Outcome::Succeeded);
            }
            seen += 1;
        }
    }
    assert!(seen >= 5 * 5, "read {seen} events");
    harness.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dms_that_restarts_mid_campaign_only_costs_retries() {
    let harness = Harness::new("dmsrestart").await;
    let fleet = Fleet::start(cpe_fleet(100, (500, 1500), (1, 5)))
        .await
        .unwrap();
    let worker = harness.start_worker("w1", fleet_credentials(&fleet));
    let campaign = harness.campaign("dmsrestart");
    let controller = harness.start_campaign(&campaign, fleet.devices());
    harness
        .wait_finished(&campaign.id, 10, Duration::from_secs(60))
        .await;

    // Down until a step has met the refused connection, then up again: the
    // retries carry every CPE through.
    fleet
        .get::<dms::Cpe>(&fleet.devices()[0].id)
        .unwrap()
        .dms()
        .take_down();
    let refused = |events: &CampaignState| {
        events
            .retried_errors()
            .iter()
            .any(|e| e.contains("could not connect") && e.contains("Connection refused"))
    };
    let mut events = CampaignState::new(&campaign.id);
    flotilla_producer::follow_campaign(
        &harness.broker,
        &harness.topology,
        &mut events,
        Duration::from_secs(30),
        refused,
        |_| {},
    )
    .await
    .unwrap();
    fleet
        .get::<dms::Cpe>(&fleet.devices()[0].id)
        .unwrap()
        .dms()
        .bring_up()
        .await
        .unwrap();

    harness
        .wait_finished(&campaign.id, 100, Duration::from_secs(120))
        .await;
    controller.finished().await;
    worker.stop().await;
    let events = harness.all_events(&campaign.id).await;
    assert_campaign_completed(&harness, &fleet, &events).await;
    assert!(events.repeated_outcomes().is_empty());
    harness.teardown().await;
}
