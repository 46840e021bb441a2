//! A small OTLP trace receiver on a loopback port that speaks the three
//! protocols Flotilla exports with: HTTP with protobuf or JSON bodies
//! (`POST /v1/traces`) and gRPC (`TraceService/Export` over HTTP/2 without
//! TLS). It keeps every span with the service that sent it and the
//! protocol it came by.

use axum::{
    Router,
    body::{Body, Bytes},
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header::CONTENT_TYPE},
    response::{IntoResponse, Response},
    routing::post,
};
use http_body::Frame;
use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::{KeyValue, any_value::Value},
};
use prost::Message;
use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

/// The gRPC method an OTLP trace exporter calls.
const GRPC_EXPORT: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// A span as it arrived.
#[derive(Debug, Clone)]
pub struct Span {
    /// `grpc`, `http/protobuf` or `http/json`.
    pub protocol: &'static str,
    /// The resource's `service.name`.
    pub service: String,
    pub trace: String,
    pub id: String,
    /// Empty for a trace's root.
    pub parent: String,
    pub name: String,
    pub attributes: HashMap<String, String>,
}

#[derive(Default)]
struct Shared {
    spans: Mutex<Vec<Span>>,
    requests: AtomicUsize,
    /// Answer every export with 400 Bad Request, which exporters do not
    /// retry.
    reject: bool,
}

pub struct OtlpReceiver {
    /// `http://127.0.0.1:<port>`, for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub endpoint: String,
    shared: Arc<Shared>,
}

impl OtlpReceiver {
    pub async fn start() -> OtlpReceiver {
        OtlpReceiver::serve(false).await
    }

    /// A receiver that refuses every export (and counts them).
    pub async fn rejecting() -> OtlpReceiver {
        OtlpReceiver::serve(true).await
    }

    async fn serve(reject: bool) -> OtlpReceiver {
        let shared = Arc::new(Shared {
            reject,
            ..Shared::default()
        });
        let app = Router::new()
            .route("/v1/traces", post(http_export))
            .route(GRPC_EXPORT, post(grpc_export))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding a loopback port");
        let endpoint = format!(
            "http://{}",
            listener
                .local_addr()
                .expect("a bound listener has an address")
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        OtlpReceiver { endpoint, shared }
    }

    pub fn spans(&self) -> Vec<Span> {
        self.shared
            .spans
            .lock()
            .expect("no panic while held")
            .clone()
    }

    /// Export requests received, accepted or not.
    pub fn requests(&self) -> usize {
        self.shared.requests.load(Ordering::SeqCst)
    }
}

async fn http_export(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    shared.requests.fetch_add(1, Ordering::SeqCst);
    if shared.reject {
        return (
            StatusCode::BAD_REQUEST,
            "this receiver refuses every export",
        )
            .into_response();
    }
    let json = headers
        .get(CONTENT_TYPE)
        .is_some_and(|t| t.as_bytes().starts_with(b"application/json"));
    if json {
        let request: ExportTraceServiceRequest =
            serde_json::from_slice(&body).expect("an OTLP/JSON export request");
        keep(&shared, "http/json", request);
        ([(CONTENT_TYPE, "application/json")], "{}").into_response()
    } else {
        let request =
            ExportTraceServiceRequest::decode(body).expect("an OTLP/protobuf export request");
        keep(&shared, "http/protobuf", request);
        // An empty ExportTraceServiceResponse encodes to no bytes.
        ([(CONTENT_TYPE, "application/x-protobuf")], "").into_response()
    }
}

/// One unary gRPC call: a length-prefixed message in, a length-prefixed
/// (empty) response and a `grpc-status` trailer out.
async fn grpc_export(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    shared.requests.fetch_add(1, Ordering::SeqCst);
    let (status, message) = if shared.reject {
        ("3", "this receiver refuses every export")
    } else {
        assert_eq!(body.first(), Some(&0), "an uncompressed gRPC message");
        let request = ExportTraceServiceRequest::decode(body.slice(5..))
            .expect("a gRPC ExportTraceServiceRequest");
        keep(&shared, "grpc", request);
        ("0", "")
    };
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static(status));
    if !message.is_empty() {
        trailers.insert("grpc-message", HeaderValue::from_static(message));
    }
    let frames = [
        Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(&[0, 0, 0, 0, 0]))),
        Ok(Frame::trailers(trailers)),
    ];
    let body = http_body_util::StreamBody::new(futures::stream::iter(frames));
    ([(CONTENT_TYPE, "application/grpc")], Body::new(body)).into_response()
}

fn keep(shared: &Shared, protocol: &'static str, request: ExportTraceServiceRequest) {
    let mut spans = shared.spans.lock().expect("no panic while held");
    for resource in request.resource_spans {
        let service = resource
            .resource
            .map(|r| attributes(&r.attributes))
            .and_then(|mut a| a.remove("service.name"))
            .unwrap_or_default();
        for scope in resource.scope_spans {
            for span in scope.spans {
                spans.push(Span {
                    protocol,
                    service: service.clone(),
                    trace: hex::encode(&span.trace_id),
                    id: hex::encode(&span.span_id),
                    parent: hex::encode(&span.parent_span_id),
                    name: span.name,
                    attributes: attributes(&span.attributes),
                });
            }
        }
    }
}

fn attributes(list: &[KeyValue]) -> HashMap<String, String> {
    list.iter()
        .map(|kv| {
            let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(Value::StringValue(s)) => s.clone(),
                Some(Value::BoolValue(b)) => b.to_string(),
                Some(Value::IntValue(i)) => i.to_string(),
                Some(Value::DoubleValue(d)) => d.to_string(),
                Some(other) => format!("{other:?}"),
                None => String::new(),
            };
            (kv.key.clone(), value)
        })
        .collect()
}
