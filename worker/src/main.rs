use clap::{CommandFactory, Parser};
use flotilla_common::telemetry::{LogArgs, Telemetry};
use flotilla_worker::{CredentialStore, WorkerConfig};
use tracing::{error, info};

#[derive(Parser)]
#[command(
    name = "flotilla-worker",
    version,
    about = "Runs Flotilla upgrade jobs, one step per delivery.",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(flatten)]
    config: WorkerConfig,
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Print a shell completion script, e.g. `flotilla-worker completions
    /// bash > /etc/bash_completion.d/flotilla-worker`.
    Completions { shell: clap_complete::Shell },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let Cli {
        config,
        log,
        command,
    } = Cli::parse();
    if let Some(Command::Completions { shell }) = command {
        // Into a buffer first: clap_complete panics on a closed pipe.
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), "flotilla-worker", &mut script);
        return match std::io::Write::write_all(&mut std::io::stdout().lock(), &script) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(_) => std::process::ExitCode::FAILURE,
        };
    }
    let _telemetry = Telemetry::init("flotilla-worker", log.log_format, "info,lapin=warn");
    info!(broker = %flotilla_common::broker::redact_url(&config.broker.amqp_url), prefix = %config.broker.prefix, "starting worker");
    match flotilla_worker::run(config, CredentialStore::from_env(), shutdown_signal()).await {
        Ok(()) => {
            info!("worker stopped");
            std::process::ExitCode::SUCCESS
        }
        Err(error) => {
            error!(%error, "worker failed");
            match error {
                // The same status as the producer's for a refused login.
                flotilla_worker::WorkerError::LoginRefused { .. } => {
                    std::process::ExitCode::from(4)
                }
                _ => std::process::ExitCode::FAILURE,
            }
        }
    }
}

/// SIGTERM (Kubernetes, systemd) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT received"),
    }
}
