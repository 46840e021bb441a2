//! Campaign control: waves and gates, failure budgets, the start rate and
//! its ramp, caps shared between campaigns, pause/resume/cancel, the
//! maintenance window, and a producer that crashes and resumes.

use flotilla_common::DeviceKind;
use flotilla_common::{Decision, EventBody, Outcome, PauseCause, control::Command};
use flotilla_producer::{
    campaign::Budget,
    rollout::{
        pacer::{Ramp, Rate},
        plan::WaveSize,
        window::Window,
    },
    send_command,
    state::Phase,
};
use flotilla_sim::dms;
use flotilla_sim::{Fleet, FleetSpec, faults::FaultSpec};
use flotilla_tests::{Harness, fleet_credentials};
use std::{collections::HashMap, time::Duration};

fn cpes(n: usize, upgrade_ms: (u64, u64), faults: FaultSpec) -> FleetSpec {
    FleetSpec {
        cpes_per_dms: 1000,
        faults,
        request_latency: Duration::ZERO..=Duration::from_millis(2),
        upgrade_time: Duration::from_millis(upgrade_ms.0)..=Duration::from_millis(upgrade_ms.1),
        ..FleetSpec::default()
    }
    .with(DeviceKind::Dms, n)
}

fn decisions(state: &flotilla_producer::CampaignState) -> Vec<Decision> {
    state
        .decisions()
        .iter()
        .map(|d| d.decision.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_over_its_failure_budget_pauses_the_campaign_until_resumed() {
    let harness = Harness::new("canary").await;
    let faults = FaultSpec {
        failure_ratio: 0.4,
        only_first: Some(5),
        ..FaultSpec::NONE
    };
    let fleet = Fleet::start(cpes(30, (100, 400), faults)).await.unwrap();
    let worker = harness.start_worker("w1", fleet_credentials(&fleet));
    let mut campaign = harness.campaign("canary");
    campaign.rollout.waves = vec![
        WaveSize::Count(5),
        WaveSize::Percent(50.0),
        WaveSize::Percent(100.0),
    ];
    campaign.rollout.wave_budget = Some(Budget {
        ratio: 0.2,
        min_finished: 5,
    });
    let controller = harness.start_campaign(&campaign, fleet.devices());

    let paused = harness
        .wait_until(&campaign.id, Duration::from_secs(60), "a pause", |s| {
            matches!(s.phase(), Phase::Paused(_))
        })
        .await;
    assert_eq!(paused.phase(), Phase::Paused(PauseCause::WaveBudget));
    let pause = paused.decisions().last().unwrap();
    assert!(
        pause
            .reason
            .contains("2 of 5 finished devices failed, more than 20%"),
        "{}",
        pause.reason
    );
    assert_eq!(pause.counts.wave_failed, 2);
    assert_eq!(pause.thresholds.failure_ratio, Some(0.2));
    // Nothing beyond the canary was started, and nothing more is while paused.
    assert_eq!(paused.published(), 5);
    let status = flotilla_producer::report::status(&paused);
    assert!(status.contains("PAUSED (wave failure budget)"), "{status}");
    let still = harness.all_events(&campaign.id).await;
    assert_eq!(still.published(), 5);

    harness.command(&campaign.id, Command::Resume).await;
    let state = tokio::time::timeout(Duration::from_secs(60), controller.finished())
        .await
        .unwrap();
    worker.stop().await;
    assert_eq!(state.phase(), Phase::Completed);
    assert_eq!(state.finished(), 30);
    assert_eq!(state.totals().failed, 2);
    let kinds: Vec<String> = state
        .decisions()
        .iter()
        .map(|d| flotilla_producer::report::decision_name(&d.decision))
        .collect();
    assert_eq!(
        kinds,
        [
            "started",
            "wave 1 start",
            "paused",
            "resumed",
            "wave 1 gate",
            "wave 2 start",
            "wave 2 gate",
            "wave 3 start",
            "completed"
        ]
    );
    harness.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ramp_starts_devices_at_the_configured_rates() {
    let harness = Harness::new("ramp").await;
    let fleet = Fleet::start(cpes(30, (50, 150), FaultSpec::NONE))
        .await
        .unwrap();
    let worker = harness.start_worker("w1", fleet_credentials(&fleet));
    let mut campaign = harness.campaign("ramp");
    let rate = Rate {
        per_minute: 120.0,
        ramp: Some(Ramp {
            factor: 2.0,
            every_successes: 5,
            max_per_minute: 480.0,
        }),
    };
    campaign.rollout.rate = Some(rate.clone());
    let state = harness
        .start_campaign(&campaign, fleet.devices())
        .finished()
        .await;
    worker.stop().await;

    let mut starts: Vec<_> = state
        .devices()
        .filter_map(|(_, r)| r.published_at())
        .collect();
    let mut successes: Vec<_> = state
        .devices()
        .filter(|(_, r)| r.outcome() == Some(Outcome::Succeeded))
        .filter_map(|(_, r)| r.finished_at())
        .collect();
    starts.sort();
    successes.sort();
    assert_eq!(starts.len(), 30);
    // At most two starts per interval of the rate in effect (one interval
    // of catching up is allowed): every third start is at least one
    // interval after the first, less a tolerance.
    for i in 2..starts.len() {
        let succeeded_before = successes.iter().filter(|t| **t < starts[i - 2]).count() as u64;
        let interval = 60.0 / rate.per_minute_after(succeeded_before);
        let span = (starts[i] - starts[i - 2]).num_milliseconds() as f64 / 1000.0;
        assert!(
            span >= interval * 0.9,
            "starts {} to {i} took {span}s, the rate allows {interval}s",
            i - 2
        );
    }
    // And the ramp happened: the last starts come much faster than the first.
    let gap =
        |a: usize, b: usize| (starts[b] - starts[a]).num_milliseconds() as f64 / (b - a) as f64;
    let (early, late) = (gap(0, 4), gap(25, 29));
    assert!(
        early >= 450.0,
        "early starts every {early}ms, the base rate is one per 500ms"
    );
    assert!(
        late <= early * 0.6,
        "no ramp: early every {early}ms, late every {late}ms"
    );
    harness.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cap_shared_by_two_campaigns_is_never_exceeded() {
    let harness = Harness::new("caps").await;
    let fleet = Fleet::start(cpes(40, (300, 600), FaultSpec::NONE))
        .await
        .unwrap();
    let workers = [
        harness.start_worker("w1", fleet_credentials(&fleet)),
        harness.start_worker("w2", fleet_credentials(&fleet)),
    ];
    let (first_half, second_half) = fleet.devices().split_at(20);
    let mut a = harness.campaign("caps-a");
    a.rollout.per_host = Some(4);
    let mut b = harness.campaign("caps-b");
    b.rollout.per_host = Some(4);
    let runs = [
        harness.start_campaign(&a, first_half),
        harness.start_campaign(&b, second_half),
    ];
    for run in runs {
        let state = tokio::time::timeout(Duration::from_secs(120), run.finished())
            .await
            .unwrap();
        assert_eq!(state.totals().succeeded, 20);
    }
    for worker in workers {
        worker.stop().await;
    }
    let dms = fleet.get::<dms::Cpe>(&fleet.devices()[0].id).unwrap().dms();
    // Both campaigns upgrade CPEs behind one DMS; together they stay at 4,
    // and the cap was what held them back.
    assert_eq!(dms.max_concurrent_upgrades(), 4);
    harness.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_parks_every_job_without_calling_devices_and_resume_finishes() {
    let harness = Harness::new("pause").await;
    let fleet = Fleet::start(cpes(20, (1500, 2500), FaultSpec::NONE))
        .await
        .unwrap();
    let worker = harness.start_worker("w1", fleet_credentials(&fleet));
    let campaign = harness.campaign("pause");
    let controller = harness.start_campaign(&campaign, fleet.devices());
    harness
        .wait_until(
            &campaign.id,
            Duration::from_secs(30),
            "20 devices started",
            |s| s.published() == 20,
        )
        .await;
    send_command(
        &harness.broker,
        &harness.topology,
        &campaign.id,
        Command::Pause,
        Some("test".into()),
    )
    .await
    .unwrap();
    harness
        .wait_until(
            &campaign.id,
            Duration::from_secs(30),
            "the pause decision",
            |s| s.phase() == Phase::Paused(PauseCause::Operator),
        )
        .await;
    // Steps under way when the command arrived may finish; then silence.
    let dms = fleet.get::<dms::Cpe>(&fleet.devices()[0].id).unwrap().dms();
    let settle_by = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut before = dms.requests();
    loop {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let now = dms.requests();
        if now == before {
            break;
        }
        assert!(
            tokio::time::Instant::now() < settle_by,
            "the paused campaign kept calling its devices"
        );
        before = now;
    }
    let parked_at = dms.requests();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        dms.requests(),
        parked_at,
        "a paused campaign called its devices"
    );

    harness.command(&campaign.id, Command::Resume).await;
    let state = tokio::time::timeout(Duration::from_secs(60), controller.finished())
        .await
        .unwrap();
    worker.stop().await;
    assert_eq!(state.totals().succeeded, 20);
    assert!(decisions(&state).contains(&Decision::Resumed));
    harness.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_joining_while_commands_keep_coming_knows_every_earlier_pause() {
    let harness = Harness::new("busy-control").await;
    let fleet = Fleet::start(cpes(8, (200, 400), FaultSpec::NONE))
        .await
        .unwrap();
    let campaign = harness.campaign("busy-control");
    harness.command(&campaign.id, Command::Pause).await;
    harness.publish(&campaign, fleet.devices()).await;
    // Another campaign's operator never stops typing: the control stream
    // is never quiet while the worker joins.
    let typing = tokio_util::sync::CancellationToken::new();
    let noise = tokio::spawn({
        let (broker, topology, typing) = (
            harness.broker.clone(),
            harness.topology.clone(),
            typing.clone(),
        );
        async move {
            for command in [Command::Pause, Command::Resume].into_iter().cycle() {
                send_command(&broker, &topology, "someone-else", command, None)
                    .await
                    .unwrap();
                tokio::select! {
                    _ = typing.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(40)) => {}
                }
            }
        }
    });
    let metrics_addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut config = harness.worker_config("joins-late");
    config.metrics_addr = flotilla_worker::Listen::On(metrics_addr);
    let worker = harness.start_worker_with(config, fleet_credentials(&fleet));
    flotilla_tests::eventually(Duration::from_secs(20), "parked jobs", || async {
        flotilla_tests::scrape(metrics_addr, "flotilla_worker_parked_total")
            .await
            .is_some_and(|n| n >= 8.0)
    })
    .await;
    let dms = fleet.get::<dms::Cpe>(&fleet.devices()[0].id).unwrap().dms();
    assert_eq!(dms.requests(), 0, "a paused campaign called its devices");

    harness.command(&campaign.id, Command::Resume).await;
    let state = harness
        .wait_finished(&campaign.id, 8, Duration::from_secs(60))
        .await;
    typing.cancel();
    noise.await.unwrap();
    worker.stop().await;
    assert_eq!(state.totals().succeeded, 8);
    harness.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_mid_campaign_cleans_up_every_job_and_leaves_nothing_running() {
    let harness = Harness::new("cancel").await;
    let fleet = Fleet::start(cpes(60, (800, 1500), FaultSpec::NONE))
        .await
        .unwrap();
    let worker = harness.start_worker("w1", fleet_credentials(&fleet));
    let mut campaign = harness.campaign("cancel");
    campaign.rollout.rate = Some(Rate {
        per_minute: 600.0,
        ramp: None,
    });
    let controller = harness.start_campaign(&campaign, fleet.devices());
    harness
        .wait_until(
            &campaign.id,
            Duration::from_secs(60),
            "a first success",
            |s| s.totals().succeeded >= 1,
        )
        .await;
    harness.command(&campaign.id, Command::Cancel).await;
    let state = tokio::time::timeout(Duration::from_secs(60), controller.finished())
        .await
        .unwrap();
    worker.stop().await;

    assert_eq!(state.finished(), 60, "every device has an outcome");
    let repeated = state.repeated_outcomes();
    assert!(repeated.is_empty(), "devices ended twice: {repeated:?}");
    let mut by_step: HashMap<(Outcome, String), usize> = HashMap::new();
    for finished in state.outcomes() {
        *by_step
            .entry((finished.ending.outcome, finished.last_step.clone()))
            .or_default() += 1;
    }
    let not_started = by_step
        .get(&(Outcome::Cancelled, "not_started".into()))
        .copied()
        .unwrap_or(0);
    let cleaned_up = by_step
        .get(&(Outcome::Cancelled, "deactivate_rule".into()))
        .copied()
        .unwrap_or(0);
    assert!(
        not_started > 0,
        "the rate left devices unstarted: {by_step:?}"
    );
    assert!(cleaned_up > 0, "jobs in flight were cancelled: {by_step:?}");
    assert_eq!(fleet.enabled_rules(), Vec::<String>::new());
    assert_eq!(harness.circulating_jobs().await, 0);
    assert_eq!(state.phase(), Phase::Completed);
    harness.teardown().await;
}

#[tokio::test]
async fn a_closed_maintenance_window_starts_nothing() {
    let harness = Harness::new("window").await;
    let fleet = Fleet::start(cpes(10, (100, 200), FaultSpec::NONE))
        .await
        .unwrap();
    let mut campaign = harness.campaign("window");
    // A one-hour window three days from now: closed now, whatever the time.
    let day = (chrono::Utc::now() + chrono::Duration::days(3))
        .format("%a")
        .to_string()
        .to_lowercase();
    campaign.rollout.window = Some(Window::parse(&[day], "03:00", "04:00", "UTC").unwrap());
    let controller = harness.start_campaign(&campaign, fleet.devices());
    let waiting = harness
        .wait_until(
            &campaign.id,
            Duration::from_secs(30),
            "the window decision",
            |s| {
                s.decisions()
                    .iter()
                    .any(|d| matches!(d.decision, Decision::WindowClosed { .. }))
            },
        )
        .await;
    assert_eq!(waiting.published(), 0);
    // Cancelling records every device as not started.
    harness.command(&campaign.id, Command::Cancel).await;
    let state = controller.finished().await;
    assert_eq!(state.published(), 0);
    assert_eq!(state.totals().cancelled, 10);
    assert_eq!(harness.ready_messages(&harness.topology.jobs()).await, 0);
    harness.teardown().await;
}

#[tokio::test]
async fn a_second_controller_for_a_running_campaign_is_refused() {
    let harness = Harness::new("twoctl").await;
    let fleet = Fleet::start(cpes(3, (100, 200), FaultSpec::NONE))
        .await
        .unwrap();
    let mut campaign = harness.campaign("twoctl");
    let day = (chrono::Utc::now() + chrono::Duration::days(3))
        .format("%a")
        .to_string()
        .to_lowercase();
    campaign.rollout.window = Some(Window::parse(&[day], "03:00", "04:00", "UTC").unwrap());
    let first = harness.start_campaign(&campaign, fleet.devices());
    harness
        .wait_until(
            &campaign.id,
            Duration::from_secs(30),
            "the first controller",
            |s| !s.decisions().is_empty(),
        )
        .await;
    let second = harness
        .start_campaign(&campaign, fleet.devices())
        .result()
        .await;
    let error = second.unwrap_err().to_string();
    assert!(
        error.contains("already being run by another producer"),
        "{error}"
    );
    first.abort();
    harness.teardown().await;
}

/// Published events per device in the raw stream (the state folds them).
async fn raw_publications(harness: &Harness, campaign: &str) -> HashMap<String, usize> {
    let connection = harness.broker.connection().await.unwrap();
    let mut reader = flotilla_common::stream::StreamReader::open(
        &connection,
        &harness.topology.events(),
        flotilla_common::stream::Offset::First,
    )
    .await
    .unwrap();
    let mut counts = HashMap::new();
    while let Ok(Some(record)) = tokio::time::timeout(Duration::from_secs(1), reader.next()).await {
        for event in record.unwrap().events().unwrap() {
            if let (true, EventBody::Published(published)) =
                (event.campaign == campaign, &event.body)
            {
                *counts.entry(published.device.clone()).or_default() += 1;
            }
        }
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_killed_and_restarted_publishes_no_device_twice() {
    let harness = Harness::new("restart").await;
    let fleet = Fleet::start(cpes(40, (200, 500), FaultSpec::NONE))
        .await
        .unwrap();
    let worker = harness.start_worker("w1", fleet_credentials(&fleet));
    let inventory = harness.write_inventory("devices.csv", fleet.devices());
    let campaign_file = harness.dir().join("campaign.toml");
    std::fs::write(
        &campaign_file,
        r#"id = "restart"
[target]
version = "7.2.1"
image_url = "http://files.example.net/cpe/7.2.1.bin"
sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
[timing]
poll_interval = "200ms"
[waves]
sizes = [4, "50%", "100%"]
[rate]
per_minute = 300
"#,
    )
    .unwrap();
    let producer = flotilla_tests::binary("flotilla-producer").await;
    let run = || {
        let mut command = tokio::process::Command::new(&producer);
        command
            .args(["run", "--campaign"])
            .arg(&campaign_file)
            .arg("--inventory")
            .arg(&inventory)
            .env("AMQP_URL", &harness.args.amqp_url)
            .envs(harness.key_env())
            .env("FLOTILLA_PREFIX", &harness.args.prefix)
            .env("FLOTILLA_DELAY_TIERS", flotilla_tests::TEST_DELAY_TIERS)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        command
    };

    let mut first = run().spawn().unwrap();
    harness
        .wait_until(
            "restart",
            Duration::from_secs(60),
            "12 devices started",
            |s| s.published() >= 12,
        )
        .await;
    first.start_kill().unwrap();
    first.wait().await.unwrap();
    let halfway = harness.all_events("restart").await;
    assert!(
        halfway.published() < 40,
        "the kill came too late to test anything"
    );

    let second = run().output().await.unwrap();
    worker.stop().await;
    let stdout = String::from_utf8_lossy(&second.stdout);
    assert!(
        second.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&second.stderr)
    );
    assert!(stdout.contains("campaign restart: completed"), "{stdout}");

    let publications = raw_publications(&harness, "restart").await;
    assert_eq!(publications.len(), 40);
    assert!(
        publications.values().all(|n| *n == 1),
        "devices published twice: {:?}",
        publications
            .iter()
            .filter(|(_, n)| **n > 1)
            .collect::<Vec<_>>()
    );
    let state = harness.all_events("restart").await;
    assert_eq!(state.totals().succeeded, 40);
    let repeated = state.repeated_outcomes();
    assert!(repeated.is_empty(), "devices ended twice: {repeated:?}");
    // No decision was taken twice: one start, one of each wave, one end.
    let names: Vec<String> = state
        .decisions()
        .iter()
        .map(|d| flotilla_producer::report::decision_name(&d.decision))
        .collect();
    let mut unique = names.clone();
    unique.dedup();
    assert_eq!(names, unique, "{names:?}");
    assert_eq!(names.iter().filter(|n| *n == "started").count(), 1);
    assert_eq!(names.last().map(String::as_str), Some("completed"));
    harness.teardown().await;
}
