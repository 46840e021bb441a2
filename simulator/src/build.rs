//! Building a fleet: what every kind's `start` function gets to create its
//! devices with ([`Builder`]), and the seeds that make each host's and each
//! device's randomness its own ([`Seed`]).

use crate::{
    Expectation, FleetSpec, Simulated,
    clock::Clock,
    faults::{self, Dice, Fate},
    host::{Behaviour, Host, Slowdown},
    riverbed_auth::Auth,
    tls::FleetCa,
};
use flotilla_common::{Device, DeviceKind};
use rand::rngs::StdRng;
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
};
use tokio_util::sync::CancellationToken;

/// Names one stream of randomness: the fleet's seed, a kind, what it is
/// for (`"host"`, `"device"`, `"gateway"`) and an index. The seed is these
/// bytes themselves, not a sum of them, so no two streams ever share one,
/// however large the fleet.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Seed {
    pub(crate) kind: DeviceKind,
    /// At most 15 bytes.
    pub(crate) role: &'static str,
    pub(crate) index: u64,
}

impl Seed {
    pub(crate) fn new(kind: DeviceKind, role: &'static str, index: usize) -> Self {
        Seed {
            kind,
            role,
            index: index as u64,
        }
    }

    fn bytes(self, fleet_seed: u64) -> [u8; 32] {
        let mut bytes = [0u8; 32];
        bytes[..8].copy_from_slice(&fleet_seed.to_le_bytes());
        let kind = DeviceKind::ALL
            .iter()
            .position(|k| *k == self.kind)
            .expect("DeviceKind::ALL holds every kind");
        bytes[8] = kind as u8;
        bytes[9..17].copy_from_slice(&self.index.to_le_bytes());
        let role = self.role.as_bytes();
        assert!(role.len() <= 15, "seed role {:?} is too long", self.role);
        bytes[17..17 + role.len()].copy_from_slice(role);
        bytes
    }
}

/// One simulated device as the fleet keeps it.
pub(crate) struct Entry {
    pub(crate) expectation: Expectation,
    pub(crate) device: Arc<dyn Simulated>,
}

/// What a kind's `start` function builds its devices with.
pub(crate) struct Builder<'f> {
    pub(crate) spec: &'f FleetSpec,
    pub(crate) stop: CancellationToken,
    rng: StdRng,
    ca: &'f FleetCa,
    /// The devices' clock, one for the whole fleet.
    clock: Clock,
    pub(crate) devices: Vec<Device>,
    pub(crate) entries: HashMap<String, Entry>,
    /// Every host's extra latency, by address, to change while it runs.
    pub(crate) slowdowns: Mutex<HashMap<SocketAddr, Slowdown>>,
}

impl<'f> Builder<'f> {
    pub(crate) fn new(
        spec: &'f FleetSpec,
        rng: StdRng,
        ca: &'f FleetCa,
        stop: CancellationToken,
    ) -> Self {
        Builder {
            spec,
            stop,
            rng,
            ca,
            clock: Clock::new(spec.quirks.clock_offset, !spec.quirks.no_date_header),
            devices: Vec::new(),
            entries: HashMap::new(),
            slowdowns: Default::default(),
        }
    }

    /// How many devices of `kind` the fleet has.
    pub(crate) fn count(&self, kind: DeviceKind) -> usize {
        self.spec.devices.get(&kind).copied().unwrap_or(0)
    }

    /// The fates of `kind`'s devices, from the fleet's ratios.
    pub(crate) fn fates(&mut self, kind: DeviceKind) -> Vec<Fate> {
        faults::assign_fates(self.count(kind), &self.spec.faults, &mut self.rng)
    }

    /// Which of `kind`'s devices get which fault: the spec's exact faults
    /// for the first ones, then the ratios (`failing` taken in turn,
    /// `silent` for those that never finish).
    pub(crate) fn faults<F: Copy + Send + Sync + 'static>(
        &mut self,
        kind: DeviceKind,
        failing: &[F],
        silent: Option<F>,
    ) -> std::io::Result<Vec<Option<F>>> {
        let exact = self.spec.exact_faults.of::<F>(kind)?;
        let mut assigned = faults::assign_faults(
            self.count(kind),
            &self.spec.faults,
            failing,
            silent,
            &mut self.rng,
        );
        for (slot, fault) in assigned.iter_mut().zip(exact) {
            *slot = Some(*fault);
        }
        Ok(assigned)
    }

    /// Per-request (or per-device) randomness for `seed`.
    pub(crate) fn dice(&self, seed: Seed) -> Arc<Mutex<Dice>> {
        Arc::new(Mutex::new(Dice::new(
            seed.bytes(self.spec.seed),
            self.spec.faults.transient_ratio,
        )))
    }

    /// The devices' clock.
    pub(crate) fn clock(&self) -> Clock {
        self.clock.clone()
    }

    /// How a host answers: the fleet's latency, and transient errors with
    /// `error_body`, from its own dice; `Date` from the devices' clock.
    pub(crate) fn behaviour(&self, seed: Seed, error_body: &'static str) -> Behaviour {
        Behaviour {
            latency: self.spec.request_latency.clone(),
            dice: self.dice(seed),
            slowdown: Slowdown::default(),
            error_body,
            clock: self.clock(),
            shape: crate::host::Shape {
                redirect_to: self.spec.quirks.redirect_to.clone(),
                padding: self.spec.quirks.answer_padding,
            },
        }
    }

    /// Serves `routes` on a new host at `ip`, over HTTPS if `https`.
    pub(crate) async fn serve(
        &self,
        ip: IpAddr,
        routes: axum::Router,
        behaviour: Behaviour,
        https: bool,
    ) -> std::io::Result<Host> {
        let tls = if https {
            Some(self.ca.server_config(ip).map_err(std::io::Error::other)?)
        } else {
            None
        };
        let slowdown = behaviour.slowdown.clone();
        let host = Host::start(
            SocketAddr::new(ip, 0),
            routes,
            behaviour,
            tls,
            self.stop.clone(),
        )
        .await?;
        self.can_slow_down(&host, slowdown);
        Ok(host)
    }

    /// Lets [`crate::Fleet::slow_down`] reach `host`.
    pub(crate) fn can_slow_down(&self, host: &Host, slowdown: Slowdown) {
        self.slowdowns
            .lock()
            .expect("the slowdowns lock is never poisoned")
            .insert(host.addr(), slowdown);
    }

    /// The URL of a host this builder served.
    pub(crate) fn url(addr: SocketAddr, https: bool) -> url::Url {
        let scheme = if https { "https" } else { "http" };
        format!("{scheme}://{addr}")
            .parse()
            .expect("a socket address makes a valid URL")
    }

    /// The login rules of a Riverbed appliance: the fleet's, or (`refuses`)
    /// credentials changed behind the fleet's back. `basic`: whether HTTP
    /// Basic is accepted besides tokens.
    pub(crate) fn auth(&self, refuses: bool, basic: bool) -> Auth {
        let spec = self.spec;
        let (password, code) = if refuses {
            ("rotated-elsewhere", "revoked")
        } else {
            (spec.password.as_str(), spec.access_code.as_str())
        };
        Auth::new(
            &spec.username,
            password,
            code,
            basic,
            spec.token_lifetime,
            self.clock(),
        )
    }

    /// Adds a device to the fleet, with what Flotilla should report for it.
    pub(crate) fn add(
        &mut self,
        device: Device,
        expectation: Expectation,
        simulated: Arc<dyn Simulated>,
    ) {
        self.entries.insert(
            device.id.clone(),
            Entry {
                expectation,
                device: simulated,
            },
        );
        self.devices.push(device);
    }
}

/// An inventory row of the fleet.
pub(crate) fn device(id: String, kind: DeviceKind, address: url::Url) -> Device {
    Device {
        id,
        kind,
        address,
        credentials: crate::CREDENTIALS_REFERENCE.to_owned(),
        cpe_id: None,
        group: None,
        gateways: Vec::new(),
    }
}
