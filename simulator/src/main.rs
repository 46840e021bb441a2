//! `flotilla-sim`: runs a simulated fleet until interrupted, and writes its
//! inventory so a producer can be pointed at it.

use anyhow::Context;
use clap::Parser;
use flotilla_common::{DeviceKind, inventory::InventoryWriter};
use flotilla_sim::{Fleet, FleetSpec, faults::FaultSpec};
use std::{net::IpAddr, path::PathBuf, time::Duration};

#[derive(Parser)]
#[command(
    name = "flotilla-sim",
    version,
    about = "Serves a simulated device fleet (on loopback addresses unless told otherwise)."
)]
struct Args {
    /// TR-069 CPEs (behind simulated DMS hosts).
    #[arg(long, default_value_t = 100)]
    dms_cpes: usize,
    /// CPEs per DMS host.
    #[arg(long, default_value_t = 500)]
    cpes_per_dms: usize,
    /// Fraction of devices whose upgrade fails.
    #[arg(long, default_value_t = 0.0)]
    fault_ratio: f64,
    /// Fraction of devices that never report.
    #[arg(long, default_value_t = 0.0)]
    silent_ratio: f64,
    /// Fraction of requests answered with a transient HTTP 500.
    #[arg(long, default_value_t = 0.0)]
    transient_ratio: f64,
    /// Longest time a request takes (each takes between 0 and this).
    #[arg(long, default_value = "5ms", value_parser = humantime::parse_duration)]
    latency: Duration,
    /// Longest time an upgrade takes (each takes between a fifth of it and it).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    upgrade_time: Duration,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where to write the fleet's inventory.
    #[arg(long, default_value = "sim-devices.csv")]
    inventory: PathBuf,
    /// Address the simulated hosts listen on: 0.0.0.0 when workers run
    /// elsewhere, as in containers.
    #[arg(long, default_value = "127.0.0.1")]
    listen: IpAddr,
    /// Host name the inventory gives for the devices instead of the listening
    /// address (the simulator's name on a container network).
    #[arg(long)]
    advertise: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let args = Args::parse();
    for (name, ratio) in [
        ("--fault-ratio", args.fault_ratio),
        ("--silent-ratio", args.silent_ratio),
        ("--transient-ratio", args.transient_ratio),
    ] {
        anyhow::ensure!(
            (0.0..=1.0).contains(&ratio),
            "{name} must be between 0 and 1, not {ratio}"
        );
    }
    let spec = FleetSpec {
        cpes_per_dms: args.cpes_per_dms,
        faults: FaultSpec {
            failure_ratio: args.fault_ratio,
            silent_ratio: args.silent_ratio,
            transient_ratio: args.transient_ratio,
            only_first: None,
        },
        request_latency: Duration::ZERO..=args.latency,
        upgrade_time: args.upgrade_time / 5..=args.upgrade_time,
        seed: args.seed,
        ip: args.listen,
        ..FleetSpec::default()
    }
    .with(DeviceKind::Dms, args.dms_cpes);
    let fleet = Fleet::start(spec)
        .await
        .context("starting the simulated fleet")?;
    // Written aside, then renamed: whoever waits for the inventory to appear
    // (a producer container) never reads half of it.
    let partial = args.inventory.with_extension("partial");
    let file = std::fs::File::create(&partial)
        .with_context(|| format!("creating {}", partial.display()))?;
    let mut writer = InventoryWriter::new(file)?;
    for device in fleet.devices() {
        let mut device = device.clone();
        if let Some(host) = &args.advertise {
            device
                .address
                .set_host(Some(host))
                .with_context(|| format!("--advertise {host:?}"))?;
        }
        writer.write(&device)?;
    }
    writer.finish()?;
    std::fs::rename(&partial, &args.inventory)
        .with_context(|| format!("writing {}", args.inventory.display()))?;
    let (user, password) = fleet.login();
    println!(
        "{} devices up; inventory in {}.\nWorkers need the credentials reference `{}`, e.g.:\n  \
         FLOTILLA_CREDENTIALS_SIM_USERNAME={user} FLOTILLA_CREDENTIALS_SIM_PASSWORD={password} flotilla-worker",
        fleet.devices().len(),
        args.inventory.display(),
        flotilla_sim::CREDENTIALS_REFERENCE,
    );
    tokio::signal::ctrl_c().await?;
    fleet.shutdown();
    Ok(())
}
