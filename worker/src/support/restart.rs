//! Reading a device that restarts into its new firmware: while it is down,
//! refused connections, timeouts and 5xx answers are part of the upgrade,
//! not failures; the job's deadline bounds the wait.

use crate::driver::StepError;

/// What a read of a restarting device saw.
pub(crate) enum Seen<T> {
    /// The device answered.
    Up(T),
    /// The device is not answering yet: a note for the step's event.
    Restarting(String),
}

/// Turns a transient failure of `read` into [`Seen::Restarting`]; any
/// other error stands.
pub(crate) fn through_restart<T>(read: Result<T, StepError>) -> Result<Seen<T>, StepError> {
    match read {
        Ok(answer) => Ok(Seen::Up(answer)),
        Err(error) if error.is_transient() => Ok(Seen::Restarting(format!(
            "waiting for the appliance to come back: {}",
            error.message()
        ))),
        Err(error) => Err(error),
    }
}
