//! Traces and logs: a real OTLP receiver gets the producer's and the
//! worker's spans (over the default protocol, OTLP/HTTP with protobuf),
//! and one device's rollout is one whole trace.

use flotilla_common::DeviceKind;
use flotilla_sim::{Fleet, FleetSpec};
use flotilla_tests::{
    Harness, binary,
    otlp::{OtlpReceiver, Span},
};
use serde_json::Value;
use std::{process::Stdio, time::Duration};

const CAMPAIGN: &str = r#"
id = "traced"
[target]
version = "7.2.1"
image_url = "http://files.example.net/cpe/7.2.1.bin"
sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
[timing]
deadline = "1m"
poll_interval = "200ms"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_devices_rollout_is_one_trace_across_producer_and_worker() {
    let harness = Harness::new("traces").await;
    let receiver = OtlpReceiver::start().await;
    let fleet = Fleet::start(
        FleetSpec {
            upgrade_time: Duration::from_millis(300)..=Duration::from_millis(600),
            ..FleetSpec::default()
        }
        .with(DeviceKind::Dms, 4),
    )
    .await
    .unwrap();
    let inventory = harness.write_inventory("devices.csv", fleet.devices());
    let campaign = harness.dir().join("campaign.toml");
    std::fs::write(&campaign, CAMPAIGN).unwrap();
    let otel = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];

    let worker_log = harness.dir().join("worker.log");
    let mut worker = tokio::process::Command::new(binary("flotilla-worker").await)
        .envs(harness.worker_env(&fleet))
        .envs(otel)
        .env("FLOTILLA_LOG_FORMAT", "json")
        .stderr(Stdio::from(std::fs::File::create(&worker_log).unwrap()))
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let producer = tokio::process::Command::new(binary("flotilla-producer").await)
        .args(["run", "--campaign"])
        .arg(&campaign)
        .arg("--inventory")
        .arg(&inventory)
        .env("AMQP_URL", &harness.args.amqp_url)
        .envs(harness.key_env())
        .env("FLOTILLA_PREFIX", &harness.args.prefix)
        .env("FLOTILLA_DELAY_TIERS", flotilla_tests::TEST_DELAY_TIERS)
        .envs(otel)
        .output()
        .await
        .unwrap();
    assert!(
        producer.status.success(),
        "{}",
        String::from_utf8_lossy(&producer.stderr)
    );
    // A stopped worker sends the spans it still holds.
    let pid = worker.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(worker.wait().await.unwrap().success());

    let device = &fleet.devices()[2].id;
    let steps_recorded = harness
        .step_events("traced")
        .await
        .iter()
        .filter(|s| &s.device == device)
        .count();
    let spans = receiver.spans();
    assert!(
        spans.iter().all(|s| s.protocol == "http/protobuf"),
        "OTLP/HTTP with protobuf is the default"
    );
    let of_device = |service: &str| -> Vec<&Span> {
        spans
            .iter()
            .filter(|s| s.service == service && s.attributes.get("device") == Some(device))
            .collect()
    };
    let roots = of_device("flotilla-producer");
    assert_eq!(roots.len(), 1, "one rollout span per device: {roots:?}");
    let root = roots[0];
    assert_eq!(root.name, "rollout dms");
    assert_eq!(root.parent, "", "the rollout span starts the trace");

    let steps = of_device("flotilla-worker");
    assert!(steps_recorded >= 4, "{steps_recorded} steps recorded");
    assert_eq!(steps.len(), steps_recorded, "a span per step: {steps:?}");
    for step in &steps {
        assert_eq!(step.trace, root.trace, "{step:?} left the device's trace");
        assert_eq!(step.parent, root.id, "{step:?}");
        assert_eq!(step.attributes["campaign"], "traced");
    }
    let step_ids: Vec<&str> = steps.iter().map(|s| s.id.as_str()).collect();
    let calls: Vec<&Span> = spans
        .iter()
        .filter(|s| step_ids.contains(&s.parent.as_str()))
        .collect();
    assert!(calls.len() >= steps.len(), "device calls: {calls:?}");
    for call in &calls {
        assert_eq!(call.trace, root.trace);
        assert!(
            call.attributes.contains_key("http.response.status_code"),
            "{call:?}"
        );
        assert!(
            !call.attributes["url.template"].contains(device.as_str()),
            "{call:?}"
        );
    }
    assert!(
        calls
            .iter()
            .any(|c| c.name == "POST /v1/dyn/FirmwareStorage/.*"),
        "{calls:?}"
    );
    let (_, password) = fleet.login();
    for span in &spans {
        for value in span.attributes.values() {
            assert!(!value.contains(password), "a secret in {span:?}");
        }
    }

    // JSON logs: one object per line, a step's lines carry its device.
    let log = std::fs::read_to_string(&worker_log).unwrap();
    let lines: Vec<Value> = log
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    assert!(lines.iter().any(|l| l["fields"]["message"] == "consuming"));
    assert!(!log.contains(password));
    harness.teardown().await;
}
