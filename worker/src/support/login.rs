//! Calls under a login that issues something to carry: a bearer token
//! (Riverbed OAuth, NPM `mgmt.aaa`), a session cookie (SPS).
//!
//! What is issued is cached per device and credentials reference in a
//! [`Logins`] that a driver keeps for the worker's lifetime, renewed
//! shortly before the lifetime the device stated runs out, and never leaves
//! the worker. A call refused with 401 while holding a cached one logs in
//! again and is sent once more: the device may have restarted and
//! forgotten it, or ended it after some inactivity. A refused login is the
//! scheme's to report (a terminal `auth` failure); a fresh one refused
//! right after the device issued it is transient (the device is going down
//! or coming up).

use crate::{
    credentials::Secret,
    device_http::{Call, DeviceClient, Reply},
    driver::StepError,
};
use reqwest::StatusCode;
use std::{
    collections::HashMap,
    future::Future,
    sync::Mutex,
    time::{Duration, Instant},
};

/// Renew this long before what was issued expires (at most a tenth of its
/// lifetime), so a call never starts with one about to lapse.
const RENEW_MARGIN: Duration = Duration::from_secs(30);
/// Above this many cached logins, those expired or unused for
/// [`FORGET_AFTER`] are dropped on insert.
const PRUNE_ABOVE: usize = 1024;
const FORGET_AFTER: Duration = Duration::from_secs(3600);

/// What a login gave.
pub(crate) struct Issued {
    pub(crate) secret: Secret,
    /// How long it lasts, when the device says; `None`: until refused.
    pub(crate) lifetime: Option<Duration>,
}

/// One way of logging in to a device and carrying what it issues.
pub(crate) trait Scheme: Sync {
    /// The credentials reference (with the fields used), for messages and
    /// the cache key; never a secret.
    fn reference(&self) -> &str;

    /// What the device issues, for messages ("token", "session").
    fn issues(&self) -> &'static str;

    /// Logs in. A refused login is an `auth` failure.
    fn log_in(
        &self,
        http: &DeviceClient<'_>,
    ) -> impl Future<Output = Result<Issued, StepError>> + Send;

    /// The call, carrying what was issued.
    fn carry<'c>(&self, call: Call<'c>, issued: &Secret) -> Call<'c>;
}

/// What was issued, by device and credentials reference.
#[derive(Default)]
pub(crate) struct Logins {
    cache: Mutex<HashMap<String, Cached>>,
}

struct Cached {
    secret: Secret,
    renew_at: Option<Instant>,
    used: Instant,
}

impl Cached {
    fn usable(&self, now: Instant) -> bool {
        self.renew_at.is_none_or(|at| now < at)
    }
}

impl Logins {
    /// Sends the call `build` makes under `scheme`'s login, and returns any
    /// answer but a 401: on a cached login, a 401 logs in again and sends
    /// once more.
    pub(crate) async fn send<'a, S: Scheme>(
        &self,
        http: &DeviceClient<'a>,
        scheme: &S,
        build: impl Fn() -> Result<Call<'a>, StepError>,
    ) -> Result<Reply, StepError> {
        let key = format!("{} {}", http.base(), scheme.reference());
        let (secret, fresh) = match self.cached(&key) {
            Some(secret) => (secret, false),
            None => (self.log_in(http, scheme, &key).await?, true),
        };
        let reply = scheme.carry(build()?, &secret).send().await?;
        if reply.status != StatusCode::UNAUTHORIZED {
            self.touch(&key);
            return Ok(reply);
        }
        self.forget(&key);
        if !fresh {
            let secret = self.log_in(http, scheme, &key).await?;
            let reply = scheme.carry(build()?, &secret).send().await?;
            if reply.status != StatusCode::UNAUTHORIZED {
                self.touch(&key);
                return Ok(reply);
            }
            self.forget(&key);
        }
        // The login itself was accepted, so the credentials are good: a
        // device refusing what it has just issued is going down or coming
        // up, which passes.
        Err(StepError::transient(format!(
            "{} refused a {} the appliance had just issued (restarting?)",
            reply.what,
            scheme.issues()
        )))
    }

    async fn log_in<S: Scheme>(
        &self,
        http: &DeviceClient<'_>,
        scheme: &S,
        key: &str,
    ) -> Result<Secret, StepError> {
        let issued = scheme.log_in(http).await?;
        let now = Instant::now();
        let renew_at = issued
            .lifetime
            .map(|lifetime| now + lifetime.saturating_sub(RENEW_MARGIN.min(lifetime / 10)));
        let mut cache = self.lock();
        if cache.len() > PRUNE_ABOVE {
            cache.retain(|_, cached| cached.usable(now) && cached.used.elapsed() < FORGET_AFTER);
        }
        cache.insert(
            key.to_owned(),
            Cached {
                secret: issued.secret.clone(),
                renew_at,
                used: now,
            },
        );
        Ok(issued.secret)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Cached>> {
        self.cache
            .lock()
            .expect("the login cache lock is never poisoned: nothing panics while holding it")
    }

    fn cached(&self, key: &str) -> Option<Secret> {
        let cache = self.lock();
        let cached = cache.get(key)?;
        cached.usable(Instant::now()).then(|| cached.secret.clone())
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
