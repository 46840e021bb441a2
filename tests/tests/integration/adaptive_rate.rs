//! The adaptive rate against a real fleet: a DMS host that turns slow
//! mid-campaign gets fewer starts, and its full rate back once it
//! recovers, while the other host keeps its rate.

use chrono::{DateTime, Utc};
use flotilla_common::{Decision, DeviceKind, control::Command};
use flotilla_producer::{
    CampaignState,
    rollout::{adaptive::AdaptiveRate, pacer::Rate},
};
use flotilla_sim::{Fleet, FleetSpec, faults::FaultSpec};
use flotilla_tests::{Harness, fleet_credentials};
use std::{collections::HashMap, net::SocketAddr, time::Duration};

const WINDOW: Duration = Duration::from_secs(2);

/// The adaptive rate's changes of `host`: (from, to) per minute.
fn changes(state: &CampaignState, host: &str) -> Vec<(f64, Option<f64>)> {
    state
        .decisions()
        .iter()
        .filter_map(|d| match &d.decision {
            Decision::RateChanged(change) if change.host == host => {
                Some((change.from_per_minute, change.to_per_minute))
            }
            _ => None,
        })
        .collect()
}

/// Devices behind `host` started per second in `[from, to)`.
fn starts_per_second(
    state: &CampaignState,
    host_of: &HashMap<String, String>,
    host: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> f64 {
    let started = state
        .devices()
        .filter(|(id, _)| host_of.get(*id).map(String::as_str) == Some(host))
        .filter_map(|(_, record)| record.published_at())
        .filter(|at| *at >= from && *at < to)
        .count();
    started as f64 / (to - from).as_seconds_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dms_that_slows_down_gets_fewer_starts_until_it_recovers_and_the_other_keeps_its_rate() {
    let harness = Harness::new("adaptive").await;
    let spec = FleetSpec {
        cpes_per_dms: 200,
        faults: FaultSpec::NONE,
        request_latency: Duration::ZERO..=Duration::from_millis(2),
        upgrade_time: Duration::from_millis(100)..=Duration::from_millis(300),
        ..FleetSpec::default()
    }
    .with(DeviceKind::Dms, 400);
    let fleet = Fleet::start(spec).await.unwrap();
    let host_of: HashMap<String, String> = fleet
        .devices()
        .iter()
        .map(|d| (d.id.clone(), flotilla_common::job::host_key(&d.address)))
        .collect();
    let mut hosts: Vec<String> = host_of.values().cloned().collect();
    hosts.sort();
    hosts.dedup();
    let [slow, steady] = <[String; 2]>::try_from(hosts).expect("two DMS hosts");
    let slow_addr: SocketAddr = slow.parse().unwrap();

    let worker = harness.start_worker("w1", fleet_credentials(&fleet));
    let mut campaign = harness.campaign("adaptive");
    campaign.rollout.rate = Some(Rate {
        per_minute: 600.0,
        ramp: None,
    });
    campaign.rollout.adaptive = Some(AdaptiveRate {
        window: WINDOW,
        p95_over: Duration::from_millis(250),
        // Only latency is at stake here.
        error_ratio_over: 0.5,
        decrease: 0.5,
        // Back at full rate after one healthy window.
        increase: 600.0,
        min_calls: 10,
        min_per_minute: 1.0,
    });
    // The two hosts' devices alternate in the inventory, so both start at
    // the same pace (devices start in inventory order).
    let (mut first, mut second): (Vec<_>, Vec<_>) = fleet
        .devices()
        .iter()
        .cloned()
        .partition(|d| host_of[&d.id] == slow);
    let mut inventory = Vec::new();
    while !first.is_empty() || !second.is_empty() {
        inventory.extend(first.pop());
        inventory.extend(second.pop());
    }
    let controller = harness.start_campaign(&campaign, &inventory);
    let id = campaign.id.as_str();

    let began = harness
        .wait_until(id, Duration::from_secs(30), "40 devices started", |s| {
            s.totals().published >= 40
        })
        .await
        .devices()
        .filter_map(|(_, r)| r.published_at())
        .min()
        .unwrap();
    assert!(fleet.slow_down(slow_addr, Duration::from_millis(800)));
    let slowed_at = Utc::now();

    harness
        .wait_until(id, Duration::from_secs(20), "a cut of the slow host", |s| {
            changes(s, &slow)
                .iter()
                .any(|(from, to)| to.is_some_and(|to| to < *from))
        })
        .await;
    tokio::time::sleep(2 * WINDOW).await;
    assert!(fleet.slow_down(slow_addr, Duration::ZERO));
    let recovered_at = Utc::now();

    harness
        .wait_until(
            id,
            Duration::from_secs(30),
            "the slow host's limit lifted",
            |s| changes(s, &slow).last().is_some_and(|(_, to)| to.is_none()),
        )
        .await;
    let lifted_at = Utc::now();
    tokio::time::sleep(2 * WINDOW).await;
    let stopped_at = Utc::now();
    harness.command(id, Command::Cancel).await;
    let state = tokio::time::timeout(Duration::from_secs(60), controller.finished())
        .await
        .unwrap();
    worker.stop().await;

    let cut = changes(&state, &slow);
    assert!(
        changes(&state, &steady).is_empty(),
        "the steady host was never changed: {:?}",
        changes(&state, &steady)
    );
    let reasons: Vec<&str> = state
        .decisions()
        .iter()
        .filter(|d| matches!(d.decision, Decision::RateChanged(_)))
        .map(|d| d.reason.as_str())
        .collect();
    assert!(
        reasons[0].starts_with(&format!("{slow}: "))
            && reasons[0].contains("starts per minute, p95"),
        "{reasons:?}"
    );
    let (full, _) = cut[0];
    assert!(
        full > 100.0,
        "the slow host ran at {full} starts a minute before"
    );
    let status = flotilla_producer::report::status(&state);
    assert!(status.contains("rate changed"), "{status}");

    let rate = |host: &str, from, to| starts_per_second(&state, &host_of, host, from, to);
    // Judged over the calls of one window, and cut at the first review
    // after it: from then until it recovered, it started fewer.
    let limited_from = slowed_at + 2 * WINDOW;
    let (slow_before, slow_limited) = (
        rate(&slow, began, slowed_at),
        rate(&slow, limited_from, recovered_at),
    );
    assert!(
        slow_limited < 0.75 * slow_before,
        "the slow host started {slow_limited:.1}/s while limited, {slow_before:.1}/s before ({reasons:?})"
    );
    let (steady_before, steady_meanwhile) = (
        rate(&steady, began, slowed_at),
        rate(&steady, limited_from, recovered_at),
    );
    assert!(
        steady_meanwhile >= 0.8 * steady_before,
        "the steady host started {steady_meanwhile:.1}/s while the other was limited, \
         {steady_before:.1}/s before"
    );
    let slow_after = rate(&slow, lifted_at, stopped_at);
    assert!(
        slow_after >= 0.75 * slow_before,
        "back at full rate: {slow_after:.1}/s after its limit was lifted, {slow_before:.1}/s before \
         ({reasons:?})"
    );
    harness.teardown().await;
}
