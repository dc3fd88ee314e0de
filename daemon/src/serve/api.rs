//! The HTTP API: what the daemon knows, as JSON, and its metrics. Read-only and bounded:
//! every answer comes from the latest published snapshot (requests never wait on the
//! engine), requests carry no body, query strings are short, a limited number run at
//! once and each has a deadline; connections are capped too, must send their headers in
//! time, read their answers without stalling, and live a bounded time. The large answers
//! are written as the client reads them, under one bound on the bytes in flight across
//! connections ([`stream`](super::stream)). Every refusal is counted for `/metrics`.
//! Errors are JSON: `{"error": ..., "reason": ...}`.

use std::{
    collections::BTreeMap,
    os::fd::AsFd,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result};
use axum::{
    Json, Router,
    extract::{Path, RawQuery, Request, State},
    http::{Method, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
    serve::Listener,
};
use serde::Serialize;
use tokio::sync::{Semaphore, watch};

use crate::{
    config::Listen,
    judge::verdict::Verdict,
    ledger::ProcKey,
    serve::metrics,
    serve::snapshot::{Heartbeat, ProcessViews, Snapshot},
    serve::stream::{self, InFlight},
    serve::views::{CertView, ProcessView},
};

/// Longest query string accepted.
const MAX_QUERY: usize = 2048;
/// A connection's socket send buffer (the kernel doubles it).
const SEND_BUFFER: usize = 32 << 10;
/// What hyper buffers of one connection, request headers included.
const CONNECTION_BUFFER: usize = 64 << 10;

#[derive(Clone)]
struct AppState {
    snapshot: watch::Receiver<Arc<Snapshot>>,
    refusals: Arc<Refusals>,
    liveness: Liveness,
    in_flight: InFlight,
}

/// What `/healthz` checks: the engine's heartbeat, against a bound.
#[derive(Clone, Debug)]
pub struct Liveness {
    pub heartbeat: Heartbeat,
    pub timeout: Duration,
}

/// Requests and connections the API turned away, by reason.
#[derive(Debug, Default)]
pub struct Refusals {
    too_many_connections: AtomicU64,
    connection_timeout: AtomicU64,
    too_many_requests: AtomicU64,
    request_timeout: AtomicU64,
}

impl Refusals {
    fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// (reason, count) for `/metrics`.
    pub fn counts(&self) -> [(&'static str, u64); 4] {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("too_many_connections", get(&self.too_many_connections)),
            ("connection_timeout", get(&self.connection_timeout)),
            ("too_many_requests", get(&self.too_many_requests)),
            ("request_timeout", get(&self.request_timeout)),
        ]
    }
}

fn error(status: StatusCode, reason: impl Into<String>) -> Response {
    (
        status,
        Json(serde_json::json!({
            "error": status.canonical_reason().unwrap_or("error"),
            "reason": reason.into(),
        })),
    )
        .into_response()
}

/// `key=value&...`, decoded; a repeated key is an error.
fn parse_query(raw: Option<&str>) -> Result<BTreeMap<String, String>, String> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw.unwrap_or_default())
        .map_err(|e| format!("unreadable query string: {e}"))?;
    let mut out = BTreeMap::new();
    for (k, v) in pairs {
        if out.insert(k.clone(), v).is_some() {
            return Err(format!("filter {k:?} given twice"));
        }
    }
    Ok(out)
}

/// The filters of `GET /processes`.
struct Filters {
    verdict: Option<Verdict>,
    container: Option<String>,
    namespace: Option<String>,
    pod: Option<String>,
    comm: Option<String>,
    exited: Option<bool>,
}

impl Filters {
    fn parse(query: Option<&str>) -> Result<Self, String> {
        let mut q = parse_query(query)?;
        let verdict = match q.remove("verdict") {
            None => None,
            Some(v) => Some(Verdict::parse(&v).ok_or_else(|| {
                format!("unknown verdict {v:?}: use fresh, stale, expired_in_memory or unverified")
            })?),
        };
        let exited = match q.remove("exited").as_deref() {
            None => None,
            Some("true") => Some(true),
            Some("false") => Some(false),
            Some(other) => return Err(format!("exited={other:?}: use true or false")),
        };
        let filters = Self {
            verdict,
            exited,
            container: q.remove("container"),
            namespace: q.remove("namespace"),
            pod: q.remove("pod"),
            comm: q.remove("comm"),
        };
        if let Some(unknown) = q.keys().next() {
            return Err(format!(
                "unknown filter {unknown:?}: use verdict, container, namespace, pod, comm or exited"
            ));
        }
        Ok(filters)
    }

    fn matches(&self, p: &ProcessView) -> bool {
        let a = &p.attribution;
        let container_matches = |want: &str| {
            a.container.as_deref() == Some(want)
                || a.container_id
                    .as_deref()
                    .is_some_and(|id| want.len() >= 4 && id.starts_with(want))
        };
        self.verdict.is_none_or(|v| p.verdict == v)
            && self.container.as_deref().is_none_or(container_matches)
            && self
                .namespace
                .as_deref()
                .is_none_or(|n| a.namespace.as_deref() == Some(n))
            && self
                .pod
                .as_deref()
                .is_none_or(|n| a.pod.as_deref() == Some(n))
            && self.comm.as_deref().is_none_or(|c| p.comm == c)
            && self.exited.is_none_or(|e| p.exited_at.is_some() == e)
    }
}

async fn processes(State(s): State<AppState>, RawQuery(query): RawQuery) -> Response {
    let filters = match Filters::parse(query.as_deref()) {
        Ok(f) => f,
        Err(reason) => return error(StatusCode::BAD_REQUEST, reason),
    };
    let processes = s.snapshot.borrow().processes.clone();
    streamed(Views { processes, filters }, &s.in_flight)
}

/// The process views of a snapshot (shared with it), filtered as they are written.
struct Views {
    processes: ProcessViews,
    filters: Filters,
}

impl Serialize for Views {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(
            self.processes
                .values()
                .map(Arc::as_ref)
                .filter(|p| self.filters.matches(p)),
        )
    }
}

/// One process view, shared with the snapshot.
struct View(Arc<ProcessView>);

impl Serialize for View {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

/// A JSON answer written as the client reads it.
fn streamed<T: Serialize + Send + 'static>(value: T, in_flight: &InFlight) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        stream::json(value, in_flight),
    )
        .into_response()
}

async fn process(State(s): State<AppState>, Path(pid): Path<String>) -> Response {
    let Ok(pid) = pid.parse::<u32>() else {
        return error(StatusCode::BAD_REQUEST, format!("{pid:?} is not a pid"));
    };
    let snapshot = s.snapshot.borrow().clone();
    // The newest process with this pid (a reused pid's predecessor may linger, exited).
    let images = ProcKey {
        pid,
        start_ticks: 0,
    }..=ProcKey {
        pid,
        start_ticks: u64::MAX,
    };
    match snapshot
        .processes
        .range(images)
        .map(|(_, p)| p)
        .max_by(|a, b| a.start_time.cmp(&b.start_time))
    {
        Some(p) => streamed(View(Arc::clone(p)), &s.in_flight),
        None => error(
            StatusCode::NOT_FOUND,
            format!("no process {pid} with trust reads is known"),
        ),
    }
}

#[derive(Serialize)]
struct Reference {
    loaded_at: String,
    source: String,
    certificates: Vec<CertView>,
    errors: Vec<String>,
}

/// The answer of `/stores`, written from the snapshot as it is served.
struct Stores {
    snapshot: Arc<Snapshot>,
    /// Only the stores of this root (`host`, or a root id).
    root: Option<String>,
}

impl Serialize for Stores {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let snapshot = &self.snapshot;
        // What a process started on the host now would trust.
        let host_reference = snapshot.host_reference.as_ref().map(|r| Reference {
            loaded_at: crate::events::clock::rfc3339(r.loaded_at),
            source: r.source.clone(),
            certificates: r
                .certs
                .values()
                .map(|c| CertView::from(c.as_ref()))
                .collect(),
            errors: r.errors.clone(),
        });
        let root = self.root.as_deref();
        let mut out = s.serialize_struct("Stores", 2)?;
        out.serialize_field("host_reference", &host_reference)?;
        out.serialize_field(
            "stores",
            &Seq(|| {
                snapshot
                    .store_views
                    .values()
                    .map(Arc::as_ref)
                    .filter(move |v| root.is_none_or(|r| v.root == r))
            }),
        )?;
        out.end()
    }
}

/// A sequence serialized from an iterator made when it is written.
struct Seq<F>(F);

impl<F, I> Serialize for Seq<F>
where
    F: Fn() -> I,
    I: Iterator,
    I::Item: Serialize,
{
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq((self.0)())
    }
}

async fn stores(State(s): State<AppState>, RawQuery(query): RawQuery) -> Response {
    let mut q = match parse_query(query.as_deref()) {
        Ok(q) => q,
        Err(reason) => return error(StatusCode::BAD_REQUEST, reason),
    };
    let root = q.remove("root");
    if let Some(unknown) = q.keys().next() {
        return error(
            StatusCode::BAD_REQUEST,
            format!("unknown filter {unknown:?}: use root (host, or a root id)"),
        );
    }
    let snapshot = s.snapshot.borrow().clone();
    streamed(Stores { snapshot, root }, &s.in_flight)
}

async fn healthz(State(s): State<AppState>) -> Response {
    let silence = s.liveness.heartbeat.silence();
    if silence > s.liveness.timeout {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({
                "status": "stalled",
                "reason": format!(
                    "the engine has made no progress for {}s (api.liveness_timeout is {}s)",
                    silence.as_secs(),
                    s.liveness.timeout.as_secs()
                ),
            })),
        )
            .into_response();
    }
    Json(serde_json::json!({"status": "ok"})).into_response()
}

async fn readyz(State(s): State<AppState>) -> Response {
    if s.snapshot.borrow().ready {
        Json(serde_json::json!({"ready": true})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({
                "ready": false,
                "reason": "the probe is not attached yet or the start-up scan is running",
            })),
        )
            .into_response()
    }
}

/// OpenMetrics for scrapers that ask for it (Prometheus does), the classic text format
/// for everyone else (curl, promtool), as node_exporter does.
async fn metrics_text(State(s): State<AppState>, headers: axum::http::HeaderMap) -> Response {
    let snapshot = s.snapshot.borrow().clone();
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/openmetrics-text"));
    let text = metrics::render(&snapshot, &s.refusals.counts());
    if openmetrics {
        (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            metrics::to_prometheus_text(&text),
        )
            .into_response()
    }
}

async fn not_found(request: Request) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!(
            "no such endpoint {}: see /processes, /stores, /metrics, /healthz, /readyz",
            request.uri().path()
        ),
    )
}

/// Bounds every request: GET only, no body, a short query, a slot among the limited
/// concurrent requests, and a deadline.
async fn bounded(
    State((slots, timeout, refusals)): State<(Arc<Semaphore>, Duration, Arc<Refusals>)>,
    request: Request,
    next: Next,
) -> Response {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "the API is read-only: use GET",
        );
    }
    let headers = request.headers();
    let has_body = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n > 0)
        || headers.contains_key(header::TRANSFER_ENCODING);
    if has_body {
        return error(StatusCode::PAYLOAD_TOO_LARGE, "requests carry no body");
    }
    if request.uri().query().is_some_and(|q| q.len() > MAX_QUERY) {
        return error(
            StatusCode::URI_TOO_LONG,
            format!("query strings are limited to {MAX_QUERY} bytes"),
        );
    }
    let Ok(_slot) = slots.try_acquire() else {
        Refusals::count(&refusals.too_many_requests);
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many requests in flight: retry shortly",
        );
    };
    match tokio::time::timeout(timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            Refusals::count(&refusals.request_timeout);
            error(StatusCode::GATEWAY_TIMEOUT, "the request took too long")
        }
    }
}

pub fn router(
    snapshot: watch::Receiver<Arc<Snapshot>>,
    liveness: Liveness,
    max_concurrent: usize,
    timeout: Duration,
    refusals: Arc<Refusals>,
    in_flight: InFlight,
) -> Router {
    let limits = (
        Arc::new(Semaphore::new(max_concurrent)),
        timeout,
        Arc::clone(&refusals),
    );
    Router::new()
        .route("/processes", get(processes))
        .route("/processes/{pid}", get(process))
        .route("/stores", get(stores))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .fallback(not_found)
        .with_state(AppState {
            snapshot,
            refusals,
            liveness,
            in_flight,
        })
        .layer(middleware::from_fn_with_state(limits, bounded))
}

/// Listeners bound before the probe attaches, so a busy port is reported at once.
/// They are plain (std) sockets so that the API's own runtime, on its own thread, drives
/// them: a listener registered with the engine's runtime would stall whenever the engine
/// waits on a deadline.
pub enum Bound {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener, std::path::PathBuf),
}

pub fn bind(listen: &Listen) -> Result<Bound> {
    match listen {
        Listen::Tcp(addr) => {
            let listener = std::net::TcpListener::bind(addr)
                .with_context(|| format!("listening on {addr}"))?;
            listener.set_nonblocking(true)?;
            Ok(Bound::Tcp(listener))
        }
        Listen::Unix(path) => {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("creating {}", parent.display()))?;
            }
            // A socket left by a previous run would make bind fail.
            if std::fs::symlink_metadata(path)
                .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
            {
                let _ = std::fs::remove_file(path);
            }
            let listener = std::os::unix::net::UnixListener::bind(path)
                .with_context(|| format!("listening on unix:{}", path.display()))?;
            listener.set_nonblocking(true)?;
            Ok(Bound::Unix(listener, path.clone()))
        }
    }
}

/// Bounds on connections, beside the per-request ones: a client that sends nothing, or
/// trickles its headers, or never reads its answer must not hold a socket (and a file
/// descriptor the catalog needs) for long.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    pub max: usize,
    /// Time to send a request's headers (the first, and each one on a kept-alive
    /// connection).
    pub header_timeout: Duration,
    /// Time a client may leave its answer unread (nothing written) before the connection
    /// is closed.
    pub write_stall: Duration,
    /// Longest life of a connection, whatever it does; a scraper simply reconnects.
    pub lifetime: Duration,
}

/// How often the API thread looks whether it answered anything since, and so whether its
/// allocator cache is worth handing back (see [`crate::allocator::falling_idle`]).
const IDLE_CHECK: Duration = Duration::from_secs(30);

pub async fn serve(
    bound: Vec<Bound>,
    router: Router,
    limits: ConnectionLimits,
    refusals: Arc<Refusals>,
) -> Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max));
    let mut tasks = tokio::task::JoinSet::new();
    for b in bound {
        let (app, slots, refusals) = (router.clone(), Arc::clone(&slots), Arc::clone(&refusals));
        match b {
            Bound::Tcp(l) => {
                let l = tokio::net::TcpListener::from_std(l)?;
                if let Ok(addr) = l.local_addr() {
                    tracing::info!("API listening on http://{addr}");
                }
                tasks.spawn(accept_loop(l, app, limits, slots, refusals));
            }
            Bound::Unix(l, path) => {
                let l = tokio::net::UnixListener::from_std(l)?;
                tracing::info!("API listening on unix:{}", path.display());
                tasks.spawn(accept_loop(l, app, limits, slots, refusals));
            }
        }
    }
    // This thread's allocator cache goes back once it falls idle after answering.
    if !tasks.is_empty() {
        tasks.spawn(async {
            let mut check = tokio::time::interval(IDLE_CHECK);
            loop {
                check.tick().await;
                crate::allocator::falling_idle(1);
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.context("API task")?;
    }
    Ok(())
}

/// Accepts for ever: a connection beyond the cap is closed at once (counted), the others
/// are served under the limits.
async fn accept_loop<L: Listener>(
    mut listener: L,
    app: Router,
    limits: ConnectionLimits,
    slots: Arc<Semaphore>,
    refusals: Arc<Refusals>,
) where
    L::Io: AsFd,
{
    loop {
        // Accept errors (out of file descriptors, typically) are retried after a pause.
        let (stream, _) = listener.accept().await;
        crate::allocator::worked(1);
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            Refusals::count(&refusals.too_many_connections);
            drop(stream);
            continue;
        };
        // What the kernel buffers for a client that does not read is bounded too (and
        // charged to the daemon's memory): a small send buffer, no autotuning.
        let _ = rustix::net::sockopt::set_socket_send_buffer_size(&stream, SEND_BUFFER);
        let mut stream = tokio_io_timeout::TimeoutStream::new(stream);
        stream.set_write_timeout(Some(limits.write_stall));
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let refusals = Arc::clone(&refusals);
        tokio::spawn(async move {
            let _slot = slot;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                // A connection buffers at most this much of an answer beyond the socket.
                .max_buf_size(CONNECTION_BUFFER);
            let connection =
                builder.serve_connection(hyper_util::rt::TokioIo::new(Box::pin(stream)), service);
            match tokio::time::timeout(limits.lifetime, connection).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) if e.is_timeout() => Refusals::count(&refusals.connection_timeout),
                Ok(Err(e)) => tracing::debug!("API connection: {e}"),
                Err(_) => Refusals::count(&refusals.connection_timeout),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_decode_and_refuse_repeats() {
        let q = parse_query(Some("comm=python3&container=agent%2D1&x=a+b")).unwrap();
        assert_eq!(q["comm"], "python3");
        assert_eq!(q["container"], "agent-1");
        assert_eq!(q["x"], "a b");
        assert!(parse_query(Some("comm=a&comm=b")).is_err());
        // Invalid UTF-8 is decoded lossily, never a panic.
        assert!(parse_query(Some("comm=%ff%fe")).is_ok());
    }

    #[test]
    fn filters_name_what_is_wrong() {
        assert!(Filters::parse(Some("verdict=stale&comm=envoy")).is_ok());
        let e = Filters::parse(Some("verdict=bad")).err().unwrap();
        assert!(e.contains("unknown verdict"));
        let e = Filters::parse(Some("pid=4")).err().unwrap();
        assert!(e.contains("unknown filter \"pid\""));
        let e = Filters::parse(Some("exited=yes")).err().unwrap();
        assert!(e.contains("use true or false"));
    }
}
