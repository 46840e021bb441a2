//! The integration-test harness: a broker, an isolated topology per test,
//! workers in-process or as real processes, and helpers to publish
//! campaigns and read their outcomes.
//!
//! Tests use the RabbitMQ named by `AMQP_URL`; without it, they start one
//! with testcontainers (that needs Docker), removed after the test process
//! exits (see `container.rs`). Each test gets its own queue prefix, so tests
//! sharing a broker never see each other's messages.

mod binaries;
mod container;
mod events;
mod handles;
mod keys;
pub mod otlp;
pub mod proxy;

pub use binaries::{binary, binary_blocking};
pub use handles::{ControllerHandle, WorkerHandle};
pub use keys::{FLEET_ALLOWED_HOSTS, TEST_KEY_ID, fleet_credentials, fleet_login, job_key};

use chrono::{DateTime, Utc};
use flotilla_common::{
    Broker, Device, Event, EventBody, JOB_MESSAGE_TYPE, Job, JobPolicy, Message, PublishedEvent,
    Publisher, RetryPolicy, Target, Topology,
    cli::BrokerArgs,
    inventory::InventoryWriter,
    signing::{KeyArgs, Keyring},
};
use flotilla_producer::{Campaign, RunSpec, check_inventory, run_campaign};
use flotilla_sim::Fleet;
use flotilla_worker::{CredentialStore, WorkerConfig};
use lapin::{options::QueueDeclareOptions, types::FieldTable};
use rand::Rng;
use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;

/// Delay tiers short enough for tests to run quickly.
pub const TEST_DELAY_TIERS: &str = "100ms,500ms,2s";

/// The broker for this test process.
pub async fn amqp_url() -> String {
    static URL: OnceCell<String> = OnceCell::const_new();
    URL.get_or_init(|| async {
        if let Ok(url) = std::env::var("AMQP_URL") {
            return url;
        }
        container::start_rabbitmq().await
    })
    .await
    .clone()
}

/// One test's view of the broker: its own prefix, hence its own queues.
pub struct Harness {
    pub args: BrokerArgs,
    pub broker: Broker,
    pub topology: Topology,
    dir: PathBuf,
    /// The test's job key, in a file of its directory, as a mounted
    /// Secret holds one.
    keys: KeyArgs,
    keyring: Keyring,
    /// When each campaign's job of each device was first published: a
    /// copy published again is the same job (a redelivery), so it keeps
    /// its stamp.
    stamps: std::sync::Mutex<std::collections::HashMap<(String, String), DateTime<Utc>>>,
    torn_down: bool,
}

impl Harness {
    pub async fn new(test: &str) -> Harness {
        Harness::on(test, amqp_url().await).await
    }

    /// A harness on another broker than the test process's (a cluster's
    /// nodes, say).
    pub async fn on(test: &str, amqp_url: String) -> Harness {
        let suffix: u32 = rand::rng().random();
        Harness::on_prefix(amqp_url, format!("test-{test}-{suffix:08x}")).await
    }

    /// A harness with a fixed prefix (only on a broker of the test's own:
    /// two tests with one prefix see each other's messages).
    pub async fn on_prefix(amqp_url: String, prefix: String) -> Harness {
        flotilla_common::ensure_crypto_provider();
        // `RUST_LOG=info cargo nextest run ...` shows what the in-process
        // workers and controllers did, for a failing test.
        if std::env::var_os("RUST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_test_writer()
                .try_init();
        }
        let args = BrokerArgs {
            amqp_url,
            prefix: prefix.clone(),
            delay_tiers: TEST_DELAY_TIERS.split(',').map(parse_duration).collect(),
            retention: Default::default(),
        };
        let broker = Broker::new(&args.amqp_url, &prefix).expect("the test AMQP URL is valid");
        let topology = args.topology();
        topology
            .declare(&broker)
            .await
            .expect("a fresh prefix declares cleanly");
        let dir = std::env::temp_dir().join(&prefix);
        std::fs::create_dir_all(&dir).expect("the temp dir is writable");
        let (keys, keyring) = job_key(&dir, TEST_KEY_ID);
        Harness {
            args,
            broker,
            topology,
            dir,
            keys,
            keyring,
            stamps: Default::default(),
            torn_down: false,
        }
    }

    /// A scratch directory for this test's files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The test workers' `FLOTILLA_IMAGE_DIR`: the `images` directory of
    /// [`Harness::dir`] (where the job key is not).
    pub fn image_dir(&self) -> PathBuf {
        let dir = self.dir.join("images");
        std::fs::create_dir_all(&dir).expect("the temp dir is writable");
        dir
    }

    /// The keyring the test's producer and workers sign and verify with.
    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    /// Where the test's job key is, as a process reads it.
    pub fn key_args(&self) -> KeyArgs {
        self.keys.clone()
    }

    /// The job key settings, for a producer or worker process.
    pub fn key_env(&self) -> Vec<(String, String)> {
        let mut env = vec![(
            flotilla_common::signing::ENV_JOB_KEYS.to_owned(),
            self.keys.job_keys.clone().unwrap_or_default(),
        )];
        if let Some(id) = &self.keys.signing_key_id {
            env.push((
                flotilla_common::signing::ENV_SIGNING_KEY_ID.to_owned(),
                id.clone(),
            ));
        }
        env
    }

    /// A job message for `body`, signed with the test's key.
    pub fn job_message(&self, body: &[u8]) -> Message {
        Message::new(JOB_MESSAGE_TYPE).signed(&self.keyring, body)
    }

    pub fn worker_config(&self, name: &str) -> WorkerConfig {
        let mut config = WorkerConfig::new(self.args.clone());
        config.keys = self.key_args();
        config.image_dir = Some(self.image_dir());
        config.name = Some(name.to_owned());
        config.shutdown_grace = Duration::from_secs(20);
        config
    }

    /// Starts an in-process worker.
    pub fn start_worker(&self, name: &str, credentials: CredentialStore) -> WorkerHandle {
        self.start_worker_with(self.worker_config(name), credentials)
    }

    /// Starts an in-process worker with its own settings.
    pub fn start_worker_with(
        &self,
        config: WorkerConfig,
        credentials: CredentialStore,
    ) -> WorkerHandle {
        let stop = CancellationToken::new();
        let trigger = stop.clone();
        let task = tokio::spawn(flotilla_worker::run(config, credentials, async move {
            trigger.cancelled().await
        }));
        WorkerHandle { stop, task }
    }

    /// A campaign with short timings, for `target_version`.
    pub fn campaign(&self, id: &str) -> Campaign {
        Campaign {
            id: id.to_owned(),
            target: Target {
                version: "7.2.1".to_owned(),
                image_url: "http://files.example.net/cpe/7.2.1.bin"
                    .parse()
                    .expect("a valid URL"),
                sha256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
                    .to_owned(),
            },
            policy: JobPolicy {
                deadline: Duration::from_secs(120),
                step_timeout: Duration::from_secs(10),
                poll_interval: Duration::from_millis(200),
                retry: RetryPolicy {
                    max_attempts: 10,
                    initial_backoff: Duration::from_millis(50),
                    max_backoff: Duration::from_secs(1),
                },
            },
            drivers: Default::default(),
            rollout: Default::default(),
            tls: Default::default(),
        }
    }

    /// Writes `devices` as an inventory file and returns its path.
    pub fn write_inventory(&self, name: &str, devices: &[Device]) -> PathBuf {
        let path = self.dir.join(name);
        let file = std::fs::File::create(&path).expect("the temp dir is writable");
        let mut writer = InventoryWriter::new(file).expect("writing an inventory header");
        for device in devices {
            writer.write(device).expect("writing an inventory row");
        }
        writer.finish().expect("flushing the inventory");
        path
    }

    /// Starts the campaign's controller (the producer's library) in the
    /// background, for `devices` written as an inventory file.
    pub fn start_campaign(&self, campaign: &Campaign, devices: &[Device]) -> ControllerHandle {
        let path = self.write_inventory(&format!("{}.csv", campaign.id), devices);
        let (_, problems) = check_inventory(&path, |e| panic!("bad test inventory: {e}"))
            .expect("the inventory is readable");
        assert_eq!(problems, 0);
        let fingerprint = flotilla_producer::fingerprint(&[&path], &format!("{campaign:?}"))
            .expect("the inventory is readable");
        let (broker, topology, campaign, devices, keyring) = (
            self.broker.clone(),
            self.topology.clone(),
            campaign.clone(),
            devices.len() as u64,
            self.keyring.clone(),
        );
        ControllerHandle {
            task: tokio::spawn(async move {
                let spec = RunSpec {
                    inventory: &path,
                    devices,
                    fingerprint,
                    only: None,
                    readiness: None,
                    keyring,
                };
                run_campaign(&broker, &topology, &campaign, spec, |_| {}).await
            }),
        }
    }

    /// The job of `device` in `campaign`, as the producer publishes it:
    /// the same stamp every time, as a redelivered copy carries.
    pub fn job(&self, campaign: &Campaign, device: &Device) -> Job {
        let mut job = Job::new(
            &campaign.id,
            device.clone(),
            campaign.target.clone(),
            campaign.policy.clone(),
        );
        let key = (campaign.id.clone(), device.id.clone());
        let mut stamps = self
            .stamps
            .lock()
            .expect("no test panicked holding the stamps");
        job.published_at = Some(*stamps.entry(key).or_insert_with(Utc::now));
        job
    }

    /// Publishes one job per device (with its `published` event) straight
    /// onto the queues, without a controller: for tests of the pipeline
    /// alone, and for duplicates of jobs as a redelivery leaves them (the
    /// same job, its publication stamp and all).
    pub async fn publish(&self, campaign: &Campaign, devices: &[Device]) {
        let connection = self.broker.connection().await.expect("broker reachable");
        let publisher = Publisher::open(&connection).await.expect("a publisher");
        for device in devices {
            let mut job = self.job(campaign, device);
            job.settings = campaign.settings_for(device.kind);
            job.tls = campaign.tls.profile_for(device.group.as_deref()).clone();
            let body = serde_json::to_vec(&job).expect("a job serializes");
            publisher
                .publish(&self.topology.jobs(), &body, self.job_message(&body))
                .await
                .expect("publishing a job");
            let event = Event::new(
                &campaign.id,
                EventBody::Published(PublishedEvent {
                    device: device.id.clone(),
                    kind: device.kind,
                    wave: None,
                }),
            );
            let body = serde_json::to_vec(&event).expect("an event serializes");
            publisher
                .publish(
                    &self.topology.events(),
                    &body,
                    Message::new(flotilla_common::EVENT_MESSAGE_TYPE),
                )
                .await
                .expect("publishing an event");
        }
    }

    /// Sends an operator's command for `campaign` on the control stream.
    pub async fn command(&self, campaign: &str, command: flotilla_common::control::Command) {
        flotilla_producer::send_command(&self.broker, &self.topology, campaign, command, None)
            .await
            .expect("the command is sent");
    }

    /// Messages ready in a queue (not counting those held by consumers).
    pub async fn ready_messages(&self, queue: &str) -> u32 {
        let connection = self.broker.connection().await.expect("broker reachable");
        let channel = connection.create_channel().await.expect("a channel");
        let declared = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("the queue exists");
        let _ = channel.close(200, "done".into()).await;
        declared.message_count()
    }

    /// Messages in the jobs queue and every delay queue.
    pub async fn circulating_jobs(&self) -> u32 {
        let mut total = self.ready_messages(&self.topology.jobs()).await;
        for tier in self.topology.delay_tiers() {
            total += self.ready_messages(&self.topology.delay_queue(*tier)).await;
        }
        total
    }

    /// Environment for a worker process of this test.
    pub fn worker_env(&self, fleet: &Fleet) -> Vec<(String, String)> {
        let (user, password) = fleet.login();
        let mut env = vec![
            ("AMQP_URL".into(), self.args.amqp_url.clone()),
            ("FLOTILLA_PREFIX".into(), self.args.prefix.clone()),
            ("FLOTILLA_DELAY_TIERS".into(), TEST_DELAY_TIERS.into()),
            ("FLOTILLA_METRICS_ADDR".into(), "off".into()),
            ("FLOTILLA_SHUTDOWN_GRACE".into(), "20s".into()),
            ("FLOTILLA_CREDENTIALS_SIM_USERNAME".into(), user.into()),
            ("FLOTILLA_CREDENTIALS_SIM_PASSWORD".into(), password.into()),
            (
                "FLOTILLA_CREDENTIALS_SIM_ALLOWED_HOSTS".into(),
                FLEET_ALLOWED_HOSTS.into(),
            ),
            ("RUST_LOG".into(), "info,lapin=warn".into()),
        ];
        env.push((
            "FLOTILLA_IMAGE_DIR".into(),
            self.image_dir().display().to_string(),
        ));
        env.extend(self.key_env());
        env
    }

    /// Starts `flotilla-worker` as a separate process, its log in the
    /// test's directory.
    pub async fn spawn_worker_process(&self, fleet: &Fleet, name: &str) -> tokio::process::Child {
        let log = std::fs::File::create(self.dir.join(format!("{name}.log"))).expect("a log file");
        tokio::process::Command::new(binary("flotilla-worker").await)
            .envs(self.worker_env(fleet))
            .env("FLOTILLA_WORKER_NAME", name)
            .stdout(Stdio::from(log.try_clone().expect("a log handle")))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .expect("starting flotilla-worker")
    }

    /// The log a worker process wrote.
    pub fn worker_log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Deletes the test's queues and files.
    pub async fn teardown(mut self) {
        if let Ok(connection) = self.broker.connection().await {
            let _ = self.topology.delete(&connection).await;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        self.torn_down = true;
    }
}

impl Drop for Harness {
    /// A test that failed never reached `teardown`. Its streams cannot
    /// expire, and enough of them left on a shared broker exhaust its file
    /// descriptors until it accepts no more connections, failing every
    /// later test. So a failed test deletes its queues too, from a thread
    /// of its own because the test's runtime may be unwinding.
    fn drop(&mut self) {
        if self.torn_down {
            return;
        }
        let url = self.args.amqp_url.clone();
        let topology = self.topology.clone();
        let cleanup = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async {
                let delete = async {
                    let broker = Broker::new(&url, "test-cleanup").ok()?;
                    let connection = broker.connection().await.ok()?;
                    topology.delete(&connection).await.ok()
                };
                let _ = tokio::time::timeout(Duration::from_secs(10), delete).await;
            });
        });
        let _ = cleanup.join();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn parse_duration(text: &str) -> Duration {
    match text.strip_suffix("ms") {
        Some(ms) => Duration::from_millis(ms.parse().expect("a number of milliseconds")),
        None => Duration::from_secs(
            text.trim_end_matches('s')
                .parse()
                .expect("a number of seconds"),
        ),
    }
}

/// The value of the metric `name` (a series without labels) that the
/// process serving `/metrics` at `addr` reports now, if it answers.
pub async fn scrape(addr: std::net::SocketAddr, name: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))?
        .parse()
        .ok()
}

/// Polls `condition` every 50 ms until it holds, or panics after `within`.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
