//! The ublk frontend: serves a `Stack` as /dev/ublkbN. It only translates
//! ublk requests into engine calls; all image logic stays in the engine.
