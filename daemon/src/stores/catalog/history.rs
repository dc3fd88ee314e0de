//! The versions of one trust file over time: a new version each time what its path leads
//! to changes in content, never for a touch or an identical rewrite.

use std::{
    collections::{BTreeSet, VecDeque},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use crate::stores::{catalog::contents::Content, digest::Digest, identity::FileIdentity};

/// One version of a trust file.
#[derive(Clone, Debug)]
pub struct Version {
    /// Unique across the catalog, increasing: also the file's change counter.
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
    /// Whether `other` holds what this version holds. A digest made under a key that is
    /// gone compares by the file's identity instead: the same inode, size and times are
    /// the same bytes.
    pub fn same_content(&self, other: &Version) -> bool {
        match (&self.content, &other.content) {
            (Some(a), Some(b)) => {
                a.same_as(b)
                    || (matches!(a.digest, Digest::Foreign) || matches!(b.digest, Digest::Foreign))
                        && self.identity.is_some()
                        && self.identity == other.identity
            }
            (None, None) => true,
            _ => false,
        }
    }
}

/// A trust file: its versions, and what the catalog knows about looking at it.
pub struct TrustFile {
    pub versions: VecDeque<Arc<Version>>,
    pub last_error: Option<String>,
    /// Directories whose changes may change what this file is.
    pub watched_dirs: BTreeSet<PathBuf>,
    /// When it was last looked at, and whether every directory that look named was
    /// watched: what `Catalog::recent` may rely on instead of looking again.
    pub checked: Option<(Instant, bool)>,
}

/// What recording a look did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recorded {
    /// The content is what the latest version holds.
    Same,
    /// A new version; `dropped`: the oldest went to respect the bound.
    New { dropped: bool },
}

impl TrustFile {
    pub fn new(versions: VecDeque<Arc<Version>>) -> Self {
        Self {
            versions,
            last_error: None,
            watched_dirs: BTreeSet::new(),
            checked: None,
        }
    }

    pub fn latest(&self) -> Option<&Arc<Version>> {
        self.versions.back()
    }

    /// Records what a look found, as version `next_id` if it is new content.
    pub fn record(&mut self, mut version: Version, next_id: u64, max_versions: usize) -> Recorded {
        if let Some(last) = self.versions.back() {
            if last.same_content(&version) {
                // A touch or an identical rewrite: remember the new identity (so it is not
                // read again) and digest (a foreign one is replaced), keep the version.
                if last.identity != version.identity
                    || last.canonical != version.canonical
                    || matches!(
                        last.content.as_ref().map(|c| c.digest),
                        Some(Digest::Foreign)
                    )
                {
                    let mut updated = (**last).clone();
                    updated.identity = version.identity;
                    updated.canonical = version.canonical.take();
                    if version.content.is_some() {
                        updated.content = version.content.take();
                    }
                    *self.versions.back_mut().expect("non-empty") = Arc::new(updated);
                }
                return Recorded::Same;
            }
            // Never order a new version before the one it replaces.
            if version.seen_at < last.seen_at {
                version.seen_at = last.observed_at.max(last.seen_at);
            }
        }
        version.id = next_id;
        self.versions.push_back(Arc::new(version));
        let dropped = self.versions.len() > max_versions;
        if dropped {
            self.versions.pop_front();
        }
        Recorded::New { dropped }
    }

    /// The version that was current at `t`.
    pub fn version_at(&self, t: SystemTime) -> Option<Arc<Version>> {
        self.versions
            .iter()
            .rev()
            .find(|v| v.seen_at <= t)
            .or_else(|| self.versions.front())
            .cloned()
    }

    /// The version that was the inode (`dev`, `ino`) opened at `opened`, if the history
    /// has it. A filesystem reuses freed inode numbers, so the history can hold one
    /// number twice: the match must also have been what the path named around `opened`.
    /// File times are coarse (a clock tick), hence the slack.
    pub fn version_of_inode(&self, dev: u64, ino: u64, opened: SystemTime) -> Option<Arc<Version>> {
        const SLACK: Duration = Duration::from_millis(50);
        let versions = &self.versions;
        (0..versions.len())
            .rev()
            .find(|&i| {
                let v = &versions[i];
                v.identity.is_some_and(|id| id.is(dev, ino))
                    && v.seen_at <= opened + SLACK
                    && versions
                        .get(i + 1)
                        .is_none_or(|next| opened <= next.seen_at + SLACK)
            })
            .map(|i| Arc::clone(&versions[i]))
    }

    /// Puts a version the daemon learned of late (read through the fd of a process that
    /// opened it at `opened`) at its place in time: after every version the daemon saw
    /// before that open, before the first it saw after, and never last, since the caller
    /// found another file at the path now. Its own ctime cannot place it: unlinking it
    /// when its successor was renamed into place moved that ctime past the successor's,
    /// which once made a replaced version the latest and its readers look fresh.
    pub fn insert_late(&mut self, mut version: Version, opened: SystemTime) -> Arc<Version> {
        let last = self.versions.len().saturating_sub(1);
        let at = self
            .versions
            .iter()
            .position(|v| v.observed_at > opened)
            .unwrap_or(last)
            .min(last);
        version.seen_at = version.seen_at.min(opened);
        if let Some(before) = at.checked_sub(1).and_then(|i| self.versions.get(i)) {
            version.seen_at = version.seen_at.max(before.seen_at);
        }
        let version = Arc::new(version);
        self.versions.insert(at, Arc::clone(&version));
        version
    }
}
