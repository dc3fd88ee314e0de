//! Where the path of an access leads: made absolute in the opening process's root. An
//! absolute path is taken as written (the catalog then checks that it leads to the file
//! the open got); a relative one is taken from the kernel's own record of the opened file
//! when the probe sends it, since the process may change directory (or its dirfd) right
//! after the open; from a directory the process announced earlier, or, last, from its
//! current directory or fd, which the inode check catches when it moved.

use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
};

use thiserror::Error;

use crate::{events::Access, process::procfs};

#[derive(Debug, Error)]
pub enum ResolveError {
    #[error("relative path and the process exited before its cwd or dirfd {dirfd} could be read")]
    GoneRelative { dirfd: i32 },
    #[error("reading the process's cwd or dirfd {dirfd}: {source}")]
    Base { dirfd: i32, source: io::Error },
}

/// Directories announced as trust paths, by (tgid, start, exec generation, path hash),
/// so a relative open through a tracked dirfd resolves even after the process exits.
/// Ordered so that a process's entries are one range: an exit removes them without
/// scanning everyone else's (a storm of exits was quadratic with a scan).
#[derive(Default)]
pub struct Resolver {
    dirs: BTreeMap<(u32, u64, u32, u64), PathBuf>,
}

impl Resolver {
    /// The access's path, absolute inside its process's root; `alive`: the process still
    /// runs (its cwd and fds can be read).
    pub fn absolute(&self, access: &Access, alive: bool) -> Result<PathBuf, ResolveError> {
        if access.path.is_absolute() {
            return Ok(access.path.clone());
        }
        if let Some(opened) = &access.kernel_path {
            return Ok(opened.clone());
        }
        if let Some(dir) = self.known_dir(access) {
            return Ok(dir.join(&access.path));
        }
        if !alive {
            return Err(ResolveError::GoneRelative {
                dirfd: access.dirfd,
            });
        }
        let base = procfs::base_dir(access.task.tgid, access.dirfd).map_err(|source| {
            ResolveError::Base {
                dirfd: access.dirfd,
                source,
            }
        })?;
        Ok(base.join(&access.path))
    }

    /// Remembers where an access led, in case it is a directory others open relative to.
    pub fn remember(&mut self, access: &Access, canonical: &Path) {
        let t = &access.task;
        self.dirs.insert(
            (t.tgid, t.start_ns, t.exec_seq, access.key.path_hash),
            canonical.to_path_buf(),
        );
    }

    /// Forgets the directories of a process that exited.
    pub fn forget_process(&mut self, tgid: u32, start_ns: u64) {
        let mine: Vec<_> = self
            .dirs
            .range((tgid, start_ns, 0, 0)..=(tgid, start_ns, u32::MAX, u64::MAX))
            .map(|(k, _)| *k)
            .collect();
        for k in mine {
            self.dirs.remove(&k);
        }
    }

    fn known_dir(&self, access: &Access) -> Option<&PathBuf> {
        if access.dir_path_hash == 0 {
            return None;
        }
        let t = &access.task;
        self.dirs
            .get(&(t.tgid, t.start_ns, t.exec_seq, access.dir_path_hash))
    }
}

/// For display: a path lossily as text.
pub fn display(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}
