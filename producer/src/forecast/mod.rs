//! `plan` and `check --forecast`: the timeline a campaign would follow,
//! computed by driving the controller's own loop ([`crate::rollout::steer`])
//! in virtual time, with assumed device durations and failures.
//!
//! - what is assumed, and durations measured from a past campaign:
//!   [`assumptions`];
//! - the virtual fleet the loop drives: `fleet`;
//! - what comes out, as text or JSON: [`timeline`].

pub mod assumptions;
mod fleet;
pub mod timeline;

pub use assumptions::{Assumptions, measured_durations, parse_durations};
pub use timeline::{ForecastJson, Timeline};

use crate::{
    Campaign, CampaignState, ProducerError,
    rollout::{
        caps::CapLedger,
        controller::started,
        cursor::Cursor,
        steer::{self, Fleet, Steering},
    },
};
use flotilla_common::Thresholds;
use std::{collections::HashSet, path::Path};

/// The forecast of `campaign` over the `devices` of `inventory` (those in
/// `only`, if given).
pub async fn forecast(
    campaign: &Campaign,
    inventory: &Path,
    devices: u64,
    only: Option<HashSet<String>>,
    assumptions: &Assumptions,
) -> Result<Timeline, ProducerError> {
    let cursor = Cursor::open(inventory, only)?;
    let mut steering = Steering::new(
        campaign,
        CampaignState::new(&campaign.id),
        CapLedger::default(),
        cursor,
    );
    let mut fleet = fleet::VirtualFleet::new(assumptions, fleet::image_server(&steering));
    let (decision, reason) = started(campaign, devices, "forecast".to_owned())?;
    fleet
        .decide(&mut steering, decision, reason, Thresholds::default())
        .await?;
    steer::drive(&mut fleet, &mut steering).await?;
    Ok(fleet.timeline(&steering))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        campaign::Budget,
        rollout::{
            pacer::{Ramp, Rate},
            plan::WaveSize,
            window::Window,
        },
    };
    use chrono::{DateTime, Utc};
    use flotilla_common::{Device, DeviceKind, PauseCause, inventory::InventoryWriter};
    use std::{path::PathBuf, time::Duration};

    const CAMPAIGN: &str = r#"
        id = "fc"
        [target]
        version = "7.2.1"
        image_url = "https://files.example.net/cpe/7.2.1.bin"
        sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    "#;

    /// `cpes` CPEs spread over `hosts` DMS hosts, in turn.
    fn inventory(name: &str, cpes: usize, hosts: usize) -> PathBuf {
        let path = std::env::temp_dir().join(format!(
            "flotilla-forecast-{}-{name}.csv",
            std::process::id()
        ));
        let mut writer = InventoryWriter::new(std::fs::File::create(&path).unwrap()).unwrap();
        for i in 0..cpes {
            writer
                .write(&Device {
                    id: format!("cpe-{i}"),
                    kind: DeviceKind::Dms,
                    address: format!("https://dms-{}.example.net:7557", i % hosts)
                        .parse()
                        .unwrap(),
                    credentials: "dms".into(),
                    cpe_id: Some(format!("CPE{i}")),
                    group: None,
                    gateways: Vec::new(),
                })
                .unwrap();
        }
        writer.finish().unwrap();
        path
    }

    fn assumptions(per_cpe: Duration, failure_ratio: f64, start: &str) -> Assumptions {
        Assumptions {
            durations: [(DeviceKind::Dms, per_cpe)].into(),
            failure_ratio,
            start: start.parse::<DateTime<Utc>>().unwrap(),
        }
    }

    #[tokio::test]
    async fn fifty_thousand_cpes_behind_four_dms_hosts_at_fifty_each_take_six_and_a_quarter_hours()
    {
        let mut campaign = Campaign::parse(CAMPAIGN).unwrap();
        campaign.rollout.per_host = Some(50);
        let path = inventory("50k", 50_000, 4);
        let assumed = assumptions(Duration::from_secs(90), 0.0, "2026-12-02T20:00:00Z");
        let timeline = forecast(&campaign, &path, 50_000, None, &assumed)
            .await
            .unwrap();
        // 200 at a time, 250 rounds of 90 s.
        assert_eq!(timeline.duration, Duration::from_secs(22_500));
        assert_eq!(timeline.hosts.len(), 4);
        for host in &timeline.hosts {
            assert_eq!((host.peak, host.cap, host.binds), (50, Some(50), true));
        }
        assert_eq!(timeline.image.peak, 200);
        let text = timeline::text("fc", 50_000, &timeline, &assumed);
        assert!(text.contains("takes 6h15m"), "{text}");
        assert!(text.contains("binding cap: per_host"), "{text}");
        std::fs::remove_file(path).unwrap();
    }

    #[tokio::test]
    async fn a_ramp_a_gate_and_a_night_window_shape_the_timeline() {
        let mut campaign = Campaign::parse(CAMPAIGN).unwrap();
        campaign.rollout.waves = vec![WaveSize::Count(10), WaveSize::Percent(100.0)];
        campaign.rollout.rate = Some(Rate {
            per_minute: 6.0,
            ramp: Some(Ramp {
                factor: 2.0,
                every_successes: 10,
                max_per_minute: 60.0,
            }),
        });
        // 22:00 to 23:00 UTC, every day; the campaign is planned at 21:00.
        let days = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"].map(String::from);
        campaign.rollout.window = Some(Window::parse(&days, "22:00", "23:00", "UTC").unwrap());
        let path = inventory("ramp", 100, 2);
        let assumed = assumptions(Duration::from_secs(60), 0.0, "2026-12-02T21:00:00Z");
        let timeline = forecast(&campaign, &path, 100, None, &assumed)
            .await
            .unwrap();
        let at = |text: &str| text.parse::<DateTime<Utc>>().unwrap();
        // Waits an hour for the window, then 10 canaries at 6 a minute.
        assert_eq!(timeline.windows[0].opens_at, at("2026-12-02T22:00:00Z"));
        assert_eq!(timeline.waves[0].starts_at, at("2026-12-02T22:00:00Z"));
        assert_eq!(timeline.waves[0].ends_at, at("2026-12-02T22:02:30Z"));
        // Wave 2 starts once the canaries have finished (no gate set: all of
        // them), at a rate ramped up by their ten successes to 12 a minute.
        assert_eq!(timeline.waves[1].starts_at, at("2026-12-02T22:02:30Z"));
        assert!(timeline.ends_at > timeline.waves[1].starts_at + chrono::Duration::minutes(3));
        assert!(timeline.ends_at < at("2026-12-02T23:00:00Z"));
        std::fs::remove_file(path).unwrap();
    }

    #[tokio::test]
    async fn the_failure_budget_pauses_where_the_failures_pass_it() {
        let mut campaign = Campaign::parse(CAMPAIGN).unwrap();
        campaign.rollout.campaign_budget = Some(Budget {
            ratio: 0.02,
            min_finished: 100,
        });
        campaign.rollout.per_host = Some(10);
        let path = inventory("budget", 1000, 2);
        let assumed = assumptions(Duration::from_secs(30), 0.05, "2026-12-02T08:00:00Z");
        let timeline = forecast(&campaign, &path, 1000, None, &assumed)
            .await
            .unwrap();
        let first = &timeline.pauses[0];
        assert_eq!(first.cause, PauseCause::CampaignBudget);
        // 5% fail, evenly: 100 finished with 5 failed passes 2%.
        assert_eq!((first.finished, first.failed), (100, 5));
        std::fs::remove_file(path).unwrap();
    }
}
