//! The daemon's loop: probe events feed the ledger, the catalog versions the files they
//! name, verdicts judge each process, and a snapshot is published for the API. Data
//! flows one way; this module only wires it and keeps time.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result};
use tokio::{io::unix::AsyncFd, signal::unix::SignalKind, sync::watch};
use trustdrift_common::{AccessKey, AccessStats};

use crate::{
    config::Config,
    events::clock,
    events::intake::Intake,
    events::{self, Access, Event, Task},
    judge::verdict,
    ledger::persist::StateDir,
    ledger::{Ledger, LedgerLimits, Origin, ProcKey, ProcessInfo, TrustRead},
    probe::pinning::PinStatus,
    probe::trust_paths::TrustPaths,
    probe::{Capacities, MapFill, Mode, ProgramStats, Programs},
    probe::{Probe, ProbeOptions},
    process::attribution,
    process::peers::Peers,
    process::procfs,
    process::resolution::Resolver,
    process::seed,
    serve::views::StoreView,
    serve::views::{self, ProcessView},
    stores::catalog::{self, Catalog, FileKey, RootKey},
    stores::reference::{self, Reference},
    stores::watch::{Change, Watcher},
};

/// Where each distribution keeps the CA store a process started now would load. A
/// TLS-capable process that started before one of these last changed (in its root)
/// may hold an older store: it is listed as unverified.
pub const DEFAULT_CA_STORES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/cert.pem",
    "/etc/ssl/ca-bundle.pem",
    "/var/lib/ca-certificates/ca-bundle.pem",
    "/etc/ssl/certs/java/cacerts",
    "/etc/pki/ca-trust/extracted/java/cacerts",
];

/// The engine's knobs, from the configuration.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    pub probe: ProbeOptions,
    pub catalog: catalog::Limits,
    pub ledger: LedgerLimits,
    pub max_watches: usize,
    /// Bound of the queue between the ring buffer and the engine.
    pub queue_bytes: u64,
    /// Scheduling priority raise (nice -N) for the daemon's threads.
    pub priority_boost: u32,
    /// Safety net behind inotify: every file is re-checked this often.
    pub rescan: Duration,
    /// How often the kernel aggregates of processes with a stale verdict are polled (a
    /// re-read makes them fresh again); the others are polled 8 times less often.
    pub poll: Duration,
    pub state_dir: Option<PathBuf>,
    pub save_interval: Duration,
    pub unpin_on_exit: bool,
    pub metrics: MetricsOptions,
}

impl EngineOptions {
    pub fn from_config(c: &Config) -> Self {
        let non_empty = |s: &str| (!s.trim().is_empty()).then(|| PathBuf::from(s.trim()));
        Self {
            probe: ProbeOptions {
                mode: if c.probe.mode == "lean" {
                    Mode::Lean
                } else {
                    Mode::Full
                },
                programs: Programs::Probe,
                paths: c.trust_paths(),
                capacities: Capacities {
                    accesses: c.probe.max_accesses,
                    fds: c.probe.max_fds,
                    procs: c.probe.max_processes,
                    ringbuf_bytes: c.probe.ring_buffer_bytes,
                },
                pin_dir: non_empty(&c.state.pin_dir),
                bpf_stats: c.metrics.bpf_stats,
            },
            catalog: catalog::Limits {
                max_file_bytes: c.catalog.max_file_bytes,
                max_files: c.catalog.max_files,
                ..catalog::Limits::default()
            },
            ledger: LedgerLimits {
                exit_grace: Config::duration_of(&c.ledger.exit_grace),
                max_processes: c.ledger.max_processes,
                ..LedgerLimits::default()
            },
            max_watches: 8192,
            queue_bytes: c.probe.queue_bytes,
            priority_boost: c.probe.priority_boost,
            rescan: Config::duration_of(&c.catalog.rescan_interval),
            poll: Config::duration_of(&c.ledger.poll_interval),
            state_dir: non_empty(&c.state.dir),
            save_interval: Config::duration_of(&c.state.save_interval),
            unpin_on_exit: c.state.unpin_on_exit,
            metrics: MetricsOptions {
                per_process: c.metrics.per_process,
                container_stores: c.metrics.container_stores,
                node: non_empty(&c.metrics.node).map(|n| Arc::from(n.to_string_lossy().as_ref())),
            },
        }
    }
}

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
    pub sha256: String,
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
}

/// What the API serves.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub processes: Vec<Arc<ProcessView>>,
    /// The probe is attached and the start-up scan of /proc is done.
    pub ready: bool,
    pub options: MetricsOptions,
    pub stores: Arc<Vec<StoreFigures>>,
    pub store_views: Arc<Vec<StoreView>>,
    pub host_reference: Option<Arc<Reference>>,
    pub health: Health,
}

#[derive(Default)]
struct Counters {
    events: BTreeMap<String, u64>,
    undecodable: u64,
}

pub struct Engine {
    options: EngineOptions,
    probe: Probe,
    names: attribution::Names,
    state: Option<StateDir>,
    state_dirty: bool,
    last_save: Option<SystemTime>,
    /// No unforced save before this (see `save`).
    next_save: Instant,
    /// When the record rate was last measured, and the records handled by then.
    record_mark: (Instant, u64),
    /// Since when a save has been waiting for a storm to pass.
    save_deferred_since: Option<Instant>,
    stores: Arc<Vec<StoreFigures>>,
    store_views: Arc<Vec<StoreView>>,
    stores_dirty: bool,
    host_reference: Option<Arc<Reference>>,
    map_fill: Vec<MapFill>,
    catalog: Catalog,
    ledger: Ledger,
    watcher: Watcher,
    resolver: Resolver,
    paths: TrustPaths,
    /// Default CA stores per root, for the unverified rule.
    default_stores: BTreeMap<RootKey, BTreeSet<FileKey>>,
    /// Who read each file.
    readers: HashMap<FileKey, BTreeSet<ProcKey>>,
    peers: Peers,
    /// What was learned of each process when its first record was handled.
    contexts: HashMap<ProcKey, ProcessContext>,
    /// Accesses whose final aggregates were taken out of the kernel when first handled
    /// (their process had already exited): nothing is left to poll.
    settled: HashSet<AccessKey>,
    views: BTreeMap<ProcKey, Arc<ProcessView>>,
    dirty: BTreeSet<ProcKey>,
    publish: watch::Sender<Arc<Snapshot>>,
    counters: Counters,
    ready: bool,
    /// Bytes of records drained from the ring buffer and not yet handled.
    queued_bytes: u64,
}

/// A record rate above which saves wait (see [`Engine::save`]).
const STORM_RECORDS_PER_S: f64 = 1000.0;
/// The longest a save waits for a storm to pass.
const MAX_SAVE_DEFERRAL: Duration = Duration::from_secs(30);

/// What the daemon learns of a process from /proc when its first record is handled, and
/// reuses for its other records: a storm process opening four bundles is one lookup of its
/// root, not four. Dropped at the process's exec or exit.
#[derive(Clone, Copy, Debug)]
struct ProcessContext {
    root: Option<RootKey>,
    peer: bool,
    /// Whether it was still running then. If not, its aggregates in the kernel are final.
    alive: bool,
}

/// Hands memory the allocator holds but no longer uses back to the kernel. glibc keeps
/// freed heap for reuse; after the start-up scan (a peak of /proc reads and store parses)
/// or a storm's processes expiring, that is tens of MiB of RSS nobody uses.
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free memory; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A daemon's allocator settings, not a batch program's. Large buffers (a save's, a big
/// response's) are mapped and unmapped rather than carved from the heap: glibc otherwise
/// raises its mmap threshold each time one is freed, after which each stays in the heap.
/// And two arenas, not eight per CPU: every short-lived runtime thread would otherwise
/// leave an arena of its own behind. The soak saw RSS step up by megabytes both ways.
fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes the allocator's parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Raises the calling thread's scheduling priority by `boost` (threads it starts inherit
/// it). A storm of short-lived processes is many runnable tasks against the daemon's two
/// threads: at an equal share the daemon fell behind a full-speed storm on two CPUs, at
/// nice -5 it keeps up (docs/benchmarks.md). The daemon is idle otherwise, so the boost
/// costs nothing outside storms. Without CAP_SYS_NICE it stays as it is, with a warning.
fn raise_priority(boost: u32) {
    if boost == 0 {
        return;
    }
    let nice = -(boost.min(20) as i32);
    // SAFETY: setpriority only changes this thread's nice value.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) } != 0 {
        tracing::warn!(
            "cannot raise the daemon's priority to nice {nice} ({}): a storm of processes may \
             outrun it (set probe.priority_boost = 0 to silence this)",
            std::io::Error::last_os_error()
        );
    }
}

fn wall(boot_ns: u64) -> SystemTime {
    clock::wall_time(boot_ns)
}

fn start_ticks(task: &Task) -> Option<u64> {
    if task.start_ns != 0 {
        Some(procfs::start_ns_to_ticks(task.start_ns))
    } else {
        procfs::start_ticks(task.tgid).ok()
    }
}

fn proc_key(task: &Task) -> Option<ProcKey> {
    Some(ProcKey {
        pid: task.tgid,
        start_ticks: start_ticks(task)?,
    })
}

fn start_time(ticks: u64) -> SystemTime {
    wall(ticks * (1_000_000_000 / procfs::clock_ticks_per_second()))
}

impl Engine {
    fn new(
        probe: Probe,
        options: EngineOptions,
        state: Option<StateDir>,
        publish: watch::Sender<Arc<Snapshot>>,
    ) -> Result<(Self, inotify::Inotify)> {
        let (watcher, inotify) =
            Watcher::new(options.max_watches).context("initialising inotify")?;
        let paths = options.probe.paths.clone();
        Ok((
            Self {
                probe,
                names: attribution::Names::default(),
                state,
                state_dirty: false,
                last_save: None,
                next_save: Instant::now(),
                record_mark: (Instant::now(), 0),
                save_deferred_since: None,
                stores: Arc::default(),
                store_views: Arc::default(),
                stores_dirty: true,
                host_reference: None,
                map_fill: Vec::new(),
                catalog: Catalog::new(options.catalog),
                ledger: Ledger::new(options.ledger),
                watcher,
                resolver: Resolver::default(),
                paths,
                default_stores: BTreeMap::new(),
                readers: HashMap::new(),
                peers: Peers::new(),
                contexts: HashMap::new(),
                settled: HashSet::new(),
                views: BTreeMap::new(),
                dirty: BTreeSet::new(),
                publish,
                counters: Counters::default(),
                ready: false,
                queued_bytes: 0,
                options,
            },
            inotify,
        ))
    }

    /// The host's root, for a process gone before its own could be read, if it was in
    /// the host's mount namespace.
    fn host_root_if_shared(&mut self, mnt_ns: u32) -> Option<RootKey> {
        let host = self.catalog.host_root()?;
        (mnt_ns != 0 && host.mnt_ns == mnt_ns).then_some(host)
    }

    /// The default CA stores of `root`, observed (and watched) the first time it is seen.
    fn track_default_stores(&mut self, root: RootKey) {
        if self.default_stores.contains_key(&root) {
            return;
        }
        let mut stores = BTreeSet::new();
        for path in DEFAULT_CA_STORES {
            let file = FileKey {
                root,
                path: PathBuf::from(path),
            };
            let present = self
                .catalog
                .observe(&file, &mut self.watcher)
                .is_some_and(|v| v.content.is_some());
            if present {
                stores.insert(file);
            }
        }
        self.default_stores.insert(root, stores);
    }

    /// What a process started on the host now would trust: rustls-native-certs where the
    /// daemon's filesystem is the host's, else the host root's first default CA bundle.
    fn load_reference(&mut self) -> Option<Arc<Reference>> {
        if self.catalog.runs_in_host_root() {
            return Some(Arc::new(reference::load()));
        }
        let host = self.catalog.host_root()?;
        let stores = self.default_stores.get(&host)?;
        DEFAULT_CA_STORES.iter().find_map(|path| {
            let file = stores.iter().find(|f| f.path.as_os_str() == *path)?;
            let content = self.catalog.latest(file)?.content.clone()?;
            let certs = content.certificates().into_values().map(|c| (*c).clone());
            Some(Arc::new(reference::from_store(
                path,
                certs.collect(),
                content.errors(),
            )))
        })
    }

    /// When the default stores of `root` last changed.
    fn stores_changed_at(&self, root: &RootKey) -> Option<SystemTime> {
        self.default_stores
            .get(root)?
            .iter()
            .filter_map(|f| self.catalog.latest(f))
            .map(|v| v.seen_at)
            .max()
    }

    /// The context of `key`, looked up the first time.
    fn context(&mut self, key: &ProcKey, task: &Task) -> ProcessContext {
        if let Some(ctx) = self.contexts.get(key) {
            return *ctx;
        }
        let root = self
            .catalog
            .root_of(key.pid, key.start_ticks)
            .map(|(root, _)| root);
        let alive = root.is_some() || procfs::start_ticks(key.pid).ok() == Some(key.start_ticks);
        let ctx = ProcessContext {
            peer: alive && self.peers.is_peer(key),
            root: root.or_else(|| self.host_root_if_shared(task.mnt_ns)),
            alive,
        };
        self.contexts.insert(*key, ctx);
        ctx
    }

    fn attribution_of(&mut self, pid: u32) -> attribution::Attribution {
        let mut a = procfs::cgroup_path(pid)
            .map(|p| attribution::from_cgroup_path(&p))
            .unwrap_or_default();
        self.names
            .enrich(&mut a, &PathBuf::from(format!("/proc/{pid}/root")));
        a
    }

    fn process_info(
        &mut self,
        task: &Task,
        key: &ProcKey,
        root: Option<RootKey>,
        alive: bool,
    ) -> ProcessInfo {
        let attribution = if alive {
            self.attribution_of(key.pid)
        } else {
            attribution::Attribution::default()
        };
        ProcessInfo {
            comm: task.comm.clone(),
            exe: alive
                .then(|| std::fs::read_link(format!("/proc/{}/exe", key.pid)).ok())
                .flatten()
                .map(|p| p.to_string_lossy().into_owned()),
            cmdline: alive.then(|| procfs::cmdline(key.pid)).flatten(),
            uid: task.uid,
            cgroup_id: task.cgroup_id,
            attribution,
            mnt_ns: task.mnt_ns,
            root,
            start_time: Some(start_time(key.start_ticks)),
            tls_library: None,
        }
    }

    fn on_event(&mut self, event: Event) {
        let kind = match &event {
            Event::Access(_) => "access",
            Event::Exec(_) => "exec",
            Event::Exit(_) => "exit",
        };
        *self.counters.events.entry(kind.into()).or_default() += 1;
        self.state_dirty = true;
        match event {
            Event::Access(access) => self.on_access(access),
            Event::Exec(task) => {
                let Some(key) = proc_key(&task) else { return };
                self.contexts.remove(&key);
                for access in self.ledger.exec(&key, task.exec_seq.wrapping_add(1)) {
                    self.probe.forget_access(&access);
                }
                if let Some(entry) = self.ledger.get_mut(&key) {
                    entry.info.comm = task.comm.clone();
                }
                self.dirty.insert(key);
            }
            Event::Exit(task) => {
                let Some(key) = proc_key(&task) else { return };
                self.contexts.remove(&key);
                self.poll_exiting(&key);
                self.ledger.exited(&key, wall(task.ts_ns));
                self.peers.exited(&key);
                self.catalog.forget_pid(key.pid, key.start_ticks);
                self.resolver.forget_process(task.tgid, task.start_ns);
                self.dirty.insert(key);
            }
        }
    }

    fn on_access(&mut self, access: Access) {
        let Some(key) = proc_key(&access.task) else {
            return;
        };
        if self.ledger.owner_of(&access.key).is_some() {
            return;
        }
        let ctx = self.context(&key, &access.task);
        if ctx.peer {
            self.probe.forget_access(&access.key);
            return;
        }
        let root = ctx.root;
        if let Some(root) = root {
            self.track_default_stores(root);
        }
        // /proc is read once per process, not once per file it opens: `upsert` keeps the
        // info of a process it already has.
        let info = if self.ledger.get(&key).is_some() {
            ProcessInfo::default()
        } else {
            self.process_info(&access.task, &key, root, ctx.alive)
        };
        if self.ledger.upsert(key, Origin::Observed, info).is_none() {
            return;
        }
        let (file, canonical, resolve_error, current) = match self.recently_seen(&access, root) {
            Some((file, version, canonical)) => {
                self.resolver.remember(&access, &canonical);
                (Some(file), Some(canonical), None, Some(version))
            }
            None => self.look_up(&access, root),
        };
        // A process already gone cannot open or read again: its aggregate is final, and
        // is taken out of the kernel now rather than read now and again at its exit.
        if !ctx.alive {
            self.settled.insert(access.key);
        }
        let stats = self.aggregate(&access.key, !ctx.alive).unwrap_or_default();
        let opened = if stats.first_open_ns != 0 {
            wall(stats.first_open_ns)
        } else {
            wall(access.task.ts_ns)
        };
        // Which version it got: the inode the probe saw it open, when the history (or the
        // fd it still holds) says which version that was. An inode neither knows was
        // replaced before anyone looked: a version of unknown content, not the current one.
        // Only compared on the same device: on overlayfs the kernel's inode is the
        // overlay's while stat may report the layer's, and a false "unseen" would be a
        // false alert.
        let version = match (&file, access.inode, &current) {
            (Some(f), Some((ino, dev)), Some(now_there))
                if now_there
                    .identity
                    .is_some_and(|i| i.dev == dev && i.ino != ino) =>
            {
                self.catalog
                    .version_of_inode(f, dev, ino, opened)
                    .or_else(|| {
                        self.catalog
                            .adopt_open_file(f, key.pid, access.fd, dev, ino)
                    })
                    .or_else(|| Some(self.catalog.unseen_version(dev, ino, opened)))
            }
            _ => current,
        };
        // A read seeded from /proc for the same file is superseded by what the probe saw.
        if let (Some(entry), Some(f)) = (self.ledger.get_mut(&key), &file) {
            entry
                .reads
                .retain(|r| r.access_key.is_some() || r.file.as_ref() != Some(f));
        }
        let read = TrustRead {
            access_key: Some(access.key),
            path: access.path.clone(),
            file: file.clone(),
            resolved: canonical,
            resolve_error,
            first_open: opened,
            last_open: if stats.last_open_ns != 0 {
                wall(stats.last_open_ns)
            } else {
                opened
            },
            last_read: (stats.last_read_ns != 0).then(|| wall(stats.last_read_ns)),
            bytes: stats.bytes,
            opens: stats.opens.max(1),
            reads: stats.reads,
            version,
            version_read_at: opened,
            listed: false,
        };
        if self.ledger.add_read(&key, read) {
            if let Some(f) = file {
                self.readers.entry(f).or_default().insert(key);
            }
        }
        self.stores_dirty = true;
        self.dirty.insert(key);
    }

    /// What an access opened, without a syscall, when the catalog looked at that very
    /// path in that root moments ago, nothing has changed it since, and the probe saw
    /// the process open the inode that look found. A storm of processes opening the same
    /// bundles is then mostly these.
    fn recently_seen(
        &self,
        access: &Access,
        root: Option<RootKey>,
    ) -> Option<(FileKey, Arc<catalog::Version>, PathBuf)> {
        if !access.path.is_absolute() {
            return None;
        }
        let file = FileKey {
            root: root?,
            path: access.path.clone(),
        };
        let version = self.catalog.recent(&file, Instant::now())?;
        let same_inode = match (access.inode, version.identity) {
            (Some((ino, dev)), Some(seen)) => seen.ino == ino && seen.dev == dev,
            (Some(_), None) => false,
            (None, _) => true,
        };
        let canonical = version.canonical.clone()?;
        same_inode.then_some((file, version, canonical))
    }

    /// Resolves an access's path in its process's root and looks at the file now.
    fn look_up(
        &mut self,
        access: &Access,
        root: Option<RootKey>,
    ) -> (
        Option<FileKey>,
        Option<PathBuf>,
        Option<String>,
        Option<Arc<catalog::Version>>,
    ) {
        let resolved = self.resolver.resolve(access);
        let (file, canonical, resolve_error) = match (&resolved, root) {
            (Ok(r), Some(root)) => (
                Some(FileKey {
                    root,
                    path: r.absolute.clone(),
                }),
                Some(r.canonical.clone()),
                None,
            ),
            (Ok(r), None) => (
                None,
                Some(r.canonical.clone()),
                Some("process root unknown".into()),
            ),
            (Err(e), _) => (None, None, Some(e.to_string())),
        };
        let current = file
            .as_ref()
            .and_then(|f| self.catalog.observe(f, &mut self.watcher));
        (file, canonical, resolve_error, current)
    }

    /// Reads the probe's aggregates: bytes and counts move; a re-read (an open or read
    /// after the one that fixed the version) takes the version current at that time.
    /// An exited process's aggregates cannot move again: they are read once at its exit
    /// and never polled after, or a storm's exited processes would be most of the work.
    fn poll(&mut self, stale_only: bool) {
        let accesses: Vec<(AccessKey, ProcKey)> = self
            .ledger
            .processes()
            .filter(|e| {
                e.exited_at.is_none()
                    && (!stale_only
                        || self
                            .views
                            .get(&e.key)
                            .is_some_and(|v| v.verdict >= verdict::Verdict::Stale))
            })
            .flat_map(|e| e.reads.iter().filter_map(|r| Some((r.access_key?, e.key))))
            .filter(|(a, _)| !self.settled.contains(a))
            .collect();
        self.poll_accesses(accesses, false);
    }

    /// The last word on what an exiting process read: its aggregates, taken out of the
    /// kernel (they cannot move again), so a storm's exited processes do not hold the
    /// access table for the exit grace.
    fn poll_exiting(&mut self, key: &ProcKey) {
        let accesses: Vec<(AccessKey, ProcKey)> = self
            .ledger
            .get(key)
            .map(|e| {
                e.reads
                    .iter()
                    .filter_map(|r| Some((r.access_key?, *key)))
                    .collect()
            })
            .unwrap_or_default();
        let accesses = accesses
            .into_iter()
            .filter(|(a, _)| !self.settled.remove(a))
            .collect();
        self.poll_accesses(accesses, true);
    }

    /// The probe's aggregate of `access`; `exited`: its process is gone, so it cannot
    /// move again and is taken out of the kernel in the same call.
    fn aggregate(&mut self, access: &AccessKey, exited: bool) -> Option<AccessStats> {
        if exited {
            self.probe.take_access_stats(access)
        } else {
            self.probe.access_stats(access)
        }
    }

    /// Brings reads up to date with the probe's aggregates; `take`: removing them from
    /// the kernel (the process exited).
    fn poll_accesses(&mut self, accesses: Vec<(AccessKey, ProcKey)>, take: bool) {
        for (access, key) in accesses {
            let Some(stats) = self.aggregate(&access, take) else {
                continue;
            };
            let Some(entry) = self.ledger.get_mut(&key) else {
                continue;
            };
            let Some(read) = entry
                .reads
                .iter_mut()
                .find(|r| r.access_key == Some(access))
            else {
                continue;
            };
            if stats.bytes == read.bytes && stats.opens == read.opens && stats.reads == read.reads {
                continue;
            }
            let last_open = wall(stats.last_open_ns);
            let last_read = (stats.last_read_ns != 0).then(|| wall(stats.last_read_ns));
            let reread = stats.opens > read.opens;
            read.bytes = stats.bytes;
            read.opens = stats.opens;
            read.reads = stats.reads;
            read.last_open = last_open;
            read.last_read = last_read;
            if stats.bytes > 0 {
                // For a directory, bytes are listed entries: it was read as a set.
                read.listed = read
                    .version
                    .as_ref()
                    .and_then(|v| v.content.as_deref())
                    .is_some_and(|c| matches!(c.shape, catalog::Shape::Directory { .. }));
            }
            let file = read.file.clone();
            let touched = last_read.map_or(last_open, |r| r.max(last_open));
            if reread {
                if let Some(file) = file {
                    // Make sure a change that raced the watcher is in the history first.
                    if self.catalog.refresh(&file, &mut self.watcher) {
                        self.mark_readers(&file);
                    }
                    // The inode the latest open got says which version it was; the
                    // time is the fallback (an old probe, overlayfs' device numbers, or
                    // an inode the history no longer names).
                    let version = (stats.last_ino != 0)
                        .then(|| {
                            self.catalog.version_of_inode(
                                &file,
                                events::userspace_dev(stats.last_dev),
                                stats.last_ino,
                                last_open,
                            )
                        })
                        .flatten()
                        .or_else(|| self.catalog.version_at(&file, touched));
                    if let Some(read) = self
                        .ledger
                        .get_mut(&key)
                        .and_then(|e| e.reads.iter_mut().find(|r| r.access_key == Some(access)))
                    {
                        // Where the path led then (a `..data` swap moves it).
                        if let Some(canonical) = version.as_ref().and_then(|v| v.canonical.clone())
                        {
                            read.resolved = Some(canonical);
                        }
                        read.version = version;
                        read.version_read_at = touched;
                    }
                }
            }
            self.dirty.insert(key);
        }
    }

    fn mark_readers(&mut self, file: &FileKey) {
        self.stores_dirty = true;
        self.state_dirty = true;
        if let Some(readers) = self.readers.get(file) {
            self.dirty.extend(readers.iter().copied());
        }
        let is_default_store = self
            .default_stores
            .get(&file.root)
            .is_some_and(|s| s.contains(file));
        if is_default_store && Some(file.root) == self.catalog.host_root() {
            self.host_reference = self.load_reference();
        }
        if is_default_store {
            let capable: Vec<ProcKey> = self
                .ledger
                .processes()
                .filter(|p| p.origin == Origin::TlsCapable && p.info.root == Some(file.root))
                .map(|p| p.key)
                .collect();
            self.dirty.extend(capable);
        }
    }

    fn on_change(&mut self, change: Change) {
        let now = SystemTime::now();
        match change {
            Change::Dir { root, dir } => self.catalog.dir_changed(root, &dir, now),
            Change::Gone { root, dir } => self.catalog.dir_gone(root, &dir, now),
            Change::Overflow => self.catalog.all_dirty(now),
        }
    }

    /// Takes in every change the watches have queued, without waiting. Also called
    /// before the probe's records are handled: a change made before a process opened a
    /// file is then known before that open is judged (see [`Catalog::recent`]).
    fn take_changes(&mut self, inotify: &mut inotify::Inotify, buffer: &mut [u8]) {
        loop {
            match inotify.read_events(buffer) {
                Ok(events) => {
                    for event in events {
                        for change in self.watcher.interpret(&event.to_owned()) {
                            self.on_change(change);
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!("reading inotify events: {e}");
                    return;
                }
            }
        }
    }

    fn refresh_due(&mut self) {
        for file in self.catalog.take_due(SystemTime::now()) {
            if self.catalog.refresh(&file, &mut self.watcher) {
                self.mark_readers(&file);
            }
        }
    }

    fn rescan(&mut self) {
        let files: Vec<FileKey> = self
            .catalog
            .files()
            .filter(|f| self.catalog.root_reachable(&f.root))
            .cloned()
            .collect();
        for file in files {
            if self.catalog.refresh(&file, &mut self.watcher) {
                self.mark_readers(&file);
            }
        }
    }

    /// Time passes: certificates expire, exited processes leave after their grace.
    fn housekeeping(&mut self) {
        let now = SystemTime::now();
        let expired = self.ledger.expire(now);
        let any_expired = !expired.is_empty();
        for (key, accesses) in expired {
            for access in accesses {
                self.probe.forget_access(&access);
            }
            self.views.remove(&key);
            for readers in self.readers.values_mut() {
                readers.remove(&key);
            }
        }
        self.readers.retain(|_, r| !r.is_empty());
        // An exit whose record was lost leaves its settled accesses behind.
        let ledger = &self.ledger;
        self.settled.retain(|a| {
            ledger
                .owner_of(a)
                .and_then(|k| ledger.get(&k))
                .is_some_and(|p| p.exited_at.is_none())
        });
        let readers = &self.readers;
        let defaults = &self.default_stores;
        self.catalog.forget_files(|f| {
            readers.contains_key(f) || defaults.get(&f.root).is_some_and(|s| s.contains(f))
        });
        self.catalog.prune_contents();
        // Verdicts move with time alone (a certificate held in memory expires): live
        // processes are judged again. An exited one keeps the verdict it left with, or a
        // storm's exited processes would be judged again every few seconds for minutes.
        self.dirty.extend(
            self.ledger
                .processes()
                .filter(|p| p.exited_at.is_none())
                .map(|p| p.key),
        );
        self.map_fill = self.probe.map_fill();
        self.stores_dirty = true;
        if any_expired {
            release_freed_memory();
        }
    }

    /// After a restore: restored processes that are alive are ways back into their roots
    /// again, and the files they read are watched and re-checked (they may have changed
    /// while the daemon was down).
    fn after_restore(&mut self) {
        let alive: Vec<(ProcKey, Option<RootKey>)> = self
            .ledger
            .processes()
            .filter(|p| p.exited_at.is_none())
            .map(|p| (p.key, p.info.root))
            .collect();
        for (key, _) in &alive {
            self.catalog.root_of(key.pid, key.start_ticks);
        }
        for p in self.ledger.processes() {
            for r in &p.reads {
                if let Some(f) = &r.file {
                    self.readers.entry(f.clone()).or_default().insert(p.key);
                }
            }
        }
        let files: Vec<FileKey> = self.readers.keys().cloned().collect();
        for file in files {
            if self.catalog.root_reachable(&file.root) {
                self.catalog.refresh(&file, &mut self.watcher);
            }
        }
        self.dirty.extend(self.ledger.processes().map(|p| p.key));
    }

    /// Persists the ledger when it changed since the last save.
    fn save(&mut self, force: bool) {
        let Some(state) = &self.state else {
            return;
        };
        if !self.state_dirty && !force {
            return;
        }
        // A save writes the whole ledger: with tens of thousands of processes (a storm's,
        // kept for the exit grace) it takes long enough that saving every interval would
        // be most of the daemon's work. Spacing saves to 20x their own duration keeps
        // them under 5% of a core whatever the ledger's size.
        if !force && Instant::now() < self.next_save {
            return;
        }
        // And while records pour in, a save (tens of milliseconds for a storm's ledger,
        // in which nothing drains the ring buffer) waits for the storm to pass, for at
        // most MAX_SAVE_DEFERRAL: what the probe delivers matters more than how recent
        // the copy on disk is.
        let now = Instant::now();
        let records: u64 = self.counters.events.values().sum();
        let (mark, then) = std::mem::replace(&mut self.record_mark, (now, records));
        let rate = (records - then) as f64 / now.duration_since(mark).as_secs_f64().max(1e-3);
        if !force && rate > STORM_RECORDS_PER_S {
            let since = *self.save_deferred_since.get_or_insert(now);
            if now.duration_since(since) < MAX_SAVE_DEFERRAL {
                return;
            }
        }
        self.save_deferred_since = None;
        let started = Instant::now();
        match state.save(&self.ledger, &self.catalog) {
            Ok(_) => {
                self.state_dirty = false;
                self.last_save = Some(SystemTime::now());
                self.next_save = Instant::now() + started.elapsed() * 20;
            }
            Err(e) => tracing::warn!("saving the ledger: {e:#}"),
        }
    }

    /// Applies a reloaded configuration: the kernel filter, limits, intervals and metric
    /// options change in place; keys that need a restart are named.
    fn reconfigure(&mut self, old: &Config, new: &Config) {
        for (key, (was, now)) in old.restart_needed(new) {
            tracing::warn!("{key} changed from {was:?} to {now:?}: takes effect after a restart");
        }
        let options = EngineOptions::from_config(new);
        if options.probe.paths != self.paths {
            match self.probe.set_paths(&options.probe.paths) {
                Ok(()) => {
                    tracing::info!(
                        prefixes = options.probe.paths.prefixes.len(),
                        suffixes = options.probe.paths.suffixes.len(),
                        "trust paths reloaded into the kernel filter"
                    );
                    self.paths = options.probe.paths.clone();
                }
                Err(e) => tracing::warn!("keeping the previous trust paths: {e:#}"),
            }
        }
        self.catalog.set_limits(options.catalog);
        self.ledger.set_limits(options.ledger);
        // What is fixed until a restart stays as the probe was built.
        let probe = ProbeOptions {
            paths: self.paths.clone(),
            ..self.options.probe.clone()
        };
        self.options = EngineOptions {
            probe,
            state_dir: self.options.state_dir.clone(),
            ..options
        };
        self.stores_dirty = true;
        self.dirty.extend(self.ledger.processes().map(|p| p.key));
    }

    /// Trust stores for `/stores` and the store metrics: every file the catalog knows
    /// (the host's; containers' too with `metrics.container_stores` for the metrics).
    fn refresh_stores(&mut self) {
        if !self.stores_dirty {
            return;
        }
        self.stores_dirty = false;
        let host = self.catalog.host_root();
        let mut figures = Vec::new();
        let mut views = Vec::new();
        for (key, versions) in self.catalog.export() {
            let Some(current) = versions.back() else {
                continue;
            };
            let readers = self.readers.get(key).map_or(0, BTreeSet::len);
            views.push(views::store_view(
                key,
                versions,
                readers,
                Some(key.root) == host,
            ));
            let Some(content) = current.content.as_deref() else {
                continue;
            };
            let label = if Some(key.root) == host {
                key.path.to_string_lossy().into_owned()
            } else if self.options.metrics.container_stores {
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
        self.store_views = Arc::new(views);
    }

    fn health(&self) -> Health {
        let mut lost: BTreeMap<String, u64> = self
            .probe
            .losses()
            .iter()
            .map(|(l, n)| (l.name().to_owned(), *n))
            .collect();
        let c = &self.catalog.counters;
        let l = &self.ledger.counters;
        for (reason, n) in [
            ("undecodable_record", self.counters.undecodable),
            ("ledger_processes_evicted", l.processes_evicted),
            ("ledger_reads_evicted", l.reads_evicted),
            ("catalog_files_evicted", c.files_evicted),
            ("catalog_versions_dropped", c.versions_dropped),
            ("watch_failed", self.watcher.failures),
        ] {
            lost.insert(reason.to_owned(), n);
        }
        let tracked = [
            ("processes", self.ledger.len() as u64),
            ("files", self.catalog.files().count() as u64),
            ("watches", self.watcher.watch_count() as u64),
            ("contents_cached", self.catalog.cached_contents() as u64),
            ("queued_record_bytes", self.queued_bytes),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        Health {
            events: self.counters.events.clone(),
            lost,
            scan_errors: c.read_errors.clone(),
            parse_errors: c.parse_errors,
            contents_hashed: c.contents_hashed,
            probe_attached: true,
            pinned: matches!(self.probe.pinning, PinStatus::Active { .. }),
            programs: self.probe.program_stats(),
            maps: self.map_fill.clone(),
            tracked,
            last_save: self.last_save,
        }
    }

    /// Processes that were running before the probe attached.
    fn seed(&mut self) {
        let mut go = seed::GoBinaries::default();
        let now = SystemTime::now();
        for found in seed::scan(&self.paths, &mut go) {
            let key = ProcKey {
                pid: found.pid,
                start_ticks: found.start_ticks,
            };
            let Some((root, _)) = self.catalog.root_of(key.pid, key.start_ticks) else {
                continue;
            };
            self.track_default_stores(root);
            let origin = if found.trust_files.is_empty() {
                Origin::TlsCapable
            } else {
                Origin::Seeded
            };
            let info = ProcessInfo {
                comm: found.comm.clone(),
                exe: found.exe.clone(),
                cmdline: found.cmdline.clone(),
                uid: found.uid,
                cgroup_id: 0,
                attribution: self.attribution_of(key.pid),
                mnt_ns: procfs::mount_namespace_of(key.pid).unwrap_or(0),
                root: Some(root),
                start_time: Some(start_time(key.start_ticks)),
                tls_library: found.tls.clone(),
            };
            if self.ledger.upsert(key, origin, info).is_none() {
                continue;
            }
            for path in found.trust_files {
                let file = FileKey { root, path };
                let version = self.catalog.observe(&file, &mut self.watcher);
                let resolved = version.as_ref().and_then(|v| v.canonical.clone());
                let read = TrustRead {
                    access_key: None,
                    path: file.path.clone(),
                    file: Some(file.clone()),
                    resolved,
                    resolve_error: None,
                    // Only known to be no later than now: it was open when we looked.
                    first_open: now,
                    last_open: now,
                    last_read: None,
                    bytes: 0,
                    opens: 1,
                    reads: 0,
                    version,
                    version_read_at: now,
                    listed: false,
                };
                if self.ledger.add_read(&key, read) {
                    self.readers.entry(file).or_default().insert(key);
                }
            }
            self.stores_dirty = true;
            self.dirty.insert(key);
        }
    }

    fn publish(&mut self, force: bool) {
        if !force && self.dirty.is_empty() && self.publish.borrow().ready == self.ready {
            return;
        }
        self.refresh_stores();
        let now = SystemTime::now();
        for key in std::mem::take(&mut self.dirty) {
            let Some(entry) = self.ledger.get(&key) else {
                self.views.remove(&key);
                continue;
            };
            let changed = entry.info.root.and_then(|r| self.stores_changed_at(&r));
            match verdict::judge(entry, &self.catalog, changed, now) {
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
            options: self.options.metrics.clone(),
            stores: Arc::clone(&self.stores),
            store_views: Arc::clone(&self.store_views),
            host_reference: self.host_reference.clone(),
            health: self.health(),
        };
        self.publish.send_replace(Arc::new(snapshot));
    }
}

/// Runs the daemon until SIGINT or SIGTERM; SIGHUP reloads the configuration through
/// `reload`. `serve` gets the snapshot receiver (the API) at once and answers `/readyz`
/// with 503 until the probe is attached and the start-up scan is done.
pub async fn run<F, Fut>(
    config: Config,
    mut reload: impl FnMut() -> Result<Config>,
    serve: F,
) -> Result<()>
where
    F: FnOnce(watch::Receiver<Arc<Snapshot>>) -> Fut,
    Fut: std::future::Future<Output = Result<()>> + Send + 'static,
{
    tune_allocator();
    let mut interrupt = tokio::signal::unix::signal(SignalKind::interrupt())?;
    let mut terminate = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut hangup = tokio::signal::unix::signal(SignalKind::hangup())?;
    let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
    let server = tokio::spawn(serve(rx));
    let options = EngineOptions::from_config(&config);
    let state = options
        .state_dir
        .as_deref()
        .map(StateDir::open)
        .transpose()?;

    let mut probe = Probe::attach(options.probe.clone())?;
    // Before the intake thread starts, which inherits it.
    raise_priority(options.priority_boost);
    let mut intake = Intake::start(probe.take_events()?, options.queue_bytes)?;
    let (mut engine, inotify) = Engine::new(probe, options, state, tx)?;
    // SAFETY: the Inotify instance owns its fd for as long as the AsyncFd owns it.
    let mut changes =
        unsafe { AsyncFd::register_with_interest(inotify, tokio::io::Interest::READABLE) }
            .context("watching trust directories")?;
    let mut change_buffer = vec![0u8; 64 * 1024];
    tracing::info!(mode = ?engine.probe.mode, pinning = ?engine.probe.pinning, "probe attached");

    if let Some(state) = &engine.state {
        let restored = state.restore(&mut engine.ledger, &mut engine.catalog);
        if restored > 0 {
            tracing::info!(
                processes = restored,
                "ledger restored from the state directory"
            );
        }
    }
    engine.after_restore();
    if let Some(host) = engine.catalog.host_root() {
        engine.track_default_stores(host);
    }
    engine.host_reference = engine.load_reference();
    engine.seed();
    engine.map_fill = engine.probe.map_fill();
    engine.ready = true;
    engine.publish(true);
    engine.save(true);
    release_freed_memory();
    tracing::info!(
        processes = engine.ledger.len(),
        "start-up scan done; serving verdicts"
    );

    let mut config = config;
    let mut poll_stale = tokio::time::interval(engine.options.poll);
    let mut poll_all = tokio::time::interval(engine.options.poll * 8);
    let mut rescan = tokio::time::interval(engine.options.rescan);
    let mut housekeeping = tokio::time::interval(Duration::from_secs(5));
    let mut debounce = tokio::time::interval(Duration::from_millis(20));
    let mut save = tokio::time::interval(engine.options.save_interval);
    for t in [
        &mut poll_stale,
        &mut poll_all,
        &mut rescan,
        &mut housekeeping,
        &mut debounce,
        &mut save,
    ] {
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    loop {
        let mut force = false;
        // Snapshots are published at most once per debounce tick (or at once when forced):
        // building one per ring-buffer wake-up made a storm cost the daemon O(processes)
        // per record.
        let mut due = false;
        tokio::select! {
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
            _ = hangup.recv() => {
                match reload() {
                    Ok(new) => {
                        tracing::info!("SIGHUP: configuration reloaded");
                        engine.reconfigure(&config, &new);
                        poll_stale = tokio::time::interval(engine.options.poll);
                        poll_all = tokio::time::interval(engine.options.poll * 8);
                        rescan = tokio::time::interval(engine.options.rescan);
                        save = tokio::time::interval(engine.options.save_interval);
                        config = new;
                        force = true;
                    }
                    Err(e) => tracing::error!("SIGHUP: keeping the running configuration: {e:#}"),
                }
            }
            batch = intake.batches.recv() => {
                let batch = batch.context("the ring-buffer intake thread stopped")?;
                // What the watches queued before these opens happened is known before
                // they are judged.
                engine.take_changes(changes.get_mut(), &mut change_buffer);
                for record in batch.records() {
                    match events::decode(record) {
                        Ok(event) => engine.on_event(event),
                        Err(e) => {
                            engine.counters.undecodable += 1;
                            tracing::warn!("dropping a ring-buffer record: {e}");
                        }
                    }
                }
                intake.handled(&batch);
                engine.queued_bytes = intake.queued_bytes();
            }
            guard = changes.readable_mut() => {
                let mut guard = guard.context("waiting on inotify")?;
                engine.take_changes(guard.get_inner_mut(), &mut change_buffer);
                guard.clear_ready();
            }
            _ = debounce.tick() => {
                engine.refresh_due();
                due = true;
            }
            _ = poll_stale.tick() => engine.poll(true),
            _ = poll_all.tick() => engine.poll(false),
            _ = rescan.tick() => engine.rescan(),
            _ = housekeeping.tick() => { engine.housekeeping(); force = true; }
            _ = save.tick() => engine.save(false),
        }
        if force || due {
            engine.publish(force);
        }
    }
    server.abort();
    engine.save(true);
    if engine.options.unpin_on_exit {
        engine.probe.unpin();
        tracing::info!("probe unpinned: it detaches as the daemon exits");
    } else if let PinStatus::Active { dir, .. } = &engine.probe.pinning {
        tracing::info!(
            dir = %dir.display(),
            "the probe stays pinned and keeps recording until the next start"
        );
    }
    let events: u64 = engine.counters.events.values().sum();
    tracing::info!(events, "daemon stopped");
    Ok(())
}
