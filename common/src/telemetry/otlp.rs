//! Trace export over OTLP, set up by OpenTelemetry's standard variables
//! (read once, at start), and a log of the exports that fail.
//!
//! - `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT`:
//!   where to; without either nothing is exported.
//! - `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` or `OTEL_EXPORTER_OTLP_PROTOCOL`:
//!   `http/protobuf` (the default, as the specification says), `grpc` or
//!   `http/json`. Anything else is an error, not a silent fallback.
//! - `OTEL_SERVICE_NAME`, else a `service.name` in
//!   `OTEL_RESOURCE_ATTRIBUTES`, else the process's own name.
//!
//! The exporter itself reads the rest (headers, timeout, compression).

use opentelemetry::Key;
use opentelemetry_otlp::{
    WithExportConfig, WithTonicConfig, tonic_types::transport::ClientTlsConfig,
};
use opentelemetry_sdk::{
    Resource,
    error::OTelSdkResult,
    resource::{EnvResourceDetector, ResourceDetector},
    trace::{SpanData, SpanExporter},
};
use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

const TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
const ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
const PROTOCOL_VARS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
];
const SERVICE_NAME: &str = "OTEL_SERVICE_NAME";
/// At most one warning about failing exports in this time; the next one
/// says how many failed meanwhile.
const WARNING_INTERVAL: Duration = Duration::from_secs(60);

/// How spans travel to the collector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Protocol {
    HttpProtobuf,
    HttpJson,
    Grpc,
}

impl Protocol {
    fn parse(var: &str, value: &str) -> Result<Protocol, String> {
        match value {
            "http/protobuf" => Ok(Protocol::HttpProtobuf),
            "http/json" => Ok(Protocol::HttpJson),
            "grpc" => Ok(Protocol::Grpc),
            other => Err(format!(
                "{var}={other:?} is not one of http/protobuf, grpc, http/json"
            )),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Protocol::HttpProtobuf => "http/protobuf",
            Protocol::HttpJson => "http/json",
            Protocol::Grpc => "grpc",
        }
    }
}

/// Where and how this process exports its traces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct OtlpConfig {
    pub(super) protocol: Protocol,
    /// The URL spans go to, as logs may show it (a password replaced).
    pub(super) endpoint: String,
    /// The endpoint's password, to keep out of logged export errors.
    secret: Option<String>,
}

impl OtlpConfig {
    /// The configuration `lookup` (a variable's value, `None` when unset
    /// or empty) describes; `None` when no endpoint is set.
    pub(super) fn from_lookup(
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<OtlpConfig>, String> {
        let protocol = match PROTOCOL_VARS
            .iter()
            .find_map(|var| lookup(var).map(|value| (*var, value)))
        {
            Some((var, value)) => Protocol::parse(var, &value)?,
            None => Protocol::HttpProtobuf,
        };
        // The exporter's own rule: the traces endpoint is used as it is;
        // the general one is a base that HTTP appends its path to.
        let endpoint = match (lookup(TRACES_ENDPOINT), lookup(ENDPOINT)) {
            (Some(traces), _) => traces,
            (None, Some(base)) if protocol == Protocol::Grpc => base,
            (None, Some(base)) => format!("{}/v1/traces", base.trim_end_matches('/')),
            (None, None) => return Ok(None),
        };
        let (endpoint, secret) = match url::Url::parse(&endpoint) {
            Ok(mut url) if url.password().is_some() => {
                let secret = url.password().map(str::to_owned);
                // Cannot fail: a URL with a password has a host.
                let _ = url.set_password(Some("***"));
                (url.to_string(), secret)
            }
            _ => (endpoint, None),
        };
        Ok(Some(OtlpConfig {
            protocol,
            endpoint,
            secret,
        }))
    }

    pub(super) fn from_env() -> Result<Option<OtlpConfig>, String> {
        OtlpConfig::from_lookup(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
    }

    /// The exporter, its failures logged.
    pub(super) fn exporter(&self) -> Result<LoggedExporter, String> {
        let builder = opentelemetry_otlp::SpanExporter::builder();
        let built = match self.protocol {
            Protocol::Grpc => {
                // tonic's channel runs on the Tokio runtime it is built in.
                if tokio::runtime::Handle::try_current().is_err() {
                    return Err("gRPC export needs a Tokio runtime".to_owned());
                }
                let builder = builder.with_tonic();
                if self.endpoint.starts_with("https:") {
                    builder
                        .with_tls_config(ClientTlsConfig::new().with_native_roots())
                        .build()
                } else {
                    builder.build()
                }
            }
            Protocol::HttpProtobuf => builder
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .build(),
            Protocol::HttpJson => builder
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpJson)
                .build(),
        };
        let inner = built.map_err(|e| {
            format!(
                "building the OTLP {} exporter for {}: {}",
                self.protocol.name(),
                self.endpoint,
                self.scrub(&e.to_string())
            )
        })?;
        Ok(LoggedExporter {
            inner,
            log: Arc::new(ExportLog::new(self.clone())),
        })
    }

    fn scrub(&self, text: &str) -> String {
        match &self.secret {
            Some(secret) => text.replace(secret.as_str(), "***"),
            None => text.to_owned(),
        }
    }
}

/// The resource spans are sent with: the environment's attributes, named
/// by `OTEL_SERVICE_NAME`, else by a `service.name` among
/// `OTEL_RESOURCE_ATTRIBUTES`, else `default_service`. (The SDK's own
/// detectors would let the attributes win over `OTEL_SERVICE_NAME`, against
/// the specification.)
pub(super) fn resource(default_service: &str) -> Resource {
    let name = std::env::var(SERVICE_NAME)
        .ok()
        .filter(|v| !v.is_empty())
        .or_else(|| {
            EnvResourceDetector::new()
                .detect()
                .get(&Key::new("service.name"))
                .map(|v| v.to_string())
        })
        .unwrap_or_else(|| default_service.to_owned());
    Resource::builder().with_service_name(name).build()
}

/// The OTLP exporter, telling [`ExportLog`] how each export went.
#[derive(Debug)]
pub(super) struct LoggedExporter {
    inner: opentelemetry_otlp::SpanExporter,
    pub(super) log: Arc<ExportLog>,
}

impl SpanExporter for LoggedExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len();
        let result = self.inner.export(batch).await;
        match &result {
            Ok(()) => self.log.succeeded(),
            Err(error) => self.log.failed(spans, &error.to_string()),
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// Says when exports fail, without a line per batch: the first failure at
/// once, then at most one warning per [`WARNING_INTERVAL`] with the count
/// since the last; once exports work again, one line says so.
#[derive(Debug)]
pub(super) struct ExportLog {
    config: OtlpConfig,
    state: Mutex<LogState>,
}

#[derive(Debug, Default)]
struct LogState {
    last_warning: Option<Instant>,
    /// A warning went out and no export has worked since.
    warned: bool,
    /// Failed exports and their spans not yet in a warning.
    unreported: u64,
    unreported_spans: u64,
}

impl ExportLog {
    fn new(config: OtlpConfig) -> ExportLog {
        ExportLog {
            config,
            state: Mutex::default(),
        }
    }

    fn failed(&self, spans: usize, error: &str) {
        let error = self.config.scrub(error);
        let (earlier, earlier_spans) = {
            let mut state = self.state();
            state.unreported += 1;
            state.unreported_spans += spans as u64;
            if state
                .last_warning
                .is_some_and(|at| at.elapsed() < WARNING_INTERVAL)
            {
                return;
            }
            state.last_warning = Some(Instant::now());
            state.warned = true;
            (
                std::mem::take(&mut state.unreported) - 1,
                std::mem::take(&mut state.unreported_spans) - spans as u64,
            )
        };
        let endpoint = &self.config.endpoint;
        let protocol = self.config.protocol.name();
        if earlier == 0 {
            tracing::warn!(
                %endpoint,
                protocol,
                %error,
                spans,
                "cannot export traces; further failures are reported at most once a minute"
            );
        } else {
            tracing::warn!(
                %endpoint,
                protocol,
                %error,
                spans,
                failed_exports_before = earlier,
                spans_lost_before = earlier_spans,
                "trace export still failing"
            );
        }
    }

    fn succeeded(&self) {
        let (warned, failed, lost) = {
            let mut state = self.state();
            (
                std::mem::take(&mut state.warned),
                std::mem::take(&mut state.unreported),
                std::mem::take(&mut state.unreported_spans),
            )
        };
        if warned {
            tracing::info!(
                endpoint = %self.config.endpoint,
                failed_exports_since_warning = failed,
                spans_lost_since_warning = lost,
                "trace export works again"
            );
        }
    }

    /// At exit: the failures no warning has counted yet.
    pub(super) fn finish(&self) {
        let (failed, lost) = {
            let mut state = self.state();
            (
                std::mem::take(&mut state.unreported),
                std::mem::take(&mut state.unreported_spans),
            )
        };
        if failed > 0 {
            tracing::warn!(
                endpoint = %self.config.endpoint,
                failed_exports = failed,
                spans_lost = lost,
                "trace exports failed since the last warning"
            );
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LogState> {
        // A panic while holding this lock leaves counters only: keep them.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(vars: &[(&str, &str)]) -> Result<Option<OtlpConfig>, String> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        OtlpConfig::from_lookup(|name| vars.get(name).cloned())
    }

    #[test]
    fn protocol_and_endpoint_follow_the_specifications_precedence() {
        assert_eq!(config(&[]), Ok(None), "no endpoint, no export");
        let base = config(&[(ENDPOINT, "http://collector:4318/")])
            .unwrap()
            .unwrap();
        assert_eq!(base.protocol, Protocol::HttpProtobuf);
        assert_eq!(base.endpoint, "http://collector:4318/v1/traces");
        let grpc = config(&[
            (ENDPOINT, "http://collector:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(grpc.protocol, Protocol::Grpc);
        assert_eq!(grpc.endpoint, "http://collector:4317");
        // The traces variables win over the general ones.
        let traces = config(&[
            (ENDPOINT, "http://collector:4317"),
            (TRACES_ENDPOINT, "http://traces:4318/custom"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(traces.protocol, Protocol::HttpJson);
        assert_eq!(traces.endpoint, "http://traces:4318/custom");
    }

    #[test]
    fn a_wrong_protocol_is_named_and_a_password_never_shown() {
        let error = config(&[
            (ENDPOINT, "http://collector:4318"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuff"),
        ])
        .unwrap_err();
        assert!(
            error.contains("OTEL_EXPORTER_OTLP_PROTOCOL=\"http/protobuff\""),
            "{error}"
        );
        let secret = config(&[(ENDPOINT, "https://user:hunter2@collector:4318")])
            .unwrap()
            .unwrap();
        assert_eq!(secret.endpoint, "https://user:***@collector:4318/v1/traces");
        assert_eq!(
            secret.scrub(
                "error sending request for url (https://user:hunter2@collector:4318/v1/traces)"
            ),
            "error sending request for url (https://user:***@collector:4318/v1/traces)"
        );
    }

    #[test]
    fn failures_are_counted_between_warnings() {
        let log = ExportLog::new(
            config(&[(ENDPOINT, "http://127.0.0.1:9")])
                .unwrap()
                .unwrap(),
        );
        log.failed(3, "refused");
        log.failed(2, "refused");
        log.failed(1, "refused");
        {
            let state = log.state();
            assert!(state.warned);
            assert_eq!((state.unreported, state.unreported_spans), (2, 3));
        }
        log.succeeded();
        let state = log.state();
        assert!(!state.warned);
        assert_eq!((state.unreported, state.unreported_spans), (0, 0));
        assert!(
            state.last_warning.is_some(),
            "the next failure within a minute is counted, not shown"
        );
    }
}
