//! Process identity and lifecycle: who a process is (tgid + start time, never the pid
//! alone), who owns its table entries, and what happens to its trust fds and its owner's
//! share when it execs or exits.

use aya_ebpf::{
    bindings::BPF_NOEXIST, helpers::bpf_get_current_pid_tgid, programs::TracePointContext,
};
use trustdrift_common::{EventKind, KernelOffsets, Loss, PROC_FD_SLOTS, ProcState};

use crate::{
    atomic,
    emit::{lost, proc_event},
    fds::forget_fd_slot,
    kernel,
    maps::{COUNTERS, OFFSETS, PROCS, counter},
    owners::{self, Table},
};

/// What the current process is to the probe.
pub enum Current {
    /// It has a `PROCS` entry (created now if it is its first trust access).
    Tracked(*mut ProcState),
    /// `PROCS` had no room: its accesses are recorded, its fds are not tracked. The
    /// stand-in carries its identity.
    Untracked(ProcState),
    /// Its owner holds its share of `PROCS` already: nothing of it is recorded.
    OverQuota,
}

/// The state of the current process, created on its first trust access.
#[inline(always)]
pub fn current(tgid: u32) -> Current {
    if let Some(state) = PROCS.get_ptr_mut(tgid) {
        return Current::Tracked(state);
    }
    let (start_ns, mnt_ns) = kernel::identity();
    let (owner_cgroup, owner_uid) = owners::current();
    let fresh = ProcState {
        start_ns,
        mnt_ns,
        exec_seq: 0,
        fds: [-1; PROC_FD_SLOTS],
        owner_cgroup,
        owner_uid,
        paths: 0,
    };
    if !owners::charge(owner_cgroup, owner_uid, Table::Procs) {
        lost(Loss::OwnerQuota);
        return Current::OverQuota;
    }
    // Another thread may have raced us: NOEXIST keeps the first, then we read it back.
    let inserted = PROCS.insert(tgid, fresh, BPF_NOEXIST as u64).is_ok();
    if inserted {
        count(1);
    } else {
        // Either the race (the other thread charged) or a full table: not ours to keep.
        owners::release(owner_cgroup, owner_uid, Table::Procs, 1);
    }
    match PROCS.get_ptr_mut(tgid) {
        Some(state) => Current::Tracked(state),
        None => {
            lost(Loss::ProcTableFull);
            Current::Untracked(fresh)
        }
    }
}

/// Drops every tracked fd of the process.
#[inline(always)]
fn forget_all_fds(tgid: u32, state: &mut ProcState) {
    let mut i = 0;
    while i < PROC_FD_SLOTS {
        forget_fd_slot(tgid, state, i);
        i += 1;
    }
}

/// `sched_process_exec`: the process replaced its image, and its in-memory trust view
/// with it. Later accesses belong to a new exec generation, with a fresh count of paths
/// (the old image's entries leave the kernel when the daemon handles the exec).
#[inline(always)]
pub fn try_exec(_ctx: &TracePointContext) -> Result<(), ()> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let state = PROCS.get_ptr_mut(tgid).ok_or(())?;
    // SAFETY: a valid map value.
    let state = unsafe { &mut *state };
    forget_all_fds(tgid, state);
    proc_event(EventKind::Exec, pid_tgid, state);
    owners::release(
        state.owner_cgroup,
        state.owner_uid,
        Table::Accesses,
        u64::from(state.paths),
    );
    state.paths = 0;
    state.exec_seq = state.exec_seq.wrapping_add(1);
    Ok(())
}

/// `sched_process_exit`: when the whole thread group is gone, drop its state, give its
/// owner's share back, and tell the daemon.
#[inline(always)]
pub fn try_exit(ctx: &TracePointContext) -> Result<(), ()> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let offset = OFFSETS.load().exit_group_dead;
    let group_dead = if offset == KernelOffsets::UNKNOWN {
        // Older kernels lack the field: the leader's exit stands for the process.
        pid_tgid as u32 == tgid
    } else {
        // SAFETY: the offset comes from this tracepoint's format file.
        unsafe { ctx.read_at::<u8>(offset as usize) }.map_err(|_| ())? != 0
    };
    if !group_dead {
        return Ok(());
    }
    let state = PROCS.get_ptr_mut(tgid).ok_or(())?;
    // SAFETY: a valid map value.
    let state = unsafe { &mut *state };
    forget_all_fds(tgid, state);
    proc_event(EventKind::Exit, pid_tgid, state);
    owners::release(
        state.owner_cgroup,
        state.owner_uid,
        Table::Accesses,
        u64::from(state.paths),
    );
    owners::release(state.owner_cgroup, state.owner_uid, Table::Procs, 1);
    if PROCS.remove(tgid).is_ok() {
        count(u64::MAX);
    }
    Ok(())
}

/// Adds `delta` (wrapping: `u64::MAX` is minus one) to the live count of `PROCS`, so the
/// daemon knows its fill without walking it.
#[inline(always)]
fn count(delta: u64) {
    if let Some(live) = COUNTERS.get_ptr_mut(counter::PROCS_LIVE) {
        atomic::add(live, delta);
    }
}
