//! Opens: decide whether the path is trust material (cheapest checks first) and record a
//! match. Full mode looks at an open when it returns (one `sys_exit` hook serves opens,
//! reads and closes, and the fd is known); lean mode when it enters (the classic open
//! tracepoints only), without an fd.

use aya_ebpf::helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user};

use crate::arch::nr;
use trustdrift_common::{AccessKey, FdKey, Loss, MatchedOpen, match_flags, prefix_value};

use crate::{
    access,
    emit::{lost, now_ns},
    fds,
    maps::{FDS, SELF_TGID},
    path::{self, CopyError},
    process::{self, Current},
};

const O_ACCMODE: u64 = 0o3;
const O_PATH: u64 = 0o10000000;
const AT_FDCWD: i32 = -100;

/// Whether the flags make the open a possible trust read: not a writer, not an `O_PATH`
/// handle.
#[inline(always)]
fn may_read(open_flags: u64) -> bool {
    open_flags & (O_ACCMODE | O_PATH) == 0
}

/// Whether an open may read, judged from its registers alone: `false` only when the flags
/// say it writes or is an `O_PATH` handle. openat2's flags are in user memory, so it is
/// always a maybe; `describe` reads them.
#[inline(always)]
pub fn may_read_by_registers(id: i64, args: [u64; 3]) -> bool {
    match id {
        nr::OPENAT => may_read(args[2]),
        nr::OPEN => may_read(args[1]),
        _ => true,
    }
}

/// The dirfd, path pointer and flags of an open syscall, from its first three arguments;
/// `None` for a writer or an `O_PATH` handle (never trust reads), or an unreadable
/// `open_how`.
#[inline(always)]
fn describe(id: i64, args: [u64; 3]) -> Option<MatchedOpen> {
    let (dirfd, path_ptr, open_flags) = match id {
        nr::OPENAT => (args[0] as i32, args[1], args[2]),
        nr::OPEN => (AT_FDCWD, args[0], args[1]),
        nr::OPENAT2 => {
            // The flags live in the caller's struct open_how (its first u64).
            // SAFETY: fault-safe helper read of user memory.
            let flags = unsafe { bpf_probe_read_user(args[2] as *const u64) }.ok()?;
            (args[0] as i32, args[1], flags)
        }
        // creat(2) is open(O_CREAT|O_WRONLY|O_TRUNC): a writer.
        _ => return None,
    };
    // Free to test, so tested before anything touches user memory.
    if !may_read(open_flags) {
        return None;
    }
    Some(MatchedOpen {
        path_ptr,
        path_hash: 0,
        dir_path_hash: 0,
        open_flags: open_flags as u32,
        dirfd,
        match_flags: 0,
        path_len: 0,
    })
}

/// Full mode: an open returned `fd` (only a successful one can be read from, so the
/// dispatch passes no other).
#[inline(always)]
pub fn returned(id: i64, args: [u64; 3], fd: i32) {
    let Some(mut open) = describe(id, args) else {
        return;
    };
    // The kernel has just read the path, so its page is present.
    match classify(&mut open) {
        Classified::Unrelated => return,
        Classified::Match => {}
        Classified::Unreadable => {
            lost(Loss::PathUnreadable);
            return;
        }
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    if (pid_tgid >> 32) as u32 == SELF_TGID.load() {
        return;
    }
    record(pid_tgid, &open, fd);
}

/// Lean mode: an open entered. Without an exit hook the attempt is recorded now; the
/// daemon infers success and size.
#[inline(always)]
pub fn entered(id: i64, args: [u64; 3]) {
    let Some(mut open) = describe(id, args) else {
        return;
    };
    match classify(&mut open) {
        Classified::Unrelated => return,
        Classified::Match => {}
        // The path sits in a page not faulted in yet (typical of a fresh exec).
        Classified::Unreadable => {
            lost(Loss::PathUnreadable);
            return;
        }
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    if (pid_tgid >> 32) as u32 == SELF_TGID.load() {
        return;
    }
    open.match_flags |= match_flags::LEAN;
    record(pid_tgid, &open, -1);
}

/// The copy floor (benchmarks only): what any path filter must pay on a read-only open,
/// copying the path out of user memory, and nothing after it. The overhead bench
/// subtracts it from the probe to tell that copy from the rest of the probe's own work.
#[inline(always)]
pub fn copy_only(id: i64, args: [u64; 3]) {
    if let Some(open) = describe(id, args) {
        let _ = path::copy_from_user(open.path_ptr as *const u8);
    }
}

enum Classified {
    Unrelated,
    Match,
    Unreadable,
}

/// Reads the path and runs the filter; on a match fills the hash and match flags.
#[inline(always)]
fn classify(open: &mut MatchedOpen) -> Classified {
    let path = match path::copy_from_user(open.path_ptr as *const u8) {
        Ok(path) => path,
        Err(CopyError::NotReady) => return Classified::Unrelated,
        Err(CopyError::Unreadable) => return Classified::Unreadable,
    };
    let mut how = 0;
    if path.is_absolute() {
        match path.prefix_verdict() {
            Some(prefix_value::EXCLUDE) => return Classified::Unrelated,
            Some(_) => how |= match_flags::PREFIX,
            None => {}
        }
    } else if open.dirfd != AT_FDCWD
        && let tgid = (bpf_get_current_pid_tgid() >> 32) as u32
        && fds::may_have_fds(tgid)
        && let Some(dir) = FDS.get_ptr(FdKey {
            tgid,
            fd: open.dirfd as u32,
        })
    {
        how |= match_flags::TRACKED_DIRFD;
        // SAFETY: a valid map value.
        open.dir_path_hash = unsafe { (*dir).path_hash };
    }
    if how == 0 && !path.truncated && path.matches_suffix() {
        how |= match_flags::SUFFIX;
    }
    if how == 0 {
        return Classified::Unrelated;
    }
    if path.truncated {
        lost(Loss::PathTruncated);
    }
    open.path_hash = path.hash();
    open.path_len = path.len as u32;
    open.match_flags = how | path.flags();
    Classified::Match
}

#[inline(always)]
fn record(pid_tgid: u64, open: &MatchedOpen, fd: i32) {
    let tgid = (pid_tgid >> 32) as u32;
    let now = now_ns();
    match process::current(tgid) {
        Current::Tracked(state) => {
            // SAFETY: a valid map value.
            let state = unsafe { &mut *state };
            let key = AccessKey {
                tgid,
                exec_seq: state.exec_seq,
                start_ns: state.start_ns,
                path_hash: open.path_hash,
            };
            if access::opened(pid_tgid, &key, open, fd, state, true, now) && fd >= 0 {
                fds::register(tgid, fd, &key, state);
            }
        }
        Current::Untracked(mut standin) => {
            let key = AccessKey {
                tgid,
                exec_seq: standin.exec_seq,
                start_ns: standin.start_ns,
                path_hash: open.path_hash,
            };
            access::opened(pid_tgid, &key, open, fd, &mut standin, false, now);
        }
        // Counted when it was refused.
        Current::OverQuota => {}
    }
}
