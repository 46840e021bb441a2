//! A simulated device fleet that speaks the real device APIs over real HTTP
//! on loopback addresses, for Flotilla's tests, demo and benchmarks.
//!
//! A [`Fleet`] is started from a [`FleetSpec`]: it decides every device's
//! fate up front (from a seed), binds one listener per simulated host, and
//! describes itself as inventory rows. Tests and the demo compare what
//! Flotilla reports against the fleet's own record of what happened.
//!
//! Layout: [`faults`] (fates and dice), `host` (listeners that can reboot,
//! latency, injected errors), [`tls`] (the fleet's CA, HTTPS listeners),
//! `riverbed_auth` (Basic, OAuth and NPM tokens), one module per device API
//! ([`dms`], [`netprofiler`], [`flowgateway`], [`npm`], [`sps`]). A new device kind
//! adds a module, a count in [`FleetSpec`], a block in [`Fleet::start`] and
//! a variant of `Simulated`.
//!
//! Fault knobs: [`FaultSpec`] ratios pick devices at random, each kind
//! cycling through its faults ([`GatewayFault`] for NetProfilers — on their
//! first gateway — and standalone Flow Gateways, [`NpmFault`] for NPM,
//! [`SpsFault`] for SPS);
//! [`FleetSpec`]'s `*_faults` lists give the first devices of a kind exact
//! faults, for tests.

pub mod dms;
pub mod faults;
pub mod flowgateway;
mod host;
pub mod netprofiler;
pub mod npm;
mod riverbed_auth;
pub mod sps;
pub mod tls;

pub use flowgateway::GatewayFault;
pub use npm::NpmFault;
pub use sps::SpsFault;

use faults::{Dice, Fate, FaultSpec};
use flotilla_common::{Device, DeviceKind, Ending, ErrorClass, Outcome};
use rand::{SeedableRng, rngs::StdRng};
use riverbed_auth::Auth;
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    ops::RangeInclusive,
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio_util::sync::CancellationToken;

/// The credentials reference every simulated device is listed with.
pub const CREDENTIALS_REFERENCE: &str = "sim";

#[derive(Debug, Clone)]
pub struct FleetSpec {
    /// TR-069 CPEs, spread over DMS hosts.
    pub dms_cpes: usize,
    pub cpes_per_dms: usize,
    pub faults: FaultSpec,
    /// NetProfilers, each with `gateways_per_netprofiler` Flow Gateways.
    pub netprofilers: usize,
    pub gateways_per_netprofiler: usize,
    /// Standalone Flow Gateways (backup or restore jobs).
    pub flowgateways: usize,
    pub npm_appliances: usize,
    /// One Identity SPS appliances.
    pub sps_appliances: usize,
    /// Exact faults for the first NetProfilers (on their first gateway),
    /// Flow Gateways and NPM appliances, before the ratios apply to the rest.
    pub netprofiler_faults: Vec<GatewayFault>,
    pub flowgateway_faults: Vec<GatewayFault>,
    pub npm_faults: Vec<NpmFault>,
    /// Exact faults for the first SPS appliances.
    pub sps_faults: Vec<SpsFault>,
    /// Campaigns against this fleet back up NetProfilers' gateways first:
    /// a backup error then fails the NetProfiler, and is one of its
    /// random faults.
    pub backups_first: bool,
    /// The release Riverbed devices install: the campaign's target version
    /// and SHA-256.
    pub release_version: String,
    pub release_sha256: String,
    /// Backups, restores, initialization, image upload and validation each
    /// take this long.
    pub operation_time: RangeInclusive<Duration>,
    /// How long an NPM or SPS appliance refuses connections while it
    /// reboots. SPS fetches are queued, then download, this long each.
    pub reboot_time: RangeInclusive<Duration>,
    /// An SPS session without a call for this long ends.
    pub sps_session_idle: Duration,
    /// Lifetime of Riverbed bearer tokens.
    pub token_lifetime: Duration,
    /// The OAuth access code Riverbed Common API devices accept.
    pub access_code: String,
    /// The SSH password remote backup hosts accept.
    pub backup_password: String,
    /// Serve Riverbed devices over HTTPS, with certificates from the
    /// fleet's own CA.
    pub https: bool,
    /// Time each request takes.
    pub request_latency: RangeInclusive<Duration>,
    /// Time a device takes to carry out an upgrade.
    pub upgrade_time: RangeInclusive<Duration>,
    pub seed: u64,
    pub username: String,
    pub password: String,
    /// Loopback address the hosts listen on.
    pub ip: IpAddr,
}

impl Default for FleetSpec {
    fn default() -> Self {
        FleetSpec {
            dms_cpes: 0,
            cpes_per_dms: 500,
            faults: FaultSpec::NONE,
            netprofilers: 0,
            gateways_per_netprofiler: 3,
            flowgateways: 0,
            npm_appliances: 0,
            sps_appliances: 0,
            netprofiler_faults: Vec::new(),
            flowgateway_faults: Vec::new(),
            npm_faults: Vec::new(),
            sps_faults: Vec::new(),
            backups_first: false,
            release_version: "7.2.1".to_owned(),
            release_sha256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
                .to_owned(),
            operation_time: Duration::from_millis(100)..=Duration::from_millis(400),
            reboot_time: Duration::from_millis(300)..=Duration::from_millis(800),
            sps_session_idle: Duration::from_secs(600),
            token_lifetime: Duration::from_secs(600),
            access_code: "sim-access-code".to_owned(),
            backup_password: "sim-backup-password".to_owned(),
            https: false,
            request_latency: Duration::from_millis(1)..=Duration::from_millis(5),
            upgrade_time: Duration::from_millis(300)..=Duration::from_millis(1500),
            seed: 1,
            username: "flotilla".to_owned(),
            password: "sim-password".to_owned(),
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        }
    }
}

/// What Flotilla should report for a device, given what the simulator
/// will do to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expectation {
    pub outcome: Outcome,
    pub error_class: Option<ErrorClass>,
    /// Text the reported error must contain.
    pub error_contains: Option<String>,
    /// The device is left for a person to look at (a critical failure).
    pub needs_attention: bool,
}

impl Expectation {
    pub fn succeeded() -> Self {
        Expectation {
            outcome: Outcome::Succeeded,
            error_class: None,
            error_contains: None,
            needs_attention: false,
        }
    }

    pub fn failed(class: ErrorClass, text: &str) -> Self {
        Expectation {
            outcome: Outcome::Failed,
            error_class: Some(class),
            error_contains: Some(text.to_owned()),
            needs_attention: false,
        }
    }

    pub fn timed_out() -> Self {
        Expectation {
            outcome: Outcome::TimedOut,
            error_class: None,
            error_contains: Some("deadline".to_owned()),
            needs_attention: false,
        }
    }

    fn needing_attention(mut self) -> Self {
        self.needs_attention = true;
        self
    }

    /// Whether a reported outcome meets the expectation; the difference,
    /// in words, if it does not.
    pub fn check(&self, ending: &flotilla_common::Ending) -> Result<(), String> {
        if ending.outcome != self.outcome {
            return Err(format!(
                "expected {}, reported {} ({:?})",
                self.outcome, ending.outcome, ending.error
            ));
        }
        if self.error_class.is_some() && ending.error_class != self.error_class {
            return Err(format!(
                "expected error class {:?}, reported {:?}",
                self.error_class, ending.error_class
            ));
        }
        if let Some(text) = &self.error_contains {
            let error = ending.error.as_deref().unwrap_or("");
            if !error.contains(text.as_str()) {
                return Err(format!(
                    "expected an error containing {text:?}, reported {error:?}"
                ));
            }
        }
        if ending.needs_attention != self.needs_attention {
            return Err(format!(
                "expected needs_attention {}, reported {}",
                self.needs_attention, ending.needs_attention
            ));
        }
        Ok(())
    }
}

/// Where a simulated device lives, to ask it what really happened.
enum Simulated {
    /// A CPE: its DMS (index) and CPE id.
    Cpe {
        dms: usize,
        cpe_id: String,
    },
    /// Indexes into the fleet's lists of each kind.
    Netprofiler(usize),
    Flowgateway(usize),
    Npm(usize),
    Sps(usize),
}

/// A running simulated fleet. Dropping it (or [`Fleet::shutdown`]) stops
/// every host.
pub struct Fleet {
    devices: Vec<Device>,
    expectations: HashMap<String, Expectation>,
    simulated: HashMap<String, Simulated>,
    dms: Vec<(dms::Dms, host::Host)>,
    netprofilers: Vec<(netprofiler::Netprofiler, Option<GatewayFault>)>,
    flowgateways: Vec<flowgateway::FlowGateway>,
    npms: Vec<(npm::Npm, host::Host)>,
    spss: Vec<sps::Sps>,
    ca: tls::FleetCa,
    spec: FleetSpec,
    stop: CancellationToken,
}

impl Fleet {
    pub async fn start(spec: FleetSpec) -> std::io::Result<Fleet> {
        let stop = CancellationToken::new();
        let mut rng = StdRng::seed_from_u64(spec.seed);
        let mut fleet = Fleet {
            devices: Vec::new(),
            expectations: HashMap::new(),
            simulated: HashMap::new(),
            dms: Vec::new(),
            netprofilers: Vec::new(),
            flowgateways: Vec::new(),
            npms: Vec::new(),
            spss: Vec::new(),
            ca: tls::FleetCa::new(&format!("fleet {}", spec.seed))
                .map_err(std::io::Error::other)?,
            spec: spec.clone(),
            stop: stop.clone(),
        };

        let cpe_fates = faults::assign_fates(spec.dms_cpes, &spec.faults, &mut rng);
        for (host_index, chunk) in cpe_fates.chunks(spec.cpes_per_dms.max(1)).enumerate() {
            let first = host_index * spec.cpes_per_dms.max(1);
            let cpes: Vec<(String, Fate)> = chunk
                .iter()
                .enumerate()
                .map(|(i, fate)| (format!("00D09E-{:06}", first + i + 1), *fate))
                .collect();
            let behaviour = fleet.behaviour(host_index as u64, DMS_ERROR);
            let dms = dms::Dms::new(
                cpes.clone(),
                &spec.username,
                &spec.password,
                spec.upgrade_time.clone(),
                behaviour.clone(),
            );
            let host = host::Host::start(
                SocketAddr::new(spec.ip, 0),
                dms.routes(),
                behaviour,
                None,
                stop.clone(),
            )
            .await?;
            let addr = host.addr();
            let address: url::Url = format!("http://{addr}")
                .parse()
                .expect("a socket address makes a valid URL");
            for (cpe_id, fate) in cpes {
                let id = format!("cpe-{}", &cpe_id[7..]);
                let expectation = match fate {
                    Fate::Upgrade => Expectation::succeeded(),
                    Fate::Fail => Expectation::failed(ErrorClass::Device, "FaultCode 9010"),
                    Fate::Silent => Expectation::timed_out(),
                };
                fleet.expectations.insert(id.clone(), expectation);
                fleet.simulated.insert(
                    id.clone(),
                    Simulated::Cpe {
                        dms: fleet.dms.len(),
                        cpe_id: cpe_id.clone(),
                    },
                );
                fleet.devices.push(Device {
                    id,
                    kind: DeviceKind::Dms,
                    address: address.clone(),
                    credentials: CREDENTIALS_REFERENCE.to_owned(),
                    cpe_id: Some(cpe_id),
                    group: None,
                    gateways: Vec::new(),
                });
            }
            fleet.dms.push((dms, host));
        }
        fleet.start_riverbed(&mut rng).await?;
        fleet.start_sps(&mut rng).await?;
        Ok(fleet)
    }

    /// NetProfilers with their gateways, standalone Flow Gateways and NPM
    /// appliances, each on its own host.
    async fn start_riverbed(&mut self, rng: &mut StdRng) -> std::io::Result<()> {
        let spec = self.spec.clone();
        let mut np_faults = vec![
            GatewayFault::FailGraceful,
            GatewayFault::FailCritical,
            GatewayFault::InitFails,
            GatewayFault::StartFails,
            GatewayFault::RefusedCredentials,
        ];
        if spec.backups_first {
            np_faults.push(GatewayFault::RunError);
        }
        let np_faults = with_explicit(
            faults::assign_faults(
                spec.netprofilers,
                &spec.faults,
                &np_faults,
                Some(GatewayFault::Stuck),
                rng,
            ),
            &spec.netprofiler_faults,
        );
        let mut next_gateway_ip = 0u32;
        for (i, fault) in np_faults.into_iter().enumerate() {
            let id = format!("np-{:04}", i + 1);
            let mut gateways = Vec::new();
            let mut urls = Vec::new();
            for g in 0..spec.gateways_per_netprofiler {
                next_gateway_ip += 1;
                let ip = IpAddr::V4(Ipv4Addr::new(
                    127,
                    10 + (next_gateway_ip / 62_500) as u8,
                    ((next_gateway_ip / 250) % 250) as u8,
                    (next_gateway_ip % 250 + 1) as u8,
                ));
                // The fault sits on the first gateway; a refused login is
                // the NetProfiler's own.
                let gateway_fault =
                    fault.filter(|f| g == 0 && *f != GatewayFault::RefusedCredentials);
                let gateway =
                    self.gateway(ip, gateway_fault, false, 10_000 + next_gateway_ip as u64);
                let host = self
                    .serve(ip, gateway.routes(), 20_000 + next_gateway_ip as u64)
                    .await?;
                urls.push(self.url(host.addr()));
                gateways.push(gateway);
            }
            let first_ip = gateways
                .first()
                .map(|g| g.ip().to_string())
                .unwrap_or_default();
            let auth = self.auth(fault == Some(GatewayFault::RefusedCredentials), true);
            let np = netprofiler::Netprofiler::new(auth, &spec.release_version, gateways);
            let host = self.serve(spec.ip, np.routes(), 30_000 + i as u64).await?;
            let expectation = match fault {
                None => Expectation::succeeded(),
                Some(GatewayFault::FailGraceful) => {
                    Expectation::failed(ErrorClass::Device, "failed_graceful")
                }
                Some(GatewayFault::FailCritical) => {
                    Expectation::failed(ErrorClass::Device, "failed_critical").needing_attention()
                }
                Some(GatewayFault::InitFails) => {
                    Expectation::failed(ErrorClass::Device, "initialization failed")
                }
                // Reported by its state, as its start answer may be lost
                // to a retry: "<ip> initialized: Operation Failed".
                Some(GatewayFault::StartFails) => {
                    Expectation::failed(ErrorClass::Device, &format!("{first_ip} initialized"))
                }
                Some(GatewayFault::RunError) if spec.backups_first => {
                    Expectation::failed(ErrorClass::Device, flowgateway::RUN_ERROR)
                }
                Some(GatewayFault::RunError) => Expectation::succeeded(),
                Some(GatewayFault::Stuck) => Expectation::timed_out(),
                Some(GatewayFault::RefusedCredentials) => {
                    Expectation::failed(ErrorClass::Auth, "refused")
                }
            };
            self.add_device(
                id,
                DeviceKind::Netprofiler,
                self.url(host.addr()),
                urls,
                expectation,
                Simulated::Netprofiler(self.netprofilers.len()),
            );
            self.netprofilers.push((np, fault));
        }

        let fg_faults = with_explicit(
            faults::assign_faults(
                spec.flowgateways,
                &spec.faults,
                &[GatewayFault::RunError, GatewayFault::RefusedCredentials],
                None,
                rng,
            ),
            &spec.flowgateway_faults,
        );
        for (i, fault) in fg_faults.into_iter().enumerate() {
            let refused = fault == Some(GatewayFault::RefusedCredentials);
            let gateway = self.gateway(spec.ip, fault, refused, 40_000 + i as u64);
            let host = self
                .serve(spec.ip, gateway.routes(), 50_000 + i as u64)
                .await?;
            let expectation = match fault {
                Some(GatewayFault::RunError) => {
                    Expectation::failed(ErrorClass::Device, flowgateway::RUN_ERROR)
                }
                Some(GatewayFault::RefusedCredentials) => {
                    Expectation::failed(ErrorClass::Auth, "refused")
                }
                Some(GatewayFault::Stuck) => Expectation::timed_out(),
                // Update faults do not touch backups and restores.
                _ => Expectation::succeeded(),
            };
            self.add_device(
                format!("fg-{:04}", i + 1),
                DeviceKind::Flowgateway,
                self.url(host.addr()),
                Vec::new(),
                expectation,
                Simulated::Flowgateway(self.flowgateways.len()),
            );
            self.flowgateways.push(gateway);
        }

        let npm_faults = with_explicit(
            faults::assign_faults(
                spec.npm_appliances,
                &spec.faults,
                &[
                    NpmFault::InvalidImage,
                    NpmFault::UploadError,
                    NpmFault::ChecksumMismatch,
                    NpmFault::FailGraceful,
                    NpmFault::FailCritical,
                    NpmFault::RefusedCredentials,
                ],
                Some(NpmFault::Stuck),
                rng,
            ),
            &spec.npm_faults,
        );
        for (i, fault) in npm_faults.into_iter().enumerate() {
            let auth = self.auth(fault == Some(NpmFault::RefusedCredentials), false);
            let appliance = npm::Npm::new(
                fault,
                auth,
                &spec.release_version,
                &spec.release_sha256,
                npm::NpmTiming {
                    step_time: spec.operation_time.clone(),
                    update_time: spec.upgrade_time.clone(),
                    reboot_time: spec.reboot_time.clone(),
                },
                self.behaviour(60_000 + i as u64, RIVERBED_ERROR).dice,
                self.stop.clone(),
            );
            let host = self
                .serve(spec.ip, appliance.routes(), 70_000 + i as u64)
                .await?;
            appliance.attach(host.clone());
            let expectation = match fault {
                None => Expectation::succeeded(),
                Some(NpmFault::InvalidImage) => {
                    Expectation::failed(ErrorClass::Device, npm::INVALID_IMAGE)
                }
                Some(NpmFault::UploadError) => {
                    Expectation::failed(ErrorClass::Device, npm::UPLOAD_ERROR)
                }
                Some(NpmFault::ChecksumMismatch) => {
                    Expectation::failed(ErrorClass::Device, "checksum")
                }
                Some(NpmFault::FailGraceful) => {
                    Expectation::failed(ErrorClass::Device, npm::GRACEFUL_FAILURE)
                }
                Some(NpmFault::FailCritical) => {
                    Expectation::failed(ErrorClass::Device, npm::CRITICAL_FAILURE)
                        .needing_attention()
                }
                Some(NpmFault::Stuck) => Expectation::timed_out(),
                Some(NpmFault::RefusedCredentials) => {
                    Expectation::failed(ErrorClass::Auth, "refused")
                }
            };
            self.add_device(
                format!("npm-{:04}", i + 1),
                DeviceKind::Npm,
                self.url(host.addr()),
                Vec::new(),
                expectation,
                Simulated::Npm(self.npms.len()),
            );
            self.npms.push((appliance, host));
        }
        Ok(())
    }

    /// SPS appliances, each on its own host.
    async fn start_sps(&mut self, rng: &mut StdRng) -> std::io::Result<()> {
        let spec = self.spec.clone();
        let faults = with_explicit(
            faults::assign_faults(
                spec.sps_appliances,
                &spec.faults,
                &[
                    SpsFault::FetchFailed,
                    SpsFault::ChecksumMismatch,
                    SpsFault::FetchCanceled,
                    SpsFault::EmptySlot,
                    SpsFault::FirmwareTestFailed,
                    SpsFault::UpgradeMessageMissing,
                    SpsFault::IncompleteRequestBody,
                    SpsFault::RefusedCredentials,
                ],
                Some(SpsFault::Stuck),
                rng,
            ),
            &spec.sps_faults,
        );
        for (i, fault) in faults.into_iter().enumerate() {
            let appliance = sps::Sps::new(
                fault,
                (&spec.username, &spec.password),
                (&spec.release_version, &spec.release_sha256),
                sps::SpsTiming {
                    fetch_step: spec.operation_time.clone(),
                    reboot_time: spec.reboot_time.clone(),
                    session_idle: spec.sps_session_idle,
                },
                self.behaviour(80_000 + i as u64, SPS_ERROR).dice,
                self.stop.clone(),
            );
            let host = self
                .serve(spec.ip, appliance.routes(), 90_000 + i as u64)
                .await?;
            appliance.attach(host.clone());
            let device = |text: &str| Expectation::failed(ErrorClass::Device, text);
            let expectation = match fault {
                None => Expectation::succeeded(),
                Some(SpsFault::FetchFailed) => device("Max retries exceeded"),
                Some(SpsFault::ChecksumMismatch) => device(sps::CHECKSUM_MISMATCH),
                Some(SpsFault::FetchCanceled) => device("canceled"),
                Some(SpsFault::EmptySlot) => device("ResourceNotFound"),
                Some(SpsFault::FirmwareTestFailed) => device("HA check failed"),
                // Campaigns against the fleet give no commit message.
                Some(SpsFault::UpgradeMessageMissing) => device("UpgradeMessageMissing"),
                Some(SpsFault::IncompleteRequestBody) => device("IncompleteRequestBodyError"),
                Some(SpsFault::RefusedCredentials) => {
                    Expectation::failed(ErrorClass::Auth, "refused")
                }
                Some(SpsFault::Stuck) => Expectation::timed_out(),
            };
            self.add_device(
                format!("sps-{:04}", i + 1),
                DeviceKind::Sps,
                self.url(host.addr()),
                Vec::new(),
                expectation,
                Simulated::Sps(self.spss.len()),
            );
            self.spss.push(appliance);
        }
        Ok(())
    }

    fn auth(&self, refuses: bool, basic: bool) -> Auth {
        let spec = &self.spec;
        if refuses {
            // Its credentials were changed behind the fleet's back.
            return Auth::new(
                &spec.username,
                "rotated-elsewhere",
                "revoked",
                basic,
                spec.token_lifetime,
            );
        }
        Auth::new(
            &spec.username,
            &spec.password,
            &spec.access_code,
            basic,
            spec.token_lifetime,
        )
    }

    fn gateway(
        &self,
        ip: IpAddr,
        fault: Option<GatewayFault>,
        refuses: bool,
        seed: u64,
    ) -> flowgateway::FlowGateway {
        flowgateway::FlowGateway::new(flowgateway::GatewaySpec {
            ip,
            fault,
            auth: self.auth(refuses, true),
            run_time: self.spec.operation_time.clone(),
            update_time: self.spec.upgrade_time.clone(),
            dice: self.behaviour(seed, RIVERBED_ERROR).dice,
            backup_password: &self.spec.backup_password,
        })
    }

    /// Serves `routes` on a new host at `ip`, over HTTPS if the fleet does.
    async fn serve(
        &self,
        ip: IpAddr,
        routes: axum::Router,
        seed: u64,
    ) -> std::io::Result<host::Host> {
        let tls = if self.spec.https {
            Some(self.ca.server_config(ip).map_err(std::io::Error::other)?)
        } else {
            None
        };
        host::Host::start(
            SocketAddr::new(ip, 0),
            routes,
            self.behaviour(seed, RIVERBED_ERROR),
            tls,
            self.stop.clone(),
        )
        .await
    }

    fn url(&self, addr: SocketAddr) -> url::Url {
        let scheme = if self.spec.https { "https" } else { "http" };
        format!("{scheme}://{addr}")
            .parse()
            .expect("a socket address makes a valid URL")
    }

    fn add_device(
        &mut self,
        id: String,
        kind: DeviceKind,
        address: url::Url,
        gateways: Vec<url::Url>,
        expectation: Expectation,
        simulated: Simulated,
    ) {
        self.expectations.insert(id.clone(), expectation);
        self.simulated.insert(id.clone(), simulated);
        self.devices.push(Device {
            id,
            kind,
            address,
            credentials: CREDENTIALS_REFERENCE.to_owned(),
            cpe_id: None,
            group: None,
            gateways,
        });
    }

    fn behaviour(&self, host_seed: u64, error_body: &'static str) -> host::Behaviour {
        host::Behaviour {
            latency: self.spec.request_latency.clone(),
            dice: Arc::new(Mutex::new(Dice::new(
                self.spec
                    .seed
                    .wrapping_mul(1_000_003)
                    .wrapping_add(host_seed),
                self.spec.faults.transient_ratio,
            ))),
            error_body,
        }
    }

    /// Every simulated device, as inventory rows.
    pub fn devices(&self) -> &[Device] {
        &self.devices
    }

    /// What Flotilla should report for a device.
    pub fn expectation(&self, device_id: &str) -> Option<&Expectation> {
        self.expectations.get(device_id)
    }

    /// The outcome Flotilla should report for a device.
    pub fn expected_outcome(&self, device_id: &str) -> Option<Outcome> {
        self.expectation(device_id).map(|e| e.outcome)
    }

    pub fn dms_hosts(&self) -> impl Iterator<Item = &dms::Dms> {
        self.dms.iter().map(|(dms, _)| dms)
    }

    /// Takes DMS number `index` down (connections refused), as a
    /// restarting ACS would; its CPEs keep their state.
    pub fn stop_dms(&self, index: usize) {
        self.dms[index].1.take_down();
    }

    /// Brings DMS number `index` back on its address.
    pub async fn start_dms(&self, index: usize) -> std::io::Result<()> {
        self.dms[index].1.bring_up().await
    }

    /// The DMS and CPE id behind a `dms` device.
    pub fn cpe(&self, device_id: &str) -> Option<(&dms::Dms, &str)> {
        match self.simulated.get(device_id)? {
            Simulated::Cpe { dms, cpe_id } => Some((&self.dms[*dms].0, cpe_id.as_str())),
            _ => None,
        }
    }

    /// How many times the device really upgraded (a correct rollout never
    /// upgrades one twice): for a NetProfiler, the most any of its gateways
    /// started; for a Flow Gateway, the backups and restores it started.
    pub fn upgrades_of(&self, device_id: &str) -> u32 {
        match self.simulated.get(device_id) {
            Some(Simulated::Cpe { dms, cpe_id }) => self.dms[*dms].0.upgrades_of(cpe_id),
            Some(Simulated::Netprofiler(i)) => self.netprofilers[*i]
                .0
                .gateways()
                .iter()
                .map(|g| g.updates_started())
                .max()
                .unwrap_or(0),
            Some(Simulated::Flowgateway(i)) => {
                let gateway = &self.flowgateways[*i];
                gateway.backups_started() + gateway.restores_started()
            }
            Some(Simulated::Npm(i)) => self.npms[*i].0.updates_started(),
            Some(Simulated::Sps(i)) => self.spss[*i].upgrades(),
            None => 0,
        }
    }

    /// The NetProfiler behind a `netprofiler` device.
    pub fn netprofiler(&self, device_id: &str) -> Option<&netprofiler::Netprofiler> {
        match self.simulated.get(device_id)? {
            Simulated::Netprofiler(i) => Some(&self.netprofilers[*i].0),
            _ => None,
        }
    }

    /// The Flow Gateway behind a `flowgateway` device.
    pub fn flowgateway(&self, device_id: &str) -> Option<&flowgateway::FlowGateway> {
        match self.simulated.get(device_id)? {
            Simulated::Flowgateway(i) => Some(&self.flowgateways[*i]),
            _ => None,
        }
    }

    /// The appliance behind an `npm` device.
    pub fn npm(&self, device_id: &str) -> Option<&npm::Npm> {
        match self.simulated.get(device_id)? {
            Simulated::Npm(i) => Some(&self.npms[*i].0),
            _ => None,
        }
    }

    /// The appliance behind an `sps` device.
    pub fn sps(&self, device_id: &str) -> Option<&sps::Sps> {
        match self.simulated.get(device_id)? {
            Simulated::Sps(i) => Some(&self.spss[*i]),
            _ => None,
        }
    }

    /// Compares a NetProfiler's reported per-gateway outcomes (its ending's
    /// `detail.gateways`) with what each gateway really did; `Ok` for other
    /// kinds. A healthy gateway may be reported `unfinished` when a
    /// sibling's failure ended the job first, and `not_started` when a
    /// sibling's init failed.
    pub fn check_gateways(&self, device_id: &str, ending: &Ending) -> Result<(), String> {
        let Some(Simulated::Netprofiler(i)) = self.simulated.get(device_id) else {
            return Ok(());
        };
        let (np, fault) = &self.netprofilers[*i];
        for gateway in np.gateways() {
            if gateway.updates_started() > 1 {
                return Err(format!(
                    "gateway {} updated {} times",
                    gateway.ip(),
                    gateway.updates_started()
                ));
            }
        }
        let backup_failed = *fault == Some(GatewayFault::RunError) && self.spec.backups_first;
        if backup_failed || *fault == Some(GatewayFault::RefusedCredentials) {
            return match np.gateways().iter().find(|g| g.updates_started() > 0) {
                Some(g) => Err(format!(
                    "gateway {} was updated although the job failed before",
                    g.ip()
                )),
                None => Ok(()),
            };
        }
        if ending.outcome == Outcome::TimedOut {
            return Ok(());
        }
        let reported = ending
            .detail
            .as_ref()
            .and_then(|d| d.get("gateways"))
            .and_then(serde_json::Value::as_array)
            .ok_or("no per-gateway detail reported")?;
        if reported.len() != np.gateways().len() {
            return Err(format!(
                "{} gateways reported, {} connected",
                reported.len(),
                np.gateways().len()
            ));
        }
        let sibling_failed = matches!(
            fault,
            Some(
                GatewayFault::FailGraceful | GatewayFault::FailCritical | GatewayFault::StartFails
            )
        );
        for gateway in np.gateways() {
            let ip = gateway.ip().to_string();
            let entry = reported
                .iter()
                .find(|e| e["ip"] == ip.as_str())
                .ok_or_else(|| format!("gateway {ip} missing from the report"))?;
            let outcome = entry["outcome"].as_str().unwrap_or("");
            let own_fault = gateway.fault().filter(|f| *f != GatewayFault::RunError);
            let allowed: &[&str] = match (own_fault, fault) {
                (Some(_), _) => &["failed"],
                (None, Some(GatewayFault::InitFails)) => &["not_started"],
                (None, _) if sibling_failed => &["succeeded", "unfinished"],
                (None, _) => &["succeeded"],
            };
            if !allowed.contains(&outcome) {
                return Err(format!(
                    "gateway {ip}: reported {outcome:?}, expected one of {allowed:?}"
                ));
            }
            if outcome == "succeeded" && gateway.version() != self.spec.release_version {
                return Err(format!(
                    "gateway {ip} reported updated but runs {}",
                    gateway.version()
                ));
            }
        }
        Ok(())
    }

    /// The fleet's CA certificate (PEM), for campaigns of an HTTPS fleet.
    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// Upgrade rules left enabled on any DMS.
    pub fn enabled_rules(&self) -> Vec<String> {
        self.dms
            .iter()
            .flat_map(|(dms, _)| dms.enabled_rules())
            .collect()
    }

    /// The release Riverbed devices install: its version and SHA-256.
    pub fn release(&self) -> (&str, &str) {
        (&self.spec.release_version, &self.spec.release_sha256)
    }

    /// The SSH password remote backup hosts accept.
    pub fn backup_password(&self) -> &str {
        &self.spec.backup_password
    }

    /// The OAuth access code Riverbed Common API devices accept.
    pub fn access_code(&self) -> &str {
        &self.spec.access_code
    }

    /// The user and password every simulated device accepts.
    pub fn login(&self) -> (&str, &str) {
        (&self.spec.username, &self.spec.password)
    }

    pub fn shutdown(&self) {
        self.stop.cancel();
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Explicit faults replace the first random ones.
fn with_explicit<T: Copy>(mut assigned: Vec<Option<T>>, explicit: &[T]) -> Vec<Option<T>> {
    for (slot, fault) in assigned.iter_mut().zip(explicit) {
        *slot = Some(*fault);
    }
    assigned
}

pub(crate) fn epoch_seconds() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

const RIVERBED_ERROR: &str =
    r#"{"error_id":"INTERNAL_ERROR","error_text":"simulated transient failure"}"#;

const SPS_ERROR: &str = r#"{"error":{"details":{},"message":"simulated transient failure","type":"InternalServerError"}}"#;

const DMS_ERROR: &str =
    r#"{"code":500,"message":"Internal error","details":"simulated transient failure"}"#;
