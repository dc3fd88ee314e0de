//! Where the path of an access leads: resolved in the opening process's own root, from
//! its cwd or dirfd for relative paths. Done as soon as the access is announced, while
//! the process (and its root, cwd and fds) most likely still exists.

use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
};

use thiserror::Error;

use crate::{events::Access, process::procfs, process::rootfs::Root};

#[derive(Debug, Error)]
pub enum ResolveError {
    #[error("process exited before its root could be read")]
    Gone,
    #[error(
        "permission denied opening the process's root (the daemon needs CAP_SYS_PTRACE \
         and CAP_DAC_READ_SEARCH)"
    )]
    Denied,
    #[error("relative path and the process exited before its cwd or dirfd {dirfd} could be read")]
    GoneRelative { dirfd: i32 },
    #[error("reading the process's cwd or dirfd {dirfd}: {source}")]
    Base { dirfd: i32, source: io::Error },
    #[error("{0}")]
    Lookup(#[from] io::Error),
}

/// An access's path in its process's root: made absolute (from the cwd or dirfd), and
/// with every symlink followed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedAccess {
    pub absolute: PathBuf,
    pub canonical: PathBuf,
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
    /// Resolves the access's path; remembers it in case it is a directory others open
    /// relative to.
    pub fn resolve(&mut self, access: &Access) -> Result<ResolvedAccess, ResolveError> {
        let resolved = self.resolve_uncached(access)?;
        self.remember(access, &resolved.canonical);
        Ok(resolved)
    }

    /// Remembers where an access led when something else resolved it (the catalog, which
    /// looked at that very path moments ago).
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

    fn resolve_uncached(&self, access: &Access) -> Result<ResolvedAccess, ResolveError> {
        let pid = access.task.tgid;
        // Open the root first, then check the process is still the one that opened the
        // file: the fd pins that process's root even if the pid is reused afterwards.
        let root = match Root::of_pid(pid) {
            Ok(root) => Some(root).filter(|_| procfs::is_same_process(pid, access.task.start_ns)),
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                return Err(ResolveError::Denied);
            }
            Err(_) => None,
        };
        let alive = root.is_some();
        let root = match root {
            Some(root) => root,
            None if same_mount_namespace(access) => Root::host()?,
            None => return Err(ResolveError::Gone),
        };
        let absolute = if access.path.is_absolute() {
            access.path.clone()
        } else if let Some(dir) = self.known_dir(access) {
            dir.join(&access.path)
        } else if alive {
            let base =
                procfs::base_dir(pid, access.dirfd).map_err(|source| ResolveError::Base {
                    dirfd: access.dirfd,
                    source,
                })?;
            base.join(&access.path)
        } else {
            return Err(ResolveError::GoneRelative {
                dirfd: access.dirfd,
            });
        };
        let canonical = root.canonicalize(&absolute)?;
        Ok(ResolvedAccess {
            absolute,
            canonical,
        })
    }
}

/// Whether the access came from the host's mount namespace, whose root stays reachable.
fn same_mount_namespace(access: &Access) -> bool {
    access.task.mnt_ns != 0 && procfs::host_mount_namespace() == Some(access.task.mnt_ns)
}

/// For display: a path lossily as text.
pub fn display(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}
