//! The command line's other faces: a client of the running daemon's API ([`client`]),
//! and a live trace of trust-file accesses with a probe of its own ([`trace`]).

pub mod client;
pub mod trace;
