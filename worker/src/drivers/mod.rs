//! The device drivers, one module (or folder) per device API, and the one
//! table that says which drives which kind ([`driver_for`]).
//!
//! Each is a small explicit state machine (its `Step` enum) behind the
//! [`Driver`](crate::driver::Driver) contract; what several drivers of one
//! vendor share lives in that vendor's module (`riverbed`), what any
//! driver may use in `crate::support`.

pub(crate) mod riverbed;

use crate::registry::AnyDriver;
use flotilla_common::DeviceKind;

/// Declares each driver's module and its line of [`driver_for`].
macro_rules! drivers {
    ($($kind:ident => $module:ident: $driver:expr;)+) => {
        $(pub(crate) mod $module;)+

        /// The driver of every device kind. The match is exhaustive, so a
        /// kind added to `flotilla_common::kind` does not build until it
        /// has a line here.
        pub(crate) fn driver_for(kind: DeviceKind) -> Box<dyn AnyDriver> {
            match kind {
                $(DeviceKind::$kind => Box::new($driver),)+
            }
        }
    };
}

// One line per kind: `Kind => module: the driver`.
drivers! {
    Dms => dms: dms::Dms;
    Netprofiler => netprofiler: netprofiler::Netprofiler::default();
    Flowgateway => flowgateway: flowgateway::Flowgateway::default();
    Npm => npm: npm::Npm::default();
    Sps => sps: sps::Sps::default();
}
