//! How a device's job ends, and why.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A job's terminal state. Every device ends in exactly one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Succeeded,
    Failed,
    /// The device did not finish before its deadline; the driver's cleanup ran.
    TimedOut,
    /// An operator cancelled the campaign; the driver's cleanup ran.
    Cancelled,
    /// No worker could process the device's job (undecodable, of a kind or
    /// step this worker does not know, or returned too often); it lies in
    /// the dead-letter queue, from where `dead redrive` re-queues it. No
    /// cleanup ran.
    DeadLettered,
}

impl Outcome {
    pub const ALL: [Outcome; 5] = [
        Outcome::Succeeded,
        Outcome::Failed,
        Outcome::TimedOut,
        Outcome::Cancelled,
        Outcome::DeadLettered,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Failed => "failed",
            Outcome::TimedOut => "timed_out",
            Outcome::Cancelled => "cancelled",
            Outcome::DeadLettered => "dead_lettered",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a job failed, in a word fit for a metric label and an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// The device (or its manager) refused or reported a failure in its own words.
    Device,
    /// The device refused our credentials.
    Auth,
    /// Timeouts, refused connections or 5xx answers that outlasted the retries.
    Transient,
    /// The device answered something we cannot understand.
    Protocol,
    /// The campaign or inventory asks for something the worker cannot do
    /// (missing credentials, an unreadable image file).
    Config,
}

impl ErrorClass {
    pub const ALL: [ErrorClass; 5] = [
        ErrorClass::Device,
        ErrorClass::Auth,
        ErrorClass::Transient,
        ErrorClass::Protocol,
        ErrorClass::Config,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Device => "device",
            ErrorClass::Auth => "auth",
            ErrorClass::Transient => "transient",
            ErrorClass::Protocol => "protocol",
            ErrorClass::Config => "config",
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The decided end of a job: its outcome and, when it did not succeed, the
/// reason in the device's own words where there are any.
///
/// A job carries its `Ending` while its driver's cleanup runs, so the outcome
/// is decided once and survives a redelivery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ending {
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_class: Option<ErrorClass>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Driver-specific detail for the report (for a NetProfiler, one entry per
    /// Flow Gateway).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
    /// The device may be left in a state a person must look at (an update
    /// that failed critically).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub needs_attention: bool,
}

impl Ending {
    pub fn succeeded() -> Self {
        Ending {
            outcome: Outcome::Succeeded,
            error_class: None,
            error: None,
            detail: None,
            needs_attention: false,
        }
    }

    pub fn failed(class: ErrorClass, error: impl Into<String>) -> Self {
        Ending {
            outcome: Outcome::Failed,
            error_class: Some(class),
            error: Some(error.into()),
            ..Ending::succeeded()
        }
    }

    pub fn timed_out(error: impl Into<String>) -> Self {
        Ending {
            outcome: Outcome::TimedOut,
            error: Some(error.into()),
            ..Ending::succeeded()
        }
    }

    pub fn cancelled() -> Self {
        Ending {
            outcome: Outcome::Cancelled,
            ..Ending::succeeded()
        }
    }

    /// Dead-lettered for `reason` (a dead-letter reason such as
    /// `unknown_step`), with what exactly was wrong.
    pub fn dead_lettered(reason: &str, detail: &str) -> Self {
        Ending {
            outcome: Outcome::DeadLettered,
            error: Some(format!("{reason}: {detail}")),
            ..Ending::succeeded()
        }
    }

    pub fn with_detail(mut self, detail: serde_json::Value) -> Self {
        self.detail = Some(detail);
        self
    }

    pub fn needing_attention(mut self) -> Self {
        self.needs_attention = true;
        self
    }
}
