//! What Flotilla should report for a simulated device, given what the
//! simulator will do to it: each kind's module says it for its faults.

use flotilla_common::{Ending, ErrorClass, Outcome};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expectation {
    pub outcome: Outcome,
    pub error_class: Option<ErrorClass>,
    /// Text the reported error must contain.
    pub error_contains: Option<String>,
    /// The device is left for a person to look at (a critical failure).
    pub needs_attention: bool,
}

impl Expectation {
    pub fn succeeded() -> Self {
        Expectation {
            outcome: Outcome::Succeeded,
            error_class: None,
            error_contains: None,
            needs_attention: false,
        }
    }

    pub fn failed(class: ErrorClass, text: &str) -> Self {
        Expectation {
            outcome: Outcome::Failed,
            error_class: Some(class),
            error_contains: Some(text.to_owned()),
            needs_attention: false,
        }
    }

    /// Failed with the device's own words.
    pub(crate) fn device(text: &str) -> Self {
        Expectation::failed(ErrorClass::Device, text)
    }

    /// Refused credentials.
    pub(crate) fn refused() -> Self {
        Expectation::failed(ErrorClass::Auth, "refused")
    }

    pub fn timed_out() -> Self {
        Expectation {
            outcome: Outcome::TimedOut,
            error_class: None,
            error_contains: Some("deadline".to_owned()),
            needs_attention: false,
        }
    }

    pub(crate) fn needing_attention(mut self) -> Self {
        self.needs_attention = true;
        self
    }

    /// Whether a reported outcome meets the expectation; the difference,
    /// in words, if it does not.
    pub fn check(&self, ending: &Ending) -> Result<(), String> {
        if ending.outcome != self.outcome {
            return Err(format!(
                "expected {}, reported {} ({:?})",
                self.outcome, ending.outcome, ending.error
            ));
        }
        if self.error_class.is_some() && ending.error_class != self.error_class {
            return Err(format!(
                "expected error class {:?}, reported {:?}",
                self.error_class, ending.error_class
            ));
        }
        if let Some(text) = &self.error_contains {
            let error = ending.error.as_deref().unwrap_or("");
            if !error.contains(text.as_str()) {
                return Err(format!(
                    "expected an error containing {text:?}, reported {error:?}"
                ));
            }
        }
        if ending.needs_attention != self.needs_attention {
            return Err(format!(
                "expected needs_attention {}, reported {}",
                self.needs_attention, ending.needs_attention
            ));
        }
        Ok(())
    }
}
