//! The HTTP API: what the daemon knows, as JSON. Read-only; every answer comes from the
//! latest published snapshot, so requests never wait on the engine.

use std::sync::Arc;

use anyhow::{Context, Result};
use axum::{
    Json, Router,
    extract::{Path, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use serde::Deserialize;
use tokio::sync::watch;

use crate::{engine::Snapshot, report::ProcessView, verdict::Verdict};

type Shared = watch::Receiver<Arc<Snapshot>>;

fn error(status: StatusCode, reason: impl Into<String>) -> Response {
    (
        status,
        Json(serde_json::json!({ "error": status.canonical_reason(), "reason": reason.into() })),
    )
        .into_response()
}

#[derive(Deserialize)]
struct Filters {
    verdict: Option<String>,
}

async fn processes(State(rx): State<Shared>, Query(f): Query<Filters>) -> Response {
    let wanted = match f.verdict.as_deref().map(|v| (v, Verdict::parse(v))) {
        Some((raw, None)) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "unknown verdict {raw:?}: use fresh, stale, expired_in_memory or unverified"
                ),
            );
        }
        Some((_, v)) => v,
        None => None,
    };
    let snapshot = rx.borrow().clone();
    let list: Vec<&ProcessView> = snapshot
        .processes
        .iter()
        .map(Arc::as_ref)
        .filter(|p| wanted.is_none_or(|w| p.verdict == w))
        .collect();
    Json(list).into_response()
}

async fn process(State(rx): State<Shared>, Path(pid): Path<String>) -> Response {
    let Ok(pid) = pid.parse::<u32>() else {
        return error(StatusCode::BAD_REQUEST, format!("{pid:?} is not a pid"));
    };
    let snapshot = rx.borrow().clone();
    // The newest process with this pid (a reused pid's predecessor may linger, exited).
    match snapshot
        .processes
        .iter()
        .filter(|p| p.pid == pid)
        .max_by(|a, b| a.start_time.cmp(&b.start_time))
    {
        Some(p) => Json(p.as_ref()).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            format!("no process {pid} with trust reads is known"),
        ),
    }
}

pub fn router(rx: Shared) -> Router {
    Router::new()
        .route("/processes", get(processes))
        .route("/processes/{pid}", get(process))
        .with_state(rx)
}

pub async fn serve(listener: tokio::net::TcpListener, rx: Shared) -> Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!("API listening on http://{addr}");
    }
    axum::serve(listener, router(rx))
        .await
        .context("serving the API")
}
