//! Opens: decide at syscall entry whether the path is trust material (cheapest checks
//! first), follow a match to its exit to learn the fd.

use aya_ebpf::helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user};

use crate::arch::nr;
use trustdrift_common::{AccessKey, FdKey, Loss, PendingOpen, match_flags, prefix_value};

use crate::{
    SELF_TGID, access, atomic,
    emit::{lost, now_ns},
    fds,
    maps::{COUNTERS, FDS, PENDING, counter},
    path::{self, CopyError},
    process,
};

const O_ACCMODE: u64 = 0o3;
const O_PATH: u64 = 0o10000000;
const AT_FDCWD: i32 = -100;

#[inline(always)]
fn pending_count() -> Option<*mut u64> {
    COUNTERS.get_ptr_mut(counter::PENDING)
}

/// Which hooks are attached.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Entry and exit: the fd is learned at exit, reads are followed.
    Full,
    /// Entry only: the open is recorded at entry.
    Lean,
}

/// Entry of an open. `args` are the first three syscall arguments.
#[inline(always)]
pub fn entered(mode: Mode, id: i64, args: [u64; 3]) {
    let (dirfd, path_ptr, open_flags) = match id {
        nr::OPENAT => (args[0] as i32, args[1], args[2]),
        nr::OPEN => (AT_FDCWD, args[0], args[1]),
        // open(O_CREAT|O_WRONLY|O_TRUNC): a writer, so the flag test below drops it.
        nr::CREAT => (AT_FDCWD, args[0], 0o1101),
        nr::OPENAT2 => {
            // The flags live in the caller's struct open_how (its first u64).
            // SAFETY: fault-safe helper read of user memory.
            match unsafe { bpf_probe_read_user(args[2] as *const u64) } {
                Ok(flags) => (args[0] as i32, args[1], flags),
                Err(_) => return,
            }
        }
        _ => return,
    };
    // Trust files are opened to be read: writers and O_PATH handles are never trust reads.
    // Free to test, so tested before anything touches user memory.
    if open_flags & (O_ACCMODE | O_PATH) != 0 {
        return;
    }
    let mut open = PendingOpen {
        path_ptr,
        path_hash: 0,
        dir_path_hash: 0,
        open_flags: open_flags as u32,
        dirfd,
        match_flags: 0,
        _pad: 0,
    };
    match classify(&mut open) {
        Classified::Unrelated => return,
        Classified::Match => {}
        // The path sits in a page not faulted in yet (typical of a fresh exec): the
        // kernel faults it in while opening, so the exit can read it.
        Classified::Unreadable if mode == Mode::Full => {
            open.match_flags = match_flags::RETRY_AT_EXIT
        }
        Classified::Unreadable => {
            lost(Loss::PathUnreadable);
            return;
        }
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    if (pid_tgid >> 32) as u32 == SELF_TGID.load() {
        return;
    }
    if mode == Mode::Lean {
        // No exit hook: record the attempt now; the daemon infers success and size.
        open.match_flags |= match_flags::LEAN;
        record(pid_tgid, &open, -1);
        return;
    }
    if PENDING.insert(pid_tgid, open, 0).is_err() {
        lost(Loss::PendingTableFull);
        return;
    }
    if let Some(count) = pending_count() {
        atomic::add(count, 1);
    }
}

enum Classified {
    Unrelated,
    Match,
    Unreadable,
}

/// Reads the path and runs the filter; on a match fills the hash and match flags.
#[inline(always)]
fn classify(open: &mut PendingOpen) -> Classified {
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
    open.match_flags = how | path.flags();
    Classified::Match
}

/// Exit of any open: if the entry matched, record the access and track the fd.
#[inline(always)]
pub fn returned(ret: i64) {
    let Some(count) = pending_count() else {
        return;
    };
    // Almost always zero: no matched open in flight anywhere on the host.
    if atomic::load(count) == 0 {
        return;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(open) = PENDING.get_ptr(pid_tgid) else {
        return;
    };
    // SAFETY: a valid map value, copied before it is removed.
    let open = unsafe { *open };
    if PENDING.remove(pid_tgid).is_ok() {
        atomic::sub(count, 1);
    }
    if ret < 0 {
        return;
    }
    let mut open = open;
    if open.match_flags & match_flags::RETRY_AT_EXIT != 0 {
        match classify(&mut open) {
            Classified::Match => {}
            Classified::Unrelated => return,
            Classified::Unreadable => {
                lost(Loss::PathUnreadable);
                return;
            }
        }
    }
    record(pid_tgid, &open, ret as i32);
}

#[inline(always)]
fn record(pid_tgid: u64, open: &PendingOpen, fd: i32) {
    let tgid = (pid_tgid >> 32) as u32;
    let now = now_ns();
    match process::current(tgid) {
        Ok(state) => {
            // SAFETY: a valid map value.
            let state = unsafe { &mut *state };
            let key = AccessKey {
                tgid,
                exec_seq: state.exec_seq,
                start_ns: state.start_ns,
                path_hash: open.path_hash,
            };
            if access::opened(pid_tgid, &key, open, fd, state, now) && fd >= 0 {
                fds::register(tgid, fd, &key, state);
            }
        }
        Err(standin) => {
            let key = AccessKey {
                tgid,
                exec_seq: standin.exec_seq,
                start_ns: standin.start_ns,
                path_hash: open.path_hash,
            };
            access::opened(pid_tgid, &key, open, fd, &standin, now);
        }
    }
}
