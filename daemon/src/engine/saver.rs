//! When the ledger is written to the state directory: after it changed, spaced so that
//! saving never becomes most of the daemon's work, and deferred while a storm pours in.

use std::time::{Duration, Instant, SystemTime};

use crate::{
    ledger::{Ledger, state_dir::StateDir},
    stores::catalog::Catalog,
};

/// A record rate above which saves wait (see [`Saver::save`]).
const STORM_RECORDS_PER_S: f64 = 1000.0;
/// The longest a save waits for a storm to pass.
const MAX_SAVE_DEFERRAL: Duration = Duration::from_secs(30);

pub struct Saver {
    state: Option<StateDir>,
    dirty: bool,
    last_save: Option<SystemTime>,
    /// No unforced save before this.
    next_save: Instant,
    /// When the record rate was last measured, and the records handled by then.
    record_mark: (Instant, u64),
    /// Since when a save has been waiting for a storm to pass.
    deferred_since: Option<Instant>,
}

impl Saver {
    pub fn new(state: Option<StateDir>) -> Self {
        Self {
            state,
            dirty: false,
            last_save: None,
            next_save: Instant::now(),
            record_mark: (Instant::now(), 0),
            deferred_since: None,
        }
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
        let Some(state) = &self.state else {
            return;
        };
        if !self.dirty && !force {
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
        let (mark, then) = std::mem::replace(&mut self.record_mark, (now, records));
        let rate =
            records.saturating_sub(then) as f64 / now.duration_since(mark).as_secs_f64().max(1e-3);
        if !force && rate > STORM_RECORDS_PER_S {
            let since = *self.deferred_since.get_or_insert(now);
            if now.duration_since(since) < MAX_SAVE_DEFERRAL {
                return;
            }
        }
        self.deferred_since = None;
        let started = Instant::now();
        match state.save(ledger, catalog) {
            Ok(_) => {
                self.dirty = false;
                self.last_save = Some(SystemTime::now());
                self.next_save = Instant::now() + started.elapsed() * 20;
            }
            Err(e) => tracing::warn!("saving the ledger: {e:#}"),
        }
    }
}
