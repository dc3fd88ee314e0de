//! Other trustdrift instances on the host: the same binary, scanning the same stores.
//! Their catalog reads are bookkeeping, not a TLS client's trust: two daemons (a test
//! suite, a rollout that overlaps, a second `run` by hand) must not list each other as
//! hundreds-of-files readers. The probe already skips this process's own tgid.

use std::collections::HashSet;

use crate::{ledger::ProcKey, process::rootfs};

/// (device, inode) of the executable `pid` runs, from cached attributes only (its
/// filesystem is not asked: it may be a FUSE mount that never answers).
fn exe_identity(pid: u32) -> Option<(u64, u64)> {
    let handle = rootfs::open_process_exe(pid).ok()?;
    rootfs::cached_identity(&handle).ok()
}

#[derive(Debug, Default)]
pub struct Peers {
    /// (dev, ino) of this daemon's executable; `None` if /proc/self/exe is unreadable.
    own_exe: Option<(u64, u64)>,
    known: HashSet<ProcKey>,
}

impl Peers {
    pub fn new() -> Self {
        Self {
            own_exe: exe_identity(std::process::id()),
            known: HashSet::new(),
        }
    }

    /// Whether `key` runs this very binary (and is alive to say so).
    pub fn is_peer(&mut self, key: &ProcKey) -> bool {
        if self.known.contains(key) {
            return true;
        }
        let Some(own) = self.own_exe else {
            return false;
        };
        let same = exe_identity(key.pid) == Some(own)
            // The pid may already belong to someone else.
            && crate::process::procfs::start_ticks(key.pid).ok() == Some(key.start_ticks);
        if same {
            tracing::info!(
                pid = key.pid,
                "another trustdrift instance reads trust stores: its reads are not judged"
            );
            self.known.insert(*key);
        }
        same
    }

    pub fn exited(&mut self, key: &ProcKey) {
        self.known.remove(key);
    }
}
