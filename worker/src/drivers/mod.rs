//! The device drivers, one module (or folder) per device API, and the one
//! table that says which drives which kind ([`driver_for`]).
//!
//! Each is a small explicit state machine (its `Step` enum) behind the
//! [`Driver`](crate::driver::Driver) contract; what several drivers of one
//! vendor share lives in that vendor's module (`riverbed`), what any
//! driver may use in `crate::support`.

pub(crate) mod dms;
pub(crate) mod flowgateway;
pub(crate) mod netprofiler;
pub(crate) mod npm;
pub(crate) mod riverbed;
pub(crate) mod sps;

use crate::registry::AnyDriver;
use flotilla_common::DeviceKind;

/// The driver of every device kind: one line each. The match is
/// exhaustive, so a kind added to the list in `flotilla_common::kind`
/// does not compile until it has a driver here.
pub(crate) fn driver_for(kind: DeviceKind) -> Box<dyn AnyDriver> {
    match kind {
        DeviceKind::Dms => Box::new(dms::Dms),
        DeviceKind::Netprofiler => Box::new(netprofiler::Netprofiler::default()),
        DeviceKind::Flowgateway => Box::new(flowgateway::Flowgateway::default()),
        DeviceKind::Npm => Box::new(npm::Npm::default()),
        DeviceKind::Sps => Box::new(sps::Sps::default()),
    }
}
