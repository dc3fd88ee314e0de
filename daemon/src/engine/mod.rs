//! The daemon's loop: probe events feed the ledger, the catalog versions the files they
//! name, verdicts judge each process, and a snapshot is published for the API. Data
//! flows one way; this module only wires it and keeps time.
//!
//! The engine composes parts that each do one job: [`kernel`] is the probe's tables as
//! the engine sees them, [`contexts`] what it learned of each process, [`readers`] who
//! read which file, [`publisher`] the snapshot for the API, [`saver`] persistence,
//! [`health`] what the daemon says of its own work. [`run`] is the loop that drives them.

mod changes;
pub mod contexts;
mod health;
pub mod kernel;
pub mod options;
pub mod publisher;
pub mod readers;
pub mod run;
pub mod runtime;
pub mod saver;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::Arc,
    time::{Instant, SystemTime},
};

use anyhow::{Context, Result};
use trustdrift_common::{AccessKey, AccessStats};

use self::{
    contexts::{Contexts, ProcessContext},
    kernel::Kernel,
    options::EngineOptions,
    publisher::{Publisher, Sources},
    readers::ReadIndex,
    saver::Saver,
};
use crate::{
    config::Config,
    events::{self, Access, Event, Task, clock},
    ledger::{Aggregates, Counts, Ledger, Origin, ProcKey, ProcessInfo, TrustRead},
    probe::{MapFill, ProbeOptions},
    process::{
        attribution, deadline::Deadline, peers::Peers, procfs, resolution::Resolver, rootfs::Root,
    },
    serve::snapshot::Heartbeat,
    stores::{
        catalog::{self, Catalog, Expect, FileKey, RootKey, Unobserved},
        digest::NodeKey,
        reference::{self, DEFAULT_CA_STORES, Reference},
        watch::Watcher,
    },
};

pub use run::run;

/// What the engine counts of its own work.
#[derive(Default)]
struct Counters {
    events: BTreeMap<String, u64>,
    undecodable: u64,
    /// Bytes of records drained from the ring buffer and not yet handled.
    queued_bytes: u64,
    /// The probe's maps' fill, as last counted.
    map_fill: Vec<MapFill>,
    /// Aggregates taken while the crash journal was full.
    unjournalled: u64,
    /// Ring records the intake took while the crash journal was full.
    unjournalled_records: u64,
    /// Processes left the ledger, or a burst of records ended: once the snapshot that
    /// still showed them is replaced, the memory they held goes back to the kernel.
    trim_due: bool,
    /// Records handled as of the last housekeeping, and how many housekeepings in a row
    /// saw none come.
    records_at_housekeeping: u64,
    quiet_housekeepings: u64,
}

pub struct Engine {
    options: EngineOptions,
    /// Beaten whenever the engine makes progress (see `/healthz`).
    heartbeat: Heartbeat,
    kernel: Box<dyn Kernel>,
    catalog: Catalog,
    /// Every read in another process's world runs on its workers, under a deadline.
    io: Deadline,
    ledger: Ledger,
    watcher: Watcher,
    resolver: Resolver,
    names: attribution::Names,
    peers: Peers,
    index: ReadIndex,
    contexts: Contexts,
    publisher: Publisher,
    saver: Saver,
    counters: Counters,
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

/// Where an access's path led when the engine looked.
#[derive(Default)]
struct Found {
    /// The file in the catalog, when it is one the process could have opened.
    file: Option<FileKey>,
    canonical: Option<PathBuf>,
    resolve_error: Option<String>,
    current: Option<Arc<catalog::Version>>,
    /// Why what the process read cannot be known.
    unverifiable: Option<String>,
}

impl Found {
    fn error(reason: String) -> Self {
        Self {
            resolve_error: Some(reason),
            ..Self::default()
        }
    }
}

/// The probe's aggregate in wall-clock time.
fn counts(stats: &AccessStats) -> Counts {
    Counts {
        bytes: stats.bytes,
        opens: stats.opens,
        reads: stats.reads,
        last_open: wall(stats.last_open_ns),
        last_read: (stats.last_read_ns != 0).then(|| wall(stats.last_read_ns)),
    }
}

impl Engine {
    /// An engine over `kernel`'s tables; the watcher's inotify instance is returned for the
    /// loop to wait on.
    pub fn new(
        kernel: Box<dyn Kernel>,
        options: EngineOptions,
        saver: Saver,
        publisher: Publisher,
        key: NodeKey,
    ) -> Result<(Self, inotify::Inotify)> {
        let (watcher, inotify) =
            Watcher::new(options.max_watches).context("initialising inotify")?;
        Ok((
            Self {
                heartbeat: Heartbeat::default(),
                kernel,
                catalog: Catalog::new(options.catalog, key),
                io: Deadline::new(options.io),
                ledger: Ledger::new(options.ledger),
                watcher,
                resolver: Resolver::default(),
                names: attribution::Names::default(),
                peers: Peers::new(),
                index: ReadIndex::default(),
                contexts: Contexts::default(),
                publisher,
                saver,
                counters: Counters::default(),
                options,
            },
            inotify,
        ))
    }

    /// Records handled so far.
    fn records(&self) -> u64 {
        self.counters.events.values().sum()
    }

    /// The host's root, for a process gone before its own could be read, if it was in
    /// the host's mount namespace.
    fn host_root_if_shared(&mut self, mnt_ns: u32) -> Option<RootKey> {
        let host = self.catalog.host_root()?;
        (mnt_ns != 0 && host.mnt_ns == mnt_ns).then_some(host)
    }

    /// The default CA stores of `root`, observed (and watched) the first time it is seen.
    fn track_default_stores(&mut self, root: RootKey) {
        if self.index.knows_root(&root) {
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
                .observe(&file, None, &mut self.watcher, &mut self.io)
                .is_ok_and(|v| v.content.is_some());
            if present {
                self.publisher.store_changed(&file);
                stores.insert(file);
            }
        }
        self.index.set_default_stores(root, stores);
    }

    /// What a process started on the host now would trust: rustls-native-certs where the
    /// daemon's filesystem is the host's, else the host root's first default CA bundle.
    fn load_reference(&mut self) -> Option<Arc<Reference>> {
        if self.catalog.runs_in_host_root() {
            return Some(Arc::new(reference::load()));
        }
        let host = self.catalog.host_root()?;
        let stores = self.index.default_stores(&host)?;
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

    /// The context of `key`, looked up the first time; with the process's root handle
    /// when it was just opened.
    fn context(&mut self, key: &ProcKey, task: &Task) -> (ProcessContext, Option<Arc<Root>>) {
        if let Some(ctx) = self.contexts.get(key) {
            return (ctx, None);
        }
        let found = self.catalog.root_of(key.pid, key.start_ticks);
        let alive = found.is_some() || procfs::start_ticks(key.pid).ok() == Some(key.start_ticks);
        let (root, handle) = match found {
            Some((root, handle)) => (Some(root), Some(handle)),
            None => (self.host_root_if_shared(task.mnt_ns), None),
        };
        let ctx = ProcessContext {
            peer: alive && self.peers.is_peer(key),
            root,
            alive,
        };
        self.contexts.insert(*key, ctx);
        (ctx, handle)
    }

    /// Who `pid` belongs to; `root`: its root, to read its service account's namespace in.
    fn attribution_of(&mut self, pid: u32, root: Option<Arc<Root>>) -> attribution::Attribution {
        let mut a = procfs::cgroup_path(pid)
            .map(|p| attribution::from_cgroup_path(&p))
            .unwrap_or_default();
        self.names.enrich(&mut a, &mut self.io, root);
        a
    }

    fn process_info(
        &mut self,
        task: &Task,
        key: &ProcKey,
        ctx: ProcessContext,
        handle: Option<Arc<Root>>,
    ) -> ProcessInfo {
        let alive = ctx.alive;
        let attribution = if alive {
            let handle = handle.or_else(|| {
                self.catalog
                    .root_of(key.pid, key.start_ticks)
                    .map(|(_, h)| h)
            });
            self.attribution_of(key.pid, handle)
        } else {
            attribution::Attribution::default()
        };
        let root = ctx.root;
        ProcessInfo {
            comm: task.comm.clone(),
            exe: alive.then(|| procfs::exe_path(key.pid)).flatten(),
            cmdline: (alive && self.options.cmdline)
                .then(|| procfs::cmdline(key.pid))
                .flatten(),
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
        self.heartbeat.beat();
        let kind = match &event {
            Event::Access(_) => "access",
            Event::Exec(_) => "exec",
            Event::Exit(_) => "exit",
            Event::Reread(_) => "reread",
        };
        *self.counters.events.entry(kind.into()).or_default() += 1;
        self.saver.mark_dirty();
        match event {
            Event::Access(access) => {
                tracing::debug!(
                    pid = access.task.tgid,
                    comm = %access.task.comm,
                    path = %access.path.display(),
                    key = ?access.key,
                    "access"
                );
                self.on_access(access)
            }
            Event::Exec(task) => {
                let Some(key) = proc_key(&task) else { return };
                self.contexts.forget(&key);
                let watched = self.publisher.is_not_fresh(&key);
                for access in self
                    .ledger
                    .exec(&key, task.exec_seq.wrapping_add(1), &task.comm)
                {
                    if watched {
                        self.kernel.unwatch_reread(&access);
                    }
                    self.kernel.forget_access(&access);
                }
                self.publisher.mark(key);
            }
            Event::Exit(task) => {
                let Some(key) = proc_key(&task) else { return };
                self.contexts.forget(&key);
                if self.publisher.is_not_fresh(&key) {
                    self.watch_rereads(&key, false);
                }
                self.poll_exiting(&key);
                self.ledger
                    .exited(&key, wall(task.ts_ns), Aggregates::Taken);
                self.peers.exited(&key);
                self.catalog.forget_pid(key.pid, key.start_ticks);
                self.resolver.forget_process(task.tgid, task.start_ns);
                self.publisher.mark(key);
            }
            // A process judged stale opened or read what it had read again: its aggregate
            // says which version now, without waiting for the next poll.
            Event::Reread(reread) => {
                let Some(key) = self.ledger.owner_of(&reread.key) else {
                    return;
                };
                if self.ledger.is_live(&key) && !self.contexts.is_settled(&reread.key) {
                    self.poll_accesses(vec![(reread.key, key)], false);
                }
            }
        }
    }

    fn on_access(&mut self, access: Access) {
        let Some(key) = proc_key(&access.task) else {
            // Nothing to attribute it to: the kernel must not keep it for nobody.
            self.kernel.forget_access(&access.key);
            return;
        };
        if self.ledger.owner_of(&access.key).is_some() {
            return;
        }
        let (ctx, handle) = self.context(&key, &access.task);
        if ctx.peer {
            self.kernel.forget_access(&access.key);
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
            self.process_info(&access.task, &key, ctx, handle)
        };
        if self.ledger.upsert(key, Origin::Observed, info).is_none() {
            // The ledger refused the process: its entry leaves the kernel at once, or the
            // refused would fill the kernel's table for everyone else.
            self.kernel.forget_access(&access.key);
            return;
        }
        let found = match self.recently_seen(&access, root) {
            Some((file, version, canonical)) => {
                self.resolver.remember(&access, &canonical);
                Found {
                    file: Some(file),
                    canonical: Some(canonical),
                    current: Some(version),
                    ..Found::default()
                }
            }
            None => self.look_up(&access, root, ctx.alive),
        };
        // A process already gone cannot open or read again: its aggregate is final, and
        // is taken out of the kernel now rather than read now and again at its exit.
        if !ctx.alive {
            self.contexts.settle(access.key);
        }
        let stats = self.aggregate(&access.key, !ctx.alive).unwrap_or_default();
        let opened = if stats.first_open_ns != 0 {
            wall(stats.first_open_ns)
        } else {
            wall(access.task.ts_ns)
        };
        // Which version it got: the inode the probe saw it open, when the history (or the
        // fd it still holds) says which version that was. An inode neither knows was
        // replaced before anyone looked (the catalog only keeps a path whose current file
        // is that inode, or lives where the kernel says the opened one did): a version of
        // unknown content, not the current one. Only compared on the same device: on
        // overlayfs the kernel's inode is the overlay's while stat may report the layer's.
        let version = match (&found.file, access.inode, &found.current) {
            (Some(f), Some((ino, dev)), Some(now_there))
                if now_there
                    .identity
                    .is_some_and(|i| i.dev == dev && i.ino != ino) =>
            {
                self.catalog
                    .version_of_inode(f, dev, ino, opened)
                    .or_else(|| {
                        self.catalog.adopt_open_file(
                            f,
                            key.pid,
                            access.fd,
                            (dev, ino),
                            opened,
                            &mut self.io,
                        )
                    })
                    .or_else(|| Some(self.catalog.unseen_version(dev, ino, opened)))
            }
            _ => found.current.clone(),
        };
        let file = found.file.clone();
        let read = TrustRead {
            access_key: Some(access.key),
            path: access.path.clone(),
            file: file.clone(),
            resolved: found.canonical,
            resolve_error: found.resolve_error,
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
            unverifiable: found.unverifiable,
        };
        if let Some(f) = &file {
            // Its versions or its readers changed.
            self.publisher.store_changed(f);
        }
        if self.ledger.add_read(&key, read) {
            if let Some(f) = file {
                self.index.add(f, key);
            }
        } else {
            // Refused (too many reads for one process): out of the kernel at once.
            self.kernel.forget_access(&access.key);
        }
        self.publisher.mark(key);
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

    /// Makes an access's path absolute in its process's root and looks at the file now:
    /// read only if it is the file the open got (or lives where the kernel says that one
    /// did). Anything else is unverifiable, never judged against some other file.
    fn look_up(&mut self, access: &Access, root: Option<RootKey>, alive: bool) -> Found {
        let absolute = match self.resolver.absolute(access, alive) {
            Ok(p) => p,
            Err(e) => return Found::error(e.to_string()),
        };
        let Some(root) = root else {
            return Found::error("process root unknown".into());
        };
        let file = FileKey {
            root,
            path: absolute,
        };
        let expect = access.inode.map(|(ino, dev)| Expect {
            dev,
            ino,
            kernel_path: access.kernel_path.clone(),
        });
        match self
            .catalog
            .observe(&file, expect.as_ref(), &mut self.watcher, &mut self.io)
        {
            Ok(version) => {
                if let Some(canonical) = &version.canonical {
                    self.resolver.remember(access, canonical);
                }
                Found {
                    canonical: version.canonical.clone(),
                    current: Some(version),
                    file: Some(file),
                    ..Found::default()
                }
            }
            Err(Unobserved::Elsewhere { canonical }) => Found {
                canonical: Some(canonical),
                unverifiable: Some(
                    "the path leads to another file than the one the process opened (it \
                     changed directory, remounted, or rewrote the path after the open): not \
                     read, not judged"
                        .into(),
                ),
                ..Found::default()
            },
            Err(Unobserved::Refused(refused)) => Found {
                // Kept: a later re-read or rescan looks again, once the back-off allows.
                file: Some(file),
                resolve_error: Some(format!("looking at the file {refused}")),
                ..Found::default()
            },
            Err(Unobserved::RootUnreachable) => {
                Found::error("the process's root is no longer reachable".into())
            }
            Err(Unobserved::Untracked) => {
                Found::error("not tracked: the catalog is full (catalog.max_files)".into())
            }
        }
    }

    /// Reads the probe's aggregates: bytes and counts move; a re-read (an open or read
    /// after the one that fixed the version) takes the version current at that time.
    /// An exited process's aggregates cannot move again: they are read once at its exit
    /// and never polled after, or a storm's exited processes would be most of the work.
    fn poll(&mut self, stale_only: bool) {
        let keys: Vec<ProcKey> = if stale_only {
            self.publisher
                .not_fresh()
                .filter(|k| self.ledger.is_live(k))
                .copied()
                .collect()
        } else {
            self.ledger.live().map(|p| p.key).collect()
        };
        let accesses: Vec<(AccessKey, ProcKey)> = keys
            .iter()
            .filter_map(|k| self.ledger.get(k))
            .flat_map(|e| e.reads.iter().filter_map(|r| Some((r.access_key?, e.key))))
            .filter(|(a, _)| !self.contexts.is_settled(a))
            .collect();
        self.poll_accesses(accesses, false);
    }

    /// Asks the probe to say at once when a live process judged stale re-reads what it
    /// read (`watch`), or withdraws that (it is fresh again, or leaving). A watch fires
    /// once: the poll it causes marks the process, and if it is still stale when judged
    /// again it is watched again. A full watch table only leaves that process to the
    /// regular poll of stale processes.
    fn watch_rereads(&mut self, key: &ProcKey, watch: bool) {
        if watch && !self.ledger.is_live(key) {
            return;
        }
        let Some(entry) = self.ledger.get(key) else {
            return;
        };
        for access in entry.reads.iter().filter_map(|r| r.access_key) {
            if self.contexts.is_settled(&access) {
                continue;
            }
            if !watch {
                self.kernel.unwatch_reread(&access);
            } else if let Err(e) = self.kernel.watch_reread(&access) {
                tracing::debug!("re-read of {access:?} left to the poll: {e:#}");
            }
        }
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
            .filter(|(a, _)| !self.contexts.unsettle(a))
            .collect();
        self.poll_accesses(accesses, true);
    }

    /// The probe's aggregate of `access`; `exited`: its process is gone, so it cannot
    /// move again and is taken out of the kernel in the same call.
    fn aggregate(&mut self, access: &AccessKey, exited: bool) -> Option<AccessStats> {
        if !exited {
            return self.kernel.access_stats(access);
        }
        let stats = self.kernel.take_access_stats(access)?;
        // The kernel no longer has it: journalled before the ledger takes it, so a crash
        // before the next save does not lose it.
        if !self.saver.journal_aggregate(access, &stats) {
            self.counters.unjournalled += 1;
        }
        Some(stats)
    }

    /// Brings reads up to date with the probe's aggregates; `take`: removing them from
    /// the kernel (the process exited).
    fn poll_accesses(&mut self, accesses: Vec<(AccessKey, ProcKey)>, take: bool) {
        for (access, key) in accesses {
            if let Some(stats) = self.aggregate(&access, take) {
                self.apply_stats(&access, key, &stats);
            }
        }
    }

    /// Moves a read to what the probe's aggregate says: bytes and counts; a re-read (an
    /// open or read after the one that fixed the version) takes the version current then.
    fn apply_stats(&mut self, access: &AccessKey, key: ProcKey, stats: &AccessStats) {
        let counts = counts(stats);
        let Some(moved) = self.ledger.update_counts(&key, access, &counts) else {
            return;
        };
        if let (true, Some(file)) = (moved.reread, moved.file) {
            // Make sure a change that raced the watcher is in the history first.
            self.catalog.refresh(&file, &mut self.watcher, &mut self.io);
            // The inode the latest open got says which version it was; the time is the
            // fallback (an old probe, overlayfs' device numbers, or an inode the history
            // no longer names).
            let version = (stats.last_ino != 0)
                .then(|| {
                    self.catalog.version_of_inode(
                        &file,
                        events::userspace_dev(stats.last_dev),
                        stats.last_ino,
                        counts.last_open,
                    )
                })
                .flatten()
                .or_else(|| self.catalog.version_at(&file, moved.touched));
            self.ledger
                .set_version(&key, access, version, moved.touched);
        }
        self.publisher.mark(key);
    }

    /// Quiet housekeepings between two flushes of the engine's allocator cache while a
    /// storm's heap is left (30 s).
    const QUIET_FLUSH_EVERY: u64 = 6;

    /// Time passes: certificates expire, exited processes leave after their grace. The
    /// cost follows what leaves and what is not fresh, not what is tracked.
    fn housekeeping(&mut self) {
        let now = SystemTime::now();
        let expired = self.ledger.expire(now);
        let any_expired = !expired.is_empty();
        self.drop_gone(expired);
        // An exit whose record was lost leaves its settled accesses behind.
        let ledger = &self.ledger;
        self.contexts
            .retain_settled(|a| ledger.owner_of(a).is_some_and(|k| ledger.is_live(&k)));
        let index = &self.index;
        if self.catalog.forget_files(|f| index.keeps(f)) > 0 {
            self.publisher.stores_changed();
        }
        self.catalog.prune_contents();
        // Verdicts move with time alone only where something is held that is not on disk
        // (a certificate held in memory expires): live processes that are not fresh are
        // judged again. A fresh one holds what is on disk; an exited one keeps the verdict
        // it left with.
        let due: Vec<ProcKey> = self
            .publisher
            .not_fresh()
            .filter(|k| self.ledger.is_live(k))
            .copied()
            .collect();
        self.publisher.mark_all(due);
        self.counters.map_fill = self.kernel.map_fill();
        // Processes left, or the records stopped coming: what they held is free now.
        let records = self.records();
        let quiet =
            records == std::mem::replace(&mut self.counters.records_at_housekeeping, records);
        self.counters.quiet_housekeepings = if quiet {
            self.counters.quiet_housekeepings + 1
        } else {
            0
        };
        let fell_quiet = self.counters.quiet_housekeepings == 1;
        // A heap a storm grew stays large, and what the engine's own churn caches since
        // the last flush is scattered through it: flushed again now and then.
        let flush_again = quiet
            && self
                .counters
                .quiet_housekeepings
                .is_multiple_of(Self::QUIET_FLUSH_EVERY)
            && crate::allocator::heap_left_large();
        self.counters.trim_due |= any_expired || fell_quiet || flush_again;
        if quiet {
            self.saver.release_journal_pages();
            if !self.counters.trim_due {
                crate::allocator::trim();
            }
        }
    }

    /// Processes the ledger evicted to make room leave the views, the read index and the
    /// kernel at once: in a storm that fills the ledger, thousands a second would
    /// otherwise wait for the next housekeeping, doubling what the daemon holds.
    fn drop_evicted(&mut self) {
        let evicted = self.ledger.take_evicted();
        if !evicted.is_empty() {
            self.drop_gone(evicted);
        }
    }

    /// What the daemon holds of processes that left the ledger.
    fn drop_gone(&mut self, gone: Vec<crate::ledger::Expired>) {
        for gone in gone {
            for access in &gone.accesses {
                self.kernel.forget_access(access);
            }
            self.publisher.forget(&gone.key);
            for file in self.index.forget_reader(&gone.key, &gone.files) {
                self.publisher.store_changed(&file);
            }
        }
    }

    fn save(&mut self, force: bool) {
        let records = self.records();
        self.saver.save(force, records, &self.ledger, &self.catalog);
    }

    /// Applies a reloaded configuration: the kernel filter, limits, intervals and metric
    /// options change in place; keys that need a restart are named.
    fn reconfigure(&mut self, old: &Config, new: &Config) {
        for (key, (was, now)) in old.restart_needed(new) {
            tracing::warn!("{key} changed from {was:?} to {now:?}: takes effect after a restart");
        }
        let options = EngineOptions::from_config(new);
        // The trust paths the kernel filter holds.
        let mut paths = self.options.probe.paths.clone();
        if options.probe.paths != paths {
            match self.kernel.set_paths(&options.probe.paths) {
                Ok(()) => {
                    tracing::info!(
                        prefixes = options.probe.paths.prefixes.len(),
                        suffixes = options.probe.paths.suffixes.len(),
                        "trust paths reloaded into the kernel filter"
                    );
                    paths = options.probe.paths.clone();
                }
                Err(e) => tracing::warn!("keeping the previous trust paths: {e:#}"),
            }
        }
        self.catalog.set_limits(options.catalog);
        self.io.set_limits(options.io);
        self.ledger.set_limits(options.ledger);
        self.publisher.set_options(options.metrics.clone());
        // What is fixed until a restart stays as the probe was built.
        let probe = ProbeOptions {
            paths,
            ..self.options.probe.clone()
        };
        self.options = EngineOptions {
            probe,
            state_dir: self.options.state_dir.clone(),
            ..options
        };
        self.publisher
            .mark_all(self.ledger.processes().map(|p| p.key));
    }

    fn publish(&mut self, force: bool) {
        self.saver.written();
        self.judge_changed_files();
        if !self.publisher.due(force) {
            return;
        }
        let host = self.catalog.host_root();
        let health = self.health();
        let sources = Sources {
            ledger: &self.ledger,
            catalog: &self.catalog,
            index: &self.index,
            host,
        };
        self.publisher.publish(&sources, health);
        for (key, stale) in self.publisher.take_judged() {
            self.watch_rereads(&key, stale);
        }
        if std::mem::take(&mut self.counters.trim_due) {
            crate::allocator::release_freed_memory();
        }
    }
}
