//! What Prometheus sees: a real campaign through a real worker process,
//! scraped over HTTP. The counters must move, the exposition must pass
//! `promtool check metrics` (when promtool is on PATH), and every metric
//! the Grafana dashboard and the alert rules query must be one that a
//! Flotilla process exports.

use flotilla_common::DeviceKind;
use flotilla_common::Outcome;
use flotilla_sim::{Fleet, FleetSpec, faults::FaultSpec};
use flotilla_tests::{Harness, binary};
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};
use tokio::io::AsyncWriteExt;

const CAMPAIGN: &str = r#"
id = "obs-campaign"
[target]
version = "7.2.1"
image_url = "http://files.example.net/cpe/7.2.1.bin"
sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
[timing]
deadline = "2m"
poll_interval = "200ms"
[retry]
max_attempts = 10
initial_backoff = "50ms"
max_backoff = "1s"
# Generous, so the campaign runs to its end, but present, so the producer
# exports the budget the failure alert compares against.
[failure_budget]
campaign = { ratio = 0.9, min_finished = 5 }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_exports_every_metric_the_dashboard_and_alerts_use() {
    let harness = Harness::new("observability").await;
    let fleet = Fleet::start(
        FleetSpec {
            cpes_per_dms: 15,
            faults: FaultSpec {
                failure_ratio: 0.2,
                silent_ratio: 0.0,
                transient_ratio: 0.05,
                only_first: None,
            },
            request_latency: Duration::ZERO..=Duration::from_millis(2),
            upgrade_time: Duration::from_millis(200)..=Duration::from_millis(600),
            ..FleetSpec::default()
        }
        .with(DeviceKind::Dms, 30),
    )
    .await
    .unwrap();
    let worker_addr = free_loopback_addr();
    let mut worker = spawn_worker(&harness, &fleet, &worker_addr).await;

    let inventory = harness.write_inventory("devices.csv", fleet.devices());
    let campaign = harness.dir().join("campaign.toml");
    std::fs::write(&campaign, CAMPAIGN).unwrap();
    let producer_addr = free_loopback_addr();
    let producer_log = harness.dir().join("producer.log");
    let mut producer = spawn_producer(
        &harness,
        &campaign,
        &inventory,
        &producer_addr,
        &producer_log,
    )
    .await;
    // The producer exits when the campaign completes: scrape it until then.
    let mut producer_scrape = None;
    let status = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            if let Some(status) = producer.try_wait().unwrap() {
                return status;
            }
            if let Some(scrape) = Scrape::try_of(&producer_addr).await {
                producer_scrape = Some(scrape);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the campaign finishes within 2 minutes");
    // A fifth of the devices fail: the status that says so.
    assert_eq!(
        status.code(),
        Some(10),
        "{}",
        std::fs::read_to_string(&producer_log).unwrap_or_default()
    );
    let producer_scrape = producer_scrape.expect("the producer served /metrics");
    let campaign_label = [("campaign", "obs-campaign")];
    assert_eq!(
        producer_scrape.sum("flotilla_producer_jobs_published_total", &campaign_label),
        30.0
    );
    assert_eq!(
        producer_scrape.sum("flotilla_campaign_failure_budget_ratio", &campaign_label),
        0.9
    );
    assert_eq!(
        producer_scrape.sum("flotilla_campaign_devices", &campaign_label),
        30.0,
        "every device is in exactly one state"
    );
    assert_eq!(
        producer_scrape.sum("flotilla_campaign_in_window", &campaign_label),
        1.0,
        "a campaign without a window may start devices at any time"
    );
    promtool_check_metrics("producer", &producer_scrape.text).await;

    for (path, status) in [("/healthz", 200), ("/readyz", 200)] {
        let response = reqwest::get(format!("http://{worker_addr}{path}"))
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), status, "{path}");
    }
    let scrape = Scrape::of(&worker_addr).await;

    // Counters moved, and the outcomes are the fleet's.
    let expected = |wanted: &[Outcome]| {
        fleet
            .devices()
            .iter()
            .filter(|d| wanted.contains(&fleet.expected_outcome(&d.id).unwrap()))
            .count() as f64
    };
    let finished = |outcome: &str| {
        scrape.sum(
            "flotilla_jobs_finished_total",
            &[("campaign", "obs-campaign"), ("outcome", outcome)],
        )
    };
    assert_eq!(finished("succeeded"), expected(&[Outcome::Succeeded]));
    assert_eq!(
        finished("failed") + finished("timed_out"),
        expected(&[Outcome::Failed, Outcome::TimedOut])
    );
    assert!(expected(&[Outcome::Failed]) > 0.0, "the fleet has failures");
    assert!(scrape.sum("flotilla_worker_steps_total", &[("result", "ok")]) > 0.0);
    assert!(
        scrape.sum(
            "flotilla_device_http_requests_total",
            &[("kind", "dms"), ("status_class", "2xx")]
        ) > 0.0
    );
    assert!(scrape.sum("flotilla_worker_step_duration_seconds_count", &[]) > 0.0);
    assert!(scrape.sum("flotilla_worker_poll_lateness_seconds_count", &[]) > 0.0);

    promtool_check_metrics("worker", &scrape.text).await;

    // Both processes say which build they run and how they are doing.
    for (what, scrape) in [("worker", &scrape), ("producer", &producer_scrape)] {
        let version = [("version", env!("CARGO_PKG_VERSION"))];
        assert_eq!(scrape.sum("flotilla_build_info", &version), 1.0, "{what}");
        for gauge in [
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_max_fds",
        ] {
            assert!(scrape.sum(gauge, &[]) > 0.0, "{what}: {gauge}");
        }
        assert!(
            scrape.text.contains("\nprocess_cpu_seconds_total "),
            "{what}: no CPU seconds"
        );
    }

    // Every name the dashboard and the rules use is exported.
    let mut exported = scrape.exported_names();
    exported.extend(producer_scrape.exported_names());
    let used = used_metric_names();
    assert!(!used.is_empty(), "no metric names found in deploy/");
    let missing: Vec<String> = used
        .iter()
        .filter(|(name, _)| !exported.contains(name.as_str()))
        .map(|(name, places)| format!("{name} (used in {})", places.join(", ")))
        .collect();
    assert!(missing.is_empty(), "not exported: {missing:#?}");
    worker.start_kill().unwrap();
    worker.wait().await.unwrap();
    harness.teardown().await;
}

/// A loopback address with a port free now (the worker binds it a moment
/// later; the kernel does not hand a just-released port out again at once).
fn free_loopback_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

async fn spawn_worker(harness: &Harness, fleet: &Fleet, addr: &str) -> tokio::process::Child {
    let log = std::fs::File::create(harness.dir().join("worker.log")).unwrap();
    let child = tokio::process::Command::new(binary("flotilla-worker").await)
        .envs(harness.worker_env(fleet))
        .env("FLOTILLA_METRICS_ADDR", addr)
        .env("FLOTILLA_WORKER_NAME", "worker")
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let url = format!("http://{addr}/readyz");
    flotilla_tests::eventually(Duration::from_secs(30), "the worker's /readyz", || {
        let url = url.clone();
        async move { matches!(reqwest::get(&url).await, Ok(r) if r.status().is_success()) }
    })
    .await;
    child
}

async fn spawn_producer(
    harness: &Harness,
    campaign: &Path,
    inventory: &Path,
    metrics_addr: &str,
    log: &Path,
) -> tokio::process::Child {
    tokio::process::Command::new(binary("flotilla-producer").await)
        .args(["run", "--campaign"])
        .arg(campaign)
        .arg("--inventory")
        .arg(inventory)
        .env("AMQP_URL", &harness.args.amqp_url)
        .envs(harness.key_env())
        .env("FLOTILLA_PREFIX", &harness.args.prefix)
        .env("FLOTILLA_DELAY_TIERS", flotilla_tests::TEST_DELAY_TIERS)
        .env("FLOTILLA_METRICS_ADDR", metrics_addr)
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(log).unwrap()))
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// One scrape of a /metrics endpoint, in the Prometheus text format.
struct Scrape {
    text: String,
}

impl Scrape {
    /// A scrape, or `None` while nothing answers at `addr`.
    async fn try_of(addr: &str) -> Option<Scrape> {
        let response = reqwest::get(format!("http://{addr}/metrics")).await.ok()?;
        let text = response.error_for_status().ok()?.text().await.ok()?;
        Some(Scrape { text })
    }

    async fn of(addr: &str) -> Scrape {
        let response = reqwest::get(format!("http://{addr}/metrics"))
            .await
            .unwrap();
        assert!(response.status().is_success(), "{}", response.status());
        Scrape {
            text: response.text().await.unwrap(),
        }
    }

    /// Names a query may use: every family, and for histograms and
    /// summaries their `_bucket`, `_sum` and `_count` series.
    fn exported_names(&self) -> BTreeSet<String> {
        let mut names = BTreeSet::new();
        for line in self.text.lines() {
            let Some(declared) = line.strip_prefix("# TYPE ") else {
                continue;
            };
            let (name, kind) = declared.split_once(' ').unwrap();
            names.insert(name.to_owned());
            if matches!(kind, "histogram" | "summary") {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
        }
        names
    }

    /// The sum of the samples of `name` whose labels include `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.text
            .lines()
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| {
                let (series, value) = line.rsplit_once(' ')?;
                let (sample, label_text) = match series.split_once('{') {
                    Some((sample, rest)) => (sample, rest.trim_end_matches('}')),
                    None => (series, ""),
                };
                let matches = sample == name
                    && labels
                        .iter()
                        .all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")));
                matches.then(|| value.parse::<f64>().unwrap())
            })
            .sum()
    }
}

/// `promtool check metrics` on the scrape, if promtool is installed (CI
/// installs it).
async fn promtool_check_metrics(what: &str, text: &str) {
    let spawned = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("promtool is not on PATH: the {what}'s scrape is not linted");
            return;
        }
        Err(error) => panic!("running promtool: {error}"),
    };
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(text.as_bytes()).await.unwrap();
    drop(stdin);
    let output = child.wait_with_output().await.unwrap();
    assert!(
        output.status.success(),
        "promtool check metrics on the {what}'s scrape:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Every `flotilla_*` and `process_*` metric name queried by a dashboard
/// panel or variable, or by an alert rule, with where it is used.
/// `rabbitmq_*` names come from RabbitMQ's own exporter and are not
/// Flotilla's to check.
fn used_metric_names() -> BTreeMap<String, Vec<String>> {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let mut used: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut note = |query: &str, place: String| {
        for name in promql_metric_names(query) {
            used.entry(name).or_default().push(place.clone());
        }
    };
    for path in files(&deploy.join("grafana/dashboards"), "json") {
        let dashboard: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        for panel in dashboard["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    note(expr, format!("{file} panel {:?}", panel["title"]));
                }
            }
        }
        for variable in dashboard["templating"]["list"].as_array().unwrap() {
            if variable["type"] == "query" {
                let query = variable["query"]["query"].as_str().unwrap();
                note(query, format!("{file} variable {}", variable["name"]));
            }
        }
    }
    for path in files(&deploy.join("prometheus/rules"), "yml") {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        for (line, expr) in rule_expressions(&std::fs::read_to_string(&path).unwrap()) {
            note(&expr, format!("{file}:{line}"));
        }
    }
    used
}

fn files(dir: &Path, extension: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == extension))
        .collect();
    files.sort();
    files
}

/// The `expr:` values of a rules file, with their line numbers: inline, or
/// a block scalar (`expr: |`) running while lines are indented deeper than
/// the key. That is all of YAML the rule files use.
fn rule_expressions(yaml: &str) -> Vec<(usize, String)> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut found = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let key = line.trim_start().trim_start_matches("- ");
        let Some(value) = key.strip_prefix("expr:") else {
            continue;
        };
        let value = value.trim();
        if value.starts_with(['|', '>']) {
            let indent = line.len() - key.len();
            let block: Vec<&str> = lines[i + 1..]
                .iter()
                .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
                .copied()
                .collect();
            found.push((i + 1, block.join("\n")));
        } else {
            found.push((i + 1, value.to_owned()));
        }
    }
    found
}

/// Metric names in a PromQL query: identifiers starting `flotilla_` or
/// `process_` (the standard process metrics every Flotilla process serves),
/// outside string literals (label values such as "flotilla-worker" or a
/// queue name are not metrics). Names with a colon are recording rules'
/// outputs, which Prometheus makes, not a process.
fn promql_metric_names(query: &str) -> BTreeSet<String> {
    let mut code = String::new();
    let mut chars = query.chars();
    while let Some(c) = chars.next() {
        if matches!(c, '"' | '\'' | '`') {
            // Skip to the closing quote; backslash escapes in "" and ''.
            while let Some(inner) = chars.next() {
                if inner == '\\' && c != '`' {
                    chars.next();
                } else if inner == c {
                    break;
                }
            }
            code.push(' ');
        } else {
            code.push(c);
        }
    }
    code.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|token| {
            (token.starts_with("flotilla_") || token.starts_with("process_"))
                && !token.contains(':')
        })
        .map(str::to_owned)
        .collect()
}

#[test]
fn metric_names_are_read_from_queries_not_strings() {
    let names = promql_metric_names(
        r#"sum by (kind) (rate(flotilla_worker_steps_total{job="flotilla_not_a_metric",q=~"a\"flotilla_x"}[5m])) / on() flotilla_b:c and process_open_fds"#,
    );
    assert_eq!(
        names,
        BTreeSet::from([
            "flotilla_worker_steps_total".to_owned(),
            "process_open_fds".to_owned()
        ])
    );
    let rules = "  - alert: A\n    expr: |\n      up\n\n      > flotilla_a\n    for: 1m\n  - expr: flotilla_b == 0\n";
    assert_eq!(
        rule_expressions(rules),
        vec![
            (2, "      up\n\n      > flotilla_a".to_owned()),
            (7, "flotilla_b == 0".to_owned())
        ]
    );
}
