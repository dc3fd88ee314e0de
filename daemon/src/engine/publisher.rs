//! Publishing: the verdict of every process whose facts changed, the stores' views and
//! figures, and the daemon's health, handed to the serving side as one snapshot.

use std::{
    collections::{BTreeSet, VecDeque},
    sync::Arc,
    time::SystemTime,
};

use tokio::sync::watch;

use crate::{
    engine::readers::ReadIndex,
    judge::verdict::{self, Verdict},
    ledger::{Ledger, ProcKey},
    serve::{
        snapshot::{
            Health, MetricsOptions, ProcessViews, Snapshot, StoreFigureMap, StoreFigures,
            StoreViews,
        },
        views,
    },
    stores::{
        catalog::{Catalog, FileKey, RootKey, Version},
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
    views: ProcessViews,
    /// Processes whose last verdict is stale or worse: the ones time alone can move, and
    /// the ones whose re-reads are watched for.
    not_fresh: BTreeSet<ProcKey>,
    /// Judged since last taken: `true` judged stale or worse (again), `false` no longer.
    judged: Vec<(ProcKey, bool)>,
    /// Processes to judge again at the next publication.
    dirty: BTreeSet<ProcKey>,
    /// Stores whose view or figures must be made again (`all`: every one).
    stores_dirty: StoresDirty,
    stores: StoreFigureMap,
    store_views: StoreViews,
    host_reference: Option<Arc<Reference>>,
}

#[derive(Default)]
struct StoresDirty {
    all: bool,
    files: BTreeSet<FileKey>,
}

impl Publisher {
    pub fn new(tx: watch::Sender<Arc<Snapshot>>, options: MetricsOptions) -> Self {
        Self {
            tx,
            options,
            ready: false,
            views: ProcessViews::new(),
            not_fresh: BTreeSet::new(),
            judged: Vec::new(),
            dirty: BTreeSet::new(),
            stores_dirty: StoresDirty {
                all: true,
                files: BTreeSet::new(),
            },
            stores: StoreFigureMap::new(),
            store_views: StoreViews::new(),
            host_reference: None,
        }
    }

    pub fn set_options(&mut self, options: MetricsOptions) {
        self.options = options;
        self.stores_dirty.all = true;
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

    /// Every store's view may have changed (the catalog forgot files, a reload).
    pub fn stores_changed(&mut self) {
        self.stores_dirty.all = true;
    }

    /// `file`'s content, versions or readers changed.
    pub fn store_changed(&mut self, file: &FileKey) {
        if !self.stores_dirty.all {
            self.stores_dirty.files.insert(file.clone());
        }
    }

    /// `key` is gone from the ledger.
    pub fn forget(&mut self, key: &ProcKey) {
        self.views.remove(key);
        self.not_fresh.remove(key);
        self.dirty.remove(key);
    }

    /// The verdict last published for `key`.
    pub fn verdict_of(&self, key: &ProcKey) -> Option<Verdict> {
        self.views.get(key).map(|v| v.verdict)
    }

    /// Processes last judged stale or worse.
    pub fn not_fresh(&self) -> impl Iterator<Item = &ProcKey> {
        self.not_fresh.iter()
    }

    pub fn is_not_fresh(&self, key: &ProcKey) -> bool {
        self.not_fresh.contains(key)
    }

    /// The processes judged since the last call: `true` for one judged stale or worse
    /// (each time it is), `false` for one that no longer is.
    pub fn take_judged(&mut self) -> Vec<(ProcKey, bool)> {
        std::mem::take(&mut self.judged)
    }

    /// Whether a publication is due: something changed (or `force`).
    pub fn due(&self, force: bool) -> bool {
        force
            || !self.dirty.is_empty()
            || self.stores_dirty.all
            || !self.stores_dirty.files.is_empty()
            || self.tx.borrow().ready != self.ready
    }

    /// Judges what changed and publishes a snapshot: the cost follows what changed, not
    /// what is tracked.
    pub fn publish(&mut self, sources: &Sources<'_>, health: Health) {
        self.refresh_stores(sources);
        let now = SystemTime::now();
        for key in std::mem::take(&mut self.dirty) {
            let Some(entry) = sources.ledger.get(&key) else {
                self.forget(&key);
                continue;
            };
            let changed = entry
                .info
                .root
                .and_then(|r| sources.index.stores_changed_at(&r, sources.catalog));
            match verdict::judge(entry, sources.catalog, changed, now) {
                Some(v) => {
                    if v.verdict >= Verdict::Stale {
                        self.not_fresh.insert(key);
                        self.judged.push((key, true));
                    } else if self.not_fresh.remove(&key) {
                        self.judged.push((key, false));
                    }
                    self.views
                        .insert(key, Arc::new(views::process_view(entry, &v)));
                }
                None => self.forget(&key),
            }
        }
        let snapshot = Snapshot {
            processes: self.views.clone(),
            ready: self.ready,
            options: self.options.clone(),
            stores: self.stores.clone(),
            store_views: self.store_views.clone(),
            host_reference: self.host_reference.clone(),
            health,
        };
        self.tx.send_replace(Arc::new(snapshot));
    }

    /// Trust stores for `/stores` and the store metrics: every file the catalog knows
    /// (the host's; containers' too with `metrics.container_stores` for the metrics),
    /// made again only for the files that changed.
    fn refresh_stores(&mut self, sources: &Sources<'_>) {
        let dirty = std::mem::take(&mut self.stores_dirty);
        if dirty.all {
            self.stores = StoreFigureMap::new();
            self.store_views = StoreViews::new();
            for (key, versions) in sources.catalog.export() {
                self.refresh_store(sources, key, Some(versions));
            }
        } else {
            for key in &dirty.files {
                self.refresh_store(sources, key, sources.catalog.versions(key));
            }
        }
    }

    fn refresh_store(
        &mut self,
        sources: &Sources<'_>,
        key: &FileKey,
        versions: Option<&VecDeque<Arc<Version>>>,
    ) {
        let Some((versions, current)) = versions.and_then(|v| Some((v, v.back()?))) else {
            self.store_views.remove(key);
            self.stores.remove(key);
            return;
        };
        let host = Some(key.root) == sources.host;
        self.store_views.insert(
            key.clone(),
            Arc::new(views::store_view(
                key,
                versions,
                sources.index.reader_count(key),
                host,
            )),
        );
        let label = if host {
            key.path.to_string_lossy().into_owned()
        } else if self.options.container_stores {
            format!("{}:{}", key.root, key.path.display())
        } else {
            self.stores.remove(key);
            return;
        };
        let Some(content) = current.content.as_deref() else {
            self.stores.remove(key);
            return;
        };
        self.stores.insert(
            key.clone(),
            StoreFigures {
                store: label,
                certificates: content.certificates().len(),
                changed_at: current.seen_at,
                sha256: content.sha256_hex(),
            },
        );
    }
}
