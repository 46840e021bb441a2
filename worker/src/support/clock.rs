//! The job's clock on the device: when the job began, read on the
//! device's own clock, so that a driver tells the device's records of this
//! job (a result, a backup, a fetch, a state change) from older ones
//! without ever assuming that the device's clock agrees with the
//! worker's.
//!
//! The job carries when it was published (`published_at`, the worker
//! fleet's clock); an answer carries the device's clock (its `Date`
//! header) and when it arrived (the worker's). Their difference is the
//! device's offset, at most a second or so low (the header counts whole
//! seconds, and the answer took a moment to arrive), so the publication
//! read on the device's clock is never late: every record of this job is
//! stamped at it or after. A device ten minutes fast or slow, a first
//! step redelivered minutes late, a retry campaign started seconds after
//! a reset: none moves it.

use crate::device_http::Reply;
use flotilla_common::Job;

/// Device epoch seconds at (or a moment before) the job's publication,
/// on the clock of the device that gave `reply`: device records stamped
/// earlier are not this job's. Without a `Date` header (which RFC 9110
/// requires of every server with a clock), the device is taken to keep
/// the worker's time.
pub(crate) fn published_on_device(job: &Job, reply: &Reply) -> i64 {
    let published = job
        .published_at
        .or(job.started_at)
        .unwrap_or(reply.received_at)
        .timestamp_millis();
    let offset = reply.device_date().map_or(0, |date| {
        date.timestamp() * 1000 - reply.received_at.timestamp_millis()
    });
    (published + offset).div_euclid(1000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Duration, TimeZone, Utc};
    use reqwest::{StatusCode, header::HeaderMap};

    fn reply_at(device: chrono::DateTime<Utc>, received: chrono::DateTime<Utc>) -> Reply {
        let mut headers = HeaderMap::new();
        let date = device.format("%a, %d %b %Y %H:%M:%S GMT").to_string();
        headers.insert(reqwest::header::DATE, date.parse().unwrap());
        Reply {
            what: "GET /".into(),
            status: StatusCode::OK,
            headers,
            body: Vec::new(),
            received_at: received,
        }
    }

    fn job(published: chrono::DateTime<Utc>) -> Job {
        let mut job = Job::new(
            "c",
            flotilla_common::Device {
                id: "d".into(),
                kind: flotilla_common::DeviceKind::Npm,
                address: "http://127.0.0.1:1".parse().unwrap(),
                credentials: "sim".into(),
                cpe_id: None,
                group: None,
                gateways: Vec::new(),
            },
            flotilla_common::Target {
                version: "1".into(),
                image_url: "http://files/x".parse().unwrap(),
                sha256: "ab".into(),
            },
            flotilla_common::JobPolicy::default(),
        );
        job.published_at = Some(published);
        job
    }

    #[test]
    fn the_publication_is_read_on_the_devices_clock_whatever_its_offset() {
        let published =
            Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0).unwrap() + Duration::milliseconds(400);
        // Answered two minutes after publication (a late redelivery), by
        // devices ten minutes fast, on time, and ten minutes slow.
        let received = published + Duration::seconds(120) + Duration::milliseconds(250);
        for skew in [600, 0, -600] {
            let device_now = received + Duration::seconds(skew) - Duration::milliseconds(30);
            let on_device = published_on_device(&job(published), &reply_at(device_now, received));
            let truth = (published + Duration::seconds(skew)).timestamp();
            // Never after the truth (no record of the job is missed), and
            // at most a couple of seconds before it.
            assert!(on_device <= truth, "skew {skew}: {on_device} > {truth}");
            assert!(
                truth - on_device <= 2,
                "skew {skew}: {on_device} vs {truth}"
            );
        }
    }
}
