//! Campaign control under load: `status` and `pause` latency while a large
//! rollout runs at full speed, and producer start time against the size of
//! the events stream.
//!
//! Latencies are those of the commands' work (what `flotilla-producer
//! status` and `pause` do after the process has started): reading the
//! campaign's state to a marker, and, for `pause`, sending the command. A
//! pause also reports when it took effect: when the controller's `paused`
//! decision is in the events stream (workers park the jobs on the command
//! itself, earlier).

use crate::stats::{Sample, ms};
use flotilla_common::{
    Decision, DeviceKind, EventBody,
    control::Command,
    stream::{Offset, StreamReader},
};
use flotilla_producer::{read_status, send_command, state::Phase};
use flotilla_sim::{Fleet, FleetSpec, faults::FaultSpec};
use flotilla_tests::{Harness, fleet_credentials};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub(crate) struct Args {
    /// A small run (2,000 devices; 0, 10k and 100k foreign events) that
    /// finishes in about a minute.
    #[arg(long)]
    quick: bool,
}

struct Sizes {
    devices: usize,
    histories: &'static [usize],
    pauses: usize,
}

const FULL: Sizes = Sizes {
    devices: 20_000,
    histories: &[0, 100_000, 1_000_000],
    pauses: 10,
};
const QUICK: Sizes = Sizes {
    devices: 2_000,
    histories: &[0, 10_000, 100_000],
    pauses: 3,
};

/// How often the status sampler asks.
const STATUS_EVERY: Duration = Duration::from_millis(250);
/// Time between one pause's resume and the next pause (and before the
/// first).
const PAUSE_EVERY: Duration = Duration::from_secs(1);

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let sizes = if args.quick { QUICK } else { FULL };
    rollout_latency(&sizes).await?;
    for &history in sizes.histories {
        start_time(history).await?;
    }
    Ok(())
}

fn fleet_spec(devices: usize) -> FleetSpec {
    FleetSpec {
        cpes_per_dms: 1000,
        faults: FaultSpec::NONE,
        request_latency: Duration::ZERO..=Duration::from_millis(2),
        upgrade_time: Duration::from_millis(500)..=Duration::from_millis(1500),
        ..FleetSpec::default()
    }
    .with(DeviceKind::Dms, devices)
}

/// Status and pause latency during a rollout of `sizes.devices` CPEs.
async fn rollout_latency(sizes: &Sizes) -> anyhow::Result<()> {
    let harness = Harness::new("bench-control").await;
    let fleet = Fleet::start(fleet_spec(sizes.devices)).await?;
    let workers = [
        harness.start_worker("bench-w1", fleet_credentials(&fleet)),
        harness.start_worker("bench-w2", fleet_credentials(&fleet)),
    ];
    let campaign = harness.campaign("bench-control");
    let started = Instant::now();
    let controller = tokio::spawn(
        harness
            .start_campaign(&campaign, fleet.devices())
            .finished(),
    );

    let mut status = Vec::new();
    let mut pause = Vec::new();
    let mut effect = Vec::new();
    let mut next_pause = Instant::now() + PAUSE_EVERY;
    while !controller.is_finished() {
        let asked = Instant::now();
        let (state, _) = read_status(&harness.broker, &harness.topology, &campaign.id).await?;
        status.push(asked.elapsed());
        let running = state.phase() == Phase::Running;
        let unfinished = (state.finished() as u64) < state.device_count();
        if pause.len() < sizes.pauses && running && unfinished && Instant::now() >= next_pause {
            let (command, took_effect) = pause_and_resume(&harness, &campaign.id).await?;
            pause.push(command);
            effect.push(took_effect);
            next_pause = Instant::now() + PAUSE_EVERY;
        }
        tokio::time::sleep(STATUS_EVERY.saturating_sub(asked.elapsed())).await;
    }
    let state = controller.await?;
    let took = started.elapsed();
    for worker in workers {
        worker.stop().await;
    }
    harness.teardown().await;

    println!(
        "rollout: {} CPEs, {} succeeded in {:.1} s ({} pause(s) of about a second)",
        sizes.devices,
        state.totals().succeeded,
        took.as_secs_f64(),
        pause.len()
    );
    println!("  status           {}", Sample::new(status).summary());
    println!("  pause (command)  {}", Sample::new(pause).summary());
    println!("  pause (decided)  {}", Sample::new(effect).summary());
    Ok(())
}

/// Pauses the campaign as `flotilla-producer pause` does, waits for the
/// controller's decision, then resumes it. Returns how long the command
/// took and how long until the decision was in the stream.
async fn pause_and_resume(
    harness: &Harness,
    campaign: &str,
) -> anyhow::Result<(Duration, Duration)> {
    let connection = harness.broker.connection().await?;
    let mut events =
        StreamReader::open(&connection, &harness.topology.events(), Offset::Next).await?;
    let asked = Instant::now();
    let (state, _) = read_status(&harness.broker, &harness.topology, campaign).await?;
    anyhow::ensure!(
        state.phase() == Phase::Running,
        "the campaign is not running"
    );
    send_command(
        &harness.broker,
        &harness.topology,
        campaign,
        Command::Pause,
        Some("benchmark".into()),
    )
    .await?;
    let command = asked.elapsed();
    wait_for_decision(&mut events, campaign, |d| {
        matches!(d, Decision::Paused { .. })
    })
    .await?;
    let took_effect = asked.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    send_command(
        &harness.broker,
        &harness.topology,
        campaign,
        Command::Resume,
        None,
    )
    .await?;
    wait_for_decision(&mut events, campaign, |d| matches!(d, Decision::Resumed)).await?;
    Ok((command, took_effect))
}

async fn wait_for_decision(
    events: &mut StreamReader,
    campaign: &str,
    wanted: impl Fn(&Decision) -> bool,
) -> anyhow::Result<()> {
    loop {
        let record = events
            .next()
            .await
            .ok_or_else(|| anyhow::anyhow!("the events stream closed"))??;
        let events = record.events().unwrap_or_default();
        if events.iter().any(|event| {
            event.campaign == campaign
                && matches!(&event.body, EventBody::Decision(decision) if wanted(&decision.decision))
        }) {
            return Ok(());
        }
    }
}

/// Time from a producer's start to its first published device, with
/// `history` foreign events already in the stream.
async fn start_time(history: usize) -> anyhow::Result<()> {
    let harness = Harness::new("bench-start").await;
    let filled = Instant::now();
    harness.write_filler(history).await;
    let fill = filled.elapsed();
    let fleet = Fleet::start(fleet_spec(100)).await?;
    let connection = harness.broker.connection().await?;
    let mut events =
        StreamReader::open(&connection, &harness.topology.events(), Offset::Next).await?;
    let campaign = harness.campaign("bench-start");
    let started = Instant::now();
    let controller = harness.start_campaign(&campaign, fleet.devices());
    loop {
        let record = events
            .next()
            .await
            .ok_or_else(|| anyhow::anyhow!("the events stream closed"))??;
        if record.events().unwrap_or_default().iter().any(|event| {
            event.campaign == campaign.id && matches!(event.body, EventBody::Published(_))
        }) {
            break;
        }
    }
    let first = started.elapsed();
    // No workers: the start is what is measured.
    controller.abort();
    harness.teardown().await;
    let rate = if fill.is_zero() || history == 0 {
        String::new()
    } else {
        format!(
            " (written at {:.0}k/s)",
            history as f64 / fill.as_secs_f64() / 1000.0
        )
    };
    println!(
        "start: {history:>9} foreign events{rate}: first device published after {:.0} ms",
        ms(first)
    );
    Ok(())
}
