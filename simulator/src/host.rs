//! Serving simulated hosts: a listener with `TCP_NODELAY`, request latency
//! and injected transient errors in front of a kind's routes.
//!
//! A [`Host`] can also reboot: it closes its listener, so connections are
//! refused as by a restarting appliance, and listens again on the same
//! address once the reboot is over. A host given a TLS configuration serves
//! HTTPS.

use crate::{clock::Clock, faults::Dice};
use axum::{
    Router,
    extract::{Request, State},
    http::StatusCode,
    middleware::{self, Next},
    response::{IntoResponse, Response},
    serve::{Listener, ListenerExt},
};
use base64::Engine;
use hyper_util::{rt::TokioIo, service::TowerToHyperService};
use std::{
    net::SocketAddr,
    ops::RangeInclusive,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How a host answers, whatever its kind.
#[derive(Debug, Clone)]
pub(crate) struct Behaviour {
    /// Time taken before answering each request.
    pub(crate) latency: RangeInclusive<Duration>,
    /// Latency added to every request, switched while the host runs.
    pub(crate) slowdown: Slowdown,
    pub(crate) dice: Arc<Mutex<Dice>>,
    /// The body of an injected 500.
    pub(crate) error_body: &'static str,
    /// The device's clock, for every answer's `Date` header.
    pub(crate) clock: Clock,
    /// Answers that test what a worker accepts from a device.
    pub(crate) shape: Shape,
}

/// A host's extra latency, shared with whoever changes it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Slowdown(Arc<AtomicU64>);

impl Slowdown {
    pub(crate) fn set(&self, extra: Duration) {
        self.0.store(extra.as_millis() as u64, Ordering::Relaxed);
    }

    fn get(&self) -> Duration {
        Duration::from_millis(self.0.load(Ordering::Relaxed))
    }
}

/// How every answer of a host is bent, whatever the API.
#[derive(Debug, Clone, Default)]
pub(crate) struct Shape {
    /// Every request is answered `307 Temporary Redirect` to this URL.
    pub(crate) redirect_to: Option<String>,
    /// Bytes of whitespace after every answer's body (JSON stays valid).
    pub(crate) padding: usize,
}

fn app(routes: Router, behaviour: Behaviour) -> Router {
    routes.layer(middleware::from_fn_with_state(behaviour, misbehave))
}

fn spawn_server(
    listener: TcpListener,
    app: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    if let Some(config) = tls {
        let listener = crate::tls::TlsListener::new(listener, config)?;
        tokio::spawn(serve(listener, app, stop));
        return Ok(());
    }
    // Without it, keep-alive calls wait ~40 ms on a delayed ACK.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tokio::spawn(serve(listener, app, stop));
    Ok(())
}

/// Serves `app` on `listener` until `stop`, then lets each connection
/// finish its request and closes it (an idle keep-alive one at once). The
/// connections are served by hyper directly, with its own `Date` header
/// off: the device's clock decides it (`misbehave`), or that there is
/// none.
async fn serve<L>(mut listener: L, app: Router, stop: CancellationToken)
where
    L: Listener,
    L::Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    loop {
        let io = tokio::select! {
            (io, _) = listener.accept() => io,
            () = stop.cancelled() => return,
        };
        let service = TowerToHyperService::new(app.clone());
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.auto_date_header(false);
            let connection = builder.serve_connection(TokioIo::new(io), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                () = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
}

/// A host that can reboot: while it is down, connections are refused.
#[derive(Clone)]
pub(crate) struct Host {
    addr: SocketAddr,
    app: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    up: Arc<AtomicBool>,
    /// Stops the current listener (a reboot) or every listener (the fleet).
    current: Arc<Mutex<CancellationToken>>,
    fleet_stop: CancellationToken,
}

impl Host {
    pub(crate) async fn start(
        addr: SocketAddr,
        routes: Router,
        behaviour: Behaviour,
        tls: Option<Arc<rustls::ServerConfig>>,
        fleet_stop: CancellationToken,
    ) -> std::io::Result<Host> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let app = app(routes, behaviour);
        let current = fleet_stop.child_token();
        spawn_server(listener, app.clone(), tls.clone(), current.clone())?;
        Ok(Host {
            addr,
            app,
            tls,
            up: Arc::new(AtomicBool::new(true)),
            current: Arc::new(Mutex::new(current)),
            fleet_stop,
        })
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Goes down at once: the listener closes, so connections are refused.
    pub(crate) fn take_down(&self) {
        if self.up.swap(false, Ordering::SeqCst) {
            self.current
                .lock()
                .expect("the host lock is never poisoned: nothing panics while holding it")
                .cancel();
        }
    }

    /// Listens again on the same address.
    pub(crate) async fn bring_up(&self) -> std::io::Result<()> {
        if self.up.load(Ordering::SeqCst) || self.fleet_stop.is_cancelled() {
            return Ok(());
        }
        // The port was ours a moment ago; retry briefly if the kernel has
        // not released it yet.
        let mut attempts = 0;
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(listener) => break listener,
                Err(error) if attempts >= 50 => return Err(error),
                Err(_) => attempts += 1,
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let token = self.fleet_stop.child_token();
        spawn_server(listener, self.app.clone(), self.tls.clone(), token.clone())?;
        *self
            .current
            .lock()
            .expect("the host lock is never poisoned") = token;
        self.up.store(true, Ordering::SeqCst);
        Ok(())
    }
}

async fn misbehave(State(behaviour): State<Behaviour>, request: Request, next: Next) -> Response {
    let (delay, fail) = {
        let mut dice = behaviour
            .dice
            .lock()
            .expect("dice lock is never poisoned: no panics while held");
        (
            dice.duration(&behaviour.latency) + behaviour.slowdown.get(),
            dice.transient_error(),
        )
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let mut response = if let Some(location) = &behaviour.shape.redirect_to {
        (
            StatusCode::TEMPORARY_REDIRECT,
            [(axum::http::header::LOCATION, location.clone())],
        )
            .into_response()
    } else if fail {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            [("content-type", "application/json")],
            behaviour.error_body,
        )
            .into_response()
    } else {
        next.run(request).await
    };
    if behaviour.shape.padding > 0 {
        response = pad(response, behaviour.shape.padding).await;
    }
    // The device's own clock, not the machine's (the server adds none).
    if let Some(Ok(date)) = behaviour.clock.http_date().map(|d| d.parse()) {
        response
            .headers_mut()
            .insert(axum::http::header::DATE, date);
    }
    response
}

async fn pad(response: Response, padding: usize) -> Response {
    let (mut parts, body) = response.into_parts();
    let mut bytes = axum::body::to_bytes(body, usize::MAX)
        .await
        .map(|b| b.to_vec())
        .unwrap_or_default();
    bytes.resize(bytes.len() + padding, b' ');
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(bytes))
}

/// Whether the request carries HTTP Basic credentials `user`:`password`.
pub(crate) fn basic_auth_matches(
    headers: &axum::http::HeaderMap,
    user: &str,
    password: &str,
) -> bool {
    let Some(value) = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some(encoded) = value.strip_prefix("Basic ") else {
        return false;
    };
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
        return false;
    };
    decoded == format!("{user}:{password}").as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;

    #[tokio::test]
    async fn a_host_that_is_down_refuses_connections_then_answers_again() {
        let behaviour = Behaviour {
            latency: Duration::ZERO..=Duration::ZERO,
            slowdown: Slowdown::default(),
            dice: Arc::new(Mutex::new(Dice::new([1; 32], 0.0))),
            error_body: "{}",
            clock: Clock::default(),
            shape: Shape::default(),
        };
        let stop = CancellationToken::new();
        let routes = Router::new().route("/ping", get(|| async { "pong" }));
        let host = Host::start(
            "127.0.0.1:0".parse().unwrap(),
            routes,
            behaviour,
            None,
            stop.clone(),
        )
        .await
        .unwrap();
        let connect = || tokio::net::TcpStream::connect(host.addr());
        assert!(connect().await.is_ok());

        host.take_down();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let refused = connect().await.unwrap_err();
        assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);

        host.bring_up().await.unwrap();
        assert!(
            connect().await.is_ok(),
            "the host listens again after its reboot"
        );
        stop.cancel();
    }

    #[tokio::test]
    async fn going_down_breaks_open_keep_alive_connections() {
        flotilla_common::ensure_crypto_provider();
        let behaviour = Behaviour {
            latency: Duration::ZERO..=Duration::ZERO,
            slowdown: Slowdown::default(),
            dice: Arc::new(Mutex::new(Dice::new([1; 32], 0.0))),
            error_body: "{}",
            clock: Clock::default(),
            shape: Shape::default(),
        };
        let stop = CancellationToken::new();
        let routes = Router::new().route("/ping", get(|| async { "pong" }));
        let host = Host::start(
            "127.0.0.1:0".parse().unwrap(),
            routes,
            behaviour,
            None,
            stop.clone(),
        )
        .await
        .unwrap();
        let client = reqwest::Client::new();
        let url = format!("http://{}/ping", host.addr());
        assert_eq!(client.get(&url).send().await.unwrap().status(), 200);
        host.take_down();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let during = client.get(&url).send().await;
        assert!(during.is_err(), "answered while rebooting: {during:?}");
        stop.cancel();
    }

    #[tokio::test]
    async fn the_date_header_is_the_devices_clock_or_none_at_all() {
        flotilla_common::ensure_crypto_provider();
        let stop = CancellationToken::new();
        let client = reqwest::Client::new();
        for (clock, expected) in [
            (Clock::new(-3_600, true), Some(-3_600)),
            (Clock::new(0, false), None),
        ] {
            let behaviour = Behaviour {
                latency: Duration::ZERO..=Duration::ZERO,
                slowdown: Slowdown::default(),
                dice: Arc::new(Mutex::new(Dice::new([1; 32], 0.0))),
                error_body: "{}",
                clock,
                shape: Shape::default(),
            };
            let routes = Router::new().route("/ping", get(|| async { "pong" }));
            let host = Host::start(
                "127.0.0.1:0".parse().unwrap(),
                routes,
                behaviour,
                None,
                stop.clone(),
            )
            .await
            .unwrap();
            let answer = client
                .get(format!("http://{}/ping", host.addr()))
                .send()
                .await
                .unwrap();
            let date = answer
                .headers()
                .get(reqwest::header::DATE)
                .map(|d| chrono::DateTime::parse_from_rfc2822(d.to_str().unwrap()).unwrap());
            match expected {
                None => assert!(date.is_none(), "a Date header was sent: {date:?}"),
                Some(offset) => {
                    let skew = date.unwrap().timestamp() - chrono::Utc::now().timestamp();
                    assert!((skew - offset).abs() <= 2, "Date is {skew} s off");
                }
            }
        }
        stop.cancel();
    }
}
