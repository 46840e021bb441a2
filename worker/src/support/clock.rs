//! The job's publication on a device's own clock: the one reading of a
//! clock left in the drivers, and only where nothing was observed before
//! (the step that records a job's baseline, [`crate::support::baseline`]).
//! A copy of that step redelivered after the job acted tells the job's own
//! records (stamped at or after the publication) from older ones by it.
//! Every later step judges by the baseline instead.
//!
//! The job carries when it was published (`published_at`, the worker
//! fleet's clock); an answer carries the device's clock (its `Date`
//! header) and when it arrived (the worker's). Their difference is the
//! device's offset, at most a second or so low (the header counts whole
//! seconds, and the answer took a moment to arrive), so the publication
//! read on the device's clock is never late: every record of this job is
//! stamped at it or after. A device ten minutes fast or slow, a retry
//! campaign started seconds after a reset: neither moves it. It does rest
//! on the producer's and the worker's clocks agreeing, and on the device's
//! clock not stepping between its records and its answer.
//!
//! A device without a `Date` header (RFC 9110 requires one of every server
//! with a clock) gives no reading: [`published_on_device`] is `None`, and
//! the baseline counts every record as older than the job, never guessing
//! from the worker's clock. What that leaves open: a copy of a job's first
//! step redelivered after the job acted takes the job's own records for
//! older ones and may act again (each driver's module says what).

use crate::device_http::Reply;
use flotilla_common::Job;

/// Device epoch seconds at (or a moment before) the job's publication,
/// on the clock of the device that gave `reply`: device records stamped
/// earlier are not this job's. `None` when the answer has no `Date`
/// header: the device's clock cannot be read.
pub(crate) fn published_on_device(job: &Job, reply: &Reply) -> Option<i64> {
    let date = reply.device_date()?;
    let published = job
        .published_at
        .or(job.started_at)
        .unwrap_or(reply.received_at)
        .timestamp_millis();
    let offset = date.timestamp() * 1000 - reply.received_at.timestamp_millis();
    Some((published + offset).div_euclid(1000))
}

/// Whether a device record stamped `at` (device epoch seconds) predates
/// the job, as far as `published` (from [`published_on_device`]) tells:
/// without a reading, or without a stamp, it is taken to.
pub(crate) fn before_job(at: Option<i64>, published: Option<i64>) -> bool {
    match (at, published) {
        (Some(at), Some(published)) => at < published,
        _ => true,
    }
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
            let on_device =
                published_on_device(&job(published), &reply_at(device_now, received)).unwrap();
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

    #[test]
    fn without_a_date_header_nothing_is_read_and_every_record_predates_the_job() {
        let published = Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0).unwrap();
        let mut reply = reply_at(published, published);
        reply.headers.clear();
        assert_eq!(published_on_device(&job(published), &reply), None);
        assert!(before_job(Some(i64::MAX), None));
        assert!(before_job(None, Some(0)));
        assert!(before_job(Some(99), Some(100)));
        assert!(!before_job(Some(100), Some(100)));
    }
}
