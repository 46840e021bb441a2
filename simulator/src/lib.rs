//! A simulated device fleet that speaks the real device APIs over real HTTP
//! on loopback addresses, for Flotilla's tests, demo and benchmarks.
//!
//! A [`Fleet`] is started from a [`FleetSpec`]: it decides every device's
//! fate up front (from a seed), binds one listener per simulated host, and
//! describes itself as inventory rows. Tests and the demo compare what
//! Flotilla reports against the fleet's own record of what happened.
//!
//! Layout: [`faults`] (fates and dice), `host` (listeners that can reboot,
//! latency, injected errors, the device's `Date`), `clock` (device clocks,
//! off by [`Quirks::clock_offset`], stepped by [`Fleet::step_clocks`]),
//! [`tls`] (the fleet's CA, HTTPS listeners),
//! `riverbed_auth` (Basic, OAuth and NPM tokens), `build` (what a kind
//! starts its devices with), and one module per device kind ([`dms`],
//! [`netprofiler`], [`flowgateway`], [`npm`], [`sps`]), each owning its
//! devices, its faults and what Flotilla should report for each.
//!
//! A new device kind is a module with a `simulate` function and one line in
//! `simulated_kinds!` below; the match it makes is exhaustive, and a test
//! starts a fleet of every kind, so a kind without a simulated device fails
//! to build or fails that test.
//!
//! Fault knobs: [`FaultSpec`] ratios pick devices at random, each kind
//! cycling through its faults ([`GatewayFault`] for NetProfilers — on their
//! first gateway — and standalone Flow Gateways, [`NpmFault`] for NPM,
//! [`SpsFault`] for SPS); [`FleetSpec::with_faults`] gives the first devices
//! of a kind exact faults, for tests.

mod build;
mod clock;
mod expectation;
pub mod faults;
mod host;
mod riverbed_auth;
pub mod tls;

pub use expectation::Expectation;
pub use flowgateway::GatewayFault;
pub use npm::NpmFault;
pub use sps::SpsFault;

use build::{Builder, Entry};
use faults::FaultSpec;
use flotilla_common::{Device, DeviceKind, Ending, Outcome};
use rand::{SeedableRng, rngs::StdRng};
use std::{
    any::Any,
    collections::{BTreeMap, HashMap},
    fmt,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    ops::RangeInclusive,
    sync::Arc,
    time::Duration,
};
use tokio_util::sync::CancellationToken;

/// The credentials reference every simulated device is listed with.
pub const CREDENTIALS_REFERENCE: &str = "sim";

/// Declares each kind's module and its line of `start_kind`.
macro_rules! simulated_kinds {
    ($($kind:ident => $module:ident;)+) => {
        $(pub mod $module;)+

        /// Starts `kind`'s devices. Exhaustive, so a kind added to
        /// `flotilla_common::kind` does not build until it is simulated.
        async fn start_kind(kind: DeviceKind, fleet: &mut Builder<'_>) -> std::io::Result<()> {
            match kind {
                $(DeviceKind::$kind => $module::simulate(fleet).await,)+
            }
        }
    };
}

// One line per kind: `Kind => module`, whose `simulate` starts its devices.
simulated_kinds! {
    Dms => dms;
    Netprofiler => netprofiler;
    Flowgateway => flowgateway;
    Npm => npm;
    Sps => sps;
}

/// A simulated device, as the fleet knows it: each kind's handle (a
/// [`dms::Cpe`], a [`netprofiler::Netprofiler`], ...) implements it, and
/// [`Fleet::get`] hands the handle back by its type.
pub trait Simulated: Any + Send + Sync {
    /// How many times the device really upgraded (a correct rollout never
    /// upgrades one twice): for a NetProfiler, the most any of its gateways
    /// started; for a Flow Gateway, the backups and restores it started.
    fn upgrades(&self) -> u32;

    /// Compares the detail of a reported ending with what the device really
    /// did (a NetProfiler's per-gateway outcomes); `Ok` when there is
    /// nothing to compare.
    fn check_detail(&self, _ending: &Ending) -> Result<(), String> {
        Ok(())
    }

    /// Upgrade rules the device's manager still has enabled for it (a
    /// finished job leaves none).
    fn enabled_rules(&self) -> Vec<String> {
        Vec::new()
    }
}

#[derive(Debug, Clone)]
pub struct FleetSpec {
    /// How many devices of each kind. NetProfilers each bring
    /// `gateways_per_netprofiler` Flow Gateways; CPEs are spread over DMS
    /// hosts of `cpes_per_dms`.
    pub devices: BTreeMap<DeviceKind, usize>,
    /// Exact faults for the first devices of a kind, before the ratios
    /// apply to the rest ([`FleetSpec::with_faults`]).
    pub exact_faults: ExactFaults,
    pub cpes_per_dms: usize,
    pub faults: FaultSpec,
    pub gateways_per_netprofiler: usize,
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
    /// Serve Riverbed and SPS devices over HTTPS, with certificates from
    /// the fleet's own CA.
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
    /// Readings of the device documents where they leave room, each
    /// switchable both ways.
    pub quirks: Quirks,
}

/// Where the device documents leave room, how the simulated devices read
/// them. The defaults are the readings the drivers were first written
/// against; each switch is the other reading, as an independent
/// implementation of the documents may have it.
#[derive(Debug, Clone, Default)]
pub struct Quirks {
    /// Every device's clock is this many seconds ahead of the machine's
    /// (negative: behind), in the records it stamps and in its `Date`
    /// header.
    pub clock_offset: i64,
    /// Devices send no `Date` header (RFC 9110 asks one of every server
    /// with a clock; not every appliance does).
    pub no_date_header: bool,
    /// NetProfiler `update/start` answers at once and each gateway begins
    /// a while later (the document calls it asynchronous), showing
    /// `initialized` meanwhile.
    pub netprofiler_async_start: bool,
    /// The ISO staged on every NetProfiler holds this version, not the
    /// release.
    pub netprofiler_staged: Option<String>,
    /// NetProfiler `GET update` answers carry fields besides the gateways'
    /// statuses.
    pub netprofiler_extra_fields: bool,
    /// DMS results: no interim record while an upgrade runs, one record
    /// (a new UUID) when it ends.
    pub dms_no_interim_result: bool,
    /// The DMS answers every result record it holds, whatever the query.
    pub dms_unfiltered_results: bool,
    /// Creating a DMS rule that exists answers 409 (rather than updating
    /// it in place).
    pub dms_conflict_on_existing_rule: bool,
    /// NPM appliances take only HTTP Basic: no `mgmt.aaa` token login.
    pub npm_basic_only: bool,
    /// NPM images report no version, and the update's `target_version`
    /// (what it would install) is this one, not the release.
    pub npm_staged: Option<String>,
    /// SPS appliances select the slot on an upgrade but never restart by
    /// themselves.
    pub sps_no_self_restart: bool,
    /// SPS appliances accept an upgrade but select no slot for the
    /// restart (and so never restart into it).
    pub sps_upgrade_not_selected: bool,
    /// An upload (NPM, SPS) takes at least this long to be answered.
    pub upload_time: Duration,
    /// Every request is answered `307 Temporary Redirect` to this URL.
    pub redirect_to: Option<String>,
    /// Every answer's body is followed by this many bytes of whitespace.
    pub answer_padding: usize,
}

impl Default for FleetSpec {
    fn default() -> Self {
        FleetSpec {
            devices: BTreeMap::new(),
            exact_faults: ExactFaults::default(),
            cpes_per_dms: 500,
            faults: FaultSpec::NONE,
            gateways_per_netprofiler: 3,
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
            quirks: Quirks::default(),
        }
    }
}

impl FleetSpec {
    /// The fleet with `count` devices of `kind`.
    pub fn with(mut self, kind: DeviceKind, count: usize) -> Self {
        self.devices.insert(kind, count);
        self
    }

    /// The first devices of `kind` get exactly these faults, in order.
    /// They must be of the kind's fault type (`GatewayFault` for
    /// NetProfilers and Flow Gateways, `NpmFault`, `SpsFault`), or
    /// [`Fleet::start`] refuses the spec.
    pub fn with_faults<F: Copy + Send + Sync + 'static>(
        mut self,
        kind: DeviceKind,
        faults: impl IntoIterator<Item = F>,
    ) -> Self {
        let faults: Vec<F> = faults.into_iter().collect();
        self.exact_faults.0.insert(kind, Arc::new(faults));
        self
    }
}

/// Exact faults by kind, each kind's in its own fault type.
#[derive(Clone, Default)]
pub struct ExactFaults(BTreeMap<DeviceKind, Arc<dyn Any + Send + Sync>>);

impl ExactFaults {
    /// `kind`'s exact faults, which must be `F`s.
    fn of<F: 'static>(&self, kind: DeviceKind) -> std::io::Result<&[F]> {
        match self.0.get(&kind) {
            None => Ok(&[]),
            Some(faults) => faults
                .downcast_ref::<Vec<F>>()
                .map(Vec::as_slice)
                .ok_or_else(|| {
                    std::io::Error::other(format!(
                        "{kind} devices take {} faults",
                        std::any::type_name::<F>()
                    ))
                }),
        }
    }
}

impl fmt::Debug for ExactFaults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.0.keys()).finish()
    }
}

/// A running simulated fleet. Dropping it (or [`Fleet::shutdown`]) stops
/// every host.
pub struct Fleet {
    devices: Vec<Device>,
    entries: HashMap<String, Entry>,
    ca: tls::FleetCa,
    spec: FleetSpec,
    clock: clock::Clock,
    slowdowns: HashMap<SocketAddr, host::Slowdown>,
    stop: CancellationToken,
}

impl Fleet {
    pub async fn start(spec: FleetSpec) -> std::io::Result<Fleet> {
        let stop = CancellationToken::new();
        let ca =
            tls::FleetCa::new(&format!("fleet {}", spec.seed)).map_err(std::io::Error::other)?;
        let rng = StdRng::seed_from_u64(spec.seed);
        let mut builder = Builder::new(&spec, rng, &ca, stop.clone());
        for kind in DeviceKind::ALL {
            start_kind(kind, &mut builder).await?;
        }
        let clock = builder.clock();
        let Builder {
            devices,
            entries,
            slowdowns,
            ..
        } = builder;
        Ok(Fleet {
            devices,
            entries,
            ca,
            spec,
            clock,
            slowdowns: slowdowns
                .into_inner()
                .expect("the slowdowns lock is never poisoned"),
            stop,
        })
    }

    /// Makes the host at `addr` (a DMS, an appliance) take `extra` longer
    /// to answer every request from now on, on top of the fleet's latency
    /// (`Duration::ZERO` ends it). False if the fleet has no host there.
    pub fn slow_down(&self, addr: SocketAddr, extra: Duration) -> bool {
        match self.slowdowns.get(&addr) {
            Some(slowdown) => {
                slowdown.set(extra);
                true
            }
            None => false,
        }
    }

    /// Every simulated device, as inventory rows.
    pub fn devices(&self) -> &[Device] {
        &self.devices
    }

    /// What Flotilla should report for a device.
    pub fn expectation(&self, device_id: &str) -> Option<&Expectation> {
        self.entries.get(device_id).map(|e| &e.expectation)
    }

    /// The outcome Flotilla should report for a device.
    pub fn expected_outcome(&self, device_id: &str) -> Option<Outcome> {
        self.expectation(device_id).map(|e| e.outcome)
    }

    /// The simulated device behind an inventory row, as its kind's handle
    /// (`fleet.get::<npm::Npm>("npm-0001")`); `None` for an unknown id or
    /// another kind.
    pub fn get<T: Simulated>(&self, device_id: &str) -> Option<&T> {
        let device: &dyn Any = self.entries.get(device_id)?.device.as_ref();
        device.downcast_ref()
    }

    /// How many times the device really upgraded (see
    /// [`Simulated::upgrades`]); 0 for an unknown id.
    pub fn upgrades_of(&self, device_id: &str) -> u32 {
        self.entries
            .get(device_id)
            .map_or(0, |e| e.device.upgrades())
    }

    /// Compares a reported ending's detail with what the device really did
    /// (for a NetProfiler, each gateway's outcome); `Ok` for other kinds.
    pub fn check_detail(&self, device_id: &str, ending: &Ending) -> Result<(), String> {
        match self.entries.get(device_id) {
            Some(entry) => entry.device.check_detail(ending),
            None => Err(format!("{device_id} is not a device of this fleet")),
        }
    }

    /// Upgrade rules left enabled on any DMS.
    pub fn enabled_rules(&self) -> Vec<String> {
        let mut rules: Vec<String> = self
            .entries
            .values()
            .flat_map(|e| e.device.enabled_rules())
            .collect();
        rules.sort();
        rules
    }

    /// Steps every device's clock `seconds` forward (negative: back) at
    /// once, as NTP steps an appliance's clock that drifted: records
    /// stamped from now on, and `Date` headers, follow the new time.
    pub fn step_clocks(&self, seconds: i64) {
        self.clock.step(seconds);
    }

    /// The fleet's CA certificate (PEM), for campaigns of an HTTPS fleet.
    pub fn ca_pem(&self) -> String {
        self.ca.pem()
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

const RIVERBED_ERROR: &str =
    r#"{"error_id":"INTERNAL_ERROR","error_text":"simulated transient failure"}"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_kind_is_simulated() {
        let mut spec = FleetSpec::default();
        for kind in DeviceKind::ALL {
            spec = spec.with(kind, 2);
        }
        let fleet = Fleet::start(spec).await.unwrap();
        for kind in DeviceKind::ALL {
            let devices: Vec<&Device> = fleet.devices().iter().filter(|d| d.kind == kind).collect();
            assert_eq!(devices.len(), 2, "{kind}: simulated devices");
            for device in devices {
                let expectation = fleet.expectation(&device.id).unwrap();
                assert_eq!(expectation.outcome, Outcome::Succeeded, "{}", device.id);
                assert_eq!(fleet.upgrades_of(&device.id), 0, "{}", device.id);
            }
        }
        let ids: std::collections::HashSet<&str> =
            fleet.devices().iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids.len(), fleet.devices().len(), "device ids are unique");
    }

    #[test]
    fn seeds_of_different_streams_never_collide() {
        let seed = |kind, role, index| build::Seed::new(kind, role, index);
        let spec = FleetSpec::default();
        let ca = tls::FleetCa::new("test").unwrap();
        let builder = Builder::new(
            &spec,
            StdRng::seed_from_u64(1),
            &ca,
            CancellationToken::new(),
        );
        // Far past where the old offsets (10_000 + i, 30_000 + i, ...)
        // overlapped: two streams never draw the same numbers.
        let draws = |s| {
            let dice = builder.dice(s);
            let mut dice = dice.lock().unwrap();
            (0..4)
                .map(|_| dice.duration(&(Duration::ZERO..=Duration::from_secs(1_000_000))))
                .collect::<Vec<_>>()
        };
        let a = draws(seed(DeviceKind::Netprofiler, "gateway", 20_001));
        let b = draws(seed(DeviceKind::Npm, "host", 20_001));
        let c = draws(seed(DeviceKind::Npm, "device", 20_001));
        let d = draws(seed(DeviceKind::Npm, "device", 20_002));
        assert_ne!(a, b);
        assert_ne!(b, c);
        assert_ne!(c, d);
        assert_eq!(
            c,
            draws(seed(DeviceKind::Npm, "device", 20_001)),
            "repeatable"
        );
    }
}
