//! Real jobs among poison: how much a thousand messages no worker can
//! process (undecodable, another version, an unknown kind, an unknown
//! step) slow the real jobs around them, against a clean run of the same
//! fleet. The issue's target: within 20%.

use flotilla_common::{DeviceKind, Job, Publisher};
use flotilla_sim::{Fleet, FleetSpec, faults::FaultSpec};
use flotilla_tests::{Harness, fleet_credentials};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub(crate) struct Args {
    /// 500 devices and one run each instead of 2,000 and three.
    #[arg(long)]
    quick: bool,
}

const POISON: usize = 1_000;

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let (devices, runs) = if args.quick { (500, 1) } else { (2_000, 3) };
    let mut clean = Vec::new();
    let mut poisoned = Vec::new();
    for _ in 0..runs {
        clean.push(rollout(devices, 0).await?);
        poisoned.push(rollout(devices, POISON).await?);
    }
    let (clean, poisoned) = (median(clean), median(poisoned));
    let rate = |took: Duration| devices as f64 / took.as_secs_f64();
    println!(
        "poison: {devices} CPEs, median of {runs}: clean {:.1} s ({:.0} devices/s), \
         with {POISON} poison messages {:.1} s ({:.0} devices/s): {:.0}% of clean",
        clean.as_secs_f64(),
        rate(clean),
        poisoned.as_secs_f64(),
        rate(poisoned),
        100.0 * rate(poisoned) / rate(clean)
    );
    Ok(())
}

fn median(mut took: Vec<Duration>) -> Duration {
    took.sort();
    took[took.len() / 2]
}

/// Publishes `devices` real jobs with `poison` messages, half before and
/// half after them, and times one worker from its start until every real
/// device has finished.
async fn rollout(devices: usize, poison: usize) -> anyhow::Result<Duration> {
    let harness = Harness::new("bench-poison").await;
    let fleet = Fleet::start(
        FleetSpec {
            cpes_per_dms: 1000,
            faults: FaultSpec::NONE,
            request_latency: Duration::ZERO..=Duration::ZERO,
            upgrade_time: Duration::from_millis(300)..=Duration::from_millis(300),
            ..FleetSpec::default()
        }
        .with(DeviceKind::Dms, devices),
    )
    .await?;
    let campaign = harness.campaign("bench-poison");
    let bodies = poison_bodies(&campaign, &fleet)?;
    let connection = harness.broker.connection().await?;
    let publisher = Publisher::open(&connection).await?;
    let jobs = harness.topology.jobs();
    let publish_poison = |count: usize| {
        let (publisher, jobs, bodies, harness) = (&publisher, &jobs, &bodies, &harness);
        async move {
            // Signed: poison from the producer's side, not a forgery.
            for body in bodies.iter().cycle().take(count) {
                publisher
                    .publish(jobs, body, harness.job_message(body))
                    .await?;
            }
            anyhow::Ok(())
        }
    };
    publish_poison(poison / 2).await?;
    harness.publish(&campaign, fleet.devices()).await;
    publish_poison(poison - poison / 2).await?;

    let started = Instant::now();
    let worker = harness.start_worker("bench-poison", fleet_credentials(&fleet));
    let state = harness
        .wait_finished(&campaign.id, devices, Duration::from_secs(600))
        .await;
    let took = started.elapsed();
    worker.stop().await;
    anyhow::ensure!(
        state.totals().succeeded as usize == devices,
        "{} of {devices} devices succeeded",
        state.totals().succeeded
    );
    let dead = harness.ready_messages(&harness.topology.dead()).await as usize;
    anyhow::ensure!(dead == poison, "{dead} dead letters, not {poison}");
    harness.teardown().await;
    Ok(took)
}

/// One body of each sort; those that name a campaign name another one.
fn poison_bodies(
    campaign: &flotilla_producer::Campaign,
    fleet: &Fleet,
) -> anyhow::Result<Vec<Vec<u8>>> {
    let valid = serde_json::to_value(Job::new(
        "bench-poison-elsewhere",
        fleet.devices()[0].clone(),
        campaign.target.clone(),
        campaign.policy.clone(),
    ))?;
    let mut unknown_kind = valid.clone();
    unknown_kind["device"]["kind"] = "toaster".into();
    let mut unknown_step = valid;
    unknown_step["step"] = "flash_the_bios".into();
    Ok(vec![
        b"\x00\x9f not json".to_vec(),
        br#"{"v": 99, "campaign": "bench-poison-elsewhere"}"#.to_vec(),
        serde_json::to_vec(&unknown_kind)?,
        serde_json::to_vec(&unknown_step)?,
    ])
}
