//! Other trustdrift instances on the host: processes that run trustdrift's own code. Their
//! catalog reads are bookkeeping, not a TLS client's trust: two daemons (a test suite, a
//! rollout that overlaps, a second `run` by hand, a daemon in a pod and one on the host)
//! must not list each other as hundreds-of-files readers. The probe already skips this
//! process's own tgid.
//!
//! A peer is told by what it executes, never by its name: `comm` (and argv) are whatever a
//! process chooses, so a process calling itself "trustdrift" is judged like any other. A
//! process is a peer when its executable is
//!
//! - this daemon's very file (same device and inode), or
//! - a byte-identical copy of it (same size, same SHA-256): the same build installed
//!   elsewhere, e.g. the image's binary seen from the host or another container, where
//!   overlayfs gives every container its own device.
//!
//! Not a build id, a version string or a path: a hostile binary can carry any of those,
//! while running byte-identical code means running trustdrift. Another version of
//! trustdrift is therefore not a peer (its reads are listed, as any process's). What no
//! executable identity rules out is foreign code injected into a real trustdrift process
//! (`LD_PRELOAD`, ptrace): a process that maps an executable file other than its own
//! executable and the system's libraries, or anonymous executable memory, is not a peer.
//!
//! The CLI (`trustdrift processes`, `explain`) talks HTTP to the API and opens no trust
//! file, so it has no reads to list; were it to, it is the same binary.

use std::collections::{HashMap, HashSet};

use sha2::{Digest, Sha256};

use crate::{
    ledger::ProcKey,
    process::{
        deadline::{self, Deadline, Limits},
        rootfs,
    },
};

/// An executable as statx's cached attributes describe it (its filesystem is not asked: it
/// may be a FUSE mount that never answers).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct ExeStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, u32),
}

fn stamp_of(fd: &std::os::fd::OwnedFd) -> Option<ExeStamp> {
    use rustix::fs::{AtFlags, StatxFlags};
    let stx = rustix::fs::statx(
        fd,
        "",
        AtFlags::EMPTY_PATH | AtFlags::STATX_DONT_SYNC,
        StatxFlags::INO | StatxFlags::SIZE | StatxFlags::MTIME,
    )
    .ok()?;
    Some(ExeStamp {
        dev: libc::makedev(stx.stx_dev_major, stx.stx_dev_minor),
        ino: stx.stx_ino,
        size: stx.stx_size,
        mtime: (stx.stx_mtime.tv_sec, stx.stx_mtime.tv_nsec),
    })
}

/// SHA-256 of the regular file an `O_PATH` handle names, if it has exactly `size` bytes.
fn digest_of(handle: &std::os::fd::OwnedFd, size: u64) -> Option<[u8; 32]> {
    use std::{io::Read, os::fd::AsRawFd};
    let fd = rustix::fs::open(
        format!("/proc/self/fd/{}", handle.as_raw_fd()).as_str(),
        rustix::fs::OFlags::RDONLY
            | rustix::fs::OFlags::NONBLOCK
            | rustix::fs::OFlags::NOCTTY
            | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .ok()?;
    let mut file = std::fs::File::from(fd);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > size {
            return None;
        }
        hasher.update(&buf[..n]);
    }
    (total == size).then(|| hasher.finalize().into())
}

/// This daemon's executable.
#[derive(Debug)]
struct Own {
    stamp: ExeStamp,
    /// Computed the first time a candidate of the same size needs it.
    digest: Option<[u8; 32]>,
    /// Kept to compute it from.
    handle: Option<std::os::fd::OwnedFd>,
}

/// Whether `maps` (a /proc/<pid>/maps) executes nothing but `exe` and the system's shared
/// libraries: no preloaded or injected code.
fn executes_only_its_own_code(maps: &str, exe: &str) -> bool {
    const LIBRARY_DIRS: &[&str] = &["/lib/", "/lib64/", "/usr/lib/", "/usr/lib64/"];
    maps.lines().all(|line| {
        // address perms offset dev inode, then the path (which may hold spaces).
        let mut rest = line;
        let mut fields = Vec::with_capacity(5);
        for _ in 0..5 {
            rest = rest.trim_start();
            let end = rest.find(' ').unwrap_or(rest.len());
            fields.push(&rest[..end]);
            rest = &rest[end..];
        }
        if !fields[1].contains('x') {
            return true;
        }
        let path = rest.trim();
        path == exe
            || path == "[vdso]"
            || path == "[vsyscall]"
            || (LIBRARY_DIRS.iter().any(|d| path.starts_with(d)) && !path.contains("/../"))
    })
}

/// The cap on remembered executables (each a few dozen bytes).
const MAX_REMEMBERED: usize = 4096;

pub struct Peers {
    /// `None` if /proc/self/exe is unreadable.
    own: Option<Own>,
    known: HashSet<ProcKey>,
    /// Executables already compared with ours, by their cached attributes.
    identical: HashMap<ExeStamp, bool>,
    /// Reads of other processes' executables, which may block for ever.
    io: Deadline,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers")
            .field("own", &self.own)
            .field("known", &self.known.len())
            .finish()
    }
}

impl Default for Peers {
    fn default() -> Self {
        Self::new()
    }
}

impl Peers {
    pub fn new() -> Self {
        Self::running(rootfs::open_process_exe(std::process::id()).ok())
    }

    /// Peers of whatever runs the executable `exe` names (this daemon's, but for tests).
    fn running(exe: Option<std::os::fd::OwnedFd>) -> Self {
        let own = exe.as_ref().and_then(stamp_of).map(|stamp| Own {
            stamp,
            digest: None,
            handle: exe,
        });
        Self {
            own,
            known: HashSet::new(),
            identical: HashMap::new(),
            io: Deadline::new(Limits::default()),
        }
    }

    /// Whether the executable `handle` names (with `stamp`) is ours or a copy of it.
    fn same_code(&mut self, handle: std::os::fd::OwnedFd, stamp: ExeStamp) -> bool {
        let Some(own) = &mut self.own else {
            return false;
        };
        if (stamp.dev, stamp.ino) == (own.stamp.dev, own.stamp.ino) {
            return true;
        }
        if stamp.size != own.stamp.size {
            return false;
        }
        if let Some(&same) = self.identical.get(&stamp) {
            return same;
        }
        if own.digest.is_none() {
            own.digest = own
                .handle
                .take()
                .and_then(|fd| digest_of(&fd, own.stamp.size));
        }
        let Some(ours) = own.digest else {
            return false;
        };
        let size = stamp.size;
        let theirs = self
            .io
            .run(deadline::key(("peer-exe", stamp)), move || {
                digest_of(&handle, size)
            })
            .ok()
            .flatten();
        let same = theirs == Some(ours);
        if self.identical.len() >= MAX_REMEMBERED {
            self.identical.clear();
        }
        self.identical.insert(stamp, same);
        same
    }

    /// Whether `key` runs trustdrift's own code (and is alive to say so).
    pub fn is_peer(&mut self, key: &ProcKey) -> bool {
        if self.known.contains(key) {
            return true;
        }
        let Ok(handle) = rootfs::open_process_exe(key.pid) else {
            return false;
        };
        let Some(stamp) = stamp_of(&handle) else {
            return false;
        };
        let same = self.same_code(handle, stamp)
            && crate::process::procfs::exe_path(key.pid)
                .zip(crate::process::procfs::maps(key.pid))
                .is_some_and(|(exe, maps)| executes_only_its_own_code(&maps, &exe))
            // The pid may already belong to someone else.
            && crate::process::procfs::start_ticks(key.pid).ok() == Some(key.start_ticks);
        if same {
            tracing::info!(
                pid = key.pid,
                "another trustdrift instance reads trust stores: its reads are not judged"
            );
            self.known.insert(*key);
        }
        same
    }

    pub fn exited(&mut self, key: &ProcKey) {
        self.known.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{BufRead, BufReader},
        process::{Command, Stdio},
    };

    use super::*;

    fn key(pid: u32) -> ProcKey {
        ProcKey {
            pid,
            start_ticks: crate::process::procfs::start_ticks(pid).unwrap(),
        }
    }

    /// Runs `exe` with `args` as `argv0` until dropped; returns once it printed a line
    /// (so that it has executed its image).
    struct Running(std::process::Child);

    impl Running {
        fn start(exe: &std::path::Path, argv0: &str, args: &[&str]) -> Self {
            use std::os::unix::process::CommandExt;
            let mut child = Command::new(exe)
                .arg0(argv0)
                .args(args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let mut line = String::new();
            BufReader::new(child.stdout.as_mut().unwrap())
                .read_line(&mut line)
                .unwrap();
            Self(child)
        }
    }

    impl Drop for Running {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn python() -> Option<std::path::PathBuf> {
        let p = std::path::PathBuf::from("/usr/bin/python3");
        p.exists().then_some(p)
    }

    #[test]
    fn a_process_is_not_a_peer_by_its_name() {
        let Some(python) = python() else {
            return;
        };
        let scratch = tempfile::Builder::new()
            .prefix("trustdrift-peers-")
            .tempdir()
            .unwrap();
        let dir = scratch.path();
        // Named trustdrift in comm and argv: still python.
        let link = dir.join("trustdrift");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&python, &link).unwrap();
        let p = Running::start(
            &link,
            "trustdrift",
            &[
                "-c",
                "print('up', flush=True); import sys; sys.stdin.read()",
            ],
        );
        let mut peers = Peers::new();
        assert!(!peers.is_peer(&key(p.0.id())));
    }

    #[test]
    fn the_same_executable_and_a_byte_identical_copy_are_peers_another_file_is_not() {
        let scratch = tempfile::Builder::new()
            .prefix("trustdrift-peers-copy-")
            .tempdir()
            .unwrap();
        let dir = scratch.path();
        // A small executable plays trustdrift's here.
        let own = dir.join("trustdrift");
        std::fs::copy("/bin/true", &own).unwrap();
        let copy = dir.join("copy");
        std::fs::copy(&own, &copy).unwrap();
        let mut altered = std::fs::read(&own).unwrap();
        // One byte of the ELF header's padding: still the same size, runs the same.
        altered[10] ^= 0xff;
        let other = dir.join("other");
        std::fs::write(&other, &altered).unwrap();
        for f in [&copy, &other] {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        // Compared as files, as is_peer does with a live process's executable.
        let open = |p: &std::path::Path| {
            rustix::fs::open(
                p,
                rustix::fs::OFlags::PATH | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )
            .unwrap()
        };
        let mut peers = Peers::running(Some(open(&own)));
        let stamp = |p: &std::path::Path| {
            let fd = rustix::fs::open(
                p,
                rustix::fs::OFlags::PATH | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )
            .unwrap();
            let s = stamp_of(&fd).unwrap();
            (fd, s)
        };
        let (fd, s) = stamp(&own);
        assert!(peers.same_code(fd, s), "its own file");
        let (fd, s) = stamp(&copy);
        assert!(peers.same_code(fd, s), "a byte-identical copy");
        let (fd, s) = stamp(&other);
        assert!(!peers.same_code(fd, s), "same size, other bytes");
        // Remembered, not hashed again.
        assert_eq!(peers.identical.len(), 2);
    }

    #[test]
    fn preloaded_or_injected_code_is_not_a_peers_code() {
        let exe = "/usr/local/bin/trustdrift";
        let clean = "\
55d0c0a00000-55d0c0a40000 r--p 00000000 08:01 1234 /usr/local/bin/trustdrift
55d0c0a40000-55d0c1000000 r-xp 00040000 08:01 1234 /usr/local/bin/trustdrift
7f0000000000-7f0000020000 rw-p 00000000 00:00 0
7f0000100000-7f0000200000 r-xp 00028000 08:01 99 /usr/lib/x86_64-linux-gnu/libc.so.6
7f0000300000-7f0000310000 r-xp 00001000 08:01 98 /lib/x86_64-linux-gnu/libgcc_s.so.1
7ffd00000000-7ffd00002000 r-xp 00000000 00:00 0                          [vdso]
";
        assert!(executes_only_its_own_code(clean, exe));
        let preloaded =
            format!("{clean}7f0000400000-7f0000410000 r-xp 00001000 08:01 7 /tmp/evil.so\n");
        assert!(!executes_only_its_own_code(&preloaded, exe));
        let injected = format!("{clean}7f0000500000-7f0000501000 r-xp 00000000 00:00 0\n");
        assert!(!executes_only_its_own_code(&injected, exe));
        let escaped = format!(
            "{clean}7f0000600000-7f0000601000 r-xp 00000000 08:01 8 /usr/lib/../../tmp/x.so\n"
        );
        assert!(!executes_only_its_own_code(&escaped, exe));
        // A replaced binary still running: both names carry the suffix, spaces and all.
        let deleted =
            "55d0c0a40000-55d0c1000000 r-xp 00040000 08:01 1234 /opt/td/trust drift (deleted)\n";
        assert!(executes_only_its_own_code(
            deleted,
            "/opt/td/trust drift (deleted)"
        ));
        // This very process executes only its own code and the system's libraries.
        let own = std::fs::read_to_string("/proc/self/maps").unwrap();
        let me = std::fs::read_link("/proc/self/exe").unwrap();
        assert!(
            executes_only_its_own_code(&own, me.to_str().unwrap()),
            "{own}"
        );
    }
}
