//! Counters shared across CPUs. The BPF target offers atomic add without compare-and-swap,
//! so only fire-and-forget adds exist here (their result is never used: that would need a
//! newer instruction set than the probe targets).

use core::intrinsics::{AtomicOrdering, atomic_xadd};

/// `*counter += value`, atomically.
#[inline(always)]
pub fn add(counter: *mut u64, value: u64) {
    // SAFETY: callers pass aligned pointers into map values.
    unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, value);
    }
}

/// `*counter -= value`, atomically.
#[inline(always)]
pub fn sub(counter: *mut u64, value: u64) {
    add(counter, value.wrapping_neg());
}

/// A plain load of a counter other CPUs update.
#[inline(always)]
pub fn load(counter: *const u64) -> u64 {
    // SAFETY: callers pass aligned pointers into map values.
    unsafe { core::ptr::read_volatile(counter) }
}

/// A plain load of a signed counter other CPUs update.
#[inline(always)]
pub fn load_signed(counter: *const i64) -> i64 {
    // SAFETY: callers pass aligned pointers into map values.
    unsafe { core::ptr::read_volatile(counter) }
}
