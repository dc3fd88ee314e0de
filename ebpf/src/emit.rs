//! What leaves the kernel: ring-buffer records and loss counters.

use aya_ebpf::helpers::bpf_get_current_pid_tgid;
use aya_ebpf::helpers::{
    bpf_get_current_comm, bpf_get_current_uid_gid,
    generated::{bpf_get_current_cgroup_id, bpf_ktime_get_boot_ns},
};
use trustdrift_common::{
    AccessKey, COMM_LEN, EventHeader, EventKind, Loss, ProcEvent, ProcState, RereadCause,
    RereadEvent,
};

use crate::maps::{EVENTS, LOSSES};

/// Counts one lost observation on this CPU.
#[inline(always)]
pub fn lost(reason: Loss) {
    if let Some(slot) = LOSSES.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, no concurrent writer.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: helper without preconditions.
    unsafe { bpf_ktime_get_boot_ns() }
}

/// Fills the header shared by all records.
#[inline(always)]
pub fn header(kind: EventKind, pid_tgid: u64, proc: &ProcState, ts_ns: u64) -> EventHeader {
    EventHeader {
        kind: kind as u32,
        tgid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        uid: bpf_get_current_uid_gid() as u32,
        start_ns: proc.start_ns,
        ts_ns,
        // SAFETY: helper without preconditions.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        mnt_ns: proc.mnt_ns,
        exec_seq: proc.exec_seq,
        comm: bpf_get_current_comm().unwrap_or([0; COMM_LEN]),
    }
}

/// Sends an exec or exit record for `proc`.
#[inline(always)]
pub fn proc_event(kind: EventKind, pid_tgid: u64, proc: &ProcState) {
    match EVENTS.reserve::<ProcEvent>(0) {
        Some(mut entry) => {
            entry.write(ProcEvent {
                header: header(kind, pid_tgid, proc, now_ns()),
            });
            entry.submit(0);
        }
        None => lost(Loss::RingbufFull),
    }
}

/// Sends a re-read record for `key`; false when the ring buffer had no room (counted).
#[inline(always)]
pub fn reread(key: &AccessKey, cause: RereadCause, now: u64) -> bool {
    let Some(mut entry) = EVENTS.reserve::<RereadEvent>(0) else {
        lost(Loss::RingbufFull);
        return false;
    };
    // The process as its access key names it: no `PROCS` lookup on this path.
    let identity = ProcState {
        start_ns: key.start_ns,
        mnt_ns: 0,
        exec_seq: key.exec_seq,
        fds: [-1; trustdrift_common::PROC_FD_SLOTS],
        owner_cgroup: 0,
        owner_uid: 0,
        paths: 0,
    };
    entry.write(RereadEvent {
        header: header(
            EventKind::Reread,
            bpf_get_current_pid_tgid(),
            &identity,
            now,
        ),
        key: *key,
        cause: cause as u32,
        _pad: 0,
    });
    entry.submit(0);
    true
}
