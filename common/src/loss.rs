//! Why an observation could not be kept: every loss is counted, by reason.

use crate::UnknownDiscriminant;

/// Why an observation could not be kept. Index into the per-CPU `LOSSES` array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loss {
    /// The ring buffer had no room for an event.
    RingbufFull = 0,
    /// `ACCESSES` was full: a new (process, path) could not be recorded.
    AccessTableFull = 1,
    /// `FDS` (an LRU) was at capacity: registering an fd evicted a live one.
    FdTableEvicted = 2,
    /// `PROCS` was full: a process's fds could not be tracked.
    ProcTableFull = 3,
    /// A matched path was longer than `PATH_CAP` and was cut.
    PathTruncated = 4,
    /// A process held more than `PROC_FD_SLOTS` trust fds: reads on the extra ones
    /// are not attributed.
    ProcFdSlotsFull = 5,
    /// The path could not be read from user memory (bad pointer or page not present).
    PathUnreadable = 6,
    /// A process image announced more distinct trust paths than
    /// `OwnerQuotas::paths_per_process`: the extra ones are not recorded.
    ProcessQuota = 7,
    /// A uid, a cgroup, or a uid in a cgroup already holds its share of a table: a flood
    /// by one workload is cut there, and everyone else is still observed.
    OwnerQuota = 8,
}

/// Number of [`Loss`] reasons (size of the `LOSSES` array).
pub const LOSS_REASONS: usize = 9;

impl Loss {
    pub const ALL: [Loss; LOSS_REASONS] = [
        Loss::RingbufFull,
        Loss::AccessTableFull,
        Loss::FdTableEvicted,
        Loss::ProcTableFull,
        Loss::PathTruncated,
        Loss::ProcFdSlotsFull,
        Loss::PathUnreadable,
        Loss::ProcessQuota,
        Loss::OwnerQuota,
    ];

    /// Stable name, used as a metric label.
    pub const fn name(self) -> &'static str {
        match self {
            Loss::RingbufFull => "ringbuf_full",
            Loss::AccessTableFull => "access_table_full",
            Loss::FdTableEvicted => "fd_table_evicted",
            Loss::ProcTableFull => "proc_table_full",
            Loss::PathTruncated => "path_truncated",
            Loss::ProcFdSlotsFull => "proc_fd_slots_full",
            Loss::PathUnreadable => "path_unreadable",
            Loss::ProcessQuota => "process_quota",
            Loss::OwnerQuota => "owner_quota",
        }
    }
}

impl TryFrom<u32> for Loss {
    type Error = UnknownDiscriminant;
    fn try_from(value: u32) -> Result<Self, Self::Error> {
        Loss::ALL
            .iter()
            .copied()
            .find(|l| *l as u32 == value)
            .ok_or(UnknownDiscriminant(value))
    }
}
