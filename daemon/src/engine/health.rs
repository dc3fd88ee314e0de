//! What the daemon says of its own work: records handled, observations lost (the
//! probe's and its own), scan errors, what it holds, for `/metrics`.

use std::collections::BTreeMap;

use super::Engine;
use crate::{probe::pinning::PinStatus, serve::snapshot::Health};

impl Engine {
    pub(super) fn health(&self) -> Health {
        let mut lost: BTreeMap<String, u64> = self
            .kernel
            .losses()
            .iter()
            .map(|(l, n)| (l.name().to_owned(), *n))
            .collect();
        let c = &self.catalog.counters;
        let l = &self.ledger.counters;
        for (reason, n) in [
            ("undecodable_record", self.counters.undecodable),
            ("ledger_processes_evicted", l.processes_evicted),
            ("ledger_processes_refused", l.processes_refused),
            ("ledger_reads_evicted", l.reads_evicted),
            ("catalog_files_evicted", c.files_evicted),
            ("catalog_versions_dropped", c.versions_dropped),
            ("catalog_contents_evicted", c.contents_evicted),
            ("catalog_certificates_dropped", c.certificates_dropped),
            ("catalog_contents_unparsed", c.contents_unparsed),
            ("watch_failed", self.watcher.failures),
        ] {
            lost.insert(reason.to_owned(), n);
        }
        let tracked = [
            ("processes", self.ledger.len() as u64),
            ("files", self.catalog.files().count() as u64),
            ("watches", self.watcher.watch_count() as u64),
            ("contents_cached", self.catalog.cached_contents() as u64),
            ("content_bytes", self.catalog.content_budget().used()),
            ("queued_record_bytes", self.counters.queued_bytes),
            ("journal_bytes", self.saver.journal_bytes()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let mut scan_errors = c.read_errors.clone();
        let io = self.io.counts();
        // Every look in a process's world that did not finish in time, whatever it was.
        *scan_errors.entry("timeout".into()).or_default() += io.timed_out;
        *scan_errors.entry("io_saturated".into()).or_default() += io.saturated;
        Health {
            events: self.counters.events.clone(),
            lost,
            scan_errors,
            parse_errors: c.parse_errors,
            contents_hashed: c.contents_hashed,
            probe_attached: true,
            pinned: matches!(self.kernel.pinning(), PinStatus::Active { .. }),
            programs: self.kernel.program_stats(),
            maps: self.counters.map_fill.clone(),
            tracked,
            last_save: self.saver.last_save(),
            unjournalled: self.counters.unjournalled + self.counters.unjournalled_records,
        }
    }
}
