use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use flotilla_common::{
    Broker, Event,
    cli::BrokerArgs,
    control::Command as ControlCommand,
    inventory::RowError,
    ops,
    telemetry::{LogArgs, Telemetry},
};
use flotilla_producer::{
    Campaign, CampaignState, InventorySummary, ProducerError, RunSpec, check_inventory,
    feed::read_events,
    fingerprint,
    metrics::ProducerMetrics,
    read_campaign, read_status,
    report::{self, Format},
    run_campaign, send_command,
    state::Phase,
};
use indicatif::{ProgressBar, ProgressStyle};
use std::{
    collections::HashSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
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
        /// Serve /metrics, /healthz and /readyz here while the campaign runs.
        #[arg(long, env = "FLOTILLA_METRICS_ADDR")]
        metrics_addr: Option<SocketAddr>,
        #[command(flatten)]
        broker: BrokerArgs,
    },
    /// Check the campaign and the inventory without publishing anything.
    Check {
        #[command(flatten)]
        files: CampaignFiles,
    },
    /// Show a campaign's progress per wave and outcome, and its decisions.
    Status {
        campaign: String,
        /// Keep showing progress until the campaign completes.
        #[arg(long)]
        watch: bool,
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
    let _telemetry = Telemetry::init("flotilla-producer", cli.log.log_format, "warn");
    match run(cli).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Check { files } => {
            let (campaign, summary) = check(&files, None)?;
            println!(
                "{}: campaign {} is valid; {} device(s) ready ({})",
                files.inventory.display(),
                campaign.id,
                summary.devices,
                by_kind(&summary)
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            files,
            retry_failed_from,
            metrics_addr,
            broker,
        } => rollout(files, retry_failed_from, metrics_addr, broker).await,
        Command::Status {
            campaign,
            watch,
            broker,
        } => {
            let connection = Broker::new(&broker.amqp_url, "flotilla-producer status")?;
            if watch {
                watch_status(&connection, &broker, &campaign).await
            } else {
                let (state, _) = read_status(&connection, &broker.topology(), &campaign).await?;
                print!("{}", report::status(&state));
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
                bail!("no campaign {campaign} on this broker");
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
    }
}

async fn rollout(
    files: CampaignFiles,
    retry_failed_from: Option<String>,
    metrics_addr: Option<SocketAddr>,
    broker: BrokerArgs,
) -> anyhow::Result<ExitCode> {
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
                bail!("--retry-failed-from {old}: no such campaign on this broker");
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
        bail!("a retry needs a new campaign id, not {}", campaign.id);
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

    let bar = progress_bar(summary.devices);
    let mut printed = 0;
    let spec = RunSpec {
        inventory: &files.inventory,
        devices: summary.devices,
        fingerprint,
        only,
        readiness: Some(readiness),
    };
    let observe = |state: &CampaignState| {
        for decision in &state.decisions()[printed..] {
            bar.println(format!(
                "[{}] {}",
                report::decision_name(&decision.decision),
                decision.reason
            ));
        }
        printed = state.decisions().len();
        show_progress(&bar, state);
        metrics.observe(state);
    };
    let run = run_campaign(&connection, &topology, &campaign, spec, observe);
    let state = tokio::select! {
        state = run => state?,
        _ = interrupted() => {
            bar.abandon();
            println!("detached; run the same command again to resume campaign {}", campaign.id);
            return Ok(ExitCode::from(130));
        }
    };
    bar.finish_and_clear();
    print!("{}", report::status(&state));
    Ok(ExitCode::SUCCESS)
}

/// Ctrl-C or SIGTERM: either detaches (the campaign goes on without its
/// controller until `run` is started again). Nothing is left half done:
/// every transaction and decision is atomic in the broker.
async fn interrupted() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
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
) -> anyhow::Result<ExitCode> {
    let (mut state, feed) = read_status(connection, &broker.topology(), campaign).await?;
    print!("{}", report::status(&state));
    let Some(mut feed) = feed else {
        return Ok(ExitCode::SUCCESS);
    };
    if matches!(state.phase(), Phase::Completed | Phase::New) {
        return Ok(ExitCode::SUCCESS);
    }
    let bar = progress_bar(state.device_count());
    // Redrawn every second even when no event comes (the elapsed time).
    bar.enable_steady_tick(std::time::Duration::from_secs(1));
    show_progress(&bar, &state);
    let mut decisions = state.decisions().len();
    // The feed goes on from where the status was read.
    while state.phase() != Phase::Completed {
        let (_, event) = feed.next().await?;
        state.apply(&event);
        for decision in &state.decisions()[decisions..] {
            bar.println(format!(
                "[{}] {}",
                report::decision_name(&decision.decision),
                decision.reason
            ));
        }
        decisions = state.decisions().len();
        show_progress(&bar, &state);
    }
    bar.finish_and_clear();
    print!("{}", report::status(&state));
    Ok(ExitCode::SUCCESS)
}

fn progress_bar(devices: u64) -> ProgressBar {
    ProgressBar::new(devices).with_style(
        ProgressStyle::with_template("{msg:24} [{bar:40}] {pos}/{len} finished ({elapsed})")
            .expect("the progress template is valid")
            .progress_chars("=> "),
    )
}

fn show_progress(bar: &ProgressBar, state: &CampaignState) {
    let totals = state.totals();
    bar.set_position(totals.finished);
    let phase = match state.phase() {
        Phase::Paused(_) => "PAUSED".to_owned(),
        Phase::Cancelled => "cancelling".to_owned(),
        _ => match state.current_wave() {
            Some(wave) => format!("wave {}/{}", wave + 1, state.wave_count()),
            None => "starting".to_owned(),
        },
    };
    bar.set_message(format!(
        "{phase} ok {} failed {}",
        totals.succeeded, totals.failed
    ));
}

async fn control(args: ControlArgs, command: ControlCommand) -> anyhow::Result<ExitCode> {
    let connection = Broker::new(&args.broker.amqp_url, "flotilla-producer control")?;
    let topology = args.broker.topology();
    let (state, _) = read_status(&connection, &topology, &args.campaign).await?;
    match state.phase() {
        Phase::New => bail!("no campaign {} on this broker", args.campaign),
        Phase::Completed => bail!("campaign {} has completed", args.campaign),
        Phase::Cancelled => bail!("campaign {} is cancelled", args.campaign),
        _ => {}
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
