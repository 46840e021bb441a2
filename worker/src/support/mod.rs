//! Vendor-neutral helpers the drivers share:
//!
//! - [`image`]: `file:` images checked against the campaign's SHA-256 and
//!   streamed to the device;
//! - [`lenient`]: JSON read as appliances write it;
//! - [`restart`]: a device restarting into its new firmware is a wait;
//! - [`login`]: calls under a login that issues a token or a session,
//!   cached and renewed once when the device forgets it;
//! - [`clock`]: when the job's own work on a device began.

pub(crate) mod clock;
pub(crate) mod image;
pub(crate) mod lenient;
pub(crate) mod login;
pub(crate) mod restart;
