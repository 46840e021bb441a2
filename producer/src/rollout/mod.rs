//! Rolling a campaign out: the producer as campaign controller.
//!
//! - the controller on the broker (its lock, reading events and commands,
//!   publishing jobs, decisions and snapshots): [`controller`];
//! - the loop's deciding parts, apart from the broker, and the loop
//!   itself over a [`steer::Fleet`] (the broker, or a forecast's virtual
//!   one): [`steer`];
//! - what to do next, a pure function of the campaign's state: [`decide`];
//! - the two clocks it reads: [`clock`];
//! - devices read ahead, by API host: [`held`];
//! - waves: [`plan`];
//! - the start rate and its ramp: [`pacer`];
//! - start rates per API host that follow the hosts' health: [`adaptive`];
//! - the maintenance window: [`window`];
//! - concurrency caps shared by all campaigns: [`caps`];
//! - walking the inventory in order: [`cursor`].

pub mod adaptive;
pub mod caps;
pub mod clock;
pub mod controller;
pub mod cursor;
pub mod decide;
pub mod held;
pub mod pacer;
pub mod plan;
pub mod steer;
pub mod window;
