//! When the ledger is written to the state directory: after it changed, spaced so that
//! saving never becomes most of the daemon's work, and deferred while a storm pours in.
//! Between saves the journal holds what was taken from the kernel, so a crash loses
//! nothing; a save says how far it covers the journal, and the journal forgets that much.

use std::{
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime},
};

use trustdrift_common::{AccessKey, AccessStats};

use crate::{
    events::journal::{self, Entry, Kind, Mark, SharedJournal, lock},
    ledger::{Ledger, persist, state_dir::StateDir},
    stores::catalog::Catalog,
};

/// A journal fuller than this share of its room is saved without waiting for a storm to
/// pass (still no sooner than saves are spaced: a huge ledger's save must not become
/// most of the daemon's work; past that the journal overflows, counted).
const JOURNAL_PRESSING: u64 = 2;

/// A record rate above which saves wait (see [`Saver::save`]).
const STORM_RECORDS_PER_S: f64 = 1000.0;
/// The longest a save waits for a storm to pass.
const MAX_SAVE_DEFERRAL: Duration = Duration::from_secs(30);

pub struct Saver {
    state: Option<StateDir>,
    dirty: bool,
    last_save: Option<SystemTime>,
    /// No unforced save before this.
    /// When the last save ended, what it cost and how many processes it wrote: the next
    /// unforced save waits 20x that cost, scaled down if the ledger shrank since.
    last_end: Instant,
    last_cost: Duration,
    last_len: usize,
    /// How many bytes the last save encoded.
    last_bytes: usize,
    /// When the record rate was last measured, and the records handled by then.
    record_mark: (Instant, u64),
    /// Since when a save has been waiting for a storm to pass.
    deferred_since: Option<Instant>,
    journal: Option<SharedJournal>,
    /// How far the ledger covers the journal now; a save writes it.
    covered: Mark,
    /// The next save is not deferred for a storm (the journal fills).
    urgent: bool,
    /// The save being written and synced on a thread of its own.
    writing: Option<Writing>,
}

/// A save on its way to disk: the journal forgets what it covers once it is there.
struct Writing {
    done: JoinHandle<anyhow::Result<()>>,
    covered: Option<Mark>,
}

impl Saver {
    pub fn new(state: Option<StateDir>, journal: Option<SharedJournal>) -> Self {
        let epoch = journal.as_ref().map_or(0, |j| lock(j).epoch());
        Self {
            state,
            dirty: false,
            last_save: None,
            last_end: Instant::now(),
            last_cost: Duration::ZERO,
            last_len: 0,
            last_bytes: 0,
            record_mark: (Instant::now(), 0),
            deferred_since: None,
            journal,
            covered: Mark {
                epoch,
                ..Mark::default()
            },
            urgent: false,
            writing: None,
        }
    }

    /// Takes note of a save that reached the disk since the last call.
    pub fn written(&mut self) {
        self.reap(false);
    }

    /// Takes note of a save that reached the disk (`wait`: waits for it).
    fn reap(&mut self, wait: bool) {
        let Some(w) = self.writing.take_if(|w| wait || w.done.is_finished()) else {
            return;
        };
        match w.done.join() {
            Ok(Ok(())) => {
                self.last_save = Some(SystemTime::now());
                // What the save holds leaves the journal; what it does not (records
                // taken from the ring buffer, not yet handled) stays.
                if let (Some(j), Some(mark)) = (&self.journal, w.covered) {
                    lock(j).discard(&mark);
                }
            }
            Ok(Err(e)) => {
                self.dirty = true;
                tracing::warn!("saving the ledger: {e:#}");
            }
            Err(_) => {
                self.dirty = true;
                tracing::warn!("saving the ledger: the writer thread panicked");
            }
        }
    }

    /// Of what an earlier run left in the journal, the records a save with `saved`
    /// (the restored state's mark, if any) does not hold: to be handled again, in order.
    pub fn to_replay(leftover: Vec<Entry>, epoch: u64, saved: Option<Mark>) -> Vec<Entry> {
        leftover
            .into_iter()
            .filter(|e| !saved.is_some_and(|m| m.covers(epoch, e.kind, e.seq)))
            .collect()
    }

    /// The ledger has handled the ring records up to `seq` (in order).
    pub fn handled_ring(&mut self, seq: u64) {
        self.covered.ring_through = self.covered.ring_through.max(seq);
    }

    /// The ledger has applied an aggregate journalled as `seq` (replayed).
    pub fn handled_aggregate(&mut self, seq: u64) {
        self.covered.aggregates_through = self.covered.aggregates_through.max(seq);
    }

    /// An aggregate the kernel no longer has (taken at its process's exit) is about to
    /// be applied to the ledger: journalled first. False when the journal is full.
    pub fn journal_aggregate(&mut self, key: &AccessKey, stats: &AccessStats) -> bool {
        let Some(j) = &self.journal else {
            return true;
        };
        let appended = lock(j).append(Kind::Aggregate, &journal::aggregate_bytes(key, stats));
        match appended {
            Some(seq) => {
                self.handled_aggregate(seq);
                true
            }
            None => false,
        }
    }

    /// Bytes the journal holds.
    pub fn journal_bytes(&self) -> u64 {
        self.journal.as_ref().map_or(0, |j| lock(j).used())
    }

    /// The journal's pages past its records go back (see `Journal::release_pages`):
    /// called when records stopped coming, never in the middle of a storm.
    pub fn release_journal_pages(&self) {
        if let Some(j) = &self.journal {
            lock(j).release_pages();
        }
    }

    /// Whether the journal is full enough that the next save must not wait for a storm
    /// to pass.
    pub fn journal_pressing(&self) -> bool {
        let Some(j) = &self.journal else {
            return false;
        };
        let j = lock(j);
        j.used() > j.capacity() / JOURNAL_PRESSING
    }

    /// The next save is not deferred for a storm.
    pub fn press(&mut self) {
        self.urgent = true;
    }

    /// The state directory, if persistence is on.
    pub fn state(&self) -> Option<&StateDir> {
        self.state.as_ref()
    }

    /// Something worth saving changed.
    pub fn mark_dirty(&mut self) {
        self.dirty = true;
    }

    pub fn last_save(&self) -> Option<SystemTime> {
        self.last_save
    }

    /// Persists the ledger when it changed since the last save; `records` is how many
    /// records the engine has handled in all, to tell a storm.
    pub fn save(&mut self, force: bool, records: u64, ledger: &Ledger, catalog: &Catalog) {
        // One save at a time; a forced one (at exit) waits for the one being written.
        self.reap(force);
        if self.state.is_none() || self.writing.is_some() {
            return;
        }
        if !self.dirty && !force {
            return;
        }
        // A save writes the whole ledger: with tens of thousands of processes (a storm's,
        // kept for the exit grace) it takes long enough that saving every interval would
        // be most of the daemon's work. Spacing saves to 20x their own duration keeps
        // them under 5% of a core whatever the ledger's size. Once a storm's processes
        // have left, the next save (which lets the journal shrink) does not wait as if
        // they had not; never scaled up, though: a small save's cost is mostly fixed (the
        // sync), not per process.
        let shrunk = (ledger.len() as f64 / self.last_len.max(1) as f64).min(1.0);
        let spacing = self.last_cost.mul_f64(20.0 * shrunk);
        if !force && Instant::now() < self.last_end + spacing {
            return;
        }
        // And while records pour in, a save (tens of milliseconds for a storm's ledger,
        // in which nothing drains the ring buffer) waits for the storm to pass, for at
        // most MAX_SAVE_DEFERRAL: what the probe delivers matters more than how recent
        // the copy on disk is.
        let now = Instant::now();
        let (mark, then) = std::mem::replace(&mut self.record_mark, (now, records));
        let rate =
            records.saturating_sub(then) as f64 / now.duration_since(mark).as_secs_f64().max(1e-3);
        let urgent = std::mem::take(&mut self.urgent);
        if !force && !urgent && rate > STORM_RECORDS_PER_S {
            let since = *self.deferred_since.get_or_insert(now);
            if now.duration_since(since) < MAX_SAVE_DEFERRAL {
                return;
            }
        }
        self.deferred_since = None;
        // Encoding reads the ledger, so it happens here; writing and syncing (seconds on
        // a busy disk, a storm's ledger being tens of MB) on a thread of its own.
        let started = Instant::now();
        let covered = self.journal.as_ref().map(|_| self.covered);
        let Some(state) = &self.state else {
            return;
        };
        let hint = self.last_bytes;
        let mut encoded = 0;
        let written = persist::encode(ledger, catalog, covered, hint).and_then(|bytes| {
            encoded = bytes.len();
            let writer = state.writer()?;
            Ok(std::thread::Builder::new()
                .name("save".into())
                .spawn(move || persist::write(&writer, &bytes))?)
        });
        match written {
            Ok(done) => {
                self.dirty = false;
                self.last_end = Instant::now();
                self.last_cost = started.elapsed();
                self.last_len = ledger.len();
                self.last_bytes = encoded;
                self.writing = Some(Writing { done, covered });
                if force {
                    self.reap(true);
                }
            }
            Err(e) => tracing::warn!("saving the ledger: {e:#}"),
        }
    }
}
