//! Who a process is and what it sees: its identity in /proc, its container and pod, its
//! root, and every read the daemon makes inside that root. Everything here treats the
//! process and its files as hostile: reads go through one safe resolver
//! ([`rootfs`]) and run under a deadline ([`deadline`]).

pub mod attribution;
pub mod deadline;
pub mod holdings;
pub mod peers;
pub mod procfs;
pub mod resolution;
pub mod rootfs;
pub mod seed;
