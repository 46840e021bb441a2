//! A broker URL listing several nodes: processes pass over a node that is
//! gone, at start and mid-campaign.
//!
//! The first test runs on the test broker with a dead node listed before
//! it. The others need the three-node cluster of `scripts/cluster` (heavy
//! on two cores, so they are ignored unless asked for; README, "A RabbitMQ
//! cluster"): a campaign that loses a node, and one run by the users of
//! deploy/rabbitmq/definitions.json, which that test creates there.
//!
//! `scripts/resilience` (which CI runs) starts the cluster, runs them one
//! at a time and stops it.

use flotilla_common::{DeviceKind, Outcome};
use flotilla_producer::CampaignState;
use flotilla_sim::{Fleet, FleetSpec};
use flotilla_tests::{Harness, binary, eventually};
use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

const CAMPAIGN: &str = r#"
id = "cluster-campaign"
[target]
version = "7.2.1"
image_url = "http://files.example.net/cpe/7.2.1.bin"
sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
[timing]
deadline = "5m"
poll_interval = "500ms"
[retry]
max_attempts = 10
initial_backoff = "200ms"
max_backoff = "2s"
[rate]
per_minute = 240
"#;

/// An address nothing listens on: connections to it are refused at once.
fn dead_node() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("amqp://guest:guest@{addr}/%2f")
}

async fn fleet(devices: usize) -> Fleet {
    let spec = FleetSpec {
        upgrade_time: Duration::from_millis(500)..=Duration::from_millis(1500),
        ..FleetSpec::default()
    };
    Fleet::start(spec.with(DeviceKind::Dms, devices))
        .await
        .unwrap()
}

/// `flotilla-producer run` as an operator starts it, its output appended
/// to `log`.
async fn spawn_producer(
    harness: &Harness,
    url: &str,
    campaign: &Path,
    inventory: &Path,
    log: &Path,
) -> tokio::process::Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    tokio::process::Command::new(binary("flotilla-producer").await)
        .args(["run", "--campaign"])
        .arg(campaign)
        .arg("--inventory")
        .arg(inventory)
        .env("AMQP_URL", url)
        .env("FLOTILLA_PREFIX", &harness.args.prefix)
        .env("FLOTILLA_DELAY_TIERS", flotilla_tests::TEST_DELAY_TIERS)
        .env("FLOTILLA_METRICS_ADDR", "off")
        .env("RUST_LOG", "info,lapin=warn")
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// `flotilla-worker` connecting through `url`, its log in the test's
/// directory.
async fn spawn_worker(
    harness: &Harness,
    fleet: &Fleet,
    url: &str,
    name: &str,
) -> tokio::process::Child {
    let log = std::fs::File::create(harness.dir().join(format!("{name}.log"))).unwrap();
    tokio::process::Command::new(binary("flotilla-worker").await)
        .envs(harness.worker_env(fleet))
        .env("AMQP_URL", url)
        .env("FLOTILLA_WORKER_NAME", name)
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Every device ended as its fate called for, once: no device upgraded
/// twice (the simulator's own count), repeated outcomes of a redelivered
/// step agree, no rule left enabled, nothing left in the queues.
async fn assert_completed_once(harness: &Harness, fleet: &Fleet, events: &CampaignState) {
    for device in fleet.devices() {
        let finished = events
            .outcome_of(&device.id)
            .unwrap_or_else(|| panic!("{} has no outcome", device.id));
        assert_eq!(finished.ending.outcome, Outcome::Succeeded, "{}", device.id);
        assert_eq!(fleet.upgrades_of(&device.id), 1, "{}", device.id);
    }
    for repeated in events.repeated_outcomes() {
        let first = events.outcome_of(&repeated.device).unwrap();
        assert_eq!(repeated.ending.outcome, first.ending.outcome);
    }
    assert_eq!(events.published(), fleet.devices().len());
    assert_eq!(fleet.enabled_rules(), Vec::<String>::new());
    assert_eq!(harness.circulating_jobs().await, 0);
    assert_eq!(harness.ready_messages(&harness.topology.dead()).await, 0);
}

#[tokio::test]
async fn a_dead_node_first_in_the_list_is_passed_over() {
    let harness = Harness::new("deadnode").await;
    let fleet = fleet(10).await;
    let url = format!("{},{}", dead_node(), harness.args.amqp_url);
    let inventory = harness.write_inventory("devices.csv", fleet.devices());
    let campaign = harness.dir().join("campaign.toml");
    std::fs::write(&campaign, CAMPAIGN).unwrap();
    let log = harness.dir().join("producer.log");

    let mut worker = spawn_worker(&harness, &fleet, &url, "deadnode-w").await;
    let status = spawn_producer(&harness, &url, &campaign, &inventory, &log)
        .await
        .wait()
        .await
        .unwrap();
    let output = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{output}");
    assert!(
        output.contains("campaign cluster-campaign: completed"),
        "{output}"
    );
    assert!(
        output.contains("connected to the next RabbitMQ node"),
        "{output}"
    );
    // The password of neither node is printed.
    assert!(!output.contains("guest:guest"), "{output}");
    worker.kill().await.unwrap();
    let worker_log = std::fs::read_to_string(harness.dir().join("deadnode-w.log")).unwrap();
    assert!(
        worker_log.contains("connected to the next RabbitMQ node"),
        "{worker_log}"
    );
    assert_completed_once(
        &harness,
        &fleet,
        &harness.all_events("cluster-campaign").await,
    )
    .await;
    harness.teardown().await;
}

/// `scripts/cluster`, for this test's nodes.
fn cluster(args: &[&str]) -> String {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/cluster");
    let output = std::process::Command::new(script)
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "scripts/cluster {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test]
#[ignore = "needs the three-node cluster of scripts/cluster and FLOTILLA_CLUSTER_URL"]
async fn a_campaign_completes_when_the_node_its_producer_is_on_stops() {
    let url = std::env::var("FLOTILLA_CLUSTER_URL")
        .expect("FLOTILLA_CLUSTER_URL lists the nodes of scripts/cluster");
    let nodes: Vec<&str> = url.split(',').collect();
    assert_eq!(nodes.len(), 3, "{url}");
    // The producer and one worker start on node 1, the other worker on
    // node 2; the harness, which declares the queues (so node 1 leads
    // them), also starts on node 1.
    let from_2 = format!("{},{},{}", nodes[1], nodes[2], nodes[0]);
    let harness = Harness::on("cluster", url.clone()).await;
    let fleet = fleet(60).await;
    let inventory = harness.write_inventory("devices.csv", fleet.devices());
    let campaign = harness.dir().join("campaign.toml");
    std::fs::write(&campaign, CAMPAIGN).unwrap();
    let log = harness.dir().join("producer.log");

    let mut w1 = spawn_worker(&harness, &fleet, &url, "cluster-w1").await;
    let mut w2 = spawn_worker(&harness, &fleet, &from_2, "cluster-w2").await;
    let mut producer = spawn_producer(&harness, &url, &campaign, &inventory, &log).await;

    // Mid-campaign: some devices done, most not yet started.
    harness
        .wait_until(
            "cluster-campaign",
            Duration::from_secs(60),
            "ten finished devices",
            |state| state.finished() >= 10,
        )
        .await;
    let on_node_1 = cluster(&["ctl", "1", "-q", "list_connections", "client_properties"]);
    assert!(on_node_1.contains("flotilla-producer"), "{on_node_1}");
    assert!(
        on_node_1.contains("flotilla-worker cluster-w1"),
        "{on_node_1}"
    );
    cluster(&["ctl", "1", "-q", "stop_app"]);

    // Nobody runs the producer again: it reconnects to another node,
    // picks its campaign up from the broker and completes it.
    let status = tokio::time::timeout(Duration::from_secs(240), producer.wait())
        .await
        .expect("the producer finishes within four minutes")
        .unwrap();
    let output = std::fs::read_to_string(&log).unwrap();
    assert!(
        status.success(),
        "the producer exited with {status}:\n{output}"
    );
    assert!(
        output.contains("campaign cluster-campaign: completed"),
        "{output}"
    );

    let events = harness.all_events("cluster-campaign").await;
    assert_completed_once(&harness, &fleet, &events).await;
    // Worker 1 carried on on another node.
    let w1_log = std::fs::read_to_string(harness.dir().join("cluster-w1.log")).unwrap();
    assert!(
        w1_log.contains("connected to the next RabbitMQ node"),
        "{w1_log}"
    );

    w1.kill().await.unwrap();
    w2.kill().await.unwrap();
    cluster(&["ctl", "1", "-q", "start_app"]);
    eventually(Duration::from_secs(60), "node 1 back", || async {
        harness.broker.connection().await.is_ok()
    })
    .await;
    harness.teardown().await;
}

/// Whether `result` is RabbitMQ's 403 ACCESS_REFUSED.
fn refused<T: std::fmt::Debug>(result: Result<T, lapin::Error>) -> bool {
    matches!(&result, Err(error) if matches!(error.kind(), lapin::ErrorKind::ProtocolError(e) if e.get_id() == 403))
}

#[tokio::test]
#[ignore = "needs the three-node cluster of scripts/cluster and FLOTILLA_CLUSTER_URL"]
async fn each_component_runs_as_its_own_broker_user_and_no_more() {
    use lapin::options::{BasicGetOptions, QueueDeclareOptions};
    let url = std::env::var("FLOTILLA_CLUSTER_URL")
        .expect("FLOTILLA_CLUSTER_URL lists the nodes of scripts/cluster");
    // Creates the users on the test's own cluster, never on a shared
    // broker.
    let definitions = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/rabbitmq/definitions.json")
        .canonicalize()
        .unwrap();
    cluster(&[
        "ctl",
        "1",
        "-q",
        "import_definitions",
        definitions.to_str().unwrap(),
    ]);
    let as_user = |user: &str| {
        url.replace(
            "guest:guest",
            &format!("flotilla-{user}:{user}-demo-password"),
        )
    };
    // The definitions name the default prefix's queues.
    let harness = Harness::on_prefix(url.clone(), "flotilla".to_owned()).await;
    let fleet = fleet(10).await;
    let inventory = harness.write_inventory("devices.csv", fleet.devices());
    let campaign = harness.dir().join("campaign.toml");
    std::fs::write(
        &campaign,
        CAMPAIGN.replace("cluster-campaign", "least-privilege"),
    )
    .unwrap();
    let log = harness.dir().join("producer.log");

    let mut worker = spawn_worker(&harness, &fleet, &as_user("worker"), "least-w").await;
    let status = spawn_producer(&harness, &as_user("producer"), &campaign, &inventory, &log)
        .await
        .wait()
        .await
        .unwrap();
    let output = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{output}");
    worker.kill().await.unwrap();
    assert_completed_once(
        &harness,
        &fleet,
        &harness.all_events("least-privilege").await,
    )
    .await;

    let topology = &harness.topology;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    for (user, queue, may_read) in [
        ("keda", topology.jobs(), false),
        ("producer", topology.jobs(), false),
        ("producer", topology.dead(), true),
        ("worker", topology.dead(), false),
        ("worker", topology.jobs(), true),
    ] {
        let broker = flotilla_common::Broker::new(&as_user(user), "least-privilege").unwrap();
        let connection = broker.connection().await.unwrap();
        // A passive declare (KEDA's count) needs no permission.
        let channel = connection.create_channel().await.unwrap();
        channel
            .queue_declare(queue.as_str().into(), passive, Default::default())
            .await
            .unwrap_or_else(|e| panic!("{user} cannot look at {queue}: {e}"));
        let got = channel
            .basic_get(queue.as_str().into(), BasicGetOptions::default())
            .await;
        assert_eq!(!refused(got), may_read, "{user} reading {queue}");
        // Nobody declares outside the topology.
        let channel = connection.create_channel().await.unwrap();
        let other = channel
            .queue_declare(
                "other.jobs".into(),
                QueueDeclareOptions::default(),
                Default::default(),
            )
            .await;
        assert!(refused(other), "{user} declared other.jobs");
    }
    harness.teardown().await;
}
