//! What the Riverbed drivers (NetProfiler, Flow Gateway, NPM) share:
//! their logins ([`auth`]), the Flow Gateway backup API that the Flow
//! Gateway and NetProfiler drivers both drive ([`backup`]), and the error
//! body of every Riverbed API.

pub(crate) mod auth;
pub(crate) mod backup;

use crate::{device_http::Reply, driver::StepError};
use serde::Deserialize;

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
    reply.success_in_words(|body| {
        let body: ErrorBody = serde_json::from_slice(body).ok()?;
        Some(format!("{}: {}", body.error_id, body.error_text))
    })
}
