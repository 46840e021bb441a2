//! Fault injection: which devices fail and how, decided up front from a
//! seed, so a run's expected outcomes are known before it starts.

use rand::{Rng, SeedableRng, rngs::StdRng, seq::SliceRandom};
use std::{ops::RangeInclusive, time::Duration};

/// What can go wrong, as ratios between 0 and 1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FaultSpec {
    /// Devices whose upgrade fails (for a CPE: FaultCode 9010, download
    /// failure).
    pub failure_ratio: f64,
    /// Devices that never report an outcome.
    pub silent_ratio: f64,
    /// Requests answered with an HTTP 500 without doing anything.
    pub transient_ratio: f64,
    /// Confine failing and silent devices to the first this many of each
    /// kind (a canary), the ratios applying to them; `None`: anywhere.
    pub only_first: Option<usize>,
}

impl FaultSpec {
    pub const NONE: FaultSpec = FaultSpec {
        failure_ratio: 0.0,
        silent_ratio: 0.0,
        transient_ratio: 0.0,
        only_first: None,
    };
}

/// What a device will do when asked to upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fate {
    Upgrade,
    Fail,
    /// Takes the upgrade and is never heard of again.
    Silent,
}

/// Exactly `round(n × ratio)` devices fail and as many stay silent, at
/// random places (among the first `only_first` when set).
pub fn assign_fates(n: usize, spec: &FaultSpec, rng: &mut StdRng) -> Vec<Fate> {
    let scope = spec.only_first.unwrap_or(n).min(n);
    let failing = ((scope as f64) * spec.failure_ratio).round() as usize;
    let silent = ((scope as f64) * spec.silent_ratio).round() as usize;
    let mut fates: Vec<Fate> = (0..scope)
        .map(|i| match i {
            i if i < failing => Fate::Fail,
            i if i < failing + silent => Fate::Silent,
            _ => Fate::Upgrade,
        })
        .collect();
    fates.shuffle(rng);
    fates.resize(n, Fate::Upgrade);
    fates
}

/// Which of `n` devices get which fault: exactly `round(n × failure_ratio)`
/// get one of `failing`, taken in turn so every kind of fault appears, and
/// `round(n × silent_ratio)` get `silent`; the places are random.
pub fn assign_faults<T: Copy>(
    n: usize,
    spec: &FaultSpec,
    failing: &[T],
    silent: Option<T>,
    rng: &mut StdRng,
) -> Vec<Option<T>> {
    assign_fates(n, spec, rng)
        .into_iter()
        .scan(0usize, |turn, fate| {
            Some(match fate {
                Fate::Upgrade => None,
                Fate::Silent => silent,
                Fate::Fail if failing.is_empty() => None,
                Fate::Fail => {
                    *turn += 1;
                    Some(failing[(*turn - 1) % failing.len()])
                }
            })
        })
        .collect()
}

/// Per-request randomness: transient errors and latency. Each host has its
/// own, seeded, so a run is repeatable host by host.
#[derive(Debug)]
pub struct Dice {
    rng: StdRng,
    transient_ratio: f64,
}

impl Dice {
    pub fn new(seed: [u8; 32], transient_ratio: f64) -> Self {
        Dice {
            rng: StdRng::from_seed(seed),
            transient_ratio,
        }
    }

    /// Whether this request fails with a 500.
    pub fn transient_error(&mut self) -> bool {
        self.transient_ratio > 0.0 && self.rng.random_bool(self.transient_ratio.min(1.0))
    }

    pub fn duration(&mut self, range: &RangeInclusive<Duration>) -> Duration {
        if range.start() >= range.end() {
            return *range.start();
        }
        self.rng.random_range(range.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fates_are_exact_counts_and_repeatable() {
        let spec = FaultSpec {
            failure_ratio: 0.05,
            silent_ratio: 0.01,
            ..FaultSpec::NONE
        };
        let a = assign_fates(1000, &spec, &mut StdRng::seed_from_u64(7));
        let b = assign_fates(1000, &spec, &mut StdRng::seed_from_u64(7));
        assert_eq!(a, b);
        assert_eq!(a.iter().filter(|f| **f == Fate::Fail).count(), 50);
        assert_eq!(a.iter().filter(|f| **f == Fate::Silent).count(), 10);
    }

    #[test]
    fn a_canary_can_hold_all_the_faults() {
        let spec = FaultSpec {
            failure_ratio: 0.4,
            only_first: Some(5),
            ..FaultSpec::NONE
        };
        let fates = assign_fates(100, &spec, &mut StdRng::seed_from_u64(3));
        assert_eq!(fates[..5].iter().filter(|f| **f == Fate::Fail).count(), 2);
        assert!(fates[5..].iter().all(|f| *f == Fate::Upgrade));
    }
}
