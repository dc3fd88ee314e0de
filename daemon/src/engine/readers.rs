//! Who read which trust file, and which files are each root's default CA stores: what a
//! change to a file must re-judge, and which files the catalog must keep watching.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    time::SystemTime,
};

use crate::{
    ledger::ProcKey,
    stores::catalog::{Catalog, FileKey, RootKey},
};

#[derive(Default)]
pub struct ReadIndex {
    /// Who read each file.
    readers: HashMap<FileKey, BTreeSet<ProcKey>>,
    /// Default CA stores per root, for the unverified rule.
    default_stores: BTreeMap<RootKey, BTreeSet<FileKey>>,
}

impl ReadIndex {
    /// `key` read `file`.
    pub fn add(&mut self, file: FileKey, key: ProcKey) {
        self.readers.entry(file).or_default().insert(key);
    }

    /// The processes that read `file`.
    pub fn readers_of(&self, file: &FileKey) -> impl Iterator<Item = ProcKey> + '_ {
        self.readers.get(file).into_iter().flatten().copied()
    }

    pub fn reader_count(&self, file: &FileKey) -> usize {
        self.readers.get(file).map_or(0, BTreeSet::len)
    }

    /// Forgets `key` as a reader of `files` (what it read); returns the files whose
    /// readers changed.
    pub fn forget_reader(&mut self, key: &ProcKey, files: &[FileKey]) -> Vec<FileKey> {
        let mut changed = Vec::new();
        for file in files {
            let Some(readers) = self.readers.get_mut(file) else {
                continue;
            };
            if readers.remove(key) {
                changed.push(file.clone());
            }
            if readers.is_empty() {
                self.readers.remove(file);
            }
        }
        changed
    }

    /// Whether the default stores of `root` were looked for already.
    pub fn knows_root(&self, root: &RootKey) -> bool {
        self.default_stores.contains_key(root)
    }

    /// The default stores found in `root`.
    pub fn set_default_stores(&mut self, root: RootKey, stores: BTreeSet<FileKey>) {
        self.default_stores.insert(root, stores);
    }

    pub fn default_stores(&self, root: &RootKey) -> Option<&BTreeSet<FileKey>> {
        self.default_stores.get(root)
    }

    pub fn is_default_store(&self, file: &FileKey) -> bool {
        self.default_stores
            .get(&file.root)
            .is_some_and(|s| s.contains(file))
    }

    /// Whether the catalog must keep `file`: someone read it, or it is a default store.
    pub fn keeps(&self, file: &FileKey) -> bool {
        self.readers.contains_key(file) || self.is_default_store(file)
    }

    /// When the default stores of `root` last changed.
    pub fn stores_changed_at(&self, root: &RootKey, catalog: &Catalog) -> Option<SystemTime> {
        self.default_stores
            .get(root)?
            .iter()
            .filter_map(|f| catalog.latest(f))
            .map(|v| v.seen_at)
            .max()
    }

    /// Every file someone read.
    pub fn files(&self) -> impl Iterator<Item = &FileKey> {
        self.readers.keys()
    }
}
