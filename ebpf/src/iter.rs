//! The start-up iterators: what processes already running hold, read from the kernel's
//! own task lists in one pass instead of from /proc. `seed_files` (`iter/task_file`)
//! sends the fds open on regular files or directories the trust filter may want;
//! `seed_maps` (`iter/task_vma`) sends, per process, its executable, the TLS libraries it
//! maps, and the regular files it maps that the filter may want.
//!
//! The kernel filter here is the probe's own: its prefix trie, and for suffixes only the
//! quick-reject bitmap of its `FILTER` table (no suffix rules): a superset of what the
//! filter accepts, which the daemon then narrows with the exact rules. What a mapped file
//! turned out to be is remembered, so the libraries every process maps are judged once.
//!
//! Paths are relative to the daemon's root (or to the top of the file's mount tree when
//! that root is out of reach): `bpf_d_path` for an fd's file, which the verifier trusts;
//! a walk of the dentries (`kpath`) for a mapping's, which some kernels do not let
//! `bpf_d_path` take. For a process whose root is elsewhere in the same tree (a chroot)
//! such a path is not what the process names, so its files go unfiltered and the daemon
//! strips the root.
//!
//! aya-ebpf has no iterator macro: the programs are plain functions in `iter/…`
//! sections, and their context is spelled out below as the kernel's BTF has it.

use core::{ffi::c_void, mem::size_of, ptr::read_unaligned};

use aya_ebpf::{
    helpers::{
        bpf_probe_read_kernel_buf,
        generated::{bpf_d_path, bpf_seq_write},
    },
    maps::lpm_trie::Key,
};
use trustdrift_common::{
    FilterTable, KPATH_CAP, KernelOffsets, PREFIX_CAP, QUICK_WORDS, SEED_PATH_CAP, SeedOffsets,
    SeedRecord, ascii_lower_word, kpath_flags, low_bytes_mask, quick_slot, seed_flags, seed_kind,
};

use crate::{
    kernel::{current_task, field},
    kpath,
    maps::{
        FILTER, OFFSETS, PREFIXES, SEED_FILE_CLASS, SEED_OFFSETS, SEED_SCRATCH, SeedScratch,
        TLS_LIBRARIES,
    },
};

/// `struct bpf_iter_meta`.
#[repr(C)]
pub struct IterMeta {
    seq: *mut c_void,
    session_id: u64,
    seq_num: u64,
}

/// `struct bpf_iter__task_file`.
#[repr(C)]
pub struct TaskFileContext {
    meta: *mut IterMeta,
    task: *const u8,
    fd: u32,
    _pad: u32,
    file: *const u8,
}

/// `struct bpf_iter__task_vma`.
#[repr(C)]
pub struct TaskVmaContext {
    meta: *mut IterMeta,
    task: *const u8,
    vma: *const u8,
}

const S_IFMT: u16 = 0o170_000;
const S_IFREG: u16 = 0o100_000;
const S_IFDIR: u16 = 0o040_000;

/// Every fd of every process, once per process (threads sharing the leader's table are
/// skipped by the kernel). The last call has no task and no file.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task_file")]
pub fn seed_files(ctx: *mut TaskFileContext) -> i32 {
    // SAFETY: the kernel passes a `bpf_iter__task_file`.
    let _ = unsafe { try_seed_files(ctx) };
    0
}

/// Every mapping of every process with an address space, in address order.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task_vma")]
pub fn seed_maps(ctx: *mut TaskVmaContext) -> i32 {
    // SAFETY: the kernel passes a `bpf_iter__task_vma`.
    if let Some(wanted) = unsafe { try_seed_maps(ctx) } {
        send_mapped(&wanted);
    }
    0
}

/// A mapped file whose path the filter must see: walked in a call of its own, so that
/// the walk's frames and the judging's never add up past the verifier's 512 bytes.
struct PathWanted {
    seq: *mut c_void,
    record: SeedRecord,
    file: u64,
    /// Its `SEED_FILE_CLASS` key.
    key: Option<[u64; 2]>,
}

#[inline(never)]
fn send_mapped(wanted: &PathWanted) {
    let o = OFFSETS.load();
    let sent = send_walked_path(&o, wanted.seq, wanted.record, wanted.file);
    if sent.is_none() && wanted.record.flags & seed_flags::ROOT_ELSEWHERE == 0 {
        remember(wanted.key, file_class::NOTHING);
    }
}

unsafe fn try_seed_files(ctx: *mut TaskFileContext) -> Option<()> {
    // SAFETY: the context's own fields.
    let (meta, task, fd, file) = unsafe { ((*ctx).meta, (*ctx).task, (*ctx).fd, (*ctx).file) };
    if meta.is_null() || task.is_null() || file.is_null() {
        return None;
    }
    let o = OFFSETS.load();
    let s = SEED_OFFSETS.load();
    let (ino, dev, mode) = inode_of(&o, &s, file as u64)?;
    if mode != S_IFREG && mode != S_IFDIR {
        return None;
    }
    let mut record = record_of(&o, &s, task as u64, seed_kind::FD)?;
    (record.ino, record.dev, record.detail) = (ino, dev, fd);
    // SAFETY: `meta` is the context's; `file` is its trusted file pointer.
    unsafe { send_path(&o, (*meta).seq, record, file) }
}

/// Sends what a mapping says of its process at once; `Some` for a mapped file whose
/// path is wanted.
#[inline(never)]
unsafe fn try_seed_maps(ctx: *mut TaskVmaContext) -> Option<PathWanted> {
    // SAFETY: the context's own fields.
    let (meta, task, vma) = unsafe { ((*ctx).meta, (*ctx).task, (*ctx).vma) };
    if meta.is_null() || task.is_null() || vma.is_null() {
        return None;
    }
    let o = OFFSETS.load();
    let s = SEED_OFFSETS.load();
    if s.vma_file == KernelOffsets::UNKNOWN {
        return None;
    }
    // A direct load from the trusted vma. Null for anonymous mappings. Kernels differ on
    // whether the verifier trusts the result (of two 6.18.44 builds here, one does), so
    // its path is never asked of `bpf_d_path`, which wants a trusted pointer: it is
    // walked (`kpath`).
    // SAFETY: `vm_file` at the offset BTF gave, checked by the verifier.
    let file = unsafe { *(vma.add(s.vma_file as usize) as *const *const u8) };
    if file.is_null() {
        return None;
    }
    // SAFETY: `meta` is the context's.
    let session = unsafe { (*meta).session_id };
    if seen_last(session, task as u64, file as u64) {
        return None;
    }
    // SAFETY: `meta` is the context's.
    let seq = unsafe { (*meta).seq };
    let exe = field::<u64>(task as u64, s.task_mm).and_then(|mm| field::<u64>(mm, s.mm_exe_file));
    let is_exe = exe == Some(file as u64);
    // Processes map the same few libraries: a file already judged is not looked at
    // again, which keeps the cost per process low.
    let key = class_key(&o, file as u64);
    let known = match key {
        Some(key) if !is_exe => SEED_FILE_CLASS.get_ptr(key).map(|c| {
            // SAFETY: a valid map value.
            unsafe { *c }
        }),
        _ => None,
    };
    if known == Some(file_class::NOTHING) && !task_root_elsewhere(&o, task as u64) {
        return None;
    }
    let (ino, dev, mode) = inode_of(&o, &s, file as u64)?;
    if mode != S_IFREG {
        return None;
    }
    let mut record = record_of(&o, &s, task as u64, seed_kind::EXE)?;
    (record.ino, record.dev) = (ino, dev);
    if is_exe {
        write(seq, &record);
        return None;
    }
    let library = match known {
        Some(class) if class >= file_class::TLS_LIBRARY => Some(class - file_class::TLS_LIBRARY),
        Some(_) => None,
        None => tls_library(&o, file as u64),
    };
    if let Some(index) = library {
        remember(key, file_class::TLS_LIBRARY + index);
        record.kind = seed_kind::TLS_LIBRARY;
        record.detail = index;
        write(seq, &record);
        return None;
    }
    record.kind = seed_kind::MAPPED;
    Some(PathWanted {
        seq,
        record,
        file: file as u64,
        key,
    })
}

/// The `SEED_FILE_CLASS` key of a file: what its path is made of.
fn class_key(o: &KernelOffsets, file: u64) -> Option<[u64; 2]> {
    let mnt = field::<u64>(file, o.file_path.wrapping_add(o.path_mnt))?;
    let dentry = field::<u64>(file, o.file_path.wrapping_add(o.path_dentry))?;
    Some([mnt, dentry])
}

/// What `SEED_FILE_CLASS` says of an open file.
mod file_class {
    /// Neither a TLS library nor a path the filter may want (for a process whose root
    /// is not elsewhere).
    pub const NOTHING: u32 = 1;
    /// A TLS library: this plus its index.
    pub const TLS_LIBRARY: u32 = 2;
}

fn remember(key: Option<[u64; 2]>, class: u32) {
    if let Some(key) = key {
        let _ = SEED_FILE_CLASS.insert(key, class, 0);
    }
}

/// `root_elsewhere` of the task this CPU's last mapping belonged to, worked out once per
/// task (its mappings come in a row).
fn task_root_elsewhere(o: &KernelOffsets, task: u64) -> bool {
    let Some(s) = SEED_SCRATCH.get_ptr_mut(0) else {
        return root_elsewhere(o, task);
    };
    // SAFETY: this CPU's value; `seen_last` set `last_task` for this very call.
    unsafe {
        if (*s).elsewhere_task != task || (*s).elsewhere_session != (*s).last_session {
            (*s).elsewhere_task = task;
            (*s).elsewhere_session = (*s).last_session;
            (*s).elsewhere = u64::from(root_elsewhere(o, task));
        }
        (*s).elsewhere != 0
    }
}

/// Whether this mapping's file is the one the last mapping of the same process in the
/// same read had (a library's segments come in a row): handled once. The state is
/// per CPU and the reader may move between CPUs, so a stale state can only make a file
/// be sent twice, never skipped: it is keyed by the read's session.
fn seen_last(session: u64, task: u64, file: u64) -> bool {
    let Some(s) = SEED_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's value; iterator programs run with migration disabled.
    unsafe {
        if (*s).last_session == session && (*s).last_task == task && (*s).last_file == file {
            return true;
        }
        (*s).last_session = session;
        (*s).last_task = task;
        (*s).last_file = file;
    }
    false
}

/// (inode number, kernel device, file type bits) of a file.
fn inode_of(o: &KernelOffsets, s: &SeedOffsets, file: u64) -> Option<(u64, u32, u16)> {
    let inode = field::<u64>(file, o.file_inode)?;
    let mode = field::<u16>(inode, s.inode_mode)?;
    let ino = field::<u64>(inode, o.inode_ino).unwrap_or(0);
    let dev = field::<u64>(inode, o.inode_sb)
        .and_then(|sb| field::<u32>(sb, o.sb_dev))
        .unwrap_or(0);
    Some((ino, dev, mode & S_IFMT))
}

/// A record about `task`'s process, with its tgid, start and root.
fn record_of(o: &KernelOffsets, s: &SeedOffsets, task: u64, kind: u32) -> Option<SeedRecord> {
    let tgid = field::<u32>(task, s.task_tgid)?;
    let start_ns = field::<u64>(task, o.task_group_leader)
        .and_then(|leader| field::<u64>(leader, o.task_start_boottime))
        .unwrap_or(0);
    let flags = if root_elsewhere(o, task) {
        seed_flags::ROOT_ELSEWHERE
    } else {
        0
    };
    Some(SeedRecord {
        kind,
        tgid,
        start_ns,
        flags,
        ..SeedRecord::default()
    })
}

/// (vfsmount, dentry) of a task's root.
fn root_of(o: &KernelOffsets, task: u64) -> Option<(u64, u64)> {
    let fs = field::<u64>(task, o.task_fs)?;
    let mnt = field::<u64>(fs, o.fs_root.wrapping_add(o.path_mnt))?;
    let dentry = field::<u64>(fs, o.fs_root.wrapping_add(o.path_dentry))?;
    Some((mnt, dentry))
}

/// Whether `bpf_d_path` (relative to the reader's root, or to the top of the file's
/// mount tree when that root is out of reach) may name the task's files otherwise than
/// the task does: its root is neither the reader's nor the top of its mount tree.
/// Unknown counts as elsewhere (the daemon then does the filtering).
fn root_elsewhere(o: &KernelOffsets, task: u64) -> bool {
    let Some(root) = root_of(o, task) else {
        return true;
    };
    if Some(root) == root_of(o, current_task()) {
        return false;
    }
    let (mnt, dentry) = root;
    if field::<u64>(mnt, o.vfsmount_root) != Some(dentry) {
        return true;
    }
    // The top mount of a namespace is its own parent.
    let mount = mnt.wrapping_sub(u64::from(o.mount_mnt));
    field::<u64>(mount, o.mount_parent) != Some(mount)
}

/// The index of the TLS library whose name prefix starts the file's name, if one does.
fn tls_library(o: &KernelOffsets, file: u64) -> Option<u32> {
    let dentry = field::<u64>(file, o.file_path.wrapping_add(o.path_dentry))?;
    let len = field::<u32>(dentry, o.dentry_name_len)?;
    let name = field::<u64>(dentry, o.dentry_name)?;
    // Fault-safe: past a short name's end it reads whatever follows, which the masks
    // and the length check ignore.
    let head = field::<[u64; 2]>(name, 0)?;
    let libraries = TLS_LIBRARIES.get(0)?;
    let count = libraries.count as usize;
    let mut i = 0;
    while i < libraries.prefixes.len() {
        if i >= count {
            break;
        }
        if libraries.prefixes[i].matches(head, len) {
            return Some(i as u32);
        }
        i += 1;
    }
    None
}

/// Sends `record` with the path of `file`, unless the filter rules it out.
///
/// # Safety
/// `file` must be a trusted BTF-typed `struct file *` (the verifier checks it).
unsafe fn send_path(
    o: &KernelOffsets,
    seq: *mut c_void,
    record: SeedRecord,
    file: *const u8,
) -> Option<()> {
    if o.file_path == KernelOffsets::UNKNOWN {
        return None;
    }
    let s = SEED_SCRATCH.get_ptr_mut(0)?;
    // &file->f_path: the verifier sees a BTF pointer plus a read-only constant.
    // SAFETY: as the caller promises; the helper writes at most SEED_PATH_CAP bytes.
    let n = unsafe {
        bpf_d_path(
            file.add(o.file_path as usize) as *mut _,
            (*s).path.as_mut_ptr().cast(),
            SEED_PATH_CAP as u32,
        )
    };
    // With its NUL; the mask keeps the verifier's bounds (a full buffer is too long).
    let size = if n <= 0 {
        0
    } else {
        (n as u32) & (SEED_PATH_CAP as u32 - 1)
    };
    send_scratch_path(seq, record, s, size)
}

/// Sends `record` with the path of `file` as its dentries up to the daemon's root name
/// it (what `bpf_d_path` builds, without a deleted file's " (deleted)"), unless the
/// filter rules it out. For any `struct file *`, trusted or not.
fn send_walked_path(
    o: &KernelOffsets,
    seq: *mut c_void,
    record: SeedRecord,
    file: u64,
) -> Option<()> {
    if o.file_path == KernelOffsets::UNKNOWN {
        return None;
    }
    let s = SEED_SCRATCH.get_ptr_mut(0)?;
    let mut size = 0;
    if let Some((walked, start)) = kpath::walk_seed(file) {
        // SAFETY: this CPU's map value.
        let walked = unsafe { &*walked };
        let flags = walked.state.flags;
        // Out of the daemon's reach is what `bpf_d_path` gives too: the path from the
        // top of the file's own mount tree (a container's files, seen from the host).
        let whole = flags & (kpath_flags::REACHED_ROOT | kpath_flags::UNREACHABLE) != 0
            && flags & (kpath_flags::TRUNCATED | kpath_flags::FAILED) == 0;
        let start = (start as usize) & (KPATH_CAP - 1);
        let n = (KPATH_CAP - start) & (KPATH_CAP - 1);
        if whole && n > 0 {
            // SAFETY: this CPU's value, ours until the program returns.
            let path = unsafe { &mut (*s).path };
            // SAFETY: reads `n` < KPATH_CAP bytes of the walk's buffer, which has them.
            let copied =
                unsafe { bpf_probe_read_kernel_buf(walked.buf[start..].as_ptr(), &mut path[..n]) };
            if copied.is_ok() {
                path[n] = 0;
                size = n as u32 + 1;
            }
        }
    }
    send_scratch_path(seq, record, s, size)
}

/// Sends `record` with the path in the scratch (`size` bytes with its NUL; 0: none could
/// be had, said as too long so that the daemon reads this process from /proc), unless
/// the filter rules it out.
fn send_scratch_path(
    seq: *mut c_void,
    mut record: SeedRecord,
    s: *mut SeedScratch,
    size: u32,
) -> Option<()> {
    if size == 0 {
        // Only ENAMETOOLONG (or a walk cut short) is worth saying: the daemon then knows
        // a file was missed.
        record.flags |= seed_flags::PATH_TOO_LONG;
        write(seq, &record);
        return Some(());
    }
    if record.flags & seed_flags::ROOT_ELSEWHERE == 0 && !may_be_trust(s, size as usize - 1) {
        return None;
    }
    record.path_len = size;
    write(seq, &record);
    // SAFETY: `size` bytes of this CPU's path buffer.
    unsafe { bpf_seq_write(seq.cast(), (*s).path.as_ptr().cast(), size) };
    Some(())
}

/// Whether `bitmap` may hold `word` (see `quick_slot`).
#[inline(always)]
fn quick_maybe(bitmap: &[u64; QUICK_WORDS], word: u64) -> bool {
    let (index, bit) = quick_slot(word);
    bitmap[(index as usize) & (QUICK_WORDS - 1)] & bit != 0
}

/// Whether the path in the scratch (`len` bytes, without its NUL) may be one the trust
/// filter accepts: an include prefix starts it, or (no exclusion does and) its tail may
/// be a suffix's. No filter written yet: everything may be.
fn may_be_trust(s: *mut SeedScratch, len: usize) -> bool {
    let Some(filter) = FILTER.get_ptr(0) else {
        return true;
    };
    // SAFETY: a valid map value the daemon replaces whole.
    let f: &FilterTable = unsafe { &*filter };
    if f.head_len == 0 && f.tail_len == 0 {
        return true;
    }
    let base = s as *const u8;
    let path_at = size_of::<u64>();
    if f.head_len != 0 && len >= f.head_len as usize {
        // SAFETY: the first 8 bytes of the path buffer.
        let head = unsafe { read_unaligned(base.add(path_at) as *const u64) };
        if quick_maybe(&f.heads, head & low_bytes_mask(f.head_len)) {
            // The probe's own trie, as for an observed open: an include prefix takes
            // it; an exclusion vetoes the suffixes too (`TrustPaths::matches`).
            match prefix_verdict(s, len) {
                Some(0) => return false,
                Some(_) => return true,
                None => {}
            }
        }
    }
    let tail_len = f.tail_len;
    if tail_len != 0 && tail_len <= 8 && len >= tail_len as usize {
        // The 8 bytes ending where the path ends: from `len` in the value, since the path
        // starts 8 bytes in (zeros before a short path).
        // A volatile read keeps the mask: LLVM would drop it as redundant, and the verifier
        // (which lost track of `len` being positive) needs it.
        // SAFETY: a local.
        let end = unsafe { core::ptr::read_volatile(&len) } & (SEED_PATH_CAP - 1);
        // SAFETY: at most 8 bytes past `end` < SEED_PATH_CAP, inside the value.
        let last = ascii_lower_word(unsafe { read_unaligned(base.add(end) as *const u64) });
        if quick_maybe(&f.tails, last >> ((8 - tail_len) * 8)) {
            return true;
        }
    }
    false
}

/// The value of the longest `PREFIXES` entry that starts the path in the scratch (`len`
/// bytes): include (1) or exclude (0); `None` when none does.
fn prefix_verdict(s: *mut SeedScratch, len: usize) -> Option<u8> {
    let len = if len > PREFIX_CAP { PREFIX_CAP } else { len };
    // SAFETY: this CPU's value; `prefixlen` followed by `path` has the layout of an LPM
    // key, and the kernel reads only the key size of the trie.
    unsafe {
        (*s).prefixlen = (len * 8) as u32;
        let key = &*(&raw const (*s).prefixlen).cast::<Key<[u8; PREFIX_CAP]>>();
        let verdict = PREFIXES.get(key).copied();
        // The tail window of short paths reads these bytes as zeros.
        (*s).prefixlen = 0;
        verdict
    }
}

fn write(seq: *mut c_void, record: &SeedRecord) {
    // SAFETY: a record on the stack, its own size.
    unsafe {
        bpf_seq_write(
            seq.cast(),
            (record as *const SeedRecord).cast(),
            size_of::<SeedRecord>() as u32,
        )
    };
}
