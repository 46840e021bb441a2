//! Connecting to RabbitMQ and publishing with confirms.
//!
//! Channels are long-lived and never shared between tasks that publish
//! concurrently: with lapin, two tasks awaiting confirms on one channel can
//! receive each other's confirms. Each publishing task owns a [`Publisher`].

use crate::headers;
use deadpool_lapin::{Config, Pool, Runtime};
use lapin::{
    BasicProperties, Channel, ConnectionProperties, PublisherConfirm,
    options::{BasicPublishOptions, ConfirmSelectOptions},
    types::{AMQPValue, FieldTable},
    uri::AMQPUri,
};
use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};
use tracing::warn;

/// The broker every command uses unless told otherwise.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// AMQP delivery mode that survives a broker restart.
const PERSISTENT: u8 = 2;

/// How long to wait for the broker to accept a connection before saying it
/// is not there.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// Nothing answered at the URL's address, or it did not speak AMQP in
    /// time: worth retrying.
    #[error("cannot reach RabbitMQ at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    /// The broker answered and turned the login down (user, password,
    /// vhost or permissions): retrying with the same URL cannot help.
    #[error("RabbitMQ at {url} refused user {user} on vhost {vhost}: {reason}")]
    Refused {
        url: String,
        user: String,
        vhost: String,
        reason: String,
    },
    #[error("invalid AMQP URL {url}: {reason}")]
    BadUrl { url: String, reason: String },
    /// lapin's error, whose text already holds its source: not marked as
    /// a `#[source]`, so a printed chain says it once, not three times.
    #[error("RabbitMQ: {0}")]
    Amqp(lapin::Error),
    #[error("the broker connection was lost")]
    ConnectionLost,
    #[error("RabbitMQ refused (nacked) a message for {queue}")]
    Nacked { queue: String },
    /// A read of a stream shared by several waiters failed; each gets its
    /// text.
    #[error("reading stream {stream}: {reason}")]
    Read { stream: String, reason: String },
    /// A transaction several hand-offs shared failed; each gets its text.
    #[error("committing hand-offs: {reason}")]
    Commit { reason: String },
}

impl From<lapin::Error> for BrokerError {
    fn from(error: lapin::Error) -> Self {
        BrokerError::Amqp(error)
    }
}

impl BrokerError {
    /// The broker turned the login down: a configuration to fix, not an
    /// outage to wait out.
    pub fn is_refused(&self) -> bool {
        matches!(self, BrokerError::Refused { .. })
    }

    /// The broker could not be reached, or its connection was lost.
    pub fn is_unreachable(&self) -> bool {
        match self {
            BrokerError::Unreachable { .. } | BrokerError::ConnectionLost => true,
            BrokerError::Amqp(error) => {
                error.is_io_error()
                    || matches!(
                        error.kind(),
                        lapin::ErrorKind::InvalidConnectionState(_)
                            | lapin::ErrorKind::MissingHeartbeatError
                    )
            }
            _ => false,
        }
    }
}

/// A handle on a RabbitMQ broker, one node or a cluster's; cheap to clone.
///
/// `AMQP_URL` may list several nodes of one cluster, comma-separated. A
/// connection goes to the node that answered last; when that node is gone
/// (refused or silent), the next in the list is tried, round the list once,
/// and the first that answers becomes the node every clone uses. Queues and
/// streams are replicated across the cluster (see [`crate::topology`]), so
/// any node serves them.
#[derive(Clone)]
pub struct Broker {
    nodes: Arc<[Node]>,
    /// The node connections go to, an index into `nodes`.
    current: Arc<AtomicUsize>,
    /// Every node's URL with its password masked, for messages.
    display_url: String,
}

/// One node's pool. Connections come from a small pool that replaces a
/// dropped connection on the next request.
struct Node {
    pool: Pool,
    /// The URL with its password masked, for messages.
    display_url: String,
    /// Who logs in where, to name them when the broker says no.
    user: String,
    vhost: String,
}

/// The largest frame a connection asks for, unless its URL names one.
/// lapin keeps a read and a write ring of 32 frames for each connection,
/// and RabbitMQ offers 128 KiB frames: 8 MiB a connection, every page of it
/// touched as the rings turn. Jobs and events are a few KiB; a larger
/// message only takes more frames. With 16 KiB frames a worker peaked at
/// 33 MiB at 100,000 CPEs against 40, at the same rate.
const FRAME_MAX: u32 = 16 * 1024;

/// How long closing a connection waits for the broker's answer.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Closes `connection`, giving up on the broker's answer after
/// [`CLOSE_TIMEOUT`]. Errors are ignored: the connection is done with.
///
/// lapin closes a dropped channel from a task of its own. When that task
/// runs after the connection began closing, it fails; lapin takes the
/// failure for a connection error and stops reading the socket, so the
/// broker's close-ok is never read and `close` would wait forever (seen
/// with lapin 4.12, about once in twenty test runs that read a stream and
/// close at once). The broker closes the socket once it has answered, so
/// giving up loses nothing.
pub async fn close_connection(connection: &lapin::Connection, reason: &str) {
    let close = connection.close(200, reason.into());
    if tokio::time::timeout(CLOSE_TIMEOUT, close).await.is_err() {
        tracing::debug!(
            reason,
            "the broker's answer to closing a connection was not read"
        );
    }
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("url", &self.display_url)
            .finish()
    }
}

impl Broker {
    /// `url` is one AMQP URL or several, comma-separated (a comma inside a
    /// password is written `%2C`). `name` shows in RabbitMQ's connection
    /// list (say which process it is).
    pub fn new(url: &str, name: &str) -> Result<Self, BrokerError> {
        let urls = split_urls(url);
        if urls.is_empty() {
            return Err(BrokerError::BadUrl {
                url: String::new(),
                reason: "no AMQP URL given".to_owned(),
            });
        }
        let nodes = urls
            .iter()
            .map(|url| Node::new(url, name))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Broker {
            display_url: redact_url(url),
            nodes: nodes.into(),
            current: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// The broker URL (every node's) with passwords masked.
    pub fn display_url(&self) -> &str {
        &self.display_url
    }

    /// The node connections go to now, its password masked.
    pub fn current_node(&self) -> &str {
        &self.nodes[self.current.load(Ordering::Relaxed) % self.nodes.len()].display_url
    }

    /// A live connection: a pooled one, or a new one if the last has
    /// dropped, on the current node or, when it is gone, the next that
    /// answers. A refused login is returned at once: a cluster's nodes
    /// share their users, so another node would refuse it too.
    pub async fn connection(&self) -> Result<deadpool_lapin::Connection, BrokerError> {
        let first = self.current.load(Ordering::Relaxed);
        let mut failures = Vec::new();
        for step in 0..self.nodes.len() {
            let index = (first + step) % self.nodes.len();
            let node = &self.nodes[index];
            match node.connection().await {
                Ok(connection) => {
                    if step > 0 {
                        // Another clone may have moved on already; either
                        // node answers.
                        self.current.store(index, Ordering::Relaxed);
                        warn!(node = %node.display_url, "connected to the next RabbitMQ node");
                    }
                    return Ok(connection);
                }
                Err(error @ BrokerError::Refused { .. }) => return Err(error),
                Err(error) => {
                    if self.nodes.len() > 1 {
                        warn!(node = %node.display_url, %error, "RabbitMQ node unavailable; trying the next");
                    }
                    failures.push(error);
                }
            }
        }
        Err(match failures.len() {
            1 => failures.remove(0),
            _ => BrokerError::Unreachable {
                url: self.display_url.clone(),
                reason: format!(
                    "no node answered ({})",
                    failures
                        .iter()
                        .map(|failure| match failure {
                            BrokerError::Unreachable { url, reason } => format!("{url}: {reason}"),
                            other => other.to_string(),
                        })
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            },
        })
    }
}

impl Node {
    fn new(url: &str, name: &str) -> Result<Self, BrokerError> {
        let display_url = redact_one(url).unwrap_or_else(|| UNPARSEABLE.to_owned());
        // The pool parses the URL only when it first connects, which would
        // report a typo as an unreachable broker.
        let parsed: AMQPUri = url.parse().map_err(|reason| BrokerError::BadUrl {
            url: display_url.clone(),
            reason,
        })?;
        let name = name.to_owned();
        let config = Config {
            url: Some(with_frame_max(url)),
            ..Config::default()
        };
        let pool = config
            .builder(
                move || ConnectionProperties::default().with_connection_name(name.clone().into()),
                Runtime::Tokio1,
            )
            .map_err(|e| BrokerError::BadUrl {
                url: display_url.clone(),
                reason: e.to_string(),
            })?
            .max_size(4)
            .create_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| BrokerError::BadUrl {
                url: display_url.clone(),
                reason: e.to_string(),
            })?;
        Ok(Node {
            pool,
            display_url,
            user: parsed.authority.userinfo.username,
            vhost: parsed.vhost,
        })
    }

    async fn connection(&self) -> Result<deadpool_lapin::Connection, BrokerError> {
        self.pool.get().await.map_err(|e| match e {
            deadpool_lapin::PoolError::Backend(e) => self.connect_error(&e),
            deadpool_lapin::PoolError::Timeout(_) => {
                self.unreachable(format!("no answer within {}s", CONNECT_TIMEOUT.as_secs()))
            }
            other => self.unreachable(other.to_string()),
        })
    }

    /// Tells a login the broker turned down from a broker that is not
    /// there. RabbitMQ closes the handshake with 403 ACCESS_REFUSED for a
    /// wrong user or password (it does not say which, nor that `guest` may
    /// only log in from localhost), and with 530 NOT_ALLOWED for a vhost
    /// that does not exist or that the user has no permissions on.
    fn connect_error(&self, error: &lapin::Error) -> BrokerError {
        let lapin::ErrorKind::ProtocolError(amqp) = error.kind() else {
            return self.unreachable(error.to_string());
        };
        // The broker's text starts with its code's name: "NOT_ALLOWED - ...".
        let text = amqp.get_message().as_str();
        let text = text.split_once(" - ").map_or(text, |(_, rest)| rest);
        let reason = match amqp.get_id() {
            ACCESS_REFUSED => "access refused (a wrong user name or password, or a user such as \
                               guest that may log in from localhost only)"
                .to_owned(),
            NOT_ALLOWED => text.to_owned(),
            _ => return self.unreachable(error.to_string()),
        };
        BrokerError::Refused {
            url: self.display_url.clone(),
            user: self.user.clone(),
            vhost: self.vhost.clone(),
            reason,
        }
    }

    fn unreachable(&self, reason: String) -> BrokerError {
        BrokerError::Unreachable {
            url: self.display_url.clone(),
            reason,
        }
    }
}

/// AMQP reply codes RabbitMQ closes a refused handshake with.
const ACCESS_REFUSED: u16 = 403;
const NOT_ALLOWED: u16 = 530;

/// The URLs of a comma-separated list, blanks dropped.
fn split_urls(urls: &str) -> Vec<&str> {
    urls.split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .collect()
}

/// Masks the passwords of an AMQP URL, or of a comma-separated list of
/// them, so it can be logged.
///
/// A password with an unescaped comma splits its URL in two, and the part
/// after the comma may parse as a URL of its own (`a:rest-of-password@`);
/// so only AMQP URLs with a host are shown, and a list with any other part
/// is not shown at all.
pub fn redact_url(urls: &str) -> String {
    let shown: Option<Vec<String>> = split_urls(urls).into_iter().map(redact_one).collect();
    match shown {
        Some(shown) => shown.join(","),
        None => UNPARSEABLE.to_owned(),
    }
}

const UNPARSEABLE: &str = "<unparseable AMQP URL>";

/// An AMQP URL as messages show it: scheme, user, host, port and vhost,
/// never the password, nor a query or fragment (a `?` or `#` in an
/// unescaped password puts its tail there), nor a path holding an `@` (a
/// `/` in the password puts its tail there).
fn redact_one(url: &str) -> Option<String> {
    let parsed = url::Url::parse(url).ok()?;
    let host = parsed.host_str()?;
    if !matches!(parsed.scheme(), "amqp" | "amqps") {
        return None;
    }
    let mut shown = format!("{}://", parsed.scheme());
    match (parsed.username(), parsed.password()) {
        ("", None) => {}
        (user, None) => shown.push_str(&format!("{user}@")),
        (user, Some(_)) => shown.push_str(&format!("{user}:***@")),
    }
    shown.push_str(host);
    if let Some(port) = parsed.port() {
        shown.push_str(&format!(":{port}"));
    }
    match parsed.path() {
        path if path.contains('@') => shown.push_str("/…"),
        "/" | "" => {}
        path => shown.push_str(path),
    }
    Some(shown)
}

/// `url` asking for [`FRAME_MAX`]-byte frames, unless it asks for a size
/// itself (or cannot be read, which the caller reports).
fn with_frame_max(url: &str) -> String {
    let Ok(mut parsed) = url::Url::parse(url) else {
        return url.to_owned();
    };
    if parsed.query_pairs().any(|(key, _)| key == "frame_max") {
        return url.to_owned();
    }
    parsed
        .query_pairs_mut()
        .append_pair("frame_max", &FRAME_MAX.to_string());
    parsed.into()
}

/// A channel in confirm mode, owned by one publishing task.
pub struct Publisher {
    channel: Channel,
}

impl Publisher {
    pub async fn open(connection: &lapin::Connection) -> Result<Self, BrokerError> {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Publisher { channel })
    }

    pub fn is_usable(&self) -> bool {
        self.channel.status().connected()
    }

    /// Sends a persistent message to `queue`; the returned [`Confirm`]
    /// resolves when the broker has taken responsibility for it.
    pub async fn send(
        &self,
        queue: &str,
        body: &[u8],
        message: Message,
    ) -> Result<Confirm, BrokerError> {
        let confirm = self
            .channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body,
                message.into_properties(),
            )
            .await?;
        Ok(Confirm {
            queue: queue.to_owned(),
            confirm,
        })
    }

    /// Sends and waits for the broker's confirm.
    pub async fn publish(
        &self,
        queue: &str,
        body: &[u8],
        message: Message,
    ) -> Result<(), BrokerError> {
        self.send(queue, body, message).await?.wait().await
    }
}

/// A pending publisher confirm.
pub struct Confirm {
    queue: String,
    confirm: PublisherConfirm,
}

impl Confirm {
    /// Waits for the broker's answer; a nack is an error (lapin reports it
    /// as a successful `Confirmation::Nack`).
    pub async fn wait(self) -> Result<(), BrokerError> {
        if self.confirm.await?.is_ack() {
            Ok(())
        } else {
            Err(BrokerError::Nacked { queue: self.queue })
        }
    }
}

/// The metadata of a message: what it is and its headers (trace context,
/// due time, dead-letter reason).
#[derive(Debug, Clone, Default)]
pub struct Message {
    kind: &'static str,
    id: Option<String>,
    headers: FieldTable,
}

impl Message {
    /// `kind` names the payload type (`flotilla.job.v1`).
    pub fn new(kind: &'static str) -> Self {
        Message {
            kind,
            ..Message::default()
        }
    }

    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Sets every header at once, from a table copied off another message,
    /// say; that message's own hand-off routing is not copied.
    pub fn headers(mut self, mut headers: FieldTable) -> Self {
        headers::remove(&mut headers, &[headers::CC, headers::AFTER_HOP]);
        self.headers = headers;
        self
    }

    pub fn header(mut self, name: &str, value: impl Into<headers::Value>) -> Self {
        headers::set(&mut self.headers, name, value);
        self
    }

    /// Signs the message as a job whose body is `body` (see
    /// [`crate::signing`]). Call it last: a due-at header set after it is
    /// not covered, and the job would not verify.
    pub fn signed(mut self, keyring: &crate::signing::Keyring, body: &[u8]) -> Self {
        keyring.sign(body, &mut self.headers);
        self
    }

    /// Makes this message the record of the hand-off of the delivery whose
    /// hop is `hop`: the same publish also appends it to `handoffs` (a
    /// stream). One publish reaches all its queues or none, even if the
    /// publisher dies at once, so the record exists exactly when this
    /// message does.
    pub fn hands_off(self, hop: &str, handoffs: &str) -> Self {
        self.hands_off_all(&[hop], handoffs)
    }

    /// Makes this message the record of the hand-offs of several
    /// deliveries (see [`Message::hands_off`] and [`headers::join_hops`]).
    pub fn hands_off_all(mut self, hops: &[&str], handoffs: &str) -> Self {
        headers::set(
            &mut self.headers,
            headers::AFTER_HOP,
            headers::join_hops(hops),
        );
        self.headers.insert(
            headers::CC.into(),
            AMQPValue::FieldArray(vec![AMQPValue::LongString(handoffs.into())].into()),
        );
        self
    }

    pub(crate) fn into_properties(mut self) -> BasicProperties {
        if self.kind == crate::JOB_MESSAGE_TYPE {
            // Every publish of a job is a hop of its own, a copy of an
            // earlier message's headers included.
            let hop = uuid::Uuid::new_v4().to_string();
            headers::set(&mut self.headers, headers::HOP, hop);
        }
        let mut properties = BasicProperties::default()
            .with_delivery_mode(PERSISTENT)
            .with_content_type("application/json".into())
            .with_type(self.kind.into())
            .with_timestamp(chrono::Utc::now().timestamp() as u64)
            .with_headers(self.headers);
        if let Some(id) = self.id {
            properties = properties.with_message_id(id.into());
        }
        properties
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(
            redact_url("amqp://guest:s3cret@10.0.0.1:5672/%2f"),
            "amqp://guest:***@10.0.0.1:5672/%2f"
        );
        assert_eq!(redact_url("amqp://10.0.0.1"), "amqp://10.0.0.1");
    }

    #[test]
    fn connections_ask_for_small_frames_unless_the_url_says_otherwise() {
        assert_eq!(
            with_frame_max("amqp://guest:p%23w@127.0.0.1:5672/%2f"),
            "amqp://guest:p%23w@127.0.0.1:5672/%2f?frame_max=16384"
        );
        assert_eq!(
            with_frame_max("amqp://[::1]/vh?heartbeat=10"),
            "amqp://[::1]/vh?heartbeat=10&frame_max=16384"
        );
        let asked = "amqp://127.0.0.1/%2f?frame_max=131072";
        assert_eq!(with_frame_max(asked), asked);
    }

    #[test]
    fn a_malformed_url_is_refused_before_any_connection() {
        let error = Broker::new("amqp//guest@127.0.0.1", "test").unwrap_err();
        assert!(matches!(error, BrokerError::BadUrl { .. }), "{error}");
    }

    // The pool needs a runtime to be built.
    #[tokio::test]
    async fn refusals_name_the_user_and_the_decoded_vhost() {
        let broker = Broker::new("amqp://ops:pw@127.0.0.1:5672/%2fx", "test").unwrap();
        let node = &broker.nodes[0];
        assert_eq!((node.user.as_str(), node.vhost.as_str()), ("ops", "/x"));
        let broker = Broker::new("amqp://127.0.0.1", "test").unwrap();
        let node = &broker.nodes[0];
        assert_eq!((node.user.as_str(), node.vhost.as_str()), ("guest", "/"));
    }

    #[tokio::test]
    async fn a_list_names_every_node_without_its_password() {
        let broker = Broker::new(
            " amqp://ops:pw1@rabbit-1:5672/%2f , amqp://ops:pw2@rabbit-2:5672/%2f,",
            "test",
        )
        .unwrap();
        assert_eq!(broker.nodes.len(), 2);
        assert_eq!(
            broker.display_url(),
            "amqp://ops:***@rabbit-1:5672/%2f,amqp://ops:***@rabbit-2:5672/%2f"
        );
        assert_eq!(broker.current_node(), "amqp://ops:***@rabbit-1:5672/%2f");
        assert!(matches!(
            Broker::new(" , ", "test").unwrap_err(),
            BrokerError::BadUrl { .. }
        ));
        // A bad node anywhere in the list is refused up front, named
        // without its password.
        let error = Broker::new(
            "amqp://ops:pw1@rabbit-1,amqp://ops:pw2@rabbit-2:99999",
            "test",
        )
        .unwrap_err()
        .to_string();
        assert!(!error.contains("pw2") && !error.contains("pw1"), "{error}");
    }

    #[tokio::test]
    async fn every_node_is_tried_and_named_when_none_answers() {
        // Two ports nothing listens on, refused at once: both are tried,
        // each named, and the answer is an outage, not a refused login.
        // (tests/tests/integration/cluster.rs has a live node behind them.)
        let dead = |port| {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            drop(listener);
            format!("amqp://ops:s3cret@{addr}/%2f{port}")
        };
        let urls = format!("{},{}", dead(1), dead(2));
        let broker = Broker::new(&urls, "test").unwrap();
        let error = broker.connection().await.unwrap_err();
        assert!(error.is_unreachable(), "{error}");
        let text = error.to_string();
        assert!(text.contains("no node answered"), "{text}");
        assert_eq!(text.matches("Connection refused").count(), 2, "{text}");
        assert!(!text.contains("s3cret"), "{text}");
    }

    mod hostile_urls {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            // Quick (no connection is made): 256 cases unless
            // PROPTEST_CASES says otherwise.
            #![proptest_config(ProptestConfig {
                cases: std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(256),
                failure_persistence: None,
                ..ProptestConfig::default()
            })]

            /// Whatever a password holds and whatever surrounds it,
            /// well-formed or not, neither an error nor the displayed URL
            /// shows it (nor, when a comma in it splits the list, a part).
            #[test]
            fn no_message_shows_a_password(
                scheme in "(amqps?|http|)",
                user in "[a-z@.:-]{0,6}",
                inside in "[a-z0-9/:@%?#,\\[\\] ]{0,4}",
                after in "[a-zA-Z0-9:/%@.?#\\[\\] -]{0,16}",
                others in "(,amqp://u:p@h){0,2}",
            ) {
                let (head, tail) = ("Zq7s3", "cretXy");
                let url = format!("{scheme}://{user}:{head}{inside}{tail}@{after}{others}");
                let shown = |text: &str| text.contains(head) || text.contains(tail);
                prop_assert!(!shown(&redact_url(&url)), "{}", redact_url(&url));
                let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
                let _guard = runtime.enter();
                match Broker::new(&url, "test") {
                    Ok(broker) => {
                        prop_assert!(!shown(broker.display_url()));
                        prop_assert!(!shown(broker.current_node()));
                        let debug = format!("{broker:?}");
                        prop_assert!(!shown(&debug));
                    }
                    Err(error) => prop_assert!(!shown(&error.to_string()), "{error}"),
                }
            }
        }
    }
}
