//! trustdrift's kernel probe: which process opened and read which trust file, and when.
//!
//! Full mode: one `tp_btf` program on the raw `sys_exit` tracepoint dispatches on the
//! syscall number; everything it needs is there when a syscall returns (the arguments
//! are still in `pt_regs`, the fd or byte count is the return value), and a single hook
//! halves the slow-path cost every hooked syscall pays compared with `sys_enter` plus
//! `sys_exit`. Lean mode: classic open-entry tracepoints only. Two classic tracepoints
//! follow exec and exit. Every syscall on the host passes through `sys_exit`, so it
//! returns after a few loads, without a helper call, unless the syscall is a read-only
//! open (one copy of the path) or names an fd number some process tracks as a trust fd.
#![no_std]
#![no_main]
// Atomic adds on map values: the BPF target has no compare-and-swap, so core's atomics
// are unavailable and the intrinsic is the only way to emit the BPF atomic add.
#![feature(core_intrinsics)]
#![expect(
    internal_features,
    reason = "atomic_xadd is how the BPF atomic add is emitted"
)]

mod access;
mod arch;
mod atomic;
mod emit;
mod fds;
mod iter;
mod kernel;
mod kpath;
mod maps;
mod open;
mod owners;
mod path;
mod process;

use aya_ebpf::{
    EbpfContext,
    bindings::pt_regs,
    macros::{btf_tracepoint, tracepoint},
    programs::{BtfTracePointContext, TracePointContext},
};

use crate::arch::nr;

/// Lean mode: the classic `syscalls:sys_enter_{openat,openat2,open}` tracepoints.
/// Only opens run a program at all; success and bytes read are left to the daemon.
#[tracepoint]
pub fn open_enter(ctx: TracePointContext) -> u32 {
    let (nr, args) = entered_open(&ctx);
    open::entered(nr, args);
    0
}

/// The syscall number and first three arguments of a `sys_enter_open*` record.
#[inline(always)]
fn entered_open(ctx: &TracePointContext) -> (i64, [u64; 3]) {
    // struct syscall_trace_enter: the syscall number at 8, its arguments from 16 on.
    // Direct loads: the verifier allows them inside the record, and each
    // `TracePointContext::read_at` would be a helper call.
    let record = ctx.as_ptr().cast::<u64>();
    // SAFETY: offsets inside the record of a syscall tracepoint, stable since 2.6.
    unsafe {
        (
            *record.add(1) as i32 as i64,
            [*record.add(2), *record.add(3), *record.add(4)],
        )
    }
}

/// The first three arguments of an open, at its exit.
///
/// # Safety
/// `regs` is the `sys_exit` tracepoint's own pt_regs.
#[inline(always)]
unsafe fn open_args_at_exit(regs: *const pt_regs) -> [u64; 3] {
    // SAFETY: the arguments are intact at exit (only the return value register changed,
    // and `first_arg_at_exit` knows where the first one is).
    unsafe {
        [
            arch::first_arg_at_exit(regs),
            arch::arg(regs, 1),
            arch::arg(regs, 2),
        ]
    }
}

/// `sys_exit` (full mode): an open and its fd, a read's byte count, a close.
#[btf_tracepoint(function = "sys_exit")]
// Into the macro's entry point: as a function of its own it would be a bpf-to-bpf call,
// paid by every syscall on the host before the first test.
#[inline(always)]
pub fn sys_exit(ctx: BtfTracePointContext) -> i32 {
    let regs: *const pt_regs = ctx.arg(0);
    let ret: i64 = ctx.arg(1);
    // SAFETY: `regs` is the tracepoint's own pt_regs argument.
    unsafe { try_sys_exit(regs, ret) };
    0
}

/// The dispatch every syscall on the host runs. It stays small on purpose: what it rejects
/// (an fd number nobody tracks, a failed call, a writer's open, a syscall of no interest)
/// returns without a helper call, and everything past that runs out of line, so the
/// common path saves and restores few registers and keeps a small stack frame.
#[inline(always)]
unsafe fn try_sys_exit(regs: *const pt_regs, ret: i64) {
    // SAFETY: loads from the tracepoint's pt_regs.
    let id = unsafe { arch::syscall_nr(regs) };
    match id {
        nr::OPENAT | nr::OPEN | nr::OPENAT2 => {
            // Only a successful open can be read from, and a writer never reads.
            if ret >= 0 {
                // SAFETY: as above.
                let args = unsafe { open_args_at_exit(regs) };
                if open::may_read_by_registers(id, args) {
                    open_returned(id, args[0], args[1], args[2], ret as i32);
                }
            }
        }
        nr::CLOSE => {
            // Whether it succeeded or not, the fd no longer names the tracked file.
            // SAFETY: as above.
            let fd = unsafe { arch::first_arg_at_exit(regs) };
            if fds::fd_may_be_tracked(fd) {
                close_returned(fd as u32, fd as u32);
            }
        }
        nr::READ | nr::PREAD64 | nr::READV | nr::PREADV | nr::PREADV2 | nr::GETDENTS64 => {
            // SAFETY: as above.
            let fd = unsafe { arch::first_arg_at_exit(regs) };
            if ret >= 0 && fds::fd_may_be_tracked(fd) {
                read_returned(fd, ret as u64);
            }
        }
        nr::CLOSE_RANGE | nr::DUP | nr::DUP2 | nr::DUP3 | nr::FCNTL => {
            // SAFETY: as above; arguments other than the first are intact at exit.
            let (first, second) = unsafe { (arch::first_arg_at_exit(regs), arch::arg(regs, 1)) };
            fd_table_changed(id, first, second, ret);
        }
        _ => {}
    }
}

/// A successful open: is it trust material, and if so record it (out of line: see
/// `try_sys_exit`).
#[inline(never)]
fn open_returned(id: i64, a0: u64, a1: u64, a2: u64, fd: i32) {
    open::returned(id, [a0, a1, a2], fd);
}

#[inline(never)]
fn close_returned(first: u32, last: u32) {
    fds::closed(first, last);
}

#[inline(never)]
fn read_returned(fd: u64, bytes: u64) {
    fds::read_returned(fd, bytes);
}

/// `close_range`, `dup`, `dup2`, `dup3`, `fcntl`: rare next to reads and closes.
#[inline(never)]
fn fd_table_changed(id: i64, first: u64, second: u64, ret: i64) {
    match id {
        nr::CLOSE_RANGE if ret == 0 => fds::closed(first as u32, second as u32),
        // A duplicate reads the same open file (Python's listdir(fd), fdopendir(dup(fd))).
        nr::DUP => fds::duplicated(first, ret),
        nr::DUP2 | nr::DUP3 => {
            // The new fd was closed implicitly if it was open.
            if ret >= 0 && first != second {
                fds::closed(second as u32, second as u32);
            }
            fds::duplicated(first, ret);
        }
        nr::FCNTL if second == F_DUPFD || second == F_DUPFD_CLOEXEC => {
            fds::duplicated(first, ret);
        }
        _ => {}
    }
}

const F_DUPFD: u64 = 0;
const F_DUPFD_CLOEXEC: u64 = 1030;

#[tracepoint(category = "sched", name = "sched_process_exec")]
pub fn sched_process_exec(ctx: TracePointContext) -> u32 {
    let _ = process::try_exec(&ctx);
    0
}

#[tracepoint(category = "sched", name = "sched_process_exit")]
pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
    let _ = process::try_exit(&ctx);
    0
}

/// Empty programs on exactly the syscall hooks above: the cost floor `cargo xtask bench
/// overhead` measures trustdrift against (full mode: the tp_btf `sys_exit` hook; lean
/// mode: the classic open tracepoints).
#[tracepoint]
pub fn floor_open_enter(_ctx: TracePointContext) -> u32 {
    0
}

#[btf_tracepoint(function = "sys_exit")]
pub fn floor_sys_exit(_ctx: BtfTracePointContext) -> i32 {
    0
}

/// The floor plus the path copy of every read-only open (`open::copy_only`), on the same
/// hooks: the part of the probe's own work no path filter can skip.
#[tracepoint]
pub fn copy_floor_open_enter(ctx: TracePointContext) -> u32 {
    let (nr, args) = entered_open(&ctx);
    open::copy_only(nr, args);
    0
}

#[btf_tracepoint(function = "sys_exit")]
pub fn copy_floor_sys_exit(ctx: BtfTracePointContext) -> i32 {
    let regs: *const pt_regs = ctx.arg(0);
    let ret: i64 = ctx.arg(1);
    // SAFETY: loads from the tracepoint's own pt_regs, as in `try_sys_exit`.
    let id = unsafe { arch::syscall_nr(regs) };
    if matches!(id, nr::OPENAT | nr::OPEN | nr::OPENAT2) && ret >= 0 {
        // SAFETY: as above.
        open::copy_only(id, unsafe { open_args_at_exit(regs) });
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
