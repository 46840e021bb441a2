//! The `flotilla-producer` command as an operator runs it.

use flotilla_common::DeviceKind;
use flotilla_common::{Device, Outcome};
use flotilla_sim::{Fleet, FleetSpec, faults::FaultSpec};
use flotilla_tests::{Harness, binary, binary_blocking, fleet_credentials};
use std::{collections::BTreeSet, path::Path};

const CAMPAIGN: &str = r#"
id = "cli-campaign"
[target]
version = "7.2.1"
image_url = "http://files.example.net/cpe/7.2.1.bin"
sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
[timing]
deadline = "5m"
poll_interval = "1s"
"#;

async fn producer(harness: &Harness, campaign: &Path, inventory: &Path) -> std::process::Output {
    producer_with(harness, campaign, inventory, &[]).await
}

async fn producer_with(
    harness: &Harness,
    campaign: &Path,
    inventory: &Path,
    extra: &[&str],
) -> std::process::Output {
    tokio::process::Command::new(binary("flotilla-producer").await)
        .args(["run", "--campaign"])
        .arg(campaign)
        .arg("--inventory")
        .arg(inventory)
        .args(extra)
        .env("AMQP_URL", &harness.args.amqp_url)
        .envs(harness.key_env())
        .env("FLOTILLA_PREFIX", &harness.args.prefix)
        .env("FLOTILLA_DELAY_TIERS", flotilla_tests::TEST_DELAY_TIERS)
        .output()
        .await
        .expect("running flotilla-producer")
}

async fn devices(n: usize) -> (Fleet, Vec<Device>) {
    let fleet = Fleet::start(
        FleetSpec {
            ..FleetSpec::default()
        }
        .with(DeviceKind::Dms, n),
    )
    .await
    .unwrap();
    let devices = fleet.devices().to_vec();
    (fleet, devices)
}

#[tokio::test]
async fn a_bad_inventory_publishes_nothing_and_names_every_bad_line() {
    let harness = Harness::new("badinv").await;
    let (_fleet, devices) = devices(4).await;
    let good = harness.write_inventory("good.csv", &devices);
    let mut text = std::fs::read_to_string(&good).unwrap();
    text.push_str("cpe-x,router,http://127.0.0.1:9,sim,C9,\n"); // line 6
    text.push_str("cpe-y,dms,,sim,C10,\n"); // line 7
    text.push_str(&format!(
        "{},dms,http://127.0.0.1:9,sim,C11,\n",
        devices[1].id
    )); // line 8
    let bad = harness.dir().join("bad.csv");
    std::fs::write(&bad, text).unwrap();
    let campaign = harness.dir().join("campaign.toml");
    std::fs::write(&campaign, CAMPAIGN).unwrap();

    let output = producer(&harness, &campaign, &bad).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    let bad_path = bad.display();
    for expected in [
        format!("{bad_path}: line 6, field kind: unknown device kind \"router\""),
        format!("{bad_path}: line 7, field address: is empty"),
        format!(
            "{bad_path}: line 8, field id: \"{}\" repeats the id of line 3",
            devices[1].id
        ),
        "3 problem(s) found; nothing was published".to_owned(),
    ] {
        assert!(
            stderr.contains(&expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
    assert_eq!(harness.ready_messages(&harness.topology.jobs()).await, 0);
    assert_eq!(harness.all_events("cli-campaign").await.published(), 0);
    harness.teardown().await;
}

#[tokio::test]
async fn a_good_inventory_is_rolled_out_and_reported() {
    let harness = Harness::new("goodinv").await;
    let (fleet, devices) = devices(20).await;
    let inventory = harness.write_inventory("devices.csv", &devices);
    let campaign = harness.dir().join("campaign.toml");
    std::fs::write(&campaign, CAMPAIGN).unwrap();
    let worker = harness.start_worker("cli-worker", fleet_credentials(&fleet));

    let output = producer(&harness, &campaign, &inventory).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("campaign cli-campaign: 20 device(s) (dms: 20)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("campaign cli-campaign: completed"),
        "{stdout}"
    );
    assert!(stdout.contains("dms          succeeded 20"), "{stdout}");
    assert_eq!(harness.all_events("cli-campaign").await.published(), 20);
    worker.stop().await;

    let status = cli(&harness, &["status", "cli-campaign"]).await;
    assert!(
        status.contains("campaign cli-campaign: completed"),
        "{status}"
    );

    let report = cli(&harness, &["report", "cli-campaign", "--format", "json"]).await;
    let rows: Vec<serde_json::Value> = serde_json::from_str(&report).unwrap();
    assert_eq!(rows.len(), 20, "{report}");
    for row in &rows {
        assert_eq!(row["outcome"], "succeeded", "{row}");
        assert_eq!(row["target_version"], "7.2.1", "{row}");
    }

    let device = &devices[3].id;
    let history = cli(&harness, &["history", "cli-campaign", device]).await;
    for step in [
        "create_rule",
        "send_connection_request",
        "poll_result",
        "deactivate_rule",
    ] {
        assert!(history.contains(step), "{step} missing in:\n{history}");
    }
    assert_eq!(
        fleet.enabled_rules(),
        Vec::<String>::new(),
        "rules left enabled"
    );
    harness.teardown().await;
}

#[tokio::test]
async fn a_retry_campaign_takes_only_the_devices_that_failed() {
    let harness = Harness::new("retry").await;
    let fleet = Fleet::start(
        FleetSpec {
            faults: FaultSpec {
                failure_ratio: 0.25,
                ..FaultSpec::NONE
            },
            ..FleetSpec::default()
        }
        .with(DeviceKind::Dms, 12),
    )
    .await
    .unwrap();
    let inventory = harness.write_inventory("devices.csv", fleet.devices());
    let first = harness.dir().join("first.toml");
    std::fs::write(&first, CAMPAIGN).unwrap();
    let retry = harness.dir().join("retry.toml");
    std::fs::write(&retry, CAMPAIGN.replace("cli-campaign", "cli-retry")).unwrap();
    let worker = harness.start_worker("retry-worker", fleet_credentials(&fleet));

    // Some devices failed: `run` says so in its exit status.
    assert_eq!(
        producer(&harness, &first, &inventory).await.status.code(),
        Some(10)
    );
    let output = producer_with(
        &harness,
        &retry,
        &inventory,
        &["--retry-failed-from", "cli-campaign"],
    )
    .await;
    worker.stop().await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    // The simulator's faulty devices fail again.
    assert_eq!(output.status.code(), Some(10), "{stderr}");
    assert!(
        stderr.contains("3 device(s) failed or timed out in cli-campaign"),
        "{stderr}"
    );

    let failed: BTreeSet<String> = fleet
        .devices()
        .iter()
        .filter(|d| fleet.expected_outcome(&d.id) == Some(Outcome::Failed))
        .map(|d| d.id.clone())
        .collect();
    let retried = harness.all_events("cli-retry").await;
    let published: BTreeSet<String> = retried
        .devices()
        .filter(|(_, r)| r.published_at().is_some())
        .map(|(id, _)| id.to_owned())
        .collect();
    assert_eq!(published, failed);
    harness.teardown().await;
}

/// Runs a read-only producer subcommand and returns what it printed.
async fn cli(harness: &Harness, args: &[&str]) -> String {
    let output = tokio::process::Command::new(binary("flotilla-producer").await)
        .args(args)
        .env("AMQP_URL", &harness.args.amqp_url)
        .envs(harness.key_env())
        .env("FLOTILLA_PREFIX", &harness.args.prefix)
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn a_bad_campaign_file_is_refused_with_its_problems() {
    let dir = std::env::temp_dir().join(format!("flotilla-badcampaign-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let campaign = dir.join("campaign.toml");
    std::fs::write(
        &campaign,
        CAMPAIGN.replace("9f86d0", "zz").replace("5m", "0s"),
    )
    .unwrap();
    let inventory = dir.join("devices.csv");
    std::fs::write(&inventory, "id,kind,address,credentials,cpe_id\n").unwrap();
    let output = std::process::Command::new(binary_blocking("flotilla-producer"))
        .args(["check", "--campaign"])
        .arg(&campaign)
        .arg("--inventory")
        .arg(&inventory)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("campaign.toml"), "{stderr}");
    assert!(
        stderr.contains("target.sha256 must be 64 hexadecimal digits"),
        "{stderr}"
    );
    assert!(
        stderr.contains("timing.deadline must be longer than zero"),
        "{stderr}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_forecasts_from_a_past_campaign_and_refuses_without_durations() {
    let harness = Harness::new("plan").await;
    let (fleet, devices) = devices(6).await;
    let worker = harness.start_worker("w1", fleet_credentials(&fleet));
    let past = harness.campaign("plan-past");
    let state = harness.start_campaign(&past, &devices).finished().await;
    worker.stop().await;
    assert_eq!(state.totals().succeeded, 6);

    let inventory = harness.write_inventory("plan.csv", &devices);
    let campaign = harness.dir().join("campaign.toml");
    std::fs::write(
        &campaign,
        format!("{CAMPAIGN}\n[concurrency]\nper_host = 2\n"),
    )
    .unwrap();
    let plan = |extra: &[&str]| {
        let mut command = std::process::Command::new(binary_blocking("flotilla-producer"));
        command
            .args(["plan", "--campaign"])
            .arg(&campaign)
            .arg("--inventory")
            .arg(&inventory)
            .args(extra)
            .env("AMQP_URL", &harness.args.amqp_url)
            .env("FLOTILLA_PREFIX", &harness.args.prefix);
        command.output().expect("running flotilla-producer plan")
    };

    let refused = plan(&[]);
    assert_eq!(refused.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("--duration dms=<time>"), "{stderr}");

    let output = plan(&["--like", "plan-past", "--format", "json"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    // The past campaign's own mean, measured from its events.
    let durations: Vec<f64> = state
        .devices()
        .map(|(_, r)| {
            (r.finished_at().unwrap() - r.published_at().unwrap())
                .num_microseconds()
                .unwrap() as f64
                / 1e6
        })
        .collect();
    let mean = durations.iter().sum::<f64>() / durations.len() as f64;
    let assumed = json["assumed_seconds"]["dms"].as_f64().unwrap();
    assert!((assumed - mean).abs() < 0.01, "{assumed} against {mean}");
    assert_eq!(json["devices"], 6);
    // One DMS host at two a time: three rounds.
    let host = &json["in_flight"][0];
    assert_eq!(
        (host["peak"].as_u64(), host["binds"].as_bool()),
        (Some(2), Some(true))
    );
    let took = json["duration_seconds"].as_f64().unwrap();
    assert!(
        (took - 3.0 * assumed).abs() <= 1.0,
        "{took}s for 3 rounds of {assumed}s"
    );
    harness.teardown().await;
}
