//! The daemon's life: attach the probe, restore, seed, then handle records, changes and
//! timers until SIGINT or SIGTERM; SIGHUP reloads the configuration.

use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result};
use tokio::{io::unix::AsyncFd, signal::unix::SignalKind, sync::watch};

use super::{
    Engine, options::EngineOptions, publisher::Publisher, runtime, saver::Saver, start_time,
};
use crate::{
    config::Config,
    events::{
        self,
        intake::Intake,
        journal::{self, Entry, Journal, Kind, SharedJournal},
    },
    ledger::{Origin, ProcKey, ProcessInfo, TrustRead, persist, state_dir::StateDir},
    probe::{Probe, iterators::SeedIterators, pinning::PinStatus, privileges},
    process::{holdings::Holdings, procfs, seed},
    serve::snapshot::{Heartbeat, Snapshot},
    stores::{
        catalog::{Expect, FileKey},
        digest::NodeKey,
    },
};

/// Runs the daemon until SIGINT or SIGTERM; SIGHUP reloads the configuration through
/// `reload`. `serve` runs the API on a thread of its own from when the probe is attached
/// (with the snapshot receiver and the engine's heartbeat) and answers `/readyz` with 503
/// until the start-up scan is done.
pub async fn run<F, Fut>(
    config: Config,
    mut reload: impl FnMut() -> Result<Config>,
    serve: F,
) -> Result<()>
where
    F: FnOnce(watch::Receiver<Arc<Snapshot>>, Heartbeat) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<()>>,
{
    crate::allocator::tune();
    runtime::raise_fd_limit();
    let mut interrupt = tokio::signal::unix::signal(SignalKind::interrupt())?;
    let mut terminate = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut hangup = tokio::signal::unix::signal(SignalKind::hangup())?;
    let options = EngineOptions::from_config(&config);
    // Before any thread starts: they inherit it.
    runtime::raise_priority(options.priority_boost);
    let state = options
        .state_dir
        .as_deref()
        .map(StateDir::open)
        .transpose()?;
    // The journal's own directory (a tmpfs), locked as the state directory is for as long
    // as the daemon runs; a bad one stops the start before the probe is loaded.
    let journal_home = match (&state, &options.journal_dir) {
        (Some(state), Some(path)) if !state.is(path) => Some(
            StateDir::open(path)
                .with_context(|| format!("state.journal_dir = {}", path.display()))?,
        ),
        _ => None,
    };

    let mut probe = Probe::attach(options.probe.clone())?;
    tracing::info!(mode = ?probe.mode, pinning = ?probe.pinning, "probe attached");
    // What needed privileges is done (the probe loaded and pinned, the file systems
    // mounted, the priority raised): drop what is not needed any more, before any other
    // thread starts (capabilities are per thread; the threads started later inherit).
    match privileges::drop_after_attach() {
        Ok(kept) => tracing::info!(
            kept = %kept.join(", "),
            "dropped every other capability; no_new_privs is set"
        ),
        Err(e) => tracing::warn!("could not drop capabilities after attaching: {e:#}"),
    }
    let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
    let heartbeat = Heartbeat::default();
    heartbeat.beat();
    // The API runs on a thread and runtime of its own: it never shares a thread with the
    // engine's work, which may wait on a deadline (or be stuck where none reaches, which
    // /healthz then reports).
    let api_heartbeat = heartbeat.clone();
    std::thread::Builder::new()
        .name("td-api".into())
        .spawn(move || {
            let served = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                // Each streamed answer serializes on a thread of this pool while its
                // client reads; serializing is shallow, a small stack does.
                .thread_stack_size(256 << 10)
                .build()
                .context("starting the API's runtime")
                .and_then(|rt| rt.block_on(serve(rx, api_heartbeat)));
            if let Err(e) = served {
                tracing::error!("the API stopped: {e:#}");
            }
        })
        .context("starting the API thread")?;
    // The crash journal, and what the last run left in it, read before the intake adds
    // to it: replayed once the last save is restored.
    let journal = state
        .as_ref()
        .map(|dir| open_journal(journal_home.as_ref().unwrap_or(dir), options.journal_bytes))
        .transpose()?;
    let leftover = journal
        .as_ref()
        .map(|j| {
            let j = journal::lock(j);
            (j.entries(), j.epoch())
        })
        .unwrap_or_default();
    let mut intake = Intake::start(probe.take_events()?, options.queue_bytes, journal.clone())?;
    let publisher = Publisher::new(tx, options.metrics.clone());
    let key = NodeKey::from_bytes(probe.node_key());
    let seed_iterators = probe.take_seed_iterators();
    let saver = Saver::new(state, journal);
    let (mut engine, inotify) = Engine::new(Box::new(probe), options, saver, publisher, key)?;
    engine.heartbeat = heartbeat;
    // SAFETY: the Inotify instance owns its fd for as long as the AsyncFd owns it.
    let mut changes =
        unsafe { AsyncFd::register_with_interest(inotify, tokio::io::Interest::READABLE) }
            .context("watching trust directories")?;
    let mut change_buffer = vec![0u8; 64 * 1024];

    engine.start_up(leftover, seed_iterators);

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
        engine.heartbeat.beat();
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
                engine.drop_evicted();
                intake.handled(&batch);
                if let Some(seq) = batch.last_seq() {
                    engine.saver.handled_ring(seq);
                }
                engine.counters.queued_bytes = intake.queued_bytes();
                engine.counters.unjournalled_records = intake.unjournalled();
                if engine.saver.journal_pressing() {
                    engine.saver.press();
                    engine.save(false);
                }
            }
            guard = changes.readable_mut() => {
                let mut guard = guard.context("waiting on inotify")?;
                engine.take_changes(guard.get_inner_mut(), &mut change_buffer);
                guard.clear_ready();
            }
            // A changed file is looked at when its debounce ends, not at the next tick.
            () = until(engine.catalog.next_due()) => {
                engine.refresh_due();
                due = true;
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
    engine.save(true);
    if engine.options.unpin_on_exit {
        engine.kernel.unpin();
        tracing::info!("probe unpinned: it detaches as the daemon exits");
    } else if let PinStatus::Active { dir, .. } = engine.kernel.pinning() {
        tracing::info!(
            dir = %dir.display(),
            "the probe stays pinned and keeps recording until the next start"
        );
    }
    tracing::info!(events = engine.records(), "daemon stopped");
    Ok(())
}

/// Sleeps until `at` (at once if it is past); for ever if there is nothing to wait for.
async fn until(at: Option<SystemTime>) {
    match at {
        Some(at) => {
            let wait = at.duration_since(SystemTime::now()).unwrap_or_default();
            tokio::time::sleep(wait).await;
        }
        None => std::future::pending().await,
    }
}

/// The crash journal in `dir` (the state directory, or `state.journal_dir`).
fn open_journal(dir: &StateDir, capacity: u64) -> Result<SharedJournal> {
    let file = dir
        .open_file(journal::FILE)
        .with_context(|| format!("opening {}/{}", dir.path().display(), journal::FILE))?;
    let journal = Journal::open(file, capacity, &persist::boot_id())
        .with_context(|| format!("mapping {}/{}", dir.path().display(), journal::FILE))?;
    Ok(Arc::new(std::sync::Mutex::new(journal)))
}

impl Engine {
    /// What happened before this start: the saved ledger, what the journal holds that
    /// the save does not, the host's stores, the processes already running. Then the
    /// first snapshot says the daemon is ready.
    pub(super) fn start_up(
        &mut self,
        (leftover, epoch): (Vec<Entry>, u64),
        seed_iterators: Option<SeedIterators>,
    ) {
        let mut saved_mark = None;
        if let Some(state) = self.saver.state() {
            let restored = state.restore(&mut self.ledger, &mut self.catalog);
            if restored.processes > 0 {
                tracing::info!(
                    processes = restored.processes,
                    "ledger restored from the state directory"
                );
            }
            saved_mark = restored.journal;
        }
        self.after_restore();
        self.replay(Saver::to_replay(leftover, epoch, saved_mark));
        // A save lags the kernel's aggregates by up to a poll and a save's spacing: the
        // reads a process made since the last save are in the pinned access table, not in
        // the state. Brought up to date before the first snapshot says the daemon is
        // ready, or a restart lists reads it knows of as never made.
        self.poll(false);
        if let Some(host) = self.catalog.host_root() {
            self.track_default_stores(host);
        }
        let reference = self.load_reference();
        self.publisher.set_host_reference(reference);
        self.seed(seed_iterators);
        self.counters.map_fill = self.kernel.map_fill();
        self.publisher.set_ready();
        self.publish(true);
        self.save(true);
        crate::allocator::release_freed_memory();
        tracing::info!(
            processes = self.ledger.len(),
            "start-up scan done; serving verdicts"
        );
    }

    /// Handles again what the last run took from the kernel and did not save before it
    /// stopped (a crash): ring records as they came, aggregates as they were taken.
    fn replay(&mut self, entries: Vec<Entry>) {
        if entries.is_empty() {
            return;
        }
        let (mut records, mut aggregates) = (0, 0);
        for entry in entries {
            self.heartbeat.beat();
            match entry.kind {
                Kind::Ring => {
                    match events::decode(&entry.bytes) {
                        Ok(event) => self.on_event(event),
                        Err(e) => {
                            self.counters.undecodable += 1;
                            tracing::warn!("dropping a journalled record: {e}");
                        }
                    }
                    self.saver.handled_ring(entry.seq);
                    records += 1;
                }
                Kind::Aggregate => {
                    if let Some((access, stats)) = journal::aggregate_of(&entry.bytes)
                        && let Some(key) = self.ledger.owner_of(&access)
                    {
                        self.apply_stats(&access, key, &stats);
                    }
                    self.saver.handled_aggregate(entry.seq);
                    aggregates += 1;
                }
            }
        }
        tracing::info!(
            records,
            aggregates,
            "replayed the crash journal: what the last run took from the probe and had not saved"
        );
    }

    /// After a restore: restored processes that are alive are ways back into their roots
    /// again, and the files they read are watched and re-checked (they may have changed
    /// while the daemon was down).
    fn after_restore(&mut self) {
        let alive: Vec<ProcKey> = self
            .ledger
            .processes()
            .filter(|p| p.exited_at.is_none())
            .map(|p| p.key)
            .collect();
        for key in &alive {
            self.catalog.root_of(key.pid, key.start_ticks);
        }
        for p in self.ledger.processes() {
            for r in &p.reads {
                if let Some(f) = &r.file {
                    self.index.add(f.clone(), p.key);
                }
            }
        }
        let files: Vec<FileKey> = self.index.files().cloned().collect();
        for file in files {
            if self.catalog.root_reachable(&file.root) {
                self.catalog.refresh(&file, &mut self.watcher, &mut self.io);
            }
        }
        self.publisher
            .mark_all(self.ledger.processes().map(|p| p.key));
    }

    /// Processes that were running before the probe attached: from the probe's task
    /// iterators when it has them, else from /proc.
    fn seed(&mut self, iterators: Option<SeedIterators>) {
        let mut go = seed::GoBinaries::default();
        let paths = self.options.probe.paths.clone();
        let cmdline = self.options.cmdline;
        let started = Instant::now();
        let read = iterators.map(Holdings::read);
        let (found, with, records, from_proc) = match read {
            Some(Ok(holdings)) => {
                let records = holdings.records;
                let from_proc = holdings.incomplete();
                let found = holdings.found(&paths, &mut go, &mut self.io, cmdline);
                (found, "bpf task iterators", records, from_proc)
            }
            other => {
                if let Some(Err(e)) = other {
                    tracing::warn!(
                        "reading the BPF task iterators failed ({e}): the start-up scan reads /proc"
                    );
                }
                let found = seed::scan_procfs(&paths, &mut go, &mut self.io, cmdline);
                (found, "procfs", 0, 0)
            }
        };
        tracing::info!(
            with,
            records,
            // Processes the iterators could not name a file of, read from /proc instead.
            from_proc,
            found = found.len(),
            ms = started.elapsed().as_millis() as u64,
            "start-up scan of the processes already running"
        );
        let now = SystemTime::now();
        for found in found {
            self.heartbeat.beat();
            let key = ProcKey {
                pid: found.pid,
                start_ticks: found.start_ticks,
            };
            // Another trustdrift instance (a second daemon, the CLI) is never a reader.
            if self.peers.is_peer(&key) {
                continue;
            }
            let Some((root, handle)) = self.catalog.root_of(key.pid, key.start_ticks) else {
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
                cmdline: found.cmdline.clone().filter(|_| self.options.cmdline),
                uid: found.uid,
                cgroup_id: 0,
                attribution: self.attribution_of(key.pid, Some(handle)),
                mnt_ns: procfs::mount_namespace_of(key.pid).unwrap_or(0),
                root: Some(root),
                start_time: Some(start_time(key.start_ticks)),
                tls_library: found.tls.clone(),
            };
            if self.ledger.upsert(key, origin, info).is_none() {
                continue;
            }
            for held in found.trust_files {
                let file = FileKey {
                    root,
                    path: held.path.clone(),
                };
                // What it holds: read only if the path still leads to the file it holds
                // (or lives where the kernel says that one does).
                let expect = held.identity.map(|(dev, ino)| Expect {
                    dev,
                    ino,
                    kernel_path: Some(held.path.clone()),
                });
                let current = self
                    .catalog
                    .observe(&file, expect.as_ref(), &mut self.watcher, &mut self.io)
                    .ok();
                let resolved = current.as_ref().and_then(|v| v.canonical.clone());
                // The version it holds, as for an observed open: the inode it holds, when
                // the history (or its fd) says which version that is; one replaced before
                // anyone looked is of unknown content, never the current one.
                let version = match (held.identity, &current) {
                    (Some((dev, ino)), Some(now_there))
                        if now_there
                            .identity
                            .is_some_and(|i| i.dev == dev && i.ino != ino) =>
                    {
                        self.catalog
                            .version_of_inode(&file, dev, ino, now)
                            .or_else(|| {
                                let fd = held.fd?;
                                self.catalog.adopt_open_file(
                                    &file,
                                    key.pid,
                                    fd,
                                    (dev, ino),
                                    now,
                                    &mut self.io,
                                )
                            })
                            .or_else(|| Some(self.catalog.unseen_version(dev, ino, now)))
                    }
                    _ => current,
                };
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
                    unverifiable: None,
                };
                self.publisher.store_changed(&file);
                if self.ledger.add_read(&key, read) {
                    self.index.add(file, key);
                }
            }
            self.publisher.mark(key);
        }
    }
}
