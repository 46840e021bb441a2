//! Concurrency caps shared by every campaign on a broker: how many devices
//! are in flight behind each capped target (a DMS host, an image server).
//!
//! Controllers ask for room by appending a claim to the events stream.
//! Every reader judges claims in stream order with the same rule (admitted
//! if every target has fewer devices in flight than the claim's cap), so
//! all controllers agree on which claims won without talking to each other.
//! A device holds its room from its admitted claim until it finishes.

use crate::{campaign::Rollout, catalogue::LedgerSnapshot};
use flotilla_common::{
    CappedTarget, DeadLetteredEvent, Device, Event, EventBody, FinishedEvent, Target, job::host_key,
};
use std::collections::{HashMap, HashSet};

/// A campaign and a device: what holds room.
type Holder = (String, String);

#[derive(Debug, Default)]
pub struct CapLedger {
    in_flight: HashMap<String, HashSet<Holder>>,
    /// The keys each holder holds, to release them when it finishes.
    held: HashMap<Holder, Vec<String>>,
    verdicts: HashMap<Holder, bool>,
}

impl CapLedger {
    /// The devices holding room, to write down.
    pub fn snapshot(&self) -> LedgerSnapshot {
        let mut held: Vec<_> = self
            .held
            .iter()
            .map(|((campaign, device), keys)| (campaign.clone(), device.clone(), keys.clone()))
            .collect();
        held.sort();
        LedgerSnapshot { held }
    }

    /// The ledger a snapshot wrote down (verdicts of claims read before it
    /// are not kept: each controller reads its own claims back).
    pub fn from_snapshot(snapshot: LedgerSnapshot) -> Self {
        let mut ledger = CapLedger::default();
        for (campaign, device, keys) in snapshot.held {
            let holder = (campaign, device);
            for key in &keys {
                ledger
                    .in_flight
                    .entry(key.clone())
                    .or_default()
                    .insert(holder.clone());
            }
            ledger.held.insert(holder, keys);
        }
        ledger
    }

    /// Folds one event in, from any campaign.
    pub fn apply(&mut self, event: &Event) {
        match &event.body {
            EventBody::Claim(claim) => {
                let holder = (event.campaign.clone(), claim.device.clone());
                if self.held.contains_key(&holder) {
                    self.verdicts.insert(holder, true);
                    return;
                }
                let admitted = claim
                    .targets
                    .iter()
                    .all(|t| self.count(&t.key) < t.cap as usize);
                if admitted {
                    for target in &claim.targets {
                        self.in_flight
                            .entry(target.key.clone())
                            .or_default()
                            .insert(holder.clone());
                    }
                    self.held.insert(
                        holder.clone(),
                        claim.targets.iter().map(|t| t.key.clone()).collect(),
                    );
                }
                self.verdicts.insert(holder, admitted);
            }
            EventBody::Finished(FinishedEvent { device, .. })
            | EventBody::DeadLettered(DeadLetteredEvent { device, .. }) => {
                let holder = (event.campaign.clone(), device.clone());
                for key in self.held.remove(&holder).unwrap_or_default() {
                    if let Some(holders) = self.in_flight.get_mut(&key) {
                        holders.remove(&holder);
                    }
                }
            }
            _ => {}
        }
    }

    /// Devices in flight behind `key`.
    pub fn count(&self, key: &str) -> usize {
        self.in_flight.get(key).map_or(0, HashSet::len)
    }

    /// Whether a claim for `targets` would be admitted now, with `pending`
    /// more devices per key claimed but not yet judged.
    pub fn has_room(&self, targets: &[CappedTarget], pending: &HashMap<String, usize>) -> bool {
        targets.iter().all(|t| {
            self.count(&t.key) + pending.get(&t.key).copied().unwrap_or(0) < t.cap as usize
        })
    }

    /// The judgement of a device's latest claim, once it has been read.
    pub fn verdict(&self, campaign: &str, device: &str) -> Option<bool> {
        self.verdicts
            .get(&(campaign.to_owned(), device.to_owned()))
            .copied()
    }

    /// Forgets a verdict, before claiming again.
    pub fn forget(&mut self, campaign: &str, device: &str) {
        self.verdicts
            .remove(&(campaign.to_owned(), device.to_owned()));
    }
}

/// The capped targets a device of the campaign needs room behind.
pub fn targets_of(device: &Device, target: &Target, rollout: &Rollout) -> Vec<CappedTarget> {
    let mut targets = Vec::new();
    if let Some(cap) = rollout.per_host {
        targets.push(CappedTarget {
            key: format!("host:{}", api_host(device)),
            cap,
        });
    }
    if let Some(cap) = rollout.per_image_host {
        targets.push(CappedTarget {
            key: format!("image:{}", image_host(target)),
            cap,
        });
    }
    targets
}

/// The API host a device's calls go to (`host:port`): a DMS for CPEs, the
/// appliance itself otherwise.
pub fn api_host(device: &Device) -> String {
    host_key(&device.address)
}

/// The server a campaign's image is fetched from (`host:port`).
pub fn image_host(target: &Target) -> String {
    host_key(&target.image_url)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_common::{ClaimEvent, Ending};

    fn claim(campaign: &str, device: &str, cap: u32) -> Event {
        Event::new(
            campaign,
            EventBody::Claim(ClaimEvent {
                device: device.into(),
                targets: vec![CappedTarget {
                    key: "host:dms:7557".into(),
                    cap,
                }],
            }),
        )
    }

    fn finished(campaign: &str, device: &str) -> Event {
        Event::new(
            campaign,
            EventBody::Finished(FinishedEvent {
                device: device.into(),
                kind: flotilla_common::DeviceKind::Dms,
                seq: 1,
                last_step: "deactivate_rule".into(),
                ending: Ending::succeeded(),
                started_at: None,
            }),
        )
    }

    #[test]
    fn a_ledger_read_back_from_its_snapshot_judges_alike() {
        let mut ledger = CapLedger::default();
        for event in [claim("a", "1", 2), claim("b", "1", 2), finished("a", "1")] {
            ledger.apply(&event);
        }
        let mut restored = CapLedger::from_snapshot(ledger.snapshot());
        assert_eq!(restored.count("host:dms:7557"), 1);
        for event in [claim("c", "1", 2), claim("c", "2", 2)] {
            restored.apply(&event);
        }
        assert_eq!(restored.verdict("c", "1"), Some(true));
        assert_eq!(restored.verdict("c", "2"), Some(false));
    }

    #[test]
    fn claims_from_two_campaigns_share_one_cap_in_stream_order() {
        let mut ledger = CapLedger::default();
        for event in [claim("a", "1", 2), claim("b", "1", 2), claim("a", "2", 2)] {
            ledger.apply(&event);
        }
        assert_eq!(ledger.verdict("a", "1"), Some(true));
        assert_eq!(ledger.verdict("b", "1"), Some(true));
        assert_eq!(ledger.verdict("a", "2"), Some(false));
        assert_eq!(ledger.count("host:dms:7557"), 2);

        ledger.apply(&finished("b", "1"));
        assert_eq!(ledger.count("host:dms:7557"), 1);
        ledger.forget("a", "2");
        ledger.apply(&claim("a", "2", 2));
        assert_eq!(ledger.verdict("a", "2"), Some(true));
        let targets = [CappedTarget {
            key: "host:dms:7557".into(),
            cap: 2,
        }];
        assert!(!ledger.has_room(&targets, &HashMap::new()));
    }
}
