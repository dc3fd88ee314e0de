//! Paths as a process sees them: resolved inside the process's own root (its mount
//! namespace and chroot), following symlinks the way the process would, never escaping.
//! This is the one place that opens anything inside another process's root.
//!
//! Every lookup goes through `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)` from an
//! `O_PATH` handle on the root, so an absolute symlink or `..` inside a container lands
//! on the container's own `/`, not the host's. A file is read only after an `O_PATH`
//! handle and `fstat` say it is a regular file (a FIFO, device or socket is never opened
//! for reading), then it is opened `O_NONBLOCK`, checked to be the very inode the handle
//! named, and read up to a cap. Whatever can still block (FUSE, NFS) runs under
//! `process::deadline`.

use std::{
    collections::VecDeque,
    ffi::{OsStr, OsString},
    io,
    os::{fd::OwnedFd, unix::ffi::OsStrExt},
    path::{Component, Path, PathBuf},
};

use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags, openat2, readlinkat, statat};
use thiserror::Error;

use crate::{
    budget::{Budget, Charge},
    stores::identity::FileIdentity,
};

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
    /// mount namespace and root identity see the same files. Cached attributes only: a
    /// network or FUSE filesystem is not asked (it may never answer).
    pub fn identity(&self) -> io::Result<(u64, u64)> {
        cached_identity(&self.fd)
    }

    /// An `O_PATH` handle on `path` inside the root. `no_symlinks`: the path is already
    /// canonical, and a symlink met on the way (swapped in since) is an error, not followed.
    pub fn open_path(&self, path: &Path, no_symlinks: bool) -> io::Result<OwnedFd> {
        let mut how = resolve_flags();
        if no_symlinks {
            how |= ResolveFlags::NO_SYMLINKS;
        }
        Ok(openat2(
            &self.fd,
            path,
            OFlags::PATH | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
            how,
        )?)
    }

    /// Opens the canonical `path` for reading, only if it is still the inode `expect`
    /// named (a swap between the two opens is an error, not a read of something else).
    pub fn open_verified(
        &self,
        path: &Path,
        expect: &FileIdentity,
        directory: bool,
    ) -> io::Result<OwnedFd> {
        let mut flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
        if directory {
            flags |= OFlags::DIRECTORY;
        }
        let fd = openat2(
            &self.fd,
            path,
            flags,
            Mode::empty(),
            resolve_flags() | ResolveFlags::NO_SYMLINKS,
        )?;
        verify(&fd, expect)?;
        Ok(fd)
    }

    /// A small file of this root (a service account's namespace, say), read safely: a
    /// regular file only, at most `cap` bytes.
    pub fn read_small(&self, path: &Path, cap: u64) -> Result<Vec<u8>, SafeReadError> {
        let resolved = self.canonicalize(path)?;
        let handle = self.open_path(&resolved, true)?;
        let st = rustix::fs::fstat(&handle).map_err(io::Error::from)?;
        if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
            return Err(SafeReadError::NotRegular);
        }
        if st.st_size as u64 > cap {
            return Err(SafeReadError::TooLarge(cap));
        }
        let fd = self.open_verified(&resolved, &FileIdentity::of(&st), false)?;
        let (bytes, over) = read_capped(fd, cap)?;
        if over {
            return Err(SafeReadError::TooLarge(cap));
        }
        Ok(bytes)
    }
}

/// Why a safe read gave nothing.
#[derive(Debug, Error)]
pub enum SafeReadError {
    #[error("not a regular file: not read")]
    NotRegular,
    #[error("larger than {0} bytes: not read")]
    TooLarge(u64),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// (device, inode) of an open handle from cached attributes (`AT_STATX_DONT_SYNC`).
pub fn cached_identity(fd: &OwnedFd) -> io::Result<(u64, u64)> {
    let stx = rustix::fs::statx(
        fd,
        "",
        AtFlags::EMPTY_PATH | AtFlags::STATX_DONT_SYNC,
        rustix::fs::StatxFlags::INO,
    )?;
    Ok((
        libc::makedev(stx.stx_dev_major, stx.stx_dev_minor),
        stx.stx_ino,
    ))
}

/// Fails unless `fd` is the inode `expect` names.
fn verify(fd: &OwnedFd, expect: &FileIdentity) -> io::Result<()> {
    let st = rustix::fs::fstat(fd)?;
    if expect.is(st.st_dev, st.st_ino) {
        Ok(())
    } else {
        Err(io::Error::other("replaced while it was being opened"))
    }
}

/// Reads at most `cap` bytes; `true` in the second field if there was more.
fn read_capped(fd: OwnedFd, cap: u64) -> io::Result<(Vec<u8>, bool)> {
    use std::io::Read;
    let mut buf = Vec::new();
    let mut file = std::fs::File::from(fd).take(cap + 1);
    file.read_to_end(&mut buf)?;
    let over = buf.len() as u64 > cap;
    buf.truncate(cap as usize);
    Ok((buf, over))
}

/// A file's bytes, read under a [`Budget`]: their share is given back when dropped.
pub struct ReadBytes {
    bytes: Vec<u8>,
    charge: Charge,
}

impl std::ops::Deref for ReadBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

/// Reads at most `cap` bytes of `fd`, its buffer taken from `budget` as it grows (a read
/// that would go past the budget fails with `ENOBUFS`, to be tried again later); `true`
/// in the second field if there was more than `cap`. The budget is the bytes being read
/// across every job at once: a job left behind on a file that trickles its bytes (a
/// hostile FUSE server) holds its buffer until it ends, and thirty of them must not hold
/// thirty times the largest file.
pub fn read_budgeted(fd: OwnedFd, cap: u64, budget: &Budget) -> io::Result<(ReadBytes, bool)> {
    use std::io::Read;
    const STEP: usize = 64 << 10;
    let limit = cap as usize + 1;
    let mut out = ReadBytes {
        bytes: Vec::new(),
        charge: Charge::none(),
    };
    let mut file = std::fs::File::from(fd).take(limit as u64);
    let mut chunk = vec![0u8; STEP.min(limit)];
    loop {
        let n = match file.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let buf = &mut out.bytes;
        if buf.capacity() - buf.len() < n {
            let want = (buf.capacity() * 2).max(buf.len() + n).min(limit);
            if !budget.try_grow(&mut out.charge, (want - buf.capacity()) as u64) {
                return Err(io::Error::from_raw_os_error(libc::ENOBUFS));
            }
            buf.reserve_exact(want - buf.len());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let over = out.bytes.len() > cap as usize;
    out.bytes.truncate(cap as usize);
    Ok((out, over))
}

/// An `O_PATH` handle on what fd `fd` of process `pid` is open on: the very file it
/// opened, even when no path leads to it any more. The magic link is the kernel's record of
/// what the process holds, not a path the process chose.
pub fn open_process_fd(pid: u32, fd: i32) -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        format!("/proc/{pid}/fd/{fd}").as_str(),
        OFlags::PATH | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// An `O_PATH` handle on the executable process `pid` runs.
pub fn open_process_exe(pid: u32) -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        format!("/proc/{pid}/exe").as_str(),
        OFlags::PATH | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Opens for reading the regular file an `O_PATH` handle names, if it is `expect`.
pub fn reopen_verified(handle: &OwnedFd, expect: &FileIdentity) -> io::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    let st = rustix::fs::fstat(handle)?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
        return Err(io::Error::other("not a regular file"));
    }
    if !expect.is(st.st_dev, st.st_ino) {
        return Err(io::Error::other("not the file that was opened"));
    }
    let fd = rustix::fs::open(
        format!("/proc/self/fd/{}", handle.as_raw_fd()).as_str(),
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    verify(&fd, expect)?;
    Ok(fd)
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
