//! The job envelope: one device's upgrade as it travels between workers.
//!
//! A job is self-contained (workers keep no state between steps), versioned
//! (a worker dead-letters a version it does not know rather than guessing) and
//! free of secrets (it names a credentials *reference*). Trace context and
//! delivery metadata ride in AMQP headers, not here.

use crate::{DeviceKind, Ending, tls::TlsProfile};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::time::Duration;
use url::Url;

/// The envelope version this build writes and reads.
pub const JOB_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// Envelope version, checked before anything else is trusted.
    pub v: u32,
    pub campaign: String,
    pub device: Device,
    pub target: Target,
    pub policy: JobPolicy,
    /// The campaign's `[drivers.<kind>]` settings for this device's kind
    /// (see [`crate::settings`]).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub settings: serde_json::Value,
    /// How the worker checks this device's HTTPS certificate (the
    /// campaign's choice for the device's group).
    #[serde(default, skip_serializing_if = "TlsProfile::is_default")]
    pub tls: TlsProfile,
    /// The driver's next step, opaque to the pipeline; `null` asks for the
    /// driver's first step.
    #[serde(default)]
    pub step: serde_json::Value,
    /// Tries of the current step so far; transient failures retry it with
    /// backoff until `policy.retry.max_attempts`.
    #[serde(default)]
    pub attempt: u32,
    /// Steps executed so far. Orders one device's events, and lets a reader
    /// recognise the same step reported twice after a redelivery.
    #[serde(default)]
    pub seq: u32,
    /// When the producer published the job (the worker fleet's clock).
    /// Nothing of this job can have happened on a device before it:
    /// drivers tell the device's records of this job from older ones by
    /// it, read on the device's own clock. `None` in messages from before
    /// the field existed; the first step's time stands in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published_at: Option<DateTime<Utc>>,
    /// When the first step ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    /// Past this instant the job stops upgrading, runs its driver's cleanup
    /// and ends `timed_out`. Set when the first step runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<DateTime<Utc>>,
    /// Since when the job has been parked (its campaign paused), if it is:
    /// time parked does not count against its deadline, which moves on by
    /// as much when the job runs again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parked_at: Option<DateTime<Utc>>,
    /// The decided outcome, once there is one: the job is then running its
    /// driver's cleanup and ends with this, whatever the cleanup meets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ending: Option<Ending>,
}

impl Job {
    /// A job as the producer publishes it: nothing run yet, stamped now.
    pub fn new(
        campaign: impl Into<String>,
        device: Device,
        target: Target,
        policy: JobPolicy,
    ) -> Self {
        Job {
            v: JOB_VERSION,
            campaign: campaign.into(),
            device,
            target,
            policy,
            settings: serde_json::Value::Null,
            tls: TlsProfile::default(),
            step: serde_json::Value::Null,
            attempt: 0,
            seq: 0,
            published_at: Some(Utc::now()),
            started_at: None,
            deadline: None,
            parked_at: None,
            ending: None,
        }
    }
}

impl Job {
    /// Marks the job parked from `now` (kept from its first parking).
    pub fn park(&mut self, now: DateTime<Utc>) {
        self.parked_at.get_or_insert(now);
    }

    /// Ends a parking at `now`: the deadline moves on by the time parked.
    pub fn unpark(&mut self, now: DateTime<Utc>) {
        if let Some(parked_at) = self.parked_at.take()
            && let Some(deadline) = &mut self.deadline
            && now > parked_at
        {
            *deadline += now - parked_at;
        }
    }
}

/// One inventory row: which device, how to reach it, which secret to use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    /// Unique within a campaign; the key of every event and report row.
    pub id: String,
    pub kind: DeviceKind,
    /// The base URL of the device's API, possibly with a path prefix
    /// (`http://127.0.0.1:9000/d/cpe-17`); drivers join API paths onto it.
    /// For a TR-069 CPE this is its DMS.
    pub address: Url,
    /// Names the secret workers resolve from their own environment.
    pub credentials: String,
    /// The CPE's identifier at its DMS (only `dms` devices have one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpe_id: Option<String>,
    /// A device group from the inventory; campaign settings such as TLS
    /// verification can differ per group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// For a NetProfiler: the API base URLs of the Flow Gateways it updates
    /// whose backups a campaign can require first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<Url>,
}

impl Device {
    /// The device's API URL for `path` (which may carry a query string),
    /// keeping the address's own path prefix.
    ///
    /// `Url::join` would drop that prefix for an absolute path, and API paths
    /// such as the DMS's `/v1/dyn/FirmwareStorage/.*` must reach the device
    /// byte for byte.
    pub fn url(&self, path: &str) -> Url {
        join_api_path(&self.address, path)
    }
}

/// A server as the concurrency caps and the adaptive rate name it:
/// `host:port`, the scheme's port when the URL has none.
pub fn host_key(url: &Url) -> String {
    match (url.host_str(), url.port_or_known_default()) {
        (Some(host), Some(port)) => format!("{host}:{port}"),
        (Some(host), None) => host.to_owned(),
        _ => url.as_str().to_owned(),
    }
}

/// Joins an API path (with an optional `?query`) onto a base URL that may have
/// a path prefix of its own.
pub fn join_api_path(base: &Url, path: &str) -> Url {
    let (path, query) = match path.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (path, None),
    };
    let mut url = base.clone();
    let prefix = base.path().trim_end_matches('/');
    url.set_path(&format!("{prefix}/{}", path.trim_start_matches('/')));
    url.set_query(query);
    url
}

/// Whether `reference` can name credentials: letters, digits, `-`, `_` and
/// `.`, not starting with `.`. References become file names on workers, so
/// they must not climb out of a directory; and anything else is more likely
/// a pasted secret than a name.
pub fn is_valid_credentials_reference(reference: &str) -> bool {
    !reference.is_empty()
        && reference.len() <= 128
        && !reference.starts_with('.')
        && reference
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// The firmware every device of the campaign moves to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub version: String,
    /// Where devices (or the worker, for uploads) get the image. A `file:`
    /// URL names an image the worker uploads itself.
    pub image_url: Url,
    /// Lowercase hex SHA-256 of the image.
    pub sha256: String,
}

/// How long and how hard to try, from the campaign file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobPolicy {
    /// Time a device has from its first step to a terminal state.
    #[serde(with = "humantime_serde")]
    pub deadline: Duration,
    /// Longest a single step (its HTTP calls included) may run.
    #[serde(with = "humantime_serde")]
    pub step_timeout: Duration,
    /// Delay between two polls of a device that is busy.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    pub retry: RetryPolicy,
}

impl Default for JobPolicy {
    fn default() -> Self {
        JobPolicy {
            deadline: Duration::from_secs(60 * 60),
            step_timeout: Duration::from_secs(60),
            poll_interval: Duration::from_secs(10),
            retry: RetryPolicy::default(),
        }
    }
}

/// Retries of one step after transient errors (timeouts, refused
/// connections, 5xx), with exponential backoff and jitter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Tries of one step, the first included.
    pub max_attempts: u32,
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 6,
            initial_backoff: Duration::from_secs(2),
            max_backoff: Duration::from_secs(120),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(address: &str) -> Device {
        Device {
            id: "cpe-17".into(),
            kind: DeviceKind::Dms,
            address: address.parse().unwrap(),
            credentials: "dms-east".into(),
            cpe_id: Some("00D09E-CPE-17".into()),
            group: None,
            gateways: Vec::new(),
        }
    }

    #[test]
    fn api_paths_keep_the_address_prefix_and_regex_segments() {
        let with_prefix = device("http://127.0.0.1:9000/d/dms-1/");
        assert_eq!(
            with_prefix
                .url("/v1/dyn/FirmwareResultStorage/.*?id=UPGRADE_X")
                .as_str(),
            "http://127.0.0.1:9000/d/dms-1/v1/dyn/FirmwareResultStorage/.*?id=UPGRADE_X"
        );
        let bare = device("https://10.1.2.3");
        assert_eq!(
            bare.url("/api/npm.system_update/2.0/update").as_str(),
            "https://10.1.2.3/api/npm.system_update/2.0/update"
        );
    }

    #[test]
    fn envelope_round_trips_and_carries_no_secret_fields() {
        let job = Job::new(
            "fw-7.2",
            device("http://127.0.0.1:9000"),
            Target {
                version: "7.2.1".into(),
                image_url: "http://files.local/fw.bin".parse().unwrap(),
                sha256: "ab".repeat(32),
            },
            JobPolicy::default(),
        );
        let json = serde_json::to_value(&job).unwrap();
        assert_eq!(json["v"], 1);
        assert_eq!(json["policy"]["deadline"], "1h");
        assert_eq!(json["device"]["credentials"], "dms-east");
        assert!(json["published_at"].is_string());
        let back: Job = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(back, job);

        // A message from before the stamp existed still decodes.
        let mut old = json;
        old.as_object_mut().unwrap().remove("published_at");
        let back: Job = serde_json::from_value(old).unwrap();
        assert_eq!(back.published_at, None);
    }

    #[test]
    fn time_parked_moves_the_deadline_on() {
        let mut job = Job::new(
            "c",
            device("http://127.0.0.1:9000"),
            Target {
                version: "1".into(),
                image_url: "http://files.local/fw.bin".parse().unwrap(),
                sha256: "ab".repeat(32),
            },
            JobPolicy::default(),
        );
        let start = Utc::now();
        job.deadline = Some(start + chrono::Duration::minutes(10));
        job.park(start);
        job.park(start + chrono::Duration::minutes(3));
        job.unpark(start + chrono::Duration::minutes(30));
        assert_eq!(job.deadline, Some(start + chrono::Duration::minutes(40)));
        assert_eq!(job.parked_at, None);
    }
}
