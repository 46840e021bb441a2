//! Riverbed logins, as the appliances take them.
//!
//! - Common API 1.0 (NetProfiler, Flow Gateway): HTTP Basic with the
//!   reference's `username` and `password`; or, when the reference has an
//!   `access_code`, OAuth 2: the code is exchanged at
//!   `POST /api/common/1.0/oauth/token` (`grant_type=access_code`,
//!   `assertion=<code>`) for a bearer token.
//! - NPM (`mgmt.aaa` 1.0): `POST /api/mgmt.aaa/1.0/token` with the user's
//!   credentials gives a short-lived bearer token.
//!
//! Tokens are cached and renewed by [`Logins`]. A refused login (Basic
//! credentials, an access code, the NPM user) is a terminal `auth`
//! failure, never an endless retry.

use crate::{
    credentials::{Credentials, Secret},
    device_http::{Call, DeviceClient, Reply},
    driver::StepError,
    support::login::{Issued, Logins, Scheme},
};
use flotilla_common::settings::NpmAuth;
use reqwest::StatusCode;
use serde::Deserialize;
use std::time::Duration;

const OAUTH_TOKEN: &str = "/api/common/1.0/oauth/token";
const NPM_TOKEN: &str = "/api/mgmt.aaa/1.0/token";

/// Assumed lifetime of a token whose answer gives none; a 401 before then
/// still fetches a new one.
const UNSTATED_LIFETIME: Duration = Duration::from_secs(300);

/// How a driver logs in to one appliance.
pub(crate) enum Login {
    Basic {
        user: Secret,
        password: Secret,
        reference: String,
        /// What to say when the appliance refuses Basic (the setting that
        /// chose it), if anything.
        hint: &'static str,
    },
    Token(TokenLogin),
}

/// A login exchanged for a bearer token.
pub(crate) struct TokenLogin {
    what: TokenEndpoint,
    /// The credentials reference (and field prefix), for messages and the
    /// cache key; never a secret.
    reference: String,
}

enum TokenEndpoint {
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
        let reference = format!("{}{}", credentials.reference(), prefix_note(prefix));
        Ok(match credentials.get(&format!("{prefix}access_code")) {
            Some(code) => Login::Token(TokenLogin {
                what: TokenEndpoint::AccessCode(code.clone()),
                reference,
            }),
            None => Login::Basic {
                user: field("username")?,
                password: field("password")?,
                reference,
                hint: "",
            },
        })
    }

    /// NPM login: the reference's `username` and `password`, exchanged for
    /// a token, or sent as HTTP Basic (`[drivers.npm] auth`).
    pub(crate) fn npm(credentials: &Credentials, auth: NpmAuth) -> Result<Login, StepError> {
        let user = credentials.require("username")?.clone();
        let password = credentials.require("password")?.clone();
        let reference = credentials.reference().to_owned();
        Ok(match auth {
            NpmAuth::Token => Login::Token(TokenLogin {
                what: TokenEndpoint::NpmUser { user, password },
                reference,
            }),
            NpmAuth::Basic => Login::Basic {
                user,
                password,
                reference,
                hint: " (the campaign's [drivers.npm] auth is \"basic\"; appliances that \
                       only issue mgmt.aaa tokens need auth = \"token\")",
            },
        })
    }

    /// Sends the call `build` makes, authenticated by this login, and
    /// returns any answer but a 401 (see [`Logins::send`] for tokens). A
    /// 401 to Basic credentials is an `auth` failure.
    pub(crate) async fn send<'a>(
        &self,
        logins: &Logins,
        http: &DeviceClient<'a>,
        build: impl Fn() -> Result<Call<'a>, StepError>,
    ) -> Result<Reply, StepError> {
        match self {
            Login::Basic {
                user,
                password,
                reference,
                hint,
            } => {
                let reply = build()?.basic(user, password).send().await?;
                if reply.status == StatusCode::UNAUTHORIZED {
                    return Err(StepError::auth(format!(
                        "{} refused the credentials {reference:?} with HTTP 401: check them{hint}",
                        reply.what
                    )));
                }
                Ok(reply)
            }
            Login::Token(token) => logins.send(http, token, build).await,
        }
    }
}

fn prefix_note(prefix: &str) -> String {
    if prefix.is_empty() {
        String::new()
    } else {
        format!(" ({prefix}* fields)")
    }
}

impl Scheme for TokenLogin {
    fn reference(&self) -> &str {
        &self.reference
    }

    fn issues(&self) -> &'static str {
        "token"
    }

    async fn log_in(&self, http: &DeviceClient<'_>) -> Result<Issued, StepError> {
        let (token, lifetime) = match &self.what {
            TokenEndpoint::AccessCode(code) => {
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
                let answer = self.token_answer(reply)?;
                let lifetime = answer
                    .expires_in
                    .filter(|s| *s > 0.0)
                    .map(Duration::from_secs_f64);
                (answer.access_token, lifetime)
            }
            TokenEndpoint::NpmUser { user, password } => {
                let body = serde_json::json!({
                    "user_credentials": {
                        "username": user.expose(),
                        "password": password.expose(),
                    },
                    "generate_refresh_token": false,
                });
                let reply = http.post(NPM_TOKEN).json(&body).send().await?;
                if matches!(reply.status.as_u16(), 404 | 405) {
                    return Err(StepError::misconfigured(format!(
                        "{} answered HTTP {}: this appliance has no mgmt.aaa token login; \
                         if it takes HTTP Basic, set [drivers.npm] auth = \"basic\" in the campaign",
                        reply.what,
                        reply.status.as_u16()
                    )));
                }
                // The token's end is on the appliance's clock: its lifetime
                // is measured against the same clock's `Date`, never the
                // worker's.
                let now = reply.device_date().map(|date| date.timestamp());
                let answer = self.token_answer(reply)?;
                let lifetime = match (answer.expires_at, now) {
                    (Some(at), Some(now)) => {
                        Some(Duration::from_secs(u64::try_from(at - now).unwrap_or(0)))
                    }
                    _ => None,
                };
                (answer.access_token, lifetime)
            }
        };
        Ok(Issued {
            secret: Secret::new(token),
            lifetime: Some(lifetime.unwrap_or(UNSTATED_LIFETIME)),
        })
    }

    fn carry<'c>(&self, call: Call<'c>, issued: &Secret) -> Call<'c> {
        call.bearer(issued)
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

impl TokenLogin {
    /// Reads a token answer. A refusal (400 for a bad access code, 401,
    /// 403) is an `auth` failure; a body we cannot read is never quoted,
    /// since it may hold a token.
    fn token_answer(&self, reply: Reply) -> Result<TokenAnswer, StepError> {
        if matches!(reply.status.as_u16(), 400 | 401 | 403) {
            return Err(StepError::auth(format!(
                "{} refused the login of credentials {:?} with HTTP {}",
                reply.what,
                self.reference,
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
}
