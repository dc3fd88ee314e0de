//! Keys and values of the probe's tables (BPF maps). Plain `#[repr(C)]` data with its
//! padding spelled out, read back by the daemon byte for byte.

use crate::PROC_FD_SLOTS;

/// Key of the `ACCESSES` map: one entry per (process image, path as written).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccessKey {
    pub tgid: u32,
    /// Bumped at each exec of the process: a new image starts with an empty trust view.
    pub exec_seq: u32,
    /// Process start (see `EventHeader::start_ns`), so a reused pid never merges.
    pub start_ns: u64,
    /// Hash of the path bytes as written (opaque to the daemon).
    pub path_hash: u64,
}

/// Value of the `ACCESSES` map, updated in place by the probe (atomics for the counters).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AccessStats {
    pub first_open_ns: u64,
    pub last_open_ns: u64,
    /// 0 until the first read.
    pub first_read_ns: u64,
    pub last_read_ns: u64,
    /// Bytes returned by reads (and directory entries listed) on the path's fds.
    pub bytes: u64,
    pub opens: u64,
    pub reads: u64,
    /// Inode and device of the file the latest open got (0 when unknown): which version a
    /// re-read took is decided by identity, not by comparing clocks, since a file renamed
    /// over the path in the same millisecond is otherwise indistinguishable.
    pub last_ino: u64,
    pub last_dev: u32,
    pub _pad: u32,
}

/// Key of the `FDS` map: an open file descriptor of a process.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdKey {
    pub tgid: u32,
    pub fd: u32,
}

/// Value of the `PROCS` map: per-process state for processes that touched trust files.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ProcState {
    pub start_ns: u64,
    pub mnt_ns: u32,
    pub exec_seq: u32,
    /// Tracked fds of this process (-1 = free slot), so exec and exit can drop them.
    pub fds: [i32; PROC_FD_SLOTS],
    /// The owner its table entries are charged to: the cgroup and uid it had when it
    /// first touched a trust file (see [`OwnerKey`]).
    pub owner_cgroup: u64,
    pub owner_uid: u32,
    /// Distinct trust paths its current image announced (bounded by
    /// [`OwnerQuotas::paths_per_process`]); its `ACCESSES` entries charged to the owner.
    pub paths: u32,
}

/// A matched open, as the first-access record needs it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct MatchedOpen {
    /// User pointer to the path. It is read once (into the per-CPU scratch) and the
    /// filter, the hash and the announcement all use that one copy: the process may
    /// rewrite its memory meanwhile.
    pub path_ptr: u64,
    pub path_hash: u64,
    /// See `AccessEvent::dir_path_hash`.
    pub dir_path_hash: u64,
    pub open_flags: u32,
    pub dirfd: i32,
    pub match_flags: u32,
    /// Length of the path copied, without its NUL.
    pub path_len: u32,
}

/// Who holds entries of the probe's tables, for the quotas that keep one workload from
/// filling them: a uid (anywhere), a cgroup (a container), or a uid within a cgroup.
pub mod owner_kind {
    /// A uid across the node (uid 0 is exempt: root in many containers is the same uid,
    /// and a cgroup's own quota bounds each of them).
    pub const UID: u32 = 0;
    /// A cgroup (v2): a container, a systemd service or session.
    pub const CGROUP: u32 = 1;
    /// A uid within a cgroup: the finest share.
    pub const CGROUP_UID: u32 = 2;
    /// Number of kinds.
    pub const COUNT: usize = 3;
}

/// Key of the `OWNERS` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OwnerKey {
    /// [`owner_kind`].
    pub kind: u32,
    /// The uid (0 for [`owner_kind::CGROUP`]).
    pub uid: u32,
    /// The cgroup id (0 for [`owner_kind::UID`]).
    pub cgroup: u64,
}

/// Value of the `OWNERS` map: entries an owner holds now. Signed: an owner evicted from the
/// (LRU) map and seen again starts from zero, and the exits of its earlier processes then
/// subtract below it; a negative count is read as zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OwnerUsage {
    /// `PROCS` entries.
    pub procs: i64,
    /// `ACCESSES` entries.
    pub accesses: i64,
}

/// The quotas, per owner kind (indexed by [`owner_kind`]): how many entries of each table
/// one owner may hold. The daemon sets them from the table sizes at load time.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OwnerQuotas {
    pub procs: [i64; owner_kind::COUNT],
    pub accesses: [i64; owner_kind::COUNT],
    /// Distinct trust paths one process image may announce.
    pub paths_per_process: u32,
    pub _pad: u32,
}

impl OwnerQuotas {
    /// No quota at all (the probe's default until the daemon writes its own).
    pub const NONE: OwnerQuotas = OwnerQuotas {
        procs: [i64::MAX; owner_kind::COUNT],
        accesses: [i64::MAX; owner_kind::COUNT],
        paths_per_process: u32::MAX,
        _pad: 0,
    };
}
