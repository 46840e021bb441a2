//! The campaign file's `[rate]` section: the start rate, its ramp and the
//! adaptive rate per API host.

use crate::rollout::{
    adaptive::AdaptiveRate,
    pacer::{Ramp, Rate},
};
use serde::Deserialize;
use std::time::Duration;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RateSection {
    per_minute: f64,
    ramp: Option<RampSection>,
    adaptive: Option<AdaptiveSection>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdaptiveSection {
    #[serde(default, with = "humantime_serde")]
    window: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    p95_over: Option<Duration>,
    error_ratio_over: Option<f64>,
    decrease: Option<f64>,
    /// Default: a tenth of `per_minute`.
    increase: Option<f64>,
    min_calls: Option<u64>,
    min_per_minute: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RampSection {
    factor: f64,
    every_successes: u64,
    max_per_minute: f64,
}

/// The start rate (and the adaptive rate, if set), with a problem for each
/// value out of range.
pub(super) fn read(rate: RateSection, problems: &mut Vec<String>) -> (Rate, Option<AdaptiveRate>) {
    let ramp = rate.ramp.map(|ramp| Ramp {
        factor: ramp.factor,
        every_successes: ramp.every_successes,
        max_per_minute: ramp.max_per_minute,
    });
    if rate.per_minute.is_nan() || rate.per_minute <= 0.0 {
        problems.push(format!(
            "rate.per_minute {} must be above 0",
            rate.per_minute
        ));
    }
    if let Some(ramp) = &ramp {
        if ramp.factor.is_nan() || ramp.factor <= 1.0 {
            problems.push(format!("rate.ramp.factor {} must be above 1", ramp.factor));
        }
        if ramp.every_successes == 0 {
            problems.push("rate.ramp.every_successes must be at least 1".to_owned());
        }
        if ramp.max_per_minute.is_nan() || ramp.max_per_minute < rate.per_minute {
            problems.push("rate.ramp.max_per_minute is below rate.per_minute".to_owned());
        }
    }
    let adaptive_rate = rate
        .adaptive
        .map(|section| adaptive(section, rate.per_minute, problems));
    (
        Rate {
            per_minute: rate.per_minute,
            ramp,
        },
        adaptive_rate,
    )
}

/// The `[rate] adaptive` settings, defaults filled in, with a problem
/// for each value out of range.
fn adaptive(section: AdaptiveSection, per_minute: f64, problems: &mut Vec<String>) -> AdaptiveRate {
    let adaptive = AdaptiveRate {
        window: section.window.unwrap_or(Duration::from_secs(60)),
        p95_over: section.p95_over.unwrap_or(Duration::from_secs(2)),
        error_ratio_over: section.error_ratio_over.unwrap_or(0.05),
        decrease: section.decrease.unwrap_or(0.5),
        increase: section.increase.unwrap_or(per_minute / 10.0),
        min_calls: section.min_calls.unwrap_or(20),
        min_per_minute: section.min_per_minute.unwrap_or(1.0),
    };
    if adaptive.window < Duration::from_secs(1) {
        problems.push("rate.adaptive.window must be at least 1s".to_owned());
    }
    if !(0.0..1.0).contains(&adaptive.error_ratio_over) {
        problems.push(format!(
            "rate.adaptive.error_ratio_over {} must be at least 0 and below 1",
            adaptive.error_ratio_over
        ));
    }
    if !(adaptive.decrease > 0.0 && adaptive.decrease < 1.0) {
        problems.push(format!(
            "rate.adaptive.decrease {} must be above 0 and below 1",
            adaptive.decrease
        ));
    }
    if adaptive.increase.is_nan() || adaptive.increase <= 0.0 {
        problems.push(format!(
            "rate.adaptive.increase {} must be above 0",
            adaptive.increase
        ));
    }
    if !(adaptive.min_per_minute > 0.0 && adaptive.min_per_minute <= per_minute) {
        problems.push(format!(
            "rate.adaptive.min_per_minute {} must be above 0 and at most rate.per_minute",
            adaptive.min_per_minute
        ));
    }
    adaptive
}
