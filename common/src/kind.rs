//! The device kinds Flotilla can upgrade, as named in inventories, command
//! options and metric labels.

use serde::{Deserialize, Serialize};
use std::{fmt, str::FromStr};

/// One device API Flotilla knows how to drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// A TR-069 CPE, upgraded through its DMS (ACS) northbound API.
    Dms,
    /// A Riverbed NetProfiler, which updates all its connected Flow Gateways.
    Netprofiler,
    /// A Riverbed Flow Gateway (backup and restore).
    Flowgateway,
    /// A Riverbed NPM appliance (system update 2.0).
    Npm,
    /// A One Identity Safeguard for Privileged Sessions appliance.
    Sps,
}

impl DeviceKind {
    pub const ALL: [DeviceKind; 5] = [
        DeviceKind::Dms,
        DeviceKind::Netprofiler,
        DeviceKind::Flowgateway,
        DeviceKind::Npm,
        DeviceKind::Sps,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeviceKind::Dms => "dms",
            DeviceKind::Netprofiler => "netprofiler",
            DeviceKind::Flowgateway => "flowgateway",
            DeviceKind::Npm => "npm",
            DeviceKind::Sps => "sps",
        }
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown device kind {0:?} (known kinds: dms, netprofiler, flowgateway, npm, sps)")]
pub struct UnknownKind(pub String);

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
    }
}
