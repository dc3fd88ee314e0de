//! What the daemon shows: the HTTP API ([`api`]), its large answers written as clients
//! read them ([`stream`]), the Prometheus exposition ([`metrics`]) and the views both
//! render ([`views`]).

pub mod api;
pub mod metrics;
pub mod snapshot;
pub mod stream;
pub mod views;
