//! One measured run: a fresh topology of its own, the simulated fleet, the
//! raw baseline on the run's own jobs queue, then real worker processes
//! and `flotilla-producer run` rolling the fleet out; afterwards the
//! campaign's events are read back and every outcome is checked against
//! the simulator.

use super::{
    process::{self, Histogram, RunEnv, Worker},
    raw,
};
use anyhow::Context;
use chrono::{DateTime, Utc};
use flotilla_common::{
    Broker, Decision, DeviceKind, EventBody, Job, JobPolicy, Topology,
    cli::BrokerArgs,
    inventory::InventoryWriter,
    stream::{Offset, StreamReader},
};
use flotilla_producer::CampaignState;
use flotilla_sim::{Fleet, FleetSpec, faults::FaultSpec};
use rand::Rng;
use std::{path::PathBuf, time::Duration};

const CAMPAIGN: &str = "bench-throughput";
/// How long a CPE's upgrade takes, but in the lateness run.
pub(crate) const UPGRADE: Duration = Duration::from_millis(600);
/// A worker's slots (`FLOTILLA_CONCURRENCY`'s default): the raw pipeline
/// runs as many messages in flight per worker.
pub(crate) const SLOTS_PER_WORKER: usize = 64;
/// Events the raw pipeline with events publishes per step: about what a
/// DMS CPE's delivery writes (seven events over two deliveries).
pub(crate) const RAW_EVENTS: usize = 3;
/// Longest quiet while reading the campaign's events back.
const READ_QUIET: Duration = Duration::from_secs(30);

/// The benchmark's fleet: DMS CPEs answering at once, each upgrade taking
/// `upgrade`, one in ten failing (FaultCode 9010).
pub(crate) fn fleet_spec(cpes: usize, upgrade: Duration) -> FleetSpec {
    FleetSpec {
        faults: FaultSpec {
            failure_ratio: 0.1,
            ..FaultSpec::NONE
        },
        request_latency: Duration::ZERO..=Duration::ZERO,
        upgrade_time: upgrade..=upgrade,
        ..FleetSpec::default()
    }
    .with(DeviceKind::Dms, cpes)
}

/// Where Flotilla's binaries are.
pub(crate) struct Binaries {
    pub worker: PathBuf,
    pub producer: PathBuf,
}

/// A run's own prefix (hence queues) on the broker, with the default delay
/// tiers (1 s first, as production's), and a directory for its files.
struct Stage {
    broker: Broker,
    topology: Topology,
    env: RunEnv,
}

impl Stage {
    async fn new(amqp_url: &str, fleet: &Fleet) -> anyhow::Result<Stage> {
        let suffix: u32 = rand::rng().random();
        // `test-`: CI deletes what an interrupted run leaves.
        let prefix = format!("test-bench-throughput-{suffix:08x}");
        let args = BrokerArgs {
            amqp_url: amqp_url.to_owned(),
            prefix: prefix.clone(),
            delay_tiers: ["1s", "5s", "30s", "2m", "10m"]
                .iter()
                .map(|tier| humantime::parse_duration(tier).expect("a valid tier"))
                .collect(),
            retention: Default::default(),
        };
        let broker = Broker::new(amqp_url, "flotilla-bench")?;
        let topology = args.topology();
        topology.declare(&broker).await?;
        let dir = std::env::temp_dir().join(&prefix);
        std::fs::create_dir_all(&dir)?;
        let (user, password) = fleet.login();
        let (keys, _) = flotilla_tests::job_key(&dir, "bench");
        Ok(Stage {
            broker,
            topology,
            env: RunEnv {
                amqp_url: amqp_url.to_owned(),
                prefix,
                dir,
                login: (user.to_owned(), password.to_owned()),
                job_keys: keys.job_keys.expect("job_key names its file"),
            },
        })
    }

    /// The campaign file and inventory of a rollout of `fleet`.
    /// `rate`: devices started per second, or as fast as it can.
    fn files(&self, fleet: &Fleet, rate: Option<f64>) -> anyhow::Result<(PathBuf, PathBuf)> {
        let (version, sha256) = fleet.release();
        let campaign = self.env.dir.join("campaign.toml");
        std::fs::write(
            &campaign,
            format!(
                "id = \"{CAMPAIGN}\"\n\
                 [target]\nversion = \"{version}\"\n\
                 image_url = \"http://files.example.net/cpe/{version}.bin\"\n\
                 sha256 = \"{sha256}\"\n\
                 [timing]\ndeadline = \"10m\"\nstep_timeout = \"30s\"\npoll_interval = \"1s\"\n{}",
                rate.map_or(String::new(), |rate| format!(
                    "[rate]\nper_minute = {}\n",
                    rate * 60.0
                ))
            ),
        )?;
        let inventory = self.env.dir.join("devices.csv");
        let mut writer = InventoryWriter::new(std::fs::File::create(&inventory)?)?;
        for device in fleet.devices() {
            writer.write(device)?;
        }
        writer.finish()?;
        Ok((campaign, inventory))
    }

    async fn teardown(self) {
        if let Ok(connection) = self.broker.connection().await {
            let _ = self.topology.delete(&connection).await;
        }
        let _ = std::fs::remove_dir_all(&self.env.dir);
    }
}

/// What one rollout measured.
pub(crate) struct Rollout {
    pub devices: usize,
    /// `flotilla-producer run`, start to exit (fan-out included).
    pub wall: Duration,
    pub steps: u64,
    /// Job messages the workers took (each one published by the producer
    /// or by a worker's hand-off).
    pub deliveries: u64,
    /// The campaign's records in the events stream.
    pub events: u64,
    /// The raw step pipeline on the same queue, as many in flight as the
    /// workers' slots.
    pub raw_steps_per_s: f64,
    /// The same with [`RAW_EVENTS`] event-sized messages published to the
    /// events stream at each step, all confirmed before the ack.
    pub raw_with_events_per_s: f64,
    pub worker_rss: u64,
    pub producer_rss: u64,
    pub lateness: Histogram,
    /// Differences from what the simulator did, in words.
    pub mismatches: Vec<String>,
}

impl Rollout {
    pub(crate) fn per_second(&self, count: f64) -> f64 {
        count / self.wall.as_secs_f64()
    }
}

/// How a rollout runs.
#[derive(Clone, Copy)]
pub(crate) struct Setting {
    pub cpes: usize,
    pub workers: usize,
    /// Devices the producer starts per second; `None`: all at once.
    pub rate: Option<f64>,
    /// How long each CPE's upgrade takes (it polls once a second until
    /// done).
    pub upgrade: Duration,
    pub raw_measure: Duration,
}

/// Rolls `setting.cpes` CPEs out with `setting.workers` worker processes.
pub(crate) async fn rollout(
    amqp_url: &str,
    binaries: &Binaries,
    setting: Setting,
) -> anyhow::Result<Rollout> {
    let fleet = Fleet::start(fleet_spec(setting.cpes, setting.upgrade)).await?;
    let stage = Stage::new(amqp_url, &fleet).await?;
    let result = rollout_on(&stage, &fleet, binaries, setting).await;
    stage.teardown().await;
    result
}

async fn rollout_on(
    stage: &Stage,
    fleet: &Fleet,
    binaries: &Binaries,
    setting: Setting,
) -> anyhow::Result<Rollout> {
    let Setting {
        workers,
        raw_measure,
        ..
    } = setting;
    let body = job_body(fleet)?;
    let raw_steps_per_s = raw::step_pipeline(
        &stage.broker,
        &stage.topology.jobs(),
        workers * SLOTS_PER_WORKER,
        &body,
        raw_measure,
        None,
    )
    .await
    .context("the raw step pipeline")?;
    let raw_with_events_per_s = raw::step_pipeline(
        &stage.broker,
        &stage.topology.jobs(),
        workers * SLOTS_PER_WORKER,
        &body,
        raw_measure,
        Some((&stage.topology.events(), RAW_EVENTS)),
    )
    .await
    .context("the raw step pipeline with events")?;

    let (campaign, inventory) = stage.files(fleet, setting.rate)?;
    let mut running = Vec::with_capacity(workers);
    for n in 0..workers {
        let name = format!("bench-worker-{}", n + 1);
        running.push(Worker::start(&stage.env, &binaries.worker, &name).await?);
    }
    let (code, wall, producer_rss) =
        process::run_producer(&stage.env, &binaries.producer, &campaign, &inventory).await?;
    let (mut deliveries, mut worker_rss, mut lateness) = (0, 0, Histogram::default());
    for worker in &running {
        let metrics = worker.metrics().await?;
        deliveries += metrics.value("flotilla_worker_deliveries_total") as u64;
        lateness.add(&metrics.buckets("flotilla_worker_poll_lateness_seconds"));
        worker_rss = worker_rss.max(worker.peak_rss()?);
    }
    for worker in running {
        worker.stop().await;
    }
    // 10: completed with failures, as one in ten CPEs fails.
    anyhow::ensure!(
        code == 10 || code == 0,
        "flotilla-producer run exited {code} (see {})",
        stage.env.dir.join("producer.log").display()
    );
    let read = read_campaign(&stage.broker, &stage.topology).await?;
    Ok(Rollout {
        devices: fleet.devices().len(),
        wall,
        steps: read.steps,
        deliveries,
        events: read.records,
        raw_steps_per_s,
        raw_with_events_per_s,
        worker_rss,
        producer_rss,
        lateness,
        mismatches: compare_with_simulator(&read.state, fleet),
    })
}

/// The body of a device's first job, as the producer would publish it:
/// the raw baselines carry messages of its size.
fn job_body(fleet: &Fleet) -> anyhow::Result<Vec<u8>> {
    let device = fleet.devices().first().context("an empty fleet")?;
    let (version, sha256) = fleet.release();
    let job = Job::new(
        CAMPAIGN,
        device.clone(),
        flotilla_common::Target {
            version: version.to_owned(),
            image_url: format!("http://files.example.net/cpe/{version}.bin").parse()?,
            sha256: sha256.to_owned(),
        },
        JobPolicy::default(),
    );
    Ok(serde_json::to_vec(&job)?)
}

/// What the events stream holds of the campaign.
struct Read {
    state: CampaignState,
    records: u64,
    steps: u64,
}

/// Reads the campaign's events from the first up to its `completed`
/// decision (its last record).
async fn read_campaign(broker: &Broker, topology: &Topology) -> anyhow::Result<Read> {
    let connection = broker.connection().await?;
    let mut reader = StreamReader::open(&connection, &topology.events(), Offset::First).await?;
    let mut read = Read {
        state: CampaignState::new(CAMPAIGN),
        records: 0,
        steps: 0,
    };
    loop {
        let record = tokio::time::timeout(READ_QUIET, reader.next())
            .await
            .context("no `completed` decision in the events stream")?
            .context("the events stream closed")??;
        let Ok(events) = record.events() else {
            continue;
        };
        if events.iter().all(|event| event.campaign != CAMPAIGN) {
            continue;
        }
        // Records, not events: what the stream is written in.
        read.records += 1;
        let mut completed = false;
        for event in events.iter().filter(|event| event.campaign == CAMPAIGN) {
            read.state.apply(event);
            match &event.body {
                EventBody::Step(_) => read.steps += 1,
                EventBody::Decision(decision) if decision.decision == Decision::Completed => {
                    completed = true;
                }
                _ => {}
            }
        }
        if completed {
            return Ok(read);
        }
    }
}

/// Every outcome must be the one the simulator's fate called for, no CPE
/// upgraded twice, no rule left enabled, no device ended twice.
fn compare_with_simulator(state: &CampaignState, fleet: &Fleet) -> Vec<String> {
    let mut mismatches = Vec::new();
    for device in fleet.devices() {
        match state.outcome_of(&device.id) {
            None => mismatches.push(format!("{}: no outcome reported", device.id)),
            Some(reported) => {
                if let Some(expected) = fleet.expectation(&device.id)
                    && let Err(difference) = expected.check(&reported.ending)
                {
                    mismatches.push(format!("{}: {difference}", device.id));
                }
            }
        }
        if fleet.upgrades_of(&device.id) > 1 {
            mismatches.push(format!(
                "{} upgraded {} times",
                device.id,
                fleet.upgrades_of(&device.id)
            ));
        }
    }
    let enabled = fleet.enabled_rules();
    if !enabled.is_empty() {
        mismatches.push(format!("{} upgrade rule(s) left enabled", enabled.len()));
    }
    for repeated in state.repeated_outcomes() {
        mismatches.push(format!("{} ended more than once", repeated.device));
    }
    mismatches
}

/// What one fan-out measured: the producer's jobs per second, and raw
/// confirmed publishes per second into the same jobs queue.
pub(crate) struct FanOut {
    pub jobs_per_s: f64,
    pub raw_per_s: f64,
}

/// The producer's fan-out alone (no workers): from its first `published`
/// event to the bench reading its last, against raw publishes of as many
/// job-sized messages into the same queue just before.
pub(crate) async fn fan_out(
    amqp_url: &str,
    binaries: &Binaries,
    cpes: usize,
) -> anyhow::Result<FanOut> {
    let fleet = Fleet::start(fleet_spec(cpes, UPGRADE)).await?;
    let stage = Stage::new(amqp_url, &fleet).await?;
    let result = fan_out_on(&stage, &fleet, binaries).await;
    stage.teardown().await;
    result
}

async fn fan_out_on(stage: &Stage, fleet: &Fleet, binaries: &Binaries) -> anyhow::Result<FanOut> {
    let devices = fleet.devices().len();
    let body = job_body(fleet)?;
    let raw_per_s = raw::publish_rate(&stage.broker, &stage.topology.jobs(), &body, devices)
        .await
        .context("raw publishes")?;
    let (campaign, inventory) = stage.files(fleet, None)?;
    let connection = stage.broker.connection().await?;
    let mut reader =
        StreamReader::open(&connection, &stage.topology.events(), Offset::First).await?;
    let mut producer =
        process::spawn_producer(&stage.env, &binaries.producer, &campaign, &inventory)?;
    let (mut first, mut published): (Option<DateTime<Utc>>, usize) = (None, 0);
    while published < devices {
        let record = tokio::time::timeout(READ_QUIET, reader.next())
            .await
            .context("the producer stopped publishing")?
            .context("the events stream closed")??;
        for event in record.events().unwrap_or_default() {
            if event.campaign == CAMPAIGN && matches!(event.body, EventBody::Published(_)) {
                first.get_or_insert(event.at);
                published += 1;
            }
        }
    }
    let took = (Utc::now() - first.context("nothing published")?)
        .to_std()
        .unwrap_or_default();
    let _ = producer.kill().await;
    Ok(FanOut {
        jobs_per_s: devices as f64 / took.as_secs_f64(),
        raw_per_s,
    })
}
