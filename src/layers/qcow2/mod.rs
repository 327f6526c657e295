//! QCOW2 images as read-only layers (issue #22): the on-disk header and
//! table entries, parsed and checked apart from any I/O. The layer that
//! reads through them comes next.

pub mod entry;
pub mod header;
