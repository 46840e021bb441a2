//! Checking a whole inventory before anything is published, in constant
//! memory: rows are streamed, and duplicate ids are found with a fixed-size
//! Bloom filter, whose few "maybe seen" ids are confirmed by a second pass.

use flotilla_common::{
    DeviceKind,
    inventory::{InventoryReader, RowError},
};
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs::File,
    hash::{BuildHasher, RandomState},
    io::{self, BufReader},
    path::Path,
};

/// Bits in the duplicate filter: 8 MiB, which keeps false "maybe seen"
/// answers below one in a million up to a million rows.
const FILTER_BITS: usize = 64 * 1024 * 1024;
const FILTER_HASHES: u64 = 7;

/// What a clean inventory holds.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct InventorySummary {
    pub devices: u64,
    pub by_kind: BTreeMap<DeviceKind, u64>,
}

/// Reads the inventory once (twice if an id may repeat), reporting every
/// problem to `report` as it is found. Returns the summary and how many
/// problems there were.
pub fn check_inventory(
    path: &Path,
    mut report: impl FnMut(RowError),
) -> io::Result<(InventorySummary, u64)> {
    let mut summary = InventorySummary::default();
    let mut problems = 0u64;
    let mut filter = SeenFilter::new();
    let mut maybe_repeated: HashSet<String> = HashSet::new();

    let mut reader = match InventoryReader::new(BufReader::new(File::open(path)?)) {
        Ok(reader) => reader,
        Err(error) => {
            report(error);
            return Ok((summary, 1));
        }
    };
    while let Some(row) = reader.next_device() {
        match row {
            Ok(device) => {
                if filter.insert(&device.id) {
                    maybe_repeated.insert(device.id.clone());
                }
                summary.devices += 1;
                *summary.by_kind.entry(device.kind).or_default() += 1;
            }
            Err(errors) => {
                problems += errors.len() as u64;
                errors.into_iter().for_each(&mut report);
            }
        }
    }

    if !maybe_repeated.is_empty() {
        let mut first_line: HashMap<String, u64> = HashMap::new();
        let mut reader = InventoryReader::new(BufReader::new(File::open(path)?))
            .map_err(|e| io::Error::other(e.to_string()))?;
        while let Some(row) = reader.next_device() {
            let Ok(device) = row else { continue };
            if !maybe_repeated.contains(&device.id) {
                continue;
            }
            let this_line = reader.line().unwrap_or(0);
            match first_line.get(&device.id) {
                Some(first) => {
                    problems += 1;
                    report(RowError {
                        line: this_line,
                        field: Some("id"),
                        message: format!("{:?} repeats the id of line {first}", device.id),
                    });
                }
                None => {
                    first_line.insert(device.id.clone(), this_line);
                }
            }
        }
    }
    Ok((summary, problems))
}

/// A Bloom filter over device ids.
struct SeenFilter {
    bits: Vec<u64>,
    hasher: RandomState,
}

impl SeenFilter {
    fn new() -> Self {
        SeenFilter {
            bits: vec![0; FILTER_BITS / 64],
            hasher: RandomState::new(),
        }
    }

    /// Adds `id`; true if it may have been added before.
    fn insert(&mut self, id: &str) -> bool {
        // Double hashing: k positions from two independent hashes.
        let h1 = self.hasher.hash_one((id, 1u8));
        let h2 = self.hasher.hash_one((id, 2u8)) | 1;
        let mut seen = true;
        for i in 0..FILTER_HASHES {
            let bit = (h1.wrapping_add(i.wrapping_mul(h2)) % FILTER_BITS as u64) as usize;
            let (word, mask) = (bit / 64, 1u64 << (bit % 64));
            seen &= self.bits[word] & mask != 0;
            self.bits[word] |= mask;
        }
        seen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_ids_are_reported_at_their_second_line() {
        let path = std::env::temp_dir().join(format!("flotilla-dup-{}.csv", std::process::id()));
        std::fs::write(
            &path,
            "id,kind,address,credentials,cpe_id\n\
             a,dms,http://127.0.0.1:1,sim,C1\n\
             b,dms,http://127.0.0.1:1,sim,C2\n\
             a,dms,http://127.0.0.1:1,sim,C3\n\
             c,npm,http://127.0.0.1:2,sim,C4\n",
        )
        .unwrap();
        let mut errors = Vec::new();
        let (summary, problems) = check_inventory(&path, |e| errors.push(e.to_string())).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(problems, 2);
        assert_eq!(summary.devices, 3);
        assert!(
            errors.contains(
                &"line 5, field cpe_id: only dms devices have one, this is a npm".to_owned()
            ),
            "{errors:?}"
        );
        assert!(
            errors.contains(&"line 4, field id: \"a\" repeats the id of line 2".to_owned()),
            "{errors:?}"
        );
    }

    #[test]
    fn the_filter_remembers_what_it_saw() {
        let mut filter = SeenFilter::new();
        assert!(!filter.insert("cpe-1"));
        assert!(!filter.insert("cpe-2"));
        assert!(filter.insert("cpe-1"));
    }
}
