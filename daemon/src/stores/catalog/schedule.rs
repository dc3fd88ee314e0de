//! When files are looked at again: a watched directory changed (after a short debounce
//! that coalesces a rename sequence), or everything at once after the watcher overflowed.

use std::{collections::BTreeMap, time::SystemTime};

use crate::stores::identity::FileKey;

#[derive(Default)]
pub struct Schedule {
    due: BTreeMap<FileKey, SystemTime>,
}

impl Schedule {
    /// `file` is to be looked at again from `at` on (whichever date is earlier stands).
    pub fn mark(&mut self, file: &FileKey, at: SystemTime) {
        self.due
            .entry(file.clone())
            .and_modify(|t| *t = (*t).min(at))
            .or_insert(at);
    }

    pub fn contains(&self, file: &FileKey) -> bool {
        self.due.contains_key(file)
    }

    /// Files whose time has come, no longer scheduled.
    pub fn take_due(&mut self, now: SystemTime) -> Vec<FileKey> {
        let due: Vec<FileKey> = self
            .due
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &due {
            self.due.remove(k);
        }
        due
    }

    /// When the next file is due, if any is scheduled.
    pub fn next_due(&self) -> Option<SystemTime> {
        self.due.values().min().copied()
    }

    pub fn retain(&mut self, keep: impl Fn(&FileKey) -> bool) {
        self.due.retain(|k, _| keep(k));
    }
}
