//! Placeholder so the driver compiles before the world lands; the world's
//! author's file replaces it on merge.
pub struct Exec;
