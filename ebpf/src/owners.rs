//! Shares of the probe's tables: no one uid, cgroup, or uid within a cgroup may hold more
//! than its quota of `PROCS` or `ACCESSES` entries, so a flood by one workload (hostile or
//! broken) is cut where it starts, counted as `Loss::OwnerQuota`, and everyone else is
//! still observed. A process is charged to the owner it had at its first trust access;
//! what it holds is given back at its exit (and its paths at its exec).

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_uid_gid, generated::bpf_get_current_cgroup_id},
};
use trustdrift_common::{OwnerKey, OwnerUsage, owner_kind};

use crate::{
    atomic,
    maps::{OWNERS, QUOTAS},
};

/// Which table a charge is for.
#[derive(Clone, Copy)]
pub enum Table {
    Procs,
    Accesses,
}

/// The owner of the current task: (cgroup id, uid).
#[inline(always)]
pub fn current() -> (u64, u32) {
    // SAFETY: helpers without preconditions.
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    (cgroup, bpf_get_current_uid_gid() as u32)
}

#[inline(always)]
fn key(kind: u32, cgroup: u64, uid: u32) -> OwnerKey {
    OwnerKey {
        kind,
        uid: if kind == owner_kind::CGROUP { 0 } else { uid },
        cgroup: if kind == owner_kind::UID { 0 } else { cgroup },
    }
}

/// The usage counter of `table` in the owner's entry, created at zero if missing.
#[inline(always)]
fn counter(kind: u32, cgroup: u64, uid: u32, table: Table) -> Option<*mut i64> {
    let k = key(kind, cgroup, uid);
    let usage = match OWNERS.get_ptr_mut(k) {
        Some(u) => u,
        None => {
            let _ = OWNERS.insert(k, OwnerUsage::default(), BPF_NOEXIST as u64);
            OWNERS.get_ptr_mut(k)?
        }
    };
    // SAFETY: a valid map value.
    Some(unsafe {
        match table {
            Table::Procs => &raw mut (*usage).procs,
            Table::Accesses => &raw mut (*usage).accesses,
        }
    })
}

/// Whether uid 0 is charged as a uid: no (root in many containers is the same uid 0, and
/// each container's cgroup quota bounds it).
#[inline(always)]
fn applies(kind: u32, uid: u32) -> bool {
    !(kind == owner_kind::UID && uid == 0)
}

/// Takes one entry of `table` for the owner (`cgroup`, `uid`); `false` (and nothing
/// taken) when one of its shares is used up.
#[inline(always)]
pub fn charge(cgroup: u64, uid: u32, table: Table) -> bool {
    let quotas = QUOTAS.load();
    let mut counters = [core::ptr::null_mut::<i64>(); owner_kind::COUNT];
    let mut kind = 0;
    while kind < owner_kind::COUNT as u32 {
        if applies(kind, uid) {
            let Some(c) = counter(kind, cgroup, uid, table) else {
                // No room to count: not a reason to blind the owner.
                kind += 1;
                continue;
            };
            let i = (kind as usize).min(owner_kind::COUNT - 1);
            let quota = match table {
                Table::Procs => quotas.procs[i],
                Table::Accesses => quotas.accesses[i],
            };
            if atomic::load_signed(c) >= quota {
                return false;
            }
            counters[i] = c;
        }
        kind += 1;
    }
    for c in counters {
        if !c.is_null() {
            atomic::add(c.cast(), 1);
        }
    }
    true
}

/// Gives `n` entries of `table` back to the owner (`cgroup`, `uid`).
#[inline(always)]
pub fn release(cgroup: u64, uid: u32, table: Table, n: u64) {
    if n == 0 {
        return;
    }
    let mut kind = 0;
    while kind < owner_kind::COUNT as u32 {
        if applies(kind, uid) {
            if let Some(c) = OWNERS.get_ptr_mut(key(kind, cgroup, uid)) {
                // SAFETY: a valid map value.
                let field = unsafe {
                    match table {
                        Table::Procs => &raw mut (*c).procs,
                        Table::Accesses => &raw mut (*c).accesses,
                    }
                };
                atomic::sub(field.cast(), n);
            }
        }
        kind += 1;
    }
}
