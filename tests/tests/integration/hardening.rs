//! What a worker refuses to be made to do, and work that must neither stick
//! nor fork: bounded device answers, redirects, failed hand-offs, poison
//! loops, parked deadlines, and a step redelivered after its hand-off.

use flotilla_common::{
    DeviceKind, EVENTS_MESSAGE_TYPE, ErrorClass, Message, Outcome, Publisher, control::Command,
    headers,
};
use flotilla_sim::{Fleet, FleetSpec, Quirks, dms};
use flotilla_tests::{Harness, fleet_credentials};
use futures::StreamExt;
use lapin::{
    options::{BasicConsumeOptions, BasicQosOptions},
    types::FieldTable,
};
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
            |s| s.devices().filter(|(_, d)| d.steps() > 0).count() == 10,
        )
        .await;
    harness.command(&campaign.id, Command::Pause).await;
    tokio::time::sleep(Duration::from_secs(7)).await;
    harness.command(&campaign.id, Command::Resume).await;

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

/// Workers killed at random keep every job on one chain: a delivery
/// redelivered after its hand-off was committed is dropped unrun (the
/// fence), so no step is reported twice and no CPE upgrades twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_sigkill_storm_every_job_keeps_one_chain() {
    let harness = Harness::new("storm").await;
    let fleet = Fleet::start(FleetSpec {
        upgrade_time: Duration::from_millis(500)..=Duration::from_millis(2000),
        ..cpes(150, Quirks::default())
    })
    .await
    .unwrap();
    // Few slots here, so most steps run on the worker that gets killed.
    let mut config = harness.worker_config("steady");
    config.concurrency = 8;
    let steady = harness.start_worker_with(config, fleet_credentials(&fleet));
    let campaign = harness.campaign("storm");
    let controller = harness.start_campaign(&campaign, fleet.devices());

    // A worker process that lives a second or so, sixteen times over:
    // some die between a step's hand-off and its ack.
    let mut kills = 0;
    while kills < 16 {
        let mut doomed = harness
            .spawn_worker_process(&fleet, &format!("doomed-{kills}"))
            .await;
        let lifetime = 600 + rand::random::<u64>() % 800;
        tokio::time::sleep(Duration::from_millis(lifetime)).await;
        doomed.start_kill().unwrap();
        doomed.wait().await.unwrap();
        kills += 1;
    }
    let state = tokio::time::timeout(Duration::from_secs(120), controller.finished())
        .await
        .expect("the campaign completes");
    steady.stop().await;
    assert_eq!(state.finished(), 150);

    // One chain per job: no step of a device reported twice...
    let mut seen = std::collections::HashSet::new();
    for step in harness.step_events(&campaign.id).await {
        assert!(
            seen.insert((step.device.clone(), step.seq)),
            "{} ran step {} ({}) twice",
            step.device,
            step.seq,
            step.step
        );
    }
    // ...and every CPE upgraded once. A worker killed before its hand-off
    // was committed leaves its delivery to run again from the chain's
    // first step, which re-arms the same rule (an update in place) and may
    // call the CPE again before its result is in: the CPE's rule runs
    // once whatever the number of calls. What the fence stops (a delivery
    // whose hand-off was committed running again) would show above as a
    // step reported twice.
    for device in fleet.devices() {
        let cpe = fleet.get::<dms::Cpe>(&device.id).unwrap();
        let calls = cpe.dms().acting_calls(cpe.id());
        assert!(calls.rule_posts >= 1, "{}: {calls:?}", device.id);
        assert!(calls.connection_requests >= 1, "{}: {calls:?}", device.id);
        assert_eq!(fleet.upgrades_of(&device.id), 1, "{}", device.id);
    }
    assert!(state.repeated_outcomes().is_empty());
    assert_eq!(harness.circulating_jobs().await, 0);
    harness.teardown().await;
}

/// A broker user of one test's own, deleted when the test ends however it
/// ends.
struct TestUser(String);

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["delete_user", &self.0])
            .output();
    }
}

fn rabbitmqctl(args: &[&str]) {
    let output = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("running rabbitmqctl");
    assert!(output.status.success(), "rabbitmqctl {args:?}: {output:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_hand_off_returns_its_delivery_at_once_and_is_counted() {
    let harness = Harness::new("handoff").await;
    let fleet = Fleet::start(cpes(5, Quirks::default())).await.unwrap();
    let campaign = harness.campaign("handoff");

    // A broker user of this test's own, allowed everything until the worker
    // is consuming, then no more publishing: every hand-off is refused (the
    // broker closes the channel). A worker refused from the start never
    // takes a delivery: its session's first publish, the marker that tells
    // it has read the control stream, is refused already.
    let user = harness.topology.prefix().to_owned();
    rabbitmqctl(&["add_user", &user, "handoff-password"]);
    let _user = TestUser(user.clone());
    rabbitmqctl(&["set_permissions", "-p", "/", &user, ".*", ".*", ".*"]);
    let mut url: url::Url = harness.args.amqp_url.parse().unwrap();
    url.set_username(&user).unwrap();
    url.set_password(Some("handoff-password")).unwrap();
    let metrics_addr = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let mut config = harness.worker_config("refused");
    config.broker.amqp_url = url.to_string();
    config.metrics_addr = flotilla_worker::Listen::On(metrics_addr);
    let worker = harness.start_worker_with(config, fleet_credentials(&fleet));
    let readyz = format!("http://{metrics_addr}/readyz");
    let ready =
        || async { matches!(reqwest::get(&readyz).await, Ok(r) if r.status().is_success()) };
    flotilla_tests::eventually(Duration::from_secs(30), "the worker consuming", ready).await;
    rabbitmqctl(&["set_permissions", "-p", "/", &user, ".*", "^$", ".*"]);
    harness.publish(&campaign, fleet.devices()).await;

    flotilla_tests::eventually(Duration::from_secs(30), "refused hand-offs", || async {
        flotilla_tests::scrape(metrics_addr, "flotilla_worker_handoff_failures_total")
            .await
            .is_some_and(|n| n >= 1.0)
    })
    .await;
    // The sessions after it are refused before they take anything.
    flotilla_tests::eventually(Duration::from_secs(30), "/readyz not ready", || async {
        !ready().await
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !ready().await,
        "a worker that cannot hand off says it is ready"
    );
    assert_eq!(
        harness.ready_messages(&harness.topology.jobs()).await,
        5,
        "every refused delivery is back in the queue"
    );

    // Allowed again: the deliveries were back in the queue all along, so
    // every job finishes now, not at the broker's consumer timeout.
    rabbitmqctl(&["set_permissions", "-p", "/", &user, ".*", ".*", ".*"]);
    let state = harness
        .wait_finished(&campaign.id, 5, Duration::from_secs(60))
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_timeout_that_can_outlast_the_consumer_timeout_fails_its_job() {
    let harness = Harness::new("steplimit").await;
    let fleet = Fleet::start(cpes(1, Quirks::default())).await.unwrap();
    let device = fleet.devices()[0].id.clone();
    // A broker that takes a delivery back after 2 minutes unacked, and a
    // campaign whose steps may take 5.
    let mut config = harness.worker_config("w1");
    config.consumer_timeout = Duration::from_secs(120);
    let worker = harness.start_worker_with(config, fleet_credentials(&fleet));
    let mut campaign = harness.campaign("steplimit");
    campaign.policy.deadline = Duration::from_secs(600);
    campaign.policy.step_timeout = Duration::from_secs(300);
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
        error.contains("5m") && error.contains("FLOTILLA_CONSUMER_TIMEOUT"),
        "{error}"
    );
    assert_eq!(fleet.upgrades_of(&device), 0);
    harness.teardown().await;
}

/// The fence itself, without a kill to time: three jobs are taken and
/// their taker dies holding them, two after their hand-offs were recorded,
/// in one record as a lane's round writes it. The redelivered jobs whose
/// hops the handoffs stream holds are dropped unrun; the other runs, so
/// nothing but the record decides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivery_whose_hand_off_is_recorded_is_dropped_unrun() {
    let harness = Harness::new("fence").await;
    let fleet = Fleet::start(cpes(3, Quirks::default())).await.unwrap();
    let campaign = harness.campaign("fence");
    harness.publish(&campaign, fleet.devices()).await;

    let taker = harness.broker.connection().await.unwrap();
    let channel = taker.create_channel().await.unwrap();
    channel
        .basic_qos(3, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = channel
        .basic_consume(
            harness.topology.jobs().as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut hops = std::collections::HashMap::new();
    for _ in 0..3 {
        let delivery = consumer.next().await.unwrap().unwrap();
        let job: flotilla_common::Job = serde_json::from_slice(&delivery.data).unwrap();
        let hop = headers::get_text(delivery.properties.headers().as_ref(), headers::HOP)
            .expect("every published job has a hop");
        hops.insert(job.device.id, hop);
    }
    let devices = fleet.devices();
    let (handed_off, unfinished) = (&devices[..2], &devices[2]);
    // What a lane's round appends to the stream besides the events stream.
    let record = Publisher::open(&taker).await.unwrap();
    let recorded: Vec<&str> = handed_off.iter().map(|d| hops[&d.id].as_str()).collect();
    record
        .publish(
            &harness.topology.handoffs(),
            b"[]",
            Message::new(EVENTS_MESSAGE_TYPE)
                .hands_off_all(&recorded, &harness.topology.handoffs()),
        )
        .await
        .unwrap();
    taker.close(200, "the taker dies".into()).await.unwrap();

    let worker = harness.start_worker("fence", fleet_credentials(&fleet));
    let state = harness
        .wait_finished(&campaign.id, 1, Duration::from_secs(30))
        .await;
    assert!(state.outcome_of(&unfinished.id).is_some());
    worker.stop().await;
    // The worker stopped with nothing in flight: the dropped jobs are not
    // waiting anywhere, and their devices saw no call and reported nothing.
    assert_eq!(harness.circulating_jobs().await, 0);
    let steps = harness.step_events(&campaign.id).await;
    for device in handed_off {
        let cpe = fleet.get::<dms::Cpe>(&device.id).unwrap();
        assert_eq!(
            cpe.dms().acting_calls(cpe.id()),
            dms::ActingCalls::default()
        );
        assert!(steps.iter().all(|step| step.device != device.id));
    }
    assert_eq!(fleet.upgrades_of(&unfinished.id), 1);
    harness.teardown().await;
}
