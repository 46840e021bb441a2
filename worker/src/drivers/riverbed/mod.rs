//! What the Riverbed drivers (NetProfiler, Flow Gateway, NPM) share:
//! authentication ([`auth`]), lenient reading of the appliances' JSON
//! ([`lenient`]), and their common error body.

pub(crate) mod auth;
pub(crate) mod lenient;

use super::StepError;
use crate::device_http::Reply;
use serde::Deserialize;

/// How many seconds a device's clock may be behind a worker's before a
/// backup or an update it reports started "before this job" is in fact this
/// job's.
pub(crate) const CLOCK_SKEW_SECONDS: i64 = 30;

/// The error body of every Riverbed API:
/// `{"error_id": "BAD_REQUEST", "error_text": "...", "error_info": ...}`.
#[derive(Debug, Deserialize)]
struct ErrorBody {
    error_id: String,
    #[serde(default)]
    error_text: String,
}

/// Fails unless the reply is a 2xx: a 401/403 as an auth failure, another
/// status as the device's refusal in its own words (`error_id` and
/// `error_text` when the body has them).
pub(crate) fn success(reply: Reply) -> Result<Reply, StepError> {
    if reply.status.is_success() || matches!(reply.status.as_u16(), 401 | 403) {
        return reply.success();
    }
    match serde_json::from_slice::<ErrorBody>(&reply.body) {
        Ok(body) => Err(StepError::device(format!(
            "{} answered HTTP {} {}: {}",
            reply.what,
            reply.status.as_u16(),
            body.error_id,
            body.error_text
        ))),
        Err(_) => reply.success(),
    }
}

/// The job's first step as epoch seconds, less the clock skew margin:
/// device records started earlier belong to someone else.
pub(crate) fn since(job: &flotilla_common::Job) -> i64 {
    job.started_at
        .map(|t| t.timestamp() - CLOCK_SKEW_SECONDS)
        .unwrap_or(i64::MIN)
}
