//! Trust files as each root sees them, and their versions over time.
//!
//! A trust file is a path as some process named it, inside that process's root (its
//! mount namespace and chroot). Each time what the path leads to changes in content, the
//! file gets a new version: where the path resolved, the file's identity, the digest of
//! its content and the certificates in it, and when that content became current. The
//! version a process read is fixed when it reads; later versions come from watching
//! (inotify, see [`crate::stores::watch`]) and from periodic rescans.
//!
//! The parts: [`roots`] (how to get at each root), [`look`] (the I/O of looking at a
//! path, run under a deadline), [`contents`] (what a version holds, cached across roots),
//! [`history`] (a file's versions), [`schedule`] (when to look again).

pub mod contents;
pub mod history;
pub mod look;
pub mod roots;
pub mod schedule;
#[cfg(test)]
pub(crate) mod tests;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use serde::Serialize;

use crate::budget::Budget;

use self::{
    contents::ContentCache,
    history::{Recorded, TrustFile},
    look::{LookLimits, Looked, Shared, Tally},
    roots::Roots,
    schedule::Schedule,
};
pub use self::{
    contents::{Content, Shape},
    history::Version,
    look::Expect,
};
pub use crate::stores::identity::{FileIdentity, FileKey, RootKey};
use crate::{
    process::{
        deadline::{self, Deadline, Refused},
        rootfs::Root,
    },
    stores::{digest::NodeKey, identity::from_ns},
};

/// How long a look at a file stands in for another (see [`Catalog::recent`]). Watches
/// report changes in the directories a look named; this bound covers what they cannot see
/// (a symlink swapped further up the path), well inside the detection latency users get
/// from the watches.
pub const RECENT: Duration = Duration::from_millis(100);

/// Bytes of files being read at once: four of the largest.
fn read_budget(limits: &Limits) -> u64 {
    limits.max_file_bytes.saturating_mul(4).max(1 << 20)
}

/// Bounds of the catalog; everything past them is counted, never silent.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest file read; bigger ones are reported, not parsed. Files being read at once
    /// hold at most four times this.
    pub max_file_bytes: u64,
    /// Certificates read from one file; the rest are counted, not parsed.
    pub max_certs_per_file: usize,
    /// Bytes parsed contents may hold in all; past it new content is not parsed.
    pub max_content_bytes: u64,
    pub max_files: usize,
    pub max_versions_per_file: usize,
    pub max_cached_contents: usize,
    pub max_dir_entries: usize,
    /// How long after a change event a file is re-checked (coalesces rename sequences).
    pub debounce: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_file_bytes: 16 << 20,
            max_certs_per_file: crate::stores::formats::MAX_CERTIFICATES,
            max_content_bytes: 64 << 20,
            max_files: 16384,
            max_versions_per_file: 16,
            max_cached_contents: 8192,
            max_dir_entries: 4096,
            // A rename sequence (an atomic writer's, a ..data swap) takes microseconds to
            // a few milliseconds; the look waits no longer than that, since it is most
            // of the time from a change to its verdict.
            debounce: Duration::from_millis(25),
        }
    }
}

/// Things the catalog could not keep or read, by reason (exported as metrics).
#[derive(Clone, Debug, Default, Serialize)]
pub struct CatalogCounters {
    pub files_evicted: u64,
    pub versions_dropped: u64,
    pub contents_evicted: u64,
    /// Certificates past the per-file cap.
    pub certificates_dropped: u64,
    /// Contents not parsed for want of budget.
    pub contents_unparsed: u64,
    pub contents_hashed: u64,
    pub content_cache_hits: u64,
    pub read_errors: BTreeMap<String, u64>,
    pub parse_errors: u64,
    pub roots_unreachable: u64,
}

/// Why a look gave no version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unobserved {
    /// The path leads elsewhere than the open that asked went: not read, not tracked.
    Elsewhere { canonical: PathBuf },
    /// No live process (nor the host) leads into the root any more.
    RootUnreachable,
    /// The catalog is full.
    Untracked,
    /// The look did not finish in time (or its filesystem timed out before).
    Refused(Refused),
}

/// Directory changes the catalog wants to hear about.
pub trait DirWatcher {
    /// Starts watching `dir` (inside `root`); `false` if it could not.
    fn watch(&mut self, io: &mut Deadline, root: &Arc<Root>, root_key: RootKey, dir: &Path)
    -> bool;
}

pub struct Catalog {
    limits: Limits,
    files: HashMap<FileKey, TrustFile>,
    roots: Roots,
    schedule: Schedule,
    /// Files whose history grew since the engine last took them. Whoever made the look
    /// (a process's open can find a rotation before the watcher reports it), their
    /// readers must be judged again: judged before, they were judged against the old one.
    changed: BTreeSet<FileKey>,
    shared: Arc<Shared>,
    next_version: u64,
    pub counters: CatalogCounters,
}

impl Catalog {
    /// A catalog whose non-public contents are digested under `key`.
    pub fn new(limits: Limits, key: NodeKey) -> Self {
        Self {
            limits,
            files: HashMap::new(),
            roots: Roots::default(),
            schedule: Schedule::default(),
            changed: BTreeSet::new(),
            shared: Arc::new(Shared {
                cache: Mutex::new(ContentCache::new(limits.max_cached_contents)),
                key,
                budget: Budget::new(limits.max_content_bytes),
                reading: Budget::new(read_budget(&limits)),
            }),
            next_version: 1,
            counters: CatalogCounters::default(),
        }
    }

    /// The key non-public contents are digested under.
    pub fn node_key(&self) -> &NodeKey {
        &self.shared.key
    }

    /// New bounds (configuration reload); what is over them goes as it is next touched.
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
        self.cache().set_max(limits.max_cached_contents);
        self.shared.budget.set_max(limits.max_content_bytes);
        self.shared.reading.set_max(read_budget(&limits));
    }

    /// The budget parsed contents are charged to (restored ones too).
    pub fn content_budget(&self) -> &Budget {
        &self.shared.budget
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, ContentCache> {
        self.shared
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn cached_contents(&self) -> usize {
        self.cache().len()
    }

    /// Drops cached contents no version holds any more.
    pub fn prune_contents(&mut self) {
        self.cache().prune();
    }

    /// The host's root (init's, see [`Root::host`]), always reachable.
    pub fn host_root(&mut self) -> Option<RootKey> {
        self.roots.host()
    }

    /// Whether the daemon's own filesystem is the host's (not a container image).
    pub fn runs_in_host_root(&mut self) -> bool {
        self.roots.runs_in_host_root()
    }

    /// The root of live process `pid` (checked against its start time), registering the
    /// process as a way back into that root.
    pub fn root_of(&mut self, pid: u32, start_ticks: u64) -> Option<(RootKey, Arc<Root>)> {
        self.roots.of(pid, start_ticks)
    }

    /// A process left: it is no longer a way into its root.
    pub fn forget_pid(&mut self, pid: u32, start_ticks: u64) {
        self.roots.forget_pid(pid, start_ticks);
    }

    /// Whether the catalog can still reach `key` (a live process or the host has it).
    pub fn root_reachable(&self, key: &RootKey) -> bool {
        self.roots.reachable(key)
    }

    /// The latest version of `file` without looking again: when a look less than
    /// [`RECENT`] ago found it, every directory that look named is watched, and none has
    /// reported a change since (changes the watcher has queued must have been taken in
    /// first). A storm of processes opening the same bundle is then one look per
    /// [`RECENT`], not several syscalls per open. `None`: look ([`Catalog::observe`]).
    pub fn recent(&self, file: &FileKey, now: Instant) -> Option<Arc<Version>> {
        let f = self.files.get(file)?;
        let (checked_at, fully_watched) = f.checked?;
        let fresh = now.saturating_duration_since(checked_at) < RECENT;
        if !fresh || !fully_watched || f.last_error.is_some() || self.schedule.contains(file) {
            return None;
        }
        f.latest().cloned()
    }

    /// The current version of `file`, checked now. New files start being watched. With
    /// `expect` (a process's open asks), a file the catalog does not track yet is read
    /// only if the path leads to what that open got.
    pub fn observe(
        &mut self,
        file: &FileKey,
        expect: Option<&Expect>,
        watcher: &mut dyn DirWatcher,
        io: &mut Deadline,
    ) -> Result<Arc<Version>, Unobserved> {
        let root = self
            .roots
            .open(&file.root)
            .ok_or(Unobserved::RootUnreachable)?;
        let expect = if self.files.contains_key(file) {
            None
        } else {
            expect
        };
        self.check(file, &root, expect, watcher, io)?;
        self.latest(file).ok_or(Unobserved::Untracked)
    }

    /// Re-checks `file` now; `true` if its content changed.
    pub fn refresh(
        &mut self,
        file: &FileKey,
        watcher: &mut dyn DirWatcher,
        io: &mut Deadline,
    ) -> bool {
        let Some(root) = self.roots.open(&file.root) else {
            return false;
        };
        let before = self.latest(file).map(|v| v.id);
        if self.check(file, &root, None, watcher, io).is_err() {
            return false;
        }
        self.latest(file).map(|v| v.id) != before
    }

    pub fn latest(&self, file: &FileKey) -> Option<Arc<Version>> {
        self.files.get(file)?.latest().cloned()
    }

    /// Versions of `file`, oldest first.
    pub fn history(&self, file: &FileKey) -> Vec<Arc<Version>> {
        self.files
            .get(file)
            .map(|f| f.versions.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The version that was current at `t`.
    pub fn version_at(&self, file: &FileKey, t: SystemTime) -> Option<Arc<Version>> {
        self.files.get(file)?.version_at(t)
    }

    /// The version of `file` that was the inode (`dev`, `ino`) — what the probe saw the
    /// process open at `opened` — if the history has it.
    pub fn version_of_inode(
        &self,
        file: &FileKey,
        dev: u64,
        ino: u64,
        opened: SystemTime,
    ) -> Option<Arc<Version>> {
        self.files.get(file)?.version_of_inode(dev, ino, opened)
    }

    /// A process opened a version the daemon never saw (replaced before it could look):
    /// read it through the process's own fd (the very file it opened, at `opened`) and
    /// record it in the history at its place in time, before what the path names now.
    pub fn adopt_open_file(
        &mut self,
        file: &FileKey,
        pid: u32,
        fd: i32,
        (dev, ino): (u64, u64),
        opened: SystemTime,
        io: &mut Deadline,
    ) -> Option<Arc<Version>> {
        if !self.files.contains_key(file) || fd < 0 {
            return None;
        }
        let shared = Arc::clone(&self.shared);
        let limits = self.look_limits();
        let (identity, content, tally) = io
            .run(deadline::key(("dev", dev)), move || {
                let mut tally = Tally::default();
                look::adopt(&shared, pid, fd, dev, ino, limits, &mut tally)
                    .ok()
                    .map(|(identity, content)| (identity, content, tally))
            })
            .ok()
            .flatten()?;
        self.count(&tally);
        let now = SystemTime::now();
        let version = Version {
            id: self.next_version,
            seen_at: from_ns(identity.ctime_ns).min(now),
            observed_at: now,
            canonical: None,
            identity: Some(identity),
            content: Some(content),
            unseen: false,
        };
        self.next_version += 1;
        let version = self.files.get_mut(file)?.insert_late(version, opened);
        self.changed.insert(file.clone());
        Some(version)
    }

    /// What a process got when it opened inode (`dev`, `ino`) at `opened` and neither
    /// the history nor its fd can tell the content: a version known only to differ from
    /// every one the daemon read. Not kept in the history (nobody saw it on disk).
    pub fn unseen_version(&mut self, dev: u64, ino: u64, opened: SystemTime) -> Arc<Version> {
        self.count_error("replaced_before_read");
        let version = Arc::new(Version {
            id: self.next_version,
            seen_at: opened,
            observed_at: SystemTime::now(),
            canonical: None,
            identity: Some(FileIdentity {
                dev,
                ino,
                size: 0,
                mtime_ns: 0,
                ctime_ns: 0,
            }),
            content: None,
            unseen: true,
        });
        self.next_version += 1;
        version
    }

    pub fn last_error(&self, file: &FileKey) -> Option<String> {
        self.files.get(file)?.last_error.clone()
    }

    /// Every file and its versions, for persistence.
    pub fn export(&self) -> impl Iterator<Item = (&FileKey, &VecDeque<Arc<Version>>)> {
        self.files.iter().map(|(k, f)| (k, &f.versions))
    }

    /// The versions of one file, oldest first.
    pub fn versions(&self, file: &FileKey) -> Option<&VecDeque<Arc<Version>>> {
        self.files.get(file).map(|f| &f.versions)
    }

    /// Restores a file's history saved by an earlier run; the next check appends to it.
    pub fn import(&mut self, file: FileKey, versions: Vec<Arc<Version>>) {
        if self.files.len() >= self.limits.max_files {
            self.counters.files_evicted += 1;
            return;
        }
        if let Some(max) = versions.iter().map(|v| v.id).max() {
            self.next_version = self.next_version.max(max + 1);
        }
        self.files.insert(file, TrustFile::new(versions.into()));
    }

    /// Every file the catalog knows.
    pub fn files(&self) -> impl Iterator<Item = &FileKey> {
        self.files.keys()
    }

    /// Drops files nobody refers to any more, and roots nobody can reach.
    /// Forgets the files `keep` does not keep; how many it forgot.
    pub fn forget_files(&mut self, keep: impl Fn(&FileKey) -> bool) -> usize {
        let before = self.files.len();
        self.files.retain(|k, _| keep(k));
        self.schedule.retain(&keep);
        self.changed.retain(&keep);
        self.roots.retain_reachable();
        before - self.files.len()
    }

    /// A watched directory changed: its files are re-checked after the debounce, which
    /// lets a write in progress finish; at once when the change is `settled` (renamed into
    /// place, closed after writing: how rotations and package managers replace files).
    pub fn dir_changed(&mut self, root: RootKey, dir: &Path, now: SystemTime, settled: bool) {
        let due = if settled {
            now
        } else {
            now + self.limits.debounce
        };
        for (key, f) in &self.files {
            if key.root == root && f.watched_dirs.contains(dir) {
                self.schedule.mark(key, due);
            }
        }
    }

    /// A watched directory went away (removed, unmounted): its files are re-checked and
    /// watched again from wherever their paths lead now.
    pub fn dir_gone(&mut self, root: RootKey, dir: &Path, now: SystemTime) {
        self.dir_changed(root, dir, now, false);
        for (key, f) in self.files.iter_mut() {
            if key.root == root {
                f.watched_dirs.remove(dir);
            }
        }
    }

    /// Everything changed (the watcher overflowed): re-check all files soon.
    pub fn all_dirty(&mut self, now: SystemTime) {
        let due = now + self.limits.debounce;
        for key in self.files.keys() {
            self.schedule.mark(key, due);
        }
    }

    /// The files whose history grew since the last call, by any look.
    pub fn take_changed(&mut self) -> BTreeSet<FileKey> {
        std::mem::take(&mut self.changed)
    }

    /// When the next scheduled look is due.
    pub fn next_due(&self) -> Option<SystemTime> {
        self.schedule.next_due()
    }

    /// Files whose debounce elapsed, no longer scheduled.
    pub fn take_due(&mut self, now: SystemTime) -> Vec<FileKey> {
        self.schedule.take_due(now)
    }

    fn count_error(&mut self, reason: &str) {
        *self
            .counters
            .read_errors
            .entry(reason.to_owned())
            .or_default() += 1;
    }

    fn count(&mut self, tally: &Tally) {
        self.counters.contents_hashed += tally.hashed;
        self.counters.parse_errors += tally.parse_errors;
        self.counters.certificates_dropped += tally.certs_dropped;
        self.counters.contents_unparsed += tally.unparsed;
        for reason in &tally.errors {
            self.count_error(reason);
        }
        let cache = self.cache();
        let (hits, evicted) = (cache.hits, cache.evicted);
        drop(cache);
        self.counters.content_cache_hits = hits;
        self.counters.contents_evicted = evicted;
    }

    fn look_limits(&self) -> LookLimits {
        LookLimits {
            max_file_bytes: self.limits.max_file_bytes,
            max_dir_entries: self.limits.max_dir_entries,
            max_certs: self.limits.max_certs_per_file,
        }
    }

    /// What a look at `file` is keyed by under the deadline: its device when known (a
    /// hung mount is quarantined whole), else the file itself.
    fn job_key(&self, file: &FileKey, expect: Option<&Expect>) -> u64 {
        let dev = expect.map(|e| e.dev).or_else(|| {
            self.files
                .get(file)
                .and_then(|f| f.latest())
                .and_then(|v| v.identity)
                .map(|i| i.dev)
        });
        match dev {
            Some(dev) => deadline::key(("dev", dev)),
            None => deadline::key(("file", file)),
        }
    }

    /// Looks at the file as it is now and records a version if its content changed.
    fn check(
        &mut self,
        file: &FileKey,
        root: &Arc<Root>,
        expect: Option<&Expect>,
        watcher: &mut dyn DirWatcher,
        io: &mut Deadline,
    ) -> Result<(), Unobserved> {
        if !self.files.contains_key(file) && self.files.len() >= self.limits.max_files {
            self.counters.files_evicted += 1;
            return Err(Unobserved::Untracked);
        }
        let now = SystemTime::now();
        let started = Instant::now();
        let job = {
            let (shared, root, path) = (
                Arc::clone(&self.shared),
                Arc::clone(root),
                file.path.clone(),
            );
            let (limits, expect) = (self.look_limits(), expect.cloned());
            move || {
                let mut tally = Tally::default();
                let looked = look::look(&shared, &root, &path, limits, expect.as_ref(), &mut tally);
                (looked, tally)
            }
        };
        let (looked, tally) = match io.run(self.job_key(file, expect), job) {
            Ok(done) => done,
            Err(refused) => {
                // Retried at the next look or rescan, once the back-off allows.
                if let Some(f) = self.files.get_mut(file) {
                    f.last_error = Some(format!("timeout: {refused}"));
                    f.checked = None;
                }
                return Err(Unobserved::Refused(refused));
            }
        };
        self.count(&tally);
        let mut dirs = Vec::new();
        if let Some(parent) = file.path.parent() {
            dirs.push(parent.to_path_buf());
        }
        let (version, error) = match looked {
            Ok(Looked::Elsewhere { canonical }) => {
                self.count_error("not_what_was_opened");
                return Err(Unobserved::Elsewhere { canonical });
            }
            Ok(Looked::Seen(seen)) => {
                if let Some(parent) = seen.canonical.parent() {
                    dirs.push(parent.to_path_buf());
                }
                if matches!(seen.content.shape, Shape::Directory { .. }) {
                    dirs.push(seen.canonical.clone());
                }
                let version = Version {
                    id: 0,
                    seen_at: from_ns(seen.changed_ns).min(now),
                    observed_at: now,
                    canonical: Some(seen.canonical),
                    identity: Some(seen.identity),
                    content: Some(seen.content),
                    unseen: false,
                };
                (version, None)
            }
            Err(e) => {
                let reason = look::error_reason(&e);
                self.count_error(reason);
                let absent = Version {
                    id: 0,
                    seen_at: now,
                    observed_at: now,
                    canonical: None,
                    identity: None,
                    content: None,
                    unseen: false,
                };
                (absent, Some(format!("{reason}: {e}")))
            }
        };
        let entry = self
            .files
            .entry(file.clone())
            .or_insert_with(|| TrustFile::new(VecDeque::new()));
        let mut fully_watched = true;
        for dir in dirs {
            if !entry.watched_dirs.contains(&dir) {
                if watcher.watch(io, root, file.root, &dir) {
                    entry.watched_dirs.insert(dir);
                } else {
                    fully_watched = false;
                }
            }
        }
        // From when the look began: a change during it may or may not be in what it saw.
        entry.checked = Some((started, fully_watched));
        entry.last_error = error;
        match entry.record(
            version,
            self.next_version,
            self.limits.max_versions_per_file,
        ) {
            Recorded::Same => {}
            Recorded::New { dropped } => {
                self.next_version += 1;
                self.changed.insert(file.clone());
                if dropped {
                    self.counters.versions_dropped += 1;
                }
            }
        }
        Ok(())
    }
}
