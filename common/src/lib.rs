//! What every Flotilla process shares: the job envelope and events that
//! travel through RabbitMQ, the topology they travel through, and the
//! plumbing to connect, publish with confirms and read streams.
//!
//! - [`job`]: the versioned job envelope (one device's upgrade).
//! - [`event`]: what happened, appended to the events stream.
//! - [`outcome`]: how a job ends.
//! - [`inventory`]: the inventory file format.
//! - [`settings`]: per-kind campaign settings; [`tls`]: how device
//!   certificates are checked.
//! - [`topology`]: queue names and their idempotent declaration.
//! - [`control`]: pause, resume and cancel commands.
//! - [`signing`]: job signatures, and the keys that make them.
//! - [`broker`], [`stream`], [`headers`]: AMQP plumbing.
//! - [`cli`]: settings every binary takes; [`ops`]: metrics and health
//!   endpoints; [`telemetry`]: logs and traces.

pub mod broker;
pub mod cli;
pub mod control;
pub mod event;
pub mod headers;
pub mod inventory;
pub mod job;
pub mod kind;
pub mod ops;
pub mod outcome;
pub mod settings;
pub mod signing;
pub mod stream;
pub mod telemetry;
pub mod tls;
pub mod topology;
pub mod transaction;

pub use broker::{Broker, BrokerError, DEFAULT_AMQP_URL, Message, Publisher};
pub use event::{
    CallFailure, CallSample, CappedTarget, ClaimEvent, DeadLetteredEvent, Decision, DecisionCounts,
    DecisionEvent, Event, EventBody, EventRecord, FinishedEvent, PauseCause, PublishedEvent,
    RateChange, StepEvent, Thresholds,
};
pub use job::{Device, JOB_VERSION, Job, JobPolicy, RetryPolicy, Target};
pub use kind::DeviceKind;
pub use outcome::{Ending, ErrorClass, Outcome};
pub use tls::TlsProfile;
pub use topology::{Topology, TopologyError};
pub use transaction::TxPublisher;

/// The AMQP `type` of a job message.
pub const JOB_MESSAGE_TYPE: &str = "flotilla.job.v1";
/// The AMQP `type` of an event message: one event.
pub const EVENT_MESSAGE_TYPE: &str = "flotilla.event.v1";
/// The AMQP `type` of a record holding several events, in order (see
/// [`event::EventRecord`]).
pub const EVENTS_MESSAGE_TYPE: &str = "flotilla.events.v1";

/// Installs `ring` as the process's TLS crypto provider, once. Every entry
/// point that makes HTTPS or AMQPS connections calls it; later calls do
/// nothing.
pub fn ensure_crypto_provider() {
    // Err only means a provider is installed already, which is the goal.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
