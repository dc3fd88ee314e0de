//! Reading the kernel's own structures at the offsets the daemon found in BTF: who the
//! current process is, and which file one of its fds is open on. Every read is a
//! fault-safe helper read; an unknown offset gives `None`.

use aya_ebpf::helpers::{bpf_probe_read_kernel, generated::bpf_get_current_task};
use trustdrift_common::KernelOffsets;

use crate::maps::OFFSETS;

/// Reads `*(base + offset)` from kernel memory, or `None` if the layout is unknown.
#[inline(always)]
pub fn field<T>(base: u64, offset: u32) -> Option<T> {
    if base == 0 || offset == KernelOffsets::UNKNOWN {
        return None;
    }
    // SAFETY: fault-safe helper read of kernel memory.
    unsafe { bpf_probe_read_kernel((base + offset as u64) as *const T).ok() }
}

/// The current task (`struct task_struct *`).
#[inline(always)]
pub fn current_task() -> u64 {
    // SAFETY: helper without preconditions.
    unsafe { bpf_get_current_task() }
}

/// Start time and mount namespace of the current process. Zero where unknown: the
/// daemon then falls back to /proc.
#[inline(always)]
pub fn identity() -> (u64, u32) {
    let o = OFFSETS.load();
    let task = current_task();
    let start = field::<u64>(task, o.task_group_leader)
        .and_then(|leader| field::<u64>(leader, o.task_start_boottime))
        .unwrap_or(0);
    let mnt_ns = field::<u64>(task, o.task_nsproxy)
        .and_then(|nsproxy| field::<u64>(nsproxy, o.nsproxy_mnt_ns))
        .and_then(|mnt| field::<u32>(mnt, o.mnt_ns_inum))
        .unwrap_or(0);
    (start, mnt_ns)
}

/// The `struct file *` behind `fd` in the current process: task->files->fdt->fd[fd].
#[inline(always)]
pub fn file_of(fd: i32) -> Option<u64> {
    if fd < 0 {
        return None;
    }
    let o = OFFSETS.load();
    let fdt = field::<u64>(current_task(), o.task_files)
        .and_then(|files| field::<u64>(files, o.files_fdt))?;
    // Another thread may have closed it already: never index past the table.
    if let Some(max) = field::<u32>(fdt, o.fdt_max_fds) {
        if fd as u32 >= max {
            return None;
        }
    }
    field::<u64>(fdt, o.fdt_fd).and_then(|fds| field::<u64>(fds, fd as u32 * 8))
}

/// (inode number, kernel device) of the file behind `fd` in the current process. Only for
/// opens of matched paths (a first access, and each re-open, which says which version a
/// re-read got), never on the unrelated path. (0, 0) when unknown.
#[inline(always)]
pub fn opened_inode(fd: i32) -> (u64, u32) {
    let o = OFFSETS.load();
    let Some(inode) = file_of(fd).and_then(|file| field::<u64>(file, o.file_inode)) else {
        return (0, 0);
    };
    let ino = field::<u64>(inode, o.inode_ino).unwrap_or(0);
    let dev = field::<u64>(inode, o.inode_sb)
        .and_then(|sb| field::<u32>(sb, o.sb_dev))
        .unwrap_or(0);
    (ino, dev)
}
