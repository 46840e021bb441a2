//! The job's clock: when the job's own work on a device can have begun,
//! for telling the device's records of this job from older ones.

use flotilla_common::Job;

/// How many seconds a device's clock may be behind a worker's before a
/// record it reports as started "before this job" is in fact this job's.
const CLOCK_SKEW_SECONDS: i64 = 30;

/// The job's first step as epoch seconds, less the clock skew margin:
/// device records started earlier belong to someone else.
pub(crate) fn since(job: &Job) -> i64 {
    job.started_at
        .map(|t| t.timestamp() - CLOCK_SKEW_SECONDS)
        .unwrap_or(i64::MIN)
}
