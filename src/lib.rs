//! ublk-ploop: OpenVZ ploop layered expandable images as Linux block
//! devices. The engine (formats, stack, tracker, I/O backends) lives here
//! and knows nothing of ublk, sockets or the command line; the frontends
//! call into it.

pub mod convert;
pub mod copy;
pub mod crash_point;
pub mod disk;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod io;
pub mod layers;
pub mod mutant;
pub mod protocol;
pub mod rng;
pub mod size;
pub mod stack;
pub mod tracker;

pub use error::{Error, Result};
pub use stack::{LayerSpec, Stack, StackOptions};
