//! QCOW2 images, read-only (issue #22): the on-disk header and table
//! entries, parsed and checked apart from any I/O, and an image that reads
//! any range of its virtual disk through them and its backing chain.

pub mod entry;
pub mod header;
pub mod image;
pub mod layer;

pub use image::{CacheStats, Qcow2Image};
pub use layer::Qcow2Layer;
