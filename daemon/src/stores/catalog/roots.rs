//! How to get at each root the catalog knows: the host's (init's root, opened once), or
//! through a live process that has it. A process's root is reached by `/proc/<pid>/root`
//! and checked against the process's start time, so a reused pid never leads elsewhere.
//!
//! Opening a root is done on the caller's thread, not under a deadline: it happens for
//! every new process, and nothing in it asks the root's filesystem anything. The magic
//! link jumps to the root without a lookup, and its identity comes from cached attributes
//! (`AT_STATX_DONT_SYNC`). Only a weakly revalidating filesystem (NFS) could be asked on
//! the jump, and an unprivileged container cannot mount one.

use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
};

use crate::{
    process::{procfs, rootfs::Root},
    stores::identity::RootKey,
};

/// How to get at a root later: it is the host's, or some live process has it.
#[derive(Default)]
struct RootAccess {
    host: bool,
    /// (pid, start ticks) of live processes with this root.
    pids: BTreeSet<(u32, u64)>,
}

#[derive(Default)]
pub struct Roots {
    roots: HashMap<RootKey, RootAccess>,
    host: Option<RootKey>,
    /// The host's root, opened once: every look at a host file goes through it.
    host_handle: Option<Arc<Root>>,
    /// Roots the catalog wanted and could no longer reach.
    pub unreachable: u64,
}

/// Opens `/proc/<pid>/root` and checks it is still that process's.
fn open_checked(pid: u32, start_ticks: u64) -> Option<(RootKey, Arc<Root>)> {
    let root = Root::of_pid(pid).ok()?;
    // The fd pins the root; only now is it safe to check the pid is still ours.
    if procfs::start_ticks(pid).ok()? != start_ticks {
        return None;
    }
    let (dev, ino) = root.identity().ok()?;
    let mnt_ns = procfs::mount_namespace_of(pid)?;
    Some((RootKey { mnt_ns, dev, ino }, Arc::new(root)))
}

impl Roots {
    /// The host's root (init's, see [`Root::host`]), always reachable.
    pub fn host(&mut self) -> Option<RootKey> {
        if self.host.is_none() {
            let root = Root::host().ok()?;
            let (dev, ino) = root.identity().ok()?;
            let key = RootKey {
                mnt_ns: procfs::host_mount_namespace()?,
                dev,
                ino,
            };
            self.roots.entry(key).or_default().host = true;
            self.host = Some(key);
            self.host_handle = Some(Arc::new(root));
        }
        self.host
    }

    /// Whether the daemon's own filesystem is the host's (not a container image), so
    /// what it reads by plain path is the host's.
    pub fn runs_in_host_root(&mut self) -> bool {
        let Some(host) = self.host() else {
            return false;
        };
        Root::own()
            .and_then(|r| r.identity())
            .is_ok_and(|(dev, ino)| (dev, ino) == (host.dev, host.ino))
            && procfs::own_mount_namespace() == Some(host.mnt_ns)
    }

    /// The root of live process `pid` (checked against its start time), registering the
    /// process as a way back into that root.
    pub fn of(&mut self, pid: u32, start_ticks: u64) -> Option<(RootKey, Arc<Root>)> {
        let (key, root) = open_checked(pid, start_ticks)?;
        self.roots
            .entry(key)
            .or_default()
            .pids
            .insert((pid, start_ticks));
        Some((key, root))
    }

    /// A process left: it is no longer a way into its root.
    pub fn forget_pid(&mut self, pid: u32, start_ticks: u64) {
        for access in self.roots.values_mut() {
            access.pids.remove(&(pid, start_ticks));
        }
    }

    /// Opens `key` through the host or any live process that has it.
    pub fn open(&mut self, key: &RootKey) -> Option<Arc<Root>> {
        let access = self.roots.get(key)?;
        if access.host {
            // Set together with `host`: only the host root is marked so.
            return self.host_handle.clone();
        }
        let candidates: Vec<(u32, u64)> = access.pids.iter().copied().collect();
        let mut dead = Vec::new();
        let mut found = None;
        for (pid, ticks) in candidates {
            match open_checked(pid, ticks) {
                Some((k, root)) if k == *key => {
                    found = Some(root);
                    break;
                }
                _ => dead.push((pid, ticks)),
            }
        }
        if let Some(access) = self.roots.get_mut(key) {
            for d in dead {
                access.pids.remove(&d);
            }
        }
        if found.is_none() {
            self.unreachable += 1;
        }
        found
    }

    /// Whether `key` can still be reached (a live process or the host has it).
    pub fn reachable(&self, key: &RootKey) -> bool {
        self.roots
            .get(key)
            .is_some_and(|a| a.host || !a.pids.is_empty())
    }

    /// Forgets roots nobody can reach any more.
    pub fn retain_reachable(&mut self) {
        self.roots.retain(|_, a| a.host || !a.pids.is_empty());
    }
}
