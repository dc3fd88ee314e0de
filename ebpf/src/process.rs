//! Process identity and lifecycle: who a process is (tgid + start time, never the pid
//! alone), and what happens to its trust fds when it execs or exits.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel, generated::bpf_get_current_task},
    programs::TracePointContext,
};
use trustdrift_common::{EventKind, KernelOffsets, Loss, PROC_FD_SLOTS, ProcState};

use crate::{
    OFFSETS,
    emit::{lost, proc_event},
    fds::forget_fd_slot,
    maps::PROCS,
};

/// Reads `*(base + offset)` from kernel memory, or `None` if the layout is unknown.
#[inline(always)]
fn kernel_field<T>(base: u64, offset: u32) -> Option<T> {
    if base == 0 || offset == KernelOffsets::UNKNOWN {
        return None;
    }
    // SAFETY: fault-safe helper read of kernel memory.
    unsafe { bpf_probe_read_kernel((base + offset as u64) as *const T).ok() }
}

/// Start time and mount namespace of the current process, from the kernel layout the
/// daemon found in BTF. Zero where unknown: the daemon then falls back to /proc.
#[inline(always)]
fn identity() -> (u64, u32) {
    let offsets = OFFSETS.load();
    // SAFETY: helper without preconditions.
    let task = unsafe { bpf_get_current_task() };
    let start = kernel_field::<u64>(task, offsets.task_group_leader)
        .and_then(|leader| kernel_field::<u64>(leader, offsets.task_start_boottime))
        .unwrap_or(0);
    let mnt_ns = kernel_field::<u64>(task, offsets.task_nsproxy)
        .and_then(|nsproxy| kernel_field::<u64>(nsproxy, offsets.nsproxy_mnt_ns))
        .and_then(|mnt| kernel_field::<u32>(mnt, offsets.mnt_ns_inum))
        .unwrap_or(0);
    (start, mnt_ns)
}

/// (inode number, kernel device) of the file behind `fd` in the current process:
/// task->files->fdt->fd[fd]->f_inode. Only for a first access (one per process and
/// path), so the five reads cost nothing measurable. (0, 0) when unknown.
#[inline(always)]
pub fn opened_inode(fd: i32) -> (u64, u32) {
    if fd < 0 {
        return (0, 0);
    }
    let o = OFFSETS.load();
    // SAFETY: helper without preconditions.
    let task = unsafe { bpf_get_current_task() };
    let inode = kernel_field::<u64>(task, o.task_files)
        .and_then(|files| kernel_field::<u64>(files, o.files_fdt))
        .and_then(|fdt| kernel_field::<u64>(fdt, o.fdt_fd))
        .and_then(|fds| kernel_field::<u64>(fds, fd as u32 * 8))
        .and_then(|file| kernel_field::<u64>(file, o.file_inode));
    let Some(inode) = inode else {
        return (0, 0);
    };
    let ino = kernel_field::<u64>(inode, o.inode_ino).unwrap_or(0);
    let dev = kernel_field::<u64>(inode, o.inode_sb)
        .and_then(|sb| kernel_field::<u32>(sb, o.sb_dev))
        .unwrap_or(0);
    (ino, dev)
}

/// The state of the current process, created on its first trust access. `Err` carries a
/// stand-in when `PROCS` is full: the access is still recorded, its fds are not tracked.
#[inline(always)]
pub fn current(tgid: u32) -> Result<*mut ProcState, ProcState> {
    if let Some(state) = PROCS.get_ptr_mut(tgid) {
        return Ok(state);
    }
    let (start_ns, mnt_ns) = identity();
    let fresh = ProcState {
        start_ns,
        mnt_ns,
        exec_seq: 0,
        fds: [-1; PROC_FD_SLOTS],
    };
    // Another thread may have raced us: NOEXIST keeps the first, then we read it back.
    let _ = PROCS.insert(tgid, fresh, BPF_NOEXIST as u64);
    match PROCS.get_ptr_mut(tgid) {
        Some(state) => Ok(state),
        None => {
            lost(Loss::ProcTableFull);
            Err(fresh)
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
/// with it. Later accesses belong to a new exec generation.
#[inline(always)]
pub fn try_exec(_ctx: &TracePointContext) -> Result<(), ()> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let state = PROCS.get_ptr_mut(tgid).ok_or(())?;
    // SAFETY: a valid map value.
    let state = unsafe { &mut *state };
    forget_all_fds(tgid, state);
    proc_event(EventKind::Exec, pid_tgid, state);
    state.exec_seq = state.exec_seq.wrapping_add(1);
    Ok(())
}

/// `sched_process_exit`: when the whole thread group is gone, drop its state and tell
/// the daemon.
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
    let _ = PROCS.remove(tgid);
    Ok(())
}
