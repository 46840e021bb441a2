//! What a forecast assumes of the devices: how long one of each kind takes
//! (given, or measured from a past campaign), and how many fail.

use crate::state::CampaignState;
use chrono::{DateTime, Utc};
use flotilla_common::{DeviceKind, Outcome};
use std::{collections::BTreeMap, time::Duration};

#[derive(Debug, Clone, PartialEq)]
pub struct Assumptions {
    /// From its start to its outcome, per device of each kind.
    pub durations: BTreeMap<DeviceKind, Duration>,
    /// Share of the started devices that fail, spread evenly over them.
    pub failure_ratio: f64,
    /// When the campaign starts.
    pub start: DateTime<Utc>,
}

impl Assumptions {
    /// Refuses a forecast for kinds it has no duration for.
    pub fn check_kinds<'k>(
        &self,
        kinds: impl IntoIterator<Item = &'k DeviceKind>,
    ) -> Result<(), String> {
        let missing: Vec<String> = kinds
            .into_iter()
            .filter(|kind| !self.durations.contains_key(kind))
            .map(|kind| kind.to_string())
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        Err(format!(
            "no duration assumed for {} device(s) of the inventory: give --duration {} (or --like a past campaign that had them)",
            missing.join(", "),
            missing
                .iter()
                .map(|kind| format!("{kind}=<time>"))
                .collect::<Vec<_>>()
                .join(",")
        ))
    }
}

/// `dms=90s,npm=20m`: a duration per kind.
pub fn parse_durations(text: &str) -> Result<BTreeMap<DeviceKind, Duration>, String> {
    let mut durations = BTreeMap::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (kind, time) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?} is not <kind>=<time>, like dms=90s"))?;
        let kind: DeviceKind = kind.trim().parse().map_err(|e| format!("{part:?}: {e}"))?;
        let time = humantime::parse_duration(time.trim()).map_err(|e| format!("{part:?}: {e}"))?;
        if time.is_zero() {
            return Err(format!("{part:?}: a device takes longer than zero"));
        }
        durations.insert(kind, time);
    }
    Ok(durations)
}

/// The mean time from publication to outcome of a campaign's devices that
/// succeeded, per kind (of all that finished, for a kind none of which
/// succeeded).
pub fn measured_durations(state: &CampaignState) -> BTreeMap<DeviceKind, Duration> {
    let mut succeeded: BTreeMap<DeviceKind, (f64, u64)> = BTreeMap::new();
    let mut finished: BTreeMap<DeviceKind, (f64, u64)> = BTreeMap::new();
    for (_, record) in state.devices() {
        let (Some(kind), Some(published), Some(ended), Some(outcome)) = (
            record.kind(),
            record.published_at(),
            record.finished_at(),
            record.outcome(),
        ) else {
            continue;
        };
        let seconds = (ended - published)
            .to_std()
            .unwrap_or_default()
            .as_secs_f64();
        for (map, counts) in [
            (&mut finished, true),
            (&mut succeeded, outcome == Outcome::Succeeded),
        ] {
            if counts {
                let entry = map.entry(kind).or_default();
                entry.0 += seconds;
                entry.1 += 1;
            }
        }
    }
    finished
        .into_iter()
        .map(|(kind, all)| {
            let (sum, n) = succeeded.get(&kind).copied().unwrap_or(all);
            (kind, Duration::from_secs_f64(sum / n as f64))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_read_per_kind_and_bad_ones_named() {
        let durations = parse_durations("dms=90s, npm=20m").unwrap();
        assert_eq!(durations[&DeviceKind::Dms], Duration::from_secs(90));
        assert_eq!(durations[&DeviceKind::Npm], Duration::from_secs(1200));
        assert!(
            parse_durations("toaster=1s")
                .unwrap_err()
                .contains("toaster")
        );
        assert!(
            parse_durations("dms")
                .unwrap_err()
                .contains("<kind>=<time>")
        );
        assert!(
            parse_durations("dms=soon")
                .unwrap_err()
                .contains("dms=soon")
        );
        let assumptions = Assumptions {
            durations,
            failure_ratio: 0.0,
            start: Utc::now(),
        };
        let error = assumptions.check_kinds(&[DeviceKind::Sps]).unwrap_err();
        assert!(error.contains("--duration sps=<time>"), "{error}");
    }
}
