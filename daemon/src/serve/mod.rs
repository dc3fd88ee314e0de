//! What the daemon shows: the HTTP API ([`api`]), the Prometheus exposition
//! ([`metrics`]) and the views both render ([`views`]).

pub mod api;
pub mod metrics;
pub mod snapshot;
pub mod views;
