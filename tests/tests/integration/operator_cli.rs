//! What an operator's scripts and pipelines see of the real binaries:
//! exit statuses, the lines `run` and `status --watch` print when their
//! output is a pipe, `status --format json`, `FLOTILLA_METRICS_ADDR=off`,
//! shell completions, and a broker that refuses the login.

use flotilla_common::DeviceKind;
use flotilla_producer::state::Phase;
use flotilla_sim::{Fleet, FleetSpec, faults::FaultSpec};
use flotilla_tests::{Harness, binary, fleet_credentials};
use serde_json::Value;
use std::{path::Path, process::Output, time::Duration};

fn campaign_file(harness: &Harness, id: &str, extra: &str) -> std::path::PathBuf {
    let path = harness.dir().join(format!("{id}.toml"));
    std::fs::write(
        &path,
        format!(
            r#"
id = "{id}"
[target]
version = "7.2.1"
image_url = "http://files.example.net/cpe/7.2.1.bin"
sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
[timing]
deadline = "5m"
poll_interval = "1s"
{extra}
"#
        ),
    )
    .unwrap();
    path
}

/// `flotilla-producer` with this test's broker settings; its output is
/// piped, as in CI.
async fn producer(harness: &Harness, args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(binary("flotilla-producer").await);
    command
        .args(args)
        .env("AMQP_URL", &harness.args.amqp_url)
        .envs(harness.key_env())
        .env("FLOTILLA_PREFIX", &harness.args.prefix)
        .env("FLOTILLA_DELAY_TIERS", flotilla_tests::TEST_DELAY_TIERS)
        .env_remove("FLOTILLA_METRICS_ADDR")
        .kill_on_drop(true);
    command
}

fn run_args<'a>(campaign: &'a Path, inventory: &'a Path) -> Vec<&'a str> {
    vec![
        "run",
        "--campaign",
        campaign.to_str().unwrap(),
        "--inventory",
        inventory.to_str().unwrap(),
        "--progress-every",
        "1s",
    ]
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn described(output: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status.code(),
        stdout(output),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Lines of `text` that start with a UTC time, without it.
fn timed_lines(text: &str) -> Vec<&str> {
    text.lines()
        .filter_map(|line| line.split_once(' '))
        .filter(|(time, _)| chrono::DateTime::parse_from_rfc3339(time).is_ok())
        .map(|(_, rest)| rest)
        .collect()
}

async fn status_json(harness: &Harness, campaign: &str) -> Value {
    let output = producer(harness, &["status", campaign, "--format", "json"])
        .await
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", described(&output));
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(&output)))
}

#[tokio::test]
async fn a_piped_run_and_watch_print_decisions_and_progress_and_exit_with_failures() {
    let harness = Harness::new("pipedrun").await;
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
    // Slow enough for `status --watch` to join while it runs.
    let campaign = campaign_file(
        &harness,
        "piped",
        "[waves]\nsizes = [4, \"100%\"]\n[rate]\nper_minute = 120",
    );
    let worker = harness.start_worker("piped-worker", fleet_credentials(&fleet));

    let mut run = producer(&harness, &run_args(&campaign, &inventory)).await;
    // The worker's setting, which the producer used to refuse to parse.
    run.env("FLOTILLA_METRICS_ADDR", "off");
    let run = run.output();
    let watch = async {
        harness
            .wait_until("piped", Duration::from_secs(30), "the start", |s| {
                s.phase() != Phase::New
            })
            .await;
        producer(
            &harness,
            &["status", "piped", "--watch", "--progress-every", "1s"],
        )
        .await
        .output()
        .await
        .unwrap()
    };
    // Mid-way (ten devices left, started every half second), a pace.
    let running = async {
        harness
            .wait_until("piped", Duration::from_secs(30), "two finished", |s| {
                s.finished() >= 2
            })
            .await;
        status_json(&harness, "piped").await
    };
    let (run, watch, running) = tokio::join!(run, watch, running);
    let run = run.unwrap();
    assert_eq!(running["phase"], "running", "{running}");
    assert!(
        running["rate_per_minute"].as_f64().unwrap() > 0.0,
        "{running}"
    );
    let eta = running["eta"].as_str().expect("an ETA while running");
    assert!(
        chrono::DateTime::parse_from_rfc3339(eta).is_ok(),
        "{running}"
    );
    assert!(running["eta_seconds"].as_i64().unwrap() >= 0, "{running}");
    assert_eq!(running["outcome"], Value::Null);
    worker.stop().await;

    // Some devices failed: not 0, and not the code of an error.
    assert_eq!(run.status.code(), Some(10), "{}", described(&run));
    let text = stdout(&run);
    let lines = timed_lines(&text);
    for decision in ["[started] 12 devices", "[wave 1 start]", "[wave 2 start]"] {
        assert!(
            lines.iter().any(|l| l.starts_with(decision)),
            "no {decision:?} line in:\n{text}"
        );
    }
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("wave 2/2: ") && l.contains("; rate: ")),
        "no progress line in wave 2:\n{text}"
    );
    assert!(
        lines.contains(&"[completed] all 12 devices finished"),
        "{text}"
    );
    let last = lines.last().unwrap();
    assert!(
        last.starts_with("completed: 12/12 finished, 9 succeeded, 3 failed, 0 cancelled; rate: "),
        "{text}"
    );
    // And the status at the end, with the pace.
    assert!(text.contains("campaign piped: completed"), "{text}");
    assert!(text.contains("rate: "), "{text}");

    assert_eq!(watch.status.code(), Some(10), "{}", described(&watch));
    let text = stdout(&watch);
    let lines = timed_lines(&text);
    assert!(
        lines.contains(&"[completed] all 12 devices finished"),
        "{text}"
    );
    assert!(
        lines
            .last()
            .unwrap()
            .starts_with("completed: 12/12 finished, 9 succeeded, 3 failed"),
        "{text}"
    );

    let json = status_json(&harness, "piped").await;
    assert_eq!(json["campaign"], "piped");
    assert_eq!(json["phase"], "completed");
    assert_eq!(json["outcome"], "failed");
    assert_eq!(json["paused_by"], Value::Null);
    assert_eq!(json["target_version"], "7.2.1");
    assert_eq!(
        [&json["devices"], &json["started"], &json["finished"]],
        [12, 12, 12]
    );
    assert_eq!([&json["succeeded"], &json["failed"]], [9, 3]);
    assert_eq!(json["waves"][0]["wave"], 1);
    assert_eq!(json["waves"][0]["devices"], 4);
    assert_eq!(json["waves"][1]["devices"], 8);
    assert_eq!(json["outcomes_by_kind"]["dms"]["succeeded"], 9);
    assert_eq!(json["outcomes_by_kind"]["dms"]["failed"], 3);
    let rate = json["rate_per_minute"].as_f64().expect("a rate");
    assert!(rate > 0.0, "{json}");
    assert_eq!(json["eta"], Value::Null, "a completed campaign has no ETA");
    assert!(
        json["started_at"].is_string() && json["ended_at"].is_string(),
        "{json}"
    );
    let decisions: Vec<&str> = json["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["decision"].as_str().unwrap())
        .collect();
    assert_eq!(
        decisions,
        [
            "started",
            "wave_started",
            "gate_passed",
            "wave_started",
            "completed"
        ]
    );
    assert_eq!(json["decisions"][3]["wave"], 2);
    harness.teardown().await;
}

#[tokio::test]
async fn run_detaches_from_a_pause_with_its_code_and_a_cancelled_campaign_has_its_own() {
    let harness = Harness::new("pausedrun").await;
    let fleet = Fleet::start(FleetSpec::default().with(DeviceKind::Dms, 6))
        .await
        .unwrap();
    let inventory = harness.write_inventory("devices.csv", fleet.devices());
    let campaign = campaign_file(
        &harness,
        "approve",
        "[waves]\nsizes = [2, \"100%\"]\napproval = true",
    );
    let worker = harness.start_worker("paused-worker", fleet_credentials(&fleet));

    let mut args = run_args(&campaign, &inventory);
    args.push("--detach-on-pause");
    let run = producer(&harness, &args).await.output().await.unwrap();
    assert_eq!(run.status.code(), Some(12), "{}", described(&run));
    let text = stdout(&run);
    assert!(
        timed_lines(&text)
            .iter()
            .any(|l| l.starts_with("[paused] ")),
        "{text}"
    );
    assert!(
        text.contains("campaign approve is paused; detached. `flotilla-producer resume approve`"),
        "{text}"
    );

    let json = status_json(&harness, "approve").await;
    assert_eq!(json["phase"], "paused", "{json}");
    assert_eq!(json["paused_by"], "approval", "{json}");
    assert_eq!(json["outcome"], Value::Null);
    assert_eq!(json["eta"], Value::Null, "no ETA while paused");
    assert_eq!([&json["finished"], &json["succeeded"]], [2, 2]);
    assert_eq!(json["current_wave"], 1);

    // Still paused: the same command detaches again at once.
    let again = producer(&harness, &args).await.output().await.unwrap();
    assert_eq!(again.status.code(), Some(12), "{}", described(&again));

    let cancel = producer(&harness, &["cancel", "approve"])
        .await
        .output()
        .await
        .unwrap();
    assert_eq!(cancel.status.code(), Some(0), "{}", described(&cancel));
    let run = producer(&harness, &args).await.output().await.unwrap();
    worker.stop().await;
    assert_eq!(run.status.code(), Some(11), "{}", described(&run));
    assert!(
        timed_lines(&stdout(&run)).contains(&"[completed] every device finished after the cancel"),
        "{}",
        stdout(&run)
    );

    // Nothing left to cancel: a mistake in the request, not an outage.
    let cancel = producer(&harness, &["cancel", "approve"])
        .await
        .output()
        .await
        .unwrap();
    assert_eq!(cancel.status.code(), Some(2), "{}", described(&cancel));
    harness.teardown().await;
}

/// A `run` in the background, its standard output piped.
struct Running {
    child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    seen: String,
}

impl Running {
    async fn start(mut command: tokio::process::Command) -> Running {
        let mut child = command
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        Running {
            child,
            lines: tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout)),
            seen: String::new(),
        }
    }

    /// Reads its output until a line contains `text`: `run` has seen what
    /// that line tells.
    async fn wait_for(&mut self, text: &str) {
        let found = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = self.lines.next_line().await.unwrap() {
                self.seen.push_str(&line);
                self.seen.push('\n');
                if line.contains(text) {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(found, Ok(true), "no {text:?} in:\n{}", self.seen);
    }

    /// Sends SIGTERM, as systemd and Kubernetes stop a process, and reads
    /// the rest of its output.
    async fn terminate(mut self) -> Output {
        let pid = self.child.id().unwrap().to_string();
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(sent.success());
        let status = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = self.lines.next_line().await.unwrap() {
                self.seen.push_str(&line);
                self.seen.push('\n');
            }
            self.child.wait().await.unwrap()
        })
        .await
        .expect("run detaches at once");
        Output {
            status,
            stdout: self.seen.into_bytes(),
            stderr: Vec::new(),
        }
    }
}

#[tokio::test]
async fn sigterm_detaches_run_with_the_status_of_where_the_campaign_was() {
    let harness = Harness::new("sigtermrun").await;
    let fleet = Fleet::start(FleetSpec::default().with(DeviceKind::Dms, 6))
        .await
        .unwrap();
    let inventory = harness.write_inventory("devices.csv", fleet.devices());
    // Slow starts, so the first SIGTERM finds the canary running.
    let campaign = campaign_file(
        &harness,
        "held",
        "[waves]\nsizes = [2, \"100%\"]\napproval = true\n[rate]\nper_minute = 20",
    );
    let worker = harness.start_worker("sigterm-worker", fleet_credentials(&fleet));
    let args = run_args(&campaign, &inventory);

    let mut run = Running::start(producer(&harness, &args).await).await;
    run.wait_for("[wave 1 start]").await;
    let detached = run.terminate().await;
    assert_eq!(
        detached.status.code(),
        Some(130),
        "{}",
        described(&detached)
    );
    assert!(
        stdout(&detached).contains("detached; run the same command again to resume campaign held"),
        "{}",
        described(&detached)
    );

    let mut run = Running::start(producer(&harness, &args).await).await;
    run.wait_for("[paused]").await;
    let detached = run.terminate().await;
    worker.stop().await;
    assert_eq!(detached.status.code(), Some(12), "{}", described(&detached));
    harness.teardown().await;
}

#[tokio::test]
async fn both_binaries_print_completions_for_bash_zsh_and_fish() {
    for (name, subcommand) in [
        ("flotilla-producer", "status"),
        ("flotilla-worker", "completions"),
    ] {
        for shell in ["bash", "zsh", "fish"] {
            let output = tokio::process::Command::new(binary(name).await)
                .args(["completions", shell])
                .output()
                .await
                .unwrap();
            assert!(output.status.success(), "{name} {shell}: {output:?}");
            let script = String::from_utf8(output.stdout).unwrap();
            assert!(
                script.contains(name) && script.contains(subcommand) && script.contains("amqp-url"),
                "{name} {shell}:\n{script}"
            );
            if shell == "bash" {
                // The script must at least be valid bash.
                let path = std::env::temp_dir().join(format!("{name}-{}.bash", std::process::id()));
                std::fs::write(&path, &script).unwrap();
                let check = std::process::Command::new("bash")
                    .arg("-n")
                    .arg(&path)
                    .output()
                    .unwrap();
                std::fs::remove_file(&path).unwrap();
                assert!(check.status.success(), "{name}: {check:?}");
            }
        }
    }
}

/// The test broker's URL with another password, or another vhost.
fn url_with(harness: &Harness, password: Option<&str>, vhost: Option<&str>) -> String {
    let mut url = url::Url::parse(&harness.args.amqp_url).unwrap();
    if let Some(password) = password {
        url.set_password(Some(password)).unwrap();
    }
    if let Some(vhost) = vhost {
        url.set_path(&format!("/{vhost}"));
    }
    url.to_string()
}

#[tokio::test]
async fn a_refused_login_is_named_as_such_and_the_worker_gives_up_saying_so() {
    let harness = Harness::new("refused").await;
    let user = url::Url::parse(&harness.args.amqp_url)
        .unwrap()
        .username()
        .to_owned();
    let user = if user.is_empty() {
        "guest".to_owned()
    } else {
        user
    };
    let vhost = format!("flotilla-no-such-vhost-{}", std::process::id());
    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let cases = [
        (
            url_with(&harness, Some("not-the-password"), None),
            4,
            format!("refused user {user} on vhost /: access refused"),
        ),
        (
            url_with(&harness, None, Some(&vhost)),
            4,
            format!("refused user {user} on vhost {vhost}: vhost {vhost} not found"),
        ),
        (
            format!("amqp://guest:guest@127.0.0.1:{closed_port}/%2f"),
            3,
            format!("cannot reach RabbitMQ at amqp://guest:***@127.0.0.1:{closed_port}/%2f"),
        ),
        (
            "amqp//guest@localhost".to_owned(),
            2,
            "invalid AMQP URL".to_owned(),
        ),
    ];
    for (url, code, expected) in &cases {
        let output = producer(&harness, &["status", "any", "--amqp-url", url])
            .await
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(*code), "{url}: {stderr}");
        assert!(stderr.contains(expected.as_str()), "{url}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "one line says it: {stderr}");
        assert!(!stderr.contains("not-the-password"), "{stderr}");
        if *code == 4 {
            assert!(!stderr.contains("cannot reach"), "{stderr}");
        }
    }

    // A prefix with no Flotilla behind it is a mistake in the request.
    let prefix = format!("{}-missing", harness.args.prefix);
    let output = producer(&harness, &["status", "any", "--prefix", &prefix])
        .await
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("no queue '{prefix}.events'")),
        "{stderr}"
    );

    // A worker whose login never worked stops at once and says why.
    for (url, _, expected) in &cases[..2] {
        let output = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::process::Command::new(binary("flotilla-worker").await)
                .env("AMQP_URL", url)
                .envs(harness.key_env())
                .env("FLOTILLA_PREFIX", &harness.args.prefix)
                .env("FLOTILLA_METRICS_ADDR", "off")
                .env("RUST_LOG", "info,lapin=off")
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("the worker gives up instead of retrying for ever")
        .unwrap();
        let log = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(4), "{log}");
        assert!(log.contains(expected.as_str()), "{log}");
        assert!(
            log.contains("giving up: check the user, password and vhost of AMQP_URL"),
            "{log}"
        );
        assert!(!log.contains("reconnecting"), "{log}");
    }
    harness.teardown().await;
}
