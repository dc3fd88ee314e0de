//! Real-world scenarios, end to end: each replays a way production breaks, with real
//! programs, through trustdrift's public interfaces only (`GET /processes`, `/metrics`):
//! the verdict before the change, after it, and after the remedy, and how long the
//! daemon took to notice (printed, and appended to `scenario-latency.jsonl` in cargo's
//! target tmpdir; targets live in the benchmarks, not here).

mod agent_trust_store;
mod containers;
mod expiry_ahead;
mod java_keystore;
mod noise;
mod proxy_expired_certificate;
mod rotation_storm;
mod support;
