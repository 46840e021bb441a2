//! Devices of the current wave read ahead of starting them, grouped by API
//! host: every device behind one host needs room behind the same capped
//! targets, so a host without room is passed over once, whatever number of
//! its devices wait, and a full host does not hold up the others.

use super::caps::CapLedger;
use flotilla_common::{CappedTarget, Device};
use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap, VecDeque},
};

#[derive(Debug, Default)]
pub struct Held {
    hosts: HashMap<String, Host>,
    len: usize,
}

#[derive(Debug)]
struct Host {
    /// Room each of its devices needs (the same for all: one host, one
    /// campaign image).
    targets: Vec<CappedTarget>,
    /// In inventory order.
    devices: VecDeque<(u64, Device)>,
}

impl Held {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn clear(&mut self) {
        self.hosts.clear();
        self.len = 0;
    }

    /// Holds a device, the `index`th of the campaign, behind `host`.
    pub fn push(&mut self, index: u64, device: Device, host: String, targets: Vec<CappedTarget>) {
        let entry = self.hosts.entry(host).or_insert_with(|| Host {
            targets,
            devices: VecDeque::new(),
        });
        entry.devices.push_back((index, device));
        self.len += 1;
    }

    /// Holds a device again, first in line (it lost a race for room).
    pub fn push_first(&mut self, device: Device, host: String, targets: Vec<CappedTarget>) {
        let entry = self.hosts.entry(host).or_insert_with(|| Host {
            targets,
            devices: VecDeque::new(),
        });
        entry.devices.push_front((0, device));
        self.len += 1;
    }

    /// Every held device, letting go of them.
    pub fn drain(&mut self) -> Vec<Device> {
        let mut all: Vec<(u64, Device)> = self
            .hosts
            .drain()
            .flat_map(|(_, host)| host.devices)
            .collect();
        all.sort_by_key(|(index, _)| *index);
        self.len = 0;
        all.into_iter().map(|(_, device)| device).collect()
    }

    /// The first device held behind `host`.
    pub fn first_of(&self, host: &str) -> Option<&Device> {
        self.hosts.get(host)?.devices.front().map(|(_, d)| d)
    }

    /// The room `host`'s devices need from now on (its in-flight cap
    /// changed).
    pub fn retarget(&mut self, host: &str, targets: Vec<CappedTarget>) {
        if let Some(held) = self.hosts.get_mut(host) {
            held.targets = targets;
        }
    }

    /// Takes up to `n` devices in inventory order among the hosts that have
    /// room behind their capped targets (`ledger`, plus the devices taken
    /// so far) and that `may_start` lets start one more (it is asked once
    /// per device taken; a host it refuses is passed over for this call).
    pub fn take(
        &mut self,
        n: usize,
        ledger: &CapLedger,
        mut may_start: impl FnMut(&str) -> bool,
    ) -> Vec<Device> {
        let mut heads: BinaryHeap<Reverse<(u64, String)>> = self
            .hosts
            .iter()
            .filter_map(|(name, host)| {
                host.devices
                    .front()
                    .map(|(i, _)| Reverse((*i, name.clone())))
            })
            .collect();
        let mut pending: HashMap<String, usize> = HashMap::new();
        let mut chosen = Vec::new();
        while chosen.len() < n {
            let Some(Reverse((_, name))) = heads.pop() else {
                break;
            };
            let host = self
                .hosts
                .get_mut(&name)
                .expect("every head is of a held host");
            // Room only shrinks within one call: a host passed over stays so.
            if !ledger.has_room(&host.targets, &pending) || !may_start(&name) {
                continue;
            }
            let (_, device) = host
                .devices
                .pop_front()
                .expect("a host with a head has a device");
            self.len -= 1;
            for target in &host.targets {
                *pending.entry(target.key.clone()).or_default() += 1;
            }
            chosen.push(device);
            match host.devices.front() {
                Some((index, _)) => heads.push(Reverse((*index, name))),
                None => {
                    self.hosts.remove(&name);
                }
            }
        }
        chosen
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_common::DeviceKind;

    fn device(id: &str, host: &str) -> Device {
        Device {
            id: id.into(),
            kind: DeviceKind::Npm,
            address: format!("http://{host}:80").parse().unwrap(),
            credentials: "sim".into(),
            cpe_id: None,
            group: None,
            gateways: Vec::new(),
        }
    }

    fn capped(host: &str, cap: u32) -> Vec<CappedTarget> {
        vec![CappedTarget {
            key: format!("host:{host}"),
            cap,
        }]
    }

    #[test]
    fn devices_are_taken_in_inventory_order_past_hosts_without_room() {
        let mut held = Held::default();
        for (i, host) in ["a", "a", "b", "a", "c", "b"].iter().enumerate() {
            let id = format!("d{i}");
            held.push(
                i as u64,
                device(&id, host),
                host.to_string(),
                capped(host, 2),
            );
        }
        let ledger = CapLedger::default();
        // "a" has room for two: d0, d1, then d2 of b; d3 waits behind a's cap.
        let ids: Vec<String> = held
            .take(4, &ledger, |_| true)
            .into_iter()
            .map(|d| d.id)
            .collect();
        assert_eq!(ids, ["d0", "d1", "d2", "d4"]);
        assert_eq!(held.len(), 2);
        // The ledger's room counts too: "b" is full once one of its
        // devices is in flight behind a cap of one.
        let mut full = CapLedger::default();
        full.apply(&flotilla_common::Event::new(
            "c",
            flotilla_common::EventBody::Claim(flotilla_common::ClaimEvent {
                device: "d2".into(),
                targets: capped("b", 1),
            }),
        ));
        let mut one = Held::default();
        one.push(5, device("d5", "b"), "b".into(), capped("b", 1));
        assert!(one.take(4, &full, |_| true).is_empty());
        assert_eq!(held.drain().len(), 2);
        assert!(held.is_empty());
    }
}
