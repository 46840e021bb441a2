//! Logs and traces for every Flotilla process.
//!
//! Logs go to standard error, human-readable or as JSON lines (with the
//! fields of the spans they happen in, so a step's lines carry its campaign
//! and device). Traces are exported over OTLP ([`otlp`]: HTTP with
//! protobuf or JSON, or gRPC) only when the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is set; without
//! it no exporter, no OpenTelemetry layer, and no cost.
//!
//! One device's rollout is one trace: the producer starts it when it
//! publishes the job and writes its W3C context into the job's AMQP
//! headers; every step a worker runs is a child of that context, and the
//! context travels with the job through every re-enqueue and delay queue.

mod otlp;

use crate::headers;
use lapin::types::FieldTable;
use opentelemetry::{
    Context,
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::TracerProvider as _,
};
use opentelemetry_sdk::{propagation::TraceContextPropagator, trace::SdkTracerProvider};
use otlp::{ExportLog, OtlpConfig};
use std::{io::IsTerminal, sync::Arc};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{EnvFilter, Layer, layer::SubscriberExt, util::SubscriberInitExt};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Human,
    /// One JSON object per line, for log collectors.
    Json,
}

/// How a process logs.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// How log lines look (the filter is `RUST_LOG`).
    #[arg(long, env = "FLOTILLA_LOG_FORMAT", value_enum, default_value = "human")]
    pub log_format: LogFormat,
}

/// Keeps the trace exporter running; dropping it sends the spans still
/// buffered, so hold it until the process ends.
#[must_use = "dropping it stops trace export"]
pub struct Telemetry {
    export: Option<(SdkTracerProvider, Arc<ExportLog>)>,
}

impl Telemetry {
    /// Installs the process's logging and, when an OTLP endpoint is set,
    /// trace export (`service` names the process unless `OTEL_SERVICE_NAME`
    /// does). `default_filter` applies when `RUST_LOG` is unset. Call it
    /// inside the Tokio runtime: gRPC export runs there.
    pub fn init(service: &'static str, format: LogFormat, default_filter: &str) -> Telemetry {
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into());
        // Colours only on a terminal: log files and collectors get plain text.
        let fmt = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal());
        let fmt = match format {
            LogFormat::Human => fmt.boxed(),
            LogFormat::Json => fmt.json().boxed(),
        };
        let (export, otel_error) = match otlp_provider(service) {
            Ok(export) => (export, None),
            Err(error) => (None, Some(error)),
        };
        let otel = export.as_ref().map(|(provider, _)| {
            tracing_opentelemetry::layer()
                .with_tracer(provider.tracer(service))
                .with_filter(tracing_subscriber::filter::LevelFilter::INFO)
        });
        tracing_subscriber::registry()
            .with(fmt.with_filter(filter))
            .with(otel)
            .init();
        if let Some(error) = otel_error {
            tracing::warn!(%error, "traces will not be exported");
        }
        Telemetry { export }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some((provider, log)) = self.export.take() {
            if let Err(error) = provider.shutdown() {
                eprintln!("flushing traces: {error}");
            }
            log.finish();
        }
    }
}

fn otlp_provider(
    service: &'static str,
) -> Result<Option<(SdkTracerProvider, Arc<ExportLog>)>, String> {
    let Some(config) = OtlpConfig::from_env()? else {
        return Ok(None);
    };
    // The exporters' clients use rustls, which needs its provider.
    crate::ensure_crypto_provider();
    let exporter = config.exporter()?;
    let log = exporter.log.clone();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(otlp::resource(service))
        .build();
    Ok(Some((provider, log)))
}

/// Writes the trace context of the current span into AMQP headers. Writes
/// nothing when traces are not exported.
pub fn inject_current(table: &mut FieldTable) {
    let context = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&context, &mut HeaderWriter(table));
}

/// Makes `span` a child of the trace context carried in `table`, if any.
pub fn continue_trace(span: &tracing::Span, table: Option<&FieldTable>) {
    let Some(table) = table else { return };
    let context: Context = TraceContextPropagator::new().extract(&HeaderReader(table));
    // Fails only without the OpenTelemetry layer, when there is no trace.
    let _ = span.set_parent(context);
}

struct HeaderWriter<'a>(&'a mut FieldTable);

impl Injector for HeaderWriter<'_> {
    fn set(&mut self, key: &str, value: String) {
        headers::set(self.0, key, value);
    }
}

struct HeaderReader<'a>(&'a FieldTable);

impl Extractor for HeaderReader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match self.0.inner().get(key)? {
            lapin::types::AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        self.0.inner().keys().map(|k| k.as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_context_round_trips_through_amqp_headers() {
        let mut table = FieldTable::default();
        let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        headers::set(&mut table, headers::TRACEPARENT, traceparent);
        let context = TraceContextPropagator::new().extract(&HeaderReader(&table));
        let mut out = FieldTable::default();
        TraceContextPropagator::new().inject_context(&context, &mut HeaderWriter(&mut out));
        assert_eq!(
            headers::get_text(Some(&out), headers::TRACEPARENT).as_deref(),
            Some(traceparent)
        );
    }
}
