//! The syscall ABI of the architecture the probe is built for: syscall numbers and where
//! `pt_regs` keeps the arguments. Portable by construction (no CO-RE): both are UAPI.

use aya_ebpf::bindings::pt_regs;

#[cfg(bpf_target_arch = "x86_64")]
pub mod nr {
    pub const READ: i64 = 0;
    pub const OPEN: i64 = 2;
    pub const CLOSE: i64 = 3;
    pub const PREAD64: i64 = 17;
    pub const READV: i64 = 19;
    pub const DUP: i64 = 32;
    pub const DUP2: i64 = 33;
    pub const FCNTL: i64 = 72;
    pub const GETDENTS64: i64 = 217;
    pub const OPENAT: i64 = 257;
    pub const DUP3: i64 = 292;
    pub const PREADV: i64 = 295;
    pub const PREADV2: i64 = 327;
    pub const CLOSE_RANGE: i64 = 436;
    pub const OPENAT2: i64 = 437;
}

#[cfg(bpf_target_arch = "aarch64")]
pub mod nr {
    // The generic table has no open or dup2: they are never dispatched.
    pub const OPEN: i64 = -1000;
    pub const DUP2: i64 = -1002;
    pub const DUP: i64 = 23;
    pub const DUP3: i64 = 24;
    pub const FCNTL: i64 = 25;
    pub const OPENAT: i64 = 56;
    pub const CLOSE: i64 = 57;
    pub const GETDENTS64: i64 = 61;
    pub const READ: i64 = 63;
    pub const READV: i64 = 65;
    pub const PREAD64: i64 = 67;
    pub const PREADV: i64 = 69;
    pub const PREADV2: i64 = 286;
    pub const CLOSE_RANGE: i64 = 436;
    pub const OPENAT2: i64 = 437;
}

/// Syscall argument `n` (0-based), at syscall entry; at exit too for `n` >= 1 (the first
/// may share the return value's register: see [`first_arg_at_exit`]).
///
/// # Safety
/// `regs` must be the `pt_regs` argument of a `tp_btf` syscall tracepoint; the verifier
/// turns these plain loads into fault-safe BTF loads.
#[inline(always)]
#[cfg(bpf_target_arch = "x86_64")]
pub unsafe fn arg(regs: *const pt_regs, n: u32) -> u64 {
    unsafe {
        match n {
            0 => (*regs).rdi,
            1 => (*regs).rsi,
            2 => (*regs).rdx,
            _ => (*regs).r10,
        }
    }
}

/// The first argument as it was at entry, still readable at syscall exit.
///
/// # Safety
/// As for [`arg`].
#[inline(always)]
#[cfg(bpf_target_arch = "x86_64")]
pub unsafe fn first_arg_at_exit(regs: *const pt_regs) -> u64 {
    // rax carries the return value; rdi is left untouched by the syscall.
    unsafe { (*regs).rdi }
}

/// The syscall number, at entry or exit.
///
/// # Safety
/// As for [`arg`].
#[inline(always)]
#[cfg(bpf_target_arch = "x86_64")]
pub unsafe fn syscall_nr(regs: *const pt_regs) -> i64 {
    unsafe { (*regs).orig_rax as i64 }
}

#[inline(always)]
#[cfg(bpf_target_arch = "aarch64")]
pub unsafe fn arg(regs: *const pt_regs, n: u32) -> u64 {
    unsafe { (*regs).regs[(n & 7) as usize] }
}

#[inline(always)]
#[cfg(bpf_target_arch = "aarch64")]
pub unsafe fn first_arg_at_exit(regs: *const pt_regs) -> u64 {
    // x0 is overwritten by the return value; the kernel keeps the original in orig_x0.
    unsafe { (*regs).orig_x0 }
}

#[inline(always)]
#[cfg(bpf_target_arch = "aarch64")]
pub unsafe fn syscall_nr(regs: *const pt_regs) -> i64 {
    unsafe { (*regs).syscallno as i64 }
}
