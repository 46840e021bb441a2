//! Forecasts against real runs: a campaign on the simulated fleet, through
//! the broker and a worker, finishes within 20% of what `plan` says, given
//! the per-device time measured from the run (as `plan --like` measures
//! it). The forecast's part is the schedule: the waves, the rate and its
//! ramp, and the caps.

use flotilla_common::DeviceKind;
use flotilla_producer::{
    Campaign, CampaignState,
    forecast::{self, Assumptions, Timeline},
    rollout::{
        pacer::{Ramp, Rate},
        plan::WaveSize,
    },
};
use flotilla_sim::{Fleet, FleetSpec, dms, faults::FaultSpec};
use flotilla_tests::{Harness, fleet_credentials};
use std::time::Duration;

fn cpes(n: usize, per_dms: usize) -> FleetSpec {
    FleetSpec {
        cpes_per_dms: per_dms,
        faults: FaultSpec::NONE,
        request_latency: Duration::ZERO..=Duration::from_millis(2),
        upgrade_time: Duration::from_millis(800)..=Duration::from_millis(1200),
        ..FleetSpec::default()
    }
    .with(DeviceKind::Dms, n)
}

/// Runs `campaign` over the whole fleet, then forecasts it from the
/// per-device times the run measured, and checks the two agree within 20%.
async fn run_and_forecast(
    harness: &Harness,
    fleet: &Fleet,
    campaign: &Campaign,
) -> (CampaignState, Timeline) {
    let worker = harness.start_worker("w1", fleet_credentials(fleet));
    let state = tokio::time::timeout(
        Duration::from_secs(120),
        harness.start_campaign(campaign, fleet.devices()).finished(),
    )
    .await
    .expect("the campaign finishes within two minutes");
    worker.stop().await;
    assert_eq!(state.totals().succeeded, fleet.devices().len() as u64);

    let first_start = state
        .devices()
        .filter_map(|(_, r)| r.published_at())
        .min()
        .unwrap();
    let last_end = state
        .devices()
        .filter_map(|(_, r)| r.finished_at())
        .max()
        .unwrap();
    let took = (last_end - first_start).to_std().unwrap();
    let assumptions = Assumptions {
        durations: forecast::measured_durations(&state),
        failure_ratio: 0.0,
        start: first_start,
    };
    let inventory = harness.dir().join(format!("{}.csv", campaign.id));
    let timeline = forecast::forecast(
        campaign,
        &inventory,
        fleet.devices().len() as u64,
        None,
        &assumptions,
    )
    .await
    .unwrap();
    let (real, forecast) = (took.as_secs_f64(), timeline.duration.as_secs_f64());
    assert!(
        (forecast - real).abs() <= 0.2 * real,
        "{}: took {real:.1}s, the forecast said {forecast:.1}s (per device {:?})",
        campaign.id,
        assumptions.durations
    );
    (state, timeline)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capped_campaign_takes_what_its_forecast_says() {
    let harness = Harness::new("forecast-caps").await;
    // Three DMS hosts, two CPEs at a time behind each.
    let fleet = Fleet::start(cpes(24, 8)).await.unwrap();
    let mut campaign = harness.campaign("forecast-caps");
    campaign.rollout.per_host = Some(2);
    let (_, timeline) = run_and_forecast(&harness, &fleet, &campaign).await;
    // The forecast's busiest hosts are the real ones' busiest moments.
    assert_eq!(timeline.hosts.len(), 3);
    for peak in &timeline.hosts {
        assert!(peak.binds, "{peak:?}");
        assert_eq!(peak.peak, 2);
    }
    for device in fleet.devices().iter().step_by(8) {
        let cpe = fleet.get::<dms::Cpe>(&device.id).unwrap();
        assert_eq!(cpe.dms().max_concurrent_upgrades(), 2);
    }
    harness.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ramped_campaign_takes_what_its_forecast_says() {
    let harness = Harness::new("forecast-ramp").await;
    let fleet = Fleet::start(cpes(30, 1000)).await.unwrap();
    let mut campaign = harness.campaign("forecast-ramp");
    campaign.rollout.rate = Some(Rate {
        per_minute: 60.0,
        ramp: Some(Ramp {
            factor: 2.0,
            every_successes: 5,
            max_per_minute: 480.0,
        }),
    });
    run_and_forecast(&harness, &fleet, &campaign).await;
    harness.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_in_waves_takes_what_its_forecast_says() {
    let harness = Harness::new("forecast-waves").await;
    let fleet = Fleet::start(cpes(20, 10)).await.unwrap();
    let mut campaign = harness.campaign("forecast-waves");
    campaign.rollout.waves = vec![
        WaveSize::Count(3),
        WaveSize::Percent(50.0),
        WaveSize::Percent(100.0),
    ];
    campaign.rollout.per_host = Some(3);
    let (state, timeline) = run_and_forecast(&harness, &fleet, &campaign).await;
    // Each wave starts after the one before has finished, in the forecast
    // as in the run.
    assert_eq!(timeline.waves.len(), 3);
    for pair in timeline.waves.windows(2) {
        assert!(pair[1].starts_at >= pair[0].ends_at, "{pair:?}");
    }
    assert_eq!(state.wave_count(), 3);
    harness.teardown().await;
}
