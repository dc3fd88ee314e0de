//! What the engine learned of each process when its first record was handled, reused for
//! its other records: a storm process opening four bundles is one lookup of its root, not
//! four. And the accesses whose aggregates were already taken out of the kernel.

use std::collections::{HashMap, HashSet};

use trustdrift_common::AccessKey;

use crate::{ledger::ProcKey, stores::catalog::RootKey};

/// What /proc said of a process when its first record was handled. Dropped at its exec or
/// exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessContext {
    pub root: Option<RootKey>,
    /// It runs trustdrift itself: its reads are bookkeeping, not trust.
    pub peer: bool,
    /// Whether it was still running then. If not, its aggregates in the kernel are final.
    pub alive: bool,
}

#[derive(Default)]
pub struct Contexts {
    known: HashMap<ProcKey, ProcessContext>,
    /// Accesses whose final aggregates were taken out of the kernel when first handled
    /// (their process had already exited): nothing is left to poll.
    settled: HashSet<AccessKey>,
}

impl Contexts {
    pub fn get(&self, key: &ProcKey) -> Option<ProcessContext> {
        self.known.get(key).copied()
    }

    pub fn insert(&mut self, key: ProcKey, context: ProcessContext) {
        self.known.insert(key, context);
    }

    /// The process replaced its image or exited.
    pub fn forget(&mut self, key: &ProcKey) {
        self.known.remove(key);
    }

    /// The aggregate of `access` was taken out of the kernel for good.
    pub fn settle(&mut self, access: AccessKey) {
        self.settled.insert(access);
    }

    pub fn is_settled(&self, access: &AccessKey) -> bool {
        self.settled.contains(access)
    }

    /// Forgets `access` as settled; true if it was.
    pub fn unsettle(&mut self, access: &AccessKey) -> bool {
        self.settled.remove(access)
    }

    /// Keeps the settled accesses `keep` says to (an exit whose record was lost leaves
    /// its settled accesses behind), and gives back the room a storm made.
    pub fn retain_settled(&mut self, keep: impl Fn(&AccessKey) -> bool) {
        self.settled.retain(|a| keep(a));
        // A map keeps its largest capacity unless told otherwise.
        if self.known.capacity() > 1024 && self.known.len() * 4 < self.known.capacity() {
            self.known.shrink_to_fit();
        }
        if self.settled.capacity() > 1024 && self.settled.len() * 4 < self.settled.capacity() {
            self.settled.shrink_to_fit();
        }
    }
}
