//! SPS REST sessions: `GET /api/authentication` with HTTP Basic answers a
//! `session_id` cookie, which every later call carries.
//!
//! Sessions are cached per appliance and credentials reference by
//! [`Logins`](crate::support::login::Logins), never written into a job,
//! an event or a log. An appliance ends a session after some inactivity,
//! and ends all of them when it restarts, so a call refused with 401 on a
//! cached session logs in again and is sent once more. A refused login is
//! a terminal `auth` failure; a session refused right after the appliance
//! opened it is transient (the appliance is restarting).

use crate::{
    credentials::{Credentials, Secret},
    device_http::{Call, DeviceClient, Reply},
    driver::StepError,
    support::login::{Issued, Scheme},
};
use reqwest::header::SET_COOKIE;

const AUTHENTICATION: &str = "/api/authentication";
const COOKIE: &str = "session_id";

/// The HTTP Basic login of one credentials reference.
pub(super) struct Login {
    user: Secret,
    password: Secret,
    /// For messages and the cache key; never a secret.
    reference: String,
}

impl Login {
    pub(super) fn new(credentials: &Credentials) -> Result<Login, StepError> {
        Ok(Login {
            user: credentials.require("username")?.clone(),
            password: credentials.require("password")?.clone(),
            reference: credentials.reference().to_owned(),
        })
    }
}

impl Scheme for Login {
    fn reference(&self) -> &str {
        &self.reference
    }

    fn issues(&self) -> &'static str {
        "session"
    }

    async fn log_in(&self, http: &DeviceClient<'_>) -> Result<Issued, StepError> {
        let reply = http
            .get(AUTHENTICATION)
            .basic(&self.user, &self.password)
            .send()
            .await?;
        if matches!(reply.status.as_u16(), 401 | 403) {
            return Err(StepError::auth(format!(
                "{} refused the credentials {:?} with HTTP {}: check them",
                reply.what,
                self.reference,
                reply.status.as_u16()
            )));
        }
        let reply = reply.success()?;
        let secret = session_cookie(&reply).ok_or_else(|| {
            StepError::garbage(format!(
                "{} answered HTTP {} without a {COOKIE} cookie",
                reply.what,
                reply.status.as_u16()
            ))
        })?;
        // A session lasts until the appliance ends it.
        Ok(Issued {
            secret,
            lifetime: None,
        })
    }

    fn carry<'c>(&self, call: Call<'c>, issued: &Secret) -> Call<'c> {
        call.header("cookie", &format!("{COOKIE}={}", issued.expose()))
    }
}

/// The `session_id` of the answer's `Set-Cookie` headers, without its
/// attributes (`; Path=/; Secure; HttpOnly`).
fn session_cookie(reply: &Reply) -> Option<Secret> {
    reply
        .headers
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .find_map(|cookie| {
            let pair = cookie.split(';').next()?;
            let (name, value) = pair.split_once('=')?;
            let value = value.trim().trim_matches('"');
            (name.trim() == COOKIE && !value.is_empty()).then(|| Secret::new(value))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::{
        StatusCode,
        header::{HeaderMap, HeaderValue},
    };

    #[test]
    fn the_session_cookie_is_found_among_others_without_its_attributes() {
        let mut headers = HeaderMap::new();
        headers.append(SET_COOKIE, HeaderValue::from_static("lang=en; Path=/"));
        headers.append(
            SET_COOKIE,
            HeaderValue::from_static("session_id=\"a1f71d03\"; Path=/api; Secure; HttpOnly"),
        );
        let reply = Reply {
            what: "GET /api/authentication".into(),
            status: StatusCode::OK,
            headers,
            body: Vec::new(),
            received_at: chrono::Utc::now(),
        };
        assert_eq!(session_cookie(&reply).unwrap().expose(), "a1f71d03");
        let none = Reply {
            headers: HeaderMap::new(),
            ..reply
        };
        assert!(session_cookie(&none).is_none());
    }
}
