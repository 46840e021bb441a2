//! Vendor-neutral helpers the drivers share:
//!
//! - [`image`]: `file:` images checked against the campaign's SHA-256 and
//!   streamed to the device;
//! - [`lenient`]: JSON read as appliances write it;
//! - [`restart`]: a device restarting into its new firmware is a wait;
//! - [`login`]: calls under a login that issues a token or a session,
//!   cached and renewed once when the device forgets it;
//! - [`baseline`]: what the job saw on the device before it acted,
//!   carried beside the driver's step, by which later steps judge;
//! - [`clock`]: the job's publication on the device's clock, for the one
//!   step that records the baseline.

pub(crate) mod baseline;
pub(crate) mod clock;
#[cfg(test)]
pub(crate) mod hostile;
pub(crate) mod image;
pub(crate) mod lenient;
pub(crate) mod login;
pub(crate) mod restart;
