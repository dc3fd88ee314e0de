//! How the daemon uses glibc's allocator: tuned for a daemon, and handing back to the kernel
//! what a storm or a start-up left free, including what each long-lived thread's own cache
//! of freed chunks holds (see [`falling_idle`]).

use std::cell::Cell;

/// Hands memory the allocator holds but no longer uses back to the kernel. glibc keeps
/// freed heap for reuse; after the start-up scan (a peak of /proc reads and store parses)
/// or a storm's processes expiring, that is tens of MiB of RSS nobody uses.
pub fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    flush_thread_cache();
    trim();
}

/// Only the trim: what became free since the last one (a quiet daemon's own churn lands
/// anywhere in a heap a storm grew, and faults its pages back in).
pub fn trim() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free memory; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Whether the heap holds much more free memory than a quiet daemon needs: a storm grew
/// it, and the chunks still in use keep it from shrinking, so what this thread caches is
/// scattered through it.
pub fn heap_left_large() -> bool {
    /// Free bytes in the arenas above which the heap is a storm's, not a quiet daemon's.
    const LARGE: usize = 16 << 20;
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: mallinfo2 only reads the allocator's statistics.
        let info = unsafe { libc::mallinfo2() };
        info.fordblks > LARGE
    }
    #[cfg(not(target_env = "gnu"))]
    false
}

thread_local! {
    /// Work this thread did since its cache last went back.
    static WORK: Cell<u64> = const { Cell::new(0) };
}

/// This thread did `n` units of work (records, jobs, connections).
pub fn worked(n: u64) {
    WORK.with(|w| w.set(w.get().saturating_add(n)));
}

/// This thread is about to wait for more work: after at least `worth` units since the
/// last time, its cache of freed chunks goes back to the arena, as the engine's does
/// before a trim. A worker's or the intake's cache pins pages as the engine's does; the
/// cost, a short-lived thread, is paid once per burst, never per job.
pub fn falling_idle(worth: u64) {
    let work = WORK.with(Cell::get);
    if work >= worth.max(1) {
        WORK.with(|w| w.set(0));
        #[cfg(target_env = "gnu")]
        flush_thread_cache();
    }
}

/// glibc's per-thread cache (tcache) keeps up to 7 freed chunks of each small size for
/// the thread that freed them, and `malloc_trim` never looks there. After a storm those
/// are the chunks this thread freed last, scattered through the heap the storm grew, and
/// each pins its page: about 2 MiB of RSS that never went back (`bench storm` measured
/// it; with the cache off, RSS returned to idle). Taking them out of this thread's cache
/// and freeing them on a thread that then exits hands them back to the arena, where the
/// next trim sees them.
#[cfg(target_env = "gnu")]
fn flush_thread_cache() {
    /// glibc's default `tcache_count`, and its largest cached request (64 bins, 16 apart).
    const PER_SIZE: usize = 7;
    const LARGEST: usize = 1032;
    let mut held: Vec<Vec<u8>> = Vec::with_capacity(64 * PER_SIZE);
    for size in (24..=LARGEST).step_by(16) {
        for _ in 0..PER_SIZE {
            held.push(Vec::with_capacity(size));
        }
    }
    let freed = std::thread::Builder::new()
        .name("td-trim".into())
        .spawn(move || drop(held));
    if let Ok(thread) = freed {
        let _ = thread.join();
    }
}

/// A daemon's allocator settings, not a batch program's. Large buffers (a save's, a big
/// response's) are mapped and unmapped rather than carved from the heap: glibc otherwise
/// raises its mmap threshold each time one is freed, after which each stays in the heap.
/// And two arenas, not eight per CPU: every short-lived runtime thread would otherwise
/// leave an arena of its own behind. The soak saw RSS step up by megabytes both ways.
pub fn tune() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes the allocator's parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}
