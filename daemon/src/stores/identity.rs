//! What names a trust file: a root (what a process sees as `/`) and a path in it; and what
//! `stat` says of the file a path leads to.

use std::{
    fmt,
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

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

impl FileIdentity {
    pub fn of(st: &rustix::fs::Stat) -> Self {
        Self {
            dev: st.st_dev,
            ino: st.st_ino,
            size: st.st_size as u64,
            mtime_ns: ns(st.st_mtime, st.st_mtime_nsec),
            ctime_ns: ns(st.st_ctime, st.st_ctime_nsec),
        }
    }

    /// Whether this is the file (device, inode) names.
    pub fn is(&self, dev: u64, ino: u64) -> bool {
        self.dev == dev && self.ino == ino
    }
}

/// Nanoseconds since the epoch of a `stat` time.
pub fn ns(t: i64, nsec: u64) -> i128 {
    i128::from(t) * 1_000_000_000 + i128::from(nsec)
}

/// The time `ns` nanoseconds after the epoch (the epoch itself for anything before).
pub fn from_ns(ns: i128) -> SystemTime {
    if ns <= 0 {
        return UNIX_EPOCH;
    }
    UNIX_EPOCH + Duration::from_nanos(ns as u64)
}
