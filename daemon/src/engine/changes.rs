//! Changes on disk: what the watches report, what the debounce makes due, what the
//! periodic rescan finds, and who must be judged again when a file changed.

use std::time::SystemTime;

use super::Engine;
use crate::{
    ledger::{Origin, ProcKey},
    stores::{catalog::FileKey, watch::Change},
};

impl Engine {
    /// Whatever look found a new version (the watcher's, a rescan's, or a process's open
    /// that raced the watcher), the file's readers are judged again.
    pub(super) fn judge_changed_files(&mut self) {
        for file in self.catalog.take_changed() {
            self.mark_readers(&file);
        }
    }

    fn mark_readers(&mut self, file: &FileKey) {
        self.publisher.store_changed(file);
        self.saver.mark_dirty();
        self.publisher.mark_all(self.index.readers_of(file));
        let is_default_store = self.index.is_default_store(file);
        if is_default_store && Some(file.root) == self.catalog.host_root() {
            let reference = self.load_reference();
            self.publisher.set_host_reference(reference);
        }
        if is_default_store {
            let capable: Vec<ProcKey> = self
                .ledger
                .processes()
                .filter(|p| p.origin == Origin::TlsCapable && p.info.root == Some(file.root))
                .map(|p| p.key)
                .collect();
            self.publisher.mark_all(capable);
        }
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
