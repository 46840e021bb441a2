//! The device kinds Flotilla can upgrade, as named in inventories, command
//! options and metric labels: one list, [`device_kinds!`] below, from which
//! the enum, its names, its `[drivers.<kind>]` settings and the inventory
//! columns each kind takes all follow.
//!
//! Adding a kind is one line of that list (and, if the kind takes
//! settings, their struct in [`crate::settings`]); the worker's driver
//! table and the simulator's kind table are exhaustive matches on
//! [`DeviceKind`], so the compiler names every place still missing it.

use crate::settings::{
    FlowgatewaySettings, KindSettings, NetprofilerSettings, NoSettings, NpmSettings, SpsSettings,
};
use serde::{Deserialize, Serialize};
use std::{fmt, str::FromStr};

/// Whether an inventory column applies to a kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Column {
    /// Every row of the kind must fill it.
    Required,
    /// A row of the kind may fill it.
    Optional,
    /// A row of the kind must leave it empty.
    Absent,
}

/// The kind-specific inventory columns, and how a kind uses each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Columns {
    /// `cpe_id`: the CPE's identifier at its DMS.
    pub cpe_id: Column,
    /// `gateways`: Flow Gateways updated through the device.
    pub gateways: Column,
}

impl Columns {
    /// A kind that uses none of the kind-specific columns.
    pub const NONE: Columns = Columns {
        cpe_id: Column::Absent,
        gateways: Column::Absent,
    };
}

macro_rules! device_kinds {
    ($(
        $(#[doc = $doc:literal])*
        $variant:ident = $name:literal, settings: $settings:ty, columns: $columns:expr;
    )+) => {
        /// One device API Flotilla knows how to drive.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub enum DeviceKind {
            $( $(#[doc = $doc])* #[serde(rename = $name)] $variant, )+
        }

        impl DeviceKind {
            /// Every kind, in the list's order.
            pub const ALL: [DeviceKind; [$($name),+].len()] = [$(DeviceKind::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $(DeviceKind::$variant => $name,)+
                }
            }

            /// The kind-specific inventory columns this kind uses.
            pub fn columns(self) -> Columns {
                match self {
                    $(DeviceKind::$variant => $columns,)+
                }
            }

            /// Checks a `[drivers.<kind>]` table against this kind's
            /// settings, naming what is wrong.
            pub(crate) fn validate_settings(self, table: &serde_json::Value) -> Result<(), String> {
                match self {
                    $(DeviceKind::$variant => <$settings as KindSettings>::validate(self, table),)+
                }
            }
        }
    };
}

device_kinds! {
    /// A TR-069 CPE, upgraded through its DMS (ACS) northbound API.
    Dms = "dms", settings: NoSettings, columns: Columns { cpe_id: Column::Required, gateways: Column::Absent };
    /// A Riverbed NetProfiler, which updates all its connected Flow Gateways.
    Netprofiler = "netprofiler", settings: NetprofilerSettings, columns: Columns { cpe_id: Column::Absent, gateways: Column::Optional };
    /// A Riverbed Flow Gateway (backup and restore).
    Flowgateway = "flowgateway", settings: FlowgatewaySettings, columns: Columns::NONE;
    /// A Riverbed NPM appliance (system update 2.0).
    Npm = "npm", settings: NpmSettings, columns: Columns::NONE;
    /// A One Identity Safeguard for Privileged Sessions appliance.
    Sps = "sps", settings: SpsSettings, columns: Columns::NONE;
}

impl DeviceKind {
    /// The names of the kinds that use `column` (`Required` or `Optional`),
    /// for messages ("only dms devices have one").
    pub fn names_using(column: impl Fn(Columns) -> Column) -> String {
        let names: Vec<&str> = DeviceKind::ALL
            .into_iter()
            .filter(|kind| column(kind.columns()) != Column::Absent)
            .map(DeviceKind::as_str)
            .collect();
        names.join(", ")
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown device kind {0:?} (known kinds: {known})", known = known_kinds())]
pub struct UnknownKind(pub String);

fn known_kinds() -> String {
    DeviceKind::ALL.map(DeviceKind::as_str).join(", ")
}

impl FromStr for DeviceKind {
    type Err = UnknownKind;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DeviceKind::ALL
            .into_iter()
            .find(|kind| kind.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| UnknownKind(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_text_and_json() {
        for kind in DeviceKind::ALL {
            assert_eq!(kind.as_str().parse::<DeviceKind>().unwrap(), kind);
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{kind}\""));
        }
        assert!("router".parse::<DeviceKind>().is_err());
        let error = "router".parse::<DeviceKind>().unwrap_err().to_string();
        // A kind added to the list joins the end of the message.
        assert!(
            error.starts_with(
                "unknown device kind \"router\" (known kinds: dms, netprofiler, flowgateway, npm, sps"
            ),
            "{error}"
        );
    }

    #[test]
    fn the_list_says_which_kinds_use_which_columns() {
        assert_eq!(DeviceKind::names_using(|c| c.cpe_id), "dms");
        assert_eq!(DeviceKind::names_using(|c| c.gateways), "netprofiler");
        assert_eq!(DeviceKind::Dms.columns().cpe_id, Column::Required);
    }
}
