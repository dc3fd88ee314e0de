//! Open trust fds: registered when a matched open returns, so that reads from any thread
//! of the process are attributed to the path; dropped on close, dup over, exec and exit.
//!
//! Every read, close and dup on the host lands here, almost always on an fd nobody
//! tracks: the fd-number pre-filter answers that from the syscall's own argument, before
//! any helper call or hash lookup.

use aya_ebpf::helpers::bpf_get_current_pid_tgid;
use trustdrift_common::{
    AccessKey, FD_FILTER_SLOTS, FdKey, Loss, PREFILTER_SLOTS, PROC_FD_SLOTS, ProcState,
};

use crate::{
    access::add_read,
    atomic,
    emit::{lost, now_ns},
    maps::{COUNTERS, FD_FILTER, FDS, FDS_CAPACITY, PREFILTER, PROCS, counter},
};

#[inline(always)]
fn fd_filter_slot(fd: u64) -> Option<*mut u64> {
    FD_FILTER.get_ptr_mut(fd as u32 & (FD_FILTER_SLOTS as u32 - 1))
}

/// Whether some process may track an fd with this number (false positives allowed,
/// never negatives). Costs one array load: no helper call.
#[inline(always)]
pub fn fd_may_be_tracked(fd: u64) -> bool {
    fd_filter_slot(fd).is_some_and(|slot| atomic::load(slot) != 0)
}

/// Whether any fd is tracked at all.
#[inline(always)]
fn any_tracked() -> bool {
    fds_live().is_some_and(|live| atomic::load(live) != 0)
}

#[inline(always)]
fn current_tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

#[inline(always)]
fn prefilter_slot(tgid: u32) -> Option<*mut u64> {
    PREFILTER.get_ptr_mut(tgid & (PREFILTER_SLOTS as u32 - 1))
}

#[inline(always)]
fn fds_live() -> Option<*mut u64> {
    COUNTERS.get_ptr_mut(counter::FDS_LIVE)
}

/// Whether the process may have tracked fds (false positives allowed, never negatives).
#[inline(always)]
pub fn may_have_fds(tgid: u32) -> bool {
    prefilter_slot(tgid).is_some_and(|slot| atomic::load(slot) != 0)
}

/// Tracks `fd` of `tgid` as an open handle on the path of `key`.
#[inline(always)]
pub fn register(tgid: u32, fd: i32, key: &AccessKey, state: &mut ProcState) {
    let mut free = PROC_FD_SLOTS;
    let mut i = 0;
    while i < PROC_FD_SLOTS {
        if state.fds[i] == fd {
            // Already tracked (a stale handle the kernel closed behind our back): reuse it.
            let _ = FDS.insert(
                FdKey {
                    tgid,
                    fd: fd as u32,
                },
                *key,
                0,
            );
            return;
        }
        if state.fds[i] < 0 && free == PROC_FD_SLOTS {
            free = i;
        }
        i += 1;
    }
    if free >= PROC_FD_SLOTS {
        lost(Loss::ProcFdSlotsFull);
        return;
    }
    if FDS
        .insert(
            FdKey {
                tgid,
                fd: fd as u32,
            },
            *key,
            0,
        )
        .is_err()
    {
        return;
    }
    if let Some(live) = fds_live() {
        if atomic::load(live) >= FDS_CAPACITY.load() {
            // The LRU was full of live handles: this insert evicted one of them.
            lost(Loss::FdTableEvicted);
        } else {
            atomic::add(live, 1);
        }
    }
    state.fds[free] = fd;
    if let Some(slot) = prefilter_slot(tgid) {
        atomic::add(slot, 1);
    }
    if let Some(slot) = fd_filter_slot(fd as u64) {
        atomic::add(slot, 1);
    }
}

/// Drops the tracked fd in slot `i` of the process, if any.
#[inline(always)]
pub fn forget_fd_slot(tgid: u32, state: &mut ProcState, i: usize) {
    if i >= PROC_FD_SLOTS {
        return;
    }
    let fd = state.fds[i];
    if fd < 0 {
        return;
    }
    state.fds[i] = -1;
    let _ = FDS.remove(FdKey {
        tgid,
        fd: fd as u32,
    });
    if let Some(live) = fds_live() {
        atomic::sub(live, 1);
    }
    if let Some(slot) = prefilter_slot(tgid) {
        atomic::sub(slot, 1);
    }
    if let Some(slot) = fd_filter_slot(fd as u64) {
        atomic::sub(slot, 1);
    }
}

/// `close`, `dup2`/`dup3` over a tracked fd, `close_range`: forget fds in `[first, last]`.
#[inline(always)]
pub fn closed(first: u32, last: u32) {
    let maybe = if first == last {
        fd_may_be_tracked(u64::from(first))
    } else {
        any_tracked()
    };
    if !maybe {
        return;
    }
    let tgid = current_tgid();
    if !may_have_fds(tgid) {
        return;
    }
    let Some(state) = PROCS.get_ptr_mut(tgid) else {
        return;
    };
    // SAFETY: a valid map value.
    let state = unsafe { &mut *state };
    let mut i = 0;
    while i < PROC_FD_SLOTS {
        let fd = state.fds[i];
        if fd >= 0 && fd as u32 >= first && fd as u32 <= last {
            forget_fd_slot(tgid, state, i);
        }
        i += 1;
    }
}

/// Exit of `dup`, `dup2`, `dup3` or `fcntl(F_DUPFD*)`: the new fd reads the same file.
#[inline(always)]
pub fn duplicated(old: u64, ret: i64) {
    if ret < 0 || ret as u64 == old || !fd_may_be_tracked(old) {
        return;
    }
    let tgid = current_tgid();
    if !may_have_fds(tgid) {
        return;
    }
    let Some(key) = FDS.get_ptr(FdKey {
        tgid,
        fd: old as u32,
    }) else {
        return;
    };
    // SAFETY: a valid map value, copied before other map operations.
    let key = unsafe { *key };
    if let Some(state) = PROCS.get_ptr_mut(tgid) {
        // SAFETY: a valid map value.
        register(tgid, ret as i32, &key, unsafe { &mut *state });
    }
}

/// Exit of `read`, `pread64`, `readv`, `preadv`, `preadv2` or `getdents64` on `fd`, which
/// read `bytes` (the dispatch passes no failed read, and no fd number
/// [`fd_may_be_tracked`] rules out).
#[inline(always)]
pub fn read_returned(fd: u64, bytes: u64) {
    let tgid = current_tgid();
    if !may_have_fds(tgid) {
        return;
    }
    let Some(key) = FDS.get_ptr(FdKey {
        tgid,
        fd: fd as u32,
    }) else {
        return;
    };
    // SAFETY: a valid map value; copied before any other map operation.
    let key = unsafe { *key };
    add_read(&key, bytes, now_ns());
}
