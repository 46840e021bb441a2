//! SPS REST sessions: `GET /api/authentication` with HTTP Basic answers a
//! `session_id` cookie, which every later call carries.
//!
//! Sessions are cached per appliance and credentials reference within a
//! worker, never written into a job, an event or a log. An appliance ends a
//! session after some inactivity, and ends all of them when it restarts,
//! so a call refused with 401 on a cached session logs in again and is sent
//! once more. A refused login is a terminal `auth` failure; a session
//! refused right after the appliance opened it is transient (the appliance
//! is restarting).

use crate::{
    credentials::{Credentials, Secret},
    device_http::{Call, DeviceClient, Reply},
    drivers::StepError,
};
use reqwest::{StatusCode, header::SET_COOKIE};
use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

const AUTHENTICATION: &str = "/api/authentication";
const COOKIE: &str = "session_id";
/// Above this many cached sessions, those unused for [`FORGET_AFTER`] are
/// dropped on insert: appliances ended them long ago.
const PRUNE_ABOVE: usize = 1024;
const FORGET_AFTER: Duration = Duration::from_secs(3600);

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

/// Open sessions by appliance and credentials reference.
#[derive(Default)]
pub(super) struct Sessions {
    cache: Mutex<HashMap<String, Cached>>,
}

struct Cached {
    id: Secret,
    used: Instant,
}

impl Sessions {
    /// Sends the call `build` makes within a session, and returns any
    /// answer but a 401: on a cached session, a 401 logs in again and sends
    /// once more.
    pub(super) async fn send<'a>(
        &self,
        http: &DeviceClient<'a>,
        login: &Login,
        build: impl Fn() -> Result<Call<'a>, StepError>,
    ) -> Result<Reply, StepError> {
        let key = format!("{} {}", http.base(), login.reference);
        let (session, fresh) = match self.cached(&key) {
            Some(session) => (session, false),
            None => (self.open(http, login, &key).await?, true),
        };
        let reply = with_session(build()?, &session).send().await?;
        if reply.status != StatusCode::UNAUTHORIZED {
            self.touch(&key);
            return Ok(reply);
        }
        self.forget(&key);
        if !fresh {
            // The session ended: inactivity, or the appliance restarted.
            let session = self.open(http, login, &key).await?;
            let reply = with_session(build()?, &session).send().await?;
            if reply.status != StatusCode::UNAUTHORIZED {
                self.touch(&key);
                return Ok(reply);
            }
            self.forget(&key);
        }
        // The login itself was accepted, so the credentials are good: an
        // appliance refusing the session it has just opened is going down
        // or coming up, which passes.
        Err(StepError::transient(format!(
            "{} refused a session the appliance had just opened (restarting?)",
            reply.what
        )))
    }

    /// Logs in and caches the new session.
    async fn open(
        &self,
        http: &DeviceClient<'_>,
        login: &Login,
        key: &str,
    ) -> Result<Secret, StepError> {
        let reply = http
            .get(AUTHENTICATION)
            .basic(&login.user, &login.password)
            .send()
            .await?;
        if matches!(reply.status.as_u16(), 401 | 403) {
            return Err(StepError::auth(format!(
                "{} refused the credentials {:?} with HTTP {}: check them",
                reply.what,
                login.reference,
                reply.status.as_u16()
            )));
        }
        let reply = reply.success()?;
        let id = session_cookie(&reply).ok_or_else(|| {
            StepError::garbage(format!(
                "{} answered HTTP {} without a {COOKIE} cookie",
                reply.what,
                reply.status.as_u16()
            ))
        })?;
        let mut cache = self.lock();
        if cache.len() > PRUNE_ABOVE {
            cache.retain(|_, cached| cached.used.elapsed() < FORGET_AFTER);
        }
        cache.insert(
            key.to_owned(),
            Cached {
                id: id.clone(),
                used: Instant::now(),
            },
        );
        Ok(id)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Cached>> {
        self.cache
            .lock()
            .expect("the session cache lock is never poisoned: nothing panics while holding it")
    }

    fn cached(&self, key: &str) -> Option<Secret> {
        self.lock().get(key).map(|cached| cached.id.clone())
    }

    fn touch(&self, key: &str) {
        if let Some(cached) = self.lock().get_mut(key) {
            cached.used = Instant::now();
        }
    }

    fn forget(&self, key: &str) {
        self.lock().remove(key);
    }
}

fn with_session<'a>(call: Call<'a>, session: &Secret) -> Call<'a> {
    call.header("cookie", &format!("{COOKIE}={}", session.expose()))
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
    use reqwest::header::{HeaderMap, HeaderValue};

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
        };
        assert_eq!(session_cookie(&reply).unwrap().expose(), "a1f71d03");
        let none = Reply {
            headers: HeaderMap::new(),
            ..reply
        };
        assert!(session_cookie(&none).is_none());
    }
}
