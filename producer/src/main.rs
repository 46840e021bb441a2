use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use flotilla_common::{
    Broker, DeviceKind, Event,
    cli::{BrokerArgs, Listen, parse_listen},
    control::Command as ControlCommand,
    inventory::RowError,
    ops,
    signing::{KeyArgs, Keyring},
    telemetry::{LogArgs, Telemetry},
};
use flotilla_producer::{
    Campaign, CampaignState, InventorySummary, ProducerError, RunSpec, check_inventory,
    exit::{BadInput, Exit},
    feed::read_events,
    fingerprint, forecast,
    metrics::ProducerMetrics,
    progress::Progress,
    read_campaign, read_status,
    report::{self, Format},
    run_campaign, send_command,
    state::Phase,
    status_view::StatusJson,
};
use std::{
    cell::Cell,
    collections::{BTreeMap, HashSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
    time::Duration,
};

#[derive(Parser)]
#[command(
    name = "flotilla-producer",
    version,
    about = "Checks and rolls out Flotilla campaigns, and reports on them."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    log: LogArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Check the campaign and the whole inventory, then roll the campaign
    /// out until every device has finished. Interrupted or crashed, the
    /// same command resumes it.
    Run {
        #[command(flatten)]
        files: CampaignFiles,
        /// Only the devices that failed or timed out in this campaign.
        #[arg(long)]
        retry_failed_from: Option<String>,
        /// Serve /metrics, /healthz and /readyz here while the campaign
        /// runs; "off" (or unset) serves none.
        #[arg(long, env = "FLOTILLA_METRICS_ADDR", value_parser = parse_listen)]
        metrics_addr: Option<Listen>,
        /// Exit (status 12) when the campaign pauses, instead of waiting
        /// for someone to resume it: `resume`, then run the same command.
        #[arg(long)]
        detach_on_pause: bool,
        #[command(flatten)]
        output: ProgressArgs,
        /// The job keys; jobs are signed with `FLOTILLA_JOB_SIGNING_KEY_ID`.
        #[command(flatten)]
        keys: KeyArgs,
        #[command(flatten)]
        broker: BrokerArgs,
    },
    /// Check the campaign and the inventory without publishing anything.
    Check {
        #[command(flatten)]
        files: CampaignFiles,
        /// Print the campaign's forecast too, as `plan` does.
        #[arg(long)]
        forecast: bool,
        #[command(flatten)]
        assumed: ForecastArgs,
    },
    /// Check the campaign and the inventory, then print the timeline the
    /// controller would follow: waves, devices in flight per host against
    /// the caps, windows waited for, budget pauses, the end. Publishes
    /// nothing.
    Plan {
        #[command(flatten)]
        files: CampaignFiles,
        #[command(flatten)]
        assumed: ForecastArgs,
    },
    /// Show a campaign's progress per wave and outcome, and its decisions.
    Status {
        campaign: String,
        /// Keep showing progress until the campaign completes, then exit
        /// as `run` does.
        #[arg(long, conflicts_with = "format")]
        watch: bool,
        #[arg(long, value_enum, default_value = "text")]
        format: StatusFormat,
        #[command(flatten)]
        output: ProgressArgs,
        #[command(flatten)]
        broker: BrokerArgs,
    },
    /// One row per device: outcome, last step, attempts, duration, error.
    Report {
        campaign: String,
        #[arg(long, value_enum, default_value = "csv")]
        format: Format,
        /// Write to this file instead of standard output.
        #[arg(long)]
        output: Option<PathBuf>,
        #[command(flatten)]
        broker: BrokerArgs,
    },
    /// Every step of one device.
    History {
        campaign: String,
        device: String,
        #[command(flatten)]
        broker: BrokerArgs,
    },
    /// Stop starting devices and park the campaign's jobs.
    Pause(ControlArgs),
    /// Continue a paused campaign (also approves the next wave).
    Resume(ControlArgs),
    /// Clean up every job of the campaign and end it `cancelled`.
    Cancel(ControlArgs),
    /// Inspect (`list`) or re-queue (`redrive`) dead-lettered jobs.
    #[command(subcommand)]
    Dead(flotilla_producer::dead::DeadCommand),
    /// Print a shell completion script, e.g. `flotilla-producer completions
    /// bash > /etc/bash_completion.d/flotilla-producer`.
    Completions { shell: clap_complete::Shell },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum StatusFormat {
    Text,
    /// One JSON document; the README lists its fields.
    Json,
}

/// What a forecast assumes.
#[derive(clap::Args)]
struct ForecastArgs {
    /// Time from a device's start to its outcome, per kind:
    /// `dms=90s,npm=20m`. Overrides what `--like` measured.
    #[arg(long, value_parser = flotilla_producer::forecast::parse_durations)]
    duration: Option<BTreeMap<DeviceKind, Duration>>,
    /// Measure each kind's duration from this past campaign's events (the
    /// mean of its devices that succeeded); needs the broker.
    #[arg(long)]
    like: Option<String>,
    /// Share of the devices assumed to fail, spread evenly (0.03 = 3%).
    #[arg(long, default_value_t = 0.0, value_parser = parse_ratio)]
    failure_ratio: f64,
    /// When the campaign would start (RFC 3339, `2026-12-02T22:00:00Z`);
    /// default now.
    #[arg(long)]
    start: Option<chrono::DateTime<chrono::Utc>>,
    #[arg(long, value_enum, default_value = "text")]
    format: StatusFormat,
    #[command(flatten)]
    broker: BrokerArgs,
}

fn parse_ratio(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(ratio) if (0.0..=1.0).contains(&ratio) => Ok(ratio),
        _ => Err(format!("{text:?} is not a ratio between 0 and 1")),
    }
}

#[derive(clap::Args)]
struct ProgressArgs {
    /// When the output is not a terminal: the longest wait between two
    /// progress lines while devices are finishing.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    progress_every: Duration,
}

#[derive(clap::Args)]
struct CampaignFiles {
    /// The campaign file (TOML).
    #[arg(long)]
    campaign: PathBuf,
    /// The inventory (CSV: id,kind,address,credentials,cpe_id,group).
    #[arg(long)]
    inventory: PathBuf,
}

#[derive(clap::Args)]
struct ControlArgs {
    campaign: String,
    /// Why, for the record.
    #[arg(long)]
    reason: Option<String>,
    #[command(flatten)]
    broker: BrokerArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // lapin logs each failed connection itself; the command's own error
    // says what went wrong, once.
    let _telemetry = Telemetry::init("flotilla-producer", cli.log.log_format, "warn,lapin=off");
    match run(cli).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            Exit::of_error(error.as_ref()).into()
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Check {
            files,
            forecast,
            assumed,
        } => {
            let (campaign, summary) = check(&files, None)?;
            println!(
                "{}: campaign {} is valid; {} device(s) ready ({})",
                files.inventory.display(),
                campaign.id,
                summary.devices,
                by_kind(&summary)
            );
            if forecast {
                print_forecast(&files, &campaign, &summary, assumed).await?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Plan { files, assumed } => {
            let (campaign, summary) = check(&files, None)?;
            print_forecast(&files, &campaign, &summary, assumed).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            files,
            retry_failed_from,
            metrics_addr,
            detach_on_pause,
            output,
            keys,
            broker,
        } => {
            // Before anything else: a producer that cannot sign publishes
            // nothing.
            let keyring = keys
                .keyring()
                .map_err(|error| BadInput(error.to_string()))?;
            let options = RunOptions {
                keyring,
                retry_failed_from,
                metrics_addr: metrics_addr.and_then(Listen::addr),
                detach_on_pause,
                progress_every: output.progress_every,
            };
            rollout(files, options, broker).await
        }
        Command::Status {
            campaign,
            watch,
            format,
            output,
            broker,
        } => {
            let connection = Broker::new(&broker.amqp_url, "flotilla-producer status")?;
            if watch {
                watch_status(&connection, &broker, &campaign, output.progress_every).await
            } else {
                let (state, _) = read_status(&connection, &broker.topology(), &campaign).await?;
                match format {
                    StatusFormat::Text => print!("{}", report::status(&state)),
                    StatusFormat::Json => {
                        let json = StatusJson::of(&state, chrono::Utc::now());
                        println!("{}", serde_json::to_string_pretty(&json)?);
                    }
                }
                Ok(ExitCode::SUCCESS)
            }
        }
        Command::Report {
            campaign,
            format,
            output,
            broker,
        } => {
            let connection = Broker::new(&broker.amqp_url, "flotilla-producer report")?;
            let state = read_campaign(&connection, &broker.topology(), &campaign).await?;
            if state.phase() == Phase::New {
                return Err(BadInput(format!("no campaign {campaign} on this broker")).into());
            }
            let rows = report::rows(&state);
            match output {
                Some(path) => {
                    let file = std::fs::File::create(&path)
                        .with_context(|| format!("creating {}", path.display()))?;
                    report::write_report(&rows, format, file)?;
                    eprintln!("{} rows written to {}", rows.len(), path.display());
                }
                None => report::write_report(&rows, format, std::io::stdout().lock())?,
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::History {
            campaign,
            device,
            broker,
        } => {
            let connection = Broker::new(&broker.amqp_url, "flotilla-producer history")?;
            let mut events: Vec<Event> = Vec::new();
            read_events(&connection, &broker.topology(), &campaign, |event| {
                if event.device() == Some(device.as_str()) {
                    events.push(event.clone());
                }
            })
            .await?;
            print!("{}", report::history(&device, &events));
            Ok(ExitCode::SUCCESS)
        }
        Command::Pause(args) => control(args, ControlCommand::Pause).await,
        Command::Resume(args) => control(args, ControlCommand::Resume).await,
        Command::Cancel(args) => control(args, ControlCommand::Cancel).await,
        Command::Dead(command) => {
            command.run().await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Completions { shell } => {
            // Into a buffer first: clap_complete panics on a closed pipe.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "flotilla-producer", &mut script);
            std::io::Write::write_all(&mut std::io::stdout().lock(), &script)
                .context("writing the completion script")?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Works out and prints the campaign's forecast.
async fn print_forecast(
    files: &CampaignFiles,
    campaign: &Campaign,
    summary: &InventorySummary,
    args: ForecastArgs,
) -> anyhow::Result<()> {
    let mut durations = BTreeMap::new();
    if let Some(like) = &args.like {
        let connection = Broker::new(&args.broker.amqp_url, "flotilla-producer plan")?;
        let state = read_campaign(&connection, &args.broker.topology(), like).await?;
        if state.phase() == Phase::New {
            return Err(BadInput(format!("--like {like}: no such campaign on this broker")).into());
        }
        durations = forecast::measured_durations(&state);
    }
    durations.extend(args.duration.unwrap_or_default());
    let assumptions = forecast::Assumptions {
        durations,
        failure_ratio: args.failure_ratio,
        start: args.start.unwrap_or_else(chrono::Utc::now),
    };
    assumptions
        .check_kinds(summary.by_kind.keys())
        .map_err(BadInput)?;
    let timeline = forecast::forecast(
        campaign,
        &files.inventory,
        summary.devices,
        None,
        &assumptions,
    )
    .await?;
    match args.format {
        StatusFormat::Text => print!(
            "{}",
            forecast::timeline::text(&campaign.id, summary.devices, &timeline, &assumptions)
        ),
        StatusFormat::Json => {
            let json =
                forecast::ForecastJson::of(&campaign.id, summary.devices, &timeline, &assumptions);
            println!("{}", serde_json::to_string_pretty(&json)?);
        }
    }
    Ok(())
}

/// How `run` runs, besides the files and the broker.
struct RunOptions {
    keyring: Keyring,
    retry_failed_from: Option<String>,
    metrics_addr: Option<SocketAddr>,
    detach_on_pause: bool,
    progress_every: Duration,
}

async fn rollout(
    files: CampaignFiles,
    options: RunOptions,
    broker: BrokerArgs,
) -> anyhow::Result<ExitCode> {
    let RunOptions {
        keyring,
        retry_failed_from,
        metrics_addr,
        detach_on_pause,
        progress_every,
    } = options;
    // Named for its campaign in RabbitMQ's connection list, so an operator
    // (or a test) can tell one controller's connection from another's.
    let name = match Campaign::load(&files.campaign) {
        Ok(campaign) => format!("flotilla-producer {}/{}", broker.prefix, campaign.id),
        Err(_) => "flotilla-producer".to_owned(),
    };
    let connection = Broker::new(&broker.amqp_url, &name)?;
    let topology = broker.topology();
    let only = match &retry_failed_from {
        Some(old) => {
            let state = read_campaign(&connection, &topology, old).await?;
            if state.phase() == Phase::New {
                return Err(BadInput(format!(
                    "--retry-failed-from {old}: no such campaign on this broker"
                ))
                .into());
            }
            let failed: HashSet<String> = state
                .outcomes()
                .filter(|f| {
                    matches!(
                        f.ending.outcome,
                        flotilla_common::Outcome::Failed | flotilla_common::Outcome::TimedOut
                    )
                })
                .map(|f| f.device.clone())
                .collect();
            eprintln!("{} device(s) failed or timed out in {old}", failed.len());
            Some(failed)
        }
        None => None,
    };
    let (campaign, summary) = check(&files, only.as_ref())?;
    if retry_failed_from.as_deref() == Some(campaign.id.as_str()) {
        return Err(BadInput(format!(
            "a retry needs a new campaign id, not {}",
            campaign.id
        ))
        .into());
    }
    let fingerprint = fingerprint(
        &[&files.campaign, &files.inventory],
        retry_failed_from.as_deref().unwrap_or(""),
    )?;
    println!(
        "campaign {}: {} device(s) ({}); following it until every device finishes (Ctrl-C detaches; run again to resume)",
        campaign.id,
        summary.devices,
        by_kind(&summary)
    );

    let registry = prometheus::Registry::new();
    let mut metrics = ProducerMetrics::new(&registry, &campaign)
        .expect("a new registry has none of the producer's metrics yet");
    // Ready while the controller is connected to the broker.
    let readiness = Arc::new(ops::Readiness::default());
    if let Some(addr) = metrics_addr {
        serve_metrics(addr, registry, readiness.clone()).await?;
    }

    let mut progress = Progress::for_output(summary.devices, progress_every);
    let spec = RunSpec {
        inventory: &files.inventory,
        devices: summary.devices,
        fingerprint,
        only,
        readiness: Some(readiness),
        keyring,
    };
    // What the run last showed, read once it is stopped.
    let phase = Cell::new(Phase::New);
    let paused = tokio::sync::Notify::new();
    let observe = |state: &CampaignState| {
        progress.update(state);
        metrics.observe(state);
        phase.set(state.phase());
        if detach_on_pause && matches!(state.phase(), Phase::Paused(_)) {
            paused.notify_one();
        }
    };
    let run = run_campaign(&connection, &topology, &campaign, spec, observe);
    let state = tokio::select! {
        state = run => state?,
        _ = paused.notified() => {
            progress.abandon();
            println!(
                "campaign {0} is paused; detached. `flotilla-producer resume {0}`, then run the same command again to continue it",
                campaign.id
            );
            return Ok(Exit::Paused.into());
        }
        _ = detach_signal() => {
            let exit = if matches!(phase.get(), Phase::Paused(_)) { Exit::Paused } else { Exit::Detached };
            progress.abandon();
            println!("detached; run the same command again to resume campaign {}", campaign.id);
            return Ok(exit.into());
        }
    };
    progress.finish(&state);
    print!("{}", report::status(&state));
    Ok(Exit::of_campaign(&state).into())
}

/// Ctrl-C, or SIGTERM (systemd, Kubernetes): `run` detaches from its
/// campaign, which a later `run` resumes.
async fn detach_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Serves the operations endpoints for as long as the process runs.
async fn serve_metrics(
    addr: SocketAddr,
    registry: prometheus::Registry,
    readiness: Arc<ops::Readiness>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("serving metrics on {addr}"))?;
    tokio::spawn(ops::serve(
        listener,
        registry,
        readiness,
        std::future::pending(),
    ));
    Ok(())
}

async fn watch_status(
    connection: &Broker,
    broker: &BrokerArgs,
    campaign: &str,
    progress_every: Duration,
) -> anyhow::Result<ExitCode> {
    let (mut state, feed) = read_status(connection, &broker.topology(), campaign).await?;
    print!("{}", report::status(&state));
    match state.phase() {
        Phase::New => {
            return Err(BadInput(format!("no campaign {campaign} on this broker")).into());
        }
        Phase::Completed => return Ok(Exit::of_campaign(&state).into()),
        _ => {}
    }
    let Some(mut feed) = feed else {
        return Ok(Exit::of_campaign(&state).into());
    };
    let mut progress = Progress::for_output(state.device_count(), progress_every);
    progress.shown_up_to(&state);
    // The feed goes on from where the status was read.
    while state.phase() != Phase::Completed {
        let (_, event) = feed.next().await?;
        state.apply(&event);
        progress.update(&state);
    }
    progress.finish(&state);
    print!("{}", report::status(&state));
    Ok(Exit::of_campaign(&state).into())
}

async fn control(args: ControlArgs, command: ControlCommand) -> anyhow::Result<ExitCode> {
    let connection = Broker::new(&args.broker.amqp_url, "flotilla-producer control")?;
    let topology = args.broker.topology();
    let (state, _) = read_status(&connection, &topology, &args.campaign).await?;
    let refusal = match state.phase() {
        Phase::New => Some("there is no such campaign on this broker"),
        Phase::Completed => Some("it has completed"),
        Phase::Cancelled => Some("it is cancelled"),
        _ => None,
    };
    if let Some(refusal) = refusal {
        return Err(BadInput(format!(
            "cannot {} campaign {}: {refusal}",
            command.as_str(),
            args.campaign
        ))
        .into());
    }
    send_command(&connection, &topology, &args.campaign, command, args.reason).await?;
    println!("{} sent to campaign {}", command.as_str(), args.campaign);
    Ok(ExitCode::SUCCESS)
}

/// Checks both files, printing every inventory problem on stderr.
fn check(
    files: &CampaignFiles,
    only: Option<&HashSet<String>>,
) -> Result<(Campaign, InventorySummary), ProducerError> {
    let campaign = Campaign::load(&files.campaign)?;
    let path = files.inventory.display().to_string();
    let (mut summary, problems) = check_inventory(&files.inventory, |error: RowError| {
        eprintln!("{path}: {error}")
    })
    .map_err(|source| ProducerError::Io {
        path: path.clone(),
        source,
    })?;
    if problems > 0 {
        return Err(ProducerError::Inventory { path, problems });
    }
    if let Some(only) = only {
        summary = count_only(&files.inventory, only)?;
    }
    flotilla_producer::rollout::plan::wave_ends(&campaign.rollout.waves, summary.devices)
        .map_err(ProducerError::Plan)?;
    Ok((campaign, summary))
}

/// Devices of the inventory that are in `only`.
fn count_only(inventory: &Path, only: &HashSet<String>) -> Result<InventorySummary, ProducerError> {
    let mut cursor =
        flotilla_producer::rollout::cursor::Cursor::open(inventory, Some(only.clone()))?;
    let mut summary = InventorySummary::default();
    while let Some((_, device)) = cursor.next_device()? {
        summary.devices += 1;
        *summary.by_kind.entry(device.kind).or_default() += 1;
    }
    Ok(summary)
}

fn by_kind(summary: &InventorySummary) -> String {
    summary
        .by_kind
        .iter()
        .map(|(kind, n)| format!("{kind}: {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}
