//! Readers forked from this process. Each one names itself, reads its trust files, reports
//! what it read on a pipe shared by the fleet, then waits: SIGUSR1 makes it read again
//! (as a reload would), SIGUSR2 makes it exit. It dies with this process
//! (PR_SET_PDEATHSIG), and the fleet kills and reaps every reader still alive when it is
//! dropped.

use std::{
    collections::BTreeSet,
    ffi::{CStr, CString, c_char},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use anyhow::{Result, bail};
use sha2::{Digest, Sha256};

/// pid, seq, path index, errno, SHA-256: below PIPE_BUF, so every write is atomic and
/// records of different readers never interleave.
const RECORD: usize = 48;

/// What a reader read.
#[derive(Clone, Debug)]
pub struct Reply {
    pub pid: u32,
    /// 0 for the first read, one more per re-read.
    pub seq: u32,
    /// Which of the reader's paths.
    pub index: u32,
    /// The SHA-256 of the bytes read, or the errno of the failed open or read.
    pub outcome: Result<[u8; 32], i32>,
}

pub struct Fleet {
    reply_r: OwnedFd,
    reply_w: OwnedFd,
    partial: Vec<u8>,
    /// Forked and not yet reaped.
    live: BTreeSet<u32>,
    /// Told to exit, not yet reaped.
    dismissed: BTreeSet<u32>,
}

fn os_error(what: &str) -> anyhow::Error {
    anyhow::anyhow!("{what}: {}", std::io::Error::last_os_error())
}

impl Fleet {
    pub fn new() -> Result<Self> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two fds into the array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(os_error("creating the readers' reply pipe"));
        }
        // SAFETY: both fds were just created and are owned by nobody else.
        let (reply_r, reply_w) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fcntl on fds we own. Only the read end is non-blocking: readers block
        // when the pipe is full rather than lose a report. A larger pipe makes that rare;
        // failing to enlarge it is harmless.
        unsafe {
            let flags = libc::fcntl(reply_r.as_raw_fd(), libc::F_GETFL);
            if libc::fcntl(reply_r.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) != 0 {
                return Err(os_error("making the reply pipe non-blocking"));
            }
            libc::fcntl(reply_r.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20);
        }
        Ok(Self {
            reply_r,
            reply_w,
            partial: Vec::new(),
            live: BTreeSet::new(),
            dismissed: BTreeSet::new(),
        })
    }

    /// Forks a reader called `name` (its comm, at most 15 bytes) that reads `paths`.
    pub fn spawn(&mut self, name: &CStr, paths: &[CString]) -> Result<u32> {
        // Everything the child touches is prepared before the fork: it must not allocate.
        let ptrs: Vec<*const c_char> = paths.iter().map(|p| p.as_ptr()).collect();
        let reply_fd = self.reply_w.as_raw_fd();
        // SAFETY: sigset operations on local sets; fork in a single-threaded process; the
        // child runs only async-signal-safe calls and never returns.
        let pid = unsafe {
            let parent = libc::getpid();
            let mut waited: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut waited);
            libc::sigaddset(&mut waited, libc::SIGUSR1);
            libc::sigaddset(&mut waited, libc::SIGUSR2);
            // Blocked across the fork, so that a signal sent the moment the child exists
            // waits for its sigwaitinfo instead of killing it (their default action).
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::pthread_sigmask(libc::SIG_BLOCK, &waited, &mut old);
            let pid = libc::fork();
            if pid == 0 {
                reader(name, &ptrs, reply_fd, parent, &waited);
            }
            let err = std::io::Error::last_os_error();
            libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
            if pid < 0 {
                bail!("forking a reader: {err}");
            }
            pid as u32
        };
        self.live.insert(pid);
        Ok(pid)
    }

    /// Every report that arrived since the last call.
    pub fn replies(&mut self) -> Result<Vec<Reply>> {
        let mut buf = [0u8; 64 * 1024];
        loop {
            // SAFETY: reading into a buffer we own, within its length.
            let n =
                unsafe { libc::read(self.reply_r.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 {
                self.partial.extend_from_slice(&buf[..n as usize]);
                continue;
            }
            if n == 0 {
                break;
            }
            match crate::harness::errno() {
                libc::EAGAIN => break,
                libc::EINTR => continue,
                _ => return Err(os_error("reading the readers' reports")),
            }
        }
        let whole = self.partial.len() / RECORD * RECORD;
        let replies = self.partial[..whole]
            .chunks_exact(RECORD)
            .map(|r| {
                let word = |i: usize| u32::from_ne_bytes([r[i], r[i + 1], r[i + 2], r[i + 3]]);
                let errno = word(12) as i32;
                let mut sha = [0u8; 32];
                sha.copy_from_slice(&r[16..48]);
                Reply {
                    pid: word(0),
                    seq: word(4),
                    index: word(8),
                    outcome: if errno == 0 { Ok(sha) } else { Err(errno) },
                }
            })
            .collect();
        self.partial.drain(..whole);
        Ok(replies)
    }

    /// Makes `pid` read its files again.
    pub fn reread(&self, pid: u32) -> Result<()> {
        self.signal(pid, libc::SIGUSR1)
    }

    /// Makes `pid` exit; [`Fleet::reap`] collects it.
    pub fn dismiss(&mut self, pid: u32) -> Result<()> {
        self.signal(pid, libc::SIGUSR2)?;
        self.dismissed.insert(pid);
        Ok(())
    }

    fn signal(&self, pid: u32, sig: i32) -> Result<()> {
        if !self.live.contains(&pid) {
            bail!("reader {pid} is not alive");
        }
        // SAFETY: a child of ours not yet reaped, so the pid is still its.
        if unsafe { libc::kill(pid as i32, sig) } != 0 {
            return Err(os_error(&format!("signalling reader {pid}")));
        }
        Ok(())
    }

    /// Reaps the dismissed readers that have exited; returns their pids.
    pub fn reap(&mut self) -> Vec<u32> {
        let gone: Vec<u32> = self
            .dismissed
            .iter()
            .copied()
            .filter(|pid| {
                // SAFETY: waiting for a child of ours, without blocking.
                let r = unsafe { libc::waitpid(*pid as i32, std::ptr::null_mut(), libc::WNOHANG) };
                r == *pid as i32
            })
            .collect();
        for pid in &gone {
            self.dismissed.remove(pid);
            self.live.remove(pid);
        }
        gone
    }

    /// Readers that died without being dismissed (each with its wait status); reaped.
    pub fn casualties(&mut self) -> Vec<(u32, i32)> {
        let dead: Vec<(u32, i32)> = self
            .live
            .iter()
            .filter(|pid| !self.dismissed.contains(pid))
            .filter_map(|pid| {
                let mut status = 0;
                // SAFETY: waiting for a child of ours, without blocking.
                let r = unsafe { libc::waitpid(*pid as i32, &mut status, libc::WNOHANG) };
                (r == *pid as i32).then_some((*pid, status))
            })
            .collect();
        for (pid, _) in &dead {
            self.live.remove(pid);
        }
        dead
    }

    pub fn is_alive(&self, pid: u32) -> bool {
        self.live.contains(&pid) && !self.dismissed.contains(&pid)
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        // All killed first, then all reaped: 10,000 readers go in one pass.
        for pid in &self.live {
            // SAFETY: children of ours, not yet reaped.
            unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
        }
        for pid in &self.live {
            // SAFETY: waiting for a child of ours that was just killed.
            unsafe { libc::waitpid(*pid as i32, std::ptr::null_mut(), 0) };
        }
    }
}

/// In a freshly forked child: dies with the parent, default handling of SIGINT and
/// SIGTERM (the parent's handlers only set a flag in its own memory), named `name`, and
/// only stdio (on /dev/null) and `keep` (as fd 3) open.
///
/// # Safety
/// Only between fork and `_exit` in a child of a single-threaded process.
pub(crate) unsafe fn child_setup(name: &CStr, keep: i32, parent: libc::pid_t) {
    // SAFETY: async-signal-safe calls on this process only.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        if libc::getppid() != parent {
            libc::_exit(1);
        }
        libc::signal(libc::SIGINT, libc::SIG_DFL);
        libc::signal(libc::SIGTERM, libc::SIG_DFL);
        libc::prctl(libc::PR_SET_NAME, name.as_ptr());
        if keep != 3 {
            libc::dup2(keep, 3);
        }
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            for fd in 0..3 {
                libc::dup2(null, fd);
            }
        }
        // The parent's other fds (sockets, the daemon's log, other fleets' pipes) would
        // keep them open as long as the child lives.
        libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, 0u32);
    }
}

fn child_errno() -> i32 {
    // SAFETY: the calling thread's errno.
    unsafe { *libc::__errno_location() }
}

/// The reader's whole life.
///
/// # Safety
/// Only in a forked child; `paths` point to NUL-terminated strings.
unsafe fn reader(
    name: &CStr,
    paths: &[*const c_char],
    reply_fd: i32,
    parent: libc::pid_t,
    waited: &libc::sigset_t,
) -> ! {
    // SAFETY: in a forked child, async-signal-safe calls only, on memory it owns.
    unsafe {
        child_setup(name, reply_fd, parent);
        let pid = libc::getpid() as u32;
        let mut seq = 0u32;
        loop {
            for (i, path) in paths.iter().enumerate() {
                let (errno, sha) = match read_and_hash(*path) {
                    Ok(sha) => (0, sha),
                    Err(e) => (e, [0u8; 32]),
                };
                let mut rec = [0u8; RECORD];
                rec[0..4].copy_from_slice(&pid.to_ne_bytes());
                rec[4..8].copy_from_slice(&seq.to_ne_bytes());
                rec[8..12].copy_from_slice(&(i as u32).to_ne_bytes());
                rec[12..16].copy_from_slice(&errno.to_ne_bytes());
                rec[16..48].copy_from_slice(&sha);
                while libc::write(3, rec.as_ptr().cast(), RECORD) < 0
                    && child_errno() == libc::EINTR
                {}
            }
            loop {
                match libc::sigwaitinfo(waited, std::ptr::null_mut()) {
                    libc::SIGUSR2 => libc::_exit(0),
                    libc::SIGUSR1 => break,
                    _ => {}
                }
            }
            seq = seq.wrapping_add(1);
        }
    }
}

/// Opens, reads to the end and closes `path`: the SHA-256 of what it read, or the errno.
///
/// # Safety
/// `path` points to a NUL-terminated string.
unsafe fn read_and_hash(path: *const c_char) -> Result<[u8; 32], i32> {
    // SAFETY: plain syscalls on a buffer we own.
    unsafe {
        let fd = libc::open(path, libc::O_RDONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(child_errno());
        }
        let mut hasher = Sha256::new();
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
            if n == 0 {
                break;
            }
            if n < 0 {
                let e = child_errno();
                if e == libc::EINTR {
                    continue;
                }
                libc::close(fd);
                return Err(e);
            }
            hasher.update(&buf[..n as usize]);
        }
        libc::close(fd);
        Ok(hasher.finalize().into())
    }
}

/// Lowercase hex, as the API writes SHA-256 sums.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SHA-256 of `data` in lowercase hex, as the readers report what they read.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}
