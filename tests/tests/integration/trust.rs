//! Nobody but the producer can make a worker act: a job that is not signed
//! with a job key, or was changed after signing, reaches no device and ends
//! none; a credentials reference goes only to the hosts it allows; a
//! `file:` image is uploaded only from the worker's image directory; and
//! job keys rotate without a stop.
//!
//! Where a forged job points, a plain TCP listener on 127.0.0.1 counts
//! connections: a worker that acted on it would connect there first.

use flotilla_common::{
    DeviceKind, ErrorClass, Event, EventBody, Outcome, Publisher, headers,
    signing::{self, KeyArgs, Keyring},
    stream::{Offset, StreamReader},
};
use flotilla_producer::dead;
use flotilla_sim::{Fleet, FleetSpec, sps};
use flotilla_tests::{Harness, fleet_credentials, fleet_login, job_key};
use flotilla_worker::{CredentialStore, Credentials, Listen};
use lapin::types::FieldTable;
use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

/// A listener on 127.0.0.1 that counts the connections it accepts.
struct Listener {
    url: url::Url,
    connections: Arc<AtomicUsize>,
}

impl Listener {
    async fn start() -> Listener {
        let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = socket.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = socket.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                drop(stream);
            }
        });
        Listener {
            url: format!("http://127.0.0.1:{port}/").parse().unwrap(),
            connections,
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// Waits until the dead-letter queue holds `count` messages.
async fn dead_letters(harness: &Harness, count: u32) {
    let queue = harness.topology.dead();
    let waited = tokio::time::timeout(Duration::from_secs(30), async {
        while harness.ready_messages(&queue).await < count {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let held = harness.ready_messages(&queue).await;
    assert!(
        waited.is_ok() && held == count,
        "{held} dead letters, not {count}"
    );
}

/// Every `dead_lettered` event of `campaign` in the stream now.
async fn dead_lettered_events(harness: &Harness, campaign: &str) -> Vec<Event> {
    let connection = harness.broker.connection().await.unwrap();
    let mut reader = StreamReader::open(&connection, &harness.topology.events(), Offset::First)
        .await
        .unwrap();
    let mut found = Vec::new();
    while let Ok(Some(Ok(record))) =
        tokio::time::timeout(Duration::from_secs(1), reader.next()).await
    {
        found.extend(
            record
                .events()
                .unwrap_or_default()
                .into_iter()
                .filter(|event| {
                    event.campaign == campaign && matches!(event.body, EventBody::DeadLettered(_))
                }),
        );
    }
    found
}

async fn publish(harness: &Harness, body: &[u8], table: FieldTable) {
    let connection = harness.broker.connection().await.unwrap();
    let publisher = Publisher::open(&connection).await.unwrap();
    let message = flotilla_common::Message::new(flotilla_common::JOB_MESSAGE_TYPE).headers(table);
    publisher
        .publish(&harness.topology.jobs(), body, message)
        .await
        .unwrap();
}

fn signed_headers(keyring: &Keyring, body: &[u8]) -> FieldTable {
    let mut table = FieldTable::default();
    keyring.sign(body, &mut table);
    table
}

/// A port nothing listens on now, for a worker's metrics.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_jobs_reach_no_device_end_none_and_redrive_does_not_launder_them() {
    let harness = Harness::new("forged").await;
    let fleet = Fleet::start(FleetSpec::default().with(DeviceKind::Dms, 1))
        .await
        .unwrap();
    let listener = Listener::start().await;
    let campaign = harness.campaign("forged");
    let device = &fleet.devices()[0];
    // The job a forger wants run: the campaign's own device, at the
    // forger's address, with the fleet's credentials reference.
    let mut forged = harness.job(&campaign, device);
    forged.device.address = listener.url.clone();
    let forged = serde_json::to_vec(&forged).unwrap();
    // Unsigned.
    publish(&harness, &forged, FieldTable::default()).await;
    // A genuine signature, of the job before its address was changed.
    let genuine = serde_json::to_vec(&harness.job(&campaign, device)).unwrap();
    let table = signed_headers(harness.keyring(), &genuine);
    publish(&harness, &forged, table.clone()).await;
    // Signed, by a key no worker holds, under an id they do not know.
    let (_, stranger) = job_key(harness.dir(), "stranger");
    publish(&harness, &forged, signed_headers(&stranger, &forged)).await;

    let port = free_port();
    let mut config = harness.worker_config("w1");
    config.metrics_addr = Listen::On(format!("127.0.0.1:{port}").parse().unwrap());
    let worker = harness.start_worker_with(config, fleet_credentials(&fleet));
    dead_letters(&harness, 3).await;
    // The device's real job, signed by the producer, runs as ever.
    harness.publish(&campaign, fleet.devices()).await;
    let state = harness
        .wait_finished(&campaign.id, 1, Duration::from_secs(60))
        .await;
    assert_eq!(
        state.outcome_of(&device.id).unwrap().ending.outcome,
        Outcome::Succeeded
    );
    assert_eq!(fleet.upgrades_of(&device.id), 1);

    let metrics = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for reason in ["unsigned", "bad_signature", "unknown_key"] {
        let line = format!("flotilla_worker_dead_lettered_total{{reason=\"{reason}\"}} 1");
        assert!(metrics.contains(&line), "no {line:?} in\n{metrics}");
    }
    let key = format!(
        "flotilla_worker_jobs_verified_total{{key=\"{}\"}}",
        flotilla_tests::TEST_KEY_ID
    );
    assert!(metrics.contains(&key), "{metrics}");

    let mut reasons: Vec<String> = dead::list(&harness.broker, &harness.topology, None)
        .await
        .unwrap()
        .into_iter()
        .map(|letter| letter.reason)
        .collect();
    reasons.sort();
    assert_eq!(reasons, ["bad_signature", "unknown_key", "unsigned"]);

    // Redriven as they are, with the headers they came with, they are
    // refused again.
    let redriven = dead::redrive(&harness.broker, &harness.topology, Some(&campaign.id))
        .await
        .unwrap();
    assert_eq!(redriven, 3);
    dead_letters(&harness, 3).await;
    let metrics = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("flotilla_worker_dead_lettered_total{reason=\"unsigned\"} 2"),
        "{metrics}"
    );
    worker.stop().await;

    assert_eq!(
        listener.connections(),
        0,
        "a forged job reached its address"
    );
    assert_eq!(fleet.upgrades_of(&device.id), 1);
    let ended = dead_lettered_events(&harness, &campaign.id).await;
    assert!(ended.is_empty(), "a forged job ended its device: {ended:?}");
    // The signature headers went to the dead letters with the body.
    let connection = harness.broker.connection().await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let mut signed = 0;
    while let Some(message) = channel
        .basic_get(
            harness.topology.dead().as_str().into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
    {
        let table = message.delivery.properties.headers().as_ref();
        if headers::get_text(table, signing::SIGNATURE).is_some() {
            signed += 1;
        }
    }
    assert_eq!(signed, 2);
    harness.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reference_pointed_elsewhere_fails_auth_before_any_connection() {
    let harness = Harness::new("allowed-hosts").await;
    let fleet = Fleet::start(FleetSpec::default().with(DeviceKind::Dms, 1))
        .await
        .unwrap();
    let listener = Listener::start().await;
    let (user, password) = fleet.login();
    // The same login, bound to other hosts, and one bound to none.
    let credentials = CredentialStore::with_given([
        fleet_login(&fleet),
        Credentials::new("lab")
            .with("username", user)
            .with("password", password)
            .with("allowed_hosts", "10.0.0.0/8, dms.lab.example.net"),
        Credentials::new("unbound")
            .with("username", user)
            .with("password", password),
    ]);
    let worker = harness.start_worker("w1", credentials);
    let mut campaign = harness.campaign("allowed-hosts");
    campaign.policy.retry.max_attempts = 2;
    // Signed jobs, as the producer publishes them from an inventory that
    // points two references at the listener.
    let mut misdirected = fleet.devices()[0].clone();
    misdirected.id = "cpe-misdirected".into();
    misdirected.address = listener.url.clone();
    misdirected.credentials = "lab".into();
    let mut unbound = misdirected.clone();
    unbound.id = "cpe-unbound".into();
    unbound.credentials = "unbound".into();
    let devices = [fleet.devices()[0].clone(), misdirected, unbound];
    harness.publish(&campaign, &devices).await;
    let state = harness
        .wait_finished(&campaign.id, 3, Duration::from_secs(60))
        .await;
    worker.stop().await;

    let ending = |id: &str| state.outcome_of(id).unwrap().ending.clone();
    assert_eq!(ending(&devices[0].id).outcome, Outcome::Succeeded);
    let refused = ending("cpe-misdirected");
    assert_eq!(refused.outcome, Outcome::Failed);
    assert_eq!(refused.error_class, Some(ErrorClass::Auth));
    let error = refused.error.unwrap();
    assert!(
        error.contains("\"lab\"") && error.contains("127.0.0.1"),
        "{error}"
    );
    assert!(!error.contains(password), "{error}");
    let unset = ending("cpe-unbound");
    assert_eq!(unset.outcome, Outcome::Failed);
    assert_eq!(unset.error_class, Some(ErrorClass::Config));
    let error = unset.error.unwrap();
    assert!(
        error.contains("FLOTILLA_CREDENTIALS_UNBOUND_ALLOWED_HOSTS"),
        "{error}"
    );
    assert_eq!(
        listener.connections(),
        0,
        "credentials went to the listener"
    );
    harness.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_keys_rotate_old_and_new_accepted_new_signed() {
    let harness = Harness::new("rotation").await;
    let fleet = Fleet::start(FleetSpec::default().with(DeviceKind::Dms, 2))
        .await
        .unwrap();
    let (old_args, old) = job_key(harness.dir(), "old");
    let (new_args, _) = job_key(harness.dir(), "new");
    let both = KeyArgs {
        job_keys: Some(format!(
            "{},{}",
            old_args.job_keys.unwrap(),
            new_args.job_keys.clone().unwrap()
        )),
        signing_key_id: Some("new".into()),
    };
    let mut campaign = harness.campaign("rotation");
    // Polls wait in a delay queue, so the job is between workers there.
    campaign.policy.poll_interval = Duration::from_millis(500);
    let device = &fleet.devices()[0];
    // Published by a producer still signing with the old key.
    let body = serde_json::to_vec(&harness.job(&campaign, device)).unwrap();
    publish(&harness, &body, signed_headers(&old, &body)).await;

    let mut config = harness.worker_config("rotating");
    config.keys = both;
    let rotating = harness.start_worker_with(config, fleet_credentials(&fleet));
    harness
        .wait_until(&campaign.id, Duration::from_secs(30), "a step", |s| {
            s.device(&device.id).is_some_and(|d| d.steps() >= 2)
        })
        .await;
    rotating.stop().await;
    // What the rotating worker left in the queues it signed with the new
    // key: a worker that holds only that one finishes the job.
    let mut config = harness.worker_config("new-only");
    config.keys = new_args;
    let new_only = harness.start_worker_with(config, fleet_credentials(&fleet));
    let state = harness
        .wait_finished(&campaign.id, 1, Duration::from_secs(60))
        .await;
    assert_eq!(
        state.outcome_of(&device.id).unwrap().ending.outcome,
        Outcome::Succeeded
    );
    let steps = harness.step_events(&campaign.id).await;
    let by = |worker: &str| {
        steps
            .iter()
            .filter(|s| s.worker.as_deref() == Some(worker))
            .count()
    };
    assert!(by("rotating") >= 1 && by("new-only") >= 1, "{steps:?}");

    // Once the old key is gone, what it signed is refused, and ends no
    // device.
    let other = &fleet.devices()[1];
    let body = serde_json::to_vec(&harness.job(&campaign, other)).unwrap();
    publish(&harness, &body, signed_headers(&old, &body)).await;
    dead_letters(&harness, 1).await;
    new_only.stop().await;
    let letters = dead::list(&harness.broker, &harness.topology, None)
        .await
        .unwrap();
    assert_eq!(letters[0].reason, "unknown_key");
    assert_eq!(fleet.upgrades_of(&other.id), 0);
    assert!(
        dead_lettered_events(&harness, &campaign.id)
            .await
            .is_empty()
    );
    harness.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_images_outside_the_image_dir_are_refused() {
    let harness = Harness::new("image-dir").await;
    let fleet = Fleet::start(FleetSpec::default().with(DeviceKind::Sps, 2))
        .await
        .unwrap();
    // The harness campaign's SHA-256 is that of "test": a file outside
    // the image directory with the right checksum, and a link to it from
    // inside.
    let outside = harness.dir().join("not-an-image");
    std::fs::write(&outside, "test").unwrap();
    let link = harness.image_dir().join("link.iso");
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    let worker = harness.start_worker("w1", fleet_credentials(&fleet));
    let mut direct = harness.campaign("image-outside");
    direct.target.image_url = url::Url::from_file_path(&outside).unwrap();
    harness.publish(&direct, &fleet.devices()[..1]).await;
    let mut linked = harness.campaign("image-linked");
    linked.target.image_url = url::Url::from_file_path(&link).unwrap();
    harness.publish(&linked, &fleet.devices()[1..]).await;
    let direct_state = harness
        .wait_finished(&direct.id, 1, Duration::from_secs(60))
        .await;
    let linked_state = harness
        .wait_finished(&linked.id, 1, Duration::from_secs(60))
        .await;
    worker.stop().await;

    for (state, device) in [
        (&direct_state, &fleet.devices()[0]),
        (&linked_state, &fleet.devices()[1]),
    ] {
        let ending = &state.outcome_of(&device.id).unwrap().ending;
        assert_eq!(ending.outcome, Outcome::Failed, "{ending:?}");
        assert_eq!(ending.error_class, Some(ErrorClass::Config));
        let error = ending.error.as_deref().unwrap();
        assert!(error.contains("not under FLOTILLA_IMAGE_DIR"), "{error}");
        assert_eq!(fleet.get::<sps::Sps>(&device.id).unwrap().uploads(), 0);
    }
    harness.teardown().await;
}

#[tokio::test]
async fn a_worker_without_a_job_key_does_not_start() {
    let harness = Harness::new("no-key").await;
    let mut config = harness.worker_config("keyless");
    config.keys = KeyArgs::default();
    let error = flotilla_worker::run(config, CredentialStore::default(), std::future::pending())
        .await
        .unwrap_err();
    assert!(error.to_string().contains("FLOTILLA_JOB_KEYS"), "{error}");
    harness.teardown().await;
}
