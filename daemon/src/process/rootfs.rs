//! Paths as a process sees them: resolved inside the process's own root (its mount
//! namespace and chroot), following symlinks the way the process would, never escaping.
//!
//! Every lookup goes through `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)` from an
//! `O_PATH` handle on the root, so an absolute symlink or `..` inside a container lands
//! on the container's own `/`, not the host's.

use std::{
    collections::VecDeque,
    ffi::{OsStr, OsString},
    io,
    os::{fd::OwnedFd, unix::ffi::OsStrExt},
    path::{Component, Path, PathBuf},
};

use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags, openat2, readlinkat, statat};

/// Symlinks followed before giving up, as the kernel does (`MAXSYMLINKS`).
const MAX_LINKS: usize = 40;

fn resolve_flags() -> ResolveFlags {
    ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS
}

/// A path resolved inside a root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub path: PathBuf,
    /// ctime (ns since the epoch) of the newest symlink followed, if any.
    pub newest_link_ctime_ns: Option<i128>,
}

/// An `O_PATH` handle on the root directory of some process.
pub struct Root {
    fd: OwnedFd,
}

impl Root {
    /// The root of process `pid` (`/proc/<pid>/root`).
    pub fn of_pid(pid: u32) -> io::Result<Self> {
        Self::open(&format!("/proc/{pid}/root"))
    }

    /// The host's root: init's. A daemon in a pod sharing the host's pid namespace (a
    /// DaemonSet with `hostPID`) has the image as its own root, and init's root is the
    /// node's; elsewhere the two are the same. Its own root when init's is unreadable.
    pub fn host() -> io::Result<Self> {
        Self::open("/proc/1/root").or_else(|_| Self::open("/"))
    }

    /// The daemon's own root.
    pub fn own() -> io::Result<Self> {
        Self::open("/")
    }

    fn open(path: &str) -> io::Result<Self> {
        let fd = rustix::fs::open(
            path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Self { fd })
    }

    /// Opens a directory of the root by absolute path (inside the root), as an `O_PATH`
    /// handle.
    pub fn open_dir(&self, path: &Path) -> io::Result<OwnedFd> {
        Ok(openat2(
            &self.fd,
            path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            resolve_flags(),
        )?)
    }

    /// The canonical form of the absolute `path` inside this root: symlinks followed,
    /// `.` and `..` folded, `..` at the root staying at the root.
    pub fn canonicalize(&self, path: &Path) -> io::Result<PathBuf> {
        self.resolve(path).map(|r| r.path)
    }

    /// Like [`Root::canonicalize`], and also when the newest symlink on the way last
    /// changed: swapping a link (Kubernetes `..data`, `update-alternatives`) changes what
    /// a path names without touching the file it now names.
    pub fn resolve(&self, path: &Path) -> io::Result<Resolved> {
        let mut newest_link_ctime_ns: Option<i128> = None;
        let mut resolved: Vec<OsString> = Vec::new();
        let mut pending: VecDeque<OsString> = components(path).collect();
        let mut links = 0;
        while let Some(part) = pending.pop_front() {
            if part == ".." {
                resolved.pop();
                continue;
            }
            let parent = join(&resolved);
            let dir = self.open_dir(&parent)?;
            match readlinkat(&dir, part.as_os_str(), Vec::new()) {
                Ok(target) => {
                    if let Ok(st) = statat(&dir, part.as_os_str(), AtFlags::SYMLINK_NOFOLLOW) {
                        let ctime =
                            i128::from(st.st_ctime) * 1_000_000_000 + i128::from(st.st_ctime_nsec);
                        newest_link_ctime_ns = newest_link_ctime_ns.max(Some(ctime));
                    }
                    links += 1;
                    if links > MAX_LINKS {
                        return Err(io::Error::from_raw_os_error(libc::ELOOP));
                    }
                    let target = PathBuf::from(OsStr::from_bytes(target.as_bytes()));
                    if target.is_absolute() {
                        resolved.clear();
                    }
                    for (i, c) in components(&target).enumerate() {
                        pending.insert(i, c);
                    }
                }
                // Not a symlink: a real entry (or a dangling name, reported below).
                Err(rustix::io::Errno::INVAL) => resolved.push(part),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Resolved {
            path: join(&resolved),
            newest_link_ctime_ns,
        })
    }

    /// Opens a file of this root for reading, resolved inside the root. Never blocks on
    /// a FIFO or device (`O_NONBLOCK`), never becomes a controlling tty.
    pub fn open_for_reading(&self, path: &Path) -> io::Result<OwnedFd> {
        Ok(openat2(
            &self.fd,
            path,
            OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
            Mode::empty(),
            resolve_flags(),
        )?)
    }

    /// Identity of this root directory (device, inode): two processes with the same
    /// mount namespace and root identity see the same files.
    pub fn identity(&self) -> io::Result<(u64, u64)> {
        let st = rustix::fs::fstat(&self.fd)?;
        Ok((st.st_dev, st.st_ino))
    }
}

/// The normal components of `path`, with `..` kept (folded during resolution).
fn components(path: &Path) -> impl Iterator<Item = OsString> + '_ {
    path.components().filter_map(|c| match c {
        Component::Normal(n) => Some(n.to_os_string()),
        Component::ParentDir => Some(OsString::from("..")),
        Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
    })
}

fn join(parts: &[OsString]) -> PathBuf {
    let mut p = PathBuf::from("/");
    p.extend(parts);
    p
}

#[cfg(test)]
mod tests {
    use std::{fs, os::unix::fs::symlink};

    use super::*;

    /// A directory tree standing in for a container root.
    struct Tree(PathBuf);

    impl Tree {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("trustdrift-rootfs-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(dir.join("etc/ssl/certs")).unwrap();
            fs::write(dir.join("etc/ssl/certs/bundle.crt"), b"inside").unwrap();
            Self(dir)
        }

        fn root(&self) -> Root {
            Root::open(self.0.to_str().unwrap()).unwrap()
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn follows_relative_and_absolute_links_inside_the_root() {
        let t = Tree::new("links");
        fs::create_dir_all(t.0.join("usr/lib/ssl")).unwrap();
        symlink(
            "/etc/ssl/certs/bundle.crt",
            t.0.join("usr/lib/ssl/cert.pem"),
        )
        .unwrap();
        symlink("../../../etc/ssl/certs", t.0.join("usr/lib/ssl/certs")).unwrap();
        let root = t.root();
        assert_eq!(
            root.canonicalize(Path::new("/usr/lib/ssl/cert.pem"))
                .unwrap(),
            Path::new("/etc/ssl/certs/bundle.crt")
        );
        assert_eq!(
            root.canonicalize(Path::new("/usr/lib/ssl/certs/./bundle.crt"))
                .unwrap(),
            Path::new("/etc/ssl/certs/bundle.crt")
        );
    }

    #[test]
    fn an_escaping_link_stays_inside_the_root() {
        let t = Tree::new("escape");
        // Absolute and `..`-laden links that would reach the host's /etc/passwd.
        symlink("/etc/passwd", t.0.join("etc/ssl/abs.pem")).unwrap();
        symlink("../../../../../../etc/passwd", t.0.join("etc/ssl/rel.pem")).unwrap();
        let root = t.root();
        for link in ["/etc/ssl/abs.pem", "/etc/ssl/rel.pem"] {
            // Resolved in the root, both name /etc/passwd *of the tree*, which does not exist.
            let err = root.canonicalize(Path::new(link)).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::NotFound, "{link}");
        }
        assert_eq!(
            root.canonicalize(Path::new("/../../etc/ssl/certs/bundle.crt"))
                .unwrap(),
            Path::new("/etc/ssl/certs/bundle.crt")
        );
    }

    #[test]
    fn reading_goes_through_the_root_and_reports_link_changes() {
        use std::io::Read;
        let t = Tree::new("read");
        let root = t.root();
        let direct = root
            .resolve(Path::new("/etc/ssl/certs/bundle.crt"))
            .unwrap();
        assert_eq!(direct.newest_link_ctime_ns, None);
        symlink("/etc/ssl/certs/bundle.crt", t.0.join("etc/alias.pem")).unwrap();
        let via_link = root.resolve(Path::new("/etc/alias.pem")).unwrap();
        assert!(via_link.newest_link_ctime_ns.is_some());
        let mut content = String::new();
        let fd = root
            .open_for_reading(Path::new("/../etc/alias.pem"))
            .unwrap();
        fs::File::from(fd).read_to_string(&mut content).unwrap();
        assert_eq!(content, "inside");
        // A link that escapes lands inside the root, where nothing is: no host file read.
        symlink("/etc/passwd", t.0.join("etc/escape.pem")).unwrap();
        assert!(root.open_for_reading(Path::new("/etc/escape.pem")).is_err());
    }

    #[test]
    fn symlink_loops_are_an_error_not_a_hang() {
        let t = Tree::new("loop");
        symlink("b.pem", t.0.join("etc/a.pem")).unwrap();
        symlink("a.pem", t.0.join("etc/b.pem")).unwrap();
        let err = t.root().canonicalize(Path::new("/etc/a.pem")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ELOOP));
    }
}
