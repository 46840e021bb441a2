//! What a step that did not get its way means for its job, in one
//! vocabulary named after the job's fate:
//!
//! - [`StepError::Retry`]: try the same step again after a backoff, up to
//!   the campaign's attempts; once they are spent the job fails with the
//!   error's class;
//! - [`StepError::Fail`]: the job ends failed: its driver's cleanup runs,
//!   then the job is terminal with this [`Failure`];
//! - [`StepError::Reject`]: the message cannot be processed at all: it goes
//!   to the dead-letter queue with a reason.
//!
//! A step fails its job in this one way, whatever it met: a refusal over
//! HTTP and an answer that reports a failure end the same.
//!
//! Classes say who must act, and are what the alerts read: `device` means
//! the device refused or reported a failure in its own words; `config` that
//! the campaign, the inventory or a worker's secrets ask for what cannot
//! work; `auth` refused credentials; `protocol` an answer we cannot read;
//! `transient` trouble that outlasted the retries. This module sits below
//! everything else in the worker: the HTTP helper, the credentials and
//! every driver speak it.

use flotilla_common::{Ending, ErrorClass};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum StepError {
    /// Try this step again later; after the last attempt, fail with `class`.
    #[error("{message}")]
    Retry { class: ErrorClass, message: String },
    /// End the job failed.
    #[error("{}", .0.message)]
    Fail(Box<Failure>),
    /// Send the message to the dead letters: no step can run it (a
    /// message our producer never sends, or one from an incompatible
    /// build).
    #[error("{}", .0.detail)]
    Reject(Rejection),
}

/// Why a message cannot be processed, for the dead letters.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Rejection {
    /// One of `metrics::DEAD_LETTER_REASONS`.
    pub(crate) reason: &'static str,
    pub(crate) detail: String,
}

/// How a job ends failed: the class, the words, and what the report shows.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Failure {
    pub(crate) class: ErrorClass,
    pub(crate) message: String,
    /// Driver-specific detail for the report (a NetProfiler's gateways).
    pub(crate) detail: Option<serde_json::Value>,
    /// The device may be left in a state a person must look at.
    pub(crate) needs_attention: bool,
    /// What the device reported, for the step's event.
    pub(crate) note: Option<String>,
}

impl Failure {
    pub(crate) fn new(class: ErrorClass, message: impl Into<String>) -> Self {
        Failure {
            class,
            message: message.into(),
            detail: None,
            needs_attention: false,
            note: None,
        }
    }

    /// The device said no, or reported a failure, in its own words.
    pub(crate) fn device(message: impl Into<String>) -> Self {
        Failure::new(ErrorClass::Device, message)
    }

    pub(crate) fn with_detail(mut self, detail: serde_json::Value) -> Self {
        self.detail = Some(detail);
        self
    }

    pub(crate) fn needing_attention(mut self) -> Self {
        self.needs_attention = true;
        self
    }

    pub(crate) fn note(mut self, note: impl Into<String>) -> Self {
        self.note = Some(note.into());
        self
    }

    /// The job's terminal outcome.
    pub(crate) fn ending(&self) -> Ending {
        let mut ending = Ending::failed(self.class, self.message.clone());
        ending.detail = self.detail.clone();
        ending.needs_attention = self.needs_attention;
        ending
    }
}

impl From<Failure> for StepError {
    fn from(failure: Failure) -> Self {
        StepError::Fail(Box::new(failure))
    }
}

impl StepError {
    /// A timeout, a refused connection, a 5xx: try again later.
    pub(crate) fn transient(message: impl Into<String>) -> Self {
        StepError::Retry {
            class: ErrorClass::Transient,
            message: message.into(),
        }
    }

    /// The device answered something we cannot read. Retried, since a
    /// proxy or a restarting service can answer garbage once.
    pub(crate) fn garbage(message: impl Into<String>) -> Self {
        StepError::Retry {
            class: ErrorClass::Protocol,
            message: message.into(),
        }
    }

    /// This worker lacks something the job needs (a secret, a file).
    /// Retried: another worker, or this one after a fix, may have it.
    pub(crate) fn worker_lacks(message: impl Into<String>) -> Self {
        StepError::Retry {
            class: ErrorClass::Config,
            message: message.into(),
        }
    }

    /// The device said no, in its own words: the job fails.
    pub(crate) fn refused(message: impl Into<String>) -> Self {
        Failure::device(message).into()
    }

    /// The device refused our credentials: the job fails.
    pub(crate) fn auth(message: impl Into<String>) -> Self {
        Failure::new(ErrorClass::Auth, message).into()
    }

    /// The campaign or the inventory asks for what cannot work (settings a
    /// driver cannot read, a missing inventory column, an image file that
    /// is not the campaign's): the job fails, and no retry would help.
    pub(crate) fn misconfigured(message: impl Into<String>) -> Self {
        Failure::new(ErrorClass::Config, message).into()
    }

    /// The message cannot be processed: dead-letter it.
    pub(crate) fn reject(reason: &'static str, detail: impl Into<String>) -> Self {
        StepError::Reject(Rejection {
            reason,
            detail: detail.into(),
        })
    }

    /// The error's words.
    pub(crate) fn message(&self) -> &str {
        match self {
            StepError::Retry { message, .. } => message,
            StepError::Fail(failure) => &failure.message,
            StepError::Reject(rejection) => &rejection.detail,
        }
    }

    /// A transport failure or a 5xx: what a restarting device answers.
    pub(crate) fn is_transient(&self) -> bool {
        matches!(
            self,
            StepError::Retry {
                class: ErrorClass::Transient,
                ..
            }
        )
    }

    /// The device refused what was asked (a 4xx other than 401/403, or a
    /// documented refusal): what a redelivered action meets when another
    /// copy of the step got there first.
    pub(crate) fn is_refusal(&self) -> bool {
        matches!(self, StepError::Fail(failure) if failure.class == ErrorClass::Device)
    }
}
