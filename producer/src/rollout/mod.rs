//! Rolling a campaign out: the producer as campaign controller.
//!
//! - the loop that starts devices and writes decisions: [`controller`];
//! - what to do next, a pure function of the campaign's state: [`decide`];
//! - waves: [`plan`];
//! - the start rate and its ramp: [`pacer`];
//! - the maintenance window: [`window`];
//! - concurrency caps shared by all campaigns: [`caps`];
//! - walking the inventory in order: [`cursor`].

pub mod caps;
pub mod controller;
pub mod cursor;
pub mod decide;
pub mod pacer;
pub mod plan;
pub mod window;
