//! HTTP to devices: one place that joins paths onto a device's address,
//! turns transport trouble into retryable errors, names the call in every
//! error, and counts requests.
//!
//! A 5xx or a connection that fails is a transient [`StepError`]; any other
//! status comes back as a [`Reply`] for the driver to judge, since what a
//! 404 or a 401 means differs between device APIs.
//!
//! [`HttpClients`] keeps one HTTP client per TLS profile (a campaign's CA, a
//! group without certificate checks), so connections are pooled per profile
//! and a job's TLS settings never leak into another's.
//!
//! Every call to the job's own API host is timed into the step's
//! [`CallLog`], which its step event carries to the controller's adaptive
//! rate.
//!
//! What a device may make a worker do is bounded: an answer longer than the
//! worker's `max_answer_size` fails its step, and redirects are never
//! followed (a request that carries credentials or a body must not go
//! wherever a device points it); a redirect fails the step naming its
//! `Location`.

use crate::{
    credentials::Secret,
    driver::{Failure, StepError},
    metrics::WorkerMetrics,
};
use flotilla_common::{
    CallFailure, CallSample, Device, DeviceKind, ErrorClass, TlsProfile, job::join_api_path,
};
use reqwest::{Method, StatusCode};
use serde::{Serialize, de::DeserializeOwned};
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use tracing::{Instrument, Span, info_span};
use url::Url;

/// How much of a device's answer an error message quotes.
const QUOTE_LIMIT: usize = 300;
/// How long an idle keep-alive connection to a device host is kept. While
/// a host is called, it keeps as many idle connections as the worker has
/// slots: every slot may call it at once, and each connection released
/// beyond a smaller cap is closed only for the next step to open another
/// (a cap of 32 under 64 slots opened one connection per CPE and cost a
/// tenth of the throughput). A rollout moves from host to host (an
/// inventory lists a DMS's CPEs together), so a host not called for a
/// second lets its connections go: kept 5 s, the hosts a worker had just
/// left held 119 MiB of its memory at 100,000 CPEs over 200 DMS hosts
/// (kept 90 s, 371 MiB).
const IDLE_TIMEOUT: Duration = Duration::from_secs(1);

/// The worker's HTTP clients to devices, one per TLS profile, built on first
/// use and kept for the worker's lifetime.
#[derive(Clone)]
pub(crate) struct HttpClients {
    timeout: Duration,
    /// Idle connections kept per host: the worker's slots.
    idle_per_host: usize,
    /// The most bytes read of one answer.
    max_answer: u64,
    clients: Arc<Mutex<HashMap<TlsProfile, reqwest::Client>>>,
}

/// One TLS profile's client, with the limits every call through it keeps.
pub(crate) struct DeviceHttp {
    client: reqwest::Client,
    max_answer: u64,
}

impl HttpClients {
    /// Builds the client of the default profile at once, so a worker that
    /// cannot build any client fails at start rather than on every job.
    pub(crate) fn new(
        timeout: Duration,
        max_answer: u64,
        slots: u16,
    ) -> Result<Self, reqwest::Error> {
        let default = TlsProfile::default();
        let idle_per_host = usize::from(slots);
        let client = build_client(timeout, idle_per_host, &default)?;
        Ok(HttpClients {
            timeout,
            idle_per_host,
            max_answer,
            clients: Arc::new(Mutex::new(HashMap::from([(default, client)]))),
        })
    }

    /// The client for `profile` (a cheap handle onto a shared pool).
    pub(crate) fn get(&self, profile: &TlsProfile) -> Result<DeviceHttp, StepError> {
        let client = self.client(profile)?;
        Ok(DeviceHttp {
            client,
            max_answer: self.max_answer,
        })
    }

    fn client(&self, profile: &TlsProfile) -> Result<reqwest::Client, StepError> {
        let lock = || {
            self.clients
                .lock()
                .expect("the client map lock is never poisoned: nothing panics while holding it")
        };
        if let Some(client) = lock().get(profile) {
            return Ok(client.clone());
        }
        // Built outside the lock: reading the CA takes a moment, and two
        // tasks building the same profile at once only waste a little work.
        let client = build_client(self.timeout, self.idle_per_host, profile).map_err(|e| {
            StepError::worker_lacks(format!(
                "cannot build an HTTPS client with the campaign's TLS settings: {}",
                describe(&e)
            ))
        })?;
        Ok(lock().entry(profile.clone()).or_insert(client).clone())
    }
}

fn build_client(
    timeout: Duration,
    idle_per_host: usize,
    profile: &TlsProfile,
) -> Result<reqwest::Client, reqwest::Error> {
    let mut builder = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        // Without it, a device that writes headers and body separately
        // makes each keep-alive call wait ~40 ms for a delayed ACK.
        .tcp_nodelay(true)
        .pool_max_idle_per_host(idle_per_host)
        .pool_idle_timeout(IDLE_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("flotilla/", env!("CARGO_PKG_VERSION")));
    if let Some(pem) = &profile.ca_pem {
        builder = builder.tls_certs_only(reqwest::Certificate::from_pem_bundle(pem.as_bytes())?);
    }
    if !profile.verify {
        builder = builder.tls_danger_accept_invalid_certs(true);
    }
    builder.build()
}

/// How one step's calls to its job's API host went.
#[derive(Default)]
pub(crate) struct CallLog {
    tally: Mutex<CallTally>,
}

#[derive(Default)]
struct CallTally {
    count: u32,
    slowest: Duration,
    failure: Option<CallFailure>,
}

impl CallLog {
    fn record(&self, took: Duration, failure: Option<CallFailure>) {
        let mut tally = self.tally.lock().expect("the call log is never poisoned");
        tally.count += 1;
        tally.slowest = tally.slowest.max(took);
        tally.failure = tally.failure.or(failure);
    }

    /// The step's own timeout ended it during a call, which never
    /// recorded itself.
    pub(crate) fn timed_out(&self, took: Duration) {
        self.record(took, Some(CallFailure::Timeout));
    }

    /// The step's calls to `host`, if it made any.
    pub(crate) fn sample(&self, host: String) -> Option<CallSample> {
        let tally = self.tally.lock().expect("the call log is never poisoned");
        (tally.count > 0).then(|| CallSample {
            host,
            count: tally.count,
            slowest_ms: tally.slowest.as_millis() as u64,
            failure: tally.failure,
        })
    }
}

#[derive(Clone, Copy)]
pub(crate) struct DeviceClient<'a> {
    http: &'a reqwest::Client,
    max_answer: u64,
    base: &'a Url,
    kind: DeviceKind,
    /// Names the host in messages when it is not the job's device (a
    /// NetProfiler job calling one of its Flow Gateways).
    label: Option<&'a str>,
    metrics: &'a WorkerMetrics,
    /// Where calls to the job's own API host are timed; `None` for calls
    /// to other hosts.
    calls: Option<&'a CallLog>,
}

impl<'a> DeviceClient<'a> {
    pub(crate) fn new(
        http: &'a DeviceHttp,
        device: &'a Device,
        metrics: &'a WorkerMetrics,
        calls: &'a CallLog,
    ) -> Self {
        DeviceClient {
            http: &http.client,
            max_answer: http.max_answer,
            base: &device.address,
            kind: device.kind,
            label: None,
            metrics,
            calls: Some(calls),
        }
    }

    /// The same client, aimed at another host the job must reach (with the
    /// same TLS settings), named `label` in messages.
    pub(crate) fn at(&self, base: &'a Url, label: &'a str) -> DeviceClient<'a> {
        DeviceClient {
            base,
            label: Some(label),
            calls: None,
            ..*self
        }
    }

    /// The base URL requests go to.
    pub(crate) fn base(&self) -> &'a Url {
        self.base
    }

    pub(crate) fn get(&self, path: &str) -> Call<'a> {
        self.request(Method::GET, path)
    }

    pub(crate) fn post(&self, path: &str) -> Call<'a> {
        self.request(Method::POST, path)
    }

    pub(crate) fn put(&self, path: &str) -> Call<'a> {
        self.request(Method::PUT, path)
    }

    pub(crate) fn delete(&self, path: &str) -> Call<'a> {
        self.request(Method::DELETE, path)
    }

    pub(crate) fn request(&self, method: Method, path: &str) -> Call<'a> {
        let url = join_api_path(self.base, path);
        // Query strings can carry identifiers; messages name the path only.
        let path = path.split('?').next().unwrap_or(path);
        let what = match self.label {
            Some(label) => format!("{label}: {method} {path}"),
            None => format!("{method} {path}"),
        };
        Call {
            client: *self,
            what,
            span: info_span!(
                "http",
                otel.name = %format!("{method} {}", path_template(path)),
                http.request.method = %method,
                url.template = %path_template(path),
                http.response.status_code = tracing::field::Empty,
            ),
            builder: self.http.request(method, url),
        }
    }
}

/// One request being built.
pub(crate) struct Call<'a> {
    client: DeviceClient<'a>,
    what: String,
    /// Names the call by method and path template: never its query, body
    /// or credentials.
    span: Span,
    builder: reqwest::RequestBuilder,
}

impl Call<'_> {
    pub(crate) fn basic(mut self, user: &Secret, password: &Secret) -> Self {
        self.builder = self
            .builder
            .basic_auth(user.expose(), Some(password.expose()));
        self
    }

    pub(crate) fn bearer(mut self, token: &Secret) -> Self {
        self.builder = self.builder.bearer_auth(token.expose());
        self
    }

    pub(crate) fn json<T: Serialize + ?Sized>(mut self, body: &T) -> Self {
        self.builder = self.builder.json(body);
        self
    }

    pub(crate) fn header(mut self, name: &str, value: &str) -> Self {
        self.builder = self.builder.header(name, value);
        self
    }

    pub(crate) fn body(mut self, body: impl Into<reqwest::Body>) -> Self {
        self.builder = self.builder.body(body);
        self
    }

    /// A limit of this request's own instead of the client's per-request
    /// one (for uploads, which take as long as the image is large).
    pub(crate) fn timeout(mut self, limit: Duration) -> Self {
        self.builder = self.builder.timeout(limit);
        self
    }

    /// A `multipart/form-data` body (its content type and boundary set).
    pub(crate) fn multipart(mut self, form: reqwest::multipart::Form) -> Self {
        self.builder = self.builder.multipart(form);
        self
    }

    /// Sends the request. Transport failures and 5xx answers are transient
    /// errors; every other answer is returned.
    pub(crate) async fn send(self) -> Result<Reply, StepError> {
        let span = self.span.clone();
        let calls = self.client.calls;
        let started = Instant::now();
        let (result, failure) = self.send_in_span().instrument(span).await;
        if let Some(calls) = calls {
            calls.record(started.elapsed(), failure);
        }
        result
    }

    /// The answer, and the failure it counts as for the adaptive rate.
    async fn send_in_span(self) -> (Result<Reply, StepError>, Option<CallFailure>) {
        let Call {
            client,
            what,
            span,
            builder,
        } = self;
        let kind = client.kind;
        let response = match builder.send().await {
            Ok(response) => response,
            Err(error) => {
                client.metrics.device_request(kind, "error");
                let failure = if error.is_timeout() {
                    CallFailure::Timeout
                } else {
                    CallFailure::Connection
                };
                let error = StepError::transient(format!("{what}: {}", describe(&error)));
                return (Err(error), Some(failure));
            }
        };
        let received_at = chrono::Utc::now();
        let status = response.status();
        span.record("http.response.status_code", status.as_u16());
        client.metrics.device_request(kind, status_class(status));
        if status.is_redirection() {
            let location = response
                .headers()
                .get(reqwest::header::LOCATION)
                .map(|l| String::from_utf8_lossy(l.as_bytes()).into_owned());
            let error = StepError::misconfigured(format!(
                "{what} answered HTTP {} redirecting to {}: redirects are not followed; \
                 point the inventory at the device's real address",
                status.as_u16(),
                location.as_deref().unwrap_or("(no Location header)")
            ));
            return (Err(error), None);
        }
        let headers = response.headers().clone();
        let body = match read_bounded(response, client.max_answer, &what).await {
            Ok(body) => body,
            Err(error) => {
                // Cut off mid-answer is the host's trouble; too long an
                // answer is the device's.
                let failure =
                    matches!(error, StepError::Retry { .. }).then_some(CallFailure::Connection);
                return (Err(error), failure);
            }
        };
        let reply = Reply {
            what,
            status,
            headers,
            body,
            received_at,
        };
        if status.is_server_error() {
            let error = StepError::transient(format!(
                "{} answered HTTP {}: {}",
                reply.what,
                status.as_u16(),
                reply.quote()
            ));
            return (Err(error), Some(CallFailure::ServerError));
        }
        (Ok(reply), None)
    }
}

/// Reads an answer's body, failing the step once it passes `limit` bytes
/// (no retry: a device that answers too much will again).
async fn read_bounded(
    mut response: reqwest::Response,
    limit: u64,
    what: &str,
) -> Result<Vec<u8>, StepError> {
    let too_long = || {
        StepError::from(Failure::new(
            ErrorClass::Protocol,
            format!(
                "{what}: the answer is longer than the worker reads ({limit} bytes, \
                 FLOTILLA_MAX_ANSWER_SIZE)"
            ),
        ))
    };
    if response
        .content_length()
        .is_some_and(|length| length > limit)
    {
        return Err(too_long());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|error| {
        StepError::transient(format!("{what}: reading the answer: {}", describe(&error)))
    })? {
        if (body.len() + chunk.len()) as u64 > limit {
            return Err(too_long());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A device's answer other than a 5xx.
#[derive(Debug)]
pub(crate) struct Reply {
    /// The call, as `METHOD /path`, for messages.
    pub(crate) what: String,
    pub(crate) status: StatusCode,
    /// For the few answers that matter beyond the body (a session cookie);
    /// never quoted in messages, as they can carry secrets.
    pub(crate) headers: reqwest::header::HeaderMap,
    pub(crate) body: Vec<u8>,
    /// When the answer arrived, on the worker's clock.
    pub(crate) received_at: chrono::DateTime<chrono::Utc>,
}

impl Reply {
    /// The body as `T`, or an error that names the call and quotes the body.
    pub(crate) fn json<T: DeserializeOwned>(&self) -> Result<T, StepError> {
        serde_json::from_slice(&self.body).map_err(|error| {
            StepError::garbage(format!(
                "{} answered HTTP {} with a body we cannot read ({error}): {}",
                self.what,
                self.status.as_u16(),
                self.quote()
            ))
        })
    }

    /// Fails unless the status is 2xx: 401 and 403 as an auth failure, any
    /// other status as the device's refusal, quoting its answer.
    pub(crate) fn success(self) -> Result<Self, StepError> {
        self.success_in_words(|_| None)
    }

    /// [`Reply::success`], naming a refusal in the device's own words when
    /// `words` finds them in the body (an API's error object).
    pub(crate) fn success_in_words(
        self,
        words: impl Fn(&[u8]) -> Option<String>,
    ) -> Result<Self, StepError> {
        match self.status {
            s if s.is_success() => Ok(self),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(StepError::auth(format!(
                "{} was refused with HTTP {}: check the credentials reference",
                self.what,
                self.status.as_u16()
            ))),
            s => Err(StepError::refused(match words(&self.body) {
                Some(words) => format!("{} answered HTTP {} {words}", self.what, s.as_u16()),
                None => format!(
                    "{} answered HTTP {}: {}",
                    self.what,
                    s.as_u16(),
                    self.quote()
                ),
            })),
        }
    }

    /// An answer we cannot read: `problem`, naming the call and quoting it.
    pub(crate) fn unreadable(&self, problem: &str) -> StepError {
        StepError::garbage(format!("{}: {problem}: {}", self.what, self.quote()))
    }

    /// The device's clock when it answered: its `Date` header (which every
    /// HTTP server with a clock sends), `None` without one.
    pub(crate) fn device_date(&self) -> Option<chrono::DateTime<chrono::FixedOffset>> {
        let date = self.headers.get(reqwest::header::DATE)?.to_str().ok()?;
        chrono::DateTime::parse_from_rfc2822(date.trim()).ok()
    }

    /// The start of the body, as text, for error messages.
    pub(crate) fn quote(&self) -> String {
        let text = String::from_utf8_lossy(&self.body);
        let text = text.trim();
        if text.is_empty() {
            return "(empty body)".to_owned();
        }
        match text.char_indices().nth(QUOTE_LIMIT) {
            Some((cut, _)) => format!("{}…", &text[..cut]),
            None => text.to_owned(),
        }
    }
}

/// The path with its identifiers replaced by `{id}`, so that spans of one
/// call group together: a segment is an identifier when it holds a digit
/// and is not an API version (`1.0`, `v2`).
fn path_template(path: &str) -> String {
    let path = path.split('?').next().unwrap_or(path);
    let is_version = |segment: &str| {
        let digits = segment.strip_prefix('v').unwrap_or(segment);
        !digits.is_empty()
            && digits.chars().all(|c| c.is_ascii_digit() || c == '.')
            && (segment.starts_with('v') || segment.contains('.'))
    };
    path.split('/')
        .map(|segment| {
            if segment.chars().any(|c| c.is_ascii_digit()) && !is_version(segment) {
                "{id}"
            } else {
                segment
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

fn status_class(status: StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// reqwest's own message for a connection failure is "error sending request";
/// the cause chain says what actually happened (refused, timed out, TLS).
fn describe(error: &reqwest::Error) -> String {
    let mut text = if error.is_timeout() {
        "timed out".to_owned()
    } else if error.is_connect() {
        "could not connect".to_owned()
    } else {
        "request failed".to_owned()
    };
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_device_clock_is_read_from_the_date_header() {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::DATE,
            "Sun, 06 Nov 1994 08:49:37 GMT".parse().unwrap(),
        );
        let reply = Reply {
            what: "GET /".into(),
            status: StatusCode::OK,
            headers,
            body: Vec::new(),
            received_at: chrono::Utc::now(),
        };
        assert_eq!(reply.device_date().unwrap().timestamp(), 784111777);
    }

    #[test]
    fn templates_hide_identifiers_but_keep_versions() {
        assert_eq!(
            path_template("/api/mgmt.gateway_backup/1.0/backup"),
            "/api/mgmt.gateway_backup/1.0/backup"
        );
        assert_eq!(
            path_template("/nbi/v1/cpes/00259E-C123/firmware?x=1"),
            "/nbi/v1/cpes/{id}/firmware"
        );
        assert_eq!(
            path_template("/api/npm.system_update/2.0/images/17"),
            "/api/npm.system_update/2.0/images/{id}"
        );
    }
}
