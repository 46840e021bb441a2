//! `flotilla-bench`: measurements of a whole Flotilla (real broker, in-process
//! workers and controllers, the simulated fleet), one subcommand a scenario.
//! Figures, not pass/fail: the README quotes them.
//!
//! - [`control`]: how fast `status` and `pause` answer during a large rollout,
//!   and how long a producer takes to start against a long events history.
//! - [`poison`]: real jobs among a thousand poison messages, against a
//!   clean run.
//! - [`throughput`]: devices and steps per second, broker messages per
//!   device, memory and poll lateness, beside the broker's raw limits.
//!
//! Uses the broker at `AMQP_URL` (or a container, as the tests do), each run
//! in queues of its own, deleted afterwards.

mod control;
mod poison;
mod stats;
mod throughput;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "flotilla-bench", about = "Benchmarks of a whole Flotilla.")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Status and pause latency during a rollout, and producer start time
    /// against the size of the events stream.
    Control(control::Args),
    /// Real jobs' rate among a thousand poison messages, against a clean
    /// run.
    Poison(poison::Args),
    /// Devices and steps per second with 1, 2 and 4 worker processes,
    /// beside the broker's raw step and publish rates; memory and poll
    /// lateness.
    Throughput(throughput::Args),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Two worker threads, as the tests use: the machine runs the broker,
    // the fleet and the workers too.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match cli.scenario {
            Scenario::Control(args) => control::run(args).await,
            Scenario::Poison(args) => poison::run(args).await,
            Scenario::Throughput(args) => throughput::run(args).await,
        }
    })
}
