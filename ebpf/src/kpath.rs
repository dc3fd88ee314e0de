//! The path of an opened file as the kernel knows it: its dentries up to the process's
//! root, crossing mounts, the way `d_path()` builds it. The process's memory says which
//! path it *asked* for; this says which file it *got*, even if it rewrites its buffer
//! after the open, opened relative to a directory it leaves at once, or remounts. Built
//! only for a first access (one per process image and path).
//!
//! The walk runs under `bpf_loop`, one step per call of a callback the verifier checks
//! once, with its state in a per-CPU map: a plain bounded loop over two kinds of step (up
//! a directory, across a mount) is too much for the verifier.

use core::ffi::c_void;

use aya_ebpf::{
    helpers::generated::{bpf_loop, bpf_probe_read_kernel},
    maps::PerCpuArray,
};
use trustdrift_common::{KPATH_CAP, KernelOffsets, kpath_flags};

use crate::{
    kernel::{current_task, field, file_of},
    maps::{OFFSETS, SEED_WALK, WALK, WalkScratch, WalkState},
};

/// Longest directory entry name (`NAME_MAX`).
const NAME_MAX: u32 = 255;
/// Most steps a walk takes (path components and mount crossings).
const MAX_STEPS: u32 = 128;

/// Rebuilds the path of the file behind `fd` of the current process in this CPU's
/// `WALK` scratch. Returns the scratch and the path's start in its buffer (the path ends
/// at `KPATH_CAP`), or `None` when the walk could not even start.
#[inline(always)]
pub fn walk(fd: i32) -> Option<(*mut WalkScratch, u32)> {
    if !OFFSETS.load().can_walk_paths() {
        return None;
    }
    walk_file(&WALK, file_of(fd)?, step_cb)
}

/// As [`walk`], for a file a start-up iterator met (`struct file *`), in the iterators'
/// own scratch: a probe program preempting the iterator on this CPU must not write into
/// its walk. The root is the current process's, the daemon's, as `bpf_d_path` has it.
#[inline(always)]
pub fn walk_seed(file: u64) -> Option<(*mut WalkScratch, u32)> {
    if !OFFSETS.load().can_walk_paths() {
        return None;
    }
    walk_file(&SEED_WALK, file, seed_step_cb)
}

#[inline(always)]
fn walk_file(
    scratch: &'static PerCpuArray<WalkScratch>,
    file: u64,
    step_cb: extern "C" fn(u64, *mut c_void) -> i64,
) -> Option<(*mut WalkScratch, u32)> {
    let o = OFFSETS.load();
    let scratch = scratch.get_ptr_mut(0)?;
    let vfsmnt: u64 = field(file, o.file_path + o.path_mnt)?;
    let dentry: u64 = field(file, o.file_path + o.path_dentry)?;
    let fs: u64 = field(current_task(), o.task_fs)?;
    let state = WalkState {
        dentry,
        vfsmnt,
        mnt: vfsmnt.wrapping_sub(o.mount_mnt as u64),
        root_dentry: field(fs, o.fs_root + o.path_dentry)?,
        root_mnt: field(fs, o.fs_root + o.path_mnt)?,
        pos: KPATH_CAP as u32,
        flags: 0,
    };
    // SAFETY: this CPU's map value, ours until the program returns.
    unsafe { core::ptr::write_volatile(&raw mut (*scratch).state, state) };
    // SAFETY: helper; the callback is a static subprogram and takes no context.
    let steps = unsafe { bpf_loop(MAX_STEPS, step_cb as *mut c_void, core::ptr::null_mut(), 0) };
    // SAFETY: as above.
    let state = unsafe { &mut (*scratch).state };
    let done = kpath_flags::REACHED_ROOT | kpath_flags::UNREACHABLE | kpath_flags::FAILED;
    if steps as u32 >= MAX_STEPS && state.flags & done == 0 {
        state.flags |= kpath_flags::TRUNCATED;
    }
    Some((scratch, state.pos))
}

/// One step of a probe's walk; the state is in this CPU's `WALK` value.
#[inline(never)]
extern "C" fn step_cb(_index: u64, _ctx: *mut c_void) -> i64 {
    step_in(&WALK)
}

/// One step of an iterator's walk; the state is in this CPU's `SEED_WALK` value.
#[inline(never)]
extern "C" fn seed_step_cb(_index: u64, _ctx: *mut c_void) -> i64 {
    step_in(&SEED_WALK)
}

#[inline(always)]
fn step_in(scratch: &'static PerCpuArray<WalkScratch>) -> i64 {
    let Some(scratch) = scratch.get_ptr_mut(0) else {
        return 1;
    };
    let o = OFFSETS.load();
    // SAFETY: this CPU's map value; copied in and out volatile so that nothing of the
    // state stays in a register from one step to the next.
    unsafe {
        let at = &raw mut (*scratch).state;
        let mut state = core::ptr::read_volatile(at);
        let more = step(&mut state, &o, (*scratch).buf.as_mut_ptr());
        core::ptr::write_volatile(at, state);
        if more { 0 } else { 1 }
    }
}

/// One step up, as `prepend_path()` in fs/d_path.c does; `false` when the walk is over.
#[inline(always)]
fn step(w: &mut WalkState, o: &KernelOffsets, buf: *mut u8) -> bool {
    if w.dentry == w.root_dentry && w.vfsmnt == w.root_mnt {
        w.flags |= kpath_flags::REACHED_ROOT;
        return false;
    }
    let Some(mnt_root) = field::<u64>(w.vfsmnt, o.vfsmount_root) else {
        w.flags |= kpath_flags::FAILED;
        return false;
    };
    if w.dentry == mnt_root {
        // At the root of this mount: go on from its mountpoint in the parent mount.
        let parent: u64 = field(w.mnt, o.mount_parent).unwrap_or(0);
        if parent == 0 || parent == w.mnt {
            // The top of the mount tree without meeting the process's root.
            w.flags |= kpath_flags::UNREACHABLE;
            return false;
        }
        w.dentry = field(w.mnt, o.mount_mountpoint).unwrap_or(0);
        w.mnt = parent;
        w.vfsmnt = parent.wrapping_add(o.mount_mnt as u64);
        w.flags |= kpath_flags::CROSSED_MOUNT;
        return w.dentry != 0;
    }
    let parent: u64 = field(w.dentry, o.dentry_parent).unwrap_or(0);
    if parent == 0 || parent == w.dentry {
        // The root of a filesystem that is no mount root here (a detached tree).
        w.flags |= kpath_flags::UNREACHABLE;
        return false;
    }
    let len: u32 = field(w.dentry, o.dentry_name_len).unwrap_or(0);
    let name: u64 = field(w.dentry, o.dentry_name).unwrap_or(0);
    if len == 0 || name == 0 {
        w.flags |= kpath_flags::FAILED;
        return false;
    }
    if len > NAME_MAX || w.pos < len + 1 {
        w.flags |= kpath_flags::TRUNCATED;
        return false;
    }
    w.pos -= len + 1;
    let at = (w.pos as usize) & (KPATH_CAP - 1);
    // SAFETY: `at` < KPATH_CAP and the size <= NAME_MAX, inside the scratch's buffer.
    unsafe {
        *buf.add(at) = b'/';
        // LLVM drops a mask it can prove redundant from the test above, and the verifier
        // (which checked another copy of `len`) then sees an unbounded size: mask a
        // volatile reload.
        let size = core::ptr::read_volatile(&len) & NAME_MAX;
        bpf_probe_read_kernel(buf.add(at + 1).cast(), size, name as *const c_void);
    }
    w.dentry = parent;
    true
}
