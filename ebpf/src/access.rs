//! Aggregated accesses: one `ACCESSES` entry per (process image, path). Repeated opens and
//! reads update it in place; only the first open of a path sends a record.

use core::mem::size_of;

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_probe_read_user_str_bytes};
use trustdrift_common::{
    ACCESS_RECORD_CAP, AccessEvent, AccessKey, AccessStats, EventKind, Loss, MatchedOpen, ProcState,
};

use crate::{
    atomic,
    emit::{header, lost},
    maps::{ACCESSES, ANNOUNCE, Announcement, EVENTS},
};

const EEXIST: i32 = 17;

/// An open of the path of `key` succeeded (or, in lean mode, was attempted).
/// Returns false when the access could not be recorded.
#[inline(always)]
pub fn opened(
    pid_tgid: u64,
    key: &AccessKey,
    open: &MatchedOpen,
    fd: i32,
    state: &ProcState,
    now: u64,
) -> bool {
    let (ino, dev) = crate::process::opened_inode(fd);
    if let Some(stats) = ACCESSES.get_ptr_mut(key) {
        // SAFETY: a valid map value.
        let stats = unsafe { &mut *stats };
        reopened(stats, ino, dev, now);
        return true;
    }
    let fresh = AccessStats {
        first_open_ns: now,
        last_open_ns: now,
        opens: 1,
        last_ino: ino,
        last_dev: dev,
        ..AccessStats::default()
    };
    match ACCESSES.insert(key, fresh, BPF_NOEXIST as u64) {
        Ok(()) => {
            if !announce(pid_tgid, key, open, fd, (ino, dev), state, now) {
                // The daemon would never learn of this entry: drop it so the next open
                // announces it again. The loss itself is counted.
                let _ = ACCESSES.remove(key);
                return false;
            }
            true
        }
        Err(e) if e == -EEXIST => {
            // Another thread of the process announced it first.
            if let Some(stats) = ACCESSES.get_ptr_mut(key) {
                // SAFETY: a valid map value.
                reopened(unsafe { &mut *stats }, ino, dev, now);
            }
            true
        }
        Err(_) => {
            lost(Loss::AccessTableFull);
            false
        }
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
}

/// Sends the first-access record: the fixed part, then the path re-read from the
/// opener's memory, only as long as it is. The record is built in a per-CPU scratch and
/// copied out, since a reservation must have a size the verifier knows in advance.
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
    };
    // SAFETY: reads at most the buffer's length from the opener's memory.
    let len = match unsafe {
        bpf_probe_read_user_str_bytes(open.path_ptr as *const u8, &mut record.path)
    } {
        Ok(bytes) => bytes.len(),
        Err(_) => {
            record.path[0] = 0;
            0
        }
    };
    record.event.path_len = len as u32;
    // The path and its NUL; bounded for the verifier (the helper never returns more).
    let size = (size_of::<AccessEvent>() + len + 1).min(ACCESS_RECORD_CAP);
    // SAFETY: `Announcement` is plain bytes of exactly ACCESS_RECORD_CAP.
    let bytes: &[u8; ACCESS_RECORD_CAP] =
        unsafe { &*(record as *const Announcement).cast::<[u8; ACCESS_RECORD_CAP]>() };
    if EVENTS.output::<[u8]>(&bytes[..size], 0).is_err() {
        lost(Loss::RingbufFull);
        return false;
    }
    true
}
