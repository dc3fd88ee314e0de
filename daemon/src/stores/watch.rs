//! Change notification for the directories holding trust files, in every root.
//!
//! inotify watches inodes, so one watch serves every root that sees the directory (a
//! bind mount, a shared image layer). The directory is opened inside its root first
//! (`openat2(RESOLVE_IN_ROOT)`) and the watch is added on that handle, so a symlink in a
//! container can never turn a watch onto a host directory. Watches do not pin mounts:
//! unmounting removes them (IN_IGNORED), and the rescan picks the files up again.

use std::{
    collections::HashMap,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::Arc,
};

use inotify::{Inotify, WatchMask, Watches};

use crate::{
    process::{
        deadline::{self, Deadline},
        rootfs::Root,
    },
    stores::catalog::{DirWatcher, RootKey},
};

/// What a watch event means for the catalog.
pub enum Change {
    /// Something in `dir` of `root` changed.
    /// `settled`: the event ends a change (a name renamed into place, a file closed after
    /// writing), so what the directory's files hold now is final; otherwise a write may
    /// still be going on.
    Dir {
        root: RootKey,
        dir: PathBuf,
        settled: bool,
    },
    /// The watch is gone (directory removed or unmounted).
    Gone { root: RootKey, dir: PathBuf },
    /// The kernel queue overflowed: anything may have changed.
    Overflow,
}

pub struct Watcher {
    watches: Watches,
    by_wd: HashMap<i32, Vec<(RootKey, PathBuf)>>,
    max_watches: usize,
    /// Watches that could not be added (limit reached or kernel refusal).
    pub failures: u64,
}

fn mask() -> WatchMask {
    WatchMask::MODIFY
        | WatchMask::CLOSE_WRITE
        | WatchMask::ATTRIB
        | WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::MOVED_FROM
        | WatchMask::MOVED_TO
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF
        | WatchMask::ONLYDIR
}

impl Watcher {
    /// A watcher and the inotify instance whose events it interprets.
    pub fn new(max_watches: usize) -> std::io::Result<(Self, Inotify)> {
        let inotify = Inotify::init()?;
        let watcher = Self {
            watches: inotify.watches(),
            by_wd: HashMap::new(),
            max_watches,
            failures: 0,
        };
        Ok((watcher, inotify))
    }

    pub fn watch_count(&self) -> usize {
        self.by_wd.len()
    }

    /// Interprets one inotify event.
    pub fn interpret(&mut self, event: &inotify::Event<std::ffi::OsString>) -> Vec<Change> {
        if event.mask.contains(inotify::EventMask::Q_OVERFLOW) {
            return vec![Change::Overflow];
        }
        let wd = event.wd.get_watch_descriptor_id();
        if event.mask.contains(inotify::EventMask::IGNORED) {
            return self
                .by_wd
                .remove(&wd)
                .unwrap_or_default()
                .into_iter()
                .map(|(root, dir)| Change::Gone { root, dir })
                .collect();
        }
        let settled = event
            .mask
            .intersects(inotify::EventMask::MOVED_TO | inotify::EventMask::CLOSE_WRITE);
        self.by_wd
            .get(&wd)
            .map(|dirs| {
                dirs.iter()
                    .map(|(root, dir)| Change::Dir {
                        root: *root,
                        dir: dir.clone(),
                        settled,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl DirWatcher for Watcher {
    fn watch(
        &mut self,
        io: &mut Deadline,
        root: &Arc<Root>,
        root_key: RootKey,
        dir: &Path,
    ) -> bool {
        if self.by_wd.len() >= self.max_watches {
            self.failures += 1;
            return false;
        }
        // Opening the directory asks its filesystem (a FUSE server may never answer).
        let (mut watches, root_for_job, dir_for_job) =
            (self.watches.clone(), Arc::clone(root), dir.to_path_buf());
        let added = io.run(deadline::key(("watch", root_key, dir)), move || {
            // A directory already gone (a rotation removed it) is not a failure to watch.
            let Ok(handle) = root_for_job.open_dir(&dir_for_job) else {
                return None;
            };
            let proc_path = format!("/proc/self/fd/{}", handle.as_raw_fd());
            Some(watches.add(&proc_path, mask()))
        });
        match added {
            Ok(Some(Ok(wd))) => {
                let list = self.by_wd.entry(wd.get_watch_descriptor_id()).or_default();
                let entry = (root_key, dir.to_path_buf());
                if !list.contains(&entry) {
                    list.push(entry);
                }
                true
            }
            Ok(None) => false,
            Ok(Some(Err(e))) => {
                self.failures += 1;
                tracing::debug!("cannot watch {} in {root_key}: {e}", dir.display());
                false
            }
            Err(refused) => {
                self.failures += 1;
                tracing::debug!("cannot watch {} in {root_key}: {refused}", dir.display());
                false
            }
        }
    }
}
