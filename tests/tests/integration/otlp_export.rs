//! Trace export as operators configure it: every OTLP protocol
//! (`OTEL_EXPORTER_OTLP_PROTOCOL`) reaches a real receiver with the service
//! name the environment gives, and exports that fail are logged, once, with
//! where they went and how many failed.

use flotilla_common::DeviceKind;
use flotilla_sim::{Fleet, FleetSpec};
use flotilla_tests::{Harness, binary, otlp::OtlpReceiver};
use std::{path::Path, process::Stdio, time::Duration};

fn campaign(id: &str) -> String {
    format!(
        r#"
id = "{id}"
[target]
version = "7.2.1"
image_url = "http://files.example.net/cpe/7.2.1.bin"
sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
"#
    )
}

/// `flotilla-producer run` of campaign `id` over `inventory`, exporting to
/// `endpoint`, its standard error in `log`. No worker runs: the producer's
/// spans (one per device it publishes) are what the receiver gets.
async fn producer(
    harness: &Harness,
    id: &str,
    inventory: &Path,
    endpoint: &str,
    env: &[(&str, &str)],
    log: &Path,
) -> tokio::process::Child {
    let file = harness.dir().join(format!("{id}.toml"));
    std::fs::write(&file, campaign(id)).unwrap();
    tokio::process::Command::new(binary("flotilla-producer").await)
        .args(["run", "--campaign"])
        .arg(&file)
        .arg("--inventory")
        .arg(inventory)
        .env("AMQP_URL", &harness.args.amqp_url)
        .envs(harness.key_env())
        .env("FLOTILLA_PREFIX", &harness.args.prefix)
        .env("FLOTILLA_DELAY_TIERS", flotilla_tests::TEST_DELAY_TIERS)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(log).unwrap()))
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Sends SIGINT (Ctrl-C) and returns the exit code, within 30 s.
async fn interrupt(child: &mut tokio::process::Child) -> Option<i32> {
    let pid = child.id().unwrap().to_string();
    let sent = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    assert!(sent.success());
    tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the producer exits on SIGINT")
        .unwrap()
        .code()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_otlp_protocol_delivers_spans_under_the_configured_service_name() {
    let harness = Harness::new("otlp-protocols").await;
    let receiver = OtlpReceiver::start().await;
    let fleet = Fleet::start(FleetSpec::default().with(DeviceKind::Dms, 2))
        .await
        .unwrap();
    let inventory = harness.write_inventory("devices.csv", fleet.devices());
    struct Case {
        protocol: &'static str,
        env: &'static [(&'static str, &'static str)],
        service: &'static str,
    }
    let cases = [
        // The built-in name, when the environment gives none.
        Case {
            protocol: "http/protobuf",
            env: &[],
            service: "flotilla-producer",
        },
        // OTEL_SERVICE_NAME wins over the resource attributes' name.
        Case {
            protocol: "grpc",
            env: &[
                ("OTEL_SERVICE_NAME", "rollouts-east"),
                ("OTEL_RESOURCE_ATTRIBUTES", "service.name=not-this-one"),
            ],
            service: "rollouts-east",
        },
        Case {
            protocol: "http/json",
            env: &[(
                "OTEL_RESOURCE_ATTRIBUTES",
                "service.name=rollouts-west,deployment.environment=test",
            )],
            service: "rollouts-west",
        },
    ];
    for Case {
        protocol,
        env,
        service,
    } in cases
    {
        let id = format!("otlp-{}", protocol.replace('/', "-"));
        let log = harness.dir().join(format!("{id}.log"));
        let mut env = env.to_vec();
        env.push(("OTEL_EXPORTER_OTLP_PROTOCOL", protocol));
        let mut producer =
            producer(&harness, &id, &inventory, &receiver.endpoint, &env, &log).await;
        let of_campaign = || {
            receiver
                .spans()
                .into_iter()
                .filter(|s| s.attributes.get("campaign") == Some(&id))
                .collect::<Vec<_>>()
        };
        flotilla_tests::eventually(
            Duration::from_secs(30),
            &format!("a span per device over {protocol}"),
            || {
                let arrived = of_campaign().len();
                async move { arrived >= 2 }
            },
        )
        .await;
        // Detached with Ctrl-C, it flushes its exporter and exits: no
        // protocol may hang the exit.
        assert_eq!(interrupt(&mut producer).await, Some(130), "{protocol}");
        for span in of_campaign() {
            assert_eq!(span.protocol, protocol, "{span:?}");
            assert_eq!(span.service, service, "{span:?}");
            assert_eq!(span.name, "rollout dms", "{span:?}");
        }
        let stderr = std::fs::read_to_string(&log).unwrap();
        assert!(!stderr.contains("WARN"), "{protocol}: {stderr}");
    }
    harness.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_exports_are_logged_once_with_the_endpoint_then_counted() {
    let harness = Harness::new("otlp-failing").await;
    let receiver = OtlpReceiver::rejecting().await;
    let fleet = Fleet::start(FleetSpec::default().with(DeviceKind::Dms, 4))
        .await
        .unwrap();
    let inventory = harness.write_inventory("devices.csv", fleet.devices());
    let log = harness.dir().join("producer.log");
    // One span an export, so four devices make four failed exports.
    let env = [("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "1")];
    let mut producer = producer(
        &harness,
        "otlp-failing",
        &inventory,
        &receiver.endpoint,
        &env,
        &log,
    )
    .await;
    flotilla_tests::eventually(Duration::from_secs(30), "four export attempts", || {
        let requests = receiver.requests();
        async move { requests >= 4 }
    })
    .await;
    // Ctrl-C detaches the producer; it flushes its spans on the way out.
    assert_eq!(interrupt(&mut producer).await, Some(130));

    let stderr = std::fs::read_to_string(&log).unwrap();
    let url = format!("{}/v1/traces", receiver.endpoint);
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("cannot export traces"))
        .collect();
    assert_eq!(
        warnings.len(),
        1,
        "one warning, not one per export:\n{stderr}"
    );
    assert!(warnings[0].contains(&url), "{}", warnings[0]);
    assert!(
        warnings[0].contains("400"),
        "the receiver's answer: {}",
        warnings[0]
    );
    // Every later failure is counted in the line at exit.
    let summary = stderr
        .lines()
        .find(|l| l.contains("trace exports failed since the last warning"))
        .unwrap_or_else(|| panic!("no summary at exit:\n{stderr}"));
    let later = receiver.requests() - 1;
    assert!(
        summary.contains(&format!("failed_exports={later}")),
        "{later} failed exports after the warning: {summary}"
    );
    harness.teardown().await;
}
