//! The engine's knobs, from the configuration.

use std::{path::PathBuf, sync::Arc, time::Duration};

use crate::{
    config::Config,
    ledger::LedgerLimits,
    probe::{Capacities, Mode, ProbeOptions, Programs, Shares, iterators::SeedSource},
    process::deadline,
    serve::snapshot::MetricsOptions,
    stores::catalog,
};

/// The engine's knobs, from the configuration.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    pub probe: ProbeOptions,
    pub catalog: catalog::Limits,
    /// Deadlines of reads in processes' worlds.
    pub io: deadline::Limits,
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
    pub journal_bytes: u64,
    /// `None`: the journal lives in the state directory.
    pub journal_dir: Option<PathBuf>,
    pub unpin_on_exit: bool,
    /// Record processes' command lines (`api.cmdline`).
    pub cmdline: bool,
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
                shares: Shares {
                    paths_per_process: c.probe.max_paths_per_process,
                    owner_percent: c.probe.owner_share,
                },
                pin_dir: non_empty(&c.state.pin_dir),
                bpf_stats: c.metrics.bpf_stats,
                seed: if c.probe.seed == "procfs" {
                    SeedSource::Procfs
                } else {
                    SeedSource::Auto
                },
            },
            catalog: catalog::Limits {
                max_file_bytes: c.catalog.max_file_bytes,
                max_certs_per_file: c.catalog.max_certificates_per_file,
                max_content_bytes: c.catalog.max_content_bytes,
                max_files: c.catalog.max_files,
                ..catalog::Limits::default()
            },
            io: deadline::Limits {
                timeout: Config::duration_of(&c.catalog.io_timeout),
                ..deadline::Limits::default()
            },
            ledger: LedgerLimits {
                exit_grace: Config::duration_of(&c.ledger.exit_grace),
                max_processes: c.ledger.max_processes,
                // A read the probe cannot record past its quota is not kept here either.
                max_reads_per_process: c.probe.max_paths_per_process as usize,
            },
            max_watches: 8192,
            queue_bytes: c.probe.queue_bytes,
            priority_boost: c.probe.priority_boost,
            rescan: Config::duration_of(&c.catalog.rescan_interval),
            poll: Config::duration_of(&c.ledger.poll_interval),
            state_dir: non_empty(&c.state.dir),
            save_interval: Config::duration_of(&c.state.save_interval),
            journal_bytes: c.state.journal_bytes,
            journal_dir: non_empty(&c.state.journal_dir),
            unpin_on_exit: c.state.unpin_on_exit,
            cmdline: c.api.cmdline,
            metrics: MetricsOptions {
                per_process: c.metrics.per_process,
                container_stores: c.metrics.container_stores,
                node: non_empty(&c.metrics.node).map(|n| Arc::from(n.to_string_lossy().as_ref())),
            },
        }
    }
}
