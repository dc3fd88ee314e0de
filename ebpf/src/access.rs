//! Aggregated accesses: one `ACCESSES` entry per (process image, path). Repeated opens and
//! reads update it in place; only the first open of a path sends a record. A new entry is
//! within the process's and its owner's quotas, or it is not made (and the loss counted).

use core::mem::size_of;

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_probe_read_kernel_buf};
use trustdrift_common::{
    ACCESS_RECORD_CAP, AccessEvent, AccessKey, AccessStats, EventKind, KPATH_CAP, Loss,
    MatchedOpen, PATH_CAP, ProcState, RereadCause, kpath_flags,
};

use crate::{
    atomic,
    emit::{self, header, lost},
    kernel::opened_inode,
    kpath,
    maps::{
        ACCESSES, ANNOUNCE, Announcement, COUNTERS, EVENTS, QUOTAS, REREAD_WATCH, SCRATCH, counter,
    },
    owners::{self, Table},
};

const EEXIST: i32 = 17;

/// An open of the path of `key` succeeded (or, in lean mode, was attempted). `state` is
/// the process's; `tracked`: it is its `PROCS` entry (otherwise a stand-in, when `PROCS`
/// had no room: the access is then recorded without quotas). Returns false when the access
/// could not be recorded.
#[inline(always)]
pub fn opened(
    pid_tgid: u64,
    key: &AccessKey,
    open: &MatchedOpen,
    fd: i32,
    state: &mut ProcState,
    tracked: bool,
    now: u64,
) -> bool {
    let (ino, dev) = opened_inode(fd);
    if let Some(stats) = ACCESSES.get_ptr_mut(key) {
        // SAFETY: a valid map value.
        let stats = unsafe { &mut *stats };
        reopened(stats, ino, dev, now);
        watched(key, RereadCause::Open, now);
        return true;
    }
    // A new (process, path) pair: within the process's quota of paths and its owner's
    // share of the table, or not at all.
    if tracked {
        if state.paths >= QUOTAS.load().paths_per_process {
            lost(Loss::ProcessQuota);
            return false;
        }
        if !owners::charge(state.owner_cgroup, state.owner_uid, Table::Accesses) {
            lost(Loss::OwnerQuota);
            return false;
        }
    }
    let fresh = AccessStats {
        first_open_ns: now,
        last_open_ns: now,
        opens: 1,
        last_ino: ino,
        last_dev: dev,
        ..AccessStats::default()
    };
    let recorded = match ACCESSES.insert(key, fresh, BPF_NOEXIST as u64) {
        Ok(()) => {
            if announce(pid_tgid, key, open, fd, (ino, dev), state, now) {
                count_inserted(1);
                true
            } else {
                // The daemon would never learn of this entry: drop it so the next open
                // announces it again. The loss itself is counted.
                let _ = ACCESSES.remove(key);
                false
            }
        }
        Err(e) if e == -EEXIST => {
            // Another thread of the process announced it first (and charged for it).
            if let Some(stats) = ACCESSES.get_ptr_mut(key) {
                // SAFETY: a valid map value.
                reopened(unsafe { &mut *stats }, ino, dev, now);
            }
            if tracked {
                owners::release(state.owner_cgroup, state.owner_uid, Table::Accesses, 1);
            }
            return true;
        }
        Err(_) => {
            lost(Loss::AccessTableFull);
            false
        }
    };
    if tracked {
        if recorded {
            state.paths += 1;
        } else {
            owners::release(state.owner_cgroup, state.owner_uid, Table::Accesses, 1);
        }
    }
    recorded
}

/// Counts entries the probe added to `ACCESSES` (the daemon counts those it deletes), so
/// the table's fill is known without walking it.
#[inline(always)]
fn count_inserted(n: u64) {
    if let Some(inserted) = COUNTERS.get_ptr_mut(counter::ACCESSES_INSERTED) {
        atomic::add(inserted, n);
    }
}

/// A further open of an aggregated path. Threads racing here may leave the inode of one
/// open with the time of another; both are opens of that path within nanoseconds.
#[inline(always)]
fn reopened(stats: &mut AccessStats, ino: u64, dev: u32, now: u64) {
    stats.last_open_ns = now;
    stats.last_ino = ino;
    stats.last_dev = dev;
    atomic::add(&mut stats.opens, 1);
}

/// Bytes came back from a read (or directory listing) on a tracked fd.
#[inline(always)]
pub fn add_read(key: &AccessKey, bytes: u64, now: u64) {
    let Some(stats) = ACCESSES.get_ptr_mut(key) else {
        return;
    };
    // SAFETY: a valid map value.
    let stats = unsafe { &mut *stats };
    if stats.first_read_ns == 0 {
        stats.first_read_ns = now;
    }
    stats.last_read_ns = now;
    atomic::add(&mut stats.bytes, bytes);
    atomic::add(&mut stats.reads, 1);
    watched(key, RereadCause::Read, now);
}

/// An existing access moved: if the daemon watches it, tell it once. Only re-opens and
/// reads on tracked fds get here, never the untracked common case.
#[inline(always)]
fn watched(key: &AccessKey, cause: RereadCause, now: u64) {
    if REREAD_WATCH.get_ptr(key).is_none() {
        return;
    }
    // Of racing threads, only the one whose delete succeeds sends the record.
    if REREAD_WATCH.remove(key).is_err() {
        return;
    }
    if !emit::reread(key, cause, now) {
        // The ring buffer was full (counted): keep watching, the next access tries again.
        let _ = REREAD_WATCH.insert(key, 1, 0);
    }
}

/// Sends the first-access record: the fixed part, the path re-read from the opener's
/// memory, then the kernel's path of the file the open got, each only as long as it is.
/// The record is built in a per-CPU scratch and copied out, since a reservation must have
/// a size the verifier knows in advance.
#[inline(always)]
fn announce(
    pid_tgid: u64,
    key: &AccessKey,
    open: &MatchedOpen,
    fd: i32,
    (ino, dev): (u64, u32),
    state: &ProcState,
    now: u64,
) -> bool {
    let Some(record) = ANNOUNCE.get_ptr_mut(0) else {
        // A one-entry per-CPU array always has its entry; were it ever missing, the
        // announcement could not be sent, like a full ring buffer.
        lost(Loss::RingbufFull);
        return false;
    };
    // SAFETY: this CPU's scratch, exclusively ours until the program returns.
    let record = unsafe { &mut *record };
    record.event = AccessEvent {
        header: header(EventKind::Access, pid_tgid, state, now),
        key: *key,
        dir_path_hash: open.dir_path_hash,
        open_flags: open.open_flags,
        dirfd: open.dirfd,
        fd,
        match_flags: open.match_flags,
        ino,
        dev,
        path_len: 0,
        kpath_len: 0,
        kpath_flags: 0,
    };
    // The path as the filter saw it: the copy in this CPU's scratch, not the opener's
    // memory again (which it may have rewritten since).
    let len = (open.path_len as usize) & (PATH_CAP - 1);
    let copied = SCRATCH.get_ptr(0).is_some_and(|scratch| {
        // SAFETY: reads `len` bytes of this CPU's scratch, which holds them.
        unsafe {
            bpf_probe_read_kernel_buf((*scratch).path.as_ptr(), &mut record.paths[..len]).is_ok()
        }
    });
    if !copied {
        lost(Loss::PathUnreadable);
        return false;
    }
    record.paths[len] = 0;
    record.event.path_len = len as u32;
    // The file the open got, as the kernel names it (full mode: the fd is known).
    let mut kpath_len = 0usize;
    if let Some((walked, start)) = kpath::walk(fd) {
        // SAFETY: this CPU's map value.
        let walked = unsafe { &*walked };
        let flags = walked.state.flags;
        record.event.kpath_flags = flags;
        if flags & kpath_flags::REACHED_ROOT != 0 && flags & kpath_flags::TRUNCATED == 0 {
            let start = (start as usize) & (KPATH_CAP - 1);
            let n = (KPATH_CAP - start) & (KPATH_CAP - 1);
            let at = (len + 1) & (2 * PATH_CAP - 1);
            if n == 0 {
                // The file is the process's root itself.
                record.paths[at & (2 * PATH_CAP - 1)] = b'/';
                kpath_len = 1;
            } else {
                let dst = &mut record.paths[at..at + KPATH_CAP];
                // SAFETY: reads `n` bytes of this CPU's walk buffer, which has them.
                let copied = unsafe {
                    bpf_probe_read_kernel_buf(walked.buf[start..].as_ptr(), &mut dst[..n])
                };
                if copied.is_ok() {
                    kpath_len = n;
                }
            }
            record.paths[(at + kpath_len) & (2 * (PATH_CAP + KPATH_CAP) - 1)] = 0;
        }
    }
    record.event.kpath_len = kpath_len as u32;
    // The paths and their NULs; bounded for the verifier (the helpers never return more).
    let size = if kpath_len > 0 {
        size_of::<AccessEvent>() + len + 1 + kpath_len + 1
    } else {
        size_of::<AccessEvent>() + len + 1
    }
    .min(ACCESS_RECORD_CAP);
    // SAFETY: `Announcement` starts with the record's bytes, at least ACCESS_RECORD_CAP.
    let bytes: &[u8; ACCESS_RECORD_CAP] =
        unsafe { &*(record as *const Announcement).cast::<[u8; ACCESS_RECORD_CAP]>() };
    if EVENTS.output::<[u8]>(&bytes[..size], 0).is_err() {
        lost(Loss::RingbufFull);
        return false;
    }
    true
}
