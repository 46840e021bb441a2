//! Waves: a canary, then larger waves, as counts or percentages of the
//! inventory. Each entry is how many devices have been started by the end
//! of that wave, so `[5, "10%", "50%", "100%"]` starts 5, then up to 10% of
//! the inventory, and so on. Devices join waves in inventory order.

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WaveSize {
    Count(u64),
    Percent(f64),
}

impl WaveSize {
    pub fn parse_text(text: &str) -> Result<WaveSize, String> {
        let number = text
            .trim()
            .strip_suffix('%')
            .ok_or_else(|| format!("{text:?} is neither a count nor a percentage like \"10%\""))?;
        match number.trim().parse::<f64>() {
            Ok(p) if p > 0.0 && p <= 100.0 => Ok(WaveSize::Percent(p)),
            _ => Err(format!(
                "{text:?} must be a percentage above 0% and at most 100%"
            )),
        }
    }

    fn describe(self) -> String {
        match self {
            WaveSize::Count(n) => n.to_string(),
            WaveSize::Percent(p) => format!("{p}%"),
        }
    }
}

/// Where each wave ends (cumulative device counts) for an inventory of
/// `devices`. Counts must grow among counts and percentages among
/// percentages; between the two forms the larger wins, so a 5-device canary
/// followed by "10%" of a small inventory simply starts nobody new. Waves
/// past the whole inventory are dropped; a plan that leaves devices
/// unstarted is an error.
pub fn wave_ends(sizes: &[WaveSize], devices: u64) -> Result<Vec<u64>, String> {
    let mut ends: Vec<u64> = Vec::new();
    let mut last_count: Option<(usize, u64)> = None;
    let mut last_percent: Option<(usize, f64)> = None;
    for (i, size) in sizes.iter().enumerate() {
        let shrinks = match *size {
            WaveSize::Count(0) => {
                return Err(format!("waves.sizes: wave {} has no devices", i + 1));
            }
            WaveSize::Count(n) => last_count
                .replace((i, n))
                .filter(|(_, before)| n < *before)
                .map(|(j, _)| j),
            WaveSize::Percent(p) => last_percent
                .replace((i, p))
                .filter(|(_, before)| p < *before)
                .map(|(j, _)| j),
        };
        if let Some(j) = shrinks {
            return Err(format!(
                "waves.sizes: wave {} ({}) is smaller than wave {} ({}); sizes count the devices \
                 started so far, so they must grow",
                i + 1,
                size.describe(),
                j + 1,
                sizes[j].describe()
            ));
        }
        let end = match *size {
            WaveSize::Count(n) => n,
            WaveSize::Percent(p) => ((devices as f64) * p / 100.0).ceil() as u64,
        }
        .min(devices);
        if ends.last().is_none_or(|&last| end > last) {
            ends.push(end);
        }
    }
    match ends.last() {
        Some(&last) if last >= devices => Ok(ends),
        None if devices == 0 => Ok(ends),
        _ => Err(format!(
            "waves.sizes: the last wave leaves {} of {devices} devices unstarted; end with \"100%\"",
            devices - ends.last().copied().unwrap_or(0)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(text: &[&str]) -> Vec<WaveSize> {
        text.iter()
            .map(|t| match t.parse() {
                Ok(n) => WaveSize::Count(n),
                Err(_) => WaveSize::parse_text(t).unwrap(),
            })
            .collect()
    }

    #[test]
    fn a_canary_then_percentages() {
        assert_eq!(
            wave_ends(&sizes(&["5", "10%", "50%", "100%"]), 2000).unwrap(),
            [5, 200, 1000, 2000]
        );
        // A small inventory collapses the waves it cannot fill.
        assert_eq!(
            wave_ends(&sizes(&["5", "10%", "50%", "100%"]), 4).unwrap(),
            [4]
        );
    }

    #[test]
    fn plans_that_shrink_or_stop_short_are_refused() {
        let error = wave_ends(&sizes(&["50%", "20%", "100%"]), 100).unwrap_err();
        assert!(
            error.contains("wave 2 (20%) is smaller than wave 1 (50%)"),
            "{error}"
        );
        let error = wave_ends(&sizes(&["5", "50%"]), 100).unwrap_err();
        assert!(
            error.contains("leaves 50 of 100 devices unstarted"),
            "{error}"
        );
        assert!(WaveSize::parse_text("150%").is_err());
        assert!(WaveSize::parse_text("ten").is_err());
    }
}
