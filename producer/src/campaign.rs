//! The campaign file (TOML): what to install and how hard to try.
//!
//! ```toml
//! id = "cpe-fw-7.2.1"              # letters, digits, '-', '_', '.'
//!
//! [target]
//! version = "7.2.1"
//! image_url = "https://files.example.net/cpe/7.2.1.bin"   # or file:///... (in the workers' FLOTILLA_IMAGE_DIR)
//! sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
//!
//! [timing]                         # all optional
//! deadline = "45m"                 # per device, from its first step
//! step_timeout = "1m"              # one step, its HTTP calls included
//! poll_interval = "10s"            # between two polls of a busy device
//!
//! [retry]                          # transient errors: timeouts, refused, 5xx
//! max_attempts = 6                 # tries of one step, the first included
//! initial_backoff = "2s"           # doubled each try, with jitter
//! max_backoff = "2m"
//!
//! [waves]                          # default: every device in one wave
//! sizes = [5, "10%", "50%", "100%"] # devices started by the end of each wave
//! success_gate = 0.9               # share of a wave that must succeed before
//!                                  # the next starts (default: all finished)
//! approval = false                 # pause for a person between waves
//!
//! [failure_budget]                 # failures (timeouts included) that pause
//! wave = { ratio = 0.2, min_finished = 5 }
//! campaign = { ratio = 0.05, min_finished = 50 }
//!
//! [rate]                           # devices started per minute
//! per_minute = 60
//! ramp = { factor = 2.0, every_successes = 50, max_per_minute = 600 }
//! # Slow down an API host whose calls slow down or fail transiently, and
//! # speed it up again as it recovers (all optional; these are defaults).
//! adaptive = { window = "1m", p95_over = "2s", error_ratio_over = 0.05, decrease = 0.5, increase = 6, min_calls = 20, min_per_minute = 1 }
//!
//! [concurrency]                    # devices in flight, across all campaigns
//! per_host = 50                    # behind one API host (a DMS, an appliance)
//! per_image_host = 200             # fetching from one image server
//!
//! [window]                         # start devices only inside this window
//! days = ["mon", "tue", "wed", "thu", "fri"]
//! start = "22:00"
//! end = "05:00"                    # before start: ends the next day
//! time_zone = "Europe/Paris"
//!
//! [drivers.<kind>]                 # settings of one device kind's driver
//!
//! [tls]                            # HTTPS to devices; optional
//! ca_file = "ca.pem"               # trust only these CAs (relative to this file)
//! [tls.groups.lab]                 # devices of inventory group "lab"
//! ca_file = "lab-ca.pem"           # their own CA, or:
//! verify = false                   # no certificate checks (every step event says so)
//! ```

mod rate;

use crate::rollout::{adaptive::AdaptiveRate, pacer::Rate, plan::WaveSize, window::Window};
use flotilla_common::{DeviceKind, JobPolicy, RetryPolicy, Target, TlsProfile, settings, tls};
use rate::RateSection;
use serde::Deserialize;
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

/// A validated campaign.
#[derive(Debug, Clone, PartialEq)]
pub struct Campaign {
    pub id: String,
    pub target: Target,
    pub policy: JobPolicy,
    /// Each kind's `[drivers.<kind>]` table, validated.
    pub drivers: BTreeMap<DeviceKind, serde_json::Value>,
    pub tls: TlsSettings,
    pub rollout: Rollout,
}

/// How devices are started: in which waves, how fast, when, and when to
/// stop.
#[derive(Debug, Clone, PartialEq)]
pub struct Rollout {
    pub waves: Vec<WaveSize>,
    /// Share of a wave that must succeed before the next wave starts; with
    /// none, the next starts once the wave has finished.
    pub success_gate: Option<f64>,
    /// Pause for a person's approval between waves.
    pub approval: bool,
    pub wave_budget: Option<Budget>,
    pub campaign_budget: Option<Budget>,
    pub rate: Option<Rate>,
    /// Start rates per API host that follow the hosts' health.
    pub adaptive: Option<AdaptiveRate>,
    /// Devices in flight behind one API host, across campaigns.
    pub per_host: Option<u32>,
    /// Devices in flight fetching from one image server, across campaigns.
    pub per_image_host: Option<u32>,
    pub window: Option<Window>,
}

impl Default for Rollout {
    fn default() -> Self {
        Rollout {
            waves: vec![WaveSize::Percent(100.0)],
            success_gate: None,
            approval: false,
            wave_budget: None,
            campaign_budget: None,
            rate: None,
            adaptive: None,
            per_host: None,
            per_image_host: None,
            window: None,
        }
    }
}

/// Failures that pause the campaign: more than `ratio` of the finished
/// devices, once at least `min_finished` have finished.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    pub ratio: f64,
    pub min_finished: u64,
}

impl Campaign {
    /// The settings a job of `kind` carries.
    pub fn settings_for(&self, kind: DeviceKind) -> serde_json::Value {
        self.drivers.get(&kind).cloned().unwrap_or_default()
    }
}

/// The `[tls]` section, with its CA files read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsSettings {
    /// For devices whose group has no section of its own.
    pub default: TlsProfile,
    pub groups: BTreeMap<String, TlsProfile>,
}

impl TlsSettings {
    /// The profile a device of `group` is checked with.
    pub fn profile_for(&self, group: Option<&str>) -> &TlsProfile {
        group
            .and_then(|g| self.groups.get(g))
            .unwrap_or(&self.default)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct CampaignError {
    pub path: String,
    pub message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CampaignFile {
    id: String,
    target: TargetSection,
    #[serde(default)]
    timing: TimingSection,
    #[serde(default)]
    retry: RetrySection,
    #[serde(default)]
    drivers: BTreeMap<String, toml::Value>,
    #[serde(default)]
    tls: TlsSection,
    waves: Option<WavesSection>,
    failure_budget: Option<BudgetSection>,
    rate: Option<RateSection>,
    concurrency: Option<ConcurrencySection>,
    window: Option<WindowSection>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WavesSection {
    sizes: Vec<WaveSizeText>,
    success_gate: Option<f64>,
    #[serde(default)]
    approval: bool,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum WaveSizeText {
    Count(i64),
    Text(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BudgetSection {
    wave: Option<BudgetEntry>,
    campaign: Option<BudgetEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BudgetEntry {
    ratio: f64,
    #[serde(default = "one")]
    min_finished: u64,
}

fn one() -> u64 {
    1
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConcurrencySection {
    per_host: Option<u32>,
    per_image_host: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WindowSection {
    days: Vec<String>,
    start: String,
    end: String,
    time_zone: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TlsSection {
    ca_file: Option<PathBuf>,
    #[serde(default)]
    groups: BTreeMap<String, TlsGroupSection>,
}

/// Certificate checks can be turned off for a group only, never for a
/// whole campaign: a group names the devices an operator vouches for.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsGroupSection {
    ca_file: Option<PathBuf>,
    verify: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetSection {
    version: String,
    image_url: String,
    sha256: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct TimingSection {
    #[serde(with = "humantime_serde")]
    deadline: Duration,
    #[serde(with = "humantime_serde")]
    step_timeout: Duration,
    #[serde(with = "humantime_serde")]
    poll_interval: Duration,
}

impl Default for TimingSection {
    fn default() -> Self {
        let policy = JobPolicy::default();
        TimingSection {
            deadline: policy.deadline,
            step_timeout: policy.step_timeout,
            poll_interval: policy.poll_interval,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RetrySection {
    max_attempts: u32,
    #[serde(with = "humantime_serde")]
    initial_backoff: Duration,
    #[serde(with = "humantime_serde")]
    max_backoff: Duration,
}

impl Default for RetrySection {
    fn default() -> Self {
        let retry = RetryPolicy::default();
        RetrySection {
            max_attempts: retry.max_attempts,
            initial_backoff: retry.initial_backoff,
            max_backoff: retry.max_backoff,
        }
    }
}

impl Campaign {
    pub fn load(path: &Path) -> Result<Campaign, CampaignError> {
        let error = |message: String| CampaignError {
            path: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| error(format!("cannot read: {e}")))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        Campaign::parse_in(&text, dir).map_err(error)
    }

    /// Parses and checks a campaign, naming every problem found; files it
    /// names are relative to the working directory.
    pub fn parse(text: &str) -> Result<Campaign, String> {
        Campaign::parse_in(text, Path::new("."))
    }

    /// Parses and checks a campaign whose relative file names (CA files)
    /// are relative to `dir`.
    pub fn parse_in(text: &str, dir: &Path) -> Result<Campaign, String> {
        let file: CampaignFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut problems = Vec::new();

        if !valid_name(&file.id) {
            problems.push(format!(
                "id {:?} must be 1 to 64 letters, digits, '-', '_' or '.'",
                file.id
            ));
        }
        if file.target.version.trim().is_empty() {
            problems.push("target.version is empty".to_owned());
        }
        let image_url = match url::Url::parse(&file.target.image_url) {
            Ok(url) if matches!(url.scheme(), "http" | "https" | "file") => Some(url),
            Ok(url) => {
                problems.push(format!(
                    "target.image_url: scheme {:?} is not http, https or file",
                    url.scheme()
                ));
                None
            }
            Err(e) => {
                problems.push(format!("target.image_url {:?}: {e}", file.target.image_url));
                None
            }
        };
        let sha256 = file.target.sha256.trim().to_ascii_lowercase();
        if sha256.len() != 64 || !sha256.chars().all(|c| c.is_ascii_hexdigit()) {
            problems.push("target.sha256 must be 64 hexadecimal digits".to_owned());
        }
        let timing = &file.timing;
        for (name, value) in [
            ("timing.deadline", timing.deadline),
            ("timing.step_timeout", timing.step_timeout),
            ("timing.poll_interval", timing.poll_interval),
            ("retry.initial_backoff", file.retry.initial_backoff),
            ("retry.max_backoff", file.retry.max_backoff),
        ] {
            if value.is_zero() {
                problems.push(format!("{name} must be longer than zero"));
            }
        }
        if timing.step_timeout > timing.deadline {
            problems.push("timing.step_timeout is longer than timing.deadline".to_owned());
        }
        if timing.poll_interval >= timing.deadline {
            problems.push("timing.poll_interval must be shorter than timing.deadline".to_owned());
        }
        if file.retry.max_attempts == 0 {
            problems.push("retry.max_attempts must be at least 1".to_owned());
        }
        if file.retry.initial_backoff > file.retry.max_backoff {
            problems.push("retry.initial_backoff is longer than retry.max_backoff".to_owned());
        }

        let mut drivers = BTreeMap::new();
        for (name, table) in file.drivers {
            let kind = match name.parse::<DeviceKind>() {
                Ok(kind) => kind,
                Err(e) => {
                    problems.push(format!("[drivers.{name}]: {e}"));
                    continue;
                }
            };
            let table = serde_json::to_value(table).expect("TOML values convert to JSON");
            match settings::validate(kind, &table) {
                Ok(()) => {
                    drivers.insert(kind, table);
                }
                Err(e) => problems.push(format!("[drivers.{name}]: {e}")),
            }
        }

        let rollout = parse_rollout(
            file.waves,
            file.failure_budget,
            file.rate,
            file.concurrency,
            file.window,
            &mut problems,
        );
        let tls = read_tls(&file.tls, dir, &mut problems);

        match image_url {
            Some(image_url) if problems.is_empty() => Ok(Campaign {
                id: file.id,
                target: Target {
                    version: file.target.version.trim().to_owned(),
                    image_url,
                    sha256,
                },
                policy: JobPolicy {
                    deadline: timing.deadline,
                    step_timeout: timing.step_timeout,
                    poll_interval: timing.poll_interval,
                    retry: RetryPolicy {
                        max_attempts: file.retry.max_attempts,
                        initial_backoff: file.retry.initial_backoff,
                        max_backoff: file.retry.max_backoff,
                    },
                },
                drivers,
                rollout,
                tls,
            }),
            _ => Err(problems.join("; ")),
        }
    }
}

/// Reads the rollout sections, adding every problem to `problems`.
fn parse_rollout(
    waves: Option<WavesSection>,
    budget: Option<BudgetSection>,
    rate: Option<RateSection>,
    concurrency: Option<ConcurrencySection>,
    window: Option<WindowSection>,
    problems: &mut Vec<String>,
) -> Rollout {
    let mut rollout = Rollout::default();
    let ratio_ok = |r: f64| (0.0..=1.0).contains(&r);
    if let Some(waves) = waves {
        let mut sizes = Vec::new();
        for size in waves.sizes {
            match size {
                WaveSizeText::Count(n) if n > 0 => sizes.push(WaveSize::Count(n as u64)),
                WaveSizeText::Count(n) => {
                    problems.push(format!("waves.sizes: {n} is not a positive count"))
                }
                WaveSizeText::Text(text) => match WaveSize::parse_text(&text) {
                    Ok(size) => sizes.push(size),
                    Err(e) => problems.push(format!("waves.sizes: {e}")),
                },
            }
        }
        if sizes.is_empty() {
            problems.push("waves.sizes is empty".to_owned());
        } else {
            rollout.waves = sizes;
        }
        match waves.success_gate {
            Some(gate) if !(gate > 0.0 && gate <= 1.0) => problems.push(format!(
                "waves.success_gate {gate} must be above 0 and at most 1"
            )),
            gate => rollout.success_gate = gate,
        }
        rollout.approval = waves.approval;
    }
    if let Some(budget) = budget {
        for (name, entry, slot) in [
            ("wave", budget.wave, &mut rollout.wave_budget),
            ("campaign", budget.campaign, &mut rollout.campaign_budget),
        ] {
            let Some(entry) = entry else { continue };
            if !ratio_ok(entry.ratio) {
                problems.push(format!(
                    "failure_budget.{name}.ratio {} must be between 0 and 1",
                    entry.ratio
                ));
            } else if entry.min_finished == 0 {
                problems.push(format!(
                    "failure_budget.{name}.min_finished must be at least 1"
                ));
            } else {
                *slot = Some(Budget {
                    ratio: entry.ratio,
                    min_finished: entry.min_finished,
                });
            }
        }
    }
    if let Some(rate) = rate {
        let (rate, adaptive) = rate::read(rate, problems);
        rollout.rate = Some(rate);
        rollout.adaptive = adaptive;
    }
    if let Some(concurrency) = concurrency {
        for (name, cap) in [
            ("per_host", concurrency.per_host),
            ("per_image_host", concurrency.per_image_host),
        ] {
            if cap == Some(0) {
                problems.push(format!("concurrency.{name} must be at least 1"));
            }
        }
        rollout.per_host = concurrency.per_host;
        rollout.per_image_host = concurrency.per_image_host;
    }
    if let Some(window) = window {
        match Window::parse(&window.days, &window.start, &window.end, &window.time_zone) {
            Ok(window) => rollout.window = Some(window),
            Err(e) => problems.push(e),
        }
    }
    rollout
}

/// Reads the CA files of the `[tls]` section into profiles.
fn read_tls(section: &TlsSection, dir: &Path, problems: &mut Vec<String>) -> TlsSettings {
    let default = TlsProfile {
        ca_pem: section
            .ca_file
            .as_deref()
            .and_then(|f| read_ca("tls.ca_file", dir, f, problems)),
        verify: true,
    };
    let mut groups = BTreeMap::new();
    for (name, group) in &section.groups {
        let ca_pem = match &group.ca_file {
            Some(file) => read_ca(&format!("tls.groups.{name}.ca_file"), dir, file, problems),
            None => default.ca_pem.clone(),
        };
        let verify = group.verify.unwrap_or(true);
        if !verify && group.ca_file.is_some() {
            problems.push(format!(
                "tls.groups.{name}: a ca_file is pointless with verify = false; keep one"
            ));
        }
        let profile = if verify {
            TlsProfile { ca_pem, verify }
        } else {
            TlsProfile {
                ca_pem: None,
                verify,
            }
        };
        groups.insert(name.clone(), profile);
    }
    TlsSettings { default, groups }
}

/// A CA file's PEM, checked to hold certificates.
fn read_ca(key: &str, dir: &Path, file: &Path, problems: &mut Vec<String>) -> Option<String> {
    let path = dir.join(file);
    let pem = match std::fs::read_to_string(&path) {
        Ok(pem) => pem,
        Err(e) => {
            problems.push(format!("{key}: cannot read {}: {e}", path.display()));
            return None;
        }
    };
    match tls::count_pem_certificates(&pem) {
        Ok(_) => Some(pem),
        Err(e) => {
            problems.push(format!("{key}: {} {e}", path.display()));
            None
        }
    }
}

/// Campaign ids become parts of message ids and metric labels.
fn valid_name(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        id = "fw-7.2"
        [target]
        version = "7.2.1"
        image_url = "http://files.local/fw.bin"
        sha256 = "9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08"
        [timing]
        deadline = "10m"
        step_timeout = "20s"
        poll_interval = "2s"
    "#;

    #[test]
    fn a_good_campaign_parses_with_defaults_filled_in() {
        let campaign = Campaign::parse(GOOD).unwrap();
        assert_eq!(campaign.id, "fw-7.2");
        assert_eq!(campaign.policy.deadline, Duration::from_secs(600));
        assert_eq!(campaign.policy.retry, RetryPolicy::default());
        assert!(campaign.target.sha256.starts_with("9f86"));
    }

    /// `text` fails to parse, naming each of `expected`.
    fn names_every_problem(text: &str, expected: &[&str]) {
        let problems = Campaign::parse(text).unwrap_err();
        for expected in expected {
            assert!(
                problems.contains(expected),
                "{expected} missing from: {problems}"
            );
        }
    }

    #[test]
    fn every_problem_is_named() {
        let bad = GOOD
            .replace("fw-7.2", "fw 7.2")
            .replace("http://files", "ftp://files")
            .replace("9F86", "ZZ")
            .replace("2s", "1h");
        names_every_problem(
            &bad,
            &["id \"fw 7.2\"", "scheme \"ftp\"", "sha256", "poll_interval"],
        );
    }

    #[test]
    fn a_partial_section_keeps_the_other_defaults() {
        let campaign = Campaign::parse(&GOOD.replace("step_timeout = \"20s\"", "")).unwrap();
        assert_eq!(
            campaign.policy.step_timeout,
            JobPolicy::default().step_timeout
        );
    }

    #[test]
    fn rollout_sections_parse_and_name_their_problems() {
        let text = format!(
            "{GOOD}\n[waves]\nsizes = [5, \"10%\", \"100%\"]\nsuccess_gate = 0.9\napproval = true\n\
             [failure_budget]\nwave = {{ ratio = 0.2, min_finished = 3 }}\n\
             [rate]\nper_minute = 60\nramp = {{ factor = 2.0, every_successes = 10, max_per_minute = 240 }}\n\
             [concurrency]\nper_host = 4\n\
             [window]\ndays = [\"sat\"]\nstart = \"01:00\"\nend = \"02:00\"\ntime_zone = \"UTC\"\n"
        );
        let rollout = Campaign::parse(&text).unwrap().rollout;
        assert_eq!(rollout.waves.len(), 3);
        assert_eq!(rollout.success_gate, Some(0.9));
        assert!(rollout.approval);
        assert_eq!(rollout.wave_budget.unwrap().min_finished, 3);
        assert_eq!(rollout.rate.unwrap().per_minute_after(10), 120.0);
        assert_eq!(rollout.per_host, Some(4));
        assert!(rollout.window.is_some());

        let bad = format!(
            "{GOOD}\n[waves]\nsizes = [0, \"x\"]\nsuccess_gate = 1.5\n\
             [failure_budget]\ncampaign = {{ ratio = 2.0 }}\n[rate]\nper_minute = 0\n"
        );
        names_every_problem(
            &bad,
            &[
                "waves.sizes: 0 is not a positive count",
                "waves.sizes: \"x\" is neither",
                "waves.success_gate 1.5",
                "failure_budget.campaign.ratio 2",
                "rate.per_minute 0 must be above 0",
            ],
        );
    }

    #[test]
    fn the_adaptive_rate_takes_defaults_and_names_values_out_of_range() {
        let text = format!(
            "{GOOD}\n[rate]\nper_minute = 120\nadaptive = {{ p95_over = \"1s\", decrease = 0.25 }}\n"
        );
        let adaptive = Campaign::parse(&text).unwrap().rollout.adaptive.unwrap();
        assert_eq!(adaptive.window, Duration::from_secs(60));
        assert_eq!(adaptive.p95_over, Duration::from_secs(1));
        assert_eq!(adaptive.decrease, 0.25);
        assert_eq!(adaptive.increase, 12.0);
        assert_eq!(adaptive.error_ratio_over, 0.05);

        let bad = format!(
            "{GOOD}\n[rate]\nper_minute = 60\nadaptive = {{ window = \"10ms\", decrease = 1.5, \
             increase = 0, error_ratio_over = 1, min_per_minute = 100 }}\n"
        );
        names_every_problem(
            &bad,
            &[
                "rate.adaptive.window must be at least 1s",
                "rate.adaptive.decrease 1.5 must be above 0 and below 1",
                "rate.adaptive.increase 0 must be above 0",
                "rate.adaptive.error_ratio_over 1 must be at least 0 and below 1",
                "rate.adaptive.min_per_minute 100 must be above 0 and at most rate.per_minute",
            ],
        );
        let unknown =
            format!("{GOOD}\n[rate]\nper_minute = 60\nadaptive = {{ p99_over = \"1s\" }}\n");
        assert!(Campaign::parse(&unknown).unwrap_err().contains("p99_over"));
    }

    #[test]
    fn driver_sections_name_their_kind() {
        let problems =
            Campaign::parse(&format!("{GOOD}\n[drivers.toaster]\nheat = 3\n")).unwrap_err();
        assert!(
            problems.contains("[drivers.toaster]: unknown device kind"),
            "{problems}"
        );
        let problems = Campaign::parse(&format!(
            "{GOOD}\n[drivers.netprofiler]\nbackup_first = true\nbackup = {{ host = \"bk\" }}\n"
        ))
        .unwrap_err();
        assert!(
            problems.contains("[drivers.netprofiler]: backup.username is required"),
            "{problems}"
        );
        let campaign =
            Campaign::parse(&format!("{GOOD}\n[drivers.npm]\ndelete_image = true\n")).unwrap();
        assert_eq!(
            campaign.settings_for(DeviceKind::Npm),
            serde_json::json!({"delete_image": true})
        );
        let problems = Campaign::parse(&format!("{GOOD}\n[drivers.dms]\nspeed = 3\n")).unwrap_err();
        assert!(
            problems.contains("[drivers.dms] takes no settings"),
            "{problems}"
        );
    }

    #[test]
    fn tls_reads_ca_files_relative_to_the_campaign_and_groups_override() {
        let dir = std::env::temp_dir().join(format!("flotilla-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A syntactically valid certificate: PEM framing around DER bytes is
        // all the producer checks.
        let pem = "-----BEGIN CERTIFICATE-----\nMAMCAQA=\n-----END CERTIFICATE-----\n";
        std::fs::write(dir.join("ca.pem"), pem).unwrap();
        std::fs::write(dir.join("junk.pem"), "not a certificate").unwrap();
        let text = format!(
            "{GOOD}\n[tls]\nca_file = \"ca.pem\"\n[tls.groups.lab]\nverify = false\n[tls.groups.dc]\n"
        );
        let campaign = Campaign::parse_in(&text, &dir).unwrap();
        assert_eq!(campaign.tls.default.ca_pem.as_deref(), Some(pem));
        assert!(!campaign.tls.profile_for(Some("lab")).verify);
        assert_eq!(campaign.tls.profile_for(Some("lab")).ca_pem, None);
        assert_eq!(campaign.tls.profile_for(Some("dc")), &campaign.tls.default);
        assert_eq!(
            campaign.tls.profile_for(Some("other")),
            &campaign.tls.default
        );

        let problems = Campaign::parse_in(
            &format!(
                "{GOOD}\n[tls]\nca_file = \"junk.pem\"\n[tls.groups.x]\nca_file = \"gone.pem\"\n"
            ),
            &dir,
        )
        .unwrap_err();
        assert!(problems.contains("tls.ca_file:"), "{problems}");
        assert!(problems.contains("no PEM certificate"), "{problems}");
        assert!(
            problems.contains("tls.groups.x.ca_file: cannot read"),
            "{problems}"
        );
        let problems =
            Campaign::parse_in(&format!("{GOOD}\n[tls]\nverify = false\n"), &dir).unwrap_err();
        assert!(problems.contains("verify"), "{problems}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_example_campaigns_are_valid() {
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        for name in [
            "campaign.toml",
            "riverbed-campaign.toml",
            "sps-campaign.toml",
            "cpe-night-campaign.toml",
        ] {
            let campaign = Campaign::load(&examples.join(name)).unwrap();
            assert!(!campaign.id.is_empty());
        }
        let riverbed = Campaign::load(&examples.join("riverbed-campaign.toml")).unwrap();
        assert!(!riverbed.tls.profile_for(Some("lab")).verify);
        assert_eq!(
            riverbed.settings_for(DeviceKind::Netprofiler)["backup"]["host"],
            "backup.example.net"
        );
    }

    #[test]
    fn unknown_keys_are_errors_with_their_location() {
        let problems = Campaign::parse(&format!("{GOOD}\n[retry]\nmax_atempts = 3\n")).unwrap_err();
        assert!(problems.contains("max_atempts"), "{problems}");
        assert!(problems.contains("line"), "{problems}");
    }
}
