//! The probe's maps as the daemon names them, and their default sizes: defined once here,
//! for the probe (its `#[map]` statics carry these very names) and for the daemon (which
//! takes, pins and resizes them by name).

/// Map names, as the probe's statics are named.
pub mod name {
    pub const EVENTS: &str = "EVENTS";
    pub const LOSSES: &str = "LOSSES";
    pub const PREFIXES: &str = "PREFIXES";
    pub const FILTER: &str = "FILTER";
    pub const ACCESSES: &str = "ACCESSES";
    pub const FDS: &str = "FDS";
    pub const PROCS: &str = "PROCS";
    pub const PREFILTER: &str = "PREFILTER";
    pub const COUNTERS: &str = "COUNTERS";
    pub const SCRATCH: &str = "SCRATCH";
    pub const ANNOUNCE: &str = "ANNOUNCE";
    pub const OWNERS: &str = "OWNERS";
    pub const WALK: &str = "WALK";
    pub const NODE_KEY: &str = "NODE_KEY";
    pub const FD_FILTER: &str = "FD_FILTER";
    pub const REREAD_WATCH: &str = "REREAD_WATCH";

    /// Every map: all of them are pinned together.
    pub const ALL: [&str; 16] = [
        EVENTS,
        LOSSES,
        PREFIXES,
        FILTER,
        ACCESSES,
        FDS,
        PROCS,
        PREFILTER,
        COUNTERS,
        SCRATCH,
        ANNOUNCE,
        OWNERS,
        WALK,
        NODE_KEY,
        FD_FILTER,
        REREAD_WATCH,
    ];
}

/// Default sizes of the bounded maps (`max_entries`); the daemon may resize them at load.
pub mod capacity {
    /// (process image, path) pairs the probe aggregates.
    pub const ACCESSES: u32 = 65536;
    /// Open trust fds (an LRU).
    pub const FDS: u32 = 16384;
    /// Processes that touched trust files.
    pub const PROCS: u32 = 16384;
    /// Bytes of the ring buffer.
    pub const RING_BUFFER_BYTES: u32 = 1 << 20;
    /// Owners (uids, cgroups) whose share of the tables is counted (an LRU).
    pub const OWNERS: u32 = 16384;
    /// Trust prefixes the kernel filter holds.
    pub const PREFIXES: u32 = 256;
    /// Accesses the daemon may watch for a re-read at once (`REREAD_WATCH`).
    pub const REREAD_WATCH: u32 = 4096;
}

/// Slots of the `COUNTERS` array. The probe adds to its own slots atomically; the daemon
/// writes only [`counter::ACCESSES_DELETED`]. Both survive a daemon restart with the maps
/// pinned, so a fill computed from them stays right across restarts.
pub mod counter {
    /// Live entries in `FDS`, to tell when the LRU starts evicting live fds.
    pub const FDS_LIVE: u32 = 0;
    /// Live entries in `PROCS` (the probe inserts and removes them all).
    pub const PROCS_LIVE: u32 = 1;
    /// Entries the probe inserted into `ACCESSES` and announced (one it had to drop again,
    /// its record lost, is not counted).
    pub const ACCESSES_INSERTED: u32 = 2;
    /// Entries of `ACCESSES` the daemon deleted (written by the daemon only).
    pub const ACCESSES_DELETED: u32 = 3;
    /// Slots of the array.
    pub const SLOTS: u32 = 4;
}
