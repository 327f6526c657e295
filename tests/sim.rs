//! The deterministic simulation of the whole engine (#19).
#[path = "common/sim/mod.rs"]
mod sim;
