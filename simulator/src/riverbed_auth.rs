//! Riverbed authentication as the appliances enforce it: HTTP Basic or an
//! OAuth bearer token (from an access code) for the Common API 1.0
//! (NetProfiler, Flow Gateway); a bearer token from
//! `POST /api/mgmt.aaa/1.0/token` for NPM. Tokens expire, and an appliance
//! forgets them all when it reboots.

use crate::{clock::Clock, host::basic_auth_matches};
use axum::{
    Json,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};
use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

/// One appliance's login rules and issued tokens; cheap to clone.
#[derive(Clone)]
pub(crate) struct Auth {
    inner: Arc<Inner>,
}

struct Inner {
    user: String,
    password: String,
    access_code: String,
    /// Whether HTTP Basic is accepted (the Common API, Basic-only NPM) or
    /// only tokens (NPM).
    basic: bool,
    token_lifetime: Duration,
    tokens: Mutex<HashMap<String, Instant>>,
    issued: AtomicU32,
    /// The appliance's clock, for the end of a token.
    clock: Clock,
}

impl Auth {
    pub(crate) fn new(
        user: &str,
        password: &str,
        access_code: &str,
        basic: bool,
        token_lifetime: Duration,
        clock: Clock,
    ) -> Auth {
        Auth {
            inner: Arc::new(Inner {
                user: user.to_owned(),
                password: password.to_owned(),
                access_code: access_code.to_owned(),
                basic,
                token_lifetime,
                tokens: Mutex::new(HashMap::new()),
                issued: AtomicU32::new(0),
                clock,
            }),
        }
    }

    fn tokens(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.inner
            .tokens
            .lock()
            .expect("the token lock is never poisoned: nothing panics while holding it")
    }

    /// The 401 to answer, unless the request carries valid credentials or
    /// an unexpired token.
    pub(crate) fn refusal(&self, headers: &HeaderMap) -> Option<Response> {
        let header = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if let Some(token) = header.strip_prefix("Bearer ") {
            let now = Instant::now();
            return match self.tokens().get(token.trim()) {
                Some(expires) if *expires > now => None,
                Some(_) => Some(unauthorized("AUTH_EXPIRED_TOKEN", "The token has expired")),
                None => Some(unauthorized("AUTH_INVALID_TOKEN", "Unknown token")),
            };
        }
        if self.inner.basic
            && header.starts_with("Basic ")
            && basic_auth_matches(headers, &self.inner.user, &self.inner.password)
        {
            return None;
        }
        if header.is_empty() {
            return Some(unauthorized("AUTH_REQUIRED", "Authentication required"));
        }
        Some(unauthorized(
            "AUTH_INVALID_CREDENTIALS",
            "Make sure the user name is correct and type your password again.",
        ))
    }

    /// Tokens issued so far.
    pub(crate) fn issued(&self) -> u32 {
        self.inner.issued.load(Ordering::SeqCst)
    }

    /// Forgets every token, as a reboot does.
    pub(crate) fn forget_tokens(&self) {
        self.tokens().clear();
    }

    fn issue(&self) -> (String, Duration) {
        let token = uuid::Uuid::new_v4().simple().to_string();
        let lifetime = self.inner.token_lifetime;
        self.tokens()
            .insert(token.clone(), Instant::now() + lifetime);
        self.inner.issued.fetch_add(1, Ordering::SeqCst);
        (token, lifetime)
    }
}

pub(crate) fn unauthorized(id: &str, text: &str) -> Response {
    (
        StatusCode::UNAUTHORIZED,
        Json(json!({ "error_id": id, "error_text": text })),
    )
        .into_response()
}

/// A Riverbed error body with its status.
pub(crate) fn error(status: StatusCode, id: &str, text: impl Into<String>) -> Response {
    (
        status,
        Json(json!({ "error_id": id, "error_text": text.into() })),
    )
        .into_response()
}

/// `POST /api/common/1.0/oauth/token`: `grant_type=access_code&assertion=<code>`.
pub(crate) async fn oauth_token(State(auth): State<Auth>, body: axum::body::Bytes) -> Response {
    let form: HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    if form.get("grant_type").map(String::as_str) != Some("access_code") {
        return error(
            StatusCode::BAD_REQUEST,
            "BAD_REQUEST",
            "grant_type must be access_code",
        );
    }
    if form.get("assertion") != Some(&auth.inner.access_code) {
        return error(
            StatusCode::BAD_REQUEST,
            "AUTH_INVALID_CODE",
            "The access code is invalid or was revoked",
        );
    }
    let (token, lifetime) = auth.issue();
    Json(json!({
        "access_token": token,
        "token_type": "bearer",
        "expires_in": lifetime.as_secs_f64(),
    }))
    .into_response()
}

/// `POST /api/mgmt.aaa/1.0/token` with `{"user_credentials": {...}}`.
pub(crate) async fn npm_token(State(auth): State<Auth>, body: axum::body::Bytes) -> Response {
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let user = request.pointer("/user_credentials/username");
    let password = request.pointer("/user_credentials/password");
    if user.and_then(Value::as_str) != Some(&auth.inner.user)
        || password.and_then(Value::as_str) != Some(&auth.inner.password)
    {
        return unauthorized(
            "AUTH_INVALID_CREDENTIALS",
            "Make sure the user name is correct and type your password again.",
        );
    }
    let (token, lifetime) = auth.issue();
    let expires_at = auth.inner.clock.epoch_seconds() + lifetime.as_secs() as i64;
    Json(json!({
        "access_token": token,
        "token_type": "bearer",
        "expires_at": expires_at,
    }))
    .into_response()
}
