//! rollcall: a highly-available service registry and discovery gateway.
//!
//! The binary (`main.rs`) only wires these modules; tests and benchmarks use them directly.

pub mod api;
pub mod breaker;
pub mod cli;
pub mod dev;
pub mod gateway;
pub mod launch;
pub mod load;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod node;
pub mod registry;
pub mod server;
pub mod store;
pub mod validate;
