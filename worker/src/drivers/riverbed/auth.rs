//! Riverbed authentication, as the appliances do it.
//!
//! - Common API 1.0 (NetProfiler, Flow Gateway): HTTP Basic with the
//!   reference's `username` and `password`; or, when the reference has an
//!   `access_code`, OAuth 2: the code is exchanged at
//!   `POST /api/common/1.0/oauth/token` (`grant_type=access_code`,
//!   `assertion=<code>`) for a bearer token.
//! - NPM (`mgmt.aaa` 1.0): `POST /api/mgmt.aaa/1.0/token` with the user's
//!   credentials gives a short-lived bearer token.
//!
//! Tokens are cached per device and credentials reference in a [`Tokens`]
//! that a driver keeps for the worker's lifetime; they are fetched anew
//! shortly before they expire and never leave the worker. A call refused
//! with 401 while holding a token is retried once with a fresh token (the
//! appliance may have restarted and forgotten it). A refused login (Basic
//! credentials, an access code, the NPM user) is a terminal `auth` failure,
//! never an endless retry; a fresh token refused right after a successful
//! login is transient (the appliance is restarting).

use crate::{
    credentials::{Credentials, Secret},
    device_http::{Call, DeviceClient, Reply},
    drivers::StepError,
};
use reqwest::StatusCode;
use serde::Deserialize;
use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

const OAUTH_TOKEN: &str = "/api/common/1.0/oauth/token";
const NPM_TOKEN: &str = "/api/mgmt.aaa/1.0/token";

/// Assumed lifetime of a token whose answer gives none; a 401 before then
/// still fetches a new one.
const UNSTATED_LIFETIME: Duration = Duration::from_secs(300);
/// Renew a token this long before it expires (at most a tenth of its
/// lifetime), so a call never starts with one about to lapse.
const RENEW_MARGIN: Duration = Duration::from_secs(30);
/// Above this many cached tokens, expired ones are dropped on insert.
const PRUNE_ABOVE: usize = 1024;

/// How a driver logs in to one appliance.
pub(crate) struct Login {
    scheme: Scheme,
    /// The credentials reference (and field prefix), for messages and the
    /// cache key; never a secret.
    reference: String,
}

enum Scheme {
    Basic { user: Secret, password: Secret },
    Token(TokenLogin),
}

/// What a token endpoint takes.
enum TokenLogin {
    AccessCode(Secret),
    NpmUser { user: Secret, password: Secret },
}

impl Login {
    /// Common API login from fields `<prefix>access_code` (OAuth), or
    /// `<prefix>username` and `<prefix>password` (Basic). With a prefix
    /// and none of its fields, the unprefixed fields are used: one login
    /// can serve a NetProfiler and its gateways.
    pub(crate) fn common(credentials: &Credentials, prefix: &str) -> Result<Login, StepError> {
        let has = |field: &str| credentials.get(&format!("{prefix}{field}")).is_some();
        let prefix = if has("access_code") || has("username") || has("password") {
            prefix
        } else {
            ""
        };
        let field = |name: &str| credentials.require(&format!("{prefix}{name}")).cloned();
        let scheme = match credentials.get(&format!("{prefix}access_code")) {
            Some(code) => Scheme::Token(TokenLogin::AccessCode(code.clone())),
            None => Scheme::Basic {
                user: field("username")?,
                password: field("password")?,
            },
        };
        Ok(Login {
            scheme,
            reference: format!("{}{}", credentials.reference(), prefix_note(prefix)),
        })
    }

    /// NPM login: the reference's `username` and `password`, exchanged for
    /// a token.
    pub(crate) fn npm(credentials: &Credentials) -> Result<Login, StepError> {
        Ok(Login {
            scheme: Scheme::Token(TokenLogin::NpmUser {
                user: credentials.require("username")?.clone(),
                password: credentials.require("password")?.clone(),
            }),
            reference: credentials.reference().to_owned(),
        })
    }
}

fn prefix_note(prefix: &str) -> String {
    if prefix.is_empty() {
        String::new()
    } else {
        format!(" ({prefix}* fields)")
    }
}

/// Bearer tokens by device and credentials reference.
#[derive(Default)]
pub(crate) struct Tokens {
    cache: Mutex<HashMap<String, Cached>>,
}

struct Cached {
    token: Secret,
    renew_at: Instant,
}

impl Tokens {
    /// Sends the call `build` makes, authenticated by `login`, and returns
    /// any answer but a 401: with a token, a 401 fetches a new one and
    /// sends again, once. A 401 to Basic credentials, or a refused token
    /// login, is an `auth` failure.
    pub(crate) async fn send<'a>(
        &self,
        http: &DeviceClient<'a>,
        login: &Login,
        build: impl Fn() -> Result<Call<'a>, StepError>,
    ) -> Result<Reply, StepError> {
        let token_login = match &login.scheme {
            Scheme::Basic { user, password } => {
                let reply = build()?.basic(user, password).send().await?;
                return refused_unless_authorized(reply, login);
            }
            Scheme::Token(token_login) => token_login,
        };
        let key = format!("{} {}", http.base(), login.reference);
        let mut fresh = false;
        let token = match self.cached(&key) {
            Some(token) => token,
            None => {
                fresh = true;
                self.fetch(http, login, token_login, &key).await?
            }
        };
        let reply = build()?.bearer(&token).send().await?;
        if reply.status != StatusCode::UNAUTHORIZED {
            return Ok(reply);
        }
        self.forget(&key);
        if !fresh {
            // The cached token was refused (expired early, or the appliance
            // restarted and forgot it): one more try with a new one.
            let token = self.fetch(http, login, token_login, &key).await?;
            let reply = build()?.bearer(&token).send().await?;
            if reply.status != StatusCode::UNAUTHORIZED {
                return Ok(reply);
            }
            self.forget(&key);
        }
        // The login itself was accepted, so the credentials are good: an
        // appliance refusing the token it has just issued is going down or
        // coming up, which passes.
        Err(StepError::transient(format!(
            "{} refused a token the appliance had just issued (restarting?)",
            reply.what
        )))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Cached>> {
        self.cache
            .lock()
            .expect("the token cache lock is never poisoned: nothing panics while holding it")
    }

    fn cached(&self, key: &str) -> Option<Secret> {
        let cache = self.lock();
        let cached = cache.get(key)?;
        (Instant::now() < cached.renew_at).then(|| cached.token.clone())
    }

    fn forget(&self, key: &str) {
        self.lock().remove(key);
    }

    async fn fetch(
        &self,
        http: &DeviceClient<'_>,
        login: &Login,
        token_login: &TokenLogin,
        key: &str,
    ) -> Result<Secret, StepError> {
        let (token, lifetime) = match token_login {
            TokenLogin::AccessCode(code) => {
                let form = url::form_urlencoded::Serializer::new(String::new())
                    .append_pair("grant_type", "access_code")
                    .append_pair("assertion", code.expose())
                    .finish();
                let reply = http
                    .post(OAUTH_TOKEN)
                    .header("content-type", "application/x-www-form-urlencoded")
                    .header("accept", "application/json")
                    .body(form)
                    .send()
                    .await?;
                let answer: TokenAnswer = token_answer(reply, login)?;
                let lifetime = answer
                    .expires_in
                    .filter(|s| *s > 0.0)
                    .map(Duration::from_secs_f64);
                (answer.access_token, lifetime)
            }
            TokenLogin::NpmUser { user, password } => {
                let body = serde_json::json!({
                    "user_credentials": {
                        "username": user.expose(),
                        "password": password.expose(),
                    },
                    "generate_refresh_token": false,
                });
                let reply = http.post(NPM_TOKEN).json(&body).send().await?;
                let answer: TokenAnswer = token_answer(reply, login)?;
                let lifetime = answer.expires_at.map(|at| {
                    let now = chrono::Utc::now().timestamp();
                    Duration::from_secs(u64::try_from(at - now).unwrap_or(0))
                });
                (answer.access_token, lifetime)
            }
        };
        let lifetime = lifetime.unwrap_or(UNSTATED_LIFETIME);
        let renew_at = Instant::now() + lifetime.saturating_sub(RENEW_MARGIN.min(lifetime / 10));
        let token = Secret::new(token);
        let mut cache = self.lock();
        if cache.len() > PRUNE_ABOVE {
            let now = Instant::now();
            cache.retain(|_, cached| cached.renew_at > now);
        }
        cache.insert(
            key.to_owned(),
            Cached {
                token: token.clone(),
                renew_at,
            },
        );
        Ok(token)
    }
}

/// A token endpoint's answer. Both APIs name the token `access_token`; the
/// Common API gives its lifetime in seconds, NPM its end in epoch seconds.
#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    #[serde(default)]
    expires_in: Option<f64>,
    #[serde(default)]
    expires_at: Option<i64>,
}

/// Reads a token answer. A refusal (400 for a bad access code, 401, 403)
/// is an `auth` failure; a body we cannot read is never quoted, since it
/// may hold a token.
fn token_answer(reply: Reply, login: &Login) -> Result<TokenAnswer, StepError> {
    if matches!(reply.status.as_u16(), 400 | 401 | 403) {
        return Err(StepError::auth(format!(
            "{} refused the login of credentials {:?} with HTTP {}",
            reply.what,
            login.reference,
            reply.status.as_u16()
        )));
    }
    let reply = super::success(reply)?;
    serde_json::from_slice(&reply.body).map_err(|e| {
        StepError::garbage(format!(
            "{} answered HTTP {} with no token we can read ({e}; body not quoted: it may hold a secret)",
            reply.what,
            reply.status.as_u16()
        ))
    })
}

fn refused_unless_authorized(reply: Reply, login: &Login) -> Result<Reply, StepError> {
    if reply.status == StatusCode::UNAUTHORIZED {
        return Err(StepError::auth(format!(
            "{} refused the credentials {:?} with HTTP 401: check them",
            reply.what, login.reference
        )));
    }
    Ok(reply)
}
