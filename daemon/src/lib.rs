//! trustdrift's daemon as a library: the binary (`main.rs`) is its command line, and the
//! fuzz targets and corpus replays reach the parsers through here.
//!
//! Data flows one way: probe → events → ledger → verdicts → API and metrics.

pub mod api;
pub mod attribution;
pub mod catalog;
pub mod client;
pub mod clock;
pub mod config;
pub mod engine;
pub mod events;
pub mod fuzz_targets;
pub mod intake;
pub mod kernel_layout;
pub mod ledger;
pub mod metrics;
pub mod peers;
pub mod pinning;
pub mod privileges;
pub mod probe;
pub mod procfs;
pub mod reference;
pub mod report;
pub mod resolution;
pub mod rootfs;
pub mod seed;
pub mod state;
pub mod store_format;
pub mod trace;
pub mod tracefs;
pub mod trust_paths;
pub mod verdict;
pub mod watch;
