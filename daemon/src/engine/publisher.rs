//! Publishing: the verdict of every process whose facts changed, the stores' views and
//! figures, and the daemon's health, handed to the serving side as one snapshot.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::SystemTime,
};

use tokio::sync::watch;

use crate::{
    engine::readers::ReadIndex,
    judge::verdict::{self, Verdict},
    ledger::{Ledger, ProcKey},
    serve::{
        snapshot::{Health, MetricsOptions, Snapshot, StoreFigures},
        views::{self, ProcessView, StoreView},
    },
    stores::{
        catalog::{Catalog, RootKey},
        reference::Reference,
    },
};

/// What publishing needs to read of the engine's state.
pub struct Sources<'a> {
    pub ledger: &'a Ledger,
    pub catalog: &'a Catalog,
    pub index: &'a ReadIndex,
    pub host: Option<RootKey>,
}

pub struct Publisher {
    tx: watch::Sender<Arc<Snapshot>>,
    options: MetricsOptions,
    /// The probe is attached and the start-up scan is done.
    ready: bool,
    views: BTreeMap<ProcKey, Arc<ProcessView>>,
    /// Processes to judge again at the next publication.
    dirty: BTreeSet<ProcKey>,
    stores_dirty: bool,
    stores: Arc<Vec<StoreFigures>>,
    store_views: Arc<Vec<StoreView>>,
    host_reference: Option<Arc<Reference>>,
}

impl Publisher {
    pub fn new(tx: watch::Sender<Arc<Snapshot>>, options: MetricsOptions) -> Self {
        Self {
            tx,
            options,
            ready: false,
            views: BTreeMap::new(),
            dirty: BTreeSet::new(),
            stores_dirty: true,
            stores: Arc::default(),
            store_views: Arc::default(),
            host_reference: None,
        }
    }

    pub fn set_options(&mut self, options: MetricsOptions) {
        self.options = options;
        self.stores_dirty = true;
    }

    pub fn set_ready(&mut self) {
        self.ready = true;
    }

    pub fn set_host_reference(&mut self, reference: Option<Arc<Reference>>) {
        self.host_reference = reference;
    }

    /// `key`'s facts changed: judge it again.
    pub fn mark(&mut self, key: ProcKey) {
        self.dirty.insert(key);
    }

    pub fn mark_all(&mut self, keys: impl IntoIterator<Item = ProcKey>) {
        self.dirty.extend(keys);
    }

    /// Some store's content or readers changed.
    pub fn stores_changed(&mut self) {
        self.stores_dirty = true;
    }

    /// `key` is gone from the ledger.
    pub fn forget(&mut self, key: &ProcKey) {
        self.views.remove(key);
    }

    /// The verdict last published for `key`.
    pub fn verdict_of(&self, key: &ProcKey) -> Option<Verdict> {
        self.views.get(key).map(|v| v.verdict)
    }

    /// Whether a publication is due: something changed (or `force`).
    pub fn due(&self, force: bool) -> bool {
        force || !self.dirty.is_empty() || self.tx.borrow().ready != self.ready
    }

    /// Judges what changed and publishes a snapshot.
    pub fn publish(&mut self, sources: &Sources<'_>, health: Health) {
        self.refresh_stores(sources);
        let now = SystemTime::now();
        for key in std::mem::take(&mut self.dirty) {
            let Some(entry) = sources.ledger.get(&key) else {
                self.views.remove(&key);
                continue;
            };
            let changed = entry
                .info
                .root
                .and_then(|r| sources.index.stores_changed_at(&r, sources.catalog));
            match verdict::judge(entry, sources.catalog, changed, now) {
                Some(v) => {
                    self.views
                        .insert(key, Arc::new(views::process_view(entry, &v)));
                }
                None => {
                    self.views.remove(&key);
                }
            }
        }
        let snapshot = Snapshot {
            processes: self.views.values().cloned().collect(),
            ready: self.ready,
            options: self.options.clone(),
            stores: Arc::clone(&self.stores),
            store_views: Arc::clone(&self.store_views),
            host_reference: self.host_reference.clone(),
            health,
        };
        self.tx.send_replace(Arc::new(snapshot));
    }

    /// Trust stores for `/stores` and the store metrics: every file the catalog knows
    /// (the host's; containers' too with `metrics.container_stores` for the metrics).
    fn refresh_stores(&mut self, sources: &Sources<'_>) {
        if !self.stores_dirty {
            return;
        }
        self.stores_dirty = false;
        let host = sources.host;
        let mut figures = Vec::new();
        let mut store_views = Vec::new();
        for (key, versions) in sources.catalog.export() {
            let Some(current) = versions.back() else {
                continue;
            };
            store_views.push(views::store_view(
                key,
                versions,
                sources.index.reader_count(key),
                Some(key.root) == host,
            ));
            let Some(content) = current.content.as_deref() else {
                continue;
            };
            let label = if Some(key.root) == host {
                key.path.to_string_lossy().into_owned()
            } else if self.options.container_stores {
                format!("{}:{}", key.root, key.path.display())
            } else {
                continue;
            };
            figures.push(StoreFigures {
                store: label,
                certificates: content.certificates().len(),
                changed_at: current.seen_at,
                sha256: content.sha256_hex(),
            });
        }
        self.stores = Arc::new(figures);
        self.store_views = Arc::new(store_views);
    }
}
