//! Per-process ledger: for each process image (pid + start time) that read trust
//! material, which files it read, when, how much, and which version it got.
//!
//! The ledger records facts; `verdict` judges them against the catalog. It is bounded:
//! past its limits it evicts (exited processes first) and counts what it dropped.

pub mod persist;
pub mod state_dir;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};
use trustdrift_common::AccessKey;

use crate::{
    process::attribution::Attribution,
    stores::catalog::{FileKey, RootKey, Shape, Version},
};

/// A process image: the pid and its start time in clock ticks (as /proc/<pid>/stat has
/// it), so a reused pid is a different key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ProcKey {
    pub pid: u32,
    pub start_ticks: u64,
}

/// How the daemon knows about a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// The probe saw it read trust files.
    Observed,
    /// It was running when the daemon started, holding trust files open or mapped.
    Seeded,
    /// It was running when the daemon started and uses a TLS library (or is a Go binary
    /// using crypto/x509), but nothing says which trust files it read or when.
    TlsCapable,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ProcessInfo {
    pub comm: String,
    pub exe: Option<String>,
    pub cmdline: Option<String>,
    pub uid: u32,
    pub cgroup_id: u64,
    pub attribution: Attribution,
    pub mnt_ns: u32,
    pub root: Option<RootKey>,
    pub start_time: Option<SystemTime>,
    /// For TLS-capable processes: which library (or "go crypto/x509") gave it away.
    pub tls_library: Option<String>,
}

/// One trust file as one process read it.
#[derive(Clone, Debug)]
pub struct TrustRead {
    /// The probe's aggregate for it (None when seeded from /proc).
    pub access_key: Option<AccessKey>,
    /// The path exactly as the process wrote it.
    pub path: PathBuf,
    /// The file in the catalog: the path made absolute inside the process's root.
    pub file: Option<FileKey>,
    pub resolved: Option<PathBuf>,
    pub resolve_error: Option<String>,
    pub first_open: SystemTime,
    pub last_open: SystemTime,
    pub last_read: Option<SystemTime>,
    pub bytes: u64,
    pub opens: u64,
    pub reads: u64,
    /// The version it got, fixed when it (last) read.
    pub version: Option<Arc<Version>>,
    /// When that read happened.
    pub version_read_at: SystemTime,
    /// A directory it listed (getdents): it trusts the set it read there.
    pub listed: bool,
    /// Why what it read cannot be known (the path leads elsewhere than the file its open
    /// got): such a read is never judged against the file the path names.
    pub unverifiable: Option<String>,
}

#[derive(Clone, Debug)]
pub struct ProcessEntry {
    pub key: ProcKey,
    pub origin: Origin,
    pub info: ProcessInfo,
    pub exec_seq: u32,
    pub exited_at: Option<SystemTime>,
    pub reads: Vec<TrustRead>,
    /// Whether the kernel may still hold aggregates of its accesses.
    pub aggregates: Aggregates,
}

/// Where the aggregates of a process's accesses are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Aggregates {
    /// In the kernel's access table (a live process, or an exit the daemon did not see):
    /// deleted there when the process leaves the ledger.
    InKernel,
    /// Taken out of the kernel at its exit: nothing is left there to delete. A storm's
    /// leaving processes then cost no syscall each.
    Taken,
}

#[derive(Clone, Copy, Debug)]
pub struct LedgerLimits {
    pub max_processes: usize,
    pub max_reads_per_process: usize,
    /// How long an exited process stays listed.
    pub exit_grace: Duration,
}

impl Default for LedgerLimits {
    fn default() -> Self {
        Self {
            max_processes: 32768,
            max_reads_per_process: 256,
            exit_grace: Duration::from_secs(300),
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct LedgerCounters {
    /// Exited processes dropped before their grace to make room: their verdict was
    /// final; only their listing ends early.
    pub processes_evicted: u64,
    /// Live processes not recorded: the ledger was full of live ones.
    pub processes_refused: u64,
    pub reads_evicted: u64,
}

/// The probe's aggregate of one read, in wall-clock time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counts {
    pub bytes: u64,
    pub opens: u64,
    pub reads: u64,
    pub last_open: SystemTime,
    pub last_read: Option<SystemTime>,
}

/// What moved when a read's counts were brought up to date.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CountsMoved {
    /// Opened again since the version was fixed: which version it holds may have changed.
    pub reread: bool,
    pub file: Option<FileKey>,
    /// Its latest open or read.
    pub touched: SystemTime,
}

/// A process that left the ledger after its exit grace: what the kernel and the read
/// index still hold of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expired {
    pub key: ProcKey,
    /// Its accesses whose aggregates the kernel may still hold.
    pub accesses: Vec<AccessKey>,
    pub files: Vec<FileKey>,
}

#[derive(Default)]
pub struct Ledger {
    limits: LedgerLimits,
    processes: BTreeMap<ProcKey, ProcessEntry>,
    by_access: HashMap<AccessKey, ProcKey>,
    /// Processes not known to have exited: what polls and time-driven re-judging walk,
    /// not the whole ledger (a storm's exited processes stay listed for the grace).
    live: BTreeSet<ProcKey>,
    /// Exited processes, oldest exit first: expiry and eviction take from the front.
    exits: BTreeSet<(SystemTime, ProcKey)>,
    /// Processes evicted to make room, not yet handed over by `expire`.
    evicted: Vec<Expired>,
    pub counters: LedgerCounters,
}

impl Ledger {
    pub fn new(limits: LedgerLimits) -> Self {
        Self {
            limits,
            ..Self::default()
        }
    }

    /// New bounds (configuration reload).
    pub fn set_limits(&mut self, limits: LedgerLimits) {
        self.limits = limits;
    }

    pub fn get(&self, key: &ProcKey) -> Option<&ProcessEntry> {
        self.processes.get(key)
    }

    pub fn processes(&self) -> impl Iterator<Item = &ProcessEntry> {
        self.processes.values()
    }

    /// Processes not known to have exited.
    pub fn live(&self) -> impl Iterator<Item = &ProcessEntry> {
        self.live.iter().filter_map(|k| self.processes.get(k))
    }

    pub fn is_live(&self, key: &ProcKey) -> bool {
        self.live.contains(key)
    }

    pub fn len(&self) -> usize {
        self.processes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.processes.is_empty()
    }

    /// Puts back a process saved by an earlier run.
    pub fn restore(&mut self, entry: ProcessEntry) {
        if self.processes.len() >= self.limits.max_processes {
            self.counters.processes_refused += 1;
            return;
        }
        for access in entry.reads.iter().filter_map(|r| r.access_key) {
            self.by_access.insert(access, entry.key);
        }
        match entry.exited_at {
            Some(t) => self.exits.insert((t, entry.key)),
            None => self.live.insert(entry.key),
        };
        self.processes.insert(entry.key, entry);
    }

    /// The process holding a kernel aggregate.
    pub fn owner_of(&self, access: &AccessKey) -> Option<ProcKey> {
        self.by_access.get(access).copied()
    }

    /// The entry for `key`, created with `info` if new. An entry learned from /proc is
    /// upgraded when the probe sees the process itself.
    pub fn upsert(
        &mut self,
        key: ProcKey,
        origin: Origin,
        info: ProcessInfo,
    ) -> Option<&mut ProcessEntry> {
        if !self.processes.contains_key(&key) {
            if self.processes.len() >= self.limits.max_processes && !self.evict_one() {
                self.counters.processes_refused += 1;
                return None;
            }
            self.processes.insert(
                key,
                ProcessEntry {
                    key,
                    origin,
                    info,
                    exec_seq: 0,
                    exited_at: None,
                    reads: Vec::new(),
                    aggregates: Aggregates::InKernel,
                },
            );
            self.live.insert(key);
        }
        let entry = self.processes.get_mut(&key)?;
        if origin == Origin::Observed && entry.origin != Origin::Observed {
            entry.origin = Origin::Observed;
        }
        Some(entry)
    }

    /// Makes room by dropping the process that exited longest ago.
    fn evict_one(&mut self) -> bool {
        let victim = self.exits.first().map(|(_, k)| *k);
        match victim {
            Some(k) => {
                // Handed over with the next expiry, like the processes that leave then.
                let removed = self.remove(&k);
                self.evicted.extend(removed);
                self.counters.processes_evicted += 1;
                true
            }
            None => false,
        }
    }

    /// Records a read; `false` when the process already has as many as the bound allows.
    /// A read the probe saw supersedes one seeded from /proc for the same file.
    pub fn add_read(&mut self, key: &ProcKey, read: TrustRead) -> bool {
        let max = self.limits.max_reads_per_process;
        let Some(entry) = self.processes.get_mut(key) else {
            return false;
        };
        if read.access_key.is_some() && read.file.is_some() {
            entry
                .reads
                .retain(|r| r.access_key.is_some() || r.file != read.file);
        }
        if entry.reads.len() >= max {
            self.counters.reads_evicted += 1;
            return false;
        }
        if let Some(access) = read.access_key {
            self.by_access.insert(access, *key);
            // Announced after the exit was handled (another thread's open): its aggregate
            // was not taken with the others.
            if entry.exited_at.is_some() {
                entry.aggregates = Aggregates::InKernel;
            }
        }
        entry.reads.push(read);
        true
    }

    /// The process replaced its image (now named `comm`): what the old one read is gone
    /// from memory. Returns the kernel aggregates to drop.
    pub fn exec(&mut self, key: &ProcKey, new_exec_seq: u32, comm: &str) -> Vec<AccessKey> {
        let Some(entry) = self.processes.get_mut(key) else {
            return Vec::new();
        };
        entry.exec_seq = new_exec_seq;
        comm.clone_into(&mut entry.info.comm);
        let dropped: Vec<AccessKey> = entry.reads.drain(..).filter_map(|r| r.access_key).collect();
        for a in &dropped {
            self.by_access.remove(a);
        }
        dropped
    }

    /// Brings the read of `access` by `key` up to date with the probe's aggregate.
    /// `None` when nothing moved (or the read is unknown); otherwise what the engine must
    /// look at: whether the file was opened again since the version was fixed.
    pub fn update_counts(
        &mut self,
        key: &ProcKey,
        access: &AccessKey,
        counts: &Counts,
    ) -> Option<CountsMoved> {
        let read = self
            .processes
            .get_mut(key)?
            .reads
            .iter_mut()
            .find(|r| r.access_key.as_ref() == Some(access))?;
        if counts.bytes == read.bytes && counts.opens == read.opens && counts.reads == read.reads {
            return None;
        }
        let reread = counts.opens > read.opens;
        read.bytes = counts.bytes;
        read.opens = counts.opens;
        read.reads = counts.reads;
        read.last_open = counts.last_open;
        read.last_read = counts.last_read;
        if counts.bytes > 0 {
            // For a directory, bytes are listed entries: it was read as a set.
            read.listed = read
                .version
                .as_ref()
                .and_then(|v| v.content.as_deref())
                .is_some_and(|c| matches!(c.shape, Shape::Directory { .. }));
        }
        Some(CountsMoved {
            reread,
            file: read.file.clone(),
            touched: counts
                .last_read
                .map_or(counts.last_open, |r| r.max(counts.last_open)),
        })
    }

    /// Fixes which version of its file the read of `access` got, read at `read_at`.
    pub fn set_version(
        &mut self,
        key: &ProcKey,
        access: &AccessKey,
        version: Option<Arc<Version>>,
        read_at: SystemTime,
    ) {
        let Some(read) = self.processes.get_mut(key).and_then(|e| {
            e.reads
                .iter_mut()
                .find(|r| r.access_key.as_ref() == Some(access))
        }) else {
            return;
        };
        // Where the path led then (a `..data` swap moves it).
        if let Some(canonical) = version.as_ref().and_then(|v| v.canonical.clone()) {
            read.resolved = Some(canonical);
        }
        read.version = version;
        read.version_read_at = read_at;
    }

    /// The process exited at `at`; `aggregates`: where its accesses' aggregates are now.
    pub fn exited(&mut self, key: &ProcKey, at: SystemTime, aggregates: Aggregates) {
        if let Some(entry) = self.processes.get_mut(key)
            && entry.exited_at.is_none()
        {
            entry.exited_at = Some(at);
            entry.aggregates = aggregates;
            self.live.remove(key);
            self.exits.insert((at, *key));
        }
    }

    /// The processes evicted to make room since the last call (or `expire`).
    pub fn take_evicted(&mut self) -> Vec<Expired> {
        std::mem::take(&mut self.evicted)
    }

    /// Drops processes that exited more than the grace period ago (the oldest exits
    /// only: the cost follows what leaves, not what is listed); returns what the kernel
    /// and the read index hold of them (and of processes evicted since), to be dropped
    /// too.
    pub fn expire(&mut self, now: SystemTime) -> Vec<Expired> {
        let grace = self.limits.exit_grace;
        let mut gone = std::mem::take(&mut self.evicted);
        while let Some(&(at, key)) = self.exits.first() {
            if now.duration_since(at).unwrap_or_default() < grace {
                break;
            }
            gone.push(self.remove(&key).unwrap_or(Expired {
                key,
                accesses: Vec::new(),
                files: Vec::new(),
            }));
            self.exits.remove(&(at, key));
        }
        // A map keeps its largest capacity unless told otherwise: a storm's hundreds of
        // thousands of accesses would hold their room for good.
        if self.by_access.capacity() > 1024 && self.by_access.len() * 4 < self.by_access.capacity()
        {
            self.by_access.shrink_to_fit();
        }
        gone
    }

    fn remove(&mut self, key: &ProcKey) -> Option<Expired> {
        let entry = self.processes.remove(key)?;
        self.live.remove(key);
        if let Some(t) = entry.exited_at {
            self.exits.remove(&(t, *key));
        }
        let mut accesses: Vec<AccessKey> =
            entry.reads.iter().filter_map(|r| r.access_key).collect();
        for a in &accesses {
            self.by_access.remove(a);
        }
        if entry.aggregates == Aggregates::Taken {
            accesses.clear();
        }
        Some(Expired {
            key: *key,
            accesses,
            files: entry.reads.into_iter().filter_map(|r| r.file).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(pid: u32, start: u64) -> ProcKey {
        ProcKey {
            pid,
            start_ticks: start,
        }
    }

    fn read(path: &str, access: Option<AccessKey>) -> TrustRead {
        let now = SystemTime::now();
        TrustRead {
            access_key: access,
            path: path.into(),
            file: None,
            resolved: None,
            resolve_error: None,
            first_open: now,
            last_open: now,
            last_read: None,
            bytes: 0,
            opens: 1,
            reads: 0,
            version: None,
            version_read_at: now,
            listed: false,
            unverifiable: None,
        }
    }

    fn access(tgid: u32) -> AccessKey {
        AccessKey {
            tgid,
            exec_seq: 0,
            start_ns: 1,
            path_hash: 2,
        }
    }

    #[test]
    fn a_reused_pid_is_a_different_process() {
        let mut l = Ledger::new(LedgerLimits::default());
        l.upsert(key(42, 100), Origin::Observed, ProcessInfo::default());
        l.upsert(key(42, 900), Origin::Observed, ProcessInfo::default());
        assert_eq!(l.len(), 2);
    }

    #[test]
    fn seeded_processes_become_observed_when_the_probe_sees_them() {
        let mut l = Ledger::new(LedgerLimits::default());
        l.upsert(key(7, 1), Origin::TlsCapable, ProcessInfo::default());
        let e = l
            .upsert(key(7, 1), Origin::Observed, ProcessInfo::default())
            .unwrap();
        assert_eq!(e.origin, Origin::Observed);
    }

    #[test]
    fn exited_processes_leave_after_the_grace_period_with_their_aggregates() {
        let mut l = Ledger::new(LedgerLimits {
            exit_grace: Duration::from_secs(10),
            ..LedgerLimits::default()
        });
        let t0 = SystemTime::now();
        // The first's exit was not seen taking its aggregates; the others' was, but the
        // third's other thread opened a file after it.
        let exits = [Aggregates::InKernel, Aggregates::Taken, Aggregates::Taken];
        for (pid, aggregates) in (1..).zip(exits) {
            l.upsert(key(pid, 1), Origin::Observed, ProcessInfo::default());
            l.add_read(&key(pid, 1), read("/etc/ssl/cert.pem", Some(access(pid))));
            l.exited(&key(pid, 1), t0, aggregates);
        }
        l.add_read(&key(3, 1), read("/etc/ssl/other.pem", Some(access(4))));
        assert!(l.expire(t0 + Duration::from_secs(5)).is_empty());
        let mut gone = l.expire(t0 + Duration::from_secs(11));
        gone.sort_by_key(|g| g.key);
        // What the kernel may still hold is handed over to be deleted, and only that.
        let left: Vec<_> = gone.iter().map(|g| (g.key, g.accesses.clone())).collect();
        assert_eq!(
            left,
            vec![
                (key(1, 1), vec![access(1)]),
                (key(2, 1), vec![]),
                (key(3, 1), vec![access(3), access(4)]),
            ]
        );
        assert_eq!(l.owner_of(&access(1)), None);
        assert_eq!(
            l.owner_of(&access(2)),
            None,
            "gone from the index all the same"
        );
        assert_eq!(l.live().count(), 0);
        assert!(l.is_empty());
    }

    #[test]
    fn bounds_are_enforced_and_counted() {
        let mut l = Ledger::new(LedgerLimits {
            max_processes: 2,
            max_reads_per_process: 1,
            exit_grace: Duration::from_secs(1),
        });
        let now = SystemTime::now();
        l.upsert(key(1, 1), Origin::Observed, ProcessInfo::default());
        l.upsert(key(2, 1), Origin::Observed, ProcessInfo::default());
        // Full of live processes: a third is refused and counted.
        assert!(
            l.upsert(key(3, 1), Origin::Observed, ProcessInfo::default())
                .is_none()
        );
        assert_eq!(l.counters.processes_refused, 1);
        assert_eq!(l.counters.processes_evicted, 0);
        // An exited one makes room.
        l.exited(&key(1, 1), now, Aggregates::InKernel);
        assert!(
            l.upsert(key(3, 1), Origin::Observed, ProcessInfo::default())
                .is_some()
        );
        assert!(l.add_read(&key(3, 1), read("/a.pem", None)));
        assert!(!l.add_read(&key(3, 1), read("/b.pem", None)));
        assert_eq!(l.counters.reads_evicted, 1);
    }

    #[test]
    fn the_oldest_exit_makes_room_first_and_is_handed_over_with_the_next_expiry() {
        let mut l = Ledger::new(LedgerLimits {
            max_processes: 3,
            max_reads_per_process: 4,
            exit_grace: Duration::from_secs(3600),
        });
        let t0 = SystemTime::now();
        for pid in 1..=3 {
            l.upsert(key(pid, 1), Origin::Observed, ProcessInfo::default());
            l.add_read(&key(pid, 1), read("/etc/ssl/cert.pem", Some(access(pid))));
        }
        l.exited(&key(2, 1), t0, Aggregates::InKernel);
        l.exited(
            &key(1, 1),
            t0 + Duration::from_secs(1),
            Aggregates::InKernel,
        );
        // A second exit record changes nothing.
        l.exited(
            &key(2, 1),
            t0 + Duration::from_secs(9),
            Aggregates::InKernel,
        );
        assert_eq!(l.live().map(|p| p.key).collect::<Vec<_>>(), vec![key(3, 1)]);
        // Full: the process that exited first leaves.
        assert!(
            l.upsert(key(4, 1), Origin::Observed, ProcessInfo::default())
                .is_some()
        );
        assert!(l.get(&key(2, 1)).is_none() && l.get(&key(1, 1)).is_some());
        assert_eq!(l.owner_of(&access(2)), None);
        // The grace has not passed for anyone, yet the evicted one is handed over.
        let gone = l.expire(t0 + Duration::from_secs(2));
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].key, key(2, 1));
        assert_eq!(gone[0].accesses, vec![access(2)]);
        assert!(l.is_live(&key(4, 1)) && !l.is_live(&key(1, 1)));
    }

    #[test]
    fn an_exec_forgets_what_the_old_image_read() {
        let mut l = Ledger::new(LedgerLimits::default());
        l.upsert(key(5, 1), Origin::Observed, ProcessInfo::default());
        l.add_read(&key(5, 1), read("/etc/ssl/cert.pem", Some(access(5))));
        assert_eq!(l.exec(&key(5, 1), 1, "sh"), vec![access(5)]);
        assert_eq!(l.get(&key(5, 1)).unwrap().info.comm, "sh");
        assert!(l.get(&key(5, 1)).unwrap().reads.is_empty());
    }
}
