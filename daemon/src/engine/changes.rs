//! Changes on disk: what the watches report, what the debounce makes due, what the
//! periodic rescan finds, and who must be judged again when a file changed.

use std::{collections::BTreeSet, time::SystemTime};

use super::Engine;
use crate::{
    ledger::{Origin, ProcKey},
    stores::{catalog::FileKey, watch::Change},
};

impl Engine {
    /// Whatever look found a new version (the watcher's, a rescan's, or a process's open
    /// that raced the watcher), the file's readers are judged again. A default store
    /// that changed also moves the host's reference (made once, however many changed) and
    /// the TLS-capable processes of its root (one walk of the ledger).
    pub(super) fn judge_changed_files(&mut self) {
        let changed = self.catalog.take_changed();
        if changed.is_empty() {
            return;
        }
        self.saver.mark_dirty();
        let mut default_roots = BTreeSet::new();
        for file in &changed {
            self.publisher.store_changed(file);
            self.publisher.mark_all(self.index.readers_of(file));
            if self.index.is_default_store(file) {
                default_roots.insert(file.root);
            }
        }
        if default_roots.is_empty() {
            return;
        }
        if let Some(host) = self.catalog.host_root()
            && default_roots.contains(&host)
        {
            let reference = self.load_reference();
            self.publisher.set_host_reference(reference);
        }
        let capable: Vec<ProcKey> = self
            .ledger
            .processes()
            .filter(|p| {
                p.origin == Origin::TlsCapable
                    && p.info.root.is_some_and(|r| default_roots.contains(&r))
            })
            .map(|p| p.key)
            .collect();
        self.publisher.mark_all(capable);
    }

    pub(super) fn on_change(&mut self, change: Change) {
        let now = SystemTime::now();
        match change {
            Change::Dir { root, dir, settled } => {
                self.catalog.dir_changed(root, &dir, now, settled)
            }
            Change::Gone { root, dir } => self.catalog.dir_gone(root, &dir, now),
            Change::Overflow => self.catalog.all_dirty(now),
        }
    }

    /// Takes in every change the watches have queued, without waiting. Also called
    /// before the probe's records are handled: a change made before a process opened a
    /// file is then known before that open is judged (see [`Catalog::recent`]).
    pub(super) fn take_changes(&mut self, inotify: &mut inotify::Inotify, buffer: &mut [u8]) {
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

    pub(super) fn refresh_due(&mut self) {
        for file in self.catalog.take_due(SystemTime::now()) {
            self.catalog.refresh(&file, &mut self.watcher, &mut self.io);
        }
    }

    pub(super) fn rescan(&mut self) {
        let files: Vec<FileKey> = self
            .catalog
            .files()
            .filter(|f| self.catalog.root_reachable(&f.root))
            .cloned()
            .collect();
        for file in files {
            self.catalog.refresh(&file, &mut self.watcher, &mut self.io);
        }
    }
}
