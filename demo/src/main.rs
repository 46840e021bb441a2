//! `flotilla-demo`: a real rollout in one process. It starts a simulated
//! fleet, a few workers and the producer; they talk only through RabbitMQ
//! and HTTP, exactly as separate processes would. It then checks every
//! outcome Flotilla reports against what the simulator really did.

use anyhow::{Context, bail};
use clap::Parser;
use flotilla_common::{
    Broker, DEFAULT_AMQP_URL, Decision, Device, DeviceKind, Outcome,
    cli::BrokerArgs,
    control::Command,
    inventory::InventoryWriter,
    signing::{KeyArgs, Keyring},
};
use flotilla_producer::{
    Campaign, CampaignState, RunSpec, check_inventory, fingerprint, report, run_campaign,
    send_command,
};
use flotilla_sim::{Fleet, FleetSpec, faults::FaultSpec};
use flotilla_worker::{CredentialStore, Credentials, Listen, WorkerConfig};
use indicatif::{ProgressBar, ProgressStyle};
use std::{collections::BTreeMap, net::SocketAddr, path::Path, process::ExitCode, time::Duration};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "flotilla-demo",
    version,
    about = "Runs a whole Flotilla rollout against simulated devices."
)]
struct Args {
    /// Devices in the campaign, spread evenly over the kinds.
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    /// Device kinds to simulate (comma-separated; the simulator serves
    /// every kind).
    #[arg(long, value_delimiter = ',', default_value = "dms")]
    kinds: Vec<DeviceKind>,
    /// Fraction of devices whose upgrade fails.
    #[arg(long, default_value_t = 0.05)]
    fault_ratio: f64,
    /// Fraction of device requests answered with a transient HTTP 500.
    #[arg(long, default_value_t = 0.02)]
    transient_ratio: f64,
    /// Workers to run.
    #[arg(long, default_value_t = 4)]
    workers: u16,
    #[arg(long, env = "AMQP_URL", default_value = DEFAULT_AMQP_URL, hide_env_values = true)]
    amqp_url: String,
    /// Seed of the simulator's fault injection.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Start with a canary wave of this many devices, holding all the
    /// injected faults, then 10%, 50% and 100%. A canary failing more than
    /// 5% pauses the campaign.
    #[arg(long)]
    canary: Option<usize>,
    /// How long a paused campaign waits before the demo resumes it, as an
    /// operator would (resume it sooner with the command it prints).
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    resume_after: Duration,
    /// Serve the first worker's /metrics, /healthz and /readyz here, to
    /// watch its counters move during the rollout.
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // lapin logs, as errors, the broker closing the channel of
                // each passive declaration that finds no queue, which every
                // first run's topology makes; the demo reports its own.
                .unwrap_or_else(|_| "error,lapin=off".into()),
        )
        .init();
    match demo(Args::parse()).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn demo(args: Args) -> anyhow::Result<ExitCode> {
    if !(0.0..=1.0).contains(&args.fault_ratio) || !(0.0..=1.0).contains(&args.transient_ratio) {
        bail!("--fault-ratio and --transient-ratio must be between 0 and 1");
    }

    // One line, and a way out, when there is no broker.
    let broker = Broker::new(&args.amqp_url, "flotilla-demo")?;
    match tokio::time::timeout(Duration::from_secs(5), broker.connection()).await {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => {
            eprintln!("{error}. Start one with `rabbitmq-server -detached`, or set AMQP_URL.");
            return Ok(ExitCode::from(2));
        }
        Err(_) => {
            eprintln!(
                "RabbitMQ at {} did not answer within 5s. Start one with `rabbitmq-server -detached`, or set AMQP_URL.",
                broker.display_url()
            );
            return Ok(ExitCode::from(2));
        }
    }

    // Devices are spread evenly over the kinds; each NetProfiler brings
    // three Flow Gateways of its own.
    let share = |kind: DeviceKind| {
        if !args.kinds.contains(&kind) {
            return 0;
        }
        let position = args
            .kinds
            .iter()
            .position(|k| *k == kind)
            .expect("the kind is in the list");
        let per_kind = args.devices / args.kinds.len();
        per_kind + usize::from(position < args.devices % args.kinds.len())
    };
    let mut spec = FleetSpec {
        cpes_per_dms: 250,
        gateways_per_netprofiler: GATEWAYS_PER_NETPROFILER,
        backups_first: true,
        faults: FaultSpec {
            failure_ratio: args.fault_ratio,
            silent_ratio: 0.0,
            transient_ratio: args.transient_ratio,
            // The inventory takes the kinds in turn, so the canary holds
            // an even share of each kind.
            only_first: args.canary.map(|n| n.div_ceil(args.kinds.len())),
        },
        request_latency: Duration::from_millis(1)..=Duration::from_millis(10),
        upgrade_time: Duration::from_millis(500)..=Duration::from_secs(3),
        seed: args.seed,
        ..FleetSpec::default()
    };
    for kind in &args.kinds {
        spec = spec.with(*kind, share(*kind));
    }
    let fleet = Fleet::start(spec)
        .await
        .context("starting the simulated fleet")?;
    // The producer reads files, as it would for an operator.
    let run_id = format!("demo-{}", chrono::Utc::now().format("%Y%m%d-%H%M%S"));
    let dir = std::env::temp_dir().join(format!("flotilla-{run_id}"));
    std::fs::create_dir_all(&dir)?;
    let inventory = dir.join("devices.csv");
    let campaign_file = dir.join("campaign.toml");
    let order = write_inventory(&fleet, &inventory)?;
    let gateways = share(DeviceKind::Netprofiler) * GATEWAYS_PER_NETPROFILER;
    println!(
        "simulator: {} devices ({}){}; {}",
        fleet.devices().len(),
        args.kinds
            .iter()
            .map(|k| format!("{k}: {}", share(*k)))
            .collect::<Vec<_>>()
            .join(", "),
        if gateways > 0 {
            format!(" with {gateways} Flow Gateways behind the NetProfilers")
        } else {
            String::new()
        },
        faults_summary(&fleet, &order, args.canary)
    );
    std::fs::write(&campaign_file, campaign_toml(&run_id, &fleet, args.canary))?;

    let broker_args = BrokerArgs {
        amqp_url: args.amqp_url.clone(),
        prefix: format!("flotilla-{run_id}"),
        delay_tiers: vec![
            Duration::from_millis(250),
            Duration::from_secs(1),
            Duration::from_secs(5),
            Duration::from_secs(30),
        ],
        retention: Default::default(),
    };
    let topology = broker_args.topology();
    // The job key, in a file as an operator mounts one, shared by the
    // producer and the workers.
    let keys = write_job_key(&dir)?;
    let keyring = keys.keyring()?;
    let stop = CancellationToken::new();
    let (user, password) = fleet.login();
    let credentials =
        CredentialStore::with_given([Credentials::new(flotilla_sim::CREDENTIALS_REFERENCE)
            .with("username", user)
            .with("password", password)
            .with("backup_password", fleet.backup_password())
            .with("security_password", "demo-backup-encryption-key")
            .with("allowed_hosts", "127.0.0.0/8")]);
    let workers: Vec<_> = (0..args.workers)
        .map(|i| {
            let mut config = WorkerConfig::new(broker_args.clone());
            config.keys = keys.clone();
            config.name = Some(format!("demo-worker-{}", i + 1));
            if let (0, Some(addr)) = (i, args.metrics_addr) {
                config.metrics_addr = Listen::On(addr);
            }
            let stop = stop.clone();
            tokio::spawn(flotilla_worker::run(
                config,
                credentials.clone(),
                async move { stop.cancelled().await },
            ))
        })
        .collect();
    println!(
        "workers: {} started, queues {}.*",
        args.workers,
        topology.prefix()
    );

    let operator = Operator {
        broker: broker.clone(),
        broker_args: broker_args.clone(),
        resume_after: args.resume_after,
        keyring,
    };
    let outcome = rollout(&operator, &campaign_file, &inventory, &fleet).await;
    stop.cancel();
    for worker in workers {
        worker.await?.context("a worker failed")?;
    }
    if let Ok(connection) = broker.connection().await {
        let _ = topology.delete(&connection).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
    outcome
}

/// Writes a random job key into `dir` and names it as `FLOTILLA_JOB_KEYS`
/// would.
fn write_job_key(dir: &Path) -> anyhow::Result<KeyArgs> {
    use rand::Rng;
    let key: String = rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(64)
        .map(char::from)
        .collect();
    let path = dir.join("job-key-demo");
    std::fs::write(&path, key).with_context(|| format!("writing {}", path.display()))?;
    Ok(KeyArgs {
        job_keys: Some(format!("demo={}", path.display())),
        signing_key_id: None,
    })
}

/// What the demo does as the operator of a campaign that pauses.
struct Operator {
    broker: Broker,
    broker_args: BrokerArgs,
    resume_after: Duration,
    keyring: Keyring,
}

impl Operator {
    /// Shows why the campaign paused, as `flotilla-producer status` does,
    /// and resumes it after a while.
    fn paused(&self, state: &CampaignState, bar: &ProgressBar) {
        let id = state.campaign().to_owned();
        bar.suspend(|| {
            println!(
                "\n$ flotilla-producer status {id}\n{}",
                report::status(state)
            );
            println!(
                "resuming in {:?}; or now, from another terminal (same AMQP_URL):\n  \
                 FLOTILLA_PREFIX={} target/release/flotilla-producer resume {id}\n",
                self.resume_after, self.broker_args.prefix,
            );
        });
        let (broker, topology, wait) = (
            self.broker.clone(),
            self.broker_args.topology(),
            self.resume_after,
        );
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            let reason = Some("the demo's operator looked and resumed".to_owned());
            if let Err(error) = send_command(&broker, &topology, &id, Command::Resume, reason).await
            {
                eprintln!("resuming {id}: {error}");
            }
        });
    }
}

async fn rollout(
    operator: &Operator,
    campaign_file: &Path,
    inventory: &Path,
    fleet: &Fleet,
) -> anyhow::Result<ExitCode> {
    let (broker, topology) = (&operator.broker, &operator.broker_args.topology());
    let campaign = Campaign::load(campaign_file)?;
    let (checked, problems) = check_inventory(inventory, |e| eprintln!("inventory: {e}"))?;
    if problems > 0 {
        bail!("the generated inventory has {problems} problem(s)");
    }
    let bar = ProgressBar::new(checked.devices).with_style(
        ProgressStyle::with_template("{msg:12} [{bar:40}] {pos}/{len} devices done ({elapsed})")
            .expect("the progress template is valid")
            .progress_chars("=> "),
    );
    bar.set_message("upgrading");
    let started = std::time::Instant::now();
    let spec = RunSpec {
        inventory,
        devices: checked.devices,
        fingerprint: fingerprint(&[campaign_file, inventory], "")?,
        only: None,
        readiness: None,
        keyring: operator.keyring.clone(),
    };
    let mut decisions = 0;
    let tracker = run_campaign(broker, topology, &campaign, spec, |state| {
        for decision in &state.decisions()[decisions..] {
            bar.suspend(|| {
                println!(
                    "[{}] {}",
                    report::decision_name(&decision.decision),
                    decision.reason
                )
            });
            if matches!(decision.decision, Decision::Paused { .. }) {
                operator.paused(state, &bar);
            }
        }
        decisions = state.decisions().len();
        bar.set_position(state.finished() as u64)
    })
    .await?;
    bar.finish_and_clear();
    println!(
        "rollout: campaign {} - every device finished in {:.1?}\n",
        campaign.id,
        started.elapsed()
    );

    print_summary(&tracker);
    Ok(compare_with_simulator(&tracker, fleet))
}

fn print_summary(tracker: &CampaignState) {
    let mut table: BTreeMap<DeviceKind, BTreeMap<Outcome, u64>> = BTreeMap::new();
    for ((kind, outcome), n) in tracker.counts_by_kind() {
        *table.entry(*kind).or_default().entry(*outcome).or_default() += n;
    }
    print!("{:<12}", "kind");
    for outcome in Outcome::ALL {
        print!("{:>14}", outcome.as_str());
    }
    println!();
    for (kind, outcomes) in &table {
        print!("{:<12}", kind.as_str());
        for outcome in Outcome::ALL {
            print!("{:>14}", outcomes.get(&outcome).copied().unwrap_or(0));
        }
        println!();
    }
    let mut failures: Vec<_> = tracker
        .outcomes()
        .filter(|f| f.ending.outcome != Outcome::Succeeded)
        .collect();
    failures.sort_by(|a, b| a.device.cmp(&b.device));
    for failure in failures.iter().take(3) {
        println!(
            "  e.g. {} {}: {}",
            failure.device,
            failure.ending.outcome,
            failure.ending.error.as_deref().unwrap_or("")
        );
    }
    println!();
}

/// Every outcome must be the one the simulator's fate called for (its
/// error class and words too, and for a NetProfiler each gateway's), no
/// device upgraded twice, and no upgrade rule left enabled.
fn compare_with_simulator(tracker: &CampaignState, fleet: &Fleet) -> ExitCode {
    let mut mismatches = Vec::new();
    let mut gateways: BTreeMap<String, u64> = BTreeMap::new();
    // SPS appliances by the upgrades the simulator accepted from them.
    let mut sps_upgrades: BTreeMap<u32, u64> = BTreeMap::new();
    for device in fleet.devices() {
        let Some(reported) = tracker.outcome_of(&device.id) else {
            mismatches.push(format!("{}: no outcome reported", device.id));
            continue;
        };
        if let Some(expected) = fleet.expectation(&device.id)
            && let Err(difference) = expected.check(&reported.ending)
        {
            mismatches.push(format!("{}: {difference}", device.id));
        }
        if let Err(difference) = fleet.check_detail(&device.id, &reported.ending) {
            mismatches.push(format!("{}: {difference}", device.id));
        }
        let detail = reported.ending.detail.as_ref();
        for gateway in detail
            .and_then(|d| d.get("gateways"))
            .and_then(|g| g.as_array())
            .into_iter()
            .flatten()
        {
            let outcome = gateway["outcome"].as_str().unwrap_or("unknown");
            *gateways.entry(outcome.to_owned()).or_default() += 1;
        }
        if device.kind == DeviceKind::Sps {
            *sps_upgrades
                .entry(fleet.upgrades_of(&device.id))
                .or_default() += 1;
        }
        if fleet.upgrades_of(&device.id) > 1 {
            mismatches.push(format!(
                "{} was upgraded {} times",
                device.id,
                fleet.upgrades_of(&device.id)
            ));
        }
    }
    let enabled = fleet.enabled_rules();
    if !enabled.is_empty() {
        mismatches.push(format!("{} upgrade rule(s) left enabled", enabled.len()));
    }
    for repeated in tracker.repeated_outcomes() {
        mismatches.push(format!("{} ended more than once", repeated.device));
    }
    if !sps_upgrades.is_empty() {
        let counts: Vec<String> = sps_upgrades
            .iter()
            .map(|(upgrades, n)| format!("{n} upgraded {upgrades} time(s)"))
            .collect();
        let twice: u64 = sps_upgrades.range(2..).map(|(_, n)| n).sum();
        println!(
            "sps appliances, by the simulator's own count: {}; upgraded twice: {twice}",
            counts.join(", ")
        );
    }
    if !gateways.is_empty() {
        let counts: Vec<String> = gateways.iter().map(|(o, n)| format!("{n} {o}")).collect();
        println!("netprofiler gateways: {}", counts.join(", "));
    }
    let attention = tracker
        .outcomes()
        .filter(|f| f.ending.needs_attention)
        .count();
    if attention > 0 {
        println!("needing attention: {attention} device(s) failed critically");
    }
    if mismatches.is_empty() {
        println!(
            "check: all {} outcomes match the simulator (per gateway for NetProfilers); \
             no device upgraded twice; no rule left enabled",
            fleet.devices().len()
        );
        ExitCode::SUCCESS
    } else {
        println!(
            "check: {} mismatch(es) with the simulator:",
            mismatches.len()
        );
        for mismatch in mismatches.iter().take(20) {
            println!("  {mismatch}");
        }
        ExitCode::FAILURE
    }
}

/// Writes the fleet's devices taking the kinds in turn, so that every wave
/// of a mixed campaign has some of each kind.
/// Writes the inventory, the kinds in turn, and returns its devices in the
/// order written (the order waves take them in).
fn write_inventory<'a>(fleet: &'a Fleet, path: &Path) -> anyhow::Result<Vec<&'a Device>> {
    let mut by_kind: BTreeMap<DeviceKind, Vec<&Device>> = BTreeMap::new();
    for device in fleet.devices() {
        by_kind.entry(device.kind).or_default().push(device);
    }
    let mut by_kind: Vec<_> = by_kind.into_values().map(Vec::into_iter).collect();
    let mut writer = InventoryWriter::new(std::fs::File::create(path)?)?;
    let mut order = Vec::with_capacity(fleet.devices().len());
    loop {
        let mut wrote = false;
        for devices in &mut by_kind {
            if let Some(device) = devices.next() {
                writer.write(device)?;
                order.push(device);
                wrote = true;
            }
        }
        if !wrote {
            break;
        }
    }
    writer.finish()?;
    Ok(order)
}

/// How many devices the simulator will make fail, counted from its own
/// fates, and where they are: with a canary, the faults sit in it, so the
/// ratio applies to the canary, not to the fleet.
fn faults_summary(fleet: &Fleet, order: &[&Device], canary: Option<usize>) -> String {
    let fails = |device: &&&Device| {
        fleet
            .expected_outcome(&device.id)
            .is_some_and(|outcome| outcome != Outcome::Succeeded)
    };
    let failing = order.iter().filter(fails).count();
    let devices = |n: usize| if n == 1 { "device" } else { "devices" };
    match canary {
        Some(size) => {
            let size = size.min(order.len());
            let in_canary = order[..size].iter().filter(fails).count();
            let place = if in_canary == failing {
                "all in".to_owned()
            } else {
                format!("{in_canary} in")
            };
            format!(
                "{failing} {} set to fail, {place} the {size}-device canary",
                devices(failing)
            )
        }
        None => format!(
            "{failing} {} ({:.1}%) set to fail",
            devices(failing),
            100.0 * failing as f64 / order.len().max(1) as f64
        ),
    }
}

/// Flow Gateways each NetProfiler updates.
const GATEWAYS_PER_NETPROFILER: usize = 3;

fn campaign_toml(id: &str, fleet: &Fleet, canary: Option<usize>) -> String {
    let (version, sha256) = fleet.release();
    let waves = match canary {
        // The budget applies from half the canary on: the gate lets the
        // next wave start before the whole canary has finished.
        Some(n) => format!(
            r#"
[waves]
sizes = [{n}, "10%", "50%", "100%"]
success_gate = 0.8

[failure_budget]
wave = {{ ratio = 0.05, min_finished = {half} }}
"#,
            half = (n / 2).max(1)
        ),
        None => String::new(),
    };
    format!(
        r#"id = "{id}"

[target]
version = "{version}"
image_url = "http://files.example.net/firmware/{version}.bin"
sha256 = "{sha256}"

[drivers.netprofiler]
backup_first = true

[drivers.flowgateway]
operation = "backup"

[drivers.npm]
delete_image = true

# Without a commit message, SPS appliances that require a commit log
# refuse the upgrade (some of the simulator's faults):
# [drivers.sps]
# commit_message = "Firmware {version}"

[timing]
deadline = "5m"
step_timeout = "20s"
poll_interval = "1s"

[retry]
max_attempts = 8
initial_backoff = "250ms"
max_backoff = "5s"
{waves}"#
    )
}
