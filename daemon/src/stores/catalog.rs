//! Trust files as each root sees them, and their versions over time.
//!
//! A trust file is a path as some process named it, inside that process's root (its
//! mount namespace and chroot). Each time what the path leads to changes in content, the
//! file gets a new version: where the path resolved, the file's identity, the SHA-256 of
//! its content and the certificates in it, and when that content became current. The
//! version a process read is fixed when it reads; later versions come from watching
//! (inotify, see [`crate::stores::watch`]) and from periodic rescans.
//!
//! Containers sharing an image share content: the same (device, inode, size, mtime) is
//! read and hashed once, whichever root it is seen from.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    fmt,
    fs::File,
    io::{self, Read},
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    sync::{Arc, Weak},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{
    process::procfs,
    process::rootfs::{Resolved, Root},
    stores::formats::{self, CertInfo, ContentKind},
};

/// Identity of what a process sees as `/`: its mount namespace and root directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RootKey {
    pub mnt_ns: u32,
    pub dev: u64,
    pub ino: u64,
}

impl fmt::Display for RootKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "mnt:{}/root:{}:{}", self.mnt_ns, self.dev, self.ino)
    }
}

/// A trust file: an absolute path as processes of one root name it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileKey {
    pub root: RootKey,
    pub path: PathBuf,
}

/// What `stat` says about a file; a change here without a content change (a touch, an
/// identical rewrite) is not a new version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FileIdentity {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

/// The cache key: what the issue calls "the same (device, inode, size, mtime)".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct ContentKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
}

impl From<&FileIdentity> for ContentKey {
    fn from(i: &FileIdentity) -> Self {
        Self {
            dev: i.dev,
            ino: i.ino,
            size: i.size,
            mtime_ns: i.mtime_ns,
        }
    }
}

/// What a version holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Shape {
    /// A regular file, parsed (private keys are only hashed: no certificates, no bytes).
    File {
        kind: ContentKind,
        certs: Vec<Arc<CertInfo>>,
        errors: Vec<String>,
    },
    /// A directory store: its entries (by name) and what each holds.
    Directory {
        entries: BTreeMap<String, Arc<Content>>,
        errors: Vec<String>,
    },
    /// Present but not readable as trust material (too large, a FIFO or device, ...).
    Unreadable { reason: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Content {
    pub sha256: [u8; 32],
    pub size: u64,
    pub shape: Shape,
}

impl Content {
    pub fn sha256_hex(&self) -> String {
        hex(&self.sha256)
    }

    /// Every certificate in this content (a directory's through its entries), by
    /// fingerprint.
    pub fn certificates(&self) -> BTreeMap<String, Arc<CertInfo>> {
        let mut out = BTreeMap::new();
        match &self.shape {
            Shape::File { certs, .. } => {
                for c in certs {
                    out.insert(c.sha256.clone(), Arc::clone(c));
                }
            }
            Shape::Directory { entries, .. } => {
                for e in entries.values() {
                    out.extend(e.certificates());
                }
            }
            Shape::Unreadable { .. } => {}
        }
        out
    }

    pub fn kind_name(&self) -> &'static str {
        match &self.shape {
            Shape::File { kind, .. } => match kind {
                ContentKind::PemBundle => "pem_bundle",
                ContentKind::DerCertificate => "der_certificate",
                ContentKind::Jks => "jks",
                ContentKind::Pkcs12 => "pkcs12",
                ContentKind::PrivateKey => "private_key",
                ContentKind::Unknown => "unknown",
            },
            Shape::Directory { .. } => "directory",
            Shape::Unreadable { .. } => "unreadable",
        }
    }

    /// Whether this holds anything TLS trusts or presents: a certificate or a key (a
    /// directory through its entries). DH parameters or notes named `.pem` do not.
    pub fn is_trust_material(&self) -> bool {
        match &self.shape {
            Shape::File { kind, certs, .. } => {
                !certs.is_empty() || *kind == ContentKind::PrivateKey
            }
            Shape::Directory { entries, .. } => entries.values().any(|e| e.is_trust_material()),
            Shape::Unreadable { .. } => true,
        }
    }

    pub fn errors(&self) -> Vec<String> {
        match &self.shape {
            Shape::File { errors, .. } | Shape::Directory { errors, .. } => errors.clone(),
            Shape::Unreadable { reason } => vec![reason.clone()],
        }
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One version of a trust file.
#[derive(Clone, Debug)]
pub struct Version {
    /// Unique across the catalog, increasing.
    pub id: u64,
    /// When this content became what the path names: the newest ctime of the file and of
    /// the links leading to it (so a re-read that races the watcher is still ordered
    /// right), never later than when the daemon saw it.
    pub seen_at: SystemTime,
    /// When the daemon first saw it.
    pub observed_at: SystemTime,
    /// Where the path led, inside the root.
    pub canonical: Option<PathBuf>,
    pub identity: Option<FileIdentity>,
    /// `None`: the path led nowhere (the file was removed), or, when `unseen`, nobody
    /// knows what it held.
    pub content: Option<Arc<Content>>,
    /// A process opened this inode but it was replaced before the daemon could read it
    /// (and the process no longer holds it open): a version that existed, content unknown.
    pub unseen: bool,
}

impl Version {
    fn same_content(&self, other: &Version) -> bool {
        match (&self.content, &other.content) {
            (Some(a), Some(b)) => a.sha256 == b.sha256,
            (None, None) => true,
            _ => false,
        }
    }
}

/// How long a look at a file stands in for another (see [`Catalog::recent`]). Watches
/// report changes in the directories a look named; this bound covers what they cannot see
/// (a symlink swapped further up the path), well inside the detection latency users get
/// from the watches.
pub const RECENT: Duration = Duration::from_millis(100);

/// Bounds of the catalog; everything past them is counted, never silent.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest file read; bigger ones are hashed up to the cap and reported.
    pub max_file_bytes: u64,
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
            max_files: 16384,
            max_versions_per_file: 16,
            max_cached_contents: 8192,
            max_dir_entries: 4096,
            debounce: Duration::from_millis(40),
        }
    }
}

/// Things the catalog could not keep or read, by reason (exported as metrics).
#[derive(Clone, Debug, Default, Serialize)]
pub struct CatalogCounters {
    pub files_evicted: u64,
    pub versions_dropped: u64,
    pub contents_evicted: u64,
    pub contents_hashed: u64,
    pub content_cache_hits: u64,
    pub read_errors: BTreeMap<String, u64>,
    pub parse_errors: u64,
    pub roots_unreachable: u64,
}

struct TrustFile {
    versions: VecDeque<Arc<Version>>,
    last_error: Option<String>,
    /// Directories whose changes may change what this file is.
    watched_dirs: BTreeSet<PathBuf>,
    /// When it was last looked at, and whether every directory that look named was
    /// watched: what [`Catalog::recent`] may rely on instead of looking again.
    checked: Option<(Instant, bool)>,
}

/// How to get at a root later: it is the daemon's own, or some live process has it.
#[derive(Default)]
struct RootAccess {
    host: bool,
    /// (pid, start ticks) of live processes with this root.
    pids: BTreeSet<(u32, u64)>,
}

/// Directory changes the catalog wants to hear about.
pub trait DirWatcher {
    /// Starts watching `dir` (inside `root`); `false` if it could not.
    fn watch(&mut self, root: &Root, root_key: RootKey, dir: &Path) -> bool;
}

pub struct Catalog {
    limits: Limits,
    files: HashMap<FileKey, TrustFile>,
    contents: HashMap<ContentKey, Arc<Content>>,
    content_order: VecDeque<ContentKey>,
    /// Parsed contents by their SHA-256, while anything holds them: a file rewritten with
    /// the same bytes (a new inode each time) shares one parse instead of caching another
    /// copy per rewrite. Pruned of the dead when it outgrows the cache twice over.
    by_sha: HashMap<[u8; 32], Weak<Content>>,
    roots: HashMap<RootKey, RootAccess>,
    host: Option<RootKey>,
    /// The host's root, opened once: every look at a host file goes through it.
    host_handle: Option<Arc<Root>>,
    dirty: BTreeMap<FileKey, SystemTime>,
    next_version: u64,
    pub counters: CatalogCounters,
}

fn ns(t: i64, nsec: u64) -> i128 {
    i128::from(t) * 1_000_000_000 + i128::from(nsec)
}

fn from_ns(ns: i128) -> SystemTime {
    if ns <= 0 {
        return UNIX_EPOCH;
    }
    UNIX_EPOCH + Duration::from_nanos(ns as u64)
}

fn identity_of(st: &rustix::fs::Stat) -> FileIdentity {
    FileIdentity {
        dev: st.st_dev,
        ino: st.st_ino,
        size: st.st_size as u64,
        mtime_ns: ns(st.st_mtime, st.st_mtime_nsec),
        ctime_ns: ns(st.st_ctime, st.st_ctime_nsec),
    }
}

fn is_dir(st: &rustix::fs::Stat) -> bool {
    rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory
}

fn is_regular(st: &rustix::fs::Stat) -> bool {
    rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile
}

/// Reads at most `cap` bytes; `true` in the second field if there was more.
fn read_capped(fd: OwnedFd, cap: u64) -> io::Result<(Vec<u8>, bool)> {
    let mut buf = Vec::new();
    let mut file = File::from(fd).take(cap + 1);
    file.read_to_end(&mut buf)?;
    let over = buf.len() as u64 > cap;
    buf.truncate(cap as usize);
    Ok((buf, over))
}

fn error_reason(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENOENT) => "not_found".into(),
        Some(libc::EACCES) | Some(libc::EPERM) => "permission_denied".into(),
        Some(libc::ELOOP) => "symlink_loop".into(),
        Some(libc::EXDEV) => "escapes_root".into(),
        Some(libc::EAGAIN) => "would_block".into(),
        _ => "io_error".into(),
    }
}

impl Catalog {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            files: HashMap::new(),
            contents: HashMap::new(),
            content_order: VecDeque::new(),
            by_sha: HashMap::new(),
            roots: HashMap::new(),
            host: None,
            host_handle: None,
            dirty: BTreeMap::new(),
            next_version: 1,
            counters: CatalogCounters::default(),
        }
    }

    /// New bounds (configuration reload); what is over them goes as it is next touched.
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    pub fn cached_contents(&self) -> usize {
        self.contents.len()
    }

    /// Drops cached contents no version holds any more. The cache spares re-reading a file
    /// another root shares while it is in use; one that only the cache remembers (its
    /// versions aged out of every history) would otherwise stay until 8,192 had piled up,
    /// each a parsed bundle.
    pub fn prune_contents(&mut self) {
        // Several keys (rewrites of the same bytes) may share one content: only references
        // from outside the cache keep it.
        let mut cached: HashMap<*const Content, usize> = HashMap::new();
        for c in self.contents.values() {
            *cached.entry(Arc::as_ptr(c)).or_default() += 1;
        }
        self.contents.retain(|_, c| {
            Arc::strong_count(c) > cached.get(&Arc::as_ptr(c)).copied().unwrap_or(0)
        });
        let contents = &self.contents;
        self.content_order.retain(|k| contents.contains_key(k));
        self.by_sha.retain(|_, c| c.strong_count() > 0);
    }

    /// The host's root (init's, see [`Root::host`]), always reachable.
    pub fn host_root(&mut self) -> Option<RootKey> {
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
        let Some(host) = self.host_root() else {
            return false;
        };
        Root::own()
            .and_then(|r| r.identity())
            .is_ok_and(|(dev, ino)| (dev, ino) == (host.dev, host.ino))
            && procfs::own_mount_namespace() == Some(host.mnt_ns)
    }

    /// The root of live process `pid` (checked against its start time), registering the
    /// process as a way back into that root.
    pub fn root_of(&mut self, pid: u32, start_ticks: u64) -> Option<(RootKey, Root)> {
        let root = Root::of_pid(pid).ok()?;
        // The fd pins the root; only now is it safe to check the pid is still ours.
        if procfs::start_ticks(pid).ok()? != start_ticks {
            return None;
        }
        let (dev, ino) = root.identity().ok()?;
        let mnt_ns = procfs::mount_namespace_of(pid)?;
        let key = RootKey { mnt_ns, dev, ino };
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
    fn open_root(&mut self, key: &RootKey) -> Option<Arc<Root>> {
        let access = self.roots.get_mut(key)?;
        if access.host {
            // Set together with `host`: only the host root is marked so.
            return self.host_handle.clone();
        }
        let mut dead = Vec::new();
        let mut found = None;
        for &(pid, ticks) in access.pids.iter() {
            let Ok(root) = Root::of_pid(pid) else {
                dead.push((pid, ticks));
                continue;
            };
            let same = procfs::start_ticks(pid).ok() == Some(ticks)
                && root.identity().ok() == Some((key.dev, key.ino))
                && procfs::mount_namespace_of(pid) == Some(key.mnt_ns);
            if same {
                found = Some(root);
                break;
            }
            dead.push((pid, ticks));
        }
        for d in dead {
            access.pids.remove(&d);
        }
        if found.is_none() {
            self.counters.roots_unreachable += 1;
        }
        found.map(Arc::new)
    }

    /// Whether the catalog can still reach `key` (a live process or the host has it).
    pub fn root_reachable(&self, key: &RootKey) -> bool {
        self.roots
            .get(key)
            .is_some_and(|a| a.host || !a.pids.is_empty())
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
        if !fresh || !fully_watched || f.last_error.is_some() || self.dirty.contains_key(file) {
            return None;
        }
        f.versions.back().cloned()
    }

    /// The current version of `file`, checked now. New files start being watched.
    pub fn observe(
        &mut self,
        file: &FileKey,
        watcher: &mut dyn DirWatcher,
    ) -> Option<Arc<Version>> {
        let root = self.open_root(&file.root)?;
        self.check(file, &root, watcher);
        self.latest(file)
    }

    /// Re-checks `file` now; `true` if its content changed.
    pub fn refresh(&mut self, file: &FileKey, watcher: &mut dyn DirWatcher) -> bool {
        let Some(root) = self.open_root(&file.root) else {
            return false;
        };
        let before = self.latest(file).map(|v| v.id);
        self.check(file, &root, watcher);
        self.latest(file).map(|v| v.id) != before
    }

    pub fn latest(&self, file: &FileKey) -> Option<Arc<Version>> {
        self.files.get(file)?.versions.back().cloned()
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
        let f = self.files.get(file)?;
        f.versions
            .iter()
            .rev()
            .find(|v| v.seen_at <= t)
            .or_else(|| f.versions.front())
            .cloned()
    }

    /// The version of `file` that was the inode (`dev`, `ino`) — what the probe saw the
    /// process open at `opened` — if the history has it. A filesystem reuses freed inode
    /// numbers, so the history can hold one number twice: the match must also have been
    /// what the path named around `opened`. File times are coarse (a clock tick), hence
    /// the slack.
    pub fn version_of_inode(
        &self,
        file: &FileKey,
        dev: u64,
        ino: u64,
        opened: SystemTime,
    ) -> Option<Arc<Version>> {
        const SLACK: Duration = Duration::from_millis(50);
        let versions = &self.files.get(file)?.versions;
        (0..versions.len())
            .rev()
            .find(|&i| {
                let v = &versions[i];
                v.identity.is_some_and(|id| id.dev == dev && id.ino == ino)
                    && v.seen_at <= opened + SLACK
                    && versions
                        .get(i + 1)
                        .is_none_or(|next| opened <= next.seen_at + SLACK)
            })
            .map(|i| Arc::clone(&versions[i]))
    }

    /// A process opened a version the daemon never saw (replaced before it could look):
    /// read it through the process's own fd (`/proc/<pid>/fd/<fd>`, the very file it
    /// opened) and record it in the history at its place in time.
    pub fn adopt_open_file(
        &mut self,
        file: &FileKey,
        pid: u32,
        fd: i32,
        dev: u64,
        ino: u64,
    ) -> Option<Arc<Version>> {
        if !self.files.contains_key(file) || fd < 0 {
            return None;
        }
        let handle = rustix::fs::open(
            format!("/proc/{pid}/fd/{fd}").as_str(),
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::NONBLOCK | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .ok()?;
        let st = rustix::fs::fstat(&handle).ok()?;
        // The fd may have been closed and reused for another file since the open.
        if st.st_dev != dev || st.st_ino != ino {
            return None;
        }
        let identity = identity_of(&st);
        let content = self.file_content(handle, &st).ok()?;
        let now = SystemTime::now();
        let version = Arc::new(Version {
            id: self.next_version,
            seen_at: from_ns(identity.ctime_ns).min(now),
            observed_at: now,
            canonical: None,
            identity: Some(identity),
            content: Some(content),
            unseen: false,
        });
        self.next_version += 1;
        let entry = self.files.get_mut(file)?;
        let at = entry
            .versions
            .iter()
            .position(|v| v.seen_at > version.seen_at)
            .unwrap_or(entry.versions.len());
        entry.versions.insert(at, Arc::clone(&version));
        Some(version)
    }

    /// What a process got when it opened inode (`dev`, `ino`) at `opened` and neither
    /// the history nor its fd can tell the content: a version known only to differ from
    /// every one the daemon read. Not kept in the history (nobody saw it on disk).
    pub fn unseen_version(&mut self, dev: u64, ino: u64, opened: SystemTime) -> Arc<Version> {
        self.count_error("replaced_before_read".into());
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

    /// Restores a file's history saved by an earlier run; the next check appends to it.
    pub fn import(&mut self, file: FileKey, versions: Vec<Arc<Version>>) {
        if self.files.len() >= self.limits.max_files {
            self.counters.files_evicted += 1;
            return;
        }
        if let Some(max) = versions.iter().map(|v| v.id).max() {
            self.next_version = self.next_version.max(max + 1);
        }
        self.files.insert(
            file,
            TrustFile {
                versions: versions.into(),
                last_error: None,
                watched_dirs: BTreeSet::new(),
                checked: None,
            },
        );
    }

    /// Every file the catalog knows.
    pub fn files(&self) -> impl Iterator<Item = &FileKey> {
        self.files.keys()
    }

    /// Drops files of roots nobody can reach any more and that no one refers to.
    pub fn forget_files(&mut self, keep: impl Fn(&FileKey) -> bool) {
        self.files.retain(|k, _| keep(k));
        self.dirty.retain(|k, _| keep(k));
        self.roots.retain(|_, a| a.host || !a.pids.is_empty());
    }

    /// A watched directory changed: its files are re-checked after the debounce.
    pub fn dir_changed(&mut self, root: RootKey, dir: &Path, now: SystemTime) {
        let due = now + self.limits.debounce;
        for (key, f) in &self.files {
            if key.root == root && f.watched_dirs.contains(dir) {
                self.dirty.entry(key.clone()).or_insert(due);
            }
        }
    }

    /// A watched directory went away (removed, unmounted): its files are re-checked and
    /// watched again from wherever their paths lead now.
    pub fn dir_gone(&mut self, root: RootKey, dir: &Path, now: SystemTime) {
        self.dir_changed(root, dir, now);
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
            self.dirty.entry(key.clone()).or_insert(due);
        }
    }

    /// Files whose debounce elapsed, removed from the dirty set.
    pub fn take_due(&mut self, now: SystemTime) -> Vec<FileKey> {
        let due: Vec<FileKey> = self
            .dirty
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &due {
            self.dirty.remove(k);
        }
        due
    }

    fn count_error(&mut self, reason: String) {
        *self.counters.read_errors.entry(reason).or_default() += 1;
    }

    /// Looks at the file as it is now and records a version if its content changed.
    fn check(&mut self, file: &FileKey, root: &Root, watcher: &mut dyn DirWatcher) {
        if !self.files.contains_key(file) {
            if self.files.len() >= self.limits.max_files {
                self.counters.files_evicted += 1;
                return;
            }
            self.files.insert(
                file.clone(),
                TrustFile {
                    versions: VecDeque::new(),
                    last_error: None,
                    watched_dirs: BTreeSet::new(),
                    checked: None,
                },
            );
        }
        let now = SystemTime::now();
        let started = Instant::now();
        let observed = self.look(root, &file.path, now);
        let mut dirs = Vec::new();
        if let Some(parent) = file.path.parent() {
            dirs.push(parent.to_path_buf());
        }
        let (version, error) = match observed {
            Ok(v) => {
                if let Some(canonical) = &v.canonical {
                    if let Some(parent) = canonical.parent() {
                        dirs.push(parent.to_path_buf());
                    }
                    if matches!(
                        v.content.as_deref().map(|c| &c.shape),
                        Some(Shape::Directory { .. })
                    ) {
                        dirs.push(canonical.clone());
                    }
                }
                (v, None)
            }
            Err(e) => {
                let reason = error_reason(&e);
                self.count_error(reason.clone());
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
        let mut fully_watched = true;
        for dir in dirs {
            let entry = self.files.get_mut(file).expect("inserted above");
            if !entry.watched_dirs.contains(&dir) {
                if watcher.watch(root, file.root, &dir) {
                    entry.watched_dirs.insert(dir);
                } else {
                    fully_watched = false;
                }
            }
        }
        // From when the look began: a change during it may or may not be in what it saw.
        self.files.get_mut(file).expect("inserted above").checked = Some((started, fully_watched));
        self.record(file, version, error);
    }

    fn record(&mut self, file: &FileKey, mut version: Version, error: Option<String>) {
        let max_versions = self.limits.max_versions_per_file;
        let next_id = self.next_version;
        let entry = self.files.get_mut(file).expect("checked by caller");
        entry.last_error = error;
        if let Some(last) = entry.versions.back() {
            if last.same_content(&version) {
                // A touch or an identical rewrite: remember the new identity (so it is not
                // hashed again), keep the version.
                if last.identity != version.identity || last.canonical != version.canonical {
                    let mut updated = (**last).clone();
                    updated.identity = version.identity;
                    updated.canonical = version.canonical.take();
                    *entry.versions.back_mut().expect("non-empty") = Arc::new(updated);
                }
                return;
            }
            // Never order a new version before the one it replaces.
            if version.seen_at < last.seen_at {
                version.seen_at = last.observed_at.max(last.seen_at);
            }
        }
        version.id = next_id;
        self.next_version += 1;
        entry.versions.push_back(Arc::new(version));
        if entry.versions.len() > max_versions {
            entry.versions.pop_front();
            self.counters.versions_dropped += 1;
        }
    }

    /// Resolves and reads what `path` names in `root` right now.
    fn look(&mut self, root: &Root, path: &Path, now: SystemTime) -> io::Result<Version> {
        let Resolved {
            path: canonical,
            newest_link_ctime_ns,
        } = root.resolve(path)?;
        let fd = root.open_for_reading(&canonical)?;
        let st = rustix::fs::fstat(&fd)?;
        let identity = identity_of(&st);
        let mut changed_ns = identity.ctime_ns.max(newest_link_ctime_ns.unwrap_or(0));
        let content = if is_dir(&st) {
            let (content, newest_entry_ns) = self.directory(root, &canonical, fd)?;
            changed_ns = changed_ns.max(newest_entry_ns);
            content
        } else {
            self.file_content(fd, &st)?
        };
        Ok(Version {
            id: 0,
            seen_at: from_ns(changed_ns).min(now),
            observed_at: now,
            canonical: Some(canonical),
            identity: Some(identity),
            content: Some(content),
            unseen: false,
        })
    }

    /// The content of a regular file (cached by identity), or why it cannot be read.
    fn file_content(&mut self, fd: OwnedFd, st: &rustix::fs::Stat) -> io::Result<Arc<Content>> {
        let identity = identity_of(st);
        if !is_regular(st) {
            self.count_error("not_regular".into());
            return Ok(Arc::new(Content {
                sha256: [0; 32],
                size: 0,
                shape: Shape::Unreadable {
                    reason: "not a regular file (FIFO, device or socket): not read".into(),
                },
            }));
        }
        let key = ContentKey::from(&identity);
        if let Some(hit) = self.contents.get(&key) {
            self.counters.content_cache_hits += 1;
            return Ok(Arc::clone(hit));
        }
        let (bytes, over) = read_capped(fd, self.limits.max_file_bytes)?;
        self.counters.contents_hashed += 1;
        let sha256: [u8; 32] = Sha256::digest(&bytes).into();
        if let Some(same) = self.by_sha.get(&sha256).and_then(Weak::upgrade) {
            self.cache(key, Arc::clone(&same));
            return Ok(same);
        }
        let shape = if over {
            self.count_error("too_large".into());
            Shape::Unreadable {
                reason: format!(
                    "larger than the {} byte cap: hashed up to the cap, not parsed",
                    self.limits.max_file_bytes
                ),
            }
        } else {
            let parsed = formats::parse(&bytes);
            if !parsed.errors.is_empty() {
                self.counters.parse_errors += parsed.errors.len() as u64;
            }
            Shape::File {
                kind: parsed.kind,
                certs: parsed.certs.into_iter().map(Arc::new).collect(),
                errors: parsed.errors,
            }
        };
        let content = Arc::new(Content {
            sha256,
            size: bytes.len() as u64,
            shape,
        });
        self.by_sha.insert(sha256, Arc::downgrade(&content));
        if self.by_sha.len() > 2 * self.limits.max_cached_contents.max(64) {
            self.by_sha.retain(|_, c| c.strong_count() > 0);
        }
        self.cache(key, Arc::clone(&content));
        Ok(content)
    }

    fn cache(&mut self, key: ContentKey, content: Arc<Content>) {
        if self.contents.insert(key, content).is_none() {
            self.content_order.push_back(key);
        }
        while self.contents.len() > self.limits.max_cached_contents {
            let Some(old) = self.content_order.pop_front() else {
                break;
            };
            if self.contents.remove(&old).is_some() {
                self.counters.contents_evicted += 1;
            }
        }
    }

    /// A directory store: every entry resolved inside the root and read. Returns the
    /// content and the newest ctime among the entries.
    fn directory(
        &mut self,
        root: &Root,
        dir: &Path,
        fd: OwnedFd,
    ) -> io::Result<(Arc<Content>, i128)> {
        let mut names = Vec::new();
        let mut errors = Vec::new();
        let mut listing = rustix::fs::Dir::read_from(&fd)?;
        while let Some(entry) = listing.read() {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == "." || name == ".." {
                continue;
            }
            if names.len() >= self.limits.max_dir_entries {
                errors.push(format!(
                    "more than {} entries: the rest not read",
                    self.limits.max_dir_entries
                ));
                self.count_error("dir_too_large".into());
                break;
            }
            names.push(name);
        }
        names.sort();
        let mut entries = BTreeMap::new();
        let mut newest = 0i128;
        let mut hasher = Sha256::new();
        for name in names {
            let path = dir.join(&name);
            let read = root.resolve(&path).and_then(|r| {
                let fd = root.open_for_reading(&r.path)?;
                let st = rustix::fs::fstat(&fd)?;
                Ok((r, fd, st))
            });
            let (resolved, fd, st) = match read {
                Ok(x) => x,
                Err(e) => {
                    errors.push(format!("{name}: {}", error_reason(&e)));
                    continue;
                }
            };
            if is_dir(&st) {
                continue;
            }
            newest = newest
                .max(identity_of(&st).ctime_ns)
                .max(resolved.newest_link_ctime_ns.unwrap_or(0));
            let content = self.file_content(fd, &st)?;
            hasher.update(name.as_bytes());
            hasher.update([0]);
            hasher.update(content.sha256);
            entries.insert(name, content);
        }
        let content = Content {
            sha256: hasher.finalize().into(),
            size: entries.len() as u64,
            shape: Shape::Directory { entries, errors },
        };
        Ok((Arc::new(content), newest))
    }
}

#[cfg(test)]
mod tests {
    use std::{fs, os::unix::fs::symlink};

    use super::*;

    struct NoWatch;
    impl DirWatcher for NoWatch {
        fn watch(&mut self, _: &Root, _: RootKey, _: &Path) -> bool {
            true
        }
    }

    struct Dir(PathBuf);
    impl Dir {
        fn new(name: &str) -> Self {
            let d = std::env::temp_dir()
                .join(format!("trustdrift-catalog-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&d);
            fs::create_dir_all(&d).unwrap();
            Self(d)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn host_file(c: &mut Catalog, path: &Path) -> FileKey {
        FileKey {
            root: c.host_root().unwrap(),
            path: path.to_path_buf(),
        }
    }

    #[test]
    fn a_new_version_only_when_the_content_changes() {
        let d = Dir::new("versions");
        let f = d.0.join("bundle.pem");
        fs::write(&f, "one").unwrap();
        let mut c = Catalog::new(Limits::default());
        let key = host_file(&mut c, &f);
        let v1 = c.observe(&key, &mut NoWatch).unwrap();
        // Identical rewrite and touch: same content, same version.
        fs::write(&f, "one").unwrap();
        assert!(!c.refresh(&key, &mut NoWatch));
        let v1b = c.latest(&key).unwrap();
        assert_eq!(v1b.id, v1.id);
        // New content: a new version, seen after the first.
        std::thread::sleep(Duration::from_millis(5));
        fs::write(&f, "two").unwrap();
        assert!(c.refresh(&key, &mut NoWatch));
        let v2 = c.latest(&key).unwrap();
        assert!(v2.id > v1.id && v2.seen_at >= v1.seen_at);
        assert_ne!(
            v2.content.as_ref().unwrap().sha256,
            v1.content.as_ref().unwrap().sha256
        );
        // Back to the old content: still a new version (the history is a timeline).
        fs::write(&f, "one").unwrap();
        assert!(c.refresh(&key, &mut NoWatch));
        assert_eq!(c.history(&key).len(), 3);
        // Removal is a version too.
        fs::remove_file(&f).unwrap();
        assert!(c.refresh(&key, &mut NoWatch));
        assert!(c.latest(&key).unwrap().content.is_none());
        assert_eq!(
            c.last_error(&key).as_deref().map(|e| &e[..9]),
            Some("not_found")
        );
    }

    #[test]
    fn version_at_answers_what_was_current_then() {
        let d = Dir::new("timeline");
        let f = d.0.join("ca.pem");
        fs::write(&f, "a").unwrap();
        let mut c = Catalog::new(Limits::default());
        let key = host_file(&mut c, &f);
        let v1 = c.observe(&key, &mut NoWatch).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let between = SystemTime::now();
        std::thread::sleep(Duration::from_millis(20));
        fs::write(&f, "b").unwrap();
        c.refresh(&key, &mut NoWatch);
        let v2 = c.latest(&key).unwrap();
        assert_eq!(c.version_at(&key, between).unwrap().id, v1.id);
        assert_eq!(c.version_at(&key, SystemTime::now()).unwrap().id, v2.id);
    }

    #[test]
    fn the_same_file_is_hashed_once_whatever_path_leads_to_it() {
        let d = Dir::new("dedup");
        let f = d.0.join("real.crt");
        fs::write(&f, "shared").unwrap();
        symlink(&f, d.0.join("alias.pem")).unwrap();
        let mut c = Catalog::new(Limits::default());
        let a = host_file(&mut c, &f);
        let b = host_file(&mut c, &d.0.join("alias.pem"));
        c.observe(&a, &mut NoWatch);
        c.observe(&b, &mut NoWatch);
        assert_eq!(c.counters.contents_hashed, 1);
        assert_eq!(c.counters.content_cache_hits, 1);
        let vb = c.latest(&b).unwrap();
        assert_eq!(vb.canonical.as_deref(), Some(f.as_path()));
    }

    #[test]
    fn fifos_and_oversized_files_are_reported_not_read() {
        let d = Dir::new("hostile");
        let fifo = d.0.join("pipe.pem");
        let cpath = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(cpath.as_ptr(), 0o600) }, 0);
        let big = d.0.join("big.pem");
        fs::write(&big, vec![b'A'; 4096]).unwrap();
        let mut c = Catalog::new(Limits {
            max_file_bytes: 1024,
            ..Limits::default()
        });
        let k = host_file(&mut c, &fifo);
        let v = c.observe(&k, &mut NoWatch).unwrap();
        assert!(matches!(
            v.content.as_deref().unwrap().shape,
            Shape::Unreadable { .. }
        ));
        let k = host_file(&mut c, &big);
        let v = c.observe(&k, &mut NoWatch).unwrap();
        let content = v.content.as_deref().unwrap();
        assert_eq!(content.size, 1024);
        assert!(content.errors()[0].contains("cap"));
        assert_eq!(c.counters.read_errors.get("too_large"), Some(&1));
        assert_eq!(c.counters.read_errors.get("not_regular"), Some(&1));
    }

    #[test]
    fn a_directory_store_is_versioned_by_its_entries() {
        let d = Dir::new("dirstore");
        let store = d.0.join("certs");
        fs::create_dir_all(&store).unwrap();
        fs::write(store.join("a.pem"), "a").unwrap();
        let mut c = Catalog::new(Limits::default());
        let key = host_file(&mut c, &store);
        let v1 = c.observe(&key, &mut NoWatch).unwrap();
        let Shape::Directory { entries, .. } = &v1.content.as_ref().unwrap().shape else {
            panic!("not a directory");
        };
        assert_eq!(entries.len(), 1);
        fs::write(store.join("b.pem"), "b").unwrap();
        assert!(c.refresh(&key, &mut NoWatch));
        fs::remove_file(store.join("a.pem")).unwrap();
        assert!(c.refresh(&key, &mut NoWatch));
        let v3 = c.latest(&key).unwrap();
        let Shape::Directory { entries, .. } = &v3.content.as_ref().unwrap().shape else {
            panic!("not a directory");
        };
        assert_eq!(entries.keys().collect::<Vec<_>>(), vec!["b.pem"]);
    }
}
