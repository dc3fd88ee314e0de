//! What the engine publishes for the serving side: the processes' views, the stores' views
//! and figures, and the daemon's own health. Plain data: the engine fills it, the API and
//! the metrics render it.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use crate::{
    ledger::ProcKey,
    probe::{MapFill, ProgramStats},
    serve::views::{ProcessView, StoreView},
    stores::{identity::FileKey, reference::Reference},
};

/// The views, by process, shared from one snapshot to the next: a publication changes
/// what changed and clones the rest in O(1), however many processes are tracked.
pub type ProcessViews = imbl::OrdMap<ProcKey, Arc<ProcessView>>;
/// The stores' views, shared the same way.
pub type StoreViews = imbl::OrdMap<FileKey, Arc<StoreView>>;
/// The stores' figures for the metrics, shared the same way.
pub type StoreFigureMap = imbl::OrdMap<FileKey, StoreFigures>;

/// What the metrics may show beyond the bounded default.
#[derive(Clone, Debug, Default)]
pub struct MetricsOptions {
    pub per_process: bool,
    pub container_stores: bool,
    /// The `node` label every series carries, when set.
    pub node: Option<Arc<str>>,
}

/// One store for the metrics: its label and current figures.
#[derive(Clone, Debug)]
pub struct StoreFigures {
    pub store: String,
    pub certificates: usize,
    pub changed_at: SystemTime,
    /// Of a store of certificates only: nothing else is fingerprinted in the open.
    pub sha256: Option<String>,
}

/// The daemon's own health, for `/metrics`.
#[derive(Clone, Debug, Default)]
pub struct Health {
    pub events: BTreeMap<String, u64>,
    pub lost: BTreeMap<String, u64>,
    pub scan_errors: BTreeMap<String, u64>,
    pub parse_errors: u64,
    pub contents_hashed: u64,
    pub probe_attached: bool,
    pub pinned: bool,
    pub programs: Vec<ProgramStats>,
    pub maps: Vec<MapFill>,
    pub tracked: BTreeMap<String, u64>,
    pub last_save: Option<SystemTime>,
    /// Records handled while the crash journal was full (a crash before the next save
    /// would have lost them).
    pub unjournalled: u64,
}

/// When the engine last made progress, for `/healthz`: a daemon whose engine is stuck
/// (in a syscall no deadline could bound) must fail its liveness probe and be restarted,
/// while the API, on a thread of its own, still answers.
#[derive(Clone, Debug)]
pub struct Heartbeat {
    origin: Instant,
    /// Milliseconds since `origin` of the latest beat.
    last_ms: Arc<AtomicU64>,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Self {
            origin: Instant::now(),
            last_ms: Arc::default(),
        }
    }
}

impl Heartbeat {
    /// The engine made progress now.
    pub fn beat(&self) {
        let ms = self.origin.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// How long ago the engine last made progress.
    pub fn silence(&self) -> Duration {
        let now = self.origin.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// What the API serves.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub processes: ProcessViews,
    /// The probe is attached and the start-up scan of /proc is done.
    pub ready: bool,
    pub options: MetricsOptions,
    pub stores: StoreFigureMap,
    pub store_views: StoreViews,
    pub host_reference: Option<Arc<Reference>>,
    pub health: Health,
}
